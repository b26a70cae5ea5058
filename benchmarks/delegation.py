"""``python -m benchmarks.delegation``: what delegation chains cost.

Two parts:

- ``chain verify``: ``mesh._core.delegation.verify_chain`` in this process (a pure function,
  no server) on real chains built with ``start`` and ``extend`` by ``mesh.testing.Trust``
  identities, at depth 1 and ``--depth`` (5), in four states: *cached keys* (every issuer
  certificate verified once before, and every link but the last in the ``LinkCache``: the
  typical case of a handler's nested calls, whose chains share their earlier links with their
  siblings'), *every link cached* (the same chain again: no signature at all, the floor),
  *no link cached* (the certificates still cached) and *fully cold* (a new
  ``CertificateVerifier`` and ``LinkCache``: every certificate and every link checked). The
  median of ``--samples`` verifications, each timed alone. Goal: under 60 µs at depth 5 with
  cached keys. Then what signing costs a caller per call (``start``, ``extend``: one Ed25519
  signature each) and where a cached-keys verification's time goes (each step timed alone on
  the same chain).
- ``request/reply with chains``: two meshes (caller and echo, in this process, each on its
  own connection) on one local nats-server started here, sequential calls and ``--inflight``
  (64) calls in flight, with the caller's ``MeshConfig(delegation=True)`` off and on (two
  caller meshes, the same callee, interleaved in every round); and a depth-3 variant:
  caller -> relay -> relay -> echo, the relays' handlers calling on with ``ctx.request``
  (which extends the chain by itself). Calls/s and p50, medians of ``--rounds`` rounds.

Wall-clock figures drift on a shared machine: ``--instructions`` instead counts, for each
request/reply scenario (sequential), the instructions per call that valgrind counts in this
process (every mesh of the scenario; the difference of two run lengths, as ``compare.sh``
does). ``--write`` writes the ``delegation`` (or ``delegation-instructions``) section of
``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import msgpack
from nacl.signing import VerifyKey

import mesh
from mesh._core.delegation import (
    Delegation,
    LinkCache,
    _decode_link,
    _narrower,
    encode_chain,
    extend,
    link_digest,
    start,
    verify_chain,
)
from mesh._core.identity import Certificate, CertificateVerifier, Identity
from mesh.testing import NatsServer, Trust

from .machine import machine_info
from .payload import Body, body_of
from .sections import write_section
from .stats import percentile
from .traffic import config

GOAL_VERIFY_US = 60.0
ENDPOINT = "echo"
ECHO = "bench-echo"
RELAYS = ("bench-relay-1", "bench-relay-2")
SIZE = 256
HOUR_MS = 3_600_000


# --- chain verify, in process -------------------------------------------------------------


@dataclasses.dataclass
class Chains:
    """A chain of ``depth`` hops: ``ids[i]`` issues link ``i`` to ``ids[i + 1]``, the callee
    is ``ids[depth]``. ``siblings``: chains that share links ``0 .. depth - 2`` and each end
    with a last link of its own (another request of the same parent)."""

    depth: int
    ids: list[Identity]
    parent: Delegation | None  # what the last caller's handler holds (None at depth 1)
    siblings: list[tuple[bytes, bytes]]  # (encoded chain, request id of its last link)
    exp: int

    @property
    def callee(self) -> Identity:
        return self.ids[-1]

    @property
    def caller(self) -> Identity:
        return self.ids[-2]

    def verifier(self) -> CertificateVerifier:
        return CertificateVerifier(self.callee.root_public_key)

    def verify(
        self, i: int, verifier: CertificateVerifier, cache: LinkCache, now_ms: float
    ) -> Delegation:
        raw, rid = self.siblings[i]
        return verify_chain(
            raw, verifier=verifier, cache=cache, now_ms=now_ms, agent=self.callee.agent,
            endpoint=ENDPOINT, request_id=rid,
            sender=(self.caller.agent, self.caller.instance), deadline_ms=self.exp,
        )  # fmt: skip

    def link(self, rid: bytes) -> bytes:
        """A new last link (for the request ``rid``): what the last caller signs per call."""
        signing, cert = self.caller.keys.signing, self.caller.certificate
        to = self.callee.agent
        if self.parent is None:
            return start(signing, cert, to=to, endpoint=ENDPOINT, req=rid, exp_ms=self.exp)
        return extend(
            signing, cert, self.parent, to=to, endpoint=ENDPOINT, req=rid, exp_ms=self.exp
        )


def build(trust: Trust, depth: int, siblings: int) -> Chains:
    """Real chains: each hop verifies the chain it received (as its server would) and
    extends it for the next."""
    ids = [trust.identity(f"bench-hop-{i}") for i in range(depth + 1)]
    exp = int(time.time() * 1000) + HOUR_MS
    now = time.time() * 1000
    chains = Chains(depth, ids, None, [], exp)
    links: list[bytes] = []
    for hop in range(depth - 1):  # the shared links 0 .. depth - 2, each verified by its callee
        sub = Chains(hop + 1, ids[: hop + 2], chains.parent, [], exp)
        rid = os.urandom(16)
        links.append(sub.link(rid))
        sub.siblings.append((encode_chain(links), rid))
        chains.parent = sub.verify(0, sub.verifier(), LinkCache(), now)
    for _ in range(siblings):
        rid = os.urandom(16)
        chains.siblings.append((encode_chain([*links, chains.link(rid)]), rid))
    return chains


Timed = Callable[[int], Any]
"""One timed operation: called with the sample's index (``0 .. samples - 1``)."""


