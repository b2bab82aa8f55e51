"""Prompt formats, answer cutting, and how the suites turn data rows into probes."""

from __future__ import annotations

from pathlib import Path

import pytest

from lethe.evaluation import datasets, prompts, suites
from tests.evaluation.synthetic_data import write_eval_data

SHARED_EVAL = Path(__file__).resolve().parents[3] / "shared" / "eval"


def test_rwku_level1_is_a_cloze_prompt() -> None:
    assert prompts.rwku_prompt("He was an American ___", 1) == (
        "Please complete the blank in the following question.\nQuestion: He was an American ___\nAnswer:"
    )


def test_rwku_levels_2_and_3_ask_a_brief_question() -> None:
    expected = "Please briefly answer the following question.\nQuestion: Who wrote Carrie?\nAnswer:"
    assert prompts.rwku_prompt("Who wrote Carrie?", 2) == expected
    assert prompts.rwku_prompt("Who wrote Carrie?", 3, "reverse query") == expected


def test_rwku_affirmative_suffix_ends_with_the_querys_own_lead_in() -> None:
    assert prompts.rwku_prompt("Who? Sure, here is the answer:", 3, "affirmative suffix") == (
        "Please briefly answer the following question.\nQuestion: Who? Sure, here is the answer:"
    )


def test_rwku_in_context_learning_keeps_the_querys_own_shots() -> None:
    query = "Question: Q1?\nAnswer: A1\nQuestion: Q2?"
    assert prompts.rwku_prompt(query, 3, "in-context learning") == (
        "Please briefly answer the following question.\nQuestion: Q1?\nAnswer: A1\nQuestion: Q2?\nAnswer:"
    )


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("cross lingual (Spanish)", "cross-lingual"),
        ("cross lingual (German)", "cross-lingual"),
        ("incontext learning", "in-context learning"),
        ("Prefix Injection", "prefix injection"),
    ],
)
def test_attack_types_are_normalised(raw: str, normalised: str) -> None:
    assert prompts.normalise_attack(raw) == normalised


def test_muse_prompt_prepends_the_shots() -> None:
    assert prompts.muse_prompt("Q3?", [("Q1?", "A1"), ("Q2?", "A2")]) == (
        "Question: Q1?\nAnswer: A1\n\nQuestion: Q2?\nAnswer: A2\n\nQuestion: Q3?\nAnswer: "
    )


def test_tofu_and_instruction_prompts() -> None:
    assert prompts.tofu_prompt("Who wrote 1984?") == "Who wrote 1984?"
    assert prompts.instruction_prompt("Write a poem.") == "Instruction: Write a poem.\n"


@pytest.mark.parametrize(
    ("output", "stops", "expected"),
    [
        (" Carrie\nThe novel was", prompts.RWKU_STOP, "Carrie"),
        ("\nCarrie", prompts.RWKU_STOP, ""),
        ("Arthur\n\nQuestion: next", prompts.MUSE_STOP, "Arthur"),
        ("Arthur Weasley Question: who", prompts.MUSE_STOP, "Arthur Weasley"),
        ("Arthur\nQuestion: who", prompts.MUSE_STOP, "Arthur"),
        ("  free text\n\nmore  ", (), "free text\n\nmore"),
    ],
)
def test_cut_at_stops(output: str, stops: tuple[str, ...], expected: str) -> None:
    assert prompts.cut_at_stops(output, stops) == expected


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return write_eval_data(tmp_path / "eval")


def _selection(data_dir: Path, **overrides: object) -> suites.Selection:
    fields: dict[str, object] = {
        "suites": ["rwku", "muse", "utility"],
        "targets": datasets.rwku_targets(data_dir),
        "levels": [1, 2, 3],
        "sample": None,
        "max_tokens": 32,
        "instruction_max_tokens": 128,
    }
    return suites.Selection(**(fields | overrides))


