"""The per-backend series come from the live backends: a backend that leaves takes its series with it,
in one process (the counter's child removed) and with workers (the summed files filtered by what
the answering worker has now)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from prometheus_client.core import Metric
from prometheus_client.samples import Sample

from serving.backend import Backend
from serving.config import ModelEntry
from serving.metrics import BackendSample, LiveBackends, Metrics, _Departed
from serving.routing import ModelBackends

URLS = ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]


def test_a_backend_that_leaves_takes_its_series_with_it() -> None:
    metrics = Metrics(CollectorRegistry())
    entry = ModelEntry.model_validate({"profile": "tiny-qwen3", "backends": URLS})
    model = ModelBackends("m", entry, metrics)
    first, second = Backend(URLS[0], healthy=True), Backend(URLS[1], healthy=True)
    model.set_backends([first, second])
    for _ in range(5):
        model.report(second, False)
    text = metrics.exposition().decode()
    assert f'qwen_proxy_backend_ejections_total{{backend="{URLS[1]}",model="m"}} 1.0' in text
    assert f'qwen_proxy_backend_ejected{{backend="{URLS[1]}",model="m"}} 1.0' in text
    assert f'qwen_proxy_backend_conversations{{backend="{URLS[1]}",model="m"}} 0.0' in text
    model.set_backends([first])
    text = metrics.exposition().decode()
    assert URLS[1] not in text
    assert f'qwen_proxy_backend_up{{backend="{URLS[0]}",model="m"}} 1.0' in text


class Files:
    """What the workers' files hold: an ejection counted for a backend that has since left."""

    def collect(self) -> Iterator[Metric]:
        ejections = Metric("qwen_proxy_backend_ejections", "Times ejected", "counter")
        for url, value in ((URLS[0], 1.0), (URLS[1], 3.0)):
            ejections.samples.append(Sample("qwen_proxy_backend_ejections_total", {"model": "m", "backend": url},
                                            value))
        requests = Metric("qwen_proxy_requests", "Requests", "counter")
        requests.samples.append(Sample("qwen_proxy_requests_total", {"model": "m"}, 7.0))
        yield from (ejections, requests)


def test_with_workers_the_files_are_filtered_by_the_live_backends() -> None:
    live = LiveBackends()
    live.sources.append(lambda: [BackendSample("m", URLS[0], True, False, 4)])
    merged = CollectorRegistry()
    merged.register(_Departed(cast(multiprocess.MultiProcessCollector, Files()), live))
    merged.register(live)
    text = generate_latest(merged).decode()
    assert f'qwen_proxy_backend_ejections_total{{backend="{URLS[0]}",model="m"}} 1.0' in text
    assert URLS[1] not in text
    assert 'qwen_proxy_requests_total{model="m"} 7.0' in text
    assert f'qwen_proxy_backend_conversations{{backend="{URLS[0]}",model="m"}} 4.0' in text
