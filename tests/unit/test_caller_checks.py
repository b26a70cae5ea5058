"""The caller's own authorization check of a call that carries a delegation chain: it decides
on what the callee will see of the chain (so an allow rule on origins or scopes is not refused
in the caller), refuses only what a direct call would be refused too (a denial only the chain
brings about is left to the callee, which audits it), and is off with ``caller_checks``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import mesh
from mesh._core.delegation import Delegation
from mesh._core.policy import PolicyEngine
from mesh._runtime.client import seen_chain
from mesh._runtime.governance import Governance
from mesh.testing import Trust

POLICY = """
apiVersion: mesh/v1
kind: Policy
metadata: {name: caller-checks}
spec:
  defaults: {authorization: deny}
  rules:
    - name: no-guests
      deny: {callers: ["*"], agent: vault, origins: ["guest:*"]}
    - name: users-with-read
      allow: {callers: [gateway], agent: vault, origins: ["user:*"], scopes: [read]}
    - name: gateway-may-ping
      allow: {callers: [gateway], agent: vault, endpoints: [ping]}
"""


def chain(origin: str, path: tuple[str, ...], scopes: tuple[str, ...] = ()) -> Delegation:
    return Delegation(b"c" * 16, origin, path, len(path), ("*.*",), scopes, 3, 0, None, None, ())


def test_a_direct_call_has_no_chain() -> None:
    assert seen_chain("gateway", None, None, False) is None


def test_a_chain_started_here_is_seen_with_its_origin_and_scopes() -> None:
    d = mesh.Delegate(origin="user:alice", scopes=("read",))
    assert seen_chain("gateway", None, d, False) == ("user:alice", ("gateway",), 1, ("read",))
    assert seen_chain("planner", None, None, True) == ("planner", ("planner",), 1, ())
    assert seen_chain("planner", None, mesh.Delegate(depth=2), False) == (
        "planner", ("planner",), 1, (),
    )  # fmt: skip


def test_a_chain_carried_on_adds_this_caller_and_keeps_or_narrows_the_scopes() -> None:
    got = chain("user:alice", ("gateway",), ("read", "write"))
    assert seen_chain("researcher", got, None, False) == (
        "user:alice", ("gateway", "researcher"), 2, ("read", "write"),
    )  # fmt: skip
    narrowed = seen_chain("researcher", got, mesh.Delegate(scopes=("read",)), False)
    assert narrowed is not None and narrowed[3] == ("read",)


def governance(*, caller_checks: bool = True) -> Governance:
    cert = Trust().identity("gateway", roles=["gateway"]).certificate
    handle = SimpleNamespace(
        config=mesh.MeshConfig(caller_checks=caller_checks),
        identity=SimpleNamespace(certificate=cert),
    )
    g = Governance(handle, policy_changed=lambda: None, replace_certificate=None)  # type: ignore[arg-type]
    g.engine = PolicyEngine(mesh.parse_policy(POLICY), revision=1)
    return g


def test_an_allow_rule_on_the_origin_and_scopes_is_not_refused_in_the_caller() -> None:
    g = governance()
    alice = ("user:alice", ("gateway",), 1, ("read",))
    assert g.outgoing("vault", "read", alice).decision.rule == "users-with-read"
    with pytest.raises(mesh.PermissionDenied) as info:
        g.outgoing("vault", "read")  # the same call made directly
    assert info.value.rule == "default deny"


def test_a_denial_only_the_chain_brings_about_is_left_to_the_callee() -> None:
    """A guest's ping: a direct ping is allowed, the guest's is denied by the callee, which
    reports it; the caller does not refuse it (no report would be made)."""
    g = governance()
    route = g.outgoing("vault", "ping", ("guest:eve", ("gateway",), 1, ()))
    assert not route.decision.allowed and route.decision.rule == "no-guests"


def test_a_call_refused_either_way_is_refused_in_the_caller_naming_the_chain() -> None:
    g = governance()
    with pytest.raises(mesh.PermissionDenied) as info:
        g.outgoing("vault", "read", ("user:bob", ("gateway",), 1, ()))
    assert info.value.rule == "default deny"
    assert "gateway may not call vault.read for user:bob via gateway (depth 1)" in str(info.value)


def test_without_caller_checks_the_callee_alone_decides() -> None:
    g = governance(caller_checks=False)
    assert not g.outgoing("vault", "read").decision.allowed
    assert not g.outgoing("vault", "read", ("user:bob", ("gateway",), 1, ())).decision.allowed
