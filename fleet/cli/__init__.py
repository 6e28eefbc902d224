"""The ``fleet`` command."""
