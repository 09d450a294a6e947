"""Send one OpenAI-style request and time it: raw aiohttp and a line-by-line SSE reader.

The official `openai` client builds pydantic objects per chunk; at hundreds of streams that
costs more client CPU than the figures can afford, so the hot loop here only parses each
`data:` line once and reads the three fields it needs.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from benchmarks.records import RequestRecord


@dataclass(frozen=True)
class Endpoint:
    base_url: str          # http://host:port (without /v1)
    model: str             # the name sent in the request's `model`
    api: str = "chat"      # chat | completions
    stream: bool = True
    api_key: str | None = None
    timeout_s: float = 600.0

    @property
    def url(self) -> str:
        return f"{self.base_url}/v1/{'chat/completions' if self.api == 'chat' else 'completions'}"

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers


def _usage(record: RequestRecord, usage: dict[str, Any]) -> None:
    record.prompt_tokens = usage.get("prompt_tokens")
    record.completion_tokens = usage.get("completion_tokens")
    details = usage.get("completion_tokens_details") or {}
    # SGLang also counts them at the top level (its completion_tokens_details may be null).
    record.reasoning_tokens = details.get("reasoning_tokens") or usage.get("reasoning_tokens")


def _event_of(choice: dict[str, Any], chat: bool) -> tuple[bool, bool]:
    """(carries reasoning, carries visible answer text) for one streamed choice.

    Every chunk with a choice is a token event, even with empty text: vLLM sends one per
    generated token and its detokenizer holds back the text of a token that ends inside a
    multi-byte character (as `vllm bench serve` counts them).
    """
    if not chat:
        return False, bool(choice.get("text"))
    delta = choice.get("delta") or {}
    # vLLM renamed reasoning_content to reasoning; read both.
    reasoning = delta.get("reasoning") is not None or delta.get("reasoning_content") is not None
    return reasoning and not delta.get("content"), bool(delta.get("content"))


def _answer_text(choice: dict[str, Any], chat: bool) -> str:
    if not chat:
        return str(choice.get("text") or "")
    part = choice.get("delta") or choice.get("message") or {}
    return str(part.get("content") or "")


async def send(session: aiohttp.ClientSession, endpoint: Endpoint, body: dict[str, Any],
               record: RequestRecord, keep_answer: bool = False,
               headers: dict[str, str] | None = None) -> RequestRecord:
    """Send `body` and time it into `record`; `keep_answer` also keeps the answer text (a
    multi-turn client re-sends it), `headers` are added to the endpoint's."""
    chat = endpoint.api == "chat"
    payload = json.dumps(body).encode()
    pieces: list[str] = []
    record.start = start = time.perf_counter()
    try:
        async with asyncio.timeout(endpoint.timeout_s):
            async with session.post(endpoint.url, data=payload,
                                    headers=endpoint.headers() | (headers or {})) as response:
                if response.status != 200:
                    record.error = f"http_{response.status}"
                    record.error_detail = (await response.text())[:300]
                    return record
                if not endpoint.stream:
                    data = await response.json(content_type=None)
                    record.end = time.perf_counter() - start
                    _usage(record, data.get("usage") or {})
                    if keep_answer:
                        record.answer = "".join(_answer_text(c, chat) for c in data.get("choices", [])[:1])
                    record.ok = True
                    return record
                done = False
                async for line in response.content:
                    if not line.startswith(b"data: "):
                        continue
                    now = time.perf_counter() - start
                    data_bytes = line[6:].strip()
                    if data_bytes == b"[DONE]":
                        done = True
                        break
                    data = json.loads(data_bytes)
                    if "error" in data:
                        record.error = "stream_error"
                        record.error_detail = str(data["error"])[:300]
                        return record
                    choices = data.get("choices")
                    if choices:
                        reasoning, answer = _event_of(choices[0], chat)
                        record.token_times.append(now)
                        record.end = now
                        if reasoning:
                            record.reasoning_chunks += 1
                        else:
                            record.answer_chunks += 1
                        if answer and record.first_answer_time is None:
                            record.first_answer_time = now
                        if keep_answer:
                            pieces.append(_answer_text(choices[0], chat))
                    usage = data.get("usage")
                    if usage:
                        _usage(record, usage)
                if not done:
                    record.error = "incomplete_stream"
                elif not record.token_times:
                    record.error = "no_tokens"
                else:
                    record.ok = True
                    if keep_answer:
                        record.answer = "".join(pieces)
    except TimeoutError:
        record.error = "timeout"
    except aiohttp.ClientConnectorError as exc:
        record.error = "connection_refused"
        record.error_detail = str(exc)[:300]
    except (aiohttp.ClientError, ConnectionError) as exc:
        record.error = "connection_lost"
        record.error_detail = f"{type(exc).__name__}: {exc}"[:300]
    except json.JSONDecodeError as exc:
        record.error = "bad_chunk"
        record.error_detail = str(exc)[:300]
    return record
