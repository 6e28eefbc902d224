"""fleet's logs: one structured line per task failure and per control decision.

Two loggers (Python ``logging``, so Ray's logging configuration applies to them):

- ``fleet.task`` (``TASK_LOG``): a task's failed run, at WARNING, with its task id, pool,
  agent, reason and error (an agent's traceback, cut to ``observability.traceback_chars``);
  successes are never logged;
- ``fleet.control`` (``CONTROL_LOG``): control decisions: a pool's agents scaled, an agent
  ejected or readmitted by its breaker, an agent restarted, a budget refusing a task.

``log_event`` writes each field twice: in the message (``task_failed task_id=abc pool=p
reason=error``, multi-line values such as a traceback last, on their own lines), so text
logs read well, and as an attribute of the record, so Ray's JSON encoding (its
``JSONFormatter`` emits every attribute that is not a standard ``LogRecord`` one; no
``additional_log_standard_attrs`` needed) carries it as a key of its own. A field whose
name Python's ``LogRecord``, Ray's core context or Serve's context already uses becomes
``fleet_<name>`` as an attribute: in a Ray worker, Ray's ``CoreContextFilter`` sets
``task_id`` to *Ray's* task id after the record is made, so fleet's task id is the
``fleet_task_id`` key of a JSON line (and ``task_id=`` in its message).

``observability.log_format`` picks the encoding of the fleet's processes
(``ray_job_config``, given to ``ray.init`` by ``fleet.runtime.client.init_ray``; applied
by Ray to the root logger of every worker of the job: controller, hosts, dispatcher,
ingress) and of Serve's own logs of the hosts (``serve_logging_options``). ``text``
leaves Ray's defaults as they are: fleet's records then go wherever the process's
logging sends them (Python's default: WARNING and up to stderr, which is the worker's
log file); Ray's TEXT encoding is not used for it because its formatter appends every
record attribute to the line, which would print each field (and traceback) twice.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from fleet.security.redact import redact_log_text
from fleet.spec.observability import LogFormat

if TYPE_CHECKING:
    from ray.job_config import JobConfig

TASK_LOG = logging.getLogger("fleet.task")
CONTROL_LOG = logging.getLogger("fleet.control")

ATTR_PREFIX = "fleet_"
# Record attributes fleet's fields must not take: the standard ``LogRecord`` ones
# (``extra=`` may not overwrite them), the core context Ray's ``CoreContextFilter`` sets
# in its workers (``ray._common.logging_constants.LogKey``) and what Serve's filters set
# in its replicas (``ray.serve._private.constants.SERVE_LOG_*``): those would overwrite
# ours after the record is made.
RESERVED_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "job_id",
    "worker_id",
    "node_id",
    "actor_id",
    "task_id",
    "actor_name",
    "task_name",
    "task_func_name",
    "timestamp_ns",
    "request_id",
    "route",
    "application",
    "deployment",
    "replica",
    "component_name",
    "component_id",
    "component_type",
}


def attr_name(field: str) -> str:
    """The record attribute (and JSON key) a field is carried as."""
    return ATTR_PREFIX + field if field in RESERVED_ATTRS else field


def _text(value: Any) -> str:
    """A short value as it appears after ``key=`` in a message: quoted when it has
    spaces, so the line still splits into its fields."""
    s = str(value)
    if not s or any(c.isspace() for c in s):
        return repr(s)
    return s


def _json_value(value: Any) -> Any:
    """What Ray's JSON formatter can encode as it is (``json.dumps``), else its text."""
    if value is None or isinstance(value, bool | int | float):
        return value
    return redact_log_text(str(value))


def log_event(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    """Log ``event`` with ``fields`` in its message and as record attributes.

    Fields that are None are left out. Values with a line break (a traceback) end the
    message, each on its own lines after its ``key:``; the others are ``key=value``.
    Costs nothing beyond the level check when ``level`` is not enabled.
    """
    if not logger.isEnabledFor(level):
        return
    short = [event]
    long: list[str] = []
    attrs: dict[str, Any] = {"event": event}
    for key, value in fields.items():
        if value is None:
            continue
        attrs[attr_name(key)] = _json_value(value)
        s = str(value)
        if "\n" in s:
            long.append(f"{key}:\n{s}")
        else:
            short.append(f"{key}={_text(s)}")
    # The message has no %-arguments: a traceback's "%" stays as it is. The record
    # factory of ``redact_logs`` redacts the message; the attributes are redacted above.
    logger.log(level, "\n".join([" ".join(short), *long]), extra=attrs)


# -- configuration ---------------------------------------------------------------------


def ray_logging_config(log_format: LogFormat | str) -> Any:
    """Ray's ``LoggingConfig`` for ``log_format``: JSON encoding at INFO for ``json``;
    None for ``text`` (Ray's defaults; see the module docstring)."""
    if LogFormat(log_format) is not LogFormat.JSON:
        return None
    import ray

    return ray.LoggingConfig(encoding="JSON", log_level="INFO")


def ray_job_config(log_format: LogFormat | str) -> JobConfig:
    """The ``JobConfig`` for ``ray.init``: it carries ``ray_logging_config(log_format)``
    to every worker of the job (for ``text``, a default one: what ``ray.init`` makes
    when given none).

    Given as ``job_config`` rather than as ``ray.init``'s ``logging_config``: the
    latter also reconfigures the driver's own logging (the ``ray`` logger at INFO on
    stderr), and the CLI's stderr keeps to one-line errors."""
    from ray.job_config import JobConfig

    job = JobConfig()
    config = ray_logging_config(log_format)
    if config is not None:
        job.set_py_logging_config(config)
    return job


def serve_logging_options(log_format: LogFormat | str) -> dict[str, Any]:
    """Serve deployment options for a host's own Serve logs (``ray.serve``'s logger:
    requests, replica lifecycle) in ``log_format``; empty for ``text`` (Serve's
    default). fleet's loggers are configured by ``ray_job_config``, not by these."""
    if LogFormat(log_format) is not LogFormat.JSON:
        return {}
    return {"logging_config": {"encoding": "JSON"}}


__all__ = [
    "CONTROL_LOG",
    "TASK_LOG",
    "attr_name",
    "log_event",
    "ray_job_config",
    "ray_logging_config",
    "serve_logging_options",
]
