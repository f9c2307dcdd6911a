"""Authentication and roles: JWT pinned to HS256 with exp/type/sub required; roles enforced."""

from __future__ import annotations

import base64
import time

import orjson
import pytest
from joserfc import jwt
from joserfc.jwk import OctKey

from tests.conftest import ApiClient
from tests.support import JWT_SECRET


def forge(claims: dict[str, object], secret: str = JWT_SECRET) -> str:
    return jwt.encode({"alg": "HS256"}, claims, OctKey.import_key(secret.encode()))


def claims(**changes: object) -> dict[str, object]:
    now = int(time.time())
    base: dict[str, object] = {"sub": "admin", "type": "access", "roles": ["admin"], "iat": now, "exp": now + 60}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


async def test_login_accepts_form_and_json(client: ApiClient) -> None:
    form = await client.post("/login", data={"username": "admin", "password": "admin-password"})
    as_json = await client.post("/login", json={"username": "admin", "password": "admin-password"})
    assert form.status_code == as_json.status_code == 200
    assert set(form.json()) == {"access_token", "refresh_token", "token_type", "expires_in"}


async def test_wrong_password_is_401_with_the_seed_message(client: ApiClient) -> None:
    response = await client.post("/login", data={"username": "admin", "password": "nope"})
    assert response.status_code == 401
    assert response.json()["detail"] == "Incorrect username or password"
    unknown = await client.post("/login", data={"username": "ghost", "password": "nope"})
    assert unknown.status_code == 401 and unknown.json()["detail"] == "Incorrect username or password"


async def test_login_without_fields_is_422(client: ApiClient) -> None:
    response = await client.post("/login", data={"username": "admin"})
    assert response.status_code == 422 and response.json()["errors"][0]["field"] == "password"


async def test_repeated_failed_logins_are_rate_limited(client: ApiClient) -> None:
    statuses = [
        (await client.post("/login", data={"username": "admin", "password": "wrong"})).status_code for _ in range(12)
    ]
    assert statuses[:10] == [401] * 10
    limited = await client.post("/login", data={"username": "admin", "password": "admin-password"})
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["code"] == "rate_limited"


async def test_no_token_is_401_with_www_authenticate(client: ApiClient) -> None:
    response = await client.get("/queues")
    assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer"
    assert response.json()["code"] == "unauthorized"


@pytest.mark.parametrize(
    "token",
    [
        "not-a-jwt",
        forge(claims(exp=int(time.time()) - 10)),  # expired
        forge(claims(exp=None)),  # no exp
        forge(claims(type=None)),  # no type
        forge(claims(sub=None)),  # no sub
        forge(claims(), secret="another-secret-with-enough-bytes-0123"),  # bad signature
    ],
    ids=["garbage", "expired", "no-exp", "no-type", "no-sub", "bad-signature"],
)
async def test_bad_tokens_are_401(client: ApiClient, token: str) -> None:
    response = await client.get("/queues", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401 and response.json()["code"] == "invalid_token"


async def test_a_token_with_alg_none_is_401(client: ApiClient) -> None:
    def part(obj: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(orjson.dumps(obj)).rstrip(b"=").decode()

    token = f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims())}."
    response = await client.get("/queues", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401


async def test_a_refresh_token_is_not_an_access_token_and_vice_versa(client: ApiClient) -> None:
    tokens = await client.login()
    as_access = await client.get("/queues", headers={"Authorization": f"Bearer {tokens['refresh_token']}"})
    assert as_access.status_code == 401 and as_access.json()["code"] == "invalid_token"
    as_refresh = await client.post("/refresh", headers={"Authorization": f"Bearer {tokens['access_token']}"})
    assert as_refresh.status_code == 401


async def test_refresh_returns_a_new_working_pair(client: ApiClient) -> None:
    tokens = await client.login()
    refreshed = await client.post("/refresh", headers={"Authorization": f"Bearer {tokens['refresh_token']}"})
    assert refreshed.status_code == 200
    new = refreshed.json()
    assert new["access_token"] != tokens["access_token"]
    assert (await client.get("/queues", headers={"Authorization": f"Bearer {new['access_token']}"})).status_code == 200


async def test_roles_are_enforced_with_403(client: ApiClient) -> None:
    admin = await client.auth()
    for name, roles in [("prod", ["producer"]), ("cons", ["consumer"])]:
        created = await client.post("/users", json={"username": name, "password": "password-1", "roles": roles},
                                    headers=admin)
        assert created.status_code == 201, created.text
    await client.post("/queues", json={"name": "r"}, headers=admin)
    producer, consumer = await client.auth("prod", "password-1"), await client.auth("cons", "password-1")

    assert (await client.post("/queues/r/messages", json={"content": 1}, headers=producer)).status_code == 201
    denied = await client.get("/queues/r/messages/consume", headers=producer)
    assert denied.status_code == 403 and denied.json()["code"] == "forbidden"
    assert (await client.post("/queues/r/messages", json={"content": 1}, headers=consumer)).status_code == 403
    delivery = (await client.get("/queues/r/messages/consume", headers=consumer)).json()
    assert (await client.post(f"/messages/{delivery['id']}/ack", headers=consumer)).status_code == 200
    for headers in (producer, consumer):
        assert (await client.get("/queues/r", headers=headers)).status_code == 200
        assert (await client.post("/queues", json={"name": "x"}, headers=headers)).status_code == 403
        assert (await client.delete("/queues/r", headers=headers)).status_code == 403
        assert (await client.get("/users", headers=headers)).status_code == 403


async def test_users_are_managed_by_admins_with_slow_salted_hashes(client: ApiClient, broker: object) -> None:
    admin = await client.auth()
    body = {"username": "u1", "password": "password-1", "roles": ["consumer"]}
    assert (await client.post("/users", json=body, headers=admin)).status_code == 201
    assert (await client.post("/users", json=body, headers=admin)).json()["code"] == "user_exists"
    names = [u["username"] for u in (await client.get("/users", headers=admin)).json()]
    assert names == ["admin", "u1"]
    _, password_hash = await broker.journal.user_with_hash("u1")  # type: ignore[attr-defined]
    assert password_hash.startswith("$argon2") and "password-1" not in password_hash
    bad = await client.post("/users", json={**body, "username": "u2", "roles": ["root"]}, headers=admin)
    assert bad.status_code == 422
    short = await client.post("/users", json={**body, "username": "u3", "password": "short"}, headers=admin)
    assert short.status_code == 422
    assert (await client.delete("/users/u1", headers=admin)).status_code == 204
    assert (await client.delete("/users/u1", headers=admin)).status_code == 404
    assert (await client.post("/login", data={"username": "u1", "password": "password-1"})).status_code == 401
