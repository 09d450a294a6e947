"""Several vLLM servers' /metrics in one run: labelled URLs, per-server requests and prefix-cache
hits, the overall hit rate and balance, and how the report prints them."""

from __future__ import annotations

import pytest

from benchmarks import report
from benchmarks.cli import build_parser
from benchmarks.server_metrics import Scraper, backends, parse, split_metrics_url

MODELS = frozenset({"tiny-qwen3", "tiny"})


def vllm_text(requests: int, queries: int, hits: int, model: str = "tiny-qwen3") -> str:
    """vLLM 0.32's exposition of the counters the report reads (names as its loggers define them)."""
    labels = f'engine="0",model_name="{model}"'
    return "\n".join([
        "# HELP vllm:request_success_total Count of successfully processed requests.",
        "# TYPE vllm:request_success_total counter",
        f'vllm:request_success_total{{{labels},finished_reason="length"}} {requests}.0',
        "# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.",
        "# TYPE vllm:prefix_cache_queries_total counter",
        f"vllm:prefix_cache_queries_total{{{labels}}} {queries}.0",
        "# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.",
        "# TYPE vllm:prefix_cache_hits_total counter",
        f"vllm:prefix_cache_hits_total{{{labels}}} {hits}.0",
        "",
    ])


def scraped(name: str, before: str, after: str) -> Scraper:
    scraper = Scraper(f"http://{name}:8000/metrics", MODELS, name=name)
    scraper.before, scraper.after = parse(before, MODELS), parse(after, MODELS)
    return scraper


@pytest.mark.parametrize(("spec", "expected"), [
    ("a=http://127.0.0.1:8100/metrics", ("a", "http://127.0.0.1:8100/metrics")),
    ("vllm-b=https://vllm-b:8000/metrics", ("vllm-b", "https://vllm-b:8000/metrics")),
    ("http://127.0.0.1:8100/metrics", ("127.0.0.1:8100", "http://127.0.0.1:8100/metrics")),
    ("http://h:1/metrics?name=a=b", ("h:1", "http://h:1/metrics?name=a=b")),  # '=' in a query is not a label
])
def test_metrics_urls_may_carry_a_name(spec: str, expected: tuple[str, str]) -> None:
    assert split_metrics_url(spec) == expected


def test_a_metrics_url_that_is_not_a_url_is_one_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["run", "--model", "tiny", "--metrics-url", "a=vllm:8000/metrics"])
    assert exited.value.code == 2
    assert "expected URL or NAME=URL with an http(s):// URL" in capsys.readouterr().err


def test_per_backend_requests_and_the_overall_hit_rate() -> None:
    a = scraped("a", vllm_text(10, 1000, 100), vllm_text(40, 1100, 190))      # 30 requests, 90 of 100 cached
    b = scraped("b", vllm_text(0, 0, 0), vllm_text(10, 300, 30))              # 10 requests, 30 of 300
    other_model = scraped("c", vllm_text(0, 0, 0, "qwq-32b"), vllm_text(99, 999, 999, "qwq-32b"))
    summary = backends([a.report(), b.report(), other_model.report(), {"url": "p", "kind": "proxy"}])
    assert summary is not None
    assert summary["per_backend"]["a"] == {"requests": 30, "prefix_cache_queries": 100, "prefix_cache_hits": 90,
                                           "prefix_cache_hit_rate": 0.9}
    assert summary["per_backend"]["b"]["prefix_cache_hit_rate"] == pytest.approx(0.1)
    # A server with only another model's series is not a backend of this run.
    assert set(summary["per_backend"]) == {"a", "b"}
    # Hits over queries summed (tokens), not the mean of the servers' rates.
    assert summary["prefix_cache_hit_rate"] == pytest.approx(120 / 400)
    assert summary["requests"] == 40
    assert summary["requests_max_over_mean"] == pytest.approx(30 / 20)


def proxy_text(requests: int, decisions: dict[str, int], model: str = "tiny-qwen3") -> str:
    lines = ["# TYPE qwen_proxy_requests counter",
             f'qwen_proxy_requests_total{{model="{model}",route="chat",status="200"}} {requests}.0',
             "# TYPE qwen_proxy_routing_decisions counter"]
    lines += [f'qwen_proxy_routing_decisions_total{{model="{model}",reason="{reason}"}} {n}.0'
              for reason, n in decisions.items()]
    return "\n".join([*lines, ""])


