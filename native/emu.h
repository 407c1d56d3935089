/*
 * emu.h: what the files of _emu_native (emu's compiled part) share: time and futex
 * helpers, the argument checks, the owner-aware lock, the WaitCore record that IrqCore
 * borrows, and each file's contribution to the module.
 *
 * Every function takes an absolute memory address (a Python int, computed by the caller
 * from ctypes.addressof into the shared mmap) or works over the image whose layout
 * emu/image.py passes in. The module has no global state.
 */
#ifndef EMU_NATIVE_H
#define EMU_NATIVE_H

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

/* A module function's docstring with its signature, and its method table entry. */
#define DOC(name, sig, text) PyDoc_STRVAR(name##_doc, #name sig "\n--\n\n" text)
#define METH(name) {#name, emu_##name, METH_VARARGS, name##_doc}

/* --- time ----------------------------------------------------------------- */

static inline long long
monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * NSEC_PER_SEC + ts.tv_nsec;
}

static inline void
ns_to_timespec(long long ns, struct timespec *ts)
{
    ts->tv_sec = (time_t)(ns / NSEC_PER_SEC);
    ts->tv_nsec = (long)(ns % NSEC_PER_SEC);
}

/* --- module.c: argument checks and process helpers ------------------------ */

void *check_addr(Py_ssize_t addr, size_t align, const char *argname);
int check_pid(int pid, const char *argname);
int pid_dead(int pid);
/* A METH_FASTCALL method called with `nargs` arguments takes `want`. */
int fc_nargs(Py_ssize_t nargs, Py_ssize_t want, const char *fname);
/* The image layout by field name (module.c's comment on layout_table() tells the format). */
typedef struct {
    char *base;  /* NULL for records nested in another record */
    Py_ssize_t size, count;  /* record size, number of records */
} LayoutTable;

typedef struct {
    const char *name;  /* the field's name in emu/image.py */
    Py_ssize_t *offset;  /* out */
    Py_ssize_t size;  /* its size in bytes: exact, or the least for an array */
    int array;
} LayoutField;

#define FIELD(name, offset, type) {name, offset, sizeof(type), 0}
#define ARRAY_FIELD(name, offset, size) {name, offset, size, 1}
#define END_FIELDS {NULL, NULL, 0, 0}

int layout_table(PyObject *layout, const char *owner, const char *table, LayoutTable *t,
                 const LayoutField *fields);
int add_type(PyObject *module, const char *name, PyType_Spec *spec);

/* --- lock.c: the owner-aware lock { int32 owner pid (0 = free); int32 waiters } --- */

/* Tries before the lock slow path sleeps (lock(), emu/locking.py, WaitCore, IrqCore). */
#define LOCK_SPINS 200

/* The lock as emu/image.py's LockWord lays it out. */
typedef struct {
    int32_t owner, waiters;
} lock_word_t;

/* lock_slowpath() results besides 0 (taken) and a dead owner's pid (taken over). */
#define LOCK_TIMEDOUT (-1)
#define LOCK_ERROR (-2)

int lock_slowpath(int32_t *lockw, int pid, Py_ssize_t spins, long long timeout_ns,
                  int py_signals);
void raw_unlock(int32_t *lockw);

extern PyMethodDef emu_atomic_methods[];
extern PyMethodDef emu_lock_methods[];

/* --- trace.c: the per-CPU trace rings (emu/trace.py drains them) ----------- */

/* Event types; emu/trace.py takes them from the module (TRACE_*). */
#define TRACE_SWITCH_OUT 1  /* the task sleeps: arg0 its state, arg1 completion id + 1 or 0 */
#define TRACE_SWITCH_IN 2  /* the task runs again after a sleep */
#define TRACE_WAKING 3  /* arg0 the woken task's pid, arg1 its CPU */
#define TRACE_IRQ_ENTRY 4  /* arg0 the IRQ line */
#define TRACE_IRQ_EXIT 5  /* arg0 the IRQ line, arg1 the handlers' IRQ_* results */
#define TRACE_COMPLETE 6  /* arg0 completion id, arg1 1 for complete_all() */
#define TRACE_WAIT_BEGIN 7  /* arg0 completion id: a wait_for_completion*() that sleeps */
#define TRACE_WAIT_END 8  /* arg0 completion id, arg1 1 if it got the completion */
/* Recorded from Python (WaitCore.trace()): */
#define TRACE_SOFTIRQ_ENTRY 9  /* arg0 the softirq vector */
#define TRACE_SOFTIRQ_EXIT 10
#define TRACE_WAKEUP_NEW 11  /* arg0 the new task's pid, arg1 its CPU */
#define TRACE_PROCESS_EXIT 12  /* the task exits */
#define TRACE_TIMER_ENTRY 13  /* arg0 the timer's id: its callback starts */
#define TRACE_TIMER_EXIT 14
#define TRACE_WORK_START 15  /* arg0 the work item's id: its function starts */
#define TRACE_WORK_END 16
#define TRACE_COMM 17  /* a new task's name: arg0 the offset (0, 8), arg1 8 bytes of it */
#define TRACE_MAX 17

