"""The history checker itself: each anomaly it must find, and a clean history that has none."""

from __future__ import annotations

import httpx
import pytest

from tests.faults.checker import History, Outcome, classify

pytestmark = pytest.mark.slow

REQUEST = httpx.Request("POST", "http://broker/queues/q/messages")


def published(message_id: int) -> httpx.Response:
    return httpx.Response(201, json={"message_id": message_id}, request=REQUEST)


def status(code: int) -> httpx.Response:
    return httpx.Response(code, json={"detail": "x", "code": "x"}, request=REQUEST)


def delivery(uid: str, message_id: int, lease: str = "l1", count: int = 1) -> dict[str, object]:
    return {"id": message_id, "content": {"uid": uid}, "lease_id": lease, "delivery_count": count}


@pytest.mark.parametrize(
    ("result", "outcome"),
    [
        (published(1), Outcome.OK),
        (httpx.Response(200, json={}, request=REQUEST), Outcome.OK),
        *[(status(code), Outcome.FAIL) for code in (400, 401, 403, 404, 409, 413, 422, 429)],
        (status(500), Outcome.UNKNOWN),
        (status(503), Outcome.UNKNOWN),
        (status(408), Outcome.UNKNOWN),
        (httpx.ConnectError("refused"), Outcome.UNKNOWN),
        (httpx.ReadTimeout("slow"), Outcome.UNKNOWN),
        (httpx.RemoteProtocolError("closed"), Outcome.UNKNOWN),
    ],
)
def test_classify(result: httpx.Response | BaseException, outcome: Outcome) -> None:
    assert classify(result) is outcome


def test_a_clean_history_has_no_anomaly() -> None:
    history = History()
    for n in range(3):
        history.invoke_publish(f"u{n}")
        history.complete_publish(f"u{n}", published(n + 1))
    for n in range(3):
        history.ack(history.deliver(delivery(f"u{n}", n + 1)), httpx.Response(200, request=REQUEST))
    result = history.check()
    assert (result.lost, result.unexpected, result.failed_but_delivered, result.duplicated,
            result.redelivered_after_ack) == ([], [], [], {}, [])
    assert result.counts == {"attempted": 3, "ok": 3, "fail": 0, "unknown": 0, "delivered": 3,
                             "distinct_delivered": 3, "acked": 3}


def test_finds_each_anomaly() -> None:
    history = History()
    for uid, result in [("ok-lost", published(1)), ("ok-twice", published(2)), ("rejected", status(404)),
                        ("unknown", httpx.ConnectError("refused")), ("acked", published(4))]:
        history.invoke_publish(uid)
        history.complete_publish(uid, result)
    history.invoke_publish("never-answered")  # in flight at the end: counted as unknown

    history.deliver(delivery("ok-twice", 2, "a"))
    history.deliver(delivery("ok-twice", 2, "b", count=2))
    history.deliver(delivery("rejected", 3))
    history.deliver(delivery("unknown", 5))  # an unknown publish may or may not be delivered: neither is wrong
    history.deliver(delivery("phantom", 99))
    history.deliver({"id": 100, "content": "no uid", "lease_id": "x", "delivery_count": 1})
    first = history.deliver(delivery("acked", 4, "a"))
    history.ack(first, httpx.Response(200, request=REQUEST))
    history.deliver(delivery("acked", 4, "c", count=2))

    result = history.check()
    assert result.lost == ["ok-lost"]
    assert result.unexpected == ["?100", "phantom"]
    assert result.failed_but_delivered == ["rejected"]
    assert result.duplicated == {"acked": 2, "ok-twice": 2}
    assert result.redelivered_after_ack == ["acked"]
    assert result.counts["unknown"] == 2 and result.counts["fail"] == 1 and result.counts["ok"] == 3
    assert "ok-lost" in result.summary()


def test_a_failed_ack_does_not_count_and_uids_are_single_use() -> None:
    history = History()
    history.invoke_publish("u")
    history.complete_publish("u", published(1))
    first = history.deliver(delivery("u", 1, "a"))
    assert history.ack(first, status(409)) is Outcome.FAIL
    history.deliver(delivery("u", 1, "b", count=2))  # redelivered after a refused ack: allowed
    assert history.check().redelivered_after_ack == []
    with pytest.raises(ValueError, match="attempted twice"):
        history.invoke_publish("u")
