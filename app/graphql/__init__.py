"""POST /graphql (queries, mutations) and /graphql over WebSocket (graphql-transport-ws subscriptions), Ariadne.

The route table is built before settings exist, so `graphql_app()` is one ASGI app that reads the lifespan's
settings on each request and hands it to the ariadne server configured for them (built once per configuration).
"""

from __future__ import annotations

import logging
from functools import cache
from importlib import resources

from ariadne import make_executable_schema
from ariadne.asgi import GraphQL
from ariadne.explorer import ExplorerGraphiQL, ExplorerHttp405
from graphql import GraphQLSchema
from starlette.types import Receive, Scope, Send

from app.graphql.context import ErrorLog, HttpHandler, WebSocketHandler, context_value, format_error
from app.graphql.limits import parse_query, query_validator, validation_rules
from app.graphql.resolvers import BINDABLES
from app.settings import Settings

log = logging.getLogger(__name__)


@cache
def schema() -> GraphQLSchema:
    sdl = (resources.files("app.graphql") / "schema.graphql").read_text(encoding="utf-8")
    return make_executable_schema(sdl, *BINDABLES, convert_names_case=True)


@cache
def server(introspection: bool, graphiql: bool, debug: bool = False) -> GraphQL:
    """ariadne's ASGI app. GraphiQL's page loads its scripts and styles from a CDN (esm.sh), so it is served only
    when BROKER_GRAPHIQL is on; it also needs introspection, without which GET answers 405."""
    if graphiql and not introspection:
        log.warning("BROKER_GRAPHIQL is on but BROKER_GRAPHQL_INTROSPECTION is off: GraphiQL is not served")
    return GraphQL(
        schema(),
        context_value=context_value,
        query_parser=parse_query,
        query_validator=query_validator(hide_suggestions=not introspection),
        validation_rules=validation_rules,
        debug=debug,
        introspection=introspection,
        explorer=ExplorerGraphiQL(title="Broker GraphiQL") if graphiql else ExplorerHttp405(),
        logger=ErrorLog(logging.getLogger("app.graphql.errors")),
        error_formatter=format_error,
        http_handler=HttpHandler(),
        websocket_handler=WebSocketHandler(),
    )


class GraphQLEndpoint:
    """The ASGI app routed at /graphql, for HTTP and WebSocket scopes."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        settings: Settings = scope["state"]["settings"]
        await server(settings.graphql_introspection, settings.graphiql)(scope, receive, send)


def graphql_app() -> GraphQLEndpoint:
    schema()  # built now: a missing or broken schema file stops the broker's start, not its first GraphQL request
    return GraphQLEndpoint()
