"""Load named SQL blocks (`-- name: X`) from the .sql files beside the stores."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from operator import itemgetter
from typing import Any

_NAMED = re.compile(r"(?<!:):([A-Za-z_][A-Za-z0-9_]*)")


@cache
def load(filename: str) -> dict[str, str]:
    text = (resources.files("app.stores") / "sql" / filename).read_text()
    blocks: dict[str, str] = {}
    name: str | None = None
    lines: list[str] = []
    for line in text.splitlines():
        if line.startswith("-- name:"):
            if name:
                blocks[name] = "\n".join(lines).strip()
            name, lines = line.removeprefix("-- name:").strip(), []
        elif name and not line.startswith("--"):
            lines.append(line)
    if name:
        blocks[name] = "\n".join(lines).strip()
    return blocks


@dataclass(frozen=True)
class Positional:
    """A named block bound by position: sqlite3 binds a mapping's parameters by looking each name up, row by row,
    which cost a third of an INSERT of a small row here; the block stays named, and `pick` takes the parameters out
    of each mapping in the statement's order (in C). For statements without a ':name' inside a string literal."""

    sql: str
    pick: Callable[[Mapping[str, Any]], tuple[Any, ...]]

    @classmethod
    def of(cls, named_sql: str) -> Positional:
        names = _NAMED.findall(named_sql)
        assert len(names) > 1, "a statement of one parameter needs no picking"
        return cls(_NAMED.sub("?", named_sql), itemgetter(*names))
