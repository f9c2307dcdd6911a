"""Domain values to the JSON shapes of API.md. Message content is passed through as the JSON it was sent as."""

from __future__ import annotations

from typing import Any

import orjson

from app.models import Delivery, Event, Message, QueueStats, User, iso


def queue(stats: QueueStats, now: float) -> dict[str, Any]:
    q = stats.queue
    oldest = stats.oldest_pending_at
    return {
        "id": q.id,
        "name": q.name,
        "created_at": iso(q.created_at),
        "updated_at": iso(q.updated_at),
        "message_count": stats.message_count,
        "settings": q.settings.as_dict(),
        "counts": stats.counts,
        "oldest_pending_age_seconds": round(max(0.0, now - oldest), 3) if oldest is not None else None,
    }


def message(m: Message) -> dict[str, Any]:
    return {
        "id": m.id,
        "queue": m.queue,
        "queue_id": m.queue_id,
        "content": orjson.Fragment(m.content),
        "headers": m.headers,
        "status": m.status.value,
        "delivery_count": m.delivery_count,
        "created_at": iso(m.created_at),
        "updated_at": iso(m.updated_at),
        "available_at": iso(m.available_at),
        "last_error": m.last_error,
        "dead_lettered_from": m.dead_lettered_from,
    }


def delivery(d: Delivery) -> dict[str, Any]:
    return {
        **message(d.message),
        "message_id": d.message.id,
        "retrieved_at": iso(d.retrieved_at),
        "lease_id": d.lease_id,
        "lease_expires_at": iso(d.lease_expires_at),
    }


def event(e: Event) -> dict[str, Any]:
    return {
        "seq": e.seq,
        "ts": iso(e.ts),
        "type": e.type.value,
        "queue": e.queue,
        "message_id": e.message_id,
        "actor": e.actor,
        "data": e.data,
    }


def user(u: User) -> dict[str, Any]:
    return {"username": u.username, "roles": sorted(r.value for r in u.roles), "created_at": iso(u.created_at)}
