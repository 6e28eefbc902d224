"""The control plane survives a kill: the restart alert (a pure watch, then live),
``/healthz`` and ``fleet status`` while a control actor's restart is held back, and a
controller killed under load that resumes its agents, window and timeline.

The live tests use the sqlite backend in ``tmp_path`` (the controller's state is
durable only there) and call the ingress through a Serve handle: the session's Serve
may run without an HTTP proxy, and the handle runs the same ``healthz`` code.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

from fleet.policy.queue_alerts import AlertKind
from fleet.runtime.lifecycle import RESTART_ALERT, RestartWatch
from tests.utils import eventually, make_spec, pool

UP = {"state": "ALIVE", "restarts": 0}


def _st(state: str = "ALIVE", restarts: int = 0) -> dict:
    return {"state": state, "restarts": restarts}


def _sr(actor: dict) -> dict:
    """An actor's state and restart count (``actor_states`` may tell more)."""
    return {"state": actor["state"], "restarts": actor["restarts"]}


# -- the restart watch, pure ---------------------------------------------------------
def test_restart_watch_fires_on_a_grown_count_and_clears_after_the_hold():
    w = RestartWatch(active_s=60)
    assert w.observe({"f.ledger": UP, "f.dispatcher": _st(restarts=2)}, 0.0) == []
    (e,) = w.observe({"f.ledger": _st("RESTARTING", 1), "f.dispatcher": _st(restarts=2)}, 1.0)
    assert (e.kind, e.rule, e.subject, e.value, e.threshold) == (
        AlertKind.FIRED,
        RESTART_ALERT,
        "f.ledger",
        1,
        0,
    )
    assert "f.ledger restarted" in e.message and "RESTARTING" in e.message
    assert [a.subject for a in w.active()] == ["f.ledger"]
    # Still restarting past the hold: stays active; alive and past it: clears.
    assert w.observe({"f.ledger": _st("RESTARTING", 1)}, 100.0) == []
    (c,) = w.observe({"f.ledger": _st("ALIVE", 1)}, 101.0)
    assert c.kind is AlertKind.CLEARED and w.active() == []
    assert w.seen == {"f.ledger": 1, "f.dispatcher": 2}


def test_restart_watch_baselines_missing_and_redeployed_actors():
    w = RestartWatch({"f.controller": 0})  # a restarted controller with no saved counts
    (e,) = w.observe({"f.controller": _st(restarts=1), "f.queue.a.0": _st("MISSING")}, 0.0)
    assert e.subject == "f.controller" and "f.queue.a.0" not in w.seen
    # A new actor under an old name (a redeploy) restarts its count: no alert.
    assert w.observe({"f.controller": _st(restarts=0)}, 1.0) == []
    (again,) = w.observe({"f.controller": _st(restarts=1)}, 2.0)
    assert again.subject == "f.controller"


def test_fleet_status_text_shows_the_control_plane():
    from fleet.cli.status import _human

    st = {
        "fleet": "f",
        "ledger": {"recorded": None},
        "pools": {},
        "control": {"f.ledger": UP, "f.controller": UP},
    }
    assert "control plane: 2 actor(s) alive, no restarts" in _human(st)
    assert "? outcome(s) recorded" in _human(st)
    st["control"]["f.controller"] = _st("RESTARTING", 3)
    st["unavailable"] = {"f.controller": "RESTARTING", "f.ledger": "GetTimeoutError"}
    lines = _human(st).splitlines()
    assert "  control plane: 1 of 2 actor(s) alive" in lines
    assert any(
        line.split() == ["f.controller", "RESTARTING", "restarts", "3"] for line in lines
    ), lines
    assert "    not read: f.ledger (GetTimeoutError)" in lines


# -- live --------------------------------------------------------------------------
def _durable_spec(tmp_path, name: str, **pool_kw):
    ns = f"cp-{name}-{uuid.uuid4().hex[:8]}"
    return make_spec(
        pool(
            "work", agent_class="fleet.agents.testing:SleepAgent", cpus_per_host=0, **pool_kw
        ),
        name=name,
        namespace=ns,
        queues={
            "shards": 1,
            "lease_s": 20,
            "storage": {"backend": "sqlite", "directory": str(tmp_path)},
        },
    )


