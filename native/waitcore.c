/*
 * waitcore.c: WaitCore, the task sleep/wake protocol and the completion wait queues.
 *
 * In C because it is the hot path: a wake-up or a completion wait through Python costs
 * microseconds on the cold caches a task wakes up with, and the sleep itself blocks on
 * a POSIX semaphore with the GIL released.
 */

#include "emu.h"

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


/* wait() results besides "completed after sleeping" (remaining ns >= 0). */
#define WAIT_DONE_AT_ENTRY (-1)
#define WAIT_TIMEDOUT (-2)
#define WAIT_SIGNALLED (-3)

static int wc_need_timebase(WaitCore *wc);


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
int
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

/* raw_spin_lock: lock_slowpath() without Python; a lock taken over from a dead owner is
 * remembered with `what` it protects, for wc_report_dead_owner(). */
void
wc_lock(WaitCore *wc, int32_t *lockw, const char *what)
{
    int dead;

    dead = lock_slowpath(lockw, wc->pid, LOCK_SPINS, -1, 0);
    if (dead > 0) {
        wc->dead_owner = dead;
        wc->dead_what = what;
    }
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
                                        __ATOMIC_SEQ_CST)) {
            trace_event(&wc->trace, wc->current >= 0 ? WC_CPU(wc, -1) : WC_CPU(wc, slot),
                        TRACE_WAKING, wc->pid, *T_FIELD(wc, slot, wc->t_pid, int32_t),
                        WC_CPU(wc, slot));
            return 1;
        }
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
static int wc_sleep_untraced(WaitCore *wc, Py_ssize_t slot, long long deadline_ns);

/* wc_sleep_untraced() between the trace's sched_switch out and back in. */
static int
wc_sleep(WaitCore *wc, Py_ssize_t slot, long long deadline_ns)
{
    int r;

    trace_event(&wc->trace, WC_CPU(wc, slot), TRACE_SWITCH_OUT, wc->pid,
                *T_FIELD(wc, slot, wc->t_state, int32_t), *T_FIELD(wc, slot, wc->t_wq_on, int32_t));
    r = wc_sleep_untraced(wc, slot, deadline_ns);
    trace_event(&wc->trace, WC_CPU(wc, slot), TRACE_SWITCH_IN, wc->pid, 0, 0);
    return r;
}

static int
wc_sleep_untraced(WaitCore *wc, Py_ssize_t slot, long long deadline_ns)
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

/*
 * --- the wait queue (kernel/sched/wait.c), caller holds its lock ---
 *
 * One implementation for every wait in emu: a queue head is a record of the
 * "completions" table (lock, head, tail); a completion is a queue head plus its `done`
 * counter (completion.c on swait). Entries are task slots linked through wq_next; wq_on
 * names the queue a task is on (index + 1), wq_flags its WQ_FLAG_EXCLUSIVE bit. A
 * non-exclusive entry goes to the head, an exclusive one to the tail, so exclusive
 * waiters are FIFO among themselves, behind every non-exclusive one. Completion waiters
 * are all exclusive: complete() is swake_up_one(), the head.
 */

static void
wq_enqueue(WaitCore *wc, Py_ssize_t idx, Py_ssize_t slot, int exclusive)
{
    int32_t *head = C_FIELD(wc, idx, wc->c_head, int32_t);
    int32_t *tail = C_FIELD(wc, idx, wc->c_tail, int32_t);

    *T_FIELD(wc, slot, wc->t_wq_flags, int32_t) = exclusive ? WQ_FLAG_EXCLUSIVE : 0;
    *T_FIELD(wc, slot, wc->t_wq_on, int32_t) = (int32_t)idx + 1;
    if (!exclusive) {
        *T_FIELD(wc, slot, wc->t_wq_next, int32_t) = *head;
        if (*head == -1)
            *tail = (int32_t)slot;
        *head = (int32_t)slot;
        return;
    }
    *T_FIELD(wc, slot, wc->t_wq_next, int32_t) = -1;
    if (*tail == -1)
        *head = (int32_t)slot;
    else
        *T_FIELD(wc, *tail, wc->t_wq_next, int32_t) = (int32_t)slot;
    *tail = (int32_t)slot;
}

