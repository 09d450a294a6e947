"""Fixtures for the chart tests: each example values file is rendered once by the real helm."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.k8s.chart import EXAMPLES, render_example


@pytest.fixture(scope="module", params=EXAMPLES, ids=lambda p: p.stem)
def example(request: pytest.FixtureRequest) -> tuple[Path, list[dict[str, Any]]]:
    """(values file, rendered objects) for every example under k8s/qwen-serve/examples."""
    path: Path = request.param
    return path, render_example(path.name)
