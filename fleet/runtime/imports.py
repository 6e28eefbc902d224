"""Resolve ``package.module:Name`` (or ``package.module.Name``) import paths."""

from __future__ import annotations

import importlib
from typing import Any


def import_object(path: str) -> Any:
    module, sep, attr = path.partition(":")
    if not sep:
        module, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"cannot import {path!r}: {exc}") from exc
