"""Traffic management at the command line, run as an operator runs it: `mesh-policy explain`
showing the route a call's metadata selects and its destination's settings (offline with
`--file`, and against the applied revision), and `apply` / `validate --live` warning of split
versions no live instance runs."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

import mesh
from mesh.control_plane import ApplyReply, ApplyRequest, load_trust_root
from mesh.testing import NatsServer, test_config, wait_until, watching_all
from mesh_agents import registry as reg
from mesh_examples import research

from .cli_helpers import base_env, init_keys, run

TRAFFIC = """apiVersion: mesh/v1
kind: Policy
metadata: {name: canary}
spec:
  defaults: {authorization: deny, timeout: 10s}
  rules:
    - name: planner-may-ask
      allow: {callers: [planner], agent: researcher, endpoints: [answer]}
  endpoints:
    researcher.*:
      timeout: 30s
      retries: {attempts: 3, per_try_timeout: 10s}
      circuit_breaker: {consecutive_failures: 5, open_for: 1s, max_concurrent: 100}
      outlier_detection: {consecutive_failures: 3, base_ejection_time: 30s}
      load_balancer: peak_ewma
  routes:
    - name: beta
      match: {callers: [planner], agent: researcher, endpoints: [answer], metadata: {track: beta}}
      split:
        - {version: 1.2.0, weight: 90}
        - {version: 2.0.0, labels: {track: canary}, weight: 10}
      hash_on: metadata.user
      timeout: 5s
      retries: {attempts: 2, per_try_timeout: 2s}
      mirror: {agent: researcher, version: 3.0.0, percent: 5}
      fault:
        delay: {percent: 10, fixed: 250ms}
        abort: {percent: 1, code: UNAVAILABLE}
"""
DESTINATION = [
    'endpoints key "researcher.*"',
    "  circuit_breaker: opens after 5 failures in a row, for 1s (doubling at each reopening, "
    "at most 1m); max_concurrent 100, max_pending 1024 (default)",
    "  outlier_detection: ejects an instance after 3 failures in a row, for 30s times the "
    "number of its ejections (at most 5m); at most 10% of instances at once",
    "  load_balancer: peak_ewma",
]
BETA = [
    'route "beta" (spec.routes[0], metadata track=beta)',
    "  split: 90% to version 1.2.0, 10% to version 2.0.0 labels track=canary",
    "  hash_on: metadata.user (this call: user=ada)",
    '  timeout: 5s (route "beta")',
    '  retries: 2 attempts, 2s per try (route "beta")',
    "  mirror: 5% copied to researcher (version 3.0.0), replies dropped",
    "  fault: delay 10% by 250ms; abort 1% with UNAVAILABLE",
]
SPLIT_TO_NOBODY = """apiVersion: mesh/v1
kind: Policy
metadata: {name: canary}
spec:
  defaults: {authorization: allow}
  routes:
    - name: canary
      match: {callers: [planner], agent: researcher, endpoints: [answer]}
      split:
        - {version: 1.2.0, weight: 90}
        - {version: 1.3.0, weight: 10}
