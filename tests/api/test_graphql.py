"""POST /graphql: the broker through GraphQL alone, with REST's roles, codes and answers; its limits."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from app.settings import Settings
from tests.conftest import ApiClient, api_client

PUBLISH = """mutation($q: String!, $content: JSON, $key: String, $delay: Float) {
  publish(queue: $q, content: $content, headers: {trace: "t1"}, idempotencyKey: $key, delaySeconds: $delay) {
    messageId status duplicate
  }
}"""
CONSUME = """mutation($q: String!, $max: Int) {
  consume(queue: $q, max: $max, visibilityTimeout: 30) {
    id messageId content headers status deliveryCount leaseId leaseExpiresAt retrievedAt
  }
}"""


async def gql(client: ApiClient, headers: dict[str, str] | None, query: str, **variables: Any) -> dict[str, Any]:
    response = await client.post("/graphql", json={"query": query, "variables": variables}, headers=headers)
    assert response.status_code in (200, 400), response.text
    body: dict[str, Any] = response.json()
    assert ("data" in body) == (response.status_code == 200), body
    return body


def codes(body: dict[str, Any]) -> list[str]:
    return [e["extensions"]["code"] for e in body.get("errors", [])]


def snake(data: Any) -> Any:
    """GraphQL's camelCase keys as REST spells them."""
    if isinstance(data, dict):
        return {re.sub(r"(?<!^)([A-Z])", r"_\1", k).lower(): snake(v) for k, v in data.items()}
    if isinstance(data, list):
        return [snake(v) for v in data]
    return data


@contextlib.asynccontextmanager
async def client_with(settings: Settings, **changes: Any) -> AsyncIterator[ApiClient]:
    """Like the `client` fixture, for an app with other settings."""
    async with api_client(settings, **changes) as (api, _):
        yield api


@pytest.fixture
async def admin(client: ApiClient) -> dict[str, str]:
    headers = await client.auth()
    created = await gql(client, headers, 'mutation { createQueue(name: "jobs", maxDeliveries: 3) { name } }')
    assert created == {"data": {"createQueue": {"name": "jobs"}}}
    return headers


async def user(client: ApiClient, admin: dict[str, str], name: str, *roles: str) -> dict[str, str]:
    body = {"username": name, "password": "password-1", "roles": list(roles)}
    assert (await client.post("/users", json=body, headers=admin)).status_code == 201
    return await client.auth(name, "password-1")


async def test_queue_publish_consume_ack_nack_and_history_through_graphql_alone(
    client: ApiClient, admin: dict[str, str]
) -> None:
    contents = [{"order": 1, "items": ["a", None]}, "text"]
    published = [(await gql(client, admin, PUBLISH, q="jobs", content=c))["data"]["publish"] for c in contents]
    assert [p["status"] for p in published] == ["pending", "pending"] and not any(p["duplicate"] for p in published)
    ids = [p["messageId"] for p in published]
    assert all(isinstance(i, int) for i in ids)

    deliveries = (await gql(client, admin, CONSUME, q="jobs", max=5))["data"]["consume"]
    assert [d["id"] for d in deliveries] == [d["messageId"] for d in deliveries] == ids
    assert [d["content"] for d in deliveries] == contents
    assert all(d["headers"] == {"trace": "t1"} and d["status"] == "processing" and d["deliveryCount"] == 1
               and d["leaseId"] and d["leaseExpiresAt"].endswith("Z") for d in deliveries)
    first, second = deliveries

    ack = 'mutation($id: Long!, $lease: String) { ack(messageId: $id, leaseId: $lease) { status message { id } } }'
    acked = await gql(client, admin, ack, id=first["id"], lease=first["leaseId"])
    assert acked == {"data": {"ack": {"status": "processed", "message": {"id": first["id"]}}}}
    nack = """mutation($id: Long!, $lease: String) {
      nack(messageId: $id, leaseId: $lease, requeue: false, reason: "bad input") {
        status deadLetterQueue message { status lastError }
      }
    }"""
    nacked = (await gql(client, admin, nack, id=second["id"], lease=second["leaseId"]))["data"]["nack"]
    assert nacked == {"status": "failed", "deadLetterQueue": None,
                      "message": {"status": "failed", "lastError": "bad input"}}

    for message_id in ids:
        history = await gql(client, admin, "query($id: Long!) { messageHistory(id: $id) { seq ts type queue "
                                           "messageId actor data } }", id=message_id)
        rest = (await client.get(f"/messages/{message_id}/history", headers=admin)).json()["events"]
        assert snake(history["data"]["messageHistory"]) == rest
    types = await gql(client, admin, "query($id: Long!) { message(id: $id) { history { type } } }", id=ids[0])
    assert [e["type"] for e in types["data"]["message"]["history"]] == [
        "message.published", "message.delivered", "message.acked"]


