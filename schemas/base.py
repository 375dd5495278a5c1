"""The base of every params model: unknown keys are errors, values are frozen.

Method params (a condenser's knobs, a loss's knobs, a track's options) live next to the method
and subclass ``Section``; ``schemas/params.py`` assembles them into discriminated unions keyed on
``method`` / ``name`` from the registries, so the allowed names are never listed twice.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A params section: ``extra="forbid"`` (a misspelt key is an error), frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)
