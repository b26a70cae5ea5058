"""`mesh-policy` end to end, as an operator runs it: subprocesses configured by ``MESH_SERVERS``
and ``MESH_IDENTITY``, against a real nats-server and a registry (in-process, or started with
``mesh-agent run mesh_agents.registry:registry`` as the docs say)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest

import mesh
from mesh.cli import policy as policy_cli
from mesh.control_plane import (
    ApplyReply,
    ApplyRequest,
    CertificateVerifier,
    RollbackRequest,
    SignalsReply,
    SignalsRequest,
    TokenReply,
    TokenRequest,
    TrustRoot,
    canonical_policy_bytes,
    load_trust_root,
    save_trust_root,
)
from mesh.testing import NatsServer, test_config, wait_until, watching_all
from mesh_agents import registry as reg
from mesh_examples import research

from .cli_helpers import BIN, POLICIES, REPO, base_env, run, run_sync, run_until, table
from .workers import Done, Job

RESEARCH = "policies/research.yaml"
OPEN = "policies/open.yaml"
TOP_COMMANDS = [
    "init",
    "validate",
    "apply",
    "diff",
    "get",
    "history",
    "rollback",
    "explain",
    "agents",
    "call",
    "schemas",
    "top",
    "graph",
    "dashboard",
    "identity",
    "gateway-key",
    "check",
    "audit",
    "completion",
]
GROUP_COMMANDS = {"identity": ["issue", "token", "list", "revoke"], "audit": ["tail", "verify"]}
# file -> (line, problem): what `validate` must say about each broken example
BROKEN = {
    "allow-and-deny.yaml": (12, "spec.rules[1].deny: exactly one of allow or deny"),
    "bad-duration.yaml": (11, "invalid duration '30 seconds'"),
    "syntax-error.yaml": (11, "invalid YAML"),
    "unknown-field.yaml": (12, "unknown field 'endpoint' (did you mean 'endpoints'?)"),
}
AUDIT_LINE = re.compile(r"^\s*(\d+) \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC (\S+)", re.M)


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`mesh-policy init DIR`: root.key, root.pub, admin/ and registry/ (shared: init is slow
    to repeat, and every test gets its own nats-server, so no state is shared)."""
    d = tmp_path_factory.mktemp("keys")
    result = run_sync("mesh-policy", "init", d, env=base_env())
    assert result.returncode == 0, result.stderr
    return d


def forget_saved_state(keys: Path) -> None:
    """Each test has a new nats-server, so a new mesh: the heads the shared identities saved
    for the last test's mesh would be newer than this one's (a rollback, rightly refused)."""
    for name in ("admin", "registry"):
        shutil.rmtree(keys / name / "state", ignore_errors=True)


@dataclass
class World:
    """A nats-server, the registry (in-process, from the `init` keys) and an in-process admin
    for setting the scene; the CLI runs as `keys/admin`."""

    url: str
    keys: Path
    root: TrustRoot
    cfg: mesh.MeshConfig
    stack: AsyncExitStack
    registry: mesh.Mesh
    ops: mesh.Mesh

    def env(self, identity: Path | None = None) -> dict[str, str]:
        """What the CLI gets: this server, and `keys/admin` unless told otherwise."""
        return base_env(servers=self.url, identity=identity or self.keys / "admin")

    async def join(
        self, name: str, agent: mesh.Agent | None = None, roles: tuple[str, ...] = ()
    ) -> mesh.Mesh:
        ident = self.root.issue_identity(name, roles=roles)
        return await self.stack.enter_async_context(mesh.Mesh(ident, self.cfg, agent=agent))

    async def apply(self, path: str) -> int:
        reply = await self.ops.request(
            "registry",
            "apply",
            ApplyRequest(policy=(REPO / path).read_text(), source=path),
            ApplyReply,
        )
        return reply.revision

    async def rollback(self, revision: int) -> int:
        reply = await self.ops.request(
            "registry", "rollback", RollbackRequest(revision=revision), ApplyReply
        )
        return reply.revision

    async def token(self, agent: str, roles: list[str]) -> str:
        reply = await self.ops.request(
            "registry", "token", TokenRequest(agent=agent, roles=roles), TokenReply
        )
        return reply.token

    async def current_revision(self) -> int | None:
        current = await self.ops.control.current_policy()
        return current[0].revision if current else None

    def revisions(self) -> dict[str, set[int | None]]:
        """The policy revision each live instance acknowledges, per agent."""
        seen: dict[str, set[int | None]] = {}
        for rec in self.ops.directory.all():
            seen.setdefault(rec.agent, set()).add(rec.policy_revision)
        return seen


@pytest.fixture
async def world(nats_server: NatsServer, keys: Path) -> AsyncIterator[World]:
    forget_saved_state(keys)
    root = load_trust_root(keys)
    cfg = test_config([nats_server.url], signals_interval=0.2)
    async with AsyncExitStack() as stack:
        registry = await stack.enter_async_context(
            mesh.Mesh(
                mesh.load_identity(keys / "registry"), cfg, agent=reg.registry, trust_root=root
            )
        )
        ops = await stack.enter_async_context(
            mesh.Mesh(root.issue_identity("ops", roles=["admin"]), watching_all(cfg))
        )
        await ops.wait_for("registry")
        yield World(nats_server.url, keys, root, cfg, stack, registry, ops)


def world_less_admin(tmp_path: Path) -> Path:
    """An admin identity for commands that need one but have no mesh to talk to."""
    root = TrustRoot.generate()
    return mesh.save_identity(root.issue_identity("admin", roles=["admin"]), tmp_path / "admin")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def audit_lines(text: str) -> list[tuple[int, str]]:
    return [(int(seq), kind) for seq, kind in AUDIT_LINE.findall(text)]


