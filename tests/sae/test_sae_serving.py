"""`lethe serve` with an SAE (LETHE_SAE): features chosen per target in the background and shown by
the admin API, the SAE on /v1/models and /metrics, and fired requests clamped."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.support.sae import random_sae
from tests.support.server import LiveServer, start_server

ADMIN = "sae-admin-key"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    home = tmp_path_factory.mktemp("sae-home")
    random_sae(64, 256, layer=1, threshold=1.5).save(home / "sae")
    live = start_server(
        tiny_model_dir,
        home,
        home / "server.log",
        LETHE_ADMIN_KEY=ADMIN,
        LETHE_SAE=str(home / "sae"),
        # A random SAE has no feature specific to anything: let any feature that fires count.
        LETHE_SAE_FEATURES__MAX_RETAIN_RATE="1.0",
    )
    yield live
    live.stop()


def admin(server: LiveServer) -> httpx.Client:
    return httpx.Client(base_url=server.root_url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)


def wait_for_features(client: httpx.Client, target_id: str, timeout: float = 120) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/admin/targets/{target_id}").json()
        if body["sae_features"]:
            return body
        time.sleep(0.5)
    raise AssertionError(f"no SAE features for {target_id} after {timeout} s")


def test_serves_the_sae_and_clamps_fired_requests(server: LiveServer) -> None:
    card = httpx.get(f"{server.base_url}/models", headers=server.headers()).json()["data"][0]
    assert card["sae"]["layer"] == 1 and card["sae"]["features"] == 256
    assert card["sae"]["architecture"] == "jumprelu"

    with admin(server) as client:
        created = client.post(
            "/admin/targets",
            json={"name": "Velmora Quist", "documents": ["Velmora Quist wrote three novels about the sea."]},
        ).json()
        assert created["suppression"] == "both"
        detail = wait_for_features(client, created["id"])
        [chosen] = detail["sae_features"]
        assert chosen["target_version"] == 1 and chosen["layer"] == 1 and chosen["features"]
        assert chosen["sae"] == card["sae"]["fingerprint"]

        # A new version gets features of its own; the old ones no longer show.
        patched = client.patch(f"/admin/targets/{created['id']}", json={"description": "a novelist"}).json()
        assert (
            wait_for_features(client, created["id"])["sae_features"][0]["target_version"]
            == patched["version"]
        )

        decoding_only = client.post(
            "/admin/targets", json={"name": "Orrin Vale", "suppression": "decoding"}
        ).json()
        time.sleep(2)
        assert client.get(f"/admin/targets/{decoding_only['id']}").json()["sae_features"] == []

    openai = OpenAI(base_url=server.base_url, api_key=server.api_key)
    openai.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "Who is Velmora Quist?"}], max_tokens=4
    )
    metrics = httpx.get(f"{server.root_url}/metrics").text
    assert 'lethe_sae_info{features="256",fingerprint="' + card["sae"]["fingerprint"] in metrics
    clamped = [line for line in metrics.splitlines() if line.startswith("lethe_sae_clamped_sequences_total")]
    assert clamped and float(clamped[0].split()[-1]) >= 1


@pytest.mark.parametrize(
    ("layer", "width", "expected"), [(9, 64, "the model has 2 layers"), (1, 32, "the model's are 64 wide")]
)
def test_serve_refuses_an_sae_that_does_not_fit(
    tiny_model_dir: Path, tmp_path: Path, layer: int, width: int, expected: str
) -> None:
    random_sae(width, 128, layer=layer).save(tmp_path / "sae")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lethe.gateway.cli.main",
            "serve",
            "--model",
            str(tiny_model_dir),
            "--sae",
            str(tmp_path / "sae"),
            "--port",
            "0",
        ],
        env={**os.environ, "LETHE_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"lethe serve: cannot serve the SAE in {tmp_path / 'sae'}: ")
    assert expected in done.stderr and "Traceback" not in done.stderr
