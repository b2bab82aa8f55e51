"""The admin API: target CRUD over HTTP, validation, auth, change notification, audit, restarts."""

from __future__ import annotations

import logging
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lethe.gateway.api.app import create_app
from lethe.gateway.config import Settings
from lethe.gateway.store import AuditRecord
from lethe.models.engines.hf_engine import TransformersEngine
from tests.support.server import LiveServer, start_server

ADMIN_KEY = "admin-secret"
USER_KEY = "user-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def engine_dir(tiny_model_dir: Path) -> Path:
    return tiny_model_dir


def build_app(home: Path, model: Path, **settings: Any) -> FastAPI:
    """The real app on the tiny model: registering a target compiles it for that model."""
    values = {"home": home, "api_keys": USER_KEY, "admin_key": ADMIN_KEY, **settings}
    return create_app(Settings(**values), engine=TransformersEngine(model))


@pytest.fixture
def app(tmp_path: Path, engine_dir: Path) -> FastAPI:
    return build_app(tmp_path, engine_dir)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, headers=ADMIN) as started:
        yield started


def register(client: TestClient, name: str = "Harry Potter", **fields: Any) -> dict[str, Any]:
    response = client.post("/admin/targets", json={"name": name, **fields})
    assert response.status_code == 201, response.text
    return response.json()


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param
    return error


def test_register_read_change_delete(client: TestClient) -> None:
    created = register(client, aliases=["HP"], forbidden=["Hogwarts"], policy="refuse")
    assert created["id"].startswith("tgt_")
    assert (created["name"], created["version"], created["policy"], created["enabled"]) == (
        "Harry Potter",
        1,
        "refuse",
        True,
    )
    assert created["created_at"].endswith("Z") and created["created_at"] == created["updated_at"]
    assert client.get(f"/admin/targets/{created['id']}").json() == {**created, "sae_features": []}

    patched = client.patch(
        f"/admin/targets/{created['id']}", json={"description": "boy wizard", "name": None}
    )
    assert patched.status_code == 200, patched.text
    assert (patched.json()["version"], patched.json()["description"], patched.json()["name"]) == (
        2,
        "boy wizard",
        "Harry Potter",
    )
    assert client.get("/admin/targets").json()["data"] == [patched.json()]

    deleted = client.delete(f"/admin/targets/{created['id']}")
    assert deleted.status_code == 200
    assert deleted.json() == {"id": created["id"], "object": "target.deleted", "deleted": True}
    assert_error(client.get(f"/admin/targets/{created['id']}"), 404)
    assert client.get("/admin/targets").json() == {
        "object": "list",
        "data": [],
        "has_more": False,
        "next_cursor": None,
    }


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"name": ""}, "name"),
        ({"name": "   "}, "name"),
        ({"name": "x" * 201}, "name"),
        ({}, "name"),
        ({"name": 5}, "name"),
        ({"name": "Harry", "colour": "red"}, "colour"),
        ({"name": "Harry", "aliases": "HP"}, "aliases"),
        ({"name": "Harry", "aliases": ["HP", ""]}, "aliases.1"),
        ({"name": "Harry", "policy": "ignore"}, "policy"),
        ({"name": "Harry", "enabled": "maybe"}, "enabled"),
        ({"name": "Harry", "documents": ["x" * 20_001]}, "documents.0"),
    ],
)
def test_invalid_targets_are_400_naming_the_field(client: TestClient, body: Any, param: str) -> None:
    assert_error(client.post("/admin/targets", json=body), 400, param)
    assert client.get("/admin/targets").json()["data"] == []


@pytest.mark.parametrize(
    ("body", "param"),
    [({"name": ""}, "name"), ({"version": 7}, "version"), ({"forbidden": "Hogwarts"}, "forbidden")],
)
def test_invalid_patches_are_400_naming_the_field(client: TestClient, body: Any, param: str) -> None:
    target = register(client)
    assert_error(client.patch(f"/admin/targets/{target['id']}", json=body), 400, param)
    assert client.get(f"/admin/targets/{target['id']}").json() == {**target, "sae_features": []}


def test_malformed_json_is_400(client: TestClient) -> None:
    response = client.post("/admin/targets", content=b"{", headers={"Content-Type": "application/json"})
    assert assert_error(response, 400)["code"] == "invalid_json"


def test_duplicate_names_are_409_ignoring_case(client: TestClient) -> None:
    first = register(client)
    error = assert_error(client.post("/admin/targets", json={"name": "harry POTTER"}), 409, "name")
    assert first["id"] in error["message"]
    other = register(client, "Voldemort")
    assert_error(client.patch(f"/admin/targets/{other['id']}", json={"name": "Harry potter"}), 409, "name")


