"""`-o table|json|yaml` of `mesh-policy`'s read commands and `top --watch`, run as an operator
runs them: subprocesses against a real nats-server and an in-process registry."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

import mesh
from mesh.control_plane import (
    ApplyReply,
    ApplyRequest,
    SignalsReply,
    SignalsRequest,
    TokenReply,
    TokenRequest,
    TrustRoot,
    load_trust_root,
)
from mesh.testing import NatsServer, test_config, wait_until, watching_all
from mesh_agents import registry as reg
from mesh_examples import research

from .cli_helpers import BIN, REPO, base_env, init_keys, run, run_sync

RESEARCH = "policies/research.yaml"
OPEN = "policies/open.yaml"
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
FORMATS = ["json", "yaml"]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_keys(tmp_path_factory.mktemp("keys"))


@dataclass
class World:
    """A nats-server, the registry and an in-process admin; the CLI runs as `keys/admin`."""

    keys: Path
    root: TrustRoot
    cfg: mesh.MeshConfig
    stack: AsyncExitStack
    ops: mesh.Mesh
    url: str

    def env(self) -> dict[str, str]:
        return base_env(servers=self.url, identity=self.keys / "admin")

    async def join(self, name: str, agent: mesh.Agent | None = None) -> mesh.Mesh:
        ident = self.root.issue_identity(name)
        return await self.stack.enter_async_context(mesh.Mesh(ident, self.cfg, agent=agent))

    async def apply(self, path: str) -> int:
        body = ApplyRequest(policy=(REPO / path).read_text(), source=path)
        reply = await self.ops.request("registry", "apply", body, ApplyReply)
        return reply.revision

    async def research_team(self) -> None:
        for name in ("librarian", "researcher"):
            await self.join(name, getattr(research, name))
            await self.ops.wait_for(name)


@pytest.fixture
async def world(nats_server: NatsServer, keys: Path) -> AsyncIterator[World]:
    # The identities keep the newest head they saw in `<identity>/state/`: the last test's
    # mesh was another one, so forget it (as test_policy_cli's forget_saved_state does).
    for name in ("admin", "registry"):
        shutil.rmtree(keys / name / "state", ignore_errors=True)
    root = load_trust_root(keys)
    cfg = test_config([nats_server.url], signals_interval=0.2)
    async with AsyncExitStack() as stack:
        registry = mesh.load_identity(keys / "registry")
        await stack.enter_async_context(
            mesh.Mesh(registry, cfg, agent=reg.registry, trust_root=root)
        )
        ops = await stack.enter_async_context(
            mesh.Mesh(root.issue_identity("ops", roles=["admin"]), watching_all(cfg))
        )
        await ops.wait_for("registry")
        yield World(keys, root, cfg, stack, ops, nats_server.url)


async def read(world: World, fmt: str, *args: str) -> Any:
    """Run `mesh-policy ARGS -o FMT` (exit 0) and parse its stdout as FMT."""
    result = await run("mesh-policy", *args, "-o", fmt, env=world.env())
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout) if fmt == "json" else yaml.safe_load(result.stdout)


async def make_traffic(world: World) -> None:
    """planner -> researcher -> librarian until the registry has the reports."""
    await world.research_team()
    planner = await world.join("planner", research.planner)
    await planner.wait_for("researcher")
    for i in range(3):
        await planner.request(
            "researcher", "answer", research.Question(text=f"q{i}"), research.Answer
        )

    async def reported() -> bool:
        reply = await world.ops.request("registry", "signals", SignalsRequest(), SignalsReply)
        return {"researcher", "librarian"} <= {r.callee for r in reply.rows}

    for _ in range(100):
        if await reported():
            return
        await asyncio.sleep(0.1)
    raise TimeoutError("the registry has no signal reports")


# --- the helper ------------------------------------------------------------------------------


def test_iso_is_utc_to_the_second() -> None:
    """`iso` writes a unix time as ISO 8601 UTC with a Z, and keeps None."""
    from mesh.cli._output import iso

    assert iso(1738324800.75) == "2025-01-31T12:00:00Z"
    assert iso(None) is None


def test_every_read_command_takes_output_formats() -> None:
    """Each read command's --help offers -o {table,json,yaml} and says table is the default."""
    for command in (
        ["get"],
        ["history"],
        ["agents"],
        ["explain"],
        ["top"],
        ["check"],
        ["identity", "list"],
        ["audit", "tail"],
    ):
        result = run_sync("mesh-policy", *command, "--help", env=base_env())
        assert result.returncode == 0, result.stderr
        shown = " ".join(result.stdout.split())  # click wraps the help text
        assert "-o, --output [table|json|yaml" in shown, command
        assert "default: table]" in shown.split("--output", 1)[1], command


