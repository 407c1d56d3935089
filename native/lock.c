/*
 * lock.c: the owner-aware lock { int32 owner pid (0 = free); int32 waiters }: its one
 * slow path (spin, futex sleep, dead-owner takeover) and the Python-facing calls.
 *
 * In C because it sleeps on a shared futex, which Python cannot call, and must notice
 * a dead owner (a task killed while holding it) and take the lock over.
 */

#include "emu.h"

static inline void
cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__) || defined(__arm__)
    __asm__ __volatile__("yield" ::: "memory");
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

/* Shared (not FUTEX_PRIVATE_FLAG) futex: waiters and wakers are different processes. */
static inline long
sys_futex_wait(uint32_t *uaddr, uint32_t val, const struct timespec *rel)
{
    return syscall(SYS_futex, uaddr, FUTEX_WAIT, val, rel, NULL, 0);
}

static inline long
sys_futex_wake(uint32_t *uaddr, int n)
{
    return syscall(SYS_futex, uaddr, FUTEX_WAKE, n, NULL, NULL, 0);
}

static inline int
lock_try(int32_t *lockw, int pid)
{
    int32_t expected = 0;

    return __atomic_compare_exchange_n(lockw, &expected, (int32_t)pid, 0, __ATOMIC_SEQ_CST,
                                       __ATOMIC_SEQ_CST);
}

/* After releasing the lock word: wake one sleeper if anyone is waiting. */
static inline void
wake_one_if_waiters(int32_t *lockw)
{
    uint32_t *waiters = (uint32_t *)(lockw + 1);

    if ((int32_t)__atomic_load_n(waiters, __ATOMIC_SEQ_CST) > 0)
        sys_futex_wake((uint32_t *)lockw, 1);
}

/* ------------------------------------------------------------------------- */
/* owner-aware lock: { int32 owner; int32 waiters; }                          */
/* ------------------------------------------------------------------------- */

/*
 * The one slow path of the owner-aware lock: spin `spins` times, then sleep on the
 * owner word's futex, at most LOCK_SLEEP_NS at a time, checking at least that often
 * whether the owner died and taking the lock over if it did. The callers differ only
 * in the parameters:
 *   - timeout_ns: give up after this long (< 0: never);
 *   - py_signals: release the GIL while asleep and run Python signal handlers after
 *     every sleep (the Python-facing lock(), where emu's interrupts must get in);
 *     WaitCore/IrqCore (raw_spin_lock under their hot path) keep the GIL and run none;
 *   - the dead owner is returned: the caller records or reports it.
 * Returns 0 when taken, the dead owner's pid when taken over from it, LOCK_TIMEDOUT
 * on time-out, LOCK_ERROR with a Python exception if a signal handler raised.
 */