# --- help and offline commands ---------------------------------------------------------------


async def test_help_lists_every_command() -> None:
    """`--help` of mesh-policy, `identity` and `audit` exits 0 and lists every command."""
    env = base_env()
    top, ident, audit = await asyncio.gather(
        run("mesh-policy", "--help", env=env),
        run("mesh-policy", "identity", "--help", env=env),
        run("mesh-policy", "audit", "--help", env=env),
    )
    for result, commands in (
        (top, TOP_COMMANDS),
        (ident, GROUP_COMMANDS["identity"]),
        (audit, GROUP_COMMANDS["audit"]),
    ):
        assert result.returncode == 0, result.stderr
        section = result.stdout.split("\nCommands:\n", 1)[1]
        listed = set(re.findall(r"^  (\S+)", section, re.M))
        assert listed == set(commands), result.stdout


def test_version_prints_the_package_version() -> None:
    """`mesh-policy --version` prints `natsmesh <version>` (mesh.__version__) and exits 0."""
    result = run_sync("mesh-policy", "--version", env=base_env())
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        f"natsmesh {mesh.__version__}\n",
        "",
    )


def test_every_subcommand_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    """Each leaf command's `--help` exits 0 and shows its own usage line (through `main`, in
    this process: 17 more interpreter start-ups would cost a quarter of the time budget)."""
    leaves = [[c] for c in TOP_COMMANDS if c not in GROUP_COMMANDS] + [
        [group, sub] for group, subs in GROUP_COMMANDS.items() for sub in subs
    ]
    for command in leaves:
        assert policy_cli.main([*command, "--help"]) == 0, command
        shown = capsys.readouterr().out
        assert shown.startswith(f"Usage: mesh-policy {' '.join(command)} [OPTIONS]"), shown


def test_validate_accepts_the_research_policy() -> None:
    """`validate policies/research.yaml` exits 0 with a one-line summary."""
    result = run_sync("mesh-policy", "validate", RESEARCH, env=base_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"{RESEARCH}: OK (research-team: 3 rules, 3 endpoint settings, default deny)"
    )


@pytest.mark.parametrize("name", sorted(p.name for p in (POLICIES / "broken").glob("*.yaml")))
def test_validate_rejects_a_broken_policy_naming_file_line_and_problem(name: str) -> None:
    """`validate` on a broken file exits 1 and says `file:line: path: problem` on stderr."""
    path = f"policies/broken/{name}"
    result = run_sync("mesh-policy", "validate", path, env=base_env())
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == ""
    found = re.search(rf"{re.escape(path)}:(\d+): spec\S*: (.+)", result.stderr)
    assert found, result.stderr
    line, problem = BROKEN[name]
    assert int(found.group(1)) == line, result.stderr
    assert problem in result.stderr


async def test_explain_with_file_needs_no_server(tmp_path: Path) -> None:
    """`explain --file` decides from a local file with no reachable server or identity."""
    env = base_env(servers="nats://127.0.0.1:1", identity=tmp_path / "nobody")
    calls = {
        ("planner", "researcher", "answer"): (0, f'ALLOW by rule "planner-may-ask" ({RESEARCH})'),
        ("intruder", "researcher", "answer"): (3, f"DENY by default deny ({RESEARCH})"),
        ("researcher", "librarian", "delete-all"): (
            3,
            f'DENY by rule "nobody-deletes" ({RESEARCH})',
        ),
    }
    results = await asyncio.gather(
        *(run("mesh-policy", "explain", *call, "--file", RESEARCH, env=env) for call in calls)
    )
    for (call, expected), result in zip(calls.items(), results, strict=True):
        assert (result.returncode, result.stdout.strip()) == expected, (call, result.stderr)


async def test_explain_decides_a_call_made_on_someones_behalf(tmp_path: Path) -> None:
    """`explain --origin/--via/--scope` decides with a delegation chain: the same call is
    allowed for the planner, denied for a guest, and denied as a direct call."""
    env = base_env(servers="nats://127.0.0.1:1", identity=tmp_path / "nobody")
    path = "policies/research-delegation.yaml"
    call = ("researcher", "librarian", "restricted", "--file", path)
    planner, guest, direct, too_deep = await asyncio.gather(
        run("mesh-policy", "explain", *call, "--origin", "planner", "--scope", "library.read",
            env=env),
        run("mesh-policy", "explain", *call, "--origin", "guest-1", env=env),
        run("mesh-policy", "explain", *call, env=env),
        run("mesh-policy", "explain", *call, "--via", "planner,helper", "--scope",
            "library.read", "-o", "json", env=env),
    )  # fmt: skip
    assert (planner.returncode, planner.stdout.strip()) == (
        0,
        f'ALLOW by rule "restricted-for-the-planner" ({path}) '
        "(on behalf of planner via planner → researcher, depth 2)",
    ), planner.stderr
    assert guest.returncode == 3
    assert 'DENY by rule "guests-never-reach-restricted"' in guest.stdout
    assert (direct.returncode, direct.stdout.strip()) == (3, f"DENY by default deny ({path})")
    document = json.loads(too_deep.stdout)
    assert document["delegation"] == {
        "origin": "planner",
        "path": ["planner", "helper", "researcher"],
        "depth": 3,
        "scopes": ["library.read"],
    }
    assert (too_deep.returncode, document["rule"]) == (3, "default deny")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.parametrize("command", ["get", "agents"])
