/*
 * SharedBuffer: the buffer-protocol object behind emu.kmalloc() (emu/slab.py).
 *
 * Why C: Python (before 3.12) cannot give a class of its own the buffer protocol, and
 * a ctypes array over the same memory would hand out views of a block after kfree()
 * without a word. This type exposes `size` bytes at `addr` (in the shared image) as a
 * writable buffer, and checks the allocation's tag word before every new view: if the
 * int64 at `tag_addr` no longer holds `tag`, the block was freed, and the view is
 * refused by calling the object's _stale() method (emu/slab.py raises
 * StaleObjectError there). A view taken before kfree() is a raw pointer, as in C.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>

typedef struct {
    PyObject_HEAD
    char *addr;
    Py_ssize_t size;
    int64_t *tag_addr;
    int64_t tag;
} SharedBuffer;

static PyObject *
SharedBuffer_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    unsigned long long addr, tag_addr;
    Py_ssize_t size;
    long long tag;
    SharedBuffer *self;

    if (!PyArg_ParseTuple(args, "KnKL:SharedBuffer", &addr, &size, &tag_addr, &tag))
        return NULL;
    if (addr == 0 || size < 0 || tag_addr == 0 || tag_addr % 8 != 0) {
        PyErr_SetString(PyExc_ValueError,
                        "SharedBuffer needs a non-zero addr, size >= 0 and an aligned tag_addr");
        return NULL;
    }
    self = (SharedBuffer *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->addr = (char *)(uintptr_t)addr;
    self->size = size;
    self->tag_addr = (int64_t *)(uintptr_t)tag_addr;
    self->tag = tag;
    return (PyObject *)self;
}

static void
SharedBuffer_dealloc(SharedBuffer *self)
{
    PyTypeObject *tp = Py_TYPE(self);

    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static int
SharedBuffer_getbuffer(SharedBuffer *self, Py_buffer *view, int flags)
{
    if (__atomic_load_n(self->tag_addr, __ATOMIC_SEQ_CST) != self->tag) {
        PyObject *res = PyObject_CallMethod((PyObject *)self, "_stale", NULL);

        if (res != NULL) {
            Py_DECREF(res);
            PyErr_SetString(PyExc_BufferError, "the shared buffer was freed");
        }
        view->obj = NULL;
        return -1;
    }
    return PyBuffer_FillInfo(view, (PyObject *)self, self->addr, self->size, 0, flags);
}

static PyObject *
SharedBuffer_live(SharedBuffer *self, PyObject *unused)
{
    return PyBool_FromLong(__atomic_load_n(self->tag_addr, __ATOMIC_SEQ_CST) == self->tag);
}

static PyMethodDef SharedBuffer_methods[] = {
    {"_live", (PyCFunction)SharedBuffer_live, METH_NOARGS,
     "_live(): True while the block's tag word still holds this buffer's tag"},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot SharedBuffer_slots[] = {
    {Py_tp_new, SharedBuffer_new},
    {Py_tp_dealloc, SharedBuffer_dealloc},
    {Py_tp_methods, SharedBuffer_methods},
    {Py_bf_getbuffer, SharedBuffer_getbuffer},
    {Py_tp_doc, "SharedBuffer(addr, size, tag_addr, tag): size writable bytes at addr, "
                "viewable while the int64 at tag_addr holds tag (else self._stale() raises)"},
    {0, NULL},
};

static PyType_Spec SharedBuffer_spec = {
    .name = "_emu_native.SharedBuffer",
    .basicsize = sizeof(SharedBuffer),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .slots = SharedBuffer_slots,
};

/*
 * The kfifo fast path (emu/kfifo.py): one element in or out of the ring whose head is
 * { u32 in, out, mask, esize } at `hdr`, the elements right after it, in a kmalloc'd
 * block whose tag word is at tag_addr. As lib/kfifo.c: the element is copied before
 * `in` (`out`) is published with a release store (the kernel's smp_wmb()), and the
 * other side's index is read with an acquire load. In C because the Python version
 * of these few steps costs several native calls per element.
 */
