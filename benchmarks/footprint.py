"""Mesh-only scalars: seconds from ``Mesh()`` to ready, and resident memory of agents.

Both are measured in a fresh child process, ``python -m benchmarks.footprint --url URL
--extra N``, that imports only the mesh. It starts one agent (an echo endpoint, its own NATS
connection), timing ``Mesh(...)`` to ``start()`` returning, and reads its resident set size;
then it starts ``N`` more agents in the same process (timing each start too) and reads it again.
It prints one JSON line. The directory bucket already exists on the server, as it does for
every agent but the first of a mesh.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

__all__ = ["footprint_in_child"]

ROOT = Path(__file__).resolve().parent.parent
SETTLE = 0.5


def rss_mb() -> float:
    """Resident set size of this process in MB (MiB)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # peak, KiB (bytes on macOS)
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


async def footprint_in_child(url: str, extra: int, timeout: float = 120.0) -> dict[str, float]:
    """Run the footprint child and return what it measured: ``start_s`` (first agent of the
    process), ``start_more_s`` (median of the extra agents), ``rss_one_mb``,
    ``rss_per_extra_mb``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.footprint",
        "--url",
        url,
        "--extra",
        str(extra),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise RuntimeError(f"footprint child did not finish in {timeout}s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"footprint child failed: {err.decode(errors='replace')[-2000:]}")
    result: dict[str, float] = json.loads(out.decode().strip().splitlines()[-1])
    return result


async def _measure(url: str, extra: int) -> dict[str, float]:
    import mesh
    from mesh.control_plane import TrustRoot

    from .meshecho import echo_agent, mesh_config

    root = TrustRoot.generate()
    cfg = mesh_config(url)

    async def settled_rss() -> float:
        await asyncio.sleep(SETTLE)
        gc.collect()
        return rss_mb()

    async def start(stack: contextlib.AsyncExitStack, name: str) -> float:
        identity, agent = root.issue_identity(name), echo_agent(name)
        t0 = time.perf_counter()
        m = mesh.Mesh(identity, cfg, agent=agent)
        await m.start()
        elapsed = time.perf_counter() - t0
        stack.push_async_callback(m.drain)
        return elapsed

    async with contextlib.AsyncExitStack() as stack:
        first = await start(stack, "bench-rss")
        one = await settled_rss()
        starts = [await start(stack, f"bench-rss-{i}") for i in range(extra)]
        more = await settled_rss()
    return {
        "start_s": first,
        "start_more_s": statistics.median(starts) if starts else first,
        "rss_one_mb": one,
        "rss_per_extra_mb": (more - one) / extra if extra else 0.0,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.footprint", description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--extra", type=int, default=10)
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(_measure(args.url, args.extra))), flush=True)


if __name__ == "__main__":
    main()