def interleaved(fns: dict[str, Timed], samples: int, batch: int) -> dict[str, list[float]]:
    """``samples`` calls of each of ``fns``, each call timed alone (µs, sorted), in batches
    of ``batch`` taken in turn, so a slow phase of the shared machine hits all alike."""
    out: dict[str, list[float]] = {name: [] for name in fns}
    clock = time.perf_counter_ns
    gc.collect()
    for first in range(0, samples, batch):
        for name, fn in fns.items():
            times = out[name]
            for i in range(first, min(first + batch, samples)):
                t = clock()
                fn(i)
                times.append((clock() - t) / 1000)
    for times in out.values():
        times.sort()
    return out


STATES = ("cached keys", "every link cached", "no link cached", "fully cold")


def verify_states(chains: Chains, samples: int) -> dict[str, Timed]:
    """The four states' verifications of ``chains`` (sample ``i`` verifies sibling
    ``1 + i``, sibling 0 warming the caches)."""
    now = time.time() * 1000
    # cached keys: the first sibling verified fully (every certificate, the shared links),
    # then each other sibling costs its own last link's signature only.
    verifier, cache = chains.verifier(), LinkCache(max_entries=samples * 2 + 64)
    chains.verify(0, verifier, cache, now)
    # no link cached: certificates still cached by the verifier, a new LinkCache each time;
    # fully cold: a new verifier (each certificate's signature checked) and LinkCache
    fresh = [LinkCache() for _ in range(samples)]
    verifiers = [chains.verifier() for _ in range(samples)]
    colds = [LinkCache() for _ in range(samples)]
    return {
        "cached keys": lambda i: chains.verify(1 + i, verifier, cache, now),
        "every link cached": lambda i: chains.verify(0, verifier, cache, now),
        "no link cached": lambda i: chains.verify(1 + i, verifier, fresh[i], now),
        "fully cold": lambda i: chains.verify(1 + i, verifiers[i], colds[i], now),
    }


def signing_costs(chains: Chains, samples: int) -> dict[str, Timed]:
    """What a caller pays per call for its link: ``start`` (a new chain), ``extend`` (the
    next link of the chain its handler holds), ``encode_chain``, and a bare Ed25519
    signature and verification for reference."""
    assert chains.parent is not None
    ids, parent, exp = chains.ids, chains.parent, chains.exp
    signing, cert = chains.caller.keys.signing, chains.caller.certificate
    rids = [os.urandom(16) for _ in range(samples)]
    first_signing, first_cert = ids[0].keys.signing, ids[0].certificate
    link = chains.link(rids[0])
    links = [*parent.links, link]
    body, sig = msgpack.unpackb(link, raw=False)
    pk = cert.sign_pk
    to = chains.callee.agent
    return {
        "`start` (a new chain's first link)": lambda i: start(
            first_signing, first_cert, to=ids[1].agent, endpoint=ENDPOINT, req=rids[i], exp_ms=exp
        ),
        f"`extend` (link {chains.depth} of {chains.depth})": lambda i: extend(
            signing, cert, parent, to=to, endpoint=ENDPOINT, req=rids[i], exp_ms=exp
        ),
        f"`encode_chain` ({chains.depth} links)": lambda i: encode_chain(links),
        "Ed25519 sign of a link's body (PyNaCl), for reference": lambda i: signing.sign(body),
        "Ed25519 verify of a link (PyNaCl), for reference": lambda i: VerifyKey(pk).verify(
            body, sig
        ),
    }


