"""A history checker for fault tests (RELIABILITY.md, "The checker": Jepsen's total-queue idea plus broker rules).

A test records every publish it attempts (keyed by a unique `uid` it puts in the message content), the outcome of
each publish, every delivery it receives and every ack it sends. `History.check()` then computes:

- `lost`: published-ok uids never delivered (G1: must be empty);
- `unexpected`: delivered uids whose publish was never attempted (G2: must be empty);
- `failed_but_delivered`: uids whose publish got a definite rejection yet were delivered (G2: must be empty);
- `duplicated`: uids delivered more than once (G3: within the fault's budget, zero in a fault-free run);
- `redelivered_after_ack`: uids delivered again after an ack of theirs got 200 (G3: must be empty).
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

# The definite rejections of RELIABILITY.md G2: the broker says it did not, and will not, publish.
DEFINITE_FAILURES = frozenset({400, 401, 403, 404, 409, 413, 422, 429})


class Outcome(enum.Enum):
    OK = "ok"  # 2xx: the broker says it happened
    FAIL = "fail"  # a definite 4xx: the broker says it did not happen
    UNKNOWN = "unknown"  # 5xx, timeout, connection error: it may or may not have happened


def classify(result: httpx.Response | BaseException) -> Outcome:
    """The outcome of one HTTP call: its response, or the exception it raised."""
    if isinstance(result, BaseException):
        return Outcome.UNKNOWN
    if 200 <= result.status_code < 300:
        return Outcome.OK
    if result.status_code in DEFINITE_FAILURES:
        return Outcome.FAIL
    return Outcome.UNKNOWN


@dataclass(frozen=True)
class Delivered:
    uid: str
    message_id: int
    lease_id: str
    delivery_count: int
    order: int  # position in the history (the order the test saw things happen)


@dataclass
class CheckResult:
    lost: list[str]
    unexpected: list[str]
    failed_but_delivered: list[str]
    duplicated: dict[str, int]
    redelivered_after_ack: list[str]
    counts: dict[str, int]

    def summary(self) -> str:
        return (
            f"counts={self.counts} lost={_sample(self.lost)} unexpected={_sample(self.unexpected)} "
            f"failed_but_delivered={_sample(self.failed_but_delivered)} "
            f"duplicated={_sample(sorted(self.duplicated))} redelivered_after_ack={_sample(self.redelivered_after_ack)}"
        )


@dataclass
class History:
    """What a fault test saw: publishes (attempted and their outcome), deliveries and acks, in order."""

    attempted: set[str] = field(default_factory=set)
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    message_ids: dict[str, int] = field(default_factory=dict)  # uid -> message_id, from 2xx publishes
    statuses: Counter[str] = field(default_factory=Counter)  # publish status code (or exception name) -> n
    deliveries: list[Delivered] = field(default_factory=list)
    acked: dict[str, tuple[str, int]] = field(default_factory=dict)  # uid -> (lease_id, order) of a 200 ack
    refused_consumes: list[str] = field(default_factory=list)  # consume answers other than 200, for the report
    _order: int = 0

    def _next(self) -> int:
        self._order += 1
        return self._order

    # -- recording -------------------------------------------------------------------------------------------

    def invoke_publish(self, uid: str) -> None:
        """Call before sending the publish: from here on the uid may legitimately be delivered."""
        if uid in self.attempted:
            raise ValueError(f"uid {uid!r} was attempted twice; each publish needs its own uid")
        self.attempted.add(uid)
        self._next()

    def complete_publish(self, uid: str, result: httpx.Response | BaseException) -> Outcome:
        outcome = classify(result)
        self.outcomes[uid] = outcome
        if isinstance(result, BaseException):
            self.statuses[type(result).__name__] += 1
        else:
            self.statuses[str(result.status_code)] += 1
            if outcome is Outcome.OK:
                self.message_ids[uid] = int(result.json()["message_id"])
        self._next()
        return outcome

    def deliver(self, delivery: dict[str, Any]) -> Delivered:
        """Record one Delivery as the API returns it; its content must be {"uid": ...} (else uid is '?<id>')."""
        content = delivery.get("content")
        uid = content.get("uid") if isinstance(content, dict) else None
        record = Delivered(
            uid=str(uid) if uid is not None else f"?{delivery.get('id')}",
            message_id=int(delivery["id"]),
            lease_id=str(delivery.get("lease_id")),
            delivery_count=int(delivery.get("delivery_count", 0)),
            order=self._next(),
        )
        self.deliveries.append(record)
        return record

    def ack(self, delivered: Delivered, result: httpx.Response | BaseException) -> Outcome:
        outcome = classify(result)
        if outcome is Outcome.OK:
            self.acked[delivered.uid] = (delivered.lease_id, self._next())
        return outcome

    # -- reading ---------------------------------------------------------------------------------------------

    @property
    def ok(self) -> set[str]:
        return {uid for uid, o in self.outcomes.items() if o is Outcome.OK}

    def delivered_uids(self) -> Counter[str]:
        return Counter(d.uid for d in self.deliveries)

    def check(self) -> CheckResult:
        delivered = self.delivered_uids()
        failed = {uid for uid, o in self.outcomes.items() if o is Outcome.FAIL}
        after_ack = sorted({
            d.uid for d in self.deliveries
            if d.uid in self.acked and d.order > self.acked[d.uid][1] and d.lease_id != self.acked[d.uid][0]
        })
        by_outcome = Counter(o.value for o in self.outcomes.values())
        return CheckResult(
            lost=sorted(self.ok - delivered.keys()),
            unexpected=sorted(delivered.keys() - self.attempted),
            failed_but_delivered=sorted(failed & delivered.keys()),
            duplicated={uid: n for uid, n in sorted(delivered.items()) if n > 1},
            redelivered_after_ack=after_ack,
            counts={
                "attempted": len(self.attempted),
                "ok": by_outcome["ok"],
                "fail": by_outcome["fail"],
                "unknown": by_outcome["unknown"] + len(self.attempted) - len(self.outcomes),
                "delivered": len(self.deliveries),
                "distinct_delivered": len(delivered),
                "acked": len(self.acked),
            },
        )


def _sample(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{f' (+{len(items) - limit} more)' if len(items) > limit else ''}]"
