"""The benchmark: starts what it measures, loads it, and writes BENCHMARKS.md.

    python -m bench                      # the full run: 3 runs of 10 s per figure, recovery on 1M messages
    python -m bench --quick              # 1 run, 2 s per figure, recovery on 20k messages
    broker bench ...                     # the same, through the broker's CLI

It starts its own redis-server (free port, no persistence), the baseline app (bench/baseline.py) and broker processes
(`python -m app serve`, BROKER_* settings, a fresh data directory each), all on 127.0.0.1. Load comes from `wrk`
(Debian's package; bench/wrk/*.lua add the bearer token and the body, drive consume+ack cycles from the responses,
and report latency percentiles as JSON) and, for prefilling and the publish-to-delivery latency, from aiohttp
(bench/clients.py). Each run measures the baseline first and every
broker figure is divided by the baseline figure of the same run; the report gives the median over runs of each.

Per run: baseline (c1, c16, c64) -> broker, journal sync full, 1 worker (single publish c1/c16/c64, batch publish,
consume+ack, long-poll delivery latency) -> broker, sync normal (publish c64, batch) -> broker, 2 workers (publish
c64, batch). Then, once: recovery on a journal of N pending messages (bench/recovery.py).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import orjson
import psutil

from bench import clients
from bench.recovery import RecoveryResult, run_recovery
from bench.servers import ROOT, BaselineServer, BrokerServer, RedisServer

WRK_DIR = Path(__file__).resolve().parent / "wrk"
PUBLISH_SCRIPT = WRK_DIR / "publish.lua"
CONSUME_SCRIPT = WRK_DIR / "consume_ack.lua"
COUNTED = ("delivered", "acked", "empty", "refused")  # consume_ack.lua's own counts
CONCURRENCY = (1, 16, 64)
BATCH_SIZE = 100
BATCH_CONNECTIONS = 16
CONSUMERS = 16
CONSUME_MAX = 10  # messages per consume in the batched consume+ack figure (each still acked on its own)
LATENCY_CONSUMERS = 4
PREFILL_RATE = 6_000  # msg/s the consume+ack queue is prefilled for: more than a broker worker acks here
WRK_TIMEOUT = "10s"
SCENARIOS = ("publish", "batch", "consume", "latency", "sync", "workers", "recovery")
QUEUES = {"warmup": "bench-warmup", "publish": "bench-publish", "batch": "bench-batch",
          "consume": "bench-consume", "consume_batch": "bench-consume-batch", "latency": "bench-latency"}
INSTALL_WRK = "wrk is not installed: `apt-get install -y wrk` (Debian/Ubuntu package `wrk`)"
INSTALL_AIOHTTP = "aiohttp is not installed: `pip install aiohttp` (or `pip install -e '.[dev]'`)"
CONSUME_WAIT = 1  # seconds a consume may long-poll


# -- options ------------------------------------------------------------------------------------------------------


@dataclass
class Options:
    duration: int
    runs: int
    output: Path
    recovery_messages: int
    scenarios: tuple[str, ...]
    quick: bool
    latency_samples: int
    warmup: int
    command: str

    def wants(self, scenario: str) -> bool:
        return scenario in self.scenarios


def parse_options(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="broker bench", description="Benchmark the broker against a bare "
                                     "Starlette baseline and write BENCHMARKS.md.")
    parser.add_argument("--quick", action="store_true",
                        help="1 run, 2 s per figure, 50 latency samples, recovery on 20,000 messages")
    parser.add_argument("--duration", type=int, default=None, metavar="SECONDS",
                        help="seconds per wrk or consume run (default 10, quick 2)")
    parser.add_argument("--runs", type=int, default=None, help="runs of each figure; the median is reported "
                        "(default 3, quick 1)")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md", help="default: BENCHMARKS.md at "
                        "the repository root")
    parser.add_argument("--recovery-messages", type=int, default=None, metavar="N",
                        help="pending messages in the recovery journal (default 1,000,000, quick 20,000)")
    parser.add_argument("--skip-recovery", action="store_true", help="no recovery benchmark")
    parser.add_argument("--latency-samples", type=int, default=None,
                        help="long-poll deliveries measured (default 300, quick 50)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all)")
    args = parser.parse_args(argv)
    scenarios = tuple(s.strip() for s in args.scenarios.split(",") if s.strip())
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))} (choose from {', '.join(SCENARIOS)})")
    if args.skip_recovery:
        scenarios = tuple(s for s in scenarios if s != "recovery")
    quick = bool(args.quick)
    options = Options(
        duration=args.duration if args.duration is not None else (2 if quick else 10),
        runs=args.runs if args.runs is not None else (1 if quick else 3),
        output=args.output,
        recovery_messages=args.recovery_messages if args.recovery_messages is not None else (
            20_000 if quick else 1_000_000),
        scenarios=scenarios,
        quick=quick,
        latency_samples=args.latency_samples if args.latency_samples is not None else (50 if quick else 300),
        warmup=1 if quick else 2,
        command=_command(argv),
    )
    if options.duration < 1 or options.runs < 1 or options.recovery_messages < 1 or options.latency_samples < 1:
        parser.error("--duration, --runs, --recovery-messages and --latency-samples must be at least 1")
    return options


def _command(argv: Sequence[str] | None) -> str:
    """The command line as the user typed it (python -m bench ..., or broker bench ...)."""
    args = list(sys.argv[1:] if argv is None else argv)
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    prefix = ["broker", "bench"] if program == "broker" else ["python", "-m", "bench"]
    return shlex.join(prefix + args)


# -- wrk ----------------------------------------------------------------------------------------------------------


@dataclass
class WrkResult:
    requests: int
    seconds: float
    status_errors: int  # responses with a status >= 400
    socket_errors: int  # connect, read, write errors and timeouts
    p50_ms: float
    p99_ms: float
    max_ms: float
    client_cpu: float  # wrk's CPU share (1.0 = one full core)
    counts: dict[str, int] = field(default_factory=dict)  # what the script counted itself (consume_ack.lua)

    @property
    def ok_per_s(self) -> float:
        return (self.requests - self.status_errors) / self.seconds if self.seconds else 0.0

    @property
    def errors(self) -> int:
        return self.status_errors + self.socket_errors


def run_wrk(url: str, body_file: Path | None, token: str, connections: int, duration: int,
            script: Path = PUBLISH_SCRIPT, env: dict[str, str] | None = None) -> WrkResult:
    command = ["wrk", "-t", "1", "-c", str(connections), "-d", f"{duration}s", "--timeout", WRK_TIMEOUT,
               "-s", str(script), url]
    env = {**os.environ, "BENCH_TOKEN": token, "BENCH_BODY_FILE": str(body_file or ""), **(env or {})}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=duration + 60, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH_RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}")
    data = json.loads(lines[-1].removeprefix("BENCH_RESULT "))
    seconds = data["duration_us"] / 1e6
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return WrkResult(
        requests=data["requests"], seconds=seconds, status_errors=data["status_errors"],
        socket_errors=data["connect_errors"] + data["read_errors"] + data["write_errors"] + data["timeouts"],
        p50_ms=data["p50_us"] / 1000, p99_ms=data["p99_us"] / 1000, max_ms=data["max_us"] / 1000,
        client_cpu=cpu / seconds if seconds else 0.0,
        counts={name: int(data[name]) for name in COUNTED if name in data},
    )


# -- results ------------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One figure from one run."""

    rate: float  # req/s or msg/s (successful ones); for latency, the number of samples
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: int = 0
    ratio: float | None = None  # rate / the baseline's req/s measured in the same run
    client_cpu: float | None = None  # the load generator's CPU share (1.0 = one core)
    note: str = ""


