"""Every Redis key the broker uses, built in one place.

A queue's keys carry its name in a hash tag (`broker:{jobs}:ready`) so that they share one Redis Cluster slot
and a Lua script may touch all of them. Queue names are validated (no braces), so the tag is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

PREFIX = "broker"
EPOCH_KEY = f"{PREFIX}:epoch"
RECONCILE_LOCK_KEY = f"{PREFIX}:reconcile-lock"
EVENTS_CHANNEL = f"{PREFIX}:events"  # pub/sub: "new events up to <seq> are in the journal"
QUEUE_KEY_PATTERN = f"{PREFIX}:{{*}}:*"


@dataclass(frozen=True)
class QueueKeys:
    """The Redis structures of one queue: ids only, never bodies."""

    ready: str
    processing: str
    leases: str
    delayed: str

    def all(self) -> tuple[str, str, str, str]:
        return (self.ready, self.processing, self.leases, self.delayed)


@lru_cache(maxsize=4096)
def queue_keys(queue: str) -> QueueKeys:
    tag = f"{PREFIX}:{{{queue}}}"
    return QueueKeys(f"{tag}:ready", f"{tag}:processing", f"{tag}:leases", f"{tag}:delayed")


def rebuild_keys(queue: str) -> QueueKeys:
    """Scratch keys a reconciliation fills before swapping them in (same slot as the queue)."""
    tag = f"{PREFIX}:{{{queue}}}:rebuild"
    return QueueKeys(f"{tag}:ready", f"{tag}:processing", f"{tag}:leases", f"{tag}:delayed")


def queue_of_key(key: str) -> str | None:
    """The queue name inside a key built here, or None for a key that is not a queue's."""
    start, end = key.find("{"), key.find("}")
    if not key.startswith(PREFIX + ":{") or end < start:
        return None
    return key[start + 1 : end]
