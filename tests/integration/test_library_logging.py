"""The library logs like a library: silent in a script that configured no logging, stdlib
records under ``mesh`` when it did, and never the payload above DEBUG."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mesh.testing import NatsServer

REPO = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-payload-7f1d"

# A user's script: a handler that fails with an exception quoting the payload, and a caller.
SCRIPT = textwrap.dedent(
    f"""
    import asyncio, logging, sys

    from pydantic import BaseModel

    import mesh
    from mesh.testing import Trust, test_config

    if sys.argv[2] != "none":
        logging.basicConfig(level=getattr(logging, sys.argv[2].upper()))


    class Msg(BaseModel):
        text: str


    agent = mesh.Agent("bob")


    @agent.endpoint()
    async def boom(m: Msg) -> Msg:
        raise RuntimeError(f"cannot handle {{m.text}}")


    async def main() -> None:
        trust = Trust()
        cfg = test_config([sys.argv[1]])
        async with (
            mesh.Mesh(trust.identity("bob"), cfg, agent=agent),
            mesh.Mesh(trust.identity("alice"), cfg) as alice,
        ):
            await alice.wait_for("bob")
            try:
                await alice.request("bob", "boom", Msg(text="{SECRET}"), Msg)
            except mesh.Internal:
                pass
            else:
                raise SystemExit("the handler did not fail")
        print("DONE")


    asyncio.run(main())
    """
)

# A record of logging.basicConfig's default format starts "LEVEL:logger:".
RECORD = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL):([\w.]+):(.*)$")


def run_script(tmp_path: Path, url: str, level: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), url, level],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result


def records(stderr: str) -> list[tuple[str, str, str]]:
    """(level, logger, text with the lines that follow it, such as a traceback)."""
    out: list[tuple[str, str, str]] = []
    for line in stderr.splitlines():
        m = RECORD.match(line)
        if m:
            out.append((m[1], m[2], m[3]))
        else:
            assert out, f"not a log record: {line!r}"
            level, name, text = out[-1]
            out[-1] = (level, name, text + "\n" + line)
    return out


async def test_unconfigured_logging_prints_nothing(nats_server: NatsServer, tmp_path: Path) -> None:
    """No logging configured: the failed handler leaves stdout and stderr to the application."""
    result = run_script(tmp_path, nats_server.url, "none")
    assert result.stdout == "DONE\n"
    assert result.stderr == ""


@pytest.mark.parametrize("level", ["info", "warning"])
async def test_configured_logging_shows_the_failure_without_the_payload(
    nats_server: NatsServer, tmp_path: Path, level: str
) -> None:
    """With ``basicConfig`` at INFO or WARNING the failure is an ERROR record of a ``mesh``
    logger naming the endpoint, the caller and the exception's type, never its message."""
    result = run_script(tmp_path, nats_server.url, level)
    assert result.stdout == "DONE\n"
    assert SECRET not in result.stderr
    failed = [r for r in records(result.stderr) if r[2].startswith("mesh.handler_failed ")]
    assert len(failed) == 1
    lvl, name, text = failed[0]
    assert lvl == "ERROR" and name.startswith("mesh.")
    assert text == "mesh.handler_failed endpoint=boom caller=alice error_type=RuntimeError"


async def test_debug_logging_adds_the_traceback_and_only_it_quotes_the_payload(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """At DEBUG the traceback follows (stdlib, no local variables); the application's own
    exception message in it is the one place the payload may appear."""
    result = run_script(tmp_path, nats_server.url, "debug")
    assert result.stdout == "DONE\n"
    recs = records(result.stderr)
    assert any(r[0] == "ERROR" and r[2].startswith("mesh.handler_failed ") for r in recs)
    quoting = [r for r in recs if SECRET in r[2]]
    assert quoting, "the DEBUG traceback should show the handler's exception"
    for lvl, name, text in quoting:
        assert lvl == "DEBUG" and name.startswith("mesh.")
        assert text.startswith("mesh.handler_traceback endpoint=boom\nTraceback")
        # only the exception's own line quotes it: no local variables, no payload dump
        assert [line for line in text.splitlines() if SECRET in line] == [
            f"RuntimeError: cannot handle {SECRET}"
        ]
