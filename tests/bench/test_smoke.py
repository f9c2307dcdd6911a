"""The benchmark harness in a tiny mode, so it cannot rot: every scenario runs for about a second against real
processes and BENCHMARKS.md (here a temporary file) gets every section and target. Nothing asserts a timing.

Without `wrk` on PATH it runs `apt-get install -y wrk` (after `apt-get update` if needed). When that is impossible,
or aiohttp is missing, it skips, or fails when CI is set: CI must run it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import pytest

from bench.report import SECTIONS, TARGET_NAMES
from tests.support import apt_install

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 240.0


def _install_wrk() -> str | None:
    return apt_install("wrk")


def _unavailable(message: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    reason = _install_wrk()
    found = shutil.which("wrk")
    if reason is None and found:
        return found
    _unavailable(f"needs wrk: {reason or 'apt-get installed wrk but it is not on PATH'}")


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_tiny_benchmark_writes_every_section(wrk: str, tmp_path: Path) -> None:
    if importlib.util.find_spec("aiohttp") is None:
        _unavailable("needs aiohttp (the dev extra) for the consume+ack and long-poll clients")
    output = tmp_path / "BENCHMARKS.md"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--duration", "1", "--runs", "1", "--recovery-messages", "2000",
         "--latency-samples", "20", "--output", str(output)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    summary = [line for line in done.stdout.splitlines() if line.startswith("bench: ")]
    assert len(summary) == 1, done.stdout
    for figure in ("publish c64", "p99 c16", "batch", "consume+ack", "long-poll p50", "2 workers", "rebuild 2,000",
                   "targets met"):
        assert figure in summary[0]
    assert re.search(r"consume\+ack [1-9][\d,]* msg/s", summary[0]), summary[0]  # wrk's cycles acked messages

    report = output.read_text()
    assert report.startswith("# Benchmarks")
    for heading in SECTIONS:
        assert f"\n{heading}" in report, heading
    for target in TARGET_NAMES:
        assert f"| {target} |" in report, target
    for row in ("| c1 |", "| c16 |", "| c64 |", "| sync full, 1 worker |", "| sync normal, 1 worker |",
                "| sync full, 2 workers |", "| publish c64 (req/s) |", "| batch (msg/s) |",
                "`broker journal check` afterwards | exit 0"):
        assert row in report, row
    # the batched consume loop acked messages too (its deliveries parsed from a list, acked one by one)
    assert re.search(r"\| `POST`, max \d+ \| [1-9][\d,]* \|", report), report
    assert "python -m bench --quick" in report  # the exact command
    assert "CPUs (`nproc`)" in report and "uvicorn" in report  # the machine and versions
    assert "not run" not in report  # every scenario produced its figures
