"""A client for OpenAI-compatible chat endpoints (OpenAI, vLLM, LiteLLM, Ollama, most
gateways), on the ``openai`` package's async client.

One client per host, shared by its agents (``self.llm``). Each call is one attempt
(``max_retries=0``): retrying is fleet's job (the task goes back to the queue within
the retry budget, with its backoff), so a provider's 429 is never hidden behind the
library's own sleeps. Failures raise a ``ProviderError`` whose ``fleet_reason`` is the
task's failure reason:

- ``rate_limited`` (retried): the provider answered 429, or 503 (overloaded); the
  error carries its ``Retry-After`` in ``retry_after_s`` when it sent one;
- ``provider_unreachable`` (retried): no connection, or no answer within ``timeout_s``;
- ``provider_auth``: the key is missing (the environment variable ``api_key_env`` is
  not set on the host) or refused (401, 403);
- ``provider_rejected``: any other 4xx (an unknown model, a request it will not take);
- ``provider_bad_response``: an answer without choices or without token usage (fleet
  prices every call from the provider's reported usage, so it will not guess).

Inside a task with a budget reservation, each call asks for no more output tokens than
the reservation has left (``fleet.llm.caps``). The last response's rate-limit headers
(``x-ratelimit-*``) are kept in ``limits``. A reply names the model asked for, the key
of the spec's price table (providers answer with dated names), and the one that
answered as ``served_model``. A ``Retry-After`` sets the earliest retry of the task
(``fleet.runtime.host``). The key is read once, from the environment, and never logged
or put in an error.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fleet.agents.llm import Completion
from fleet.llm.caps import CURRENT, input_upper_bound
from fleet.llm.errors import (
    ProviderAuth,
    ProviderBadResponse,
    ProviderRateLimited,
    ProviderRejected,
    ProviderUnreachable,
)

# A provider's Retry-After is honoured up to this (a bogus one must not park a task).
MAX_RETRY_AFTER_S = 600.0


@dataclass(frozen=True, slots=True)
class ChatReply:
    """One chat completion: its text, tool calls (as the provider sent them, dicts),
    the model asked for (the key of the spec's price table: a provider often answers
    with a dated name, ``served_model``) and the token usage it reported."""

    text: str
    model: str
    input_tokens: int
    output_tokens: int
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    served_model: str = ""


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """Seconds from ``retry-after-ms`` or ``retry-after`` (seconds, at most
    ``MAX_RETRY_AFTER_S``; an HTTP date or a value that is not finite: None)."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is not None:
            try:
                seconds = float(value) * scale
            except ValueError:
                continue
            if math.isfinite(seconds):
                return min(max(0.0, seconds), MAX_RETRY_AFTER_S)
    return None


