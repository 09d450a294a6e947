"""A forecast as `plan --workload` prints it: the table, or `--json`, and the command that serves
the recommendation. Every figure is labelled as modelled, with the tool, its data and the GPU."""

from __future__ import annotations

import re
import shlex
from typing import Any

from deploy.engines.registry import engine_for
from deploy.forecast.aic import Figures
from deploy.forecast.choose import BATCH_CAP, Row
from deploy.forecast.run import Forecast

# The --set keys the command that serves a layout sets itself (a user's own --set of them is dropped).
OVERRIDDEN = ("max_num_seqs", "parallelism.tensor")
INDENT = " " * 19


def _version(text: str | None) -> tuple[int, ...] | None:
    parts = re.findall(r"\d+", text or "")[:3]
    return tuple(int(p) for p in parts) if parts else None


def source_text(f: Forecast) -> str:
    text = f.source.text
    data, ours = _version(f.source.data_version), _version(f.engine_version)
    if data and ours and data < ours:
        text += f"; that data predates the {f.engine_label} {f.engine_version} this kit runs"
    return text


def serve_argv(f: Forecast, profile_arg: str, sets: list[str], r: Row) -> list[str]:
    """The command that serves a layout with its max_num_seqs: `deploy serve` on the GPUs, or for an
    engine `serve` does not start, `deploy render` of one replica's argv."""
    lay = r.layout
    kept = [item for item in sets if item.partition("=")[0].strip() not in OVERRIDDEN]
    ours = [f"max_num_seqs={r.max_num_seqs}"]
    if lay.tensor != f.profile.parallelism.tensor:
        ours.append(f"parallelism.tensor={lay.tensor}")
    flags = [arg for item in [*kept, *ours] for arg in ("--set", item)]
    if engine_for(f.profile).serve_refusal(f.profile) is not None:
        return ["python", "-m", "deploy", "render", profile_arg, *flags]
    gpus = ",".join(str(i) for i in range(lay.replicas * lay.gpus_per_replica))
    return ["python", "-m", "deploy", "serve", profile_arg, "--replicas", str(lay.replicas), "--gpus", gpus, *flags]


def _figures_json(figures: Figures | None, replicas: int) -> dict[str, float | None]:
    if figures is None:
        return {"ttft_ms": None, "tpot_ms": None, "tokens_per_s_per_gpu": None, "tokens_per_s": None}
    return {"ttft_ms": figures.ttft_ms, "tpot_ms": figures.tpot_ms,
            "tokens_per_s_per_gpu": figures.tokens_per_s_per_gpu, "tokens_per_s": figures.tokens_per_s * replicas}


def layout_json(r: Row) -> dict[str, Any]:
    """One layout: figures at max_num_seqs (the largest batch within the SLO; null when none is);
    tokens_per_s is for all its replicas."""
    lay = r.layout
    return {
        "tensor": lay.tensor, "pipeline": lay.pipeline, "replicas": lay.replicas,
        "max_num_seqs": r.max_num_seqs, "kv_max_seqs": lay.kv_max_seqs,
        **_figures_json(r.within.figures if r.within else None, lay.replicas),
        "meets_slo": r.within is not None,
        "aiconfigurator_max_seqs": r.holds_max,
        "at_kv_max_seqs": {**_figures_json(r.at_kv.figures, lay.replicas),
                           "kv_cache_warning": r.at_kv.kv_cache_warning, "oom": r.at_kv.oom},
    }


def as_json(f: Forecast, profile_arg: str, sets: list[str]) -> dict[str, Any]:
    s = f.source
    recommended = None
    if f.recommended is not None:
        argv = serve_argv(f, profile_arg, sets, f.recommended)
        recommended = {**layout_json(f.recommended), "command": shlex.join(argv), "argv": argv}
    return {
        "profile": f.profile.name, "gpu": f.gpu.name, "gpus": f.gpus,
        "workload": {"input": f.workload.input, "output": f.workload.output},
        "slo": {"ttft_ms": f.target.ttft_ms, "tpot_ms": f.target.tpot_ms},
        "source": {"text": source_text(f), "tool": "aiconfigurator", "version": s.aiconfigurator,
                   "engine": s.backend, "data_version": s.data_version, "system": s.system,
                   "engine_version": f.engine_version, "modelled": True},
        "layouts": [layout_json(r) for r in f.rows],
        "recommended": recommended,
        "excluded": [{"tensor": e.tensor, "pipeline": e.pipeline, "reason": e.reason} for e in f.excluded],
        "notes": f.notes,
    }


