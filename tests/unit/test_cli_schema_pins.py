"""`mesh-agent run --pin AGENT.ENDPOINT=HASH` (`MESH_SCHEMA_PINS`): the schema pins of the
agent's own calls, checked as ``MeshConfig.schema_pins`` checks them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mesh import Agent, MeshConfig
from mesh.cli import agent as agent_cli

ONE, TWO = "sha256:" + "1" * 64, "sha256:" + "2" * 64


def test_pins_from_options_and_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--pin` repeats; MESH_SCHEMA_PINS takes pins separated by spaces; none: no pins."""
    run = agent_cli.cli().commands["run"]
    ctx = run.make_context("run", ["x:y", "--pin", f"a.b={ONE}", "--pin", f"c.d={TWO}"])
    assert ctx.params["pin"] == {"a.b": ONE, "c.d": TWO}
    assert run.make_context("run", ["x:y"]).params["pin"] == {}
    monkeypatch.setenv("MESH_SCHEMA_PINS", f"a.b={ONE} c.d={TWO}")
    assert run.make_context("run", ["x:y"]).params["pin"] == {"a.b": ONE, "c.d": TWO}


@pytest.mark.parametrize(
    ("pin", "says"),
    [
        ("a.b", "is not AGENT.ENDPOINT=HASH"),
        (f"ab={ONE}", "key must be agent.endpoint"),
        ("a.b=sha256:12", "is not a schema hash"),
        (f"A.b={ONE}", "invalid agent name"),
    ],
)
def test_a_bad_pin_is_a_usage_error(
    pin: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A malformed pin exits 2 naming the option and what is wrong, before anything runs."""
    assert agent_cli.main(["run", "x:y", "--pin", pin]) == 2
    err = capsys.readouterr().err
    assert "Invalid value for '--pin'" in err and says in err, err
    assert "Traceback" not in err


def test_the_same_endpoint_pinned_twice_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert agent_cli.main(["run", "x:y", "--pin", f"a.b={ONE}", "--pin", f"a.b={TWO}"]) == 2
    assert "'a.b' is pinned twice" in capsys.readouterr().err


def test_run_gives_the_pins_to_the_mesh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The agent `run` starts has the pins in its configuration."""
    seen: list[MeshConfig] = []

    async def run_agent(agent: Agent, config: MeshConfig, **_: Any) -> int:
        seen.append(config)
        return 0

    monkeypatch.setattr(agent_cli, "run_agent", run_agent)
    monkeypatch.setattr(agent_cli, "load_agent", lambda target: Agent("pinger"))
    code = agent_cli.main(
        ["run", "app:agent", "--identity", str(tmp_path), "--pin", f"researcher.answer={ONE}"]
    )

    assert code == 0
    (config,) = seen
    assert config.schema_pins == {"researcher.answer": ONE}
