"""``mesh._transport.nats.mesh_error``: nats-py's errors as mesh errors that say what to do."""

from __future__ import annotations

import errno

import nats.errors
import nats.js.errors
import pytest

from mesh._transport.nats import mesh_error, refused
from mesh.errors import FailedPrecondition, Unavailable

URL = "nats://127.0.0.1:4999"


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed ('127.0.0.1', 4999)"),
        OSError(
            "Multiple exceptions: [Errno 111] Connect call failed ('::1', 4999, 0, 0), "
            "[Errno 111] Connect call failed ('127.0.0.1', 4999)"
        ),
    ],
)
def test_a_refused_first_connection_says_nothing_is_listening(exc: OSError) -> None:
    """A refusal (also by every address of ``localhost``) names the URL and the fix."""
    assert refused(exc)
    err = mesh_error(exc, "connect", servers=[URL])
    assert isinstance(err, Unavailable)
    assert err.message == (
        f"nothing is listening at {URL}: connection refused "
        "(start nats-server, or check --servers / MESH_SERVERS)"
    )


@pytest.mark.parametrize(
    "exc",
    [
        TimeoutError(),
        OSError("Multiple exceptions: [Errno 111] refused, [Errno 101] Network is unreachable"),
        OSError(errno.EHOSTUNREACH, "No route to host"),
    ],
)
def test_other_first_connection_failures_are_not_called_refused(exc: OSError) -> None:
    assert not refused(exc)
    err = mesh_error(exc, "connect", servers=[URL])
    assert isinstance(err, Unavailable)
    assert err.message.startswith(f"cannot connect to NATS at {URL}: ")
    assert not isinstance(exc, TimeoutError) or err.message.endswith(": timed out")


def test_a_url_in_a_message_never_shows_credentials() -> None:
    err = mesh_error(ConnectionRefusedError(), "connect", servers=["nats://u:pw@host:4222"])
    assert "nothing is listening at nats://host:4222:" in err.message
    assert "pw" not in err.message


@pytest.mark.parametrize(
    "exc", [nats.js.errors.ServiceUnavailableError(), nats.errors.NoRespondersError()]
)
def test_a_jetstream_call_to_a_server_without_jetstream_gives_the_js_hint(
    exc: Exception,
) -> None:
    """Not retryable (FailedPrecondition): waiting does not enable JetStream."""
    err = mesh_error(exc, "opening the JetStream key-value bucket 'b'", jetstream_off_at=URL)
    assert isinstance(err, FailedPrecondition) and not err.retryable
    assert err.message == (
        "opening the JetStream key-value bucket 'b' failed: JetStream is not enabled on the "
        f"NATS server at {URL}: start nats-server with -js"
    )


def test_no_jetstream_responder_on_a_jetstream_server_stays_unavailable() -> None:
    """With JetStream enabled on the server (no ``jetstream_off_at``), a 503 is transient
    (a leader election, a restart): ``Unavailable``, retried by the runtime."""
    err = mesh_error(nats.js.errors.ServiceUnavailableError(), "opening the bucket 'b'")
    assert isinstance(err, Unavailable)
