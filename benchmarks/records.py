"""What one benchmark request produced: the client's raw timestamps and the server's usage."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RequestRecord:
    """One request, as the client saw it. Times are seconds from `start` (perf_counter based).

    `token_times` holds the arrival time of every streamed token chunk (a chunk with a choice:
    answer or reasoning, its text possibly held back by the server's detokenizer); the first
    is the TTFT. Token counts come from the server's usage.
    """

    index: int
    start: float = 0.0                       # perf_counter when the request was sent
    ok: bool = False
    error: str | None = None                 # error type: http_400, timeout, connection, ...
    error_detail: str | None = None
    token_times: list[float] = field(default_factory=list)
    first_answer_time: float | None = None   # first chunk with visible answer text
    reasoning_chunks: int = 0
    answer_chunks: int = 0
    end: float | None = None                 # the last token-bearing chunk (or the body, unstreamed)
    prompt_tokens: int | None = None         # server usage
    completion_tokens: int | None = None
    reasoning_tokens: int | None = None      # usage.completion_tokens_details.reasoning_tokens
    answer: str | None = None                # the answer text, when the sender asked to keep it
    conversation: int | None = None          # multi-turn workload: which conversation, which turn
    turn: int | None = None

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] if self.token_times else None

    @property
    def e2e(self) -> float | None:
        return self.end

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
