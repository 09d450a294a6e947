"""`vllm bench serve` from the pinned vLLM, runnable where the `vllm` console script is not.

The CPU build's `vllm` entry point fails looking up a distribution named `vllm`; this calls the
same parser and main function: `python -m benchmarks.vllm_bench --help`.
"""

from __future__ import annotations

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser

if __name__ == "__main__":
    parser = FlexibleArgumentParser(prog="python -m benchmarks.vllm_bench",
                                    description="vllm bench serve (pinned vLLM)")
    add_cli_args(parser)
    main(parser.parse_args())
