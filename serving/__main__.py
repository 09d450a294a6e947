"""`python -m serving --config configs/proxy.yaml` or `python -m serving --backend PROFILE=URL`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from serving.app import create_app
from serving.config import ConfigError, config_from_backends, load_config
from serving.server import run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="proxy config file (see configs/proxy.yaml)")
    source.add_argument("--backend", action="append", metavar="PROFILE=URL[,URL]",
                        help="serve a profile from these vLLM base URLs (repeatable)")
    parser.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="listen port (default 8000)")
    args = parser.parse_args(argv)
    try:
        if args.config:
            config = load_config(args.config)
            listen = config.listen.model_copy(update={k: v for k, v in
                                                      (("host", args.host), ("port", args.port)) if v})
            config = config.model_copy(update={"listen": listen})
        else:
            config = config_from_backends(args.backend, args.host or "127.0.0.1", args.port or 8000)
        app = create_app(config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run(app)
    return 0


sys.exit(main())