def steps(chains: Chains) -> dict[str, Timed]:
    """The steps of a cached-keys verification of ``chains``, each alone on the same input
    (one chain: none of these touches a cache)."""
    raw, _ = chains.siblings[1]
    n = chains.depth
    verifier = chains.verifier()
    items = msgpack.unpackb(raw, raw=False, max_array_len=32, max_bin_len=len(raw))
    links = [_decode_link(item, i) for i, item in enumerate(items)]
    for lk in links:
        verifier.verify(lk.cert_raw)
    certs = [Certificate.decode(lk.cert_raw)[0] for lk in links]
    last_pk, last = certs[-1].sign_pk, links[-1]

    def narrowing(_: int) -> None:
        for i in range(1, n):
            b, lk = links[i - 1], links[i]
            _narrower(
                "x", b.calls, b.scopes, b.depth - 1, b.budget, b.cost, lk.calls, lk.scopes,
                lk.depth, lk.budget, lk.cost,
            )  # fmt: skip

    return {
        "msgpack decode of the chain (the array of links)": lambda i: msgpack.unpackb(
            raw, raw=False, max_array_len=32, max_bin_len=len(raw)
        ),
        f"decode {n} links (`_decode_link`: `open_document`, fields, patterns)": lambda i: [
            _decode_link(item, j) for j, item in enumerate(items)
        ],
        f"`Certificate.decode` of {n} issuers": lambda i: [
            Certificate.decode(lk.cert_raw) for lk in links
        ],
        f"`_narrower` of {n - 1} link pairs": narrowing,
        f"`link_digest` x {2 * n - 1} (`prev` checks, then the cache keys)": lambda i: [
            link_digest(lk.raw) for lk in (*links[:-1], *links)
        ],
        f"`verifier.verify` of {n} cached certificates": lambda i: [
            verifier.verify(lk.cert_raw) for lk in links
        ],
        "Ed25519 verification of the last link (`VerifyKey(pk).verify`)": lambda i: VerifyKey(
            last_pk
        ).verify(last.body, last.signature),
    }


@dataclasses.dataclass
class VerifyFigures:
    """Sorted µs samples: by (depth, state), of the signing calls and of the steps of a
    cached-keys verification at the deepest depth, by name."""

    verify: dict[tuple[int, str], list[float]]
    signing: dict[str, list[float]]
    steps: dict[str, list[float]]


def chain_verify(depths: Sequence[int], samples: int, batch: int) -> VerifyFigures:
    """Every timing of this part, interleaved in batches."""
    trust = Trust()
    built = {depth: build(trust, depth, samples + 1) for depth in depths}
    fns: dict[str, Timed] = {}
    for depth, chains in built.items():
        for state, fn in verify_states(chains, samples).items():
            fns[f"verify {depth} {state}"] = fn
    deepest = built[max(depths)]
    signing = signing_costs(deepest, samples)
    parts = steps(deepest)
    got = interleaved({**fns, **signing, **parts}, samples, batch)
    return VerifyFigures(
        {(d, s): got[f"verify {d} {s}"] for d in depths for s in STATES},
        {name: got[name] for name in signing},
        {name: got[name] for name in parts},
    )