def _healthz(handle) -> tuple[int, dict]:
    from fastapi.responses import JSONResponse

    r = handle.healthz.remote().result(timeout_s=10)
    if isinstance(r, JSONResponse):
        return r.status_code, json.loads(r.body)
    return 200, r.model_dump(exclude_none=True)


def _alert_subjects(fc) -> list[str]:
    import ray

    events = ray.get(fc._ctl().alerts.remote(), timeout=10)["events"]
    return [e["subject"] for e in events if e["rule"] == RESTART_ALERT]


def _active(fc) -> set[tuple[str, str]]:
    return {(a["rule"], a["subject"]) for a in fc.status()["alerts"]["active"]}


def _alert_gauge(fc, subject: str) -> float:
    """The exported ``fleet_alerts_firing`` of the restart alert on ``subject``, summed
    over the processes that export it (0.0 when there is none)."""
    from fleet.observability import scrape

    return scrape.total(
        fc.metrics_text(),
        "ray_fleet_alerts_firing",
        rule=RESTART_ALERT,
        subject=subject,
        fleet=fc.spec.name,
    )


def _held_restart(fc, handle, name: str) -> None:
    """Kill ``name`` with its restart held: /healthz and status() report it; release it:
    /healthz is 200 again."""
    import ray

    from fleet.cli.status import _human, _while_controller_restarts
    from fleet.runtime.lifecycle import actor_states, hold_restart

    ns = fc.spec.namespace
    before = actor_states(ns, [name])[name]["restarts"]
    hold_restart(ns, name)
    try:
        ray.kill(ray.get_actor(name, namespace=ns), no_restart=False)
        _code, body = eventually(
            lambda: (r := _healthz(handle))[0] == 503 and r,
            20,
            what=f"/healthz 503 while {name} restarts",
        )
        assert body["not_alive"] == {name: "RESTARTING"}, body
        assert name in body["detail"] and "RESTARTING" in body["detail"]
        st = fc.status()  # does not raise, nor wait for the held actor
        assert _sr(st["control"][name]) == {"state": "RESTARTING", "restarts": before + 1}
        assert st["unavailable"][name] == "RESTARTING"
        assert name in _human(st) and "RESTARTING" in _human(st)
        if name == fc.names.controller:  # `fleet status` cannot join through it: GCS only
            cli = _while_controller_restarts(fc.spec.name, ns)
            assert _sr(cli["control"][name]) == _sr(st["control"][name])
            assert set(cli["control"]) == set(fc.names.control_actors(fc.spec))
    finally:
        hold_restart(ns, name, False)
    _code, body = eventually(
        lambda: (r := _healthz(handle))[0] == 200 and r,
        30,
        what=f"/healthz 200 once {name} is back",
    )
    assert set(body) == {"status", "fleet", "recorded"} and body["status"] == "ok"
    assert _sr(fc.status()["control"][name]) == {"state": "ALIVE", "restarts": before + 1}


@pytest.mark.ray
def test_healthz_status_and_alert_follow_held_restarts(start_fleet, tmp_path):
    from ray import serve

    from fleet.ingress import Ingress

    spec = _durable_spec(
        tmp_path,
        "held",
        agent_kwargs={"delay_s": 0.0},
        autoscaling={"control_interval_s": 0.2},
    )
    fc = start_fleet(spec)
    app = f"{spec.namespace}-ingress"
    handle = serve.run(Ingress.bind(spec.name, spec.namespace), name=app, route_prefix=None)
    try:
        code, body = _healthz(handle)
        assert code == 200 and body["status"] == "ok", body
        assert {n: _sr(a) for n, a in fc.status()["control"].items()} == dict.fromkeys(
            fc.names.control_actors(spec), UP
        )
        # A queue shard: the controller, alive, alerts about it.
        shard = fc.names.shard("work", 0)
        _held_restart(fc, handle, shard)
        eventually(lambda: shard in _alert_subjects(fc), 10, what="alert on the shard")
        assert (RESTART_ALERT, shard) in _active(fc)
        # The controller itself: it resumes its loop unasked and alerts about itself.
        ctl = fc.names.controller
        _held_restart(fc, handle, ctl)
        eventually(lambda: ctl in _alert_subjects(fc), 10, what="alert on the controller")
        assert (RESTART_ALERT, ctl) in _active(fc)
        # Exported by the restarted controller (Ray's metrics export: ~1 s).
        eventually(lambda: _alert_gauge(fc, ctl) == 1.0, 15, 0.5, what="the alert gauge at 1")
        # The fleet still works end to end.
        ids = fc.submit(
            [{"capability": "work", "payload": {"i": i}} for i in range(5)]
        ).accepted
        assert fc.wait(ids, timeout_s=30) == []
    finally:
        serve.delete(app)