async def test_online_command_without_a_reachable_server_fails_in_time(
    tmp_path: Path, command: str
) -> None:
    """With nothing listening at --servers, an online command exits 2 at once (a refused
    connection is not retried for the 10 s connect timeout) and says what to do."""
    url = f"nats://127.0.0.1:{free_port()}"
    env = base_env(identity=world_less_admin(tmp_path))
    start = time.monotonic()
    try:
        result = await run("mesh-policy", command, "--servers", url, env=env, timeout=14)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`mesh-policy {command}` was still waiting for a server after 14 s")
    elapsed = time.monotonic() - start
    assert result.returncode == 2
    assert result.stderr == (
        f"Unavailable: nothing is listening at {url}: connection refused "
        "(start nats-server, or check --servers / MESH_SERVERS)\n"
    )
    assert elapsed < 2.5, f"took {elapsed:.1f} s (interpreter start-up included)"


async def test_online_command_against_a_server_without_jetstream_says_so(
    tmp_path: Path,
) -> None:
    """A nats-server without JetStream: exit 2 at once, naming the server and the -js flag
    (not a raw `ServiceUnavailableError: code=None ...`, not retried for the connect timeout)."""
    env = base_env(identity=world_less_admin(tmp_path))
    async with NatsServer(jetstream=False) as srv:
        start = time.monotonic()
        result = await run("mesh-policy", "agents", "--servers", srv.url, env=env, timeout=14)
        elapsed = time.monotonic() - start
    assert result.returncode == 2
    assert result.stderr == (
        "FailedPrecondition: opening the JetStream key-value bucket 'mesh-directory' failed: "
        f"JetStream is not enabled on the NATS server at {srv.url}: start nats-server with -js\n"
    )
    assert elapsed < 5, f"took {elapsed:.1f} s"


# --- policy revisions -------------------------------------------------------------------------


async def test_apply_prints_the_revision_and_the_changes(world: World) -> None:
    """`apply` stores the file as revision 1 and prints the revision and what changed."""
    result = await run("mesh-policy", "apply", RESEARCH, env=world.env())
    assert result.returncode == 0, result.stderr
    assert "applied revision 1" in result.stdout
    assert 'policy "research-team" (no policy installed before)' in result.stdout
    assert 'rule "planner-may-ask" added: allow' in result.stdout
    assert "endpoint researcher.answer added: timeout=30s" in result.stdout
    current = await world.ops.control.current_policy()
    assert current is not None
    assert (current[0].revision, current[0].source) == (1, RESEARCH)
    assert current[0].applied_by.startswith("admin/")


async def test_apply_shows_the_lists_in_each_changed_rule(world: World) -> None:
    """The change lines of `apply` show the callers and endpoints of each added rule."""
    result = await run("mesh-policy", "apply", RESEARCH, env=world.env())
    assert result.returncode == 0, result.stderr
    assert (
        'rule "planner-may-ask" added: allow callers=[planner, role:coordinator] '
        "agent=researcher endpoints=[answer]"
    ) in result.stdout


async def test_apply_of_the_same_file_again_is_unchanged(world: World) -> None:
    """Applying the current policy again makes no revision and says so."""
    await world.apply(RESEARCH)
    result = await run("mesh-policy", "apply", RESEARCH, env=world.env())
    assert result.returncode == 0, result.stderr
    assert "unchanged: revision 1 already has this policy" in result.stdout
    assert await world.current_revision() == 1


async def test_get_prints_the_revision_and_its_yaml(world: World) -> None:
    """`get` prints the revision, its source and applier, then the policy as YAML that parses
    back to the same policy."""
    await world.apply(RESEARCH)
    result = await run("mesh-policy", "get", env=world.env())
    assert result.returncode == 0, result.stderr
    _, _, body = result.stdout.partition(f"revision 1 from {RESEARCH}, applied by ops/")
    assert body, result.stdout
    first, _, text = body.partition("\n")
    assert "(sha256 " in first
    printed = mesh.parse_policy(text, source="get")
    assert printed.metadata.name == "research-team"
    expected = mesh.parse_policy((REPO / RESEARCH).read_text())
    assert canonical_policy_bytes(printed) == canonical_policy_bytes(expected)


async def test_get_output_is_a_policy_that_validates_and_applies(
    world: World, tmp_path: Path
) -> None:
    """`get` writes durations and rates with their units: its output passes `validate` (which
    refuses bare numbers) and `apply` takes it back as a new revision of the same policy."""
    await world.apply(RESEARCH)
    result = await run("mesh-policy", "get", env=world.env())
    assert result.returncode == 0, result.stderr
    text = result.stdout.split("\n", 1)[1]
    printed = tmp_path / "printed.yaml"
    printed.write_text(text)
    check = await run("mesh-policy", "validate", str(printed), env=world.env())
    assert check.returncode == 0, check.stderr
    again = await run("mesh-policy", "apply", str(printed), env=world.env())
    assert again.returncode == 0, again.stderr
    expected = mesh.parse_policy((REPO / RESEARCH).read_text())
    assert canonical_policy_bytes(mesh.load_policy(printed)) == canonical_policy_bytes(expected)


async def test_get_json_prints_only_json(world: World) -> None:
    """`get --json` prints the canonical policy JSON and nothing else on stdout."""
    await world.apply(RESEARCH)
    result = await run("mesh-policy", "get", "--json", env=world.env())
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["metadata"]["name"] == "research-team"


async def test_get_prints_an_earlier_revision(world: World) -> None:
    """`get --revision 1` prints revision 1 after a later one was applied."""
    await world.apply(RESEARCH)
    await world.apply(OPEN)
    result = await run("mesh-policy", "get", "--revision", "1", env=world.env())
    assert result.returncode == 0, result.stderr
    assert f"revision 1 from {RESEARCH}" in result.stdout


