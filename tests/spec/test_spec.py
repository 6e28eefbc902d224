"""A bad spec fails at load time, naming the field path; a good one round-trips."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fleet.cli.demo import demo_spec_path
from fleet.spec import SpecError, load_spec, parse_spec
from tests.utils import pool


def errors_of(data) -> dict[str, str]:
    with pytest.raises(SpecError) as exc:
        parse_spec(data)
    return dict(exc.value.errors)


def test_demo_spec_loads_with_three_pools():
    spec = load_spec(demo_spec_path())
    assert len(spec.pools) == 3
    assert spec.pool_for("checkout").autoscaling.max_agents == 500


@pytest.mark.parametrize(
    "bad,path,needle",
    [
        (
            {"autoscaling": {"min_agents": 5, "max_agents": 2}},
            "pools.0.autoscaling",
            "min_agents (5)",
        ),
        (
            {"autoscaling": {"target_queued_per_agent": 0}},
            "pools.0.autoscaling.target_queued_per_agent",
            "greater than 0",
        ),
        (
            {"autoscaling": {"upscale_within_s": -1}},
            "pools.0.autoscaling.upscale_within_s",
            "greater than or equal to 0",
        ),
        ({"autoscaling": {"max_agent": 5}}, "pools.0.autoscaling.max_agent", "unknown field"),
        ({"agent_class": "not a path"}, "pools.0.agent_class", "import path"),
        ({"name": "Bad Name"}, "pools.0.name", "not a valid name"),
        ({"routing": {"router": "magic"}}, "pools.0.routing.router", "least_loaded"),
        ({"host_drain_timeout_s": 0}, "pools.0.host_drain_timeout_s", "greater than 0"),
    ],
)
def test_bad_pool_fields_are_named(bad, path, needle):
    errs = errors_of({"pools": [pool(**bad)]})
    assert path in errs, errs
    assert needle in errs[path]


def test_duplicate_capability_and_unknown_top_level_key():
    errs = errors_of({"pools": [pool("a")], "budget": {}})
    assert errs == {"budget": "unknown field (not part of the spec)"}
    errs = errors_of({"pools": [pool("a", "x"), pool("b", "x")]})
    assert any("pools.1.capability" in msg and "pools.0" in msg for msg in errs.values()), errs


def test_cli_exits_2_and_names_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "pools:\n  - name: a\n    capability: a\n    agent_class: m:C\n"
        "    autoscaling: {min_agents: 9, max_agents: 1}\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "fleet.cli.main", "run", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "pools.0.autoscaling" in r.stderr and "min_agents (9)" in r.stderr


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(SpecError, match="<file>"):
        load_spec(tmp_path / "nope.yaml")
    f = tmp_path / "x.yaml"
    f.write_text("pools: [\n")
    with pytest.raises(SpecError, match="<yaml>"):
        load_spec(f)


def test_budget_minimum_the_total_cannot_cover_is_rejected_with_the_arithmetic():
    errs = errors_of(
        {
            "pools": [
                pool("a", autoscaling={"max_agents": 1500}),
                pool("b", autoscaling={"max_agents": 500}),
            ],
            "budgets": {
                "daily_usd": 50_000,
                "per_agent_min_usd": 50,
                "per_agent_max_usd": 500,
            },
        }
    )
    msg = " ".join(errs.values())
    assert "50 x max_agents 2000 = 100000 > budgets.daily_usd 50000" in msg, errs


def test_budget_min_over_max_and_negative_price_name_the_field():
    errs = errors_of(
        {
            "pools": [pool()],
            "budgets": {"daily_usd": 1000, "per_agent_min_usd": 60, "per_agent_max_usd": 50},
        }
    )
    assert any(k.startswith("budgets") for k in errs), errs
    errs = errors_of(
        {
            "pools": [pool()],
            "budgets": {"prices": {"m": {"input_usd_per_mtok": -1, "output_usd_per_mtok": 1}}},
        }
    )
    assert "budgets.prices.m.input_usd_per_mtok" in errs, errs


@pytest.mark.parametrize(
    "bad,path,needle",
    [
        (
            {"pools": [pool(admission={"max_queue_wait_s": 0})]},
            "pools.0.admission.max_queue_wait_s",
            "greater than 0",
        ),
        (
            {"pools": [pool(admission={"max_queue_wait_s": 1e9})]},
            "pools.0.admission.max_queue_wait_s",
            "less than or equal",
        ),
        (
            {
                "pools": [pool()],
                "budgets": {
                    "priority_classes": [
                        {"name": "high", "min_task_priority": 4},
                        {"name": "low", "min_task_priority": 5},
                    ]
                },
            },
            "budgets",
            "priority_classes.1.min_task_priority: 5 must be below",
        ),
        (
            {
                "pools": [pool()],
                "budgets": {
                    "priority_classes": [
                        {"name": "high", "min_task_priority": 7, "shed_wait_share": 0.5},
                        {"name": "low", "shed_wait_share": 0.9},
                    ]
                },
            },
            "budgets",
            "priority_classes.1.shed_wait_share: 0.9 is above",
        ),
        (
            {
                "pools": [pool()],
                "budgets": {"priority_classes": [{"name": "only", "min_task_priority": 3}]},
            },
            "budgets",
            "priority_classes.0.min_task_priority: the lowest class (only) takes every task",
        ),
        (
            {
                "pools": [pool()],
                "budgets": {"priority_classes": [{"name": "x", "shed_wait_share": 0}]},
            },
            "budgets.priority_classes.0.shed_wait_share",
            "outside (0, 1]",
        ),
    ],
)
def test_bad_admission_settings_name_the_field(bad, path, needle):
    errs = errors_of(bad)
    assert path in errs, errs
    assert needle in errs[path], errs[path]


def test_a_task_belongs_to_the_highest_class_its_priority_reaches():
    spec = parse_spec(
        {
            "pools": [pool(admission={"enabled": True})],
            "budgets": {
                "priority_classes": [
                    {"name": "high", "min_task_priority": 7},
                    {"name": "low", "shed_wait_share": 0.5},
                ]
            },
        }
    )
    assert [spec.budgets.class_of_task(p).name for p in (9, 7, 6, 0)] == [
        "high",
        "high",
        "low",
        "low",
    ]
    assert spec.pools[0].admission.max_queue_wait_s == 5.0  # the requirements' figure


@pytest.mark.parametrize(
    ("bulkheads", "path", "needle"),
    [
        ({"pools": {"nope": {"max_queued": 10}}}, "<root>", "bulkheads.pools.nope: no pool"),
        (
            {"tenant": {"max_in_flight": 1}},
            "<root>",
            "bulkheads.tenant.max_in_flight: 1 is below queues.shards (2)",
        ),
        (
            {"tenants": {"acme": {"max_queued": 1}}},
            "<root>",
            "bulkheads.tenants.acme.max_queued: 1 is below queues.shards",
        ),
        ({"tenants": {"Not:ok": {}}}, "bulkheads.tenants", "tenant 'Not:ok'"),
        (
            {"pools": {"noop": {"max_in_flight": 0}}},
            "bulkheads.pools.noop.max_in_flight",
            "greater than or equal to 1",
        ),
        ({"retry_after_s": 0}, "bulkheads.retry_after_s", "greater than 0"),
    ],
)
def test_bad_bulkheads_name_the_field(bulkheads, path, needle):
    errs = errors_of({"pools": [pool()], "bulkheads": bulkheads})
    assert path in errs, errs
    assert needle in errs[path], errs[path]


def _degrading(to: str, **signals) -> dict:
    return pool("work", degrade={"to_pool": to, **signals})


@pytest.mark.parametrize(
    ("pools", "path", "needle"),
    [
        ([_degrading("nope", error_rate=0.5)], "<root>", "pools.0.degrade.to_pool: no pool"),
        ([_degrading("work", error_rate=0.5)], "<root>", "cycle (work -> work)"),
        (
            [
                _degrading("small", error_rate=0.5),
                pool("small", degrade={"to_pool": "work", "ejected_share": 0.5}),
            ],
            "<root>",
            "cycle (work -> small -> work)",
        ),
        ([_degrading("small"), pool("small")], "pools.0.degrade", "set at least one of"),
        (
            [_degrading("small", error_rate=2), pool("small")],
            "pools.0.degrade.error_rate",
            "outside (0, 1]",
        ),
        (
            [_degrading("small", predicted_wait_s=-1), pool("small")],
            "pools.0.degrade.predicted_wait_s",
            "greater than 0",
        ),
        (
            [_degrading("small", error_rate=0.5, recover_share=1), pool("small")],
            "pools.0.degrade.recover_share",
            "less than 1",
        ),
        (
            [pool("work", degrade={"error_rate": 0.5})],
            "pools.0.degrade",
            "set to_pool, from_cache: true, or both",
        ),
        (
            [
                pool(
                    "work",
                    degrade={"from_cache": True, "error_rate": 0.5, "cache_max_age_s": 0},
                )
            ],
            "pools.0.degrade.cache_max_age_s",
            "greater than 0",
        ),
    ],
)
def test_a_degrade_rule_that_cannot_be_met_is_named(pools, path, needle):
    errs = errors_of({"pools": pools})
    assert path in errs, errs
    assert needle in errs[path], errs[path]


def test_a_chain_of_fallbacks_without_a_cycle_loads():
    spec = parse_spec(
        {
            "pools": [
                _degrading("mid", predicted_wait_s=2),
                pool("mid", degrade={"to_pool": "small", "error_rate": 0.5}),
                pool("small"),
            ]
        }
    )
    assert spec.pools[0].degrade.thresholds() == {"predicted_wait_s": 2.0}


def test_a_rule_may_answer_from_the_pools_cache_alone():
    spec = parse_spec(
        {"pools": [pool("work", degrade={"from_cache": True, "error_rate": 0.5})]}
    )
    d = spec.pools[0].degrade
    assert (d.to_pool, d.from_cache, d.cache_max_age_s) == (None, True, 300.0)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({}, "pools.0.preemption.enabled: needs queues.discipline: priority (is fifo)"),
        (
            {"queues": {"discipline": "priority"}},
            "pools.0.preemption.enabled: needs at least two budgets.priority_classes",
        ),
    ],
)
def test_preemption_that_cannot_work_is_named(extra, needle):
    errs = errors_of({"pools": [pool(preemption={"enabled": True})], **extra})
    assert needle in errs["<root>"], errs


def test_preemption_settings_out_of_range_name_the_field():
    errs = errors_of(
        {"pools": [pool(preemption={"preempt_after_s": 0, "max_preemptions": 0})]}
    )
    assert "greater than 0" in errs["pools.0.preemption.preempt_after_s"]
    assert "greater than or equal to 1" in errs["pools.0.preemption.max_preemptions"]


@pytest.mark.parametrize(
    ("runtime_env", "needle"),
    [
        ({"pip": ["x"], "nope": 1}, "unknown runtime_env field(s) ['nope']"),
        ({"env_vars": {"A": 1}}, "runtime_env.env_vars must map names to strings"),
    ],
)
def test_a_bad_runtime_env_is_refused_naming_the_field(runtime_env, needle):
    errs = errors_of({"pools": [pool("work", runtime_env=runtime_env)]})
    assert needle in errs["pools.0.runtime_env"], errs


def test_a_pools_runtime_env_reaches_its_hosts_and_its_secrets_are_redacted():
    from fleet.runtime.deploy import host_deployment_options
    from fleet.security.redact import secret_values

    env = {"env_vars": {"VLLM_API_KEY": "sk-secret-1", "REGION": "eu-west"}}
    spec = parse_spec({"pools": [pool("work", runtime_env=env)]})
    opts = host_deployment_options(spec, spec.pools[0])
    assert opts["ray_actor_options"]["runtime_env"] == env
    assert secret_values(spec) == ["sk-secret-1"]


def test_a_spec_file_takes_its_environment_and_names_what_is_unset(tmp_path):
    f = tmp_path / "spec.yaml"
    f.write_text(
        "pools:\n"
        "  - {name: work, capability: work, agent_class: 'x:Y',\n"
        "     llm: {provider: openai, model: '${MODEL}', base_url: '${URL:-http://h:1/v1}'}}\n"
    )
    spec = load_spec(f, {"MODEL": "m-1"})
    assert (spec.pools[0].llm.model, spec.pools[0].llm.base_url) == ("m-1", "http://h:1/v1")
    with pytest.raises(SpecError) as info:
        load_spec(f, {})
    assert info.value.errors == [
        (
            "pools.0.llm.model",
            "environment variable MODEL is not set (and ${MODEL} has no default: "
            "write ${MODEL:-default})",
        )
    ]
