"""docker-compose.yml, Dockerfile and .dockerignore: valid against the Compose Specification, and consistent with the
broker (port, health routes, settings) and with the repository (the files they mount and copy).

compose-spec.json is the Compose Specification's JSON schema (draft 2020-12), vendored as data from the PyPI wheel
check-jsonschema 0.39.0 (check_jsonschema/builtin_schemas/vendor/compose-spec.json, itself a copy of
compose-spec/compose-spec schema/compose-spec.json; Apache-2.0, see LICENSE.compose-spec). The npm registry has no
`compose-spec` package. To update it: `pip download --no-deps check-jsonschema`, copy the file, update SCHEMA_SHA256.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import re
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from jsonschema import Draft202012Validator
from starlette.routing import Route

from app.application import routes
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SCHEMA_PATH = HERE / "compose-spec.json"
SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"
SERVICES = {"redis", "broker", "prometheus", "grafana"}


# -- loading ----------------------------------------------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    data = json.loads(SCHEMA_PATH.read_text())
    assert isinstance(data, dict)
    return data


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        keyword, _, args = pending.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def dockerfile(keyword: str) -> list[str]:
    return [args for kw, args in dockerfile_instructions() if kw == keyword]


def exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form CMD/HEALTHCHECK CMD."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def env_pairs(args: str) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in args.split())


def get_routes() -> set[str]:
    return {r.path for r in routes() if isinstance(r, Route) and r.methods and "GET" in r.methods}


def http_paths(command: str) -> set[str]:
    """URL paths a healthcheck command asks for: full URLs, or quoted '/path' pieces joined to a base URL."""
    paths = {urlsplit(url).path for url in re.findall(r"https?://[^\s'\"]+", command)}
    paths |= set(re.findall(r"""['"](/[\w/.-]*)['"]""", command))
    return {p for p in paths if p}


def container_port(mapping: str | int | dict[str, Any]) -> int:
    """The container side of a compose `ports` entry (short or long syntax)."""
    if isinstance(mapping, dict):
        return int(mapping["target"])
    return int(str(mapping).split("/")[0].rsplit(":", 1)[-1])


def host_port(mapping: str | int | dict[str, Any]) -> int:
    if isinstance(mapping, dict):
        return int(mapping["published"])
    parts = str(mapping).split("/")[0].split(":")
    return int(parts[-2] if len(parts) > 1 else parts[-1])


def volume_source(entry: str | dict[str, Any]) -> str:
    if isinstance(entry, dict):
        return str(entry["source"])
    return entry.split(":")[0]


def volume_target(entry: str | dict[str, Any]) -> str:
    if isinstance(entry, dict):
        return str(entry["target"])
    return entry.split(":")[1]


def healthcheck_command(test: str | list[str]) -> str:
    return test if isinstance(test, str) else " ".join(test)


# -- the Compose Specification ----------------------------------------------------------------------------------


