"""Argument checks shared by the Python front ends (`Engine`, `sim.simulate`), so that a bad value
is a ValueError naming the argument rather than a conversion error from the binding."""

from __future__ import annotations

from typing import Optional


def optional_positive_int(value: object, name: str) -> Optional[int]:
    """`value` if it is None or an int of at least 1 (not a bool); a ValueError naming `name` otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value
