"""printk and the dmesg ring (kernel/printk/printk.c), printk_ratelimit (lib/ratelimit.c).

Records live in a fixed ring in the shared image, so every task's messages are in one
log, in order. ``kernel.dmesg()`` renders them as ``[    1.234567] text``, the time
since boot. Messages below the console log level are also written to stderr.

A message of several lines (a whole report) is stored as one unit under the log lock,
and written to stderr whole under the console lock: reports of different tasks never
interleave, in the log or on stderr. The first report of each kind
(image.REPORT_KINDS) is also kept apart from the ring, which wraps
(``kernel.first_reports``).
"""

from __future__ import annotations

import ctypes
import hashlib
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
#: printk_ratelimit defaults (DEFAULT_RATELIMIT_INTERVAL, DEFAULT_RATELIMIT_BURST):
#: at most 10 identical reports every 5 seconds.
RATELIMIT_INTERVAL_SECS_DEFAULT = 5
RATELIMIT_BURST_DEFAULT = 10


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


def log_store(level: int, text: str, keep: tuple[str, ...] = ()) -> int:
    """Append `text` (one or more lines) at `level` to the ring and the console, as one
    unit: no other task's lines come between them, in the log or on stderr.

    `keep` names report kinds (image.REPORT_KINDS) whose first report this is, if none
    was kept yet. Callable from any context; never sleeps. Returns len(text).
    """
    img = image.this()
    hdr = img.img.hdr
    now = time.monotonic_ns() - hdr.boot_ns
    pid = os.getpid()
    cont = level == LEVEL_CONT
    lines = text.rstrip("\n").split("\n") if text else [""]
    raw = [line.encode("utf-8", "replace") for line in lines]
    lock = image.field_addr(hdr, "log_lock")
    console = False
    records.raw_spin_lock(lock)
    try:
        for i, data in enumerate(raw):
            first_chunk = True
            for off in range(0, max(len(data), 1), image.LOG_TEXT_LEN):
                _append(img, now, level, pid, data[off : off + image.LOG_TEXT_LEN],
                        cont=(cont and i == 0) or not first_chunk)
                first_chunk = False
        for kind in keep:  # under the log lock: the first kept is the first logged
            _keep_first(hdr, kind, [_stamp(now) + line for line in lines])
        console = level < hdr.console_loglevel
    finally:
        records.raw_spin_unlock(lock)
    if console:  # (a stderr that blocks holds up the console, never the log)
        records.raw_spin_lock(image.field_addr(hdr, "console_lock"), "console")
        try:
            if cont:
                _write_all(text.encode("utf-8", "replace"))
            else:
                stamp = _stamp(now)
                _write_all("".join(f"{stamp}{line}\n" for line in lines)
                           .encode("utf-8", "replace"))
        finally:
            records.raw_spin_unlock(image.field_addr(hdr, "console_lock"))
    return len(text)


def _write_all(data: bytes) -> None:
    """Write `data` to stderr (fd 2) whole; a console that fails is dropped silently,
    as the kernel drops what a console cannot take."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(2, view):]
    except OSError:
        pass


def _keep_first(hdr: image.Header, kind: str, lines: list[str]) -> None:
    """Keep `lines` as the first report of `kind` unless one is kept already."""
    entry = hdr.first_reports[image.REPORT_KINDS.index(kind)]
    if records.field_cmpxchg(entry, "state", 0, 1) != 0:
        return
    data = "\n".join(lines).encode("utf-8", "replace")[: image.FIRST_REPORT_LEN]
    ctypes.memmove(image.field_addr(entry, "text"), data, len(data))
    entry.length = len(data)
    records.field_store(entry, "state", 2)


def first_reports(img: image.SharedImage | None = None) -> dict[str, list[str]]:
    """The first report of each kind made so far, as ``dmesg()`` lines, by kind
    (image.REPORT_KINDS: "warning", "bug", "oops", "hung_task", "soft_lockup")."""
    hdr = (img or image.this()).img.hdr
    kept: dict[str, list[str]] = {}
    for kind, entry in zip(image.REPORT_KINDS, hdr.first_reports, strict=True):
        if records.field_load(entry, "state") == 2:
            kept[kind] = entry.text[: entry.length].decode("utf-8", "replace").split("\n")
    return kept


def ratelimit(site: str, func: str) -> bool:
    """___ratelimit() for the report site `site` (any text naming it): True if the
    report may be printed. At most ``printk_ratelimit_burst`` reports of one site are
    printed every ``printk_ratelimit`` seconds; the first report allowed after an
    interval in which some were dropped is preceded by ``"<func>: N callbacks
    suppressed"``, as in the kernel. Any context; never sleeps.
    """
    hdr = image.this().img.hdr
    interval = hdr.ratelimit_interval_ns
    if interval <= 0:
        return True
    key = int.from_bytes(hashlib.blake2b(site.encode(), digest_size=8).digest(), "little") | 1
    now = time.monotonic_ns()
    lock = image.field_addr(hdr, "log_lock")
    records.raw_spin_lock(lock)
    try:
        rs = _ratelimit_state(hdr, key, now)
        missed = 0
        if now - rs.begin_ns > interval:
            missed, rs.missed = rs.missed, 0
            rs.begin_ns, rs.printed = now, 0
        allowed = rs.printed < hdr.ratelimit_burst
        if allowed:
            rs.printed += 1
        else:
            rs.missed += 1
    finally:
        records.raw_spin_unlock(lock)
    if missed:
        log_store(4, f"{func}: {missed} callbacks suppressed")
    return allowed


def _ratelimit_state(hdr: image.Header, key: int, now: int) -> image.RatelimitState:
    """The state of report site `key` (log lock held): found, else a free one, else the
    one idle longest, started afresh."""
    table = hdr.ratelimits
    n = len(table)
    for i in range(n):
        rs = table[(key + i) % n]
        if rs.key in (key, 0):
            break
    else:
        rs = min(table, key=lambda r: r.begin_ns)
        rs.key = 0
    if rs.key != key:
        rs.key, rs.begin_ns, rs.printed, rs.missed = key, now, 0, 0
    return rs


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


def _pr(level: str, name: str, what: str) -> Callable[..., int]:
    def pr(fmt: str, *args: object) -> int:
        return printk(level + _format(fmt, args))

    pr.__name__ = pr.__qualname__ = name
    pr.__doc__ = (f"printk() of ``fmt % args`` {what}. Any context; never sleeps; returns "
                  "the number of characters logged.")
    return pr


pr_emerg = _pr(KERN_EMERG, "pr_emerg", "at KERN_EMERG (0): the system is unusable")
pr_alert = _pr(KERN_ALERT, "pr_alert", "at KERN_ALERT (1): action must be taken at once")
pr_crit = _pr(KERN_CRIT, "pr_crit", "at KERN_CRIT (2): critical conditions")
pr_err = _pr(KERN_ERR, "pr_err", "at KERN_ERR (3): error conditions")
pr_warn = _pr(KERN_WARNING, "pr_warn", "at KERN_WARNING (4): warning conditions")
pr_warning = pr_warn
pr_notice = _pr(KERN_NOTICE, "pr_notice", "at KERN_NOTICE (5): normal but significant")
pr_info = _pr(KERN_INFO, "pr_info", "at KERN_INFO (6): informational")
pr_debug = _pr(KERN_DEBUG, "pr_debug", "at KERN_DEBUG (7): debug-level messages")
pr_cont = _pr(KERN_CONT, "pr_cont", "continuing the previous line (KERN_CONT)")
