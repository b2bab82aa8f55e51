"""A worker needs the `eval` extra (jobs are scored before and after); serving does not."""

from __future__ import annotations

import argparse
import importlib.util

import pytest

from lethe.gateway.cli import worker


def test_a_worker_without_the_eval_extra_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = importlib.util.find_spec

    def without_rouge(name: str) -> object:
        return None if name == "rouge_score" else real(name)

    monkeypatch.setattr(importlib.util, "find_spec", without_rouge)
    assert worker.run(argparse.Namespace()) == 2
    assert "pip install 'lethe[eval]'" in capsys.readouterr().err


def test_the_eval_extra_is_installed_where_the_tests_run() -> None:
    assert worker.missing_eval_extra() is None
