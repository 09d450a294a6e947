"""Results files, compare, the client-ceiling warning and the CLI's value parsers."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import pytest

from benchmarks import calibrate, report
from benchmarks.cli import sampling
from benchmarks.records import RequestRecord
from benchmarks.stats import summarize


def result_with(run: dict[str, Any]) -> dict[str, Any]:
    return {"created": "2026-11-26T00:00:00+00:00", "served_model": "tiny-qwen3",
            "config": {"workload": "synthetic"}, "runs": [run]}


def test_results_file_is_strict_json_with_null_for_figures_without_samples(tmp_path: Path) -> None:
    one_token = RequestRecord(index=0, start=0.0, ok=True, token_times=[0.1], end=0.1, completion_tokens=1)
    run = summarize([one_token]) | {"label": "concurrency=1"}
    assert math.isnan(run["median_tpot_ms"])
    path = report.write(result_with(run), tmp_path)
    text = path.read_text()
    assert "NaN" not in text
    loaded = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert loaded["runs"][0]["median_tpot_ms"] is None
    assert loaded["runs"][0]["median_ttft_ms"] == pytest.approx(100.0)
    assert report.load(path) == loaded


def test_compare_reports_changes_and_which_way_is_better() -> None:
    base = {"label": "rate=4/s", "request_throughput": 10.0, "output_throughput": 1000.0,
            "median_ttft_ms": 50.0, "p99_ttft_ms": 80.0, "failed": 0, "median_tpot_ms": None}
    a = result_with(base)
    b = result_with(base | {"output_throughput": 1100.0, "median_ttft_ms": 60.0})
    out = report.compare(a, b)
    assert "output tok/s" in out and "+10.0% better" in out
    assert "TTFT median ms" in out and "+20.0% worse" in out
    assert "TPOT median ms" not in out  # no figure on either side: left out, not printed as 0


def test_load_refuses_what_is_not_a_result(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="is not a benchmark result"):
        report.load(tmp_path / "x.json")
    with pytest.raises(ValueError, match="cannot read"):
        report.load(tmp_path / "missing.json")


def test_warns_when_a_run_uses_over_half_of_the_clients_ceiling() -> None:
    ceiling = {"max_request_rate": 1000.0, "max_chunk_rate": 20000.0}
    quiet = {"label": "rate=4/s", "request_throughput": 400.0, "chunks_per_second": 9000.0}
    assert calibrate.warnings_for(quiet, ceiling) == []
    busy = {"label": "rate=inf", "request_throughput": 600.0, "chunks_per_second": 12000.0}
    warnings = calibrate.warnings_for(busy, ceiling)
    assert len(warnings) == 2
    assert "600.0 req/s is over 50% of this client's ceiling (1000 req/s)" in warnings[0]
    assert "12000 chunks/s" in warnings[1]
    assert calibrate.warnings_for(busy, {}) == []   # --no-calibrate: nothing to compare with


def test_sampling_fields_parse_as_json_values() -> None:
    assert sampling("temperature=0.6, top_p=0.95,top_k=20,stop=[\"x\"],seed=null") == {
        "temperature": 0.6, "top_p": 0.95, "top_k": 20, "stop": ["x"], "seed": None}
    assert sampling("chat_template_kwargs={\"enable_thinking\": false}") == {
        "chat_template_kwargs": {"enable_thinking": False}}
    with pytest.raises(argparse.ArgumentTypeError, match="expected key=value"):
        sampling("temperature")
