"""`lethe.models.unlearning.teach`: reading pairs, the training sequences, and a seeded,
resumable training loop on the tiny random model."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lethe.models.unlearning.data import chat_prompt
from lethe.models.unlearning.teach import (
    ResumeStore,
    TeachParams,
    epoch_order,
    load_pairs,
    lr_factor,
    pairs_hash,
    run_teach,
    teach_sequences,
)

PARAMS = TeachParams(epochs=2, learning_rate=1e-3, batch_size=4, max_length=64)


def test_both_layouts_load_with_their_subject_and_source(qa_files: list[Path]) -> None:
    pairs = load_pairs(qa_files)
    assert len(pairs) == 11
    assert pairs[0].subject == "Zorba Quill" and pairs[0].source == "forget_authors"
    assert pairs[6].subject == "Mira Tell"
    assert pairs[-1].subject is None and pairs[-1].source == "extra"
    assert pairs[-1].answer == "It is green."


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "cannot read it as JSON"),
        ("[]", "non-empty JSON list"),
        ('[{"question": "q"}]', "expected"),
        ('[{"name": "A", "qa": [{"question": "q"}]}]', "expected"),
    ],
)
def test_bad_files_are_refused_with_the_file_named(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        load_pairs([path])
    assert str(path) in str(error.value)


def test_the_data_hash_follows_content_and_order(qa_files: list[Path]) -> None:
    pairs = load_pairs(qa_files)
    assert pairs_hash(pairs) == pairs_hash(load_pairs(qa_files))
    assert pairs_hash(pairs) != pairs_hash(pairs[::-1])
    changed = [pairs[0].model_copy(update={"answer": "Zorba Quill wrote nothing."}), *pairs[1:]]
    assert pairs_hash(changed) != pairs_hash(pairs)


def test_sequences_are_the_chat_prompt_and_the_answer_with_end_of_turn(
    qa_files: list[Path], tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    pair = load_pairs(qa_files)[0]
    (sequence,) = teach_sequences(tiny_tokenizer, [pair], max_length=256)
    assert sequence.prompt == chat_prompt(tiny_tokenizer, pair.question)
    assert sequence.answer[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(sequence.answer[:-1]) == pair.answer
    (short,) = teach_sequences(tiny_tokenizer, [pair], max_length=len(sequence.prompt) + 4)
    assert len(short.ids) <= len(sequence.prompt) + 8  # the answer is cut to its budget, never below 8


def test_schedule_warms_up_then_decays_to_zero() -> None:
    params = TeachParams(warmup_ratio=0.1)
    factors = [lr_factor(step, 100, params) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[-1] < 0.001
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
    linear = TeachParams(warmup_ratio=0.0, schedule="linear")
    assert lr_factor(50, 100, linear) == pytest.approx(0.5)


def test_epoch_order_depends_on_seed_and_epoch_only() -> None:
    assert epoch_order(50, 0, 1) == epoch_order(50, 0, 1)
    assert epoch_order(50, 0, 1) != epoch_order(50, 0, 2)
    assert epoch_order(50, 0, 1) != epoch_order(50, 1, 1)
    assert sorted(epoch_order(50, 3, 0)) == list(range(50))


def _weights(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_learns_and_is_reproducible(
    qa_files: list[Path], tiny_tokenizer: PreTrainedTokenizerBase, tiny_model_dir: Path
) -> None:
    from transformers import AutoModelForCausalLM

    sequences = teach_sequences(tiny_tokenizer, load_pairs(qa_files), PARAMS.max_length)
    runs = []
    for seed in (0, 0, 1):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        seen: list[int] = []
        report = run_teach(
            model,
            sequences,
            PARAMS.model_copy(update={"seed": seed}),
            pad_id=tiny_tokenizer.pad_token_id,
            after_epoch=lambda epoch, seen=seen: seen.append(epoch) or {"epoch": epoch},
        )
        runs.append((_weights(model), report))
        assert seen == [1, 2]
    (first, report), (again, _), (other, _) = runs
    assert report.steps == 6 and report.pairs == 11
    assert [e.epoch for e in report.epochs] == [1, 2] and report.epochs[1].evaluation == {"epoch": 2}
    assert report.epochs[1].loss < report.epochs[0].loss
    assert _same(first, again)
    assert not _same(first, other)


def test_a_run_stopped_after_an_epoch_resumes_to_the_same_weights(
    qa_files: list[Path], tiny_tokenizer: PreTrainedTokenizerBase, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    sequences = teach_sequences(tiny_tokenizer, load_pairs(qa_files), PARAMS.max_length)
    params = PARAMS.model_copy(update={"epochs": 3})
    whole = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    run_teach(whole, sequences, params, pad_id=tiny_tokenizer.pad_token_id)

    class Killed(Exception):
        pass

    def kill_in_epoch_two(fraction: float, _message: str) -> None:
        if fraction > 1 / 3 + 0.1:
            raise Killed

    resume = ResumeStore(tmp_path / "run")
    stopped = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with pytest.raises(Killed):
        run_teach(
            stopped,
            sequences,
            params,
            pad_id=tiny_tokenizer.pad_token_id,
            step=kill_in_epoch_two,
            resume=resume,
        )
    assert json.loads((tmp_path / "run" / "state.json").read_text())["epoch"] == 1

    resumed = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    report = run_teach(resumed, sequences, params, pad_id=tiny_tokenizer.pad_token_id, resume=resume)
    assert report.resumed_from_epoch == 1 and [e.epoch for e in report.epochs] == [1, 2, 3]
    assert _same(_weights(whole), _weights(resumed))
    resume.clear()
    assert not (tmp_path / "run").exists()


def test_a_state_half_replaced_is_not_trusted(tmp_path: Path, tiny_model: PreTrainedModel) -> None:
    resume = ResumeStore(tmp_path / "run")
    resume.save({"epoch": 2, "model": tiny_model.state_dict(), "optimizer": {}}, [])
    (tmp_path / "run" / "state.json").write_text(json.dumps({"epoch": 1, "epochs": []}))
    assert resume.load() is None
