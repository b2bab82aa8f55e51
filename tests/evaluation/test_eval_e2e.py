"""`lethe eval` against a live Lethe server (the `live_server` fixture, a tiny random model).

A random model answers nonsense, so the figures say nothing; what this checks is the full path
over real HTTP (probes out, answers scored, files written) and that a rerun is identical.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from lethe.evaluation import cli
from lethe.evaluation.records import EvalResults
from tests.evaluation.synthetic_data import write_eval_data

pytestmark = pytest.mark.e2e


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="lethe")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *argv])
    return args.run(args)


def test_eval_sample_against_a_live_server_is_complete_and_deterministic(
    live_server: Any, tmp_path: Path
) -> None:
    data = write_eval_data(tmp_path / "eval")
    common = (
        "--base-url",
        live_server.base_url,
        "--api-key",
        live_server.api_key or "EMPTY",
        "--no-register",
        "--data-dir",
        str(data),
        "--sample",
        "1",
        "--max-tokens",
        "6",
        "--instruction-max-tokens",
        "8",
        "--concurrency",
        "4",
    )
    first, second = tmp_path / "first", tmp_path / "second"
    assert _run(*common, "--out", str(first)) == 0
    assert _run(*common, "--compare", str(first / "results.json"), "--out", str(second)) == 0

    results = EvalResults.model_validate_json((first / "results.json").read_text())
    assert {r.suite for r in results.records} == {"rwku", "muse", "utility"}
    assert all(r.error is None for r in results.records)
    assert all(r.scores.rouge_l_recall is not None for r in results.records if r.answer is not None)
    assert (first / "report.md").is_file() and (first / "forget_vs_neighbour.png").is_file()

    rerun = EvalResults.model_validate_json((second / "results.json").read_text())
    assert [r.output for r in rerun.records] == [r.output for r in results.records]
    assert rerun.summary.utility["instructions"].agreement == 1.0
    assert (second / "compare_targets.png").is_file()
