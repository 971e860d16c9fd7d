"""Who is calling: the main app (X-API-Key), a user or an admin (HS256 JWT)."""
from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import jwt
from flask import current_app, g, request

from shared.errors import Forbidden, Unauthorized

ROLES = ("user", "admin")
USER_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # DESIGN.md's id alphabet


@dataclass(frozen=True)
class Principal:
    kind: str  # "service", "user" or "admin"
    user_id: str | None = None


def mint_token(user_id: str, *, admin: bool = False, ttl: timedelta = timedelta(hours=12),
               secret: str | None = None) -> str:
    """A signed JWT for ``user_id`` (what the main app does; used by the dev CLI and tests)."""
    now = datetime.now(timezone.utc)
    claims = {"sub": user_id, "role": "admin" if admin else "user", "iat": now, "exp": now + ttl}
    return jwt.encode(claims, secret or current_app.config["JWT_SECRET"], algorithm="HS256")


def decode_token(token: str) -> Principal:
    """Verify signature, expiry and claims; Unauthorized on anything wrong."""
    try:
        claims = jwt.decode(token, current_app.config["JWT_SECRET"], algorithms=["HS256"],
                            options={"require": ["exp", "sub"]})
    except jwt.PyJWTError:
        raise Unauthorized("The token is invalid or expired.") from None
    sub, role = claims.get("sub"), claims.get("role", "user")
    if not isinstance(sub, str) or not USER_ID.fullmatch(sub) or role not in ROLES:
        raise Unauthorized("The token's claims are invalid.")
    return Principal(role, sub)


def _service_key_ok(key: str) -> bool:
    # Compare against every key without an early exit so timing reveals nothing.
    ok = False
    for candidate in current_app.config["SERVICE_KEYS"]:
        ok |= hmac.compare_digest(key.encode(), candidate.encode())
    return ok


def _bearer() -> str | None:
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Authorization must be 'Bearer <token>'.")
    return token.strip()


def authenticate(required: str) -> Principal:
    """The caller, if allowed on a route for ``required`` ("service", "user" or "admin")."""
    key = request.headers.get("X-API-Key")
    token = _bearer()
    if key is not None:
        if not _service_key_ok(key):
            raise Unauthorized("The API key is not valid.")
        principal = Principal("service")
    elif token is not None:
        principal = decode_token(token)
    else:
        raise Unauthorized("Credentials are required.")
    if required == "service" and principal.kind != "service":
        raise Forbidden("This route is for the main app's service key.")
    if required == "admin" and principal.kind != "admin":
        raise Forbidden("This route needs an admin token.")
    if required == "user" and principal.kind == "service":
        raise Forbidden("This route needs a user token.")
    g.principal = principal
    return principal
