"""From aiconfigurator's points to a choice: the batch each layout can run within the SLO, and
the layout (and max_num_seqs) to serve. Pure functions over typed points.

TTFT, TPOT and tokens/s are not monotonic in the batch (aiconfigurator's GEMM tables step at
multiples of 16), so every batch up to the bound is estimated and scanned; nothing bisects.
A batch counts only where aiconfigurator's own memory model holds it: it flags a batch whose KV
cache exceeds its estimate of what the memory fraction holds (`kv_cache_warning`: the engine
would queue the excess, so the figures are not what that many requests in flight would see) and
finds no room at all beyond (OOM). Its estimate is 3-16% below the memory plan's (it reserves
3.5 GiB and activations where the plan allows 2 GiB), so the batch within the SLO is at most
what both hold.
"""

from __future__ import annotations

from dataclasses import dataclass

from deploy.forecast.aic import Figures, Point
from deploy.forecast.layouts import Layout

# aiconfigurator's own sweeps stop here, and its figures fall again beyond (TP8 on H200: 28,420
# tokens/s at 1,024 in flight, 24,072 at 1,536): no max_num_seqs above it is recommended.
BATCH_CAP = 1024


@dataclass(frozen=True)
class Target:
    """The SLO: each bound None when not set."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def met_by(self, figures: Figures) -> bool:
        return ((self.ttft_ms is None or figures.ttft_ms <= self.ttft_ms)
                and (self.tpot_ms is None or figures.tpot_ms <= self.tpot_ms))


def batches(layout: Layout) -> list[int]:
    """The batches to estimate: 1 up to the KV bound (at most BATCH_CAP), and the KV bound itself."""
    top = min(layout.kv_max_seqs, BATCH_CAP)
    return [*range(1, top + 1), *([layout.kv_max_seqs] if layout.kv_max_seqs > top else [])]


@dataclass(frozen=True)
class Chosen:
    """A batch aiconfigurator's memory model holds and that meets the SLO: the max_num_seqs."""

    batch: int
    figures: Figures


@dataclass(frozen=True)
class Row:
    """One layout's forecast: at the batch its KV cache holds, and at the largest batch within the SLO."""

    layout: Layout
    at_kv: Point  # at layout.kv_max_seqs requests in flight
    within: Chosen | None  # the largest batch (<= the KV bound and BATCH_CAP) within the SLO; None: none is
    holds_max: int | None  # the largest batch aiconfigurator's memory model holds, within the sweep

    @property
    def max_num_seqs(self) -> int | None:
        return self.within.batch if self.within else None


def row(layout: Layout, points: list[Point], target: Target) -> Row:
    by_batch = {point.batch: point for point in points}
    top = min(layout.kv_max_seqs, BATCH_CAP)
    held = [Chosen(p.batch, p.held) for p in points if p.batch <= top and p.held is not None]
    meeting = [chosen for chosen in held if target.met_by(chosen.figures)]
    return Row(
        layout=layout,
        at_kv=by_batch[layout.kv_max_seqs],
        within=max(meeting, key=lambda c: c.batch) if meeting else None,
        holds_max=max(c.batch for c in held) if held else None,
    )


def recommend(rows: list[Row]) -> Row | None:
    """The layout with the most output tokens/s per GPU at its batch within the SLO (every layout
    fills the same GPUs, so this is also the most for all of them); on a tie the smaller replica,
    as a failure then takes fewer GPUs' share. None when no layout meets the SLO."""
    def score(r: Row) -> tuple[float, int]:
        assert r.within is not None
        return r.within.figures.tokens_per_s_per_gpu, -r.layout.gpus_per_replica

    # max() keeps the first of equals: the earlier layout, as listed.
    return max((r for r in rows if r.within is not None), key=score, default=None)
