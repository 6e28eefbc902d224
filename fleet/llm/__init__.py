"""LLM clients for agents: ``self.llm`` in an agent is ``client_for(pool.llm)``.

``LLMClient`` is the protocol (``complete(prompt, max_tokens)`` -> ``Completion``, with
the provider's reported token use); ``SimulatedLLM`` answers without a network
(``fleet.agents.llm``), ``OpenAICompatible`` calls a real OpenAI-compatible endpoint
(``fleet.llm.openai_compat``). A provider's failures raise ``ProviderError``s whose
``fleet_reason`` becomes the task's failure reason (``rate_limited`` and
``provider_unreachable`` are retried; ``provider_auth``, ``provider_rejected`` and
``provider_bad_response`` are not).
"""

from __future__ import annotations

from typing import Any

from fleet.agents.llm import Completion, LatencyModel, LLMClient, SimulatedLLM
from fleet.llm.caps import Cap
from fleet.llm.errors import (
    CapExceeded,
    ProviderAuth,
    ProviderBadResponse,
    ProviderError,
    ProviderRateLimited,
    ProviderRejected,
    ProviderUnreachable,
)
from fleet.llm.openai_compat import ChatReply, OpenAICompatible
from fleet.spec.llm import LLMSpec

__all__ = [
    "Cap",
    "CapExceeded",
    "ChatReply",
    "Completion",
    "LLMClient",
    "LatencyModel",
    "OpenAICompatible",
    "ProviderAuth",
    "ProviderBadResponse",
    "ProviderError",
    "ProviderRateLimited",
    "ProviderRejected",
    "ProviderUnreachable",
    "SimulatedLLM",
    "client_for",
]


def client_for(spec: LLMSpec | None) -> Any:
    """The client a pool's agents share (``self.llm``): the spec's provider, or a
    simulated model when the pool names none."""
    spec = spec or LLMSpec()
    if spec.provider == "openai":
        return OpenAICompatible(
            spec.model,
            spec.base_url,
            spec.api_key_env,
            spec.timeout_s,
            spec.max_tokens,
            max_tokens_field=spec.max_tokens_field,
        )
    return SimulatedLLM(spec.model, LatencyModel(time_scale=spec.time_scale))
