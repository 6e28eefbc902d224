"""Ledger: the record of every task's outcome, exactly once by (tenant, task id), durable.

Delivery is at-least-once (a lease can expire under a slow holder, a host can die after
finishing), so the same task may be *executed* twice. The ledger keeps the first
outcome recorded for a task and counts every later execution as a duplicate: the outcome
is recorded once, duplicates are reported, never hidden.

A fleet runs ``results.ledger_shards`` ledger actors (``<fleet>.ledger``,
``<fleet>.ledger.1``, ...); a task's outcome lives on shard ``crc32(id) % shards``
(``fleet.policy.sharding.shard_of``; ``LedgerClient`` routes every call). Each shard
writes through a ``LedgerStore`` (``fleet.ledger.store``): SQLite WAL beside the queue
files by default, committed before ``record`` returns, so a host acks a batch only
once its outcomes are durable. A killed shard is restarted by Ray
(``fleet.runtime.lifecycle``) and reopens its file; calls in flight are retried on the
new instance, and a retried ``record`` is recognised as a replay, not a duplicate.

Duplicate executions are counted from delivery numbers (``fleet.ledger.store``): the
runtime tells the shard which deliveries did not run a duplicate (a failure handed back
for a retry, a task requeued before it started) with the records it sends anyway
(``record(..., excused=ids)``), so counting costs no write of its own. Those excusals
wait in memory until the task's outcome arrives: a shard restarted in between counts
the excused delivery as a duplicate (over-, never under-counting). Outcomes older than
``results.retention_s`` are deleted by a periodic sweep.

Each shard also keeps, in memory only, the newest completed task of each cache key it
recorded (``Task.cache_key``, per pool and tenant; at most ``CACHE_KEYS``, the least
recently recorded go first), for degrade rules that answer from a cache
(``pools[].degrade.from_cache``): a cache, so a restarted shard starts it empty and
nothing accepted or recorded depends on it (a miss sends the task the ordinary way).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import Any

import ray

from fleet.ledger.store import (
    DEFAULT_TENANT,
    SINCE_LIMIT,
    LedgerStore,
    MemoryLedgerStore,
    SqliteLedgerStore,
    ledger_path,
)
from fleet.policy.sharding import shard_of
from fleet.queue.storage import fleet_directory
from fleet.runtime.lifecycle import on_start
from fleet.runtime.names import Names
from fleet.spec.fleet import FleetSpec
from fleet.spec.queues import StorageBackend
from fleet.stats import percentiles
from fleet.task import Outcome

RETENTION_SWEEP_S = 600.0
MAX_EXCUSED = 1_000_000  # excusals waiting for their task's outcome, per shard
CACHE_KEYS = 100_000  # cache keys a shard remembers (the module docstring)
# A cache key: (pool, ``fleet.task.cache_key_of``: the tenant and Task.cache_key).
CacheKey = tuple[str | None, str]
_SUMMARY_COLS = (
    "ok, reason, error, deliveries, submitted_unix_s, finished_unix_s,"
    " input_tokens, output_tokens, cost_usd, duplicates"
)


def make_ledger_store(spec: FleetSpec, index: int) -> LedgerStore:
    """The store ledger shard ``index`` uses, from ``queues.storage``."""
    st = spec.queues.storage
    if st.backend is StorageBackend.MEMORY:
        return MemoryLedgerStore()
    path = ledger_path(fleet_directory(st, spec.namespace, spec.name), index)
    return SqliteLedgerStore(path, st.sqlite_synchronous, st.sqlite_cache_mib)


@ray.remote(num_cpus=0)
class Ledger:
    """One ledger shard. Methods never await, so calls run one at a time."""

    def __init__(self, spec: dict[str, Any], index: int = 0):
        fleet = FleetSpec.model_validate(spec)
        self.index = index
        on_start(fleet.namespace, Names(fleet.name).ledger_shard(index))
        self._store = make_ledger_store(fleet, index)
        self._retention_s = fleet.results.retention_s
        self._sweeper: asyncio.Task[None] | None = None
        self.expired_total = 0
        self.record_calls = 0
        self.recorded_outcomes = 0  # offered to record, new or not
        self.record_cpu_s = 0.0  # CPU spent storing them (the rest of the process's
        # CPU is Ray's: receiving calls, deserializing arguments)
        self._excused: dict[tuple[str, str], int] = {}  # see the module docstring
        # cache key -> (task id, finished) of its newest completed task
        self._cache: OrderedDict[CacheKey, tuple[str, float]] = OrderedDict()

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        while True:
            try:
                self.expired_total += self._store.expire(time.time() - self._retention_s)
            except Exception:  # storage trouble: the next sweep tries again
                pass
            await asyncio.sleep(RETENTION_SWEEP_S)

    async def record(
        self,
        outcomes: list[Outcome],
        tenant: str = DEFAULT_TENANT,
        excused: list[str] | None = None,
    ) -> int:
        """Record outcomes (durable before this returns); returns how many were new.

        ``excused``: ids of tasks one of whose deliveries ended without a duplicate
        execution (once per such delivery; see the module docstring)."""
        self._ensure_sweeper()
        self.record_calls += 1
        self.recorded_outcomes += len(outcomes)
        t0 = time.thread_time()
        try:
            exc = self._excused
            new = Counter(excused) if excused else None
            per: list[int] | None = None
            if outcomes and (exc or new):
                per = [
                    exc.get((tenant, o.task_id), 0) + (new[o.task_id] if new else 0)
                    for o in outcomes
                ]
            n = self._store.record(outcomes, tenant, per)
            self._remember(outcomes)
            # Committed: only now do the excusals change (a failed call changes nothing,
            # so the caller's retry does not excuse twice).
            if per is not None:
                for o in outcomes:
                    exc.pop((tenant, o.task_id), None)
            if new:
                recorded = {o.task_id for o in outcomes}
                if len(exc) + len(new) > MAX_EXCUSED:  # the oldest go: overcount
                    for k in list(itertools.islice(iter(exc), len(new))):
                        del exc[k]
                for i, c in new.items():
                    if i not in recorded:
                        exc[(tenant, i)] = exc.get((tenant, i), 0) + c
            return n
        finally:
            self.record_cpu_s += time.thread_time() - t0

    def _remember(self, outcomes: Sequence[Outcome]) -> None:
        """Keep the newest completed task of each cache key among ``outcomes``."""
        cache = self._cache
        for o in outcomes:
            if o.cache_key is None or not o.ok:
                continue
            key = (o.pool, o.cache_key)
            old = cache.get(key)
            if old is not None and old[1] > o.finished_unix_s:
                continue
            cache[key] = (o.task_id, o.finished_unix_s)
            cache.move_to_end(key)
            if len(cache) > CACHE_KEYS:
                cache.popitem(last=False)

    async def cached(self, keys: list[CacheKey], max_age_s: float) -> list[Outcome | None]:
        """For each key, the newest completed task this shard recorded for it, if it
        finished within ``max_age_s`` (None otherwise, or if its outcome expired)."""
        cutoff = time.time() - max_age_s
        hits = [self._cache.get(k) for k in keys]
        ids = [h[0] for h in hits if h is not None and h[1] >= cutoff]
        found = dict(zip(ids, self._store.get(ids))) if ids else {}
        return [found.get(h[0]) if h is not None and h[1] >= cutoff else None for h in hits]

    async def get(self, ids: list[str], tenant: str = DEFAULT_TENANT) -> list[Outcome | None]:
        return self._store.get(ids, tenant)

    async def missing(self, ids: list[str], tenant: str = DEFAULT_TENANT) -> list[str]:
        """The ids among ``ids`` that have no recorded outcome."""
        return self._store.missing(ids, tenant)

    async def since(self, cursor: int, limit: int = SINCE_LIMIT) -> tuple[list[str], int]:
        return self._store.since(cursor, limit)

    async def owned(
        self, owner: str | None, before: int | None, limit: int, ok: bool | None = None
    ) -> list[tuple[int, Outcome]]:
        """Tenant ``owner``'s outcomes on this shard, newest first (``LedgerStore.owned``)."""
        return self._store.owned(owner, before, limit, ok)

    async def cursor(self) -> int:
        return self._store.cursor()

    async def count(self) -> int:
        self._ensure_sweeper()
        return self._store.count()

    async def duplicates(
        self, ids: list[str] | None = None, tenant: str = DEFAULT_TENANT
    ) -> dict[str, int]:
        return self._store.duplicates(ids, tenant)

    async def summary_part(
        self, ids: list[str] | None = None, tenant: str = DEFAULT_TENANT
    ) -> dict[str, Any]:
        """This shard's share of ``LedgerClient.summary``: counts and raw latencies."""
        if ids is None:
            if isinstance(self._store, SqliteLedgerStore):
                rows = [(bool(r[0]), *r[1:]) for r in self._store.scan(_SUMMARY_COLS)]
            else:
                dups = self._store.duplicates()
                rows = [
                    _summary_row(o, dups.get(o.task_id, 0))
                    for o in self._store.get(self._store.since(0, 1 << 62)[0], tenant)
                    if o is not None
                ]
            lost = 0
        elif isinstance(self._store, SqliteLedgerStore):  # one read of the columns needed
            rows = [
                (bool(r[0]), *r[1:])
                for r in self._store.rows(ids, _SUMMARY_COLS, tenant)
                if r is not None
            ]
            lost = len(ids) - len(rows)
        else:
            outs = self._store.get(ids, tenant)
            dups = self._store.duplicates(ids, tenant)
            rows = [_summary_row(o, dups.get(o.task_id, 0)) for o in outs if o is not None]
            lost = len(ids) - len(rows)
        return _summarize_rows(rows, lost)

    async def stats(self) -> dict[str, Any]:
        store = self._store
        return {
            "shard": self.index,
            "recorded": store.count(),
            "durable": store.durable,
            "expired_total": self.expired_total,
            "record_calls": self.record_calls,
            "recorded_outcomes": self.recorded_outcomes,
            "record_cpu_s": round(self.record_cpu_s, 3),
            "process_cpu_s": round(time.process_time(), 3),
            "index_bytes": store.index_bytes() if isinstance(store, SqliteLedgerStore) else 0,
        }


