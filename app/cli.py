"""The `broker` command. Every `serve` flag has a BROKER_* variable (the flag wins)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from app import __version__
from app.errors import BrokerError
from app.settings import Settings, SettingsError

EXIT_DIFFERENCES = 1
EXIT_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="broker", description="A durable HTTP message broker.")
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the broker (embedded Redis unless BROKER_REDIS_URL is set)")
    for field in fields(Settings):
        flag = "--" + field.name.replace("_", "-")
        serve.add_argument(flag, dest=field.name, default=None, help=f"env BROKER_{field.name.upper()}")

    user = commands.add_parser("user", help="manage users in the journal").add_subparsers(dest="action", required=True)
    add = user.add_parser("add", help="add a user")
    add.add_argument("username")
    add.add_argument("--password", required=True)
    add.add_argument("--roles", default="consumer", help="comma-separated: admin,producer,consumer")
    user.add_parser("list", help="list users")
    remove = user.add_parser("remove", help="remove a user")
    remove.add_argument("username")

    journal = commands.add_parser("journal", help="inspect the journal").add_subparsers(dest="action", required=True)
    journal.add_parser("check", help="print differences between Redis and the journal (exit 1 if any)")

    commands.add_parser("bench", add_help=False,
                        help="run the benchmark (bench/) and write BENCHMARKS.md; `broker bench --help` for its flags")

    for name in ("publish", "consume"):
        sub = commands.add_parser(name, help=f"{name} through a running broker's HTTP API")
        sub.add_argument("queue")
        sub.add_argument("--url", default="http://127.0.0.1:8777")
        sub.add_argument("--username", default="admin")
        sub.add_argument("--password", required=True)
        sub.add_argument("--insecure", action="store_true", help="do not verify the TLS certificate")
        if name == "publish":
            sub.add_argument("content", help="JSON value, or a plain string")
        else:
            sub.add_argument("--max", type=int, default=1)
            sub.add_argument("--wait", type=float, default=0.0)
            sub.add_argument("--ack", action="store_true", help="acknowledge what was received")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    if raw[:1] == ["bench"]:  # its flags are the harness's own (`broker bench --help`)
        from bench.runner import main as bench_main

        return bench_main(raw[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        if args.command == "user":
            return asyncio.run(user_command(args))
        if args.command == "journal":
            return asyncio.run(journal_check(Settings.from_env()))
        return client_command(args)
    except SettingsError as exc:
        complain(str(exc))
        return EXIT_ERROR
    except BrokerError as exc:
        complain(exc.detail)
        return EXIT_ERROR


def complain(message: str) -> None:
    print("broker:", message, file=sys.stderr)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.application import create_app, tune_gc
    from app.auth import load_or_create_secret
    from app.logs import configure_logging
    from app.metrics import clear_multiprocess_dir
    from app.stores.embedded_redis import EmbeddedRedis
    from app.tls import certificate_files

    overrides = {f.name: getattr(args, f.name) for f in fields(Settings)}
    settings = Settings.from_env(**_typed(overrides))
    configure_logging(settings)
    tls = certificate_files(settings)
    options: dict[str, Any] = dict(
        host=settings.host, port=settings.port, log_level=settings.log_level,
        ssl_certfile=tls[0] if tls else None, ssl_keyfile=tls[1] if tls else None,
        timeout_graceful_shutdown=30, access_log=False, log_config=None,
    )
    if settings.workers == 1:
        app = create_app(settings)
        tune_gc()
        uvicorn.run(app, **options)
        return 0
    # Several worker processes share one journal and one Redis: this process makes what they must share
    # (the signing secret, the embedded Redis) before they start, and hands them the settings by environment.
    load_or_create_secret(settings.jwt_secret, settings.data_dir)
    embedded = None
    if not settings.redis_url:
        embedded = EmbeddedRedis(settings.data_dir)
        asyncio.run(embedded.__aenter__())
        settings = settings.with_changes(redis_url=embedded.url)
    if settings.metrics_dir is not None:
        clear_multiprocess_dir(settings.metrics_dir)
    settings.export()
    try:
        # A worker that misses uvicorn's health ping is killed, cutting its connections: under a CPU-starved start
        # (2 cores, a load test) 5 s is too tight, so allow 30.
        uvicorn.run("app.application:app_from_env", factory=True, workers=settings.workers,
                    timeout_worker_healthcheck=30, **options)
    finally:
        if embedded is not None:
            embedded.stop()
    return 0


def _typed(raw: dict[str, str | None]) -> dict[str, Any]:
    """Flags arrive as strings: convert them as the environment variables are."""
    env = {f"BROKER_{name.upper()}": value for name, value in raw.items() if value is not None}
    parsed = Settings.from_env(env)
    return {name: getattr(parsed, name) for name, value in raw.items() if value is not None}


async def user_command(args: argparse.Namespace) -> int:
    from app.stores.sqlite_journal import SqliteJournalStore
    from app.users import add_user, parse_roles, remove_user

    settings = Settings.from_env()
    async with SqliteJournalStore(settings.journal_path, sync=settings.journal_sync) as journal:
        if args.action == "add":
            user = await add_user(journal, args.username, args.password, parse_roles(args.roles.split(",")))
            print(f"added {user.username} ({', '.join(sorted(r.value for r in user.roles))})")
        elif args.action == "remove":
            await remove_user(journal, args.username)
            print(f"removed {args.username}")
        else:
            for user in await journal.users():
                print(f"{user.username}\t{','.join(sorted(r.value for r in user.roles))}")
    return 0


async def journal_check(settings: Settings) -> int:
    """Compare Redis with the journal without changing either."""
    from app.gate import Gate
    from app.recovery import Reconciler
    from app.stores.embedded_redis import running_url
    from app.stores.redis_queue import RedisQueueStore
    from app.stores.sqlite_journal import SqliteJournalStore

    if not settings.journal_path.exists():
        complain(f"no journal at {settings.journal_path}")
        return EXIT_ERROR
    url = settings.redis_url or running_url(settings.data_dir)
    if url is None:
        complain(f"no embedded Redis is running for {settings.data_dir} (is the broker running?)")
        return EXIT_ERROR
    async with (
        SqliteJournalStore(settings.journal_path, read_only=True) as journal,
        RedisQueueStore(url) as redis,
    ):
        if not await redis.ping():
            complain(f"Redis at {url} does not answer (is the broker running?)")
            return EXIT_ERROR
        differences = await Reconciler(journal, redis, Gate()).differences()
    for line in differences:
        print(line)
    if not differences:
        print("no differences between Redis and the journal")
    return EXIT_DIFFERENCES if differences else 0


def client_command(args: argparse.Namespace) -> int:
    from app.client import BrokerClient

    with BrokerClient(args.url, username=args.username, password=args.password, verify=not args.insecure) as c:
        if args.command == "publish":
            try:
                content = json.loads(args.content)
            except json.JSONDecodeError:
                content = args.content
            print(json.dumps({"message_id": c.publish(args.queue, content)}))
            return 0
        for delivery in c.consume(args.queue, max_messages=args.max, wait=args.wait):
            print(json.dumps(delivery))
            if args.ack:
                c.ack(delivery["id"], delivery["lease_id"])
    return 0
