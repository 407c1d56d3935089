/*
 * module.c: the _emu_native module (its table, its init) and the process helpers
 * (comm, parent-death signal, "is this pid dead"), with the argument checks all files share.
 *
 * In C because prctl() has no Python binding and the dead-pid test is what the lock
 * slow path (lock.c) runs without the GIL.
 */

#include "emu.h"

/* Validate an address argument: non-zero, positive and `align`-byte aligned. */
void *
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

int
check_pid(int pid, const char *argname)
{
    if (pid <= 0) {
        PyErr_Format(PyExc_ValueError, "%s must be a positive pid, got %d", argname, pid);
        return -1;
    }
    return 0;
}

int
fc_nargs(Py_ssize_t nargs, Py_ssize_t want, const char *fname)
{
    if (nargs == want)
        return 0;
    PyErr_Format(PyExc_TypeError, "%s() takes exactly %zd arguments (%zd given)", fname, want,
                 nargs);
    return -1;
}

/*
 * The image layout, checked once when a core is built. emu/image.py describes each
 * table as {"addr": int, "size": record size, "count": records, "fields": {name:
 * (offset, size)}} (every field of the record, by its ctypes name), so that C names
 * each field it reads and order does not matter. A table without "addr" (records
 * nested in another record) has base NULL.
 */
static PyObject *
layout_item(PyObject *dict, const char *key, const char *owner, const char *what)
{
    PyObject *v;

    if (!PyDict_Check(dict)) {
        PyErr_Format(PyExc_TypeError, "%s layout: %s must be a dict, not %.100s", owner, what,
                     Py_TYPE(dict)->tp_name);
        return NULL;
    }
    v = PyDict_GetItemString(dict, key);  /* borrowed */
    if (v == NULL && !PyErr_Occurred())
        PyErr_Format(PyExc_ValueError, "%s layout: %s has no '%s'", owner, what, key);
    return v;
}

static int
layout_ssize(PyObject *dict, const char *key, const char *owner, const char *what,
             Py_ssize_t *out)
{
    PyObject *v = layout_item(dict, key, owner, what);

    if (v == NULL)
        return -1;
    *out = PyLong_AsSsize_t(v);
    if (*out == -1 && PyErr_Occurred())
        return -1;
    if (*out < 0) {
        PyErr_Format(PyExc_ValueError, "%s layout: %s '%s' is negative", owner, what, key);
        return -1;
    }
    return 0;
}

/* One field: offset (out) and size (in: exact, or at least this for an array). */
static int
layout_field(PyObject *fields, const LayoutTable *t, const char *owner, const char *table,
             const LayoutField *f)
{
    PyObject *v = PyDict_GetItemString(fields, f->name);
    Py_ssize_t off, size;

    if (v == NULL) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "%s layout: %s record has no field '%s'", owner,
                         table, f->name);
        return -1;
    }
    if (!PyArg_ParseTuple(v, "nn;layout field must be (offset, size)", &off, &size))
        return -1;
    if (f->array ? size < f->size : size != f->size) {
        PyErr_Format(PyExc_ValueError, "%s layout: %s field '%s' is %zd bytes, not %s%zd",
                     owner, table, f->name, size, f->array ? "at least " : "", f->size);
        return -1;
    }
    if (off < 0 || off + size > t->size || (!f->array && off % (size < 8 ? size : 8))) {
        PyErr_Format(PyExc_ValueError,
                     "%s layout: %s field '%s' at offset %zd (%zd bytes) is misaligned or "
                     "outside its %zd-byte record", owner, table, f->name, off, size, t->size);
        return -1;
    }
    *f->offset = off;
    return 0;
}

