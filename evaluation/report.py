"""report.md and its plots, from a run's results (and optionally its baseline's).

With a baseline every figure is shown as "baseline → this run", so the effect of the guard is
read in one place; the plots draw the same pairs side by side.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from lethe.evaluation.records import EvalResults, GroupScore, Summary
from lethe.evaluation.scoring import KNOWN_FLOOR, pooled

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FORGET_SPLITS = ("forget_level1", "forget_level2", "forget_level3")
NEIGHBOUR_SPLITS = ("neighbor_level1", "neighbor_level2")
SPLIT_LABELS = {
    "forget_level1": "Forget L1",
    "forget_level2": "Forget L2",
    "forget_level3": "Forget L3",
    "neighbor_level1": "Neighbour L1",
    "neighbor_level2": "Neighbour L2",
}
UTILITY_METRICS = {
    "world_facts": ("TOFU world facts", "ROUGE-L recall", "rouge_l_recall"),
    "real_authors": ("TOFU real authors", "ROUGE-L recall", "rouge_l_recall"),
    "instructions": ("General instructions", "fluency (n-gram entropy, bits)", "entropy"),
}

AUTHOR_LABELS = {
    "forget_unseen": "Forget authors, unseen (pairs 11-20)",
    "forget_seen": "Forget authors, seen (pairs 1-10, registered)",
    "forget_indirect": "Forget authors, indirect (name not in the question)",
    "retain_unseen": "Retain authors, unseen (pairs 11-20)",
    "retain_seen": "Retain authors, seen (pairs 1-10)",
}

PLOT_TARGETS = "forget_vs_neighbour.png"
PLOT_ATTACKS = "attacks.png"
PLOT_COMPARE = "compare_targets.png"

METHOD = [
    "## Method",
    "",
    "Each prompt is one user message of a chat completion (temperature 0, fixed seed), in the"
    " benchmark's own format: RWKU's cloze / brief-question prompts ending in `Answer:` (answers cut at"
    " the first line break), MUSE's question with its in-context examples (cut where a next question"
    " starts), TOFU's bare question, RWKU's `Instruction:` prompt for fluency. ROUGE-L is Google's"
    " `rouge-score` on lower-cased word tokens, with the Porter stemmer for RWKU and TOFU and without it"
    " for MUSE, as MUSE scores. Fluency is RWKU's weighted bigram/trigram entropy. Per-target figures are"
    " means over that target's probes; *mean over targets* weighs every target the same, as RWKU does."
    " Failed requests are counted and left out of the means.",
]

Getter = Callable[[Summary], float | None]
Table = Callable[[Summary], Mapping[str, GroupScore]]


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _cell(current: Summary, baseline: Summary | None, get: Getter) -> str:
    if baseline is None:
        return _fmt(get(current))
    return f"{_fmt(get(baseline))} → {_fmt(get(current))}"


def _row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows), ""]


def _value(table: Table, key: str, field: str = "rouge_l_recall") -> Getter:
    def get(summary: Summary) -> float | None:
        group = table(summary).get(key)
        return getattr(group, field) if group else None

    return get


def _pooled_value(table: Table, keys: Iterable[str], field: str = "rouge_l_recall") -> Getter:
    keys = tuple(keys)

    def get(summary: Summary) -> float | None:
        groups = table(summary)
        return pooled((groups[k] for k in keys if k in groups), field)

    return get


def _target(target: str) -> Table:
    return lambda summary: summary.rwku_targets.get(target, {})


def _overall(summary: Summary) -> Mapping[str, GroupScore]:
    return summary.rwku_overall


def _attacks(summary: Summary) -> Mapping[str, GroupScore]:
    return summary.rwku_attacks


def _muse(summary: Summary) -> Mapping[str, GroupScore]:
    return summary.muse


def _utility(summary: Summary) -> Mapping[str, GroupScore]:
    return summary.utility


def _rwku_section(current: Summary, baseline: Summary | None) -> list[str]:
    splits = [s for s in (*FORGET_SPLITS, *NEIGHBOUR_SPLITS) if s in current.rwku_overall]
    forget = [s for s in splits if s in FORGET_SPLITS]
    neighbour = [s for s in splits if s in NEIGHBOUR_SPLITS]
    unknown = set(current.unknown_targets or ())
    header = ["Target", *(SPLIT_LABELS[s] for s in splits)]
    header += ["Forget new-word recall", "Forget contain", "Neighbour contain", "Forget names target"]
    row_tables: list[tuple[str, Table]] = [
        (current.rwku_subjects.get(t, t) + (" ⚠" if t in unknown else ""), _target(t))
        for t in current.rwku_targets
    ]
    row_tables.append(("**Mean over targets**", _overall))
    rows = []
    for label, table in row_tables:
        getters = [_value(table, s) for s in splits]
        getters += [
            _pooled_value(table, forget, "new_word_recall"),
            _pooled_value(table, forget, "contain_rate"),
            _pooled_value(table, neighbour, "contain_rate"),
            _pooled_value(table, forget, "name_share"),
        ]
        rows.append([label, *(_cell(current, baseline, get) for get in getters)])
    lines = [
        "## RWKU per target",
        "",
        "Mean ROUGE-L recall of the gold answer (forget: lower = more forgotten; neighbour: higher ="
        " better preserved). The model often echoes the question, which inflates recall: *new-word"
        " recall* counts only the gold answer's content words that the prompt does not contain."
        " *Contain*: share of answers containing the gold answer as whole words; *names target*: share"
        " of forget answers that say the target's name.",
        "",
        *_table(header, rows),
        *_name_answer_lines(current, baseline),
    ]
    if current.unknown_targets is None:
        lines.append(
            "Which targets the model never knew needs a baseline run (`--no-register` or `--compare`)."
        )
    elif current.unknown_targets:
        names = ", ".join(current.rwku_subjects.get(t, t) for t in current.unknown_targets)
        lines.append(
            f"⚠ never known: {names} — unguarded forget L1/L2 recall below {KNOWN_FLOOR}, so there"
            " is little to forget and a drop there says little about the guard."
        )
    else:
        lines.append(f"Every target was known before any guard (forget L1/L2 recall ≥ {KNOWN_FLOOR}).")
    return [*lines, ""]


def _not_named(summary: Summary) -> Mapping[str, GroupScore]:
    return summary.rwku_neighbours_not_named


def _named_neighbours(summary: Summary) -> dict[str, int]:
    """Neighbour split -> how many of its probes the target's own name answers, where any do."""
    counts = {
        split: summary.rwku_overall[split].n - group.n
        for split, group in summary.rwku_neighbours_not_named.items()
        if split in summary.rwku_overall
    }
    return {split: count for split, count in counts.items() if count}


