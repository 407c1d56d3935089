"""printk and the dmesg ring (kernel/printk/printk.c).

Records live in a fixed ring in the shared image, so every task's messages are in one
log, in order. ``kernel.dmesg()`` renders them as ``[    1.234567] text``, the time
since boot. Messages below the console log level are also written to stderr.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable

from . import checks, image, records

KERN_SOH = "\x01"
KERN_EMERG = KERN_SOH + "0"
KERN_ALERT = KERN_SOH + "1"
KERN_CRIT = KERN_SOH + "2"
KERN_ERR = KERN_SOH + "3"
KERN_WARNING = KERN_SOH + "4"
KERN_NOTICE = KERN_SOH + "5"
KERN_INFO = KERN_SOH + "6"
KERN_DEBUG = KERN_SOH + "7"
KERN_DEFAULT = ""
KERN_CONT = KERN_SOH + "c"

#: Level of messages without a prefix (CONFIG_MESSAGE_LOGLEVEL_DEFAULT).
MESSAGE_LOGLEVEL_DEFAULT = 4
#: Console level when boot() is not told otherwise: only KERN_ERR and worse reach stderr
#: (the kernel's "quiet" boot option).
CONSOLE_LOGLEVEL_DEFAULT = 4
LEVEL_CONT = -1


def _split_level(text: str) -> tuple[int, str]:
    level = MESSAGE_LOGLEVEL_DEFAULT
    while len(text) >= 2 and text[0] == KERN_SOH:
        code = text[1]
        if code == "c":
            level = LEVEL_CONT
        elif "0" <= code <= "7":
            level = int(code)
        text = text[2:]
    return level, text


def printk(fmt: str, *args: object) -> int:
    """Log ``fmt % args`` at the level given by an optional KERN_* prefix.

    Callable from any context; never sleeps. Returns the number of characters
    logged, like the kernel's printk. A `fmt` that is not a str, or does not fit
    `args`, raises TypeError or ValueError naming `fmt` (the kernel's compiler checks
    printf formats).
    """
    text = _format(fmt, args)
    level, text = _split_level(text)
    return log_store(level, text)


def _format(fmt: str, args: tuple[object, ...]) -> str:
    if not isinstance(fmt, str):
        raise checks.not_a("fmt", "a str", fmt)
    if not args:
        return fmt
    try:
        return fmt % args
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"fmt {fmt!r} does not fit its arguments {args!r}: {exc}") from None


def log_store(level: int, text: str) -> int:
    """Append `text` (one or more lines) at `level` to the ring and the console."""
    img = image.this()
    hdr = img.img.hdr
    now = time.monotonic_ns() - hdr.boot_ns
    pid = os.getpid()
    cont = level == LEVEL_CONT
    lines = text.rstrip("\n").split("\n") if text else [""]
    raw = [line.encode("utf-8", "replace") for line in lines]
    lock = image.field_addr(hdr, "log_lock")
    records.raw_spin_lock(lock)
    try:
        for i, data in enumerate(raw):
            first_chunk = True
            for off in range(0, max(len(data), 1), image.LOG_TEXT_LEN):
                _append(img, now, level, pid, data[off : off + image.LOG_TEXT_LEN],
                        cont=(cont and i == 0) or not first_chunk)
                first_chunk = False
        console_level = hdr.console_loglevel
    finally:
        records.raw_spin_unlock(lock)
    if not cont and level < console_level:
        stamp = _stamp(now)
        os.write(2, "".join(f"{stamp}{line}\n" for line in lines).encode("utf-8", "replace"))
    elif cont and level < console_level:
        os.write(2, text.encode("utf-8", "replace"))
    return len(text)


def _append(img: image.SharedImage, now: int, level: int, pid: int, data: bytes,
            cont: bool) -> None:
    hdr = img.img.hdr
    n = hdr.log_records
    seq = hdr.log_next_seq
    rec = img.img.log[seq % n]
    rec.seq = seq
    rec.ts_ns = now
    rec.level = level
    rec.pid = pid
    rec.cont = int(cont)
    rec.length = len(data)
    ctypes.memmove(image.field_addr(rec, "text"), data, len(data))
    hdr.log_next_seq = seq + 1
    if seq + 1 - hdr.log_first_seq > n:
        hdr.log_first_seq = seq + 1 - n


def _stamp(ns: int) -> str:
    return f"[{ns // 1_000_000_000:5d}.{(ns // 1000) % 1_000_000:06d}] "


def dmesg(img: image.SharedImage | None = None) -> list[str]:
    """The log as lines ``[seconds.micros] text``, oldest first (continuations joined)."""
    img = img or image.this()
    hdr = img.img.hdr
    lock = image.field_addr(hdr, "log_lock")
    out: list[str] = []
    records.raw_spin_lock(lock)
    try:
        n = hdr.log_records
        for seq in range(hdr.log_first_seq, hdr.log_next_seq):
            rec = img.img.log[seq % n]
            text = rec.text[: rec.length].decode("utf-8", "replace")
            if rec.cont and out:
                out[-1] += text
            else:
                out.append(_stamp(rec.ts_ns) + text)
    finally:
        records.raw_spin_unlock(lock)
    return out


def _pr(level: str, name: str) -> Callable[..., int]:
    def pr(fmt: str, *args: object) -> int:
        return printk(level + _format(fmt, args))

    pr.__doc__ = (f"printk({name} fmt, args...): `fmt` % `args` (C-style format). Any "
                  "context; returns the number of characters logged.")
    return pr


pr_emerg = _pr(KERN_EMERG, "KERN_EMERG")
pr_alert = _pr(KERN_ALERT, "KERN_ALERT")
pr_crit = _pr(KERN_CRIT, "KERN_CRIT")
pr_err = _pr(KERN_ERR, "KERN_ERR")
pr_warn = _pr(KERN_WARNING, "KERN_WARNING")
pr_warning = pr_warn
pr_notice = _pr(KERN_NOTICE, "KERN_NOTICE")
pr_info = _pr(KERN_INFO, "KERN_INFO")
pr_debug = _pr(KERN_DEBUG, "KERN_DEBUG")
pr_cont = _pr(KERN_CONT, "KERN_CONT")
