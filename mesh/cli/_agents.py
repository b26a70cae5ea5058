"""The live instances as ``mesh-policy agents`` and the dashboard show them: each one's
status against the newest signed head (``ok``, ``revoked``, ``refused``, ``stale``), and the
callers that have ejected it (outlier detection, from their latest signals reports)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from mesh import Certificate, Mesh, MeshError
from mesh._core.records import InstanceRecord
from mesh.control_plane import REGISTRY, SignalsReply, SignalsRequest

from ._output import iso


def expiry_note(cert: Certificate, now: float | None = None) -> str:
    """``EXPIRED``, ``expires in N min`` within 10 % of its life or an hour, else ``""``."""
    left = cert.not_after - (now or time.time())
    if left <= 0:
        return "EXPIRED"
    life = cert.not_after - cert.not_before
    if left < max(life * 0.1, 0) or left < 3600:
        return f"expires in {left / 60:.0f} min"
    return ""


def agent_status(
    rec: InstanceRecord, revoked: set[str], latest: int | None
) -> tuple[str, str | None]:
    """``(status, detail)``: ``ok``, ``revoked``, ``refused`` (the agent's reason), or
    ``stale`` (why, or which revision is current)."""
    if rec.certificate.serial in revoked:
        return "revoked", None
    if rec.policy_error:
        return "refused", rec.policy_error
    if rec.stale:
        return "stale", rec.stale
    if latest is not None and rec.policy_revision != latest:
        return "stale", f"current is {latest}"
    return "ok", None


@dataclass(frozen=True)
class AgentRow:
    """One instance: its record, status and detail."""

    record: InstanceRecord
    status: str
    detail: str | None
    ejected_by: tuple[str, ...] = ()
    """The callers (``agent.instance``) whose latest report lists this instance as ejected."""

    def document(self) -> dict[str, Any]:
        """``agents -o json``'s row: ``agent``, ``instance``, ``version``, ``state``,
        ``serial``, ``certificate_expires``, ``policy_revision``, ``status``, ``detail``,
        ``ejected_by``."""
        rec = self.record
        return {
            "agent": rec.agent,
            "instance": rec.instance,
            "version": rec.version,
            "state": "revoked" if self.status == "revoked" else rec.state,
            "serial": rec.certificate.serial,
            "certificate_expires": iso(rec.certificate.not_after),
            "policy_revision": rec.policy_revision,
            "status": self.status,
            "detail": self.detail,
            "ejected_by": list(self.ejected_by),
        }


async def list_agents(mesh: Mesh) -> list[AgentRow]:
    """Every listed instance, by agent and instance, judged against the newest signed head
    and the revocations (the store's and the head's)."""
    head = mesh.governance.head  # the newest signed head: the current revision
    revoked = {r.serial for r in await mesh.control.revocations()}
    revoked |= head.revoked_serials if head is not None else set()
    latest = head.policy_revision if head is not None else None
    records = sorted(mesh.directory.all(), key=lambda r: (r.agent, r.instance))
    ejected = await ejections(mesh)
    return [
        AgentRow(rec, *agent_status(rec, revoked, latest), ejected.get(rec.key, ()))
        for rec in records
    ]


async def ejections(mesh: Mesh) -> dict[str, tuple[str, ...]]:
    """Each ejected instance (``agent.instance``) and the callers that ejected it, from the
    registry's signals; empty when no registry answers (the list is a hint, not a state)."""
    if not mesh.directory.instances(REGISTRY):
        return {}
    try:
        reply = await mesh.request(
            REGISTRY, "signals", SignalsRequest(reporter="client", by_caller=False), SignalsReply,
            timeout=5,
        )  # fmt: skip
    except MeshError:
        return {}
    found: dict[str, list[str]] = {}
    for row in reply.traffic:
        if row.kind == "ejection":
            found.setdefault(row.target, []).append(row.caller)
    return {key: tuple(sorted(callers)) for key, callers in found.items()}
