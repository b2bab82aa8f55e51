"""The `lethe` command: one entry point, one sub-command per job (serve, eval, ...)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lethe.evaluation import cli as eval_command
from lethe.gateway.cli import sae as sae_command
from lethe.gateway.cli import serve as serve_command
from lethe.gateway.cli import teach as teach_command
from lethe.gateway.cli import unlearn as unlearn_command
from lethe.gateway.cli import worker as worker_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lethe",
        description="Lethe: an OpenAI-compatible gateway that makes a language model forget registered "
        "targets.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve_command.register(commands)
    worker_command.register(commands)
    eval_command.register(commands)
    unlearn_command.register(commands)
    teach_command.register(commands)
    sae_command.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
