"""``mesh._log``: stdlib loggers under ``mesh``, silent unless configured, structured records."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import structlog

from mesh._log import get_logger


def test_the_mesh_logger_has_a_null_handler_so_nothing_reaches_the_last_resort() -> None:
    """Importing the SDK puts a NullHandler on ``mesh``: Python's last-resort handler (which
    prints WARNING and above to stderr) never fires for the mesh's records."""
    code = (
        "import mesh, logging\n"
        "logging.getLogger('mesh._runtime.server').warning('mesh.x a=1')\n"
        "logging.getLogger('mesh._runtime.server').error('mesh.y a=2')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert (result.stdout, result.stderr) == ("", "")
    assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger("mesh").handlers)


def test_a_record_carries_the_event_and_fields_as_message_and_attributes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The message is ``event k=v ...``; the event and the fields are record attributes; a
    field named like a LogRecord attribute gets a trailing underscore instead of failing."""
    log = get_logger("mesh.test")
    with caplog.at_level(logging.INFO, logger="mesh"):
        log.warning("mesh.thing", endpoint="echo", error="two words", name="n", empty="")
    [record] = caplog.records
    assert record.name == "mesh.test" and record.levelno == logging.WARNING
    assert record.getMessage() == 'mesh.thing endpoint=echo error="two words" name=n empty=""'
    assert record.__dict__["event"] == "mesh.thing"
    assert record.__dict__["endpoint"] == "echo"
    assert record.__dict__["name_"] == "n"
    assert record.filename == "test_library_logging.py"  # the call site, not mesh/_log.py
    assert record.exc_info is None


def test_a_disabled_level_builds_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """Below the level, the fields are not even turned into text."""

    class Loud:
        def __str__(self) -> str:
            raise AssertionError("formatted although the level is off")

    log = get_logger("mesh.test")
    with caplog.at_level(logging.WARNING, logger="mesh"):
        log.debug("mesh.quiet", value=Loud())
        log.info("mesh.quiet", value=Loud())
    assert caplog.records == []


def test_tracebacks_only_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    """``exc_info`` exists on ``debug`` only; the traceback is the stdlib's (no locals)."""
    log = get_logger("mesh.test")
    with caplog.at_level(logging.DEBUG, logger="mesh"):
        try:
            secret = "payload-xyz"
            raise RuntimeError("boom")
        except RuntimeError:
            log.error("mesh.failed", error_type="RuntimeError")
            log.debug("mesh.failed_traceback", exc_info=True)
        # above DEBUG, exc_info is no option: it would be a plain field, never a traceback
        log.error("mesh.failed", exc_info=True)
    failed, traceback, again = caplog.records
    assert failed.exc_info is None and again.exc_info is None
    assert traceback.exc_info is not None
    assert secret not in caplog.text
    assert "Traceback" not in again.getMessage()


def test_loggers_live_under_mesh() -> None:
    """A mesh logger outside ``mesh`` would miss the NullHandler."""
    with pytest.raises(ValueError, match="under 'mesh'"):
        get_logger("meshy")
    assert get_logger("mesh").logger is logging.getLogger("mesh")


def test_the_access_log_ignores_the_applications_structlog_level(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An application (or `mesh-policy`) that configures structlog to warnings only still
    gets every access-log line: an access log is data, not a log level."""
    from mesh._observability.access_log import AccessLog

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        cache_logger_on_first_use=True,
    )
    try:
        AccessLog("back", "i1").write(
            caller="alice", caller_instance="a1", endpoint="leaf", code="OK", seconds=0.001,
            request_bytes=3, reply_bytes=4, traceparent=None, attempt=1,
        )  # fmt: skip
    finally:
        structlog.reset_defaults()
    line = json.loads(capsys.readouterr().out)
    assert (line["callee"], line["code"], line["endpoint"]) == ("back", "OK", "leaf")
