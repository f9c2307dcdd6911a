"""Passwords (argon2) and tokens (JWT, HS256 only, via joserfc), and the roles they carry."""

from __future__ import annotations

import os
import secrets
import time
from collections import OrderedDict
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import OctKey

from app.errors import Unauthorized
from app.models import Principal, Role
from app.settings import SettingsError

ALGORITHM = "HS256"
MIN_SECRET_BYTES = 16
_hasher = PasswordHasher()
# Compared against when a user does not exist, so a login takes as long whether or not the name is known.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def load_or_create_secret(configured: str | None, data_dir: Path) -> bytes:
    """The signing secret: BROKER_JWT_SECRET, else one generated at first start and kept in the data dir."""
    if configured:
        secret = configured.encode()
        if len(secret) < MIN_SECRET_BYTES:
            raise SettingsError(f"BROKER_JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes long")
        return secret
    path = data_dir / "jwt_secret"
    data_dir.mkdir(parents=True, exist_ok=True)
    try:  # created exactly once, even by several broker processes starting together
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(100):  # another process may still be writing it
            secret = path.read_text().strip().encode()
            if secret:
                return secret
            time.sleep(0.01)
        raise SettingsError(f"{path} is empty; delete it to have a new secret generated") from None
    with os.fdopen(fd, "w") as file:
        file.write(secrets.token_urlsafe(48))
    return path.read_text().strip().encode()


class TokenService:
    """Issues and verifies access/refresh tokens. Verified access tokens are cached until they expire, since
    verifying a signature costs more than the rest of a publish."""

    def __init__(self, secret: bytes, *, access_seconds: int, refresh_seconds: int, cache_size: int = 10_000):
        self._key = OctKey.import_key(secret)
        self.access_seconds = access_seconds
        self.refresh_seconds = refresh_seconds
        self._cache: OrderedDict[str, tuple[Principal, float]] = OrderedDict()
        self._cache_size = cache_size
        self._registries = {
            kind: jwt.JWTClaimsRegistry(
                exp={"essential": True},
                iat={"essential": True},
                sub={"essential": True},
                roles={"essential": True},
                type={"essential": True, "values": [kind]},
            )
            for kind in ("access", "refresh")
        }

    def issue(self, username: str, roles: frozenset[Role]) -> dict[str, object]:
        now = int(time.time())
        names = sorted(r.value for r in roles)
        pair = {
            kind: jwt.encode(
                {"alg": ALGORITHM},
                {"sub": username, "type": kind, "roles": names, "iat": now, "exp": now + ttl,
                 "jti": secrets.token_hex(8)},
                self._key,
            )
            for kind, ttl in (("access", self.access_seconds), ("refresh", self.refresh_seconds))
        }
        return {
            "access_token": pair["access"],
            "refresh_token": pair["refresh"],
            "token_type": "bearer",
            "expires_in": self.access_seconds,
        }

    def verify(self, token: str, kind: str = "access") -> Principal:
        now = time.time()
        if kind == "access":
            cached = self._cache.get(token)
            if cached is not None and cached[1] > now:
                return cached[0]
        try:
            decoded = jwt.decode(token, self._key, algorithms=[ALGORITHM])
            self._registries[kind].validate(decoded.claims)
            claims = decoded.claims
            principal = Principal(str(claims["sub"]), frozenset(Role(r) for r in claims.get("roles", [])))
            expires = float(claims["exp"])
        except (JoseError, ValueError, KeyError, TypeError) as exc:
            raise Unauthorized(f"Invalid {kind} token: {_reason(exc)}", code="invalid_token") from exc
        if kind == "access":
            self._cache[token] = (principal, expires)
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return principal


def _reason(exc: Exception) -> str:
    if isinstance(exc, JoseError):
        return exc.description or exc.error
    return "malformed claims"
