"""A scripted OpenAI-compatible upstream for what a real vLLM cannot do on demand.

It streams vLLM-shaped chat/completion chunks as fast as asked (measuring a proxy's own
overhead), and misbehaves on request through a `script` field in the request body (which a
proxy forwards like any other field), comma-separated:

  "script": "die-after=N"        close the connection after N token events (a backend crash)
  "script": "first-byte-delay=S" wait S seconds before the response starts (a slow prefill)
  "script": "stall-after=N"      stop sending after N token events, keep the connection open
  "script": "reasoning=N"        the first N token events are reasoning deltas
  "script": "linger-after-done=S" wait S seconds after [DONE] before ending the body
  "script": "close-before-response" read the request, then drop the connection (a crash on it)
  "script": "close-if-reused"    the same, but only on a connection that served a request before
                                 (a keep-alive connection the server closed under its client)
  "script": "reject"             answer 400 with the engine's error body (a validation error)
  "script": "hold=NAME"          after the first token event, wait until POST /admin/release?gate=NAME
                                 (a stream kept in flight for as long as a test needs)

Like vLLM it refuses what it cannot parse (400, as FastAPI answers a body it cannot read) and a
max_tokens (or max_completion_tokens) below 1 or above its max_model_len (`--max-model-len`, 2048
as the tiny model's; reported in GET /v1/models as vLLM does).

`--engine sglang` shapes every answer as SGLang 0.5.23's OpenAI server does (its protocol.py
models): the reasoning as `reasoning_content` (never `reasoning`), explicit nulls in deltas,
`usage: null` on every chunk, `matched_stop`, usage with a top-level `reasoning_tokens`, and flat
errors (`{"object": "error", "message": ...}`); `assistants` in /stats then records what each
request's assistant messages carried (`reasoning`, `reasoning_content`), as SGLang reads only the
latter.

`python -m benchmarks.scripted_upstream --port 9000 [--delay-ms 0] [--first-byte-ms 0] [--empty-every 0]
[--on-schedule | --engine-steps]` paces every stream (a fixed prefill, then a fixed gap between token
events; with --on-schedule each event is due at its time from the request's arrival, so a late one
does not push the rest back: a known truth for checking how load generators time streams; with
--engine-steps every stream's events go out on one shared step clock, as from vLLM's engine, whose
every decode step gives each running request one token) and GET /v1/models
lists one model. GET /stats returns counters
(generation requests, disconnects seen, and `seen`: the request line of every request other than
/health and /stats, as received; `connections`: how many connections carried them, the proxy's GET
/v1/models and /admin calls left out; `firsts`: each
generation request's first user message or prompt, for routing tests; `max_tokens`: what each one
asked for) so tests can prove what reached the backend, and that the proxy closed an upstream
request. POST /v1/embeddings answers with the path it was sent (forwarding tests).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from aiohttp import web
from aiohttp.typedefs import Handler

MODEL = "tiny-qwen3"
MAX_MODEL_LEN = 2048  # the tiny model's (configs/models/tiny-qwen3.yaml)


def _chunk(index: int, text: str, reasoning: bool, chat: bool, finish: str | None = None,
           sglang: bool = False) -> bytes:
    body: dict[str, object]
    if chat:
        if sglang:  # DeltaMessage: every field, null when absent
            delta = {"role": None, "content": None if reasoning else text,
                     "reasoning_content": text if reasoning else None, "tool_calls": None}
        else:
            delta = {"reasoning": text} if reasoning else {"content": text}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        body = {"id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
                "choices": [choice]}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        body = {"id": "cmpl-scripted", "object": "text_completion", "created": 0, "model": MODEL,
                "choices": [choice]}
    if sglang:
        choice["matched_stop"] = None
        body["usage"] = None
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def _error(status: int, message: str, sglang: bool) -> web.Response:
    if sglang:  # ErrorResponse, flat (sglang/srt/entrypoints/openai/serving_base.py)
        body: dict[str, object] = {"object": "error", "message": message, "type": "Bad Request", "param": None,
                                   "code": status}
    else:
        body = {"error": {"message": message, "type": "BadRequestError", "param": None, "code": status}}
    return web.json_response(body, status=status)


def _assistant_fields(body: dict[str, object]) -> list[dict[str, object]]:
    messages = body.get("messages")
    return [{key: m.get(key) for key in ("reasoning", "reasoning_content") if key in m}
            for m in messages if isinstance(m, dict) and m.get("role") == "assistant"] \
        if isinstance(messages, list) else []


def _first_text(body: dict[str, object]) -> str:
    messages = body.get("messages")
    if isinstance(messages, list):
        return next((_text(m.get("content")) for m in messages if isinstance(m, dict) and m.get("role") == "user"),
                    "")
    return _text(body.get("prompt") or "")


def _text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)  # any JSON (a nested one too: it was parsed)


def _length_error(body: dict[str, object], max_model_len: int) -> str | None:
    """vLLM's refusal of a token count it cannot generate (its sampling-parameter checks)."""
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{name} must be an integer, got {value!r}"
        if value < 1:
            return f"max_tokens must be at least 1, got {value}."
        if value > max_model_len:
            return f"max_tokens={value} cannot be greater than max_model_len={max_model_len}."
    return None


