"""``mesh-agent run --reload``: a supervising process that restarts the runner on a change.

In the spirit of ``uvicorn --reload``: this process never imports the agent. It starts the real
runner as a child (the same command line with ``--no-reload``), polls the modification times
of the watched sources every half second, and on a change stops the child as SIGTERM does
(it drains), then starts it again. A child that exits by itself (an import error, a revoked
certificate) is restarted at the next change. SIGINT or SIGTERM to this process is passed on
to the child, which drains; the exit code is then the child's.

The child runs in a process group of its own, so a Ctrl-C at the terminal reaches it once,
through this process, rather than twice.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import FrameType

from mesh._log import get_logger

log = get_logger(__name__)

POLL_INTERVAL = 0.5  # seconds between two looks at the watched files
_SKIPPED_DIRS = frozenset({"__pycache__", "node_modules", "site-packages"})


def _sources(files: Iterable[Path], trees: Iterable[Path]) -> Iterator[Path]:
    yield from files
    for tree in trees:
        for folder, dirs, names in os.walk(tree):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d not in _SKIPPED_DIRS]
            yield from (Path(folder, n) for n in names if n.endswith(".py"))


def snapshot(files: Iterable[Path], trees: Iterable[Path]) -> dict[Path, int]:
    """The modification time (ns) of each watched file: ``files``, and every ``*.py`` under
    ``trees`` (hidden folders and ``__pycache__`` left out). A missing file is left out too,
    so a deleted or a new file counts as a change."""
    times: dict[Path, int] = {}
    for path in _sources(files, trees):
        try:
            times[path] = path.stat().st_mtime_ns
        except OSError:
            continue
    return times


def changed(before: dict[Path, int], after: dict[Path, int]) -> list[str]:
    """The files added, removed or modified between two snapshots, sorted."""
    return sorted(str(p) for p in before.keys() | after.keys() if before.get(p) != after.get(p))


class _Child:
    """The runner process, started in a process group of its own."""

    def __init__(self, command: Sequence[str]) -> None:
        self.process = subprocess.Popen(command, process_group=0)
        log.info("agent.reloader_started_runner", pid=self.process.pid)

    def stop(self, signum: int, timeout: float) -> int:
        """Send ``signum``, wait up to ``timeout`` for the drain, then kill; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("agent.reloader_killed_runner", pid=self.process.pid)
                self.process.kill()
                self.process.wait()
        return exit_code(self.process.returncode)


def exit_code(returncode: int) -> int:
    """A child's exit code as a shell reports it (killed by signal N: 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def supervise(
    command: Sequence[str],
    *,
    files: Sequence[Path],
    trees: Sequence[Path],
    stop_timeout: float,
) -> int:
    """Run ``command`` and restart it whenever a watched file changes, until SIGINT or SIGTERM.

    Args:
        command: the runner's command line (without ``--reload``).
        files: single files to watch (the target's file).
        trees: folders whose ``*.py`` files are watched, recursively (its package).
        stop_timeout: how long a stopping runner may drain before it is killed.

    Returns:
        The exit code of the last runner after SIGINT or SIGTERM (0 after a clean drain), or
        128 + the signal number when no runner was running.
    """
    received: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    log.info(
        "agent.reloader_watching",
        files=[str(f) for f in files],
        trees=[str(t) for t in trees],
        interval=POLL_INTERVAL,
    )
    try:
        seen = snapshot(files, trees)
        child: _Child | None = _Child(command)
        reported_exit = False
        while not received:
            time.sleep(POLL_INTERVAL)
            if child is not None and child.process.poll() is not None and not reported_exit:
                reported_exit = True
                log.warning(
                    "agent.runner_exited",
                    code=exit_code(child.process.returncode),
                    waiting="for a change to restart it",
                )
            now = snapshot(files, trees)
            if now == seen or received:
                continue
            time.sleep(0.1)  # an editor may write in several steps: take the last
            now = snapshot(files, trees)
            log.info("agent.reloading", changed=changed(seen, now))
            seen = now
            if child is not None:
                child.stop(signal.SIGTERM, stop_timeout)
            child = None if received else _Child(command)
            reported_exit = False
        if child is None or child.process.poll() is not None:
            return 128 + received[0]
        return child.stop(received[0], stop_timeout)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
