"""Bad input gets a clear error, never a silent wrong value (API.md, "Conventions").

A wrong type raises TypeError and an int the kernel's C type cannot hold raises
ValueError, each naming the argument by its API name, before anything is changed.
Arithmetic on atomics still wraps as in the kernel. tests/test_api_fuzz.py calls the
whole API with arbitrary arguments; these pin the cases measured in the issue.
"""

from __future__ import annotations

import pytest

import emu
from emu import image

INT_MIN, INT_MAX = -(2**31), 2**31 - 1
S64_MIN, S64_MAX = -(2**63), 2**63 - 1


def in_use(table: str) -> int:
    """Records of `table` ("atomics", "completions", ...) in use in the running kernel."""
    img = image.this()
    pool = getattr(img.img.hdr, f"{table}_pool")
    records = getattr(img.img, table)
    return sum(records[i].in_use for i in range(pool.high))


def tasklet_fn(t):
    pass


# --- completions ------------------------------------------------------------------------------

X_CALLS = {
    "complete": lambda x: emu.complete(x),
    "complete_all": lambda x: emu.complete_all(x),
    "init_completion": lambda x: emu.init_completion(x),
    "reinit_completion": lambda x: emu.reinit_completion(x),
    "wait_for_completion": lambda x: emu.wait_for_completion(x),
    "wait_for_completion_io": lambda x: emu.wait_for_completion_io(x),
    "wait_for_completion_timeout": lambda x: emu.wait_for_completion_timeout(x, 1),
    "wait_for_completion_io_timeout": lambda x: emu.wait_for_completion_io_timeout(x, 1),
    "wait_for_completion_interruptible": lambda x: emu.wait_for_completion_interruptible(x),
    "wait_for_completion_interruptible_timeout":
        lambda x: emu.wait_for_completion_interruptible_timeout(x, 1),
    "wait_for_completion_killable": lambda x: emu.wait_for_completion_killable(x),
    "wait_for_completion_killable_timeout":
        lambda x: emu.wait_for_completion_killable_timeout(x, 1),
    "wait_for_completion_state":
        lambda x: emu.wait_for_completion_state(x, emu.TASK_UNINTERRUPTIBLE),
    "try_wait_for_completion": lambda x: emu.try_wait_for_completion(x),
    "completion_done": lambda x: emu.completion_done(x),
}


@pytest.mark.parametrize("call", X_CALLS)
@pytest.mark.parametrize("bad, typename", [(None, "NoneType"), (42, "int"), ("c", "str")])
def test_completion_calls_name_x_for_a_wrong_type(kernel, call, bad, typename):
    with pytest.raises(TypeError, match=f"^x must be an emu.Completion, not {typename}$"):
        X_CALLS[call](bad)


def test_complete_none_is_a_type_error_without_internals(kernel):
    with pytest.raises(TypeError) as info:
        emu.complete(None)
    assert str(info.value) == "x must be an emu.Completion, not NoneType"
    assert info.value.__suppress_context__, "the AttributeError inside must not be shown"


def test_another_emu_object_is_not_a_completion(kernel):
    with pytest.raises(TypeError, match="x must be an emu.Completion, not Atomic"):
        emu.complete(emu.Atomic())


def test_wait_state_of_a_wrong_type_is_a_type_error(kernel):
    c = emu.Completion()
    emu.complete(c)
    for state in ("D", None, 1.0):
        with pytest.raises(TypeError, match="state must be an int"):
            emu.wait_for_completion_state(c, state)
    with pytest.raises(ValueError, match="state must be in the range of unsigned int"):
        emu.wait_for_completion_state(c, (1 << 32) | emu.TASK_UNINTERRUPTIBLE)
    assert c.done == 1, "a rejected wait must not consume"