/* Unlink `slot`, whose predecessor is `prev` (-1: it is the head). */
static void
wq_unlink(WaitCore *wc, Py_ssize_t idx, int32_t prev, Py_ssize_t slot)
{
    int32_t *head = C_FIELD(wc, idx, wc->c_head, int32_t);
    int32_t *tail = C_FIELD(wc, idx, wc->c_tail, int32_t);
    int32_t next = *T_FIELD(wc, slot, wc->t_wq_next, int32_t);

    if (prev == -1)
        *head = next;
    else
        *T_FIELD(wc, prev, wc->t_wq_next, int32_t) = next;
    if (*tail == slot)
        *tail = prev;
    *T_FIELD(wc, slot, wc->t_wq_next, int32_t) = -1;
    *T_FIELD(wc, slot, wc->t_wq_on, int32_t) = 0;
}

static Py_ssize_t
wc_dequeue_head(WaitCore *wc, Py_ssize_t idx)
{
    Py_ssize_t slot = *C_FIELD(wc, idx, wc->c_head, int32_t);

    if (slot != -1)
        wq_unlink(wc, idx, -1, slot);
    return slot;
}

static int
wc_remove(WaitCore *wc, Py_ssize_t idx, Py_ssize_t slot)
{
    int32_t prev = -1, cur = *C_FIELD(wc, idx, wc->c_head, int32_t);
    Py_ssize_t guard = 0;

    while (cur != -1 && cur != slot && guard++ < wc->ntasks) {
        prev = cur;
        cur = *T_FIELD(wc, cur, wc->t_wq_next, int32_t);
    }
    if (cur != slot)
        return 0;
    wq_unlink(wc, idx, prev, slot);
    return 1;
}

/*
 * __wake_up_common(): walk from the head; every entry whose task sleeps in a state of
 * `mode` is made TASK_RUNNING and dequeued (autoremove_wake_function()); the others
 * stay queued. An exclusive entry counts only when it was woken; the walk stops when
 * `nr` were (nr == 0: never). The woken slots go to woken[*n] for wc_post_woken().
 * Returns the number of exclusive waiters woken.
 */
static int
wq_wake_common(WaitCore *wc, Py_ssize_t idx, int32_t mode, long nr, Py_ssize_t *woken,
               Py_ssize_t *n)
{
    int32_t prev = -1, cur = *C_FIELD(wc, idx, wc->c_head, int32_t), next;
    Py_ssize_t guard = 0;
    int excl, count = 0;

    while (cur != -1 && guard++ < wc->ntasks) {
        next = *T_FIELD(wc, cur, wc->t_wq_next, int32_t);
        excl = *T_FIELD(wc, cur, wc->t_wq_flags, int32_t) & WQ_FLAG_EXCLUSIVE;
        if (wc_set_running(wc, cur, mode)) {
            wq_unlink(wc, idx, prev, cur);
            woken[(*n)++] = cur;
            if (excl && ++count == nr)
                break;
        }
        else {
            prev = cur;
        }
        cur = next;
    }
    return count;
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
    trace_event(&wc->trace, WC_CPU(wc, -1), TRACE_COMPLETE, wc->pid, (int32_t)idx, all);
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
    raw_unlock(lockw);
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
        trace_event(&wc->trace, WC_CPU(wc, slot), TRACE_WAIT_BEGIN, wc->pid, qid - 1, 0);
        for (;;) {
            if (wc_signal_pending_state(wc, slot, state)) {
                *result = WAIT_SIGNALLED;
                break;
            }
            if (*wq_on != qid)
                wq_enqueue(wc, idx, slot, 1);
            __atomic_store_n(st, state, __ATOMIC_SEQ_CST);
            raw_unlock(lockw);
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
        trace_event(&wc->trace, WC_CPU(wc, slot), TRACE_WAIT_END, wc->pid, qid - 1,
                    r >= 0 && *done);
        if (r < 0 || !*done) {
            raw_unlock(lockw);
            return r < 0 ? -1 : 0;
        }
        *result = deadline < 0 ? 0 : deadline - monotonic_ns();
        if (*result < 0)
            *result = 0;
    }
    if (*done != UINT32_MAX)
        (*done)--;
    raw_unlock(lockw);
    return 0;
}

/* A timeout of `timeout` jiffies (>= 0) in ns; -1 (no timer) if it reaches forever_ns
 * (set_timebase()): it would outlive the machine. */
static long long
wc_timeout_ns(WaitCore *wc, long long timeout)
{
    if (timeout < (wc->forever_ns + wc->jiffy_ns - 1) / wc->jiffy_ns)
        return timeout * wc->jiffy_ns;
    return -1;
}