def test_vendored_schema_is_the_compose_specification(schema: dict[str, Any]) -> None:
    assert hashlib.sha256(SCHEMA_PATH.read_bytes()).hexdigest() == SCHEMA_SHA256, (
        "compose-spec.json changed: it is vendored data, update SCHEMA_SHA256 and the provenance note together"
    )
    assert (HERE / "LICENSE.compose-spec").is_file()
    Draft202012Validator.check_schema(schema)
    assert schema["title"] == "Compose Specification"
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_compose_file_validates_against_the_specification(schema: dict[str, Any], compose: dict[str, Any]) -> None:
    errors = sorted(Draft202012Validator(schema).iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


@pytest.mark.parametrize(
    ("where", "key", "value"),
    [
        (("services", "broker"), "portz", ["8777:8777"]),  # unknown service key
        (("services", "broker", "depends_on", "redis"), "condition", "service_happy"),  # not a condition
        (("services", "redis", "healthcheck"), "test", {"cmd": "ping"}),  # neither a string nor a list
        ((), "volumez", {}),  # unknown top-level key
    ],
)
def test_schema_rejects_a_broken_compose_file(
    schema: dict[str, Any], compose: dict[str, Any], where: tuple[str, ...], key: str, value: Any
) -> None:
    """The validation above means something: the same file with one mistake fails it."""
    broken = copy.deepcopy(compose)
    node = broken
    for part in where:
        node = node[part]
    node[key] = value
    assert list(Draft202012Validator(schema).iter_errors(broken))


# -- the services -----------------------------------------------------------------------------------------------


def test_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == SERVICES

    redis = services["redis"]
    assert redis["image"] == "redis:7-alpine"
    command = redis["command"]
    command = command if isinstance(command, list) else command.split()
    assert command[0] == "redis-server"
    assert command[command.index("--save") + 1] in ("", '""')
    assert command[command.index("--appendonly") + 1] == "no"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert "redis-cli ping" in healthcheck_command(redis["healthcheck"]["test"])
    assert "journal" in (ROOT / "docker-compose.yml").read_text(), "the persistence choice is explained"

    broker = services["broker"]
    assert broker["build"] in (".", {"context": "."})
    env = broker["environment"]
    assert env["BROKER_REDIS_URL"] == "redis://redis:6379/0"
    assert env["BROKER_HOST"] == "0.0.0.0"
    assert env["BROKER_ADMIN_PASSWORD"] == "${BROKER_ADMIN_PASSWORD:-change-me}"
    assert env["BROKER_DATA_DIR"] == "/data"
    assert "broker-data:/data" in broker["volumes"]
    assert broker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "healthcheck" in broker

    prometheus = services["prometheus"]
    assert prometheus["image"].split(":")[0] == "prom/prometheus"
    assert [host_port(p) for p in prometheus["ports"]] == [9090]
    assert any(volume_source(v) == "./prometheus/prometheus.yml" for v in prometheus["volumes"])

    grafana = services["grafana"]
    assert grafana["image"].split(":")[0] == "grafana/grafana"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert [host_port(p) for p in grafana["ports"]] == [3000]
    assert "prometheus" in grafana["depends_on"]


def test_broker_port_is_the_same_everywhere(compose: dict[str, Any]) -> None:
    default_port = next(f.default for f in fields(Settings) if f.name == "port")
    assert default_port == 8777
    assert [int(p.split("/")[0]) for p in dockerfile("EXPOSE")] == [default_port]
    broker = compose["services"]["broker"]
    assert [(host_port(p), container_port(p)) for p in broker["ports"]] == [(default_port, default_port)]
    assert int(broker["environment"].get("BROKER_PORT", default_port)) == default_port
    assert int(env_pairs(" ".join(dockerfile("ENV"))).get("BROKER_PORT", default_port)) == default_port
    urls = re.findall(r"https?://[^\s'\"]+", healthcheck_command(broker["healthcheck"]["test"]))
    assert urls and all(urlsplit(u).port == default_port for u in urls)
    assert str(default_port) in dockerfile("HEALTHCHECK")[0]


def test_healthchecks_ask_for_existing_routes(compose: dict[str, Any]) -> None:
    get = get_routes()
    (healthcheck,) = dockerfile("HEALTHCHECK")
    command = exec_form(healthcheck[healthcheck.index("CMD") + 3:].strip())
    assert command[0] == "python" and "urllib" in command[-1], "slim has no curl: python's urllib asks"
    in_compose = healthcheck_command(compose["services"]["broker"]["healthcheck"]["test"])
    for where, text in [("Dockerfile", " ".join(command)), ("docker-compose.yml", in_compose)]:
        paths = http_paths(text)
        assert paths == {"/health/ready"}, f"{where} healthcheck asks for {paths}"
        assert paths <= get, f"{where} healthcheck paths {paths - get} are not GET routes"


def test_broker_environment_names_are_settings(compose: dict[str, Any]) -> None:
    known = {"BROKER_" + f.name.upper() for f in fields(Settings)}
    names = set(compose["services"]["broker"]["environment"]) | set(env_pairs(" ".join(dockerfile("ENV"))))
    broker_names = {n for n in names if n.startswith("BROKER_")}
    assert broker_names and broker_names <= known, f"unknown settings: {broker_names - known}"


def test_mounted_files_exist_and_named_volumes_are_declared(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for entry in service.get("volumes", []):
            source = volume_source(entry)
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which is not in the repository"
            else:
                assert source in declared, f"{name} mounts volume {source}, not declared under volumes:"
    build = compose["services"]["broker"]["build"]
    context = ROOT / (build if isinstance(build, str) else build["context"])
    assert (context / "Dockerfile").is_file()


def test_grafana_mounts_match_its_provisioning(compose: dict[str, Any]) -> None:
    grafana = {volume_source(v): volume_target(v) for v in compose["services"]["grafana"]["volumes"]}
    assert grafana["./grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((ROOT / "grafana/provisioning/dashboards/broker.yml").read_text())["providers"][0]
    assert provider["type"] == "file"
    assert grafana["./grafana/dashboards"] == provider["options"]["path"]
    home = compose["services"]["grafana"]["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        assert home.startswith(provider["options"]["path"] + "/")
        assert (ROOT / "grafana/dashboards" / home.rsplit("/", 1)[1]).is_file()
    datasource = yaml.safe_load((ROOT / "grafana/provisioning/datasources/prometheus.yml").read_text())
    url = urlsplit(datasource["datasources"][0]["url"])
    assert url.hostname in compose["services"], "the datasource names the compose service"
    assert url.port in {container_port(p) for p in compose["services"][url.hostname]["ports"]}


def test_prometheus_scrapes_the_compose_broker(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((ROOT / "prometheus/prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "broker"]
    (target,) = [t for sc in job["static_configs"] for t in sc["targets"]]
    host, port = target.rsplit(":", 1)
    assert host in compose["services"]
    assert int(port) in {container_port(p) for p in compose["services"][host]["ports"]}


# -- the image --------------------------------------------------------------------------------------------------


def test_dockerfile() -> None:
    assert dockerfile("FROM") == ["python:3.11-slim"]
    (user,) = dockerfile("USER")
    assert user.split(":")[0] not in ("root", "0")
    runs = " && ".join(dockerfile("RUN"))
    assert re.search(r"\bpip install \.(\s|$)", runs), "installs the package itself, without extras"
    assert "[embedded]" not in runs
    assert re.search(r"\buseradd\b", runs)
    assert dockerfile("VOLUME") and "/data" in dockerfile("VOLUME")[0]
    assert env_pairs(" ".join(dockerfile("ENV")))["BROKER_DATA_DIR"] == "/data"
    (cmd,) = dockerfile("CMD")
    assert exec_form(cmd) == ["broker", "serve", "--host", "0.0.0.0"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "broker" in scripts


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching line wins; `!` re-includes; a match on a parent directory excludes."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = fnmatch.translate(pattern).replace(".*", "[^/]*")
        if pattern.startswith("**/"):
            regex = "(.*/)?" + fnmatch.translate(pattern[3:]).replace(".*", "[^/]*")
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_what_the_image_copies() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    sources = [src for args in dockerfile("COPY") for src in args.split()[:-1] if not src.startswith("--")]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not dockerignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
    for kept in ("app/__init__.py", "app/stores/lua", "app/api/openapi.yaml", "pyproject.toml", "README.md"):
        assert not dockerignored(kept, patterns), kept
    for dropped in (".venv", ".git", "data", "tests", "app/__pycache__", "app/stores/__pycache__/x.pyc"):
        assert dockerignored(dropped, patterns), dropped


# -- the documentation ------------------------------------------------------------------------------------------


def test_readme_explains_docker_compose() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "docker compose up" in readme, "README.md: say how to start the stack (`docker compose up`)"
    assert re.search(r"https?://localhost:3000", readme), "README.md: give Grafana's URL (http://localhost:3000)"