def _summary_row(o: Outcome, dups: int) -> tuple[Any, ...]:
    return (
        o.ok,
        o.reason,
        o.error,
        o.deliveries,
        o.submitted_unix_s,
        o.finished_unix_s,
        o.input_tokens,
        o.output_tokens,
        o.cost_usd,
        dups,
    )


def _summarize_rows(rows: list[tuple[Any, ...]], lost: int) -> dict[str, Any]:
    failed = [r for r in rows if not r[0]]
    return {
        "recorded": len(rows),
        "completed": len(rows) - len(failed),
        "lost": lost,
        "failure_reasons": Counter(r[1] or "error" for r in failed),
        # First lines: an agent's error carries its traceback after the first line.
        "sample_errors": [r[2] and r[2].partition("\n")[0] for r in failed[:3]],
        "duplicate_executions": sum(r[9] for r in rows),
        "redelivered": sum(1 for r in rows if r[3] > 1),
        "latencies": [r[5] - r[4] for r in rows],
        "first_submit_unix_s": min((r[4] for r in rows), default=0.0),
        "last_finish_unix_s": max((r[5] for r in rows), default=0.0),
        "input_tokens": sum(r[6] for r in rows),
        "output_tokens": sum(r[7] for r in rows),
        "cost_usd": sum(r[8] for r in rows),
    }


