"""Constrained types shared by the spec sections, each validated in one place."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator


def _check_share(value: float) -> float:
    if not 0 < value <= 1:
        raise ValueError(
            f"{value} is outside (0, 1]: a share or rate threshold must be "
            "greater than 0 and at most 1"
        )
    return value


def _check_unit(value: float) -> float:
    if not 0 <= value <= 1:
        raise ValueError(f"{value} is outside [0, 1]: it must be between 0 and 1")
    return value


Share = Annotated[float, AfterValidator(_check_share)]
"""A fraction in (0, 1]: rate thresholds and shares of a population."""
UnitFraction = Annotated[float, AfterValidator(_check_unit)]
"""A fraction in [0, 1], where 0 switches the feature off."""

__all__ = ["Share", "UnitFraction"]
