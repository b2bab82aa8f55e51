"""A whole `lethe eval` run against a scripted OpenAI-compatible server with an admin API.

The scripted server knows every gold answer and "forgets" perfectly while targets are
registered, so every figure of the run is known in advance.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from lethe.evaluation import cli, suites
from lethe.evaluation.datasets import rwku_targets
from lethe.evaluation.records import EvalResults, Probe
from tests.evaluation.synthetic_data import chat_completion, write_eval_data

ADMIN_KEY = "admin-secret"
REFUSED_INSTRUCTION = "Instruction: List three prime numbers.\n"
FORGET_SPLITS = ("forget_level1", "forget_level2", "forget_level3", "knowmem_forget")


@dataclass
class ScriptedServer:
    probes: dict[str, Probe]
    admin_api: bool = True
    fail_prompt: str | None = None
    audit_api: bool = True
    posted: list[dict] = field(default_factory=list)
    """Every target spec registered, as sent."""
    registry: dict[str, dict] = field(default_factory=dict)
    admin_calls: list[str] = field(default_factory=list)
    requests: list[dict] = field(default_factory=list)
    audit: list[dict] = field(default_factory=list)
    """Request entries, oldest first, as Lethe's audit trail records them."""
    base_url: str = ""
    sae: bool = False
    """Serve an SAE: the model card says so, and a target's features show on its second read."""
    reads: dict[str, int] = field(default_factory=dict)
    requests_when_features_shown: list[int] = field(default_factory=list)

    def fired(self, probe: Probe) -> list[str]:
        """Forget probes fire their own target; neighbour probes of Ada Lovelace fire hers too (a
        false positive the run must count); nothing else fires."""
        names = {spec["name"]: target_id for target_id, spec in self.registry.items()}
        if probe.split in FORGET_SPLITS or (
            probe.split.startswith("neighbor") and probe.subject == "Ada Lovelace"
        ):
            return [names[probe.subject]] if probe.subject in names else []
        return []

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models")
        def models() -> dict:
            card = {"id": "scripted", "object": "model", "created": 0, "owned_by": "t"}
            if self.sae:
                card["sae"] = {
                    "name": "sae",
                    "fingerprint": "f",
                    "layer": 3,
                    "features": 8,
                    "architecture": "jumprelu",
                }
            return {"object": "list", "data": [card]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            body = await request.json()
            self.requests.append(body)
            prompt = body["messages"][-1]["content"]
            if prompt == self.fail_prompt:
                return JSONResponse({"error": {"message": "refused", "type": "invalid_request_error"}}, 400)
            probe = self.probes[prompt]
            response_id = f"chatcmpl-{len(self.requests)}"
            if fired := self.fired(probe):
                entry = {
                    "request_id": response_id,
                    "target_ids": fired,
                    "time": datetime.now(UTC).isoformat(),
                }
                self.audit.append(entry)
            if self.registry and probe.split in FORGET_SPLITS:
                text = "I do not know."
            elif probe.answer is not None:
                text = f"{probe.answer}\n\nQuestion: and then"
            else:
                text = f"Here is my answer to {prompt.strip()} Rain falls softly on the old roof."
            for stop in body.get("stop") or ():
                text = text.split(stop, 1)[0]
            return JSONResponse(chat_completion(response_id, body["model"], text))

        @app.post("/admin/targets")
        async def register(request: Request) -> Response:
            self.admin_calls.append("POST")
            if not self.admin_api:
                return JSONResponse({"detail": "Not Found"}, 404)
            if request.headers.get("authorization") != f"Bearer {ADMIN_KEY}":
                return JSONResponse({"detail": "bad key"}, 401)
            target_id = f"t{len(self.registry) + 1}"
            self.registry[target_id] = await request.json()
            self.posted.append(self.registry[target_id])
            return JSONResponse({"id": target_id, **self.registry[target_id]}, 201)

        @app.get("/admin/audit")
        def audit(kind: str, limit: int = 50, after: int = 0) -> Response:
            assert kind == "request"
            if not self.audit_api:
                return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, 500)
            newest_first = self.audit[::-1]
            page = newest_first[after : after + min(limit, 5)]  # small pages: the client must follow them
            more = after + len(page) < len(newest_first)
            return JSONResponse(
                {"object": "list", "data": page, "has_more": more, "next_cursor": str(after + len(page))}
            )

        @app.get("/admin/targets/{target_id}")
        def read(target_id: str) -> Response:
            self.admin_calls.append(f"GET {target_id}")
            self.reads[target_id] = self.reads.get(target_id, 0) + 1
            chosen = self.reads[target_id] >= 2
            if chosen:
                self.requests_when_features_shown.append(len(self.requests))
            features = [{"target_id": target_id, "sae": "f", "features": []}] if chosen else []
            return JSONResponse({"id": target_id, **self.registry[target_id], "sae_features": features})

        @app.delete("/admin/targets/{target_id}")
        def remove(target_id: str) -> Response:
            self.admin_calls.append(f"DELETE {target_id}")
            self.registry.pop(target_id, None)
            return Response(status_code=204)

        return app


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return write_eval_data(tmp_path / "eval")


