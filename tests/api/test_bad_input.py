"""Bad input gets the documented 4xx JSON error ({"detail", "code"}), never a 500."""

from __future__ import annotations

import pytest

from tests.conftest import ApiClient


@pytest.fixture
async def admin(client: ApiClient) -> dict[str, str]:
    headers = await client.auth()
    assert (await client.post("/queues", json={"name": "q"}, headers=headers)).status_code == 201
    return headers


def assert_error(response: object, status: int, code: str) -> dict[str, object]:
    assert response.status_code == status, response.text  # type: ignore[attr-defined]
    body = response.json()  # type: ignore[attr-defined]
    assert body["code"] == code and isinstance(body["detail"], str) and body["detail"]
    assert "Traceback" not in response.text  # type: ignore[attr-defined]
    return dict(body)


async def test_invalid_json_is_400_invalid_json(client: ApiClient, admin: dict[str, str]) -> None:
    response = await client.post("/queues/q/messages", content=b"{not json", headers=admin)
    assert_error(response, 400, "invalid_json")


async def test_a_body_that_is_not_an_object_is_422(client: ApiClient, admin: dict[str, str]) -> None:
    response = await client.post("/queues/q/messages", json=["content"], headers=admin)
    body = assert_error(response, 422, "validation_error")
    assert body["errors"] == [{"field": "body", "message": "must be a JSON object"}]


async def test_missing_content_is_422_naming_the_field(client: ApiClient, admin: dict[str, str]) -> None:
    response = await client.post("/queues/q/messages", json={"headers": {}}, headers=admin)
    body = assert_error(response, 422, "validation_error")
    assert body["errors"][0]["field"] == "content"  # type: ignore[index]


async def test_headers_must_be_strings(client: ApiClient, admin: dict[str, str]) -> None:
    response = await client.post("/queues/q/messages", json={"content": 1, "headers": {"a": 1}}, headers=admin)
    assert_error(response, 422, "validation_error")


@pytest.mark.parametrize("name", [".hidden", "a b", "x" * 256, "semi;colon", "brace{tag}", "ünïcode"])
async def test_bad_queue_names_are_400_invalid_queue_name(client: ApiClient, admin: dict[str, str], name: str) -> None:
    assert_error(await client.post("/queues", json={"name": name}, headers=admin), 400, "invalid_queue_name")


async def test_a_queue_name_that_is_not_a_string_is_400(client: ApiClient, admin: dict[str, str]) -> None:
    assert_error(await client.post("/queues", json={"name": 5}, headers=admin), 400, "invalid_queue_name")


async def test_good_queue_names_with_dots_dashes_and_255_chars_are_accepted(
    client: ApiClient, admin: dict[str, str]
) -> None:
    for name in ["a.b-c_D9", "_x", "-y", "z" * 255]:
        assert (await client.post("/queues", json={"name": name}, headers=admin)).status_code == 201


async def test_an_oversized_message_is_413_and_nothing_is_journaled(
    client: ApiClient, admin: dict[str, str], broker: object
) -> None:
    big = "x" * 262_144  # serialized with its quotes it is over the default limit
    assert_error(await client.post("/queues/q/messages", json={"content": big}, headers=admin), 413,
                 "message_too_large")
    queue = (await client.get("/queues/q", headers=admin)).json()
    assert queue["message_count"] == 0


async def test_a_message_just_under_the_limit_is_accepted(client: ApiClient, admin: dict[str, str]) -> None:
    content = "x" * (262_144 - 2)
    response = await client.post("/queues/q/messages", json={"content": content}, headers=admin)
    assert response.status_code == 201


async def test_a_body_over_the_request_limit_is_413_before_it_is_read(client: ApiClient, admin: dict[str, str]) -> None:
    body = b'{"content": "' + b"x" * (10 * 1024 * 1024) + b'"}'
    assert_error(await client.post("/queues/q/messages", content=body, headers=admin), 413, "body_too_large")


async def test_unknown_message_ids_are_404(client: ApiClient, admin: dict[str, str]) -> None:
    for method, path in [("GET", "/messages/999"), ("POST", "/messages/999/ack"), ("POST", "/messages/999/nack"),
                         ("GET", "/messages/999/history")]:
        assert_error(await client.request(method, path, headers=admin), 404, "message_not_found")


