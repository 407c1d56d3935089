/*
 * atomic.c: the 32- and 64-bit sequentially consistent atomics on shared memory.
 *
 * In C because Python has no atomic read-modify-write on memory that other processes
 * map: every emu counter, flag and lock word in the image goes through these.
 */

#include "emu.h"

/*
 * Each family is one macro instantiated for both widths: BITS, the unsigned word type
 * U, the signed type S the result is returned as, and its PyLong constructor. Values
 * are parsed as unsigned long long ("K", no range check) and wrap to the word size.
 */

#define ATOMIC_LOAD(BITS, U, S, FROM)                                                   \
    static PyObject *emu_load##BITS(PyObject *self, PyObject *args)                      \
    {                                                                                    \
        Py_ssize_t addr;                                                                 \
        U *p;                                                                            \
                                                                                         \
        if (!PyArg_ParseTuple(args, "n:load" #BITS, &addr))                              \
            return NULL;                                                                 \
        if (!(p = check_addr(addr, sizeof(U), "addr")))                                  \
            return NULL;                                                                 \
        return FROM((S)__atomic_load_n(p, __ATOMIC_SEQ_CST));                            \
    }

#define ATOMIC_STORE(BITS, U, S, FROM)                                                  \
    static PyObject *emu_store##BITS(PyObject *self, PyObject *args)                     \
    {                                                                                    \
        Py_ssize_t addr;                                                                 \
        unsigned long long v;                                                            \
        U *p;                                                                            \
                                                                                         \
        if (!PyArg_ParseTuple(args, "nK:store" #BITS, &addr, &v))                        \
            return NULL;                                                                 \
        if (!(p = check_addr(addr, sizeof(U), "addr")))                                  \
            return NULL;                                                                 \
        __atomic_store_n(p, (U)v, __ATOMIC_SEQ_CST);                                     \
        Py_RETURN_NONE;                                                                  \
    }

/* A read-modify-write `name` = `op`(p, v): add (the new value), xchg, or, and (the old). */
#define ATOMIC_RMW(name, op, BITS, U, S, FROM)                                          \
    static PyObject *emu_##name##BITS(PyObject *self, PyObject *args)                    \
    {                                                                                    \
        Py_ssize_t addr;                                                                 \
        unsigned long long v;                                                            \
        U *p;                                                                            \
                                                                                         \
        if (!PyArg_ParseTuple(args, "nK:" #name #BITS, &addr, &v))                       \
            return NULL;                                                                 \
        if (!(p = check_addr(addr, sizeof(U), "addr")))                                  \
            return NULL;                                                                 \
        return FROM((S)op(p, (U)v, __ATOMIC_SEQ_CST));                                   \
    }

/* On failure `expected` is updated to the current value; either way it is what was there. */
#define ATOMIC_CMPXCHG(BITS, U, S, FROM)                                                \
    static PyObject *emu_cmpxchg##BITS(PyObject *self, PyObject *args)                   \
    {                                                                                    \
        Py_ssize_t addr;                                                                 \
        unsigned long long oldv, newv;                                                   \
        U *p, expected;                                                                  \
                                                                                         \
        if (!PyArg_ParseTuple(args, "nKK:cmpxchg" #BITS, &addr, &oldv, &newv))           \
            return NULL;                                                                 \
        if (!(p = check_addr(addr, sizeof(U), "addr")))                                  \
            return NULL;                                                                 \
        expected = (U)oldv;                                                              \
        __atomic_compare_exchange_n(p, &expected, (U)newv, 0, __ATOMIC_SEQ_CST,          \
                                    __ATOMIC_SEQ_CST);                                   \
        return FROM((S)expected);                                                        \
    }

#define ATOMICS(BITS, U, S, FROM)                                                       \
    ATOMIC_LOAD(BITS, U, S, FROM)                                                       \
    ATOMIC_STORE(BITS, U, S, FROM)                                                      \
    ATOMIC_RMW(add, __atomic_add_fetch, BITS, U, S, FROM)                               \
    ATOMIC_RMW(xchg, __atomic_exchange_n, BITS, U, S, FROM)                             \
    ATOMIC_RMW(or, __atomic_fetch_or, BITS, U, S, FROM)                                 \
    ATOMIC_RMW(and, __atomic_fetch_and, BITS, U, S, FROM)                               \
    ATOMIC_CMPXCHG(BITS, U, S, FROM)

ATOMICS(32, uint32_t, int32_t, PyLong_FromLong)
ATOMICS(64, uint64_t, int64_t, PyLong_FromLongLong)

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
