"""What ran the benchmark: CPU, cores, memory, OS, versions, date."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from importlib import metadata

from mesh.testing import find_nats_server

__all__ = ["machine_info"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _nats_server_version() -> str:
    try:
        out = subprocess.run(
            [find_nats_server(), "--version"], capture_output=True, text=True, timeout=10
        )
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"
    return (out.stdout or out.stderr).strip().removeprefix("nats-server: ")


def machine_info() -> dict[str, object]:
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "os": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "nats-py": _version("nats-py"),
        "faststream": _version("faststream"),
        "nats-server": _nats_server_version(),
        "natsmesh": _version("natsmesh"),
        "pydantic": _version("pydantic"),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