/* `ns` (> 0) in jiffies, rounded up: the jiffies left of a timeout. */
static long long
wc_ns_to_jiffies(WaitCore *wc, long long ns)
{
    return (ns + wc->jiffy_ns - 1) / wc->jiffy_ns;
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
    long long timeout_ns = wc_timeout_ns(wc, timeout), left;

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
    left = wc_ns_to_jiffies(wc, left);
    return PyLong_FromLongLong(left > 1 ? left : 1);
}

/* The wait_event() condition: 1 true, 0 false, -1 with the exception it raised. */
static int
wq_cond(PyObject *cond)
{
    PyObject *r = PyObject_CallNoArgs(cond);
    int t;

    if (r == NULL)
        return -1;
    t = PyObject_IsTrue(r);
    Py_DECREF(r);
    return t;
}

/* finish_wait(): back to TASK_RUNNING, off the queue if a wake-up did not dequeue us. */
static void
wq_finish_wait(WaitCore *wc, Py_ssize_t idx, Py_ssize_t slot)
{
    int32_t *lockw = C_FIELD(wc, idx, wc->c_lock, int32_t);
    int32_t *wq_on = T_FIELD(wc, slot, wc->t_wq_on, int32_t);

    __atomic_store_n(T_FIELD(wc, slot, wc->t_state, int32_t), TASK_RUNNING, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(wq_on, __ATOMIC_ACQUIRE) != (int32_t)idx + 1)
        return;  /* list_empty_careful(): the waker unlinked us, wq_on last */
    wc_lock(wc, lockw, "wait queue");
    if (*wq_on == (int32_t)idx + 1)
        wc_remove(wc, idx, slot);
    raw_unlock(lockw);
}

/*
 * ___wait_event() with its timeout (include/linux/wait.h): `cond` is called before
 * queueing, after every (re)queue with the task's state already set, and right after
 * each wake-up (v6.15+); it wins over a pending signal and over the timeout. The timeout is a countdown across
 * wake-ups. Returns, as the macros do: `timeout` (1 if 0) when `cond` was true at
 * entry; the jiffies left, at least 1, when it became true; 0 when the time ran out
 * with `cond` false; -ERESTARTSYS when a signal that `state` admits ended it. A timeout
 * that reaches forever_ns sets no timer (wc_timeout_ns()) and is returned as is.
 */
static PyObject *
wq_wait_event(WaitCore *wc, Py_ssize_t idx, Py_ssize_t slot, PyObject *cond, long long timeout,
              int state, int exclusive)
{
    long long timeout_ns = wc_timeout_ns(wc, timeout), deadline = -1, left;
    int32_t *lockw = C_FIELD(wc, idx, wc->c_lock, int32_t);
    int32_t *st = T_FIELD(wc, slot, wc->t_state, int32_t);
    int32_t *wq_on = T_FIELD(wc, slot, wc->t_wq_on, int32_t);
    int qid = (int)idx + 1, sig = 0, timed_out = 0, r, c;

    c = wq_cond(cond);
    if (c != 0)
        return c < 0 ? NULL : PyLong_FromLongLong(timeout ? timeout : 1);
    if (timeout == 0)
        return PyLong_FromLong(0);
    if (timeout_ns >= 0)
        deadline = monotonic_ns() + timeout_ns;
    for (;;) {
        /* prepare_to_wait_event() */
        wc_lock(wc, lockw, "wait queue");
        sig = wc_signal_pending_state(wc, slot, state);
        if (sig) {
            if (*wq_on == qid)
                wc_remove(wc, idx, slot);
        }
        else {
            if (*wq_on != qid)
                wq_enqueue(wc, idx, slot, exclusive);
            __atomic_store_n(st, state, __ATOMIC_SEQ_CST);
        }
        raw_unlock(lockw);
        c = wq_cond(cond);
        if (c != 0 || sig || timed_out)
            break;
        r = wc_sleep(wc, slot, deadline);
        if (r < 0) {
            c = -1;
            break;
        }
        timed_out = r == 0;
        /* Woken: test at once, before queueing again (v6.15+). A waker dequeued us, so
         * a true condition leaves without taking the lock again. */
        if (!timed_out && (c = wq_cond(cond)) != 0)
            break;
    }
    wq_finish_wait(wc, idx, slot);
    if (wc_report_dead_owner(wc) < 0 || c < 0)
        return NULL;
    if (!c)
        return PyLong_FromLong(sig ? -ERESTARTSYS : 0);
    if (deadline < 0)
        return PyLong_FromLongLong(timeout);
    left = deadline - monotonic_ns();
    left = left > 0 && !timed_out ? wc_ns_to_jiffies(wc, left) : 1;
    return PyLong_FromLongLong(left > 1 ? left : 1);
}

