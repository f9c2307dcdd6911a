"""The baseline: a bare Starlette app served the way the broker is served (uvicorn, 1 worker, uvloop + httptools).

Its one route, POST /queues/{queue}/messages, parses the JSON body with orjson (the broker's JSON library) and
answers 201 with a small JSON body, like a publish. It does nothing else: no auth, no journal, no Redis. The
broker's figures are reported as a ratio to this app's, measured in the same benchmark run, so the ratio says
what the broker's work costs on top of HTTP and ASGI on this machine.

    python -m bench.baseline --port 8780
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

_ids = itertools.count(1)


async def publish(request: Request) -> Response:
    data = orjson.loads(await request.body())
    if not isinstance(data, dict) or "content" not in data:
        return Response(b'{"detail":"content is required"}', status_code=422, media_type="application/json")
    body = {"message": "Message published successfully", "message_id": next(_ids), "status": "pending"}
    return Response(orjson.dumps(body), status_code=201, media_type="application/json")


async def health(request: Request) -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


def create_app() -> Starlette:
    return Starlette(routes=[
        Route("/queues/{queue}/messages", publish, methods=["POST"]),
        Route("/health/ready", health, methods=["GET"]),
    ])


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8780)
    args = parser.parse_args(argv)
    # The same call and options as `broker serve` with one worker (app/cli.py): uvicorn's defaults pick uvloop
    # and httptools from uvicorn[standard].
    uvicorn.run(create_app(), host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=30,
                access_log=False, log_config=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
