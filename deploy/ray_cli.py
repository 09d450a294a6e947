"""Ray cluster subcommands (ray-head, ray-worker, ray-stop, status): being written."""

import argparse


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    return None
