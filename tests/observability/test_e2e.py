"""End to end: a real Prometheus scrapes the session's real vLLM (tiny model, CPU) and proxy while a
short load runs through the proxy; then every dashboard query must return data, the model
variable must list the model, and the alert rules must evaluate cleanly on the real series."""

from __future__ import annotations

import json
import math
import re
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import RunningServer, Service, free_port, start_service, wait_until
from tests.observability.conftest import RULES, load_script, query_panels
from tests.observability.conftest import substitute as substitute_variables
from tests.observability.test_rules import ALERTS

pytestmark = pytest.mark.e2e

MODEL = "tiny-qwen3"
# Longer than the whole run: every rate and quantile covers the load and nothing else exists.
WINDOW = "10m"
SUBSTITUTIONS = {"namespace": ".*", "model": MODEL, "datasource": "prometheus", "__rate_interval": WINDOW,
                 "__interval": "1s", "__range": WINDOW, "__range_s": "600", "__range_ms": "600000"}
SYSTEM = "You are a helpful assistant for an observability test. " * 24  # shared prefix: prefix cache hits
# Requests per kind: streamed chats, plain chats, greedy chats (streamed and not), completions.
LOAD = (14, 10, 4, 3)
WARM_UP = (1, 1, 2, 1)


@dataclass
class Prometheus:
    service: Service

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.service.base_url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        result = data["result"]
        return result if data["resultType"] == "vector" else [{"value": result}]

    def scalar(self, expr: str) -> float:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else 0.0


def substitute(expr: str) -> str:
    return substitute_variables(expr, SUBSTITUTIONS)


@pytest.fixture(scope="module")
def prometheus(prometheus_bin: Path, vllm_server: RunningServer, proxy_server: Service,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    directory = tmp_path_factory.mktemp("prometheus")
    config = load_script("prometheus_config").config(
        [f"127.0.0.1:{proxy_server.port}"], [f"127.0.0.1:{vllm_server.port}"], "1s", [RULES])
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    service = start_service(
        [str(prometheus_bin), f"--config.file={directory / 'prometheus.yml'}",
         f"--storage.tsdb.path={directory / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        port, "/-/ready", directory)
    try:
        yield Prometheus(service)
    finally:
        service.stop()


def chat(client: openai.OpenAI, i: int, stream: bool, temperature: float | openai.Omit = openai.omit) -> int:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Request {i}: say something"}]
    if not stream:
        response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16 + i % 8,
                                                  temperature=temperature)
        assert response.usage is not None
        return response.usage.completion_tokens
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16 + i % 8, stream=True, temperature=temperature,
        stream_options={"include_usage": True} if i % 2 else openai.omit))
    assert any(c.choices and c.choices[0].delta.content for c in chunks)
    return len(chunks)


def send_errors(client: openai.OpenAI) -> int:
    for bad in ({"model": MODEL, "extra_body": {"enable_search": True}},  # refused by the proxy (400)
                {"model": MODEL, "max_tokens": 100_000},  # refused by vLLM (400, passed through)
                {"model": "no-such-model"}):  # unknown model (404)
        with pytest.raises((openai.BadRequestError, openai.NotFoundError)):
            client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], **bad)
    return 3


def drive_load(client: openai.OpenAI, counts: tuple[int, int, int, int]) -> dict[str, int]:
    """Errors, then concurrent streamed and plain chats (some greedy) and completions."""
    errors = send_errors(client)
    streamed, plain, greedy, completions = counts
    with ThreadPoolExecutor(max_workers=8) as pool:
        jobs = [pool.submit(chat, client, i, True) for i in range(streamed)]
        jobs += [pool.submit(chat, client, i, False) for i in range(plain)]
        jobs += [pool.submit(chat, client, i, i % 2 == 0, temperature=0) for i in range(greedy)]  # greedy: allowed
        jobs += [pool.submit(lambda i: client.completions.create(model=MODEL, prompt=f"{SYSTEM} {i}", max_tokens=12)
                             .usage.completion_tokens, i) for i in range(completions)]  # type: ignore[union-attr]
        for job in jobs:
            assert job.result() > 0
    ok = streamed + plain + greedy + completions
    return {"proxy": ok + errors, "vllm": ok}