async def test_diff_lists_changes_without_applying(world: World) -> None:
    """`diff` lists what applying a file would change against the current revision, exits 1
    (there are changes, like `diff`), and applies nothing."""
    await world.apply(RESEARCH)
    result = await run("mesh-policy", "diff", OPEN, env=world.env())
    assert result.returncode == 1, result.stderr
    assert f"{OPEN} against revision 1:" in result.stdout
    for line in (
        "defaults.authorization deny -> allow",
        "defaults.mode enforce -> audit",
        'rule "planner-may-ask" removed',
        "endpoint researcher.answer removed",
    ):
        assert f"  {line}\n" in result.stdout
    assert await world.current_revision() == 1


async def test_diff_without_changes_exits_0(world: World) -> None:
    """`diff` of the file the current revision came from: "no changes", exit 0."""
    await world.apply(RESEARCH)
    result = await run("mesh-policy", "diff", RESEARCH, env=world.env())
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{RESEARCH} against revision 1:\n  no changes\n"


async def test_diff_errors_exit_2(world: World, tmp_path: Path) -> None:
    """An error (here a missing file) still exits 2, not 1: a script can tell them apart."""
    result = await run("mesh-policy", "diff", str(tmp_path / "missing.yaml"), env=world.env())
    assert result.returncode == 2
    assert result.stderr == f"PolicyError: {tmp_path / 'missing.yaml'}: no such file\n"


async def test_history_lists_every_revision(world: World) -> None:
    """`history` lists each revision with applier, source, hash and rollback note."""
    await world.apply(RESEARCH)
    await world.apply(OPEN)
    await world.rollback(1)
    result = await run("mesh-policy", "history", env=world.env())
    assert result.returncode == 0, result.stderr
    rows = table(result.stdout)
    assert [(r["revision"], r["source"], r["note"]) for r in rows] == [
        ("1", RESEARCH, ""),
        ("2", OPEN, ""),
        ("3", RESEARCH, "rollback of 1"),
    ]
    assert all(r["by"].startswith("ops/") for r in rows)
    assert rows[0]["sha256"] == rows[2]["sha256"] != rows[1]["sha256"]


async def test_rollback_makes_a_new_revision_with_the_old_policy(world: World) -> None:
    """`rollback 1` stores revision 1's policy as a new revision 3 and prints the changes."""
    await world.apply(RESEARCH)
    await world.apply(OPEN)
    result = await run("mesh-policy", "rollback", "1", env=world.env())
    assert result.returncode == 0, result.stderr
    assert "revision 3 now runs the policy of revision 1" in result.stdout
    assert "  defaults.authorization allow -> deny\n" in result.stdout
    history = await world.ops.control.policy_history()
    assert [r.revision for r in history] == [1, 2, 3]
    assert history[2].rollback_of == 1
    assert history[2].policy_json == history[0].policy_json


# --- explain --------------------------------------------------------------------------------