int
lock_slowpath(int32_t *lockw, int pid, Py_ssize_t spins, long long timeout_ns, int py_signals)
{
    int32_t *waiters = lockw + 1, cur;
    long long start, now, last_check, sleep_ns;
    struct timespec ts;
    Py_ssize_t i;
    long r;
    int err, check_dead;

    /* Spin (holding the GIL: this is meant to be brief). */
    for (i = 0;; i++) {
        if (__atomic_load_n(lockw, __ATOMIC_RELAXED) == 0 && lock_try(lockw, pid))
            return 0;
        if (i >= spins)
            break;
        cpu_relax();
    }

    start = last_check = monotonic_ns();
    for (;;) {
        cur = __atomic_load_n(lockw, __ATOMIC_SEQ_CST);
        if (cur == 0) {
            if (lock_try(lockw, pid))
                return 0;
            continue;
        }

        now = monotonic_ns();
        check_dead = now - last_check >= LOCK_SLEEP_NS;
        if (timeout_ns >= 0 && now - start >= timeout_ns)
            check_dead = 1;  /* last chance before reporting the timeout */
        if (check_dead) {
            last_check = now;
            if (pid_dead(cur)) {
                int32_t expected = cur;

                if (__atomic_compare_exchange_n(lockw, &expected, (int32_t)pid, 0,
                                                __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
                    return cur;
                continue;  /* someone else took it over or it changed hands */
            }
        }
        if (timeout_ns >= 0 && now - start >= timeout_ns)
            return LOCK_TIMEDOUT;

        sleep_ns = LOCK_SLEEP_NS;
        if (timeout_ns >= 0 && timeout_ns - (now - start) < sleep_ns)
            sleep_ns = timeout_ns - (now - start);
        ns_to_timespec(sleep_ns, &ts);

        __atomic_add_fetch(waiters, 1, __ATOMIC_SEQ_CST);
        if (py_signals) {
            Py_BEGIN_ALLOW_THREADS
            r = sys_futex_wait((uint32_t *)lockw, (uint32_t)cur, &ts);
            err = errno;
            Py_END_ALLOW_THREADS
        }
        else {
            r = sys_futex_wait((uint32_t *)lockw, (uint32_t)cur, &ts);
            err = errno;
        }
        __atomic_sub_fetch(waiters, 1, __ATOMIC_SEQ_CST);

        if (r == -1 && err == ETIMEDOUT)
            last_check = 0;  /* a full sleep passed: check the owner now */
        /* After every sleep, not only on EINTR: a signal that arrived while we held
         * the GIL between two sleeps only set CPython's flag. */
        if (py_signals && PyErr_CheckSignals() < 0)
            return LOCK_ERROR;
    }
}

/* Release a lock the caller holds and wake one sleeper. */
void
raw_unlock(int32_t *lockw)
{
    __atomic_store_n(lockw, 0, __ATOMIC_SEQ_CST);
    wake_one_if_waiters(lockw);
}

static PyObject *
emu_lock(PyObject *self, PyObject *args)
{
    Py_ssize_t addr, spins;
    int pid, r;
    long long timeout_ns;
    int32_t *lockw;

    if (!PyArg_ParseTuple(args, "ninL:lock", &addr, &pid, &spins, &timeout_ns))
        return NULL;
    if (!(lockw = check_addr(addr, 4, "addr")))
        return NULL;
    if (check_pid(pid, "pid") < 0)
        return NULL;
    r = lock_slowpath(lockw, pid, spins, timeout_ns, 1);
    if (r == LOCK_ERROR)
        return NULL;
    return PyLong_FromLong(r);
}

static PyObject *
emu_trylock(PyObject *self, PyObject *args)
{
    Py_ssize_t addr;
    int pid;
    int32_t *lockw;

    if (!PyArg_ParseTuple(args, "ni:trylock", &addr, &pid))
        return NULL;
    if (!(lockw = check_addr(addr, 4, "addr")))
        return NULL;
    if (check_pid(pid, "pid") < 0)
        return NULL;
    return PyBool_FromLong(lock_try(lockw, pid));
}

static PyObject *
emu_unlock(PyObject *self, PyObject *args)
{
    Py_ssize_t addr;
    int pid;
    int32_t *lockw, expected;

    if (!PyArg_ParseTuple(args, "ni:unlock", &addr, &pid))
        return NULL;
    if (!(lockw = check_addr(addr, 4, "addr")))
        return NULL;
    if (check_pid(pid, "pid") < 0)
        return NULL;
    expected = pid;
    /* Seq-cst release of the owner word, then a seq-cst read of waiters: pairs with
     * the sleeper's seq-cst waiters increment before FUTEX_WAIT, so no wakeup is lost. */
    if (!__atomic_compare_exchange_n(lockw, &expected, 0, 0, __ATOMIC_SEQ_CST,
                                     __ATOMIC_SEQ_CST))
        Py_RETURN_FALSE;
    wake_one_if_waiters(lockw);
    Py_RETURN_TRUE;
}

static PyObject *
emu_lock_owner(PyObject *self, PyObject *args)
{
    Py_ssize_t addr;
    int32_t *lockw;

    if (!PyArg_ParseTuple(args, "n:lock_owner", &addr))
        return NULL;
    if (!(lockw = check_addr(addr, 4, "addr")))
        return NULL;
    return PyLong_FromLong(__atomic_load_n(lockw, __ATOMIC_SEQ_CST));
}

DOC(lock, "(addr, pid, spins, timeout_ns, /)",
    "Acquire the owner-aware lock at addr for pid; return 0 if acquired, the dead "
    "owner's pid if taken over from a dead owner, -1 on timeout (timeout_ns < 0 = never).");
DOC(trylock, "(addr, pid, /)", "Take the lock at addr for pid if it is free; return True if taken.");
DOC(unlock, "(addr, pid, /)",
    "Release the lock at addr held by pid and wake one sleeper; return False "
    "(changing nothing) if pid is not the owner.");
DOC(lock_owner, "(addr, /)", "Return the pid holding the lock at addr (0 = free).");

PyMethodDef emu_lock_methods[] = {
    METH(lock),
    METH(trylock),
    METH(unlock),
    METH(lock_owner),
    {NULL, NULL, 0, NULL},
};
