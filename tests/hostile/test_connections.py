"""Findings 7, 8 and 9 of issue 21, over real sockets: an unexpected 500 leaves the keep-alive
connection usable; a client that sends a 40 MB body reads the 413 instead of a reset; idle and slow
clients are cut off after LETHE_CLIENT_TIMEOUT_SECONDS while others are served."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import requests

from tests.hostile.support import USER, FailingEngine, build_app, settings, uvicorn_server
from tests.support.server import LiveServer, start_server

pytestmark = pytest.mark.e2e

CLIENT_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """`lethe serve` on the tiny model, with a short client timeout."""
    live = start_server(
        tiny_model_dir,
        tmp_path_factory.mktemp("home"),
        tmp_path_factory.mktemp("logs") / "server.log",
        LETHE_CLIENT_TIMEOUT_SECONDS=str(CLIENT_TIMEOUT),
    )
    yield live
    live.stop()


def chat_body(model: str) -> bytes:
    return json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    ).encode()


# ------------------------------------------------------------------ finding 7


def test_the_connection_survives_an_unexpected_500(tiny_model_dir: Path, tmp_path: Path) -> None:
    engine = FailingEngine(tiny_model_dir)
    config = settings(tmp_path)
    with uvicorn_server(build_app(tmp_path, tiny_model_dir, engine), config) as port:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        headers = {**USER, "Content-Type": "application/json"}
        engine.failure = "at_once"  # a plain RuntimeError: no handler of its own
        connection.request(
            "POST", "/v1/chat/completions", body=chat_body(tiny_model_dir.name), headers=headers
        )
        response = connection.getresponse()
        body = json.loads(response.read())
        assert response.status == 500
        assert body["error"]["type"] == "server_error"
        assert "broke" not in body["error"]["message"]  # no internals
        assert response.getheader("connection") != "close"
        engine.failure = "none"
        for method, path, payload in (
            ("GET", "/v1/models", None),
            ("POST", "/v1/chat/completions", chat_body(tiny_model_dir.name)),
        ):
            connection.request(method, path, body=payload, headers=headers)  # the same connection
            response = connection.getresponse()
            response.read()
            assert response.status == 200
        connection.close()


# ------------------------------------------------------------------ finding 8

BIG = 40_000_000


@pytest.mark.parametrize("close", [False, True])
def test_a_40mb_body_gets_a_413_that_http_client_reads(server: LiveServer, close: bool) -> None:
    """`Connection: close` (as urllib sends it) is the hard case: the server closes right after the
    answer, so the whole body must have been read by then."""
    body = b'{"model": "x", "messages": [{"role": "user", "content": "' + b"x" * BIG + b'"}]}'
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    headers = {**server.headers(), "Content-Type": "application/json"}
    if close:
        headers["Connection"] = "close"
    connection.request("POST", "/v1/chat/completions", body=body, headers=headers)  # sends all of it
    response = connection.getresponse()
    error = json.loads(response.read())["error"]
    assert response.status == 413
    assert error["code"] == "request_too_large"
    if not close:  # the body was read to its end: the connection carries on
        connection.request("GET", "/v1/models", headers=server.headers())
        follow = connection.getresponse()
        follow.read()
        assert follow.status == 200
    connection.close()


def test_a_40mb_body_gets_a_413_that_requests_and_httpx_read(server: LiveServer) -> None:
    body = b"x" * BIG
    headers = {**server.headers(), "Content-Type": "application/json"}
    response = requests.post(f"{server.base_url}/completions", data=body, headers=headers, timeout=60)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    answer = httpx.post(f"{server.base_url}/completions", content=body, headers=headers, timeout=60)
    assert answer.status_code == 413
    assert answer.json()["error"]["code"] == "request_too_large"


# ------------------------------------------------------------------ finding 9


def slow_client(port: int, outcome: dict[str, float | str], start: float) -> None:
    """Send a request's headers one byte a second; record when and how the server ended it."""
    request = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 60 + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            for byte in request:
                sock.sendall(bytes([byte]))
                sock.settimeout(1.0)
                try:
                    if sock.recv(1024) == b"":
                        outcome["how"] = "closed"
                        break
                except TimeoutError:
                    continue
            else:
                outcome["how"] = "finished"  # the server waited for the whole request
        except (ConnectionResetError, BrokenPipeError):
            outcome["how"] = "reset"
    outcome["after"] = time.monotonic() - start


def test_slow_and_idle_clients_are_cut_off_and_others_served(server: LiveServer) -> None:
    start = time.monotonic()
    outcomes: list[dict[str, float | str]] = [{} for _ in range(6)]
    threads = [threading.Thread(target=slow_client, args=(server.port, o, start)) for o in outcomes]
    for thread in threads:
        thread.start()
    idle = socket.create_connection(("127.0.0.1", server.port), timeout=30)  # connects, says nothing
    time.sleep(0.5)
    # Meanwhile an ordinary client is answered, promptly.
    asked = time.monotonic()
    response = httpx.post(
        f"{server.base_url}/chat/completions",
        content=chat_body(server.model),
        headers={**server.headers(), "Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert time.monotonic() - asked < CLIENT_TIMEOUT
    for thread in threads:
        thread.join(timeout=30)
    assert idle.recv(1024) == b""  # closed by the server
    idle_after = time.monotonic() - start
    idle.close()
    for outcome in outcomes:
        assert outcome["how"] in ("closed", "reset"), outcome
        assert CLIENT_TIMEOUT - 0.5 <= float(outcome["after"]) <= CLIENT_TIMEOUT + 3, outcome
    assert idle_after <= CLIENT_TIMEOUT + 3


def test_a_client_that_keeps_its_pace_is_not_cut_off(server: LiveServer) -> None:
    """The deadline is on sending a request, not on the answer: a generation may take longer."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = json.dumps(
        {"model": server.model, "prompt": "Hi", "max_tokens": 300, "ignore_eos": True, "temperature": 0}
    ).encode()
    for _ in range(2):  # the same connection, twice
        started = time.monotonic()
        connection.request(
            "POST",
            "/v1/completions",
            body=body,
            headers={**server.headers(), "Content-Type": "application/json"},
        )
        response = connection.getresponse()
        response.read()
        assert response.status == 200
    assert time.monotonic() - started > 0  # answered, however long it took
    connection.close()
