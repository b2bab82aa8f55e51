"""`lethe sae`: train a sparse autoencoder on the served model's residual stream, or sweep layers.

    lethe sae train --layer 12 [--eval-data DIR] [--text FILE ...] [--tokens 2000000 ...]
    lethe sae sweep --layers 6,12,18 [--tokens 200000] [--output sweep.json]

Texts are local only (the evaluation data's non-probe texts, `--text` files, and optionally the
model's own answers); nothing is downloaded. `train` writes an SAE folder in sae-lens's format plus
`report.json`, and resumes a killed run from `<output>/.training/`. The trainer is
`lethe.models.sae.training`; see docs/sae.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    from lethe.gateway.config import Settings
    from lethe.models.sae.training import QualityReport, SweepRow

EXIT_BAD_REQUEST = 2
SAES_FOLDER = "saes"
TRAIN_DEFAULTS = {
    "tokens": 2_000_000,
    "collect_tokens": None,
    "loss_tokens": 8192,
    "batch_size": 4096,
    "expansion": 8,
    "lr": 4e-4,
}
SWEEP_DEFAULTS = {
    "tokens": 200_000,
    "collect_tokens": 50_000,
    "loss_tokens": 4096,
    "batch_size": 1024,
    "expansion": 4,
    "lr": 1e-3,  # a brief run: 4e-4 is still far from converged after 200 steps
}


class BadInput(Exception):
    """Bad input: one line, exit code 2."""


def _common(parser: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    parser.add_argument("--model", type=Path, help="model folder (LETHE_MODEL; default: the embedded model)")
    parser.add_argument(
        "--eval-data",
        type=Path,
        help="evaluation data folder (default: $LETHE_EVAL_DATA): its general instructions, RWKU passages,"
        " TOFU facts and fictitious authors' pairs are training text (never its probes)",
    )
    parser.add_argument(
        "--text",
        dest="texts",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="a text file (one document) or a JSON list of strings (repeatable)",
    )
    parser.add_argument(
        "--answers",
        type=int,
        default=0,
        metavar="N",
        help="also the model's greedy answers to the first N general instructions (slow on CPU) [default: 0]",
    )
    parser.add_argument(
        "--tokens",
        type=int,
        default=defaults["tokens"],
        help="training tokens; passes over the collected activations as needed [default: %(default)s]",
    )
    parser.add_argument(
        "--collect-tokens",
        type=int,
        default=defaults["collect_tokens"],
        metavar="N",
        help="collect activations of at most N tokens of training text [default: %(default)s, None: all]",
    )
    parser.add_argument(
        "--loss-tokens",
        type=int,
        default=defaults["loss_tokens"],
        metavar="N",
        help="held-out tokens the language-model loss is measured on [default: %(default)s]",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=defaults["batch_size"],
        help="tokens per step [default: %(default)s]",
    )
    parser.add_argument(
        "--expansion", type=int, default=defaults["expansion"], help="d_sae / d_in [default: %(default)s]"
    )
    parser.add_argument(
        "--k", type=int, default=32, help="mean active features per token [default: %(default)s]"
    )
    parser.add_argument(
        "--lr", type=float, default=defaults["lr"], help="Adam learning rate [default: %(default)s]"
    )
    parser.add_argument("--seed", type=int, default=0, help="[default: %(default)s]")
    parser.add_argument(
        "--threads", type=int, help="torch threads (default: LETHE_TORCH_THREADS, else torch's default)"
    )


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "sae",
        help="train a sparse autoencoder on the model's residual stream (or sweep layers)",
        description="Train a BatchTopK sparse autoencoder on one layer's residual stream of the served"
        " model, from local text only, and report its quality (explained variance, L0, dead features,"
        " language-model loss with it spliced in).",
    )
    subcommands = parser.add_subparsers(dest="sae_command", required=True, metavar="COMMAND")
    train = subcommands.add_parser(
        "train",
        help="train an SAE at one layer",
        description="Train an SAE on the output of model.model.layers[LAYER] and write it (sae-lens's format,"
        " JumpReLU) with report.json. A killed run resumes from <output>/.training when run again.",
    )
    train.add_argument("--layer", type=int, required=True, help="decoder layer whose output the SAE reads")
    train.add_argument(
        "--output",
        type=Path,
        help=f"SAE folder (default: LETHE_HOME/{SAES_FOLDER}/<model>-L<layer>-x<expansion>-k<k>)",
    )
    _common(train, TRAIN_DEFAULTS)
    train.add_argument(
        "--stop-after",
        type=int,
        metavar="STEPS",
        help="stop after this many steps of this run, resumable (as a kill would, but checkpointed)",
    )
    train.set_defaults(run=run_train)

    sweep = subcommands.add_parser(
        "sweep",
        help="train a small SAE briefly at each of several layers and compare them",
        description="A small SAE per layer (the same trainer, fewer tokens, one shared collection pass):"
        " FVE, L0, dead share and spliced/original loss per layer.",
    )
    sweep.add_argument("--layers", required=True, help="comma-separated layers, e.g. 6,12,18")
    sweep.add_argument("--output", type=Path, help="also write the table as JSON to this file")
    _common(sweep, SWEEP_DEFAULTS)
    sweep.set_defaults(run=run_sweep)


# ------------------------------------------------------------------------------------------ setup
def _settings(args: argparse.Namespace) -> Settings:
    from lethe.gateway.config import Settings

    return Settings(**({"model": args.model} if args.model else {}))


def _model_path(settings: Settings) -> Path:
    from lethe.models.loading import resolve_model_path

    try:
        return resolve_model_path(settings.engine_config())
    except SystemExit as error:  # a --model folder that is not a model
        raise BadInput(str(error.code)) from None


def _num_layers(path: Path) -> int:
    config = json.loads((path / "config.json").read_text())
    config = config.get("text_config", config)
    return int(config["num_hidden_layers"])


def _check_layers(layers: list[int], path: Path) -> None:
    count = _num_layers(path)
    wrong = [layer for layer in layers if not 0 <= layer < count]
    if wrong:
        raise BadInput(f"layer {wrong[0]} out of range: {path.name} has layers 0 to {count - 1}")


def _train_config(args: argparse.Namespace, layer: int) -> Any:
    from pydantic import ValidationError

    from lethe.models.sae.training import TrainConfig

    for flag in ("answers", "collect_tokens", "loss_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            raise BadInput(f"--{flag.replace('_', '-')} must be at least 0")
    try:
        return TrainConfig(
            layer=layer,
            expansion=args.expansion,
            k=args.k,
            lr=args.lr,
            batch_size=args.batch_size,
            tokens=args.tokens,
            seed=args.seed,
        )
    except ValidationError as error:
        problems = "; ".join(f"--{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
        raise BadInput(f"invalid arguments: {problems}") from None


def _threads(args: argparse.Namespace, settings: Settings) -> None:
    import torch

    threads = args.threads or settings.torch_threads
    if threads is not None:
        if threads < 1:
            raise BadInput("--threads must be at least 1")
        torch.set_num_threads(threads)


def _eval_data(args: argparse.Namespace) -> Path | None:
    """--eval-data, else $LETHE_EVAL_DATA (as `lethe teach` reads it); it must be a folder."""
    from lethe.gateway.cli.teach import EVAL_DATA_ENV, eval_data_dir

    folder = eval_data_dir(args.eval_data)
    if folder is not None and not folder.is_dir():
        source = "--eval-data" if args.eval_data else EVAL_DATA_ENV
        raise BadInput(f"{source} {folder}: no such folder")
    return folder


def _prepare(args: argparse.Namespace, layers: list[int], console: Console) -> dict[str, Any]:
    """Everything but the training, checked before the model's weights are loaded."""
    settings = _settings(args)
    path = _model_path(settings)
    _check_layers(layers, path)
    config = _train_config(args, layers[0])
    eval_data = _eval_data(args)
    _threads(args, settings)

    from transformers import AutoTokenizer

    from lethe.models.sae.training import training_texts

    tokenizer = AutoTokenizer.from_pretrained(path)
    try:
        texts = training_texts(tokenizer, eval_data=eval_data, text_files=args.texts)
    except ValueError as error:
        raise BadInput(str(error)) from None
    if args.answers and (eval_data is None or not (eval_data / "general" / "instructions.json").is_file()):
        raise BadInput("--answers needs the general instructions of the evaluation data (--eval-data)")
    console.log(f"model {path}; {len(texts)} texts")
    return {
        "settings": settings,
        "path": path,
        "config": config,
        "eval_data": eval_data,
        "tokenizer": tokenizer,
        "texts": texts,
    }


