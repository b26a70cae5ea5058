"""Command-line interfaces: ``mesh-agent`` and ``mesh-policy`` (thin layers over the SDK).

The console scripts start here, in ``mesh_agent`` and ``mesh_policy`` below, and import the tools'
modules (and with them the SDK, about 0.6 s) only inside a guard: Ctrl-C at any instant exits
130 without a traceback (``import mesh`` itself imports nothing heavy).
"""

import importlib
import os
import signal
import sys
from types import FrameType
from typing import NoReturn


def _interrupted_while_importing(signum: int, frame: FrameType | None) -> None:
    # Exit at once: nothing is open yet. Not a KeyboardInterrupt, which pydantic-core turns
    # into a SchemaError when it arrives while a model class is being built.
    os._exit(128 + signum)


def run(module: str) -> NoReturn:
    """Import ``module`` and exit with what its ``main()`` returns; Ctrl-C while importing
    exits 130 (128 + SIGINT), as in every later phase."""
    previous = signal.signal(signal.SIGINT, _interrupted_while_importing)
    try:
        main = importlib.import_module(module).main
    except KeyboardInterrupt:  # one that arrived before the handler was installed
        sys.exit(130)
    finally:
        signal.signal(signal.SIGINT, previous)
    sys.exit(main())


def mesh_agent() -> NoReturn:
    """The ``mesh-agent`` console script."""
    run("mesh.cli.agent")


def mesh_policy() -> NoReturn:
    """The ``mesh-policy`` console script."""
    run("mesh.cli.policy")