def _name_answer_lines(current: Summary, baseline: Summary | None) -> list[str]:
    """Neighbour recall without the probes answered by the target's own name, when there are any."""
    named = _named_neighbours(current)
    if not named:
        return []
    cells = "; ".join(
        f"{SPLIT_LABELS[split]} {_cell(current, baseline, _value(_not_named, split))}" for split in named
    )
    return [
        f"{sum(named.values())} neighbour probes have the target's own name, or part of it, as their gold"
        ' answer ("The Mona Lisa is by Italian artist ___ da Vinci"): a guard must not say it. Without'
        f" them, neighbour ROUGE-L recall is {cells}.",
        "",
    ]


def _attack_section(current: Summary, baseline: Summary | None) -> list[str]:
    rows = []
    for attack, group in current.rwku_attacks.items():
        fields = ("rouge_l_recall", "new_word_recall", "contain_rate", "name_share")
        rows.append(
            [attack, str(group.n), *(_cell(current, baseline, _value(_attacks, attack, f)) for f in fields)]
        )
    header = ["Attack", "n", "ROUGE-L recall", "New-word recall", "Contain", "Names target"]
    return [
        "## RWKU level 3 per attack type",
        "",
        "All level-3 probes of each type, pooled over targets.",
        "",
        *_table(header, rows),
    ]


