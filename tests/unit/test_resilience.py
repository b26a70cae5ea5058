"""Unit tests for mesh.resilience: backoff, retry budget, instance picking and the reply cache."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from mesh import InvalidArgument
from mesh._core.resilience import Backoff, LeastLoadedPicker, RetryBudget
from mesh._runtime.concurrency import ReplyCache
from mesh.testing import FakeClock


class TestBackoff:
    def test_defaults_are_envoy(self) -> None:
        """The default base is 25 ms and the cap 250 ms."""
        b = Backoff()

        assert (b.base, b.cap) == (0.025, 0.250)

    @pytest.mark.parametrize(
        ("retry", "upper"),
        [(1, 0.025), (2, 0.05), (3, 0.1), (4, 0.2), (5, 0.25), (6, 0.25), (30, 0.25)],
    )
    def test_full_jitter_bounds(self, retry: int, upper: float) -> None:
        """Delays lie in [0, min(cap, base * 2**(retry-1))] and span most of that range."""
        b = Backoff(rng=random.Random(42))

        delays = [b.delay(retry) for _ in range(2000)]

        assert all(0.0 <= d <= upper for d in delays)
        assert min(delays) < upper * 0.05
        assert max(delays) > upper * 0.95

    def test_seeded_rng_reproducible(self) -> None:
        """Two backoffs with equally seeded rngs give the same delays."""
        a, b = Backoff(rng=random.Random(7)), Backoff(rng=random.Random(7))

        assert [a.delay(n) for n in range(1, 10)] == [b.delay(n) for n in range(1, 10)]

    def test_retry_zero_treated_as_first(self) -> None:
        """A retry number below 1 uses the first retry's bound."""
        b = Backoff(rng=random.Random(1))

        assert all(0.0 <= b.delay(0) <= 0.025 for _ in range(200))

    def test_huge_retry_number_capped(self) -> None:
        """A very large retry number still gives a delay within the cap."""
        b = Backoff(rng=random.Random(1))

        assert 0.0 <= b.delay(2000) <= 0.25


class TestRetryBudget:
    def test_floor_without_requests(self) -> None:
        """With no requests, 10/s over 10 s allows exactly 100 retries."""
        budget = RetryBudget(clock=FakeClock())

        spent = [budget.try_spend() for _ in range(101)]

        assert spent == [True] * 100 + [False]

    def test_ratio_adds_to_floor(self) -> None:
        """1000 requests add 20 % (200) retries on top of the floor of 100."""
        budget = RetryBudget(clock=FakeClock())
        for _ in range(1000):
            budget.record_request()

        spent = sum(budget.try_spend() for _ in range(400))

        assert spent == 300

    def test_window_slides(self) -> None:
        """Retries spent more than ttl ago no longer count against the budget."""
        clock = FakeClock()
        budget = RetryBudget(clock=clock)
        for _ in range(100):
            budget.try_spend()
        assert not budget.try_spend()

        clock.now += 10.0

        assert budget.try_spend()

    def test_window_partly_slides(self) -> None:
        """Only the retries that left the window are given back."""
        clock = FakeClock()
        budget = RetryBudget(clock=clock)
        for _ in range(40):
            budget.try_spend()
        clock.now += 5.0
        for _ in range(60):
            budget.try_spend()
        assert not budget.try_spend()

        clock.now += 5.0  # the first 40 leave the window

        assert sum(budget.try_spend() for _ in range(50)) == 40

    def test_old_requests_stop_counting(self) -> None:
        """Requests older than ttl no longer raise the budget."""
        clock = FakeClock()
        budget = RetryBudget(clock=clock)
        for _ in range(1000):
            budget.record_request()
        clock.now += 10.0

        assert sum(budget.try_spend() for _ in range(400)) == 100

    def test_request_history_bounded_without_retries(self) -> None:
        """Recording requests for a long time without retries keeps only the window."""
        clock = FakeClock()
        budget = RetryBudget(clock=clock)

        for _ in range(100):
            for _ in range(100):
                budget.record_request()
            clock.now += 1.0

        assert len(budget._requests) <= 1000