def test_the_proxys_routing_decisions_are_counted_per_reason_over_the_run() -> None:
    proxy = scraped("proxy", proxy_text(4, {"new": 4, "affinity": 0, "overflow": 0}),
                    proxy_text(84, {"new": 20, "affinity": 62, "overflow": 2}))
    report = proxy.report()
    assert report["kind"] == "proxy" and report["requests"] == 80
    assert report["routing_decisions"] == {"affinity": 62, "new": 16, "overflow": 2}  # none of 0 listed
    both = scraped("proxy", proxy_text(0, {"new": 0}) + proxy_text(0, {"new": 0}, "qwq-32b"),
                   proxy_text(3, {"new": 3}) + proxy_text(9, {"new": 9}, "qwq-32b"))
    assert both.report()["routing_decisions"] == {"new": 3}  # another model's decisions are not this run's


def test_no_vllm_scraped_no_backends() -> None:
    assert backends([{"url": "p", "kind": "proxy", "requests": 3}]) is None


def test_the_report_shows_each_backend_and_the_balance() -> None:
    a = scraped("a", vllm_text(0, 0, 0), vllm_text(30, 100, 90))
    b = scraped("b", vllm_text(0, 0, 0), vllm_text(10, 300, 30))
    server = [a.report(), b.report()]
    run = {"label": "concurrency=8", "completed": 40, "failed": 0, "errors": {}, "warnings": [],
           "server_metrics": server, "backends": backends(server)}
    assert report.cell(run, "_backend_requests", "{}") == "a 30 / b 10 (max/mean 1.50)"
    assert report.cell(run, "_hit_rate", "{}") == "0.30 (a 0.90 / b 0.10)"
    single = {**run, "server_metrics": server[:1], "backends": backends(server[:1])}
    assert report.cell(single, "_backend_requests", "{}") == "30"
    assert report.cell(single, "_hit_rate", "{}") == "0.90"
    assert report.cell({**run, "backends": None}, "_hit_rate", "{}") == "-"


def sglang_text(requests: int, prompt: int, cached: int, running: int = 0) -> str:
    """SGLang 0.5.23's exposition of the same (names, types and labels as its metrics collector
    defines them: counters split by is_streaming, the cache counter by cache_source)."""
    labels = 'model_name="tiny-qwen3",engine_type="unified",tp_rank="0",pp_rank="0"'
    return "\n".join([
        "# TYPE sglang:num_requests_total counter",
        f'sglang:num_requests_total{{model_name="tiny-qwen3",engine_type="unified",is_streaming="true"}} {requests}.0',
        "# TYPE sglang:prompt_tokens_total counter",
        f'sglang:prompt_tokens_total{{model_name="tiny-qwen3",engine_type="unified",is_streaming="true"}} {prompt}.0',
        'sglang:prompt_tokens_total{model_name="tiny-qwen3",engine_type="unified",is_streaming="false"} 0.0',
        "# TYPE sglang:cached_tokens_total counter",
        f'sglang:cached_tokens_total{{model_name="tiny-qwen3",engine_type="unified",cache_source="device"}} {cached}.0',
        "# TYPE sglang:num_running_reqs gauge",
        f"sglang:num_running_reqs{{{labels}}} {running}.0",
        "",
    ])


def test_sglang_servers_are_engines_too() -> None:
    a = scraped("a", sglang_text(0, 0, 0), sglang_text(12, 1000, 250))
    a.peaks = {"sglang:num_running_reqs": 3.0}
    report_a = a.report()
    assert report_a["kind"] == "sglang"
    assert (report_a["requests_finished"], report_a["prompt_tokens"], report_a["prefix_cache_hits"]) == (12, 1000, 250)
    assert report_a["prefix_cache_hit_rate"] == pytest.approx(0.25) and report_a["peak_requests_running"] == 3.0
    summary = backends([report_a, {"url": "p", "kind": "proxy"}])
    assert summary is not None and summary["per_backend"]["a"]["requests"] == 12