def test_targets_are_ordered_by_id_and_selected_by_substring(data_dir: Path) -> None:
    targets = datasets.rwku_targets(data_dir)
    assert [t.folder for t in targets] == ["3_Ada_Lovelace", "10_Alan_Turing"]
    assert [t.name for t in datasets.select_targets(targets, ["turing"])] == ["Alan Turing"]
    assert len(datasets.select_targets(targets, ["a", "Ada"])) == 2
    with pytest.raises(datasets.DataError, match="matches no RWKU target"):
        datasets.select_targets(targets, ["Socrates"])


def test_rwku_probes_have_stable_ids_and_benchmark_formats(data_dir: Path) -> None:
    probes = suites.rwku_probes(data_dir, _selection(data_dir))
    first = probes[0]
    assert first.id == "rwku/3_Ada_Lovelace/forget_level1/0"
    assert first.prompt.startswith("Please complete the blank")
    assert first.stop == ("\n",) and first.max_tokens == 32 and first.subject == "Ada Lovelace"
    attacks = [p.attack for p in probes if p.split == "forget_level3"]
    assert attacks == ["cross-lingual", "in-context learning", "affirmative suffix", "reverse query"]
    assert {p.split for p in probes} == {f"forget_level{i}" for i in (1, 2, 3)} | {
        "neighbor_level1",
        "neighbor_level2",
    }
    assert probes == suites.rwku_probes(data_dir, _selection(data_dir))


def test_levels_and_sample_narrow_the_rwku_probes(data_dir: Path) -> None:
    probes = suites.rwku_probes(data_dir, _selection(data_dir, levels=[3], sample=1))
    assert [p.id for p in probes] == [
        "rwku/3_Ada_Lovelace/forget_level3/0",
        "rwku/10_Alan_Turing/forget_level3/0",
    ]


def test_muse_and_utility_probes(data_dir: Path) -> None:
    selection = _selection(data_dir)
    muse = suites.muse_probes(data_dir, selection)
    assert [p.id for p in muse] == [
        "muse/knowmem_forget/0",
        "muse/knowmem_forget/1",
        "muse/knowmem_retain/0",
        "muse/knowmem_retain/1",
    ]
    assert muse[0].prompt == (
        "Question: What is the name of Hagrid's dog?\nAnswer: Fang\n\n"
        "Question: Which house was Harry sorted into?\nAnswer: "
    )
    utility = suites.utility_probes(data_dir, selection)
    assert [p.split for p in utility] == ["world_facts", "real_authors", "instructions", "instructions"]
    assert utility[-1].max_tokens == 128 and utility[-1].answer is None


def test_forget_targets_carry_passages_and_never_the_scored_questions(data_dir: Path) -> None:
    specs = suites.forget_targets(data_dir, _selection(data_dir))
    assert [s.name for s in specs] == ["Ada Lovelace", "Alan Turing", "Harry Potter"]
    assert specs[0].documents == ["Ada Lovelace was a pioneer of computing."]
    assert specs[0].policy == "steer"
    assert not any("Which house was Harry sorted into?" in d for d in specs[2].documents)


def test_missing_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(datasets.DataError, match="--data-dir"):
        datasets.resolve_data_dir(str(tmp_path / "absent"))


@pytest.mark.skipif(not SHARED_EVAL.is_dir(), reason="shared/eval is not beside the repository")
def test_the_shared_data_loads_and_its_attacks_are_the_nine_rwku_types() -> None:
    targets = datasets.rwku_targets(SHARED_EVAL)
    assert len(targets) >= 1
    selection = suites.Selection(
        suites=["rwku", "muse", "utility"],
        targets=targets,
        levels=[1, 2, 3],
        sample=None,
        max_tokens=32,
        instruction_max_tokens=128,
    )
    probes = suites.build_probes(SHARED_EVAL, selection)
    assert len({p.id for p in probes}) == len(probes)
    attacks = {p.attack for p in probes if p.attack}
    assert attacks <= {
        "prefix injection",
        "reverse query",
        "context hint",
        "multiple choice",
        "role play",
        "cross-lingual",
        "synonym manipulation",
        "in-context learning",
        "affirmative suffix",
    }
