"""Listing a tenant's tasks (``GET /tasks``), page by page behind an opaque cursor.

A listing without a status filter has two phases: the tenant's *pending* tasks (in a
queue shard, queued or running), in id order, from every shard of every capability;
then its *finished* ones (``completed`` or ``failed``), newest first, from every ledger
shard (``LedgerClient.owned_async``). ``status=pending`` is the first phase alone,
``completed`` or ``failed`` the second, filtered.

The cursor names the phase and where to go on: the last pending id listed, or each
ledger shard's last sequence number. A task that finishes while a client pages may be
listed twice (pending, then finished), never in neither phase: the finished phase
starts from the newest outcome when the pending one ends. A page may hold fewer than
``limit`` tasks; the listing ends when no cursor comes back.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import heapq
import itertools
import json
from dataclasses import dataclass
from typing import Any

from fleet.ledger.store import MAX_SEQ
from fleet.runtime.ledger import LedgerClient
from fleet.task import Outcome

PENDING, FINISHED = "p", "f"
STATUSES = ("pending", "completed", "failed")
MAX_CURSOR_CHARS = 4096


class BadCursor(ValueError):
    """A cursor this listing did not give (or gave for another status or fleet)."""


@dataclass(frozen=True)
class Cursor:
    status: str  # the filter it was made for ("" for none)
    phase: str  # PENDING or FINISHED
    after: str = ""  # pending phase: the last id listed
    before: tuple[int | None, ...] = ()  # finished phase: per ledger shard

    def encode(self) -> str:
        doc = [self.status, self.phase, self.after if self.phase == PENDING else self.before]
        raw = json.dumps(doc, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str, status: str | None, ledger_shards: int) -> Cursor:
        """The cursor ``token`` stands for; ``BadCursor`` saying why when it is not one
        this listing gave for ``status`` on a fleet of ``ledger_shards`` shards."""
        if len(token) > MAX_CURSOR_CHARS:
            raise BadCursor("too long")
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            doc = json.loads(raw)
        except (binascii.Error, ValueError, RecursionError):  # deep nesting: Recursion
            raise BadCursor("not a cursor this listing gave") from None
        if not (isinstance(doc, list) and len(doc) == 3 and doc[1] in (PENDING, FINISHED)):
            raise BadCursor("not a cursor this listing gave")
        made_for, phase, where = doc
        if made_for != (status or ""):
            raise BadCursor(f"made for status={made_for or 'any'}, not {status or 'any'}")
        if phase == PENDING and status in (None, "pending") and isinstance(where, str):
            return cls(made_for, phase, after=where)
        if (
            phase == FINISHED
            and status != "pending"
            and isinstance(where, list)
            and len(where) in (0, ledger_shards)  # 0: from the newest
            and all(w is None or (type(w) is int and 0 < w < MAX_SEQ) for w in where)
        ):
            return cls(made_for, phase, before=tuple(where))
        raise BadCursor("not a cursor this listing gave")


async def list_tasks(
    ledger: LedgerClient,
    queue_shards: list[Any],
    tenant: str,
    prefix: str,
    status: str | None,
    cursor: Cursor | None,
    limit: int,
) -> tuple[list[str | Outcome], Cursor | None]:
    """One page: the fleet-wide ids of pending tasks, or finished tasks' outcomes, and
    the cursor to the next page (None at the end). ``prefix`` is what the tenant's
    fleet-wide ids start with; ``tenant`` is "" when the ingress runs without keys (one
    caller: every task is its own)."""
    made_for = status or ""
    if cursor is None:
        cursor = Cursor(made_for, FINISHED if status in ("completed", "failed") else PENDING)
    if cursor.phase == PENDING:
        ids, more = await _pending_page(queue_shards, prefix, cursor.after, limit)
        if more:
            return list(ids), Cursor(made_for, PENDING, after=ids[-1])
        nxt = None if status == "pending" else Cursor(made_for, FINISHED)
        return list(ids), nxt
    ok = None if status is None else status == "completed"
    before = list(cursor.before) if cursor.before else None
    outcomes, after = await ledger.owned_async(tenant or None, before, limit, ok)
    nxt = None if after is None else Cursor(made_for, FINISHED, before=tuple(after))
    return list(outcomes), nxt


async def _pending_page(
    shards: list[Any], prefix: str, after: str, limit: int
) -> tuple[list[str], bool]:
    """Up to ``limit`` pending ids after ``after``, in order, and whether more follow."""
    parts: list[list[str]] = await asyncio.gather(
        *(sh.pending_of.remote(prefix, after, limit) for sh in shards)
    )
    ids = list(itertools.islice(heapq.merge(*parts), limit))
    full = any(len(p) >= limit for p in parts)
    return ids, full or len(ids) < sum(len(p) for p in parts)
