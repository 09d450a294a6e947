"""One benchmark: check the server, build the workload, run each load point, collect the figures.

The result is one JSON-able dict (schema in benchmarks/README.md); the table, plots and compare
all read it, never the live objects.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import math
import platform
import random
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks import calibrate, conversation_load, conversations, loadgen, workloads
from benchmarks.client import Endpoint
from benchmarks.conversations import Shape
from benchmarks.records import RequestRecord
from benchmarks.server_metrics import Scraper, backends, split_metrics_url, stop_all
from benchmarks.stats import Slo, conversations_completed, summarize, turn_figures
from benchmarks.workloads import Lengths, RequestSpec, WorkloadError
from deploy.errors import DeployError
from deploy.loader import known_profiles, load_profile
from deploy.profile import Profile

SCHEMA_VERSION = 1


class BenchError(Exception):
    """A benchmark that cannot run as asked; the message is one line saying what to change."""


@dataclass
class BenchConfig:
    base_url: str
    model: str
    workload: str = "synthetic"
    api: str = "chat"
    stream: bool = True
    num_requests: int = 100
    duration_s: float | None = None
    warmup: int = 4
    patterns: list[loadgen.Pattern] = field(default_factory=lambda: [loadgen.Pattern(concurrency=8)])
    input_len: int = 256
    input_dist: str = "fixed"
    input_spread: float = 0.0
    output_len: int | None = 128
    output_dist: str = "fixed"
    output_spread: float = 0.0
    prefix_len: int = 1024
    dataset: str | None = None
    tokenizer: str | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    slos: list[Slo] = field(default_factory=list)
    metrics_urls: list[str] = field(default_factory=list)
    api_key: str | None = None
    seed: int = 0
    calibrate: bool = True
    timeout_s: float = 600.0
    # The multi-turn workload (benchmarks/conversations.py); output_len is each answer's length.
    conversations: int = 16
    turns: int = 5
    system_len: int = 32
    first_turn_len: int = 500
    follow_up_len: int = 160
    session_header: str | None = None

    def shape(self) -> Shape:
        return Shape(self.conversations, self.turns, self.system_len, self.first_turn_len,
                                   self.follow_up_len, self.output_len or 64)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["patterns"] = [p.as_dict() for p in self.patterns]
        out["slos"] = [{"metric": s.metric, "limit_s": s.limit} for s in self.slos]
        out["api_key"] = "set" if self.api_key else None   # never the key itself
        return out


def find_profile(model: str) -> Profile | None:
    """The shipped profile whose name, served name or alias is `model`, if any."""
    for name in known_profiles():
        try:
            profile = load_profile(name)
        except DeployError:
            continue
        if model in (profile.name, profile.served_model_name, *profile.alias_names):
            return profile
    return None


def served_models(base_url: str, api_key: str | None) -> list[str]:
    request = urllib.request.Request(f"{base_url}/v1/models")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return [m["id"] for m in json.load(response)["data"]]
    except urllib.error.HTTPError as exc:
        hint = " (give --api-key or OPENAI_API_KEY)" if exc.code == 401 else ""
        raise BenchError(f"{base_url}/v1/models answered HTTP {exc.code}{hint}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise BenchError(f"cannot reach {base_url}: {reason} (is the stack running? `make serve`)") from None
    except (ValueError, KeyError, TypeError):
        raise BenchError(f"{base_url}/v1/models is not an OpenAI model list: is this an "
                         "OpenAI-compatible server?") from None


def resolve_model(base_url: str, model: str, api_key: str | None) -> tuple[str, Profile | None]:
    """The name to send for `model` (a served name, alias or profile name) and its profile."""
    served = served_models(base_url, api_key)
    profile = find_profile(model)
    name = model
    if name not in served and profile is not None:
        name = next((n for n in (profile.served_model_name, *profile.alias_names) if n in served), name)
    if name not in served:
        raise BenchError(f"model {model!r} is not served at {base_url}; it serves: {', '.join(served) or 'nothing'}")
    return name, profile


def tokenizer_source(model: str, override: str | None, profile: Profile | None) -> str:
    if override is not None:
        return override
    if profile is not None:
        return str(profile.model_path) if profile.model_path else profile.model
    raise BenchError(f"model {model!r} has no profile in configs/models/: give --tokenizer "
                     "(a local path or a Hugging Face id) to count input tokens")


def load_tokenizer(config: BenchConfig, profile: Profile | None) -> Any:
    source = tokenizer_source(config.model, config.tokenizer, profile)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise BenchError(f"cannot load the tokenizer {source!r}: {str(exc).splitlines()[0]}") from None


def build_workload(config: BenchConfig, profile: Profile | None, count: int) -> list[RequestSpec]:
    rng = random.Random(config.seed)
    outputs = None if config.output_len is None else Lengths(
        config.output_len, config.output_dist, config.output_spread)  # type: ignore[arg-type]
    inputs = Lengths(config.input_len, config.input_dist, config.input_spread)  # type: ignore[arg-type]
    api: workloads.Api = "chat" if config.api == "chat" else "completions"
    try:
        if config.workload == "reasoning":
            return list(workloads.reasoning(rng, count, outputs))
        tokenizer = load_tokenizer(config, profile)
        counter = workloads.TokenCounter(tokenizer, api)
        if config.workload == "jsonl":
            if not config.dataset:
                raise BenchError("--workload jsonl needs --dataset FILE.jsonl")
            return workloads.jsonl(Path(config.dataset), count, rng, outputs, counter)
        if config.workload == "shared-prefix":
            return list(workloads.shared_prefix(counter, count, rng, config.prefix_len, inputs, outputs))
        if config.workload == "long-context":
            limit = profile.max_model_len if profile else None
            if limit is not None:
                room = limit - (config.output_len or 0) - 64
                if inputs.mean > room:
                    inputs = Lengths(room)
            return list(workloads.synthetic(counter, count, rng, inputs, outputs))
        return list(workloads.synthetic(counter, count, rng, inputs, outputs))
    except WorkloadError as exc:
        raise BenchError(str(exc)) from None


def _compact(record: RequestRecord) -> dict[str, Any]:
    """Per-request figures kept in the results (enough to recompute every statistic)."""
    out = {"start": record.start, "ok": record.ok, "error": record.error,
           "ttft": record.ttft, "e2el": record.e2e, "first_answer": record.first_answer_time,
           "token_times": [round(t, 6) for t in record.token_times],
           "prompt_tokens": record.prompt_tokens, "completion_tokens": record.completion_tokens,
           "reasoning_tokens": record.reasoning_tokens, "reasoning_chunks": record.reasoning_chunks}
    if record.conversation is not None:
        out |= {"conversation": record.conversation, "turn": record.turn}
    return out


Load = Callable[[Callable[[RequestRecord], None] | None], Awaitable[list[RequestRecord]]]


async def _measure(load: Load, config: BenchConfig, names: frozenset[str],
                   progress: Any) -> tuple[list[RequestRecord], list[dict[str, Any]]]:
    async with aiohttp.ClientSession() as session:
        scrapers = [Scraper(url, names, name=label) for label, url in map(split_metrics_url, config.metrics_urls)]
        for scraper in scrapers:
            await scraper.start(session)
        records: list[RequestRecord] = []
        try:
            records = await load(progress)
        finally:
            await stop_all(scrapers, session, sum(1 for r in records if r.ok))
    return records, [s.report() for s in scrapers]


def _figures(records: list[RequestRecord], pattern: loadgen.Pattern, server: list[dict[str, Any]],
             config: BenchConfig, ceiling: dict[str, Any]) -> dict[str, Any]:
    figures = summarize(records, config.slos)
    figures["label"] = pattern.label
    figures.update(pattern.as_dict())
    figures["chunks_per_second"] = sum(len(r.token_times) for r in records) / figures["duration"]
    figures["server_metrics"] = server
    figures["backends"] = backends(server)
    figures["warnings"] = calibrate.warnings_for(figures, ceiling)
    sample_errors = sorted({f"{r.error}: {r.error_detail}" for r in records if r.error_detail})[:5]
    figures["error_samples"] = sample_errors
    figures["requests"] = [_compact(r) for r in sorted(records, key=lambda r: r.start)]
    return figures


def _single_turn_runs(config: BenchConfig, profile: Profile | None, endpoint: Endpoint, names: frozenset[str],
                      ceiling: dict[str, Any], progress_factory: Any) -> list[dict[str, Any]]:
    specs = build_workload(config, profile, config.num_requests + config.warmup)
    api: workloads.Api = "chat" if config.api == "chat" else "completions"
    bodies = [spec.body(endpoint.model, api, config.stream, config.sampling) for spec in specs]
    warmup, measured = bodies[: config.warmup], bodies[config.warmup:]
    runs = []
    for pattern in config.patterns:
        if warmup:
            asyncio.run(loadgen.run(endpoint, warmup, loadgen.Pattern(concurrency=pattern.concurrency or 4)))
        progress = progress_factory(len(measured), pattern.label) if progress_factory else None

        def load(on_done: Callable[[RequestRecord], None] | None,
                 pattern: loadgen.Pattern = pattern) -> Awaitable[list[RequestRecord]]:
            return loadgen.run(endpoint, measured, pattern, config.duration_s, config.seed, on_done=on_done)

        try:
            records, server = asyncio.run(_measure(load, config, names, progress.update_record if progress else None))
        finally:
            if progress:
                progress.close()
        runs.append(_figures(records, pattern, server, config, ceiling))
    return runs


def check_multi_turn(config: BenchConfig) -> None:
    if config.api != "chat":
        raise BenchError("--workload multi-turn sends chat requests (the history is a list of messages): "
                         "drop --api completions")
    if config.output_len is None:
        raise BenchError("--workload multi-turn needs fixed answer lengths (--output-len), not --natural-output")
    if any(p.rate is not None for p in config.patterns) or config.duration_s is not None:
        raise BenchError("--workload multi-turn is a closed loop of conversations: use --concurrency or "
                         "--sweep-concurrency (no --rate, --sweep-rates or --duration)")


def _multi_turn_runs(config: BenchConfig, profile: Profile | None, endpoint: Endpoint, names: frozenset[str],
                     ceiling: dict[str, Any], progress_factory: Any) -> list[dict[str, Any]]:
    """One run per concurrency, each on its own script (seed + index): a second point on the same
    prompts would find them in the server's prefix cache."""
    check_multi_turn(config)
    shape = config.shape()
    counter = workloads.TokenCounter(load_tokenizer(config, profile), "chat")
    try:
        conversations.check_fits(counter, shape, profile.max_model_len if profile else None)
        scripts = [conversations.build(counter, shape, config.seed + i) for i in range(len(config.patterns))]
    except WorkloadError as exc:
        raise BenchError(str(exc)) from None
    runs = []
    for index, (pattern, script) in enumerate(zip(config.patterns, scripts, strict=True)):
        concurrency = pattern.concurrency or 8
        warmup = conversations.warmup_bodies(counter, shape, config.warmup, config.seed + index, endpoint.model,
                                             config.stream, config.sampling)
        if warmup:
            asyncio.run(loadgen.run(endpoint, warmup, loadgen.Pattern(concurrency=concurrency)))
        progress = progress_factory(shape.conversations * shape.turns, pattern.label) if progress_factory else None

        def load(on_done: Callable[[RequestRecord], None] | None, script: conversations.Script = script,
                 concurrency: int = concurrency) -> Awaitable[list[RequestRecord]]:
            return conversation_load.run(endpoint, script, concurrency, config.sampling, config.session_header,
                                         on_done=on_done)

        try:
            records, server = asyncio.run(_measure(load, config, names, progress.update_record if progress else None))
        finally:
            if progress:
                progress.close()
        figures = _figures(records, pattern, server, config, ceiling)
        figures["seed"] = config.seed + index
        figures["turns"] = turn_figures(records, shape.turns)
        figures["conversations_completed"] = conversations_completed(records, shape.conversations, shape.turns)
        runs.append(figures)
    return runs