class TestLeastLoadedPicker:
    def test_single_candidate(self) -> None:
        """With one candidate it is always picked."""
        picker: LeastLoadedPicker[str] = LeastLoadedPicker(rng=random.Random(0))

        assert picker.pick(["a"]) == "a"

    def test_two_candidates_less_loaded_wins(self) -> None:
        """Of two candidates the one with fewer outstanding requests is always picked."""
        picker: LeastLoadedPicker[str] = LeastLoadedPicker(rng=random.Random(0))
        picker.acquire("a")

        assert {picker.pick(["a", "b"]) for _ in range(100)} == {"b"}

    def test_prefers_less_outstanding(self) -> None:
        """Over many picks the busiest is never chosen and the idlest most often."""
        picker: LeastLoadedPicker[str] = LeastLoadedPicker(rng=random.Random(1234))
        for _ in range(3):
            picker.acquire("busy")
        picker.acquire("some")

        counts = Counter(picker.pick(["busy", "some", "idle"]) for _ in range(3000))

        assert counts["busy"] == 0
        assert counts["idle"] > counts["some"] > 0
        assert 1800 < counts["idle"] < 2200

    def test_equal_load_spreads(self) -> None:
        """With equal load every candidate gets a share of the picks."""
        picker: LeastLoadedPicker[str] = LeastLoadedPicker(rng=random.Random(5))

        counts = Counter(picker.pick(["a", "b", "c"]) for _ in range(3000))

        assert all(counts[k] > 500 for k in "abc")

    def test_release_forgets_idle_keys(self) -> None:
        """Releasing the last outstanding request removes the key; extra releases are safe."""
        picker: LeastLoadedPicker[str] = LeastLoadedPicker()
        picker.acquire("a")
        picker.acquire("a")

        picker.release("a")
        assert picker.outstanding == {"a": 1}
        picker.release("a")
        picker.release("a")

        assert picker.outstanding == {}

    def test_penalty_avoids_key(self) -> None:
        """A penalized key loses against a key with many outstanding requests."""
        clock = FakeClock()
        picker: LeastLoadedPicker[str] = LeastLoadedPicker(rng=random.Random(0), clock=clock)
        for _ in range(50):
            picker.acquire("loaded")

        picker.penalize("idle", 5.0)

        assert {picker.pick(["idle", "loaded"]) for _ in range(50)} == {"loaded"}

    def test_penalty_expires(self) -> None:
        """After the penalty period the key is judged by its real load again."""
        clock = FakeClock()
        picker: LeastLoadedPicker[str] = LeastLoadedPicker(rng=random.Random(0), clock=clock)
        for _ in range(50):
            picker.acquire("loaded")
        picker.penalize("idle", 5.0)

        clock.now += 5.0

        assert {picker.pick(["idle", "loaded"]) for _ in range(50)} == {"idle"}


