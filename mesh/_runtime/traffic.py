"""Traffic management in the caller (``docs/traffic.md``): the client pipeline's stages for what
``spec.routes`` and the endpoint settings of a policy ask for.

- ``fault`` (per call): delay and/or abort a share of a route's calls;
- ``mirror`` (per call): send a share of a route's calls, sealed, to a shadow as well, in the
  background, its reply discarded;
- ``circuit`` (per attempt): the destination's circuit breaker and its concurrency limits;
- ``observe`` (per attempt): each attempt's outcome against its instance (outlier ejection)
  and its latency (peak-EWMA balancing);
- ``choose``: the instance of an attempt: the route's split, the destination's ejections,
  affinity by consistent hashing, then the balancer.

Per-call stages run before the retry stage, as Envoy's fault filter runs before its router's
retries (a fault or a mirror happens once per call); per-attempt stages run inside it. A
policy that uses none of these gets none of the stages (``stages``), and a call then pays one
``is None`` test in ``choose``.

State is per destination: one circuit breaker and one outlier detector per agent and per
``spec.endpoints`` key (``researcher.*`` gives one circuit for all of ``researcher``'s
endpoints, ``researcher.answer`` one for that endpoint), kept while the settings stay the same
across policy revisions.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from mesh._core.policy import (
    CircuitBreakerSpec,
    MirrorSpec,
    OutlierDetectionSpec,
    Route,
    TrafficRoute,
)
from mesh._core.records import InstanceRecord
from mesh._core.traffic import (
    CircuitBreaker,
    OutlierDetector,
    PeakEwmaPicker,
    is_failure,
    rendezvous_pick,
    weighted_choice,
)
from mesh._log import get_logger
from mesh._runtime.concurrency import ConcurrencyLimit
from mesh._runtime.replies import NotDelivered
from mesh.errors import (
    CircuitOpen,
    DeadlineExceeded,
    MeshError,
    ResourceExhausted,
    error_from_code,
)

if TYPE_CHECKING:
    from mesh._runtime.client import Call, ClientPipeline

__all__ = ["Destination", "Traffic"]

log = get_logger(__name__)

Next = Callable[["Call"], Awaitable[bytes]]
Stage = Callable[[Next, "Call"], Awaitable[bytes]]

DEFAULT_MAX_PENDING = 1024
"""Calls that may wait for a destination's ``max_concurrent`` slots (Envoy's default for
``max_pending_requests``)."""
MAX_MIRRORS = 256
"""Mirror copies in flight at once per mesh connection; more are dropped (and counted), so a
slow shadow can never hold a caller's memory."""


class Destination:
    """What a caller keeps about one destination: its circuit breaker, the limits on what is in
    flight to it and waiting for it, and its instances' ejections.

    Args:
        name: ``<agent> (<endpoints key>)``, as errors and metrics show it.
        circuit: the circuit-breaker settings, if any.
        outliers: the outlier-detection settings, if any.
    """

    __slots__ = ("breaker", "circuit", "limit", "max_pending", "name", "outlier_spec", "outliers")

    def __init__(
        self,
        name: str,
        circuit: CircuitBreakerSpec | None,
        outliers: OutlierDetectionSpec | None,
    ) -> None:
        self.name = name
        self.circuit = circuit
        self.outlier_spec = outliers
        self.breaker: CircuitBreaker | None = None
        self.limit: ConcurrencyLimit | None = None
        self.max_pending = DEFAULT_MAX_PENDING
        if circuit is not None:
            self.breaker = CircuitBreaker(
                circuit.consecutive_failures, circuit.open_for, circuit.max_open_for
            )
            if circuit.max_concurrent is not None:
                self.limit = ConcurrencyLimit(circuit.max_concurrent)
            if circuit.max_pending is not None:
                self.max_pending = circuit.max_pending
        self.outliers: OutlierDetector[str] | None = None
        if outliers is not None:
            self.outliers = OutlierDetector(
                outliers.consecutive_failures,
                outliers.base_ejection_time,
                outliers.max_ejection_percent,
                outliers.max_ejection_time,
            )


