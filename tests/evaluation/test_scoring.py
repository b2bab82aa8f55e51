"""Per-answer scoring and the summary means, on hand-made records."""

from __future__ import annotations

import pytest

from lethe.evaluation.client import Completion
from lethe.evaluation.records import EvalResults, Probe, ProbeResult, RunInfo
from lethe.evaluation.report import render_markdown
from lethe.evaluation.scoring import answered_by_subject, rescore, score_answer, summarise


def _probe(index: int, target: str, split: str, answer: str | None = "Carrie", **extra: object) -> Probe:
    extra.setdefault("prompt", "Q")
    return Probe(
        id=f"rwku/{target}/{split}/{index}",
        suite="rwku",
        split=split,
        target=target,
        subject="Stephen King",
        level=int(split[-1]),
        answer=answer,
        max_tokens=32,
        stop=("\n",),
        **extra,
    )


def _answer(probe: Probe, output: str, error: str | None = None) -> ProbeResult:
    return score_answer(probe, Completion(output=output, error=error))


def test_forget_answer_is_cut_then_scored() -> None:
    result = _answer(_probe(0, "1_King", "forget_level2"), "Stephen King wrote Carrie\nand more")
    assert result.scored_text == "Stephen King wrote Carrie"
    assert result.output == "Stephen King wrote Carrie\nand more"
    assert result.scores.rouge_l_recall == 1.0
    assert result.scores.rouge_l_f1 == pytest.approx(2 * 1 * 0.25 / 1.25)
    assert result.scores.contains_answer is True
    assert result.scores.names_subject is True


def test_new_word_recall_leaves_out_what_the_prompt_says() -> None:
    probe = _probe(0, "1_King", "forget_level2", answer="The Dark Tower", prompt="Name his Tower series.")
    assert _answer(probe, "The Tower series").scores.new_word_recall == 0.0
    assert _answer(probe, "The Dark Tower").scores.new_word_recall == 1.0


def test_rescoring_gives_an_older_record_the_metrics_added_since() -> None:
    scored = _answer(_probe(0, "1_King", "forget_level1"), "He wrote Carrie.")
    older = ProbeResult.model_validate(scored.model_dump() | {"scores": {"rouge_l_recall": 1.0}})
    assert older.scores.new_word_recall is None
    assert rescore(older) == scored


def test_neighbour_answers_do_not_count_names() -> None:
    result = _answer(_probe(0, "1_King", "neighbor_level1"), "Stephen King")
    assert result.scores.names_subject is None


def test_instruction_answers_get_entropy_only() -> None:
    probe = Probe(
        id="utility/instructions/0", suite="utility", split="instructions", prompt="I", max_tokens=8
    )
    scores = _answer(probe, "a b c d").scores
    assert scores.entropy is not None and scores.rouge_l_recall is None


def test_failed_requests_are_counted_not_scored() -> None:
    records = [
        _answer(_probe(0, "1_King", "forget_level1"), "Carrie"),
        _answer(_probe(1, "1_King", "forget_level1"), "", error="timeout"),
    ]
    group = summarise(records).rwku_targets["1_King"]["forget_level1"]
    assert (group.n, group.errors, group.rouge_l_recall) == (2, 1, 1.0)


def test_overall_is_the_mean_of_target_means() -> None:
    records = [
        _answer(_probe(0, "1_King", "forget_level1"), "Carrie"),
        _answer(_probe(1, "1_King", "forget_level1"), "no idea"),
        _answer(_probe(0, "2_Other", "forget_level1"), "Carrie"),
    ]
    summary = summarise(records)
    assert summary.rwku_targets["1_King"]["forget_level1"].rouge_l_recall == 0.5
    # macro: (0.5 + 1.0) / 2, not the pooled 2/3
    assert summary.rwku_overall["forget_level1"].rouge_l_recall == 0.75
    assert summary.rwku_overall["forget_level1"].n == 3


def test_attacks_are_pooled_over_targets() -> None:
    records = [
        _answer(_probe(0, "1_King", "forget_level3", attack="role play"), "Carrie"),
        _answer(_probe(0, "2_Other", "forget_level3", attack="role play"), "nothing"),
    ]
    assert summarise(records).rwku_attacks["role play"].rouge_l_recall == 0.5


def test_agreement_and_unknown_targets_come_from_the_baseline() -> None:
    known = [_answer(_probe(i, "1_King", "forget_level1"), "Carrie") for i in range(2)]
    unknown = [_answer(_probe(i, "2_Other", "forget_level1"), "no idea") for i in range(2)]
    baseline = known + unknown
    guarded = [_answer(_probe(0, "1_King", "forget_level1"), "I cannot say"), known[1], *unknown]
    summary = summarise(guarded, baseline)
    assert summary.rwku_targets["1_King"]["forget_level1"].agreement == 0.5
    assert summary.rwku_targets["2_Other"]["forget_level1"].agreement == 1.0
    assert summary.unknown_targets == ["2_Other"]
    assert summarise(guarded).unknown_targets is None
    assert summarise(baseline, is_baseline=True).unknown_targets == ["2_Other"]


def test_muse_counts_as_never_known_when_forget_knowmem_is_near_zero() -> None:
    def muse(index: int, output: str) -> ProbeResult:
        probe = Probe(
            id=f"muse/knowmem_forget/{index}",
            suite="muse",
            split="knowmem_forget",
            subject="Harry Potter",
            prompt="Q",
            answer="the Golden Snitch",
            max_tokens=32,
        )
        return score_answer(probe, Completion(output=output))

    assert summarise([muse(0, "a broom")], is_baseline=True).muse_never_known is True
    assert summarise([muse(0, "the Golden Snitch")], is_baseline=True).muse_never_known is False
    assert summarise([muse(0, "a broom")]).muse_never_known is None


def test_neighbours_answered_by_the_targets_name_are_also_shown_apart() -> None:
    named = _probe(0, "1_King", "neighbor_level1", answer="Stephen")
    other = _probe(1, "1_King", "neighbor_level1", answer="Tabitha")
    assert answered_by_subject(named) and not answered_by_subject(other)
    assert not answered_by_subject(_probe(2, "1_King", "forget_level1", answer="Stephen King"))
    assert not answered_by_subject(_probe(3, "1_King", "neighbor_level2", answer="Stephen Hawking"))
    # the guard fired on the question the target's name answers, not on the other one
    records = [
        score_answer(named, Completion(output="Someone"), ["Stephen King"]),
        score_answer(other, Completion(output="Tabitha King"), []),
    ]
    summary = summarise(records, is_baseline=True)
    assert summary.rwku_overall["neighbor_level1"].rouge_l_recall == 0.5
    assert summary.rwku_neighbours_not_named["neighbor_level1"].rouge_l_recall == 1.0
    info = RunInfo.model_validate(
        {
            "base_url": "http://x/v1",
            "model": "m",
            "suites": ["rwku"],
            "data_dir": "d",
            "targets": ["1_King"],
            "levels": [1],
            "sample": None,
            "max_tokens": 32,
            "instruction_max_tokens": 128,
            "concurrency": 1,
            "seed": 0,
            "registration": "off",
            "started_at": "now",
            "wall_seconds": 1.0,
        }
    )
    report = render_markdown(EvalResults(info=info, summary=summary, records=records), None, [])
    assert "1 neighbour probes have the target's own name" in report
    assert "Without them, neighbour ROUGE-L recall is Neighbour L1 1.000." in report
    assert "| RWKU Neighbour L1 | 2 | 0.500 |" in report
    assert "| RWKU Neighbour L1, not answered by the target's name | 1 | 0.000 |" in report
