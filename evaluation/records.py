"""The data shapes of an evaluation run: what was asked, what came back, how it scored.

`results.json` is a dump of `EvalResults`, and `--compare` reads one back, so these models are
the file format: add optional fields, never rename or drop one.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Suite = Literal["rwku", "muse", "utility", "authors"]
SUITES: tuple[Suite, ...] = ("rwku", "muse", "utility", "authors")

RESULTS_FORMAT = 1


class Probe(BaseModel):
    """One prompt to send, with everything needed to score its answer without the data files."""

    model_config = ConfigDict(frozen=True)

    id: str
    """Stable key (`suite/split[/target]/index`): how a run is matched against its baseline."""
    suite: Suite
    split: str
    """The data set inside the suite, e.g. `forget_level3`, `knowmem_retain`, `instructions`."""
    target: str | None = None
    """RWKU target folder (e.g. `1_Stephen_King`), or the author's name in the authors suite; None
    elsewhere."""
    subject: str | None = None
    """The name whose knowledge is being forgotten, to count answers that still say it."""
    level: int | None = None
    attack: str | None = None
    """RWKU level-3 attack type, normalised (the cross-lingual languages are pooled)."""
    prompt: str
    """The user message content; the server applies its own chat template around it."""
    answer: str | None = None
    max_tokens: int
    stop: tuple[str, ...] = ()


class Scores(BaseModel):
    """Per-answer scores; a field is None where the metric does not apply to the probe's set."""

    rouge_l_recall: float | None = None
    rouge_l_f1: float | None = None
    new_word_recall: float | None = None
    """`metrics.new_word_recall`: the gold's content words that the prompt does not give, found in
    the answer; None when the prompt gives them all."""
    contains_answer: bool | None = None
    """The answer states the gold fact: the gold as whole words (`metrics.contains_phrase`); in the
    authors suite, whose golds are whole sentences, `metrics.states_fact`."""
    names_subject: bool | None = None
    """`metrics.says_name`: a forget answer says its target's name, misspelt or not."""
    entropy: float | None = None
    detected: bool | None = None
    """Whether the guard fired on the request, from the server's audit trail: the probe's own target
    for forget probes (detection recall), any target for the others (false positives). None when
    the run registered no targets."""


class ProbeResult(Probe):
    output: str
    """The text exactly as the server returned it: what agreement with a baseline compares."""
    scored_text: str
    """`output` cut at the probe's stop strings and stripped: what the metrics saw."""
    finish_reason: str | None = None
    error: str | None = None
    """Why the request failed; failed probes are left out of every mean and counted instead."""
    fired: list[str] | None = None
    """Names of the registered targets that fired on the request (None: none were registered)."""
    scores: Scores = Scores()


class GroupScore(BaseModel):
    """Means over one group of answers (a split of one target, an attack type, a utility set)."""

    n: int
    errors: int = 0
    rouge_l_recall: float | None = None
    rouge_l_f1: float | None = None
    new_word_recall: float | None = None
    """Mean over the answers whose gold has words the prompt does not give."""
    contain_rate: float | None = None
    name_share: float | None = None
    entropy: float | None = None
    detection_rate: float | None = None
    """Share of requests on which the guard fired (see `Scores.detected`)."""
    agreement: float | None = None
    """Share of outputs identical to the baseline run's for the same probe (only with --compare)."""


class Summary(BaseModel):
    rwku_targets: dict[str, dict[str, GroupScore]] = {}
    """Target folder -> split -> score."""
    rwku_subjects: dict[str, str] = {}
    """Target folder -> the target's name."""
    rwku_overall: dict[str, GroupScore] = {}
    """Split -> mean over targets of the per-target means (each target weighs the same, as in RWKU)."""
    rwku_attacks: dict[str, GroupScore] = {}
    """Attack type -> mean over all level-3 probes of that type, pooled across targets."""
    rwku_neighbours_not_named: dict[str, GroupScore] = {}
    """Neighbour split -> mean over targets as in `rwku_overall`, without the probes whose gold
    answer is the target's own name (`scoring.answered_by_subject`)."""
    muse: dict[str, GroupScore] = {}
    utility: dict[str, GroupScore] = {}
    unknown_targets: list[str] | None = None
    """RWKU targets the unguarded model barely knew; None when no baseline numbers were available."""
    muse_never_known: bool | None = None
    """Whether the unguarded model barely knew the MUSE forget set; None without baseline numbers."""
    authors: dict[str, GroupScore] = {}
    """Authors suite: split (`forget_unseen`, `forget_seen`, `forget_indirect`, `retain_unseen`,
    `retain_seen`) -> score over all its probes. `forget_indirect` holds the forget questions, of
    either half, that contain no word of the author's name (`scoring.is_indirect`)."""
    author_scores: dict[str, dict[str, GroupScore]] = {}
    """Author name -> split -> score."""
    authors_relative: dict[str, float | None] = {}
    """Split -> this run's ROUGE-L recall as a share of the baseline's on the same probes (with
    --compare): the taught model's, when the baseline is the taught model unguarded."""


class RegisteredTarget(BaseModel):
    id: str
    name: str


class RunInfo(BaseModel):
    format: int = RESULTS_FORMAT
    base_url: str
    model: str
    suites: list[Suite]
    data_dir: str
    targets: list[str]
    levels: list[int]
    sample: int | None
    max_tokens: int
    instruction_max_tokens: int
    concurrency: int
    seed: int
    registration: Literal["off", "registered", "unavailable"]
    """off: --no-register or no admin key; unavailable: the server has no admin API (404)."""
    registered: list[RegisteredTarget] = []
    policy: str | None = None
    """The registered targets' policy (steer or refuse)."""
    suppression: str | None = None
    """How they were suppressed: decoding restrictions, SAE clamp, or both."""
    authors: list[str] = []
    """The forget authors of the authors suite (registered when registration is on)."""
    author_max_tokens: int | None = None
    """Answer length of the authors suite's probes (None: no authors suite)."""
    compare: str | None = None
    started_at: str
    wall_seconds: float


class EvalResults(BaseModel):
    info: RunInfo
    summary: Summary
    records: list[ProbeResult]
