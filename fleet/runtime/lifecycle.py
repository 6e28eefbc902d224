"""Life cycle of a fleet's control actors: how they restart, where they run, how they
are watched.

Every actor that holds state (ledger shards, queue shards, dispatcher, controller,
budget actor, Kafka intake) is created by ``control_actor_options``:

- ``max_restarts=-1``: Ray restarts it whenever its process dies, and its ``__init__``
  rebuilds its state from durable storage (each actor's module says how).
- ``max_task_retries=-1``: a call in flight when it died, or made while it restarts, is
  retried by Ray on the new instance, so hosts, clients and the ingress wait for a
  restart instead of failing a task or raising to the user. Every control-actor method
  is therefore safe to run twice (records keep the first outcome, acks and puts are
  idempotent, leases are re-issued).
- Actors that hold storage ask for a sliver of the resource of the node that holds
  their files (``queues.storage.node``: the head node by default, or a custom
  resource), so Ray creates and restarts them only there and a restart never finds an
  empty directory on another node. A resource, not a node id: a head node replaced
  under the same role (KubeRay recreating the head pod on its volume) takes them too.

``on_start`` runs first in each such ``__init__``: on a restart it honours the test
hook that holds a restart back (``hold_restart``), so a test can watch ``/healthz``
report the actor as restarting. ``actor_states`` reads each actor's state and restart
count from Ray's GCS (no dashboard needed), for ``/healthz`` and ``fleet status``;
``RestartWatch`` turns growing restart counts into the ``control_actor_restarted`` alert
(the controller reads the counts every tick).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import ray

from fleet.policy.queue_alerts import ActiveAlert, AlertEvent, AlertKind

HOLD_POLL_S = 0.05
HOLD_MAX_S = 600.0  # a forgotten hold never wedges an actor for longer than this
ALIVE = "ALIVE"
MISSING = "MISSING"
RESTART_ALERT = "control_actor_restarted"
RESTART_SEVERITY = "warning"
# A restart alert stays active this long (and while its actor is not ALIVE), the way a
# Prometheus rule on increase(restarts[5m]) would, so the gauge and `fleet status` show it.
RESTART_ALERT_ACTIVE_S = 300.0
_HOLD_PREFIX = "fleet.hold_restart"


STORAGE_RESOURCE_SLIVER = 0.001  # of the storage node's resource, per actor


def control_actor_options(
    name: str, namespace: str, *, detached: bool, node_resource: str | None = None
) -> dict[str, Any]:
    """Ray options for a control actor: named, restarted forever with its calls retried,
    and, with ``node_resource``, placed only on a node that has that resource."""
    opts: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "max_restarts": -1,
        "max_task_retries": -1,
    }
    if detached:
        opts["lifetime"] = "detached"
    if node_resource is not None:
        opts["resources"] = {node_resource: STORAGE_RESOURCE_SLIVER}
    return opts


def _hold_key(namespace: str, name: str) -> bytes:
    return f"{_HOLD_PREFIX}.{namespace}.{name}".encode()


def hold_restart(namespace: str, name: str, hold: bool = True) -> None:
    """Test hook: while held, a restart of actor ``name`` waits in ``on_start`` (so the
    actor stays RESTARTING); ``hold=False`` lets it finish."""
    from ray.experimental import internal_kv

    key = _hold_key(namespace, name)
    if hold:
        internal_kv._internal_kv_put(key, b"1", overwrite=True)
    else:
        internal_kv._internal_kv_del(key)


def on_start(namespace: str, name: str) -> bool:
    """Call first in a control actor's ``__init__``. Returns True on a restart (the
    actor then recovers its state from storage). On a restart it waits while a test
    holds it back (``hold_restart``)."""
    try:
        restarted = ray.get_runtime_context().was_current_actor_reconstructed
    except Exception:  # not inside an actor (unit tests build the classes directly)
        return False
    if restarted:
        from ray.experimental import internal_kv

        key = _hold_key(namespace, name)
        until = time.monotonic() + HOLD_MAX_S
        while internal_kv._internal_kv_exists(key) and time.monotonic() < until:
            time.sleep(HOLD_POLL_S)
    return bool(restarted)


def resume_after_restart(method: str) -> None:
    """From a restarted actor's ``__init__``: call its own ``method`` (e.g. ``start``)
    as soon as ``__init__`` returns, since whoever started the first instance (deploy)
    does not call it again."""
    getattr(ray.get_runtime_context().current_actor, method).remote()


def actor_states(namespace: str, names: list[str]) -> dict[str, dict[str, Any]]:
    """Each named actor's state (ALIVE, RESTARTING, DEAD, PENDING_CREATION, or
    MISSING when no such actor exists), restart count, pid, node and whether it is
    detached, from Ray's GCS."""
    from ray._private import state as ray_state

    out: dict[str, dict[str, Any]] = {}
    for name in names:
        try:
            handle = ray.get_actor(name, namespace=namespace)
        except ValueError:
            out[name] = {"state": MISSING, "restarts": 0}
            continue
        info = ray_state.actors(handle._actor_id.hex()) or {}
        out[name] = {
            "state": info.get("State", "UNKNOWN"),
            "restarts": int(info.get("NumRestarts", 0)),
            "pid": int(info.get("Pid", 0) or 0),
            "node_id": (info.get("Address") or {}).get("NodeID"),
            "detached": bool(info.get("IsDetached", False)),
        }
    return out


