"""The ledger: every task's outcome, recorded once, durable (``fleet.ledger.store``)."""
