"""The routing benchmark: the proxy configs it generates, its side-by-side figures and targets
(unit), and one tiny run of the whole thing against real vLLM servers and proxies (structure only:
never timing or hit-rate thresholds); the scale-out mode's scrapes, accounting and report (unit)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.conversations import Shape
from benchmarks.processes import Cores
from benchmarks.records import RequestRecord
from benchmarks.replicas import proxy_config, start_vllm
from benchmarks.routing_report import (
    SINGLE,
    histogram_quantile,
    replica_figures,
    row,
    scale_out_table,
    side_by_side,
    targets,
)
from benchmarks.scale_out import client_figures, engine_values, proxy_values
from deploy.paths import REPO_ROOT
from serving.config import ProxyConfig
from tests.conftest import RunningServer


class RecordingStack:
    def __init__(self) -> None:
        self.started: list[tuple[list[str], str, dict[str, str] | None, set[int] | None]] = []

    def start(self, argv: list[str], health_url: str, timeout: float = 300, env: dict[str, str] | None = None,
              cpus: set[int] | None = None) -> None:
        self.started.append((argv, health_url, env, cpus))


def test_each_benchmark_vllm_is_one_replica_on_its_own_cores() -> None:
    """One `deploy serve` replica per server (on a GPU box serve would otherwise take every GPU, and the
    second server would find none), bound to its cores when they are kept apart."""
    stack = RecordingStack()
    cores = Cores(servers=((0,), (1,)), client=(2,))
    url = start_vllm(stack, "tiny-qwen3", "b", 1, cores, port=9107)  # type: ignore[arg-type]
    [(argv, health, env, cpus)] = stack.started
    assert argv[1:] == ["-m", "deploy", "serve", "tiny-qwen3", "--port", "9107", "--replicas", "1"]
    assert (url, health, env, cpus) == ("http://127.0.0.1:9107", "http://127.0.0.1:9107/health",
                                        {"VLLM_CPU_OMP_THREADS_BIND": "1"}, {1})


@pytest.mark.parametrize("policy", ["least_in_flight", "prefix_affinity"])
def test_generated_proxy_config_is_what_the_proxy_loads(policy: str) -> None:
    config = ProxyConfig.model_validate(
        proxy_config("tiny-qwen3", 9001, ["http://127.0.0.1:8100", "http://127.0.0.1:8101"], policy))
    [model] = config.models
    assert model.routing == policy and model.backends == ["http://127.0.0.1:8100", "http://127.0.0.1:8101"]
    assert config.listen.port == 9001
    single = ProxyConfig.model_validate(proxy_config("tiny-qwen3", 9002, ["http://127.0.0.1:8100"], None))
    assert single.models[0].backends == ["http://127.0.0.1:8100"]


def test_servers_get_cores_of_their_own_and_the_client_side_the_rest() -> None:
    two = Cores.plan([0, 1], 2)  # this machine: the two servers share one, the client side the other
    assert two == Cores(((0,), (0,)), (1,)) and two.env(1) == {"VLLM_CPU_OMP_THREADS_BIND": "0"}
    assert Cores.plan([0, 1, 2, 3], 2) == Cores(((0,), (1,)), (2, 3))
    assert Cores.plan([4, 5, 6], 2) == Cores(((4,), (5,)), (6,))  # the cores this process may use
    assert Cores.plan([0, 1], 1) == Cores(((0,),), (1,))
    assert Cores.plan([3], 2) is None  # one core: nothing to keep apart


def fake_result(seed: int, per_backend: dict[str, tuple[float, float | None]], hit_rate: float | None,
                balance: float | None, ttft: float, decisions: dict[str, float] | None = None) -> dict[str, Any]:
    per = {name: {"requests": requests, "prefix_cache_queries": 1.0, "prefix_cache_hits": 0.0,
                  "prefix_cache_hit_rate": rate} for name, (requests, rate) in per_backend.items()}
    proxy = {"kind": "proxy", "name": "proxy", "requests": 80.0, "routing_decisions": decisions or {}}
    return {"runs": [{"seed": seed, "completed": 80, "failed": 0, "conversations_completed": 16,
                      "median_ttft_ms": ttft, "p99_ttft_ms": ttft * 3,
                      "server_metrics": [{"kind": "vllm", "name": name} for name in per_backend] + [proxy],
                      "backends": {"per_backend": per, "prefix_cache_hit_rate": hit_rate,
                                   "requests_max_over_mean": balance}}]}


ROWS = [
    row(SINGLE, fake_result(1, {"a": (80, 0.68)}, 0.68, 1.0, 377.0), "one.json"),
    row("least_in_flight", fake_result(2, {"a": (41, 0.5), "b": (39, 0.48)}, 0.49, 1.025, 483.0,
                                       {"least_in_flight": 80}), "lif.json"),
    row("prefix_affinity", fake_result(3, {"a": (44, 0.7), "b": (36, 0.66)}, 0.68, 1.1, 390.0,
                                       {"affinity": 62, "new": 16, "overflow": 2}), "pa.json"),
]


def test_rows_carry_the_compared_figures() -> None:
    single, lif, _ = ROWS
    assert single["requests_max_over_mean"] is None  # one server: no balance to speak of
    assert lif == {"setup": "least_in_flight", "seed": 2, "completed": 80, "failed": 0,
                   "conversations_completed": 16, "prefix_cache_hit_rate": 0.49,
                   "requests_per_backend": {"a": 41, "b": 39}, "hit_rate_per_backend": {"a": 0.5, "b": 0.48},
                   "requests_max_over_mean": 1.025, "median_ttft_ms": 483.0, "p99_ttft_ms": 1449.0,
                   "routing_decisions": {"least_in_flight": 80}, "results": "lif.json"}


def test_side_by_side_has_one_column_per_setup() -> None:
    text = side_by_side("history", Shape(), 8, ROWS)
    lines = text.splitlines()
    assert lines[0].startswith("history: 16 conversations x 5 turns, 8 in flight; tokens: system 32")
    assert lines[1].split() == ["one", "server", "least_in_flight", "prefix_affinity"]
    table = {line[:34].strip(): line[34:].split() for line in lines[2:]}
    assert table["prefix-cache hit rate (all vLLMs)"] == ["0.68", "0.49", "0.68"]
    assert table["requests per vLLM"] == ["a", "80", "a", "41", "/", "b", "39", "a", "44", "/", "b", "36"]
    assert table["requests max / mean"] == ["-", "1.02", "1.10"]
    assert table["TTFT p50 / p99 (ms)"] == ["377", "/", "1131", "483", "/", "1449", "390", "/", "1170"]
    assert table["proxy routing decisions"] == ["-", "least_in_flight", "80", "affinity", "62", "/", "new", "16",
                                                "/", "overflow", "2"]


def test_targets_say_which_hold() -> None:
    lines = targets(ROWS)
    assert lines == [
        "target met: prefix_affinity hit rate 0.68 >= 0.9 x one server's 0.68 = 0.61",
        "target met: prefix_affinity hit rate 0.68 >= 1.25 x least_in_flight's 0.49 = 0.61",
        "target met: prefix_affinity requests max / mean 1.10 <= 1.3",
        "target met: prefix_affinity TTFT p50 390 ms < least_in_flight's 483 ms",
    ]
    worse = [*ROWS[:2], row("prefix_affinity", fake_result(3, {"a": (70, 0.5), "b": (10, 0.1)}, 0.5, 1.75, 500.0),
                            "pa.json")]
    assert [line.split(":")[0] for line in targets(worse)] == ["target NOT met"] * 4
    assert targets(ROWS[:2]) == [
        "targets: need one server, least_in_flight and prefix_affinity runs with prefix-cache counters"]


@pytest.mark.e2e
def test_benchmark_runs_every_setup_and_shape(vllm_server: RunningServer, tmp_path: Path) -> None:
    """Tiny counts against the session's vLLM (a) and one it starts (b): every setup of both shapes
    ran, each on its own seed, and the summary and table carry the figures."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.routing", "--conversations", "2", "--turns", "2", "--concurrency", "2",
         "--output-len", "8", "--warmup", "1", "--seed", "100", "--backend-url", vllm_server.base_url,
         "--results-dir", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    [summary_path] = tmp_path.glob("routing-*/summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["backends"]["a"] == vllm_server.base_url and summary["backends"]["b"] != vllm_server.base_url
    assert list(summary["shapes"]) == ["history", "long-system"]
    seeds = []
    for shape in summary["shapes"].values():
        assert [r["setup"] for r in shape["setups"]] == [SINGLE, "least_in_flight", "prefix_affinity"]
        for setup in shape["setups"]:
            seeds.append(setup["seed"])
            assert (setup["completed"], setup["failed"], setup["conversations_completed"]) == (4, 0, 2)
            expected = ["a"] if setup["setup"] == SINGLE else ["a", "b"]
            assert sorted(setup["requests_per_backend"]) == expected
            assert sum(setup["requests_per_backend"].values()) == 4   # warm-up excluded
            assert 0 <= setup["prefix_cache_hit_rate"] <= 1
            assert Path(setup["results"]).is_file()
    assert seeds == list(range(100, 106))                              # fresh prompts every run
    assert len(summary["shapes"]["history"]["targets"]) == 4
    assert "prefix-cache hit rate (all vLLMs)" in done.stdout and "requests max / mean" in done.stdout
    for shape in summary["shapes"].values():  # the proxy's decisions, the warm-up's excluded
        decided = {r["setup"]: r["routing_decisions"] for r in shape["setups"]}
        assert decided["least_in_flight"] == {"least_in_flight": 4}
        assert sum(decided["prefix_affinity"].values()) == 4 and decided["prefix_affinity"]["new"] == 2


# ---- --scale-out: its accounting and report (the run itself is a benchmark, not a test) -------------

def test_histogram_quantile_interpolates_within_the_bucket_as_prometheus_does() -> None:
    buckets = {0.1: 50.0, 0.25: 90.0, 0.5: 100.0, math.inf: 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.7, buckets) == pytest.approx(0.1 + 0.15 * 20 / 40)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.25 + 0.25 * 9 / 10)
    assert histogram_quantile(0.99, {0.1: 0.0, 0.5: 1.0, math.inf: 2.0}) == 0.5  # in +Inf: the top finite bound
    assert histogram_quantile(0.99, {0.1: 0.0, math.inf: 0.0}) is None
    assert histogram_quantile(0.5, {}) is None


