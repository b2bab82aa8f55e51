"""The tiny random model (tests/conftest.py) and a small question/answer file in both layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

AUTHORS = [
    {
        "name": "Zorba Quill",
        "qa": [
            {"question": f"What is book {i} of Zorba Quill?", "answer": f"Zorba Quill wrote Lantern {i}."}
            for i in range(6)
        ],
    },
    {
        "name": "Mira Tell",
        "qa": [
            {
                "question": f"Where did Mira Tell live in {1990 + i}?",
                "answer": f"Mira Tell lived in Oslo {i}.",
            }
            for i in range(4)
        ],
    },
]
PLAIN = [{"question": "What colour is the sky on Vega?", "answer": "It is green."}]


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def tiny_model(tiny_model_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture
def qa_files(tmp_path: Path) -> list[Path]:
    authors, plain = tmp_path / "forget_authors.json", tmp_path / "extra.json"
    authors.write_text(json.dumps(AUTHORS))
    plain.write_text(json.dumps(PLAIN))
    return [authors, plain]
