"""Registering forget targets through Lethe's admin API for the length of a run.

POST {admin}/admin/targets with the target, DELETE {admin}/admin/targets/{id} afterwards. A server
without that API (a peer, or an older Lethe) answers 404: the run then measures the model as it
is and says so, instead of failing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime

import httpx
from rich.console import Console

from lethe.evaluation.records import RegisteredTarget
from lethe.evaluation.suites import TargetSpec


class AdminUnavailable(RuntimeError):
    """The server has no admin target API (it answered 404)."""


class AdminError(RuntimeError):
    """The admin API refused a call; the message carries the status and the server's answer."""


def admin_root(base_url: str) -> str:
    """The server root that the admin API hangs off: the OpenAI base URL without its trailing /v1."""
    root = base_url.rstrip("/")
    return root.removesuffix("/v1")


class AdminClient:
    def __init__(self, root: str, admin_key: str, *, timeout: float) -> None:
        self.timeout = timeout
        self._http = httpx.Client(
            base_url=root.rstrip("/"), headers={"Authorization": f"Bearer {admin_key}"}, timeout=timeout
        )

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, path: str, json: dict | None = None) -> httpx.Response:
        return self._send_params(method, path, None, json)

    def _send_params(
        self, method: str, path: str, params: dict[str, str | int] | None, json: dict | None = None
    ) -> httpx.Response:
        try:
            return self._http.request(method, path, params=params, json=json)
        except httpx.HTTPError as error:
            raise AdminError(f"{method} {path}: {error}") from error

    def register(self, spec: TargetSpec) -> RegisteredTarget:
        response = self._send("POST", "/admin/targets", json=spec.model_dump())
        if response.status_code == 404:
            raise AdminUnavailable(f"{response.request.url} answered 404")
        if response.status_code not in (200, 201):
            raise AdminError(f"registering {spec.name!r}: HTTP {response.status_code}: {response.text[:500]}")
        return RegisteredTarget(id=str(response.json()["id"]), name=spec.name)

    def fired_targets(self, since: datetime) -> dict[str, list[str]]:
        """Request id -> ids of the targets that fired on it, from the audit trail's request
        entries newer than `since`; newest first, so paging stops at the first older one."""
        fired: dict[str, list[str]] = {}
        after: str | None = None
        while True:
            params: dict[str, str | int] = {"kind": "request", "limit": 500}
            if after is not None:
                params["after"] = after
            response = self._send_params("GET", "/admin/audit", params)
            if response.status_code != 200:
                raise AdminError(
                    f"reading the audit trail: HTTP {response.status_code}: {response.text[:500]}"
                )
            page = response.json()
            for entry in page["data"]:
                if datetime.fromisoformat(entry["time"]) < since:
                    return fired
                if entry.get("request_id"):
                    fired[entry["request_id"]] = list(entry.get("target_ids") or [])
            if not page.get("has_more"):
                return fired
            after = page["next_cursor"]

    def wait_for_features(
        self, targets: Sequence[RegisteredTarget], timeout: float, console: Console
    ) -> None:
        """Wait until the server has chosen every target's SAE features, so that no probe is answered
        before the clamp can act (the server chooses them in the background after registration)."""
        deadline = time.monotonic() + timeout
        waiting = list(targets)
        while waiting:
            response = self._send("GET", f"/admin/targets/{waiting[0].id}")
            if response.status_code != 200:
                raise AdminError(f"reading target {waiting[0].name!r}: HTTP {response.status_code}")
            if response.json().get("sae_features"):
                waiting.pop(0)
                continue
            if time.monotonic() > deadline:
                raise AdminError(
                    f"the server chose no SAE features for {waiting[0].name!r} in {timeout:.0f} s"
                )
            time.sleep(0.5)
        console.print(f"SAE features chosen for {len(targets)} target(s)")

    def remove(self, target: RegisteredTarget) -> None:
        """Delete a target; one that is already gone (404) counts as removed."""
        response = self._send("DELETE", f"/admin/targets/{target.id}")
        if response.status_code not in (200, 202, 204, 404):
            raise AdminError(f"removing {target.name!r}: HTTP {response.status_code}: {response.text[:500]}")


@contextmanager
def registered_targets(
    admin: AdminClient, specs: Sequence[TargetSpec], console: Console, wait_for_features: bool = False
) -> Iterator[list[RegisteredTarget] | None]:
    """Register `specs` for the duration of the block, then remove them, even on failure.

    Yields the registered targets, or None when the server has no admin API. A failure halfway
    through registration removes the targets already registered before raising. With
    `wait_for_features`, the block starts once the server has chosen the targets' SAE features.
    """
    registered: list[RegisteredTarget] = []
    available = True
    try:
        for spec in specs:
            try:
                target = admin.register(spec)
            except AdminUnavailable as error:
                console.print(
                    f"[yellow]the server has no admin API ({error}): measuring the model as it is[/]"
                )
                available = False
                break
            registered.append(target)
            console.print(f"registered forget target {spec.name!r} (id {target.id})")
        if available and wait_for_features:
            admin.wait_for_features(registered, admin.timeout, console)
        yield registered if available else None
    finally:
        for target in registered:
            admin.remove(target)
        if registered:
            console.print(f"removed {len(registered)} forget target(s)")
