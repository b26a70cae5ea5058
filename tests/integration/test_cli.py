"""The command-line tools as a user runs them: ``mesh-policy`` and ``mesh-agent``."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import mesh
from mesh.control_plane import CertificateVerifier, TrustRoot, save_trust_root
from mesh.testing import NatsServer, test_config, wait_until

from .workers import Done, Job

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run(*args: str, cwd: Path = REPO, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_mesh_agent_version_prints_the_package_version() -> None:
    """`mesh-agent --version` prints `natsmesh <version>` (mesh.__version__) and exits 0."""
    result = run("mesh-agent", "--version")
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        f"natsmesh {mesh.__version__}\n",
        "",
    )


def test_init_writes_root_and_admin_with_private_files_0600(tmp_path: Path) -> None:
    """`mesh-policy init` writes root.key and the admin key 0600 and never prints them."""
    result = run("mesh-policy", "init", str(tmp_path / "keys"))
    assert result.returncode == 0, result.stderr
    keys = tmp_path / "keys"
    assert mode(keys / "root.key") == 0o600
    assert mode(keys / "admin" / "identity.key") == 0o600
    secret = (keys / "root.key").read_text().strip()
    assert secret not in result.stdout + result.stderr
    admin = mesh.load_identity(keys / "admin")
    assert admin.certificate.roles == ("admin",)


def test_init_refuses_to_replace_a_trust_root(tmp_path: Path) -> None:
    """A second `init` into the same directory fails and names the file."""
    assert run("mesh-policy", "init", str(tmp_path)).returncode == 0
    before = (tmp_path / "root.key").read_text()
    again = run("mesh-policy", "init", str(tmp_path))
    assert again.returncode == 2
    assert "FailedPrecondition" in again.stderr and "root.key" in again.stderr
    assert (tmp_path / "root.key").read_text() == before


def test_identity_issue_writes_a_loadable_identity(tmp_path: Path) -> None:
    """`identity issue` makes keys and a certificate with the given roles, signed by the root."""
    run("mesh-policy", "init", str(tmp_path))
    out = tmp_path / "planner"
    result = run(
        "mesh-policy",
        "identity",
        "issue",
        "planner",
        "--roles",
        "coordinator,ops",
        "--root",
        str(tmp_path),
        "--out",
        str(out),
        "--ttl",
        "2h",
    )
    assert result.returncode == 0, result.stderr
    ident = mesh.load_identity(out)
    cert = CertificateVerifier(ident.root_public_key).verify(ident.certificate.raw)
    assert (cert.agent, cert.roles) == ("planner", ("coordinator", "ops"))
    assert 7100 < cert.not_after - cert.not_before - 60 <= 7200
    assert mode(out / "identity.key") == 0o600


def test_identity_issue_without_root_key_explains(tmp_path: Path) -> None:
    """Issuing with a missing trust root exits non-zero and says which file is missing."""
    result = run(
        "mesh-policy",
        "identity",
        "issue",
        "x",
        "--root",
        str(tmp_path / "none"),
        "--out",
        str(tmp_path / "x"),
    )
    assert result.returncode == 2
    assert "InvalidArgument" in result.stderr and "not found" in result.stderr


def test_identity_issue_refuses_bad_agent_name(tmp_path: Path) -> None:
    """An agent name that is not a subject token is refused with the reason."""
    run("mesh-policy", "init", str(tmp_path))
    result = run(
        "mesh-policy",
        "identity",
        "issue",
        "Bad.Name",
        "--root",
        str(tmp_path),
        "--out",
        str(tmp_path / "x"),
    )
    assert result.returncode == 2 and "invalid agent name" in result.stderr


@pytest.fixture(scope="module")
def demo() -> subprocess.CompletedProcess[str]:
    """One run of `mesh-agent demo` (it starts its own nats-server), for the tests that read it."""
    return run("mesh-agent", "demo", timeout=120)


@pytest.mark.integration
def test_demo_runs_a_secure_conversation_and_exits_zero(
    demo: subprocess.CompletedProcess[str],
) -> None:
    """`mesh-agent demo` needs no server, shows sealed calls, signed events and refusals."""
    result = demo
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "embedded nats-server with JetStream" in out
    assert "researcher <- answer(" in out and "librarian  <- lookup(" in out
    assert "(signature verified)" in out
    assert "refused UNAUTHENTICATED (replayed message id)" in out
    assert "refused UNAUTHENTICATED (seal does not verify" in out
    assert "DeadlineExceeded" in out
    assert "registry.apply(policies/research.yaml): revision 1" in out
    assert "refused by researcher: PERMISSION_DENIED, rule 'default deny'" in out
    assert "authz.denied" in out and "verified" in out


@pytest.mark.integration
def test_demo_rolls_out_a_canary_and_ejects_a_failing_instance(
    demo: subprocess.CompletedProcess[str],
) -> None:
    """The demo's canary: 100 calls split about 90/10 between v1 and v2, then 50 all on v2,
    none failed; then a v2 instance that fails every call is ejected after 3 failures in a
    row, and the 30 calls after the ejection all succeed without reaching it."""
    assert demo.returncode == 0, demo.stdout + demo.stderr
    out = demo.stdout
    assert "registry.apply(policies/research-canary.yaml): revision 2, signed" in out
    assert "route 'researcher-canary': planner -> researcher.answer, 90 % to version 1.*, " in out
    canary = re.search(
        r"^planner    -> researcher\.answer x100 \(split 90/10\): (\d+) to v1\.2\.0, "
        r"(\d+) to v2\.0\.0; 0 failed$",
        out,
        re.MULTILINE,
    )
    assert canary is not None, out
    v1, v2 = int(canary[1]), int(canary[2])
    assert v1 + v2 == 100 and 1 <= v2 <= 30, (v1, v2)  # binomial(100, 0.1); 50/50 would be far off
    assert "registry.apply(policies/research-canary.yaml, edited to 0/100): revision 3" in out
    assert (
        "planner    -> researcher.answer x50 (split 0/100): 0 to v1.2.0, 50 to v2.0.0; 0 failed"
        in out
    )
    started = re.search(r"^outliers   a third researcher instance starts: ([0-9a-f]+),", out, re.M)
    assert started is not None, out
    ejected = re.search(
        r"^planner    ejected researcher\.([0-9a-f]+) after 3 failures in a row, for 30s "
        r"\(client\.traffic\.ejected\(\); counts \{'ejected': 1\}\)$",
        out,
        re.MULTILINE,
    )
    assert ejected is not None, out
    assert ejected[1] == started[1]
    assert out.count(": INTERNAL (handler answer failed)") == 3
    assert (
        "planner    -> researcher.answer x30 after the ejection: 30 OK, 0 failed; "
        "0 sent to the ejected instance" in out
    )


def test_run_rejects_a_target_that_is_not_an_agent() -> None:
    """`mesh-agent run` with a bad MODULE:ATTR exits 2 with a clear message."""
    result = run("mesh-agent", "run", "tests.integration.workers:Job", "--identity", "/nonexistent")
    assert result.returncode == 2
    assert "not a mesh.Agent" in result.stderr


def test_run_without_identity_explains() -> None:
    """`mesh-agent run` without an identity names the option and the variable."""
    env = {k: v for k, v in os.environ.items() if k != "MESH_IDENTITY"}
    result = subprocess.run(
        [str(BIN / "mesh-agent"), "run", "tests.integration.workers:worker"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2 and "MESH_IDENTITY" in result.stderr


async def test_run_without_a_registry_refuses_to_start(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """Fail closed: with no signed head in the mesh (no registry ever ran) an agent does not
    start, and says how to start the registry or allow a development mesh without one."""
    root = TrustRoot.generate()
    save_trust_root(root, tmp_path / "root")
    mesh.save_identity(root.issue_identity("worker"), tmp_path / "worker")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MESH_")},
        "MESH_SERVERS": nats_server.url,
        "MESH_IDENTITY": str(tmp_path / "worker"),
        "MESH_TRUST_ROOT": str(tmp_path / "root" / "root.pub"),
    }
    result = await asyncio.to_thread(
        subprocess.run,
        [str(BIN / "mesh-agent"), "run", "tests.integration.workers:worker"],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "no signed head" in result.stderr and "MESH_ALLOW_NO_POLICY" in result.stderr
    assert "Traceback" not in result.stderr


async def test_run_serves_then_drains_on_sigterm(nats_server: NatsServer, tmp_path: Path) -> None:
    """A runner-started agent serves calls, and on SIGTERM deregisters and exits 0."""
    root = TrustRoot.generate()
    save_trust_root(root, tmp_path / "root")
    mesh.save_identity(root.issue_identity("worker"), tmp_path / "worker")
    env = {
        **os.environ,
        "MESH_SERVERS": nats_server.url,
        "MESH_IDENTITY": str(tmp_path / "worker"),
        "MESH_TRUST_ROOT": str(tmp_path / "root" / "root.pub"),
        "MESH_ALLOW_NO_POLICY": "1",  # no registry in this mesh
    }
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "mesh-agent"),
        "run",
        "tests.integration.workers:worker",
        "--log-format",
        "json",
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        cfg = test_config([nats_server.url])
        async with mesh.Mesh(root.issue_identity("alice"), cfg) as alice:
            await alice.wait_for("worker", timeout=20)
            done = await alice.request("worker", "work", Job(key="a"), Done)
            assert done.key == "a"
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 20) == 0
            await wait_until(lambda: not alice.directory.instances("worker"))
        assert proc.stderr is not None
        log = (await proc.stderr.read()).decode()
        assert '"event": "agent.ready"' in log and '"event": "agent.stopped"' in log
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
