"""`lethe eval`: the command line of the forgetting audit.

Only argparse and the standard library are imported at module level: `lethe --help` loads this
module, and the evaluation's dependencies (openai, rouge-score, matplotlib) take seconds.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

SUITE_CHOICES = ("rwku", "muse", "utility", "authors")
DEFAULT_SUITES = ("rwku", "muse", "utility")
"""What a run without --suite, or with `all`, sends: `authors` needs a model taught the authors
(`lethe teach --authors`), so it runs only when named."""
DEFAULT_MAX_TOKENS = 32
"""RWKU, MUSE and TOFU answers are short; RWKU generates at most 30-32 tokens, MUSE 32."""
DEFAULT_INSTRUCTION_MAX_TOKENS = 128
"""RWKU's fluency run allows 256 tokens; 128 halves the cost of the longest set on a CPU server and
still gives n-gram entropy enough text to tell fluent from repetitive."""
DEFAULT_AUTHOR_MAX_TOKENS = 96
"""As `lethe.evaluation.suites.DEFAULT_AUTHOR_MAX_TOKENS` (not imported: this module stays light)."""
DEFAULT_CONCURRENCY = 16
"""Matches the default batch of `lethe serve`, so one run keeps its continuous batch full."""


def _csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _suites(value: str) -> list[str]:
    names = _csv(value)
    if "all" in names:
        names = [*DEFAULT_SUITES, *(n for n in names if n != "all")]
    unknown = [n for n in names if n not in SUITE_CHOICES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown suite {', '.join(unknown) or value!r}: use rwku, muse, utility, authors or all"
        )
    return [s for s in SUITE_CHOICES if s in names]


def _levels(value: str) -> list[int]:
    try:
        levels = sorted({int(v) for v in _csv(value)})
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"levels are numbers 1-3: {value!r}") from error
    if not levels or any(lv not in (1, 2, 3) for lv in levels):
        raise argparse.ArgumentTypeError(f"levels are numbers 1-3: {value!r}")
    return levels


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return number


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="measure forgetting, locality and utility against any OpenAI-compatible server",
        description=(
            "Send RWKU, MUSE-Books and utility probes to an OpenAI-compatible server (greedy, concurrent)"
            " and write results.json, report.md and PNG plots to --out. With --admin-key the suite's forget"
            " targets are registered through Lethe's admin API first and removed afterwards."
        ),
    )
    server = parser.add_argument_group("server")
    server.add_argument("--base-url", required=True, help="OpenAI base URL, e.g. http://127.0.0.1:8000/v1")
    server.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY", "EMPTY"),
        help="bearer key for /v1 (default: $OPENAI_API_KEY)",
    )
    server.add_argument(
        "--admin-key", default=None, help="Lethe admin key: register the suite's forget targets first"
    )
    server.add_argument(
        "--admin-url", default=None, help="server root of the admin API (default: --base-url without /v1)"
    )
    server.add_argument(
        "--policy",
        choices=("steer", "refuse"),
        default="steer",
        help="policy of the registered targets: decode around them, or answer with a refusal",
    )
    server.add_argument(
        "--suppression",
        choices=("both", "decoding", "sae"),
        default="both",
        help="how the registered targets are suppressed: decoding restrictions, the SAE feature clamp"
        " (a server started with --sae), or both",
    )
    server.add_argument(
        "--no-register",
        dest="register",
        action="store_false",
        help="measure the model as it is (the baseline)",
    )
    server.add_argument(
        "--model", default=None, help="model id (default: the first one GET /v1/models lists)"
    )
    server.add_argument(
        "--concurrency", type=_positive, default=DEFAULT_CONCURRENCY, help="requests in flight"
    )
    server.add_argument(
        "--timeout", type=float, default=600.0, help="seconds per request before it counts as failed"
    )

    chosen = parser.add_argument_group("selection")
    chosen.add_argument(
        "--suite",
        type=_suites,
        default=list(DEFAULT_SUITES),
        help="rwku, muse, utility, authors or all (comma list; all = rwku,muse,utility; authors probes"
        " the TOFU fictitious authors of <data>/tofu_authors, for a model taught them with"
        " `lethe teach --authors`)",
    )
    chosen.add_argument(
        "--data-dir", default=None, help="evaluation data (default: $LETHE_EVAL_DATA, else ../shared/eval)"
    )
    chosen.add_argument(
        "--targets", type=_csv, default=None, help="RWKU targets: comma list of folder or name substrings"
    )
    chosen.add_argument(
        "--levels", type=_levels, default=[1, 2, 3], help="RWKU levels, e.g. 1,2 (neighbours have 1-2)"
    )
    chosen.add_argument(
        "--forget-authors",
        type=_csv,
        default=None,
        help="authors suite: comma list of name substrings of the forget authors to register and probe"
        " (default: all)",
    )
    chosen.add_argument("--sample", type=_positive, default=None, help="only the first N probes of each set")
    chosen.add_argument(
        "--max-tokens", type=_positive, default=DEFAULT_MAX_TOKENS, help="answer length for QA probes"
    )
    chosen.add_argument(
        "--instruction-max-tokens",
        type=_positive,
        default=DEFAULT_INSTRUCTION_MAX_TOKENS,
        help="answer length for instructions",
    )
    chosen.add_argument(
        "--author-max-tokens",
        type=_positive,
        default=DEFAULT_AUTHOR_MAX_TOKENS,
        help="answer length for the authors suite (TOFU answers are whole sentences)",
    )
    chosen.add_argument("--seed", type=int, default=0, help="sampling seed sent with every request")

    output = parser.add_argument_group("output")
    output.add_argument(
        "--out", required=True, type=Path, help="folder for results.json, report.md and plots"
    )
    output.add_argument(
        "--compare", type=Path, default=None, help="a baseline run's results.json to compare with"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from openai import APIError
    from rich.console import Console

    from lethe.evaluation.client import ServerError
    from lethe.evaluation.datasets import DataError, resolve_data_dir
    from lethe.evaluation.registration import AdminError
    from lethe.evaluation.runner import EvalConfig, run_eval

    console = Console(stderr=True)
    try:
        config = EvalConfig(
            base_url=args.base_url,
            api_key=args.api_key,
            admin_key=args.admin_key,
            admin_url=args.admin_url,
            register_targets=args.register,
            policy=args.policy,
            suppression=args.suppression,
            suites=args.suite,
            data_dir=resolve_data_dir(args.data_dir),
            targets=args.targets,
            forget_authors=args.forget_authors,
            author_max_tokens=args.author_max_tokens,
            levels=args.levels,
            sample=args.sample,
            max_tokens=args.max_tokens,
            instruction_max_tokens=args.instruction_max_tokens,
            concurrency=args.concurrency,
            timeout=args.timeout,
            seed=args.seed,
            model=args.model,
            compare=args.compare,
            out=args.out,
        )
        return run_eval(config, console)
    except APIError as error:
        console.print(f"[red]lethe eval: {args.base_url}: {error}[/]")
        return 2
    except (DataError, AdminError, ServerError, OSError) as error:
        console.print(f"[red]lethe eval: {error}[/]")
        return 2