# --- get ---------------------------------------------------------------------------------------


async def test_get_yaml_applies_back_as_the_same_revision(world: World, tmp_path: Path) -> None:
    """`get -o yaml` prints the policy alone; `apply` of it says unchanged."""
    rev = await world.apply(RESEARCH)
    result = await run("mesh-policy", "get", "-o", "yaml", env=world.env())
    assert result.returncode == 0, result.stderr
    doc = yaml.safe_load(result.stdout)
    assert (doc["apiVersion"], doc["kind"]) == ("mesh/v1", "Policy")
    path = tmp_path / "again.yaml"
    path.write_text(result.stdout)
    again = await run("mesh-policy", "apply", path, env=world.env())
    assert again.returncode == 0, again.stderr
    assert f"unchanged: revision {rev} already has this policy" in again.stdout


async def test_get_json_is_the_canonical_json_and_json_flag_is_its_alias(world: World) -> None:
    """`get -o json` and `get --json` print the same canonical JSON."""
    await world.apply(RESEARCH)
    new, old = await asyncio.gather(
        run("mesh-policy", "get", "-o", "json", env=world.env()),
        run("mesh-policy", "get", "--json", env=world.env()),
    )
    assert new.returncode == old.returncode == 0, new.stderr + old.stderr
    assert new.stdout == old.stdout
    assert json.loads(new.stdout)["kind"] == "Policy"


# --- lists -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
async def test_history_lists_revisions_with_documented_keys(world: World, fmt: str) -> None:
    """`history -o json|yaml`: one object per revision, times in ISO 8601."""
    await world.apply(RESEARCH)
    await world.apply(OPEN)
    revs = await read(world, fmt, "history")
    assert [r["revision"] for r in revs] == [1, 2]
    for r in revs:
        assert set(r) == {"revision", "applied_at", "applied_by", "source", "sha256", "rollback_of"}
        assert ISO.match(r["applied_at"]) and len(r["sha256"]) == 64
        assert r["rollback_of"] is None
    assert revs[1]["source"] == OPEN


@pytest.mark.parametrize("fmt", FORMATS)
async def test_agents_lists_instances_with_documented_keys(world: World, fmt: str) -> None:
    """`agents -o json|yaml`: one object per live instance with its certificate's expiry."""
    await world.research_team()
    rev = await world.apply(RESEARCH)
    await wait_until(
        lambda: {r.policy_revision for r in world.ops.directory.all() if r.agent != "ops"} == {rev}
    )
    rows = await read(world, fmt, "agents")
    assert {r["agent"] for r in rows} >= {"librarian", "researcher", "registry"}
    for r in rows:
        assert {
            "agent",
            "instance",
            "version",
            "state",
            "certificate_expires",
            "policy_revision",
            "status",
        } <= set(r)
        assert ISO.match(r["certificate_expires"]), r
    mine = [r for r in rows if r["agent"] in ("librarian", "researcher")]
    assert all(
        (r["state"], r["policy_revision"], r["status"]) == ("serving", rev, "ok") for r in mine
    )


@pytest.mark.parametrize("fmt", FORMATS)
async def test_identity_list_has_the_root_and_every_certificate(world: World, fmt: str) -> None:
    """`identity list -o json|yaml`: the trust root and one object per issued certificate."""
    doc = await read(world, fmt, "identity", "list")
    assert set(doc) == {"trust_root", "identities"}
    assert set(doc["trust_root"]) == {"key_id", "not_after"}
    assert ISO.match(doc["trust_root"]["not_after"])
    for i in doc["identities"]:
        assert set(i) == {
            "agent",
            "instance",
            "serial",
            "roles",
            "via",
            "issued_at",
            "expires",
            "state",
        }
        assert ISO.match(i["expires"]) and ISO.match(i["issued_at"])
        assert isinstance(i["roles"], list)


