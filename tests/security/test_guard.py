"""The ingress guard (ASGI middleware) in front of a stand-in app, without Ray: 401, 403,
429, 413 before any route runs; and the redaction of secrets."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request

from fleet.runtime.ratelimit import LeasedTokens, LimiterUnavailable
from fleet.security.asgi import Guard, GuardConfig, required_role
from fleet.security.keys import KeyFile, KeyRing, Role
from fleet.security.redact import REDACTED, Redactor, redactor_for
from tests.utils import FakeClock, make_spec, pool


class Bucket:
    """A stand-in for the shared limiter actor: ``take.remote`` grants from a budget."""

    def __init__(self, tokens: int, fail: bool = False):
        self.tokens, self.fail, self.calls = tokens, fail, 0
        self.take = self

    async def remote(self, tenant: str, n: int) -> tuple[int, float]:
        self.calls += 1
        if self.fail:
            raise ConnectionError("limiter down")
        got = min(n, self.tokens)
        self.tokens -= got
        return got, (0.0 if got else 2.5)


def _app(cfg: GuardConfig) -> tuple[FastAPI, list[Any]]:
    app = FastAPI()
    seen: list[Any] = []

    @app.post("/tasks")
    async def submit(request: Request) -> dict[str, Any]:
        body = await request.body()
        seen.append((request.state.principal.tenant, len(body)))
        return {"ok": True}

    @app.get("/tasks/{i}")
    async def read(i: str, request: Request) -> dict[str, Any]:
        return {"tenant": request.state.principal.tenant}

    @app.get("/metrics")
    async def metrics() -> dict[str, Any]:
        return {}

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    app.add_middleware(Guard, config=lambda: cfg)
    return app, seen


def _run(app: FastAPI, calls: list[tuple[str, str, dict[str, Any]]]) -> list[httpx.Response]:
    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return [await c.request(m, u, **kw) for m, u, kw in calls]

    return asyncio.run(go())


@pytest.fixture
def keys(tmp_path):
    f = KeyFile(tmp_path / "keys.json")
    submit, _ = f.create("acme", ["submit"])
    reader, _ = f.create("acme", ["read"])
    admin, _ = f.create("ops", ["admin", "read"])
    ring = KeyRing(tmp_path / "keys.json", 1.0, FakeClock(0.0))
    return ring, {"submit": submit, "read": reader, "admin": admin}


def _h(key: str) -> dict[str, Any]:
    return {"headers": {"Authorization": f"Bearer {key}"}}


def test_no_key_or_a_wrong_key_is_401_alike_and_a_missing_role_is_403(keys):
    ring, k = keys
    app, seen = _app(GuardConfig(ring, None, 1024))
    r = _run(
        app,
        [
            ("POST", "/tasks", {"json": {}}),
            ("POST", "/tasks", {"json": {}, **_h("fleet_" + "x" * 43)}),
            ("POST", "/tasks", {"json": {}, "headers": {"Authorization": "Basic abc"}}),
            ("POST", "/tasks", {"json": {}, **_h(k["read"])}),
            ("GET", "/metrics", _h(k["read"])),
            ("GET", "/tasks/1", _h(k["submit"])),
            ("POST", "/tasks", {"json": {}, **_h(k["submit"])}),
            ("GET", "/tasks/1", _h(k["read"])),
            ("GET", "/metrics", _h(k["admin"])),
            ("GET", "/healthz", {}),
        ],
    )
    assert [x.status_code for x in r] == [401, 401, 401, 403, 403, 403, 200, 200, 200, 200]
    assert r[0].json() == r[1].json() == r[2].json()  # nothing tells the three apart
    assert r[0].headers["www-authenticate"] == "Bearer"
    assert seen == [("acme", 2)] and r[7].json() == {"tenant": "acme"}


def test_a_large_body_is_413_before_the_route_reads_it(keys):
    ring, k = keys
    app, seen = _app(GuardConfig(ring, None, 1024))

    async def chunks():
        for _ in range(10):
            yield b"x" * 200

    async def small():
        for c in (b"ab", b"cd"):
            yield c

    r = _run(
        app,
        [
            ("POST", "/tasks", {"content": b"x" * 1025, **_h(k["submit"])}),
            ("POST", "/tasks", {"content": chunks(), **_h(k["submit"])}),  # chunked
            ("POST", "/tasks", {"content": b"x" * 1024, **_h(k["submit"])}),
            ("POST", "/tasks", {"content": small(), **_h(k["submit"])}),
        ],
    )
    assert [x.status_code for x in r] == [413, 413, 200, 200]
    assert "max_body_bytes" in r[0].json()["detail"]
    assert seen == [("acme", 1024), ("acme", 4)]  # the chunked body reached the route whole


def test_a_tenant_over_its_tokens_is_429_with_retry_after_and_an_outage_is_503(keys):
    ring, k = keys
    bucket = Bucket(tokens=3)
    tokens = LeasedTokens(bucket, rate_per_s=10, burst=3)
    app, seen = _app(GuardConfig(ring, tokens, 1024))
    r = _run(app, [("POST", "/tasks", {"json": {}, **_h(k["submit"])}) for _ in range(5)])
    assert [x.status_code for x in r] == [200, 200, 200, 429, 429]
    assert r[3].headers["retry-after"] == "3" and r[3].json()["retry_after_s"] == 3
    assert len(seen) == 3 and bucket.calls == 5  # a chunk of 1 per ask (rate 10 x 0.1)
    down = _app(GuardConfig(ring, LeasedTokens(Bucket(0, fail=True), 10, 3), 1024))[0]
    (r,) = _run(down, [("POST", "/tasks", {"json": {}, **_h(k["submit"])})])
    assert r.status_code == 503 and r.headers["retry-after"] == "1"


def test_leased_tokens_never_spend_more_than_the_shared_bucket_granted():
    clock = FakeClock(0.0)
    bucket = Bucket(tokens=25)
    a = LeasedTokens(bucket, rate_per_s=100, burst=50, clock=clock)  # chunks of 10
    b = LeasedTokens(bucket, rate_per_s=100, burst=50, clock=clock)

    async def spend() -> int:
        ok = 0
        for t in (a, b) * 40:
            ok += (await t.acquire("acme"))[0]
        return ok

    assert asyncio.run(spend()) == 25
    with pytest.raises(LimiterUnavailable):
        asyncio.run(LeasedTokens(Bucket(1, fail=True), 1, 1).acquire("x"))


def test_without_auth_everyone_is_anonymous_with_every_role():
    app, seen = _app(GuardConfig(None, None, 1024))
    r = _run(app, [("POST", "/tasks", {"json": {}}), ("GET", "/metrics", {})])
    assert [x.status_code for x in r] == [200, 200] and seen == [("", 2)]


def test_routes_need_the_roles_the_docs_say():
    assert required_role("GET", "/healthz") is None
    assert required_role("POST", "/tasks") is Role.SUBMIT
    assert required_role("DELETE", "/tasks/x") is Role.SUBMIT
    assert required_role("GET", "/tasks/x") is Role.READ
    assert required_role("GET", "/status") is Role.READ
    assert required_role("GET", "/metrics") is Role.ADMIN


def test_secrets_are_redacted_wherever_they_appear():
    spec = make_spec(
        pool(
            "work",
            agent_kwargs={
                "api_key": "sk-live-123456",
                "model": "m",
                "nested_token": ["tok-9999"],
            },
        )
    )
    r = redactor_for(spec)
    key = "fleet_" + "A" * 43
    data = {
        "last_failures": [{"detail": f"401 from provider with sk-live-123456 and {key}"}],
        "model": "m",
        "password": "hunter22",
        "input_tokens": 42,
        "note": "tok-9999 leaked",
    }
    out = r.data(data)
    assert out == {
        "last_failures": [{"detail": f"401 from provider with {REDACTED} and {REDACTED}"}],
        "model": "m",
        "password": REDACTED,
        "input_tokens": 42,
        "note": f"{REDACTED} leaked",
    }
    assert Redactor().text("plain text") == "plain text"


def test_log_records_are_redacted_message_arguments_and_traceback(monkeypatch):
    import logging

    from fleet.security import redact as redact_mod

    monkeypatch.setattr(redact_mod, "_log_redactor", None)
    before = logging.getLogRecordFactory()
    key = "fleet_" + "B" * 43
    try:
        redact_mod.redact_logs(Redactor(["sk-live-123456"]))
        redact_mod.redact_logs(Redactor(["sk-live-654321"]))  # the newest spec's secrets
        seen: list[str] = []

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                try:
                    seen.append(logging.Formatter().format(record))
                except TypeError:
                    seen.append(f"unformattable: {record.msg}")

        logger = logging.getLogger("some.library")
        logger.addHandler(Keep())
        logger.propagate = False
        logger.warning("calling with %s and key %s", "sk-live-654321", key)
        try:
            raise ValueError("provider said: bad key sk-live-654321")
        except ValueError:
            logger.exception("agent failed")
        logger.warning("bad format %d", "not a number")  # kept as made, no crash
        assert "sk-live-654321" not in "".join(seen) and key not in "".join(seen)
        assert seen[0] == f"calling with {REDACTED} and key {REDACTED}"
        assert f"ValueError: provider said: bad key {REDACTED}" in seen[1]
        assert seen[2] == "unformattable: bad format %d"
    finally:
        logging.setLogRecordFactory(before)


def test_roles_are_read_from_the_path_under_the_app_route_prefix(keys):
    ring, k = keys
    app, _ = _app(GuardConfig(ring, None, 1024))

    async def go() -> list[int]:
        transport = httpx.ASGITransport(app=app, root_path="/sec")
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return [
                (await c.post("/sec/tasks", json={}, **_h(k["read"]))).status_code,
                (await c.post("/sec/tasks", json={}, **_h(k["submit"]))).status_code,
            ]

    assert asyncio.run(go()) == [403, 200]


def test_spec_errors_name_the_field_but_never_echo_the_value():
    from pydantic import ValidationError

    from fleet.spec.fleet import FleetSpec

    bad = {"pools": [{"name": "a", "capability": "a", "agent_class": "x:y"}]}
    bad["pools"][0]["agents_per_host"] = "sk-live-pasted-here"
    with pytest.raises(ValidationError) as exc:
        FleetSpec.model_validate(bad)
    assert "agents_per_host" in str(exc.value) and "sk-live" not in str(exc.value)
