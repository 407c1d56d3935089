/*
 * atomic.c: the 32- and 64-bit sequentially consistent atomics on shared memory.
 *
 * In C because Python has no atomic read-modify-write on memory that other processes
 * map: every emu counter, flag and lock word in the image goes through these.
 */

#include "emu.h"

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

PyMethodDef emu_atomic_methods[] = {
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
    {NULL, NULL, 0, NULL},
};
