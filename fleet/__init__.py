"""fleet: run societies of AI agents on Ray, and keep them alive, fast and within budget."""

from fleet.agent import Agent, Reply
from fleet.spec import FleetSpec, SpecError, load_spec, parse_spec
from fleet.task import Result, Task, TaskRejected, TaskStatus

__all__ = [
    "Agent",
    "FleetSpec",
    "Reply",
    "Result",
    "SpecError",
    "Task",
    "TaskRejected",
    "TaskStatus",
    "load_spec",
    "parse_spec",
]
__version__ = "0.1.0"
