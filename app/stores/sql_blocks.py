"""Load named SQL blocks (`-- name: X`) from the .sql files beside the stores."""

from __future__ import annotations

from functools import cache
from importlib import resources


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
