"""Running ``mesh-policy`` and ``mesh-agent`` as a user does, from async tests: the executables
next to ``sys.executable``, configured through ``MESH_*`` variables, in a worker thread so the
event loop keeps serving the agents the test runs in-process."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
POLICIES = REPO / "policies"

# Rich sizes tables to the terminal; without one it uses 80 columns and truncates cells.
# A wide "terminal" keeps one table row per line, so rows can be parsed.
WIDE = "250"


def base_env(columns: str | None = WIDE, **mesh: str | Path) -> dict[str, str]:
    """The test process's environment without ``MESH_*`` settings or colour forcing, with
    ``COLUMNS=columns`` (unset: rich's default of 80 without a terminal) and
    ``MESH_<KEY>=value`` for each keyword (``servers=...``, ``identity=...``)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MESH_") and k not in ("FORCE_COLOR", "COLUMNS", "LINES")
    }
    if columns is not None:
        env["COLUMNS"] = columns
    env.update({f"MESH_{k.upper()}": str(v) for k, v in mesh.items()})
    return env


def run_sync(
    *args: str | Path, env: Mapping[str, str], cwd: Path = REPO, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """``BIN/args[0] args[1:]``, output captured as text."""
    return subprocess.run(
        [str(BIN / str(args[0])), *map(str, args[1:])],
        cwd=cwd,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


async def run(
    *args: str | Path, env: Mapping[str, str], cwd: Path = REPO, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """``run_sync`` in a thread, so in-process agents keep running meanwhile."""
    return await asyncio.to_thread(run_sync, *args, env=env, cwd=cwd, timeout=timeout)


async def run_until(
    check: Callable[[subprocess.CompletedProcess[str]], bool],
    *args: str | Path,
    env: Mapping[str, str],
    timeout: float = 15,
) -> subprocess.CompletedProcess[str]:
    """Run a command again until ``check`` accepts its result; return the last result."""
    end = time.monotonic() + timeout
    while True:
        result = await run(*args, env=env)
        if check(result) or time.monotonic() > end:
            return result
        await asyncio.sleep(0.1)


def table(text: str) -> list[dict[str, str]]:
    """The body rows of the (first) rich table in ``text``, as ``{header: cell}`` mappings.

    Needs one line per row, i.e. a table that fits the width (see ``WIDE``).
    """
    header: list[str] = []
    rows: list[dict[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("┃") and not header:
            header = [c.strip() for c in line.strip("┃").split("┃")]
        elif line.startswith("│") and header:
            cells = [c.strip() for c in line.strip("│").split("│")]
            rows.append(dict(zip(header, cells, strict=True)))
    return rows


def init_keys(directory: Path) -> Path:
    """`mesh-policy init DIR`: root.key, root.pub, root.json, admin/ and registry/ (slow to
    repeat: test modules share one, with a nats-server per test)."""
    result = run_sync("mesh-policy", "init", directory, env=base_env())
    assert result.returncode == 0, result.stderr
    return directory
