"""Callbacks carried by value to every task that runs them.

A hard-IRQ handler runs in whichever task the interrupt hits, a tasklet callback in
whichever task serves its CPU's softirqs: the callable and its data must reach task
processes that did not create them. callback_store() pickles them together with
cloudpickle, which carries closures, lambdas, functools.partial, bound methods and
callable instances by value, into a block of the shared heap (heap.py), so their size
is bounded only by the heap. callback_load() unpickles a callback once per process and
caches it: after a task's first delivery, running a callback costs a dict lookup.

Every task runs its own copy, made from the bytes stored at registration (the
registering task too, and a task forked later starts from those bytes, not from its
parent's copy): what a callback captures is a snapshot in each task that runs it, as
after fork. emu objects (Atomic, Completion, Spinlock, Tasklet, Task) pickle as handles
on the same shared records, so they stay shared. A callback that cannot be pickled
raises TypeError at registration, naming the argument and the captured object at fault.
"""

from __future__ import annotations

import ctypes
import dis
import functools
import io
import os
import pickle
import sys
import types
from collections import ChainMap
from collections.abc import Iterator
from typing import Any

import cloudpickle

import _emu_native as _native

from . import heap, image, records
from .errors import CapacityError, StaleObjectError

#: How deep the search for the object at fault goes into what a callback captures.
_CULPRIT_DEPTH = 8
#: Cache entries above which callback_load() drops those of freed callbacks.
_SWEEP_MIN = 64
_sweep_at = _SWEEP_MIN


def callback_store(fn: Any, data: Any, fn_arg: str, data_arg: str) -> tuple[int, int]:
    """Carry `fn` and `data` into the shared heap; returns their reference for
    callback_load() and callback_free().

    TypeError if either cannot be pickled (or unpickled), naming `fn_arg` or
    `data_arg`, `fn`'s qualified name and the captured object at fault;
    CapacityError if the heap has no room (boot with a larger heap_size). Either way
    nothing stays allocated. This process's copy is made here, once.
    """
    try:
        blob = _dumps((fn, data))
    except Exception:  # whatever a __reduce__ of something captured raises
        raise _not_carried(fn, data, fn_arg, data_arg) from None
    try:
        copy = pickle.loads(blob)
    except Exception as exc:
        raise TypeError(f"{fn_arg} {qualname(fn)} cannot be carried to the tasks that run "
                        f"it: its pickle does not load ({type(exc).__name__}: {exc})") from None
    hdr_len = ctypes.sizeof(image.CallbackHdr)
    offset = heap.heap_alloc(hdr_len + len(blob))
    if offset is None:
        raise CapacityError(
            f"the shared heap has no room for {fn_arg} {qualname(fn)} ({len(blob)} bytes "
            f"pickled; {heap.heap_used()} of heap_size={heap.heap_size()} bytes in use): "
            "free unused callbacks or boot with a larger heap_size="
        )
    img = image.this()
    seq = 0
    while seq == 0:  # 0 marks a freed callback
        seq = records.field_add(img.img.hdr, "callback_seq", 1)
    addr = heap.heap_addr(offset)
    ctypes.memmove(addr + hdr_len, blob, len(blob))
    head = image.CallbackHdr.from_address(addr)
    head.length = len(blob)
    head.seq = seq
    img.callback_cache[offset, seq] = copy
    return offset, seq


def callback_load(offset: int, seq: int) -> Any:
    """This process's copy of the (fn, data) stored by callback_store(), unpickled on
    first use and cached. StaleObjectError if the callback was freed."""
    obj = image.this().callback_cache.get((offset, seq))
    if obj is None:
        obj = _load(offset, seq)
    return obj


def _load(offset: int, seq: int) -> Any:
    global _sweep_at
    img = image.this()
    addr = heap.heap_addr(offset)
    head = image.CallbackHdr.from_address(addr)
    if head.seq != seq:
        raise StaleObjectError(f"callback #{seq} was freed (free_irq(), or its tasklet was "
                               "garbage-collected in the task that created it)")
    cache = img.callback_cache
    obj = pickle.loads(ctypes.string_at(addr + ctypes.sizeof(head), head.length))
    cache[offset, seq] = obj
    if len(cache) > _sweep_at:  # forget callbacks freed by other tasks
        for key in list(cache):
            if image.CallbackHdr.from_address(heap.heap_addr(key[0])).seq != key[1]:
                cache.pop(key, None)
        _sweep_at = max(_SWEEP_MIN, 2 * len(cache))
    return obj


def callback_free(offset: int, seq: int) -> bool:
    """Free a callback stored by callback_store(); False if it was freed already.

    The caller makes sure no task runs it any more (free_irq() synchronizes first)."""
    image.this().callback_cache.pop((offset, seq), None)
    head = image.CallbackHdr.from_address(heap.heap_addr(offset))
    if _native.cmpxchg32(ctypes.addressof(head), seq, 0) != seq:
        return False
    return heap.heap_free(offset)


def _forget_copies() -> None:
    """In a new task: drop the parent's copies, so this task starts from the stored bytes."""
    global _sweep_at
    if image._this is not None:
        image._this.callback_cache.clear()
    _sweep_at = _SWEEP_MIN


os.register_at_fork(after_in_child=_forget_copies)


