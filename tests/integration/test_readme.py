"""The Python blocks of README.md run as written.

A marker comment above each block says how it is tested:

- ``<!-- test: define ... -->``: run on its own; what it defines is kept for the blocks after it.
- ``<!-- test: call ... -->``: top-level ``await``, run after the blocks above, against a
  nats-server (its URL in place of ``nats://127.0.0.1:4222``) on which the agents they define
  serve, with the example librarian, from a folder holding ``keys/planner``.
- ``<!-- test: excerpt of PATH -->``: a verbatim part of PATH, which is tested by running it.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import mesh
from mesh.testing import NatsServer, Trust, test_config
from mesh_examples.research import librarian

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
BLOCK = re.compile(r"(?:<!-- test: (?P<marker>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)
DEFAULT_URL = "nats://127.0.0.1:4222"


def blocks(kind: str | None = None) -> list[tuple[str, str]]:
    """The README's Python blocks as ``(marker, code)``, those of one ``kind`` if given."""
    found = [(m["marker"] or "", m["code"]) for m in BLOCK.finditer(README.read_text())]
    return [b for b in found if kind is None or b[0].split()[0:1] == [kind]]


def define() -> dict[str, Any]:
    """The names the ``define`` blocks make, run in order in one namespace."""
    namespace: dict[str, Any] = {"__name__": "readme"}
    for _, code in blocks("define"):
        exec(compile(code, str(README), "exec"), namespace)
    return namespace


def test_every_python_block_says_how_it_is_tested() -> None:
    """A block without a known marker would go untested: none has none."""
    assert blocks(), "README.md has no Python block"
    for marker, code in blocks():
        assert marker.split()[0:1] in (["define"], ["call"], ["excerpt"]), code[:200]


def test_the_agent_block_defines_an_agent_with_an_endpoint_and_an_event_handler() -> None:
    """`Write an agent` runs on its own: every name it uses is defined or imported."""
    researcher = define()["researcher"]
    assert isinstance(researcher, mesh.Agent)
    assert set(researcher.endpoints) == {"answer"}
    assert [(e.agent, e.topic) for e in researcher.events] == [("librarian", "catalog-updated")]


async def test_the_calling_block_gets_an_answer_from_the_agent_defined_above(
    nats_server: NatsServer, trust: Trust, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`Call it from anything` reaches the README's researcher, which asks a librarian."""
    namespace = define()
    mesh.save_identity(trust.identity("planner"), tmp_path / "keys" / "planner")
    monkeypatch.chdir(tmp_path)
    config = test_config([nats_server.url])
    (call,) = blocks("call")
    assert DEFAULT_URL in call[1]
    code = compile(
        call[1].replace(DEFAULT_URL, nats_server.url),
        str(README),
        "exec",
        flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
    )
    async with (
        mesh.Mesh(trust.identity("librarian"), config, agent=librarian),
        mesh.Mesh(trust.identity("researcher"), config, agent=namespace["researcher"]),
    ):
        running = eval(code, namespace)
        if running is not None:
            await running
    assert namespace["answer"].sources == ["doc-17", "doc-42"]


@pytest.mark.parametrize(("marker", "code"), blocks("excerpt"))
def test_an_excerpt_is_a_verbatim_part_of_its_file(marker: str, code: str) -> None:
    """What the README quotes from a file is in that file, as quoted."""
    path = REPO / marker.removeprefix("excerpt of ").strip()
    assert code in path.read_text()


@pytest.mark.integration  # the example tests start a nats-server themselves
def test_the_example_of_a_users_own_tests_passes() -> None:
    """`examples/test_my_agent.py` passes when pytest runs it, as a user would (it is not
    under `testpaths`, so the suite does not collect it a second time)."""
    pytest_cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    result = subprocess.run(
        [*pytest_cmd, "examples/test_my_agent.py"],
        cwd=REPO, capture_output=True, text=True, timeout=55,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout
