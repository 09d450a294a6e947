"""Drive a multi-turn script against an endpoint: conversations interleaved, turns in order.

Every conversation is ready at the start; at most `concurrency` turns are in flight. A turn is
sent once the conversation's previous answer has arrived, and then queues behind the turns that
became ready before it, so the conversations advance side by side the way many users' chats
do, and consecutive requests mostly belong to different conversations. A failed turn ends its
conversation (the next turn would need its answer).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp

from benchmarks.client import Endpoint, send
from benchmarks.conversations import Script
from benchmarks.loadgen import connector
from benchmarks.records import RequestRecord


def turn_body(script: Script, conversation: int, turn: int, answers: list[str], model: str, stream: bool,
              sampling: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "stream": stream,
                            "messages": script.messages(conversation, turn, answers),
                            "max_tokens": script.output_tokens, "ignore_eos": True}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body | sampling


async def run(endpoint: Endpoint, script: Script, concurrency: int, sampling: dict[str, Any] | None = None,
              session_header: str | None = None,
              on_done: Callable[[RequestRecord], None] | None = None) -> list[RequestRecord]:
    """Every turn of every conversation; records in the order they finished. `session_header`
    (e.g. x-session-id) sends the conversation's id in that header."""
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    conversations = len(script.user_turns)
    answers: list[list[str]] = [[] for _ in range(conversations)]
    ready: asyncio.Queue[int | None] = asyncio.Queue()
    for conversation in range(conversations):
        ready.put_nowait(conversation)
    records: list[RequestRecord] = []
    sent = 0
    unfinished = conversations
    workers = min(concurrency, conversations)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)

    async with aiohttp.ClientSession(connector=connector(), timeout=timeout) as session:

        async def worker() -> None:
            nonlocal unfinished, sent
            while (conversation := await ready.get()) is not None:
                turn = len(answers[conversation])
                body = turn_body(script, conversation, turn, answers[conversation], endpoint.model,
                                 endpoint.stream, sampling or {})
                headers = {session_header: f"conversation-{conversation}"} if session_header else None
                record = RequestRecord(index=sent, conversation=conversation, turn=turn)
                sent += 1
                await send(session, endpoint, body, record, keep_answer=True, headers=headers)
                records.append(record)
                if on_done is not None:
                    on_done(record)
                if record.ok and turn + 1 < len(script.user_turns[conversation]):
                    answers[conversation].append(record.answer or "")
                    ready.put_nowait(conversation)
                    continue
                unfinished -= 1
                if unfinished == 0:
                    for _ in range(workers):
                        ready.put_nowait(None)

        await asyncio.gather(*(worker() for _ in range(workers)))
    return records
