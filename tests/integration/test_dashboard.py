"""``mesh-policy dashboard`` end to end: a real nats-server, the registry and agents in-process,
the dashboard served on a free port, and the page driven in headless Chromium (Debian's
``chromium``, through Playwright; those tests skip, saying why, where either is missing).

``MESH_DASHBOARD_SCREENSHOT=docs/images/dashboard.png`` makes the page test save a screenshot
of what it checked (how the one in ``docs/observability.md`` was made).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import BaseModel

import mesh
from mesh.cli.dashboard import cmd_dashboard, serve_dashboard
from mesh.control_plane import ApplyReply, ApplyRequest, PolicyEngine, TrustRoot
from mesh.testing import NatsServer, test_config, wait_until, watching_all
from mesh_agents import registry as reg

CHROMIUM = shutil.which("chromium")
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")

POLICY = """
apiVersion: mesh/v1
kind: Policy
metadata: {name: dashboard}
spec:
  defaults: {authorization: deny}
  rules:
    - name: front-may-look-up
      allow: {callers: [front], agent: back, endpoints: [lookup]}
"""


class Query(BaseModel):
    text: str


def back_agent() -> mesh.Agent:
    back = mesh.Agent("back", version="2.1.0")

    @back.endpoint(idempotent=True)
    async def lookup(q: Query) -> Query:
        return Query(text=q.text.upper())

    return back


def front_agent() -> mesh.Agent:
    front = mesh.Agent("front", version="1.0.0")

    @front.endpoint()
    async def ask(q: Query, ctx: mesh.Context) -> Query:
        return await ctx.request("back", "lookup", q, Query)

    return front


@dataclass
class Scene:
    """A registry, two agents (``front`` calls ``back``), an admin connection and the
    dashboard serving it."""

    server: NatsServer
    root: TrustRoot
    cfg: mesh.MeshConfig
    stack: AsyncExitStack
    admin: mesh.Mesh
    registry: mesh.Mesh
    url: str = ""

    async def start_registry(self) -> mesh.Mesh:
        ident = self.root.issue_identity("registry", roles=["registry"])
        self.registry = mesh.Mesh(ident, self.cfg, agent=reg.registry, trust_root=self.root)
        await self.registry.start()
        return self.registry

    async def join(self, name: str, agent: mesh.Agent | None = None) -> mesh.Mesh:
        ident = self.root.issue_identity(name)
        return await self.stack.enter_async_context(mesh.Mesh(ident, self.cfg, agent=agent))

    async def apply(self, text: str, source: str = "dashboard.yaml") -> int:
        """Apply a policy and wait until every agent instance acknowledged it."""
        await self.admin.wait_for("registry")
        reply = await self.admin.request(
            "registry", "apply", ApplyRequest(policy=text, source=source), ApplyReply
        )
        await wait_until(
            lambda: all(
                r.policy_revision == reply.revision
                for r in self.admin.directory.all()
                if r.agent in ("front", "back")
            ),
            timeout=10,
        )
        return reply.revision


@pytest.fixture
async def scene(nats_server: NatsServer) -> AsyncIterator[Scene]:
    root = TrustRoot.generate()
    cfg = test_config([nats_server.url], signals_interval=0.2, retry=mesh.RetryPolicy(attempts=1))
    async with AsyncExitStack() as stack:
        admin_cfg = watching_all(test_config([nats_server.url], signals_interval=0))  # as the CLI's
        admin = await stack.enter_async_context(
            mesh.Mesh(root.issue_identity("admin", roles=["admin"]), admin_cfg)
        )
        s = Scene(nats_server, root, cfg, stack, admin, None)  # type: ignore[arg-type]
        await s.start_registry()
        stack.push_async_callback(lambda: s.registry.drain())
        urls: asyncio.Queue[str] = asyncio.Queue()
        dashboard = asyncio.create_task(
            serve_dashboard(admin, "127.0.0.1", 0, interval=0.25, started=urls.put_nowait)
        )
        try:
            s.url = await asyncio.wait_for(urls.get(), 10)
            yield s
        finally:
            dashboard.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dashboard


async def traffic(scene: Scene) -> int:
    """Apply the policy; ``front`` looks up three times, ``mallory`` (a client, not an agent,
    which ignores its own policy) is denied by ``back`` once. Returns the revision."""
    await scene.join("back", back_agent())
    front = await scene.join("front", front_agent())
    mallory = await scene.join("mallory")
    revision = await scene.apply(POLICY)
    await front.wait_for("back")
    for word in ("a", "b", "c"):
        assert (await front.request("back", "lookup", Query(text=word), Query)).text
    mallory.governance.engine = PolicyEngine(None)  # a client that does not check its policy
    with pytest.raises(mesh.PermissionDenied):
        await mallory.request("back", "lookup", Query(text="x"), Query)
    return revision


def get(url: str, path: str, host: str | None = None) -> tuple[int, str]:
    """``GET path`` (with another ``Host`` header if given): status and body."""
    addr = url.removeprefix("http://").rstrip("/")
    conn = http.client.HTTPConnection(addr, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host} if host else {})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


async def state_until(scene: Scene, check: Any, timeout: float = 15) -> dict[str, Any]:
    """``/api/state`` fetched again until ``check(state)`` holds; the last state."""
    end = asyncio.get_running_loop().time() + timeout
    while True:
        status, body = await asyncio.to_thread(get, scene.url, "/api/state")
        assert status == 200, body
        state: dict[str, Any] = json.loads(body)
        if check(state) or asyncio.get_running_loop().time() > end:
            return state
        await asyncio.sleep(0.1)


def first_event(url: str) -> dict[str, Any]:
    """The first snapshot ``/api/events`` sends."""
    addr = url.removeprefix("http://").rstrip("/")
    conn = http.client.HTTPConnection(addr, timeout=10)
    try:
        conn.request("GET", "/api/events")
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type", "").startswith("text/event-stream")
        while True:
            line = response.fp.readline().decode()
            if line.startswith("data: "):
                doc: dict[str, Any] = json.loads(line[len("data: ") :])
                return doc
    finally:
        conn.close()


# --- without a browser ------------------------------------------------------------------------


def row(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (match, rows)
    return found[0]


async def test_api_state_is_a_json_snapshot_of_signals_agents_denials_and_audit(
    scene: Scene,
) -> None:
    """``/api/state`` holds the documented structure, with ISO times and real content."""
    revision = await traffic(scene)

    def complete(s: dict[str, Any]) -> bool:
        signals = s.get("signals") or []
        return any(r["caller"] == "front" and r["requests"] == 3 for r in signals) and bool(
            s.get("denials")
        )

    state = await state_until(scene, complete)
    assert set(state) == {
        "at", "error", "policy", "window_s", "graph", "signals", "agents", "denials", "audit",
        "audit_problems",
    }  # fmt: skip
    assert state["error"] is None and ISO.match(state["at"])
    assert state["policy"]["revision"] == revision
    assert state["policy"]["source"] == "dashboard.yaml" and state["policy"]["stale"] is None
    front_row = row(state["signals"], callee="back", endpoint="lookup", caller="front")
    assert front_row["errors"] == 0 and front_row["success_rate"] == 1.0
    mallory_row = row(state["signals"], callee="back", endpoint="lookup", caller="mallory")
    assert mallory_row["requests"] == 1 and mallory_row["errors"] == 1
    assert row(state["signals"], callee="back", endpoint="lookup", caller="*")["requests"] == 4
    edges = {(e["caller"], e["callee"]): e for e in state["graph"]["edges"]}
    assert edges[("front", "back")]["requests"] == 3
    assert "<svg" in state["graph"]["svg"] and {"front", "back"} <= set(state["graph"]["nodes"])
    back = row(state["agents"], agent="back")
    assert back["policy_revision"] == revision and back["status"] == "ok"
    assert back["version"] == "2.1.0" and back["detail"] is None
    assert ISO.match(back["certificate_expires"]) and ISO.match(back["last_seen"])
    assert back["age_s"] < 10
    (denial,) = state["denials"]
    assert denial["caller"] == "mallory" and denial["callee"] == "back"
    assert denial["endpoint"] == "lookup" and denial["rule"] == "default deny"
    assert denial["revision"] == revision and ISO.match(denial["ts"])
    applied = row(state["audit"], kind="policy.applied")
    assert applied["subject"] == f"revision {revision}" and ISO.match(applied["ts"])
    assert state["audit"][0]["seq"] > state["audit"][-1]["seq"]  # newest first
    assert state["audit_problems"] == []
    event = await asyncio.to_thread(first_event, scene.url)
    assert set(event) == set(state) and event["policy"]["revision"] == revision


async def test_only_a_loopback_host_name_is_served(scene: Scene) -> None:
    """Bound to 127.0.0.1, a request naming another host (DNS rebinding) is refused."""
    status, _ = await asyncio.to_thread(get, scene.url, "/api/state", "evil.example:8470")
    assert status == 400
    status, page = await asyncio.to_thread(get, scene.url, "/", "localhost:8470")
    assert status == 200 and "natsmesh dashboard" in page and "EventSource" in page


async def test_without_starlette_the_command_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Missing web dependencies: a one-line FailedPrecondition naming the extra, before
    connecting anywhere."""
    monkeypatch.setitem(sys.modules, "starlette", None)
    args = SimpleNamespace(
        servers="nats://127.0.0.1:1",
        identity="/nonexistent",
        prefix="mesh",
        replicas=None,
        listen="127.0.0.1:0",
        interval=2.0,
    )
    with pytest.raises(mesh.FailedPrecondition) as failed:
        await cmd_dashboard(args)
    assert "pip install 'natsmesh[web]'" in failed.value.message
    assert "\n" not in failed.value.message