class OpenAICompatible:
    """``complete``/``chat`` against ``base_url`` (None: OpenAI's), model ``model``."""

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        timeout_s: float = 60.0,
        max_tokens: int = 512,
        environ: Mapping[str, str] = os.environ,
        max_tokens_field: str = "max_tokens",
    ):
        import openai  # only hosts whose pools call a real provider need it

        self.model = model
        self.max_tokens = max_tokens
        self.max_tokens_field = max_tokens_field  # max_completion_tokens: reasoning models
        self.api_key_env = api_key_env
        key = environ.get(api_key_env)
        self._missing_key = not key
        self._openai = openai
        self._client = openai.AsyncOpenAI(
            api_key=key or "unset",
            base_url=base_url,
            timeout=timeout_s,
            max_retries=0,
        )
        self.limits: dict[str, str] = {}  # x-ratelimit-* of the last response

    async def complete(self, prompt: str, max_tokens: int | None = None) -> Completion:
        """One user message; the reply as a ``Completion`` (``LLMClient``)."""
        r = await self.chat([{"role": "user", "content": prompt}], max_tokens)
        return Completion(r.text, r.model, r.input_tokens, r.output_tokens)

    async def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        max_tokens: int | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> ChatReply:
        """One chat completion (``tools``: OpenAI-style function tools)."""
        if self._missing_key:
            raise ProviderAuth(
                f"no API key: the environment variable {self.api_key_env} is not set "
                "on this host (pools[].llm.api_key_env)"
            )
        asked = max_tokens or self.max_tokens
        cap = CURRENT.get()  # the task's reservation (``fleet.llm.caps``)
        if cap is None:
            return await self._chat(messages, asked, tools)
        upper = input_upper_bound(messages, tools)
        asked = cap.hold(self.model, upper, asked)
        reply = None
        try:
            reply = await self._chat(messages, asked, tools)
            return reply
        finally:  # what the call did not use goes back (all of it if it failed)
            used = (reply.input_tokens, reply.output_tokens) if reply is not None else (0, 0)
            cap.release(self.model, upper, asked, *used)

    async def _chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        asked: int,
        tools: Sequence[Mapping[str, Any]] | None,
    ) -> ChatReply:
        oa = self._openai
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": list(messages),
            self.max_tokens_field: asked,
        }
        if tools:
            kwargs["tools"] = list(tools)
        try:
            raw = await self._client.chat.completions.with_raw_response.create(**kwargs)
        except (oa.AuthenticationError, oa.PermissionDeniedError) as exc:
            raise ProviderAuth(
                f"the provider refused the key: HTTP {exc.status_code}"
            ) from None
        except oa.RateLimitError as exc:
            if _code(exc) == "insufficient_quota":  # billing, not a rate: will not pass
                raise ProviderRejected("the provider's quota is used up (HTTP 429)") from None
            raise ProviderRateLimited(
                "the provider is rate limiting (HTTP 429)", retry_after_s(exc.response.headers)
            ) from None
        except oa.APITimeoutError:
            raise ProviderUnreachable("no answer within the timeout") from None
        except oa.APIConnectionError as exc:
            raise ProviderUnreachable(f"cannot reach the provider: {exc}") from None
        except oa.APIStatusError as exc:
            if exc.status_code == 503:
                raise ProviderRateLimited(
                    "the provider is overloaded (HTTP 503)",
                    retry_after_s(exc.response.headers),
                ) from None
            if exc.status_code in (408, 409):  # timed out, or a conflict: transient
                raise ProviderUnreachable(
                    f"the provider failed the request: HTTP {exc.status_code}"
                ) from None
            if 400 <= exc.status_code < 500:
                raise ProviderRejected(
                    f"the provider refused the request: HTTP {exc.status_code}"
                ) from None
            raise ProviderUnreachable(f"the provider failed: HTTP {exc.status_code}") from None
        self.limits = {
            k: v for k, v in raw.headers.items() if k.lower().startswith("x-ratelimit-")
        }
        try:
            resp = raw.parse()
        except Exception as exc:  # not a chat completion at all
            raise ProviderBadResponse(f"malformed response: {type(exc).__name__}") from None
        return _reply(resp, self.model)


def _code(exc: Any) -> str | None:
    """An OpenAI error's ``code`` (from the exception, else its JSON body's ``error``
    object or the body itself)."""
    code = getattr(exc, "code", None)
    body = getattr(exc, "body", None)
    if code is None and isinstance(body, dict):
        err = body.get("error")
        code = (err if isinstance(err, dict) else body).get("code")
    return code if isinstance(code, str) else None


def _reply(resp: Any, model: str) -> ChatReply:
    choices = getattr(resp, "choices", None)
    if not choices:
        raise ProviderBadResponse("the response has no choices")
    usage = getattr(resp, "usage", None)
    if usage is None or usage.prompt_tokens is None or usage.completion_tokens is None:
        raise ProviderBadResponse("the response reports no token usage")
    msg = choices[0].message
    calls = [c.model_dump() for c in (getattr(msg, "tool_calls", None) or [])]
    return ChatReply(
        msg.content or "",
        model,
        int(usage.prompt_tokens),
        int(usage.completion_tokens),
        calls,
        getattr(resp, "model", None) or model,
    )