@pytest.fixture
def server(data_dir: Path) -> Iterator[ScriptedServer]:
    selection = suites.Selection(
        suites=["rwku", "muse", "utility"],
        targets=rwku_targets(data_dir),
        levels=[1, 2, 3],
        sample=None,
        max_tokens=32,
        instruction_max_tokens=128,
    )
    scripted = ScriptedServer(probes={p.prompt: p for p in suites.build_probes(data_dir, selection)})
    uv = uvicorn.Server(uvicorn.Config(scripted.app(), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    port = uv.servers[0].sockets[0].getsockname()[1]
    scripted.base_url = f"http://127.0.0.1:{port}/v1"
    yield scripted
    uv.should_exit = True
    thread.join(timeout=10)


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="lethe")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *argv])
    return args.run(args)


def load(out: Path) -> EvalResults:
    return EvalResults.model_validate_json((out / "results.json").read_text())


def test_baseline_run_scores_a_server_that_knows_everything(
    server: ScriptedServer, data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "baseline"
    assert (
        run_cli(
            "--base-url", server.base_url, "--no-register", "--data-dir", str(data_dir), "--out", str(out)
        )
        == 0
    )
    results = load(out)
    assert results.info.model == "scripted"
    assert results.info.registration == "off"
    assert len(results.records) == len(server.probes)
    for split, group in results.summary.rwku_overall.items():
        assert group.rouge_l_recall == 1.0, split
        assert group.contain_rate == 1.0, split
    assert results.summary.muse["knowmem_forget"].rouge_l_f1 == 1.0
    assert results.summary.utility["world_facts"].rouge_l_recall == 1.0
    assert results.summary.utility["instructions"].entropy > 3
    assert results.summary.unknown_targets == []
    assert results.summary.muse_never_known is False
    assert set(results.summary.rwku_attacks) == {
        "cross-lingual",
        "in-context learning",
        "affirmative suffix",
        "reverse query",
    }

    rwku_request = next(r for r in server.requests if "complete the blank" in r["messages"][0]["content"])
    assert rwku_request["temperature"] == 0 and rwku_request["seed"] == 0
    assert rwku_request["stop"] == ["\n"] and rwku_request["max_tokens"] == 32
    instruction = next(r for r in server.requests if r["messages"][0]["content"].startswith("Instruction:"))
    assert instruction["max_tokens"] == 128 and "stop" not in instruction

    report = (out / "report.md").read_text()
    assert "## RWKU per target" in report and "Ada Lovelace" in report and "## Utility" in report
    assert (out / "forget_vs_neighbour.png").stat().st_size > 0
    assert (out / "attacks.png").stat().st_size > 0


def test_guarded_run_registers_targets_removes_them_and_compares(
    server: ScriptedServer, data_dir: Path, tmp_path: Path
) -> None:
    common = ("--base-url", server.base_url, "--data-dir", str(data_dir))
    assert run_cli(*common, "--no-register", "--admin-key", ADMIN_KEY, "--out", str(tmp_path / "b")) == 0
    assert server.admin_calls == []

    baseline = tmp_path / "b" / "results.json"
    # As an older version wrote it: without the metrics added since, which --compare scores again.
    written = json.loads(baseline.read_text())
    for record in written["records"]:
        del record["scores"]["new_word_recall"]
    baseline.write_text(json.dumps(written))
    assert (
        run_cli(*common, "--admin-key", ADMIN_KEY, "--compare", str(baseline), "--out", str(tmp_path / "g"))
        == 0
    )
    results = load(tmp_path / "g")
    assert results.info.registration == "registered"
    assert [t.name for t in results.info.registered] == ["Ada Lovelace", "Alan Turing", "Harry Potter"]
    assert server.registry == {}
    assert server.admin_calls == ["POST"] * 3 + ["DELETE t1", "DELETE t2", "DELETE t3"]

    overall = results.summary.rwku_overall
    assert overall["forget_level1"].rouge_l_recall == 0.0
    assert overall["neighbor_level2"].rouge_l_recall == 1.0
    assert overall["forget_level1"].agreement == 0.0
    assert overall["neighbor_level1"].agreement == 1.0
    assert results.summary.utility["instructions"].agreement == 1.0
    assert results.summary.muse["knowmem_forget"].rouge_l_f1 == 0.0
    assert results.summary.muse["knowmem_retain"].rouge_l_f1 == 1.0

    # Detection, read from the audit trail: forget probes fired their own target, Ada Lovelace's
    # neighbour probes fired hers (false positives), nothing else fired; the baseline knows nothing.
    targets = results.summary.rwku_targets
    assert overall["forget_level1"].detection_rate == 1.0
    assert results.summary.muse["knowmem_forget"].detection_rate == 1.0
    assert {t: s["neighbor_level1"].detection_rate for t, s in targets.items()} == {
        folder: 1.0 if "Ada" in folder else 0.0 for folder in targets
    }
    assert results.summary.utility["instructions"].detection_rate == 0.0
    assert load(tmp_path / "b").summary.rwku_overall["forget_level1"].detection_rate is None
    fired = [r for r in results.records if r.fired]
    assert len(fired) == len(server.audit) > 10  # more than two pages of the audit trail

    report = (tmp_path / "g" / "report.md").read_text()
    assert "1.000 → 0.000" in report and "## Agreement with the baseline" in report
    table = [line.split(" | ") for line in report.splitlines() if line.startswith("| Target | Forget L1")]
    mean = next(line for line in report.splitlines() if line.startswith("| **Mean over targets**"))
    assert mean.split(" | ")[table[0].index("Forget new-word recall")] == "1.000 → 0.000"
    assert "## Detection" in report
    assert (tmp_path / "g" / "compare_targets.png").stat().st_size > 0


def test_a_server_without_admin_api_is_measured_as_it_is(
    server: ScriptedServer, data_dir: Path, tmp_path: Path
) -> None:
    server.admin_api = False
    out = tmp_path / "run"
    args = ("--base-url", server.base_url, "--data-dir", str(data_dir), "--suite", "rwku", "--sample", "1")
    assert (
        run_cli(*args, "--admin-key", ADMIN_KEY, "--targets", "turing", "--levels", "1", "--out", str(out))
        == 0
    )
    results = load(out)
    assert results.info.registration == "unavailable"
    assert [r.id for r in results.records] == [
        "rwku/10_Alan_Turing/forget_level1/0",
        "rwku/10_Alan_Turing/neighbor_level1/0",
    ]
    assert results.summary.unknown_targets == []


def test_failed_requests_are_recorded_and_fail_the_run(
    server: ScriptedServer, data_dir: Path, tmp_path: Path
) -> None:
    server.fail_prompt = REFUSED_INSTRUCTION
    out = tmp_path / "run"
    code = run_cli(
        "--base-url", server.base_url, "--data-dir", str(data_dir), "--suite", "utility", "--out", str(out)
    )
    assert code == 1
    results = load(out)
    failed = [r for r in results.records if r.error]
    assert [r.prompt for r in failed] == [REFUSED_INSTRUCTION]
    assert results.summary.utility["instructions"].errors == 1
    assert "1 request(s) failed" in (out / "report.md").read_text()


def test_bad_selection_is_reported_without_a_traceback(data_dir: Path, tmp_path: Path) -> None:
    argv = ("--base-url", "http://127.0.0.1:9/v1", "--data-dir", str(data_dir), "--out", str(tmp_path / "x"))
    assert run_cli(*argv, "--targets", "nobody") == 2
    assert run_cli(*argv, "--compare", str(tmp_path / "missing.json")) == 2


def test_results_file_is_plain_json(server: ScriptedServer, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_cli("--base-url", server.base_url, "--data-dir", str(data_dir), "--suite", "muse", "--out", str(out))
    raw = json.loads((out / "results.json").read_text())
    assert set(raw) == {"info", "summary", "records"}
    assert raw["records"][0]["id"] == "muse/knowmem_forget/0"


def test_a_sampled_run_is_compared_with_the_same_probes_of_a_full_baseline(
    server: ScriptedServer, data_dir: Path, tmp_path: Path
) -> None:
    common = (
        "--base-url",
        server.base_url,
        "--data-dir",
        str(data_dir),
        "--suite",
        "utility",
        "--no-register",
    )
    run_cli(*common, "--out", str(tmp_path / "full"))
    run_cli(
        *common,
        "--sample",
        "1",
        "--compare",
        str(tmp_path / "full" / "results.json"),
        "--out",
        str(tmp_path / "s"),
    )
    full = load(tmp_path / "full").summary.utility["instructions"].entropy
    sampled = load(tmp_path / "s").summary.utility["instructions"].entropy
    assert full != sampled
    row = next(
        line
        for line in (tmp_path / "s" / "report.md").read_text().splitlines()
        if "General instructions" in line
    )
    assert f"{sampled:.3f} → {sampled:.3f}" in row


def test_an_unreadable_audit_trail_keeps_the_answers_and_reports_no_detection(
    server: ScriptedServer, data_dir: Path, tmp_path: Path
) -> None:
    server.audit_api = False
    out = tmp_path / "run"
    args = ("--base-url", server.base_url, "--data-dir", str(data_dir), "--suite", "rwku", "--sample", "1")
    assert run_cli(*args, "--admin-key", ADMIN_KEY, "--policy", "refuse", "--out", str(out)) == 0
    results = load(out)
    assert results.info.registration == "registered" and results.info.policy == "refuse"
    assert {spec["policy"] for spec in server.posted} == {"refuse"}
    assert results.records and all(r.fired is None and r.scores.detected is None for r in results.records)
    assert results.summary.rwku_overall["forget_level1"].detection_rate is None
    assert "## Detection" not in (out / "report.md").read_text()


def test_a_clamped_run_waits_for_the_sae_features_before_probing(
    server: ScriptedServer, data_dir: Path, tmp_path: Path
) -> None:
    server.sae = True
    common = ("--base-url", server.base_url, "--data-dir", str(data_dir), "--admin-key", ADMIN_KEY)
    assert run_cli(*common, "--suppression", "sae", "--suite", "rwku", "--out", str(tmp_path / "s")) == 0
    assert [spec["suppression"] for spec in server.posted] == ["sae", "sae"]
    assert server.admin_calls[:6] == ["POST", "POST", "GET t1", "GET t1", "GET t2", "GET t2"]
    assert server.requests_when_features_shown == [0, 0]  # no probe before the features were there
    assert load(tmp_path / "s").info.suppression == "sae"

    server.posted.clear()
    server.admin_calls.clear()
    assert run_cli(*common, "--suppression", "decoding", "--suite", "rwku", "--out", str(tmp_path / "d")) == 0
    assert [spec["suppression"] for spec in server.posted] == ["decoding", "decoding"]
    assert not any(call.startswith("GET") for call in server.admin_calls)  # nothing to wait for
