"""Unit tests for mesh._core.traffic: circuits, outlier ejection, peak EWMA, splits and affinity."""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter

import pytest

from mesh._core.traffic import (
    CLOSED,
    FAILURE_CODES,
    HALF_OPEN,
    OPEN,
    CircuitBreaker,
    OutlierDetector,
    PeakEwmaPicker,
    is_failure,
    rendezvous_pick,
    weighted_choice,
)
from mesh.testing import FakeClock


class TopRng(random.Random):
    """A random source whose jitter is always the top of its range, for exact schedules."""

    def uniform(self, a: float, b: float) -> float:
        return b


class TestIsFailure:
    @pytest.mark.parametrize("code", ["UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL"])
    def test_server_side_codes_fail(self, code: str) -> None:
        """The gateway-error analogues count as failures."""
        assert is_failure(code)
        assert code in FAILURE_CODES

    @pytest.mark.parametrize(
        "code",
        ["INVALID_ARGUMENT", "NOT_FOUND", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "OK"],
    )
    def test_client_errors_do_not_fail(self, code: str) -> None:
        """A callee refusing as designed never counts as a failure."""
        assert not is_failure(code)


def opened(
    clock: FakeClock, open_for: float = 1.0, max_open_for: float = 60.0, probe_timeout: float = 30.0
) -> CircuitBreaker:
    """A breaker (threshold 3, exact schedule) that has just opened."""
    breaker = CircuitBreaker(
        3, open_for, max_open_for, probe_timeout=probe_timeout, clock=clock, rng=TopRng()
    )
    for _ in range(3):
        breaker.record(True)
    return breaker


