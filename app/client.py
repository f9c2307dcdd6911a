"""A small Python SDK over the HTTP API (httpx). Imports only models and errors."""

from __future__ import annotations

import ssl
from types import TracebackType
from typing import Any

import httpx

from app.errors import BrokerError


class BrokerClientError(BrokerError):
    """An error answer from the broker, with its status and code."""

    def __init__(self, status_code: int, detail: str, code: str) -> None:
        super().__init__(detail, code=code)
        self.status_code = status_code


class BrokerClient:
    """`with BrokerClient(url, username=..., password=...) as c: c.publish("jobs", {"x": 1})`."""

    def __init__(self, base_url: str, *, username: str | None = None, password: str | None = None,
                 token: str | None = None, verify: bool | str | ssl.SSLContext = True,
                 timeout: float = 30.0) -> None:
        """`verify`: True (system CAs), False, a CA bundle path (e.g. the broker's self-signed cert.pem)."""
        if isinstance(verify, str):
            verify = ssl.create_default_context(cafile=verify)
        self._http = httpx.Client(base_url=base_url, verify=verify, timeout=timeout)
        self._token = token
        if token is None and username is not None:
            self.login(username, password or "")

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def login(self, username: str, password: str) -> dict[str, Any]:
        tokens: dict[str, Any] = self._call("POST", "/login", data={"username": username, "password": password})
        self._token = tokens["access_token"]
        return tokens

    def create_queue(self, name: str, **settings: Any) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/queues", json={"name": name, **settings})
        return result

    def publish(self, queue: str, content: Any, *, headers: dict[str, str] | None = None) -> int:
        body: dict[str, Any] = {"content": content}
        if headers:
            body["headers"] = headers
        return int(self._call("POST", f"/queues/{queue}/messages", json=body)["message_id"])

    def consume(self, queue: str, *, max_messages: int = 1, wait: float = 0.0) -> list[dict[str, Any]]:
        result = self._call("POST", f"/queues/{queue}/messages/consume", json={"max": max_messages, "wait": wait})
        messages: list[dict[str, Any]] = result["messages"]
        return messages

    def ack(self, message_id: int, lease_id: str | None = None) -> None:
        self._call("POST", f"/messages/{message_id}/ack", json={"lease_id": lease_id} if lease_id else None)

    def nack(self, message_id: int, lease_id: str | None = None, *, requeue: bool = False,
             reason: str | None = None) -> None:
        body = {"lease_id": lease_id, "requeue": requeue, "reason": reason}
        self._call("POST", f"/messages/{message_id}/nack", json={k: v for k, v in body.items() if v is not None})

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        response = self._http.request(method, path, headers=headers, **kwargs)
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {}
            raise BrokerClientError(response.status_code, body.get("detail", response.text), body.get("code", ""))
        return response.json() if response.content else None