int
layout_table(PyObject *layout, const char *owner, const char *table, LayoutTable *t,
             const LayoutField *fields)
{
    PyObject *spec, *names, *addr;
    Py_ssize_t base;

    if ((spec = layout_item(layout, table, owner, "the layout")) == NULL)
        return -1;
    if (layout_ssize(spec, "size", owner, table, &t->size) < 0 ||
        layout_ssize(spec, "count", owner, table, &t->count) < 0)
        return -1;
    t->base = NULL;
    addr = PyDict_Check(spec) ? PyDict_GetItemString(spec, "addr") : NULL;
    if (addr != NULL) {
        base = PyLong_AsSsize_t(addr);
        if ((base == -1 && PyErr_Occurred()) || !(t->base = check_addr(base, 8, table)))
            return -1;
    }
    if ((names = layout_item(spec, "fields", owner, table)) == NULL)
        return -1;
    if (!PyDict_Check(names)) {
        PyErr_Format(PyExc_TypeError, "%s layout: %s fields must be a dict", owner, table);
        return -1;
    }
    for (; fields->name != NULL; fields++)
        if (layout_field(names, t, owner, table, fields) < 0)
            return -1;
    return 0;
}

/*
 * A process is dead when kill(pid, 0) fails with ESRCH, or when it exists only as a
 * zombie / dying task (state 'Z' or 'X' in /proc/<pid>/stat). Non-positive pids are
 * never considered dead (they name process groups, not processes).
 */
int
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
emu_pid_is_dead(PyObject *self, PyObject *args)
{
    int pid;

    if (!PyArg_ParseTuple(args, "i:pid_is_dead", &pid))
        return NULL;
    if (check_pid(pid, "pid") < 0)
        return NULL;
    return PyBool_FromLong(pid_dead(pid));
}

int
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

static int
emu_native_exec(PyObject *module)
{
    if (PyModule_AddFunctions(module, emu_atomic_methods) < 0 ||
        PyModule_AddFunctions(module, emu_lock_methods) < 0 ||
        PyModule_AddIntConstant(module, "LOCK_SPINS", LOCK_SPINS) < 0 ||
        emu_waitcore_exec(module) < 0 || emu_irqcore_exec(module) < 0 ||
        emu_slab_exec(module) < 0 || emu_trace_exec(module) < 0)
        return -1;
    return 0;
}

/* ------------------------------------------------------------------------- */

DOC(set_comm, "(name, /)",
    "Set this thread's comm (prctl PR_SET_NAME, truncated to 15 bytes); return None, "
    "OSError on failure.");
DOC(get_comm, "()",
    "Return this thread's comm as bytes (prctl PR_GET_NAME: at most 15 bytes, not "
    "necessarily UTF-8); OSError on failure.");
DOC(pid_is_dead, "(pid, /)",
    "Return True if pid does not exist (ESRCH) or is a zombie/dead task (state Z or X).");

static PyMethodDef emu_native_methods[] = {
    METH(set_comm),
    {"get_comm", emu_get_comm, METH_NOARGS, get_comm_doc},
    METH(pid_is_dead),
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(emu_native_doc,
"emu's compiled part: atomics, the owner-aware lock, the wait core (WaitCore), the\n"
"interrupt controller core (IrqCore) and process helpers.\n"
"\n"
"Every function takes an absolute address (int) into memory shared between processes\n"
"(e.g. ctypes.addressof into an mmap) and returns raw data; policy is left to Python.\n"
"WaitCore and IrqCore work over the shared image, whose layout emu/image.py passes by\n"
"field name.\n"
"\n"
"Atomics (all sequentially consistent; values wrap to the word size, results signed):\n"
"  load32/load64(addr), store32/store64(addr, v), add32/add64(addr, delta) -> new,\n"
"  xchg32/xchg64(addr, v) -> old, cmpxchg32/cmpxchg64(addr, old, new) -> value found,\n"
"  or32/or64/and32/and64(addr, bits) -> old.\n"
"\n"
"Lock at addr: int32 owner pid (0 = free), int32 waiters at addr + 4:\n"
"  lock(addr, pid, spins, timeout_ns) -> 0 | dead owner's pid | -1 (timeout),\n"
"  trylock(addr, pid) -> bool, unlock(addr, pid) -> bool, lock_owner(addr) -> pid.\n"
"\n"
"set_comm(name), get_comm() -> bytes, pid_is_dead(pid) -> bool.\n"
"\n"
"The kernel numbers the C logic uses (TASK_*, ERESTARTSYS, IRQS_*, ...) are module\n"
"attributes; emu/constants.py takes them from here.\n"
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
