"""The ingress's guard: an ASGI middleware that runs before any route or body parsing.

In order, for every request but ``GET /healthz``:

1. **Who.** ``Authorization: Bearer <key>`` is looked up in the ``KeyRing``; a missing,
   unknown or revoked key is 401 (with ``WWW-Authenticate: Bearer``), the same answer
   for all three, so a caller learns nothing about which keys exist.
2. **May they.** The route's role (``required_role``); without it, 403.
3. **How often.** The tenant's token bucket, shared by every replica
   (``fleet.runtime.ratelimit``): over it, 429 with ``Retry-After``.
4. **How much.** A body over ``max_body_bytes`` is 413, from its ``Content-Length``
   before a byte is read, or while it streams in (a chunked body is read up to the
   limit, then handed on).

The caller's ``Principal`` goes to the route in ``request.state.principal``. With
authentication off (``ingress.auth.mode: none``, loopback only) every caller is the
anonymous principal, with every role and no tenant. Running before the routes means an
unauthenticated request never reaches validation: it gets 401, not a 422 that would
describe the API.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import orjson

from fleet.runtime.ratelimit import LeasedTokens, LimiterUnavailable
from fleet.security.keys import KeyRing, Principal, Role, bearer

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PUBLIC_PATHS = frozenset({"/healthz"})
ANONYMOUS = Principal("anonymous", "", frozenset(Role))
UNAUTHORIZED = {"detail": "unauthorized: send Authorization: Bearer <key>"}
FORBIDDEN = {"detail": "forbidden: this key does not have the role this route needs"}


def required_role(method: str, path: str) -> Role | None:
    """The role a route needs (None: public)."""
    if path in PUBLIC_PATHS:
        return None
    if path == "/metrics":
        return Role.ADMIN
    if path == "/tasks" or path.startswith("/tasks/"):
        return Role.SUBMIT if method in ("POST", "DELETE") else Role.READ
    return Role.READ  # /status (a tenant's own view), /docs, /openapi.json, the rest


@dataclass
class GuardConfig:
    """What one ingress replica enforces (set when the replica starts)."""

    keys: KeyRing | None  # None: authentication off
    limiter: LeasedTokens | None
    max_body_bytes: int


async def reply(
    send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()
) -> None:
    data = orjson.dumps(body)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


class Guard:
    """See the module docstring; ``config()`` returns the replica's ``GuardConfig``
    (None until the replica has set it: then every request is 503)."""

    def __init__(self, app: ASGIApp, config: Callable[[], GuardConfig | None]):
        self.app = app
        self.config = config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope.get("path", ""), scope.get("method", "GET")
        root = scope.get("root_path", "")
        if root and path.startswith(root):  # an app under a route prefix (Serve's)
            path = path[len(root) :] or "/"
        role = required_role(method, path)
        if role is None:
            await self.app(scope, receive, send)
            return
        cfg = self.config()
        if cfg is None:
            await reply(send, 503, {"detail": "the ingress is starting"})
            return
        headers = _headers(scope)
        if cfg.keys is None:
            who: Principal | None = ANONYMOUS
        else:
            raw = headers.get(b"authorization")
            who = cfg.keys.authenticate(bearer(raw.decode("latin-1")) if raw else None)
        if who is None:
            await reply(send, 401, UNAUTHORIZED, [(b"www-authenticate", b"Bearer")])
            return
        if not who.may(role):
            await reply(send, 403, FORBIDDEN)
            return
        if cfg.limiter is not None and who.tenant:
            try:
                ok, wait_s = await cfg.limiter.acquire(who.tenant)
            except LimiterUnavailable:
                await reply(
                    send,
                    503,
                    {"detail": "the rate limiter is restarting; retry shortly"},
                    [(b"retry-after", b"1")],
                )
                return
            if not ok:
                after = max(1, math.ceil(wait_s))
                await reply(
                    send,
                    429,
                    {
                        "detail": "too many requests for this tenant "
                        "(ingress.limits.tenant_requests_per_s)",
                        "retry_after_s": after,
                    },
                    [(b"retry-after", str(after).encode())],
                )
                return
        scope.setdefault("state", {})["principal"] = who
        limit = cfg.max_body_bytes
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await reply(send, 400, {"detail": "Content-Length is not a number"})
                return
            if declared > limit:
                await reply(send, 413, _too_large(declared, limit))
                return
            await self.app(scope, receive, send)
            return
        if method in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        # No Content-Length (chunked): read up to the limit, then hand the body on.
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                break
            body = msg.get("body", b"")
            size += len(body)
            if size > limit:
                await reply(send, 413, _too_large(size, limit, streamed=True))
                return
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        whole = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": whole, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _too_large(size: int, limit: int, streamed: bool = False) -> dict[str, Any]:
    what = f"over {limit} bytes so far" if streamed else f"{size} bytes"
    return {
        "detail": f"request body of {what} is over the limit of {limit} bytes "
        "(ingress.limits.max_body_bytes)"
    }


def _headers(scope: Scope) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for k, v in scope.get("headers", ()):
        out[k.lower()] = v
    return out