async def test_the_command_serves_until_ctrl_c(scene: Scene, tmp_path: Path) -> None:
    """`mesh-policy dashboard --listen 127.0.0.1:0` as a user runs it: it prints its URL,
    serves the registry's view of the mesh (the applied revision), and Ctrl-C exits 0 with no
    traceback."""
    revision = await scene.apply(POLICY)
    mesh.save_identity(scene.root.issue_identity("admin", roles=["admin"]), tmp_path / "admin")
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "mesh-policy"),
        "dashboard",
        "--listen",
        "127.0.0.1:0",
        "--interval",
        "500ms",
        "--servers",
        scene.server.url,
        "--identity",
        str(tmp_path / "admin"),
        "--prefix",
        scene.cfg.prefix,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        found = re.match(r"dashboard: (http://127\.0\.0\.1:\d+/) \(Ctrl-C to stop\)$", line)
        assert found, line
        cli = Scene(scene.server, scene.root, scene.cfg, scene.stack, scene.admin, scene.registry)
        cli.url = found.group(1)
        state = await state_until(cli, lambda s: (s["policy"] or {}).get("revision") == revision)
        assert state["policy"]["revision"] == revision and state["error"] is None, state
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err, err.decode()


# --- in the browser ---------------------------------------------------------------------------


@pytest.fixture
async def page(scene: Scene) -> AsyncIterator[Any]:
    """The dashboard open in headless Chromium."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    try:
        from playwright.async_api import async_playwright, expect
    except ImportError:
        pytest.skip("playwright is not installed (pip install 'natsmesh[dev]')")
    expect.set_options(timeout=10_000)  # the machine may be busy: the test's own limit is 60 s
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        try:
            tab = await browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            tab.on("pageerror", lambda exc: errors.append(str(exc)))
            yield tab
            assert errors == [], errors
        finally:
            await browser.close()


async def test_the_page_shows_the_mesh_and_follows_a_new_policy_without_reload(
    scene: Scene, page: Any
) -> None:
    """The graph, the signals, the agents with their revision, the denial and the apply
    record are on the page; a new policy shows up in place, through the event stream."""
    from playwright.async_api import expect

    revision = await traffic(scene)
    await page.goto(scene.url)
    await page.evaluate("window.notReloaded = true")

    await expect(page.get_by_test_id("live")).to_have_text("live")
    edges = page.locator("#graph svg path.edge title")
    await expect(edges.filter(has_text=re.compile(r"^front → back: "))).to_have_count(1)
    await expect(edges.filter(has_text=re.compile(r"^mallory → back: .*0\.0 %"))).to_have_count(1)
    await expect(page.locator("#graph svg g.node text")).to_contain_text(["back", "front"])
    front_row = page.locator('#signals tr[data-callee="back"][data-caller="front"]')
    await expect(front_row.get_by_test_id("requests")).to_have_text("3", timeout=15_000)
    await expect(front_row).to_contain_text("100 %")
    total = page.locator('#signals tr.total[data-callee="back"][data-endpoint="lookup"]')
    await expect(total.get_by_test_id("requests")).to_have_text("4")
    for agent in ("front", "back"):
        agent_row = page.locator(f'#agents tr[data-agent="{agent}"]')
        await expect(agent_row.get_by_test_id("agent-revision")).to_have_text(str(revision))
        await expect(agent_row.get_by_test_id("agent-status")).to_have_text("ok")
    await expect(page.get_by_test_id("policy-revision")).to_have_text(str(revision))
    denial = page.locator("#denials tbody tr").first
    await expect(denial).to_contain_text("mallory", timeout=10_000)
    await expect(denial).to_contain_text("back.lookup")
    await expect(denial).to_contain_text("default deny")
    applied = page.locator('#audit tr[data-kind="policy.applied"]')
    await expect(applied).to_contain_text(f"revision {revision}")
    await expect(page.get_by_test_id("error-banner")).to_be_hidden()
    shot = os.environ.get("MESH_DASHBOARD_SCREENSHOT")
    if shot:
        Path(shot).parent.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=shot, full_page=True)

    newer = await scene.apply(POLICY.replace("name: dashboard", "name: dashboard-2"), "v2.yaml")
    assert newer == revision + 1
    await expect(page.get_by_test_id("policy-revision")).to_have_text(str(newer))
    back_row = page.locator('#agents tr[data-agent="back"]')
    await expect(back_row.get_by_test_id("agent-revision")).to_have_text(str(newer))
    await expect(page.locator('#audit tr[data-kind="policy.applied"]').first).to_contain_text(
        f"revision {newer}"
    )
    assert await page.evaluate("window.notReloaded") is True


async def test_a_registry_that_is_down_shows_a_banner_until_it_returns(
    scene: Scene, page: Any
) -> None:
    """With the registry gone the page says so in a banner and keeps the agents; the banner
    goes once the registry is back."""
    from playwright.async_api import expect

    await scene.join("back", back_agent())
    await page.goto(scene.url)
    banner = page.get_by_test_id("error-banner")
    await expect(page.locator('#agents tr[data-agent="back"]')).to_be_visible()
    await expect(banner).to_be_hidden()

    await scene.registry.drain()
    await expect(banner).to_be_visible(timeout=10_000)
    await expect(banner).to_contain_text("registry")
    await expect(page.locator("#signals tbody")).to_contain_text("unavailable")
    await expect(page.locator('#agents tr[data-agent="back"]')).to_be_visible()

    await scene.start_registry()
    await expect(banner).to_be_hidden(timeout=15_000)
    await expect(page.locator("#graph")).not_to_contain_text("unavailable")
