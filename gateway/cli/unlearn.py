"""`lethe unlearn {ssd,flat}`: make an unlearned checkpoint offline, with a progress bar.

Hyperparameter flags are generated from the pydantic models of `lethe.models.unlearning.spec`, so the
command line, the job API and the validation cannot drift apart; values are passed through as
typed and pydantic converts or refuses them. Bad parameters and unknown targets exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel

from lethe.models.unlearning.spec import FLATParams, SSDParams

METHODS: dict[str, tuple[type[BaseModel], str]] = {
    "ssd": (
        SSDParams,
        "Selective Synaptic Dampening: dampen weights whose Fisher importance for the forget "
        "data dominates their importance for retain data.",
    ),
    "flat": (
        FLATParams,
        "FLAT: fine-tune on the forget data only with an f-divergence loss between template "
        '("I don\'t know") answers and the forget answers.',
    ),
}
_PARAM_PREFIX = "param__"
EXIT_BAD_REQUEST = 2


def _is_list(annotation: Any) -> bool:
    return get_origin(annotation) is list or any(get_origin(a) is list for a in get_args(annotation))


def _add_param_flags(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    group = parser.add_argument_group("hyperparameters (validated by the job's schema)")
    for name, field in model.model_fields.items():
        key = field.alias or name
        extra: dict[str, Any] = {"nargs": "+"} if _is_list(field.annotation) else {}
        choices = get_args(field.annotation) if get_origin(field.annotation) is Literal else None
        group.add_argument(
            f"--{key.replace('_', '-')}",
            dest=_PARAM_PREFIX + key,
            metavar=key.upper(),
            choices=choices or None,
            help=f"{field.description} [default: {field.default}]",
            **extra,
        )


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "unlearn",
        help="make an unlearned checkpoint offline (SSD or FLAT)",
        description="Edit the served model's weights so that it forgets the given targets, evaluate it before"
        " and after on the targets' probes, and write a checkpoint under LETHE_HOME/checkpoints (or --out).",
    )
    methods = parser.add_subparsers(dest="method", required=True, metavar="METHOD")
    for method, (model, help_text) in METHODS.items():
        sub = methods.add_parser(method, help=help_text, description=help_text)
        sub.add_argument(
            "--target",
            dest="targets",
            nargs="+",
            action="extend",
            required=True,
            metavar="NAME",
            help="registered target name, or an RWKU target folder path (repeatable)",
        )
        sub.add_argument(
            "--from",
            dest="from_checkpoint",
            metavar="CHECKPOINT",
            help="source checkpoint id (default: the one the gateway serves; with --out, the base model)",
        )
        sub.add_argument("--out", type=Path, help="checkpoint store folder (default: LETHE_HOME/checkpoints)")
        sub.add_argument("--model", type=Path, help="base model folder (LETHE_MODEL; default: embedded)")
        sub.add_argument(
            "--data-dir",
            type=Path,
            help="evaluation/retain data (LETHE_EVAL_DATA; default /work/shared/eval)",
        )
        evaluation = sub.add_argument_group("before/after evaluation")
        evaluation.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
        evaluation.add_argument(
            "--eval-samples", type=int, help="probes per RWKU split per target [default: 10]"
        )
        evaluation.add_argument(
            "--utility-samples", type=int, help="questions per TOFU utility set [default: 16]"
        )
        evaluation.add_argument(
            "--muse-samples", type=int, help="MUSE KnowMem questions per split [default: 16]"
        )
        evaluation.add_argument(
            "--instruction-samples",
            type=int,
            help="general instructions answered for the fluency figure [default: 16]",
        )
        evaluation.add_argument(
            "--mia-samples", type=int, help="texts per side of each MIA AUC [default: 24]"
        )
        _add_param_flags(sub, model)
        sub.set_defaults(run=run)


def _params(args: argparse.Namespace) -> dict[str, Any]:
    return {
        name.removeprefix(_PARAM_PREFIX): value
        for name, value in vars(args).items()
        if name.startswith(_PARAM_PREFIX) and value is not None
    }


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError
    from rich.console import Console

    from lethe.gateway.cli.progress import RichProgress, print_summary
    from lethe.gateway.config import Settings
    from lethe.gateway.jobs.evaluation import EvaluationOptions
    from lethe.gateway.jobs.runner import (
        UnlearnCancelled,
        format_validation_error,
        run_unlearning,
        validate_spec,
    )
    from lethe.gateway.store import BASE_CHECKPOINT, open_store
    from lethe.models.checkpoints import CheckpointStore
    from lethe.models.unlearning.spec import UnlearnSpec

    console = Console(stderr=True)
    try:
        spec = UnlearnSpec(
            method=args.method,
            targets=args.targets,
            params=_params(args),
            from_checkpoint=args.from_checkpoint,
        )
        options = EvaluationOptions(
            enabled=not args.no_eval,
            **{
                key: value
                for key, value in (
                    ("samples", args.eval_samples),
                    ("utility_samples", args.utility_samples),
                    ("muse_samples", args.muse_samples),
                    ("instruction_samples", args.instruction_samples),
                    ("mia_samples", args.mia_samples),
                )
                if value is not None
            },
        )
    except ValidationError as error:
        console.print(f"[red]error:[/red] {format_validation_error(error, 'arguments')}")
        return EXIT_BAD_REQUEST
    settings = Settings(**({"model": args.model} if args.model else {}))
    store = open_store(settings)
    try:
        serving = store.serving_checkpoint().checkpoint
        if spec.from_checkpoint is None and args.out is None and serving != BASE_CHECKPOINT:
            spec = spec.model_copy(update={"from_checkpoint": serving})  # as the job API does
        checkpoints = CheckpointStore(args.out or settings.home / "checkpoints")
        try:
            validate_spec(spec, store, checkpoints=checkpoints, data_dir=args.data_dir)
        except ValueError as error:
            console.print(f"[red]error:[/red] {error}")
            return EXIT_BAD_REQUEST
        with RichProgress(console) as progress:
            manifest = run_unlearning(
                spec,
                settings=settings,
                store=store,
                progress=progress,
                cancelled=lambda: False,
                checkpoints=checkpoints,
                data_dir=args.data_dir,
                evaluation=options,
            )
    except ValueError as error:
        console.print(f"[red]error:[/red] {error}")
        return EXIT_BAD_REQUEST
    except UnlearnCancelled as error:
        console.print(f"[yellow]{error}[/yellow]")
        return 1
    finally:
        store.close()
    print_summary(Console(), manifest, checkpoints.path(manifest.id))
    json.dump({"id": manifest.id, "path": str(checkpoints.path(manifest.id))}, sys.stdout)
    sys.stdout.write("\n")
    return 0
