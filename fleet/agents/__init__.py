"""Example agents and the simulated LLM client they use."""

from fleet.agents.examples import AnalyticsAgent, CheckoutAgent, NoopAgent, SupportAgent
from fleet.agents.llm import Completion, LatencyModel, LLMClient, SimulatedLLM

__all__ = [
    "AnalyticsAgent",
    "CheckoutAgent",
    "Completion",
    "LLMClient",
    "LatencyModel",
    "NoopAgent",
    "SimulatedLLM",
    "SupportAgent",
]
