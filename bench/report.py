"""BENCHMARKS.md and the one-line summary, from the results of bench/runner.py."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.runner import BATCH_CONNECTIONS, BATCH_SIZE, CONSUME_MAX, CONSUMERS, LATENCY_CONSUMERS, Results, Sample

MiB = 1024 * 1024
BOUNDED_REBUILD_GROWTH = 64 * MiB  # "bounded memory": the broker's RSS grows by less than this while rebuilding
TARGET_RECOVERY_MESSAGES = 1_000_000

# Section titles; the smoke test checks that each appears.
SECTIONS = (
    "## Targets",
    "## Single publish",
    "## Batch publish",
    "## Consume + ack",
    "## Publish-to-delivery latency (long-poll)",
    "## Journal sync: full vs normal",
    "## Workers: 2 vs 1",
    "## Recovery",
    "## Broker memory (RSS)",
    "## Notes",
)
TARGET_NAMES = (
    "durable single publish (full, c64)",
    "batch publish",
    "consume+ack",
    "p99 single publish at c16",
    "long-poll delivery p50",
    "rebuild of 1M pending",
    "two workers vs one on publish",
)


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


@dataclass
class Figure:
    """The median over runs of one figure, and the runs' values."""

    samples: list[Sample]

    @property
    def rate(self) -> float | None:
        return _median([s.rate for s in self.samples])

    @property
    def p50(self) -> float | None:
        return _median([s.p50_ms for s in self.samples])

    @property
    def p99(self) -> float | None:
        return _median([s.p99_ms for s in self.samples])

    @property
    def ratio(self) -> float | None:
        return _median([s.ratio for s in self.samples])

    @property
    def errors(self) -> int:
        return sum(s.errors for s in self.samples)

    @property
    def client_cpu(self) -> float | None:
        return _median([s.client_cpu for s in self.samples])

    def runs(self, fmt: Callable[[float], str] = lambda v: f"{v:,.0f}") -> str:
        return " / ".join(fmt(s.rate) for s in self.samples)


def figure(results: Results, key: str) -> Figure | None:
    samples = results.samples.get(key)
    return Figure(samples) if samples else None


def paired_ratio(results: Results, numerator: str, denominator: str) -> float | None:
    """The median over runs of numerator/denominator, each pair from the same run."""
    top, bottom = results.samples.get(numerator, []), results.samples.get(denominator, [])
    ratios: list[float | None] = [a.rate / b.rate for a, b in zip(top, bottom, strict=False) if b.rate]
    return _median(ratios)


# -- formatting -------------------------------------------------------------------------------------------------


def _n(value: float | None, digits: int = 0, unit: str = "") -> str:
    if value is None:
        return "not run"
    return f"{value:,.{digits}f}{unit}"


def _ms(value: float | None) -> str:
    return "not run" if value is None else f"{value:.2f} ms"


def _pct(value: float | None) -> str:
    return "not run" if value is None else f"{value:.0%}"


def _mib(value: int | None) -> str:
    return "not run" if value is None else f"{value / MiB:,.0f} MiB"


def _s(value: float | None, digits: int = 2) -> str:
    return "not measured" if value is None else f"{value:.{digits}f} s"


# -- targets ----------------------------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    threshold: str
    measured: str
    met: bool | None  # None: not measured (or not at the target's size)

    @property
    def verdict(self) -> str:
        return "not measured" if self.met is None else ("met" if self.met else "**not met**")


