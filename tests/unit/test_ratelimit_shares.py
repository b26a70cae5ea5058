"""The shared total's bookkeeping step by step (who holds what after each request), the token
bucket at exactly one token, and the rate limiter's bounds and refusals."""

from __future__ import annotations

import pytest

from mesh._core.policy import RateLimitSpec
from mesh._core.ratelimit import ACTIVE_WINDOW_S, MAX_SHARES, RateLimiter, SharedBucket, TokenBucket
from mesh.errors import InvalidArgument
from mesh.testing import FakeClock


def _state(bucket: SharedBucket) -> tuple[float, dict[str, float]]:
    return round(bucket._pool, 6), {k: round(v[0], 6) for k, v in bucket._shares.items()}


class TestTokenBucketAtOneToken:
    def test_exactly_one_token_is_available(self) -> None:
        """With exactly one token the bucket is available, with no wait, and gives it."""
        bucket = TokenBucket(1.0, 1, clock=FakeClock(0.0))

        assert bucket.available()
        assert bucket.retry_after() == 0.0
        assert bucket.try_take()
        assert not bucket.available()
        assert bucket.retry_after() == 1.0


class TestSharedBucketSteps:
    def test_invalid_settings_refused(self) -> None:
        """A shared total refuses the rates and bursts a token bucket refuses."""
        with pytest.raises(InvalidArgument, match="rate must be > 0"):
            SharedBucket(0, 1)
        with pytest.raises(InvalidArgument, match="burst must be >= 1"):
            SharedBucket(1.0, 0)

    def test_two_callers_share_the_refill(self) -> None:
        """The pool serves newcomers first; then each active caller's share gets half the
        rate, capped at half the burst, and the spill past a full share goes to the pool."""
        clock = FakeClock(0.0)
        b = SharedBucket(2.0, 4, clock=clock)
        for caller in "abab":
            assert b.wait(caller) == 0.0
            b.take(caller)
        assert _state(b) == (0.0, {"a": 0.0, "b": 0.0})
        assert b.wait("a") == 1.0  # until its own share (1 token/s) holds a token

        clock.advance(0.25)
        assert b.wait("a") == 0.75
        assert _state(b) == (0.0, {"a": 0.25, "b": 0.25})

        clock.advance(0.75)
        assert b.wait("a") == 0.0  # exactly one token in its share: enough
        b.take("a")
        assert _state(b) == (0.0, {"a": 0.0, "b": 1.0})

        clock.advance(2.0)  # a gets 2 (to its cap), b 2 of which 1 spills
        assert b.check("a") == 0.0
        assert _state(b) == (0.0, {"a": 2.0, "b": 2.0})  # the pool holds what shares leave: 0

    def test_a_newcomer_takes_from_the_shares_above_its_cap(self) -> None:
        """A third caller shrinks the cap to a third of the burst; what the shares held above
        it goes to the pool, which serves the newcomer."""
        clock = FakeClock(0.0)
        b = SharedBucket(2.0, 4, clock=clock)
        for caller in "ab":
            b.wait(caller)
            b.take(caller)
            b.take(caller)
        clock.advance(3.0)
        b.check("a")
        assert _state(b) == (0.0, {"a": 2.0, "b": 2.0})

        assert b.wait("c") == 0.0
        assert _state(b) == (1.333333, {"a": 1.333333, "b": 1.333333, "c": 0.0})
        b.take("c")
        assert _state(b) == (0.333333, {"a": 1.333333, "b": 1.333333, "c": 0.0})

    def test_check_counts_nobody(self) -> None:
        """check never refuses a caller that is not active, and does not make it active."""
        clock = FakeClock(0.0)
        b = SharedBucket(1.0, 1, clock=clock)
        b.wait("a")
        b.take("a")

        assert b.check("z") == 0.0
        assert list(b._shares) == ["a"]
        assert b.check("a") == 1.0

    def test_single_caller_waits_for_its_own_share(self) -> None:
        """Alone, a caller waits (1 - its share) / rate."""
        clock = FakeClock(0.0)
        b = SharedBucket(1.0, 1, clock=clock)
        b.wait("a")
        b.take("a")

        assert b.wait("a") == 1.0
        clock.advance(0.5)
        assert b.wait("a") == 0.5

    def test_pool_refills_while_nobody_is_active(self) -> None:
        """With no active caller the pool refills at the rate, up to the burst."""
        clock = FakeClock(0.0)
        b = SharedBucket(0.1, 10, clock=clock)
        b.wait("a")
        for _ in range(10):
            b.take("a")
        clock.advance(11.0)  # a gets 1.1 tokens, then leaves: they go to the pool
        b.check("x")
        assert _state(b) == (1.1, {})

        clock.advance(10.0)
        b.check("x")
        assert _state(b) == (2.1, {})
        clock.advance(1000.0)
        b.check("x")
        assert _state(b) == (10.0, {})

    def test_a_caller_stays_active_for_the_window_exactly(self) -> None:
        """A caller seen ACTIVE_WINDOW_S (10 s) ago still holds its share; a moment later it
        is gone."""
        clock = FakeClock(0.0)
        b = SharedBucket(1.0, 2, clock=clock)
        b.wait("a")
        assert ACTIVE_WINDOW_S == 10.0

        clock.advance(10.0)
        b.check("x")
        assert list(b._shares) == ["a"]
        clock.advance(0.001)
        b.check("x")
        assert list(b._shares) == []

    def test_at_most_max_shares_callers_least_recent_leaves(self) -> None:
        """64 callers hold shares; past that the least recently seen one leaves at the next
        request (a caller seen again is recent again)."""
        clock = FakeClock(0.0)
        b = SharedBucket(1000.0, 1000, clock=clock)
        assert MAX_SHARES == 64
        for i in range(MAX_SHARES):
            b.wait(f"c{i}")
        assert len(b._shares) == 64
        b.wait("c0")  # c0 is the most recent now; c1 the least

        b.wait("new")
        b.check("x")  # the bound is applied on the next request

        assert len(b._shares) == 64
        assert "c0" in b._shares and "c1" not in b._shares
        assert list(b._shares)[-1] == "new"

    def test_fewer_tokens_than_callers_still_serves(self) -> None:
        """With fewer tokens than active callers the pool serves them, first come first
        served: the endpoint keeps its rate (regression: the shares used to hold every token
        in pieces too small to use, and nobody was served again)."""
        clock = FakeClock(0.0)
        b = SharedBucket(1.0, 1, clock=clock)
        served = 0
        for _ in range(100):
            for caller in "ab":
                if b.wait(caller) == 0.0:
                    b.take(caller)
                    served += 1
            clock.advance(0.1)

        assert served >= 9  # about 1 + 1 per second over 10 s
        assert served <= 1 + 10

    def test_shares_hold_nothing_with_fewer_tokens_than_callers(self) -> None:
        """With burst 1 and two callers, refills go to the pool and the wait is the pool's."""
        clock = FakeClock(0.0)
        b = SharedBucket(1.0, 1, clock=clock)
        for caller in "ab":
            b.wait(caller)
        b.take("a")
        clock.advance(0.5)

        assert b.wait("b") == 0.5
        assert _state(b) == (0.5, {"a": 0.0, "b": 0.0})


