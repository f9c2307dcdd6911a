"""The older broker's client flow works unchanged (API.md: a superset of the seed's API)."""

from __future__ import annotations

from tests.conftest import ApiClient


async def test_seed_client_flow_login_create_publish_consume_ack(client: ApiClient) -> None:
    login = await client.post("/login", data={"username": "admin", "password": "admin-password"})
    assert login.status_code == 200
    tokens = login.json()
    assert tokens["token_type"] == "bearer" and tokens["access_token"] and tokens["refresh_token"]
    headers = {"Authorization": f"Bearer {tokens['access_token']}"}

    assert (await client.get("/queues/seed", headers=headers)).status_code == 404
    assert (await client.post("/queues", json={"name": "seed"}, headers=headers)).status_code == 201
    again = await client.post("/queues", json={"name": "seed"}, headers=headers)
    assert again.status_code == 409 and again.json()["code"] == "queue_exists"
    assert (await client.get("/queues/seed", headers=headers)).status_code == 200

    published = await client.post("/queues/seed/messages", json={"content": "hello"}, headers=headers)
    assert published.status_code == 201
    body = published.json()
    assert body["message"] == "Message published successfully" and isinstance(body["message_id"], int)

    consumed = await client.get("/queues/seed/messages/consume", headers=headers)
    assert consumed.status_code == 200
    delivery = consumed.json()
    assert delivery["id"] == delivery["message_id"] == body["message_id"]
    assert delivery["content"] == "hello" and delivery["queue"] == "seed" and delivery["status"] == "processing"

    empty = await client.get("/queues/seed/messages/consume", headers=headers)
    assert empty.status_code == 200 and empty.json() is None

    ack = await client.post(f"/messages/{delivery['id']}/ack", headers=headers)
    assert ack.status_code == 200
    assert ack.json() == {"detail": f"Message {delivery['id']} acknowledged successfully.", "status": "processed"}
    second = await client.post(f"/messages/{delivery['id']}/ack", headers=headers)
    assert second.status_code == 409 and second.json()["code"] == "not_processing"


async def test_history_lists_each_transition_once_in_order(client: ApiClient) -> None:
    headers = await client.auth()
    await client.post("/queues", json={"name": "h"}, headers=headers)
    message_id = (await client.post("/queues/h/messages", json={"content": {"n": 1}}, headers=headers)).json()[
        "message_id"
    ]
    delivery = (await client.get("/queues/h/messages/consume", headers=headers)).json()
    await client.post(f"/messages/{message_id}/ack", json={"lease_id": delivery["lease_id"]}, headers=headers)
    events = (await client.get(f"/messages/{message_id}/history", headers=headers)).json()["events"]
    assert [e["type"] for e in events] == ["message.published", "message.delivered", "message.acked"]
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    message = (await client.get(f"/messages/{message_id}", headers=headers)).json()
    assert message["status"] == "processed" and message["delivery_count"] == 1 and message["content"] == {"n": 1}
