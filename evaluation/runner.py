"""One evaluation run: select probes, register targets, ask the server, score, write the outputs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from lethe.evaluation import datasets, suites
from lethe.evaluation.client import ChatClient, Completion
from lethe.evaluation.records import EvalResults, Probe, RegisteredTarget, RunInfo, Suite
from lethe.evaluation.registration import AdminClient, AdminError, admin_root, registered_targets
from lethe.evaluation.report import write_report
from lethe.evaluation.scoring import rescore, score_answer, summarise
from lethe.guards.targets import Policy, Suppression

RESULTS_FILE = "results.json"
LOG_EVERY_S = 30.0
"""Without a terminal (nohup, CI) the progress bar becomes a line this often."""


class EvalConfig(BaseModel):
    base_url: str
    api_key: str
    admin_key: str | None = None
    admin_url: str | None = None
    register_targets: bool = True
    policy: Policy = "steer"
    suppression: Suppression = "both"
    suites: list[Suite]
    data_dir: Path
    targets: list[str] | None = None
    forget_authors: list[str] | None = None
    author_max_tokens: int = suites.DEFAULT_AUTHOR_MAX_TOKENS
    levels: list[int]
    sample: int | None = None
    max_tokens: int
    instruction_max_tokens: int
    concurrency: int
    timeout: float
    seed: int
    model: str | None = None
    compare: Path | None = None
    out: Path


def _serves_sae(config: EvalConfig) -> bool:
    """Whether the server clamps SAE features (Lethe's `sae` entry on its model card)."""
    try:
        response = httpx.get(
            f"{config.base_url.rstrip('/')}/models",
            headers={"Authorization": f"Bearer {config.api_key}"},
            timeout=config.timeout,
        )
    except httpx.HTTPError:
        return False  # the run reports the server's failure on its first probe
    return response.status_code == 200 and any(card.get("sae") for card in response.json().get("data", []))


def load_results(path: Path) -> EvalResults:
    """A previous run's results.json (the --compare baseline), scored again by today's metrics."""
    try:
        results = EvalResults.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValidationError) as error:
        raise datasets.DataError(
            f"--compare {path}: not a readable lethe eval results.json ({error})"
        ) from error
    return results.model_copy(update={"records": [rescore(r) for r in results.records]})


@contextmanager
def progress_callback(console: Console, total: int) -> Iterator[Callable[[Probe, Completion], None]]:
    """A callback to call once per finished probe: a live bar on a terminal, periodic lines elsewhere."""
    done = failed = 0
    if console.is_terminal:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
        with Progress(*columns, TimeElapsedColumn(), TimeRemainingColumn(), console=console) as bar:
            task = bar.add_task("probes", total=total)

            def advance(_probe: Probe, completion: Completion) -> None:
                nonlocal failed
                failed += completion.error is not None
                bar.update(task, advance=1, description=f"probes ({failed} failed)" if failed else "probes")

            yield advance
        return
    started = last = time.monotonic()

    def log(_probe: Probe, completion: Completion) -> None:
        nonlocal done, failed, last
        done += 1
        failed += completion.error is not None
        now = time.monotonic()
        if now - last >= LOG_EVERY_S or done == total:
            last = now
            console.print(f"{done}/{total} probes, {failed} failed, {now - started:.0f} s")

    yield log


async def _ask(config: EvalConfig, probes: list[Probe], console: Console) -> tuple[str, list[Completion]]:
    async with ChatClient(
        config.base_url, config.api_key, timeout=config.timeout, seed=config.seed
    ) as client:
        model = config.model or await client.default_model()
        console.print(f"evaluating model {model!r} at {config.base_url}: {len(probes)} probes")
        with progress_callback(console, len(probes)) as on_done:
            completions = await client.complete_all(model, probes, config.concurrency, on_done)
    return model, completions


AUDIT_SETTLE_SECONDS = 1.0
"""The server appends audit entries off the response path; give the last ones time to land."""
CLOCK_SKEW = timedelta(minutes=10)
"""The audit is read back to this long before the run started by this machine's clock, in case the
server's runs behind; entries are matched by response id, so older ones are only read, not counted."""