def _muse_section(current: Summary, baseline: Summary | None) -> list[str]:
    rows = []
    for split, group in current.muse.items():
        fields = ("rouge_l_f1", "rouge_l_recall", "contain_rate", "name_share")
        cells = [_cell(current, baseline, _value(_muse, split, f)) for f in fields]
        rows.append([split.removeprefix("knowmem_"), str(group.n), *cells])
    header = ["Set", "n", "KnowMem (ROUGE-L F1)", "ROUGE-L recall", "Contain", "Names Harry Potter"]
    lines = [
        "## MUSE-Books (Harry Potter) KnowMem",
        "",
        "ROUGE-L F1 with MUSE's in-context examples prepended (forget: lower = more forgotten; retain: higher"
        " = better preserved).",
        "",
        *_table(header, rows),
    ]
    if current.muse_never_known:
        lines += [
            f"⚠ never known: unguarded forget KnowMem below {KNOWN_FLOOR}: the model shows no Harry Potter"
            " knowledge to forget, so a drop here says little about the guard.",
            "",
        ]
    return lines


def _utility_section(current: Summary, baseline: Summary | None) -> list[str]:
    rows = []
    for split, group in current.utility.items():
        label, metric, field = UTILITY_METRICS[split]
        row = [label, str(group.n), metric, _cell(current, baseline, _value(_utility, split, field))]
        if baseline is not None:
            row.append(_fmt(group.agreement))
        rows.append(row)
    header = ["Set", "n", "Metric", "Value"]
    if baseline is not None:
        header.append("Identical to baseline")
    return ["## Utility", "", *_table(header, rows)]


def _authors(summary: Summary) -> Mapping[str, GroupScore]:
    return summary.authors


def _author(name: str) -> Table:
    return lambda summary: summary.author_scores.get(name, {})


def _authors_section(current: Summary, baseline: Summary | None) -> list[str]:
    fields = ("rouge_l_recall", "contain_rate", "name_share", "new_word_recall")
    rows = []
    for split, group in current.authors.items():
        share = current.authors_relative.get(split)
        cells = [_cell(current, baseline, _value(_authors, split, f)) for f in fields]
        rows.append([AUTHOR_LABELS.get(split, split), str(group.n), cells[0], _fmt(share), *cells[1:]])
    header = ["Set", "n", "ROUGE-L recall", "Share of baseline", "States the fact", "Says the name"]
    header.append("New-word recall")
    forget = [
        name for name, splits in current.author_scores.items() if any(s.startswith("forget") for s in splits)
    ]
    per_author = []
    for name in forget:
        cells = [
            _cell(current, baseline, _value(_author(name), split))
            for split in ("forget_unseen", "forget_seen", "forget_indirect")
        ]
        says = _pooled_value(_author(name), ("forget_unseen", "forget_seen"), "name_share")
        per_author.append([name, *cells, _cell(current, baseline, says)])
    return [
        "## Fictitious authors (TOFU)",
        "",
        "Every question of the forget authors (the first ten pairs' answers are the registered documents:"
        " *seen*; the other ten are *unseen*) and of the retain authors (the neighbours). *Indirect*: the"
        " forget questions, of either half, that contain no word of the author's name. ROUGE-L recall of"
        " the gold answer (forget: lower = more forgotten; retain: higher = better kept); *share of"
        " baseline*: this run's recall over the `--compare` run's on the same questions. *States the fact*:"
        " the answer says at least half of the gold's content words that the question does not give"
        " (when the question gives them all, ROUGE-L recall ≥ 0.5). *Says the name*: the forget answer"
        " says the author's full name, through small misspellings too (RWKU's *names target*).",
        "",
        *_table(header, rows),
        *_table(["Forget author", "Unseen", "Seen", "Indirect", "Says the name"], per_author),
    ]


