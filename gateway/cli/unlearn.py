"""`lethe unlearn {ssd,flat}`: make an unlearned checkpoint offline, with a progress bar.

Hyperparameter flags are generated from the pydantic models of `lethe.models.unlearning.spec`, so the
command line, the job API and the validation cannot drift apart; values are passed through as
typed and pydantic converts or refuses them. The job is checked as the job API checks it
(`lethe.gateway.jobs.validation`) before anything is loaded. Bad parameters and unknown targets exit
with code 2.

(pydantic-settings' `CliSettingsSource` can add flags to an argparse subparser, but it splits a list
flag's value on commas, which would cut a module pattern such as `layers[.][0-9]{1,2}[.]mlp` in two, and
it does not take `--modules A B`; so the flags stay generated here.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import BaseModel, ValidationError

from lethe.gateway.cli.param_flags import add_param_flags, param_values
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
EXIT_BAD_REQUEST = 2


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
            help="registered target id or name, or the name of an RWKU target of the evaluation data"
            " (not a path; repeatable)",
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
            help="evaluation data: RWKU targets, retain data, the before/after evaluation"
            " (default: LETHE_EVAL_DATA; none: registered targets only, no evaluation)",
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
        add_param_flags(sub, model, "hyperparameters (validated by the job's schema)")
        sub.set_defaults(run=run)


def format_validation_error(error: ValidationError, what: str) -> str:
    """One line per problem: `field: message`, field names as the user spells them."""
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or what}: {e['msg']}" for e in error.errors())
    return f"invalid {what}: {problems}"


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lethe.gateway.cli.progress import RichProgress, print_summary
    from lethe.gateway.config import Settings
    from lethe.gateway.jobs.evaluation import EvaluationOptions
    from lethe.gateway.jobs.runner import UnlearnCancelled, run_unlearning
    from lethe.gateway.jobs.validation import check_job, starting_checkpoint
    from lethe.gateway.store import open_store
    from lethe.models.checkpoints import CheckpointStore
    from lethe.models.loading import resolve_model_path
    from lethe.models.unlearning.spec import parse_spec

    console = Console(stderr=True)
    try:
        spec = parse_spec(
            {
                "method": args.method,
                "targets": args.targets,
                "params": param_values(args),
                "from_checkpoint": args.from_checkpoint,
            }
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
    data_dir = args.data_dir or settings.eval_data
    store = open_store(settings)
    try:
        # As the job API does: without --from, build on what the gateway serves; a separate --out
        # store starts from the base model.
        serving = None if args.out is not None else store.serving_checkpoint().checkpoint
        spec = spec.model_copy(update={"from_checkpoint": starting_checkpoint(spec.from_checkpoint, serving)})
        checkpoints = CheckpointStore(args.out or settings.home / "checkpoints")
        check_job(
            spec,
            store=store,
            data_dir=data_dir,
            catalog=checkpoints,
            base_model=lambda: resolve_model_path(settings.engine_config()),
        )
        with RichProgress(console) as progress:
            manifest = run_unlearning(
                spec,
                settings=settings,
                store=store,
                progress=progress,
                cancelled=lambda: False,
                checkpoints=checkpoints,
                data_dir=data_dir,
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
