"""Readers of a results JSON: the console table, the file writer, and `compare`."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from benchmarks.server_metrics import ENGINE_COUNTERS

RESULTS_DIR = Path("results")

# (label, key, format) for the summary table; one column per load point.
ROWS: list[tuple[str, str, str]] = [
    ("completed / failed", "_counts", "{}"),
    ("duration (s)", "duration", "{:.1f}"),
    ("request throughput (req/s)", "request_throughput", "{:.2f}"),
    ("goodput (req/s)", "request_goodput", "{:.2f}"),
    ("input tokens/s", "input_throughput", "{:.0f}"),
    ("output tokens/s", "output_throughput", "{:.0f}"),
    ("TTFT median / p99 (ms)", "_ttft", "{}"),
    ("TPOT median / p99 (ms)", "_tpot", "{}"),
    ("ITL median / p99 (ms)", "_itl", "{}"),
    ("E2E median / p99 (ms)", "_e2el", "{}"),
    ("TTFT mean / p90 / max (ms)", "_ttft_more", "{}"),
    ("server: tokens in / out", "_server_tokens", "{}"),
    ("server: preemptions", "_preemptions", "{}"),
    ("server: peak KV cache", "_kv", "{}"),
    ("server: requests per vLLM", "_backend_requests", "{}"),
    ("server: prefix-cache hit rate", "_hit_rate", "{}"),
]


def _fmt(value: float) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"


def _vllm(run: dict[str, Any]) -> dict[str, Any]:
    """The engines' counters (vLLM's or SGLang's) summed over every engine scraped, peaks as the highest."""
    total: dict[str, Any] = {}
    for server in run.get("server_metrics", []):
        if server.get("kind") not in ENGINE_COUNTERS:
            continue
        for key, value in server.items():
            if key.startswith("peak_"):
                total[key] = max(total.get(key, 0.0), value)
            elif isinstance(value, (int, float)) and key != "prefix_cache_hit_rate":
                total[key] = total.get(key, 0.0) + value
    return total


def _backend_cells(run: dict[str, Any]) -> tuple[str, str]:
    """(requests per vLLM server with max/mean, prefix-cache hit rate overall and per server)."""
    summary = run.get("backends")
    if not summary:
        return "-", "-"
    per = summary["per_backend"]
    rate = "-" if summary["prefix_cache_hit_rate"] is None else f"{summary['prefix_cache_hit_rate']:.2f}"
    if len(per) == 1:
        return f"{summary['requests']:.0f}", rate
    requests = " / ".join(f"{name} {b['requests']:.0f}" for name, b in per.items())
    balance = summary["requests_max_over_mean"]
    rates = " / ".join(f"{name} {'-' if b['prefix_cache_hit_rate'] is None else format(b['prefix_cache_hit_rate'], '.2f')}"
                       for name, b in per.items())
    return (f"{requests} (max/mean {'-' if balance is None else format(balance, '.2f')})", f"{rate} ({rates})")


def cell(run: dict[str, Any], key: str, fmt: str) -> str:
    if key == "_counts":
        return f"{run['completed']} / {run['failed']}"
    if key in ("_ttft", "_tpot", "_itl", "_e2el"):
        name = key[1:]
        return f"{_fmt(run[f'median_{name}_ms'])} / {_fmt(run[f'p99_{name}_ms'])}"
    if key == "_ttft_more":
        return " / ".join(_fmt(run[f"{s}_ttft_ms"]) for s in ("mean", "p90", "max"))
    if key == "_backend_requests":
        return _backend_cells(run)[0]
    if key == "_hit_rate":
        return _backend_cells(run)[1]
    vllm = _vllm(run)
    if key == "_server_tokens":
        if "prompt_tokens" not in vllm:
            return "-"
        return f"{vllm['prompt_tokens']:.0f} / {vllm['generation_tokens']:.0f}"
    if key == "_preemptions":
        return f"{vllm['preemptions']:.0f}" if "preemptions" in vllm else "-"
    if key == "_kv":
        return f"{vllm['peak_kv_cache_usage']:.1%}" if "peak_kv_cache_usage" in vllm else "-"
    value = run.get(key)
    return "-" if value is None else fmt.format(value)