@pytest.mark.parametrize("method", ["GET", "PATCH", "DELETE"])
def test_unknown_ids_are_404(client: TestClient, method: str) -> None:
    body = {"description": "x"} if method == "PATCH" else None
    error = assert_error(client.request(method, "/admin/targets/tgt_nope", json=body), 404)
    assert error["code"] == "target_not_found"


def test_if_match_guards_concurrent_changes(client: TestClient) -> None:
    target = register(client)
    url = f"/admin/targets/{target['id']}"
    assert client.patch(url, json={"description": "v2"}, headers={"If-Match": "1"}).json()["version"] == 2
    assert client.patch(url, json={"description": "v3"}, headers={"If-Match": '"2"'}).json()["version"] == 3
    stale = assert_error(client.patch(url, json={"description": "lost"}, headers={"If-Match": "2"}), 412)
    assert stale["code"] == "version_mismatch"
    assert_error(
        client.patch(url, json={"description": "x"}, headers={"If-Match": "latest"}), 400, "If-Match"
    )
    assert_error(client.delete(url, headers={"If-Match": "1"}), 412)
    assert client.get(url).json()["description"] == "v3"
    assert client.delete(url, headers={"If-Match": "3"}).status_code == 200


def test_target_pages(client: TestClient) -> None:
    ids = [register(client, f"target {index}")["id"] for index in range(5)]
    seen: list[str] = []
    after: str | None = None
    while True:
        params = {"limit": 2, **({"after": after} if after else {})}
        page = client.get("/admin/targets", params=params).json()
        assert page["object"] == "list" and len(page["data"]) <= 2
        seen.extend(target["id"] for target in page["data"])
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        after = page["next_cursor"]
    assert seen == ids
    assert len(client.get("/admin/targets").json()["data"]) == 5


@pytest.mark.parametrize(
    ("path", "params", "param"),
    [
        ("/admin/targets", {"limit": 0}, "limit"),
        ("/admin/targets", {"limit": 501}, "limit"),
        ("/admin/targets", {"limit": "many"}, "limit"),
        ("/admin/targets", {"after": "tgt_x"}, "after"),
        ("/admin/audit", {"after": "x"}, "after"),
        ("/admin/audit", {"kind": "everything"}, "kind"),
    ],
)
def test_bad_listing_parameters_are_400(
    client: TestClient, path: str, params: dict[str, Any], param: str
) -> None:
    error = assert_error(client.get(path, params=params), 400)
    assert error["param"] is not None and error["param"].endswith(param)


