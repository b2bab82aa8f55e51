"""Shared fixtures: the real tokenizer, a tiny random model, and real `lethe serve` processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.engines import require_vllm
from tests.support.paths import TEST_HOME
from tests.support.server import LiveServer, start_server
from tests.support.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """The real embedded SmolLM2 checkpoint (converted from the packaged GGUF on first use)."""
    from lethe.models.embedded import embedded_checkpoint

    return embedded_checkpoint(TEST_HOME)


@pytest.fixture(scope="session")
def tiny_model_dir(embedded_model_dir: Path) -> Path:
    return build_tiny_model(embedded_model_dir, TEST_HOME / "models" / "tiny-random-llama-h32")


@pytest.fixture(scope="session")
def live_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """`lethe serve` on the tiny random model, with an API key: fast, for protocol and error tests."""
    server = start_server(tiny_model_dir, TEST_HOME, tmp_path_factory.mktemp("logs") / "tiny-server.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def embedded_server(
    embedded_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """`lethe serve` on the real embedded SmolLM2-135M-Instruct."""
    server = start_server(
        embedded_model_dir, TEST_HOME, tmp_path_factory.mktemp("logs") / "embedded-server.log"
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def embedded_vllm_server(
    embedded_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """`lethe serve --engine vllm` on the real embedded SmolLM2-135M-Instruct."""
    require_vllm()
    server = start_server(
        embedded_model_dir,
        TEST_HOME,
        tmp_path_factory.mktemp("logs") / "embedded-vllm-server.log",
        LETHE_ENGINE="vllm",
    )
    yield server
    server.stop()


@pytest.fixture(scope="module", params=["hf", "vllm"])
def embedded_any_server(request: pytest.FixtureRequest) -> LiveServer:
    """The embedded model served by each engine in turn."""
    return request.getfixturevalue("embedded_server" if request.param == "hf" else "embedded_vllm_server")
