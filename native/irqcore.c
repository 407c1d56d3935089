/*
 * irqcore.c: IrqCore, the interrupt controller (per-CPU pending bits, the doorbell) and
 * the edge flow handler's bookkeeping.
 *
 * In C because raising an interrupt must be one atomic step that no signal can cut,
 * and because it sits on the path of every interrupt.
 */

#include "emu.h"

/* ------------------------------------------------------------------------- */
/* IrqCore: the interrupt controller and the edge flow handler's bookkeeping  */
/* ------------------------------------------------------------------------- */
/*
 * The hot path of interrupt delivery: the per-CPU pending bits, the IPI that makes
 * a CPU look at them (the doorbell: a real-time signal to the process running that
 * CPU, or to its idle task, plus a post of its semaphore so that a doorbell racing
 * with the start of a sleep is not lost), and the state changes of handle_edge_irq()
 * and note_interrupt() (kernel/irq/chip.c, spurious.c) under the descriptor's lock.
 * A descriptor's depth and status words change only here, always under its lock:
 * line control (disable/enable, the oneshot mask) is here too, so that no change is
 * lost to another CPU's. emu/irq.py owns the policy and runs the handlers, which are
 * Python; nothing here runs Python code while a lock is held. Like WaitCore, this code computes no
 * offset itself: emu/image.py passes the layout in.
 */

#define IRQS_INPROGRESS 0x1  /* a CPU is running the handlers */
#define IRQS_REPLAY 0x2  /* arrived while another CPU ran them: run once more */
#define IRQS_PENDING 0x4  /* arrived while disabled or masked: replay on enable/unmask */
#define IRQS_ONESHOT 0x8  /* masked until the threaded handler returns */
#define IRQS_SPURIOUS_DISABLED 0x10  /* "nobody cared" */
#define ACTION_LIVE 1  /* IrqAction.in_use: its handler runs */
#define PF_IDLE 0x00000002  /* TaskSlot.flags: an idle task (never a running task) */
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
    Py_ssize_t p_idle_home, p_idle_list, p_idle_next, p_idle_queued;
    Py_ssize_t t_in_use, t_cpu, t_pid, t_flags;
    int32_t *task_high;
    int signo;
    Py_ssize_t *last_target;  /* per CPU: the slot that took its last doorbell, or -1 */
    int32_t *idle_buf;  /* scratch for idle_take(): one entry per CPU */
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
           !(LOAD32(T_FIELD(wc, slot, ic->t_flags, int32_t)) & PF_IDLE) &&
           LOAD32(T_FIELD(wc, slot, ic->t_pid, int32_t)) > 0;
}

/*
 * The slot of a task running on `cpu`, else of the idle task that serves it (*home is
 * then that idle task's home CPU, else -1); -1 if neither. An idle task runs a CPU only
 * when no other task does: while it serves one (state R, its cpu that CPU) it is not
 * taken for a running task.
 */
static Py_ssize_t
ic_target(IrqCore *ic, int32_t cpu, int32_t *home)
{
    Py_ssize_t slot = ic->last_target[cpu], high = LOAD32(ic->task_high);

    *home = -1;
    if (slot >= 0 && ic_running_on(ic, slot, cpu))
        return slot;
    if (high > ic->wc->ntasks)
        high = ic->wc->ntasks;
    for (slot = 0; slot < high; slot++) {
        if (ic_running_on(ic, slot, cpu)) {
            ic->last_target[cpu] = slot;
            return slot;
        }
    }
    *home = LOAD32(P_FIELD(ic, cpu, ic->p_idle_home, int32_t));
    if (*home < 0 || *home >= ic->ncpus)
        return *home = -1;
    slot = LOAD32(P_FIELD(ic, *home, ic->p_idle_slot, int32_t));
    if (slot < 0 || slot >= ic->wc->ntasks)
        return *home = -1;
    return slot;
}

/*
 * Queue `cpu` (once) on the list of CPUs the idle task of CPU `home` serves, which that
 * task takes with idle_take(): an idle task serves many emulated CPUs, and learns this
 * way which of them rang. A lock-free stack (push, take all); the queued flag keeps a
 * CPU from being on it twice. Called before the signal is sent. (A raiser SIGKILLed
 * between setting the flag and the push would leave the CPU marked but off the list.)
 */
