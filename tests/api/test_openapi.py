"""The OpenAPI document (app/api/openapi.yaml) is valid, matches the route table, and is served with its viewer."""

from __future__ import annotations

import re
from html.parser import HTMLParser

from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from starlette.routing import Mount, Route, WebSocketRoute

from app import __version__
from app.api import hot
from app.api.ops import openapi_document
from app.application import routes
from tests.conftest import ApiClient

HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
OPEN_OPERATIONS = {
    ("/", "get"),
    ("/health/live", "get"),
    ("/health/ready", "get"),
    ("/openapi.json", "get"),
    ("/docs", "get"),
    ("/login", "post"),
    ("/metrics", "get"),  # open unless BROKER_METRICS_TOKEN is set
    ("/graphql", "get"),  # GraphiQL when enabled (405 otherwise); the GraphQL calls themselves need a token
}
PATH_EXAMPLES = {"queue": "orders", "message_id": "1", "username": "someone", "filename": "broker.log"}


def routed_operations() -> set[tuple[str, str]]:
    """(path, method) of every route the app serves (the hot path's and Starlette's), without the HEAD Starlette
    adds to GET, nor mounts."""
    operations = set()
    for route in routes():
        if isinstance(route, Mount | WebSocketRoute):
            continue
        assert isinstance(route, Route)
        path = re.sub(r"\{(\w+):[^}]+\}", r"{\1}", route.path)  # "{id:int}" is "{id}" in OpenAPI
        operations |= {(path, method.lower()) for method in route.methods or () if method != "HEAD"}
    return operations | {(path, method.lower()) for path, method in hot.operations()}


def documented_operations() -> set[tuple[str, str]]:
    return {
        (path, method)
        for path, item in openapi_document()["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }


def test_the_document_is_a_valid_openapi_3_1_document() -> None:
    document = openapi_document()
    assert document["openapi"].startswith("3.1.")
    assert document["info"]["version"] == __version__
    validate(document, cls=OpenAPIV31SpecValidator)


def test_every_route_is_documented_and_every_documented_operation_is_routed() -> None:
    routed, documented = routed_operations(), documented_operations()
    assert routed - documented == set(), "routes missing from app/api/openapi.yaml"
    assert documented - routed == set(), "operations in app/api/openapi.yaml that no route serves"


def test_only_the_open_routes_drop_the_global_bearer_security() -> None:
    document = openapi_document()
    assert document["security"] == [{"bearerAuth": []}]
    scheme = document["components"]["securitySchemes"]["bearerAuth"]
    assert scheme == {**scheme, "type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    open_operations = {
        (path, method)
        for path, method in documented_operations()
        if document["paths"][path][method].get("security") == []
    }
    assert open_operations == OPEN_OPERATIONS


async def test_secured_operations_answer_401_without_a_token_and_open_ones_do_not(client: ApiClient) -> None:
    for path, method in sorted(documented_operations()):
        url = path.format(**PATH_EXAMPLES)
        response = await client.request(method.upper(), url)
        if (path, method) in OPEN_OPERATIONS:
            assert response.status_code != 401, (method, path, response.text)
        else:
            assert response.status_code == 401, (method, path, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            assert "401" in openapi_document()["paths"][path][method]["responses"]


async def test_openapi_json_serves_the_same_document_without_a_token(client: ApiClient) -> None:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == openapi_document()


class AssetLinks(HTMLParser):
    """Collects the URLs a page loads: script src and link href."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = {"script": "src", "link": "href", "img": "src"}.get(tag)
        self.urls += [value for name, value in attrs if name == wanted and value]


async def test_docs_page_loads_swagger_ui_from_the_broker_itself(client: ApiClient) -> None:
    response = await client.get("/docs")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    assert "http://" not in page and "https://" not in page
    assert "/openapi.json" in page
    links = AssetLinks()
    links.feed(page)
    assert "/docs/static/swagger-ui-bundle.js" in links.urls
    assert all(url.startswith("/docs/static/") for url in links.urls), links.urls
    for url in links.urls:
        assert (await client.get(url)).status_code == 200, url


async def test_the_swagger_ui_bundle_is_served_as_javascript(client: ApiClient) -> None:
    response = await client.get("/docs/static/swagger-ui-bundle.js")
    assert response.status_code == 200
    assert "javascript" in response.headers["content-type"]
    assert "SwaggerUIBundle" in response.text
