"""Operator routes: Prometheus /metrics, the seed's /stats, and the admin log viewer (/logs)."""

from __future__ import annotations

import re
import secrets
import time
from collections import deque
from pathlib import Path
from typing import Any

import psutil
from starlette.requests import Request
from starlette.responses import Response

from app import __version__
from app.api.common import JSONResponse, integer, requires, state
from app.errors import BadRequest, NotFound, Unauthorized
from app.metrics import Snapshot
from app.models import MessageStatus, Principal, Role, iso

LOG_NAME = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,200}$")
MAX_LOG_LINES = 5000


async def metrics(request: Request) -> Response:
    app = state(request)
    expected = app["settings"].metrics_token
    if expected:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), expected.encode()):
            raise Unauthorized("This /metrics needs 'Authorization: Bearer <BROKER_METRICS_TOKEN>'")
    broker = app["broker"]
    snapshot = Snapshot(await broker.list_queue_stats(), broker.recovery.redis_up, time.time())
    return Response(app["metrics"].render(snapshot), media_type="text/plain; version=0.0.4; charset=utf-8")


@requires()
async def stats(request: Request, principal: Principal) -> Response:
    app = state(request)
    broker, tally = app["broker"], app["metrics"].tally
    queues = await broker.list_queue_stats()
    totals = {status.value: sum(q.counts.get(status.value, 0) for q in queues) for status in MessageStatus}
    uptime = time.time() - app["started_at"]
    journal_error = broker.journal.stats.last_error
    return JSONResponse({
        "start_time": iso(app["started_at"]),
        "uptime_seconds": round(uptime, 3),
        "uptime_human": _human(uptime),
        "requests_total": tally.requests_total,
        "requests_by_route": dict(tally.by_route),
        "requests_by_status": {str(k): v for k, v in tally.by_status.items()},
        "queues_total": len(queues),
        "messages_total": sum(totals.values()),
        "messages_pending": totals["pending"],
        "messages_delayed": totals["delayed"],
        "messages_processing": totals["processing"],
        "messages_processed": totals["processed"],
        "messages_failed": totals["failed"],
        "last_error": tally.last_error or journal_error,
        "last_error_timestamp": iso(tally.last_error_at),
        "system": _system(app["settings"].data_dir),
        "broker_specific": {
            "name": "broker", "version": __version__,
            "storage": "SQLite journal (source of truth) + Redis lists (hand-off index)",
            "journal": {"path": str(app["settings"].journal_path), "sync": app["settings"].journal_sync,
                        "commits": broker.journal.stats.commits, "operations": broker.journal.stats.operations,
                        "healthy": broker.journal.healthy},
            "redis": {"up": broker.recovery.redis_up, "embedded": not app["settings"].redis_url,
                      "rebuilds": broker.recovery.reconciles,
                      "maxmemory_policy": broker.recovery.eviction_policy or "unknown"},
            "workers": app["settings"].workers,
            "note": "request figures are this worker process's",
        },
    })


@requires(Role.ADMIN)
async def list_logs(request: Request, principal: Principal) -> Response:
    directory = state(request)["settings"].log_dir
    files = sorted(p for p in directory.iterdir() if p.is_file()) if directory.is_dir() else []
    return JSONResponse({"files": [
        {"name": p.name, "size": p.stat().st_size, "modified": iso(p.stat().st_mtime)} for p in files
    ]})


@requires(Role.ADMIN)
async def read_log(request: Request, principal: Principal) -> Response:
    """Lines of one log file: `start`/`end` (1-based, inclusive) or the last `tail` lines."""
    path = _log_file(state(request)["settings"].log_dir, request.path_params["filename"])
    params = dict(request.query_params)
    start = integer(params, "start", None, minimum=1)
    end = integer(params, "end", None, minimum=1)
    tail = integer(params, "tail", None, minimum=1, maximum=MAX_LOG_LINES)
    numbered: deque[tuple[int, str]] = deque(maxlen=tail or MAX_LOG_LINES)
    total = 0
    with path.open(encoding="utf-8", errors="replace") as file:
        for total, line in enumerate(file, start=1):
            if tail is None and ((start and total < start) or (end and total > end)):
                continue
            if tail is not None or len(numbered) < MAX_LOG_LINES:  # keep counting to the end for total_lines
                numbered.append((total, line.rstrip("\n")))
    return JSONResponse({"filename": path.name, "total_lines": total,
                         "lines": [{"number": n, "text": text} for n, text in numbered]})


def _log_file(directory: Path, name: str) -> Path:
    """A file directly in the log directory, or 404; never a path outside it."""
    if not LOG_NAME.fullmatch(name):
        raise BadRequest("A log file name is letters, digits, '.', '_' and '-' only", code="invalid_filename")
    root = directory.resolve()
    path = (root / name).resolve()
    if path.parent != root or not path.is_file():
        raise NotFound(f"No log file '{name}'", code="log_not_found")
    return path


def _system(data_dir: Path) -> dict[str, Any]:
    process = psutil.Process()
    with process.oneshot():
        memory = process.memory_info()
        proc = {"pid": process.pid, "rss_bytes": memory.rss, "cpu_percent": process.cpu_percent(interval=None),
                "threads": process.num_threads(), "open_files": len(process.open_files())}
    virtual = psutil.virtual_memory()
    disk = psutil.disk_usage(str(data_dir))
    return {
        "cpu": {"count": psutil.cpu_count(), "percent": psutil.cpu_percent(interval=None),
                "load_average": list(psutil.getloadavg())},
        "memory": {"total_bytes": virtual.total, "available_bytes": virtual.available, "percent": virtual.percent},
        "disk": {"path": str(data_dir), "total_bytes": disk.total, "free_bytes": disk.free, "percent": disk.percent},
        "process": proc,
    }


def _human(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h {minutes}m {secs}s"