struct kfifo_head {
    uint32_t in, out, mask, esize;
};

static int
kfifo_args(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, const char *name,
           struct kfifo_head **head, int *live)
{
    unsigned long long hdr, tag_addr;
    long long tag;

    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments", name, want);
        return -1;
    }
    hdr = PyLong_AsUnsignedLongLong(args[0]);
    tag_addr = PyLong_AsUnsignedLongLong(args[1]);
    tag = PyLong_AsLongLong(args[2]);
    if (PyErr_Occurred())
        return -1;
    *live = tag != 0 && tag_addr % 8 == 0 && tag_addr != 0 &&
            __atomic_load_n((int64_t *)(uintptr_t)tag_addr, __ATOMIC_SEQ_CST) == tag;
    *head = (struct kfifo_head *)(uintptr_t)hdr;
    return 0;
}

static PyObject *
emu_kfifo_put1(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    struct kfifo_head *h;
    uint32_t in, out;
    int live;

    if (kfifo_args(args, nargs, 4, "kfifo_put1", &h, &live) < 0)
        return NULL;
    if (!live)
        return PyLong_FromLong(-1);
    if (!PyBytes_Check(args[3]) || PyBytes_GET_SIZE(args[3]) != h->esize) {
        PyErr_SetString(PyExc_ValueError, "kfifo_put1() needs bytes of the element size");
        return NULL;
    }
    in = __atomic_load_n(&h->in, __ATOMIC_RELAXED);  /* only writers move it */
    out = __atomic_load_n(&h->out, __ATOMIC_ACQUIRE);
    if (in - out > h->mask)
        return PyLong_FromLong(0);
    memcpy((char *)(h + 1) + (size_t)(in & h->mask) * h->esize, PyBytes_AS_STRING(args[3]),
           h->esize);
    __atomic_store_n(&h->in, in + 1, __ATOMIC_RELEASE);
    return PyLong_FromLong(1);
}

static PyObject *
emu_kfifo_get1(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    struct kfifo_head *h;
    uint32_t in, out;
    PyObject *item;
    int live;

    if (kfifo_args(args, nargs, 3, "kfifo_get1", &h, &live) < 0)
        return NULL;
    if (!live)
        return PyLong_FromLong(-1);
    out = __atomic_load_n(&h->out, __ATOMIC_RELAXED);  /* only readers move it */
    in = __atomic_load_n(&h->in, __ATOMIC_ACQUIRE);
    if (in == out)
        Py_RETURN_NONE;
    item = PyBytes_FromStringAndSize((char *)(h + 1) + (size_t)(out & h->mask) * h->esize,
                                     h->esize);
    if (item != NULL)
        __atomic_store_n(&h->out, out + 1, __ATOMIC_RELEASE);
    return item;
}

static PyMethodDef slab_methods[] = {
    {"kfifo_put1", (PyCFunction)(void (*)(void))emu_kfifo_put1, METH_FASTCALL,
     "kfifo_put1(hdr, tag_addr, tag, item, /): put bytes `item` (one element) in the kfifo "
     "at hdr; 1 if put, 0 if full, -1 if the block's tag no longer holds tag"},
    {"kfifo_get1", (PyCFunction)(void (*)(void))emu_kfifo_get1, METH_FASTCALL,
     "kfifo_get1(hdr, tag_addr, tag, /): the oldest element of the kfifo at hdr as bytes, "
     "None if empty, -1 if the block's tag no longer holds tag"},
    {NULL, NULL, 0, NULL},
};

int
emu_slab_exec(PyObject *module)
{
    if (PyModule_AddFunctions(module, slab_methods) < 0)
        return -1;
    PyObject *type = PyType_FromSpec(&SharedBuffer_spec);

    if (type == NULL)
        return -1;
    if (PyModule_AddObject(module, "SharedBuffer", type) < 0) {
        Py_DECREF(type);
        return -1;
    }
    return 0;
}