def targets(results: Results) -> list[Target]:
    out: list[Target] = []
    publish = figure(results, "full-1w.publish.c64")
    ratio = publish.ratio if publish else None
    out.append(Target(TARGET_NAMES[0], ">= 30% of baseline req/s",
                      f"{_pct(ratio)} ({_n(publish.rate if publish else None)} req/s)",
                      None if ratio is None else ratio >= 0.30))
    batch = figure(results, "full-1w.batch")
    rate = batch.rate if batch else None
    out.append(Target(TARGET_NAMES[1], ">= 50,000 msg/s", f"{_n(rate)} msg/s",
                      None if rate is None else rate >= 50_000))
    consume = figure(results, "full-1w.consume")
    ratio = consume.ratio if consume else None
    out.append(Target(TARGET_NAMES[2], ">= 20% of baseline req/s, in msg/s",
                      f"{_pct(ratio)} ({_n(consume.rate if consume else None)} msg/s)",
                      None if ratio is None else ratio >= 0.20))
    c16 = figure(results, "full-1w.publish.c16")
    p99 = c16.p99 if c16 else None
    out.append(Target(TARGET_NAMES[3], "< 15 ms", _ms(p99), None if p99 is None else p99 < 15))
    latency = figure(results, "full-1w.latency")
    p50 = latency.p50 if latency else None
    out.append(Target(TARGET_NAMES[4], "< 5 ms", _ms(p50), None if p50 is None else p50 < 5))
    rec = results.recovery
    if rec is None:
        out.append(Target(TARGET_NAMES[5], "< 20 s, bounded memory", "not run", None))
    else:
        measured = (f"{rec.rebuild_seconds:.1f} s for {rec.messages:,} (RSS +{rec.rebuild_rss_growth / MiB:.0f} MiB "
                    "while rebuilding)")
        fits = rec.rebuild_seconds < 20 and rec.rebuild_rss_growth < BOUNDED_REBUILD_GROWTH and rec.check_exit == 0
        if rec.messages < TARGET_RECOVERY_MESSAGES:
            measured += f"; the target is for {TARGET_RECOVERY_MESSAGES:,}"
        out.append(Target(TARGET_NAMES[5], "< 20 s, bounded memory", measured,
                          fits if rec.messages >= TARGET_RECOVERY_MESSAGES else None))
    ratio = paired_ratio(results, "full-2w.publish.c64", "full-1w.publish.c64")
    out.append(Target(TARGET_NAMES[6], ">= 1.5x (publish c64)", "not run" if ratio is None else f"{ratio:.2f}x",
                      None if ratio is None else ratio >= 1.5))
    return out


# -- the document ------------------------------------------------------------------------------------------------


def write_report(results: Results, path: Path) -> None:
    path.write_text(render(results))