def _refuse_file(f: io.TextIOWrapper) -> Any:
    """Open text files: cloudpickle would carry a copy of the contents, not the file."""
    for name in ("stdout", "stderr"):
        if f is getattr(sys, name):
            return getattr, (sys, name)  # the same stream in every task
    raise TypeError(f"cannot pickle an open file ({getattr(f, 'name', '?')!r})")


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]  # cloudpickle has no types
    dispatch_table = ChainMap({io.TextIOWrapper: _refuse_file},
                              cloudpickle.Pickler.dispatch_table)


def _dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


# --- why a callback cannot be carried -------------------------------------------------------------

def qualname(fn: Any) -> str:
    """How error messages name a callable: module and qualified name where it has them."""
    if isinstance(fn, functools.partial):
        return f"functools.partial({qualname(fn.func)})"
    name = getattr(fn, "__qualname__", None)
    if not isinstance(name, str):
        return f"{type(fn).__module__}.{type(fn).__qualname__} instance"
    module = getattr(fn, "__module__", None)
    return f"{module}.{name}" if isinstance(module, str) else name


def _not_carried(fn: Any, data: Any, fn_arg: str, data_arg: str) -> TypeError:
    name = qualname(fn)
    exc = _pickle_error(fn)
    if exc is not None:
        plain = isinstance(fn, (functools.partial, types.FunctionType, types.MethodType,
                                types.BuiltinMethodType))
        path, obj, exc = _culprit(fn, "" if plain else "self", exc, 0, set())
        what = "it" if obj is fn else f"it captures {path} = {_short(obj)}, which"
        return TypeError(f"{fn_arg} {name} cannot be carried to the tasks that run it: "
                         f"{what} cannot be pickled ({exc})")
    exc = _pickle_error(data) or TypeError("unknown pickling error")
    path, obj, exc = _culprit(data, data_arg, exc, 0, set())
    return TypeError(f"{data_arg} of {fn_arg} {name} cannot be carried to the tasks that run "
                     f"it: {path} = {_short(obj)} cannot be pickled ({exc})")


def _pickle_error(obj: Any) -> Exception | None:
    try:
        _dumps(obj)
    except Exception as exc:
        return exc
    return None


def _culprit(obj: Any, path: str, exc: Exception, depth: int,
             seen: set[int]) -> tuple[str, Any, Exception]:
    """The innermost part of `obj` (which fails to pickle with `exc`) that fails too, as
    (path from the argument, object, error); the first one found, in the order of
    _parts()."""
    seen.add(id(obj))
    if depth < _CULPRIT_DEPTH:
        for label, part in _parts(obj):
            if id(part) in seen:
                continue
            err = _pickle_error(part)
            if err is not None:
                return _culprit(part, _join(path, label), err, depth + 1, seen)
    return path, obj, exc


def _join(path: str, label: str) -> str:
    if not path:
        return label.lstrip(".")
    return path + label if label.startswith(("[", ".")) else f"{path} -> {label}"


def _parts(obj: Any) -> Iterator[tuple[str, Any]]:
    """What pickling `obj` by value pickles too, labelled as a path step: closure cells,
    referenced globals, partial arguments, a bound method's self, defaults, items and
    attributes."""
    if isinstance(obj, functools.partial):
        yield "func", obj.func
        for i, arg in enumerate(obj.args):
            yield f"args[{i}]", arg
        for key, arg in obj.keywords.items():
            yield f"keywords[{key!r}]", arg
    elif isinstance(obj, (types.MethodType, types.BuiltinMethodType)):
        if not isinstance(obj.__self__, types.ModuleType):
            yield "self", obj.__self__
        if isinstance(obj, types.MethodType):
            yield qualname(obj.__func__), obj.__func__
    elif isinstance(obj, types.FunctionType):
        yield from _function_parts(obj)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for i, item in enumerate(obj):
            yield f"[{i}]", item
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield f"[{key!r}]", value
    else:
        for name, value in _attributes(obj):
            yield f".{name}", value


def _function_parts(fn: types.FunctionType) -> Iterator[tuple[str, Any]]:
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=True):
        try:
            yield name, cell.cell_contents
        except ValueError:  # an empty cell
            pass
    for name in _global_names(fn.__code__):
        if name in fn.__globals__:
            yield f"global {name}", fn.__globals__[name]
    params = fn.__code__.co_varnames[: fn.__code__.co_argcount]
    for name, value in zip(params[len(params) - len(fn.__defaults__ or ()):],
                           fn.__defaults__ or (), strict=True):
        yield f"default {name}", value
    for name, value in (fn.__kwdefaults__ or {}).items():
        yield f"default {name}", value
    for name, value in vars(fn).items():
        yield f".{name}", value


def _global_names(code: types.CodeType) -> Iterator[str]:
    """The globals `code` reads or writes (what cloudpickle carries with a function)."""
    for ins in dis.get_instructions(code):
        if ins.opname in ("LOAD_GLOBAL", "STORE_GLOBAL", "DELETE_GLOBAL"):
            yield ins.argval
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _global_names(const)


def _attributes(obj: Any) -> Iterator[tuple[str, Any]]:
    yield from getattr(obj, "__dict__", {}).items()
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name not in ("__dict__", "__weakref__") and hasattr(obj, name):
                yield name, getattr(obj, name)


def _short(obj: Any, limit: int = 80) -> str:
    try:
        text = repr(obj)
    except Exception:
        text = f"<{type(obj).__qualname__} object>"
    return text if len(text) <= limit else text[: limit - 4] + "...>"
