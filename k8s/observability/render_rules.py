"""Render the chart's alert rules with their default thresholds into a plain Prometheus rules file.

k8s/qwen-serve/files/alert-rules.yaml is a Helm `tpl` template (thresholds are chart values);
Prometheus without the Operator needs the rendered `groups:` list. This runs
`helm template --show-only templates/prometheusrule.yaml --set monitoring.prometheusRule.enabled=true`
with the chart's own values.yaml and helpers, takes the PrometheusRule's `spec` and writes it to
k8s/observability/alerts.rules.yaml (`make alert-rules`). `--check` exits 1 when the committed file
differs from a fresh rendering (the drift test runs this).

helm renders every template even with --show-only, and the chart refuses to render without a
model enabled; the rules do not depend on any model, so helm runs on a copy of the chart that
holds only what the PrometheusRule uses (Chart.yaml, values.yaml, _helpers.tpl, the template and
files/alert-rules.yaml).

    python k8s/observability/render_rules.py [--check] [--helm PATH] [--output PATH]
"""

from __future__ import annotations

import argparse
import difflib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "k8s" / "qwen-serve"
OUTPUT = REPO_ROOT / "k8s" / "observability" / "alerts.rules.yaml"
HELM = Path(os.environ.get("HELM", REPO_ROOT / ".cache" / "bin" / "helm"))
TEMPLATE = "templates/prometheusrule.yaml"
CHART_PARTS = ("Chart.yaml", "values.yaml", "templates/_helpers.tpl", TEMPLATE, "files/alert-rules.yaml")

HEADER = """\
# Prometheus alert rules for the qwen-serve stack (vLLM + the qwen_proxy), default thresholds.
# GENERATED from k8s/qwen-serve/files/alert-rules.yaml by k8s/observability/render_rules.py
# (`make alert-rules`): edit the template, not this file. Runbooks: k8s/observability/README.md.
# Use: rule_files: [alerts.rules.yaml] in prometheus.yml. Kubernetes: the chart's PrometheusRule
# (monitoring.prometheusRule.enabled=true, thresholds under monitoring.prometheusRule.thresholds).
"""


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (expressions, runbooks), keys in their written order."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _str)


def helm_template(helm: Path = HELM, chart: Path = CHART, values: list[str] | None = None,
                  template: str | None = TEMPLATE, parts: tuple[str, ...] = CHART_PARTS) -> str:
    """`helm template [--show-only TEMPLATE]` on a copy of the chart holding only `parts`."""
    if not os.access(helm, os.X_OK):
        raise SystemExit(f"error: helm not found at {helm}: run make helm (or set HELM=/path/to/helm)")
    with tempfile.TemporaryDirectory(prefix="qwen-serve-rules-") as tmp:
        copy = Path(tmp) / chart.name
        for part in parts:
            (copy / part).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(chart / part, copy / part)
        argv = [str(helm), "template", "qwen-serve", str(copy)]
        if template:
            argv += ["--show-only", template]
        for value in ["monitoring.prometheusRule.enabled=true"] if values is None else values:
            argv += ["--set", value]
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"error: {' '.join(argv)} failed:\n{result.stderr}")
    return result.stdout


def rules_from_manifest(manifest: str) -> dict[str, Any]:
    docs = [doc for doc in yaml.safe_load_all(manifest) if doc]
    if len(docs) != 1 or docs[0].get("kind") != "PrometheusRule":
        raise SystemExit(f"error: expected one PrometheusRule, helm rendered {[d.get('kind') for d in docs]}")
    spec = docs[0]["spec"]
    if not isinstance(spec, dict) or not spec.get("groups"):
        raise SystemExit("error: the PrometheusRule has no spec.groups")
    return spec


def render(helm: Path = HELM, chart: Path = CHART) -> str:
    spec = rules_from_manifest(helm_template(helm, chart))
    body = yaml.dump(spec, Dumper=_Dumper, sort_keys=False, width=10_000, allow_unicode=True)
    return HEADER + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the output file differs from a fresh rendering")
    parser.add_argument("--helm", type=Path, default=HELM)
    parser.add_argument("--chart", type=Path, default=CHART)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render(args.helm, args.chart)
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            diff = difflib.unified_diff(current.splitlines(keepends=True), text.splitlines(keepends=True),
                                        str(args.output), "rendered from the chart")
            sys.stderr.write("".join(diff))
            sys.stderr.write(f"\n{args.output} is out of date: run make alert-rules\n")
            return 1
        print(f"{args.output}: up to date")
        return 0
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