class TestRateLimiterBounds:
    @pytest.mark.parametrize("bound", [-1, 0, 1])
    def test_fewer_than_two_buckets_refused(self, bound: int) -> None:
        """A bound below 2 (one request can need two buckets) is refused, naming it."""
        with pytest.raises(InvalidArgument, match=rf"max_buckets must be >= 2, got {bound}$"):
            RateLimiter(max_buckets=bound)

    def test_two_buckets_allowed(self) -> None:
        """Two buckets are enough for one caller with both limits."""
        limiter = RateLimiter(clock=FakeClock(0.0), max_buckets=2)
        limit = RateLimitSpec.model_validate({"per_caller": "1/s", "total": "1/s"})

        assert limiter.take("a", "x", "e", limit) is None
        assert len(limiter) == 2
        assert limiter.take("a", "x", "e", limit) == 1.0

    def test_default_bound(self) -> None:
        """By default the limiter keeps up to 10 000 buckets."""
        assert RateLimiter()._max == 10_000


class TestNoNegativeWaits:
    def test_more_than_one_token_means_no_wait(self) -> None:
        """A bucket holding between one and two tokens has no wait (never a negative one)."""
        clock = FakeClock(0.0)
        bucket = TokenBucket(1.0, 2, clock=clock)
        bucket.try_take()
        bucket.try_take()
        clock.advance(1.5)

        assert bucket.tokens == 1.5
        assert bucket.retry_after() == 0.0

    def test_a_share_with_more_than_one_token_means_no_wait(self) -> None:
        """A caller whose share holds 1.5 tokens, the pool less than one, does not wait."""
        clock = FakeClock(0.0)
        b = SharedBucket(2.0, 4, clock=clock)
        for caller in "abab":
            b.wait(caller)
            b.take(caller)
        clock.advance(1.0)
        b.take("a")
        clock.advance(1.5)

        assert b.wait("a") == 0.0
        assert _state(b) == (0.5, {"a": 1.5, "b": 2.0})
