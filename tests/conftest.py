"""Shared fixtures: a real redis-server for the session, a fresh journal per test, the app over httpx."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from app.application import create_app
from app.settings import Settings
from tests.support import ADMIN_PASSWORD, JWT_SECRET, RedisProcess


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisProcess) -> str:
    """The session's Redis, emptied for this test."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def settings(tmp_path: Path, redis_url: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        redis_url=redis_url,
        admin_password=ADMIN_PASSWORD,
        jwt_secret=JWT_SECRET,
        reaper_interval_seconds=0.1,
        redis_check_interval_seconds=0.1,
    )


class ApiClient(httpx.AsyncClient):
    """httpx against create_app with real stores; `as_admin()` and friends add a bearer token."""

    async def login(self, username: str = "admin", password: str = ADMIN_PASSWORD) -> dict[str, str]:
        response = await self.post("/login", data={"username": username, "password": password})
        assert response.status_code == 200, response.text
        return dict(response.json())

    async def auth(self, username: str = "admin", password: str = ADMIN_PASSWORD) -> dict[str, str]:
        return {"Authorization": f"Bearer {(await self.login(username, password))['access_token']}"}


@contextlib.asynccontextmanager
async def api_client(settings: Settings, **changes: Any) -> AsyncIterator[tuple[ApiClient, dict[str, Any]]]:
    """The app with these settings, its lifespan running, and an httpx client on it; with the lifespan's state."""
    app = create_app(settings.with_changes(**changes))
    async with app.router.lifespan_context(app) as state:

        async def with_state(scope: Any, receive: Any, send: Any) -> None:
            scope["state"] = dict(state)  # what uvicorn does with the lifespan's state
            await app(scope, receive, send)

        transport = httpx.ASGITransport(app=with_state)
        async with ApiClient(transport=transport, base_url="http://testserver") as api:
            yield api, dict(state)


@pytest.fixture
async def app_state(settings: Settings) -> AsyncIterator[tuple[ApiClient, dict[str, Any]]]:
    async with api_client(settings) as opened:
        yield opened


@pytest.fixture
def client(app_state: tuple[ApiClient, dict[str, Any]]) -> ApiClient:
    return app_state[0]


@pytest.fixture
def broker(app_state: tuple[Any, dict[str, Any]]) -> Any:
    return app_state[1]["broker"]