def until_next_step(now: float, step: float) -> float:
    """Seconds from `now` to the next multiple of `step`: the shared clock of --engine-steps."""
    return step - now % step


class Upstream:
    def __init__(self, delay_ms: float, close_before_response: bool = False, first_byte_ms: float = 0.0,
                 empty_every: int = 0, on_schedule: bool = False, engine: str = "vllm",
                 engine_steps: bool = False, max_model_len: int = MAX_MODEL_LEN, model: str = MODEL) -> None:
        self.engine_steps = engine_steps
        self.max_model_len = max_model_len
        self.model = model
        self.gates: dict[str, asyncio.Event] = {}
        self.max_tokens: list[object] = []  # what each generation request asked for (absent: None)
        self.sglang = engine == "sglang"
        self.assistants: list[list[dict[str, object]]] = []  # per request, its assistant messages' reasoning
        self.delay = delay_ms / 1000.0
        self.on_schedule = on_schedule
        self.first_byte = first_byte_ms / 1000.0
        self.empty_every = empty_every
        self.close_before_response = close_before_response
        self.requests = 0
        self.disconnects = 0
        self.in_flight = 0
        self.healthy = True
        self.seen: list[str] = []  # "METHOD raw-path" of every request but /health and /stats
        self.served_by: dict[object, int] = {}  # requests per connection (by the client's address)
        self.firsts: list[str] = []  # each generation request's first user message (or prompt)

    @web.middleware
    async def record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in ("/health", "/stats"):
            self.seen.append(f"{request.method} {request.raw_path}")
            # Connections carrying the requests a proxy forwards: not its probes (/v1/models for the
            # context length) nor a test's own /admin calls.
            if request.path != "/v1/models" and not request.path.startswith("/admin/"):
                key = request.transport.get_extra_info("peername") if request.transport else None
                self.served_by[key] = self.served_by.get(key, 0) + 1
        return await handler(request)

    @staticmethod
    def script(body: dict[str, object]) -> dict[str, str]:
        script = body.get("script")
        out: dict[str, str] = {}
        for part in script.split(",") if isinstance(script, str) else []:
            key, _, value = part.strip().partition("=")
            if key:
                out[key] = value
        return out

    @staticmethod
    def number(script: dict[str, str], key: str) -> float:
        try:
            return float(script.get(key) or 0)
        except ValueError:
            return 0.0

    def gate(self, name: str) -> asyncio.Event:
        return self.gates.setdefault(name, asyncio.Event())

    async def release(self, request: web.Request) -> web.Response:
        self.gate(request.query.get("gate", "")).set()
        return web.Response(status=200)

    async def health(self, _request: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 503)

    async def stats(self, _request: web.Request) -> web.Response:
        return web.json_response({"requests": self.requests, "disconnects": self.disconnects,
                                  "in_flight": self.in_flight, "seen": self.seen,
                                  "connections": len(self.served_by), "firsts": self.firsts,
                                  "assistants": self.assistants, "max_tokens": self.max_tokens})

    async def pause(self, seconds: float, due: float) -> None:
        """Sleep `seconds`, or with --on-schedule until loop time `due` (the schedule, not the
        last write, sets when the next event goes out), or with --engine-steps until the next
        multiple of `seconds` on the loop's clock (every running stream's event in the same step)."""
        if self.on_schedule:
            seconds = due - asyncio.get_running_loop().time()
        elif self.engine_steps:
            seconds = until_next_step(asyncio.get_running_loop().time(), seconds)
        if seconds > 0:
            await asyncio.sleep(seconds)

    async def models(self, _request: web.Request) -> web.Response:
        card = {"id": self.model, "object": "model", "owned_by": "scripted", "root": self.model, "parent": None,
                "max_model_len": self.max_model_len}
        return web.json_response({"object": "list", "data": [card]})

    async def embeddings(self, request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"object": "list", "data": [], "path": request.raw_path})

    async def set_health(self, request: web.Request) -> web.Response:
        self.healthy = request.query.get("healthy", "1") == "1"
        return web.Response(status=200)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        chat = request.path.endswith("/chat/completions")
        arrived = asyncio.get_running_loop().time()
        try:
            body = json.loads(await request.read())
            if not isinstance(body, dict):
                return _error(400, "the request body must be a JSON object", self.sglang)
            first = _first_text(body)
        except (ValueError, RecursionError) as exc:  # FastAPI (vLLM, SGLang): 400 for a body it cannot read
            return _error(400, f"There was an error parsing the body: {type(exc).__name__}", self.sglang)
        script = self.script(body)
        self.requests += 1
        self.firsts.append(first)
        self.assistants.append(_assistant_fields(body))
        self.max_tokens.append(body.get("max_tokens"))
        refused = _length_error(body, self.max_model_len)
        if refused is not None:
            return _error(400, refused, self.sglang)
        tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        if "reject" in script:
            return _error(400, "a validation error, as the engine answers it", self.sglang)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        reused = self.served_by.get(peer, 0) > 1
        if self.close_before_response or "close-before-response" in script or (
                "close-if-reused" in script and reused):
            assert request.transport is not None
            request.transport.abort()  # like a keep-alive connection the server closed under the client
            return web.Response(status=500)
        self.in_flight += 1
        try:
            if "first-byte-delay" in script:
                await asyncio.sleep(self.number(script, "first-byte-delay"))
            elif self.first_byte:
                await self.pause(self.first_byte, arrived + self.first_byte)
            reasoning = int(self.number(script, "reasoning"))
            usage: dict[str, object] = {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens}
            if self.sglang:  # UsageInfo: reasoning tokens also at the top level
                usage.update(prompt_tokens_details=None, reasoning_tokens=min(reasoning, tokens),
                             completion_tokens_details={"reasoning_tokens": min(reasoning, tokens)} if reasoning
                             else None)
            if not body.get("stream"):
                thought = " hmm" * min(reasoning, tokens) or None
                answer = " tok" * (tokens - min(reasoning, tokens))
                message: dict[str, object] = {"role": "assistant", "content": answer}
                message.update({"reasoning_content": thought, "tool_calls": None} if self.sglang
                               else {"reasoning": thought})
                choice: dict[str, object] = {"index": 0, "message": message, "finish_reason": "length"}
                if self.sglang:
                    choice.update(logprobs=None, matched_stop=None)
                payload = {"id": "chatcmpl-scripted", "object": "chat.completion", "model": MODEL,
                           "choices": [choice], "usage": usage}
                return web.json_response(payload)
            response = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8"})
            await response.prepare(request)
            for i in range(tokens):
                if "die-after" in script and i >= self.number(script, "die-after"):
                    assert request.transport is not None
                    request.transport.abort()  # the backend process "crashes" mid-stream
                    return response
                if "stall-after" in script and i >= self.number(script, "stall-after"):
                    await asyncio.sleep(3600)
                if "hold" in script and i == 1:
                    await self.gate(script["hold"]).wait()
                finish = "length" if i == tokens - 1 else None
                # A token without text: vLLM's detokenizer holds back one ending inside a character.
                text = "" if self.empty_every and i % self.empty_every == 0 else " tok"
                await response.write(_chunk(i, text, i < reasoning, chat, finish, self.sglang))
                if self.delay:
                    await self.pause(self.delay, arrived + self.first_byte + (i + 1) * self.delay)
            if (body.get("stream_options") or {}).get("include_usage"):
                final = {"id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": 0,
                         "model": MODEL, "choices": [], "usage": usage}
                await response.write(b"data: " + json.dumps(final, separators=(",", ":")).encode() + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            if "linger-after-done" in script:
                await asyncio.sleep(self.number(script, "linger-after-done"))
            await response.write_eof()
            return response
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnects += 1
            raise
        finally:
            self.in_flight -= 1


def make_app(delay_ms: float = 0.0, close_before_response: bool = False, first_byte_ms: float = 0.0,
             empty_every: int = 0, on_schedule: bool = False, engine: str = "vllm",
             engine_steps: bool = False, max_model_len: int = MAX_MODEL_LEN, model: str = MODEL) -> web.Application:
    upstream = Upstream(delay_ms, close_before_response, first_byte_ms, empty_every, on_schedule, engine,
                        engine_steps, max_model_len, model)
    app = web.Application(middlewares=[upstream.record])
    app.router.add_get("/health", upstream.health)
    app.router.add_get("/stats", upstream.stats)
    app.router.add_post("/admin/health", upstream.set_health)
    app.router.add_post("/admin/release", upstream.release)
    app.router.add_post("/v1/chat/completions", upstream.generate)
    app.router.add_post("/v1/completions", upstream.generate)
    app.router.add_post("/v1/embeddings", upstream.embeddings)
    app.router.add_get("/v1/models", upstream.models)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scripted_upstream", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="pause between token events")
    parser.add_argument("--first-byte-ms", type=float, default=0.0,
                        help="pause before every response starts (a fixed prefill; a script's first-byte-delay wins)")
    parser.add_argument("--empty-every", type=int, default=0, metavar="N",
                        help="every Nth token event, the first included, carries no text (0: none)")
    parser.add_argument("--on-schedule", action="store_true",
                        help="event i is due first-byte + i x delay after the request arrived (late writes do not "
                             "delay later ones)")
    parser.add_argument("--engine-steps", action="store_true",
                        help="token events go out on a shared clock of --delay-ms steps, every running stream's in "
                             "the same step, as vLLM's engine emits one token per running request per step")
    parser.add_argument("--close-before-response", action="store_true",
                        help="drop every generation request's connection before answering (health still 200)")
    parser.add_argument("--engine", choices=["vllm", "sglang"], default="vllm",
                        help="whose OpenAI server the answers are shaped like (vLLM 0.32's or SGLang 0.5.23's)")
    parser.add_argument("--max-model-len", type=int, default=MAX_MODEL_LEN,
                        help="reported in /v1/models; a larger max_tokens is refused with 400, as vLLM does")
    parser.add_argument("--served-model-name", default=MODEL, help="the model id /v1/models lists")
    args = parser.parse_args()
    print(f"scripted upstream on http://{args.host}:{args.port} ({time.strftime('%H:%M:%S')})", flush=True)
    if args.on_schedule and args.engine_steps:
        parser.error("--on-schedule and --engine-steps are two pacings: choose one")
    app = make_app(args.delay_ms, args.close_before_response, args.first_byte_ms, args.empty_every, args.on_schedule,
                   args.engine, args.engine_steps, args.max_model_len, args.served_model_name)
    web.run_app(app, host=args.host, port=args.port, print=None, handler_cancellation=True)


if __name__ == "__main__":
    main()