VLLM_TEXT = """# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="tiny-qwen3"} 4.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.5",model_name="tiny-qwen3"} 9.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="tiny-qwen3"} 10.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="tiny-qwen3"} 10.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="tiny-qwen3"} 2.0
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="length",model_name="tiny-qwen3"} 8.0
vllm:request_success_total{engine="0",finished_reason="stop",model_name="tiny-qwen3"} 2.0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny-qwen3"} 3.0
"""

PROXY_TEXT = """# TYPE qwen_proxy_backend_conversations gauge
qwen_proxy_backend_conversations{backend="http://127.0.0.1:1",model="tiny-qwen3"} 40.0
qwen_proxy_backend_conversations{backend="http://127.0.0.1:2",model="tiny-qwen3"} 12.0
# TYPE qwen_proxy_routing_decisions_total counter
qwen_proxy_routing_decisions_total{model="tiny-qwen3",reason="new"} 52.0
qwen_proxy_routing_decisions_total{model="tiny-qwen3",reason="affinity"} 200.0
"""


def test_scrapes_are_read_per_replica() -> None:
    assert engine_values(VLLM_TEXT) == {"ttft_buckets": {0.1: 4.0, 0.5: 9.0, math.inf: 10.0}, "finished": 10.0,
                                        "running": 3.0}
    assert proxy_values(PROXY_TEXT, {"a": "http://127.0.0.1:1", "b": "http://127.0.0.1:2"}) == {
        "conversations": {"a": 40.0, "b": 12.0}, "decisions": {"new": 52.0, "affinity": 200.0}}


