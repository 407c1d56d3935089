/*
 * trace.c: the writer side of the per-CPU trace rings (emu/trace.py drains them and
 * writes the Perfetto trace).
 *
 * In C because its callers are: a sleep, a wake-up and an interrupt record their event
 * where they happen, in waitcore.c and irqcore.c, at the cost of a few stores. With
 * tracing off each trace point is one load and one predictable branch (trace_event()
 * in emu.h).
 *
 * A ring never blocks a writer and has any number of them (the tasks of one emulated
 * CPU, and wakers elsewhere): a writer reserves the next event number with one atomic
 * add, marks the event as being written (seq = 0), fills it in and publishes it (seq =
 * number + 1). When the ring is full the newest event overwrites the oldest; the
 * drainer sees the gap (or a seq that is not the one it expects) and counts the loss.
 */

#include "emu.h"

void
trace_record(TraceBuf *tb, int cpu, int type, int pid, int32_t arg0, int64_t arg1)
{
    uint64_t n;
    char *ev;

    if (cpu < 0 || cpu >= tb->ncpus)
        cpu = 0;
    n = __atomic_fetch_add((uint64_t *)(tb->rings + cpu * tb->ring_size + tb->r_head), 1,
                           __ATOMIC_RELAXED);
    ev = tb->events + (cpu * tb->nevents + (Py_ssize_t)(n & (uint64_t)(tb->nevents - 1))) *
                          tb->ev_size;
    __atomic_store_n((uint64_t *)(ev + tb->e_seq), 0, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    *(int64_t *)(ev + tb->e_ts) = monotonic_ns();
    *(int64_t *)(ev + tb->e_arg1) = arg1;
    *(int32_t *)(ev + tb->e_pid) = pid;
    *(int32_t *)(ev + tb->e_arg0) = arg0;
    *(uint16_t *)(ev + tb->e_type) = (uint16_t)type;
    *(uint16_t *)(ev + tb->e_cpu) = (uint16_t)cpu;
    __atomic_store_n((uint64_t *)(ev + tb->e_seq), n + 1, __ATOMIC_RELEASE);
}

/* The rings as emu/image.py lays them out: layout["trace_rings"], ["trace_events"] and
 * the header's trace_on and trace_buf_events. Leaves tb->on NULL (never tracing) when
 * the layout has no rings. */
int
trace_init(TraceBuf *tb, PyObject *layout)
{
    Py_ssize_t on, nevents;
    const LayoutField header_fields[] = {
        FIELD("trace_on", &on, int32_t),
        FIELD("trace_buf_events", &nevents, int32_t),
        END_FIELDS,
    };
    const LayoutField ring_fields[] = {
        FIELD("head", &tb->r_head, uint64_t),
        END_FIELDS,
    };
    const LayoutField event_fields[] = {
        FIELD("ts_ns", &tb->e_ts, int64_t),
        FIELD("seq", &tb->e_seq, uint64_t),
        FIELD("arg1", &tb->e_arg1, int64_t),
        FIELD("pid", &tb->e_pid, int32_t),
        FIELD("arg0", &tb->e_arg0, int32_t),
        FIELD("type", &tb->e_type, uint16_t),
        FIELD("cpu", &tb->e_cpu, uint16_t),
        END_FIELDS,
    };
    LayoutTable header, rings, events;
    int32_t n;

    memset(tb, 0, sizeof(*tb));
    if (!PyDict_Check(layout) || PyDict_GetItemString(layout, "trace_rings") == NULL)
        return 0;
    if (layout_table(layout, "trace", "header", &header, header_fields) < 0 ||
        layout_table(layout, "trace", "trace_rings", &rings, ring_fields) < 0 ||
        layout_table(layout, "trace", "trace_events", &events, event_fields) < 0)
        return -1;
    n = *(int32_t *)(header.base + nevents);
    if (header.base == NULL || rings.base == NULL || events.base == NULL || n <= 0 ||
        (n & (n - 1)) || rings.count < 1 || events.count != rings.count * n) {
        PyErr_SetString(PyExc_ValueError,
                        "trace layout: need addresses, and one ring of trace_buf_events (a "
                        "power of two) events per CPU");
        return -1;
    }
    tb->rings = rings.base;
    tb->ring_size = rings.size;
    tb->ncpus = rings.count;
    tb->events = events.base;
    tb->ev_size = events.size;
    tb->nevents = n;
    tb->on = (int32_t *)(header.base + on);
    return 0;
}

/* trace(type, arg0, arg1): an event of the current task on its CPU, from Python: one
 * call that returns at once while tracing is off. */
PyObject *
WaitCore_trace(WaitCore *wc, PyObject *const *args, Py_ssize_t nargs)
{
    long type, arg0;
    long long arg1;

    if (wc->trace.on == NULL || !__atomic_load_n(wc->trace.on, __ATOMIC_RELAXED))
        Py_RETURN_NONE;
    if (fc_nargs(nargs, 3, "trace") < 0)
        return NULL;
    type = PyLong_AsLong(args[0]);
    arg0 = PyLong_AsLong(args[1]);
    arg1 = PyLong_AsLongLong(args[2]);
    if (PyErr_Occurred())
        return NULL;
    if (type < 1 || type > TRACE_MAX) {
        PyErr_Format(PyExc_ValueError, "trace event type %ld out of range 1..%d", type,
                     TRACE_MAX);
        return NULL;
    }
    trace_record(&wc->trace, WC_CPU(wc, -1), (int)type, wc->pid, (int32_t)arg0, arg1);
    Py_RETURN_NONE;
}

/* The event types, for emu/trace.py. */
int
emu_trace_exec(PyObject *module)
{
    if (PyModule_AddIntConstant(module, "TRACE_SWITCH_OUT", TRACE_SWITCH_OUT) < 0 ||
        PyModule_AddIntConstant(module, "TRACE_SWITCH_IN", TRACE_SWITCH_IN) < 0 ||
        PyModule_AddIntConstant(module, "TRACE_WAKING", TRACE_WAKING) < 0 ||
        PyModule_AddIntConstant(module, "TRACE_IRQ_ENTRY", TRACE_IRQ_ENTRY) < 0 ||
        PyModule_AddIntConstant(module, "TRACE_IRQ_EXIT", TRACE_IRQ_EXIT) < 0 ||
        PyModule_AddIntConstant(module, "TRACE_COMPLETE", TRACE_COMPLETE) < 0 ||
        PyModule_AddIntConstant(module, "TRACE_WAIT_BEGIN", TRACE_WAIT_BEGIN) < 0 ||
        PyModule_AddIntConstant(module, "TRACE_WAIT_END", TRACE_WAIT_END) < 0 ||
        PyModule_AddIntConstant(module, "TRACE_SOFTIRQ_ENTRY", TRACE_SOFTIRQ_ENTRY) < 0 ||
        PyModule_AddIntConstant(module, "TRACE_SOFTIRQ_EXIT", TRACE_SOFTIRQ_EXIT) < 0 ||
        PyModule_AddIntConstant(module, "TRACE_WAKEUP_NEW", TRACE_WAKEUP_NEW) < 0 ||
        PyModule_AddIntConstant(module, "TRACE_PROCESS_EXIT", TRACE_PROCESS_EXIT) < 0 ||
        PyModule_AddIntConstant(module, "TRACE_TIMER_ENTRY", TRACE_TIMER_ENTRY) < 0 ||
        PyModule_AddIntConstant(module, "TRACE_TIMER_EXIT", TRACE_TIMER_EXIT) < 0 ||
        PyModule_AddIntConstant(module, "TRACE_WORK_START", TRACE_WORK_START) < 0 ||
        PyModule_AddIntConstant(module, "TRACE_WORK_END", TRACE_WORK_END) < 0 ||
        PyModule_AddIntConstant(module, "TRACE_COMM", TRACE_COMM) < 0)
        return -1;
    return 0;
}