class Traffic:
    """The traffic-management stages of one client pipeline, and their state.

    Args:
        client: the pipeline (its directory, its balancer, its ``attempt`` for mirrors).
        rng: the random source of splits, mirrors and faults (tests seed it).
    """

    def __init__(self, client: ClientPipeline, *, rng: random.Random | None = None) -> None:
        self._client = client
        self._rng = rng or random.Random()
        self._destinations: dict[tuple[str, str], Destination] = {}
        self.ewma: PeakEwmaPicker[str] | None = None
        self._mirrors: set[asyncio.Task[None]] = set()
        self.counts: dict[str, int] = {}
        """Traffic events by name: ``fault_delay``, ``fault_abort``, ``mirror_sent``,
        ``mirror_ok``, ``mirror_failed``, ``mirror_dropped``, ``circuit_opened``,
        ``circuit_closed``, ``circuit_rejected``, ``pending_overflow``, ``ejected``."""

    # --- composition -------------------------------------------------------------------------

    def stages(self, features: frozenset[str]) -> tuple[tuple[Stage, ...], tuple[Stage, ...]]:
        """The stages a policy with ``features`` needs: ``(per_call, per_attempt)``."""
        per_call: list[Stage] = []
        if "fault" in features:
            per_call.append(self.fault)
        if "mirror" in features:
            per_call.append(self.mirror)
        per_attempt: list[Stage] = []
        if "circuit_breaker" in features:
            per_attempt.append(self.circuit)
        if "outlier_detection" in features or "peak_ewma" in features:
            per_attempt.append(self.observe)
        if "peak_ewma" in features and self.ewma is None:
            self.ewma = PeakEwmaPicker()
        return tuple(per_call), tuple(per_attempt)

    def destination(self, route: Route, agent: str) -> Destination | None:
        """The state of the destination a call goes to, when its settings ask for any."""
        key = route.destination
        circuit, outliers = route.circuit_breaker, route.outlier_detection
        if key is None or (circuit is None and outliers is None):
            return None
        found = self._destinations.get((key, agent))
        if found is not None and found.circuit is circuit and found.outlier_spec is outliers:
            return found  # the common case: the settings objects the cached route holds
        if found is not None and found.circuit == circuit and found.outlier_spec == outliers:
            found.circuit, found.outlier_spec = circuit, outliers  # a new revision, same settings
            return found  # its state carries over
        if len(self._destinations) >= 4096:  # agents x keys: bounded by what policy names
            self._destinations.clear()
        found = self._destinations[(key, agent)] = Destination(
            f"{agent} ({key})", circuit, outliers
        )
        return found

    def _count(self, event: str) -> None:
        self.counts[event] = self.counts.get(event, 0) + 1

    # --- per-call stages ---------------------------------------------------------------------

    async def fault(self, next: Next, call: Call) -> bytes:
        """Delay and/or abort the call as its route's ``fault`` says, for its share of calls."""
        tr = call.traffic
        fault = None if tr is None else tr.fault
        if tr is not None and fault is not None:
            client = self._client
            delay, abort = fault.delay, fault.abort
            if delay is not None and self._rng.random() * 100 < delay.percent:
                self._count("fault_delay")
                marks = {"fault": "delay", "rule": tr.name}
                client.traffic_event(call, "fault_delay", access=marks, **marks)
                wait = min(delay.fixed, call.deadline - time.time())
                if wait > 0:
                    await asyncio.sleep(wait)
                if time.time() >= call.deadline:
                    client.fate(call, "deadline_exceeded")
                    raise DeadlineExceeded(
                        f"deadline of {call.agent}.{call.endpoint} passed during a delay "
                        f"injected by route {tr.name!r}",
                        rule=tr.name,
                    )
            if abort is not None and self._rng.random() * 100 < abort.percent:
                self._count("fault_abort")
                client.fate(call, "fault_aborted")
                marks = {"fault": "abort", "rule": tr.name}
                client.traffic_event(call, "fault_abort", access=marks, code=abort.code, **marks)
                raise error_from_code(
                    abort.code, f"fault injected by route {tr.name!r}: {abort.code}", rule=tr.name
                )
        return await next(call)

    async def mirror(self, next: Next, call: Call) -> bytes:
        """Copy the call to its route's mirror, for its share of calls; never waits for it."""
        tr = call.traffic
        spec = None if tr is None else tr.mirror
        if spec is not None and self._rng.random() * 100 < spec.percent:
            if len(self._mirrors) >= MAX_MIRRORS:
                self._count("mirror_dropped")
            else:
                self._count("mirror_sent")
                task = asyncio.get_running_loop().create_task(self._copy(call, spec))
                self._mirrors.add(task)
                task.add_done_callback(self._mirrors.discard)
        return await next(call)

    async def _copy(self, call: Call, spec: MirrorSpec) -> None:
        """One mirror copy: the caller's own authorization of the shadow, one attempt to an
        instance of the shadow's subset, sealed and marked ``mirror``; the reply is dropped."""
        from mesh._runtime.client import Call  # the pipeline's type, at run time

        client = self._client
        try:
            route = client.route(spec.agent, call.endpoint)
            # No idempotency key: a shadow of the same agent shares its claims (at most once per
            # key across the agent's instances), and a copy must never take a call's claim.
            copy = Call(
                spec.agent, call.endpoint, call.body, call.deadline, route, None,
                call.traceparent, call.tracestate, 1, None,
            )  # fmt: skip
            copy.attempt = 1
            copy.mirror = True
            copy.metadata = call.metadata
            copy.subset = spec if spec.version is not None or spec.labels else None
            await client.attempt(copy)
        except MeshError as exc:
            self._count("mirror_failed")
            log.debug("mesh.mirror_failed", agent=spec.agent, code=exc.code)
        except Exception as exc:  # a shadow's failure never reaches the caller
            self._count("mirror_failed")
            log.debug("mesh.mirror_failed", agent=spec.agent, error=type(exc).__name__)
        else:
            self._count("mirror_ok")

    async def close(self) -> None:
        """Cancel the mirror copies in flight."""
        tasks = list(self._mirrors)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- per-attempt stages ------------------------------------------------------------------

    async def circuit(self, next: Next, call: Call) -> bytes:
        """The destination's limits, then its circuit: fail fast while it is open."""
        dest = call.dest
        breaker = None if dest is None else dest.breaker
        if dest is None or breaker is None:
            return await next(call)
        limit = dest.limit
        if limit is not None and not limit.try_acquire():
            await self._wait_for_slot(call, dest, limit)
        try:
            wait = breaker.admit()
            if wait is not None:
                self._count("circuit_rejected")
                spec = dest.circuit
                assert spec is not None
                marks = {"circuit": "open", "destination": dest.name}
                self._client.traffic_event(
                    call, "circuit_rejected", access=marks, code=CircuitOpen.code, **marks
                )
                raise CircuitOpen(
                    f"the circuit to {dest.name} is open after {spec.consecutive_failures} "
                    f"failures in a row; retry after {wait:.2f}s",
                    retry_after=wait,
                )
            try:
                payload = await next(call)
            except MeshError as exc:
                self._outcome(call, dest, breaker, is_failure(exc.code))
                raise
            except asyncio.CancelledError:
                breaker.abandon()  # no outcome: a probe's lease passes on at once
                raise
            self._outcome(call, dest, breaker, False)
            return payload
        finally:
            if limit is not None:
                limit.release()

    async def _wait_for_slot(self, call: Call, dest: Destination, limit: ConcurrencyLimit) -> None:
        """Wait for one of the destination's ``max_concurrent`` slots, within the deadline and
        behind at most ``max_pending`` others.

        Raises:
            ResourceExhausted: ``max_pending`` calls already wait (with a retry-after).
            DeadlineExceeded: the deadline passed while waiting.
        """
        try:
            async with asyncio.timeout(max(0.0, call.deadline - time.time())):
                got = await limit.acquire(max_queue=dest.max_pending)
        except TimeoutError:
            raise DeadlineExceeded(
                f"deadline passed waiting for one of {limit.limit} slots to {dest.name}"
            ) from None
        if not got:
            self._count("pending_overflow")
            raise ResourceExhausted(
                f"{limit.limit} attempts in flight to {dest.name} and {dest.max_pending} waiting "
                "(circuit_breaker max_concurrent and max_pending)",
                retry_after=limit.retry_after(),
            )

    def _outcome(
        self, call: Call, dest: Destination, breaker: CircuitBreaker, failed: bool
    ) -> None:
        before = breaker.openings
        breaker.record(failed)
        after = breaker.openings
        if after > before:
            self._count("circuit_opened")
            spec = dest.circuit
            assert spec is not None
            log.warning(
                "mesh.circuit_opened",
                destination=dest.name,
                failures=spec.consecutive_failures,
                openings=breaker.openings,
                retry_after=round(breaker.retry_after, 3),
            )
            self._client.traffic_event(call, "circuit_opened", destination=dest.name)
        elif before and not after:
            self._count("circuit_closed")
            log.info("mesh.circuit_closed", destination=dest.name)
            self._client.traffic_event(call, "circuit_closed", destination=dest.name)

    async def observe(self, next: Next, call: Call) -> bytes:
        """Record the attempt's outcome against its instance, and its latency."""
        started = time.perf_counter()
        try:
            payload = await next(call)
        except MeshError as exc:
            self._observed(call, is_failure(exc.code), time.perf_counter() - started)
            raise
        self._observed(call, False, time.perf_counter() - started)
        return payload

    def _observed(self, call: Call, failed: bool, seconds: float) -> None:
        record = call.record
        if record is None or call.mirror:
            return
        if self.ewma is not None:
            self.ewma.observe(record.key, seconds)
        dest = call.dest
        outliers = None if dest is None else dest.outliers
        if dest is None or outliers is None:
            return
        directory = self._client.directory
        population = 1  # needed only to cap an ejection, which only a failure can make
        if failed and directory is not None:
            population = len(directory.instances(record.agent))
        if outliers.record(record.key, failed, population):
            self._count("ejected")
            left = outliers.ejected().get(record.key, 0.0)
            log.warning(
                "mesh.instance_ejected",
                destination=dest.name,
                instance=record.key,
                seconds=round(left, 3),
            )
            self._client.traffic_event(call, "ejected", instance=record.key)

    # --- the instance of an attempt ----------------------------------------------------------

    def choose(self, call: Call, candidates: Sequence[InstanceRecord]) -> InstanceRecord:
        """The instance of an attempt among live ``candidates`` (not empty): the route's split
        backend, without ejected instances (unless all are), affinity, then the balancer."""
        tr = call.traffic
        if tr is not None and tr.split:
            candidates = self._backend(call, tr, candidates)
        elif call.subset is not None:
            subset = call.subset
            candidates = [r for r in candidates if subset.matches(r.version, r.labels)]
            if not candidates:
                raise NotDelivered(f"no live instance of {call.agent} with {subset.describe()}")
        dest = call.dest
        if dest is not None and dest.outliers is not None:
            candidates = dest.outliers.filter(candidates, _key)
        if call.avoid:
            avoid = call.avoid
            candidates = [r for r in candidates if r.key not in avoid] or candidates
        if tr is not None and tr.hash_on is not None:
            value = _hash_value(call, tr.hash_on)
            if value is not None:
                return rendezvous_pick(value, candidates, _key)
        if self.ewma is not None and call.route.load_balancer == "peak_ewma":
            return self.ewma.pick(candidates, _key)
        return self._client.picker.pick(candidates, _key)

    def _backend(
        self, call: Call, tr: TrafficRoute, candidates: Sequence[InstanceRecord]
    ) -> Sequence[InstanceRecord]:
        """The live instances of the call's split backend, chosen by weight once per call among
        the backends that have live instances (a backend with none gives its share to the
        others, as their weights say). With affinity, the draw comes from the hash of the
        call's value, so one conversation stays on one backend while the weights and the
        live backends stay the same."""
        split = tr.split
        groups = [[r for r in candidates if b.matches(r.version, r.labels)] for b in split]
        chosen = call.backend
        if chosen is None or not groups[chosen]:
            weights = [b.weight if groups[i] else 0 for i, b in enumerate(split)]
            if not any(weights):
                wanted = ", ".join(b.describe() for b in split if b.weight)
                raise NotDelivered(
                    f"no live instance of {call.agent} in the split of route {tr.name!r} ({wanted})"
                )
            value = None if tr.hash_on is None else _hash_value(call, tr.hash_on)
            u = self._rng.random() if value is None else _unit(value)
            chosen = call.backend = weighted_choice(weights, u)
        return groups[chosen]

    def penalize(self, key: str, seconds: float) -> None:
        if self.ewma is not None:
            self.ewma.penalize(key, seconds)

    # --- what it shows -----------------------------------------------------------------------

    def circuits(self) -> dict[str, str]:
        """Each destination with a circuit breaker and its state (``closed``, ``open``,
        ``half_open``)."""
        return {d.name: d.breaker.state for d in self._destinations.values() if d.breaker}

    def ejected(self) -> dict[str, float]:
        """Each ejected instance (``agent.instance``) and the seconds its ejection has left."""
        out: dict[str, float] = {}
        for d in self._destinations.values():
            if d.outliers is not None:
                for key, left in d.outliers.ejected().items():
                    out[key] = max(left, out.get(key, 0.0))
        return out


def _key(record: InstanceRecord) -> str:
    return record.key


def _unit(value: str) -> float:
    """A number in [0, 1) that depends only on ``value`` (its BLAKE2b hash)."""
    digest = hashlib.blake2b(value.encode(), digest_size=8, person=b"mesh-split").digest()
    return int.from_bytes(digest, "big") / 2.0**64


def _hash_value(call: Call, hash_on: str) -> str | None:
    if hash_on == "idempotency_key":
        return call.idempotency_key
    metadata: Any = call.metadata
    return None if metadata is None else metadata.get(hash_on[len("metadata.") :])
