"""``mesh-agent run`` in a developer's inner loop: file targets, the user's own tracebacks,
``--reload``, Ctrl-C in every phase, and clean failures to reach NATS; and the demo's cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydantic import BaseModel

import mesh
from mesh.testing import NatsServer, Trust, test_config, wait_until

from .cli_helpers import BIN, base_env, run, run_sync

AGENT_SOURCE = """
from pydantic import BaseModel

from mesh import Agent, Context

from .helpers import VERSION


class Ping(BaseModel):
    text: str


agent = Agent("pinger", version=VERSION)


@agent.endpoint()
async def ping(p: Ping, ctx: Context) -> Ping:
    return Ping(text=p.text)
"""


class Ping(BaseModel):
    text: str


class Runner:
    """A ``mesh-agent`` process whose stderr is collected line by line as it runs."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, *args: str | Path, env: dict[str, str], cwd: Path) -> Runner:
        if args[0] == "run":
            args = (*args, "--log-format", "json")
        proc = await asyncio.create_subprocess_exec(
            str(BIN / "mesh-agent"), *map(str, args),
            cwd=cwd, env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            self.lines.append(line.decode())

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def count(self, needle: str) -> int:
        return sum(needle in line for line in self.lines)

    async def wait_for(self, needle: str, times: int = 1, timeout: float = 20) -> None:
        try:
            await wait_until(lambda: self.count(needle) >= times, timeout)
        except TimeoutError:
            pytest.fail(f"{needle!r} x{times} not logged in {timeout}s:\n{self.text}")

    async def interrupt(self, sig: int = signal.SIGINT, timeout: float = 20) -> tuple[int, float]:
        """Send ``sig``; the exit code and how long the process took to exit."""
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await self._reader
        return code, time.monotonic() - t0

    async def close(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self._reader.cancel()


@pytest.fixture
def project(tmp_path: Path, trust: Trust) -> Path:
    """A user's project: a package ``app`` whose ``agent.py`` imports a sibling module, an
    identity for the agent and the trust root's public key."""
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "__init__.py").write_text("")
    (tmp_path / "app" / "helpers.py").write_text('VERSION = "1.0.0"\n')
    (tmp_path / "app" / "agent.py").write_text(AGENT_SOURCE)
    mesh.save_identity(trust.identity("pinger"), tmp_path / "id")
    return tmp_path


def runner_env(project: Path, servers: str, **mesh_settings: str) -> dict[str, str]:
    return base_env(
        servers=servers,
        identity=project / "id",
        allow_no_policy="1",  # no registry in these meshes
        **mesh_settings,
    )


@contextlib.asynccontextmanager
async def running(*args: str | Path, env: dict[str, str], cwd: Path) -> AsyncIterator[Runner]:
    runner = await Runner.start(*args, env=env, cwd=cwd)
    try:
        yield runner
    finally:
        await runner.close()


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A TCP port that accepts connections and never says a word (no NATS INFO)."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- targets ---------------------------------------------------------------------------------


async def test_run_serves_an_agent_given_by_its_file_and_drains_on_ctrl_c(
    nats_server: NatsServer, project: Path, trust: Trust
) -> None:
    """`mesh-agent run app/agent.py:agent` imports the file as part of its package (relative
    imports work), serves it, and on SIGINT drains and exits 0."""
    env = runner_env(project, nats_server.url)
    async with (
        running("run", "app/agent.py:agent", env=env, cwd=project) as runner,
        mesh.Mesh(trust.identity("alice"), test_config([nats_server.url])) as alice,
    ):
        await alice.wait_for("pinger", timeout=20)
        assert (await alice.request("pinger", "ping", Ping(text="hi"), Ping)).text == "hi"
        code, _ = await runner.interrupt()
    assert code == 0, runner.text
    assert '"agent.stopped"' in runner.text and "Traceback" not in runner.text


async def test_the_examples_module_path_works_from_any_directory(tmp_path: Path) -> None:
    """`examples.research` names the installed `mesh_examples.research` outside a clone."""
    result = await run(
        "mesh-agent", "run", "examples.research:nobody", "--identity", tmp_path,
        env=base_env(), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert "has no 'nobody' (its agents: librarian, planner, researcher)" in result.stderr


@pytest.mark.parametrize(
    ("source", "last_line"),
    [
        ("import json\n\n\ndef setup():\n    raise RuntimeError('no config')\n\n\nsetup()\n",
         "RuntimeError: no config"),
        ("import a_dependency_that_is_not_installed\n",
         "ModuleNotFoundError: No module named 'a_dependency_that_is_not_installed'"),
        ("agent = (\n", "SyntaxError: '(' was never closed"),
    ],
    ids=["raises", "missing-dependency", "syntax-error"],
)  # fmt: skip
async def test_a_module_that_fails_to_import_shows_only_its_own_traceback(
    tmp_path: Path, source: str, last_line: str
) -> None:
    """The user's frames and error, then one line from the runner; exit 2, no mesh frames."""
    (tmp_path / "broken.py").write_text(source)
    result = await run(
        "mesh-agent", "run", "broken.py:agent", "--identity", tmp_path,
        env=base_env(), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert f'File "{tmp_path / "broken.py"}"' in result.stderr
    assert last_line in result.stderr
    assert "importlib" not in result.stderr and "/mesh/" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("InvalidArgument: cannot import broken.py")


# --- Ctrl-C in every phase, and NATS that cannot be reached ----------------------------------


async def test_ctrl_c_while_the_module_imports_exits_130_without_a_traceback(
    tmp_path: Path,
) -> None:
    """A module busy at import time (loading a model, say) is interrupted at once."""
    started = tmp_path / "importing"
    (tmp_path / "slow.py").write_text(
        f"import pathlib, time\npathlib.Path({str(started)!r}).touch()\ntime.sleep(60)\n"
    )
    async with running(
        "run", "slow.py:agent", "--identity", tmp_path, env=base_env(), cwd=tmp_path
    ) as runner:
        await wait_until(started.exists, 20)
        code, took = await runner.interrupt()
    assert code == 130 and took < 5
    assert "Traceback" not in runner.text


@pytest.mark.parametrize("tool", ["mesh-agent", "mesh-policy"])
async def test_ctrl_c_while_the_tools_themselves_import_exits_130_without_a_traceback(
    tool: str, tmp_path: Path
) -> None:
    """Ctrl-C during the first ~0.6 s, while the tool imports the SDK (nats-py, OpenTelemetry,
    pydantic), exits 130 at once: the console script imports it inside a guard
    (``mesh.cli.run``). Before 0.1 s the interpreter itself is still starting (its own
    ``site`` import): that window is Python's, not the tool's."""
    # What comes after the import waits too (a user module that sleeps, a server that never
    # answers), so a fast machine past its import by 0.45 s is interrupted there instead.
    (tmp_path / "slow.py").write_text("import time\ntime.sleep(60)\n")
    async with silent_server() as port:
        args = {
            "mesh-agent": ["run", "slow.py:agent", "--identity", str(tmp_path)],
            "mesh-policy": ["agents", "--servers", f"nats://127.0.0.1:{port}"],
        }[tool]
        for delay in (0.1, 0.2, 0.3, 0.45):
            proc = await asyncio.create_subprocess_exec(
                str(BIN / tool), *args, cwd=tmp_path, env=base_env(),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            await asyncio.sleep(delay)
            proc.send_signal(signal.SIGINT)
            _, err = await asyncio.wait_for(proc.communicate(), 20)
            assert proc.returncode == 130, (delay, err.decode())
            assert b"Traceback" not in err, (delay, err.decode())


async def test_ctrl_c_while_connecting_exits_130_at_once(project: Path) -> None:
    """A server that never answers does not hold Ctrl-C up until the connect timeout."""
    async with silent_server() as port:
        env = runner_env(project, f"nats://127.0.0.1:{port}", connect_timeout="60s")
        async with running("run", "app/agent.py:agent", env=env, cwd=project) as runner:
            await runner.wait_for('"agent.starting"')
            await asyncio.sleep(0.5)  # inside nats-py's connect now
            code, took = await runner.interrupt()
    assert code == 130 and took < 3, runner.text
    assert '"phase": "starting"' in runner.text and "Traceback" not in runner.text


async def test_sigterm_while_connecting_exits_143(project: Path) -> None:
    """SIGTERM before serving exits at once too, with 128 + 15."""
    async with silent_server() as port:
        env = runner_env(project, f"nats://127.0.0.1:{port}", connect_timeout="60s")
        async with running("run", "app/agent.py:agent", env=env, cwd=project) as runner:
            await runner.wait_for('"agent.starting"')
            code, took = await runner.interrupt(signal.SIGTERM)
    assert code == 143 and took < 3, runner.text


async def test_nothing_listening_fails_fast_and_says_so(project: Path) -> None:
    """A refused connection is reported at once, not after the connect timeout."""
    env = runner_env(project, f"nats://127.0.0.1:{free_port()}", connect_timeout="60s")
    t0 = time.monotonic()
    result = await run("mesh-agent", "run", "app/agent.py:agent", env=env, cwd=project)
    assert result.returncode == 2 and time.monotonic() - t0 < 10
    assert "Unavailable: nothing is listening at nats://127.0.0.1:" in result.stderr
    assert "Traceback" not in result.stderr


async def test_a_server_that_never_answers_fails_within_the_connect_timeout(
    project: Path,
) -> None:
    """A port that accepts but never speaks NATS fails after --connect-timeout, clearly."""
    async with silent_server() as port:
        env = runner_env(project, f"nats://127.0.0.1:{port}")
        t0 = time.monotonic()
        result = await run(
            "mesh-agent", "run", "app/agent.py:agent", "--connect-timeout", "1s",
            env=env, cwd=project,
        )  # fmt: skip
        took = time.monotonic() - t0
    assert result.returncode == 2 and took < 8, result.stderr
    assert f"Unavailable: cannot connect to NATS at nats://127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


# --- --reload --------------------------------------------------------------------------------


async def test_reload_restarts_the_agent_when_its_package_changes(
    nats_server: NatsServer, project: Path, trust: Trust
) -> None:
    """Editing a module of the agent's package restarts it (logged), running the new code;
    Ctrl-C then stops the supervisor and the agent cleanly, exit 0."""
    env = runner_env(project, nats_server.url)
    async with (
        running("run", "app/agent.py:agent", "--reload", env=env, cwd=project) as runner,
        mesh.Mesh(trust.identity("alice"), test_config([nats_server.url])) as alice,
    ):
        await runner.wait_for('"agent.ready"')
        await alice.wait_for("pinger", timeout=20)
        (project / "app" / "helpers.py").write_text('VERSION = "2.0.0"\n')
        await runner.wait_for('"agent.reloading"')
        await runner.wait_for('"agent.ready"', times=2)
        await wait_until(
            lambda: {r.version for r in alice.directory.all() if r.agent == "pinger"} == {"2.0.0"},
            10,
        )
        assert (await alice.request("pinger", "ping", Ping(text="v2"), Ping)).text == "v2"
        code, _ = await runner.interrupt()
    assert code == 0, runner.text
    assert runner.count('"agent.stopped"') == 2
    assert "helpers.py" in next(line for line in runner.lines if '"agent.reloading"' in line)
    assert "Traceback" not in runner.text


async def test_reload_waits_for_a_fix_after_a_broken_edit(
    nats_server: NatsServer, project: Path
) -> None:
    """An edit that breaks the import shows its error; the next edit starts the agent again."""
    env = runner_env(project, nats_server.url)
    agent_py = project / "app" / "agent.py"
    async with running("run", "app/agent.py:agent", "--reload", env=env, cwd=project) as runner:
        await runner.wait_for('"agent.ready"')
        agent_py.write_text(AGENT_SOURCE + "\nraise RuntimeError('half-written')\n")
        await runner.wait_for('"agent.runner_exited"')
        assert "RuntimeError: half-written" in runner.text
        agent_py.write_text(AGENT_SOURCE)
        await runner.wait_for('"agent.ready"', times=2)
        code, _ = await runner.interrupt()
    assert code == 0, runner.text


# --- the demo --------------------------------------------------------------------------------


def test_the_demo_deletes_its_key_files(tmp_path: Path) -> None:
    """`mesh-agent demo` leaves no temporary folder with the root key behind."""
    env = {**base_env(), "TMPDIR": str(tmp_path)}
    result = run_sync("mesh-agent", "demo", env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert not list(tmp_path.glob("mesh-demo-*"))


def test_the_demo_with_keep_keeps_its_key_files_and_says_where(tmp_path: Path) -> None:
    """`mesh-agent demo --keep` stays up until Ctrl-C, then prints where the keys remain."""
    env = {**base_env(), "TMPDIR": str(tmp_path)}
    with subprocess.Popen(
        [str(BIN / "mesh-agent"), "demo", "--keep"], env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    ) as proc:  # fmt: skip
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                if "Ctrl-C to stop" in line:
                    break
            proc.send_signal(signal.SIGINT)
            rest, _ = proc.communicate(timeout=30)
        finally:
            proc.kill()
    assert proc.returncode == 0
    (kept,) = tmp_path.glob("mesh-demo-*")
    assert (kept / "root.key").exists()
    assert f"kept in {kept}" in rest


RELAY_SOURCE = """
from pydantic import BaseModel

from mesh import Agent, Context


class Ping(BaseModel):
    text: str


agent = Agent("pinger")


@agent.endpoint()
async def ping(p: Ping, ctx: Context) -> Ping:
    return Ping(text=p.text)


@agent.on_start
async def ask_the_witness(mesh) -> None:
    await mesh.wait_for("witness")
    await mesh.request("witness", "seen", Ping(text="hello"), Ping)
"""


async def test_run_with_delegate_starts_a_chain_on_the_agents_calls(
    nats_server: NatsServer, project: Path, trust: Trust
) -> None:
    """`mesh-agent run --delegate` (MESH_DELEGATE): the agent's own calls carry a chain whose
    origin is the agent."""
    (project / "app" / "agent.py").write_text(RELAY_SOURCE)
    seen: list[tuple[str, tuple[str, ...]] | None] = []
    witness = mesh.Agent("witness")

    @witness.endpoint(name="seen")
    async def seen_by(p: Ping, ctx: mesh.Context) -> Ping:
        d = ctx.delegation
        seen.append(None if d is None else (d.origin, d.path))
        return p

    env = runner_env(project, nats_server.url, delegate="1")
    cfg = test_config([nats_server.url])
    async with (
        mesh.Mesh(trust.identity("witness"), cfg, agent=witness),
        running("run", "app/agent.py:agent", env=env, cwd=project) as runner,
    ):
        await wait_until(lambda: bool(seen), timeout=20)
        await runner.interrupt()
    assert seen == [("pinger", ("pinger",))]