ADMIN_ROUTES = [
    ("POST", "/admin/targets"),
    ("GET", "/admin/targets"),
    ("GET", "/admin/targets/tgt_x"),
    ("PATCH", "/admin/targets/tgt_x"),
    ("DELETE", "/admin/targets/tgt_x"),
    ("GET", "/admin/audit"),
]


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
@pytest.mark.parametrize(
    "authorization",
    [None, f"Bearer {USER_KEY}", "Bearer wrong", f"Basic {ADMIN_KEY}", f"Bearer {ADMIN_KEY}x", "Bearer "],
)
def test_admin_routes_need_the_admin_key(
    app: FastAPI, method: str, path: str, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    with TestClient(app) as client:
        response = client.request(method, path, json={"name": "Harry Potter"}, headers=headers)
        error = assert_error(response, 401)
        assert error["type"] == "authentication_error"
        assert client.get("/admin/targets", headers=ADMIN).json()["data"] == []


def test_the_admin_key_is_not_a_user_key(client: TestClient) -> None:
    """Separate roles: the admin key opens /admin only, unless an operator also lists it as a user key."""
    assert_error(client.get("/v1/models"), 401)
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {USER_KEY}"}).status_code == 200


def test_a_key_is_generated_once_when_none_is_configured(
    tmp_path: Path, engine_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    app = build_app(tmp_path, engine_dir, admin_key="")
    with TestClient(app) as client:
        key_file = tmp_path / "admin.key"
        key = key_file.read_text().strip()
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert len(key) >= 32 and app.state.admin_key == key
        assert client.get("/admin/targets", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert_error(client.get("/admin/targets", headers=ADMIN), 401)
    assert str(key_file) in caplog.text and key not in caplog.text
    assert [path.name for path in tmp_path.iterdir() if "admin.key" in path.name] == ["admin.key"]

    again = build_app(tmp_path, engine_dir, admin_key="")
    with TestClient(again):
        assert again.state.admin_key == key


def test_every_write_awaits_the_store_watcher(app: FastAPI) -> None:
    """Before a write's response leaves, every listener of the watcher has seen the write's revision
    (the guard index is rebuilt by then); a refused write changes nothing."""
    seen: list[int] = []

    async def listener(revision: int) -> None:
        seen.append(revision)

    def in_force() -> bool:
        return seen[-1] == app.state.store.revision()

    with TestClient(app, headers=ADMIN) as client:
        app.state.watcher.on_targets(listener)
        target = register(client)
        assert in_force()
        client.patch(f"/admin/targets/{target['id']}", json={"enabled": False})
        assert in_force()
        revision = app.state.store.revision()
        client.post("/admin/targets", json={"name": "harry potter"})  # refused: nothing changed
        client.delete("/admin/targets/tgt_nope")
        assert app.state.store.revision() == revision
        client.delete(f"/admin/targets/{target['id']}")
        assert in_force() and app.state.store.revision() > revision


def test_audit_trail_over_http(client: TestClient, app: FastAPI) -> None:
    harry = register(client)
    volde = register(client, "Voldemort")
    client.patch(f"/admin/targets/{harry['id']}", json={"policy": "refuse", "aliases": ["HP"]})
    client.delete(f"/admin/targets/{volde['id']}")

    app.state.store.append_audit(
        AuditRecord(kind="request", action="refuse", target_ids=[harry["id"]], request_id="chatcmpl-1")
    )

    everything = client.get("/admin/audit").json()
    assert everything["object"] == "list" and everything["has_more"] is False
    assert [(r["kind"], r["action"]) for r in everything["data"]] == [
        ("request", "refuse"),
        ("admin", "target.delete"),
        ("admin", "target.update"),
        ("admin", "target.create"),
        ("admin", "target.create"),
    ]
    update = everything["data"][2]
    assert update["target_ids"] == [harry["id"]] and update["detail"]["fields"] == ["aliases", "policy"]
    assert update["time"].endswith("Z")

    about_harry = client.get("/admin/audit", params={"target_id": harry["id"]}).json()["data"]
    assert [r["action"] for r in about_harry] == ["refuse", "target.update", "target.create"]
    requests = client.get("/admin/audit", params={"kind": "request"}).json()["data"]
    assert [r["request_id"] for r in requests] == ["chatcmpl-1"]

    first = client.get("/admin/audit", params={"limit": 2}).json()
    assert first["has_more"] and len(first["data"]) == 2
    rest = client.get("/admin/audit", params={"limit": 10, "after": first["next_cursor"]}).json()
    assert [r["id"] for r in first["data"] + rest["data"]] == [r["id"] for r in everything["data"]]


@pytest.mark.e2e
def test_targets_and_the_generated_key_survive_a_restart(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Real `lethe serve` processes with no admin key configured: the first generates one, the second
    (same home, same database) keeps both the key and the registered target."""
    database = tmp_path / "state" / "targets.db"
    key_file = tmp_path / "admin.key"

    @contextmanager
    def serving(log: str) -> Iterator[tuple[LiveServer, httpx.Client]]:
        server = start_server(
            tiny_model_dir, tmp_path, tmp_path / log, LETHE_ADMIN_KEY="", LETHE_DATABASE=str(database)
        )
        headers = {"Authorization": f"Bearer {key_file.read_text().strip()}"}
        try:
            # The first registration builds the guard's vocabulary and embeddings: seconds on a busy CPU.
            with httpx.Client(base_url=server.root_url, headers=headers, timeout=120) as http:
                yield server, http
        finally:
            server.stop()

    with serving("first.log") as (server, http):
        created = http.post("/admin/targets", json={"name": "Harry Potter"})
        assert created.status_code == 201, created.text
        assert_error(http.get("/admin/targets", headers=server.headers()), 401)
    assert database.is_file() and not (tmp_path / "lethe.db").exists()

    with serving("second.log") as (server, http):
        assert http.get("/admin/targets").json()["data"] == [created.json()]
    log = server.log.read_text()
    assert str(key_file) in log and key_file.read_text().strip() not in log


def test_the_detection_and_guard_settings_reach_the_guard(tmp_path: Path, engine_dir: Path) -> None:
    # identity threshold -1: every request touches every target, so any prompt meets the refusal
    app = build_app(
        tmp_path, engine_dir, detection={"identity_threshold": -1.0}, guard={"refusal": "Not today."}
    )
    with TestClient(app, headers=ADMIN) as client:
        register(client, policy="refuse")
        user = {"Authorization": f"Bearer {USER_KEY}"}
        model = client.get("/v1/models", headers=user).json()["data"][0]["id"]
        body = {"model": model, "messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 8}
        answer = client.post("/v1/chat/completions", json=body, headers=user)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == "Not today."
