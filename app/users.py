"""User management shared by the REST routes, the CLI and first start: one place for the rules."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterable

from app.auth import hash_password
from app.errors import UserExists, ValidationFailed
from app.models import Role, User
from app.stores.sqlite_journal import SqliteJournalStore

MIN_PASSWORD_LENGTH = 8


def parse_roles(names: Iterable[str]) -> frozenset[Role]:
    roles = set()
    for name in names:
        try:
            roles.add(Role(name.strip()))
        except ValueError:
            choices = ", ".join(r.value for r in Role)
            raise ValidationFailed([{"field": "roles", "message": f"'{name}' is not one of {choices}"}]) from None
    if not roles:
        raise ValidationFailed([{"field": "roles", "message": "at least one role is required"}])
    return frozenset(roles)


async def add_user(journal: SqliteJournalStore, username: str, password: str, roles: frozenset[Role]) -> User:
    if not username.strip() or len(username) > 128:
        raise ValidationFailed([{"field": "username", "message": "must be 1-128 characters"}])
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValidationFailed(
            [{"field": "password", "message": f"must be at least {MIN_PASSWORD_LENGTH} characters"}]
        )
    # argon2 is deliberately slow: hash off the event loop.
    password_hash = await asyncio.to_thread(hash_password, password)
    await journal.add_user(username, password_hash, roles)
    found = await journal.user_with_hash(username)
    assert found is not None
    return found[0]


async def remove_user(journal: SqliteJournalStore, username: str) -> None:
    await journal.remove_user(username)


async def ensure_admin(journal: SqliteJournalStore, username: str, password: str | None) -> str | None:
    """Create the first admin if there are no users. Returns a generated password to print once, or None."""
    if await journal.users():
        return None
    generated = None
    if not password:
        password = generated = secrets.token_urlsafe(18)
    password_hash = await asyncio.to_thread(hash_password, password)
    try:
        await journal.add_user(username, password_hash, {Role.ADMIN})
    except UserExists:  # another broker process starting at the same time created it
        return None
    return generated