class TestCircuitBreaker:
    def test_starts_closed_and_admits(self) -> None:
        """A new circuit is closed, admits calls and has nothing to wait for."""
        breaker = CircuitBreaker(clock=FakeClock())

        assert breaker.state == CLOSED
        assert breaker.admit() is None
        assert (breaker.retry_after, breaker.openings, breaker.opened_at) == (0.0, 0, None)

    def test_one_failure_short_of_threshold_stays_closed(self) -> None:
        """threshold - 1 consecutive failures leave the circuit closed."""
        breaker = CircuitBreaker(5, clock=FakeClock())
        for _ in range(4):
            breaker.record(True)

        assert breaker.state == CLOSED
        assert breaker.admit() is None

    def test_threshold_failures_open(self) -> None:
        """The threshold-th consecutive failure opens the circuit."""
        clock = FakeClock()
        breaker = CircuitBreaker(5, clock=clock)
        for _ in range(5):
            breaker.record(True)

        assert breaker.state == OPEN
        assert (breaker.openings, breaker.opened_at) == (1, clock.now)

    def test_success_resets_consecutive_failures(self) -> None:
        """A success in between restarts the count of consecutive failures."""
        breaker = CircuitBreaker(3, clock=FakeClock())
        for failed in (True, True, False, True, True):
            breaker.record(failed)

        assert breaker.state == CLOSED

    def test_open_refuses_with_retry_after(self) -> None:
        """An open circuit refuses with the seconds left of its open time."""
        clock = FakeClock()
        breaker = opened(clock)
        clock.advance(0.25)

        assert breaker.admit() == pytest.approx(0.75)
        assert breaker.retry_after == pytest.approx(0.75)

    def test_open_time_passed_is_half_open(self) -> None:
        """Once the open time has passed the circuit reports half open."""
        clock = FakeClock()
        breaker = opened(clock)
        clock.advance(0.999)
        assert breaker.state == OPEN

        clock.advance(0.001)

        assert breaker.state == HALF_OPEN
        assert breaker.retry_after == 0.0

    def test_half_open_admits_exactly_one_probe(self) -> None:
        """The first caller once half open is the probe; the next waits the base open time."""
        clock = FakeClock()
        breaker = opened(clock, open_for=2.0)
        clock.advance(2.0)

        assert breaker.admit() is None
        assert breaker.admit() == 2.0
        assert breaker.admit() == 2.0

    def test_probe_wait_ends_with_the_lease(self) -> None:
        """A caller behind a probe waits no longer than what is left of the probe's lease."""
        clock = FakeClock()
        breaker = opened(clock, probe_timeout=5.0)
        clock.advance(1.0)
        breaker.admit()

        clock.advance(4.5)

        assert breaker.admit() == pytest.approx(0.5)

    def test_an_abandoned_probe_passes_its_lease_on_at_once(self) -> None:
        """A probe cancelled before its outcome: the next caller probes, without waiting for
        the lease to run out; the circuit is still half open, not closed."""
        clock = FakeClock()
        breaker = opened(clock, open_for=2.0)
        clock.advance(2.0)
        assert breaker.admit() is None

        breaker.abandon()

        assert breaker.state == HALF_OPEN
        assert breaker.admit() is None
        assert breaker.admit() == 2.0

    def test_successful_probe_closes(self) -> None:
        """A probe's success closes the circuit and resets the openings count."""
        clock = FakeClock()
        breaker = opened(clock)
        clock.advance(1.0)
        breaker.admit()

        breaker.record(False)

        assert breaker.state == CLOSED
        assert (breaker.openings, breaker.opened_at) == (0, None)
        assert breaker.admit() is None

    def test_failed_probe_reopens_for_twice_as_long(self) -> None:
        """A probe's failure reopens the circuit with the open time doubled."""
        clock = FakeClock()
        breaker = opened(clock)
        clock.advance(1.0)
        breaker.admit()

        breaker.record(True)

        assert breaker.state == OPEN
        assert breaker.openings == 2
        assert breaker.opened_at == clock.now
        assert breaker.admit() == 2.0

    def test_open_time_doubles_up_to_the_cap(self) -> None:
        """Successive openings last 1, 2, 4, 8 s and then no more than max_open_for."""
        clock = FakeClock()
        breaker = opened(clock, max_open_for=10.0)
        waits = []
        for _ in range(6):
            waits.append(breaker.retry_after)
            clock.advance(breaker.retry_after)
            breaker.admit()
            breaker.record(True)

        assert waits == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]

    def test_many_openings_stay_capped(self) -> None:
        """Hundreds of failed probes never overflow the doubling."""
        clock = FakeClock()
        breaker = opened(clock)
        for _ in range(300):
            clock.advance(breaker.retry_after)
            breaker.admit()
            breaker.record(True)

        assert breaker.retry_after == 60.0

    def test_jitter_keeps_80_to_100_percent(self) -> None:
        """With a real random source an opening lasts 80 % to 100 % of its schedule."""
        clock = FakeClock()
        waits = []
        for seed in range(300):
            breaker = CircuitBreaker(1, 10.0, clock=clock, rng=random.Random(seed))
            breaker.record(True)
            waits.append(breaker.retry_after)

        assert all(8.0 <= w <= 10.0 for w in waits)
        assert min(waits) < 8.1
        assert max(waits) > 9.9

    def test_outcomes_while_open_are_ignored(self) -> None:
        """Late outcomes recorded while open neither close nor extend the circuit."""
        clock = FakeClock()
        breaker = opened(clock)

        breaker.record(False)
        breaker.record(True)

        assert breaker.state == OPEN
        assert breaker.openings == 1
        assert breaker.retry_after == 1.0

    def test_outcomes_half_open_without_probe_are_ignored(self) -> None:
        """Once half open, outcomes recorded before any probe is admitted decide nothing."""
        clock = FakeClock()
        breaker = opened(clock)
        clock.advance(1.0)

        breaker.record(False)
        breaker.record(True)

        assert breaker.state == HALF_OPEN
        assert breaker.openings == 1
        assert breaker.admit() is None

    def test_first_outcome_with_probe_out_decides(self) -> None:
        """With a probe out, the first outcome recorded decides, whichever call it came from."""
        clock = FakeClock()
        breaker = opened(clock)
        clock.advance(1.0)
        breaker.admit()

        breaker.record(True)  # a slow call admitted before the circuit opened
        breaker.record(False)  # the probe, now an ordinary outcome on an open circuit

        assert breaker.state == OPEN
        assert breaker.openings == 2

    def test_late_probe_outcome_is_ordinary(self) -> None:
        """A probe reporting after another outcome closed the circuit counts as one failure."""
        clock = FakeClock()
        breaker = opened(clock)
        clock.advance(1.0)
        breaker.admit()
        breaker.record(False)

        breaker.record(True)
        breaker.record(True)

        assert breaker.state == CLOSED
        breaker.record(True)
        assert breaker.state == OPEN

    def test_silent_probe_lease_expires(self) -> None:
        """A probe that never reports lets a new probe through after probe_timeout."""
        clock = FakeClock()
        breaker = opened(clock, probe_timeout=30.0)
        clock.advance(1.0)
        assert breaker.admit() is None

        clock.advance(29.999)
        assert breaker.admit() is not None
        clock.advance(0.001)

        assert breaker.admit() is None
        assert breaker.admit() == 1.0

    def test_default_threshold_is_five_failures(self) -> None:
        """With the defaults 4 failures in a row leave the circuit closed, the 5th opens it."""
        breaker = CircuitBreaker(clock=FakeClock())
        for _ in range(4):
            breaker.record(True)
        assert breaker.state == CLOSED

        breaker.record(True)

        assert breaker.state == OPEN

    def test_default_first_opening_lasts_one_second(self) -> None:
        """With the defaults the first opening lasts 1 s (at the top of its jitter)."""
        breaker = CircuitBreaker(1, clock=FakeClock(), rng=TopRng())

        breaker.record(True)

        assert breaker.retry_after == 1.0

    def test_default_openings_double_up_to_sixty_seconds(self) -> None:
        """With the defaults openings last 1, 2, 4 ... 32 s, then 60 s and no more."""
        clock = FakeClock()
        breaker = CircuitBreaker(1, clock=clock, rng=TopRng())
        breaker.record(True)
        waits = []
        for _ in range(8):
            waits.append(breaker.retry_after)
            clock.advance(breaker.retry_after)
            breaker.admit()
            breaker.record(True)

        assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]

    def test_default_probe_lease_is_thirty_seconds(self) -> None:
        """With the defaults a silent probe's lease has 0.5 s left after 29.5 s and ends at 30 s."""
        clock = FakeClock()
        breaker = CircuitBreaker(1, 100.0, 100.0, clock=clock, rng=TopRng())
        breaker.record(True)
        clock.advance(100.0)
        assert breaker.admit() is None

        clock.advance(29.5)
        assert breaker.admit() == 0.5
        clock.advance(0.5)

        assert breaker.admit() is None

    def test_doubling_stops_at_2_to_the_64th(self) -> None:
        """With no cap (max_open_for infinite) an opening grows to open_for * 2**64, no more."""
        clock = FakeClock()
        breaker = opened(clock, max_open_for=math.inf)
        for _ in range(70):
            clock.advance(2 * breaker.retry_after)
            breaker.admit()
            breaker.record(True)

        assert breaker.openings == 71
        assert breaker.retry_after == pytest.approx(2.0**64)


