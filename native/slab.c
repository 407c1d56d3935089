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

int
emu_slab_exec(PyObject *module)
{
    PyObject *type = PyType_FromSpec(&SharedBuffer_spec);

    if (type == NULL)
        return -1;
    if (PyModule_AddObject(module, "SharedBuffer", type) < 0) {
        Py_DECREF(type);
        return -1;
    }
    return 0;
}
