"""fleet: run societies of AI agents on Ray, and keep them alive, fast and within budget."""

from fleet.adapters import Context, agent_from
from fleet.agent import Agent, DependencyUnavailable, Reply
from fleet.spec import FleetSpec, SpecError, load_spec, parse_spec
from fleet.task import Result, Task, TaskRejected, TaskStatus

__all__ = [
    "Agent",
    "Context",
    "DependencyUnavailable",
    "Electorate",
    "FleetSpec",
    "Reply",
    "Result",
    "SpecError",
    "Task",
    "TaskRejected",
    "TaskStatus",
    "agent_from",
    "decide",
    "load_spec",
    "parse_spec",
]
__version__ = "0.1.0"

_LAZY = {"decide": "fleet.consensus", "Electorate": "fleet.consensus"}


def __getattr__(name: str):
    # fleet.consensus imports Ray; keep `import fleet` light until it is used.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fleet' has no attribute {name!r}")
