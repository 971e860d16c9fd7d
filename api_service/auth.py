"""Who is calling: the main app (X-API-Key), a user or an admin (HS256 JWT)."""
from __future__ import annotations

import hmac
import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import jwt
from flask import current_app, g, request
from limits import parse

from shared.errors import Forbidden, RateLimited, Unauthorized

log = logging.getLogger("txmon.auth")

ROLES = ("user", "admin")
USER_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # DESIGN.md's id alphabet


@dataclass(frozen=True)
class Principal:
    kind: str  # "service", "user" or "admin"
    user_id: str | None = None
    expires_at: float | None = None  # the token's exp (epoch s); a websocket closes then


def mint_token(user_id: str, *, admin: bool = False, ttl: timedelta = timedelta(hours=12),
               secret: str | None = None) -> str:
    """A signed JWT for ``user_id`` (what the main app does; used by the dev CLI and tests)."""
    now = datetime.now(timezone.utc)
    cfg = current_app.config
    claims = {"sub": user_id, "role": "admin" if admin else "user", "iat": now, "exp": now + ttl}
    if cfg.get("JWT_ISSUER"):
        claims["iss"] = cfg["JWT_ISSUER"]
    if cfg.get("JWT_AUDIENCE"):
        claims["aud"] = cfg["JWT_AUDIENCE"]
    return jwt.encode(claims, secret or cfg["JWT_SECRET"], algorithm="HS256")


def decode_token(token: str) -> Principal:
    """Verify signature, expiry and claims; Unauthorized on anything wrong."""
    cfg = current_app.config
    issuer, audience = cfg["JWT_ISSUER"], cfg["JWT_AUDIENCE"]
    require = ["exp", "sub"] + (["iss"] if issuer else []) + (["aud"] if audience else [])
    try:
        claims = jwt.decode(token, cfg["JWT_SECRET"], algorithms=["HS256"], issuer=issuer,
                            audience=audience, options={"require": require,
                                                        "verify_aud": bool(audience)})
    except jwt.PyJWTError:
        raise Unauthorized("The token is invalid or expired.") from None
    # A leaked long-lived token would stay usable: bound exp - iat (or exp - now without iat).
    exp, iat = claims["exp"], claims.get("iat")
    start = iat if isinstance(iat, (int, float)) else datetime.now(timezone.utc).timestamp()
    if exp - start > cfg["JWT_MAX_TTL_S"]:
        raise Unauthorized("The token's lifetime is too long.")
    sub, role = claims.get("sub"), claims.get("role", "user")
    if not isinstance(sub, str) or not USER_ID.fullmatch(sub) or role not in ROLES:
        raise Unauthorized("The token's claims are invalid.")
    return Principal(role, sub, float(exp))


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


def _failures_limit():
    return parse(current_app.config["RATELIMIT_AUTH_FAILURES"])


def refuse_blocked_address() -> None:
    """429 before any check once this address failed too often (so guessing learns nothing)."""
    from api_service import limiter

    try:
        allowed = limiter.limiter.test(_failures_limit(), "auth-failures", _address())
    except Exception:  # limit storage down: authentication must still work
        log.warning("Rate limit storage unreachable; failed-authentication limit not checked")
        return
    if not allowed:
        raise RateLimited("Too many failed authentications from this address.")


def count_failure() -> None:
    from api_service import limiter

    try:
        limiter.limiter.hit(_failures_limit(), "auth-failures", _address())
    except Exception:
        log.warning("Rate limit storage unreachable; failed authentication not counted")


def _address() -> str:
    return request.remote_addr or "unknown"


def _verify() -> Principal:
    key = request.headers.get("X-API-Key")
    if key is not None:
        if not _service_key_ok(key):
            raise Unauthorized("The API key is not valid.")
        return Principal("service")
    token = _bearer()
    if token is not None:
        return decode_token(token)
    raise Unauthorized("Credentials are required.")


def verified_principal() -> Principal | None:
    """The request's verified caller, once per request (the rate-limit key uses it too);
    None when the credentials fail, which is counted against the client address."""
    if "txmon_auth" not in g:
        try:
            refuse_blocked_address()
            g.txmon_auth = (_verify(), None)
        except RateLimited as exc:
            g.txmon_auth = (None, exc)
        except Unauthorized as exc:
            if request.headers.get("X-API-Key") is not None or "Authorization" in request.headers:
                count_failure()
            g.txmon_auth = (None, exc)
    return g.txmon_auth[0]


def authenticate(required: str) -> Principal:
    """The caller, if allowed on a route for ``required`` ("service", "user" or "admin")."""
    principal = verified_principal()
    if principal is None:
        raise g.txmon_auth[1]
    if required == "service" and principal.kind != "service":
        raise Forbidden("This route is for the main app's service key.")
    if required == "admin" and principal.kind != "admin":
        raise Forbidden("This route needs an admin token.")
    if required == "user" and principal.kind == "service":
        raise Forbidden("This route needs a user token.")
    g.principal = principal
    return principal
