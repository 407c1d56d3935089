/*
 * _emu_native (emu's compiled part): the few primitives the emulator cannot write in Python.
 *
 * Every function takes an absolute memory address (a Python int, computed by the
 * caller from ctypes.addressof into the shared mmap) and returns raw data; policy
 * (what a dead lock holder means, how a timeout is reported) lives in Python.
 *
 *   - 32- and 64-bit sequentially consistent atomics (values wrap like C integers);
 *   - an owner-aware lock: { int32 owner pid (0 = free); int32 waiters } that sleeps
 *     on a shared (not private) futex and takes the lock over from a dead owner;
 *   - raw futex wait/wake on a shared word;
 *   - prctl(PR_SET_NAME), prctl(PR_SET_PDEATHSIG) and a "is this pid dead" test;
 *   - WaitCore, the completion and sleep/wake hot path (see its own comment).
 *
 * The module has no global state; a WaitCore holds its process's view of one image.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <semaphore.h>
#include <linux/futex.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define NSEC_PER_SEC 1000000000LL
/* Longest single futex sleep in lock(): the dead-owner check runs at least this often. */
#define LOCK_SLEEP_NS 20000000LL

/* ------------------------------------------------------------------------- */
/* helpers                                                                   */
/* ------------------------------------------------------------------------- */

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

static long long
monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * NSEC_PER_SEC + ts.tv_nsec;
}

static void
ns_to_timespec(long long ns, struct timespec *ts)
{
    ts->tv_sec = (time_t)(ns / NSEC_PER_SEC);
    ts->tv_nsec = (long)(ns % NSEC_PER_SEC);
}

/* Shared (not FUTEX_PRIVATE_FLAG) futex: waiters and wakers are different processes. */
static long
sys_futex_wait(uint32_t *uaddr, uint32_t val, const struct timespec *rel)
{
    return syscall(SYS_futex, uaddr, FUTEX_WAIT, val, rel, NULL, 0);
}

static long
sys_futex_wake(uint32_t *uaddr, int n)
{
    return syscall(SYS_futex, uaddr, FUTEX_WAKE, n, NULL, NULL, 0);
}

/* Validate an address argument: non-zero, positive and `align`-byte aligned. */
static void *
check_addr(Py_ssize_t addr, size_t align, const char *argname)
{
    if (addr <= 0) {
        PyErr_Format(PyExc_ValueError, "%s must be a non-zero address, got %zd", argname,
                     addr);
        return NULL;
    }
    if ((size_t)addr % align != 0) {
        PyErr_Format(PyExc_ValueError, "%s must be %zu-byte aligned, got 0x%zx", argname,
                     align, (size_t)addr);
        return NULL;
    }
    return (void *)addr;
}

static int
check_pid(int pid, const char *argname)
{
    if (pid <= 0) {
        PyErr_Format(PyExc_ValueError, "%s must be a positive pid, got %d", argname, pid);
        return -1;
    }
    return 0;
}

/*
 * A process is dead when kill(pid, 0) fails with ESRCH, or when it exists only as a
 * zombie / dying task (state 'Z' or 'X' in /proc/<pid>/stat). Non-positive pids are
 * never considered dead (they name process groups, not processes).
 */
static int
pid_dead(int pid)
{
    char path[64], buf[512];
    int fd;
    ssize_t n;
    char *rparen;

    if (pid <= 0)
        return 0;
    if (kill(pid, 0) == -1 && errno == ESRCH)
        return 1;

    snprintf(path, sizeof(path), "/proc/%d/stat", pid);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)  /* vanished in between, or no /proc: trust kill() alone */
        return kill(pid, 0) == -1 && errno == ESRCH;
    do {
        n = read(fd, buf, sizeof(buf) - 1);
    } while (n < 0 && errno == EINTR);
    close(fd);
    if (n <= 0)
        return kill(pid, 0) == -1 && errno == ESRCH;
    buf[n] = '\0';
    /* "pid (comm) S ...": comm may contain ')' and spaces, so use the last ')'. */
    rparen = strrchr(buf, ')');
    if (rparen == NULL || rparen[1] != ' ')
        return 0;
    return rparen[2] == 'Z' || rparen[2] == 'X';
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
/* 32-bit atomics                                                            */
/* ------------------------------------------------------------------------- */

static PyObject *
emu_load32(PyObject *self, PyObject *args)
{
    Py_ssize_t addr;
    uint32_t *p;

    if (!PyArg_ParseTuple(args, "n:load32", &addr))
        return NULL;
    if (!(p = check_addr(addr, 4, "addr")))
        return NULL;
    return PyLong_FromLong((int32_t)__atomic_load_n(p, __ATOMIC_SEQ_CST));
}

