"""An ``AgentHost``'s agent slots for coroutines: the core's answers as futures.

``HostCore.place`` gives a task a free slot at once, or None; the task then waits
(``HostCore.wait``) on a future of its own, which a freed slot resolves: every core call
that frees one (``finish``, ``release``, ``tick``, ...) answers with "handoffs", the
waiting tasks that got a slot, as (future, agent) pairs, and ``hand`` resolves them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from fleet.policy.host import HostCore
from fleet.policy.routing import RoutingHint


class SlotFutures:
    """Take a slot of the core's agents (``acquire``), hand freed ones on (``hand``)."""

    def __init__(self, core: HostCore):
        self.core = core

    async def acquire(self, hint: RoutingHint | None) -> int:
        """A slot of an agent the router chose for ``hint``: its index, once free.

        A waiting task that is cancelled, or evicted (its future failed: the budget
        gate found every agent parked), leaves the queue; one that got its slot just as
        it gave up hands the slot on."""
        i = self.core.place(hint)
        if i is not None:
            return i
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.core.wait(fut, hint)
        try:
            return await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.hand(self.core.release(fut.result()))  # got a slot too late
            else:
                self.core.withdraw(fut)
            raise

    def hand(self, handoffs: Iterable[tuple[Any, int]]) -> None:
        """Give slots to the waiting tasks the core chose."""
        for fut, i in handoffs:
            if fut.done():  # gave up meanwhile: the slot goes on
                self.hand(self.core.release(i))
            else:
                fut.set_result(i)
