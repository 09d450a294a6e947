"""The proxy's pod in production: a preStop pause and a grace period covering pause + drain, an
Ingress that publishes the API only, and a `helm test` that waits for engines still loading."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from serving.config import ProxyConfig
from tests.k8s.chart import (
    container,
    notes,
    objects,
    one,
    render,
    render_error,
    validate_core,
)

MODEL = ["models.qwq-32b.enabled=true"]
EXIT_MARGIN = 5  # seconds the chart adds after the drain for the process to exit
# What the proxy answers besides the API: probes and the scrape. None of it may be public.
INTERNAL = ("/metrics", "/ready", "/health")
PUBLIC = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/embeddings", "/openapi.json")


def values_file(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def proxy_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod: dict[str, Any] = one(docs, "Deployment", "qwen-qwen-serve-proxy")["spec"]["template"]
    return pod


def proxy_yaml(docs: list[dict[str, Any]]) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(one(docs, "ConfigMap", "qwen-qwen-serve-proxy")["data"]["proxy.yaml"])
    return config


# ---- preStop pause and grace period --------------------------------------------------------------


def test_proxy_pauses_before_sigterm_and_outlives_its_drain(example: tuple[Path, list[dict[str, Any]]]) -> None:
    """Every example: the native sleep action, then a grace period covering pause + drain + margin."""
    _, docs = example
    pod = proxy_pod(docs)
    pause = container(pod, "proxy")["lifecycle"]["preStop"]
    assert pause == {"sleep": {"seconds": 10}}
    drain = proxy_yaml(docs)["drain_seconds"]
    assert drain == ProxyConfig.model_fields["drain_seconds"].default
    assert pod["spec"]["terminationGracePeriodSeconds"] == 10 + drain + EXIT_MARGIN


def test_pause_drain_and_grace_follow_the_values() -> None:
    docs = render(sets=[*MODEL, "proxy.preStop.sleepSeconds=20", "proxy.drainSeconds=60"])
    pod = proxy_pod(docs)
    assert container(pod, "proxy")["lifecycle"]["preStop"] == {"sleep": {"seconds": 20}}
    assert proxy_yaml(docs)["drain_seconds"] == 60
    assert pod["spec"]["terminationGracePeriodSeconds"] == 20 + 60 + EXIT_MARGIN
    docs = render(sets=[*MODEL, "proxy.terminationGracePeriodSeconds=3600"])
    assert proxy_pod(docs)["spec"]["terminationGracePeriodSeconds"] == 3600


def test_fractional_drain_is_rounded_up(tmp_path: Path) -> None:
    docs = render([values_file(tmp_path, {"proxy": {"drainSeconds": 30.5}})], MODEL)
    assert proxy_pod(docs)["spec"]["terminationGracePeriodSeconds"] == 10 + 31 + EXIT_MARGIN


def test_exec_fallback_runs_sleep_in_the_proxy_container() -> None:
    docs = render(sets=[*MODEL, "proxy.preStop.action=exec", "proxy.preStop.sleepSeconds=15"])
    deployment = one(docs, "Deployment", "qwen-qwen-serve-proxy")
    validate_core(deployment)
    assert container(deployment["spec"]["template"], "proxy")["lifecycle"] == {
        "preStop": {"exec": {"command": ["sleep", "15"]}}}


def test_a_zero_pause_drops_the_hook() -> None:
    docs = render(sets=[*MODEL, "proxy.preStop.sleepSeconds=0"])
    pod = proxy_pod(docs)
    assert "lifecycle" not in container(pod, "proxy")
    assert pod["spec"]["terminationGracePeriodSeconds"] == 1200 + EXIT_MARGIN


@pytest.mark.parametrize(("values", "message"), [
    ({"terminationGracePeriodSeconds": 45},
     ("proxy.terminationGracePeriodSeconds (45) must be at least proxy.preStop.sleepSeconds (10) + "
      "proxy.drainSeconds (1200) + 5 s for the proxy to exit = 1215")),
    ({"terminationGracePeriodSeconds": 1214},
     "Raise it to 1215, leave it null to derive it, or lower proxy.drainSeconds"),
    ({"drainSeconds": 30.5, "terminationGracePeriodSeconds": 45}, "proxy.drainSeconds (30.5) + 5 s"),
    ({"drainSeconds": 30, "preStop": {"sleepSeconds": 20}, "terminationGracePeriodSeconds": 45},
     "proxy.preStop.sleepSeconds (20) + proxy.drainSeconds (30) + 5 s for the proxy to exit = 55"),
])
def test_a_grace_period_shorter_than_pause_plus_drain_is_refused(tmp_path: Path, values: dict[str, Any],
                                                                 message: str) -> None:
    error = render_error([values_file(tmp_path, {"proxy": values})], MODEL)
    assert message in error


def test_the_shortest_grace_period_is_accepted(tmp_path: Path) -> None:
    docs = render([values_file(tmp_path, {"proxy": {"drainSeconds": 30, "terminationGracePeriodSeconds": 45}})],
                  MODEL)
    assert proxy_pod(docs)["spec"]["terminationGracePeriodSeconds"] == 45


def test_the_sleep_action_is_refused_before_kubernetes_1_30() -> None:
    error = render_error(sets=MODEL, kube_version="1.29.4")
    assert ("proxy.preStop.action sleep needs Kubernetes 1.30 or later (the PodLifecycleSleepAction feature is "
            "on by default from 1.30); this cluster is v1.29.4: set proxy.preStop.action=exec") in error
    from tests.k8s.chart import run_helm, template_args

    result = run_helm(*template_args([], [*MODEL, "proxy.preStop.action=exec"], "1.29.4"))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("sets", "message"), [
    (["proxy.preStop.action=hook"], "/proxy/preStop/action"),
    (["proxy.preStop.sleepSeconds=-1"], "/proxy/preStop/sleepSeconds"),
    (["proxy.preStop.seconds=5"], "additional properties 'seconds' not allowed"),
    (["proxy.terminationGracePeriodSeconds=0"], "/proxy/terminationGracePeriodSeconds"),
])
def test_bad_shutdown_values_are_refused_by_the_schema(sets: list[str], message: str) -> None:
    error = render_error(sets=[*MODEL, *sets])
    assert "values don't meet the specifications of the schema" in error and message in error


# ---- readiness ----------------------------------------------------------------------------------------


def test_readiness_is_the_proxys_own_and_liveness_its_process(example: tuple[Path, list[dict[str, Any]]]) -> None:
    _, docs = example
    proxy = container(proxy_pod(docs), "proxy")
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert proxy["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}


# ---- Ingress: the API only ----------------------------------------------------------------------------


def routed(path: str, rules: list[dict[str, Any]]) -> bool:
    """Whether an Ingress path list sends `path` on: Kubernetes' Exact and Prefix (whole path
    elements) rules, and ImplementationSpecific read as a string prefix, as ingress-nginx does."""
    for rule in rules:
        prefix = rule["path"].rstrip("/")
        if rule["pathType"] == "Exact":
            hit = path == rule["path"]
        elif rule["pathType"] == "Prefix":
            hit = path == prefix or path.startswith(prefix + "/")
        else:
            hit = path.startswith(rule["path"])
        if hit:
            return True
    return False


def ingress_paths(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """host -> its paths, each routed to the proxy Service's http port."""
    [ingress] = objects(docs, "Ingress")
    validate_core(ingress)
    out: dict[str, list[dict[str, Any]]] = {}
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            assert path["backend"] == {"service": {"name": "qwen-qwen-serve-proxy", "port": {"name": "http"}}}
        out[rule["host"]] = [{"path": p["path"], "pathType": p["pathType"]} for p in rule["http"]["paths"]]
    return out


