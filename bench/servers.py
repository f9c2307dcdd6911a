"""The processes the benchmark starts and measures: its own redis-server, the broker, and the baseline app.

Everything listens on 127.0.0.1 on a free port; every wait has a deadline. The broker runs as a user runs it,
`python -m app serve` with BROKER_* settings, and its memory is read with psutil over its whole process tree
(with BROKER_WORKERS=2 that is uvicorn's supervisor and its worker processes).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis

from app.stores.embedded_redis import find_redis_server

ROOT = Path(__file__).resolve().parent.parent
ADMIN_PASSWORD = "bench-admin-password"
JWT_SECRET = "bench-jwt-secret-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on port {port} after {timeout}s")


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the benchmark dies, so no server outlives a killed run."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _stop(process: subprocess.Popen[bytes] | None, timeout: float = 40.0) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


class RedisServer:
    """A redis-server of the benchmark's own: free TCP port, no persistence, noeviction."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [find_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory), "--maxmemory-policy", "noeviction"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent,
        )
        wait_for_port(self.port)
        return self

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def flushall(self) -> None:
        with contextlib.closing(self.client()) as client:
            client.flushall()

    def version(self) -> str:
        with contextlib.closing(self.client()) as client:
            return str(client.info("server")["redis_version"])

    def used_memory(self) -> int:
        with contextlib.closing(self.client()) as client:
            return int(client.info("memory")["used_memory"])

    def stop(self) -> None:
        _stop(self.process, timeout=10)
        self.process = None


class RssSampler:
    """Samples the resident memory of a process tree every `interval` seconds in a thread; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.last = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-{pid}", daemon=True)

    def tree_rss(self) -> int:
        try:
            root = psutil.Process(self.pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for process in processes:
            with contextlib.suppress(psutil.Error):
                total += process.memory_info().rss
        return total

    def sample(self) -> int:
        self.last = self.tree_rss()
        self.peak = max(self.peak, self.last)
        return self.last

    def reset_peak(self) -> None:
        self.peak = self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> RssSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class HttpServer:
    """A server process that answers GET /health/ready with 200 once it can take load."""

    name = "server"

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.rss: RssSampler | None = None
        self.startup_seconds = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self, timeout: float = 60.0) -> HttpServer:
        """Start the process and wait for /health/ready; `startup_seconds` is the time from spawn to ready."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            started = time.perf_counter()
            self.process = subprocess.Popen(self.command(), env=self.env(), cwd=ROOT, stdout=log,
                                            stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        self.rss = RssSampler(self.process.pid).__enter__()
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=1.0) as http:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
                try:
                    if http.get(self.url + "/health/ready").status_code == 200:
                        self.startup_seconds = time.perf_counter() - started
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.01)
        self.stop()
        raise TimeoutError(f"{self.name} not ready after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.rss is not None:
            self.rss.__exit__()
        _stop(self.process)


class BaselineServer(HttpServer):
    name = "baseline"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "bench.baseline", "--port", str(self.port)]


class BrokerServer(HttpServer):
    """`python -m app serve` with BROKER_* settings, on the benchmark's Redis."""

    name = "broker"

    def __init__(self, data_dir: Path, redis_url: str, *, workers: int = 1, sync: str = "full",
                 log_level: str = "warning", extra_env: dict[str, str] | None = None) -> None:
        super().__init__(data_dir / "serve.log")
        self.data_dir = data_dir
        self.redis_url = redis_url
        self.workers = workers
        self.sync = sync
        self.log_level = log_level
        self.extra_env = extra_env or {}

    def command(self) -> list[str]:
        return [sys.executable, "-m", "app", "serve"]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_") and k != "PROMETHEUS_MULTIPROC_DIR"}
        env.update(
            BROKER_HOST="127.0.0.1", BROKER_PORT=str(self.port), BROKER_DATA_DIR=str(self.data_dir),
            BROKER_REDIS_URL=self.redis_url, BROKER_WORKERS=str(self.workers), BROKER_JOURNAL_SYNC=self.sync,
            BROKER_LOG_LEVEL=self.log_level, BROKER_ADMIN_PASSWORD=ADMIN_PASSWORD, BROKER_JWT_SECRET=JWT_SECRET,
        )
        env.update(self.extra_env)
        return env

    def cli_env(self) -> dict[str, str]:
        """The environment for `python -m app journal check` against this broker's journal and Redis."""
        return self.env()

    def login(self) -> str:
        response = httpx.post(self.url + "/login", data={"username": "admin", "password": ADMIN_PASSWORD},
                              timeout=30)
        response.raise_for_status()
        return str(response.json()["access_token"])

    def create_queue(self, token: str, name: str) -> None:
        response = httpx.post(self.url + "/queues", json={"name": name}, timeout=30,
                              headers={"Authorization": f"Bearer {token}"})
        if response.status_code != 201:
            raise RuntimeError(f"creating queue {name}: {response.status_code} {response.text}")

    def request(self, token: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(method, self.url + path, headers={"Authorization": f"Bearer {token}"}, timeout=30,
                             **kwargs)