def _fired_names(
    admin: AdminClient, registered: list[RegisteredTarget], since: datetime, console: Console
) -> dict[str, list[str]] | None:
    """Response id -> names of the registered targets that fired on it, from the audit trail; None
    (detection not reported) when the trail cannot be read: the answers are worth keeping anyway."""
    time.sleep(AUDIT_SETTLE_SECONDS)
    try:
        fired = admin.fired_targets(since - CLOCK_SKEW)
    except AdminError as error:
        console.print(f"[yellow]detection is not reported: {error}[/]")
        return None
    names = {t.id: t.name for t in registered}
    return {request: [names[t] for t in target_ids if t in names] for request, target_ids in fired.items()}


def _fired(fired_on: dict[str, list[str]] | None, completion: Completion) -> list[str] | None:
    if fired_on is None or completion.error is not None:
        return None
    return fired_on.get(completion.response_id or "", [])


def run_eval(config: EvalConfig, console: Console) -> int:
    """Run the evaluation and write results.json, report.md and the plots; 1 if any request failed."""
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    clock = time.perf_counter()
    baseline = load_results(config.compare) if config.compare else None
    targets = datasets.rwku_targets(config.data_dir) if "rwku" in config.suites else []
    selection = suites.Selection(
        suites=config.suites,
        targets=datasets.select_targets(targets, config.targets),
        levels=config.levels,
        sample=config.sample,
        max_tokens=config.max_tokens,
        instruction_max_tokens=config.instruction_max_tokens,
        authors=config.forget_authors,
        author_max_tokens=config.author_max_tokens,
    )
    probes = suites.build_probes(config.data_dir, selection)
    authors = suites.forget_authors(config.data_dir, selection) if "authors" in config.suites else []
    config.out.mkdir(parents=True, exist_ok=True)

    registration = "off"
    registered: list[RegisteredTarget] = []
    fired_on: dict[str, list[str]] | None = None
    with ExitStack() as stack:
        if config.register_targets and config.admin_key:
            admin = AdminClient(
                config.admin_url or admin_root(config.base_url), config.admin_key, timeout=config.timeout
            )
            stack.callback(admin.close)
            specs = suites.forget_targets(config.data_dir, selection, config.policy, config.suppression)
            clamped = config.suppression != "decoding" and _serves_sae(config)
            answer = stack.enter_context(registered_targets(admin, specs, console, wait_for_features=clamped))
            registration, registered = ("registered", answer) if answer is not None else ("unavailable", [])
        asked_at = datetime.now(UTC)
        model, completions = asyncio.run(_ask(config, probes, console))
        if registered:
            fired_on = _fired_names(admin, registered, asked_at, console)

    records = [score_answer(p, c, _fired(fired_on, c)) for p, c in zip(probes, completions, strict=True)]
    summary = summarise(
        records, baseline.records if baseline else None, is_baseline=registration != "registered"
    )
    info = RunInfo(
        base_url=config.base_url,
        model=model,
        suites=config.suites,
        data_dir=str(config.data_dir),
        targets=[t.folder for t in selection.targets],
        levels=config.levels,
        sample=config.sample,
        max_tokens=config.max_tokens,
        instruction_max_tokens=config.instruction_max_tokens,
        concurrency=config.concurrency,
        seed=config.seed,
        registration=registration,
        registered=registered,
        authors=[a.name for a in authors],
        author_max_tokens=config.author_max_tokens if "authors" in config.suites else None,
        policy=config.policy if registered else None,
        suppression=config.suppression if registered else None,
        compare=str(config.compare) if config.compare else None,
        started_at=started_at,
        wall_seconds=round(time.perf_counter() - clock, 1),
    )
    results = EvalResults(info=info, summary=summary, records=records)
    (config.out / RESULTS_FILE).write_text(results.model_dump_json(indent=1), encoding="utf-8")
    # The baseline column covers the same probes as this run, even when the baseline ran on more.
    asked = {probe.id for probe in probes}
    matched = (
        summarise([r for r in baseline.records if r.id in asked], is_baseline=True) if baseline else None
    )
    report = write_report(results, matched, config.out)
    failed = sum(r.error is not None for r in records)
    console.print(f"wrote {config.out / RESULTS_FILE} and {report} in {info.wall_seconds:.0f} s")
    if failed:
        console.print(f"[red]{failed} of {len(records)} requests failed; they are left out of the means[/]")
    return 1 if failed else 0
