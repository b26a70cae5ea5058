"""A small research team: a planner asks a researcher, who looks facts up with a librarian.

Run each agent with the runner (identities from ``mesh-policy identity issue``)::

    mesh-agent run examples.research:librarian --identity keys/librarian
    mesh-agent run examples.research:researcher --identity keys/researcher
    mesh-agent run examples.research:planner --identity keys/planner

or all of them, on an embedded NATS server, with ``mesh-agent demo``.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel, Field

from mesh import Agent, Context

# Where the agents tell what they do; the demo points this at its console.
narrate: Callable[[str], None] = lambda line: None  # noqa: E731


class Question(BaseModel):
    text: str = Field(min_length=1, max_length=2000)


class Answer(BaseModel):
    text: str
    sources: list[str] = []


class Query(BaseModel):
    topic: str


class Facts(BaseModel):
    facts: list[str]
    ids: list[str]


class Answered(BaseModel):
    question: str
    sources: int


CATALOG: dict[str, list[tuple[str, str]]] = {
    "nats": [
        ("doc-17", "NATS subjects are dot-separated tokens with * and > wildcards."),
        ("doc-42", "JetStream adds persistence and key-value buckets to NATS."),
    ],
    "mesh": [
        ("doc-7", "A service mesh gives every call identity, encryption and retries."),
        ("doc-9", "Linkerd and Istio renew workload certificates at half their 24 h life."),
    ],
}

librarian = Agent("librarian", version="1.0.0", description="Looks facts up in a catalog.")
researcher = Agent("researcher", version="1.2.0", description="Answers questions with sources.")
planner = Agent("planner", version="0.3.0", description="Plans work and follows answers.")


@librarian.endpoint(idempotent=True, concurrency=16)
async def lookup(query: Query, ctx: Context) -> Facts:
    """Return the catalog entries whose topic appears in the query."""
    hits = [(i, f) for topic, docs in CATALOG.items() if topic in query.topic for i, f in docs]
    narrate(
        f"librarian  <- lookup({query.topic!r}) from {ctx.caller.agent} "
        f"[verified instance {ctx.caller.instance}, {ctx.remaining or 0:.2f}s of budget left]"
    )
    return Facts(facts=[f for _, f in hits], ids=[i for i, _ in hits])


@researcher.endpoint(idempotent=True, concurrency=8)
async def answer(q: Question, ctx: Context) -> Answer:
    """Answer a question from the librarian's facts; publish that it was answered."""
    narrate(
        f"researcher <- answer({q.text!r}) from {ctx.caller.agent} "
        f"[roles {list(ctx.caller.roles)}, {ctx.remaining or 0:.2f}s left]"
    )
    facts = await ctx.request("librarian", "lookup", Query(topic=q.text.lower()), Facts)
    await ctx.publish("answered", Answered(question=q.text, sources=len(facts.ids)))
    text = " ".join(facts.facts) or "I found nothing on that."
    return Answer(text=text, sources=facts.ids)


@planner.on_event("researcher", "answered")
async def follow(event: Answered, ctx: Context) -> None:
    """Note each answered question (signed event, sender verified)."""
    narrate(
        f"planner    <- event 'answered' from {ctx.caller.agent} "
        f"(signature verified): {event.question!r}, {event.sources} source(s)"
    )


@librarian.on_event("researcher", "answered")
async def count_use(event: Answered, ctx: Context) -> None:
    """The librarian follows how its facts are used."""
    narrate(f"librarian  <- event 'answered' from {ctx.caller.agent} (signature verified)")