async def test_graphql_shows_queues_and_messages_as_rest_does(client: ApiClient, admin: dict[str, str]) -> None:
    message_id = (await gql(client, admin, PUBLISH, q="jobs", content=[1, 2.5, "x"]))["data"]["publish"]["messageId"]
    queue_fields = ("id name createdAt updatedAt messageCount oldestPendingAgeSeconds counts { pending delayed "
                    "processing processed failed } settings { visibilityTimeout maxDeliveries deadLetterQueue "
                    "maxLength retentionSeconds }")
    got = (await gql(client, admin, f'{{ queue(name: "jobs") {{ {queue_fields} }} queues {{ name }} }}'))["data"]
    rest = (await client.get("/queues/jobs", headers=admin)).json()
    got["queue"].pop("oldestPendingAgeSeconds"), rest.pop("oldest_pending_age_seconds")  # a moment apart
    assert snake(got["queue"]) == rest and got["queues"] == [{"name": "jobs"}]

    message_fields = ("id queue queueId content headers status deliveryCount createdAt updatedAt availableAt "
                      "lastError deadLetteredFrom")
    one = await gql(client, admin, f"query($id: Long!) {{ message(id: $id) {{ {message_fields} }} }}", id=message_id)
    assert snake(one["data"]["message"]) == (await client.get(f"/messages/{message_id}", headers=admin)).json()
    page = await gql(client, admin, f'{{ messages(queue: "jobs", status: pending, limit: 1) {{ nextAfterId '
                                    f'messages {{ {message_fields} }} }} }}')
    assert snake(page["data"]["messages"]) == (
        await client.get("/queues/jobs/messages?status=pending&limit=1", headers=admin)).json()


async def test_content_of_any_json_type_round_trips_and_is_required(client: ApiClient, admin: dict[str, str]) -> None:
    contents: list[Any] = [None, 42, 1.5, True, [1, "two"], {"nested": {"a": [1, {"b": None}]}}, "ünï €"]
    for content in contents:
        assert (await gql(client, admin, PUBLISH, q="jobs", content=content))["data"]["publish"]["status"] == "pending"
    literal = 'mutation { publish(queue: "jobs", content: {a: [1, "x", null], b: 2.5}) { status } }'
    assert (await gql(client, admin, literal))["data"]["publish"]["status"] == "pending"
    delivered = (await gql(client, admin, CONSUME, q="jobs", max=100))["data"]["consume"]
    assert [d["content"] for d in delivered] == [*contents, {"a": [1, "x", None], "b": 2.5}]

    missing = await gql(client, admin, 'mutation { publish(queue: "jobs") { status } }')
    assert missing["data"] == {"publish": None} and codes(missing) == ["validation_error"]
    assert missing["errors"][0]["extensions"]["errors"] == [{"field": "content", "message": "is required"}]


async def test_a_repeated_idempotency_key_answers_the_original_message(
    client: ApiClient, admin: dict[str, str]
) -> None:
    first = (await gql(client, admin, PUBLISH, q="jobs", content="a", key="k-1"))["data"]["publish"]
    again = (await gql(client, admin, PUBLISH, q="jobs", content="a", key="k-1"))["data"]["publish"]
    assert again == {**first, "duplicate": True}


async def test_roles_are_those_of_rest(client: ApiClient, admin: dict[str, str]) -> None:
    producer = await user(client, admin, "p1", "producer")
    consumer = await user(client, admin, "c1", "consumer")
    assert (await gql(client, producer, PUBLISH, q="jobs", content="x"))["data"]["publish"]["status"] == "pending"

    refused = await gql(client, producer, CONSUME, q="jobs")
    assert refused["data"] == {"consume": None} and codes(refused) == ["forbidden"]
    assert refused["errors"][0]["message"] == "This call needs the consumer role"
    assert refused["errors"][0]["path"] == ["consume"]
    assert codes(await gql(client, consumer, PUBLISH, q="jobs", content="x")) == ["forbidden"]
    for who in (producer, consumer):
        assert codes(await gql(client, who, 'mutation { deleteQueue(name: "jobs") }')) == ["forbidden"]
        assert codes(await gql(client, who, 'mutation { createQueue(name: "x") { id } }')) == ["forbidden"]
        read = await gql(client, who, '{ queues { name } queue(name: "jobs") { counts { pending } } }')
        assert "errors" not in read and read["data"]["queue"]["counts"]["pending"] == 1
    assert len((await gql(client, consumer, CONSUME, q="jobs"))["data"]["consume"]) == 1


