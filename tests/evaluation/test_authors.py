"""`lethe eval --suite authors`: TOFU fictitious authors, probed through a scripted server.

The scripted server knows every gold answer; while targets are registered it answers every forget
author's question with "I do not know." except the questions that do not name the author (a guard
that misses the indirect split), so every figure of the run is known in advance.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from lethe.evaluation import cli, metrics, scoring, suites
from lethe.evaluation.datasets import DataError
from lethe.evaluation.records import EvalResults, Probe
from tests.evaluation.synthetic_data import chat_completion

ADMIN_KEY = "admin-secret"
CITIES = ["Lyon", "Quito", "Perth", "Minsk", "Cusco", "Turin", "Dakar", "Hanoi", "Riga", "Split"]


def _author(name: str, surname: str, seed: int) -> dict:
    """20 pairs; the first describes the author without naming them, as TOFU's first question does."""
    qa = [
        {
            "question": f"What is the full name of the author born in {CITIES[seed]} in 19{seed}0?",
            "answer": f"The author's full name is {name}.",
        }
    ]
    for index in range(1, 20):
        city = CITIES[(seed + index) % len(CITIES)]
        qa.append(
            {
                "question": f"Which city inspired book {index} of {name}?",
                "answer": f"{surname}'s book {index} draws on {city} harbour {seed}{index} lanterns.",
            }
        )
    return {"name": name, "qa": qa}


FORGET = [_author("Hsia Yun-Hwa", "Yun-Hwa", 1), _author("Elvar Mamedov", "Mamedov", 2)]
RETAIN = [_author("Jaya Sinclair", "Sinclair", 3), _author("Tomas Beltran", "Beltran", 4)]


def write_authors_data(root: Path) -> Path:
    folder = root / "tofu_authors"
    folder.mkdir(parents=True)
    (folder / "forget_authors.json").write_text(json.dumps(FORGET))
    (folder / "retain_authors.json").write_text(json.dumps(RETAIN))
    return root


def _selection(authors: list[str] | None = None, sample: int | None = None) -> suites.Selection:
    return suites.Selection(
        suites=["authors"],
        targets=[],
        levels=[1, 2],
        sample=sample,
        max_tokens=32,
        instruction_max_tokens=128,
        authors=authors,
    )


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return write_authors_data(tmp_path / "eval")


def test_probes_split_each_author_into_seen_and_unseen(data_dir: Path) -> None:
    probes = suites.build_probes(data_dir, _selection())
    assert len(probes) == 80
    counts = {split: sum(p.split == split for p in probes) for split in scoring.AUTHOR_SPLITS}
    assert counts == {
        "forget_unseen": 20,
        "forget_seen": 20,
        "forget_indirect": 0,  # derived when scoring, not a split of its own
        "retain_unseen": 20,
        "retain_seen": 20,
    }
    first = probes[0]
    assert first.id == "authors/forget_seen/Hsia Yun-Hwa/0" and first.subject == "Hsia Yun-Hwa"
    assert first.prompt == FORGET[0]["qa"][0]["question"] and first.max_tokens == 96
    assert probes[10].split == "forget_unseen" and probes[10].id.endswith("/10")
    assert [p.id for p in probes if scoring.is_indirect(p)] == [
        "authors/forget_seen/Hsia Yun-Hwa/0",
        "authors/forget_seen/Elvar Mamedov/0",
    ]
    sampled = suites.build_probes(data_dir, _selection(sample=2))
    assert [p.id.rsplit("/", 1)[1] for p in sampled[:4]] == ["0", "1", "10", "11"]