async def test_a_message_id_that_is_not_a_number_is_400(client: ApiClient, admin: dict[str, str]) -> None:
    assert_error(await client.post("/messages/abc/ack", headers=admin), 400, "invalid_id")


async def test_publishing_to_a_missing_queue_is_404(client: ApiClient, admin: dict[str, str]) -> None:
    response = await client.post("/queues/nope/messages", json={"content": "x"}, headers=admin)
    assert_error(response, 404, "queue_not_found")


async def test_unknown_routes_and_methods_get_json_errors(client: ApiClient, admin: dict[str, str]) -> None:
    assert_error(await client.get("/nowhere", headers=admin), 404, "not_found")
    assert_error(await client.put("/queues", headers=admin), 405, "method_not_allowed")


@pytest.mark.parametrize(
    ("body", "field"),
    [({"max": 0}, "max"), ({"max": 101}, "max"), ({"wait": 21}, "wait"), ({"wait": "soon"}, "wait"),
     ({"visibility_timeout": -1}, "visibility_timeout"), ({"max": True}, "max")],
)
async def test_consume_parameters_out_of_range_are_422(
    client: ApiClient, admin: dict[str, str], body: dict[str, object], field: str
) -> None:
    response = await client.post("/queues/q/messages/consume", json=body, headers=admin)
    assert assert_error(response, 422, "validation_error")["errors"][0]["field"] == field  # type: ignore[index]


async def test_get_consume_with_a_bad_wait_is_422(client: ApiClient, admin: dict[str, str]) -> None:
    assert_error(await client.get("/queues/q/messages/consume?wait=abc", headers=admin), 422, "validation_error")


async def test_batch_publish_needs_1_to_1000_messages_and_checks_each(client: ApiClient, admin: dict[str, str]) -> None:
    assert_error(await client.post("/queues/q/messages/batch", json={"messages": []}, headers=admin), 422,
                 "validation_error")
    bad = await client.post("/queues/q/messages/batch", json={"messages": [{"content": 1}, {}]}, headers=admin)
    assert assert_error(bad, 422, "validation_error")["errors"][0]["field"] == "messages[1].content"  # type: ignore[index]
    assert (await client.get("/queues/q", headers=admin)).json()["message_count"] == 0


async def test_unknown_queue_settings_are_422(client: ApiClient, admin: dict[str, str]) -> None:
    response = await client.post("/queues", json={"name": "s", "visibility": 5}, headers=admin)
    assert_error(response, 422, "validation_error")


async def test_a_dead_letter_queue_must_exist_and_not_be_the_queue_itself(
    client: ApiClient, admin: dict[str, str]
) -> None:
    assert_error(await client.post("/queues", json={"name": "d", "dead_letter_queue": "zz"}, headers=admin), 422,
                 "validation_error")
    assert_error(await client.patch("/queues/q", json={"dead_letter_queue": "q"}, headers=admin), 422,
                 "validation_error")


async def test_null_for_a_required_queue_setting_is_422(client: ApiClient, admin: dict[str, str]) -> None:
    for body in ({"name": "n", "visibility_timeout": None}, {"name": "n", "max_deliveries": None}):
        assert_error(await client.post("/queues", json=body, headers=admin), 422, "validation_error")
    assert_error(await client.patch("/queues/q", json={"max_deliveries": None}, headers=admin), 422,
                 "validation_error")


async def test_a_visibility_timeout_of_zero_is_422_not_the_queue_default(
    client: ApiClient, admin: dict[str, str]
) -> None:
    assert_error(await client.get("/queues/q/messages/consume?visibility_timeout=0", headers=admin), 422,
                 "validation_error")


async def test_dead_letter_queues_cannot_form_a_cycle(client: ApiClient, admin: dict[str, str]) -> None:
    assert (await client.post("/queues", json={"name": "d1"}, headers=admin)).status_code == 201
    second = await client.post("/queues", json={"name": "d2", "dead_letter_queue": "d1"}, headers=admin)
    assert second.status_code == 201
    assert_error(await client.patch("/queues/d1", json={"dead_letter_queue": "d2"}, headers=admin), 422,
                 "validation_error")