@dataclass
class Machine:
    nproc: int
    cpu_model: str
    memory_bytes: int
    kernel: str
    cpu_busy_before: float  # percent of all CPUs busy in a 1 s sample before the benchmark started
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    versions: dict[str, str] = field(default_factory=dict)
    other_cpu_seconds: float | None = None  # CPU time used during the benchmark by processes not its own
    wall_seconds: float = 0.0


class CpuAccount:
    """System-wide busy CPU time during the benchmark, minus what the benchmark's own processes used (itself and
    every child it waited for, with their children): the rest is other work that ran on the machine meanwhile."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.busy = self._busy()
        self.ours = self._ours()

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return float(sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0)
                     - getattr(t, "guest_nice", 0.0))

    @staticmethod
    def _ours() -> float:
        me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime

    def finish(self, machine: Machine) -> None:
        machine.wall_seconds = time.perf_counter() - self.started
        machine.other_cpu_seconds = max(0.0, (self._busy() - self.busy) - (self._ours() - self.ours))


@dataclass
class Results:
    options: Options
    machine: Machine
    started: datetime
    finished: datetime | None = None
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    rss_peak: dict[str, list[int]] = field(default_factory=dict)  # broker config -> peak RSS per run
    rss_idle: dict[str, list[int]] = field(default_factory=dict)  # broker config -> RSS once ready
    recovery: RecoveryResult | None = None
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # configurations that could not be measured, and why

    def add(self, key: str, sample: Sample) -> None:
        self.samples.setdefault(key, []).append(sample)


def machine_info() -> Machine:
    model = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    busy = psutil.cpu_percent(interval=1.0)
    return Machine(nproc=os.cpu_count() or 0, cpu_model=model, memory_bytes=psutil.virtual_memory().total,
                   kernel=platform.release(), cpu_busy_before=busy, load_before=os.getloadavg(),
                   versions=_versions())


def _versions() -> dict[str, str]:
    versions = {"Python": platform.python_version()}
    for package in ("uvicorn", "uvloop", "httptools", "starlette", "orjson", "redis", "aiohttp", "broker"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    versions["broker source"] = _git_state()
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True, timeout=10, check=False)
    first = (wrk.stdout + wrk.stderr).strip().splitlines()
    versions["wrk"] = first[0].split(" [")[0].removeprefix("wrk ") if first else "unknown"
    return versions


def _git_state() -> str:
    """The commit measured, and whether the working tree had uncommitted changes."""
    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
        except OSError:
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "unknown (not a git checkout)"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"commit {commit}" + (" + uncommitted changes" if dirty else "")


# -- the benchmark ------------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, options: Options, workdir: Path) -> None:
        self.options = options
        self.workdir = workdir
        self.redis = RedisServer(workdir / "redis")
        self.results = Results(options, machine_info(), datetime.now(UTC))
        self.bodies = self._write_bodies()

    def say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def _write_bodies(self) -> dict[str, Path]:
        single = {"content": {"task": "resize", "image": "photos/2024/cat.jpg", "width": 640, "height": 480,
                              "user": 7}}
        batch = {"messages": [{"content": {**single["content"], "n": n}} for n in range(BATCH_SIZE)]}
        paths = {"single": self.workdir / "single.json", "batch": self.workdir / "batch.json"}
        paths["single"].write_bytes(orjson.dumps(single))
        paths["batch"].write_bytes(orjson.dumps(batch))
        return paths

    def run(self) -> Results:
        account = CpuAccount()
        self.redis.start()
        self.results.machine.versions["redis-server"] = self.redis.version()
        try:
            for run in range(self.options.runs):
                self.say(f"== run {run + 1}/{self.options.runs}")
                baseline = self.baseline_run()
                main = [s for s in ("publish", "batch", "consume", "latency") if self.options.wants(s)]
                configs = [("full-1w", 1, "full", main)] if main else []
                if self.options.wants("sync"):
                    configs.append(("normal-1w", 1, "normal", ["publish64", "batch"]))
                if self.options.wants("workers"):
                    configs.append(("full-2w", 2, "full", ["publish64", "batch"]))
                for config, workers, sync, figures in configs:
                    self.attempt(f"run {run + 1}, broker {config}", functools.partial(
                        self.broker_run, config, run, baseline, workers=workers, sync=sync, figures=figures))
            if self.options.wants("recovery"):
                self.say(f"== recovery on {self.options.recovery_messages:,} pending messages")
                self.attempt("recovery", self.recovery)
        finally:
            self.redis.stop()
        self.results.finished = datetime.now(UTC)
        self.results.machine.load_after = os.getloadavg()
        account.finish(self.results.machine)
        return self.results

    def attempt(self, what: str, step: Callable[[], None]) -> None:
        """Run one configuration; a failure is reported (and makes the exit status 1) without losing the rest."""
        try:
            step()
        except Exception as exc:  # a broken configuration must not cost the figures of the others
            message = f"{what} failed: {type(exc).__name__}: {str(exc)[:1500]}"
            self.results.failures.append(message)
            self.say(f"   ! {message}")

    def recovery(self) -> None:
        self.results.recovery = run_recovery(self.workdir, self.redis, self.options.recovery_messages, self.say)

    # -- the baseline ---------------------------------------------------------------------------------------------

    def baseline_run(self) -> dict[int, float]:
        server = BaselineServer(self.workdir / "baseline.log")
        server.start()
        try:
            assert server.rss is not None
            self.results.rss_idle.setdefault("baseline", []).append(server.rss.sample())
            url = server.url + "/queues/q/messages"
            run_wrk(url, self.bodies["single"], "", 16, self.options.warmup)
            rates = {}
            for c in CONCURRENCY:
                result = run_wrk(url, self.bodies["single"], "", c, self.options.duration)
                self._check(result, f"baseline c{c}")
                rates[c] = result.ok_per_s
                self.results.add(f"baseline.c{c}", Sample(result.ok_per_s, result.p50_ms, result.p99_ms,
                                                          result.errors))
                self.say(f"   baseline c{c}: {result.ok_per_s:,.0f} req/s, p50 {result.p50_ms:.2f} ms, "
                         f"p99 {result.p99_ms:.2f} ms")
            self.results.rss_peak.setdefault("baseline", []).append(server.rss.peak)
        finally:
            server.stop()
        return rates

    # -- a broker configuration -----------------------------------------------------------------------------------

    def broker_run(self, config: str, run: int, baseline: dict[int, float], *, workers: int, sync: str,
                   figures: list[str]) -> None:
        self.say(f"-- broker {config} (BROKER_JOURNAL_SYNC={sync}, BROKER_WORKERS={workers})")
        data = self.workdir / f"{config}-run{run + 1}"
        self.redis.flushall()
        broker = BrokerServer(data, self.redis.url, workers=workers, sync=sync)
        broker.start()
        try:
            self._measure(broker, config, run, baseline, figures)
        except Exception as exc:  # keep the broker's own account of what went wrong with the failure
            raise RuntimeError(f"{type(exc).__name__}: {exc}\n-- broker log:\n{broker.log_tail(3000)}") from exc
        finally:
            broker.stop()
            shutil.rmtree(data, ignore_errors=True)

    def _measure(self, broker: BrokerServer, config: str, run: int, baseline: dict[int, float],
                 figures: list[str]) -> None:
        assert broker.rss is not None
        self.results.rss_idle.setdefault(config, []).append(broker.rss.sample())
        token = broker.login()
        for queue in QUEUES.values():
            broker.create_queue(token, queue)
        warm = run_wrk(self._publish_url(broker, "warmup"), self.bodies["single"], token, 16,
                       self.options.warmup)
        if warm.requests == 0 or warm.status_errors == warm.requests:
            raise RuntimeError(f"broker {config} answers no publish with 201:\n{broker.log_tail()}")
        for figure in figures:
            if figure == "publish":
                for c in CONCURRENCY:
                    self.publish(broker, token, f"{config}.publish.c{c}", c, baseline[c])
            elif figure == "publish64":
                self.publish(broker, token, f"{config}.publish.c64", 64, baseline[64])
            elif figure == "batch":
                self.batch(broker, token, f"{config}.batch", baseline[BATCH_CONNECTIONS])
            elif figure == "consume":
                self.consume(broker, token, f"{config}.consume", baseline[CONSUMERS])
                self.consume(broker, token, f"{config}.consume_batch", baseline[CONSUMERS], CONSUME_MAX)
            elif figure == "latency":
                self.latency(broker, token, f"{config}.latency")
        self.results.rss_peak.setdefault(config, []).append(broker.rss.peak)

    def _publish_url(self, broker: BrokerServer, queue: str) -> str:
        return f"{broker.url}/queues/{QUEUES[queue]}/messages"

    def _check(self, result: WrkResult, what: str) -> None:
        if result.errors:
            note = (f"{what}: {result.status_errors} error responses and {result.socket_errors} socket "
                    f"errors/timeouts out of {result.requests} requests")
            self.results.notes.append(note)
            self.say(f"   ! {note}")

    def publish(self, broker: BrokerServer, token: str, key: str, connections: int, baseline: float) -> None:
        result = run_wrk(self._publish_url(broker, "publish"), self.bodies["single"], token, connections,
                         self.options.duration)
        self._check(result, key)
        sample = Sample(result.ok_per_s, result.p50_ms, result.p99_ms, result.errors,
                        result.ok_per_s / baseline if baseline else None)
        self.results.add(key, sample)
        self.say(f"   {key}: {sample.rate:,.0f} req/s ({_pct(sample.ratio)} of baseline), "
                 f"p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms")

    def batch(self, broker: BrokerServer, token: str, key: str, baseline: float) -> None:
        result = run_wrk(f"{self._publish_url(broker, 'batch')}/batch", self.bodies["batch"], token,
                         BATCH_CONNECTIONS, self.options.duration)
        self._check(result, key)
        rate = result.ok_per_s * BATCH_SIZE
        sample = Sample(rate, result.p50_ms, result.p99_ms, result.errors, rate / baseline if baseline else None)
        self.results.add(key, sample)
        self.say(f"   {key}: {rate:,.0f} msg/s ({result.ok_per_s:,.0f} req/s of {BATCH_SIZE}), "
                 f"p99 {result.p99_ms:.2f} ms")

    def consume(self, broker: BrokerServer, token: str, key: str, baseline: float, max_messages: int = 1) -> None:
        """Consume+ack cycles: one message per GET consume, or up to `max_messages` per POST consume (then as many
        acks, one request each)."""
        queue = QUEUES["consume"] if max_messages == 1 else QUEUES["consume_batch"]
        count = max(2_000, PREFILL_RATE * self.options.duration)
        seconds = clients.run(clients.prefill(broker.url, token, queue, count))
        self.say(f"   prefilled {count:,} messages in {seconds:.1f}s")
        url = f"{broker.url}/queues/{queue}/messages/consume?wait={CONSUME_WAIT}"
        result = run_wrk(url, None, token, CONSUMERS, self.options.duration, script=CONSUME_SCRIPT,
                         env={"BENCH_CONSUME_MAX": str(max_messages)})
        counts = result.counts
        rate = counts.get("acked", 0) / result.seconds if result.seconds else 0.0
        errors = result.errors + counts.get("refused", 0)
        note = ""
        if counts.get("empty"):
            note = f"the queue ran dry ({counts['empty']} empty polls): msg/s is a lower bound"
            self.results.notes.append(f"{key}: {note}")
        if errors:
            self.results.notes.append(f"{key}: {errors} error responses or socket errors")
        sample = Sample(rate, result.p50_ms, result.p99_ms, errors, rate / baseline if baseline else None,
                        result.client_cpu, note)
        self.results.add(key, sample)
        self.say(f"   {key}: {rate:,.0f} msg/s ({_pct(sample.ratio)} of baseline), wrk CPU {result.client_cpu:.0%}")

    def latency(self, broker: BrokerServer, token: str, key: str) -> None:
        result = clients.run(clients.longpoll_latency(broker.url, token, QUEUES["latency"],
                                                      samples=self.options.latency_samples,
                                                      consumers=LATENCY_CONSUMERS))
        if result.lost or result.errors:
            self.results.notes.append(f"{key}: {result.lost} messages not delivered within 10 s, "
                                      f"{result.errors} errors")
        sample = Sample(len(result.samples), result.p50_ms, result.p99_ms, result.errors,
                        client_cpu=result.client_cpu)
        self.results.add(key, sample)
        self.say(f"   {key}: {len(result.samples)} samples, p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms")


def _pct(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.0%}"


# -- entry point --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    from bench.report import summary_line, write_report

    options = parse_options(argv)
    if shutil.which("wrk") is None:
        print(f"broker bench: {INSTALL_WRK}", file=sys.stderr)
        return 2
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        print(f"broker bench: {INSTALL_AIOHTTP}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="broker-bench-") as tmp:
        bench = Bench(options, Path(tmp))
        results = bench.run()
    write_report(results, options.output)
    print(summary_line(results, options.output), flush=True)
    return 1 if results.failures else 0