class TestOutlierDetector:
    def test_one_failure_short_of_threshold_keeps_instance(self) -> None:
        """threshold - 1 consecutive failures do not eject."""
        detector: OutlierDetector[str] = OutlierDetector(5, clock=FakeClock())

        assert not any(detector.record("a", True, 10) for _ in range(4))
        assert not detector.is_ejected("a")

    def test_threshold_failures_eject(self) -> None:
        """The threshold-th consecutive failure ejects, and the call says so."""
        detector: OutlierDetector[str] = OutlierDetector(5, clock=FakeClock())

        results = [detector.record("a", True, 10) for _ in range(5)]

        assert results == [False] * 4 + [True]
        assert detector.is_ejected("a")

    def test_success_resets_consecutive_failures(self) -> None:
        """A success in between restarts the count."""
        detector: OutlierDetector[str] = OutlierDetector(3, clock=FakeClock())
        for failed in (True, True, False, True, True):
            detector.record("a", failed, 10)

        assert not detector.is_ejected("a")

    @pytest.mark.parametrize(("population", "cap"), [(3, 1), (10, 1), (20, 2)])
    def test_ejection_cap(self, population: int, cap: int) -> None:
        """At most max(1, floor(population * 10 %)) instances are ejected at once."""
        detector: OutlierDetector[int] = OutlierDetector(1, clock=FakeClock())

        ejections = sum(detector.record(i, True, population) for i in range(population))

        assert ejections == cap
        assert len(detector.ejected()) == cap

    def test_fractional_percent(self) -> None:
        """A fractional max_ejection_percent is floored the same way: 12.5 % of 16 is 2."""
        detector: OutlierDetector[int] = OutlierDetector(1, 30.0, 12.5, clock=FakeClock())

        assert sum(detector.record(i, True, 16) for i in range(16)) == 2

    def test_capped_instance_ejected_once_room_frees(self) -> None:
        """An instance the cap spared is ejected at its next failure once another returns."""
        clock = FakeClock()
        detector: OutlierDetector[str] = OutlierDetector(2, clock=clock)
        detector.record("a", True, 3)
        detector.record("a", True, 3)
        detector.record("b", True, 3)
        assert not detector.record("b", True, 3)

        clock.advance(30.0)

        assert detector.record("b", True, 3)
        assert set(detector.ejected()) == {"b"}

    def test_ejection_lasts_base_then_returns(self) -> None:
        """A first ejection lasts base_ejection seconds, then the instance returns by itself."""
        clock = FakeClock()
        detector: OutlierDetector[str] = OutlierDetector(1, clock=clock)
        detector.record("a", True, 10)

        clock.advance(29.999)
        assert detector.is_ejected("a")
        clock.advance(0.001)

        assert not detector.is_ejected("a")
        assert detector.ejected() == {}

    def test_second_ejection_is_twice_as_long(self) -> None:
        """Ejected again straight after returning, an instance stays out 2 * base_ejection."""
        clock = FakeClock()
        detector: OutlierDetector[str] = OutlierDetector(1, clock=clock)
        detector.record("a", True, 10)
        clock.advance(30.0)

        assert detector.record("a", True, 10)

        assert detector.ejected() == {"a": 60.0}

    def test_ejection_capped_at_max(self) -> None:
        """The ejection time grows no further than max_ejection."""
        clock = FakeClock()
        detector: OutlierDetector[str] = OutlierDetector(1, 30.0, max_ejection=100.0, clock=clock)
        lengths = []
        for _ in range(5):
            detector.record("a", True, 10)
            lengths.append(detector.ejected()["a"])
            clock.advance(lengths[-1])

        assert lengths == [30.0, 60.0, 90.0, 100.0, 100.0]

    def test_multiplier_decays_while_healthy(self) -> None:
        """Each whole base_ejection period spent back in service takes one off the multiplier."""
        clock = FakeClock()
        detector: OutlierDetector[str] = OutlierDetector(1, clock=clock)
        for _ in range(3):  # ejected for 30, 60, 90 s: the multiplier is 3
            detector.record("a", True, 10)
            clock.advance(detector.ejected()["a"])

        clock.advance(59.999)  # one whole period in service: 3 - 1 = 2, then 3 for this one
        detector.record("a", True, 10)

        assert detector.ejected() == {"a": 90.0}

    def test_multiplier_decays_to_zero(self) -> None:
        """Long enough in service, an instance is ejected for base_ejection again."""
        clock = FakeClock()
        detector: OutlierDetector[str] = OutlierDetector(1, clock=clock)
        for _ in range(3):
            detector.record("a", True, 10)
            clock.advance(detector.ejected()["a"])

        clock.advance(1000.0)
        detector.record("a", True, 10)

        assert detector.ejected() == {"a": 30.0}

    def test_outcomes_while_ejected_are_ignored(self) -> None:
        """Failures recorded for an ejected instance neither eject again nor lengthen it."""
        clock = FakeClock()
        detector: OutlierDetector[str] = OutlierDetector(1, clock=clock)
        detector.record("a", True, 10)
        clock.advance(10.0)

        assert not detector.record("a", True, 10)

        assert detector.ejected() == {"a": 20.0}

    def test_return_resets_failures(self) -> None:
        """An instance back from ejection starts its count of failures afresh."""
        clock = FakeClock()
        detector: OutlierDetector[str] = OutlierDetector(2, clock=clock)
        detector.record("a", True, 10)
        detector.record("a", True, 10)
        clock.advance(30.0)

        assert not detector.record("a", True, 10)

    def test_ejected_reports_seconds_left(self) -> None:
        """ejected() maps each ejected instance to the seconds its ejection has left."""
        clock = FakeClock()
        detector: OutlierDetector[str] = OutlierDetector(1, 30.0, 100, clock=clock)
        detector.record("a", True, 10)
        clock.advance(10.0)
        detector.record("b", True, 10)
        detector.record("c", False, 10)

        assert detector.ejected() == {"a": 20.0, "b": 30.0}

    def test_unknown_instance_is_not_ejected(self) -> None:
        """An instance never recorded is not ejected."""
        detector: OutlierDetector[str] = OutlierDetector(clock=FakeClock())

        assert not detector.is_ejected("nobody")

    def test_forget_drops_state(self) -> None:
        """A forgotten instance is back in service with no failures counted."""
        detector: OutlierDetector[str] = OutlierDetector(2, clock=FakeClock())
        detector.record("a", True, 10)
        detector.record("a", True, 10)
        detector.record("b", True, 10)

        detector.forget("a")
        detector.forget("b")
        detector.forget("never")

        assert not detector.is_ejected("a")
        assert not detector.record("b", True, 10)

    def test_filter_drops_ejected(self) -> None:
        """filter keeps the candidates that are not ejected, in order."""
        detector: OutlierDetector[str] = OutlierDetector(1, clock=FakeClock())
        detector.record("b", True, 3)

        kept = detector.filter([("a", 1), ("b", 2), ("c", 3)], key=lambda c: c[0])

        assert kept == [("a", 1), ("c", 3)]

    def test_filter_panics_to_all(self) -> None:
        """When every candidate is ejected, filter returns them all."""
        detector: OutlierDetector[str] = OutlierDetector(1, clock=FakeClock())
        detector.record("a", True, 1)

        assert detector.filter(["a"], key=lambda c: c) == ["a"]

    def test_state_bounded_forgets_oldest_in_service(self) -> None:
        """Past max_keys the least recently recorded instance in service is forgotten."""
        detector: OutlierDetector[str] = OutlierDetector(
            2, 30.0, 100, max_keys=3, clock=FakeClock()
        )
        detector.record("old", True, 10)
        detector.record("newer", True, 10)
        detector.record("newest", True, 10)
        detector.record("old", True, 10)  # ejected, and recorded most recently

        detector.record("extra", True, 10)  # "newer" is forgotten, "newest" kept

        assert detector.record("newest", True, 10)
        assert not detector.record("newer", True, 10)
        assert detector.is_ejected("old")

    def test_state_bounded_when_all_ejected(self) -> None:
        """With every tracked instance ejected, the oldest is forgotten to make room."""
        detector: OutlierDetector[str] = OutlierDetector(
            1, 30.0, 100, max_keys=2, clock=FakeClock()
        )
        detector.record("a", True, 10)
        detector.record("b", True, 10)

        detector.record("c", True, 10)

        assert set(detector.ejected()) == {"b", "c"}

    def test_default_threshold_is_five_failures(self) -> None:
        """With the defaults the 4th consecutive failure keeps the instance, the 5th ejects it."""
        detector: OutlierDetector[str] = OutlierDetector(clock=FakeClock())

        results = [detector.record("a", True, 10) for _ in range(5)]

        assert results == [False] * 4 + [True]

    def test_default_cap_is_ten_percent(self) -> None:
        """With the defaults 10 of 100 instances may be ejected at once, not 11."""
        detector: OutlierDetector[int] = OutlierDetector(1, clock=FakeClock())

        assert sum(detector.record(i, True, 100) for i in range(100)) == 10

    def test_default_ejections_grow_by_thirty_seconds_up_to_300(self) -> None:
        """With the defaults ejections last 30, 60 ... 300 s, then 300 s again."""
        clock = FakeClock()
        detector: OutlierDetector[str] = OutlierDetector(1, clock=clock)
        lengths = []
        for _ in range(11):
            detector.record("a", True, 10)
            lengths.append(detector.ejected()["a"])
            clock.advance(lengths[-1])

        assert lengths == [30.0 * n for n in range(1, 11)] + [300.0]

    def test_default_state_bound_is_4096_instances(self) -> None:
        """With the defaults the 4097th instance recorded makes the first one forgotten."""
        detector: OutlierDetector[int] = OutlierDetector(2, clock=FakeClock())
        for i in range(4097):
            detector.record(i, True, 10_000)

        assert not detector.record(0, True, 10_000)
        assert detector.record(4096, True, 10_000)

    def test_ejection_ends_at_its_exact_end_time(self) -> None:
        """At the very instant its ejection ends the instance is back, with nothing left."""
        clock = FakeClock()
        detector: OutlierDetector[str] = OutlierDetector(1, clock=clock)
        detector.record("a", True, 10)

        clock.advance(30.0)

        assert detector.ejected() == {}
        assert not detector.is_ejected("a")

    def test_multiplier_decays_period_by_period(self) -> None:
        """The multiplier drops one per whole base_ejection in service, counted from the end of
        the last whole period: after 45 s it is 2, 30 s later 1 (not 0)."""
        clock = FakeClock()
        detector: OutlierDetector[str] = OutlierDetector(1, clock=clock)
        for _ in range(3):  # ejected for 30, 60, 90 s: the multiplier is 3
            detector.record("a", True, 10)
            clock.advance(detector.ejected()["a"])
        clock.advance(45.0)
        detector.record("a", False, 10)
        clock.advance(30.0)

        detector.record("a", True, 10)

        assert detector.ejected() == {"a": 60.0}

    def test_state_bounded_counts_an_ejection_ending_now_as_in_service(self) -> None:
        """Past max_keys an instance whose ejection ends this very instant is forgotten first."""
        clock = FakeClock()
        detector: OutlierDetector[str] = OutlierDetector(2, max_keys=2, clock=clock)
        detector.record("a", True, 10)
        detector.record("a", True, 10)
        detector.record("b", True, 10)
        clock.advance(30.0)

        detector.record("c", False, 10)  # "a" is forgotten, "b" keeps its failure

        assert detector.record("b", True, 10)