async def test_an_anonymous_or_badly_authenticated_request_is_401_and_changes_nothing(
    client: ApiClient, admin: dict[str, str]
) -> None:
    delete = {"query": 'mutation { deleteQueue(name: "jobs") }'}
    for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"Authorization": "Basic YWRtaW46eA=="}):
        response = await client.post("/graphql", json=delete, headers=headers)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert response.json()["code"] in ("unauthorized", "invalid_token") and response.json()["detail"]
    anonymous_bad_body = await client.post("/graphql", content=b"{not json", headers={"content-type": "text/plain"})
    assert anonymous_bad_body.status_code == 401
    assert (await client.get("/queues/jobs", headers=admin)).status_code == 200


async def test_errors_carry_rest_codes_and_camel_case_fields(client: ApiClient, admin: dict[str, str]) -> None:
    unknown = await gql(client, admin, '{ queue(name: "nope") { id } }')
    assert unknown["data"] == {"queue": None} and codes(unknown) == ["queue_not_found"]
    assert unknown["errors"][0]["message"] == "Queue 'nope' not found"
    assert codes(await gql(client, admin, '{ queue(name: ".bad") { id } }')) == ["invalid_queue_name"]
    assert codes(await gql(client, admin, 'mutation { createQueue(name: "jobs") { id } }')) == ["queue_exists"]
    assert codes(await gql(client, admin, "{ message(id: 0) { id } }")) == ["message_not_found"]
    assert codes(await gql(client, admin, "{ messageHistory(id: 99999999999) { seq } }")) == ["message_not_found"]

    invalid = await gql(client, admin, PUBLISH, q="jobs", content="x", delay=-1)
    assert codes(invalid) == ["validation_error"]
    assert invalid["errors"][0]["extensions"]["errors"] == [{"field": "delaySeconds", "message": "must be between "
                                                             "0 and 2.592e+06"}]
    assert invalid["errors"][0]["message"].startswith("delaySeconds: ")
    bad_setting = await gql(client, admin, 'mutation { updateQueue(name: "jobs", visibilityTimeout: 0) { id } }')
    assert bad_setting["errors"][0]["extensions"]["errors"][0]["field"] == "visibilityTimeout"

    await gql(client, admin, PUBLISH, q="jobs", content="x")
    [delivery] = (await gql(client, admin, CONSUME, q="jobs"))["data"]["consume"]
    stale = 'mutation($id: Long!) { ack(messageId: $id, leaseId: "stale") { status } }'
    assert codes(await gql(client, admin, stale, id=delivery["id"])) == ["stale_lease"]

    not_graphql = await gql(client, admin, "{ queues { nam } }")
    assert codes(not_graphql) == ["invalid_query"]
    assert "Did you mean" not in str(not_graphql), "no schema hints while introspection is off"
    too_big = await gql(client, admin, "query($id: Long!) { message(id: $id) { id } }", id=2**63)
    assert codes(too_big) == ["invalid_query"]
    for body in (unknown, invalid, not_graphql, too_big):
        assert "exception" not in str(body) and "Traceback" not in str(body)