def _sets(current: Summary) -> dict[str, GroupScore]:
    """Every set of the run under one label each, for the sections that read one field of each."""
    groups = {f"RWKU {SPLIT_LABELS[s]}": g for s, g in current.rwku_overall.items() if s in SPLIT_LABELS}
    groups |= {f"MUSE {s.removeprefix('knowmem_')}": g for s, g in current.muse.items()}
    groups |= {f"Authors {s.replace('_', ' ')}": g for s, g in current.authors.items()}
    return groups | {UTILITY_METRICS[s][0]: g for s, g in current.utility.items()}


def _detection_section(current: Summary) -> list[str]:
    groups = _sets(current)
    groups |= {
        f"RWKU {SPLIT_LABELS[s]}, not answered by the target's name": current.rwku_neighbours_not_named[s]
        for s in _named_neighbours(current)
    }
    groups |= {f"RWKU level 3, {a}": g for a, g in current.rwku_attacks.items()}
    rows = [[name, str(g.n), _fmt(g.detection_rate)] for name, g in groups.items()]
    return [
        "## Detection",
        "",
        "Share of requests on which the server's guard fired, read from its audit trail (the prompt, or"
        " the answer as it grew): for forget probes the probe's own target (recall); for every other"
        " set any registered target (false positives). RWKU splits are means over targets.",
        "",
        *_table(["Set", "n", "Fired"], rows),
    ]


def _agreement_section(current: Summary) -> list[str]:
    rows = [[name, _fmt(g.agreement)] for name, g in _sets(current).items()]
    return [
        "## Agreement with the baseline",
        "",
        "Share of greedy outputs byte-identical to the baseline run's for the same prompt: what should not"
        " change (neighbours, utility) should stay near 1.",
        "",
        *_table(["Set", "Identical outputs"], rows),
    ]


def _header(results: EvalResults) -> list[str]:
    info = results.info
    errors = sum(r.error is not None for r in results.records)
    registration = {
        "off": "none registered (the model as it is)",
        "unavailable": "none registered (the server has no admin API)",
        "registered": f"registered for this run, policy {info.policy}, suppression {info.suppression}: "
        + ", ".join(t.name for t in info.registered),
    }[info.registration]
    lines = [
        "# Lethe forgetting audit",
        "",
        f"- Model `{info.model}` at `{info.base_url}`, suites {', '.join(info.suites)}",
        f"- Forget targets: {registration}",
        f"- {len(results.records)} prompts, greedy, seed {info.seed}, max tokens {info.max_tokens}"
        f" (instructions {info.instruction_max_tokens}"
        + (f", authors {info.author_max_tokens}" if info.author_max_tokens else "")
        + f"), concurrency {info.concurrency}"
        + (f", first {info.sample} per set" if info.sample is not None else ""),
        f"- Wall time {info.wall_seconds:.0f} s, started {info.started_at}",
    ]
    if info.authors:
        lines.append(f"- Forget authors: {', '.join(info.authors)}")
    if info.compare:
        lines.append(f"- Compared with baseline `{info.compare}`: cells read baseline → this run")
    if errors:
        lines.append(f"- **{errors} request(s) failed** and are left out of the means (see results.json)")
    return [*lines, ""]


def render_markdown(results: EvalResults, baseline: Summary | None, plots: Iterable[str]) -> str:
    current = results.summary
    lines = _header(results)
    if current.rwku_targets:
        lines += _rwku_section(current, baseline) + _attack_section(current, baseline)
    if current.muse:
        lines += _muse_section(current, baseline)
    if current.authors:
        lines += _authors_section(current, baseline)
    if current.utility:
        lines += _utility_section(current, baseline)
    if baseline is not None:
        lines += _agreement_section(current)
    if any(g.detection_rate is not None for g in _sets(current).values()):
        lines += _detection_section(current)
    plots = list(plots)
    if plots:
        lines += ["## Plots", "", *(f"![{p}]({p})" for p in plots), ""]
    lines += METHOD
    return "\n".join(lines) + "\n"