@pytest.mark.ray
def test_a_controller_killed_under_load_keeps_its_agents_and_timeline(start_fleet, tmp_path):
    import ray

    from fleet.runtime.lifecycle import actor_states

    stabilization_s = 3.0
    spec = _durable_spec(
        tmp_path,
        "load",
        agent_kwargs={"delay_s": 0.5},
        agents_per_host=8,
        # Scale-up is rate-limited (5 agents in 2 s), so a controller that restarted
        # from start_agents would show in the timeline climbing back from 1.
        autoscaling={
            "min_agents": 1,
            "max_agents": 6,
            "target_queued_per_agent": 1,
            "control_interval_s": 0.2,
            "upscale_within_s": 2,
            "downscale_within_s": 0,
            "downscale_stabilization_s": stabilization_s,
        },
    )
    fc = start_fleet(spec)
    # A backlog that outlasts the test (6 agents x 2 tasks/s): the load stays steady.
    fc.submit([{"capability": "work", "id": f"w{i}"} for i in range(400)])

    def full_for_a_window() -> list[dict] | None:
        tl = fc.timeline()
        if not tl or tl[-1]["unix_s"] - tl[0]["unix_s"] < stabilization_s:
            return None
        recent = [s for s in tl if s["unix_s"] >= tl[-1]["unix_s"] - stabilization_s]
        return tl if all(s["agents"] == 6 for s in recent) else None

    def a_window_after(t: float) -> list[dict] | None:
        tl = fc.timeline()
        after = [s for s in tl if s["unix_s"] > t]
        return (
            tl
            if after and after[-1]["unix_s"] - after[0]["unix_s"] >= stabilization_s
            else None
        )

    before = eventually(full_for_a_window, 40, 0.2, what="6 agents for a whole window")
    ctl = fc.names.controller
    killed_at = time.time()
    ray.kill(ray.get_actor(ctl, namespace=spec.namespace), no_restart=False)
    eventually(
        lambda: (
            _sr(actor_states(spec.namespace, [ctl])[ctl]) == {"state": "ALIVE", "restarts": 1}
        ),
        30,
        what="the controller restarted",
    )
    tl = eventually(
        lambda: a_window_after(killed_at),
        30,
        0.2,
        what="a window of samples from the restarted controller",
    )
    pre = [s for s in tl if s["unix_s"] <= killed_at]
    post = [s for s in tl if s["unix_s"] > killed_at]
    # The timeline survived: everything seen before the kill is still there.
    assert [s["t_s"] for s in pre[: len(before)]] == [s["t_s"] for s in before]
    window_min = min(s["agents"] for s in pre if s["unix_s"] >= killed_at - stabilization_s)
    assert window_min == 6
    low = [(s["t_s"], s["agents"]) for s in post if s["agents"] < window_min]
    assert low == [], f"agents dropped below {window_min} after the restart: {low[:5]}"
    # t_s carries on across the restart (it counts the downtime, never runs backwards).
    ts = [s["t_s"] for s in tl]
    assert ts == sorted(ts) and post[0]["t_s"] > pre[-1]["t_s"]
    assert post[0]["t_s"] - pre[-1]["t_s"] == pytest.approx(
        post[0]["unix_s"] - pre[-1]["unix_s"], abs=0.5
    )
