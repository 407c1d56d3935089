"""Kernel modules: ``module_init``, ``module_exit``, ``module_param``; insmod and rmmod.

A module is a Python file or an importable module that marks its entry points as the
kernel's macros do::

    count = emu.module_param("count", 4, "number of threads")

    @emu.module_init
    def my_init():        # 0, or a negative errno to refuse loading
        ...

    @emu.module_exit
    def my_exit():
        ...

``emu run`` (run_module()) boots a kernel, loads the module in the booting task as
insmod does (its top level runs, parameters are parsed, its init runs), streams the
kernel log to stdout as lines are logged, and unloads it (its exit runs) after the
given duration, on Ctrl-C or on SIGTERM.
"""

from __future__ import annotations

import errno
import importlib
import importlib.util
import os
import signal as _os_signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, TextIO

from . import attach, checks, image, kernel
from .printk import CONSOLE_LOGLEVEL_DEFAULT, pr_warn

#: How often `emu run` copies new log lines to stdout.
STREAM_INTERVAL = 0.02

_inits: dict[str, Callable[[], Any]] = {}
_exits: dict[str, Callable[[], Any]] = {}


@dataclass
class _Loading:
    """The module being loaded: the parameters given on the command line."""

    name: str  # the module's Python name (__name__ of its code)
    given: dict[str, str]
    declared: set[str] = field(default_factory=set)
    bad: list[str] = field(default_factory=list)  # kernel log lines of invalid values


_loading: _Loading | None = None


