"""An LLM-style agent that streams tokens, and an editor that reads the stream as it comes.

``writer.draft`` streams a text word by word, like a language model streams tokens: an async
generator endpoint, each ``yield`` one sealed chunk, sent as fast as the caller grants credit.
``editor.review`` calls it with ``ctx.stream``, reports its progress to its own caller, and stops
reading early when it has enough words: leaving the loop cancels the writer's handler, whose
``finally`` runs. Cancelling the editor's caller cancels both.

Run the two agents with the runner (identities from ``mesh-policy identity issue``)::

    mesh-agent run examples.streaming:writer --identity keys/writer
    mesh-agent run examples.streaming:editor --identity keys/editor

and read a stream from Python::

    async for token in mesh.stream("writer", "draft", Prompt(topic="nats"), Token):
        print(token.text, end=" ", flush=True)

``docs/streaming.md`` walks through it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from pydantic import BaseModel, Field

from mesh import Agent, Context


class Prompt(BaseModel):
    topic: str = Field(min_length=1, max_length=200)
    words: int = Field(default=40, ge=1, le=10_000)
    pause_ms: int = Field(default=20, ge=0, le=1000)


class Token(BaseModel):
    index: int
    text: str


class Review(BaseModel):
    topic: str
    words: int
    excerpt: str


class Stopped(BaseModel):
    """How the writer's last draft ended: all words sent, or cancelled (``drafts`` counts)."""

    finished: int = 0
    cancelled: int = 0


TEXT = (
    "subjects carry messages between agents while the mesh seals every reply and checks who "
    "sent it before a handler runs"
)
VOCABULARY = TEXT.split()

writer = Agent("writer", version="1.0.0", description="Drafts text, streamed word by word.")
editor = Agent("editor", version="1.0.0", description="Reviews the start of a draft.")
drafts = Stopped()


@writer.endpoint(concurrency=32)
async def draft(prompt: Prompt, ctx: Context) -> AsyncIterator[Token]:
    """Stream ``prompt.words`` words on the topic, pausing between them like a model."""
    try:
        for i in range(prompt.words):
            if prompt.pause_ms:
                await asyncio.sleep(prompt.pause_ms / 1000)
            word = prompt.topic if i == 0 else VOCABULARY[i % len(VOCABULARY)]
            yield Token(index=i, text=word)
        drafts.finished += 1
    except (asyncio.CancelledError, GeneratorExit):
        drafts.cancelled += 1  # the reader left: stop generating (and free what we hold)
        raise


@editor.endpoint()
async def review(prompt: Prompt, ctx: Context) -> Review:
    """Read the first words of a draft, reporting progress, then stop the writer."""
    wanted = min(prompt.words, 12)
    words: list[str] = []
    async for token in ctx.stream("writer", "draft", prompt, Token, credit=8):
        words.append(token.text)
        await ctx.progress(len(words) / wanted, f"read {len(words)} of {wanted} words")
        if len(words) == wanted:
            break  # enough: the writer's handler is cancelled
    return Review(topic=prompt.topic, words=len(words), excerpt=" ".join(words))