async def test_explain_allows_the_planner_by_its_rule(world: World) -> None:
    """`explain planner researcher answer --roles coordinator` prints the allowing rule, exit 0."""
    await world.apply(RESEARCH)
    result = await run(
        "mesh-policy", "explain", "planner", "researcher", "answer", "--roles", "coordinator",
        env=world.env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f'ALLOW by rule "planner-may-ask" ({RESEARCH}, revision 1)' in result.stdout


async def test_explain_denies_an_intruder_by_default_with_exit_3(world: World) -> None:
    """`explain intruder researcher answer` prints DENY by default deny and exits 3."""
    await world.apply(RESEARCH)
    result = await run(
        "mesh-policy", "explain", "intruder", "researcher", "answer", env=world.env()
    )
    assert result.returncode == 3, result.stdout + result.stderr
    assert f"DENY by default deny ({RESEARCH}, revision 1)" in result.stdout
    assert "ALLOW" not in result.stdout


async def test_explain_takes_roles_from_a_live_instance(world: World) -> None:
    """Without --roles, explain uses the roles in a live instance's certificate."""
    boss = mesh.Agent("boss")
    await world.join("boss", boss, roles=("coordinator",))
    await world.apply(RESEARCH)
    await world.ops.wait_for("boss")
    result = await run("mesh-policy", "explain", "boss", "researcher", "answer", env=world.env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert f'ALLOW by rule "planner-may-ask" ({RESEARCH}, revision 1)' in result.stdout


# --- agents ---------------------------------------------------------------------------------


async def start_research_team(world: World) -> dict[str, mesh.Mesh]:
    team = {
        name: await world.join(name, getattr(research, name))
        for name in ("librarian", "researcher")
    }
    for name in team:
        await world.ops.wait_for(name)
    return team


async def test_agents_lists_live_instances_with_their_revision(world: World) -> None:
    """`agents` lists every live instance with version, state, policy revision and ok."""
    team = await start_research_team(world)
    rev = await world.apply(RESEARCH)
    await wait_until(lambda: all(s == {rev} for s in world.revisions().values()))
    result = await run("mesh-policy", "agents", env=world.env())
    assert result.returncode == 0, result.stderr
    rows = {r["agent"]: r for r in table(result.stdout)}
    assert set(rows) == {"librarian", "researcher", "registry"}
    for name, m in team.items():
        assert rows[name]["instance"] == m.instance
        assert rows[name]["version"] == getattr(research, name).version
    assert rows["registry"]["instance"] == world.registry.instance
    for row in rows.values():
        assert (row["state"], row["policy"], row["status"]) == ("serving", "1", "ok"), row
        assert row["certificate expires"].endswith("UTC")


async def test_agents_show_the_new_revision_after_apply(world: World) -> None:
    """After a new `apply`, every row of `agents` shows the new revision."""
    await start_research_team(world)
    await world.apply(RESEARCH)
    applied = await run("mesh-policy", "apply", OPEN, env=world.env())
    assert applied.returncode == 0 and "applied revision 2" in applied.stdout, applied.stderr

    def all_on_2(result: subprocess.CompletedProcess[str]) -> bool:
        rows = table(result.stdout)
        return len(rows) == 3 and all(r["policy"] == "2" for r in rows)

    result = await run_until(all_on_2, "mesh-policy", "agents", env=world.env())
    assert all_on_2(result), result.stdout + result.stderr
    assert {r["status"] for r in table(result.stdout)} == {"ok"}


async def test_agents_flags_an_instance_that_missed_a_revision_as_stale(world: World) -> None:
    """An instance still on an older revision shows it, flagged stale with the current one."""
    team = await start_research_team(world)
    await world.apply(RESEARCH)
    librarian = team["librarian"]
    await librarian.governance.wait_for_revision(1)
    await librarian.governance.close()  # it stops following policy updates, but lives on
    await world.apply(OPEN)
    await wait_until(lambda: world.revisions().get("researcher") == {2})

    def researcher_on_2(result: subprocess.CompletedProcess[str]) -> bool:
        return any(r["agent"] == "researcher" and r["policy"] == "2" for r in table(result.stdout))

    result = await run_until(researcher_on_2, "mesh-policy", "agents", env=world.env())
    rows = {r["agent"]: r for r in table(result.stdout)}
    assert (rows["librarian"]["policy"], rows["librarian"]["status"]) == (
        "1",
        "stale (current is 2)",
    ), result.stdout
    assert (rows["researcher"]["policy"], rows["researcher"]["status"]) == ("2", "ok")


# --- identities -----------------------------------------------------------------------------


@pytest.fixture
async def registry_process(
    nats_server: NatsServer, keys: Path, tmp_path: Path
) -> AsyncIterator[mesh.Mesh]:
    """The documented way: `mesh-agent run mesh_agents.registry:registry --identity
    DIR/registry --root-key DIR`. Yields an in-process admin connected to the same server."""
    forget_saved_state(keys)
    log = (tmp_path / "registry.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "mesh-agent"),
        "run",
        "mesh_agents.registry:registry",
        "--identity",
        str(keys / "registry"),
        "--root-key",
        str(keys),
        cwd=REPO,
        env=base_env(servers=nats_server.url),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=log,
    )
    root = load_trust_root(keys)
    try:
        async with mesh.Mesh(
            root.issue_identity("ops", roles=["admin"]), test_config([nats_server.url])
        ) as ops:
            await ops.wait_for("registry", timeout=20)
            yield ops
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()


async def test_join_token_enrols_a_runner_agent_exactly_once(
    registry_process: mesh.Mesh, nats_server: NatsServer, keys: Path, tmp_path: Path
) -> None:
    """`identity token worker --roles batch` lets `mesh-agent run --token` enrol and serve once;
    the same token with a new identity directory is refused."""
    ops = registry_process
    admin_env = base_env(servers=nats_server.url, identity=keys / "admin")
    made = await run(
        "mesh-policy", "identity", "token", "worker", "--roles", "batch", env=admin_env
    )
    assert made.returncode == 0, made.stderr
    found = re.search(r"^(mjt_[A-Za-z0-9_-]{20,})$", made.stdout, re.M)
    assert found, made.stdout
    token = found.group(1)
    assert "one-time join token for 'worker'" in made.stderr
    records, _ = await ops.control.read_audit()
    assert records[-1].kind == "identity.token_created" and records[-1].subject == "worker"
    assert all(token not in repr(r) for r in records)  # only its hash is kept

    agent_env = base_env(servers=nats_server.url)
    enrolled = tmp_path / "worker"
    runner = [
        "run", "tests.integration.workers:worker", "--token", token, "--root", keys / "root.pub",
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "mesh-agent"),
        *map(str, runner),
        "--identity",
        str(enrolled),
        cwd=REPO,
        env=agent_env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await ops.wait_for("worker", timeout=20)
        done = await ops.request("worker", "work", Job(key="first"), Done)
        assert done.key == "first"
        assert mode(enrolled / "identity.key") == 0o600
        ident = mesh.load_identity(enrolled)
        cert = CertificateVerifier(load_trust_root(keys).public_key).verify(ident.certificate.raw)
        assert (cert.agent, cert.roles) == ("worker", ("batch",))
        assert done.instance == cert.instance

        again = await run("mesh-agent", *runner, "--identity", tmp_path / "again", env=agent_env)
        assert again.returncode == 2, again.stderr
        assert "Unauthenticated" in again.stderr and "already used" in again.stderr
        assert not (tmp_path / "again" / "identity.key").exists()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 10)


async def enrol_worker(world: World) -> mesh.Identity:
    token = await world.token("worker", ["batch"])
    return await mesh.enrol(
        world.cfg, agent="worker", token=token, root_public_key=world.root.public_key
    )


async def test_identity_list_shows_an_enrolled_identity(world: World) -> None:
    """`identity list` shows the certificate a join token got, with roles, via and state."""
    ident = await enrol_worker(world)
    result = await run("mesh-policy", "identity", "list", env=world.env())
    assert result.returncode == 0, result.stderr
    rows = table(result.stdout)
    assert [
        (r["agent"], r["instance"], r["serial"], r["roles"], r["via"], r["state"]) for r in rows
    ] == [
        ("worker", ident.certificate.instance, ident.certificate.serial, "batch", "token", "valid")
    ]


async def test_identity_revoke_marks_the_agent_revoked(world: World) -> None:
    """`identity revoke worker` prints the serial it revoked; `identity list` shows it revoked."""
    serial = (await enrol_worker(world)).certificate.serial
    revoked = await run("mesh-policy", "identity", "revoke", "worker", env=world.env())
    assert revoked.returncode == 0, revoked.stderr
    assert f"revoked {serial}" in revoked.stdout
    listed = await run("mesh-policy", "identity", "list", env=world.env())
    assert [(r["serial"], r["state"]) for r in table(listed.stdout)] == [(serial, "revoked")]


async def test_identity_list_without_a_terminal_shows_whole_serials(world: World) -> None:
    """Piped `identity list` output carries each serial whole, ready for `revoke SERIAL`."""
    serial = (await enrol_worker(world)).certificate.serial
    env = base_env(columns=None, servers=world.url, identity=world.keys / "admin")
    result = await run("mesh-policy", "identity", "list", env=env)
    assert result.returncode == 0, result.stderr
    assert serial in result.stdout


# --- audit ----------------------------------------------------------------------------------


async def test_audit_tail_prints_the_last_records(world: World) -> None:
    """`audit tail -n 5` prints the 5 newest records, oldest first, one per line."""
    await world.apply(RESEARCH)
    await world.apply(OPEN)
    await world.rollback(1)
    await world.token("worker", [])
    await world.token("helper", [])
    records, problems = await world.ops.control.read_audit()
    assert problems == [] and len(records) > 5
    result = await run("mesh-policy", "audit", "tail", "-n", "5", env=world.env())
    assert result.returncode == 0, result.stderr
    assert audit_lines(result.stdout) == [(r.seq, r.kind) for r in records[-5:]]
    assert "policy.rollback" in result.stdout and "identity.token_created" in result.stdout


async def test_audit_tail_with_zero_lines_prints_none(world: World) -> None:
    """`audit tail -n 0` prints no record (as `tail -n 0` does)."""
    await world.apply(RESEARCH)
    result = await run("mesh-policy", "audit", "tail", "-n", "0", env=world.env())
    assert result.returncode == 0, result.stderr
    assert audit_lines(result.stdout) == []


async def test_audit_verify_says_ok_for_an_intact_log(world: World) -> None:
    """`audit verify` exits 0 and says OK with the number of records."""
    await world.apply(RESEARCH)
    records, _ = await world.ops.control.read_audit()
    result = await run("mesh-policy", "audit", "verify", env=world.env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"audit log OK: {len(records)} records" in result.stdout


async def test_audit_verify_fails_when_the_log_was_deleted_or_cut_short(world: World) -> None:
    """The whole mesh-audit stream deleted by someone with NATS access: `audit verify` does
    not say "OK: 0 records"; it exits 1 saying how many records the signed head counts."""
    await world.apply(RESEARCH)
    await world.apply(OPEN)
    records, _ = await world.ops.control.read_audit()

    def counted() -> bool:  # a head counts audit appends within about half a second
        head = world.ops.governance.head
        return head is not None and head.audit_length == len(records)

    await wait_until(counted)
    # The admin CLI has seen that head (it keeps the newest in its identity directory).
    first = await run("mesh-policy", "audit", "verify", env=world.env())
    assert first.returncode == 0, first.stdout + first.stderr
    nc = await nats.connect(world.url)
    try:
        await nc.jetstream().delete_stream("mesh-audit")
    finally:
        await nc.close()
    result = await run("mesh-policy", "audit", "verify", env=world.env())
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"counts {len(records)} records" in result.stdout or "records were deleted" in (
        result.stdout
    ), result.stdout


async def test_get_prints_the_signed_revision_when_current_holds_garbage(world: World) -> None:
    """Garbage put in the policy store's `current` key: `get` still prints the revision the
    signed head names."""
    rev = await world.apply(RESEARCH)
    nc = await nats.connect(world.url)
    try:
        kv = await nc.jetstream().key_value("mesh-policy")
        await kv.put("current", b"garbage")
    finally:
        await nc.close()
    result = await run("mesh-policy", "get", env=world.env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"revision {rev} from" in result.stdout


async def delete_audit_record(url: str, seq: int) -> None:
    """What an attacker with access to the server does: no mesh, a plain nats-py client."""
    nc = await nats.connect(url)
    try:
        assert await nc.jetstream().delete_msg("mesh-audit", seq)
    finally:
        await nc.close()


async def test_audit_verify_detects_a_deleted_record(world: World) -> None:
    """After a record is deleted from the mesh-audit stream, `audit verify` exits 1 naming it."""
    await world.apply(RESEARCH)
    await world.apply(OPEN)
    await world.rollback(1)
    records, _ = await world.ops.control.read_audit()
    assert [r.kind for r in records[1:3]] == ["policy.applied", "policy.applied"]
    await delete_audit_record(world.url, records[2].seq)
    result = await run("mesh-policy", "audit", "verify", env=world.env())
    assert result.returncode == 1, result.stdout + result.stderr
    n = records[2].seq
    assert f"FAIL records {n}..{n} are missing (removed)" in result.stdout
    assert "problem(s)" in result.stdout and "OK" not in result.stdout


async def test_audit_verify_detects_a_deleted_newest_record(world: World) -> None:
    """Deleting the newest audit record (covering one's tracks) also fails `audit verify`."""
    await world.apply(RESEARCH)
    await world.apply(OPEN)
    records, _ = await world.ops.control.read_audit()
    await delete_audit_record(world.url, records[-1].seq)
    result = await run("mesh-policy", "audit", "verify", env=world.env())
    assert result.returncode == 1, result.stdout


# --- top and graph --------------------------------------------------------------------------


async def make_traffic(world: World) -> None:
    """planner -> researcher -> librarian, in-process, until the registry has the reports."""
    await start_research_team(world)
    planner = await world.join("planner", research.planner)
    await planner.wait_for("researcher")
    for i in range(5):
        await planner.request(
            "researcher", "answer", research.Question(text=f"nats {i}"), research.Answer
        )

    async def edges() -> set[tuple[str, str]]:
        reply = await world.ops.request("registry", "signals", SignalsRequest(), SignalsReply)
        return {(e.caller, e.callee) for e in reply.edges}

    want = {("planner", "researcher"), ("researcher", "librarian")}
    for _ in range(100):
        if want <= await edges():
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"the registry has no reports of {want}")


async def test_top_shows_agents_endpoints_and_callers(world: World) -> None:
    """`top` shows each called endpoint with its callers, rates and success."""
    await make_traffic(world)
    result = await run("mesh-policy", "top", env=world.env())
    assert result.returncode == 0, result.stderr
    assert "golden signals, last 60 s (server side)" in result.stdout
    rows = table(result.stdout)
    pairs = [(r["AGENT"], r["ENDPOINT"]) for r in rows]
    assert ("researcher", "answer") in pairs and ("librarian", "lookup") in pairs
    answer = pairs.index(("researcher", "answer"))
    assert rows[answer + 1]["ENDPOINT"] == "← planner"
    assert rows[answer]["SUCCESS"] == "100 %"
    lookup = pairs.index(("librarian", "lookup"))
    assert rows[lookup + 1]["ENDPOINT"] == "← researcher"


async def test_graph_writes_every_format(world: World, tmp_path: Path) -> None:
    """`graph --format mermaid|dot|text|svg --out FILE` writes the caller -> callee edges."""
    await make_traffic(world)
    formats = ["mermaid", "dot", "text", "svg"]
    results = await asyncio.gather(
        *(
            run(
                "mesh-policy", "graph", "--format", f, "--out", tmp_path / f"g.{f}", env=world.env()
            )
            for f in formats
        )
    )
    for f, result in zip(formats, results, strict=True):
        assert result.returncode == 0, result.stderr
        assert f"wrote {tmp_path / f'g.{f}'}" in result.stdout
    text = {f: (tmp_path / f"g.{f}").read_text() for f in formats}
    assert text["mermaid"].startswith("flowchart LR\n")
    assert re.search(r"^\s+planner -->\|.*\| researcher$", text["mermaid"], re.M)
    assert re.search(r"^\s+researcher -->\|.*\| librarian$", text["mermaid"], re.M)
    assert text["dot"].startswith("digraph mesh {")
    assert '"planner" -> "researcher"' in text["dot"]
    assert '"researcher" -> "librarian"' in text["dot"]
    assert re.search(r"^planner\n└── researcher ", text["text"], re.M)
    assert re.search(r"^researcher\n└── librarian ", text["text"], re.M)
    assert "<svg" in text["svg"] and text["svg"].rstrip().endswith("</svg>")
    for name in ("planner", "researcher", "librarian"):
        assert f">{name}<" in text["svg"]


# --- authorization of the operator ----------------------------------------------------------


async def test_command_without_the_admin_role_is_refused(world: World, tmp_path: Path) -> None:
    """An identity without the admin role gets PermissionDenied and exit code 2 for `apply`."""
    issued = await run(
        "mesh-policy", "identity", "issue", "bob", "--root", world.keys, "--out", tmp_path / "bob",
        env=base_env(),
    )  # fmt: skip
    assert issued.returncode == 0, issued.stderr
    result = await run("mesh-policy", "apply", RESEARCH, env=world.env(tmp_path / "bob"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("PermissionDenied: bob lacks the admin role"), result.stderr
    assert "applied" not in result.stdout
    assert await world.current_revision() is None


# --- operator experience: revoked agents, a foreign trust root, `call` -----------------------


async def test_a_revoked_agent_drains_and_is_never_listed_serving(world: World) -> None:
    """After `identity revoke`, the serving agent drains by itself: calls to it find no
    instance, its directory record is gone, and `agents` never lists it as serving."""
    await world.apply(OPEN)
    token = await world.token("librarian", [])
    ident = await mesh.enrol(
        world.cfg, agent="librarian", token=token, root_public_key=world.root.public_key
    )
    librarian = await world.stack.enter_async_context(
        mesh.Mesh(ident, world.cfg, agent=research.librarian)
    )
    await world.ops.wait_for("librarian")
    await world.ops.request("librarian", "lookup", research.Query(topic="nats"), research.Facts)
    before = await run("mesh-policy", "agents", env=world.env())
    assert [r["state"] for r in table(before.stdout) if r["agent"] == "librarian"] == ["serving"]

    revoked = await run("mesh-policy", "identity", "revoke", "librarian", env=world.env())
    assert revoked.returncode == 0, revoked.stderr
    assert f"revoked {ident.certificate.serial}" in revoked.stdout
    started = time.monotonic()
    during = await run("mesh-policy", "agents", env=world.env())
    assert during.returncode == 0, during.stderr
    await asyncio.wait_for(librarian.wait_closed(), 5)
    assert time.monotonic() - started < 5
    with pytest.raises(mesh.Unavailable, match="no live instance"):
        await world.ops.request(
            "librarian", "lookup", research.Query(topic="nats"), research.Facts, timeout=1
        )
    nc = await nats.connect(world.url)
    try:
        kv = await nc.jetstream().key_value("mesh-directory")
        keys = await kv.keys()  # the registry's record is there
    finally:
        await nc.close()
    assert not [k for k in keys if k.startswith("librarian.")], keys
    after = await run("mesh-policy", "agents", env=world.env())
    assert after.returncode == 0, after.stderr
    for listing in (during, after):
        rows = [r for r in table(listing.stdout) if r["agent"] == "librarian"]
        assert all((r["state"], r["status"]) == ("revoked", "revoked") for r in rows), rows
    assert [r["agent"] for r in table(after.stdout)] == ["registry"]
    again = mesh.Mesh(ident, world.cfg, agent=research.librarian)
    with pytest.raises(mesh.FailedPrecondition, match=f"{ident.certificate.serial} is revoked"):
        await again.start()


async def test_mesh_agent_run_exits_when_its_certificate_is_revoked(
    world: World, tmp_path: Path
) -> None:
    """A `mesh-agent run` process whose certificate is revoked drains and exits 2."""
    token = await world.token("librarian", [])
    log = (tmp_path / "librarian.log").open("w+b")
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "mesh-agent"),
        "run",
        "examples.research:librarian",
        "--token",
        token,
        "--identity",
        str(tmp_path / "librarian"),
        "--root",
        str(world.keys / "root.pub"),
        cwd=REPO,
        env=base_env(servers=world.url),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=log,
    )
    try:
        await world.ops.wait_for("librarian", timeout=20)
        revoked = await run("mesh-policy", "identity", "revoke", "librarian", env=world.env())
        assert revoked.returncode == 0, revoked.stderr
        assert await asyncio.wait_for(proc.wait(), 10) == 2
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.seek(0)
        stderr = log.read().decode()
        log.close()
    assert "FailedPrecondition: agent librarian stopped: its certificate was revoked" in stderr
    assert "Traceback" not in stderr
    assert not [r for r in world.ops.directory.all() if r.agent == "librarian"]


async def test_an_agent_with_another_meshs_root_refuses_to_start(
    world: World, tmp_path: Path
) -> None:
    """`mesh-agent run` with another mesh's root.pub exits non-zero within seconds, saying
    the trust root is not the mesh's, without a traceback."""
    await world.apply(RESEARCH)
    foreign = TrustRoot.generate()
    save_trust_root(foreign, tmp_path / "foreign")
    mesh.save_identity(foreign.issue_identity("librarian"), tmp_path / "librarian")
    started = time.monotonic()
    result = await run(
        "mesh-agent",
        "run",
        "examples.research:librarian",
        "--identity",
        tmp_path / "librarian",
        "--root",
        tmp_path / "foreign" / "root.pub",
        env=base_env(servers=world.url),
        timeout=20,
    )
    assert time.monotonic() - started < 10
    assert result.returncode == 2, result.stderr
    assert (
        f"FailedPrecondition: this agent's trust root {foreign.key_id} is not the mesh's"
        in result.stderr
    ), result.stderr
    assert "check --root / MESH_TRUST_ROOT" in result.stderr
    assert "Traceback" not in result.stderr
    assert not [r for r in world.ops.directory.all() if r.agent == "librarian"]


async def test_call_prints_the_json_reply(world: World) -> None:
    """`call AGENT ENDPOINT JSON` as the admin prints the endpoint's reply as JSON."""
    await world.apply(OPEN)
    await start_research_team(world)
    result = await run(
        "mesh-policy",
        "call",
        "librarian",
        "lookup",
        '{"topic": "nats"}',
        "--timeout",
        "5s",
        "--idempotency-key",
        "k-1",
        env=world.env(),
    )
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["ids"] == ["doc-17", "doc-42"]
    assert len(reply["facts"]) == 2


async def test_call_of_a_streaming_endpoint_prints_one_json_line_per_chunk(world: World) -> None:
    """`call` of an endpoint that streams prints each chunk as a JSON line, in order."""
    from mesh_examples import streaming

    await world.apply(OPEN)
    await world.join("writer", streaming.writer)
    await world.ops.wait_for("writer")
    result = await run(
        "mesh-policy", "call", "writer", "draft", '{"topic": "nats", "words": 4, "pause_ms": 0}',
        env=world.env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    chunks = [json.loads(line) for line in result.stdout.splitlines()]
    assert [c["index"] for c in chunks] == [0, 1, 2, 3]
    assert chunks[0]["text"] == "nats"


async def test_call_denied_by_policy_names_the_rule_and_exits_2(world: World) -> None:
    """A call the policy denies prints `PermissionDenied: ...` with the rule and exits 2."""
    await world.apply(RESEARCH)
    await start_research_team(world)
    by_default, by_rule = await asyncio.gather(
        run("mesh-policy", "call", "librarian", "lookup", '{"topic": "nats"}', env=world.env()),
        run("mesh-policy", "call", "librarian", "delete-all", "{}", env=world.env()),
    )
    for result in (by_default, by_rule):
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stdout == ""
        assert "Traceback" not in result.stderr
    assert by_default.stderr.strip() == (
        "PermissionDenied: admin may not call librarian.lookup: DENY by default deny "
        "(policies/research.yaml, revision 1)"
    )
    assert by_rule.stderr.startswith(
        'PermissionDenied: admin may not call librarian.delete-all: DENY by rule "nobody-deletes"'
    ), by_rule.stderr


async def test_call_with_malformed_json_is_refused_before_connecting(tmp_path: Path) -> None:
    """Malformed JSON is refused at once, with no server to talk to."""
    started = time.monotonic()
    result = await run(
        "mesh-policy",
        "call",
        "librarian",
        "lookup",
        "{topic: nats",
        env=base_env(servers="nats://127.0.0.1:1", identity=world_less_admin(tmp_path)),
    )
    assert time.monotonic() - started < 5
    assert result.returncode == 2
    assert result.stderr.startswith("InvalidArgument: the body is not valid JSON"), result.stderr