def test_ingress_publishes_only_the_api_by_default() -> None:
    hosts = ingress_paths(render(sets=[*MODEL, "proxy.ingress.enabled=true"]))
    assert hosts == {"qwen.example.com": [{"path": "/v1", "pathType": "Prefix"},
                                          {"path": "/openapi.json", "pathType": "Exact"}]}
    for path in PUBLIC:
        assert routed(path, hosts["qwen.example.com"]), path
    for path in (*INTERNAL, "/", "/v10/x", "/openapi.json/x"):
        assert not routed(path, hosts["qwen.example.com"]), path


def test_examples_publish_only_the_api(example: tuple[Path, list[dict[str, Any]]]) -> None:
    _, docs = example
    if not objects(docs, "Ingress"):
        return
    for host, paths in ingress_paths(docs).items():
        assert [p for p in INTERNAL if routed(p, paths)] == [], host
        assert all(routed(p, paths) for p in PUBLIC), host


def test_a_hosts_own_paths_and_the_default_paths_can_be_set(tmp_path: Path) -> None:
    values = values_file(tmp_path, {"proxy": {"ingress": {
        "enabled": True,
        "paths": [{"path": "/v1", "pathType": "Prefix"}],
        "hosts": [{"host": "api.example.com"},
                  {"host": "all.example.com", "paths": [{"path": "/", "pathType": "Prefix"}]}]}}})
    hosts = ingress_paths(render([values], MODEL))
    assert hosts == {"api.example.com": [{"path": "/v1", "pathType": "Prefix"}],
                     "all.example.com": [{"path": "/", "pathType": "Prefix"}]}


@pytest.mark.parametrize(("values", "message"), [
    ({"paths": []}, "/proxy/ingress/paths"),
    ({"hosts": [{"host": "a.example.com", "paths": []}]}, "/proxy/ingress/hosts/0/paths"),
    ({"hosts": [{"paths": [{"path": "/v1", "pathType": "Prefix"}]}]}, "/proxy/ingress/hosts/0"),
    ({"paths": [{"path": "/v1", "pathType": "Regex"}]}, "/proxy/ingress/paths/0/pathType"),
])
def test_bad_ingress_paths_are_refused(tmp_path: Path, values: dict[str, Any], message: str) -> None:
    error = render_error([values_file(tmp_path, {"proxy": {"ingress": {"enabled": True, **values}}})], MODEL)
    assert "values don't meet the specifications of the schema" in error and message in error


