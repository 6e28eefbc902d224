"""fleet's logs: a failed task's result keeps its traceback (its end, cut to
``observability.traceback_chars``) and its log line names the task; control decisions
(a budget refusal, a scale decision, an ejection) are logged; the records render as JSON
with their fields as keys through Ray's JSON formatter."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from ray._common.formatters import JSONFormatter

from fleet.observability.logs import (
    CONTROL_LOG,
    TASK_LOG,
    attr_name,
    log_event,
    ray_job_config,
    ray_logging_config,
    serve_logging_options,
)
from fleet.policy.autoscaling import ScalingDecision
from fleet.runtime.budget_client import Grant
from fleet.runtime.controller import log_scale
from fleet.runtime.host import AgentHost
from fleet.runtime.host_outcomes import TRUNCATED, failure_text
from fleet.task import Outcome, to_item
from tests.utils import FakeLedger, pool

API_KEY = "fleet_" + "k" * 43  # an ingress API key: redacted from every log record


def _host(
    traceback_chars: int, depth: int = 3, **resilience: Any
) -> tuple[AgentHost, FakeLedger]:
    spec = pool(
        "deep",
        agent_class="fleet.agents.testing:DeepFailAgent",
        agents_per_host=1,
        agent_kwargs={"depth": depth},
        autoscaling={"min_agents": 1, "max_agents": 1},
    )
    host = AgentHost(
        spec,
        {"retry": {"max_attempts": 1}, **resilience},
        max_output_bytes=1_000_000,
        observability={"traceback_chars": traceback_chars},
        autotick=False,
    )
    ledger = FakeLedger()
    host.recorder.client = ledger
    return host, ledger


def _run(host: AgentHost, ledger: FakeLedger, payload: Any) -> Outcome:
    item = to_item({"capability": "deep", "payload": payload}, {"deep"})
    asyncio.run(host.run_and_record([item]))
    (o,) = [o for o in ledger.outcomes if o.task_id == item.id]
    return o


def _records(
    caplog: pytest.LogCaptureFixture, logger: logging.Logger, event: str
) -> list[Any]:
    return [
        r
        for r in caplog.records
        if r.name == logger.name and getattr(r, "event", None) == event
    ]


# -- a failed task's traceback --------------------------------------------------------


def test_a_failed_result_keeps_the_traceback_and_the_log_names_the_task(caplog):
    caplog.set_level(logging.INFO, logger="fleet")
    host, ledger = _host(traceback_chars=4000)
    o = _run(host, ledger, {"n": 1})
    assert (o.ok, o.reason) == (False, "error")
    first, _, tb = o.error.partition("\n")
    assert first == "ValueError: cannot parse the reply to {'n': 1}"  # as error_text was
    assert tb.startswith("Traceback (most recent call last):")
    assert "in parse_reply" in tb and "in descend" in tb and "in handle" in tb
    assert "chars truncated" not in tb
    (rec,) = _records(caplog, TASK_LOG, "task_failed")
    assert rec.levelno == logging.WARNING
    assert rec.fleet_task_id == o.task_id and rec.pool == "deep" and rec.reason == "error"
    assert rec.error == o.error
    msg = rec.getMessage()
    assert msg.startswith(f"task_failed task_id={o.task_id} pool=deep ")
    assert "reason=error" in msg and "in parse_reply" in msg


def test_a_long_traceback_keeps_its_end_behind_a_marker():
    limit = 300
    host, ledger = _host(traceback_chars=limit, depth=8)
    o = _run(host, ledger, {"n": 2})
    first, _, tb = o.error.partition("\n")
    assert tb.startswith("... [") and " chars truncated]\n" in tb
    cut = int(tb[len("... [") : tb.index(" chars")])
    marker = TRUNCATED.format(n=cut)
    assert len(o.error) <= len(first) + 1 + limit + len(marker)
    assert len(tb) - len(marker) == limit
    # The end is kept: the raising frame and the exception's line; the head (the host's
    # own frame) went.
    assert "in parse_reply" in tb and tb.endswith(first)
    assert "run_on_agent" not in tb


def test_traceback_chars_0_keeps_only_the_one_line(caplog):
    caplog.set_level(logging.WARNING, logger="fleet")
    host, ledger = _host(traceback_chars=0)
    o = _run(host, ledger, {"n": 3})
    assert o.error == "ValueError: cannot parse the reply to {'n': 3}"
    (rec,) = _records(caplog, TASK_LOG, "task_failed")
    # One line: the error is a quoted field like the others.
    assert rec.getMessage().endswith(f"error={o.error!r}") and "\n" not in rec.getMessage()


def test_failure_text_of_a_chained_exception_keeps_both_causes():
    try:
        try:
            raise KeyError("inner")
        except KeyError as exc:
            raise RuntimeError("outer") from exc
    except RuntimeError as exc:
        text = failure_text(exc, 10_000)
    assert text.startswith("RuntimeError: outer\n")
    assert "KeyError: 'inner'" in text and "direct cause" in text


def test_secrets_are_redacted_from_the_log_but_the_result_keeps_its_text(caplog):
    caplog.set_level(logging.WARNING, logger="fleet")
    host, ledger = _host(traceback_chars=4000)
    o = _run(host, ledger, {"key": API_KEY})
    assert API_KEY in o.error  # stored as is; shown redacted (ingress, client)
    (rec,) = _records(caplog, TASK_LOG, "task_failed")
    assert API_KEY not in rec.getMessage() and API_KEY not in rec.error
    assert "[redacted]" in rec.error


def test_successes_are_not_logged(caplog):
    caplog.set_level(logging.DEBUG, logger="fleet")
    spec = pool(
        "work", agent_class="fleet.agents.testing:SleepAgent", agent_kwargs={"delay_s": 0}
    )
    host = AgentHost(spec, autotick=False)
    host.recorder.client = ledger = FakeLedger()
    items = [to_item({"capability": "work", "payload": {"i": i}}, {"work"}) for i in range(5)]
    asyncio.run(host.run_and_record(items))
    assert all(o.ok for o in ledger.outcomes) and len(ledger.outcomes) == 5
    assert [r for r in caplog.records if r.name.startswith("fleet.")] == []


# -- JSON ---------------------------------------------------------------------------------


def test_the_record_renders_as_json_with_its_fields_as_keys(caplog):
    caplog.set_level(logging.WARNING, logger="fleet")
    host, ledger = _host(traceback_chars=4000)
    o = _run(host, ledger, {"n": 4})
    (rec,) = _records(caplog, TASK_LOG, "task_failed")
    # What Ray's CoreContextFilter does to a record in a Ray worker: its own task id.
    rec.task_id = "ray-task-0001"
    line = json.loads(JSONFormatter().format(rec))
    assert line["fleet_task_id"] == o.task_id and line["task_id"] == "ray-task-0001"
    assert line["event"] == "task_failed" and line["pool"] == "deep"
    assert line["reason"] == "error" and line["error"] == o.error
    assert line["levelname"] == "WARNING" and f"task_id={o.task_id}" in line["message"]


def test_fields_that_ray_or_logging_own_are_prefixed():
    assert attr_name("task_id") == "fleet_task_id"
    assert attr_name("name") == "fleet_name" and attr_name("replica") == "fleet_replica"
    assert attr_name("pool") == "pool"


def test_log_event_skips_none_and_costs_nothing_when_disabled(caplog):
    caplog.set_level(logging.INFO, logger="fleet")
    log_event(CONTROL_LOG, logging.DEBUG, "never", pool="p")
    log_event(CONTROL_LOG, logging.INFO, "seen", pool="p", note="two words", gone=None)
    (rec,) = caplog.records
    assert rec.getMessage() == "seen pool=p note='two words'"
    assert not hasattr(rec, "gone")


def test_the_logging_configs_follow_the_log_format():
    assert ray_logging_config("text") is None
    assert ray_job_config("text").py_logging_config is None
    assert serve_logging_options("text") == {}
    cfg = ray_logging_config("json")
    assert cfg.encoding == "JSON" and cfg.log_level == "INFO"
    assert ray_job_config("json").py_logging_config == cfg
    from ray import serve

    opts = serve_logging_options("json")
    d = serve.deployment(AgentHost).options(**opts)  # Serve validates the option here
    assert d._deployment_config.logging_config["encoding"] == "JSON"


# -- control decisions ------------------------------------------------------------------


class _RefusingBudget:
    """A budget client whose shared pool budget refuses every reservation."""

    async def reserve(self, agent_id: str, pool: str, tenant: str | None) -> Grant:
        return Grant(None, scope="pool:deep:usd:daily", detail="pool budget spent")

    async def flush(self) -> None:
        pass

    def settle_at_estimate(self, grant: Grant) -> None:
        raise AssertionError("nothing was granted")


def test_a_budget_refusal_is_logged(caplog):
    caplog.set_level(logging.INFO, logger="fleet")
    host, ledger = _host(traceback_chars=100)
    host.budget = _RefusingBudget()  # type: ignore[assignment]
    o = _run(host, ledger, {"n": 5})
    assert (o.ok, o.reason) == (False, "budget_exhausted")
    (rec,) = _records(caplog, CONTROL_LOG, "budget_refused")
    assert rec.levelno == logging.WARNING and rec.fleet_task_id == o.task_id
    assert rec.scope == "pool:deep:usd:daily" and rec.pool == "deep"
    assert f"task_id={o.task_id}" in rec.getMessage()
    assert _records(caplog, TASK_LOG, "task_failed") == []  # it never ran


def test_a_scale_decision_is_logged_and_a_hold_is_not(caplog):
    caplog.set_level(logging.INFO, logger="fleet")
    log_scale("work", 4, ScalingDecision(4, 4, "hold"), 10, 2)
    assert caplog.records == []
    log_scale("work", 4, ScalingDecision(8, 9, "up"), 30, 5)
    (rec,) = _records(caplog, CONTROL_LOG, "pool_scaled")
    assert (rec.pool, rec.old_agents, rec.new_agents, rec.reason) == ("work", 4, 8, "up")
    assert rec.getMessage() == (
        "pool_scaled pool=work old_agents=4 new_agents=8 reason=up raw_desired=9 "
        "queued=30 in_flight=5"
    )


def test_an_ejection_and_a_readmission_are_logged(caplog):
    caplog.set_level(logging.INFO, logger="fleet")
    host, _ = _host(traceback_chars=100)
    agent_id = host.core.agents[0].id
    breaker = host.core.breakers.registry.agent(agent_id)
    breaker.force_open("operator")
    (rec,) = _records(caplog, CONTROL_LOG, "agent_ejected")
    assert rec.levelno == logging.WARNING and rec.agent_id == agent_id
    assert (rec.pool, rec.old, rec.new) == ("deep", "closed", "open")
    breaker.reset()
    (back,) = _records(caplog, CONTROL_LOG, "agent_readmitted")
    assert back.agent_id == agent_id and back.levelno == logging.INFO
