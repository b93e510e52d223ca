"""The one set of parameter checks: every layer (config, HDL, simulator, host, models) refuses a
bad value with the same words, naming the parameter, the limit and the value.

Each check returns the value it accepted and raises ``ValueError`` otherwise, with a message
``"<name> must be <limit>[ (<why>)], not <value!r>"``. A ``bool`` is never taken for an
integer. This module is at the bottom layer (``models/``), so it imports nothing of the project.
"""

from __future__ import annotations

import math

__all__ = ["is_int", "int_in_range", "positive_int", "power_of_two", "positive_number",
           "one_of"]


def is_int(value) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def _refuse(name: str, limit: str, value, why: str):
    raise ValueError(f"{name} must be {limit}" + (f" ({why})" if why else "")
                     + f", not {value!r}")


def int_in_range(name: str, value, low: int, high: int | None = None, *, why: str = "",
                 high_name: str = "") -> int:
    """``value`` if it is an integer in ``low .. high`` (no upper limit when ``high`` is
    None). The limit reads "a positive integer" (``low`` 1, no ``high``), "a non-negative
    integer" (``low`` 0), "an integer of at least ``low``" or "an integer from ``low`` to
    ``high``" ("to ``high_name`` (``high``)" when the limit is another parameter); ``why``
    follows it in parentheses."""
    if is_int(value) and low <= value and (high is None or value <= high):
        return value
    if high is not None:
        limit = f"an integer from {low} to " + (f"{high_name} ({high})" if high_name
                                                else f"{high}")
    elif low == 1:
        limit = "a positive integer"
    elif low == 0:
        limit = "a non-negative integer"
    else:
        limit = f"an integer of at least {low}"
    _refuse(name, limit, value, why)


def positive_int(name: str, value, *, at_most: int | None = None, why: str = "") -> int:
    """``value`` if it is an integer from 1 to ``at_most``; a value above the limit is told
    "must be at most ``at_most``" (the limit is often another parameter, named in ``why``)."""
    int_in_range(name, value, 1)
    if at_most is not None and value > at_most:
        _refuse(name, f"at most {at_most}", value, why)
    return value


def power_of_two(name: str, value, low: int = 1, high: int | None = None, *,
                 why: str = "") -> int:
    """``value`` if it is a power of two in ``low .. high`` (no upper limit when None)."""
    if is_int(value) and value >= max(1, low) and not value & (value - 1) \
            and (high is None or value <= high):
        return value
    limit = (f"a power of two from {low} to {high}" if high is not None
             else f"a power of two of at least {low}")
    _refuse(name, limit, value, why)


def positive_number(name: str, value, *, why: str = ""):
    """``value`` if it is a finite number above zero (an int or a float, not a bool)."""
    if not isinstance(value, bool) and isinstance(value, (int, float)) \
            and 0 < value < math.inf:
        return value
    _refuse(name, "a positive number", value, why)


def one_of(name: str, value, choices) -> object:
    """``value`` if it is one of ``choices``; the message lists them."""
    if value in choices:
        return value
    _refuse(name, "one of " + ", ".join(str(c) for c in choices), value, "")