def merge_summaries(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary from the shards' parts: counts, latency percentiles, failure
    reasons and token/cost totals. ``lost`` counts ids with no outcome (accounting comes
    from the records, not from counters)."""
    reasons: Counter[str] = Counter()
    latencies: list[float] = []
    for p in parts:
        reasons.update(p["failure_reasons"])
        latencies.extend(p["latencies"])
    recorded = sum(p["recorded"] for p in parts)
    completed = sum(p["completed"] for p in parts)
    firsts = [p["first_submit_unix_s"] for p in parts if p["recorded"]]
    return {
        "recorded": recorded,
        "completed": completed,
        "failed": recorded - completed,
        "lost": sum(p["lost"] for p in parts),
        "failure_reasons": dict(reasons),
        "sample_errors": [e for p in parts for e in p["sample_errors"]][:3],
        "duplicate_executions": sum(p["duplicate_executions"] for p in parts),
        # Recorded from a second or later delivery: their first holder died, was
        # removed past its drain timeout, or handed them back.
        "redelivered": sum(p["redelivered"] for p in parts),
        "latency_s": percentiles(latencies),
        "first_submit_unix_s": min(firsts, default=0.0),
        "last_finish_unix_s": max((p["last_finish_unix_s"] for p in parts), default=0.0),
        "input_tokens": sum(p["input_tokens"] for p in parts),
        "output_tokens": sum(p["output_tokens"] for p in parts),
        "cost_usd": round(sum(p["cost_usd"] for p in parts), 6),
    }


def merge_owned(
    pages: list[list[tuple[int, Outcome]]], before: list[int | None], limit: int
) -> tuple[list[Outcome], list[int | None] | None]:
    """Up to ``limit`` outcomes from the shards' pages (each newest first, as
    ``LedgerStore.owned`` answers ``limit`` at most), newest finish first, and the
    per-shard cursors that continue after them (None when nothing is left).

    Each shard's page is consumed from its front (a k-way merge on finish time), so
    the next call, from each shard's last taken sequence number, neither repeats nor
    skips an outcome even where a shard's record order and finish times disagree."""
    streams = [
        [(o.finished_unix_s, -k, seq, o) for seq, o in page] for k, page in enumerate(pages)
    ]
    merged = heapq.merge(*streams, key=lambda row: row[0], reverse=True)
    taken = list(itertools.islice(merged, limit))
    after = list(before)
    for _, neg_k, seq, _ in taken:
        after[-neg_k] = seq
    full = any(len(page) >= limit for page in pages)
    more = full or len(taken) < sum(len(page) for page in pages)
    return [row[3] for row in taken], (after if more else None)