@pytest.mark.parametrize("fmt", FORMATS)
async def test_audit_tail_lists_records_with_iso_times(world: World, fmt: str) -> None:
    """`audit tail -o json|yaml`: records with ISO times, also the times in their details."""
    await world.ops.request("registry", "token", TokenRequest(agent="late", roles=[]), TokenReply)
    await world.apply(RESEARCH)
    recs = await read(world, fmt, "audit", "tail", "-n", "5")
    assert 0 < len(recs) <= 5
    for r in recs:
        assert set(r) == {"seq", "ts", "kind", "actor", "subject", "details", "prev"}
        assert ISO.match(r["ts"])
    kinds = {r["kind"]: r for r in recs}
    assert ISO.match(kinds["identity.token_created"]["details"]["expires_at"])
    assert kinds["policy.applied"]["subject"] == "revision 1"


@pytest.mark.parametrize("fmt", FORMATS)
async def test_explain_prints_the_decision(world: World, fmt: str) -> None:
    """`explain -o json|yaml`: the decision, its rule and revision; DENY still exits 3."""
    await world.apply(RESEARCH)
    result = await run(
        "mesh-policy", "explain", "planner", "librarian", "delete", "-o", fmt, env=world.env()
    )
    assert result.returncode == 3, result.stderr
    doc = json.loads(result.stdout) if fmt == "json" else yaml.safe_load(result.stdout)
    assert doc["decision"] == "DENY" and doc["revision"] == 1
    assert doc["explanation"].startswith("DENY by")
    assert {"caller", "roles", "callee", "endpoint", "rule", "effect", "audit_only"} <= set(doc)


@pytest.mark.parametrize("fmt", FORMATS)
async def test_check_prints_each_check(world: World, fmt: str) -> None:
    """`check -o json|yaml`: every check with its status, and the exit code."""
    result = await run("mesh-policy", "check", "-o", fmt, env=world.env())
    doc = json.loads(result.stdout) if fmt == "json" else yaml.safe_load(result.stdout)
    assert doc["exit_code"] == result.returncode
    assert all(set(c) == {"name", "status", "detail", "fix"} for c in doc["checks"])


async def test_check_still_takes_text(world: World) -> None:
    """`check -o text` (the old name of `table`) still prints the lines for people."""
    result = await run("mesh-policy", "check", "-o", "text", env=world.env())
    assert re.search(r"^\d+ passed, \d+ warnings", result.stdout, re.M), result.stdout


# --- top -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
async def test_top_prints_rows_with_documented_keys(world: World, fmt: str) -> None:
    """`top -o json|yaml`: the window, the side and one row per endpoint and caller."""
    await make_traffic(world)
    doc = await read(world, fmt, "top")
    assert (doc["side"], doc["window_s"]) == ("server", 60)
    assert ISO.match(doc["at"])
    row_keys = {"callee", "endpoint", "caller", "rps", "success_rate", "p50_ms", "p99_ms"}
    assert all(row_keys | {"inflight", "requests", "errors"} == set(r) for r in doc["rows"])
    pairs = {(r["callee"], r["endpoint"], r["caller"]) for r in doc["rows"]}
    assert ("researcher", "answer", "planner") in pairs


@pytest.mark.parametrize(("fmt", "marker"), [("table", "golden signals"), ("json", '"rows"')])
async def test_top_watch_redraws_until_sigint_then_exits_0(
    world: World, fmt: str, marker: str
) -> None:
    """`top --watch 0.5` prints again and again; SIGINT exits 0 without a traceback."""
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "mesh-policy"),
        *("top", "--watch", "0.5", "-o", fmt),
        cwd=REPO,
        env=world.env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    printed = ""
    try:
        async with asyncio.timeout(20):
            while printed.count(marker) < 2:
                line = await proc.stdout.readline()
                assert line, "top --watch stopped printing"
                printed += line.decode()
        proc.send_signal(signal.SIGINT)
        rest, err = await asyncio.wait_for(proc.communicate(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert "Traceback" not in err.decode(), err.decode()
    if fmt == "json":
        lines = (printed + rest.decode()).splitlines()
        assert all("rows" in json.loads(line) for line in lines)