/*
 * wait_event(index, generation, cond, timeout, state, exclusive): every wait_event*()
 * variant's common case as the current task (wq_wait_event()). Returns None, having
 * changed nothing and not called `cond`, when the Python slow path must check and report
 * first (the cases of wait_for()).
 */
static PyObject *
WaitCore_wait_event(WaitCore *wc, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t idx, slot = wc->current;
    long long timeout;
    long state;
    int live, exclusive, overflow = 0;

    if (fc_nargs(nargs, 6, "wait_event") < 0 || (live = wc_completion_arg(wc, args, &idx)) < 0)
        return NULL;
    state = PyLong_AsLong(args[4]);
    if ((state == -1 && PyErr_Occurred()) || (exclusive = PyObject_IsTrue(args[5])) < 0)
        return NULL;
    if (!live || slot < 0 || wc->jiffy_ns <= 0 || !(state & TASK_NORMAL) ||
        !PyLong_CheckExact(args[3]) || !PyCallable_Check(args[2]))
        Py_RETURN_NONE;
    if (*T_FIELD(wc, slot, wc->t_preempt, int32_t) || *T_FIELD(wc, slot, wc->t_irqs_off, int32_t))
        Py_RETURN_NONE;
    timeout = PyLong_AsLongLongAndOverflow(args[3], &overflow);
    if (overflow || timeout < 0)
        Py_RETURN_NONE;
    return wq_wait_event(wc, idx, slot, args[2], timeout, (int)state, exclusive);
}

/* wait_event_slow(index, slot, cond, timeout, state, exclusive): wq_wait_event() for the
 * Python slow path, which has checked the handle, the context and the timeout. */
static PyObject *
WaitCore_wait_event_slow(WaitCore *wc, PyObject *args)
{
    Py_ssize_t idx, slot;
    PyObject *cond;
    long long timeout;
    int state, exclusive;

    if (!PyArg_ParseTuple(args, "nnOLip:wait_event_slow", &idx, &slot, &cond, &timeout, &state,
                          &exclusive) ||
        wc_check_index(wc, idx) < 0 || wc_check_slot(wc, slot) < 0 || wc_need_timebase(wc) < 0)
        return NULL;
    if (timeout < 0) {
        PyErr_Format(PyExc_ValueError, "timeout %lld is negative", timeout);
        return NULL;
    }
    return wq_wait_event(wc, idx, slot, cond, timeout, state, exclusive);
}

/* wake_up(index, generation, mode, nr) -> __wake_up(): the exclusive waiters woken (at
 * most nr; 0: no limit), or None if the handle is stale. Any context. */
