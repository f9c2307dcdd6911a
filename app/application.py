"""create_app(settings): the route table, middleware, error handling and the one lifespan."""

from __future__ import annotations

import gc
import logging
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import swagger_ui_bundle
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from app import sse
from app.api import admin, auth, messages, ops, queues, users
from app.api.common import AppState, JSONResponse
from app.api.hot import HotPath
from app.api.middleware import BodyLimit, ObserveRequests
from app.auth import TokenService, load_or_create_secret
from app.broker import Broker
from app.errors import BrokerError, RedisUnavailable
from app.fanout import EventHub
from app.graphql import graphql_app
from app.metrics import Metrics
from app.settings import Settings
from app.stores.embedded_redis import EmbeddedRedis
from app.stores.redis_queue import RedisQueueStore
from app.stores.sqlite_journal import SqliteJournalStore
from app.tasks import BackgroundTasks
from app.users import ensure_admin

log = logging.getLogger(__name__)


def routes() -> list[Route | Mount | WebSocketRoute]:
    graphql = graphql_app()
    # The message hot path (publish, consume, ack, nack, extend) is served before these: api/hot.py, ROUTES.
    return [
        Route("/", ops.root, methods=["GET"]),
        Route("/health/live", ops.live, methods=["GET"]),
        Route("/health/ready", ops.ready, methods=["GET"]),
        Route("/metrics", admin.metrics, methods=["GET"]),
        Route("/stats", admin.stats, methods=["GET"]),
        Route("/logs", admin.list_logs, methods=["GET"]),
        Route("/logs/{filename}", admin.read_log, methods=["GET"]),
        Route("/openapi.json", ops.openapi, methods=["GET"]),
        Route("/docs", ops.docs, methods=["GET"]),
        Mount("/docs/static", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-static"),
        Route("/login", auth.login, methods=["POST"]),
        Route("/refresh", auth.refresh, methods=["POST"]),
        Route("/users", users.list_users, methods=["GET"]),
        Route("/users", users.create_user, methods=["POST"]),
        Route("/users/{username}", users.delete_user, methods=["DELETE"]),
        Route("/queues", queues.list_queues, methods=["GET"]),
        Route("/queues", queues.create_queue, methods=["POST"]),
        Route("/queues/{queue}", queues.get_queue, methods=["GET"]),
        Route("/queues/{queue}", queues.update_queue, methods=["PATCH"]),
        Route("/queues/{queue}", queues.delete_queue, methods=["DELETE"]),
        Route("/queues/{queue}/purge", queues.purge_queue, methods=["POST"]),
        Route("/queues/{queue}/redrive", queues.redrive_queue, methods=["POST"]),
        Route("/queues/{queue}/messages", messages.browse, methods=["GET"]),
        Route("/events", sse.events, methods=["GET"]),
        Route("/queues/{queue}/events", sse.queue_events, methods=["GET"]),
        Route("/messages/{message_id}", messages.get_message, methods=["GET"]),
        Route("/messages/{message_id}/history", messages.history, methods=["GET"]),
        Route("/graphql", graphql, methods=["GET", "POST"]),  # GET: GraphiQL, when BROKER_GRAPHIQL is on
        WebSocketRoute("/graphql", graphql),  # subscriptions (graphql-transport-ws)
    ]


def app_from_env() -> Starlette:
    """The factory each uvicorn worker process calls (`broker serve --workers N`)."""
    from app.logs import configure_logging

    settings = Settings.from_env()
    configure_logging(settings)
    app = create_app(settings)
    tune_gc()
    return app


def tune_gc() -> None:
    """For a serving process, once its app is built: the interpreter's cycle collector otherwise scans every
    object the imports made (hundreds of thousands) in each full collection, a pause of tens of milliseconds that
    showed as the p99 of a publish. Freezing them leaves its scans to what requests allocate; the higher first
    threshold lets short bursts of allocation pass without a collection."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


def create_app(settings: Settings) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[AppState]:
        async with AsyncExitStack() as stack:
            yield await open_broker(settings, stack)

    middleware = [Middleware(HotPath, max_body_bytes=settings.max_body_bytes), Middleware(ObserveRequests),
                  Middleware(BodyLimit, max_bytes=settings.max_body_bytes)]
    if settings.cors_origins:  # outermost, so that the hot path's answers carry its headers too
        middleware.insert(0, Middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                                        allow_methods=["*"], allow_headers=["*"]))
    return Starlette(
        routes=routes(),
        middleware=middleware,
        exception_handlers={BrokerError: broker_error, HTTPException: http_error, Exception: unexpected_error},
        lifespan=lifespan,
    )


async def open_broker(settings: Settings, stack: AsyncExitStack) -> AppState:
    """Open everything the broker needs, in order; the stack closes it in reverse."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    redis_url = settings.redis_url
    if not redis_url:
        redis_url = (await stack.enter_async_context(EmbeddedRedis(settings.data_dir))).url
    journal = await stack.enter_async_context(
        SqliteJournalStore(settings.journal_path, sync=settings.journal_sync, batch_max=settings.journal_batch_max)
    )
    redis = await stack.enter_async_context(RedisQueueStore(redis_url))
    broker = Broker(settings, journal, redis)
    metrics = Metrics(settings.metrics_dir)
    journal.add_listener(metrics.on_events)
    journal.add_commit_observer(metrics.on_commit)
    generated = await ensure_admin(journal, settings.admin_username, settings.admin_password)
    if generated:
        print(f"Created user '{settings.admin_username}' with password: {generated}  (shown once; "
              "set BROKER_ADMIN_PASSWORD to choose it)", file=sys.stderr, flush=True)
    try:
        await broker.recovery.reconcile()
    except RedisUnavailable as exc:
        log.error("Redis is unavailable at start (%s); will rebuild it from the journal when it answers", exc)
    await stack.enter_async_context(BackgroundTasks(broker))
    hub = await stack.enter_async_context(EventHub(journal, redis, on_count=metrics.sse_clients.set,
                                                               buffer=settings.sse_buffer_events,
                                                               max_streams_per_user=settings.sse_max_streams_per_user))
    tokens = TokenService(
        load_or_create_secret(settings.jwt_secret, settings.data_dir),
        access_seconds=settings.access_token_seconds,
        refresh_seconds=settings.refresh_token_seconds,
    )
    limiter = MovingWindowRateLimiter(MemoryStorage())
    return AppState(settings=settings, broker=broker, tokens=tokens, login_limiter=limiter, metrics=metrics,
                    hub=hub, started_at=time.time())


# -- errors: always {"detail", "code"}, never a traceback ----------------------------------------------------------


async def broker_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BrokerError)
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    detail = {404: "No such route", 405: "Method not allowed on this route"}.get(exc.status_code, str(exc.detail))
    return JSONResponse({"detail": detail, "code": codes.get(exc.status_code, "http_error")},
                        status_code=exc.status_code, headers=exc.headers)


async def unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "Internal error; it was logged", "code": "internal_error"}, status_code=500)
