"""/metrics, /stats and /logs: what operators read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ApiClient, api_client

API_METRICS = {
    "broker_messages_published_total": "counter",
    "broker_messages_delivered_total": "counter",
    "broker_messages_acked_total": "counter",
    "broker_messages_nacked_total": "counter",
    "broker_messages_redelivered_total": "counter",
    "broker_messages_failed_total": "counter",
    "broker_queue_messages": "gauge",
    "broker_queue_oldest_pending_age_seconds": "gauge",
    "broker_message_processing_seconds": "histogram",
    "broker_http_requests_total": "counter",
    "broker_http_request_duration_seconds": "histogram",
    "broker_journal_commit_seconds": "histogram",
    "broker_journal_batch_size": "histogram",
    "broker_sse_clients": "gauge",
    "broker_redis_up": "gauge",
}


async def workload(client: ApiClient, headers: dict[str, str]) -> None:
    await client.post("/queues", json={"name": "obs"}, headers=headers)
    for n in range(5):
        await client.post("/queues/obs/messages", json={"content": n}, headers=headers)
    deliveries = (await client.post("/queues/obs/messages/consume", json={"max": 3}, headers=headers)).json()
    first, second, third = deliveries["messages"]
    await client.post(f"/messages/{first['id']}/ack", headers=headers)
    await client.post(f"/messages/{second['id']}/nack", json={"requeue": True}, headers=headers)
    await client.post(f"/messages/{third['id']}/nack", json={"reason": "bad"}, headers=headers)
    await client.get("/queues/obs/messages/consume", headers=headers)  # the requeued one: a redelivery


def samples(text: str) -> dict[str, Any]:
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return families


async def test_metrics_export_every_api_metric_with_its_type_and_true_counts(client: ApiClient) -> None:
    headers = await client.auth()
    await workload(client, headers)
    response = await client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    families = samples(response.text)
    for name, kind in API_METRICS.items():
        family = families.get(name.removesuffix("_total"))
        assert family is not None, f"{name} missing"
        assert family.type == kind, f"{name} is {family.type}, not {kind}"

    def value(name: str, **labels: str) -> float:
        return sum(s.value for family in families.values() for s in family.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    assert value("broker_messages_published_total", queue="obs") == 5
    assert value("broker_messages_delivered_total", queue="obs") == 4
    assert value("broker_messages_redelivered_total", queue="obs") == 1
    assert value("broker_messages_acked_total", queue="obs") == 1
    assert value("broker_messages_nacked_total", queue="obs") == 2
    assert value("broker_messages_failed_total", queue="obs") == 1
    assert value("broker_message_processing_seconds_count", queue="obs") == 1
    assert value("broker_queue_messages", queue="obs", status="pending") == 2
    assert value("broker_queue_messages", queue="obs", status="processing") == 1
    assert value("broker_queue_messages", queue="obs", status="failed") == 1
    assert value("broker_queue_oldest_pending_age_seconds", queue="obs") >= 0
    assert value("broker_redis_up") == 1
    assert value("broker_journal_commit_seconds_count") > 0
    assert value("broker_http_requests_total", method="POST", route="/queues/{queue}/messages", status="201") == 5
    assert "process_resident_memory_bytes" in families
    routes = {s.labels["route"] for s in families["broker_http_requests"].samples}
    assert not any(str(i) in r for r in routes for i in range(10)), f"ids in route labels: {routes}"


async def test_metrics_can_be_guarded_by_a_token(settings: Any) -> None:
    async with api_client(settings, metrics_token="scrape-secret") as (client, _):
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/metrics", headers={"Authorization": "Bearer wrong"})).status_code == 401
        ok = await client.get("/metrics", headers={"Authorization": "Bearer scrape-secret"})
        assert ok.status_code == 200 and "broker_redis_up" in ok.text


STATS_FIELDS = {
    "start_time", "uptime_seconds", "uptime_human", "requests_total", "requests_by_route", "requests_by_status",
    "queues_total", "messages_total", "messages_pending", "messages_processing", "messages_processed",
    "messages_failed", "last_error", "last_error_timestamp", "system", "broker_specific",
}


async def test_stats_has_every_seed_field_with_true_figures(client: ApiClient) -> None:
    headers = await client.auth()
    assert (await client.get("/stats")).status_code == 401
    await workload(client, headers)
    stats = (await client.get("/stats", headers=headers)).json()
    assert STATS_FIELDS <= set(stats)
    assert stats["queues_total"] == 1 and stats["messages_total"] == 5
    assert stats["messages_pending"] == 2 and stats["messages_processing"] == 1
    assert stats["messages_processed"] == 1 and stats["messages_failed"] == 1
    assert stats["requests_total"] > 10 and stats["requests_by_status"]["201"] >= 6
    assert set(stats["system"]) == {"cpu", "memory", "disk", "process"}
    assert {"rss_bytes", "threads", "open_files"} <= set(stats["system"]["process"])
    assert stats["broker_specific"]["journal"]["sync"] == "full"


@pytest.fixture
def log_file(settings: Any) -> Path:
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    path = settings.log_dir / "broker.log"
    path.write_text("".join(f'{{"n": {n}}}\n' for n in range(1, 101)))
    return Path(path)


async def test_logs_are_listed_and_read_by_range_or_tail_for_admins_only(client: ApiClient, log_file: Path) -> None:
    admin = await client.auth()
    listing = (await client.get("/logs", headers=admin)).json()
    assert [f["name"] for f in listing["files"]] == ["broker.log"]
    tail = (await client.get("/logs/broker.log?tail=3", headers=admin)).json()
    assert [line["number"] for line in tail["lines"]] == [98, 99, 100] and tail["total_lines"] == 100
    ranged = (await client.get("/logs/broker.log?start=10&end=12", headers=admin)).json()
    assert [line["text"] for line in ranged["lines"]] == ['{"n": 10}', '{"n": 11}', '{"n": 12}']

    await client.post("/users", json={"username": "c", "password": "password-1", "roles": ["consumer"]},
                      headers=admin)
    consumer = await client.auth("c", "password-1")
    assert (await client.get("/logs", headers=consumer)).status_code == 403
    assert (await client.get("/logs/broker.log", headers=consumer)).status_code == 403


@pytest.mark.parametrize(
    "path",
    ["/logs/...", "/logs/%2e%2e", "/logs/..%2fjwt_secret", "/logs/%2e%2e%2fjwt_secret", "/logs/.hidden",
     "/logs/..%5cjwt_secret", "/logs/%252e%252e%252fjwt_secret", "/logs//etc/passwd", "/logs/..%00",
     "/logs/journal.sqlite3"],
)
async def test_the_log_viewer_never_leaves_its_directory(client: ApiClient, log_file: Path, path: str) -> None:
    admin = await client.auth()
    response = await client.get(path, headers=admin)
    assert response.status_code in (400, 404), response.text
    assert "secret" not in response.text.lower() or response.json()["code"] in ("invalid_filename", "log_not_found",
                                                                                 "not_found")


async def test_an_event_id_with_non_ascii_digits_is_422(client: ApiClient) -> None:
    headers = await client.auth()
    response = await client.get("/events", params={"since": "²"}, headers=headers)
    assert response.status_code == 422