def table(result: dict[str, Any]) -> str:
    runs = result["runs"]
    config = result["config"]
    workload = config["workload"]
    if workload == "multi-turn":
        workload = (f"multi-turn ({config['conversations']} conversations x {config['turns']} turns; tokens: "
                    f"system {config['system_len']}, first turn {config['first_turn_len']}, follow-up "
                    f"{config['follow_up_len']}, answer {config['output_len']})")
    header = (f"{workload} workload against {result['served_model']} at {config['base_url']} "
              f"({config['api']}, {'streaming' if config['stream'] else 'not streaming'}, "
              f"seed {config['seed']})")
    width = max(len(label) for label, _, _ in ROWS) + 2
    columns = [[cell(run, key, fmt) for _, key, fmt in ROWS] for run in runs]
    col_width = [max(len(run["label"]), *(len(c) for c in col)) + 2 for run, col in zip(runs, columns, strict=True)]
    lines = [header, "", " " * width + "".join(r["label"].rjust(w) for r, w in zip(runs, col_width, strict=True))]
    for i, (label, _, _) in enumerate(ROWS):
        lines.append(label.ljust(width) + "".join(col[i].rjust(w) for col, w in zip(columns, col_width, strict=True)))
    for run in runs:
        if run["errors"]:
            lines.append(f"errors at {run['label']}: " + ", ".join(f"{k} x{v}" for k, v in run["errors"].items()))
        reasoning = run.get("reasoning")
        if reasoning:
            lines.append(f"reasoning at {run['label']}: {reasoning['reasoning_tokens']} reasoning / "
                         f"{reasoning['answer_tokens']} answer tokens ({reasoning['reasoning_tokens_source']}), "
                         f"time to first answer token median {_fmt(reasoning['median_ttfat_ms'])} ms")
        if run.get("turns"):
            lines.append(f"by turn at {run['label']}: " + ", ".join(
                f"{t['turn']}: TTFT median {_fmt(t['median_ttft_ms'])} ms over "
                f"{'-' if t['mean_prompt_tokens'] is None else format(t['mean_prompt_tokens'], '.0f')} tokens"
                for t in run["turns"]))
        for warning in run["warnings"]:
            lines.append(f"warning: {warning}")
        if run.get("missing_usage"):
            lines.append(f"warning: {run['missing_usage']} responses carried no usage: token figures undercount")
    ceiling = result.get("client_ceiling") or {}
    if ceiling:
        lines.append(f"client ceiling on this machine: {ceiling['max_request_rate']:.0f} req/s, "
                     f"{ceiling['max_chunk_rate']:.0f} chunks/s against an instant upstream")
    if result.get("knee"):
        knee = result["knee"]
        lines.append(f"saturation knee: {knee['label']} ({knee['output_throughput']:.0f} output tokens/s, "
                     f"median TTFT {knee['median_ttft_ms']:.0f} ms); beyond it latency grows, throughput does not")
    if any(r.get("request_goodput") is not None for r in runs):
        slos = ", ".join(f"{s['metric']} <= {s['limit_s'] * 1000:g} ms" for s in config["slos"])
        lines.append(f"goodput: completed requests meeting {slos}, per second")
    return "\n".join(lines)


def result_stem(result: dict[str, Any]) -> str:
    created = re.sub(r"[^0-9T]", "", result["created"])[:15]
    model = re.sub(r"[^A-Za-z0-9._-]", "_", result["served_model"])
    return f"{created}-{model}-{result['config']['workload']}"


def _strict(value: Any) -> Any:
    """NaN (a figure with no samples) as null: strict JSON readers reject NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict(v) for v in value]
    return value


def write(result: dict[str, Any], directory: Path) -> Path:
    return write_to(result, directory / f"{result_stem(result)}.json")


def write_to(result: dict[str, Any], path: Path) -> Path:
    """The results as strict JSON at `path` (directories created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_strict(result), indent=1, allow_nan=False) + "\n")
    return path


def load(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    if not isinstance(data, dict) or "runs" not in data:
        raise ValueError(f"{path} is not a benchmark result (no 'runs')")
    return data


COMPARED = [
    ("request_throughput", "req/s", True), ("output_throughput", "output tok/s", True),
    ("request_goodput", "goodput req/s", True),
    ("median_ttft_ms", "TTFT median ms", False), ("p99_ttft_ms", "TTFT p99 ms", False),
    ("median_tpot_ms", "TPOT median ms", False), ("p99_tpot_ms", "TPOT p99 ms", False),
    ("median_itl_ms", "ITL median ms", False), ("median_e2el_ms", "E2E median ms", False),
    ("failed", "failed", False),
]


def compare(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Per load point (matched by label, else by position): A, B, and B's change vs A."""
    lines = [f"A: {a['served_model']} {a['config']['workload']} ({a['created']})",
             f"B: {b['served_model']} {b['config']['workload']} ({b['created']})"]
    b_runs = {r["label"]: r for r in b["runs"]}
    for index, run_a in enumerate(a["runs"]):
        run_b = b_runs.get(run_a["label"]) or (b["runs"][index] if index < len(b["runs"]) else None)
        if run_b is None:
            lines.append(f"\n{run_a['label']}: not in B")
            continue
        lines.append(f"\n{run_a['label']}" + (f" vs {run_b['label']}" if run_b["label"] != run_a["label"] else ""))
        lines.append(f"  {'metric':<18}{'A':>12}{'B':>12}{'change':>10}")
        for key, label, higher_is_better in COMPARED:
            va, vb = run_a.get(key), run_b.get(key)
            if va is None or vb is None:
                continue
            change = "" if not va or math.isnan(va) or math.isnan(vb) else f"{(vb - va) / va:+.1%}"
            better = "" if not change or vb == va else (" better" if (vb > va) == higher_is_better else " worse")
            lines.append(f"  {label:<18}{va:>12.2f}{vb:>12.2f}{change:>10}{better}")
    return "\n".join(lines)