class TestPeakEwmaPicker:
    def test_defaults_are_linkerd(self) -> None:
        """The default decay is 10 s and the default rtt 30 ms."""
        picker: PeakEwmaPicker[str] = PeakEwmaPicker()

        assert (picker.decay, picker.default_rtt) == (10.0, 0.030)

    def test_single_candidate(self) -> None:
        """With one candidate it is always picked."""
        picker: PeakEwmaPicker[str] = PeakEwmaPicker(rng=random.Random(0), clock=FakeClock())

        assert picker.pick(["a"]) == "a"

    def test_new_key_costs_default_rtt(self) -> None:
        """A key never observed is estimated at default_rtt."""
        picker: PeakEwmaPicker[str] = PeakEwmaPicker(clock=FakeClock())

        assert picker.rtt("new") == 0.030

    def test_first_sample_becomes_estimate(self) -> None:
        """A key's first observed latency replaces the default outright."""
        picker: PeakEwmaPicker[str] = PeakEwmaPicker(clock=FakeClock())

        picker.observe("a", 0.005)

        assert picker.rtt("a") == 0.005

    def test_peak_replaces_at_once(self) -> None:
        """A sample above the estimate becomes the estimate immediately."""
        clock = FakeClock()
        picker: PeakEwmaPicker[str] = PeakEwmaPicker(clock=clock)
        picker.observe("a", 0.010)
        clock.advance(0.001)

        picker.observe("a", 0.500)

        assert picker.rtt("a") == 0.500

    def test_lower_sample_blends_by_elapsed_time(self) -> None:
        """A sample below the estimate is weighted 1 - exp(-elapsed / decay)."""
        clock = FakeClock()
        picker: PeakEwmaPicker[str] = PeakEwmaPicker(clock=clock)
        picker.observe("a", 1.0)
        clock.advance(10.0)

        picker.observe("a", 0.1)

        assert picker.rtt("a") == pytest.approx(1.0 * math.exp(-1) + 0.1 * (1 - math.exp(-1)))

    def test_decays_back_toward_recent_samples(self) -> None:
        """After a peak, steady fast samples bring the estimate back down to them."""
        clock = FakeClock()
        picker: PeakEwmaPicker[str] = PeakEwmaPicker(clock=clock)
        picker.observe("a", 0.1)
        picker.observe("a", 2.0)
        for _ in range(60):
            clock.advance(1.0)
            picker.observe("a", 0.1)

        assert 0.1 < picker.rtt("a") < 0.11

    def test_idle_estimate_relaxes_toward_default(self) -> None:
        """Between samples the estimate used for cost drifts back to default_rtt."""
        clock = FakeClock()
        picker: PeakEwmaPicker[str] = PeakEwmaPicker(clock=clock)
        picker.observe("a", 2.0)

        clock.advance(10.0)
        assert picker.rtt("a") == pytest.approx(0.030 + 1.97 * math.exp(-1))
        clock.advance(1000.0)

        assert picker.rtt("a") == pytest.approx(0.030)

    def test_negative_latency_counts_as_zero(self) -> None:
        """A negative latency (a clock stepped back) is observed as zero."""
        picker: PeakEwmaPicker[str] = PeakEwmaPicker(clock=FakeClock())

        picker.observe("a", -1.0)

        assert picker.rtt("a") == 0.0

    def test_outstanding_raises_cost(self) -> None:
        """Of two keys with equal estimates the one with fewer outstanding requests wins."""
        picker: PeakEwmaPicker[str] = PeakEwmaPicker(rng=random.Random(0), clock=FakeClock())
        picker.acquire("a")

        assert {picker.pick(["a", "b"]) for _ in range(100)} == {"b"}

    def test_slow_instance_gets_fewer_picks(self) -> None:
        """Under load a slow instance gets far fewer picks than fast ones, but some."""
        picker: PeakEwmaPicker[str] = PeakEwmaPicker(rng=random.Random(1234), clock=FakeClock())
        for name, rtt in (("fast1", 0.010), ("fast2", 0.010), ("slow", 0.100)):
            picker.observe(name, rtt)

        counts = Counter()
        for _ in range(300):  # nothing completes, so outstanding builds up
            chosen = picker.pick(["fast1", "slow", "fast2"])
            picker.acquire(chosen)
            counts[chosen] += 1

        assert 0 < counts["slow"] < counts["fast1"] / 5
        assert 0 < counts["slow"] < counts["fast2"] / 5

    def test_key_function(self) -> None:
        """State is looked up under the key the key function gives."""
        picker: PeakEwmaPicker[str] = PeakEwmaPicker(rng=random.Random(0), clock=FakeClock())
        picker.observe("slow", 1.0)
        picker.observe("fast", 0.001)

        chosen = {picker.pick([("slow", 1), ("fast", 2)], key=lambda c: c[0]) for _ in range(50)}

        assert chosen == {("fast", 2)}

    def test_penalty_avoids_key(self) -> None:
        """A penalized key loses even to a slow key with many outstanding requests."""
        picker: PeakEwmaPicker[str] = PeakEwmaPicker(rng=random.Random(0), clock=FakeClock())
        picker.observe("loaded", 1.0)
        for _ in range(50):
            picker.acquire("loaded")
        picker.observe("idle", 0.001)

        picker.penalize("idle", 5.0)

        assert {picker.pick(["idle", "loaded"]) for _ in range(50)} == {"loaded"}

    def test_penalty_expires(self) -> None:
        """After the penalty period the key is judged by its cost again."""
        clock = FakeClock()
        picker: PeakEwmaPicker[str] = PeakEwmaPicker(rng=random.Random(0), clock=clock)
        for _ in range(50):
            picker.acquire("loaded")
        picker.penalize("idle", 5.0)

        clock.advance(5.0)

        assert {picker.pick(["idle", "loaded"]) for _ in range(50)} == {"idle"}

    def test_release_forgets_idle_keys(self) -> None:
        """Releasing the last outstanding request removes the key; extra releases are safe."""
        picker: PeakEwmaPicker[str] = PeakEwmaPicker(clock=FakeClock())
        picker.acquire("a")
        picker.acquire("a")

        picker.release("a")
        assert picker.outstanding == {"a": 1}
        picker.release("a")
        picker.release("a")

        assert picker.outstanding == {}

    def test_forget_drops_all_state(self) -> None:
        """A forgotten key has the default estimate, no penalty and nothing outstanding."""
        picker: PeakEwmaPicker[str] = PeakEwmaPicker(rng=random.Random(0), clock=FakeClock())
        picker.observe("a", 1.0)
        picker.acquire("a")
        picker.penalize("a", 60.0)

        picker.forget("a")
        picker.forget("never")

        assert picker.rtt("a") == 0.030
        assert picker.outstanding == {}
        assert {picker.pick(["a", "b"]) for _ in range(20)} == {"a", "b"}

    def test_estimates_bounded_least_recently_observed_dropped(self) -> None:
        """Past max_keys the least recently observed key falls back to the default."""
        picker: PeakEwmaPicker[str] = PeakEwmaPicker(max_keys=2, clock=FakeClock())
        picker.observe("a", 1.0)
        picker.observe("b", 1.0)
        picker.observe("a", 1.0)

        picker.observe("c", 1.0)

        assert [picker.rtt(k) for k in "abc"] == [1.0, 0.030, 1.0]

    def test_penalties_bounded(self) -> None:
        """Past max_keys the oldest penalty is dropped."""
        picker: PeakEwmaPicker[str] = PeakEwmaPicker(
            max_keys=2, rng=random.Random(0), clock=FakeClock()
        )
        for _ in range(50):
            picker.acquire("loaded")
        picker.penalize("a", 60.0)
        picker.penalize("b", 60.0)
        picker.penalize("a", 60.0)

        picker.penalize("c", 60.0)

        assert {picker.pick(["b", "loaded"]) for _ in range(50)} == {"b"}
        assert {picker.pick(["a", "loaded"]) for _ in range(50)} == {"loaded"}

    def test_default_random_source(self) -> None:
        """Without an rng the picker draws from its own random source."""
        picker: PeakEwmaPicker[str] = PeakEwmaPicker(clock=FakeClock())

        assert {picker.pick(["a", "b"]) for _ in range(50)} == {"a", "b"}

    def test_cost_is_rtt_times_outstanding_plus_one(self) -> None:
        """30 ms with one outstanding (cost 60) loses to 50 ms idle (50), beats 70 ms idle (70)."""
        picker: PeakEwmaPicker[str] = PeakEwmaPicker(rng=random.Random(0), clock=FakeClock())
        picker.acquire("busy")
        picker.observe("busy", 0.030)
        picker.observe("idle50", 0.050)
        picker.observe("idle70", 0.070)

        assert {picker.pick(["busy", "idle50"]) for _ in range(50)} == {"idle50"}
        assert {picker.pick(["busy", "idle70"]) for _ in range(50)} == {"busy"}

    def test_two_distinct_candidates_are_compared(self) -> None:
        """Of three candidates the costliest is never picked: it is never compared with itself."""
        picker: PeakEwmaPicker[str] = PeakEwmaPicker(rng=random.Random(0), clock=FakeClock())
        picker.observe("slow", 1.0)

        chosen = {picker.pick(["slow", "a", "b"]) for _ in range(200)}

        assert chosen == {"a", "b"}

    def test_a_tie_goes_to_the_first_sampled(self) -> None:
        """Of two candidates of equal cost the first one drawn is picked."""
        picker: PeakEwmaPicker[str] = PeakEwmaPicker(rng=random.Random(7), clock=FakeClock())
        draws = random.Random(7)
        names = ["a", "b", "c"]

        for _ in range(50):
            first = names[draws.randrange(3)]
            draws.randrange(2)
            assert picker.pick(names) == first

    def test_lower_sample_soon_after_blends_by_its_short_elapsed_time(self) -> None:
        """Half a second after the last sample a lower one is weighted 1 - exp(-0.05)."""
        clock = FakeClock()
        picker: PeakEwmaPicker[str] = PeakEwmaPicker(clock=clock)
        picker.observe("a", 1.0)
        clock.advance(0.5)

        picker.observe("a", 0.1)

        w = math.exp(-0.05)
        assert picker.rtt("a") == pytest.approx(1.0 * w + 0.1 * (1 - w))

    def test_an_expired_penalty_frees_its_place(self) -> None:
        """A penalty found expired (at its very end) is dropped, so a new one evicts no live one."""
        clock = FakeClock()
        picker: PeakEwmaPicker[str] = PeakEwmaPicker(max_keys=2, rng=random.Random(0), clock=clock)
        for _ in range(50):
            picker.acquire("loaded")
        picker.penalize("a", 100.0)
        picker.penalize("b", 5.0)
        clock.advance(5.0)
        assert {picker.pick(["b", "loaded"]) for _ in range(20)} == {"b"}

        picker.penalize("c", 60.0)

        assert {picker.pick(["a", "loaded"]) for _ in range(50)} == {"loaded"}

    def test_releasing_the_only_outstanding_request_forgets_the_key(self) -> None:
        """One acquire and one release leave nothing outstanding."""
        picker: PeakEwmaPicker[str] = PeakEwmaPicker(clock=FakeClock())
        picker.acquire("a")

        picker.release("a")

        assert picker.outstanding == {}

    def test_default_bound_is_4096_keys(self) -> None:
        """With the defaults the 4097th key observed drops the first one's estimate."""
        picker: PeakEwmaPicker[int] = PeakEwmaPicker(clock=FakeClock())
        for i in range(4097):
            picker.observe(i, 1.0)

        assert (picker.rtt(0), picker.rtt(1), picker.rtt(4096)) == (0.030, 1.0, 1.0)


