"""The CLIs' conventions, for every command of both tools: help on every option, with its
default and its environment variable; `-h`; shell completion through click's protocol."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import click
import pytest

from mesh.cli import agent as agent_cli
from mesh.cli import policy as policy_cli

TOOLS = {"mesh-policy": policy_cli.cli, "mesh-agent": agent_cli.cli}


def leaves(cmd: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[str, click.Command]]:
    """Every runnable command under ``cmd``, with its path."""
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from leaves(sub, (*path, name))
    else:
        yield " ".join(path), cmd


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_every_option_has_help_and_its_environment_variable_shown(tool: str) -> None:
    """No option without help text; every option read from the environment shows the variable
    (``show_envvar``) and it is a ``MESH_*`` one; help options are ``-h`` and ``--help``."""
    commands = list(leaves(TOOLS[tool]()))
    assert len(commands) >= (18 if tool == "mesh-policy" else 3)
    for path, cmd in commands:
        ctx = click.Context(cmd, info_name=path, **cmd.context_settings)
        assert set(cmd.get_help_option_names(ctx)) == {"-h", "--help"}, path
        for param in cmd.params:
            if not isinstance(param, click.Option):
                continue
            assert param.help, f"{tool} {path} {param.opts}: no help"
            if param.envvar:
                assert param.show_envvar, f"{tool} {path} {param.opts}"
                assert str(param.envvar).startswith("MESH_"), param.envvar


def test_connection_options_name_their_variables_and_defaults(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`apply --help` shows the MESH_* variable and the default of each connection option."""
    assert policy_cli.main(["apply", "--help"]) == 0
    shown = " ".join(capsys.readouterr().out.split())  # click wraps the help text
    for text in (
        "env var: MESH_SERVERS; default: nats://127.0.0.1:4222",
        "env var: MESH_IDENTITY; default: keys/admin",
        "env var: MESH_PREFIX; default: mesh",
        "env var: MESH_REPLICAS",
    ):
        assert text in shown, text


def test_environment_variables_set_options_flags_included(monkeypatch: pytest.MonkeyPatch) -> None:
    """MESH_* variables fill the options they name; a flag takes 1/true/yes and 0/false."""
    run = agent_cli.cli().commands["run"]
    monkeypatch.setenv("MESH_ACCESS_LOG", "yes")
    monkeypatch.setenv("MESH_ALLOW_NO_POLICY", "0")
    monkeypatch.setenv("MESH_DRAIN_TIMEOUT", "250ms")
    monkeypatch.setenv("MESH_SERVERS", "nats://10.0.0.1:4222")
    monkeypatch.setenv("MESH_RENEWAL_GRACE", "2d")
    ctx = run.make_context("run", ["examples.research:planner"])
    assert ctx.params["access_log"] is True
    assert ctx.params["allow_no_policy"] is False
    assert ctx.params["drain"] == 0.25
    assert ctx.params["servers"] == "nats://10.0.0.1:4222"
    assert ctx.params["renewal_grace"] == 2 * 24 * 3600.0
    monkeypatch.setenv("MESH_RENEWAL_GRACE", "0s")  # off: the one duration that may be 0
    assert run.make_context("run", ["x:y"]).params["renewal_grace"] == 0.0


def test_a_bad_duration_is_a_usage_error_naming_the_option(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--ttl 5` exits 2 saying which option and what to write instead."""
    assert (
        policy_cli.main(["identity", "issue", "a", "--root", "r", "--out", "o", "--ttl", "5"]) == 2
    )
    err = capsys.readouterr().err
    assert "Error: Invalid value for '--ttl': invalid duration '5': add a unit, e.g. 5s" in err


def complete(tool: str, words: str) -> list[str]:
    """What the shell would offer after ``words`` (click's bash protocol, as the script of
    ``TOOL completion bash`` asks it)."""
    env = {
        **os.environ,
        f"_{tool.replace('-', '_').upper()}_COMPLETE": "bash_complete",
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1)),
    }
    module = {"mesh-policy": "mesh.cli.policy", "mesh-agent": "mesh.cli.agent"}[tool]
    code = f"import sys; from {module} import main; sys.exit(main())"
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [line.split(",", 1)[1] for line in result.stdout.splitlines()]


def test_shell_completion_offers_commands_subcommands_and_options() -> None:
    """Completion through the real entry point: commands, group members, options, choices."""
    assert complete("mesh-policy", "mesh-policy ap") == ["apply"]
    assert complete("mesh-policy", "mesh-policy identity ") == ["issue", "token", "list", "revoke"]
    assert "--idempotency-key" in complete("mesh-policy", "mesh-policy call --")
    assert complete("mesh-policy", "mesh-policy get -o ") == ["table", "json", "yaml"]
    assert complete("mesh-agent", "mesh-agent run --traces ") == ["none", "console", "otlp"]


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_prints_the_script_for_each_shell(
    shell: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`mesh-policy completion SHELL` prints the script that calls the tool back."""
    assert policy_cli.main(["completion", shell]) == 0
    script = capsys.readouterr().out
    assert "_MESH_POLICY_COMPLETE" in script and f"{shell}_complete" in script