def _cells(batch: str, figures: Figures | None, replicas: int) -> list[str]:
    if figures is None:
        return [batch, "OOM", "", "", ""]
    return [batch, f"{figures.ttft_ms:,.0f}", f"{figures.tpot_ms:.1f}", f"{figures.tokens_per_s_per_gpu:,.0f}",
            f"{figures.tokens_per_s * replicas:,.0f}"]


def _gpus(count: int) -> str:
    return f"{count} GPU" + ("s" if count > 1 else "")


def _slo_text(f: Forecast) -> str:
    bounds = [f"{name} <= {value:,g} ms" for name, value in (("TTFT", f.target.ttft_ms), ("TPOT", f.target.tpot_ms))
              if value is not None]
    return "SLO " + ", ".join(bounds) if bounds else "no SLO (the largest batch aiconfigurator's memory model holds)"


def _table(f: Forecast) -> list[str]:
    total = f"tok/s {_gpus(f.gpus)}"
    head = ["tensor x pipeline", "replicas", *(["batch", "TTFT ms", "TPOT ms", "tok/s/GPU", total] * 2)]
    body = []
    for r in f.rows:
        lay = r.layout
        at_kv = f"{lay.kv_max_seqs:,}" + ("*" if r.at_kv.kv_cache_warning else "")
        within = (_cells(f"{r.within.batch:,}", r.within.figures, lay.replicas) if r.within
                  else ["none", "", "", "", ""])
        body.append([f"{lay.tensor} x {lay.pipeline}", str(lay.replicas),
                     *_cells(at_kv, r.at_kv.figures, lay.replicas), *within])
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        return (first + "".join("  " + c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))).rstrip()

    kv_start = widths[0] + 2 + widths[1] + 2
    kv_width = sum(widths[2:7]) + 2 * 5
    groups = " " * kv_start + "the batch the KV cache holds (memory plan)".ljust(kv_width) + \
        "the largest batch within the SLO: max_num_seqs"
    return [groups, line(head), *(line(cells) for cells in body)]


def as_text(f: Forecast, profile_arg: str, sets: list[str]) -> str:
    out = [
        (f"forecast           {f.profile.name} on {f.gpus} x {f.gpu.name}: {f.workload.input:,} tokens in, "
         f"{f.workload.output:,} out per request; {_slo_text(f)}"),
        f"source             {source_text(f)}",
        "",
        *_table(f),
    ]
    if any(r.at_kv.kv_cache_warning for r in f.rows):
        out.append("* more than aiconfigurator's own memory model holds (it sets more aside than the plan): "
                   "never chosen as max_num_seqs")
    if any(r.at_kv.oom for r in f.rows):
        out.append("OOM: aiconfigurator's memory model does not fit that batch at all")
    if any(r.layout.kv_max_seqs > BATCH_CAP for r in f.rows):
        out.append(f"batches above {BATCH_CAP:,} are not searched (aiconfigurator's figures fall again beyond)")
    out += [f"not listed         tensor {e.tensor} x pipeline {e.pipeline}: {e.reason}" for e in f.excluded]
    out.append("")
    rec = f.recommended
    if rec is None or rec.within is None:
        out.append(f"recommended        none: no layout meets the {_slo_text(f)}; relax it or add GPUs")
    else:
        lay, chosen = rec.layout, rec.within
        fig = chosen.figures
        replicas = f"{lay.replicas} replica" + ("s" if lay.replicas > 1 else "")
        out += [
            (f"recommended        tensor {lay.tensor} x pipeline {lay.pipeline}, {replicas}, max_num_seqs "
             f"{chosen.batch}: {fig.tokens_per_s_per_gpu:,.0f} output tokens/s per GPU, "
             f"{fig.tokens_per_s * lay.replicas:,.0f} on {_gpus(f.gpus)} (TTFT {fig.ttft_ms:,.0f} ms, "
             f"TPOT {fig.tpot_ms:.1f} ms)"),
            f"serve it           {shlex.join(serve_argv(f, profile_arg, sets, rec))}",
        ]
        if engine_for(f.profile).serve_refusal(f.profile) is not None:
            out.append(f"{INDENT}one replica's argv (`serve` starts vLLM only): run {lay.replicas} of them, each on "
                       f"its own {_gpus(lay.gpus_per_replica)} (CUDA_VISIBLE_DEVICES), behind the proxy")
    out.append(f"assumes            batch = requests always in flight (a closed loop; compare `make bench` at that "
               f"concurrency per replica, --input-len {f.workload.input} --output-len {f.workload.output}); one "
               "prompt prefilled per engine step")
    out += [f"note               {note}" for note in f.notes]
    return "\n".join(out)