async def test_an_unexpected_failure_is_reported_without_its_details_and_logged_with_them(
    client: ApiClient, admin: dict[str, str], broker: Any, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    message_id = (await gql(client, admin, PUBLISH, q="jobs", content="x"))["data"]["publish"]["messageId"]

    async def broken(*args: Any) -> Any:
        raise RuntimeError("secret internals at /srv/broker")

    monkeypatch.setattr(broker, "history", broken)
    body = await gql(client, admin, "query($id: Long!) { message(id: $id) { id history { seq } } }", id=message_id)
    assert body["data"] == {"message": None} and codes(body) == ["internal_error"]
    assert body["errors"][0]["message"] == "Internal error; it was logged"
    assert "secret" not in str(body) and "Traceback" not in str(body) and "exception" not in str(body)
    [logged] = [r for r in caplog.records if r.name == "app.graphql.errors"]
    assert logged.levelname == "ERROR" and logged.exc_info and "secret internals" in caplog.text

    caplog.clear()
    assert codes(await gql(client, admin, '{ queue(name: "nope") { id } }')) == ["queue_not_found"]
    assert codes(await gql(client, admin, "{ nope }")) == ["invalid_query"]
    assert not [r for r in caplog.records if r.name.startswith("app.graphql")], "client errors are not faults"


async def test_queue_administration(client: ApiClient, admin: dict[str, str]) -> None:
    await gql(client, admin, 'mutation { createQueue(name: "dlq") { id } }')
    updated = await gql(client, admin, 'mutation { updateQueue(name: "jobs", deadLetterQueue: "dlq", maxLength: 5) '
                                       "{ settings { deadLetterQueue maxLength maxDeliveries } } }")
    assert updated["data"]["updateQueue"]["settings"] == {"deadLetterQueue": "dlq", "maxLength": 5, "maxDeliveries": 3}
    for _ in range(2):
        await gql(client, admin, PUBLISH, q="jobs", content="x")
    assert (await gql(client, admin, 'mutation { purgeQueue(name: "jobs") { purged } }'))["data"] == {
        "purgeQueue": {"purged": 2}}
    assert (await gql(client, admin, 'mutation { redriveQueue(name: "dlq") { moved } }'))["data"] == {
        "redriveQueue": {"moved": 0}}
    assert (await gql(client, admin, 'mutation { deleteQueue(name: "jobs") }'))["data"] == {"deleteQueue": True}
    assert codes(await gql(client, admin, 'mutation { deleteQueue(name: "jobs") }')) == ["queue_not_found"]
    stats = (await gql(client, admin, "{ stats { version queuesTotal messagesTotal redisUp journalHealthy "
                                      "startTime uptimeSeconds requestsTotal } }"))["data"]["stats"]
    assert stats["queuesTotal"] == 1 and stats["redisUp"] and stats["journalHealthy"]


async def test_over_deep_over_costly_and_oversized_queries_are_refused(
    client: ApiClient, admin: dict[str, str]
) -> None:
    deep = "{ message(id: 1) { history { message { history { message { history { message { id } } } } } } } }"
    refused = await gql(client, admin, deep)
    assert "data" not in refused and codes(refused) == ["query_too_deep"]
    through_fragments = """{ message(id: 1) { ...A } }
      fragment A on Message { history { ...B } }
      fragment B on Event { message { history { message { history { message { id } } } } } }"""
    assert codes(await gql(client, admin, through_fragments)) == ["query_too_deep"]
    assert "errors" not in await gql(client, admin, '{ messages(queue: "jobs") { messages { history { '
                                                    "message { id } } } } }")

    costly = '{ messages(queue: "jobs", limit: 500) { messages { id history { seq } } } }'
    assert codes(await gql(client, admin, costly)) == ["query_too_expensive"]
    by_variable = "query($n: Int) { messages(queue: \"jobs\", limit: $n) { messages { id history { seq } } } }"
    assert codes(await gql(client, admin, by_variable, n=500)) == ["query_too_expensive"]
    assert "errors" not in await gql(client, admin, by_variable, n=50)
    aliases = " ".join(f"q{n}: queues {{ name }}" for n in range(300))
    assert codes(await gql(client, admin, f"{{ {aliases} }}")) == ["query_too_expensive"]

    huge = "{ " + " ".join(f"a{n}: __typename" for n in range(3000)) + " }"
    assert codes(await gql(client, admin, huge)) == ["invalid_query"]


INTROSPECTION = "{ __schema { queryType { name } } }"


async def test_introspection_is_refused_by_default(client: ApiClient, admin: dict[str, str]) -> None:
    refused = await gql(client, admin, INTROSPECTION)
    assert "data" not in refused and codes(refused) == ["introspection_disabled"]
    assert codes(await gql(client, admin, '{ __type(name: "Queue") { name } }')) == ["introspection_disabled"]
    assert (await gql(client, admin, "{ __typename }"))["data"] == {"__typename": "Query"}
    explorer = await client.get("/graphql")
    assert explorer.status_code == 405 and explorer.json()["code"] == "method_not_allowed"


async def test_introspection_and_graphiql_when_enabled(settings: Settings) -> None:
    async with client_with(settings, graphql_introspection=True, graphiql=True) as api:
        admin = await api.auth()
        allowed = await gql(api, admin, INTROSPECTION)
        assert allowed == {"data": {"__schema": {"queryType": {"name": "Query"}}}}
        full = await gql(api, admin, "{ __schema { types { name fields { name type { name ofType { name ofType { "
                                     "name ofType { name } } } } } } } }")
        assert "errors" not in full, "introspection's own nesting is not held against the depth limit"
        page = await api.get("/graphql")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "graphiql" in page.text.lower()