def _load_model(path: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


# ------------------------------------------------------------------------------------------ train
def run_train(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lethe.gateway.cli.progress import RichProgress
    from lethe.models.sae.training import cached_answer_texts, split_texts, train_and_report

    console = Console(stderr=True)
    try:
        ready = _prepare(args, [args.layer], console)
        path, config, settings = ready["path"], ready["config"], ready["settings"]
        output = args.output or settings.home / SAES_FOLDER / (
            f"{path.name}-L{config.layer}-x{config.expansion}-k{config.k}"
        )
        output = output.expanduser()
        if output.exists() and not output.is_dir():
            raise BadInput(f"--output {output}: not a folder")
        if args.stop_after is not None and args.stop_after < 1:
            raise BadInput("--stop-after must be at least 1")
        model = _load_model(path)
        with RichProgress(console) as progress:
            texts = list(ready["texts"])
            if args.answers:
                texts += cached_answer_texts(
                    output,
                    model,
                    ready["tokenizer"],
                    ready["eval_data"],
                    args.answers,
                    model_name=path.name,
                    progress=progress,
                )
            train, held_out = split_texts(texts, config.seed)
            report = train_and_report(
                model,
                ready["tokenizer"],
                train,
                held_out,
                config,
                output,
                model_name=path.name,
                collect_tokens=args.collect_tokens,
                loss_tokens=args.loss_tokens,
                stop_after=args.stop_after,
                progress=progress,
            )
    except (BadInput, ValueError) as error:
        console.print(f"[red]error:[/red] {error}", soft_wrap=True)
        return EXIT_BAD_REQUEST
    if report is None:
        console.print(f"stopped after {args.stop_after} steps; run the same command again to resume")
        return 0
    print_report(Console(), report, output)
    return 0


def print_report(console: Console, report: QualityReport, output: Path) -> None:
    from rich.table import Table

    table = Table(title=f"SAE {report.model} layer {report.layer} (held-out texts)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    loss = report.loss
    rows = [
        ("fraction of variance explained", f"{report.fve:.4f}"),
        ("L0 (active features per token)", f"{report.l0:.1f}"),
        ("dead features", f"{report.dead_share:.2%} ({report.dead_features} of {report.d_sae})"),
        ("LM loss, original", f"{loss.original:.4f}"),
        ("LM loss, SAE spliced in", f"{loss.spliced:.4f}"),
        ("LM loss, layer zero-ablated", f"{loss.zero_ablated:.4f}"),
        ("spliced / original", f"{loss.spliced_ratio:.4f}"),
        ("loss recovered", f"{loss.recovered:.4f}"),
        ("loss measured on", f"{loss.tokens:,} tokens"),
        ("d_in x expansion = d_sae, k", f"{report.d_in} x {report.expansion} = {report.d_sae}, k {report.k}"),
        (
            "training tokens (steps x batch)",
            f"{report.tokens_trained:,} ({report.steps} x {report.batch_size})",
        ),
        ("activations collected / held out", f"{report.tokens_collected:,} / {report.tokens_held_out:,}"),
        ("training / collection seconds", f"{report.training_seconds:.0f} / {report.collection_seconds:.0f}"),
        ("FVE of the last tenth of training batches", f"{report.train_fve:.4f}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    console.print(f"wrote {output} (cfg.json, sae_weights.safetensors, report.json)")


# ------------------------------------------------------------------------------------------ sweep
def _parse_layers(text: str) -> list[int]:
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BadInput(f"--layers {text!r}: comma-separated integers, e.g. 6,12,18") from None
    if not layers or len(set(layers)) != len(layers):
        raise BadInput(f"--layers {text!r}: one or more distinct layers, e.g. 6,12,18")
    return layers


def run_sweep(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lethe.gateway.cli.progress import RichProgress
    from lethe.models.sae.training import answer_texts, split_texts, sweep

    console = Console(stderr=True)
    try:
        layers = _parse_layers(args.layers)
        ready = _prepare(args, layers, console)
        if args.output is not None and args.output.is_dir():
            raise BadInput(f"--output {args.output}: a folder; give a JSON file name")
        path, config = ready["path"], ready["config"]
        model = _load_model(path)
        with RichProgress(console) as progress:
            texts = list(ready["texts"])
            if args.answers:
                texts += answer_texts(model, ready["tokenizer"], ready["eval_data"], args.answers, progress)
            train, held_out = split_texts(texts, config.seed)
            rows, info = sweep(
                model,
                ready["tokenizer"],
                train,
                held_out,
                layers,
                config,
                collect_tokens=args.collect_tokens,
                loss_tokens=args.loss_tokens,
                progress=progress,
            )
    except (BadInput, ValueError) as error:
        console.print(f"[red]error:[/red] {error}", soft_wrap=True)
        return EXIT_BAD_REQUEST
    print_sweep(Console(), rows, info, path.name)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        payload = {"model": path.name, **info, "layers": [row.model_dump() for row in rows]}
        args.output.write_text(json.dumps(payload, indent=2) + "\n")
        Console(stderr=True).print(f"wrote {args.output}")
    return 0


def print_sweep(console: Console, rows: list[SweepRow], info: dict[str, Any], model: str) -> None:
    from rich.table import Table

    config = info["config"]
    table = Table(
        title=f"SAE layer sweep, {model}: x{config['expansion']}, k {config['k']},"
        f" {config['tokens']:,} tokens of {info['tokens_collected']:,} collected;"
        f" loss on {info['loss_tokens']:,} held-out tokens"
        f" (original {info['original_loss']:.4f})"
    )
    for column in ("layer", "FVE", "L0", "dead", "spliced/original loss", "loss recovered", "train s"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            str(row.layer),
            f"{row.fve:.4f}",
            f"{row.l0:.1f}",
            f"{row.dead_share:.1%}",
            f"{row.spliced_ratio:.4f}",
            f"{row.recovered:.4f}",
            f"{row.training_seconds:.0f}",
        )
    console.print(table)
