"""Helpers for tests: real redis-server and broker processes on free loopback ports."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from app.stores.embedded_redis import find_redis_server

ADMIN_PASSWORD = "admin-password"
JWT_SECRET = "test-secret-with-enough-bytes-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisProcess:
    """A redis-server of the tests' own, on a free TCP port, keeping nothing on disk."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [find_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory), "--maxmemory-policy", "noeviction"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on port {port} after {timeout}s")


class BrokerProcess:
    """`python -m app serve` on a free port, as a user would run it."""

    def __init__(self, data_dir: Path, *, redis_url: str | None, extra_env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.redis_url = redis_url
        self.extra_env = extra_env or {}
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / "serve.log"

    @property
    def url(self) -> str:
        scheme = "https" if self.extra_env.get("BROKER_TLS", "off") != "off" else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
        env.update(BROKER_PORT=str(self.port), BROKER_DATA_DIR=str(self.data_dir),
                   BROKER_ADMIN_PASSWORD=ADMIN_PASSWORD, BROKER_JWT_SECRET=JWT_SECRET,
                   BROKER_REAPER_INTERVAL_SECONDS="0.2", BROKER_REDIS_CHECK_INTERVAL_SECONDS="0.2")
        if self.redis_url:
            env["BROKER_REDIS_URL"] = self.redis_url
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 30.0) -> BrokerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen([sys.executable, "-m", "app", "serve"], env=self.env(),
                                        stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"broker exited with {self.process.returncode}:\n{self.log_path.read_text()}")
            try:
                if httpx.get(self.url + "/health/ready", timeout=1, verify=False).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"broker not ready after {timeout}s:\n{self.log_path.read_text()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)

    def terminate(self, timeout: float = 40.0) -> bool:
        """SIGTERM: graceful shutdown. Returns whether it shut down cleanly: uvicorn drains, runs the lifespan's
        shutdown, then re-raises the signal, so the exit status is -SIGTERM (or 0)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        return code in (0, -signal.SIGTERM) and "Application shutdown complete" in self.log_path.read_text()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def token(base_url: str, username: str = "admin", password: str = ADMIN_PASSWORD) -> str:
    response = httpx.post(base_url + "/login", data={"username": username, "password": password}, verify=False)
    response.raise_for_status()
    return str(response.json()["access_token"])


APT_INSTALL_TIMEOUT = 300.0
APT_UPDATE_TIMEOUT = 180.0


def _run_quietly(command: list[str], timeout: float) -> tuple[bool, str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return False, f"`{' '.join(command)}` took more than {timeout:.0f}s"
    except OSError as exc:
        return False, f"`{' '.join(command)}`: {exc}"
    return done.returncode == 0, (done.stdout + done.stderr)[-2000:]


def apt_install(package: str) -> str | None:
    """Install a Debian package a test needs (wrk, prometheus); None when it worked, else why not."""
    if shutil.which("apt-get") is None:
        return "apt-get is not available"
    if os.geteuid() == 0:
        prefix: list[str] = []
    elif shutil.which("sudo"):
        prefix = ["sudo", "-n"]
    else:
        return "not root and no sudo to run apt-get"
    install = [*prefix, "apt-get", "install", "-y", "--no-install-recommends", package]
    ok, output = _run_quietly(install, APT_INSTALL_TIMEOUT)
    if not ok:  # the package lists may be missing or stale
        updated, update_output = _run_quietly([*prefix, "apt-get", "update"], APT_UPDATE_TIMEOUT)
        if not updated:
            return f"apt-get update failed: {update_output}"
        ok, output = _run_quietly(install, APT_INSTALL_TIMEOUT)
    return None if ok else f"apt-get install {package} failed: {output}"
