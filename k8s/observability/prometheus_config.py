"""Write a prometheus.yml that scrapes a local qwen-serve stack (the proxy and vLLM) and loads the
alert rules: what `make observe` runs, and what the end-to-end test uses.

    python k8s/observability/prometheus_config.py --proxy 127.0.0.1:8000 --model tiny-qwen3 -o prometheus.yml
    python k8s/observability/prometheus_config.py --proxy 127.0.0.1:8000 --vllm 127.0.0.1:8100 --vllm 10.0.0.2:8100

`--model` adds vLLM at 127.0.0.1 on that profile's port (configs/models/<profile>.yaml `port`).
No `namespace` label outside Kubernetes: the dashboard's queries match it with `=~".*"`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
RULES = REPO_ROOT / "k8s" / "observability" / "alerts.rules.yaml"


def profile_port(model: str) -> int:
    sys.path.insert(0, str(REPO_ROOT))
    from deploy.loader import load_profile

    return int(load_profile(model).port)


def config(proxies: list[str], vllms: list[str], scrape_interval: str = "5s",
           rules: list[Path] | None = None) -> dict[str, Any]:
    return {
        "global": {
            "scrape_interval": scrape_interval,
            "scrape_timeout": scrape_interval,
            "evaluation_interval": scrape_interval,
        },
        "rule_files": [str(path) for path in (rules or [])],
        "scrape_configs": [
            {"job_name": "qwen-proxy", "metrics_path": "/metrics", "static_configs": [{"targets": proxies}]},
            {"job_name": "vllm", "metrics_path": "/metrics", "static_configs": [{"targets": vllms}]},
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proxy", action="append", default=[], metavar="HOST:PORT", help="a proxy to scrape")
    parser.add_argument("--vllm", action="append", default=[], metavar="HOST:PORT", help="a vLLM server to scrape")
    parser.add_argument("--model", help="also scrape vLLM on 127.0.0.1 at this profile's port")
    parser.add_argument("--scrape-interval", default="5s")
    parser.add_argument("--rules", action="append", type=Path, default=None,
                        help=f"rule files to load (default {RULES.relative_to(REPO_ROOT)}; 'none' for none)")
    parser.add_argument("-o", "--output", type=Path, help="write here (default: stdout)")
    args = parser.parse_args(argv)
    vllms = list(args.vllm)
    if args.model:
        vllms.append(f"127.0.0.1:{profile_port(args.model)}")
    if not args.proxy or not vllms:
        parser.error("give at least one --proxy and one --vllm (or --model)")
    rules = [RULES] if args.rules is None else [p.resolve() for p in args.rules if str(p) != "none"]
    text = yaml.safe_dump(config(args.proxy, vllms, args.scrape_interval, rules), sort_keys=False)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        print(f"wrote {args.output}: proxy {', '.join(args.proxy)}; vLLM {', '.join(vllms)}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