class TestWeightedChoice:
    @pytest.mark.parametrize(
        ("u", "index"),
        [(0.0, 0), (0.2499, 0), (0.25, 1), (0.7499, 1), (0.75, 2), (math.nextafter(1.0, 0), 2)],
    )
    def test_boundaries(self, u: float, index: int) -> None:
        """Weights 1, 2, 1 split [0, 1) into [0, .25), [.25, .75) and [.75, 1)."""
        assert weighted_choice([1, 2, 1], u) == index

    def test_proportional_over_a_grid(self) -> None:
        """Evenly spaced draws land in proportion to the weights."""
        counts = Counter(weighted_choice([1, 3, 6], i / 1000) for i in range(1000))

        assert counts == {0: 100, 1: 300, 2: 600}

    def test_zero_weight_never_chosen(self) -> None:
        """A zero-weight entry is never chosen, even at the edges of its neighbours."""
        draws = [i / 997 for i in range(997)] + [math.nextafter(1.0, 0)]

        chosen = {weighted_choice([0, 3, 0, 1, 0], u) for u in draws}

        assert chosen == {1, 3}

    def test_large_total_top_draw_stays_in_range(self) -> None:
        """The largest draw below 1 picks the last positive entry even for huge totals."""
        assert weighted_choice([1, 2**60, 0], math.nextafter(1.0, 0)) == 1

    @pytest.mark.parametrize(
        ("weights", "u"),
        [([], 0.5), ([0, 0], 0.5), ([-1, 2], 0.5), ([1], 1.0), ([1], -0.1)],
    )
    def test_invalid_input_refused(self, weights: list[int], u: float) -> None:
        """Negative weights, a sum that is not positive or a draw outside [0, 1) are refused."""
        with pytest.raises(ValueError, match="non-negative"):
            weighted_choice(weights, u)

    def test_a_single_weight_of_one_is_a_split(self) -> None:
        """The smallest positive total, 1, is accepted: its one entry is always chosen."""
        assert weighted_choice([1], 0.5) == 0
        assert weighted_choice([0, 1], 0.0) == 1