static PyObject *
emu_store32(PyObject *self, PyObject *args)
{
    Py_ssize_t addr;
    unsigned long long v;
    uint32_t *p;

    if (!PyArg_ParseTuple(args, "nK:store32", &addr, &v))
        return NULL;
    if (!(p = check_addr(addr, 4, "addr")))
        return NULL;
    __atomic_store_n(p, (uint32_t)v, __ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

static PyObject *
emu_add32(PyObject *self, PyObject *args)
{
    Py_ssize_t addr;
    unsigned long long v;
    uint32_t *p;

    if (!PyArg_ParseTuple(args, "nK:add32", &addr, &v))
        return NULL;
    if (!(p = check_addr(addr, 4, "addr")))
        return NULL;
    return PyLong_FromLong((int32_t)__atomic_add_fetch(p, (uint32_t)v, __ATOMIC_SEQ_CST));
}

static PyObject *
emu_xchg32(PyObject *self, PyObject *args)
{
    Py_ssize_t addr;
    unsigned long long v;
    uint32_t *p;

    if (!PyArg_ParseTuple(args, "nK:xchg32", &addr, &v))
        return NULL;
    if (!(p = check_addr(addr, 4, "addr")))
        return NULL;
    return PyLong_FromLong((int32_t)__atomic_exchange_n(p, (uint32_t)v, __ATOMIC_SEQ_CST));
}

static PyObject *
emu_cmpxchg32(PyObject *self, PyObject *args)
{
    Py_ssize_t addr;
    unsigned long long oldv, newv;
    uint32_t *p, expected;

    if (!PyArg_ParseTuple(args, "nKK:cmpxchg32", &addr, &oldv, &newv))
        return NULL;
    if (!(p = check_addr(addr, 4, "addr")))
        return NULL;
    expected = (uint32_t)oldv;
    /* On failure `expected` is updated to the current value; either way it is what
     * was there. */
    __atomic_compare_exchange_n(p, &expected, (uint32_t)newv, 0, __ATOMIC_SEQ_CST,
                                __ATOMIC_SEQ_CST);
    return PyLong_FromLong((int32_t)expected);
}

static PyObject *
emu_or32(PyObject *self, PyObject *args)
{
    Py_ssize_t addr;
    unsigned long long v;
    uint32_t *p;

    if (!PyArg_ParseTuple(args, "nK:or32", &addr, &v))
        return NULL;
    if (!(p = check_addr(addr, 4, "addr")))
        return NULL;
    return PyLong_FromLong((int32_t)__atomic_fetch_or(p, (uint32_t)v, __ATOMIC_SEQ_CST));
}

static PyObject *
emu_and32(PyObject *self, PyObject *args)
{
    Py_ssize_t addr;
    unsigned long long v;
    uint32_t *p;

    if (!PyArg_ParseTuple(args, "nK:and32", &addr, &v))
        return NULL;
    if (!(p = check_addr(addr, 4, "addr")))
        return NULL;
    return PyLong_FromLong((int32_t)__atomic_fetch_and(p, (uint32_t)v, __ATOMIC_SEQ_CST));
}

/* ------------------------------------------------------------------------- */
/* 64-bit atomics                                                            */
/* ------------------------------------------------------------------------- */

static PyObject *
emu_load64(PyObject *self, PyObject *args)
{
    Py_ssize_t addr;
    uint64_t *p;

    if (!PyArg_ParseTuple(args, "n:load64", &addr))
        return NULL;
    if (!(p = check_addr(addr, 8, "addr")))
        return NULL;
    return PyLong_FromLongLong((int64_t)__atomic_load_n(p, __ATOMIC_SEQ_CST));
}

static PyObject *
emu_store64(PyObject *self, PyObject *args)
{
    Py_ssize_t addr;
    unsigned long long v;
    uint64_t *p;

    if (!PyArg_ParseTuple(args, "nK:store64", &addr, &v))
        return NULL;
    if (!(p = check_addr(addr, 8, "addr")))
        return NULL;
    __atomic_store_n(p, (uint64_t)v, __ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

static PyObject *
emu_add64(PyObject *self, PyObject *args)
{
    Py_ssize_t addr;
    unsigned long long v;
    uint64_t *p;

    if (!PyArg_ParseTuple(args, "nK:add64", &addr, &v))
        return NULL;
    if (!(p = check_addr(addr, 8, "addr")))
        return NULL;
    return PyLong_FromLongLong(
        (int64_t)__atomic_add_fetch(p, (uint64_t)v, __ATOMIC_SEQ_CST));
}

static PyObject *
emu_xchg64(PyObject *self, PyObject *args)
{
    Py_ssize_t addr;
    unsigned long long v;
    uint64_t *p;

    if (!PyArg_ParseTuple(args, "nK:xchg64", &addr, &v))
        return NULL;
    if (!(p = check_addr(addr, 8, "addr")))
        return NULL;
    return PyLong_FromLongLong(
        (int64_t)__atomic_exchange_n(p, (uint64_t)v, __ATOMIC_SEQ_CST));
}

static PyObject *
emu_cmpxchg64(PyObject *self, PyObject *args)
{
    Py_ssize_t addr;
    unsigned long long oldv, newv;
    uint64_t *p, expected;

    if (!PyArg_ParseTuple(args, "nKK:cmpxchg64", &addr, &oldv, &newv))
        return NULL;
    if (!(p = check_addr(addr, 8, "addr")))
        return NULL;
    expected = (uint64_t)oldv;
    __atomic_compare_exchange_n(p, &expected, (uint64_t)newv, 0, __ATOMIC_SEQ_CST,
                                __ATOMIC_SEQ_CST);
    return PyLong_FromLongLong((int64_t)expected);
}

static PyObject *
emu_or64(PyObject *self, PyObject *args)
{
    Py_ssize_t addr;
    unsigned long long v;
    uint64_t *p;

    if (!PyArg_ParseTuple(args, "nK:or64", &addr, &v))
        return NULL;
    if (!(p = check_addr(addr, 8, "addr")))
        return NULL;
    return PyLong_FromLongLong((int64_t)__atomic_fetch_or(p, (uint64_t)v, __ATOMIC_SEQ_CST));
}

static PyObject *
emu_and64(PyObject *self, PyObject *args)
{
    Py_ssize_t addr;
    unsigned long long v;
    uint64_t *p;

    if (!PyArg_ParseTuple(args, "nK:and64", &addr, &v))
        return NULL;
    if (!(p = check_addr(addr, 8, "addr")))
        return NULL;
    return PyLong_FromLongLong(
        (int64_t)__atomic_fetch_and(p, (uint64_t)v, __ATOMIC_SEQ_CST));
}

/* ------------------------------------------------------------------------- */
/* owner-aware lock: { int32 owner; int32 waiters; }                          */
/* ------------------------------------------------------------------------- */

static inline int
lock_try(int32_t *lockw, int pid)
{
    int32_t expected = 0;

    return __atomic_compare_exchange_n(lockw, &expected, (int32_t)pid, 0, __ATOMIC_SEQ_CST,
                                       __ATOMIC_SEQ_CST);
}

static PyObject *
emu_lock(PyObject *self, PyObject *args)
{
    Py_ssize_t addr, spins, i;
    int pid;
    long long timeout_ns, start, now, last_check, sleep_ns;
    int32_t *lockw, *waiters, cur;
    struct timespec ts;
    long r;
    int err, check_dead;

    if (!PyArg_ParseTuple(args, "ninL:lock", &addr, &pid, &spins, &timeout_ns))
        return NULL;
    if (!(lockw = check_addr(addr, 4, "addr")))
        return NULL;
    if (check_pid(pid, "pid") < 0)
        return NULL;
    waiters = lockw + 1;

    /* Spin (holding the GIL: this is meant to be brief). */
    for (i = 0;; i++) {
        if (__atomic_load_n(lockw, __ATOMIC_RELAXED) == 0 && lock_try(lockw, pid))
            return PyLong_FromLong(0);
        if (i >= spins)
            break;
        cpu_relax();
    }

    /* Sleep on the owner word, at most LOCK_SLEEP_NS at a time. */
    start = last_check = monotonic_ns();
    for (;;) {
        cur = __atomic_load_n(lockw, __ATOMIC_SEQ_CST);
        if (cur == 0) {
            if (lock_try(lockw, pid))
                return PyLong_FromLong(0);
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
                    return PyLong_FromLong(cur);
                continue;  /* someone else took it over or it changed hands */
            }
        }
        if (timeout_ns >= 0 && now - start >= timeout_ns)
            return PyLong_FromLong(-1);

        sleep_ns = LOCK_SLEEP_NS;
        if (timeout_ns >= 0 && timeout_ns - (now - start) < sleep_ns)
            sleep_ns = timeout_ns - (now - start);
        ns_to_timespec(sleep_ns, &ts);

        __atomic_add_fetch(waiters, 1, __ATOMIC_SEQ_CST);
        Py_BEGIN_ALLOW_THREADS
        r = sys_futex_wait((uint32_t *)lockw, (uint32_t)cur, &ts);
        err = errno;
        Py_END_ALLOW_THREADS
        __atomic_sub_fetch(waiters, 1, __ATOMIC_SEQ_CST);

        if (r == -1 && err == ETIMEDOUT)
            last_check = 0;  /* a full sleep passed: check the owner now */
        /* After every sleep, not only on EINTR: a signal that arrived while we held
         * the GIL between two sleeps only set CPython's flag. */
        if (PyErr_CheckSignals() < 0)
            return NULL;
    }
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

static PyObject *
emu_force_unlock(PyObject *self, PyObject *args)
{
    Py_ssize_t addr;
    int expected_owner;
    int32_t *lockw, expected;

    if (!PyArg_ParseTuple(args, "ni:force_unlock", &addr, &expected_owner))
        return NULL;
    if (!(lockw = check_addr(addr, 4, "addr")))
        return NULL;
    expected = expected_owner;
    if (!__atomic_compare_exchange_n(lockw, &expected, 0, 0, __ATOMIC_SEQ_CST,
                                     __ATOMIC_SEQ_CST))
        Py_RETURN_FALSE;
    wake_one_if_waiters(lockw);
    Py_RETURN_TRUE;
}

/* ------------------------------------------------------------------------- */
/* raw futex                                                                 */
/* ------------------------------------------------------------------------- */

static PyObject *
emu_futex_wait(PyObject *self, PyObject *args)
{
    Py_ssize_t addr;
    unsigned long long expected;
    long long timeout_ns;
    uint32_t *p;
    struct timespec ts, *tsp = NULL;
    long r;
    int err;

    if (!PyArg_ParseTuple(args, "nKL:futex_wait", &addr, &expected, &timeout_ns))
        return NULL;
    if (!(p = check_addr(addr, 4, "addr")))
        return NULL;
    if (timeout_ns >= 0) {
        ns_to_timespec(timeout_ns, &ts);
        tsp = &ts;
    }
    Py_BEGIN_ALLOW_THREADS
    r = sys_futex_wait(p, (uint32_t)expected, tsp);
    err = errno;
    Py_END_ALLOW_THREADS
    if (r == -1) {
        /* A Python signal handler that raised takes precedence over -EINTR. */
        if (err == EINTR && PyErr_CheckSignals() < 0)
            return NULL;
        return PyLong_FromLong(-err);
    }
    return PyLong_FromLong(0);
}

static PyObject *
emu_futex_wake(PyObject *self, PyObject *args)
{
    Py_ssize_t addr;
    int n;
    uint32_t *p;
    long r;

    if (!PyArg_ParseTuple(args, "ni:futex_wake", &addr, &n))
        return NULL;
    if (!(p = check_addr(addr, 4, "addr")))
        return NULL;
    if (n < 0) {
        PyErr_Format(PyExc_ValueError, "n must be >= 0, got %d", n);
        return NULL;
    }
    r = sys_futex_wake(p, n);
    if (r == -1)
        return PyLong_FromLong(-errno);
    return PyLong_FromLong(r);
}

/* ------------------------------------------------------------------------- */
/* process helpers                                                           */
/* ------------------------------------------------------------------------- */

static PyObject *
emu_set_comm(PyObject *self, PyObject *args)
{
    PyObject *name, *bytes;
    const char *s;
    Py_ssize_t len;

    if (!PyArg_ParseTuple(args, "O:set_comm", &name))
        return NULL;
    if (PyUnicode_Check(name)) {
        bytes = PyUnicode_AsUTF8String(name);
        if (bytes == NULL)
            return NULL;
    }
    else if (PyBytes_Check(name)) {
        bytes = Py_NewRef(name);
    }
    else {
        PyErr_Format(PyExc_TypeError, "set_comm() argument must be str or bytes, not %.100s",
                     Py_TYPE(name)->tp_name);
        return NULL;
    }
    s = PyBytes_AS_STRING(bytes);
    len = PyBytes_GET_SIZE(bytes);
    if ((Py_ssize_t)strlen(s) != len) {
        Py_DECREF(bytes);
        PyErr_SetString(PyExc_ValueError, "set_comm(): embedded null character in name");
        return NULL;
    }
    /* The kernel copies at most TASK_COMM_LEN - 1 (15) bytes. */
    if (prctl(PR_SET_NAME, (unsigned long)s, 0UL, 0UL, 0UL) == -1) {
        Py_DECREF(bytes);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_DECREF(bytes);
    Py_RETURN_NONE;
}

static PyObject *
emu_get_comm(PyObject *self, PyObject *noargs)
{
    char name[16] = {0};  /* TASK_COMM_LEN: PR_GET_NAME writes up to 16 bytes with the NUL */

    if (prctl(PR_GET_NAME, (unsigned long)name, 0UL, 0UL, 0UL) == -1)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyBytes_FromString(name);
}

static PyObject *
emu_set_pdeathsig(PyObject *self, PyObject *args)
{
    int sig;

    if (!PyArg_ParseTuple(args, "i:set_pdeathsig", &sig))
        return NULL;
    if (prctl(PR_SET_PDEATHSIG, (unsigned long)sig, 0UL, 0UL, 0UL) == -1)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *
emu_pid_is_dead(PyObject *self, PyObject *args)
{
    int pid;

    if (!PyArg_ParseTuple(args, "i:pid_is_dead", &pid))
        return NULL;
    if (check_pid(pid, "pid") < 0)
        return NULL;
    return PyBool_FromLong(pid_dead(pid));
}

/* ------------------------------------------------------------------------- */
/* module                                                                    */
/* ------------------------------------------------------------------------- */
/* WaitCore: task sleep/wake and completion wait queues                      */
/* ------------------------------------------------------------------------- */
/*
 * The hot path of emu: the kernel's sleep/wake protocol and the completion wait
 * queue (kernel/sched/completion.c, swait), over the task table and completion table
 * of the shared image. emu/image.py declares the layout and passes the offsets in;
 * this code computes none itself. Each task sleeps on its own POSIX semaphore.
 *
 * Sleep: the task publishes its state, re-checks, then waits on its semaphore until
 * its state is TASK_RUNNING. Wake: compare-and-exchange the state from a sleeping
 * one to TASK_RUNNING and, only if that succeeded, post the semaphore. A post that
 * arrives after the sleeper left is absorbed by its next sleep, which loops on state.
 *
 * The completion calls take (index, generation) and do the whole operation, Python
 * being only the API's names: a Python wrapper costs microseconds on the cold caches
 * a task wakes up with. What needs Python (reports, exceptions) is left to it: the
 * calls return None having changed nothing, and a lock taken over from a dead owner
 * is reported through a hook once the lock is released.
 */

#define TASK_RUNNING 0x0000
#define TASK_INTERRUPTIBLE 0x0001
#define TASK_UNINTERRUPTIBLE 0x0002
#define TASK_WAKEKILL 0x0100
#define TASK_NORMAL (TASK_INTERRUPTIBLE | TASK_UNINTERRUPTIBLE)
#define SIGKILL_BIT (1LL << (SIGKILL - 1))
#define WC_SPINS 200
#define ERESTARTSYS 512

/* wait() results besides "completed after sleeping" (remaining ns >= 0). */
#define WAIT_DONE_AT_ENTRY (-1)
#define WAIT_TIMEDOUT (-2)
#define WAIT_SIGNALLED (-3)

typedef struct {
    PyObject_HEAD
    char *tasks;
    Py_ssize_t task_size, ntasks;
    Py_ssize_t t_state, t_wq_next, t_wq_on, t_sigpending, t_notify, t_nvcsw;
    Py_ssize_t t_preempt, t_irqs_off;  /* this process mirrors its context there */
    Py_ssize_t t_recent_cpu;
    char *comps;
    Py_ssize_t comp_size, ncomps;
    Py_ssize_t c_lock, c_done, c_head, c_tail, c_gen;
    sem_t **sems;
    Py_ssize_t *woken;  /* scratch list for complete_all(): one entry per task slot */
    int pid;
    int dead_owner;  /* pid of a lock holder found dead (wc_lock), reported on release */
    const char *dead_what;  /* what that lock protects */
    Py_ssize_t current;  /* this process's task slot, -1 while it is not a task */
    long long jiffy_ns, forever_ns;  /* 0 until set_timebase() */
    PyObject *dead_owner_hook;  /* hook(what, pid): a lock taken over from a dead holder */
    PyObject *dead_type, *dead_msg;  /* set_dead(): the kernel died; sleeps raise this */
} WaitCore;

#define T_FIELD(wc, slot, off, type) ((type *)((wc)->tasks + (slot) * (wc)->task_size + (off)))
#define C_FIELD(wc, idx, off, type) ((type *)((wc)->comps + (idx) * (wc)->comp_size + (off)))

static int
wc_check_slot(WaitCore *wc, Py_ssize_t slot)
{
    if (slot < 0 || slot >= wc->ntasks) {
        PyErr_Format(PyExc_ValueError, "slot %zd out of range 0..%zd", slot, wc->ntasks - 1);
        return -1;
    }
    return 0;
}

static int
wc_check_index(WaitCore *wc, Py_ssize_t idx)
{
    if (idx < 0 || idx >= wc->ncomps) {
        PyErr_Format(PyExc_ValueError, "completion index %zd out of range 0..%zd", idx,
                     wc->ncomps - 1);
        return -1;
    }
    return 0;
}

/* A freed completion's generation differs from its handle's (a use-after-free). */
static int
wc_stale(WaitCore *wc, Py_ssize_t idx, long gen)
{
    return __atomic_load_n(C_FIELD(wc, idx, wc->c_gen, int32_t), __ATOMIC_RELAXED) != gen;
}

static int
fc_nargs(Py_ssize_t nargs, Py_ssize_t want, const char *fname)
{
    if (nargs == want)
        return 0;
    PyErr_Format(PyExc_TypeError, "%s() takes exactly %zd arguments (%zd given)", fname, want,
                 nargs);
    return -1;
}

/* The (index, generation) arguments of a METH_FASTCALL method: 1 if the completion is
 * live, 0 if the handle is stale, -1 with an exception on a bad argument. */
static int
wc_completion_arg(WaitCore *wc, PyObject *const *args, Py_ssize_t *idx)
{
    long gen;

    *idx = PyLong_AsSsize_t(args[0]);
    if ((*idx == -1 && PyErr_Occurred()) || wc_check_index(wc, *idx) < 0)
        return -1;
    gen = PyLong_AsLong(args[1]);
    if (gen == -1 && PyErr_Occurred())
        return -1;
    return !wc_stale(wc, *idx, gen);
}

/* Hand a lock taken over from a dead owner (wc_lock) to the Python hook, lock released. */
static int
wc_report_dead_owner(WaitCore *wc)
{
    PyObject *r;
    int dead = wc->dead_owner;

    if (!dead || wc->dead_owner_hook == NULL)
        return 0;
    wc->dead_owner = 0;
    r = PyObject_CallFunction(wc->dead_owner_hook, "si", wc->dead_what, dead);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

/* raw_spin_lock: spin, then sleep on the futex; take the lock over from a dead owner
 * (remembered with `what` the lock protects, for wc_report_dead_owner()). */
static void
wc_lock(WaitCore *wc, int32_t *lockw, const char *what)
{
    int32_t *waiters = lockw + 1, cur;
    struct timespec ts;
    long r;
    int i;

    for (i = 0; i < WC_SPINS; i++) {
        if (__atomic_load_n(lockw, __ATOMIC_RELAXED) == 0 && lock_try(lockw, wc->pid))
            return;
        cpu_relax();
    }
    for (;;) {
        cur = __atomic_load_n(lockw, __ATOMIC_SEQ_CST);
        if (cur == 0) {
            if (lock_try(lockw, wc->pid))
                return;
            continue;
        }
        ns_to_timespec(LOCK_SLEEP_NS, &ts);
        __atomic_add_fetch(waiters, 1, __ATOMIC_SEQ_CST);
        r = sys_futex_wait((uint32_t *)lockw, (uint32_t)cur, &ts);
        __atomic_sub_fetch(waiters, 1, __ATOMIC_SEQ_CST);
        if (r == -1 && errno == ETIMEDOUT && pid_dead(cur)) {
            int32_t expected = cur;

            if (__atomic_compare_exchange_n(lockw, &expected, (int32_t)wc->pid, 0,
                                            __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
                wc->dead_owner = cur;
                wc->dead_what = what;
                return;
            }
        }
    }
}

static void
wc_unlock(int32_t *lockw)
{
    __atomic_store_n(lockw, 0, __ATOMIC_SEQ_CST);
    wake_one_if_waiters(lockw);
}

/*
 * The state half of wake_up_state(): 1 if the task's state had a bit of `mask` and
 * was moved to TASK_RUNNING; its semaphore must then be posted (wc_post). Wakers that
 * hold a completion lock post only after releasing it (the kernel's wake_q): otherwise,
 * on one CPU, the woken task preempts the waker and blocks on the lock it still holds.
 * The sleeper re-checks its state before blocking, so a late post is never lost, and a
 * post that finds it awake is absorbed by its next sleep.
 */
static int
wc_set_running(WaitCore *wc, Py_ssize_t slot, int32_t mask)
{
    int32_t *state = T_FIELD(wc, slot, wc->t_state, int32_t);
    int32_t s = __atomic_load_n(state, __ATOMIC_SEQ_CST);

    for (;;) {
        if (!(s & mask))
            return 0;
        if (__atomic_compare_exchange_n(state, &s, TASK_RUNNING, 0, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST))
            return 1;
    }
}

static void
wc_post(WaitCore *wc, Py_ssize_t slot)
{
    sem_post(wc->sems[slot]);
}

/*
 * Post the semaphores of tasks already made TASK_RUNNING (in FIFO order, under the
 * lock): first those that sleep on other CPUs, then those on this one. A woken task
 * on this CPU may preempt the waker at once, before it has posted the rest; the
 * kernel wakes them all with preemption off. Posting the remote ones first lets them
 * run while this CPU is taken.
 */
static void
wc_post_woken(WaitCore *wc, const Py_ssize_t *woken, Py_ssize_t n)
{
    int me = sched_getcpu(), here;
    Py_ssize_t i;

    for (here = 0; here < 2; here++)
        for (i = 0; i < n; i++)
            if ((__atomic_load_n(T_FIELD(wc, woken[i], wc->t_recent_cpu, int32_t),
                                 __ATOMIC_RELAXED) == me) == here)
                wc_post(wc, woken[i]);
}

/* wake_up_state(): 1 if the task was moved to TASK_RUNNING and its semaphore posted. */
static int
wc_wake_slot(WaitCore *wc, Py_ssize_t slot, int32_t mask)
{
    if (!wc_set_running(wc, slot, mask))
        return 0;
    wc_post(wc, slot);
    return 1;
}

/*
 * After taking a post: let the kernel deliver the signals already sent to this process,
 * so that CPython's handler flag is set before PyErr_CheckSignals() looks. A doorbell
 * is a signal, then a post (or a post already there). sem_wait() can take that post in
 * user space before the signal arrives (on the sender's IPI, at any instruction); if it
 * arrives after PyErr_CheckSignals() and before the next sem_wait() blocks, it only
 * sets the flag, and the task sleeps on with its CPU's interrupt pending. The exit of
 * any system call delivers a signal sent before the post was made.
 */
static void
wc_take_signals(void)
{
    sigset_t pending;

    (void)sigpending(&pending);
}

/*
 * Block until the task's state is TASK_RUNNING or CLOCK_MONOTONIC passes deadline_ns
 * (< 0: no deadline). Returns 1 if woken, 0 on time-out (the task then put itself back
 * to TASK_RUNNING), -1 with a Python exception if a signal handler raised. The GIL is
 * released while blocked; Python signal handlers (emu's interrupt delivery) run
 * whenever the wait returns.
 */
static int
wc_sleep(WaitCore *wc, Py_ssize_t slot, long long deadline_ns)
{
    int32_t *state = T_FIELD(wc, slot, wc->t_state, int32_t);
    sem_t *sem = wc->sems[slot];
    struct timespec ts;
    int taken;

    __atomic_add_fetch(T_FIELD(wc, slot, wc->t_nvcsw, int64_t), 1, __ATOMIC_RELAXED);
    __atomic_store_n(T_FIELD(wc, slot, wc->t_recent_cpu, int32_t), sched_getcpu(),
                     __ATOMIC_RELAXED);
    for (;;) {
        int32_t s = __atomic_load_n(state, __ATOMIC_SEQ_CST);

        if (s == TASK_RUNNING)
            return 1;
        if (deadline_ns >= 0 && monotonic_ns() >= deadline_ns) {
            if (__atomic_compare_exchange_n(state, &s, TASK_RUNNING, 0, __ATOMIC_SEQ_CST,
                                            __ATOMIC_SEQ_CST))
                return 0;
            continue;
        }
        /* A dead kernel never wakes anyone: raise instead of blocking (set_dead()). */
        if (wc->dead_type != NULL) {
            __atomic_store_n(state, TASK_RUNNING, __ATOMIC_SEQ_CST);
            PyErr_SetObject(wc->dead_type, wc->dead_msg);
            return -1;
        }
        /* Woken, timed out or interrupted: the loop re-checks the state either way. */
        Py_BEGIN_ALLOW_THREADS
        if (deadline_ns < 0) {
            taken = sem_wait(sem) == 0;
        }
        else {
            ns_to_timespec(deadline_ns, &ts);
            taken = sem_clockwait(sem, CLOCK_MONOTONIC, &ts) == 0;
        }
        Py_END_ALLOW_THREADS
        if (taken)
            wc_take_signals();
        /* Run Python signal handlers (interrupt delivery) after any return: a doorbell
         * that arrived just before sem_wait only set CPython's flag, and the interrupt
         * controller posts the semaphore too so that it is seen here. */
        if (PyErr_CheckSignals() < 0) {
            __atomic_store_n(state, TASK_RUNNING, __ATOMIC_SEQ_CST);
            return -1;
        }
    }
}

static int
wc_signal_pending_state(WaitCore *wc, Py_ssize_t slot, int32_t state)
{
    int64_t pending;

    if (!(state & (TASK_INTERRUPTIBLE | TASK_WAKEKILL)))
        return 0;
    pending = __atomic_load_n(T_FIELD(wc, slot, wc->t_sigpending, int64_t), __ATOMIC_SEQ_CST);
    if (!pending && !__atomic_load_n(T_FIELD(wc, slot, wc->t_notify, int32_t), __ATOMIC_SEQ_CST))
        return 0;
    return (state & TASK_INTERRUPTIBLE) || (pending & SIGKILL_BIT);
}

/* --- the FIFO queue of a completion (caller holds its lock) --- */

static void
wc_enqueue_tail(WaitCore *wc, Py_ssize_t idx, Py_ssize_t slot)
{
    int32_t *head = C_FIELD(wc, idx, wc->c_head, int32_t);
    int32_t *tail = C_FIELD(wc, idx, wc->c_tail, int32_t);

    *T_FIELD(wc, slot, wc->t_wq_next, int32_t) = -1;
    *T_FIELD(wc, slot, wc->t_wq_on, int32_t) = (int32_t)idx + 1;
    if (*tail == -1)
        *head = (int32_t)slot;
    else
        *T_FIELD(wc, *tail, wc->t_wq_next, int32_t) = (int32_t)slot;
    *tail = (int32_t)slot;
}

static Py_ssize_t
wc_dequeue_head(WaitCore *wc, Py_ssize_t idx)
{
    int32_t *head = C_FIELD(wc, idx, wc->c_head, int32_t);
    Py_ssize_t slot = *head;

    if (slot == -1)
        return -1;
    *head = *T_FIELD(wc, slot, wc->t_wq_next, int32_t);
    if (*head == -1)
        *C_FIELD(wc, idx, wc->c_tail, int32_t) = -1;
    *T_FIELD(wc, slot, wc->t_wq_next, int32_t) = -1;
    *T_FIELD(wc, slot, wc->t_wq_on, int32_t) = 0;
    return slot;
}

static int
wc_remove(WaitCore *wc, Py_ssize_t idx, Py_ssize_t slot)
{
    int32_t *head = C_FIELD(wc, idx, wc->c_head, int32_t);
    int32_t *tail = C_FIELD(wc, idx, wc->c_tail, int32_t);
    int32_t prev = -1, cur = *head, next;
    Py_ssize_t guard = 0;

    while (cur != -1 && cur != slot && guard++ < wc->ntasks) {
        prev = cur;
        cur = *T_FIELD(wc, cur, wc->t_wq_next, int32_t);
    }
    if (cur != slot)
        return 0;
    next = *T_FIELD(wc, slot, wc->t_wq_next, int32_t);
    if (prev == -1)
        *head = next;
    else
        *T_FIELD(wc, prev, wc->t_wq_next, int32_t) = next;
    if (*tail == slot)
        *tail = prev;
    *T_FIELD(wc, slot, wc->t_wq_next, int32_t) = -1;
    *T_FIELD(wc, slot, wc->t_wq_on, int32_t) = 0;
    return 1;
}

/* --- methods --- */

static PyObject *
WaitCore_wake(WaitCore *wc, PyObject *args)
{
    Py_ssize_t slot;
    int mask;

    if (!PyArg_ParseTuple(args, "ni:wake", &slot, &mask) || wc_check_slot(wc, slot) < 0)
        return NULL;
    return PyLong_FromLong(wc_wake_slot(wc, slot, mask));
}

static PyObject *
WaitCore_sleep(WaitCore *wc, PyObject *args)
{
    Py_ssize_t slot;
    long long deadline_ns;
    int r;

    if (!PyArg_ParseTuple(args, "nL:sleep", &slot, &deadline_ns) || wc_check_slot(wc, slot) < 0)
        return NULL;
    r = wc_sleep(wc, slot, deadline_ns);
    if (r < 0)
        return NULL;
    return PyBool_FromLong(r);
}

static PyObject *
WaitCore_complete(WaitCore *wc, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t idx, slot, n = 0;
    Py_ssize_t *woken;
    int all, live, result = 0;
    int32_t *lockw;
    uint32_t *done;

    if (fc_nargs(nargs, 3, "complete") < 0 || (live = wc_completion_arg(wc, args, &idx)) < 0 ||
        (all = PyObject_IsTrue(args[2])) < 0)
        return NULL;
    if (!live)
        Py_RETURN_NONE;
    lockw = C_FIELD(wc, idx, wc->c_lock, int32_t);
    done = C_FIELD(wc, idx, wc->c_done, uint32_t);
    woken = wc->woken;
    wc_lock(wc, lockw, "completion");
    if (all) {
        result = *done == UINT32_MAX;
        *done = UINT32_MAX;
        while ((slot = wc_dequeue_head(wc, idx)) != -1)
            if (wc_set_running(wc, slot, TASK_NORMAL))
                woken[n++] = slot;
    }
    else {
        if (*done != UINT32_MAX)
            (*done)++;
        slot = wc_dequeue_head(wc, idx);
        if (slot != -1 && wc_set_running(wc, slot, TASK_NORMAL))
            woken[n++] = slot;
        result = (int)n;
    }
    wc_unlock(lockw);
    wc_post_woken(wc, woken, n);
    if (wc_report_dead_owner(wc) < 0)
        return NULL;
    return PyLong_FromLong(result);
}

/*
 * __wait_for_common() on the queue: *result is WAIT_DONE_AT_ENTRY, the ns left (>= 0)
 * when completed after sleeping, WAIT_TIMEDOUT or WAIT_SIGNALLED. timeout_ns < 0: no
 * timeout. Returns -1 with a Python exception if a signal handler raised.
 */
static int
wc_wait(WaitCore *wc, Py_ssize_t idx, Py_ssize_t slot, long long timeout_ns, int state,
        long long *result)
{
    long long deadline = -1;
    int r = 1, qid = (int)idx + 1;
    int32_t *lockw = C_FIELD(wc, idx, wc->c_lock, int32_t);
    int32_t *st = T_FIELD(wc, slot, wc->t_state, int32_t);
    int32_t *wq_on = T_FIELD(wc, slot, wc->t_wq_on, int32_t);
    uint32_t *done = C_FIELD(wc, idx, wc->c_done, uint32_t);

    *result = WAIT_DONE_AT_ENTRY;
    if (timeout_ns >= 0)
        deadline = monotonic_ns() + timeout_ns;
    wc_lock(wc, lockw, "completion");
    if (!*done) {
        for (;;) {
            if (wc_signal_pending_state(wc, slot, state)) {
                *result = WAIT_SIGNALLED;
                break;
            }
            if (*wq_on != qid)
                wc_enqueue_tail(wc, idx, slot);
            __atomic_store_n(st, state, __ATOMIC_SEQ_CST);
            wc_unlock(lockw);
            r = wc_sleep(wc, slot, deadline);
            wc_lock(wc, lockw, "completion");
            if (r < 0 || *done)
                break;
            if (r == 0) {
                *result = WAIT_TIMEDOUT;
                break;
            }
        }
        if (*wq_on == qid)
            wc_remove(wc, idx, slot);
        __atomic_store_n(st, TASK_RUNNING, __ATOMIC_SEQ_CST);
        if (r < 0 || !*done) {
            wc_unlock(lockw);
            return r < 0 ? -1 : 0;
        }
        *result = deadline < 0 ? 0 : deadline - monotonic_ns();
        if (*result < 0)
            *result = 0;
    }
    if (*done != UINT32_MAX)
        (*done)--;
    wc_unlock(lockw);
    return 0;
}

/*
 * __wait_for_common() as the API returns it: the jiffies left (at least 1) when
 * completed, `timeout` itself when done at entry, 0 on time-out, -ERESTARTSYS when a
 * signal ended the wait. `timeout` is in jiffies, 0..LONG_MAX; one that reaches forever_ns
 * (set_timebase()) sets no timer: it would outlive the machine.
 */
static PyObject *
wc_wait_jiffies(WaitCore *wc, Py_ssize_t idx, Py_ssize_t slot, long long timeout, int state)
{
    long long timeout_ns = -1, left;

    if (timeout < (wc->forever_ns + wc->jiffy_ns - 1) / wc->jiffy_ns)
        timeout_ns = timeout * wc->jiffy_ns;
    if (wc_wait(wc, idx, slot, timeout_ns, state, &left) < 0 || wc_report_dead_owner(wc) < 0)
        return NULL;
    if (left == WAIT_DONE_AT_ENTRY)
        return PyLong_FromLongLong(timeout ? timeout : 1);
    if (left == WAIT_TIMEDOUT)
        return PyLong_FromLong(0);
    if (left == WAIT_SIGNALLED)
        return PyLong_FromLong(-ERESTARTSYS);
    if (timeout_ns < 0)
        return PyLong_FromLongLong(timeout);
    left = (left + wc->jiffy_ns - 1) / wc->jiffy_ns;
    return PyLong_FromLongLong(left > 1 ? left : 1);
}

/* wait(index, slot, timeout, state): wc_wait_jiffies() for the Python slow path, which
 * has checked the handle, the context and the timeout. */
static PyObject *
WaitCore_wait(WaitCore *wc, PyObject *args)
{
    Py_ssize_t idx, slot;
    long long timeout;
    int state;

    if (!PyArg_ParseTuple(args, "nnLi:wait", &idx, &slot, &timeout, &state) ||
        wc_check_index(wc, idx) < 0 || wc_check_slot(wc, slot) < 0)
        return NULL;
    if (timeout < 0) {
        PyErr_Format(PyExc_ValueError, "timeout %lld is negative", timeout);
        return NULL;
    }
    if (wc->jiffy_ns <= 0) {
        PyErr_SetString(PyExc_RuntimeError, "WaitCore has no timebase: set_timebase() first");
        return NULL;
    }
    return wc_wait_jiffies(wc, idx, slot, timeout, state);
}

/*
 * wait_for(index, generation, timeout, state): every wait_for_completion*() variant's
 * common case, start to end, as the current task, with wc_wait_jiffies()'s result.
 * Returns None, having changed nothing, when the caller must take the Python slow path,
 * which checks and reports: a stale handle, a process that is not a task, atomic or
 * IRQs-off context, a timeout that is not an int in 0..LONG_MAX, a state without a
 * sleeping bit, no timebase yet.
 */
static PyObject *
WaitCore_wait_for(WaitCore *wc, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t idx, slot = wc->current;
    long long timeout;
    long state;
    int live, overflow = 0;

    if (fc_nargs(nargs, 4, "wait_for") < 0 || (live = wc_completion_arg(wc, args, &idx)) < 0)
        return NULL;
    state = PyLong_AsLong(args[3]);
    if (state == -1 && PyErr_Occurred())
        return NULL;
    if (!live || slot < 0 || wc->jiffy_ns <= 0 || !(state & TASK_NORMAL) ||
        !PyLong_CheckExact(args[2]))
        Py_RETURN_NONE;
    if (*T_FIELD(wc, slot, wc->t_preempt, int32_t) || *T_FIELD(wc, slot, wc->t_irqs_off, int32_t))
        Py_RETURN_NONE;
    timeout = PyLong_AsLongLongAndOverflow(args[2], &overflow);
    if (overflow || timeout < 0)
        Py_RETURN_NONE;
    return wc_wait_jiffies(wc, idx, slot, timeout, (int)state);
}

static PyObject *
WaitCore_try_wait(WaitCore *wc, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t idx;
    int32_t *lockw;
    uint32_t *done;
    int ok = 0, live;

    if (fc_nargs(nargs, 2, "try_wait") < 0 || (live = wc_completion_arg(wc, args, &idx)) < 0)
        return NULL;
    if (!live)
        Py_RETURN_NONE;
    lockw = C_FIELD(wc, idx, wc->c_lock, int32_t);
    done = C_FIELD(wc, idx, wc->c_done, uint32_t);
    if (!__atomic_load_n(done, __ATOMIC_SEQ_CST))
        Py_RETURN_FALSE;
    wc_lock(wc, lockw, "completion");
    if (*done) {
        ok = 1;
        if (*done != UINT32_MAX)
            (*done)--;
    }
    wc_unlock(lockw);
    if (wc_report_dead_owner(wc) < 0)
        return NULL;
    return PyBool_FromLong(ok);
}

static PyObject *
WaitCore_reset(WaitCore *wc, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t idx;
    int drop_queue, queued = 0, live;
    int32_t *lockw;

    if (fc_nargs(nargs, 3, "reset") < 0 || (live = wc_completion_arg(wc, args, &idx)) < 0 ||
        (drop_queue = PyObject_IsTrue(args[2])) < 0)
        return NULL;
    if (!live)
        Py_RETURN_NONE;
    lockw = C_FIELD(wc, idx, wc->c_lock, int32_t);
    wc_lock(wc, lockw, "completion");
    *C_FIELD(wc, idx, wc->c_done, uint32_t) = 0;
    if (drop_queue) {
        while (wc_dequeue_head(wc, idx) != -1)
            queued++;
    }
    else {
        queued = *C_FIELD(wc, idx, wc->c_head, int32_t) != -1;
    }
    wc_unlock(lockw);
    if (wc_report_dead_owner(wc) < 0)
        return NULL;
    return PyLong_FromLong(queued);
}

static PyObject *
WaitCore_remove_waiter(WaitCore *wc, PyObject *args)
{
    Py_ssize_t idx, slot;
    int32_t *lockw;
    int removed;

    if (!PyArg_ParseTuple(args, "nn:remove_waiter", &idx, &slot) ||
        wc_check_index(wc, idx) < 0 || wc_check_slot(wc, slot) < 0)
        return NULL;
    lockw = C_FIELD(wc, idx, wc->c_lock, int32_t);
    wc_lock(wc, lockw, "completion");
    removed = wc_remove(wc, idx, slot);
    wc_unlock(lockw);
    if (wc_report_dead_owner(wc) < 0)
        return NULL;
    return PyBool_FromLong(removed);
}

static PyObject *
WaitCore_after_fork(WaitCore *wc, PyObject *args)
{
    if (!PyArg_ParseTuple(args, "i:after_fork", &wc->pid))
        return NULL;
    wc->current = -1;
    Py_RETURN_NONE;
}

static PyObject *
WaitCore_set_current(WaitCore *wc, PyObject *args)
{
    Py_ssize_t slot;

    if (!PyArg_ParseTuple(args, "n:set_current", &slot))
        return NULL;
    if (slot != -1 && wc_check_slot(wc, slot) < 0)
        return NULL;
    wc->current = slot;
    Py_RETURN_NONE;
}

static PyObject *
WaitCore_set_timebase(WaitCore *wc, PyObject *args)
{
    long long jiffy_ns, forever_ns;

    if (!PyArg_ParseTuple(args, "LL:set_timebase", &jiffy_ns, &forever_ns))
        return NULL;
    if (jiffy_ns <= 0 || forever_ns < jiffy_ns) {
        PyErr_SetString(PyExc_ValueError, "need 0 < jiffy_ns <= forever_ns");
        return NULL;
    }
    wc->jiffy_ns = jiffy_ns;
    wc->forever_ns = forever_ns;
    Py_RETURN_NONE;
}

static PyObject *
WaitCore_set_dead_owner_hook(WaitCore *wc, PyObject *hook)
{
    if (!PyCallable_Check(hook)) {
        PyErr_SetString(PyExc_TypeError, "hook must be callable");
        return NULL;
    }
    Py_INCREF(hook);
    Py_XSETREF(wc->dead_owner_hook, hook);
    Py_RETURN_NONE;
}

static PyObject *
WaitCore_set_dead(WaitCore *wc, PyObject *args)
{
    PyObject *type, *msg;

    if (!PyArg_ParseTuple(args, "OU:set_dead", &type, &msg))
        return NULL;
    if (!PyExceptionClass_Check(type)) {
        PyErr_SetString(PyExc_TypeError, "exc_type must be an exception class");
        return NULL;
    }
    Py_INCREF(type);
    Py_INCREF(msg);
    Py_XSETREF(wc->dead_type, type);
    Py_XSETREF(wc->dead_msg, msg);
    Py_RETURN_NONE;
}

static PyObject *
WaitCore_raise_if_dead(WaitCore *wc, PyObject *Py_UNUSED(ignored))
{
    if (wc->dead_type != NULL) {
        PyErr_SetObject(wc->dead_type, wc->dead_msg);
        return NULL;
    }
    Py_RETURN_NONE;
}

static int
WaitCore_init(WaitCore *wc, PyObject *args, PyObject *kwds)
{
    Py_ssize_t tasks, comps;

    if (wc->sems != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "WaitCore is already initialised");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "nnn(nnnnnnnnn)nnn(nnnnn)i:WaitCore", &tasks, &wc->task_size,
                          &wc->ntasks, &wc->t_state, &wc->t_wq_next, &wc->t_wq_on,
                          &wc->t_sigpending, &wc->t_notify, &wc->t_nvcsw, &wc->t_preempt,
                          &wc->t_irqs_off, &wc->t_recent_cpu, &comps, &wc->comp_size, &wc->ncomps, &wc->c_lock,
                          &wc->c_done, &wc->c_head, &wc->c_tail, &wc->c_gen, &wc->pid))
        return -1;
    wc->current = -1;
    if (!check_addr(tasks, 8, "tasks") || !check_addr(comps, 8, "completions"))
        return -1;
    wc->tasks = (char *)tasks;
    wc->comps = (char *)comps;
    wc->sems = PyMem_Calloc((size_t)wc->ntasks, sizeof(sem_t *));
    wc->woken = PyMem_Calloc((size_t)wc->ntasks, sizeof(Py_ssize_t));
    if (wc->sems == NULL || wc->woken == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/*
 * attach_sem(slot, name): use the named semaphore (already created by posix_ipc in this
 * process; glibc's sem_open returns that same mapping) as task `slot`'s sleep primitive.
 * The caller unlinks the name afterwards; the mapping is inherited over fork.
 */
static PyObject *
WaitCore_attach_sem(WaitCore *wc, PyObject *args)
{
    Py_ssize_t slot;
    const char *name;
    sem_t *sem;

    if (!PyArg_ParseTuple(args, "ns:attach_sem", &slot, &name) || wc_check_slot(wc, slot) < 0)
        return NULL;
    if (wc->sems[slot] != NULL) {
        PyErr_Format(PyExc_ValueError, "slot %zd already has a semaphore", slot);
        return NULL;
    }
    sem = sem_open(name, 0);
    if (sem == SEM_FAILED)
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, name);
    wc->sems[slot] = sem;
    Py_RETURN_NONE;
}

static void
WaitCore_dealloc(WaitCore *wc)
{
    PyTypeObject *tp = Py_TYPE(wc);
    Py_ssize_t i;

    if (wc->sems) {
        for (i = 0; i < wc->ntasks; i++)
            if (wc->sems[i])
                sem_close(wc->sems[i]);
        PyMem_Free(wc->sems);
    }
    PyMem_Free(wc->woken);
    Py_CLEAR(wc->dead_owner_hook);
    Py_CLEAR(wc->dead_type);
    Py_CLEAR(wc->dead_msg);
    tp->tp_free((PyObject *)wc);
    Py_DECREF(tp);
}

static PyMethodDef WaitCore_methods[] = {
    {"wake", (PyCFunction)WaitCore_wake, METH_VARARGS,
     "wake(slot, mask) -> 1 if the task's state had a bit of mask and it was woken, else 0"},
    {"sleep", (PyCFunction)WaitCore_sleep, METH_VARARGS,
     "sleep(slot, deadline_ns) -> True if woken, False on time-out (deadline_ns < 0: none)"},
    {"complete", (PyCFunction)(void (*)(void))WaitCore_complete, METH_FASTCALL,
     "complete(index, generation, all) -> complete(): 1 if a waiter was woken; "
     "complete_all(): 1 if done was already UINT_MAX; None if the handle is stale"},
    {"wait", (PyCFunction)WaitCore_wait, METH_VARARGS,
     "wait(index, slot, timeout_jiffies, state) -> the wait_for_completion*() result, "
     "without wait_for()'s checks (the slow path made them)"},
    {"wait_for", (PyCFunction)(void (*)(void))WaitCore_wait_for, METH_FASTCALL,
     "wait_for(index, generation, timeout_jiffies, state) -> the wait_for_completion*() "
     "result as the current task, or None: take the slow path"},
    {"try_wait", (PyCFunction)(void (*)(void))WaitCore_try_wait, METH_FASTCALL,
     "try_wait(index, generation) -> True if one completion was consumed; None if stale"},
    {"reset", (PyCFunction)(void (*)(void))WaitCore_reset, METH_FASTCALL,
     "reset(index, generation, drop_queue) -> done = 0; waiters dropped (drop_queue) or 1 "
     "if any queued; None if the handle is stale"},
    {"remove_waiter", (PyCFunction)WaitCore_remove_waiter, METH_VARARGS,
     "remove_waiter(index, slot) -> True if the task was unlinked from the queue"},
    {"attach_sem", (PyCFunction)WaitCore_attach_sem, METH_VARARGS,
     "attach_sem(slot, name): open the named POSIX semaphore as task slot's sleep primitive"},
    {"after_fork", (PyCFunction)WaitCore_after_fork, METH_VARARGS,
     "after_fork(pid): in a forked child: the lock owner id, and no current task yet"},
    {"set_current", (PyCFunction)WaitCore_set_current, METH_VARARGS,
     "set_current(slot): this process's task slot (-1: not a task)"},
    {"set_timebase", (PyCFunction)WaitCore_set_timebase, METH_VARARGS,
     "set_timebase(jiffy_ns, forever_ns): jiffy length; timeouts this long or longer never fire"},
    {"set_dead_owner_hook", (PyCFunction)WaitCore_set_dead_owner_hook, METH_O,
     "set_dead_owner_hook(fn): fn(what, pid) reports a `what` lock taken over from dead task pid"},
    {"set_dead", (PyCFunction)WaitCore_set_dead, METH_VARARGS,
     "set_dead(exc_type, message): the kernel died; from now on every sleep that would "
     "block raises exc_type(message) instead"},
    {"raise_if_dead", (PyCFunction)WaitCore_raise_if_dead, METH_NOARGS,
     "raise_if_dead(): raise what set_dead() named, if it was called (for polling waits)"},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot WaitCore_slots[] = {
    {Py_tp_doc, "WaitCore(tasks, task_size, ntasks, (state, wq_next, wq_on, sigpending, "
                "notify, nvcsw, preempt_count, irqs_disabled, recent_cpu), completions, comp_size, ncomps, "
                "(lock, done, head, tail, generation), pid): sleep/wake and completion queues "
                "over the shared image"},
    {Py_tp_init, WaitCore_init},
    {Py_tp_dealloc, WaitCore_dealloc},
    {Py_tp_methods, WaitCore_methods},
    {Py_tp_new, PyType_GenericNew},
    {0, NULL},
};

static PyType_Spec WaitCore_spec = {
    .name = "_emu_native.WaitCore",
    .basicsize = sizeof(WaitCore),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = WaitCore_slots,
};

/* ------------------------------------------------------------------------- */
/* IrqCore: the interrupt controller and the edge flow handler's bookkeeping  */
/* ------------------------------------------------------------------------- */
/*
 * The hot path of interrupt delivery: the per-CPU pending bits, the IPI that makes
 * a CPU look at them (the doorbell: a real-time signal to the process running that
 * CPU, or to its idle task, plus a post of its semaphore so that a doorbell racing
 * with the start of a sleep is not lost), and the state changes of handle_edge_irq()
 * and note_interrupt() (kernel/irq/chip.c, spurious.c) under the descriptor's lock.
 * emu/irq.py owns the policy and runs the handlers, which are Python; nothing here
 * runs Python code while a lock is held. Like WaitCore, this code computes no
 * offset itself: emu/image.py passes the layout in.
 */

#define IRQS_INPROGRESS 0x1  /* a CPU is running the handlers */
#define IRQS_REPLAY 0x2  /* arrived while another CPU ran them: run once more */
#define IRQS_PENDING 0x4  /* arrived while disabled or masked: replay on enable/unmask */
#define IRQS_ONESHOT 0x8  /* masked until the threaded handler returns */
#define IRQS_SPURIOUS_DISABLED 0x10  /* "nobody cared" */
#define ACTION_LIVE 1  /* IrqAction.in_use: its handler runs */
#define IRQ_NONE 0
/* note_interrupt(): a line with more than SPURIOUS_LIMIT of SPURIOUS_WINDOW unhandled. */
#define SPURIOUS_WINDOW 100000
#define SPURIOUS_LIMIT 99900
/* end() result bits */
#define IRQ_END_REPLAY 0x1
#define IRQ_END_NOBODY_CARED 0x2
#define DOORBELL_TRIES 3
#define LOAD32(p) __atomic_load_n((p), __ATOMIC_SEQ_CST)

typedef struct {
    PyObject_HEAD
    WaitCore *wc;  /* the task table, the task semaphores, current, the lock owner id */
    char *descs;
    Py_ssize_t desc_size, nr_irqs;
    Py_ssize_t d_lock, d_depth, d_status, d_affinity, d_kstat, d_actions, d_count, d_unhandled;
    Py_ssize_t action_size, nr_actions, a_in_use, a_ref, a_ref_gen;
    char *percpu;
    Py_ssize_t percpu_size, ncpus, p_irq_pending, p_idle_slot;
    Py_ssize_t t_in_use, t_cpu, t_pid;
    int32_t *task_high;
    int signo;
    Py_ssize_t *last_target;  /* per CPU: the slot that took its last doorbell, or -1 */
} IrqCore;

#define D_FIELD(ic, irq, off, type) ((type *)((ic)->descs + (irq) * (ic)->desc_size + (off)))
#define A_FIELD(ic, irq, j, off, type)                                                      \
    ((type *)((ic)->descs + (irq) * (ic)->desc_size + (ic)->d_actions +                     \
              (j) * (ic)->action_size + (off)))
#define P_FIELD(ic, cpu, off, type) ((type *)((ic)->percpu + (cpu) * (ic)->percpu_size + (off)))

static int
ic_irq_arg(IrqCore *ic, PyObject *arg, Py_ssize_t *irq)
{
    if (PyLong_CheckExact(arg)) {
        *irq = PyLong_AsSsize_t(arg);
        if (*irq >= 0 && *irq < ic->nr_irqs)
            return 0;
        PyErr_Clear();
    }
    PyErr_Format(PyExc_ValueError, "irq must be an IRQ number from 0 to %zd, got %R",
                 ic->nr_irqs - 1, arg);
    return -1;
}

static int
ic_cpu_arg(IrqCore *ic, PyObject *arg, Py_ssize_t *cpu)
{
    *cpu = PyLong_AsSsize_t(arg);
    if (*cpu == -1 && PyErr_Occurred())
        return -1;
    if (*cpu < 0 || *cpu >= ic->ncpus) {
        PyErr_Format(PyExc_ValueError, "cpu %zd out of range 0..%zd", *cpu, ic->ncpus - 1);
        return -1;
    }
    return 0;
}

static int
ic_running_on(IrqCore *ic, Py_ssize_t slot, int32_t cpu)
{
    WaitCore *wc = ic->wc;

    return LOAD32(T_FIELD(wc, slot, ic->t_in_use, int32_t)) &&
           LOAD32(T_FIELD(wc, slot, ic->t_cpu, int32_t)) == cpu &&
           LOAD32(T_FIELD(wc, slot, wc->t_state, int32_t)) == TASK_RUNNING &&
           LOAD32(T_FIELD(wc, slot, ic->t_pid, int32_t)) > 0;
}

/*
 * The slot of a task running on `cpu`, else of the CPU's idle task; -1 if neither. The
 * idle task runs only when no other task does: while it starts up (state R) it is not
 * taken for a running task.
 */
static Py_ssize_t
ic_target(IrqCore *ic, int32_t cpu)
{
    Py_ssize_t slot = ic->last_target[cpu], high = LOAD32(ic->task_high);
    Py_ssize_t idle = LOAD32(P_FIELD(ic, cpu, ic->p_idle_slot, int32_t));

    if (slot >= 0 && slot != idle && ic_running_on(ic, slot, cpu))
        return slot;
    if (high > ic->wc->ntasks)
        high = ic->wc->ntasks;
    for (slot = 0; slot < high; slot++) {
        if (slot != idle && ic_running_on(ic, slot, cpu)) {
            ic->last_target[cpu] = slot;
            return slot;
        }
    }
    return idle < ic->wc->ntasks ? idle : -1;
}

/*
 * Ring `cpu`'s doorbell: signal the task running there, or else the CPU's idle task,
 * even if that is the caller. Returns 0; with neither yet, the interrupts and softirqs
 * stay pending. -1 with an OSError if the signal cannot be sent.
 */
static int
ic_ring(IrqCore *ic, int32_t cpu)
{
    WaitCore *wc = ic->wc;
    Py_ssize_t slot;
    int i, value;
    pid_t pid;

    for (i = 0; i < DOORBELL_TRIES; i++) {
        slot = ic_target(ic, cpu);
        if (slot < 0 || (pid = LOAD32(T_FIELD(wc, slot, ic->t_pid, int32_t))) <= 0)
            return 0;
        if (kill(pid, ic->signo) < 0) {
            if (errno == ESRCH)
                continue;  /* it exited meanwhile: look again */
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        /* No state change: a sleeping target re-checks and sleeps again. At most one
         * stale post stays on a running target. */
        if (wc->sems[slot] != NULL && sem_getvalue(wc->sems[slot], &value) == 0 && !value)
            sem_post(wc->sems[slot]);
        return 0;
    }
    return 0;
}

/*
 * Make `cpu` look at its pending interrupts and softirqs. Returns 1 if it is the
 * current task's own CPU (the caller takes them now, as a CPU interrupting itself),
 * else ic_ring()'s result.
 */
static int
ic_kick(IrqCore *ic, int32_t cpu)
{
    WaitCore *wc = ic->wc;

    if (wc->current >= 0 && LOAD32(T_FIELD(wc, wc->current, ic->t_cpu, int32_t)) == cpu)
        return 1;
    return ic_ring(ic, cpu);
}

static PyObject *
ic_kick_result(int r)
{
    return r < 0 ? NULL : PyBool_FromLong(r);
}

/* raise_irq(irq): irq_inject_interrupt() on the line's target CPU; see ic_kick(). */
static PyObject *
IrqCore_raise_irq(IrqCore *ic, PyObject *arg)
{
    Py_ssize_t irq;
    int32_t cpu;

    if (ic_irq_arg(ic, arg, &irq) < 0)
        return NULL;
    cpu = LOAD32(D_FIELD(ic, irq, ic->d_affinity, int32_t));
    if (cpu < 0 || cpu >= ic->ncpus) {
        PyErr_Format(PyExc_RuntimeError, "irq %zd has a bad affinity %d", irq, cpu);
        return NULL;
    }
    __atomic_fetch_or(P_FIELD(ic, cpu, ic->p_irq_pending, uint64_t), 1ULL << irq,
                      __ATOMIC_SEQ_CST);
    return ic_kick_result(ic_kick(ic, cpu));
}

/* kick(cpu): ring the CPU's doorbell; True if it is the caller's own CPU. */
static PyObject *
IrqCore_kick(IrqCore *ic, PyObject *arg)
{
    Py_ssize_t cpu;

    if (ic_cpu_arg(ic, arg, &cpu) < 0)
        return NULL;
    return ic_kick_result(ic_kick(ic, (int32_t)cpu));
}

/* ring(cpu): ring the CPU's doorbell, even if the caller is the task it reaches. */
static PyObject *
IrqCore_ring(IrqCore *ic, PyObject *arg)
{
    Py_ssize_t cpu;

    if (ic_cpu_arg(ic, arg, &cpu) < 0 || ic_ring(ic, (int32_t)cpu) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* take_pending(cpu): the CPU's pending IRQ bits, cleared. */
static PyObject *
IrqCore_take_pending(IrqCore *ic, PyObject *arg)
{
    Py_ssize_t cpu;

    if (ic_cpu_arg(ic, arg, &cpu) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(
        __atomic_exchange_n(P_FIELD(ic, cpu, ic->p_irq_pending, uint64_t), 0, __ATOMIC_SEQ_CST));
}

/* The live actions of a line (descriptor locked): n entries of (index, ref, ref_gen). */
static Py_ssize_t
ic_live_actions(IrqCore *ic, Py_ssize_t irq, int32_t (*live)[3])
{
    Py_ssize_t j, n = 0;

    for (j = 0; j < ic->nr_actions; j++) {
        if (LOAD32(A_FIELD(ic, irq, j, ic->a_in_use, int32_t)) != ACTION_LIVE)
            continue;
        live[n][0] = (int32_t)j;
        live[n][1] = *A_FIELD(ic, irq, j, ic->a_ref, int32_t);
        live[n][2] = *A_FIELD(ic, irq, j, ic->a_ref_gen, int32_t);
        n++;
    }
    return n;
}

static void
ic_clear_inprogress(IrqCore *ic, Py_ssize_t irq)
{
    int32_t *lockw = D_FIELD(ic, irq, ic->d_lock, int32_t);

    wc_lock(ic->wc, lockw, "irq descriptor");
    __atomic_fetch_and(D_FIELD(ic, irq, ic->d_status, int32_t), ~IRQS_INPROGRESS,
                       __ATOMIC_SEQ_CST);
    wc_unlock(lockw);
}

/*
 * The live actions of a line in progress, as ((index, ref, ref_gen), ...), built once
 * the lock is dropped (allocation may run Python code: the garbage collector's
 * finalizers). If that fails, the line is no longer in progress: nobody will run it.
 */
static PyObject *
ic_live_tuple(IrqCore *ic, Py_ssize_t irq, int32_t (*live)[3], Py_ssize_t n)
{
    PyObject *t = PyTuple_New(n), *item;
    Py_ssize_t i;

    for (i = 0; t != NULL && i < n; i++) {
        item = Py_BuildValue("(iii)", live[i][0], live[i][1], live[i][2]);
        if (item == NULL)
            Py_CLEAR(t);
        else
            PyTuple_SET_ITEM(t, i, item);
    }
    if (t != NULL && wc_report_dead_owner(ic->wc) < 0)
        Py_CLEAR(t);
    if (t == NULL)
        ic_clear_inprogress(ic, irq);
    return t;
}

#define IC_MAX_ACTIONS 16

static int
ic_args2(IrqCore *ic, PyObject *const *args, Py_ssize_t nargs, const char *fname,
         Py_ssize_t *irq, long *second)
{
    if (fc_nargs(nargs, 2, fname) < 0 || ic_irq_arg(ic, args[0], irq) < 0)
        return -1;
    *second = PyLong_AsLong(args[1]);
    return (*second == -1 && PyErr_Occurred()) ? -1 : 0;
}

/*
 * claim(irq, cpu): handle_edge_irq()'s entry on `cpu`. A line that is disabled,
 * masked until its thread ran (oneshot), shut off as spurious or without a live
 * action is marked IRQS_PENDING (replayed when that ends); a line whose handlers run
 * on another CPU is marked IRQS_REPLAY: None either way. Otherwise the line is in
 * progress from now on, counted for `cpu` in /proc/interrupts, and its live actions
 * are returned as ((index, ref, ref_generation), ...) for the caller to run; it must
 * then call end(), or abort() if it cannot.
 */
static PyObject *
IrqCore_claim(IrqCore *ic, PyObject *const *args, Py_ssize_t nargs)
{
    int32_t live[IC_MAX_ACTIONS][3];
    int32_t *lockw, *status;
    Py_ssize_t irq, n = 0;
    long cpu;
    int run = 0;

    if (ic_args2(ic, args, nargs, "claim", &irq, &cpu) < 0)
        return NULL;
    if (cpu < 0 || cpu >= ic->ncpus) {
        PyErr_Format(PyExc_ValueError, "cpu %ld out of range 0..%zd", cpu, ic->ncpus - 1);
        return NULL;
    }
    lockw = D_FIELD(ic, irq, ic->d_lock, int32_t);
    status = D_FIELD(ic, irq, ic->d_status, int32_t);
    wc_lock(ic->wc, lockw, "irq descriptor");
    if (*D_FIELD(ic, irq, ic->d_depth, int32_t) > 0 ||
        LOAD32(status) & (IRQS_ONESHOT | IRQS_SPURIOUS_DISABLED) ||
        (n = ic_live_actions(ic, irq, live)) == 0) {
        __atomic_fetch_or(status, IRQS_PENDING, __ATOMIC_SEQ_CST);
    }
    else if (LOAD32(status) & IRQS_INPROGRESS) {
        __atomic_fetch_or(status, IRQS_REPLAY, __ATOMIC_SEQ_CST);
    }
    else {
        __atomic_fetch_or(status, IRQS_INPROGRESS, __ATOMIC_SEQ_CST);
        D_FIELD(ic, irq, ic->d_kstat, int64_t)[cpu]++;
        run = 1;
    }
    wc_unlock(lockw);
    if (!run) {
        if (wc_report_dead_owner(ic->wc) < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    return ic_live_tuple(ic, irq, live, n);
}

/* actions(irq): the live actions of a line in progress, as claim() returns them (for a
 * replay); on an error the line is no longer in progress. */
static PyObject *
IrqCore_actions(IrqCore *ic, PyObject *arg)
{
    int32_t live[IC_MAX_ACTIONS][3];
    int32_t *lockw;
    Py_ssize_t irq, n;

    if (ic_irq_arg(ic, arg, &irq) < 0)
        return NULL;
    lockw = D_FIELD(ic, irq, ic->d_lock, int32_t);
    wc_lock(ic->wc, lockw, "irq descriptor");
    n = ic_live_actions(ic, irq, live);
    wc_unlock(lockw);
    return ic_live_tuple(ic, irq, live, n);
}

/*
 * end(irq, ret): the handlers ran and returned `ret` (their IRQ_* results or-ed).
 * note_interrupt() counts the run; when its window is full and nearly every run was
 * unhandled, the line is shut off (IRQS_SPURIOUS_DISABLED) and IRQ_END_NOBODY_CARED is
 * set in the result for the caller to report. If an arrival asked for a replay and
 * the line is still enabled, IRQS_REPLAY is cleared and IRQ_END_REPLAY set: the
 * caller runs the actions again and calls end() again. Otherwise the line is no
 * longer in progress.
 */
static PyObject *
IrqCore_end(IrqCore *ic, PyObject *const *args, Py_ssize_t nargs)
{
    int32_t *lockw, *status, *count, *unhandled;
    Py_ssize_t irq;
    long ret;
    int result = 0;

    if (ic_args2(ic, args, nargs, "end", &irq, &ret) < 0)
        return NULL;
    lockw = D_FIELD(ic, irq, ic->d_lock, int32_t);
    status = D_FIELD(ic, irq, ic->d_status, int32_t);
    count = D_FIELD(ic, irq, ic->d_count, int32_t);
    unhandled = D_FIELD(ic, irq, ic->d_unhandled, int32_t);
    wc_lock(ic->wc, lockw, "irq descriptor");
    ++*count;
    if (ret == IRQ_NONE)
        ++*unhandled;
    if (*count >= SPURIOUS_WINDOW) {
        if (*unhandled > SPURIOUS_LIMIT) {
            __atomic_fetch_or(status, IRQS_SPURIOUS_DISABLED, __ATOMIC_SEQ_CST);
            result |= IRQ_END_NOBODY_CARED;
        }
        *count = *unhandled = 0;
    }
    if (LOAD32(status) & IRQS_REPLAY && *D_FIELD(ic, irq, ic->d_depth, int32_t) == 0) {
        __atomic_fetch_and(status, ~IRQS_REPLAY, __ATOMIC_SEQ_CST);
        result |= IRQ_END_REPLAY;
    }
    else {
        __atomic_fetch_and(status, ~IRQS_INPROGRESS, __ATOMIC_SEQ_CST);
    }
    wc_unlock(lockw);
    if (wc_report_dead_owner(ic->wc) < 0) {
        if (result & IRQ_END_REPLAY)
            ic_clear_inprogress(ic, irq);  /* the caller will not run it again */
        return NULL;
    }
    return PyLong_FromLong(result);
}

/* abort(irq): the handlers could not finish (an exception escaped): not in progress. */
static PyObject *
IrqCore_abort(IrqCore *ic, PyObject *arg)
{
    Py_ssize_t irq;

    if (ic_irq_arg(ic, arg, &irq) < 0)
        return NULL;
    ic_clear_inprogress(ic, irq);
    if (wc_report_dead_owner(ic->wc) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static int
IrqCore_init(IrqCore *ic, PyObject *args, PyObject *kwds)
{
    PyObject *wc;
    Py_ssize_t descs, percpu, task_high, i;

    if (ic->wc != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "IrqCore is already initialised");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "Onnn(nnnnnnnn)nnnnnnnn(nn)(nnn)ni:IrqCore", &wc, &descs,
                          &ic->desc_size, &ic->nr_irqs, &ic->d_lock, &ic->d_depth,
                          &ic->d_status, &ic->d_affinity, &ic->d_kstat, &ic->d_actions,
                          &ic->d_count, &ic->d_unhandled, &ic->action_size, &ic->nr_actions,
                          &ic->a_in_use, &ic->a_ref, &ic->a_ref_gen, &percpu, &ic->percpu_size,
                          &ic->ncpus, &ic->p_irq_pending, &ic->p_idle_slot, &ic->t_in_use,
                          &ic->t_cpu, &ic->t_pid, &task_high, &ic->signo))
        return -1;
    if (PyType_GetSlot(Py_TYPE(wc), Py_tp_init) != (void *)WaitCore_init ||
        ((WaitCore *)wc)->sems == NULL) {
        PyErr_SetString(PyExc_TypeError, "IrqCore needs an initialised WaitCore");
        return -1;
    }
    if (ic->nr_irqs < 1 || ic->nr_irqs > 64 || ic->nr_actions > IC_MAX_ACTIONS ||
        ic->ncpus < 1) {
        PyErr_SetString(PyExc_ValueError, "IrqCore: bad nr_irqs, nr_actions or ncpus");
        return -1;
    }
    if (!check_addr(descs, 8, "descs") || !check_addr(percpu, 8, "percpu") ||
        !check_addr(task_high, 4, "task_high"))
        return -1;
    ic->last_target = PyMem_Calloc((size_t)ic->ncpus, sizeof(Py_ssize_t));
    if (ic->last_target == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (i = 0; i < ic->ncpus; i++)
        ic->last_target[i] = -1;
    Py_INCREF(wc);
    ic->wc = (WaitCore *)wc;
    ic->descs = (char *)descs;
    ic->percpu = (char *)percpu;
    ic->task_high = (int32_t *)task_high;
    return 0;
}

static void
IrqCore_dealloc(IrqCore *ic)
{
    PyTypeObject *tp = Py_TYPE(ic);

    PyMem_Free(ic->last_target);
    Py_CLEAR(ic->wc);
    tp->tp_free((PyObject *)ic);
    Py_DECREF(tp);
}

static PyMethodDef IrqCore_methods[] = {
    {"raise_irq", (PyCFunction)IrqCore_raise_irq, METH_O,
     "raise_irq(irq) -> mark irq pending on its target CPU and kick that CPU; True if it "
     "is the caller's own CPU (the caller takes the interrupt now)"},
    {"kick", (PyCFunction)IrqCore_kick, METH_O,
     "kick(cpu) -> ring the CPU's doorbell; True if it is the caller's own CPU"},
    {"ring", (PyCFunction)IrqCore_ring, METH_O,
     "ring(cpu) -> signal the task running on the CPU, or its idle task, even the caller"},
    {"take_pending", (PyCFunction)IrqCore_take_pending, METH_O,
     "take_pending(cpu) -> the CPU's pending IRQ bits, now cleared"},
    {"claim", (PyCFunction)(void (*)(void))IrqCore_claim, METH_FASTCALL,
     "claim(irq, cpu) -> ((index, ref, ref_generation), ...) of the live actions to run, "
     "the line now in progress; or None (left pending or marked for replay)"},
    {"actions", (PyCFunction)IrqCore_actions, METH_O,
     "actions(irq) -> the live actions, as claim() returns them"},
    {"end", (PyCFunction)(void (*)(void))IrqCore_end, METH_FASTCALL,
     "end(irq, ret) -> IRQ_END_* bits: REPLAY (run the actions again), NOBODY_CARED (the "
     "line was just shut off as spurious)"},
    {"abort", (PyCFunction)IrqCore_abort, METH_O,
     "abort(irq): the line is no longer in progress (its handlers did not finish)"},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot IrqCore_slots[] = {
    {Py_tp_doc, "IrqCore(waitcore, descs, desc_size, nr_irqs, (lock, depth, status, affinity, "
                "kstat, actions, irq_count, irqs_unhandled), action_size, nr_actions, "
                "action_in_use, action_ref, action_ref_generation, percpu, percpu_size, ncpus, "
                "(irq_pending, idle_slot), (task in_use, cpu, pid), task_high_addr, signo): "
                "interrupt controller and flow-handler bookkeeping over the shared image"},
    {Py_tp_init, IrqCore_init},
    {Py_tp_dealloc, IrqCore_dealloc},
    {Py_tp_methods, IrqCore_methods},
    {Py_tp_new, PyType_GenericNew},
    {0, NULL},
};

static PyType_Spec IrqCore_spec = {
    .name = "_emu_native.IrqCore",
    .basicsize = sizeof(IrqCore),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = IrqCore_slots,
};

static int
add_type(PyObject *module, const char *name, PyType_Spec *spec)
{
    PyObject *type = PyType_FromSpec(spec);

    if (type == NULL)
        return -1;
    if (PyModule_AddObject(module, name, type) < 0) {
        Py_DECREF(type);
        return -1;
    }
    return 0;
}

/* native/slab.c: SharedBuffer, the buffer behind emu.kmalloc(). */
int emu_slab_exec(PyObject *module);

static int
emu_native_exec(PyObject *module)
{
    if (add_type(module, "WaitCore", &WaitCore_spec) < 0 ||
        add_type(module, "IrqCore", &IrqCore_spec) < 0 ||
        emu_slab_exec(module) < 0)
        return -1;
    if (PyModule_AddIntConstant(module, "IRQS_INPROGRESS", IRQS_INPROGRESS) < 0 ||
        PyModule_AddIntConstant(module, "IRQS_REPLAY", IRQS_REPLAY) < 0 ||
        PyModule_AddIntConstant(module, "IRQS_PENDING", IRQS_PENDING) < 0 ||
        PyModule_AddIntConstant(module, "IRQS_ONESHOT", IRQS_ONESHOT) < 0 ||
        PyModule_AddIntConstant(module, "IRQS_SPURIOUS_DISABLED", IRQS_SPURIOUS_DISABLED) < 0 ||
        PyModule_AddIntConstant(module, "ACTION_LIVE", ACTION_LIVE) < 0 ||
        PyModule_AddIntConstant(module, "SPURIOUS_WINDOW", SPURIOUS_WINDOW) < 0 ||
        PyModule_AddIntConstant(module, "SPURIOUS_LIMIT", SPURIOUS_LIMIT) < 0 ||
        PyModule_AddIntConstant(module, "IRQ_END_REPLAY", IRQ_END_REPLAY) < 0 ||
        PyModule_AddIntConstant(module, "IRQ_END_NOBODY_CARED", IRQ_END_NOBODY_CARED) < 0)
        return -1;
    return 0;
}

/* ------------------------------------------------------------------------- */

#define DOC(name, sig, text) PyDoc_STRVAR(name##_doc, #name sig "\n--\n\n" text)

DOC(load32, "(addr, /)", "Atomically load the int32 at addr; return it (signed).");
DOC(store32, "(addr, v, /)", "Atomically store v (wrapped to 32 bits) at addr; return None.");
DOC(add32, "(addr, delta, /)",
    "Atomically add delta to the int32 at addr; return the NEW value (wrapping).");
DOC(xchg32, "(addr, v, /)", "Atomically exchange the int32 at addr with v; return the old value.");
DOC(cmpxchg32, "(addr, old, new, /)",
    "Atomically replace old by new at addr; return the value that was there "
    "(success iff it equals old).");
DOC(or32, "(addr, bits, /)", "Atomically OR bits into the int32 at addr; return the old value.");
DOC(and32, "(addr, bits, /)", "Atomically AND bits into the int32 at addr; return the old value.");
DOC(load64, "(addr, /)", "Atomically load the int64 at addr; return it (signed).");
DOC(store64, "(addr, v, /)", "Atomically store v (wrapped to 64 bits) at addr; return None.");
DOC(add64, "(addr, delta, /)",
    "Atomically add delta to the int64 at addr; return the NEW value (wrapping).");
DOC(xchg64, "(addr, v, /)", "Atomically exchange the int64 at addr with v; return the old value.");
DOC(cmpxchg64, "(addr, old, new, /)",
    "Atomically replace old by new at addr; return the value that was there "
    "(success iff it equals old).");
DOC(or64, "(addr, bits, /)", "Atomically OR bits into the int64 at addr; return the old value.");
DOC(and64, "(addr, bits, /)", "Atomically AND bits into the int64 at addr; return the old value.");
DOC(lock, "(addr, pid, spins, timeout_ns, /)",
    "Acquire the owner-aware lock at addr for pid; return 0 if acquired, the dead "
    "owner's pid if taken over from a dead owner, -1 on timeout (timeout_ns < 0 = never).");
DOC(trylock, "(addr, pid, /)", "Take the lock at addr for pid if it is free; return True if taken.");
DOC(unlock, "(addr, pid, /)",
    "Release the lock at addr held by pid and wake one sleeper; return False "
    "(changing nothing) if pid is not the owner.");
DOC(lock_owner, "(addr, /)", "Return the pid holding the lock at addr (0 = free).");
DOC(force_unlock, "(addr, expected_owner, /)",
    "Release the lock at addr iff expected_owner holds it, waking one sleeper; "
    "return True if released.");
DOC(futex_wait, "(addr, expected, timeout_ns, /)",
    "FUTEX_WAIT (shared) on addr while it holds expected; return 0 if woken, else "
    "-errno (-EAGAIN, -ETIMEDOUT, -EINTR); timeout_ns < 0 = forever.");
DOC(futex_wake, "(addr, n, /)", "FUTEX_WAKE (shared) up to n waiters on addr; return the number woken.");
DOC(set_comm, "(name, /)",
    "Set this thread's comm (prctl PR_SET_NAME, truncated to 15 bytes); return None, "
    "OSError on failure.");
DOC(get_comm, "()",
    "Return this thread's comm as bytes (prctl PR_GET_NAME: at most 15 bytes, not "
    "necessarily UTF-8); OSError on failure.");
DOC(set_pdeathsig, "(sig, /)",
    "Set the parent-death signal (prctl PR_SET_PDEATHSIG); return None, OSError on failure.");
DOC(pid_is_dead, "(pid, /)",
    "Return True if pid does not exist (ESRCH) or is a zombie/dead task (state Z or X).");

#define METH(name) {#name, emu_##name, METH_VARARGS, name##_doc}

static PyMethodDef emu_native_methods[] = {
    METH(load32),
    METH(store32),
    METH(add32),
    METH(xchg32),
    METH(cmpxchg32),
    METH(or32),
    METH(and32),
    METH(load64),
    METH(store64),
    METH(add64),
    METH(xchg64),
    METH(cmpxchg64),
    METH(or64),
    METH(and64),
    METH(lock),
    METH(trylock),
    METH(unlock),
    METH(lock_owner),
    METH(force_unlock),
    METH(futex_wait),
    METH(futex_wake),
    METH(set_comm),
    {"get_comm", emu_get_comm, METH_NOARGS, get_comm_doc},
    METH(set_pdeathsig),
    METH(pid_is_dead),
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(emu_native_doc,
"Native primitives for emu: atomics, an owner-aware futex lock, raw futex wait/wake\n"
"and a few prctl helpers.\n"
"\n"
"Every function takes an absolute address (int) into memory shared between processes\n"
"(e.g. ctypes.addressof into an mmap) and returns raw data; policy is left to Python.\n"
"\n"
"Atomics (all sequentially consistent; values wrap to the word size, results signed):\n"
"  load32/load64(addr), store32/store64(addr, v), add32/add64(addr, delta) -> new,\n"
"  xchg32/xchg64(addr, v) -> old, cmpxchg32/cmpxchg64(addr, old, new) -> value found,\n"
"  or32/or64/and32/and64(addr, bits) -> old.\n"
"\n"
"Lock at addr: int32 owner pid (0 = free), int32 waiters at addr + 4:\n"
"  lock(addr, pid, spins, timeout_ns) -> 0 | dead owner's pid | -1 (timeout),\n"
"  trylock(addr, pid) -> bool, unlock(addr, pid) -> bool, lock_owner(addr) -> pid,\n"
"  force_unlock(addr, expected_owner) -> bool.\n"
"\n"
"futex_wait(addr, expected, timeout_ns) -> 0 | -errno, futex_wake(addr, n) -> woken;\n"
"set_comm(name), get_comm() -> bytes, set_pdeathsig(sig), pid_is_dead(pid) -> bool.\n"
"\n"
"Addresses must be non-zero and aligned (4 bytes; 8 for the 64-bit atomics),\n"
"otherwise ValueError is raised.");

static PyModuleDef_Slot emu_native_slots[] = {
    {Py_mod_exec, emu_native_exec},
#ifdef Py_mod_multiple_interpreters
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
#ifdef Py_mod_gil
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef emu_native_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_emu_native",
    .m_doc = emu_native_doc,
    .m_size = 0,
    .m_methods = emu_native_methods,
    .m_slots = emu_native_slots,
};

PyMODINIT_FUNC
PyInit__emu_native(void)
{
    return PyModuleDef_Init(&emu_native_module);
}
