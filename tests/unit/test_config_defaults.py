"""The configuration's documented defaults (README, ``docs/protocol.md`` §34, the docstrings of
``mesh._core.config``) and its validation, each refusal with its message."""

from __future__ import annotations

import pytest

from mesh._core.config import DirectoryConfig, Limits, MeshConfig, RetryPolicy, Timeouts
from mesh.errors import InvalidArgument


def test_timeouts() -> None:
    """Requests, connects and drains 10 s; replay window 60 s, 5 s skew; heads re-signed every
    15 s and valid 120 s; renewal grace 7 days; claims kept a day."""
    t = Timeouts()

    assert (t.request, t.connect, t.drain) == (10.0, 10.0, 10.0)
    assert (t.replay_window, t.max_future) == (60.0, 5.0)
    assert (t.head_refresh, t.head_ttl) == (15.0, 120.0)
    assert t.renewal_grace == 604_800.0
    assert t.claim_window == 86_400.0


def test_retry_policy() -> None:
    """3 attempts, no per-try limit, full-jitter backoff 25 ms / 250 ms, budget 20 % + 10/s
    over 10 s."""
    r = RetryPolicy()

    assert (r.attempts, r.per_try_timeout) == (3, None)
    assert (r.backoff_base, r.backoff_cap) == (0.025, 0.25)
    assert (r.budget_ratio, r.budget_min_per_s, r.budget_ttl) == (0.2, 10.0, 10.0)


def test_limits_and_directory() -> None:
    """Bodies up to 1 MiB less 20 KiB, 64 concurrent handlers, replies cached 120 s, 100 000
    ids per replay guard; heartbeats every second, records dead after 4 s, 0.3 s drain grace."""
    limits, directory = Limits(), DirectoryConfig()

    assert limits.max_body == 1_048_576 - 20_480
    assert (limits.endpoint_concurrency, limits.reply_cache_ttl) == (64, 120.0)
    assert limits.seen_cache == 100_000
    assert (directory.heartbeat, directory.ttl, directory.drain_grace) == (1.0, 4.0, 0.3)


def test_mesh_config() -> None:
    """A local server, prefix "mesh", services on, no access log, signals every 5 s, no state
    dir, no policy allowed in the library, replicas chosen by the cluster, claims on."""
    c = MeshConfig()

    assert (c.servers, c.prefix) == (("nats://127.0.0.1:4222",), "mesh")
    assert (c.services, c.access_log, c.signals_interval) == (True, False, 5.0)
    assert (c.state_dir, c.allow_no_policy, c.replicas, c.claims) == (None, True, None, True)
    assert c.timeouts == Timeouts() and c.retry == RetryPolicy()


@pytest.mark.parametrize("prefix", ["", "a.b", "a b", "*"])
def test_bad_prefix_refused(prefix: str) -> None:
    """A subject prefix that is not a valid name is refused, naming it a subject prefix."""
    with pytest.raises(InvalidArgument, match="subject prefix"):
        MeshConfig(prefix=prefix)


@pytest.mark.parametrize("window", [0.0, -1.0])
def test_claim_window_must_be_positive(window: float) -> None:
    """A claim window of zero or less is refused; the smallest positive one is accepted."""
    with pytest.raises(InvalidArgument, match=r"Timeouts.claim_window must be positive$"):
        MeshConfig(timeouts=Timeouts(claim_window=window))
    assert MeshConfig(timeouts=Timeouts(claim_window=0.001)).timeouts.claim_window == 0.001


def test_renewal_grace_must_not_be_negative() -> None:
    """A negative renewal grace is refused; zero (grace off) is accepted."""
    with pytest.raises(InvalidArgument, match=r"Timeouts.renewal_grace must not be negative$"):
        MeshConfig(timeouts=Timeouts(renewal_grace=-0.001))
    assert MeshConfig(timeouts=Timeouts(renewal_grace=0)).timeouts.renewal_grace == 0


def test_servers_must_not_be_empty() -> None:
    """A config without servers is refused, saying what to give."""
    with pytest.raises(InvalidArgument, match=r"MeshConfig.servers is empty: give at least one"):
        MeshConfig(servers=())
