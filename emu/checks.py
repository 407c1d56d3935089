"""Argument checks of the public API (the conventions of the API reference, docs/api).

Misuse that Python itself would reject raises the ordinary exception before anything
is changed, naming the argument by its API name: a wrong type is a TypeError
(``x must be an emu.Completion, not NoneType``), an int that the kernel's C type of
the argument cannot hold is a ValueError naming that type and its range. An int
argument takes a Python int (or an int subclass such as ``signal.SIGTERM``), not a
bool. The hot paths test ``type(i) is int`` and the range inline and call
check_int() only when that fails.
"""

from __future__ import annotations

from typing import Any

from .constants import INT_MAX, INT_MIN, LONG_MAX, UINT_MAX

LONG_MIN = -LONG_MAX - 1
ULONG_MAX = (1 << 64) - 1

#: (lo, hi) of the C types of kernel arguments.
C_RANGES = {
    "int": (INT_MIN, INT_MAX),
    "unsigned int": (0, UINT_MAX),
    "long": (LONG_MIN, LONG_MAX),
    "s64": (LONG_MIN, LONG_MAX),
    "unsigned long": (0, ULONG_MAX),
}


def not_a(name: str, what: str, value: object) -> TypeError:
    """The TypeError "`name` must be `what`, not <type of value>"."""
    return TypeError(f"{name} must be {what}, not {type(value).__name__}")


def check_int(value: Any, name: str, ctype: str) -> int:
    """`value` if it is an int that C type `ctype` (a key of C_RANGES) holds.

    TypeError if it is not an int (or is a bool); ValueError naming the range otherwise.
    """
    if not isinstance(value, int) or isinstance(value, bool):
        raise not_a(name, f"an int ({ctype})", value)
    lo, hi = C_RANGES[ctype]
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in the range of {ctype}, {lo} to {hi}; got {value}")
    return value