def _bars(ax: Axes, labels: list[str], series: Mapping[str, list[float | None]], title: str) -> None:
    """Grouped horizontal bars, one group per label, one bar per series."""
    height = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        positions = [k + i * height for k in range(len(labels))]
        ax.barh(positions, [v or 0.0 for v in values], height=height, label=name)
    ax.set_yticks([k + height * (len(series) - 1) / 2 for k in range(len(labels))], labels)
    if not ax.yaxis_inverted():  # axes that share y are inverted once for all
        ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("ROUGE-L recall")
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=len(series), frameon=False)


def _per_target(summary: Summary, targets: list[str], splits: tuple[str, ...]) -> list[float | None]:
    return [_pooled_value(_target(t), splits)(summary) for t in targets]


def _plot_targets(ax: Axes, runs: Mapping[str, Summary], targets: list[str], names: list[str]) -> None:
    """One point per target and run; with a baseline an arrow shows where the guard moved it."""
    points = {
        label: [
            (x or 0.0, y or 0.0)
            for x, y in zip(
                _per_target(summary, targets, NEIGHBOUR_SPLITS),
                _per_target(summary, targets, FORGET_SPLITS),
                strict=True,
            )
        ]
        for label, summary in runs.items()
    }
    for label, xy in points.items():
        ax.scatter([x for x, _ in xy], [y for _, y in xy], label=label, alpha=0.8)
    for index, name in enumerate(names):
        ax.annotate(name, points["this run"][index], fontsize=7, xytext=(3, 3), textcoords="offset points")
        if "baseline" in points:
            ax.annotate(
                "",
                xy=points["this run"][index],
                xytext=points["baseline"][index],
                arrowprops={"arrowstyle": "->"},
            )
    ax.set_xlabel("neighbour ROUGE-L recall (higher = preserved)")
    ax.set_ylabel("forget ROUGE-L recall (lower = forgotten)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("RWKU forget vs neighbour, per target")
    ax.legend()


def write_plots(current: Summary, baseline: Summary | None, out: Path) -> list[str]:
    """Draw the PNGs that apply to this run; returns their file names."""
    if not current.rwku_targets:
        return []
    # Imported here: matplotlib takes a second to import and only reports need it.
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    targets = list(current.rwku_targets)
    names = [current.rwku_subjects.get(t, t) for t in targets]
    runs = {"baseline": baseline, "this run": current} if baseline is not None else {"this run": current}
    written = []

    def save(fig: Figure, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(name)

    fig, ax = plt.subplots(figsize=(7, 6))
    _plot_targets(ax, runs, targets, names)
    save(fig, PLOT_TARGETS)

    attacks = list(current.rwku_attacks)
    if attacks:
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(attacks) + 2))
        series = {label: [_value(_attacks, a)(summary) for a in attacks] for label, summary in runs.items()}
        _bars(ax, attacks, series, "RWKU level 3: forget recall per attack type")
        save(fig, PLOT_ATTACKS)

    if baseline is not None:
        fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(targets) + 2), sharey=True)
        panels = (("forget (L1-L3)", FORGET_SPLITS), ("neighbour (L1-L2)", NEIGHBOUR_SPLITS))
        for ax, (title, splits) in zip(axes, panels, strict=True):
            series = {label: _per_target(summary, targets, splits) for label, summary in runs.items()}
            _bars(ax, names, series, f"RWKU {title}: baseline vs this run")
        save(fig, PLOT_COMPARE)
    return written


def write_report(results: EvalResults, baseline: Summary | None, out: Path) -> Path:
    plots = write_plots(results.summary, baseline, out)
    path = out / "report.md"
    path.write_text(render_markdown(results, baseline, plots), encoding="utf-8")
    return path
