"""Every 201 is on disk first (RELIABILITY.md, "fsync before every 201"): strace follows a broker while it publishes,
and between a publish's write to the WAL and its 201 there must be a flush of the WAL (fdatasync or fsync). With
BROKER_JOURNAL_SYNC=normal there is none, which shows that the check can fail.

Without `strace` on PATH the test runs `apt-get install -y strace`; when that is impossible it fails under CI and
is skipped elsewhere.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import NoReturn

import httpx
import pytest

from tests.support import BrokerProcess, RedisProcess, apt_install, token

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
PUBLISHES = 20
SYSCALLS = "trace=pwrite64,write,writev,sendto,sendmsg,fdatasync,fsync"
_CALL = re.compile(r"^(\d+)\s+(?:<\.\.\. (\w+) resumed>|(\w+)\()")


def _unavailable(message: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def strace() -> str:
    found = shutil.which("strace")
    if found is None:
        reason = apt_install("strace")
        found = shutil.which("strace")
        if found is None:
            _unavailable(f"needs strace: {reason or 'apt-get installed it but it is not on PATH'}")
    probe = subprocess.run([found, "-qq", "-e", "trace=none", "true"], capture_output=True, timeout=30, check=False)
    if probe.returncode != 0:
        _unavailable(f"strace cannot trace here: {probe.stderr.decode(errors='replace')[-300:]}")
    return found


def _publish_traced(strace: str, data_dir: Path, redis_url: str, sync: str) -> list[str]:
    broker = BrokerProcess(data_dir, redis_url=redis_url, extra_env={"BROKER_JOURNAL_SYNC": sync}).start()
    try:
        assert broker.process is not None
        headers = {"Authorization": f"Bearer {token(broker.url)}"}
        with httpx.Client(base_url=broker.url, headers=headers, timeout=10) as http:
            assert http.post("/queues", json={"name": "durable"}).status_code == 201
            trace_file = data_dir / f"strace-{sync}.txt"
            tracer = subprocess.Popen([strace, "-f", "-qq", "-y", "-s", "24", "-e", SYSCALLS, "-o", str(trace_file),
                                       "-p", str(broker.process.pid)], stderr=subprocess.PIPE)
            time.sleep(1.0)  # attached to every thread
            for n in range(PUBLISHES):  # one at a time: each is a commit of its own
                response = http.post("/queues/durable/messages", json={"content": {"n": n}})
                assert response.status_code == 201, response.text
            tracer.send_signal(signal.SIGINT)
            _, errors = tracer.communicate(timeout=30)
            assert trace_file.exists(), errors.decode(errors="replace")
        return trace_file.read_text(errors="replace").splitlines()
    finally:
        broker.stop()


def unflushed_201s(lines: list[str]) -> tuple[int, int]:
    """(201s answered while the WAL held writes no flush had covered, 201s in all), from strace -f -y lines."""
    dirty = False
    flushing: set[str] = set()  # threads inside an fdatasync/fsync of the WAL (strace splits blocking calls)
    unflushed = answered = 0
    for line in lines:
        found = _CALL.match(line)
        if found is None:
            continue
        pid, resumed, call = found.group(1), found.group(2), found.group(3)
        name = resumed or call
        if name in ("fdatasync", "fsync"):
            if "-wal>" in line and "<unfinished" in line:
                flushing.add(pid)
            elif ("-wal>" in line or (resumed and pid in flushing)) and line.rstrip().endswith("= 0"):
                dirty = False
                flushing.discard(pid)
        elif name == "pwrite64" and "-wal>" in line:
            dirty = True
        elif name in ("write", "writev", "sendto", "sendmsg") and "HTTP/1.1 201" in line:
            answered += 1
            unflushed += dirty
    return unflushed, answered


@pytest.mark.parametrize("sync", ["full", "normal"])
def test_every_201_is_answered_only_after_the_wal_is_flushed(
    strace: str, tmp_path: Path, redis_server: RedisProcess, sync: str
) -> None:
    lines = _publish_traced(strace, tmp_path / "data", redis_server.url, sync)
    unflushed, answered = unflushed_201s(lines)
    assert answered == PUBLISHES, f"strace saw {answered} 201s of {PUBLISHES}:\n" + "\n".join(lines[-40:])
    if sync == "full":
        assert unflushed == 0, f"{unflushed} of {answered} 201s went out before the WAL was flushed"
    else:  # the same check on a broker that does not flush: it must catch every one
        assert unflushed == answered
