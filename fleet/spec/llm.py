"""The model a pool's agents call (``pools[].llm``): what ``self.llm`` is in an agent.

``provider: simulated`` (the default) is ``fleet.agents.llm.SimulatedLLM``: it sleeps
for a realistic latency (``time_scale`` shrinks it) and reports realistic token use,
with no network. ``provider: openai`` is any OpenAI-compatible endpoint (OpenAI, vLLM,
LiteLLM proxies, Ollama, most gateways; ``fleet.llm.openai_compat``): ``base_url`` (None:
OpenAI's own), ``model``, and the API key read from the environment variable named by
``api_key_env`` on the host (set it with the pool's runtime environment or on the node:
never in the spec, so never in status or logs). ``max_tokens`` caps each reply when the
agent names no cap (sent as ``max_tokens_field``); ``timeout_s`` bounds each call.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fleet.spec._base import SpecModel

ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class LLMSpec(SpecModel):
    provider: Literal["simulated", "openai"] = "simulated"
    model: str = Field(default="sim-small", min_length=1, max_length=256)
    base_url: str | None = Field(default=None, pattern=r"^https?://")
    api_key_env: str = Field(default="OPENAI_API_KEY", pattern=ENV_NAME)
    timeout_s: float = Field(default=60.0, gt=0, le=3_600, allow_inf_nan=False)
    max_tokens: int = Field(default=512, ge=1, le=1_000_000)
    # The request field that caps a reply: OpenAI's reasoning models take only
    # max_completion_tokens.
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    time_scale: float = Field(default=1.0, gt=0, le=100, allow_inf_nan=False)
