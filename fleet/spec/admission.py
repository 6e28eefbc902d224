"""A pool's admission control: shed new tasks that would wait too long.

Off by default: a pool that takes a batch of millions to work through for hours wants
every task queued, and would be shed by any wait limit. A pool that serves people turns
it on: a task predicted to wait longer than ``max_queue_wait_s`` (5 s by default, the
requirements' figure), or past its deadline, is refused at once with reason ``shed``
and a ``Retry-After``, lower priority classes first (``budgets.priority_classes``:
their ``min_task_priority`` and ``shed_wait_share``). The rule is
``fleet.policy.admission``.
"""

from __future__ import annotations

from pydantic import Field

from fleet.spec._base import SpecModel

DEFAULT_MAX_QUEUE_WAIT_S = 5.0
MAX_QUEUE_WAIT_LIMIT_S = 86_400.0


class AdmissionSpec(SpecModel):
    """Admission control of one pool's new tasks.

    ``max_queue_wait_s``: the longest predicted wait (queue wait plus the work ahead in
    flight) a task of the highest class is accepted with; a class's
    ``shed_wait_share`` scales it down. ``stale_after_s``: an entry point whose view of
    the pool's load is older than this (the controller restarting) admits everything
    rather than refuse on old figures; the queue's ``max_depth`` still bounds it.
    """

    enabled: bool = False
    max_queue_wait_s: float = Field(
        default=DEFAULT_MAX_QUEUE_WAIT_S, gt=0, le=MAX_QUEUE_WAIT_LIMIT_S, allow_inf_nan=False
    )
    stale_after_s: float = Field(default=10.0, gt=0, le=3_600, allow_inf_nan=False)
