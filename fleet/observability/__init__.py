"""Metrics, logs and traces: fleet's observability (see ARCHITECTURE.md)."""
