"""Bounds on what one GraphQL document may ask for, checked before anything runs: size, depth and cost.

Size: the parser stops at MAX_TOKENS tokens (a query is CPU work before it is validated). Depth: fields nested
in fields, through fragments, at most MAX_DEPTH (introspection's own fields are not counted, so GraphiQL's schema
query passes when introspection is on). Cost: ariadne's cost validator with COST_MAP: every field costs 1, list
fields multiply what they contain by their size argument, fields that read the journal cost more. The error's
`extensions.code` is `query_too_deep` or `query_too_expensive`.
"""

from __future__ import annotations

from functools import partial
from typing import Any, cast

from ariadne.types import QueryValidator
from ariadne.validation import cost_validator
from graphql import (
    ASTValidationRule,
    DocumentNode,
    FieldNode,
    FragmentSpreadNode,
    GraphQLError,
    InlineFragmentNode,
    OperationDefinitionNode,
    SelectionSetNode,
    ValidationContext,
    ValidationRule,
    parse,
    validate,
)

MAX_DEPTH = 6
MAX_COST = 2000
MAX_TOKENS = 5000
MAX_COMMENTS = 500

HISTORY = {"complexity": 5}  # one journal read per message
COST_MAP: dict[str, dict[str, Any]] = {
    "Query": {
        "queues": {"complexity": 10},
        "messages": {"complexity": 1, "multipliers": ["limit"]},
        "messageHistory": HISTORY,
        "stats": {"complexity": 10},
    },
    "Mutation": {
        "createQueue": {"complexity": 5},
        "updateQueue": {"complexity": 5},
        "deleteQueue": {"complexity": 10},
        "purgeQueue": {"complexity": 10},
        "redriveQueue": {"complexity": 10},
        "consume": {"complexity": 1, "multipliers": ["max"]},
    },
    "Message": {"history": HISTORY},
    "Delivery": {"history": HISTORY},
}


def parse_query(context: Any, data: dict[str, Any]) -> DocumentNode:
    """ariadne's `query_parser`: graphql-core's parser with a bound on tokens."""
    return parse(data["query"], max_lexical_tokens=MAX_TOKENS, max_comments=MAX_COMMENTS)


def query_validator(*, hide_suggestions: bool) -> QueryValidator:
    """graphql-core's validation; without introspection, errors do not suggest field names ("Did you mean")."""
    return cast(QueryValidator, partial(validate, hide_suggestions=hide_suggestions))


def validation_rules(context: Any, document: DocumentNode, data: dict[str, Any]) -> list[type[ASTValidationRule]]:
    """ariadne's `validation_rules`, per request: the cost depends on the variables (`limit: $n`)."""
    variables = data.get("variables")
    return [
        DepthLimit,
        cost_validator(MAX_COST, default_cost=1, variables=variables if isinstance(variables, dict) else None,
                       cost_map=COST_MAP),
    ]


class DepthLimit(ValidationRule):
    """Refuse an operation whose fields nest deeper than MAX_DEPTH."""

    def __init__(self, context: ValidationContext) -> None:
        super().__init__(context)
        self._fragment_depths: dict[str, int] = {}

    def enter_operation_definition(self, node: OperationDefinitionNode, *_args: Any) -> None:
        depth = self._depth(node.selection_set, frozenset())
        if depth > MAX_DEPTH:
            self.report_error(GraphQLError(
                f"The query nests fields {depth} deep; the limit is {MAX_DEPTH}", node,
                extensions={"code": "query_too_deep"},
            ))

    def _depth(self, selection_set: SelectionSetNode | None, visiting: frozenset[str]) -> int:
        """How many levels of fields `selection_set` holds. A fragment's depth is computed once (a document can
        spread fragments within fragments many times); a cycle counts as nothing (graphql-core refuses it)."""
        if selection_set is None:
            return 0
        deepest = 0
        for selection in selection_set.selections:
            if isinstance(selection, FieldNode):
                if not selection.name.value.startswith("__"):
                    deepest = max(deepest, 1 + self._depth(selection.selection_set, visiting))
            elif isinstance(selection, InlineFragmentNode):
                deepest = max(deepest, self._depth(selection.selection_set, visiting))
            elif isinstance(selection, FragmentSpreadNode):
                deepest = max(deepest, self._fragment_depth(selection.name.value, visiting))
        return deepest

    def _fragment_depth(self, name: str, visiting: frozenset[str]) -> int:
        if name in visiting:
            return 0
        if name not in self._fragment_depths:
            fragment = self.context.get_fragment(name)
            self._fragment_depths[name] = (
                self._depth(fragment.selection_set, visiting | {name}) if fragment is not None else 0
            )
        return self._fragment_depths[name]