typedef struct {
    int32_t *on;  /* the image's trace_on flag; NULL before trace_init() */
    char *rings, *events;
    Py_ssize_t ring_size, ev_size, nevents, ncpus;
    Py_ssize_t r_head, e_ts, e_seq, e_arg1, e_pid, e_arg0, e_type, e_cpu;
} TraceBuf;

int trace_init(TraceBuf *tb, PyObject *layout);
void trace_record(TraceBuf *tb, int cpu, int type, int pid, int32_t arg0, int64_t arg1);
int emu_trace_exec(PyObject *module);

/* The trace point: with tracing off it costs one load and one predictable branch. */
static inline void
trace_event(TraceBuf *tb, int cpu, int type, int pid, int32_t arg0, int64_t arg1)
{
    if (__builtin_expect(tb->on != NULL && __atomic_load_n(tb->on, __ATOMIC_RELAXED), 0))
        trace_record(tb, cpu, type, pid, arg0, arg1);
}

/* --- waitcore.c ------------------------------------------------------------ */

/* The kernel numbers the C logic uses; exported to emu/constants.py, which defines none
 * of them itself. */

#define TASK_RUNNING 0x0000
#define TASK_INTERRUPTIBLE 0x0001
#define TASK_UNINTERRUPTIBLE 0x0002
#define TASK_WAKEKILL 0x0100
#define TASK_NORMAL (TASK_INTERRUPTIBLE | TASK_UNINTERRUPTIBLE)
#define SIGKILL_BIT (1LL << (SIGKILL - 1))
#define ERESTARTSYS 512
#define WQ_FLAG_EXCLUSIVE 0x01

typedef struct {
    PyObject_HEAD
    char *tasks;
    Py_ssize_t task_size, ntasks;
    Py_ssize_t t_state, t_wq_next, t_wq_on, t_wq_flags, t_sigpending, t_notify, t_nvcsw;
    Py_ssize_t t_preempt, t_irqs_off;  /* this process mirrors its context there */
    Py_ssize_t t_recent_cpu, t_cpu, t_pid;
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
    TraceBuf trace;  /* the trace rings (trace.c) */
} WaitCore;

/* The emulated CPU of task `slot` (of the caller's task when slot < 0, 0 if none). */
#define WC_CPU(wc, slot)                                                                    \
    ((slot) >= 0 ? __atomic_load_n(T_FIELD(wc, slot, (wc)->t_cpu, int32_t), __ATOMIC_RELAXED) \
     : (wc)->current >= 0 ? __atomic_load_n(T_FIELD(wc, (wc)->current, (wc)->t_cpu, int32_t), \
                                            __ATOMIC_RELAXED) : 0)

#define T_FIELD(wc, slot, off, type) ((type *)((wc)->tasks + (slot) * (wc)->task_size + (off)))
#define C_FIELD(wc, idx, off, type) ((type *)((wc)->comps + (idx) * (wc)->comp_size + (off)))

int WaitCore_init(WaitCore *wc, PyObject *args, PyObject *kwds);
/* WaitCore.trace(type, arg0, arg1): a trace event of the current task (trace.c). */
PyObject *WaitCore_trace(WaitCore *wc, PyObject *const *args, Py_ssize_t nargs);
void wc_lock(WaitCore *wc, int32_t *lockw, const char *what);
int wc_report_dead_owner(WaitCore *wc);
extern PyType_Spec WaitCore_spec;
int emu_waitcore_exec(PyObject *module);

/* --- irqcore.c ------------------------------------------------------------- */

extern PyType_Spec IrqCore_spec;
int emu_irqcore_exec(PyObject *module);
/* slab.c: SharedBuffer, the buffer behind emu.kmalloc(), and the kfifo fast paths. */
int emu_slab_exec(PyObject *module);

#endif /* EMU_NATIVE_H */
