"""Domain values: frozen dataclasses and str Enums shared by every layer."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any


def iso(ts: float | None) -> str | None:
    """A unix timestamp as ISO-8601 UTC with microseconds, e.g. 2026-11-22T07:30:11.594416Z.

    The same text as `datetime.fromtimestamp(ts, UTC).strftime(...)` (microseconds rounded half to even), with the
    date and time of each second formatted once: a delivery carries five timestamps, and formatting them through
    datetime was a twentieth of a consume's CPU."""
    if ts is None:
        return None
    if ts < 0:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    seconds = int(ts)
    micros = round((ts - seconds) * 1_000_000)
    if micros >= 1_000_000:
        seconds, micros = seconds + 1, micros - 1_000_000
    prefix = _SECONDS.get(seconds)
    if prefix is None:
        if len(_SECONDS) >= 4096:
            _SECONDS.clear()
        prefix = _SECONDS[seconds] = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(seconds))
    return f"{prefix}{micros:06d}Z"


_SECONDS: dict[int, str] = {}  # unix second -> its "YYYY-MM-DDTHH:MM:SS." (iso)


MAX_ID = 2**63 - 1  # message, queue and event ids are SQLite INTEGERs


def is_valid_id(value: int) -> bool:
    """Whether `value` could name a message at all (another number names none, and would not bind)."""
    return 0 < value <= MAX_ID


QUEUE_NAME_RE = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,254}$")


class MessageStatus(StrEnum):
    PENDING = "pending"
    DELAYED = "delayed"
    PROCESSING = "processing"
    PROCESSED = "processed"
    FAILED = "failed"



class Role(StrEnum):
    ADMIN = "admin"
    PRODUCER = "producer"
    CONSUMER = "consumer"


class EventType(StrEnum):
    QUEUE_CREATED = "queue.created"
    QUEUE_UPDATED = "queue.updated"
    QUEUE_DELETED = "queue.deleted"
    QUEUE_PURGED = "queue.purged"
    MESSAGE_PUBLISHED = "message.published"
    MESSAGE_DELIVERED = "message.delivered"
    MESSAGE_ACKED = "message.acked"
    MESSAGE_NACKED = "message.nacked"
    MESSAGE_REQUEUED = "message.requeued"
    MESSAGE_LEASE_EXPIRED = "message.lease_expired"
    MESSAGE_FAILED = "message.failed"
    MESSAGE_DEAD_LETTERED = "message.dead_lettered"
    MESSAGE_REDRIVEN = "message.redriven"
    MESSAGE_DELETED = "message.deleted"
    MESSAGE_LEASE_EXTENDED = "message.lease_extended"


@dataclass(frozen=True)
class QueueSettings:
    visibility_timeout: float = 30.0
    max_deliveries: int = 10
    dead_letter_queue: str | None = None
    max_length: int | None = None
    retention_seconds: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "visibility_timeout": self.visibility_timeout,
            "max_deliveries": self.max_deliveries,
            "dead_letter_queue": self.dead_letter_queue,
            "max_length": self.max_length,
            "retention_seconds": self.retention_seconds,
        }


@dataclass(frozen=True)
class Queue:
    id: int
    name: str
    created_at: float
    updated_at: float
    settings: QueueSettings


@dataclass(frozen=True)
class QueueStats:
    """A queue with its per-status counts (kept by the journal writer, no scan)."""

    queue: Queue
    counts: dict[str, int]
    oldest_pending_at: float | None

    @property
    def message_count(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True)
class Message:
    """A message's current state. `content` is its JSON text exactly as published."""

    id: int
    queue: str
    queue_id: int
    content: str
    headers: dict[str, str]
    status: MessageStatus
    delivery_count: int
    created_at: float
    updated_at: float
    available_at: float
    last_error: str | None = None
    dead_lettered_from: str | None = None
    lease_id: str | None = None
    lease_expires_at: float | None = None


@dataclass(frozen=True)
class Delivery:
    """A message handed to one consumer under one lease."""

    message: Message
    lease_id: str
    lease_expires_at: float
    retrieved_at: float


@dataclass(frozen=True)
class Event:
    seq: int
    ts: float
    type: EventType
    queue: str | None
    message_id: int | None
    actor: str | None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class User:
    username: str
    roles: frozenset[Role]
    created_at: float


@dataclass(frozen=True)
class Principal:
    """Who is calling: a verified access token's subject and roles."""

    username: str
    roles: frozenset[Role]

    def has_any(self, *roles: Role) -> bool:
        return Role.ADMIN in self.roles or any(role in self.roles for role in roles)


@dataclass(frozen=True)
class NewMessage:
    """A publish request after validation: content is already serialized JSON."""

    content: str
    headers: dict[str, str] = field(default_factory=dict)
    delay_seconds: float = 0.0
    idempotency_key: str | None = None


@dataclass(frozen=True)
class PublishResult:
    message_id: int
    status: MessageStatus | None  # None: a duplicate whose message has since been deleted
    duplicate: bool = False
    available_at: float = 0.0