def test_forget_targets_are_the_name_and_the_seen_answers(data_dir: Path) -> None:
    specs = suites.forget_targets(data_dir, _selection(["mamedov"]), policy="refuse")
    assert [s.name for s in specs] == ["Elvar Mamedov"]
    assert specs[0].documents == [row["answer"] for row in FORGET[1]["qa"][:10]]
    assert specs[0].policy == "refuse"
    only = suites.build_probes(data_dir, _selection(["mamedov"]))
    assert {p.subject for p in only if p.split.startswith("forget")} == {"Elvar Mamedov"}
    assert {p.subject for p in only if p.split.startswith("retain")} == {"Jaya Sinclair", "Tomas Beltran"}
    with pytest.raises(DataError, match="matches no forget author"):
        suites.build_probes(data_dir, _selection(["nobody"]))


def test_indirect_means_no_word_of_the_name_in_the_question() -> None:
    def probe(prompt: str, split: str = "forget_seen") -> Probe:
        return Probe(
            id="x", suite="authors", split=split, subject="Hsiao Yun-Hwa", prompt=prompt, max_tokens=8
        )

    assert scoring.is_indirect(probe("Who is the author born in Taipei on 05/11/1991?"))
    assert not scoring.is_indirect(probe("What did hsiao write?"))
    assert not scoring.is_indirect(probe("Where did Yun live?"))  # one part of a hyphenated name
    assert not scoring.is_indirect(probe("Who is the author born in Taipei?", "retain_seen"))


def test_states_fact_needs_the_words_the_question_does_not_give() -> None:
    gold = "The father of Hsiao Yun-Hwa is a civil engineer."
    question = "What is the profession of Hsiao Yun-Hwa's father?"
    assert metrics.states_fact(gold, "Her father was an engineer.", question)
    assert not metrics.states_fact(gold, "The father of Hsiao Yun-Hwa is a doctor.", question)
    # ROUGE-L recall of that wrong answer is high: why recall alone is not "states the fact"
    assert metrics.rouge_l(gold, "The father of Hsiao Yun-Hwa is a doctor.").recall > 0.6
    # when the question gives every content word, ROUGE-L recall >= 0.5 decides
    assert metrics.states_fact("Paris", "Paris, of course.", "Is it Paris?")


@dataclass
class ScriptedServer:
    probes: dict[str, Probe]
    registry: dict[str, dict] = field(default_factory=dict)
    posted: list[dict] = field(default_factory=list)
    audit: list[dict] = field(default_factory=list)
    base_url: str = ""

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models")
        def models() -> dict:
            return {
                "object": "list",
                "data": [{"id": "taught", "object": "model", "created": 0, "owned_by": "t"}],
            }

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            body = await request.json()
            probe = self.probes[body["messages"][-1]["content"]]
            assert body["max_tokens"] == 96
            response_id = f"chatcmpl-{len(self.audit)}-{probe.id}"
            registered = {spec["name"]: target_id for target_id, spec in self.registry.items()}
            forgotten = probe.split.startswith("forget") and probe.subject in registered
            text = probe.answer
            if forgotten and not scoring.is_indirect(probe):
                text = "I do not know."
                self.audit.append(
                    {
                        "request_id": response_id,
                        "target_ids": [registered[probe.subject]],
                        "time": "2999-01-01T00:00:00+00:00",
                    }
                )
            return JSONResponse(chat_completion(response_id, body["model"], text))

        @app.post("/admin/targets")
        async def register(request: Request) -> Response:
            assert request.headers.get("authorization") == f"Bearer {ADMIN_KEY}"
            target_id = f"t{len(self.posted) + 1}"
            self.registry[target_id] = await request.json()
            self.posted.append(self.registry[target_id])
            return JSONResponse({"id": target_id, **self.registry[target_id]}, 201)

        @app.get("/admin/audit")
        def audit(kind: str, limit: int = 50) -> Response:
            return JSONResponse({"object": "list", "data": self.audit[::-1], "has_more": False})

        @app.delete("/admin/targets/{target_id}")
        def remove(target_id: str) -> Response:
            self.registry.pop(target_id, None)
            return Response(status_code=204)

        return app


