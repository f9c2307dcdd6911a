"""Logging: readable lines on the console, JSON lines in a rotated file in the data directory."""

from __future__ import annotations

import logging
import logging.handlers
import time

import orjson

from app.settings import Settings

LOG_FILE = "broker.log"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
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
        file = logging.handlers.RotatingFileHandler(
            settings.log_dir / LOG_FILE, maxBytes=10 * 1024 * 1024, backupCount=5, encoding="utf-8"
        )
        file.setFormatter(JsonFormatter())
        handlers.append(file)
    except OSError as exc:  # a log volume that cannot be written never stops the broker
        logging.getLogger(__name__).warning("cannot write logs to %s: %s", settings.log_dir, exc)
    logging.basicConfig(level=level, handlers=handlers, force=True)
