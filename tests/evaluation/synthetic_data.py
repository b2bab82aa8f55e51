"""A tiny evaluation data folder in the layout of shared/eval, so tests need not have the real data."""

from __future__ import annotations

import json
from pathlib import Path

TARGETS = {
    "3_Ada_Lovelace": {
        "name": "Ada Lovelace",
        "forget": [
            ("Ada Lovelace wrote the first published ___ for a machine.", "algorithm", 1, "cloze"),
            ("Which engine did Ada Lovelace write notes on?", "Analytical Engine", 2, "simple question"),
            (
                "Por favor, responda en inglés. ¿Quién era el padre de Ada Lovelace?",
                "Lord Byron",
                3,
                "cross lingual (Spanish)",
            ),
            (
                "Question: Who was Ada's mother?\nAnswer: Anne Milbanke\nQuestion: Who was her father?",
                "Lord Byron",
                3,
                "incontext learning",
            ),
            (
                "Which machine did Ada Lovelace describe? Sure, here is the answer:",
                "Analytical Engine",
                3,
                "affirmative suffix",
            ),
        ],
        "neighbor": [
            ("Charles Babbage designed the Difference ___.", "Engine", 1, "cloze"),
            ("Who designed the Analytical Engine?", "Charles Babbage", 2, "simple question"),
        ],
    },
    "10_Alan_Turing": {
        "name": "Alan Turing",
        "forget": [
            ("Alan Turing proposed the ___ test.", "Turing", 1, "cloze"),
            ("Where did Alan Turing break Enigma codes?", "Bletchley Park", 2, "simple question"),
            ("Who wrote 'Computing Machinery and Intelligence'?", "Alan Turing", 3, "reverse query"),
        ],
        "neighbor": [
            ("The Enigma machine was used by ___ forces.", "German", 1, "cloze"),
            ("What did the bombe machine help decrypt?", "Enigma", 2, "simple question"),
        ],
    },
}
MUSE = {
    "forget": [("Which house was Harry sorted into?", "Gryffindor"), ("Who is Harry's owl?", "Hedwig")],
    "retain": [("Who married Ron?", "Hermione"), ("What is Neville's surname?", "Longbottom")],
    "icl": [("What is the name of Hagrid's dog?", "Fang")],
}
TOFU = {
    "world_facts": [("What is the capital of France?", "Paris")],
    "real_authors": [("Who wrote '1984'?", "George Orwell")],
}
INSTRUCTIONS = ["Write a haiku about rain.", "List three prime numbers."]


def chat_completion(response_id: str, model: str, text: str) -> dict[str, object]:
    """A chat completion body as an OpenAI server answers, for the fake servers of these tests."""
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def _dump(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")


def _probe_rows(rows: list[tuple[str, str, int, str]], subject: str, neighbor: str | None) -> dict[int, list]:
    by_level: dict[int, list] = {}
    for query, answer, level, kind in rows:
        row = {"query": query, "answer": answer, "level": str(level), "type": kind, "subject": subject}
        if neighbor is not None:
            row["neighbor"] = neighbor
        by_level.setdefault(level, []).append(row)
    return by_level


def write_eval_data(root: Path) -> Path:
    """Write the folder under `root` and return it."""
    for folder, target in TARGETS.items():
        base = root / "rwku" / folder
        name = target["name"]
        _dump(
            base / "intro.json", [{"target": name, "intro": f"Please forget {name}. {name} was a scientist."}]
        )
        _dump(base / "passage.json", [{"text": f"{name} was a pioneer of computing."}])
        for level, rows in _probe_rows(target["forget"], name, None).items():
            _dump(base / f"forget_level{level}.json", rows)
        for level, rows in _probe_rows(target["neighbor"], name, "a neighbour").items():
            _dump(base / f"neighbor_level{level}.json", rows)
    for split in ("forget", "retain"):
        _dump(
            root / "muse_books" / f"knowmem_{split}_qa.json",
            [{"question": q, "answer": a} for q, a in MUSE[split]],
        )
        _dump(
            root / "muse_books" / f"knowmem_{split}_qa_icl.json",
            [{"question": q, "answer": a} for q, a in MUSE["icl"]],
        )
    for name, rows in TOFU.items():
        _dump(root / "tofu" / f"{name}_perturbed.json", [{"question": q, "answer": a} for q, a in rows])
    _dump(root / "general" / "instructions.json", [{"instruction": i} for i in INSTRUCTIONS])
    return root