def verify_table(fig: VerifyFigures, depths: Sequence[int], samples: int) -> str:
    deepest = max(depths)
    lines = [
        "| depth (links) | state | signatures checked | µs per verification, median | p10 "
        "| p90 | goal | met |",
        "|--:|---|--:|--:|--:|--:|---|---|",
    ]
    for depth in depths:
        checked = {"cached keys": "1", "every link cached": "0", "no link cached": f"{depth}",
                   "fully cold": f"{depth} + {depth} certificates"}  # fmt: skip
        for state in STATES:
            v = fig.verify[(depth, state)]
            med = statistics.median(v)
            goal = met = "-"
            if state == "cached keys" and depth == deepest:
                goal = f"< {GOAL_VERIFY_US:g} µs"
                met = "met" if med < GOAL_VERIFY_US else f"not met: {med / GOAL_VERIFY_US:.1f}x"
            lines.append(
                f"| {depth} | {state} | {checked[state]} | {med:.1f} | {percentile(v, 10):.1f} "
                f"| {percentile(v, 90):.1f} | {goal} | {met} |"
            )
    lines += ["", "| what a caller signs per call | µs, median |", "|---|--:|"]
    for name, v in fig.signing.items():
        lines.append(f"| {name} | {statistics.median(v):.1f} |")
    total = statistics.median(fig.verify[(deepest, "cached keys")])
    lines += [
        "",
        f"Where a cached-keys verification at depth {deepest} goes: each step timed alone on "
        f"the same chain, in the same batches; 'the rest' is the whole's median less the "
        f"steps' (`verify_chain`'s own checks and loops, the loop check, the `LinkCache`, "
        f"the `Delegation`).",
        "",
        "| step | µs, median | share |",
        "|---|--:|--:|",
    ]
    parts = 0.0
    for name, v in fig.steps.items():
        us = statistics.median(v)
        parts += us
        lines.append(f"| {name} | {us:.1f} | {us / total:.0%} |")
    lines.append(f"| the rest | {total - parts:.1f} | {(total - parts) / total:.0%} |")
    lines.append(f"| **`verify_chain`, whole (cached keys)** | **{total:.1f}** | 100% |")
    return "\n".join(lines)


# --- request/reply with chains ------------------------------------------------------------


def echo() -> mesh.Agent:
    agent = mesh.Agent(ECHO)

    @agent.endpoint(name=ENDPOINT, idempotent=True, concurrency=256)
    async def run(q: Body) -> Body:
        return q

    return agent


def relay(name: str, nxt: str) -> mesh.Agent:
    """Calls ``nxt`` with what it got: ``ctx.request`` carries (and extends) the chain."""
    agent = mesh.Agent(name)

    @agent.endpoint(name=ENDPOINT, idempotent=True, concurrency=256)
    async def run(q: Body, ctx: mesh.Context) -> Body:
        return await ctx.request(nxt, ENDPOINT, q, Body)

    return agent


SCENARIOS = {"direct": ECHO, "depth 3": RELAYS[0]}
"""What the caller calls: the echo itself, or the first relay (caller -> relay -> relay ->
echo: the echo gets a chain of three links)."""


@contextlib.asynccontextmanager
async def world(
    url: str, modes: Sequence[bool], relays: bool = True
) -> AsyncIterator[dict[bool, mesh.Mesh]]:
    """The echo, the relays and a caller mesh per mode (chains on or off), on one server."""
    trust = Trust()
    cfg = config(url)
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(mesh.Mesh(trust.identity(ECHO), cfg, agent=echo()))
        hops = list(zip(RELAYS, (*RELAYS[1:], ECHO), strict=True)) if relays else []
        started = [
            (await stack.enter_async_context(
                mesh.Mesh(trust.identity(name), cfg, agent=relay(name, nxt))
            ), nxt)
            for name, nxt in reversed(hops)
        ]  # fmt: skip
        for m, nxt in started:
            await m.wait_for(nxt)
        callers: dict[bool, mesh.Mesh] = {}
        for on in modes:
            name = "bench-caller-chained" if on else "bench-caller"
            c = mesh.Mesh(trust.identity(name), dataclasses.replace(cfg, delegation=on))
            callers[on] = await stack.enter_async_context(c)
            for target in SCENARIOS.values() if relays else (ECHO,):
                await callers[on].wait_for(target)
        yield callers


async def measure(
    caller: mesh.Mesh, target: str, inflight: int, seconds: float, warmup: float
) -> tuple[float, float]:
    """Calls/s and p50 µs of ``inflight`` workers each calling ``target`` one call at a time
    for ``seconds`` (after ``warmup``)."""
    body = body_of(SIZE)
    lat: list[float] = []
    state = {"record": False, "stop": False}

    async def worker() -> None:
        while not state["stop"]:
            t = time.perf_counter()
            await caller.request(target, ENDPOINT, body, Body)
            if state["record"]:
                lat.append((time.perf_counter() - t) * 1e6)

    tasks = [asyncio.create_task(worker()) for _ in range(inflight)]
    try:
        await asyncio.sleep(warmup)
        state["record"] = True
        t0 = time.perf_counter()
        await asyncio.sleep(seconds)
        state["record"] = False
        elapsed = time.perf_counter() - t0
        state["stop"] = True
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
    lat.sort()
    return len(lat) / elapsed, percentile(lat, 50)