static PyObject *
WaitCore_wake_up(WaitCore *wc, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t idx, n = 0;
    long mode, nr;
    int live, count;
    int32_t *lockw;

    if (fc_nargs(nargs, 4, "wake_up") < 0 || (live = wc_completion_arg(wc, args, &idx)) < 0)
        return NULL;
    mode = PyLong_AsLong(args[2]);
    if (mode == -1 && PyErr_Occurred())
        return NULL;
    nr = PyLong_AsLong(args[3]);
    if (nr == -1 && PyErr_Occurred())
        return NULL;
    if (!live)
        Py_RETURN_NONE;
    lockw = C_FIELD(wc, idx, wc->c_lock, int32_t);
    wc_lock(wc, lockw, "wait queue");
    count = wq_wake_common(wc, idx, (int32_t)mode, nr, wc->woken, &n);
    raw_unlock(lockw);
    wc_post_woken(wc, wc->woken, n);
    if (wc_report_dead_owner(wc) < 0)
        return NULL;
    return PyLong_FromLong(count);
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
    raw_unlock(lockw);
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
    raw_unlock(lockw);
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
    raw_unlock(lockw);
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

static int
wc_need_timebase(WaitCore *wc)
{
    if (wc->jiffy_ns > 0)
        return 0;
    PyErr_SetString(PyExc_RuntimeError, "WaitCore has no timebase yet (set_timebase())");
    return -1;
}

/* timeout_ns(jiffies): schedule_timeout()'s timer length, -1 for none (see wc_timeout_ns). */
static PyObject *
WaitCore_timeout_ns(WaitCore *wc, PyObject *arg)
{
    long long timeout = PyLong_AsLongLong(arg);

    if ((timeout == -1 && PyErr_Occurred()) || wc_need_timebase(wc) < 0)
        return NULL;
    if (timeout < 0) {
        PyErr_Format(PyExc_ValueError, "timeout must be >= 0, got %lld", timeout);
        return NULL;
    }
    return PyLong_FromLongLong(wc_timeout_ns(wc, timeout));
}

/* jiffies_left(ns): the whole jiffies (rounded up) in ns left of a timer; 0 if none left. */
static PyObject *
WaitCore_jiffies_left(WaitCore *wc, PyObject *arg)
{
    long long ns = PyLong_AsLongLong(arg);

    if ((ns == -1 && PyErr_Occurred()) || wc_need_timebase(wc) < 0)
        return NULL;
    return PyLong_FromLongLong(ns > 0 ? wc_ns_to_jiffies(wc, ns) : 0);
}

/* signal_pending_state(slot, state): would a pending signal end task slot's sleep in state? */
static PyObject *
WaitCore_signal_pending_state(WaitCore *wc, PyObject *args)
{
    Py_ssize_t slot;
    int state;

    if (!PyArg_ParseTuple(args, "ni:signal_pending_state", &slot, &state) ||
        wc_check_slot(wc, slot) < 0)
        return NULL;
    return PyBool_FromLong(wc_signal_pending_state(wc, slot, state));
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

int
WaitCore_init(WaitCore *wc, PyObject *args, PyObject *kwds)
{
    const LayoutField task_fields[] = {
        FIELD("state", &wc->t_state, int32_t),
        FIELD("wq_next", &wc->t_wq_next, int32_t),
        FIELD("wq_on", &wc->t_wq_on, int32_t),
        FIELD("wq_flags", &wc->t_wq_flags, int32_t),
        FIELD("sigpending", &wc->t_sigpending, int64_t),
        FIELD("notify_signal", &wc->t_notify, int32_t),
        FIELD("nvcsw", &wc->t_nvcsw, int64_t),
        FIELD("preempt_count", &wc->t_preempt, int32_t),
        FIELD("irqs_disabled", &wc->t_irqs_off, int32_t),
        FIELD("recent_cpu", &wc->t_recent_cpu, int32_t),
        FIELD("cpu", &wc->t_cpu, int32_t),
        FIELD("pid", &wc->t_pid, int32_t),
        END_FIELDS,
    };
    const LayoutField comp_fields[] = {
        FIELD("lock", &wc->c_lock, lock_word_t),
        FIELD("done", &wc->c_done, uint32_t),
        FIELD("head", &wc->c_head, int32_t),
        FIELD("tail", &wc->c_tail, int32_t),
        FIELD("generation", &wc->c_gen, int32_t),
        END_FIELDS,
    };
    static char *kwlist[] = {"layout", "pid", NULL};
    PyObject *layout;
    LayoutTable tasks, comps;

    if (wc->sems != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "WaitCore is already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Oi:WaitCore", kwlist, &layout, &wc->pid))
        return -1;
    if (layout_table(layout, "WaitCore", "tasks", &tasks, task_fields) < 0 ||
        layout_table(layout, "WaitCore", "completions", &comps, comp_fields) < 0 ||
        trace_init(&wc->trace, layout) < 0)
        return -1;
    if (tasks.base == NULL || comps.base == NULL) {
        PyErr_SetString(PyExc_ValueError, "WaitCore layout: tasks and completions need an addr");
        return -1;
    }
    wc->current = -1;
    wc->tasks = tasks.base;
    wc->task_size = tasks.size;
    wc->ntasks = tasks.count;
    wc->comps = comps.base;
    wc->comp_size = comps.size;
    wc->ncomps = comps.count;
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
    {"wait_event", (PyCFunction)(void (*)(void))WaitCore_wait_event, METH_FASTCALL,
     "wait_event(index, generation, cond, timeout_jiffies, state, exclusive) -> the "
     "wait_event*() result as the current task, or None: take the slow path"},
    {"wait_event_slow", (PyCFunction)WaitCore_wait_event_slow, METH_VARARGS,
     "wait_event_slow(index, slot, cond, timeout_jiffies, state, exclusive) -> the "
     "wait_event*() result, without wait_event()'s checks (the slow path made them)"},
    {"wake_up", (PyCFunction)(void (*)(void))WaitCore_wake_up, METH_FASTCALL,
     "wake_up(index, generation, mode, nr) -> exclusive waiters woken (nr 0: all); "
     "None if the handle is stale"},
    {"try_wait", (PyCFunction)(void (*)(void))WaitCore_try_wait, METH_FASTCALL,
     "try_wait(index, generation) -> True if one completion was consumed; None if stale"},
    {"reset", (PyCFunction)(void (*)(void))WaitCore_reset, METH_FASTCALL,
     "reset(index, generation, drop_queue) -> done = 0; waiters dropped (drop_queue) or 1 "
     "if any queued; None if the handle is stale"},
    {"remove_waiter", (PyCFunction)WaitCore_remove_waiter, METH_VARARGS,
     "remove_waiter(index, slot) -> True if the task was unlinked from the queue"},
    {"trace", (PyCFunction)(void (*)(void))WaitCore_trace, METH_FASTCALL,
     "trace(type, arg0, arg1): record trace event `type` of the current task (trace.c)"},
    {"attach_sem", (PyCFunction)WaitCore_attach_sem, METH_VARARGS,
     "attach_sem(slot, name): open the named POSIX semaphore as task slot's sleep primitive"},
    {"after_fork", (PyCFunction)WaitCore_after_fork, METH_VARARGS,
     "after_fork(pid): in a forked child: the lock owner id, and no current task yet"},
    {"set_current", (PyCFunction)WaitCore_set_current, METH_VARARGS,
     "set_current(slot): this process's task slot (-1: not a task)"},
    {"set_timebase", (PyCFunction)WaitCore_set_timebase, METH_VARARGS,
     "set_timebase(jiffy_ns, forever_ns): jiffy length; timeouts this long or longer never fire"},
    {"timeout_ns", (PyCFunction)WaitCore_timeout_ns, METH_O,
     "timeout_ns(jiffies) -> the timer length in ns of a timeout, -1 if it never fires"},
    {"jiffies_left", (PyCFunction)WaitCore_jiffies_left, METH_O,
     "jiffies_left(ns) -> ns left of a timer in jiffies, rounded up; 0 if none left"},
    {"signal_pending_state", (PyCFunction)WaitCore_signal_pending_state, METH_VARARGS,
     "signal_pending_state(slot, state) -> True if a pending signal ends a sleep in state"},
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
    {Py_tp_doc, "WaitCore(layout, pid): sleep/wake and completion queues over the shared "
                "image; layout = {'tasks': table, 'completions': table}, each table "
                "{'addr', 'size', 'count', 'fields': {name: (offset, size)}} "
                "(image.SharedImage.core_layout())"},
    {Py_tp_init, WaitCore_init},
    {Py_tp_dealloc, WaitCore_dealloc},
    {Py_tp_methods, WaitCore_methods},
    {Py_tp_new, PyType_GenericNew},
    {0, NULL},
};

PyType_Spec WaitCore_spec = {
    .name = "_emu_native.WaitCore",
    .basicsize = sizeof(WaitCore),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = WaitCore_slots,
};

/* The WaitCore type and the kernel numbers its logic uses. */
int
emu_waitcore_exec(PyObject *module)
{
    if (add_type(module, "WaitCore", &WaitCore_spec) < 0)
        return -1;
    if (PyModule_AddIntConstant(module, "TASK_RUNNING", TASK_RUNNING) < 0 ||
        PyModule_AddIntConstant(module, "TASK_INTERRUPTIBLE", TASK_INTERRUPTIBLE) < 0 ||
        PyModule_AddIntConstant(module, "TASK_UNINTERRUPTIBLE", TASK_UNINTERRUPTIBLE) < 0 ||
        PyModule_AddIntConstant(module, "TASK_WAKEKILL", TASK_WAKEKILL) < 0 ||
        PyModule_AddIntConstant(module, "TASK_NORMAL", TASK_NORMAL) < 0 ||
        PyModule_AddIntConstant(module, "ERESTARTSYS", ERESTARTSYS) < 0 ||
        PyModule_AddIntConstant(module, "WQ_FLAG_EXCLUSIVE", WQ_FLAG_EXCLUSIVE) < 0)
        return -1;
    return 0;
}