"""
VERSION_FINDING = (
    '{kind}: {path}:11: route "canary" names version "1.3.0" of agent "researcher", which no '
    'live instance has (did you mean "1.2.0"?)'
)


def offline(tmp_path: Path) -> dict[str, str]:
    """An environment with no reachable server and no identity: `--file` needs neither."""
    return base_env(servers="nats://127.0.0.1:1", identity=tmp_path / "nobody")


def policy_file(tmp_path: Path, text: str = TRAFFIC, name: str = "traffic.yaml") -> str:
    (tmp_path / name).write_text(text)
    return name


# --- explain --file -------------------------------------------------------------------------


async def test_explain_prints_the_route_the_metadata_selects(tmp_path: Path) -> None:
    """With the route's metadata, explain prints the decision, the route's split, affinity,
    timeout, retries, mirror and faults, then the destination's settings."""
    path = policy_file(tmp_path)
    result = await run(
        "mesh-policy", "explain", "planner", "researcher", "answer", "--file", path,
        "--meta", "track=beta", "--meta", "user=ada",
        env=offline(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f'ALLOW by rule "planner-may-ask" ({path})',
        *BETA,
        *DESTINATION,
    ]


async def test_explain_without_the_route_metadata_says_no_route_matches(tmp_path: Path) -> None:
    """Without the metadata a route needs, calls go to any live instance, with the
    endpoints key's timeout and retries; the route and what it needs are named."""
    path = policy_file(tmp_path)
    result = await run(
        "mesh-policy", "explain", "planner", "researcher", "answer", "--file", path,
        env=offline(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f'ALLOW by rule "planner-may-ask" ({path})',
        'no route matches: calls go to any live instance (route "beta" needs metadata track=beta)',
        '  timeout: 30s (endpoints key "researcher.*")',
        '  retries: 3 attempts, 10s per try (endpoints key "researcher.*")',
        *DESTINATION,
    ]


async def test_explain_shows_the_defaults_where_policy_sets_nothing(tmp_path: Path) -> None:
    """No endpoints key matching: defaults.timeout, the caller's retries, no circuit breaker,
    no outlier detection and the default balancer; a DENY still exits 3."""
    path = policy_file(tmp_path)
    result = await run(
        "mesh-policy", "explain", "planner", "librarian", "lookup", "--file", path,
        env=offline(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert result.stdout.splitlines() == [
        f"DENY by default deny ({path})",
        "no route matches: calls go to any live instance",
        "  timeout: 10s (defaults.timeout)",
        "  retries: the caller's default (3 attempts unless configured)",
        "no endpoints key matches librarian.lookup",
        "  circuit_breaker: none",
        "  outlier_detection: none",
        "  load_balancer: least_outstanding (default)",
    ]


async def test_explain_says_when_the_caller_may_not_call_the_mirror(tmp_path: Path) -> None:
    """A mirror the caller's own policy denies gets no copies: explain says so and why."""
    text = TRAFFIC.replace("mirror: {agent: researcher, version: 3.0.0", "mirror: {agent: shadow")
    path = policy_file(tmp_path, text)
    result = await run(
        "mesh-policy", "explain", "planner", "researcher", "answer", "--file", path,
        "--meta", "track=beta", env=offline(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (
        "  mirror: 5% copied to shadow (any instance), replies dropped; the copies are "
        "refused: DENY by default deny"
    ) in result.stdout.splitlines()


async def test_explain_of_a_policy_without_traffic_management_prints_one_line(
    tmp_path: Path,
) -> None:
    """A policy with no routes, circuit breakers, outlier detection or balancer: only the
    decision line, as before traffic management existed."""
    text = TRAFFIC.split("      circuit_breaker:")[0]
    path = policy_file(tmp_path, text)
    result = await run(
        "mesh-policy", "explain", "planner", "researcher", "answer", "--file", path,
        "--meta", "track=beta", env=offline(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert (result.returncode, result.stdout) == (
        0,
        f'ALLOW by rule "planner-may-ask" ({path})\n',
    ), result.stderr


async def test_explain_as_json_has_the_traffic_fields(tmp_path: Path) -> None:
    """`-o json`: the metadata, the selected route and where timeout and retries come from,
    and the destination's settings, durations in seconds."""
    path = policy_file(tmp_path)
    result = await run(
        "mesh-policy", "explain", "planner", "researcher", "answer", "--file", path,
        "--meta", "track=beta", "-o", "json", env=offline(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    traffic = doc["traffic"]
    assert doc["metadata"] == {"track": "beta"}
    assert traffic["route"]["name"] == "beta"
    assert traffic["route"]["split"] == [
        {"version": "1.2.0", "labels": {}, "weight": 90},
        {"version": "2.0.0", "labels": {"track": "canary"}, "weight": 10},
    ]
    assert traffic["route"]["mirror"]["decision"] == "ALLOW"
    assert traffic["route"]["fault"] == {
        "delay": {"percent": 10.0, "fixed": 0.25},
        "abort": {"percent": 1.0, "code": "UNAVAILABLE"},
    }
    assert traffic["timeout"] == {"seconds": 5.0, "source": "route"}
    assert traffic["retries"] == {"attempts": 2, "per_try_timeout": 2.0, "source": "route"}
    assert traffic["endpoints_key"] == "researcher.*"
    assert traffic["circuit_breaker"]["max_concurrent"] == 100
    assert traffic["outlier_detection"]["base_ejection_time"] == 30.0
    assert traffic["load_balancer"] == {"name": "peak_ewma", "source": "endpoints"}


@pytest.mark.parametrize(
    ("meta", "problem"),
    [
        ("track", "'track' is not key=value (e.g. track=beta)"),
        ("=beta", "'=beta' is not key=value (e.g. track=beta)"),
        ("Track=beta", "request metadata key 'Track' must match [a-z0-9][a-z0-9_-]{0,62}"),
    ],
)
async def test_explain_refuses_malformed_metadata(tmp_path: Path, meta: str, problem: str) -> None:
    """A `--meta` that is not key=value, or whose key no call could carry: a click error,
    exit 2, no traceback."""
    path = policy_file(tmp_path)
    result = await run(
        "mesh-policy", "explain", "planner", "researcher", "answer", "--file", path,
        "--meta", meta, env=offline(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1] == f"Error: Invalid value for '--meta': {problem}"
    assert "Traceback" not in result.stderr


async def test_explain_refuses_a_metadata_key_given_twice(tmp_path: Path) -> None:
    """Two `--meta` with the same key: which one would a call carry? Exit 2 saying so."""
    path = policy_file(tmp_path)
    result = await run(
        "mesh-policy", "explain", "planner", "researcher", "answer", "--file", path,
        "--meta", "track=beta", "--meta", "track=gold", env=offline(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert (
        result.stderr.splitlines()[-1]
        == "Error: Invalid value for '--meta': 'track' is given twice"
    )


# --- against a live mesh ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_keys(tmp_path_factory.mktemp("keys"))


@dataclass
class World:
    """A nats-server, the registry, the research agents (researcher runs version 1.2.0) and
    an in-process admin."""

    keys: Path
    url: str
    ops: mesh.Mesh

    def env(self) -> dict[str, str]:
        return base_env(servers=self.url, identity=self.keys / "admin")

    async def apply(self, text: str, source: str) -> int:
        request = ApplyRequest(policy=text, source=source)
        reply = await self.ops.request("registry", "apply", request, ApplyReply)
        return reply.revision

    async def current_revision(self) -> int | None:
        current = await self.ops.control.current_policy()
        return current[0].revision if current else None


@pytest.fixture
async def world(nats_server: NatsServer, keys: Path) -> AsyncIterator[World]:
    for name in ("admin", "registry"):  # heads saved for the last test's mesh
        shutil.rmtree(keys / name / "state", ignore_errors=True)
    root = load_trust_root(keys)
    cfg = test_config([nats_server.url])
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(
            mesh.Mesh(
                mesh.load_identity(keys / "registry"), cfg, agent=reg.registry, trust_root=root
            )
        )
        ops = await stack.enter_async_context(
            mesh.Mesh(root.issue_identity("ops", roles=["admin"]), watching_all(cfg))
        )
        for name in ("librarian", "researcher", "planner"):
            agent = getattr(research, name)
            await stack.enter_async_context(mesh.Mesh(root.issue_identity(name), cfg, agent=agent))
        await ops.wait_for("registry")
        await asyncio.gather(*(ops.wait_for(n) for n in ("librarian", "researcher", "planner")))
        yield World(keys, nats_server.url, ops)


async def test_explain_shows_the_route_of_the_applied_revision(world: World) -> None:
    """Without --file, explain reads the current revision and prints its route."""
    revision = await world.apply(TRAFFIC, "traffic.yaml")
    result = await run(
        "mesh-policy", "explain", "planner", "researcher", "answer",
        "--meta", "track=beta", "--meta", "user=ada", env=world.env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f'ALLOW by rule "planner-may-ask" (traffic.yaml, revision {revision})',
        *BETA,
        *DESTINATION,
    ]


async def test_apply_refuses_a_split_version_no_live_instance_runs(
    world: World, tmp_path: Path
) -> None:
    """`apply` names the file, the line, the route and the version with a did-you-mean and the
    fix, exits 2 and applies nothing: the backend's share would go to the others."""
    path = tmp_path / "canary.yaml"
    path.write_text(SPLIT_TO_NOBODY)
    result = await run("mesh-policy", "apply", path, env=world.env())
    assert result.returncode == 2, result.stdout + result.stderr
    assert VERSION_FINDING.format(kind="error", path=path) in result.stderr.splitlines()
    assert (
        f"FailedPrecondition: {path}: not applied: 1 split backends or mirrors name versions "
        "or labels no live instance has: start such instances first, or apply with "
        "--allow-unknown-versions to route ahead of them"
    ) in result.stderr
    assert "Traceback" not in result.stderr
    assert await world.current_revision() is None


async def test_apply_allow_unknown_versions_applies_with_a_warning(
    world: World, tmp_path: Path
) -> None:
    """`apply --allow-unknown-versions`: a rollout routed ahead of its instances is applied,
    the version named as a warning."""
    path = tmp_path / "canary.yaml"
    path.write_text(SPLIT_TO_NOBODY)
    result = await run("mesh-policy", "apply", "--allow-unknown-versions", path, env=world.env())
    assert result.returncode == 0, result.stderr
    assert VERSION_FINDING.format(kind="warning", path=path) in result.stderr.splitlines()
    assert "applied revision 1" in result.stdout


async def test_validate_live_refuses_a_split_version_no_live_instance_runs(
    world: World, tmp_path: Path
) -> None:
    """`validate --live` prints the same error and exits 1, `--strict` or not."""
    path = tmp_path / "canary.yaml"
    path.write_text(SPLIT_TO_NOBODY)
    result, strict = await asyncio.gather(
        run("mesh-policy", "validate", "--live", path, env=world.env()),
        run("mesh-policy", "validate", "--live", "--strict", path, env=world.env()),
    )
    for r in (result, strict):
        assert r.returncode == 1, r.stderr
        assert VERSION_FINDING.format(kind="error", path=path) in r.stderr.splitlines()


CHAOS = """apiVersion: mesh/v1
kind: Policy
metadata: {name: chaos}
spec:
  defaults: {authorization: allow}
  routes:
    - name: chaos
      match: {callers: [admin], agent: researcher, metadata: {chaos: "yes"}}
      fault: {abort: {percent: 100, code: UNAVAILABLE}}
"""


async def test_call_carries_its_metadata_to_the_route_that_matches_it(world: World) -> None:
    """`call --meta chaos=yes` matches the caller's route and gets its injected abort (exit 2,
    the route named, nothing sent); without the metadata the call is answered."""
    revision = await world.apply(CHAOS, "chaos.yaml")
    await wait_until(
        lambda: all(
            r.policy_revision == revision for r in world.ops.directory.all() if r.agent != "ops"
        ),
        timeout=10,
    )
    body = '{"text": "what is NATS?"}'
    faulted, answered = await asyncio.gather(
        run("mesh-policy", "call", "researcher", "answer", body, "--meta", "chaos=yes",
            env=world.env()),
        run("mesh-policy", "call", "researcher", "answer", body, env=world.env()),
    )  # fmt: skip
    assert faulted.returncode == 2, faulted.stdout + faulted.stderr
    assert faulted.stderr.strip() == ("Unavailable: fault injected by route 'chaos': UNAVAILABLE")
    assert answered.returncode == 0, answered.stderr
    assert json.loads(answered.stdout)["text"]
