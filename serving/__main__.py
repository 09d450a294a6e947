"""`python -m serving --config configs/proxy.yaml` or `python -m serving --backend PROFILE=URL`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from serving.config import MAX_WORKERS, ConfigError, config_from_backends, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="proxy config file (see configs/proxy.yaml)")
    source.add_argument("--backend", action="append", metavar="PROFILE=URL[,URL]",
                        help="serve a profile from these vLLM base URLs (repeatable)")
    parser.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="listen port (default 8000)")
    parser.add_argument("--workers", type=int, default=None, help="proxy processes (default: the config's, 1)")
    parser.add_argument("--as-worker", action="store_true", help=argparse.SUPPRESS)  # set by the supervisor
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.workers is not None and not 1 <= args.workers <= MAX_WORKERS:
        parser.error(f"--workers {args.workers}: between 1 and {MAX_WORKERS}")
    try:
        if args.config:
            config = load_config(args.config)
            listen = config.listen.model_copy(update={k: v for k, v in
                                                      (("host", args.host), ("port", args.port)) if v})
            config = config.model_copy(update={"listen": listen})
        else:
            config = config_from_backends(args.backend, args.host or "127.0.0.1", args.port or 8000)
        if args.workers is not None:
            config = config.model_copy(update={"workers": args.workers})
        if config.workers > 1 and not args.as_worker:
            from serving.workers import supervise

            return supervise(argv, config.workers)
        # Imported only now: in a worker, prometheus-client must see PROMETHEUS_MULTIPROC_DIR first.
        from serving.app import create_app
        from serving.http_server import run

        app = create_app(config)
        return run(app, share_port=args.as_worker)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


sys.exit(main())