def on(key: str, names: list[str]) -> str:
    return rendezvous_pick(key, names, name=lambda n: n)


KEYS = [f"session-{i}" for i in range(3000)]


class TestRendezvousPick:
    def test_score_is_blake2b_prefix(self) -> None:
        """The winner has the highest big-endian first 8 bytes of blake2b(key NUL name)."""

        def score(name: str) -> int:
            digest = hashlib.blake2b(f"k-1\x00{name}".encode()).digest()
            return int.from_bytes(digest[:8], "big")

        names = ["alpha", "beta", "gamma", "delta"]

        assert on("k-1", names) == max(names, key=score)

    def test_deterministic_and_order_free(self) -> None:
        """A key lands on the same candidate whatever the candidates' order."""
        names = ["a", "b", "c", "d"]

        assert all(on(k, names) == on(k, names[::-1]) for k in KEYS[:500])

    def test_adding_a_candidate_moves_keys_only_to_it(self) -> None:
        """A new candidate takes some keys; every other key stays where it was."""
        before = {k: on(k, ["a", "b", "c"]) for k in KEYS}

        after = {k: on(k, ["a", "b", "c", "d"]) for k in KEYS}

        moved = {k for k in KEYS if before[k] != after[k]}
        assert moved
        assert all(after[k] == "d" for k in moved)

    def test_removing_another_candidate_keeps_keys(self) -> None:
        """Keys not on the removed candidate stay; its keys spread over the rest."""
        before = {k: on(k, ["a", "b", "c"]) for k in KEYS}

        after = {k: on(k, ["a", "b"]) for k in KEYS}

        assert all(after[k] == before[k] for k in KEYS if before[k] != "c")
        assert {after[k] for k in KEYS if before[k] == "c"} == {"a", "b"}

    def test_keys_spread_evenly(self) -> None:
        """3000 keys over 3 candidates give each within 20 % of 1000."""
        counts = Counter(on(k, ["a", "b", "c"]) for k in KEYS)

        assert all(800 <= counts[n] <= 1200 for n in "abc")

    def test_name_function_maps_candidates(self) -> None:
        """Candidates are scored by the name the name function gives."""
        candidates = [("a", 1), ("b", 2), ("c", 3)]

        chosen = rendezvous_pick("k-1", candidates, name=lambda c: c[0])

        assert chosen[0] == on("k-1", ["a", "b", "c"])

    def test_empty_candidates_refused(self) -> None:
        """With no candidates there is nothing to pick."""
        with pytest.raises(ValueError):
            rendezvous_pick("k-1", [], name=str)
