"""PNG plots of a results JSON: latency distributions per load point, and the sweep curve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import itertools

import matplotlib.pyplot as plt


def _per_request(run: dict[str, Any], key: str) -> list[float]:
    return [r[key] * 1000 for r in run["requests"] if r["ok"] and r.get(key) is not None]


def _itls(run: dict[str, Any]) -> list[float]:
    gaps = []
    for request in run["requests"]:
        times = request["token_times"]
        gaps += [(b - a) * 1000 for a, b in itertools.pairwise(times)]
    return gaps


def distributions(result: dict[str, Any], path: Path) -> Path:
    fig, (ax_ttft, ax_itl) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in result["runs"]:
        ttft = _per_request(run, "ttft")
        if ttft:
            ax_ttft.hist(ttft, bins=40, histtype="step", linewidth=1.5, label=run["label"])
        itl = _itls(run)
        if itl:
            ax_itl.hist(itl, bins=60, histtype="step", linewidth=1.5, label=run["label"])
    ax_ttft.set(title="Time to first token", xlabel="ms", ylabel="requests")
    ax_itl.set(title="Inter-token latency", xlabel="ms", ylabel="gaps", yscale="log")
    for ax in (ax_ttft, ax_itl):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result['served_model']}: {result['config']['workload']} workload")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep(result: dict[str, Any], path: Path) -> Path:
    """Throughput-latency curve: each point a load level; the knee is where it turns up."""
    runs = result["runs"]
    x = [r["output_throughput"] for r in runs]
    fig, (ax_ttft, ax_tpot) = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, name, title in ((ax_ttft, "ttft", "TTFT"), (ax_tpot, "tpot", "TPOT")):
        ax.plot(x, [r[f"median_{name}_ms"] for r in runs], "o-", label="median")
        ax.plot(x, [r[f"p99_{name}_ms"] for r in runs], "s--", label="p99")
        for r, xi in zip(runs, x, strict=True):
            ax.annotate(r["label"].split("=", 1)[-1], (xi, r[f"median_{name}_ms"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
        ax.set(title=f"{title} vs output throughput", xlabel="output tokens/s", ylabel="ms")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    knee = result.get("knee")
    if knee:
        for ax in (ax_ttft, ax_tpot):
            ax.axvline(knee["output_throughput"], color="grey", linestyle=":", label="knee")
    fig.suptitle(f"{result['served_model']}: load sweep ({result['config']['workload']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(result: dict[str, Any], stem: Path) -> list[Path]:
    paths = [distributions(result, stem.with_name(stem.name + "-latency.png"))]
    if len(result["runs"]) > 1:
        paths.append(sweep(result, stem.with_name(stem.name + "-sweep.png")))
    return paths
