"""Circuit breakers and retries in the simulator, as the live host applies them.

Per pool, the fleet spec's ``resilience`` section drives the real policies:

* ``fleet.policy.breaker.BreakerRegistry``: every execution's outcome (a timeout is a
  failure) and service time feed the agent's breaker. When breakers change state the
  routable agents are recomputed with the registry's ``routable`` (ejection cap and
  panic mode included): agents it leaves out are ejected (they finish what they run,
  take nothing new), agents it lets back in are readmitted, and half-open ones take
  only their probe calls (``acquire`` at dispatch). An open breaker's end is scheduled,
  so it turns half-open on time without polling. The live host keeps one registry per
  host; the simulator keeps one per pool, so the ejection cap applies pool-wide.
* ``fleet.policy.retry.RetryPolicy``: a failed execution is retried (back to the pool's
  queue after the policy's backoff) or recorded as failed with the policy's verdict,
  exactly as ``AgentHost._decide_retry``; first attempts are counted for the retry
  budget (batched per dispatch and flushed before each decision, so the budget window
  sees them at most one event late).

Breakers are off when ``agent_breaker.enabled`` is false; retries when
``retry.max_attempts`` is 1.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING, Any

from fleet.policy.breaker import BreakerEvent, BreakerEventLog, BreakerRegistry, BreakerState
from fleet.policy.breaker import EventKind as BreakerEventKind
from fleet.policy.retry import RetryPolicy, RetryVerdict

if TYPE_CHECKING:
    from fleet.sim.engine import PoolRun, SimAgent, Simulation


class PoolResilience:
    """The breakers and retry policy of one simulated pool (either may be None)."""

    def __init__(self, sim: Simulation, pool: PoolRun):
        spec = sim.scenario.fleet.resilience
        self.sim = sim
        self.pool = pool
        self.log = BreakerEventLog()
        self.breakers: BreakerRegistry | None = None
        if spec.agent_breaker.enabled:
            self.breakers = BreakerRegistry(
                spec, self._clock, [self.log, self], name=pool.name
            )
        self.retry: RetryPolicy | None = None
        if spec.retry.max_attempts > 1:
            self.retry = RetryPolicy(spec.retry, self._clock, sim.rng(f"retry/{pool.name}"))
        self.max_attempts = spec.max_deliveries
        self.out: dict[str, SimAgent] = {}  # agents the breakers took out of service
        self.max_out = 0
        self._refresh_at = math.inf  # a refresh is scheduled at this time
        self.retries = 0
        self.verdicts: Counter[str] = Counter()

    def _clock(self) -> float:
        return self.sim.now

    # -- breakers ----------------------------------------------------------------------
    def on_breaker_event(self, event: BreakerEvent) -> None:
        """Registry listener: a state change may change which agents are routable."""
        if event.kind is BreakerEventKind.TRANSITION and event.new is not None:
            self.sim.log_event(
                f"breaker_{event.new.value}",
                pool=self.pool.name,
                breaker=event.name,
                reason=event.reason,
            )
        elif event.kind is not BreakerEventKind.TRANSITION:
            self.sim.log_event(event.kind.value, pool=self.pool.name, reason=event.reason)
        self._schedule_refresh(self.sim.now)

    def _schedule_refresh(self, t: float) -> None:
        # Never inside the engine's own bookkeeping: a refresh runs as its own event.
        if t < self._refresh_at:
            self._refresh_at = t
            self.sim.schedule(t, self._refresh)

    def _refresh(self, now: float) -> None:
        if now < self._refresh_at:
            return  # superseded by an earlier refresh
        self._refresh_at = math.inf
        reg, sim = self.breakers, self.sim
        if reg is None:
            return
        active = self.pool.active
        if not reg.ejected and not reg.panic:
            for a in list(self.out.values()):
                self._admit(a, now)
            return
        r = reg.routable(active)
        keep = {a.id for a in r.candidates}
        recheck = math.inf
        for a in list(active):
            if a.id in keep:
                b = reg.agent(a.id)
                a.probe = not r.panic and b.state is not BreakerState.CLOSED
                self._admit(a, now)
            elif a.id not in self.out and sim.eject(a, now):
                self.out[a.id] = a
                a.probe = False
        for agent_id in reg.ejected:
            until = reg.agent(agent_id).open_until_s
            if until is not None:
                recheck = min(recheck, until)
        self.max_out = max(self.max_out, len(self.out))
        if recheck < math.inf:
            self._schedule_refresh(max(recheck, now))

    def _admit(self, a: SimAgent, now: float) -> None:
        if self.out.pop(a.id, None) is not None:
            self.sim.readmit(a, now)
        if (
            self.breakers is not None
            and a.probe
            and self.breakers.agent(a.id).state is BreakerState.CLOSED
        ):
            a.probe = False

    def acquire_probe(self, a: SimAgent, now: float) -> bool:
        """A half-open agent was picked: take a probe permit, or take it out of routing
        until its probes have reported (their outcome closes or reopens the breaker)."""
        assert self.breakers is not None
        if self.breakers.acquire(a.id):
            return True
        if self.sim.eject(a, now):
            self.out[a.id] = a
        return False

    def agent_up(self, a: SimAgent) -> None:
        """``a`` joined the pool's serving agents: it gets a (closed) breaker."""
        if self.breakers is not None:
            a.breaker = self.breakers.agent(a.id)
        a.probe = False

    def agent_gone(self, a: SimAgent) -> None:
        """``a`` left (drained, died): its breaker leaves the registry (and the cap)."""
        if self.breakers is not None:
            self.breakers.remove_agent(a.id)
        a.breaker = None
        self.out.pop(a.id, None)
        a.probe = False

    # -- retries -----------------------------------------------------------------------
    def after_failure(self, tid: int, code: int, error: str, now: float) -> int:
        """A failed execution: 0 when it will be retried (requeued after the backoff),
        else the outcome code to record."""
        from fleet.sim.engine import MAX_ATTEMPTS, RETRY_BUDGET, TIMEOUT

        retry = self.retry
        assert retry is not None
        self.flush()
        reason = "timeout" if code == TIMEOUT else "error"
        d = retry.decide(
            max(1, self.sim.deliveries[tid]),
            reason,
            error,
            task_max_attempts=self.max_attempts,
        )
        if d.retry:
            self.retries += 1
            self.sim.requeue_after(self.pool, tid, now + d.delay_s)
            return 0
        self.verdicts[d.verdict.value] += 1
        if d.verdict is RetryVerdict.MAX_ATTEMPTS:
            return MAX_ATTEMPTS
        if d.verdict is RetryVerdict.BUDGET_EXHAUSTED:
            return RETRY_BUDGET
        return code

    def flush(self) -> None:
        """Count the first attempts started since the last flush in the retry budget."""
        pool = self.pool
        if pool.firsts:
            if self.retry is not None:
                self.retry.record_request(pool.firsts)
            pool.firsts = 0

    # -- report ------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.breakers is not None:
            snap = self.breakers.snapshot()
            out["breakers"] = {
                "events": dict(sorted(self.log.counts.items())),
                "ejected_max": self.max_out,
                "ejected_at_end": len(snap["ejected"]),  # type: ignore[arg-type]
                "max_ejected_allowed": snap["max_ejected"],
                "denied_trips": snap["denied_trips"],
                "panics": snap["panics"],
            }
        if self.retry is not None:
            out["retries"] = {
                "retried": self.retries,
                "budget_denied": self.retry.budget.denied,
                "final_verdicts": dict(sorted(self.verdicts.items())),
            }
        return out