static void
ic_queue_idle(IrqCore *ic, int32_t cpu, int32_t home)
{
    int32_t head, *list;

    if (__atomic_exchange_n(P_FIELD(ic, cpu, ic->p_idle_queued, int32_t), 1, __ATOMIC_SEQ_CST))
        return;  /* already queued */
    list = P_FIELD(ic, home, ic->p_idle_list, int32_t);
    head = LOAD32(list);
    do {
        __atomic_store_n(P_FIELD(ic, cpu, ic->p_idle_next, int32_t), head, __ATOMIC_SEQ_CST);
    } while (!__atomic_compare_exchange_n(list, &head, cpu, 0, __ATOMIC_SEQ_CST,
                                          __ATOMIC_SEQ_CST));
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
    int32_t home;
    int i, value;
    pid_t pid;

    for (i = 0; i < DOORBELL_TRIES; i++) {
        slot = ic_target(ic, cpu, &home);
        if (slot < 0 || (pid = LOAD32(T_FIELD(wc, slot, ic->t_pid, int32_t))) <= 0)
            return 0;
        if (home >= 0)
            ic_queue_idle(ic, cpu, home);
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

/* raise_irq(irq): irq_inject_interrupt() on the line's target CPU; see ic_kick().
 * Returns 1 if the caller is to take it now, plus 2 if the edge merged with one
 * already pending there (for /proc/interrupts' count of merged edges). */
static PyObject *
IrqCore_raise_irq(IrqCore *ic, PyObject *arg)
{
    Py_ssize_t irq;
    int32_t cpu;
    uint64_t old;
    int r;

    if (ic_irq_arg(ic, arg, &irq) < 0)
        return NULL;
    cpu = LOAD32(D_FIELD(ic, irq, ic->d_affinity, int32_t));
    if (cpu < 0 || cpu >= ic->ncpus) {
        PyErr_Format(PyExc_RuntimeError, "irq %zd has a bad affinity %d", irq, cpu);
        return NULL;
    }
    old = __atomic_fetch_or(P_FIELD(ic, cpu, ic->p_irq_pending, uint64_t), 1ULL << irq,
                            __ATOMIC_SEQ_CST);
    if ((r = ic_kick(ic, cpu)) < 0)
        return NULL;
    return PyLong_FromLong(r | (int)(old >> irq & 1) << 1);
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

/*
 * idle_take(home): the CPUs queued for the idle task whose home CPU is `home`, oldest
 * first; each may be queued again from now on (its interrupts raised before are
 * pending by then).
 */
static PyObject *
IrqCore_idle_take(IrqCore *ic, PyObject *arg)
{
    Py_ssize_t home, n = 0, i;
    int32_t cpu, next;
    PyObject *list, *item;

    if (ic_cpu_arg(ic, arg, &home) < 0)
        return NULL;
    cpu = __atomic_exchange_n(P_FIELD(ic, home, ic->p_idle_list, int32_t), -1, __ATOMIC_SEQ_CST);
    while (cpu >= 0 && cpu < ic->ncpus && n < ic->ncpus) {
        next = LOAD32(P_FIELD(ic, cpu, ic->p_idle_next, int32_t));  /* before it may be reused */
        __atomic_store_n(P_FIELD(ic, cpu, ic->p_idle_queued, int32_t), 0, __ATOMIC_SEQ_CST);
        ic->idle_buf[n++] = cpu;
        cpu = next;
    }
    if ((list = PyList_New(n)) == NULL)
        return NULL;  /* their pending bits stay: the next doorbell queues them again */
    for (i = 0; i < n; i++) {
        if ((item = PyLong_FromLong(ic->idle_buf[n - 1 - i])) == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, item);
    }
    return list;
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
    raw_unlock(lockw);
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
/* IRQ lines: one bit each in a CPU's 64-bit pending mask (PerCpu.irq_pending). */
#define NR_IRQS_MAX 64

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
    raw_unlock(lockw);
    if (!run) {
        if (wc_report_dead_owner(ic->wc) < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    trace_event(&ic->wc->trace, (int)cpu, TRACE_IRQ_ENTRY, ic->wc->pid, (int32_t)irq, 0);
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
    raw_unlock(lockw);
    trace_event(&ic->wc->trace, WC_CPU(ic->wc, -1), TRACE_IRQ_ENTRY, ic->wc->pid,
                (int32_t)irq, 0);
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
    trace_event(&ic->wc->trace, WC_CPU(ic->wc, -1), TRACE_IRQ_EXIT, ic->wc->pid, (int32_t)irq,
                ret);
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
    raw_unlock(lockw);
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

/*
 * The line-control state changes: each runs under the descriptor's lock and returns a
 * small int for the caller's follow-up. With irq_disable()/irq_enable() below, claim()
 * and end() above, these are the only writers of a descriptor's depth and status.
 */
typedef int (*ic_line_op)(IrqCore *ic, Py_ssize_t irq);

/* disable_irq_nosync(): one more level of disabling. Returns 0. */
static int
ic_disable(IrqCore *ic, Py_ssize_t irq)
{
    ++*D_FIELD(ic, irq, ic->d_depth, int32_t);
    return 0;
}

/* A held arrival (IRQS_PENDING) on a line that is enabled again: 1 to replay, cleared. */
static int
ic_take_held(IrqCore *ic, Py_ssize_t irq)
{
    int32_t *status = D_FIELD(ic, irq, ic->d_status, int32_t);

    if (*D_FIELD(ic, irq, ic->d_depth, int32_t) != 0 || !(LOAD32(status) & IRQS_PENDING))
        return 0;
    __atomic_fetch_and(status, ~IRQS_PENDING, __ATOMIC_SEQ_CST);
    return 1;
}

/* enable_irq(): -1 if not disabled (unbalanced, nothing changed); else one level less
 * and ic_take_held(). */
static int
ic_enable(IrqCore *ic, Py_ssize_t irq)
{
    int32_t *depth = D_FIELD(ic, irq, ic->d_depth, int32_t);

    if (*depth == 0)
        return -1;
    --*depth;
    return ic_take_held(ic, irq);
}

/* __irq_wake_thread() of a ONESHOT action: the line stays masked until the thread
 * returns. Returns 0. */
static int
ic_oneshot_mask(IrqCore *ic, Py_ssize_t irq)
{
    __atomic_fetch_or(D_FIELD(ic, irq, ic->d_status, int32_t), IRQS_ONESHOT, __ATOMIC_SEQ_CST);
    return 0;
}

/* irq_finalize_oneshot(): the thread returned (or died): unmask, then ic_take_held(). */
static int
ic_finalize_oneshot(IrqCore *ic, Py_ssize_t irq)
{
    __atomic_fetch_and(D_FIELD(ic, irq, ic->d_status, int32_t), ~IRQS_ONESHOT,
                       __ATOMIC_SEQ_CST);
    return ic_take_held(ic, irq);
}

/* Run `op` on line `arg` under the descriptor's lock; its result as an int. */
static PyObject *
ic_locked(IrqCore *ic, PyObject *arg, ic_line_op op)
{
    int32_t *lockw;
    Py_ssize_t irq;
    int r;

    if (ic_irq_arg(ic, arg, &irq) < 0)
        return NULL;
    lockw = D_FIELD(ic, irq, ic->d_lock, int32_t);
    wc_lock(ic->wc, lockw, "irq descriptor");
    r = op(ic, irq);
    raw_unlock(lockw);
    if (wc_report_dead_owner(ic->wc) < 0)
        return NULL;
    return PyLong_FromLong(r);
}

#define IC_LOCKED_METHOD(name)                                                              \
    static PyObject *IrqCore_##name(IrqCore *ic, PyObject *arg)                             \
    {                                                                                       \
        return ic_locked(ic, arg, ic_##name);                                               \
    }

IC_LOCKED_METHOD(disable)
IC_LOCKED_METHOD(enable)
IC_LOCKED_METHOD(oneshot_mask)
IC_LOCKED_METHOD(finalize_oneshot)

/*
 * startup(irq): __setup_irq() of a line's first action, which the caller is claiming
 * with the descriptor's lock held (the check is lockdep_assert_held()): a past owner's
 * held arrival, oneshot mask and spurious shut-off are forgotten.
 */
static PyObject *
IrqCore_startup(IrqCore *ic, PyObject *arg)
{
    Py_ssize_t irq;

    if (ic_irq_arg(ic, arg, &irq) < 0)
        return NULL;
    if (LOAD32(D_FIELD(ic, irq, ic->d_lock, int32_t)) != ic->wc->pid) {
        PyErr_Format(PyExc_RuntimeError, "startup(%zd) without the descriptor's lock", irq);
        return NULL;
    }
    __atomic_fetch_and(D_FIELD(ic, irq, ic->d_status, int32_t),
                       ~(IRQS_PENDING | IRQS_ONESHOT | IRQS_SPURIOUS_DISABLED),
                       __ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

static int
IrqCore_init(IrqCore *ic, PyObject *args, PyObject *kwds)
{
    const LayoutField task_fields[] = {
        FIELD("in_use", &ic->t_in_use, int32_t),
        FIELD("cpu", &ic->t_cpu, int32_t),
        FIELD("pid", &ic->t_pid, int32_t),
        FIELD("flags", &ic->t_flags, int32_t),
        END_FIELDS,
    };
    const LayoutField action_fields[] = {
        FIELD("in_use", &ic->a_in_use, int32_t),
        FIELD("ref", &ic->a_ref, int32_t),
        FIELD("ref_generation", &ic->a_ref_gen, int32_t),
        END_FIELDS,
    };
    const LayoutField percpu_fields[] = {
        FIELD("irq_pending", &ic->p_irq_pending, uint64_t),
        FIELD("idle_slot", &ic->p_idle_slot, int32_t),
        FIELD("idle_home", &ic->p_idle_home, int32_t),
        FIELD("idle_list", &ic->p_idle_list, int32_t),
        FIELD("idle_next", &ic->p_idle_next, int32_t),
        FIELD("idle_queued", &ic->p_idle_queued, int32_t),
        END_FIELDS,
    };
    Py_ssize_t task_high;
    const LayoutField header_fields[] = {
        FIELD("task_high", &task_high, int32_t),
        END_FIELDS,
    };
    static char *kwlist[] = {"waitcore", "layout", "signo", NULL};
    PyObject *wc, *layout;
    LayoutTable tasks, actions, percpu, descs, header;
    Py_ssize_t i;

    if (ic->wc != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "IrqCore is already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOi:IrqCore", kwlist, &wc, &layout,
                                     &ic->signo))
        return -1;
    if (layout_table(layout, "IrqCore", "tasks", &tasks, task_fields) < 0 ||
        layout_table(layout, "IrqCore", "actions", &actions, action_fields) < 0 ||
        layout_table(layout, "IrqCore", "percpu", &percpu, percpu_fields) < 0 ||
        layout_table(layout, "IrqCore", "header", &header, header_fields) < 0)
        return -1;
    {
        /* The descriptor holds the per-CPU counts and the action records. */
        const LayoutField desc_fields[] = {
            FIELD("lock", &ic->d_lock, lock_word_t),
            FIELD("depth", &ic->d_depth, int32_t),
            FIELD("status", &ic->d_status, int32_t),
            FIELD("affinity", &ic->d_affinity, int32_t),
            ARRAY_FIELD("kstat", &ic->d_kstat, percpu.count * (Py_ssize_t)sizeof(int64_t)),
            ARRAY_FIELD("actions", &ic->d_actions, actions.count * actions.size),
            FIELD("irq_count", &ic->d_count, int32_t),
            FIELD("irqs_unhandled", &ic->d_unhandled, int32_t),
            END_FIELDS,
        };

        if (layout_table(layout, "IrqCore", "irqs", &descs, desc_fields) < 0)
            return -1;
    }
    ic->desc_size = descs.size;
    ic->nr_irqs = descs.count;
    ic->action_size = actions.size;
    ic->nr_actions = actions.count;
    ic->percpu_size = percpu.size;
    ic->ncpus = percpu.count;
    if (PyType_GetSlot(Py_TYPE(wc), Py_tp_init) != (void *)WaitCore_init ||
        ((WaitCore *)wc)->sems == NULL) {
        PyErr_SetString(PyExc_TypeError, "IrqCore needs an initialised WaitCore");
        return -1;
    }
    if (ic->nr_irqs < 1 || ic->nr_irqs > NR_IRQS_MAX || ic->nr_actions > IC_MAX_ACTIONS ||
        ic->ncpus < 1) {
        PyErr_SetString(PyExc_ValueError, "IrqCore: bad nr_irqs, nr_actions or ncpus");
        return -1;
    }
    if (descs.base == NULL || percpu.base == NULL || header.base == NULL) {
        PyErr_SetString(PyExc_ValueError, "IrqCore layout: irqs, percpu and header need an addr");
        return -1;
    }
    ic->last_target = PyMem_Calloc((size_t)ic->ncpus, sizeof(Py_ssize_t));
    ic->idle_buf = PyMem_Calloc((size_t)ic->ncpus, sizeof(int32_t));
    if (ic->last_target == NULL || ic->idle_buf == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (i = 0; i < ic->ncpus; i++)
        ic->last_target[i] = -1;
    Py_INCREF(wc);
    ic->wc = (WaitCore *)wc;
    ic->descs = descs.base;
    ic->percpu = percpu.base;
    ic->task_high = (int32_t *)(header.base + task_high);
    return 0;
}

static void
IrqCore_dealloc(IrqCore *ic)
{
    PyTypeObject *tp = Py_TYPE(ic);

    PyMem_Free(ic->last_target);
    PyMem_Free(ic->idle_buf);
    Py_CLEAR(ic->wc);
    tp->tp_free((PyObject *)ic);
    Py_DECREF(tp);
}

static PyMethodDef IrqCore_methods[] = {
    {"raise_irq", (PyCFunction)IrqCore_raise_irq, METH_O,
     "raise_irq(irq) -> mark irq pending on its target CPU and kick that CPU; 1 if it "
     "is the caller's own CPU (the caller takes the interrupt now), plus 2 if the irq was "
     "pending there already (the edge merged)"},
    {"kick", (PyCFunction)IrqCore_kick, METH_O,
     "kick(cpu) -> ring the CPU's doorbell; True if it is the caller's own CPU"},
    {"ring", (PyCFunction)IrqCore_ring, METH_O,
     "ring(cpu) -> signal the task running on the CPU, or its idle task, even the caller"},
    {"take_pending", (PyCFunction)IrqCore_take_pending, METH_O,
     "take_pending(cpu) -> the CPU's pending IRQ bits, now cleared"},
    {"idle_take", (PyCFunction)IrqCore_idle_take, METH_O,
     "idle_take(home) -> [cpu, ...]: the CPUs that rang the idle task of CPU `home` "
     "since the last call, oldest first"},
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
    {"disable", (PyCFunction)IrqCore_disable, METH_O,
     "disable(irq) -> 0: one more level of disabling"},
    {"enable", (PyCFunction)IrqCore_enable, METH_O,
     "enable(irq) -> -1 if the line was not disabled (nothing changed), 1 if it is enabled "
     "again with an arrival held (cleared: replay it), else 0"},
    {"oneshot_mask", (PyCFunction)IrqCore_oneshot_mask, METH_O,
     "oneshot_mask(irq) -> 0: masked until its thread returns (IRQS_ONESHOT)"},
    {"finalize_oneshot", (PyCFunction)IrqCore_finalize_oneshot, METH_O,
     "finalize_oneshot(irq) -> 1 if the unmasked line has an arrival held (cleared: "
     "replay it), else 0"},
    {"startup", (PyCFunction)IrqCore_startup, METH_O,
     "startup(irq): forget a past owner's line state; the caller holds the lock"},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot IrqCore_slots[] = {
    {Py_tp_doc, "IrqCore(waitcore, layout, signo): interrupt controller and flow-handler "
                "bookkeeping over the shared image; layout = {'irqs', 'actions', 'percpu', "
                "'tasks', 'header': table} as WaitCore's (image.SharedImage.irq_layout())"},
    {Py_tp_init, IrqCore_init},
    {Py_tp_dealloc, IrqCore_dealloc},
    {Py_tp_methods, IrqCore_methods},
    {Py_tp_new, PyType_GenericNew},
    {0, NULL},
};

PyType_Spec IrqCore_spec = {
    .name = "_emu_native.IrqCore",
    .basicsize = sizeof(IrqCore),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = IrqCore_slots,
};

/* The IrqCore type and the constants emu/irq.py shares with it. */
int
emu_irqcore_exec(PyObject *module)
{
    if (add_type(module, "IrqCore", &IrqCore_spec) < 0)
        return -1;
    if (PyModule_AddIntConstant(module, "NR_IRQS_MAX", NR_IRQS_MAX) < 0 ||
        PyModule_AddIntConstant(module, "IRQS_INPROGRESS", IRQS_INPROGRESS) < 0 ||
        PyModule_AddIntConstant(module, "IRQS_REPLAY", IRQS_REPLAY) < 0 ||
        PyModule_AddIntConstant(module, "IRQS_PENDING", IRQS_PENDING) < 0 ||
        PyModule_AddIntConstant(module, "IRQS_ONESHOT", IRQS_ONESHOT) < 0 ||
        PyModule_AddIntConstant(module, "IRQS_SPURIOUS_DISABLED", IRQS_SPURIOUS_DISABLED) < 0 ||
        PyModule_AddIntConstant(module, "ACTION_LIVE", ACTION_LIVE) < 0 ||
        PyModule_AddIntConstant(module, "PF_IDLE", PF_IDLE) < 0 ||
        PyModule_AddIntConstant(module, "SPURIOUS_WINDOW", SPURIOUS_WINDOW) < 0 ||
        PyModule_AddIntConstant(module, "SPURIOUS_LIMIT", SPURIOUS_LIMIT) < 0 ||
        PyModule_AddIntConstant(module, "IRQ_END_REPLAY", IRQ_END_REPLAY) < 0 ||
        PyModule_AddIntConstant(module, "IRQ_END_NOBODY_CARED", IRQ_END_NOBODY_CARED) < 0)
        return -1;
    return 0;
}
