"""Shared base for every spec model: strict, immutable, unknown keys rejected."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class SpecModel(BaseModel):
    """Base of all spec sections.

    Unknown keys are errors (a typo must not silently fall back to a default), and a
    loaded spec is frozen so a policy can never mutate the configuration it was given.
    Validation errors never quote the value at fault (a value pasted in the wrong field
    may be a secret); they name the field and what is wrong.
    """

    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, hide_input_in_errors=True
    )