def not_alive(states: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """The actors of ``states`` (as ``actor_states`` returns) that are not ALIVE, with
    their state."""
    return {name: st["state"] for name, st in states.items() if st["state"] != ALIVE}


class RestartWatch:
    """Fires ``control_actor_restarted`` when a control actor's restart count grows.

    Pure: feed it ``actor_states`` and the time (monotonic seconds) each tick. The first
    count seen for an actor is its baseline; ``seen`` gives baselines up front (a
    restarted controller passes those it saved, and 0 for itself when it saved none, so
    it alerts about its own restart). A count that falls belongs to a new actor under
    the same name (a redeploy) and only moves the baseline. An alert stays active while
    its actor is not ALIVE and for ``active_s`` after its last restart, then clears.
    """

    def __init__(
        self, seen: Mapping[str, int] | None = None, active_s: float = RESTART_ALERT_ACTIVE_S
    ):
        self.seen: dict[str, int] = dict(seen or {})
        self.active_s = active_s
        self._firing: dict[str, ActiveAlert] = {}

    def observe(
        self, states: Mapping[str, Mapping[str, Any]], now_s: float
    ) -> list[AlertEvent]:
        """This tick's alert events (fired and cleared)."""
        events = []
        for name, st in states.items():
            if st["state"] == MISSING:  # not created yet, or gone: nothing to compare
                continue
            n, prev = int(st["restarts"]), self.seen.get(name)
            self.seen[name] = n
            if prev is None or n <= prev:
                continue
            self._firing[name] = ActiveAlert(
                RESTART_ALERT, name, RESTART_SEVERITY, n, prev, now_s
            )
            events.append(
                AlertEvent(
                    AlertKind.FIRED,
                    RESTART_ALERT,
                    name,
                    RESTART_SEVERITY,
                    n,
                    prev,
                    now_s,
                    f"firing: control actor {name} restarted ({n} restart(s) in all, "
                    f"{n - prev} since last seen); it is {st['state']}",
                )
            )
        for name, a in list(self._firing.items()):
            state = states.get(name, {}).get("state")
            if now_s - a.since_s >= self.active_s and state in (ALIVE, None):
                del self._firing[name]
                events.append(
                    AlertEvent(
                        AlertKind.CLEARED,
                        RESTART_ALERT,
                        name,
                        RESTART_SEVERITY,
                        a.value,
                        a.threshold,
                        now_s,
                        f"cleared: {name} alive, no restart for {self.active_s:g}s",
                    )
                )
        return events

    def active(self) -> list[ActiveAlert]:
        return sorted(self._firing.values(), key=lambda a: a.subject)
