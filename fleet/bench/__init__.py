"""Benchmark suites for ``fleet bench SUITE``.

Each module defines ``run(quick: bool) -> dict``.
"""

SUITES = {
    "core": "fleet.bench.core",
    "budgets": "fleet.bench.budgets",
    "consensus": "fleet.bench.consensus",
    "livesim": "fleet.bench.livesim",
    "queue": "fleet.bench.queue",
    "sim": "fleet.bench.sim",
    "routing": "fleet.bench.routing",
    "chaos": "fleet.bench.chaos",
    "durability": "fleet.bench.durability",
    "ledger": "fleet.bench.ledger",
    "recording": "fleet.bench.recording",
    "ingress": "fleet.bench.ingress",
    "multinode": "fleet.bench.multinode",
    "overload": "fleet.bench.overload",
    "isolation": "fleet.bench.isolation",
}
