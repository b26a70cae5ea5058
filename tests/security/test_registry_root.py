"""The registry refuses to start with a root key that is not its mesh's.

A registry holding another root's private key would sign audit records and certificates that
nobody in the mesh can verify (``audit verify`` fails for ever after). It is started the
documented way, ``mesh-agent run mesh_agents.registry:registry --identity DIR/registry
--root-key DIR``, and must exit non-zero at once with a clear message, no traceback, and no
audit record written: when the root key did not issue its certificate, and when the mesh's
state in the store (the current policy, the audit log) is another root's (another mesh under
the same prefix on this NATS).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest

import mesh
from mesh.control_plane import (
    PolicyRevision,
    TrustRoot,
    canonical_policy_bytes,
    load_trust_root,
    save_trust_root,
)
from mesh.testing import NatsServer, test_config
from mesh_agents import registry as reg

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
OPEN_POLICY = REPO / "policies" / "open.yaml"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`mesh-policy init DIR`: this mesh's root.key, root.pub, admin/ and registry/."""
    d = tmp_path_factory.mktemp("keys")
    result = subprocess.run(
        [str(BIN / "mesh-policy"), "init", str(d)],
        env=env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return d


def env(**mesh_vars: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    out.update({f"MESH_{k.upper()}": v for k, v in mesh_vars.items()})
    return out


async def run_registry(url: str, identity: Path, root_key: Path) -> tuple[int, str, float]:
    """Run the registry the documented way; ``(exit code, stderr, seconds it took)``."""
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "mesh-agent"), "run", "mesh_agents.registry:registry",
        "--identity", str(identity), "--root-key", str(root_key),
        cwd=REPO, env=env(servers=url),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail("the registry did not exit: it started with the wrong root")
    assert proc.returncode is not None
    return proc.returncode, err.decode(), time.monotonic() - start


async def audit_records(url: str) -> int:
    """How many records the audit stream ``mesh-audit`` holds (0 if it does not exist)."""
    nc = await nats.connect(url)
    try:
        try:
            info = await nc.jetstream().stream_info("mesh-audit")
        except nats.js.errors.NotFoundError:
            return 0
        return info.state.messages
    finally:
        await nc.close()


def assert_refused(code: int, err: str, seconds: float, message: str) -> None:
    assert code != 0, err
    assert message in err, err
    assert "Traceback" not in err, err
    assert seconds < 20, f"took {seconds:.1f}s to refuse"


async def test_registry_with_another_roots_key_refuses_to_start(
    nats_server: NatsServer, keys: Path, tmp_path: Path
) -> None:
    other = save_trust_root(TrustRoot.generate(), tmp_path / "other")
    code, err, seconds = await run_registry(nats_server.url, keys / "registry", other)
    assert_refused(code, err, seconds, "is not the root of this registry's certificate")
    assert "--root-key" in err
    assert await audit_records(nats_server.url) == 0


async def test_registry_refuses_another_meshs_audit_log_under_its_prefix(
    nats_server: NatsServer, keys: Path
) -> None:
    # Another mesh's registry ran on this NATS under the same prefix and left its audit log.
    other = TrustRoot.generate()
    cfg = test_config([nats_server.url])
    identity = other.issue_identity("registry", roles=["registry"])
    async with mesh.Mesh(identity, cfg, agent=reg.registry, trust_root=other):
        pass
    before = await audit_records(nats_server.url)
    assert before >= 1

    code, err, seconds = await run_registry(nats_server.url, keys / "registry", keys)
    assert_refused(code, err, seconds, "the last audit record does not verify")
    assert "--prefix" in err
    assert await audit_records(nats_server.url) == before  # it signed nothing


async def test_registry_refuses_another_meshs_policy_under_its_prefix(
    nats_server: NatsServer, keys: Path
) -> None:
    # Another mesh's current policy, signed by its own root, sits in the policy bucket.
    other = TrustRoot.generate()
    cfg = test_config([nats_server.url])
    policy = mesh.parse_policy(OPEN_POLICY.read_text(), str(OPEN_POLICY))
    async with mesh.Mesh(other.issue_identity("ops"), cfg, trust_root=other) as ops:
        rev = PolicyRevision(1, canonical_policy_bytes(policy), "open.yaml", "ops", time.time())
        await ops.control.write_policy(rev, None)

    code, err, seconds = await run_registry(nats_server.url, keys / "registry", keys)
    assert_refused(code, err, seconds, "policy")
    assert load_trust_root(keys).key_id in err
    assert await audit_records(nats_server.url) == 0