def run(config: BenchConfig, progress_factory: Any = None) -> dict[str, Any]:
    name, profile = resolve_model(config.base_url, config.model, config.api_key)
    endpoint = Endpoint(config.base_url, name, config.api, config.stream, config.api_key, config.timeout_s)
    # Servers label metrics with the served name, proxies perhaps with an alias: accept all of them.
    names = frozenset({name, *((profile.served_model_name, *profile.alias_names) if profile else ())})
    if config.workload == "multi-turn":
        check_multi_turn(config)

    ceiling = calibrate.measure() if config.calibrate else {}
    runs_of = _multi_turn_runs if config.workload == "multi-turn" else _single_turn_runs
    runs = runs_of(config, profile, endpoint, names, ceiling, progress_factory)

    return {
        "schema_version": SCHEMA_VERSION,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "python": platform.python_version()},
        "config": config.as_dict(),
        "served_model": name,
        "profile": profile.name if profile else None,
        "client_ceiling": ceiling,
        "runs": runs,
        "knee": find_knee(runs) if len(runs) > 2 else None,
    }


def find_knee(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first load point after which more offered load buys < 10% more output throughput
    while median TTFT grows: where the server saturates."""
    for previous, current in itertools.pairwise(runs):
        gain = current["output_throughput"] / previous["output_throughput"] if previous["output_throughput"] else math.inf
        if gain < 1.10 and current["median_ttft_ms"] > previous["median_ttft_ms"]:
            return {"label": previous["label"], "output_throughput": previous["output_throughput"],
                    "median_ttft_ms": previous["median_ttft_ms"]}
    return None
