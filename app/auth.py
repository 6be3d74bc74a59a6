"""Bearer keys with roles (predict, annotate, admin), from settings. No keys: open, on loopback only."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Awaitable, Callable
from contextlib import suppress
from urllib.parse import urlsplit

from fastapi import Request

from app.errors import Forbidden, Unauthorized
from app.settings import Role

LOOPBACK = ("127.0.0.1", "::1", "localhost")
STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")


def key_digest(key: str) -> str:
    """Keys are compared and remembered by digest: the lookup takes the same time whatever the key's content."""
    return hashlib.sha256(key.encode()).hexdigest()


def roles_by_digest(keys: dict[str, list[Role]]) -> dict[str, list[Role]]:
    """The configured keys' roles, by the digest of each key (built once, when the app is)."""
    return {key_digest(key): roles for key, roles in keys.items()}


def presented_key(authorization: str, basic: bool) -> str:
    """The API key of an Authorization header: a bearer key, or where basic is allowed the password
    of basic auth (what Label Studio sends an ML backend); "" if there is none."""
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer":
        return credentials.strip()
    if basic and scheme.lower() == "basic":
        with suppress(ValueError):
            return base64.b64decode(credentials.strip(), validate=True).decode().partition(":")[2]
    return ""


def require(role: Role | None, basic: bool = False) -> Callable[[Request], Awaitable[str]]:
    """A FastAPI dependency that admits a request whose bearer key has the role (None: any valid key).

    basic: also take the key as the password of basic auth. Only for Label Studio's routes:
    browsers remember basic credentials and send them to any page's requests, bearer keys not.
    It returns the caller: a digest of its key, or "" when no keys are configured.
    """

    async def check(request: Request) -> str:
        roles_by_digest = request.app.state.roles_by_digest
        if not roles_by_digest:
            return ""
        key = presented_key(request.headers.get("authorization", ""), basic)
        if not key:
            raise Unauthorized(
                "missing API key: send 'Authorization: Bearer <key>'" + (" (or basic auth, the key as password)" if basic else "")
            )
        caller = key_digest(key)
        roles = roles_by_digest.get(caller)
        if roles is None:
            raise Unauthorized("unknown API key")
        if role is not None and role not in roles and "admin" not in roles:
            raise Forbidden(f"this key lacks the {role!r} role")
        return caller

    return check


def loopback_name(host: str) -> bool:
    """Whether a Host or Origin host names this machine's loopback (with or without a port)."""
    name = urlsplit(f"//{host}").hostname or ""
    return name in LOOPBACK


def browser_request_refusal(method: str, headers: dict[str, str]) -> str | None:
    """Why a request without keys must be refused, if it may come from a web page rather than a client.

    Without keys the service trusts loopback. A page in a browser on the same machine can reach it
    too: by a name that resolves to 127.0.0.1 (DNS rebinding: the Host header gives it away) or
    with a cross-origin form POST (a CORS simple request: the Origin header gives it away).
    """
    host = headers.get("host", "")
    if not loopback_name(host):
        return f"Host {host[:100]!r} is not a loopback name; without API keys only 127.0.0.1, ::1 and localhost are served"
    origin = headers.get("origin")
    if method in STATE_CHANGING and origin is not None and not loopback_name(urlsplit(origin).netloc):
        return f"cross-origin {method} from {origin[:100]!r} refused: without API keys only loopback pages may change state"
    return None


def safe_host(host: str, keys: dict[str, list[Role]]) -> tuple[str, str | None]:
    """The host to bind: with no keys configured only loopback; returns it and a warning, if any."""
    if keys or host in LOOPBACK:
        return host, None if keys else "no API keys configured: listening on loopback only, without auth"
    return "127.0.0.1", f"no API keys configured: refusing to listen on {host}; listening on 127.0.0.1 only"
