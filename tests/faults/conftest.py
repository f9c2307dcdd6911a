"""Fixtures of the fault tests: private redis-server and broker processes, each stopped at teardown."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import BrokerProcess, RedisProcess

STOP_TIMEOUT_SECONDS = 15.0


class Brokers:
    """Starts broker processes on one data dir (a restart is a new process, on a new port) and remembers every
    one, so the teardown can stop whatever is still running, however the test ended."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.started: list[BrokerProcess] = []

    async def start(self, redis_url: str | None, **extra_env: str) -> BrokerProcess:
        broker = BrokerProcess(self.data_dir, redis_url=redis_url, extra_env=extra_env or None)
        self.started.append(broker)
        return await asyncio.to_thread(broker.start)

    def stop_all(self) -> None:
        for broker in self.started:
            process = broker.process
            if process is None or process.poll() is not None:
                continue
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def log_tail(self, lines: int = 60) -> str:
        path = self.data_dir / "serve.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def brokers(data_dir: Path) -> Iterator[Brokers]:
    started = Brokers(data_dir)
    try:
        yield started
    finally:
        started.stop_all()
        print("---- broker log (tail) ----\n" + started.log_tail())  # shown by pytest when the test failed


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server of this test's own (a test may stop it and start another on the same port)."""
    server = RedisProcess(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()