def scraped(prometheus: Prometheus, sent: dict[str, int], before: dict[str, float]) -> None:
    """Wait until Prometheus holds the counts of everything sent, then for one more scrape of each
    target: every series, even one born in the last second, then has the two samples rate() needs."""
    wait_until(lambda: prometheus.scalar("sum(qwen_proxy_requests_total)") - before["proxy"] >= sent["proxy"]
               and prometheus.scalar("sum(vllm:request_success_total)") - before["vllm"] >= sent["vllm"],
               30, "Prometheus to scrape the counts of the whole load")
    covered = time.time()
    wait_until(lambda: prometheus.scalar('min(timestamp(up{job=~"qwen-proxy|vllm"}))') > covered + 0.5, 30,
               "one more scrape of both targets")


def totals(prometheus: Prometheus) -> dict[str, float]:
    return {"proxy": prometheus.scalar("sum(qwen_proxy_requests_total)"),
            "vllm": prometheus.scalar("sum(vllm:request_success_total)")}


@pytest.fixture(scope="module")
def loaded(prometheus: Prometheus, proxy_server: Service) -> Prometheus:
    """Prometheus after it has scraped a short load through the proxy, start to end."""
    wait_until(lambda: prometheus.scalar('count(up{job=~"qwen-proxy|vllm"} == 1)') == 2, 30,
               "Prometheus to scrape the proxy and vLLM")
    client = openai.OpenAI(base_url=f"{proxy_server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)
    # A few requests of each kind first: the proxy creates a labelled series at its first request,
    # and Prometheus cannot see the increase of a series born with its value. After this warm-up
    # every series exists, so the load's increases all show.
    before = totals(prometheus)
    scraped(prometheus, drive_load(client, WARM_UP), before)
    before = totals(prometheus)
    scraped(prometheus, drive_load(client, LOAD), before)
    return prometheus


def test_every_dashboard_query_returns_data(loaded: Prometheus, dashboard: dict[str, Any]) -> None:
    failures = []
    evaluated = 0
    for panel in query_panels(dashboard):
        for target in panel["targets"]:
            expr = substitute(target["expr"])
            result = loaded.query(expr)
            evaluated += 1
            values = [float(sample["value"][1]) for sample in result]
            if not result:
                failures.append(f"panel {panel['title']!r} ({target['refId']}): empty result for {expr}")
            elif all(math.isnan(v) for v in values):
                failures.append(f"panel {panel['title']!r} ({target['refId']}): only NaN for {expr}")
            elif panel["fieldConfig"]["defaults"].get("unit") == "percentunit" and not all(
                    0 <= v <= 1 for v in values if not math.isnan(v)):
                failures.append(f"panel {panel['title']!r} ({target['refId']}): a share outside [0, 1]: "
                                f"{values} for {expr}")
    assert evaluated >= 30
    assert not failures, "\n".join(failures)


def test_the_load_shows_in_the_numbers(loaded: Prometheus) -> None:
    """The figures are the load's, not just present: spot checks on a few panels' queries."""
    window = f"[{WINDOW}]"
    assert loaded.scalar(f'sum(increase(qwen_proxy_requests_total{{model="{MODEL}",status_class="4xx"}}{window}))') >= 1.5
    assert loaded.scalar(f'sum(increase(qwen_proxy_greedy_requests_total{{model="{MODEL}",action="allowed"}}{window}))') > 0
    assert loaded.scalar(f'sum(increase(qwen_proxy_defaults_applied_total{{model="{MODEL}"}}{window}))') > 0
    assert loaded.scalar(f'sum(increase(vllm:prefix_cache_hits_total{{model_name="{MODEL}"}}{window}))') > 0
    assert loaded.scalar(f'sum(increase(qwen_proxy_completion_tokens_total{{model="{MODEL}"}}{window}))') > 100
    assert loaded.scalar(f'max(qwen_proxy_backend_up{{model="{MODEL}"}})') == 1


def test_model_variable_lists_the_model(loaded: Prometheus, dashboard: dict[str, Any]) -> None:
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "model")
    match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]["query"])
    assert match, variable["query"]
    selector, label = substitute(match.group(1)), match.group(2)
    values = loaded.api(f"label/{label}/values", **{"match[]": selector})
    assert MODEL in values


def test_alert_rules_evaluate_on_the_real_series(loaded: Prometheus) -> None:
    def rules() -> list[dict[str, Any]]:
        return [rule for group in loaded.api("rules")["groups"] for rule in group["rules"]]
    wait_until(lambda: all(rule.get("lastEvaluation", "").startswith("20") and rule["health"] != "unknown"
                           for rule in rules()), 30, "every alert rule to be evaluated")
    evaluated = rules()
    assert {rule["name"] for rule in evaluated} == ALERTS
    for rule in evaluated:
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
    firing = [rule["name"] for rule in evaluated if rule["state"] != "inactive"]
    assert firing == [], "a healthy stack under a light load must not alert"
