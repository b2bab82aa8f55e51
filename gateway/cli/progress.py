"""Terminal rendering for `lethe unlearn`: a rich progress bar as a `ProgressSink`, and the
before/after table printed at the end."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from lethe.models.checkpoints import CheckpointManifest


class RichProgress:
    """Implements `lethe.gateway.jobs.runner.ProgressSink` on a rich progress bar; when the output is not
    a terminal (a log file), a line every 5% instead, since a live bar is not drawn there."""

    LOG_EVERY = 0.05

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self._task = self._progress.add_task("starting", total=1.0)
        self._console = console
        self._logged = -1.0

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(
        self, _type: type[BaseException] | None, _value: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self._progress.stop()

    def update(self, fraction: float, message: str) -> None:
        self._progress.update(self._task, completed=fraction, description=message)
        if not self._console.is_terminal and fraction - self._logged >= self.LOG_EVERY:
            self._logged = fraction
            self._console.log(f"{fraction:4.0%} {message}")

    def log(self, line: str) -> None:
        self._progress.console.log(line)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_summary(console: Console, manifest: CheckpointManifest, path: Path) -> None:
    console.print(f"checkpoint [bold]{manifest.id}[/bold] at {path}")
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in manifest.timings.items())
    console.print(f"timings: {timings}; peak RSS {manifest.peak_rss_mb or 0:.0f} MB")
    if manifest.evaluation is None:
        return
    table = Table(title="before -> after")
    columns = (
        "target",
        "forget recall",
        "new words",
        "neighbour recall",
        "new words",
        "MIA AUC loss",
        "zlib",
        "min-k%++",
    )
    for column in columns:
        table.add_column(column)
    rows = {**manifest.evaluation["targets"], "mean": manifest.evaluation["mean"]}
    for name, pair in rows.items():
        before, after = pair["before"], pair["after"]
        cells = [
            f"{_cell(before.get(key))} -> {_cell(after.get(key))}"
            for key in (
                "forget_recall",
                "forget_new_word_recall",
                "neighbour_recall",
                "neighbour_new_word_recall",
            )
        ] + [
            f"{_cell(before['mia_auc'].get(k))} -> {_cell(after['mia_auc'].get(k))}"
            for k in ("loss", "zlib", "mink++")
        ]
        table.add_row(name, *cells)
    console.print(table)
    general = (
        ("TOFU utility recall", "utility_recall"),
        ("fluency (n-gram entropy of instruction answers)", "fluency"),
        ("MUSE KnowMem F1, forget", "muse_knowmem_forget"),
        ("MUSE KnowMem F1, retain", "muse_knowmem_retain"),
    )
    for label, key in general:
        pair = manifest.evaluation[key]
        console.print(f"{label}: {_cell(pair['before'])} -> {_cell(pair['after'])}")