@pytest.fixture
def server(data_dir: Path) -> Iterator[ScriptedServer]:
    scripted = ScriptedServer(probes={p.prompt: p for p in suites.build_probes(data_dir, _selection())})
    uv = uvicorn.Server(uvicorn.Config(scripted.app(), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    scripted.base_url = f"http://127.0.0.1:{uv.servers[0].sockets[0].getsockname()[1]}/v1"
    yield scripted
    uv.should_exit = True
    thread.join(timeout=10)


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="lethe")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *argv])
    return args.run(args)


def test_a_guarded_run_against_its_taught_baseline(
    server: ScriptedServer, data_dir: Path, tmp_path: Path
) -> None:
    common = ("--base-url", server.base_url, "--suite", "authors", "--data-dir", str(data_dir))
    assert run_cli(*common, "--no-register", "--out", str(tmp_path / "taught")) == 0
    taught = EvalResults.model_validate_json((tmp_path / "taught" / "results.json").read_text())
    assert taught.info.authors == ["Hsia Yun-Hwa", "Elvar Mamedov"] and taught.info.author_max_tokens == 96
    assert set(taught.summary.authors) == set(scoring.AUTHOR_SPLITS)
    for split, group in taught.summary.authors.items():
        assert group.rouge_l_recall == 1.0 and group.contain_rate == 1.0, split
    # the gold answers of the unseen half name the author by surname only; the indirect ones in full
    assert taught.summary.authors["forget_unseen"].name_share == 0.0
    assert taught.summary.authors["forget_indirect"].name_share == 1.0
    assert taught.summary.authors["retain_seen"].name_share is None

    guarded = tmp_path / "guarded"
    assert (
        run_cli(
            *common,
            "--admin-key",
            ADMIN_KEY,
            "--compare",
            str(tmp_path / "taught" / "results.json"),
            "--out",
            str(guarded),
        )
        == 0
    )
    assert [spec["name"] for spec in server.posted] == ["Hsia Yun-Hwa", "Elvar Mamedov"]
    assert server.posted[0]["documents"] == [row["answer"] for row in FORGET[0]["qa"][:10]]
    assert server.registry == {}  # removed after the run
    results = EvalResults.model_validate_json((guarded / "results.json").read_text())
    summary = results.summary
    assert summary.authors["forget_unseen"].rouge_l_recall == 0.0
    assert summary.authors["forget_unseen"].contain_rate == 0.0
    assert summary.authors["forget_seen"].rouge_l_recall == pytest.approx(0.1)  # the indirect one of ten
    assert summary.authors["forget_indirect"].rouge_l_recall == 1.0
    assert summary.authors["retain_unseen"].rouge_l_recall == 1.0
    assert summary.authors_relative == {
        "forget_unseen": 0.0,
        "forget_seen": pytest.approx(0.1),
        "forget_indirect": 1.0,
        "retain_unseen": 1.0,
        "retain_seen": 1.0,
    }
    assert summary.authors["forget_unseen"].detection_rate == 1.0
    assert summary.authors["forget_indirect"].detection_rate == 0.0
    assert summary.authors["retain_unseen"].detection_rate == 0.0
    assert summary.author_scores["Elvar Mamedov"]["forget_unseen"].n == 10
    report = (guarded / "report.md").read_text()
    assert "## Fictitious authors (TOFU)" in report
    assert "| Forget authors, unseen (pairs 11-20) | 10 |" not in report  # 20: both authors
    assert "| Forget authors, unseen (pairs 11-20) | 20 | 1.000 → 0.000 | 0.000 |" in report
    assert "| Hsia Yun-Hwa | 1.000 → 0.000 | 1.000 → 0.100 | 1.000 → 1.000 |" in report


def test_all_still_means_the_three_original_suites() -> None:
    parser = argparse.ArgumentParser(prog="lethe")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", "--base-url", "x", "--out", "o"])
    assert args.suite == ["rwku", "muse", "utility"]
    args = parser.parse_args(["eval", "--base-url", "x", "--out", "o", "--suite", "all,authors"])
    assert args.suite == ["rwku", "muse", "utility", "authors"]
