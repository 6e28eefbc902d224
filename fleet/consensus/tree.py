"""The shape of a reducer tree: which voters each leaf hosts, and who reports to whom.

Pure (no Ray): the electorate builds actors from a ``TreePlan``, and tests check its
bounds. Voters of one group (a department, a region) stay on one leaf so the group's
partial tally is formed in one place; ungrouped voters fill the leaves evenly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from fleet.policy.consensus import EMPTY_VOTERS, ConsensusError

# A leaf reducer hosts at least this many voters before another leaf is worth a Ray
# actor (an actor is a process: on 2 cores, many small leaves cost more than they add).
MIN_VOTERS_PER_LEAF = 256
UNGROUPED = ""


def internal_nodes(leaves: int, fan_out: int) -> int:
    """Reducers above ``leaves`` in a tree where each has up to ``fan_out`` children."""
    total, level = 0, leaves
    while level > 1:
        level = math.ceil(level / fan_out)
        total += level
    return total


def _water_fill(load: list[int], extra: int) -> list[int]:
    """How many of ``extra`` items each bin gets so the fullest bin is as low as it can be.

    The k least loaded bins are raised to a common level (as even as integers allow);
    k is the largest count whose current loads all lie at or below that level.
    """
    quota = [0] * len(load)
    if extra == 0:
        return quota
    asc = sorted(range(len(load)), key=lambda j: (load[j], j))
    k = len(asc)
    while k > 1 and load[asc[k - 1]] * k > sum(load[j] for j in asc[:k]) + extra:
        k -= 1
    base, rest = divmod(sum(load[j] for j in asc[:k]) + extra, k)
    for i, j in enumerate(asc[:k]):
        quota[j] = base + (1 if i < rest else 0) - load[j]
    return quota


@dataclass(frozen=True, slots=True)
class TreePlan:
    """Leaves with their groups, and the internal levels above them.

    ``order[g]`` is the input position of global voter index ``g``: voters are renumbered
    so that leaf ``j`` owns the contiguous indices ``[offsets[j], offsets[j + 1])``.
    ``levels[0]`` are the leaves' parents; each node is the (first, end) range of its
    children in the level below; the last level has one node, the root. With a single
    leaf there are no levels and the leaf is the root.
    """

    order: tuple[int, ...]
    offsets: tuple[int, ...]  # len(leaves) + 1 entries
    leaves: tuple[tuple[tuple[str, int], ...], ...]  # per leaf: (group, voters) in order
    levels: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def voters(self) -> int:
        return self.offsets[-1]

    @property
    def reducers(self) -> int:
        return len(self.leaves) + sum(len(level) for level in self.levels)

    @property
    def actor_depth(self) -> int:
        """Actor levels from a leaf to the root, inclusive."""
        return 1 + len(self.levels)


def plan_tree(
    groups: Sequence[str | None],
    fan_out: int,
    max_reducers: int,
    min_voters_per_leaf: int = MIN_VOTERS_PER_LEAF,
) -> TreePlan:
    """Place voters (given by their group, None if ungrouped) on at most ``max_reducers``
    reducers with up to ``fan_out`` children each."""
    n = len(groups)
    if n == 0:
        raise ConsensusError(EMPTY_VOTERS)
    if fan_out < 2:
        raise ConsensusError(f"fan_out must be >= 2, got {fan_out}")
    if max_reducers < 1:
        raise ConsensusError(f"max_reducers must be >= 1, got {max_reducers}")
    want = max(1, math.ceil(n / min_voters_per_leaf))
    n_leaves = 1
    for cand in range(min(want, max_reducers), 0, -1):
        if cand + internal_nodes(cand, fan_out) <= max_reducers:
            n_leaves = cand
            break

    named: dict[str, list[int]] = {}
    loose: list[int] = []
    for pos, g in enumerate(groups):
        if g is None or g == UNGROUPED:
            loose.append(pos)
        else:
            named.setdefault(str(g), []).append(pos)

    # Largest named group first onto the emptiest leaf (LPT), then ungrouped voters top
    # up the emptiest leaves, so leaves end within one group's size of each other.
    contents: list[dict[str, list[int]]] = [{} for _ in range(n_leaves)]
    load = [0] * n_leaves
    for g, members in sorted(named.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        j = min(range(n_leaves), key=lambda i: (load[i], i))
        contents[j][g] = members
        load[j] += len(members)
    quota = _water_fill(load, len(loose))
    i = 0
    for j, q in enumerate(quota):
        if q:
            contents[j].setdefault(UNGROUPED, []).extend(loose[i : i + q])
            i += q

    order: list[int] = []
    offsets = [0]
    leaves = []
    for leaf in contents:
        if not leaf:
            continue  # more leaves than groups: drop the empty ones
        names = sorted(g for g in leaf if g != UNGROUPED)
        names += [UNGROUPED] if UNGROUPED in leaf else []
        leaves.append(tuple((g, len(leaf[g])) for g in names))
        for g in names:
            order.extend(leaf[g])
        offsets.append(len(order))

    levels = []
    count = len(leaves)
    while count > 1:
        nodes = tuple((k, min(k + fan_out, count)) for k in range(0, count, fan_out))
        levels.append(nodes)
        count = len(nodes)
    return TreePlan(tuple(order), tuple(offsets), tuple(leaves), tuple(levels))
