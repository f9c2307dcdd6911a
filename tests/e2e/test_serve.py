"""`broker serve` as a user runs it: uvicorn on a free port, embedded Redis, TLS, the CLI and the SDK."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from app.client import BrokerClient, BrokerClientError
from tests.support import ADMIN_PASSWORD, BrokerProcess, RedisProcess, token

pytestmark = pytest.mark.slow


def cli(data_dir: Path, *args: str, redis_url: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env["BROKER_DATA_DIR"] = str(data_dir)
    if redis_url:
        env["BROKER_REDIS_URL"] = redis_url
    return subprocess.run([sys.executable, "-m", "app", *args], env=env, capture_output=True, text=True, timeout=60)


def redis_children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines()[1:]
            if "redis-server" in line and int(line.split()[1]) == pid]


def test_serve_with_embedded_redis_and_self_signed_tls_works_and_stops_cleanly(tmp_path: Path) -> None:
    data = tmp_path / "data"
    broker = BrokerProcess(data, redis_url=None, extra_env={"BROKER_TLS": "self-signed"}).start()
    try:
        cert = data / "tls" / "cert.pem"
        assert cert.exists() and (data / "tls" / "key.pem").stat().st_mode & 0o077 == 0
        assert (data / "redis.url").read_text().startswith("unix://")
        assert broker.process is not None and redis_children(broker.process.pid)
        with BrokerClient(broker.url, username="admin", password=ADMIN_PASSWORD, verify=str(cert)) as client:
            client.create_queue("tls")
            message_id = client.publish("tls", {"over": "https"})
            [delivery] = client.consume("tls")
            assert delivery["id"] == message_id and delivery["content"] == {"over": "https"}
            client.ack(delivery["id"], delivery["lease_id"])
            with pytest.raises(BrokerClientError) as raised:
                client.ack(delivery["id"], delivery["lease_id"])
            assert raised.value.status_code == 409
        check = cli(data, "journal", "check")
        assert check.returncode == 0, check.stdout + check.stderr
        assert "no differences" in check.stdout
        assert broker.terminate()
        assert not (data / "redis.url").exists()
        assert not redis_children(broker.process.pid)
    finally:
        broker.stop()


def test_a_restarted_broker_keeps_users_queues_and_messages(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = BrokerProcess(data, redis_url=None).start()
    try:
        headers = {"Authorization": f"Bearer {token(first.url)}"}
        httpx.post(first.url + "/queues", json={"name": "keep"}, headers=headers).raise_for_status()
        publish = first.url + "/queues/keep/messages"
        ids = [httpx.post(publish, json={"content": n}, headers=headers).json()["message_id"] for n in range(3)]
    finally:
        first.stop()
    second = BrokerProcess(data, redis_url=None).start()
    try:
        headers = {"Authorization": f"Bearer {token(second.url)}"}
        got = httpx.post(second.url + "/queues/keep/messages/consume", json={"max": 10}, headers=headers).json()
        assert [m["id"] for m in got["messages"]] == ids
    finally:
        second.stop()


def test_cli_manages_users_and_publishes_and_consumes_through_the_api(tmp_path: Path) -> None:
    data = tmp_path / "data"
    redis = RedisProcess(tmp_path / "redis").start()
    broker = BrokerProcess(data, redis_url=redis.url).start()
    try:
        added = cli(data, "user", "add", "worker", "--password", "worker-pass", "--roles", "consumer,producer")
        assert added.returncode == 0, added.stderr
        listed = cli(data, "user", "list")
        assert "worker\tconsumer,producer" in listed.stdout and "admin\tadmin" in listed.stdout
        duplicate = cli(data, "user", "add", "worker", "--password", "worker-pass")
        assert duplicate.returncode == 2 and "already exists" in duplicate.stderr

        headers = {"Authorization": f"Bearer {token(broker.url)}"}
        httpx.post(broker.url + "/queues", json={"name": "cli"}, headers=headers).raise_for_status()
        common = ("--url", broker.url, "--username", "worker", "--password", "worker-pass")
        published = cli(data, "publish", "cli", '{"job": 1}', *common)
        assert published.returncode == 0, published.stderr
        consumed = cli(data, "consume", "cli", "--ack", *common)
        assert consumed.returncode == 0 and '"job": 1' in consumed.stdout
        check = cli(data, "journal", "check", redis_url=redis.url)
        assert check.returncode == 0, check.stdout

        removed = cli(data, "user", "remove", "worker")
        assert removed.returncode == 0
        login = httpx.post(broker.url + "/login", data={"username": "worker", "password": "worker-pass"})
        assert login.status_code == 401
    finally:
        broker.stop()
        redis.stop()


def test_journal_check_reports_differences_with_exit_1(tmp_path: Path) -> None:
    import redis as redis_client

    data = tmp_path / "data"
    redis = RedisProcess(tmp_path / "redis").start()
    # A slow watcher, so the difference is still there when the check runs.
    broker = BrokerProcess(data, redis_url=redis.url, extra_env={"BROKER_REDIS_CHECK_INTERVAL_SECONDS": "60"}).start()
    try:
        headers = {"Authorization": f"Bearer {token(broker.url)}"}
        httpx.post(broker.url + "/queues", json={"name": "d"}, headers=headers).raise_for_status()
        message_id = httpx.post(broker.url + "/queues/d/messages", json={"content": 1}, headers=headers).json()[
            "message_id"
        ]
        r = redis_client.Redis.from_url(redis.url)
        r.delete("broker:{d}:ready")
        r.close()
        check = cli(data, "journal", "check", redis_url=redis.url)
        assert check.returncode == 1
        assert f"pending in the journal but not ready in Redis: {message_id}" in check.stdout
    finally:
        broker.stop()
        redis.stop()


def test_serve_refuses_bad_settings_with_a_clear_message(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(BROKER_DATA_DIR=str(tmp_path), BROKER_JOURNAL_SYNC="sometimes")
    result = subprocess.run([sys.executable, "-m", "app", "serve"], env=env, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2 and "BROKER_JOURNAL_SYNC" in result.stderr


def test_a_real_server_writes_json_logs_that_admins_read_and_traversal_never_escapes(tmp_path: Path) -> None:
    import http.client
    import json

    data = tmp_path / "data"
    broker = BrokerProcess(data, redis_url=None).start()
    try:
        headers = {"Authorization": f"Bearer {token(broker.url)}"}
        httpx.get(broker.url + "/queues", headers=headers).raise_for_status()
        listing = httpx.get(broker.url + "/logs", headers=headers).json()
        assert "broker.log" in [f["name"] for f in listing["files"]]
        lines = httpx.get(broker.url + "/logs/broker.log?tail=50", headers=headers).json()["lines"]
        entries = [json.loads(line["text"]) for line in lines]
        access = [e for e in entries if e.get("route") == "/queues"]
        assert access and access[-1]["user"] == "admin" and access[-1]["status"] == 200
        assert all("Bearer" not in line["text"] and "eyJ" not in line["text"] for line in lines)
        (data / "canary").write_text("canary-7f3a")  # beside the log directory, as the journal and secrets are
        for raw in ("/logs/../canary", "/logs/%2e%2e/canary", "/logs/..%2fcanary", "/logs/%2e%2e%2fcanary"):
            connection = http.client.HTTPConnection("127.0.0.1", broker.port, timeout=10)
            connection.request("GET", raw, headers=headers)  # sent as is: no client-side normalising
            response = connection.getresponse()
            body = response.read().decode()
            connection.close()
            assert response.status in (400, 404), (raw, response.status, body)
            assert "canary-7f3a" not in body
    finally:
        broker.stop()