class LedgerClient:
    """Every caller's way to a fleet's ledger shards: routes each id to its shard and
    puts the answers back in the callers' order. Sync methods block (drivers, threads);
    ``*_async`` ones await (actors, the ingress). Calls to a restarting shard wait for it
    (the shards are created with ``max_task_retries=-1``)."""

    def __init__(self, fleet: str, namespace: str, shards: int = 1):
        names = Names(fleet)
        self.namespace = namespace
        self.n = shards
        self._names = [names.ledger_shard(i) for i in range(shards)]
        self._handles: list[Any] = [None] * shards

    @classmethod
    def for_spec(cls, spec: FleetSpec) -> LedgerClient:
        return cls(spec.name, spec.namespace, spec.results.ledger_shards)

    def handle(self, k: int) -> Any:
        h = self._handles[k]
        if h is None:
            h = self._handles[k] = ray.get_actor(self._names[k], namespace=self.namespace)
        return h

    def shard_of(self, task_id: str) -> int:
        return shard_of(task_id, self.n)

    def _split(self, keys: Sequence[str]) -> list[tuple[int, list[int]]]:
        """(shard, positions in ``keys``) for every shard that has any."""
        if self.n == 1:
            return [(0, list(range(len(keys))))]
        groups: dict[int, list[int]] = {}
        for pos, k in enumerate(keys):
            groups.setdefault(self.shard_of(k), []).append(pos)
        return sorted(groups.items())

    def _fan(
        self, method: str, values: Sequence[Any], keys: Sequence[str], *args: Any
    ) -> tuple[list[tuple[int, list[int]]], list[Any]]:
        split = self._split(keys)
        if self.n == 1:
            refs = [getattr(self.handle(0), method).remote(list(values), *args)]
        else:
            refs = [
                getattr(self.handle(s), method).remote([values[p] for p in pos], *args)
                for s, pos in split
            ]
        return split, refs

    @staticmethod
    def _ordered(
        n: int, split: list[tuple[int, list[int]]], answers: list[list[Any]]
    ) -> list[Any]:
        out: list[Any] = [None] * n
        for (_, pos), ans in zip(split, answers):
            for p, a in zip(pos, ans):
                out[p] = a
        return out

    # -- async (actors, ingress) ----------------------------------------------------------
    async def record_async(
        self, outcomes: Sequence[Outcome], excused: Sequence[str] = ()
    ) -> int:
        """Record outcomes on their shards; ``excused`` as in ``Ledger.record``."""
        if not excused:
            if not outcomes:
                return 0
            _, refs = self._fan("record", outcomes, [o.task_id for o in outcomes])
            return sum(await asyncio.gather(*refs))
        by_shard: dict[int, tuple[list[Outcome], list[str]]] = {}
        for o in outcomes:
            by_shard.setdefault(self.shard_of(o.task_id), ([], []))[0].append(o)
        for i in excused:
            by_shard.setdefault(self.shard_of(i), ([], []))[1].append(i)
        return sum(
            await asyncio.gather(
                *(self.record_shard_async(k, outs, exc) for k, (outs, exc) in by_shard.items())
            )
        )

    async def record_shard_async(
        self, shard: int, outcomes: list[Outcome], excused: list[str] | None = None
    ) -> int:
        """Record on one shard outcomes (and excusals) already routed to it."""
        return await self.handle(shard).record.remote(
            outcomes, DEFAULT_TENANT, excused or None
        )

    async def get_async(self, ids: Sequence[str]) -> list[Outcome | None]:
        if not ids:
            return []
        split, refs = self._fan("get", ids, ids)
        return self._ordered(len(ids), split, await asyncio.gather(*refs))

    async def cached_async(
        self, keys: Sequence[CacheKey], max_age_s: float
    ) -> list[Outcome | None]:
        """For each cache key, the newest completed task recorded for it within
        ``max_age_s`` (None: none), from every shard (a key's tasks may be on any)."""
        if not keys:
            return []
        answers = await asyncio.gather(
            *(self.handle(k).cached.remote(list(keys), max_age_s) for k in range(self.n))
        )
        return _newest(answers, len(keys))

    async def missing_async(self, ids: Sequence[str]) -> list[str]:
        if not ids:
            return []
        _, refs = self._fan("missing", ids, ids)
        gone = {i for part in await asyncio.gather(*refs) for i in part}
        return [i for i in ids if i in gone]

    async def owned_async(
        self,
        owner: str | None,
        before: list[int | None] | None,
        limit: int,
        ok: bool | None = None,
    ) -> tuple[list[Outcome], list[int | None] | None]:
        """Tenant ``owner``'s outcomes, newest first, from every shard (``merge_owned``):
        ``before`` is the cursor a previous call returned (None: from the newest)."""
        before = before if before is not None else [None] * self.n
        pages = await asyncio.gather(
            *(self.handle(k).owned.remote(owner, b, limit, ok) for k, b in enumerate(before))
        )
        return merge_owned(pages, before, limit)

    async def count_async(self) -> int:
        return sum(
            await asyncio.gather(*(self.handle(k).count.remote() for k in range(self.n)))
        )

    # -- sync (drivers, threads) ----------------------------------------------------------
    def record(self, outcomes: Sequence[Outcome]) -> int:
        if not outcomes:
            return 0
        _, refs = self._fan("record", outcomes, [o.task_id for o in outcomes])
        return sum(ray.get(refs))

    def get(self, ids: Sequence[str]) -> list[Outcome | None]:
        if not ids:
            return []
        split, refs = self._fan("get", ids, ids)
        return self._ordered(len(ids), split, ray.get(refs))

    def cached(
        self, keys: Sequence[CacheKey], max_age_s: float, timeout_s: float | None = None
    ) -> list[Outcome | None]:
        """``cached_async``, blocking (``ray.get``'s timeout)."""
        if not keys:
            return []
        answers = ray.get(
            [self.handle(k).cached.remote(list(keys), max_age_s) for k in range(self.n)],
            timeout=timeout_s,
        )
        return _newest(answers, len(keys))

    def missing(self, ids: Sequence[str]) -> list[str]:
        if not ids:
            return []
        _, refs = self._fan("missing", ids, ids)
        gone = {i for part in ray.get(refs) for i in part}
        return [i for i in ids if i in gone]

    def duplicates(self, ids: Sequence[str] | None = None) -> dict[str, int]:
        if ids is None:
            parts = ray.get([self.handle(k).duplicates.remote() for k in range(self.n)])
        else:
            _, refs = self._fan("duplicates", ids, ids)
            parts = ray.get(refs)
        return {i: n for p in parts for i, n in p.items()}

    def count(self) -> int:
        return sum(ray.get([self.handle(k).count.remote() for k in range(self.n)]))

    def cursors(self) -> list[int]:
        return ray.get([self.handle(k).cursor.remote() for k in range(self.n)])

    def since(self, cursors: list[int]) -> tuple[list[str], list[int]]:
        """Ids recorded on any shard after ``cursors``, and the cursors to pass next."""
        answers = ray.get([self.handle(k).since.remote(c) for k, c in enumerate(cursors)])
        return [i for ids, _ in answers for i in ids], [c for _, c in answers]

    def summary(self, ids: Sequence[str] | None = None) -> dict[str, Any]:
        if ids is None:
            parts = ray.get([self.handle(k).summary_part.remote() for k in range(self.n)])
        else:
            _, refs = self._fan("summary_part", ids, ids) if ids else ([], [])
            parts = ray.get(refs) if refs else []
        return merge_summaries(parts)

    def stats(self) -> list[dict[str, Any]]:
        return ray.get([self.handle(k).stats.remote() for k in range(self.n)])


def _newest(answers: Sequence[Sequence[Outcome | None]], n: int) -> list[Outcome | None]:
    """Per position, the answer finished last among the shards' (None: no shard's)."""
    out: list[Outcome | None] = [None] * n
    for part in answers:
        for k, o in enumerate(part):
            best = out[k]
            if o is not None and (best is None or o.finished_unix_s > best.finished_unix_s):
                out[k] = o
    return out