def render(results: Results) -> str:
    o, m = results.options, results.machine
    lines: list[str] = []
    add = lines.append
    add("# Benchmarks")
    add("")
    add("Written by the benchmark harness in `bench/` (`python -m bench`, or `broker bench`); re-run it to refresh "
        "this file. Every figure is the median of the runs; each ratio is to the **baseline** (a bare Starlette "
        "app that parses the same JSON body with orjson and answers 201, served by uvicorn exactly like the broker: "
        "1 worker, uvloop, httptools) measured in the same run, and the ratio's median is over runs.")
    add("")
    add("| | |")
    add("|---|---|")
    add(f"| command | `{o.command}` |")
    finished = results.finished or results.started
    add(f"| date | {results.started:%Y-%m-%d %H:%M} - {finished:%H:%M} UTC |")
    add(f"| machine | {m.nproc} CPUs (`nproc`), {m.cpu_model}, {m.memory_bytes / 1024**3:.1f} GiB RAM, "
        f"Linux {m.kernel} |")
    other = ""
    if m.other_cpu_seconds is not None and m.wall_seconds:
        other = (f"; other processes used {m.other_cpu_seconds:,.0f} CPU-seconds during the "
                 f"{m.wall_seconds:,.0f} s of the benchmark (on average {m.other_cpu_seconds / m.wall_seconds:.0%} "
                 "of one CPU)")
    add(f"| other load | CPU {m.cpu_busy_before:.0f}% busy in the 1 s before the start; load average "
        f"{m.load_before[0]:.2f} at the start, {m.load_after[0]:.2f} at the end{other} |")
    add(f"| software | {', '.join(f'{k} {v}' for k, v in m.versions.items())} |")
    add(f"| method | {o.runs} run(s); {o.duration} s per figure; wrk `-t 1 -c N --timeout 10s` with "
        "`bench/wrk/publish.lua` and `bench/wrk/consume_ack.lua`; aiohttp for prefilling and long-poll; own "
        "redis-server on loopback "
        "(no persistence); a fresh broker data directory per configuration and run |")
    add("")
    add(f"The load generators, the broker, Redis and the baseline share this machine's {m.nproc} CPUs, and other "
        "work may have been running on it at the same time (see *other load*): the ratios, measured back to back "
        "in each run, are steadier than the absolute figures.")
    add("")

    add("## Targets")
    add("")
    add("| target | threshold | measured | |")
    add("|---|---|---|---|")
    for t in targets(results):
        add(f"| {t.name} | {t.threshold} | {t.measured} | {t.verdict} |")
    add("")

    add("## Single publish")
    add("")
    add("`POST /queues/{q}/messages` with a ~100-byte JSON message, bearer token, `BROKER_JOURNAL_SYNC=full`, "
        "1 worker: every 201 is fsynced (group commit). Concurrency = wrk connections.")
    add("")
    add("| concurrency | broker req/s | p50 | p99 | baseline req/s | baseline p50 | baseline p99 | ratio | runs |")
    add("|---|---|---|---|---|---|---|---|---|")
    for c in (1, 16, 64):
        b = figure(results, f"baseline.c{c}")
        f = figure(results, f"full-1w.publish.c{c}")
        add(f"| c{c} | {_n(f.rate if f else None)} | {_ms(f.p50 if f else None)} | {_ms(f.p99 if f else None)} | "
            f"{_n(b.rate if b else None)} | {_ms(b.p50 if b else None)} | {_ms(b.p99 if b else None)} | "
            f"{_pct(f.ratio if f else None)} | {f.runs() if f else '-'} |")
    add("")

    add("## Batch publish")
    add("")
    add(f"`POST /queues/{{q}}/messages/batch` with {BATCH_SIZE} messages per request, {BATCH_CONNECTIONS} "
        f"connections. Ratio: msg/s over the baseline's req/s at c{BATCH_CONNECTIONS}.")
    add("")
    add("| configuration | msg/s | p50 (request) | p99 (request) | ratio | runs |")
    add("|---|---|---|---|---|---|")
    for label, key in (("sync full, 1 worker", "full-1w.batch"), ("sync normal, 1 worker", "normal-1w.batch"),
                       ("sync full, 2 workers", "full-2w.batch")):
        f = figure(results, key)
        add(f"| {label} | {_n(f.rate if f else None)} | {_ms(f.p50 if f else None)} | "
            f"{_ms(f.p99 if f else None)} | {_pct(f.ratio if f else None)} | {f.runs() if f else '-'} |")
    add("")

    add("## Consume + ack")
    add("")
    add(f"{CONSUMERS} wrk connections (`bench/wrk/consume_ack.lua`), each looping `GET "
        "/queues/{q}/messages/consume?wait=1` then `POST /messages/{id}/ack` with the lease id from that response, "
        "on a prefilled queue (sync full, 1 worker). One message = one acked delivery = 2 requests; the latencies "
        f"are per request (consumes and acks alike). Ratio: msg/s over the baseline's req/s at c{CONSUMERS}. "
        f"The second row is the same loop with `POST /queues/{{q}}/messages/consume` "
        f"`{{\"max\": {CONSUME_MAX}, \"wait\": 1}}` instead: up to {CONSUME_MAX} deliveries per consume, each "
        "still acked by a request of its own (the target is judged on the first row).")
    add("")
    add("| consume | msg/s | request p50 | request p99 | ratio | wrk CPU | runs |")
    add("|---|---|---|---|---|---|---|")
    for label, key in (("`GET`, 1 message", "full-1w.consume"),
                       (f"`POST`, max {CONSUME_MAX}", "full-1w.consume_batch")):
        f = figure(results, key)
        add(f"| {label} | {_n(f.rate if f else None)} | {_ms(f.p50 if f else None)} | "
            f"{_ms(f.p99 if f else None)} | {_pct(f.ratio if f else None)} | "
            f"{_pct(f.client_cpu if f else None)} of a core | {f.runs() if f else '-'} |")
    add("")

    add("## Publish-to-delivery latency (long-poll)")
    add("")
    add(f"{LATENCY_CONSUMERS} consumers long-poll `GET /queues/{{q}}/messages/consume?wait=20`; a publisher sends "
        f"one message every 20 ms with its send time in the content ({o.latency_samples} measured per run, after "
        "10 warm-up messages). Latency = delivery received - publish sent, one clock (same process): a durable "
        "publish, the hand-off to the blocked consumer, the delivery's journal record and both HTTP round trips.")
    add("")
    add("| p50 | p99 | samples per run |")
    add("|---|---|---|")
    f = figure(results, "full-1w.latency")
    add(f"| {_ms(f.p50 if f else None)} | {_ms(f.p99 if f else None)} | {f.runs() if f else '-'} |")
    add("")

    add("## Journal sync: full vs normal")
    add("")
    add("Single publish at c64 and batch publish, 1 worker. `normal` may lose the last commits on power loss.")
    add("")
    add("| figure | full | normal | normal / full |")
    add("|---|---|---|---|")
    for label, suffix, unit in (("publish c64 (req/s)", "publish.c64", ""), ("batch (msg/s)", "batch", "")):
        full, normal = figure(results, f"full-1w.{suffix}"), figure(results, f"normal-1w.{suffix}")
        ratio = paired_ratio(results, f"normal-1w.{suffix}", f"full-1w.{suffix}")
        add(f"| {label} | {_n(full.rate if full else None)}{unit} | {_n(normal.rate if normal else None)}{unit} | "
            f"{'not run' if ratio is None else f'{ratio:.2f}x'} |")
    f = figure(results, "normal-1w.publish.c64")
    add("")
    add(f"With `normal`, publish c64: p50 {_ms(f.p50 if f else None)}, p99 {_ms(f.p99 if f else None)}, "
        f"{_pct(f.ratio if f else None)} of baseline.")
    add("")

    add("## Workers: 2 vs 1")
    add("")
    add("`BROKER_WORKERS=2` (uvicorn worker processes sharing the journal and Redis), sync full.")
    add("")
    add("| figure | 1 worker | 2 workers | 2 / 1 | 2 workers, ratio to baseline |")
    add("|---|---|---|---|---|")
    for label, suffix in (("publish c64 (req/s)", "publish.c64"), ("batch (msg/s)", "batch")):
        one, two = figure(results, f"full-1w.{suffix}"), figure(results, f"full-2w.{suffix}")
        ratio = paired_ratio(results, f"full-2w.{suffix}", f"full-1w.{suffix}")
        add(f"| {label} | {_n(one.rate if one else None)} | {_n(two.rate if two else None)} | "
            f"{'not run' if ratio is None else f'{ratio:.2f}x'} | {_pct(two.ratio if two else None)} |")
    f = figure(results, "full-2w.publish.c64")
    add("")
    add(f"With 2 workers, publish c64: p50 {_ms(f.p50 if f else None)}, p99 {_ms(f.p99 if f else None)}.")
    add("")

    add("## Recovery")
    add("")
    rec = results.recovery
    if rec is None:
        add("not run")
    else:
        add(f"A journal of {rec.messages:,} pending messages in one queue, built with sqlite3 by copying rows the "
            f"broker wrote ({rec.build_seconds:.1f} s, {rec.journal_bytes / MiB:,.0f} MiB on disk), and an empty "
            "Redis. The broker logs its own rebuild time; the wall-clock figures add process start and, for the "
            "rebuild after FLUSHALL, noticing the loss (checked every 1 s).")
        add("")
        add("| figure | value |")
        add("|---|---|")
        add(f"| startup to /health/ready, small journal | {_s(rec.startup_empty_seconds)} |")
        add(f"| startup to /health/ready, {rec.messages:,} pending (includes the rebuild) | "
            f"{_s(rec.startup_seconds)} |")
        add(f"| rebuild during that startup (broker's log) | {_s(rec.startup_rebuild_seconds)} |")
        add(f"| FLUSHALL under the running broker -> all {rec.messages:,} ids ready again | "
            f"{_s(rec.rebuild_seconds)} |")
        add(f"| that rebuild (broker's log) | {_s(rec.rebuild_internal_seconds)} |")
        add(f"| `broker journal check` afterwards | exit {rec.check_exit} ({rec.check_seconds:.1f} s) |")
        add(f"| broker RSS: ready on the small journal | {_mib(rec.rss_empty)} |")
        add(f"| broker RSS: peak during startup on the big journal | {_mib(rec.rss_peak_startup)} |")
        add(f"| broker RSS: before FLUSHALL / peak during the rebuild | {_mib(rec.rss_before_rebuild)} / "
            f"{_mib(rec.rss_peak_rebuild)} (+{rec.rebuild_rss_growth / MiB:.0f} MiB) |")
        add(f"| Redis used_memory with the ids | {_mib(rec.redis_used_memory)} |")
    add("")

    add("## Broker memory (RSS)")
    add("")
    add("Resident memory of the whole process tree (with 2 workers: uvicorn's supervisor and its workers), "
        "sampled every 0.1 s with psutil; the peak is the highest over each configuration's load, the largest run "
        "shown.")
    add("")
    add("| process | once ready | peak under load |")
    add("|---|---|---|")
    for label, key in (("baseline", "baseline"), ("broker, sync full, 1 worker", "full-1w"),
                       ("broker, sync normal, 1 worker", "normal-1w"), ("broker, sync full, 2 workers", "full-2w")):
        idle, peak = results.rss_idle.get(key), results.rss_peak.get(key)
        add(f"| {label} | {_mib(max(idle) if idle else None)} | {_mib(max(peak) if peak else None)} |")
    add("")

    add("## Notes")
    add("")
    notes = [f"**Failed**: {failure}" for failure in results.failures] + list(results.notes)
    for key in ("full-1w.consume", "full-1w.consume_batch"):
        f = figure(results, key)
        if f and f.client_cpu is not None and f.client_cpu > 0.85:
            notes.append(f"{key}: wrk used {f.client_cpu:.0%} of a core, so it may itself limit the figure on "
                         "this machine.")
    if not notes:
        notes.append("No errors: every request the figures count was answered 2xx.")
    for note in notes:
        add(f"- {note}")
    add("")
    return "\n".join(lines)


