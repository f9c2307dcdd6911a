"""The message hot path (app/api/hot.py) serves its routes as the Starlette stack would: the same errors, limits,
CORS headers, metrics and access log, and it leaves every other request to Starlette."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from app.api.hot import HotPath, match
from tests.conftest import ApiClient, api_client


@pytest.fixture
async def admin(client: ApiClient) -> dict[str, str]:
    headers = await client.auth()
    assert (await client.post("/queues", json={"name": "q"}, headers=headers)).status_code == 201
    return headers


def test_only_the_hot_paths_match() -> None:
    assert match("/queues/q/messages") is not None
    assert match("/queues/q.1/messages/batch") is not None
    assert match("/messages/12/ack") is not None
    for path in ["/queues", "/queues/q", "/queues//messages", "/queues/q/messages/", "/queues/q/purge",
                 "/messages/12", "/messages/12/history", "/messages/12/ack/extra", "queues/q/messages", "/"]:
        assert match(path) is None, path


async def test_a_wrong_method_on_a_hot_path_is_405_with_allow(client: ApiClient, admin: dict[str, str]) -> None:
    for method, path, allowed in [("GET", "/messages/1/ack", "POST"), ("DELETE", "/queues/q/messages/consume",
                                                                         "GET, POST"),
                                  ("GET", "/queues/q/messages/batch", "POST"), ("HEAD", "/messages/1/extend", "POST")]:
        response = await client.request(method, path, headers=admin)
        assert response.status_code == 405, (method, path)
        assert response.headers["allow"] == allowed
        if method != "HEAD":
            assert response.json()["code"] == "method_not_allowed"


async def test_other_methods_on_a_shared_path_go_to_starlette(client: ApiClient, admin: dict[str, str]) -> None:
    await client.post("/queues/q/messages", json={"content": 1}, headers=admin)
    browsed = await client.get("/queues/q/messages", headers=admin)
    assert browsed.status_code == 200 and [m["content"] for m in browsed.json()["messages"]] == [1]
    refused = await client.delete("/queues/q/messages", headers=admin)
    assert refused.status_code == 405 and refused.headers["allow"] == "GET, HEAD, POST"
    assert refused.json()["code"] == "method_not_allowed"


async def test_an_app_mounted_under_a_root_path_serves_its_hot_routes(
    app_state: tuple[ApiClient, dict[str, Any]], admin: dict[str, str]
) -> None:
    """Behind a proxy that strips a prefix (uvicorn --root-path /broker), the path in the scope carries the prefix:
    the hot path matches what follows it, as Starlette's router does."""
    state = app_state[1]
    body = b'{"content": "rooted"}'
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def unreachable(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("a hot route went to Starlette")

    scope = {"type": "http", "method": "POST", "path": "/broker/queues/q/messages", "query_string": b"",
             "root_path": "/broker", "state": state,
             "headers": [(b"authorization", admin["Authorization"].encode()), (b"content-type", b"application/json"),
                         (b"content-length", b"%d" % len(body))]}
    await HotPath(unreachable, max_body_bytes=1000)(scope, receive, send)
    assert sent[0]["status"] == 201
    assert (await state["broker"].journal.counts(state["broker"].journal.queue("q")))["pending"] == 1


async def test_a_streamed_body_over_the_limit_is_413_and_nothing_is_journaled(settings: Any) -> None:
    async with api_client(settings, max_body_bytes=1000) as (client, state):
        admin = await client.auth()
        await client.post("/queues", json={"name": "q"}, headers=admin)

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit holds while it streams in
            yield b'{"content": "'
            for _ in range(20):
                yield b"x" * 100
            yield b'"}'

        response = await client.post("/queues/q/messages", content=chunks(), headers=admin)
        assert response.status_code == 413 and response.json()["code"] == "body_too_large"
        assert (await state["broker"].journal.counts(state["broker"].journal.queue("q")))["pending"] == 0


async def test_auth_comes_before_the_body_is_read(client: ApiClient, admin: dict[str, str]) -> None:
    response = await client.post("/queues/q/messages", content=b"not json")
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    await client.post("/users", json={"username": "c", "password": "password-1", "roles": ["consumer"]},
                      headers=admin)
    consumer = await client.auth("c", "password-1")
    response = await client.post("/queues/q/messages", content=b"not json", headers=consumer)
    assert response.status_code == 403 and response.json()["code"] == "forbidden"


async def test_an_unexpected_error_is_a_logged_500_without_a_traceback(
    app_state: tuple[ApiClient, dict[str, Any]], admin: dict[str, str], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client, state = app_state

    async def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(state["broker"], "ack", broken)
    with caplog.at_level(logging.ERROR, logger="app.api.hot"):
        response = await client.post("/messages/1/ack", headers=admin)
    assert response.status_code == 500 and response.json()["code"] == "internal_error"
    assert "Traceback" not in response.text and "a bug" not in response.text
    assert any("POST /messages/{message_id}/ack" in r.getMessage() for r in caplog.records)


async def test_a_client_gone_before_its_body_arrived_gets_nothing_and_nothing_is_journaled(
    app_state: tuple[ApiClient, dict[str, Any]], admin: dict[str, str]
) -> None:
    state = app_state[1]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def unreachable(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("a hot route went to Starlette")

    scope = {"type": "http", "method": "POST", "path": "/queues/q/messages", "query_string": b"", "root_path": "",
             "headers": [(b"authorization", admin["Authorization"].encode())], "state": state}
    await HotPath(unreachable, max_body_bytes=1000)(scope, receive, send)
    assert sent == []
    assert (await state["broker"].journal.counts(state["broker"].journal.queue("q")))["pending"] == 0


async def test_hot_routes_carry_cors_headers_when_cors_is_on(settings: Any) -> None:
    async with api_client(settings, cors_origins=("https://app.example",)) as (client, _):
        admin = await client.auth()
        await client.post("/queues", json={"name": "q"}, headers=admin)
        origin = {"Origin": "https://app.example"}
        published = await client.post("/queues/q/messages", json={"content": 1}, headers={**admin, **origin})
        assert published.status_code == 201
        assert published.headers["access-control-allow-origin"] == "https://app.example"
        preflight = await client.options("/queues/q/messages", headers={
            **origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})
        assert preflight.status_code == 200
        assert "POST" in preflight.headers["access-control-allow-methods"]


async def test_hot_requests_are_in_the_access_log_by_route_and_user(
    client: ApiClient, admin: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="app.access"):
        await client.post("/queues/q/messages", json={"content": 1}, headers=admin)
        await client.post("/messages/999/ack", headers=admin)
    lines = [(r.route, r.status, r.user) for r in caplog.records if r.name == "app.access"]  # type: ignore[attr-defined]
    assert lines == [("/queues/{queue}/messages", 201, "admin"), ("/messages/{message_id}/ack", 404, "admin")]


async def test_the_access_log_can_be_turned_off(settings: Any, caplog: pytest.LogCaptureFixture) -> None:
    async with api_client(settings, access_log=False) as (client, _):
        admin = await client.auth()
        with caplog.at_level(logging.INFO, logger="app.access"):
            await client.post("/queues", json={"name": "q"}, headers=admin)
            await client.post("/queues/q/messages", json={"content": 1}, headers=admin)
    assert [r for r in caplog.records if r.name == "app.access"] == []
