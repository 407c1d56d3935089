"""emu's own exceptions (the kernel's errors are negative errno values, not these).

Modelled on posix_ipc's small hierarchy: every emulator-specific failure is an
:class:`EmuError` subclass whose message says what to do about it.
"""

from __future__ import annotations


class EmuError(Exception):
    """Base class of every emulator-specific error."""


class NotBootedError(EmuError):
    """A kernel API was called in a process that has no booted kernel."""


class AlreadyBootedError(EmuError):
    """emu.boot() was called while this process already runs a kernel."""


class CapacityError(EmuError):
    """A boot-time capacity limit (tasks, completions, ...) is exhausted."""


class KernelDeadError(EmuError):
    """The kernel's supervisor is gone; the kernel cannot be used any more."""


class StaleObjectError(EmuError):
    """A task or completion handle refers to an object that was freed (use after free)."""
