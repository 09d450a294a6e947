"""The routing benchmark's figures: one row per setup from its results, printed side by side,
and issue 14's targets checked against them (figures to read, not a test); and the scale-out
mode's figures: the joining replica against the one that served alone."""

from __future__ import annotations

import math
from typing import Any

from benchmarks.conversations import Shape

SINGLE = "one server"
# The setups in the order they run and print; each two-server setup is named by its policy.
POLICIES = ("least_in_flight", "prefix_affinity")


def row(setup: str, result: dict[str, Any], path: str) -> dict[str, Any]:
    """What the comparison needs from one setup's results (its only run), the proxy's routing
    decisions during it included (qwen_proxy_routing_decisions_total by reason)."""
    [run] = result["runs"]
    summary = run.get("backends") or {}
    proxy: dict[str, Any] = next((s for s in run.get("server_metrics", []) if s.get("kind") == "proxy"), {})
    per = summary.get("per_backend", {})
    return {
        "setup": setup,
        "seed": run.get("seed"),
        "completed": run["completed"],
        "failed": run["failed"],
        "conversations_completed": run.get("conversations_completed"),
        "prefix_cache_hit_rate": summary.get("prefix_cache_hit_rate"),
        "requests_per_backend": {name: b["requests"] for name, b in per.items()},
        "hit_rate_per_backend": {name: b["prefix_cache_hit_rate"] for name, b in per.items()},
        "requests_max_over_mean": summary.get("requests_max_over_mean") if len(per) > 1 else None,
        "median_ttft_ms": run["median_ttft_ms"],
        "p99_ttft_ms": run["p99_ttft_ms"],
        "routing_decisions": proxy.get("routing_decisions", {}),
        "results": path,
    }


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


ROWS: list[tuple[str, Any]] = [
    ("prefix-cache hit rate (all vLLMs)", lambda r: _num(r["prefix_cache_hit_rate"], ".2f")),
    ("hit rate per vLLM", lambda r: " / ".join(f"{n} {_num(v, '.2f')}" for n, v in r["hit_rate_per_backend"].items())),
    ("requests per vLLM", lambda r: " / ".join(f"{n} {v:.0f}" for n, v in r["requests_per_backend"].items())),
    ("requests max / mean", lambda r: _num(r["requests_max_over_mean"], ".2f")),
    ("TTFT p50 / p99 (ms)", lambda r: f"{_num(r['median_ttft_ms'], '.0f')} / {_num(r['p99_ttft_ms'], '.0f')}"),
    ("proxy routing decisions", lambda r: " / ".join(f"{n} {v:.0f}" for n, v in r["routing_decisions"].items())
     or "-"),
    ("completed / failed", lambda r: f"{r['completed']} / {r['failed']}"),
    ("seed", lambda r: str(r["seed"])),
]


def side_by_side(shape_name: str, shape: Shape, concurrency: int, rows: list[dict[str, Any]]) -> str:
    header = (f"{shape_name}: {shape.conversations} conversations x {shape.turns} turns, {concurrency} in flight; "
              f"tokens: system {shape.system_tokens}, first turn {shape.first_turn_tokens}, follow-up "
              f"{shape.follow_up_tokens}, answer {shape.output_tokens}")
    cells = [[render(r) for _, render in ROWS] for r in rows]
    width = max(len(label) for label, _ in ROWS) + 2
    widths = [max(len(r["setup"]), *(len(c) for c in col)) + 3 for r, col in zip(rows, cells, strict=True)]
    lines = [header, " " * width + "".join(r["setup"].rjust(w) for r, w in zip(rows, widths, strict=True))]
    for i, (label, _) in enumerate(ROWS):
        lines.append(label.ljust(width) + "".join(col[i].rjust(w) for col, w in zip(cells, widths, strict=True)))
    return "\n".join(lines)


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """Issue 14's targets on the history-dominated shape, each `met` or `NOT met` with its figures."""
    by = {r["setup"]: r for r in rows}
    single, lif, pa = by.get(SINGLE), by.get("least_in_flight"), by.get("prefix_affinity")
    if not (single and lif and pa) or None in (single["prefix_cache_hit_rate"], lif["prefix_cache_hit_rate"],
                                               pa["prefix_cache_hit_rate"]):
        return ["targets: need one server, least_in_flight and prefix_affinity runs with prefix-cache counters"]
    hit_single, hit_lif, hit_pa = (r["prefix_cache_hit_rate"] for r in (single, lif, pa))
    checks = [
        (f"prefix_affinity hit rate {hit_pa:.2f} >= 0.9 x one server's {hit_single:.2f} = {0.9 * hit_single:.2f}",
         hit_pa >= 0.9 * hit_single),
        (f"prefix_affinity hit rate {hit_pa:.2f} >= 1.25 x least_in_flight's {hit_lif:.2f} = {1.25 * hit_lif:.2f}",
         hit_pa >= 1.25 * hit_lif),
        (f"prefix_affinity requests max / mean {_num(pa['requests_max_over_mean'], '.2f')} <= 1.3",
         pa["requests_max_over_mean"] is not None and pa["requests_max_over_mean"] <= 1.3),
        (f"prefix_affinity TTFT p50 {pa['median_ttft_ms']:.0f} ms < least_in_flight's {lif['median_ttft_ms']:.0f} ms",
         pa["median_ttft_ms"] < lif["median_ttft_ms"]),
    ]
    return [f"target {'met' if ok else 'NOT met'}: {text}" for text, ok in checks]


