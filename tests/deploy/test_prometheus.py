"""prometheus/prometheus.yml and the dashboard against a real Prometheus scraping a real broker.

The end-to-end test runs a small workload on a broker (embedded Redis), lets Debian's `prometheus` scrape it every
second with a copy of prometheus/prometheus.yml pointed at 127.0.0.1, then evaluates every query of
grafana/dashboards/broker.json through Prometheus's HTTP API and wants data from each: a panel that can never show
anything (a misspelt metric, a label the broker does not export, invalid PromQL) fails here.

Without `prometheus`/`promtool` on PATH it runs `apt-get install -y prometheus` (after `apt-get update` if needed).
When that is impossible it skips, or fails when CI is set: CI must run it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from starlette.routing import Route

from app.application import routes
from tests.deploy import dashboard as dash
from tests.support import BrokerProcess, apt_install, free_port, token

CONFIG_PATH = dash.ROOT / "prometheus" / "prometheus.yml"
QUEUE = "deploy-metrics"


def _config() -> dict[str, Any]:
    config = yaml.safe_load(CONFIG_PATH.read_text())
    assert isinstance(config, dict)
    return config


def _broker_job(config: dict[str, Any]) -> dict[str, Any]:
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "broker"]
    assert isinstance(job, dict)
    return job


# -- the file itself (fast) -------------------------------------------------------------------------------------


def test_scrape_config() -> None:
    config = _config()
    job = _broker_job(config)
    assert [t for sc in job["static_configs"] for t in sc["targets"]] == ["broker:8777"]
    assert job.get("scrape_interval", config.get("global", {}).get("scrape_interval")) == "5s"
    assert job.get("scheme", "http") == "http"


def test_scrape_path_is_a_broker_route() -> None:
    path = _broker_job(_config()).get("metrics_path", "/metrics")
    get = {r.path for r in routes() if isinstance(r, Route) and r.methods and "GET" in r.methods}
    assert path in get, f"Prometheus scrapes {path}, which the broker does not serve (GET routes: {sorted(get)})"


# -- installing Prometheus --------------------------------------------------------------------------------------


@dataclass
class Binaries:
    prometheus: str
    promtool: str


def _install_prometheus() -> str | None:
    return apt_install("prometheus")


@pytest.fixture(scope="module")
def binaries() -> Binaries:
    def found() -> Binaries | None:
        prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
        return Binaries(prometheus, promtool) if prometheus and promtool else None

    if (existing := found()) is not None:
        return existing
    reason = _install_prometheus()
    if reason is None and (installed := found()) is not None:
        return installed
    reason = reason or "apt-get installed prometheus but prometheus/promtool are not on PATH"
    message = f"needs prometheus and promtool: {reason}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


# -- a Prometheus of the test's own -----------------------------------------------------------------------------


@dataclass
class PrometheusProcess:
    binary: str
    config: Path
    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.directory / "prometheus.log"

    def start(self, timeout: float = 30.0) -> PrometheusProcess:
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [self.binary, f"--config.file={self.config}", f"--storage.tsdb.path={self.directory / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/-/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"prometheus not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()[-4000:] if self.log_path.exists() else ""

    def query(self, expr: str) -> dict[str, Any]:
        response = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10)
        body: dict[str, Any] = response.json()
        return body

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=10)
            self.process = None


def scrape_config(broker_port: int) -> dict[str, Any]:
    """prometheus/prometheus.yml, its broker job pointed at the test broker and scraping every second."""
    config = _config()
    config.setdefault("global", {}).update(scrape_interval="1s", evaluation_interval="1s")
    job = _broker_job(config)
    job.update(scrape_interval="1s", scrape_timeout="1s")
    job["static_configs"] = [{"targets": [f"127.0.0.1:{broker_port}"]}]
    return config


# -- the broker and its workload --------------------------------------------------------------------------------


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    process = BrokerProcess(tmp_path / "data", redis_url=None)
    try:
        yield process.start()
    finally:
        process.stop()


def workload(base_url: str) -> None:
    """Every metric the dashboard reads gets a series: publish, deliver, ack, nack (requeue: a redelivery),
    nack without requeue (failed), one message left pending and one left processing, a 404."""
    headers = {"Authorization": f"Bearer {token(base_url)}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=10) as client:
        client.post("/queues", json={"name": QUEUE}).raise_for_status()
        for n in range(4):
            client.post(f"/queues/{QUEUE}/messages", json={"content": {"n": n}}).raise_for_status()
        first = client.post(f"/queues/{QUEUE}/messages/consume", json={"max": 3}).json()["messages"]
        assert len(first) == 3, first
        client.post(f"/messages/{first[0]['id']}/ack", json={"lease_id": first[0]["lease_id"]}).raise_for_status()
        client.post(f"/messages/{first[1]['id']}/nack",
                    json={"lease_id": first[1]["lease_id"], "requeue": True}).raise_for_status()
        failed = client.post(f"/messages/{first[2]['id']}/nack",
                             json={"lease_id": first[2]["lease_id"], "requeue": False, "reason": "test"})
        failed.raise_for_status()
        assert failed.json()["status"] == "failed", failed.json()
        second = client.post(f"/queues/{QUEUE}/messages/consume", json={"max": 10}).json()["messages"]
        assert {d["id"] for d in second} == {first[1]["id"], 4}, second
        redelivered = next(d for d in second if d["id"] == first[1]["id"])
        client.post(f"/messages/{redelivered['id']}/ack", json={"lease_id": redelivered["lease_id"]}).raise_for_status()
        client.post(f"/queues/{QUEUE}/messages", json={"content": {"n": 4}}).raise_for_status()  # stays pending
        assert client.get("/queues/no-such-queue").status_code == 404


def wait_for_scrapes(prometheus: PrometheusProcess, count: int = 2, timeout: float = 30.0) -> None:
    expr = 'count_over_time(up{job="broker"}[5m])'
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = prometheus.query(expr)
        results = last.get("data", {}).get("result", [])
        if results and float(results[0]["value"][1]) >= count:
            up = prometheus.query('up{job="broker"}')["data"]["result"]
            assert up and up[0]["value"][1] == "1", f"the broker target is down: {up}\n{prometheus.log()}"
            return
        time.sleep(0.25)
    raise TimeoutError(f"fewer than {count} scrapes after {timeout}s: {last}\n{prometheus.log()}")


# -- the tests --------------------------------------------------------------------------------------------------


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, expr) for every panel query and every query variable's selector, variables substituted both as
    All (`.*`) and as the workload's queue."""
    board = dash.load()
    raw = dash.all_exprs(board) + [(f"variable ${name}", q) for name, q in dash.variable_queries(board)]
    names = [v["name"] for v in board.get("templating", {}).get("list", [])]
    queries = []
    for value in (".*", QUEUE):
        values = dict.fromkeys(names, value)
        queries += [(f"{where} [{value}]", dash.substitute(expr, values)) for where, expr in raw]
    return queries


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_dashboard_queries_are_valid_promql(binaries: Binaries, tmp_path: Path) -> None:
    """promtool parses every dashboard query (as recording rules), without a server."""
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, (_, expr) in enumerate(dashboard_queries())
    ]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    done = subprocess.run([binaries.promtool, "check", "rules", str(path)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_dashboard_query_returns_data(binaries: Binaries, broker: BrokerProcess, tmp_path: Path) -> None:
    exposition = httpx.get(broker.url + "/metrics", timeout=10)
    assert exposition.status_code == 200, f"GET /metrics answered {exposition.status_code}: {exposition.text[:300]}"

    workload(broker.url)
    text = httpx.get(broker.url + "/metrics", timeout=10).text
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    missing = sorted(m for m in dash.ALLOWED_METRICS if m not in exported)
    assert not missing, f"/metrics lacks these documented series after the workload: {missing}"
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes"} <= exported, "the process collector"

    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(scrape_config(broker.port), sort_keys=False))
    check = subprocess.run([binaries.promtool, "check", "config", str(config_path)], capture_output=True,
                           text=True, timeout=60, check=False)
    assert check.returncode == 0, check.stdout + check.stderr

    prometheus = PrometheusProcess(binaries.prometheus, config_path, tmp_path / "prometheus")
    try:
        prometheus.start()
        wait_for_scrapes(prometheus)
        failures = []
        for where, expr in dashboard_queries():
            answer = prometheus.query(expr)
            if answer.get("status") != "success":
                failures.append(f"{where}: {expr}\n    error: {answer.get('error')}")
            elif not answer["data"]["result"]:
                failures.append(f"{where}: {expr}\n    no data")
        assert not failures, "dashboard queries that show nothing:\n" + "\n".join(failures)
    finally:
        prometheus.stop()