Key = tuple[str, int, bool]  # scenario, in flight, chains on


async def request_rounds(
    inflights: Sequence[int], seconds: float, warmup: float, rounds: int
) -> dict[Key, list[tuple[float, float]]]:
    results: dict[Key, list[tuple[float, float]]] = {}
    async with NatsServer() as srv, world(srv.url, (False, True)) as callers:
        for c in callers.values():  # pair keys, caches, every path
            for target in SCENARIOS.values():
                for _ in range(100):
                    await c.request(target, ENDPOINT, body_of(SIZE), Body)
        for r in range(rounds):
            for scenario, target in SCENARIOS.items():
                for inflight in inflights:
                    # interleaved, the order flipped every round: drift hits both alike
                    for on in (False, True) if r % 2 == 0 else (True, False):
                        got = await measure(callers[on], target, inflight, seconds, warmup)
                        results.setdefault((scenario, inflight, on), []).append(got)
                        print(
                            f"  round {r + 1} {scenario} x{inflight} chains "
                            f"{'on' if on else 'off'}: {got[0]:,.0f}/s p50 {got[1]:.0f} µs",
                            flush=True,
                        )
    return results


def request_table(results: dict[Key, list[tuple[float, float]]], inflights: Sequence[int]) -> str:
    lines = [
        "| calls | in flight | calls/s, chains off | calls/s, chains on | on / off "
        "| µs per call added (1/rate) | p50 µs, off | p50 µs, on |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    spread = []
    for scenario in SCENARIOS:
        for inflight in inflights:
            off = results[(scenario, inflight, False)]
            on = results[(scenario, inflight, True)]
            r_off = statistics.median(x[0] for x in off)
            r_on = statistics.median(x[0] for x in on)
            p_off = statistics.median(x[1] for x in off)
            p_on = statistics.median(x[1] for x in on)
            added = 1e6 / r_on - 1e6 / r_off
            what = "caller -> echo" if scenario == "direct" else "caller -> relay -> relay -> echo"
            lines.append(
                f"| {what} | {inflight} | {r_off:,.0f} | {r_on:,.0f} | {r_on / r_off:.2f}x | "
                f"{added:+.0f} | {p_off:.0f} | {p_on:.0f} |"
            )
            for on_, rows in (("off", off), ("on", on)):
                rates = [x[0] for x in rows]
                spread.append(
                    f"{scenario} x{inflight} {on_} {min(rates):,.0f} to {max(rates):,.0f}"
                )
    lines += ["", f"Calls/s per round, lowest to highest: {'; '.join(spread)}."]
    return "\n".join(lines)


# --- instructions -------------------------------------------------------------------------

RUNS = {f"{s}-{m}": (s, m == "on") for s in ("direct", "depth3") for m in ("off", "on")}
VERIFY_RUNS = ("verify-1", "verify-deep", "verify-deep-floor", "ed25519")
"""Children that verify in process: ``n`` cached-keys verifications at depth 1 and at
``--depth``, ``n`` of the same chain (every link cached), ``n`` bare Ed25519 verifications."""


async def run_n(name: str, n: int) -> None:
    """The child valgrind counts: ``n`` sequential calls of scenario ``name``."""
    scenario, on = RUNS[name]
    target = ECHO if scenario == "direct" else RELAYS[0]
    async with NatsServer() as srv, world(srv.url, (on,), relays=scenario != "direct") as c:
        for _ in range(100 + n):  # 100 of warm-up: pair keys, caches, paths
            await c[on].request(target, ENDPOINT, body_of(SIZE), Body)


def verify_n(name: str, n: int, depth: int, siblings: int) -> None:
    """The child valgrind counts: ``n`` verifications of ``name`` (``siblings`` chains are
    built whatever ``n``, so their signing cancels out of the difference)."""
    chains = build(Trust(), 1 if name == "verify-1" else depth, siblings)
    now = time.time() * 1000
    verifier, cache = chains.verifier(), LinkCache(max_entries=2 * siblings)
    chains.verify(0, verifier, cache, now)
    if name == "ed25519":
        last = _decode_link(msgpack.unpackb(chains.siblings[0][0])[-1], 0)
        pk = chains.caller.certificate.sign_pk
        for _ in range(n):
            VerifyKey(pk).verify(last.body, last.signature)
        return
    for i in range(n):
        chains.verify(0 if name == "verify-deep-floor" else 1 + i, verifier, cache, now)


def count(name: str, n: int, extra: Sequence[str] = ()) -> int:
    cmd = [
        "valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
        sys.executable, "-m", "benchmarks.delegation", "--run", name, "--n", str(n), *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stderr
    refs = [line for line in out.splitlines() if "I" in line and "refs:" in line]
    return int(refs[-1].split(":")[1].replace(",", "").strip())


def instructions(n1: int, n2: int, depth: int) -> str:
    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind (Debian: apt-get install valgrind)")
    per: dict[str, float] = {}
    for name in VERIFY_RUNS:
        extra = ("--depth", str(depth), "--siblings", str(10 * n2 + 1))
        per[name] = (count(name, 10 * n2, extra) - count(name, 10 * n1, extra)) / (10 * (n2 - n1))
        print(f"  {name}: {per[name] / 1000:.1f} k instructions per verification", flush=True)
    for name in RUNS:
        per[name] = (count(name, n2) - count(name, n1)) / (n2 - n1)
        print(f"  {name}: {per[name] / 1000:.0f} k instructions per call", flush=True)
    ed = per["ed25519"]
    lines = [
        "| verification, in process | k instructions | of which the signature |",
        "|---|--:|--:|",
        f"| `verify_chain`, depth 1, cached keys | {per['verify-1'] / 1000:.0f} "
        f"| {ed / per['verify-1']:.0%} |",
        f"| `verify_chain`, depth {depth}, cached keys | {per['verify-deep'] / 1000:.0f} "
        f"| {ed / per['verify-deep']:.0%} |",
        f"| `verify_chain`, depth {depth}, every link cached (no signature) "
        f"| {per['verify-deep-floor'] / 1000:.0f} | - |",
        f"| Ed25519 verify of a link (PyNaCl), for reference | {ed / 1000:.0f} | 100% |",
        "",
        "| calls (sequential) | k instructions per call, chains off | chains on | added |",
        "|---|--:|--:|--:|",
    ]
    for scenario, what in (("direct", "caller -> echo"),
                           ("depth3", "caller -> relay -> relay -> echo")):  # fmt: skip
        off, on = per[f"{scenario}-off"], per[f"{scenario}-on"]
        lines.append(
            f"| {what} | {off / 1000:.0f} | {on / 1000:.0f} | "
            f"{(on - off) / 1000:+.0f} ({on / off - 1:+.0%}) |"
        )
    return "\n".join(lines)


# --- the page -----------------------------------------------------------------------------


def machine_note(load: tuple[float, float, float]) -> str:
    """The machine, and its 1-minute load average when the run started and ended (other
    work on the two cores shows there)."""
    m = machine_info()
    return (
        f"Machine: {m['cpu']}, {m['cores']} cores (shared with other work; run under `nice`), "
        f"{m['python']}, PyNaCl {_version('pynacl')}, msgpack {_version('msgpack')}, "
        f"nats-py {m['nats-py']}, nats-server {m['nats-server']}; {m['date']}; load average "
        f"(1 min) {load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end."
    )


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


INTRO = """## Delegation chains

`benchmarks/delegation.py`. {machine}

    {command}

"""

VERIFY_INTRO = """### Chain verification, in process

`verify_chain` (a pure function, no server) on real chains made with `start` and `extend` by
`mesh.testing.Trust` identities, each verification timed alone, {samples} per row, every row
(and every signing and step timing below) taken in turns of {batch} so that a slow phase of
the shared machine hits all alike. States:
**cached keys**: every issuer certificate verified once before (the `CertificateVerifier`
caches by bytes) and every link but the last in the `LinkCache`, as for a handler's nested
calls, whose chains share their earlier links with their siblings': one Ed25519 signature
checked; **every link cached**: the same chain again, no signature checked (the floor);
**no link cached**: certificates cached, every link's signature checked; **fully cold**: a new
verifier and cache, every certificate's and every link's signature checked. The two shared
cores run sustained work in phases up to about 1.7x slower than short bursts (other load on
the host): the rows are comparable with each other, p10 is near a quiet phase's median, and
the instruction counts further down do not drift.

"""

REQUEST_INTRO = """### Request/reply with chains

Two caller meshes (`MeshConfig(delegation=True)` off and on: every call of the second starts a
chain, each relay's `ctx.request` extends it) and the callees, all in this process, each mesh
on its own connection, on one local nats-server (the server has the other core); 256-byte
bodies, {inflight} calls in flight or one at a time, for {seconds:g} s after {warmup:g} s of
warm-up per measurement, chains off and on interleaved; medians of {rounds} rounds. The
callers and callees share one core, so "µs per call added" is the whole tree's CPU for the
chains: the caller's `start` and each relay's `extend` (one signature each), each callee's
`verify_chain`. In the depth-3 variant every call starts a new chain, so no link is ever in a
callee's `LinkCache` from an earlier call: relay 2 checks two signatures and the echo three
(the cached-keys case above is a fan-out's, not a linear chain's). No goal is set here.

"""

INSTRUCTIONS_INTRO = """### Instructions per verification and per call, with chains

What valgrind counts: per `verify_chain` in process (the difference of two run lengths,
{v1} and {v2} verifications of sibling chains, as above), and per sequential call in the
benchmark's process (every mesh of the scenario: caller, relays, echo; {n1} and {n2} calls),
as `compare.sh` does. The nats-server runs in another process and is not counted.

    {command}
"""


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.delegation", description=__doc__)
    p.add_argument("--depth", type=int, default=5, help="the deeper chain of chain verify")
    p.add_argument("--samples", type=int, default=2000, help="verifications per row")
    p.add_argument("--batch", type=int, default=50, help="samples per turn of a row")
    p.add_argument("--seconds", type=float, default=2.0, help="per measurement and round")
    p.add_argument("--warmup", type=float, default=0.3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--inflight", type=int, default=64)
    p.add_argument("--only", choices=["verify", "request"], help="run one part only")
    p.add_argument("--instructions", action="store_true", help="count instructions instead")
    p.add_argument("--n1", type=int, default=100)
    p.add_argument("--n2", type=int, default=500)
    p.add_argument("--write", action="store_true", help="write docs/benchmarks.md's section")
    p.add_argument("--run", choices=[*RUNS, *VERIFY_RUNS], help=argparse.SUPPRESS)  # valgrind's
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)  # child
    p.add_argument("--siblings", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    page = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
    if args.run in VERIFY_RUNS:
        verify_n(args.run, args.n, args.depth, args.siblings)
        return
    if args.run is not None:
        asyncio.run(run_n(args.run, args.n))
        return
    if args.instructions:
        table = instructions(args.n1, args.n2, args.depth)
        command = (
            f"nice python -m benchmarks.delegation --instructions --depth {args.depth} "
            f"--n1 {args.n1} --n2 {args.n2} --write"
        )
        print(table)
        if args.write:
            text = INSTRUCTIONS_INTRO.format(
                n1=args.n1, n2=args.n2, v1=10 * args.n1, v2=10 * args.n2, command=command
            )
            write_section(page, "delegation-instructions", text + f"\n{table}\n")
        return
    depths = sorted({1, args.depth})
    inflights = [1, args.inflight]
    command = (
        f"nice python -m benchmarks.delegation --depth {args.depth} --samples {args.samples} "
        f"--batch {args.batch} --seconds {args.seconds:g} --warmup {args.warmup:g} "
        f"--rounds {args.rounds} --inflight {args.inflight}"
        + (f" --only {args.only}" if args.only else "")
        + " --write"
    )
    load = os.getloadavg()
    parts: list[str] = []
    if args.only != "request":
        print("chain verify", flush=True)
        figures = chain_verify(depths, args.samples, args.batch)
        table = verify_table(figures, depths, args.samples)
        print(table, flush=True)
        parts.append(VERIFY_INTRO.format(samples=args.samples, batch=args.batch) + table)
    if args.only != "verify":
        print("request/reply with chains", flush=True)
        results = asyncio.run(request_rounds(inflights, args.seconds, args.warmup, args.rounds))
        table = request_table(results, inflights)
        print(table)
        intro = REQUEST_INTRO.format(
            inflight=args.inflight, seconds=args.seconds, warmup=args.warmup, rounds=args.rounds
        )
        parts.append(intro + table)
    if args.write:
        text = INTRO.format(machine=machine_note(load), command=command)
        write_section(page, "delegation", text + "\n\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