# ---- scale-out (--scale-out): a replica joins while conversations run ------------------------------

def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative bucket counts {le: count} (+Inf included):
    linear within the bucket the rank falls in; the highest finite bound if it falls in +Inf."""
    ordered = sorted(buckets.items())
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def bucket_delta(after: dict[float, float], before: dict[float, float]) -> dict[float, float]:
    return {bound: count - before.get(bound, 0.0) for bound, count in after.items()}


def replica_figures(name: str, joined: bool, before: dict[str, Any], after: dict[str, Any],
                    peak_running: float | None) -> dict[str, Any]:
    """One replica over the time after the join, from two scrapes (`ttft_buckets` of vLLM's
    time_to_first_token_seconds, `finished` requests, and the proxy's `conversations`: the keys it
    holds live there, so the gain is the conversations it took, overflow moves aside)."""
    ttft = bucket_delta(after.get("ttft_buckets", {}), before.get("ttft_buckets", {}))
    p50, p99 = histogram_quantile(0.5, ttft), histogram_quantile(0.99, ttft)
    return {
        "replica": name,
        "joined": joined,
        "requests": after.get("finished", 0.0) - before.get("finished", 0.0),
        "new_conversations": after.get("conversations", 0.0) - before.get("conversations", 0.0),
        "ttft_p50_ms": None if p50 is None else p50 * 1000,
        "ttft_p99_ms": None if p99 is None else p99 * 1000,
        "peak_running": peak_running,
    }


SCALE_OUT_ROWS: list[tuple[str, Any]] = [
    ("requests after the join", lambda r: f"{r['requests']:.0f}"),
    ("conversations taken after the join", lambda r: f"{r['new_conversations']:+.0f}"),
    ("vLLM TTFT p50 / p99 (ms)", lambda r: f"{_num(r['ttft_p50_ms'], '.0f')} / {_num(r['ttft_p99_ms'], '.0f')}"),
    ("peak requests running (vLLM)", lambda r: _num(r["peak_running"], ".0f")),
]


def scale_out_table(summary: dict[str, Any]) -> str:
    """The joining replica against the others, then the client's view before and after the join."""
    replicas = summary["replicas"]
    client = summary["client"]
    header = (f"scale-out: {summary['users']} users, conversations of {summary['shape']['turns']} turns; vLLM "
              f"{summary['joiner']} started after {summary['started_after_s']:.0f} s of load, in rotation "
              f"after {summary['joined_after_s']:.0f} s, then {summary['after_join_s']:.0f} s of load")
    names = [f"{r['replica']} ({'joined' if r['joined'] else 'serving'})" for r in replicas]
    cells = [[render(r) for _, render in SCALE_OUT_ROWS] for r in replicas]
    width = max(len(label) for label, _ in SCALE_OUT_ROWS) + 2
    widths = [max(len(n), *(len(c) for c in col)) + 3 for n, col in zip(names, cells, strict=True)]
    lines = [header, " " * width + "".join(n.rjust(w) for n, w in zip(names, widths, strict=True))]
    for i, (label, _) in enumerate(SCALE_OUT_ROWS):
        lines.append(label.ljust(width) + "".join(col[i].rjust(w) for col, w in zip(cells, widths, strict=True)))
    for when in ("before", "after"):
        part = client[when]
        lines.append(f"client, requests sent {when} the join: {part['requests']}, TTFT p50 / p99 "
                     f"{_num(part['ttft_p50_ms'], '.0f')} / {_num(part['ttft_p99_ms'], '.0f')} ms")
    decided = " / ".join(f"{n} {v:.0f}" for n, v in summary["routing_decisions_after_join"].items()) or "-"
    lines.append(f"proxy routing decisions after the join: {decided}; failed requests: {client['failed']}")
    return "\n".join(lines)