def summary_line(results: Results, output: Path) -> str:
    parts: list[str] = []
    f = figure(results, "full-1w.publish.c64")
    if f:
        parts.append(f"publish c64 {_n(f.rate)} req/s ({_pct(f.ratio)} of baseline)")
    f = figure(results, "full-1w.publish.c16")
    if f:
        parts.append(f"p99 c16 {_ms(f.p99)}")
    f = figure(results, "full-1w.batch")
    if f:
        parts.append(f"batch {_n(f.rate)} msg/s")
    f = figure(results, "full-1w.consume")
    if f:
        parts.append(f"consume+ack {_n(f.rate)} msg/s ({_pct(f.ratio)})")
    f = figure(results, "full-1w.latency")
    if f:
        parts.append(f"long-poll p50 {_ms(f.p50)}")
    ratio = paired_ratio(results, "full-2w.publish.c64", "full-1w.publish.c64")
    if ratio is not None:
        parts.append(f"2 workers {ratio:.2f}x")
    if results.recovery:
        parts.append(f"rebuild {results.recovery.messages:,} in {results.recovery.rebuild_seconds:.1f} s")
    judged = [t for t in targets(results) if t.met is not None]
    parts.append(f"targets met {sum(t.met is True for t in judged)}/{len(judged)}")
    if results.failures:
        parts.append(f"{len(results.failures)} configuration(s) FAILED, see Notes")
    return f"bench: {' | '.join(parts)} -> {output}"
