"""Operational handlers: the root, health probes, the OpenAPI document and its viewer."""

from __future__ import annotations

import time
from functools import cache
from importlib import resources
from typing import Any

import yaml
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from app import __version__
from app.api.common import JSONResponse, state
from app.models import iso


async def root(request: Request) -> Response:
    return JSONResponse(
        {"message": "Message broker is running", "status": "ok", "version": __version__,
         "timestamp": iso(time.time())}
    )


async def live(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    broker = state(request)["broker"]
    checks = await broker.health()
    checks["redis"] = checks["redis"] and broker.recovery.redis_up
    failed = [name for name, ok in checks.items() if not ok]
    body = {"status": "ok" if not failed else "unavailable", "checks": checks}
    if failed:
        body["detail"] = f"Not ready: {', '.join(failed)} unavailable"
        body["code"] = "not_ready"
    return JSONResponse(body, status_code=503 if failed else 200, headers={"Retry-After": "1"} if failed else None)


@cache
def openapi_document() -> dict[str, Any]:
    text = (resources.files("app.api") / "openapi.yaml").read_text()
    document: dict[str, Any] = yaml.safe_load(text)
    document["info"]["version"] = __version__
    return document


async def openapi(request: Request) -> Response:
    return JSONResponse(openapi_document())


async def docs(request: Request) -> Response:
    return HTMLResponse((resources.files("app.api") / "docs.html").read_text())
