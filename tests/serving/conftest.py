"""Fixtures for proxies with their own configs (scripted upstreams, auth, limits)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import Service, start_proxy, start_scripted_upstream


@pytest.fixture
def services(tmp_path: Path) -> Iterator[list[Service]]:
    started: list[Service] = []
    yield started
    for service in reversed(started):
        service.stop()


@pytest.fixture
def upstream(services: list[Service], tmp_path: Path) -> Callable[..., Service]:
    def start(**kwargs: Any) -> Service:
        service = start_scripted_upstream(tmp_path, **kwargs)
        services.append(service)
        return service
    return start


@pytest.fixture
def proxy(services: list[Service], tmp_path: Path) -> Callable[..., Service]:
    """Start a proxy from a config mapping (written to a file, as users do)."""
    def start(config: dict[str, Any], ready_path: str = "/ready") -> Service:
        path = tmp_path / f"proxy-{len(services)}.yaml"
        path.write_text(yaml.safe_dump(config))
        service = start_proxy(["--config", str(path)], tmp_path, ready_path=ready_path)
        services.append(service)
        return service
    return start
