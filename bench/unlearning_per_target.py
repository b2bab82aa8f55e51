"""SSD and FLAT applied to one RWKU target at a time, as a right-to-be-forgotten request arrives.

Each (method, target) is one `lethe unlearn` run in a fresh process, writing its checkpoint into
`OUT/<method>/<target folder>/`; a pair whose checkpoint is already there is not run again, so an
interrupted sweep resumes where it stopped. The table is read from the checkpoints' manifests:
the job's own before/after evaluation on that target's probes, and whether the target meets the
goal of issue #6 (forget recall halved, neighbour recall at least 90% of its baseline). Arguments
after `--` go to every `lethe unlearn` call (hyperparameters, evaluation sizes).

    python bench/unlearning_per_target.py [--methods ssd flat] [--out eval-runs/unlearning/per-target] \
        [--rwku $LETHE_EVAL_DATA/rwku] [TARGET_FOLDER ...] [-- --learning-rate 1e-5]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lethe.gateway.jobs.data import default_data_dir
from lethe.gateway.jobs.evaluation import BeforeAfter, Evaluation, Snapshot, mean_snapshot
from lethe.models.checkpoints import CheckpointManifest, CheckpointStore

FORGET_CUT = 0.5  # forget recall at most half its baseline
NEIGHBOUR_KEPT = 0.9  # neighbour recall at least 90% of its baseline
_ROUNDING = 1e-9  # recalls are means of fractions: 0.36 / 0.4 must count as 90%


def run_missing(method: str, target: Path, out: Path, extra: Sequence[str]) -> CheckpointManifest:
    """The checkpoint of `method` on `target`, made by `lethe unlearn` unless already there."""
    store = CheckpointStore(out / method / target.name)
    done = store.list()
    if not done:
        command = [sys.executable, "-m", "lethe.gateway.cli.main", "unlearn", method, "--target", target.name]
        # The job's own summary goes to stderr with its progress: stdout is the table.
        subprocess.run([*command, "--out", str(store.root), *extra], check=True, stdout=sys.stderr)
        done = store.list()
    return done[-1]


def _ratio(after: float | None, before: float | None) -> float | None:
    return None if after is None or not before else after / before


def _cell(value: float | None, fmt: str = "{:.1%}") -> str:
    return "-" if value is None else fmt.format(value)


def _meets(before: Snapshot, after: Snapshot) -> bool | None:
    forget = _ratio(after.forget_recall, before.forget_recall)
    neighbour = _ratio(after.neighbour_recall, before.neighbour_recall)
    if forget is None or neighbour is None:
        return None  # a baseline of 0 has nothing to halve or to keep
    return forget <= FORGET_CUT + _ROUNDING and neighbour >= NEIGHBOUR_KEPT - _ROUNDING


def _recalls(before: Snapshot, after: Snapshot) -> list[str]:
    forget = _ratio(after.forget_recall, before.forget_recall)
    change = _cell(None if forget is None else forget - 1, "{:+.0%}")
    return [
        f"{before.forget_recall:.3f} -> {after.forget_recall:.3f} ({change})",
        f"{before.neighbour_recall:.3f} -> {after.neighbour_recall:.3f}"
        f" ({_cell(_ratio(after.neighbour_recall, before.neighbour_recall))})",
        _cell(_ratio(after.forget_new_word_recall, before.forget_new_word_recall)),
        _cell(_ratio(after.neighbour_new_word_recall, before.neighbour_new_word_recall)),
    ]


_VERDICT = {True: "yes", False: "no", None: "-"}


def _markdown(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def row(method: str, manifest: CheckpointManifest) -> tuple[str, BeforeAfter, bool | None]:
    """One table row for a single-target checkpoint, its before/after means and its verdict."""
    if manifest.evaluation is None:
        raise SystemExit(f"{manifest.id} was made with --no-eval: nothing to compare")
    evaluation = Evaluation.model_validate(manifest.evaluation)
    before, after = evaluation.mean.before, evaluation.mean.after
    utility = evaluation.utility_recall
    meets = _meets(before, after)
    cells = [
        method,
        ", ".join(manifest.targets),
        *_recalls(before, after),
        f"{utility['before']:.2f} -> {utility['after']:.2f}" if utility.get("after") is not None else "-",
        f"{manifest.timings.get('method', 0):.0f}",
        _VERDICT[meets],
    ]
    return _markdown(cells), evaluation.mean, meets


def mean_row(method: str, results: list[BeforeAfter], verdicts: list[bool | None]) -> str:
    """Means over the targets (each weighs the same, as in the all-targets table) and their verdict."""
    before = mean_snapshot([r.before for r in results])
    after = mean_snapshot([r.after for r in results])
    met = sum(1 for v in verdicts if v)
    judged = sum(1 for v in verdicts if v is not None)
    verdict = f"{_VERDICT[_meets(before, after)]}; {met} of {judged} alone"
    return _markdown([method, f"mean of {len(results)} targets", *_recalls(before, after), "", "", verdict])


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "targets", nargs="*", type=Path, help="RWKU target folders under --rwku (default: all of them)"
    )
    parser.add_argument("--methods", nargs="+", default=["ssd", "flat"], choices=["ssd", "flat"])
    parser.add_argument("--out", type=Path, default=Path("eval-runs/unlearning/per-target"))
    parser.add_argument(
        "--rwku",
        type=Path,
        default=None,
        help="RWKU targets folder [default: $LETHE_EVAL_DATA/rwku, where `lethe unlearn` reads them]",
    )
    args = parser.parse_args(own)
    if args.rwku is None:
        data = default_data_dir()
        if data is None:
            parser.error("set LETHE_EVAL_DATA (as `lethe unlearn` needs it) or pass --rwku")
        args.rwku = data / "rwku"
    targets = args.targets or sorted(p for p in args.rwku.iterdir() if (p / "passage.json").is_file())

    print(
        "| method | target | forget recall | neighbour recall (share kept) | forget new-word (share left)"
        " | neighbour new-word (share kept) | TOFU | method s | goal met |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for method in args.methods:
        results, verdicts = [], []
        for target in targets:
            line, result, meets = row(method, run_missing(method, target, args.out, extra))
            print(line, flush=True)
            results.append(result)
            verdicts.append(meets)
        print(mean_row(method, results, verdicts))


if __name__ == "__main__":
    main()