def module_init(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Mark `fn` as the module's init function (``module_init(fn)``); returns `fn`.

    It runs when the module is loaded, in the loading task, and returns 0 (or None) on
    success, or a negative errno to refuse loading.
    """
    if not callable(fn):
        raise checks.not_a("fn", "a function", fn)
    _inits[getattr(fn, "__module__", None) or "__main__"] = fn
    return fn


def module_exit(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Mark `fn` as the module's exit function (``module_exit(fn)``), run at unloading;
    returns `fn`."""
    if not callable(fn):
        raise checks.not_a("fn", "a function", fn)
    _exits[getattr(fn, "__module__", None) or "__main__"] = fn
    return fn


def _parse(text: str, default: Any) -> Any:
    """A parameter's value from its text, of the default's type (param_set_*)."""
    if isinstance(default, bool):
        if text in ("y", "Y", "1", "on", "true"):
            return True
        if text in ("n", "N", "0", "off", "false"):
            return False
        raise ValueError(text)
    if isinstance(default, int):
        return int(text, 0)
    if isinstance(default, float):
        return float(text)
    return text


def module_param(name: str, default: Any, description: str = "") -> Any:
    """Declare module parameter `name` (``module_param`` + ``MODULE_PARM_DESC``).

    Returns the value given when the module was loaded (``emu run mod.py name=value``),
    of the type of `default` (bool, int, float or str), or `default` when none was given
    or the module is imported outside ``emu run``. A value that does not parse is
    reported in the kernel log and makes loading fail with -EINVAL, as insmod's does.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name must be a parameter name (an identifier), got {name!r}")
    if not isinstance(default, (bool, int, float, str)):
        raise checks.not_a("default", "a bool, int, float or str", default)
    if not isinstance(description, str):
        raise checks.not_a("description", "a str", description)
    caller = sys._getframe(1).f_globals.get("__name__")
    loading = _loading
    if loading is None or caller != loading.name:
        return default
    loading.declared.add(name)
    if name not in loading.given:
        return default
    text = loading.given[name]
    try:
        return _parse(text, default)
    except ValueError:
        loading.bad.append(f"{_short(loading.name)}: `{text}' invalid for parameter `{name}'")
        return default


def _short(name: str) -> str:
    return name.rpartition(".")[2]


# --- insmod / rmmod --------------------------------------------------------------------------

class InsmodError(Exception):
    """Loading failed: the message insmod prints (and the exit status is 1)."""


@dataclass
class Module:
    """A loaded module: its Python module and entry points."""

    name: str  # as given: the file's name or the dotted module name
    code: ModuleType
    init: Callable[[], Any] | None
    exit: Callable[[], Any] | None


def _import(target: str, is_file: bool) -> ModuleType:
    if not is_file:
        if target in sys.modules:  # imported before it was loaded: run its top level again
            return importlib.reload(sys.modules[target])
        return importlib.import_module(target)
    path = os.path.abspath(target)
    stem = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(stem, path)
    if spec is None or spec.loader is None:
        raise InsmodError(f"{target}: not a Python file")
    code = importlib.util.module_from_spec(spec)
    sys.modules[stem] = code
    spec.loader.exec_module(code)
    return code


def _module_name(target: str, is_file: bool) -> str:
    if is_file:
        return os.path.splitext(os.path.basename(target))[0]
    return target


def insmod(target: str, is_file: bool, params: dict[str, str]) -> Module:
    """Load a module in the current (booted) task: import it with `params`, then run its
    init. Raises InsmodError with insmod's message when loading fails."""
    global _loading
    display = os.path.basename(target) if is_file else target
    pyname = _module_name(target, is_file)
    if is_file and not os.path.isfile(target):
        raise InsmodError(f"could not load module {target}: No such file or directory")
    _loading = _Loading(pyname, dict(params))
    try:
        code = _import(target, is_file)
    except ModuleNotFoundError as exc:
        if not is_file and exc.name and target.startswith(exc.name):
            raise InsmodError(f"could not load module {target}: no module named "
                              f"{exc.name}") from None
        raise
    finally:
        loading, _loading = _loading, None
    name = code.__name__
    for line in loading.bad:
        pr_warn("%s", line)
    unknown = [p for p in params if p not in loading.declared]
    for p in unknown:
        pr_warn("%s: Unknown parameter `%s'", _short(name), p)
    if unknown:
        raise InsmodError(f"could not insert module {display}: Unknown symbol in module, "
                          "or unknown parameter (see dmesg)")
    if loading.bad:
        raise InsmodError(f"could not insert module {display}: Invalid parameters")
    mod = Module(display, code, _inits.get(name), _exits.get(name))
    ret = mod.init() if mod.init is not None else 0
    if ret is None:
        ret = 0
    if not isinstance(ret, int) or isinstance(ret, bool):
        raise InsmodError(f"could not insert module {display}: its init returned "
                          f"{type(ret).__name__}, not an int (0 or a negative errno)")
    if ret < 0:
        raise InsmodError(f"could not insert module {display}: {os.strerror(-ret)}"
                          if -ret in errno.errorcode else
                          f"could not insert module {display}: Unknown error {-ret}")
    if ret > 0:
        pr_warn("do_init_module: '%s'->init suspiciously returned %d, it should follow 0/-E "
                "convention", _short(name), ret)
        pr_warn("do_init_module: loading module anyway...")
    return mod


def rmmod(mod: Module) -> None:
    """Unload `mod`: run its exit function (a module without one stays until shutdown,
    which stops its kthreads)."""
    if mod.exit is not None:
        mod.exit()


# --- emu run ---------------------------------------------------------------------------------

class _Stop(Exception):
    """SIGTERM: unload the module and shut down."""


def _sigterm(signum: int, frame: Any) -> None:
    raise _Stop()


def _stream(reader: attach.LogReader, out: TextIO, final: bool = False) -> None:
    lines = reader.poll() + (reader.flush() if final else [])
    if lines:
        out.write("".join(line + "\n" for line in lines))
        out.flush()


def _failed(k: kernel.Kernel) -> bool:
    return bool(k.warnings or k.bugs or k.oopses or k.hung_tasks)


def run_module(target: str, is_file: bool, params: dict[str, str], *, cpus: Any = None,
               hz: int = kernel.HZ_DEFAULT, duration: float | None = None,
               trace: str | None = None, out: TextIO = sys.stdout,
               err: TextIO = sys.stderr) -> int:
    """``emu run``: boot, insmod, stream the log to `out` until `duration` seconds passed
    (None: until Ctrl-C or SIGTERM), rmmod, shut down. Returns the exit status: 0, or
    1 if loading failed or the kernel logged a WARN, BUG, Oops or hung task."""
    old_term = _os_signal.signal(_os_signal.SIGTERM, _sigterm)
    try:
        # Everything goes to `out` as it is logged; the console (stderr) would repeat it.
        with kernel.boot(cpus=cpus, hz=hz, console_loglevel=0, trace=trace) as k:
            reader = attach.LogReader(image.this().img)
            status = _load_run_unload(k, reader, target, is_file, params, duration, out, err)
            _stream(reader, out, final=True)
            image.this().img.hdr.console_loglevel = CONSOLE_LOGLEVEL_DEFAULT
            return 1 if status or _failed(k) or not k.alive else 0
    finally:
        _os_signal.signal(_os_signal.SIGTERM, old_term)


def _load_run_unload(k: kernel.Kernel, reader: attach.LogReader, target: str, is_file: bool,
                     params: dict[str, str], duration: float | None, out: TextIO,
                     err: TextIO) -> int:
    try:
        mod = insmod(target, is_file, params)
    except InsmodError as exc:
        _stream(reader, out, final=True)
        err.write(f"insmod: ERROR: {exc}\n")
        return 1
    except (_Stop, KeyboardInterrupt):
        return 0
    except Exception as exc:
        _stream(reader, out, final=True)
        err.write(traceback.format_exc())
        err.write(f"insmod: ERROR: could not insert module {target}: "
                  f"{type(exc).__name__}: {exc}\n")
        return 1
    deadline = None if duration is None else time.monotonic() + duration
    try:
        while (deadline is None or time.monotonic() < deadline) and k.alive:
            _stream(reader, out)
            time.sleep(STREAM_INTERVAL if deadline is None
                       else max(0.0, min(STREAM_INTERVAL, deadline - time.monotonic())))
    except (_Stop, KeyboardInterrupt):
        pass
    _os_signal.signal(_os_signal.SIGINT, _os_signal.SIG_IGN)  # rmmod runs to its end
    _os_signal.signal(_os_signal.SIGTERM, _os_signal.SIG_IGN)
    try:
        _stream(reader, out)
        if k.alive:
            rmmod(mod)
    except Exception:
        _stream(reader, out, final=True)
        err.write(traceback.format_exc())
        err.write(f"rmmod: ERROR: {mod.name}: its exit raised\n")
        return 1
    finally:
        _os_signal.signal(_os_signal.SIGINT, _os_signal.default_int_handler)
    return 0