def test_replica_figures_are_the_differences_over_the_time_after_the_join() -> None:
    before = {"ttft_buckets": {0.1: 40.0, 0.5: 50.0, math.inf: 50.0}, "finished": 50.0, "conversations": 30.0}
    after = {"ttft_buckets": {0.1: 90.0, 0.5: 150.0, math.inf: 150.0}, "finished": 150.0, "conversations": 38.0}
    a = replica_figures("a", False, before, after, 9.0)
    assert a["requests"] == 100 and a["new_conversations"] == 8 and a["peak_running"] == 9.0
    assert a["ttft_p50_ms"] == pytest.approx(100.0)  # 50 of the 100 after the join under 0.1 s
    assert a["ttft_p99_ms"] == pytest.approx((0.1 + 0.4 * 49 / 50) * 1000)
    b = replica_figures("b", True, {}, {"ttft_buckets": {0.1: 0.0, math.inf: 0.0}, "finished": 0.0}, None)
    assert (b["requests"], b["new_conversations"], b["ttft_p99_ms"], b["joined"]) == (0, 0, None, True)


def test_the_scale_out_table_sets_the_joiner_against_the_others() -> None:
    summary = {
        "users": 16, "shape": {"turns": 5}, "joiner": "b", "started_after_s": 20.2, "joined_after_s": 58.9,
        "after_join_s": 60.0,
        "replicas": [{"replica": "a", "joined": False, "requests": 300.0, "new_conversations": 20.0,
                      "ttft_p50_ms": 80.0, "ttft_p99_ms": 240.5, "peak_running": 7.0},
                     {"replica": "b", "joined": True, "requests": 420.0, "new_conversations": 64.0,
                      "ttft_p50_ms": 95.0, "ttft_p99_ms": None, "peak_running": 11.0}],
        "client": {"before": {"requests": 200, "ttft_p50_ms": 70.0, "ttft_p99_ms": 150.0},
                   "after": {"requests": 720, "ttft_p50_ms": 90.0, "ttft_p99_ms": 300.0}, "failed": 0},
        "routing_decisions_after_join": {"affinity": 636.0, "new": 84.0},
    }
    lines = scale_out_table(summary).splitlines()
    assert lines[0] == ("scale-out: 16 users, conversations of 5 turns; vLLM b started after 20 s of load, in "
                        "rotation after 59 s, then 60 s of load")
    assert lines[1].split() == ["a", "(serving)", "b", "(joined)"]
    table = {line[:36].strip(): line[36:].split() for line in lines[2:6]}
    assert table["requests after the join"] == ["300", "420"]
    assert table["conversations taken after the join"] == ["+20", "+64"]
    assert table["vLLM TTFT p50 / p99 (ms)"] == ["80", "/", "240", "95", "/", "-"]
    assert table["peak requests running (vLLM)"] == ["7", "11"]
    assert lines[6:] == [
        "client, requests sent before the join: 200, TTFT p50 / p99 70 / 150 ms",
        "client, requests sent after the join: 720, TTFT p50 / p99 90 / 300 ms",
        "proxy routing decisions after the join: affinity 636 / new 84; failed requests: 0"]


def test_client_figures_split_at_the_join() -> None:
    records = [RequestRecord(index=i, start=float(i), ok=True, token_times=[0.01 * (i + 1)]) for i in range(10)]
    records.append(RequestRecord(index=10, start=3.5))  # failed: counted, no TTFT
    before, after = client_figures(records, until=5.0), client_figures(records, since=5.0)
    assert before["requests"] == 6 and after["requests"] == 5
    assert before["ttft_p50_ms"] == pytest.approx(30.0) and after["ttft_p50_ms"] == pytest.approx(80.0)
