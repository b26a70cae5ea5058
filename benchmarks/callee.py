"""An echo callee in its own process, for the ``-2proc`` scenarios.

Child side: ``python -m benchmarks.callee --system mesh --url nats://... [--identity DIR]``
serves the echo of one system, prints ``READY`` once it is subscribed, and exits when its
standard input closes (so it never outlives the benchmark).

Parent side: ``RemoteCallee`` starts and stops such a process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from pathlib import Path

__all__ = ["RemoteCallee"]

READY = "READY"
ROOT = Path(__file__).resolve().parent.parent


class RemoteCallee:
    """A ``benchmarks.callee`` child process (parent side)."""

    def __init__(self, system: str, url: str, extra_args: list[str]) -> None:
        self.system = system
        self._args = ["--system", system, "--url", url, *extra_args]
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, timeout: float = 60.0) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarks.callee",
            *self._args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=ROOT,
            env=env,
        )
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            await self.stop()
            raise RuntimeError(f"{self.system} callee not ready after {timeout}s") from None
        if not line.startswith(READY.encode()):
            await self.stop()
            raise RuntimeError(f"{self.system} callee failed to start: {line!r}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def stop(self, grace: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def _serve(system: str, url: str, identity_dir: str | None) -> None:
    from .systems import serve

    async with serve(system, url, identity_dir=identity_dir):
        print(READY, os.getpid(), flush=True)
        # Serve until the parent closes our stdin (or dies).
        await asyncio.to_thread(sys.stdin.buffer.read)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.callee", description=__doc__)
    parser.add_argument("--system", required=True, choices=["raw-nats", "faststream", "mesh"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--identity", help="identity directory (mesh only)")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.system, args.url, args.identity))


if __name__ == "__main__":
    main()