class TestReplyCache:
    KEY = ("alice", "ask", "k-1")

    async def test_first_claim_owns(self) -> None:
        """The first claim of a key is the owner and gets a pending future."""
        cache = ReplyCache(clock=FakeClock())

        owner, fut = cache.claim(self.KEY)

        assert owner
        assert not fut.done()
        assert len(cache) == 1

    async def test_second_claim_shares_future(self) -> None:
        """A second claim is not the owner and gets the same future, pending or done."""
        cache = ReplyCache(clock=FakeClock())
        _, first = cache.claim(self.KEY)

        owner, second = cache.claim(self.KEY)
        first.set_result(("OK", b"{}"))
        owner_after, third = cache.claim(self.KEY)

        assert not owner
        assert not owner_after
        assert second is first
        assert third is first
        assert await third == ("OK", b"{}")

    async def test_keys_are_independent(self) -> None:
        """Different keys each get their own owner and future."""
        cache = ReplyCache(clock=FakeClock())

        owner_a, fut_a = cache.claim(("alice", "ask", "1"))
        owner_b, fut_b = cache.claim(("alice", "ask", "2"))

        assert owner_a
        assert owner_b
        assert fut_a is not fut_b

    async def test_forget_releases_key(self) -> None:
        """After forget, the next claim owns the key again with a new future."""
        cache = ReplyCache(clock=FakeClock())
        _, first = cache.claim(self.KEY)

        cache.forget(self.KEY)
        cache.forget(self.KEY)  # forgetting twice is harmless
        owner, second = cache.claim(self.KEY)

        assert owner
        assert second is not first

    async def test_ttl_expiry(self) -> None:
        """A finished entry older than the TTL is replaced by a new owner."""
        clock = FakeClock()
        cache = ReplyCache(ttl=120.0, clock=clock)
        _, first = cache.claim(self.KEY)
        first.set_result(("OK", b"{}"))

        clock.now += 120.0
        still, _ = cache.claim(self.KEY)
        clock.now += 0.001
        owner, second = cache.claim(self.KEY)

        assert not still
        assert owner
        assert second is not first

    async def test_pending_entry_outlives_ttl(self) -> None:
        """An attempt still running past the TTL keeps its entry, so retries wait for it."""
        clock = FakeClock()
        cache = ReplyCache(ttl=1.0, clock=clock)
        _, first = cache.claim(self.KEY)

        clock.now += 10.0
        owner, second = cache.claim(self.KEY)

        assert not owner
        assert second is first
        first.cancel()

    async def test_expired_entries_trimmed(self) -> None:
        """Finished entries past the TTL are dropped at the next claim."""
        clock = FakeClock()
        cache = ReplyCache(ttl=1.0, clock=clock)
        for n in range(5):
            _, fut = cache.claim(("a", "e", str(n)))
            fut.set_result(("OK", b""))

        clock.now += 2.0
        cache.claim(("a", "e", "new"))

        assert len(cache) == 1

    async def test_oldest_finished_entry_evicted_when_full(self) -> None:
        """When full, the oldest finished key is evicted and can be claimed anew."""
        cache = ReplyCache(max_entries=3, clock=FakeClock())
        futs = []
        for n in range(6):
            fut = cache.claim(("a", "e", str(n)))[1]
            fut.set_result(("OK", b""))
            futs.append(fut)

        owner, fut = cache.claim(("a", "e", "0"))

        assert owner
        assert fut is not futs[0]
        fut.cancel()

    async def test_bounded_size(self) -> None:
        """With finished entries, the cache never holds more than max_entries."""
        cache = ReplyCache(max_entries=3, clock=FakeClock())
        for n in range(10):
            cache.claim(("a", "e", str(n)))[1].set_result(("OK", b""))
            assert len(cache) <= 3

    async def test_running_entries_are_never_evicted(self) -> None:
        """An entry whose first attempt still runs survives a full cache, so no rerun."""
        cache = ReplyCache(max_entries=2, clock=FakeClock())
        running = cache.claim(("a", "e", "slow"))[1]
        for n in range(5):
            cache.claim(("a", "e", str(n)))[1].set_result(("OK", b""))

        owner, fut = cache.claim(("a", "e", "slow"))

        assert not owner and fut is running
        running.cancel()

    async def test_key_reused_with_another_body_is_refused(self) -> None:
        """The same idempotency key with a different request body is an INVALID_ARGUMENT."""
        cache = ReplyCache(clock=FakeClock())
        cache.claim(("a", "e", "k"), b"body-1")[1].set_result(("OK", b""))

        with pytest.raises(InvalidArgument):
            cache.claim(("a", "e", "k"), b"body-2")
        assert cache.claim(("a", "e", "k"), b"body-1")[0] is False
