"""Bearer keys with roles (predict, annotate, admin), from settings. No keys: open, on loopback only."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Request

from app.errors import Forbidden, Unauthorized
from app.settings import Role

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def require(role: Role) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency that admits a request whose bearer key has the role."""

    async def check(request: Request) -> None:
        keys = request.app.state.settings.api_keys
        if not keys:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise Unauthorized("missing bearer key: send 'Authorization: Bearer <key>'")
        if key not in keys:
            raise Unauthorized("unknown API key")
        if role not in keys[key] and "admin" not in keys[key]:
            raise Forbidden(f"this key lacks the {role!r} role")

    return check


def safe_host(host: str, keys: dict[str, list[Role]]) -> tuple[str, str | None]:
    """The host to bind: with no keys configured only loopback; returns it and a warning, if any."""
    if keys or host in LOOPBACK:
        return host, None if keys else "no API keys configured: listening on loopback only, without auth"
    return "127.0.0.1", f"no API keys configured: refusing to listen on {host}; listening on 127.0.0.1 only"
