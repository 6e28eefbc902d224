"""A small OpenAI-compatible chat server for tests, on loopback: it enforces its own
limits as continuous token buckets (requests and tokens per minute), answers 429 with
``Retry-After`` when a call would exceed them, sends ``x-ratelimit-*`` headers, checks
the bearer key and the model, and reports token usage (prompt tokens from the UTF-8
bytes of the messages, a quarter a token; the reply's from ``reply_tokens`` capped by
the request's ``max_tokens``). ``mode`` makes it misbehave: ``no_usage`` (a reply
without usage), ``overloaded`` (503 with ``Retry-After``)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tests.utils import eventually


class Bucket:
    """``per_min`` units a minute, refilled continuously, holding at most a minute's."""

    def __init__(self, per_min: float):
        self.per_min = per_min
        self.level = per_min
        self.t = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.per_min, self.level + (now - self.t) * self.per_min / 60)
        self.t = now

    def wait_s(self, n: float) -> float:
        """Seconds until ``n`` units are there (0: now)."""
        self._refill()
        return 0.0 if self.level >= n else (n - self.level) * 60 / self.per_min

    def take(self, n: float) -> None:
        self.level -= n


@dataclass
class Provider:
    key: str = "test-key"
    models: tuple[str, ...] = ("fake-model",)
    rpm: float = 6_000
    tpm: float = 10_000_000
    reply_tokens: int = 20
    mode: str = ""
    calls: int = 0
    refused: int = 0
    seen_max_tokens: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = Bucket(self.rpm)
        self.tokens = Bucket(self.tpm)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            body = await request.json()
            if request.headers.get("authorization") != f"Bearer {self.key}":
                return _error(401, "invalid_api_key", "Incorrect API key provided")
            if body.get("model") not in self.models:
                return _error(404, "model_not_found", f"model {body.get('model')!r}")
            if self.mode == "overloaded":
                return _error(503, "overloaded", "try later", {"retry-after": "2"})
            text = "".join(str(m.get("content") or "") for m in body["messages"])
            prompt = max(1, len(text.encode()) // 4)
            max_tokens = int(body.get("max_tokens") or 4096)
            out = min(self.reply_tokens, max_tokens)
            with self.lock:
                self.calls += 1
                self.seen_max_tokens.append(max_tokens)
                wait = max(self.requests.wait_s(1), self.tokens.wait_s(prompt + out))
                if wait > 0:
                    self.refused += 1
                    return _error(
                        429,
                        "rate_limit_exceeded",
                        "slow down",
                        {"retry-after": f"{max(wait, 0.001):.3f}"},
                    )
                self.requests.take(1)
                self.tokens.take(prompt + out)
                headers = {
                    "x-ratelimit-limit-requests": str(int(self.requests.per_min)),
                    "x-ratelimit-remaining-requests": str(int(self.requests.level)),
                    "x-ratelimit-limit-tokens": str(int(self.tokens.per_min)),
                    "x-ratelimit-remaining-tokens": str(int(self.tokens.level)),
                }
            message: dict[str, Any] = {"role": "assistant", "content": "ok " * out}
            if body.get("tools"):
                name = body["tools"][0]["function"]["name"]
                message["tool_calls"] = [
                    {
                        "id": "call-1",
                        "type": "function",
                        "function": {"name": name, "arguments": "{}"},
                    }
                ]
            reply: dict[str, Any] = {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": f"{body['model']}-2026-01-01",  # a dated name, as providers answer
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            }
            if self.mode != "no_usage":
                reply["usage"] = {
                    "prompt_tokens": prompt,
                    "completion_tokens": out,
                    "total_tokens": prompt + out,
                }
            return JSONResponse(reply, headers=headers)

        return app


def _error(status: int, code: str, msg: str, headers: dict[str, str] | None = None) -> Any:
    return JSONResponse(
        {"error": {"message": msg, "type": code, "code": code}},
        status_code=status,
        headers=headers,
    )


@contextmanager
def serve(provider: Provider) -> Iterator[str]:
    """Run ``provider`` on a free loopback port; yields its base URL (``.../v1``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(provider.app(), host="127.0.0.1", port=port, log_level="error")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    eventually(lambda: server.started or not thread.is_alive(), 10, 0.01, "provider up")
    if not server.started:
        raise RuntimeError("the fake provider did not start")
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(10)
