"""`mesh-policy check`, and the live name analysis of `validate --live` and `apply`, run as an
operator runs them (subprocesses configured by `MESH_*`) against a real nats-server."""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

import mesh
from mesh.control_plane import ApplyReply, ApplyRequest, TrustRoot, load_trust_root
from mesh.testing import NatsServer, test_config, wait_until, watching_all
from mesh_agents import registry as reg
from mesh_examples import research

from .cli_helpers import REPO, base_env, init_keys, run, run_sync

RESEARCH = "policies/research.yaml"
TYPO = """apiVersion: mesh/v1
kind: Policy
metadata: {name: typo}
spec:
  rules:
    - name: x
      allow: {callers: [planer], agent: researcher, endpoints: [answer]}
"""
TYPO_WARNING = (
    'warning: {path}: rule "x" names agent "planer", which no live instance has '
    '(did you mean "planner"?)'
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_keys(tmp_path_factory.mktemp("keys"))


@dataclass
class World:
    """A nats-server, the registry, the research agents and an in-process admin."""

    url: str
    keys: Path
    root: TrustRoot
    ops: mesh.Mesh

    def env(self) -> dict[str, str]:
        return base_env(servers=self.url, identity=self.keys / "admin")

    async def apply(self, path: str) -> int:
        reply = await self.ops.request(
            "registry",
            "apply",
            ApplyRequest(policy=(REPO / path).read_text(), source=path),
            ApplyReply,
        )
        return reply.revision

    async def current_revision(self) -> int | None:
        current = await self.ops.control.current_policy()
        return current[0].revision if current else None


@pytest.fixture
async def world(nats_server: NatsServer, keys: Path) -> AsyncIterator[World]:
    for name in ("admin", "registry"):  # heads saved for the last test's mesh
        shutil.rmtree(keys / name / "state", ignore_errors=True)
    root = load_trust_root(keys)
    cfg = test_config([nats_server.url], signals_interval=0.2)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(
            mesh.Mesh(
                mesh.load_identity(keys / "registry"), cfg, agent=reg.registry, trust_root=root
            )
        )
        ops = await stack.enter_async_context(
            mesh.Mesh(root.issue_identity("ops", roles=["admin"]), watching_all(cfg))
        )
        for name, roles in (("librarian", ()), ("researcher", ()), ("planner", ("coordinator",))):
            ident = root.issue_identity(name, roles=roles)
            agent = getattr(research, name)
            await stack.enter_async_context(mesh.Mesh(ident, cfg, agent=agent))
        await ops.wait_for("registry")
        for name in ("librarian", "researcher", "planner"):
            await ops.wait_for(name)
        yield World(nats_server.url, keys, root, ops)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# --- check ------------------------------------------------------------------------------------


async def test_check_passes_every_check_on_a_healthy_mesh(world: World) -> None:
    """With a registry, a policy every agent runs and fresh certificates: 12 PASS, exit 0."""
    revision = await world.apply(RESEARCH)

    def acked() -> bool:
        return all(r.policy_revision == revision for r in world.ops.directory.all())

    await wait_until(acked, timeout=10)
    result = await run("mesh-policy", "check", env=world.env())
    shown = lines(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [line.split()[0] for line in shown[:-1]] == ["PASS"] * 12, result.stdout
    assert shown[-1] == "12 passed, 0 warnings, 0 failed, 0 skipped"
    assert f"names revision {revision}" in result.stdout


async def test_check_warns_when_no_policy_was_applied(world: World) -> None:
    """A head naming no policy is a warning (everything is allowed): exit 1."""
    result = await run("mesh-policy", "check", env=world.env())
    assert result.returncode == 1, result.stdout + result.stderr
    assert "WARN  policy freshness: head v" in result.stdout
    assert "names no policy: every call is allowed → mesh-policy apply FILE" in result.stdout


async def test_check_as_json_lists_every_check_with_its_status(world: World) -> None:
    """`-o json` has one object per check, in order, and the exit code."""
    result = await run("mesh-policy", "check", "-o", "json", env=world.env())
    doc = json.loads(result.stdout)
    assert doc["exit_code"] == result.returncode == 1
    assert [c["name"] for c in doc["checks"]][:3] == [
        "NATS reachable",
        "JetStream enabled",
        "control-plane stores",
    ]
    assert {c["status"] for c in doc["checks"]} == {"pass", "warn"}
    assert set(doc["checks"][0]) == {"name", "status", "detail", "fix"}


def test_check_fails_the_nats_line_when_nothing_listens() -> None:
    """Nothing listening at the URL: the NATS line fails at once, the rest are skipped, exit 2."""
    url = f"nats://127.0.0.1:{free_port()}"
    result = run_sync("mesh-policy", "check", env=base_env(servers=url), timeout=20)
    shown = lines(result.stdout)
    assert result.returncode == 2, result.stdout + result.stderr
    assert shown[0] == (
        f"FAIL  NATS reachable: nothing is listening at {url}: connection refused (start "
        "nats-server, or check --servers / MESH_SERVERS)"
    )
    assert shown[1:-1] == [line for line in shown[1:-1] if line.startswith("SKIP  ")]
    assert len(shown) == 13
    assert shown[-1] == "0 passed, 0 warnings, 1 failed, 11 skipped"


async def test_check_fails_without_a_control_plane_and_creates_nothing(
    nats_server: NatsServer, keys: Path
) -> None:
    """A server with no registry ever run: the stores line fails, and check creates none."""
    env = base_env(servers=nats_server.url, identity=keys / "admin")
    result = await run("mesh-policy", "check", env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "FAIL  control-plane stores: no control plane under prefix 'mesh'" in result.stdout
    assert "SKIP  registry answering" in result.stdout
    again = await run("mesh-policy", "check", env=env)
    assert "no control plane under prefix 'mesh'" in again.stdout  # still none


# --- validate --live and apply --------------------------------------------------------------


async def test_apply_warns_of_a_name_no_live_instance_has(world: World, tmp_path: Path) -> None:
    """`apply` prints a did-you-mean warning to stderr and still applies."""
    path = tmp_path / "typo.yaml"
    path.write_text(TYPO)
    result = await run("mesh-policy", "apply", path, env=world.env())
    assert result.returncode == 0, result.stderr
    assert TYPO_WARNING.format(path=path) in result.stderr
    assert "applied revision 1" in result.stdout


async def test_apply_strict_refuses_a_name_no_live_instance_has(
    world: World, tmp_path: Path
) -> None:
    """`apply --strict` exits 2 and applies nothing."""
    path = tmp_path / "typo.yaml"
    path.write_text(TYPO)
    result = await run("mesh-policy", "apply", "--strict", path, env=world.env())
    assert result.returncode == 2, result.stdout + result.stderr
    assert TYPO_WARNING.format(path=path) in result.stderr
    assert "FailedPrecondition: " in result.stderr and "not applied" in result.stderr
    assert await world.current_revision() is None


async def test_apply_of_a_policy_naming_only_live_things_warns_of_nothing(world: World) -> None:
    """The research policy names live agents, endpoints and roles (and patterns): no warning."""
    result = await run("mesh-policy", "apply", "--strict", RESEARCH, env=world.env())
    assert result.returncode == 0, result.stderr
    assert "warning:" not in result.stderr


async def test_validate_live_warns_and_strict_exits_1(world: World, tmp_path: Path) -> None:
    """`validate --live` warns (exit 0); with `--strict` such a name fails validation (1)."""
    path = tmp_path / "typo.yaml"
    path.write_text(TYPO)
    result = await run("mesh-policy", "validate", "--live", path, env=world.env())
    assert result.returncode == 0, result.stderr
    assert TYPO_WARNING.format(path=path) in result.stderr
    strict = await run("mesh-policy", "validate", "--live", "--strict", path, env=world.env())
    assert strict.returncode == 1, strict.stderr
