"""Logging: readable lines on the console, JSON lines in a rotated file in the data directory."""

from __future__ import annotations

import logging
import logging.handlers
import os
import time

import orjson

from app.settings import Settings

LOG_FILE = "broker.log"
ACCESS_FIELDS = ("method", "route", "status", "duration_ms", "user")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ACCESS_FIELDS:
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def configure_logging(settings: Settings) -> None:
    level = settings.log_level.upper()
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handlers: list[logging.Handler] = [console]
    try:
        settings.log_dir.mkdir(parents=True, exist_ok=True)
        # One file per worker process when there are several (rotation is not safe across processes).
        name = LOG_FILE if settings.workers == 1 else f"broker-{os.getpid()}.log"
        file = logging.handlers.RotatingFileHandler(
            settings.log_dir / name, maxBytes=10 * 1024 * 1024, backupCount=5, encoding="utf-8"
        )
        file.setFormatter(JsonFormatter())
        handlers.append(file)
    except OSError as exc:  # a log volume that cannot be written never stops the broker
        logging.getLogger(__name__).warning("cannot write logs to %s: %s", settings.log_dir, exc)
    logging.basicConfig(level=level, handlers=handlers, force=True)
