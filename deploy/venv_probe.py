"""A probe script run by another venv's interpreter, answering one JSON object on stdout.

SGLang (deploy/engines/sglang_probe.py) and aiconfigurator (deploy/forecast/probe.py) cannot share
this project's venv (their torch, pandas and pinned libraries differ), so their own code runs in
venvs of their own, as a subprocess with an argv list (never a shell string); only JSON crosses.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from deploy.errors import DeployError
from deploy.paths import REPO_ROOT


def pinned(requirements: Path, package: str) -> str:
    """The version `requirements` pins `package` to, read from the one line that names it."""
    prefix = f"{package}=="
    for line in requirements.read_text().splitlines():
        if line.startswith(prefix):
            return line.removeprefix(prefix).strip()
    raise RuntimeError(f"{requirements}: no '{prefix}<version>' line")


def run_json(python: Path, script: Path, *, what: str, rebuild: str, error: type[DeployError],
             timeout: float, argv: Sequence[str] = (), stdin: str | None = None,
             env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The probe's JSON object; `error` (naming `what` and the `rebuild` target) when it answers none."""
    try:
        result = subprocess.run([str(python), str(script), *argv], input=stdin, cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=timeout,
                                env={**os.environ, **(env or {})}, check=False)
    except subprocess.TimeoutExpired:
        raise error(f"{what} did not answer within {timeout:.0f} s") from None
    try:
        data = json.loads(result.stdout)
    except json.JSONDecodeError:
        tail = " | ".join(result.stderr.strip().splitlines()[-3:])
        raise error(f"{what} failed (exit {result.returncode}) without an answer: {tail}; "
                    f"rebuild its venv with `{rebuild}`") from None
    if not isinstance(data, dict):
        raise error(f"{what} answered {type(data).__name__}, not an object")
    return data