def test_notes_warn_when_the_ingress_publishes_internal_paths(tmp_path: Path) -> None:
    values = values_file(tmp_path, {"proxy": {"ingress": {"enabled": True, "hosts": [
        {"host": "api.example.com"},
        {"host": "all.example.com", "paths": [{"path": "/", "pathType": "Prefix"}]},
        {"host": "ops.example.com", "paths": [{"path": "/me", "pathType": "Prefix"},
                                              {"path": "/rea", "pathType": "ImplementationSpecific"},
                                              {"path": "/health", "pathType": "Exact"}]}]}}})
    text = notes([values], MODEL)
    assert "WARNING: the Ingress publishes the proxy's in-cluster endpoints" in text
    listed = [line.strip() for line in text.splitlines() if " -> " in line]
    assert listed == ["all.example.com/ (Prefix) -> /metrics", "all.example.com/ (Prefix) -> /ready",
                      "all.example.com/ (Prefix) -> /health", "ops.example.com/rea (ImplementationSpecific) -> /ready",
                      "ops.example.com/health (Exact) -> /health"]


def test_notes_stay_quiet_for_the_default_ingress_and_warn_for_a_load_balancer() -> None:
    assert "WARNING" not in notes(sets=[*MODEL, "proxy.ingress.enabled=true"])
    text = notes(sets=[*MODEL, "proxy.service.type=LoadBalancer"])
    assert "WARNING: proxy.service.type is LoadBalancer: whoever reaches the Service reaches\n/metrics" in text


# ---- helm test: engines that still load answer 503 -----------------------------------------------------


class FakeProxy(ThreadingHTTPServer):
    """The proxy as `helm test` sees it: /ready, /v1/models, and per model a queue of answers to
    /v1/completions (a 503 while its engines load, then one token)."""

    def __init__(self, answers: dict[str, list[int]]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.answers = answers
        self.asked: list[str] = []


class _Handler(BaseHTTPRequestHandler):
    server: FakeProxy

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/ready":
            self._send(200, {"ready": True, "draining": False, "models": {}})
        else:
            self._send(200, {"data": [{"id": name} for name in self.server.answers]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.server.asked.append(body["model"])
        status = self.server.answers[body["model"]].pop(0)
        if status == 200:
            self._send(200, {"choices": [{"text": "x"}], "usage": {"completion_tokens": 1}})
        else:
            self._send(status, {"error": {"message": f"model {body['model']} has no healthy backend",
                                          "code": status}})

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the test reads the script's output


@pytest.fixture()
def helm_test_job() -> tuple[str, dict[str, str]]:
    """The helm test Job's Python script and environment, as rendered."""
    docs = render(sets=[*MODEL, "models.qwen3-4b-instruct-fp8.enabled=true"])
    test = container(one(docs, "Job", "qwen-qwen-serve-test-connection")["spec"]["template"], "test-connection")
    assert test["command"][:2] == ["python", "-c"]
    return test["command"][2], {e["name"]: e["value"] for e in test["env"] if "value" in e}


@contextmanager
def fake_proxy(answers: dict[str, list[int]]) -> Iterator[FakeProxy]:
    server = FakeProxy(answers)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def run_helm_test(script: str, env: dict[str, str], server: FakeProxy) -> subprocess.CompletedProcess[str]:
    host, port = server.server_address[:2]
    run_env = {**env, "PROXY_URL": f"http://{host!s}:{port}", "POLL_SECONDS": "0", "TIMEOUT_SECONDS": "60"}
    return subprocess.run([sys.executable, "-c", script], env=run_env, capture_output=True, text=True,
                          timeout=60, check=False)


def test_helm_test_waits_for_a_model_whose_engines_still_load(helm_test_job: tuple[str, dict[str, str]]) -> None:
    """/ready no longer waits for the engines: a model's 503 is retried until its engines answer."""
    script, env = helm_test_job
    assert env["POLL_SECONDS"] == "5"
    with fake_proxy({"qwen3-4b-instruct": [503, 503, 200], "qwq-32b": [200]}) as server:
        result = run_helm_test(script, env, server)
    assert result.returncode == 0, result.stdout + result.stderr
    assert server.asked == ["qwen3-4b-instruct"] * 3 + ["qwq-32b"]
    assert "OK qwen3-4b-instruct: 'x'" in result.stdout and "OK qwq-32b: 'x'" in result.stdout


def test_helm_test_fails_on_any_other_error_without_a_traceback(helm_test_job: tuple[str, dict[str, str]]) -> None:
    script, env = helm_test_job
    with fake_proxy({"qwen3-4b-instruct": [400], "qwq-32b": [200]}) as server:
        result = run_helm_test(script, env, server)
    assert result.returncode == 1
    assert server.asked == ["qwen3-4b-instruct"]  # a 400 is not retried
    assert result.stderr.startswith("FAIL: /v1/completions answered 400: ")
    assert "Traceback" not in result.stderr
