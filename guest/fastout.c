/* The lean write of guest/outstream.py, compiled: the same steps in the same order, with
 * no Python frame per write.
 *
 * Why: under an emulated CPU (QEMU TCG) each interpreted bytecode costs ~0.5-1 us, and the
 * Python lean write (guest/outstream.py's ``lean_write``) is ~25 of them: 27-32 us a write,
 * so 200,000 small writes kept the kernel busy 6-7 s while the bare loop takes 0.23 s.
 * Here each step is one call into C that the interpreter would have made anyway (a context
 * variable's get, the buffer lock, the cell's StringIO.write, ...).
 *
 * What it does is outstream.lean_write's, step for step; see there for why each is needed:
 *   - anything unusual (not exactly a str, a forked child, an echo stream, a closed stream)
 *     goes through ipykernel's own OutStream.write;
 *   - otherwise the text goes to ipykernel's buffer for the parent header in the writer's
 *     context (the same buffer ipykernel would pick: frozenset(parent.items()) in the
 *     stream's _buffers), under ipykernel's buffer lock, found by identity of the parent
 *     and of the buffer table since the last write; a flush is scheduled if none is pending;
 *   - given the running cell's history (outstream.CellHistory), IPython's _tee rule:
 *     kept for %notebook unless a display is publishing, the displayhook is active or a
 *     traceback is being shown; appended to the entry written last if it is still last,
 *     else CellHistory.add decides.
 *
 * Stable ABI (Py_LIMITED_API 3.11): one build serves every CPython >= 3.11, the guest's
 * Debian Python and the host's test Pythons alike. The kernel loads it with
 * outstream.load_extension(path); without it, outstream's Python lean write is used.
 */
#define Py_LIMITED_API 0x030B0000
#define PY_SSIZE_T_CLEAN
#include <Python.h>

typedef struct {
    PyObject_HEAD
    PyObject *stream;       /* the ipykernel OutStream */
    PyObject *state;        /* its instance __dict__, where its plain attributes live */
    PyObject *full_write;   /* type(stream).write, called as full_write(stream, text) */
    PyObject *get_parent;   /* stream._parent_header.get (a ContextVar's) */
    PyObject *acquire;      /* stream._buffer_lock.acquire */
    PyObject *release;      /* stream._buffer_lock.release */
    PyObject *forked;       /* a list: [True] in a forked child */
    PyObject *last_parent;  /* the parent header, buffer table and buffer write of last time */
    PyObject *last_buffers;
    PyObject *last_put;
    /* the running cell's stream history, or all NULL */
    PyObject *publishing, *active, *shell, *by_counter, *count, *seen, *add;
    /* where the flags live, if in an instance dict (else NULL: the readers above) */
    PyObject *publishing_state, *publishing_key, *active_state, *active_key, *shell_state;
} Writer;

static PyObject *s_echo, *s_pub_thread, *s_parent_global, *s_buffers, *s_flush_pending,
    *s_schedule_flush, *s_showing_traceback, *s_items, *s_write, *s_get, *s_acquire,
    *s_release, *s_publishing, *s_active, *s_shell, *s_by_counter, *s_count, *s_last, *s_add,
    *s_parent_header, *s_buffer_lock, *s_dict, *s_publishing_at, *s_active_at;
/* the default of the parent header's get: the context variable is not set */
static PyObject *unset;

static int
Writer_traverse(Writer *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE((PyObject *)self));
    Py_VISIT(self->stream); Py_VISIT(self->state); Py_VISIT(self->full_write); Py_VISIT(self->get_parent);
    Py_VISIT(self->acquire); Py_VISIT(self->release); Py_VISIT(self->forked);
    Py_VISIT(self->last_parent); Py_VISIT(self->last_buffers); Py_VISIT(self->last_put);
    Py_VISIT(self->publishing); Py_VISIT(self->active); Py_VISIT(self->shell);
    Py_VISIT(self->by_counter); Py_VISIT(self->count); Py_VISIT(self->seen); Py_VISIT(self->add);
    Py_VISIT(self->publishing_state); Py_VISIT(self->publishing_key);
    Py_VISIT(self->active_state); Py_VISIT(self->active_key); Py_VISIT(self->shell_state);
    return 0;
}

static int
Writer_clear(Writer *self)
{
    Py_CLEAR(self->stream); Py_CLEAR(self->state); Py_CLEAR(self->full_write); Py_CLEAR(self->get_parent);
    Py_CLEAR(self->acquire); Py_CLEAR(self->release); Py_CLEAR(self->forked);
    Py_CLEAR(self->last_parent); Py_CLEAR(self->last_buffers); Py_CLEAR(self->last_put);
    Py_CLEAR(self->publishing); Py_CLEAR(self->active); Py_CLEAR(self->shell);
    Py_CLEAR(self->by_counter); Py_CLEAR(self->count); Py_CLEAR(self->seen); Py_CLEAR(self->add);
    Py_CLEAR(self->publishing_state); Py_CLEAR(self->publishing_key);
    Py_CLEAR(self->active_state); Py_CLEAR(self->active_key); Py_CLEAR(self->shell_state);
    return 0;
}

static void
Writer_dealloc(Writer *self)
{
    PyTypeObject *tp = Py_TYPE((PyObject *)self);
    PyObject_GC_UnTrack(self);
    Writer_clear(self);
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    tp_free(self);
    Py_DECREF(tp);
}

/* history.<name>: (an instance dict, a key) or None -> *state, *key (NULL if None) */
static int
flag_source(PyObject *history, PyObject *name, PyObject **state, PyObject **key)
{
    PyObject *at = PyObject_GetAttr(history, name);
    if (at == NULL)
        return -1;
    if (at == Py_None) {
        Py_DECREF(at);
        return 0;
    }
    PyObject *d = NULL, *k = NULL;
    if (!PyTuple_Check(at) || PyTuple_Size(at) != 2 || !PyDict_Check(d = PyTuple_GetItem(at, 0))
        || !PyUnicode_Check(k = PyTuple_GetItem(at, 1))) {
        Py_DECREF(at);
        PyErr_Format(PyExc_TypeError, "history.%U must be (a dict, a str) or None", name);
        return -1;
    }
    *state = Py_NewRef(d);
    *key = Py_NewRef(k);
    Py_DECREF(at);
    return 0;
}

/* Writer(stream, full_write, forked, history=None) */
static PyObject *
Writer_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *stream, *full_write, *forked, *history = Py_None;
    static char *kwlist[] = {"stream", "full_write", "forked", "history", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO!|O", kwlist, &stream, &full_write,
                                     &PyList_Type, &forked, &history))
        return NULL;
    if (PyList_Size(forked) != 1) {
        PyErr_SetString(PyExc_ValueError, "forked must be a list of one flag");
        return NULL;
    }
    allocfunc tp_alloc = (allocfunc)PyType_GetSlot(type, Py_tp_alloc);
    Writer *self = (Writer *)tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    PyObject *var = NULL, *lock = NULL;
    self->stream = Py_NewRef(stream);
    self->full_write = Py_NewRef(full_write);
    self->forked = Py_NewRef(forked);
    if ((self->state = PyObject_GetAttr(stream, s_dict)) == NULL)
        goto fail;
    if (!PyDict_Check(self->state)) {
        PyErr_SetString(PyExc_TypeError, "the stream's __dict__ is not a dict");
        goto fail;
    }
    {   /* a name the class defines (a property, say) is read as attribute access reads it */
        PyObject *names[] = {s_echo, s_pub_thread, s_buffers, s_flush_pending, s_parent_global};
        for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
            int has = PyObject_HasAttr((PyObject *)Py_TYPE(stream), names[i]);
            if (has) {
                Py_CLEAR(self->state);
                break;
            }
        }
    }
    if ((var = PyObject_GetAttr(stream, s_parent_header)) == NULL
        || (self->get_parent = PyObject_GetAttr(var, s_get)) == NULL
        || (lock = PyObject_GetAttr(stream, s_buffer_lock)) == NULL
        || (self->acquire = PyObject_GetAttr(lock, s_acquire)) == NULL
        || (self->release = PyObject_GetAttr(lock, s_release)) == NULL)
        goto fail;
    if (history != Py_None) {
        PyObject *seen;
        if ((self->publishing = PyObject_GetAttr(history, s_publishing)) == NULL
            || (self->active = PyObject_GetAttr(history, s_active)) == NULL
            || (self->shell = PyObject_GetAttr(history, s_shell)) == NULL
            || (self->by_counter = PyObject_GetAttr(history, s_by_counter)) == NULL
            || (self->count = PyObject_GetAttr(history, s_count)) == NULL
            || (seen = PyObject_GetAttr(history, s_last)) == NULL)
            goto fail;
        self->seen = seen;
        if (!PyDict_Check(self->by_counter) || !PyList_Check(seen) || PyList_Size(seen) != 2) {
            PyErr_SetString(PyExc_TypeError, "history: outputs_by_counter must be a dict and last a list of two");
            goto fail;
        }
        if ((self->add = PyObject_GetAttr(history, s_add)) == NULL
            || flag_source(history, s_publishing_at, &self->publishing_state, &self->publishing_key) < 0
            || flag_source(history, s_active_at, &self->active_state, &self->active_key) < 0)
            goto fail;
        /* showing_traceback is a plain instance attribute of IPython's shell: read it from
         * the instance dict unless the class defines the name */
        int has = PyObject_HasAttr((PyObject *)Py_TYPE(self->shell), s_showing_traceback);
        if (!has) {
            PyObject *d = PyObject_GetAttr(self->shell, s_dict);
            if (d != NULL && PyDict_Check(d))
                self->shell_state = d;
            else
                Py_XDECREF(d);
            PyErr_Clear();
        }
    }
    Py_DECREF(var);
    Py_DECREF(lock);
    return (PyObject *)self;
fail:
    Py_XDECREF(var);
    Py_XDECREF(lock);
    Py_DECREF(self);
    return NULL;
}

/* call fn() and drop its result; -1 on error */
static int
call0(PyObject *fn)
{
    PyObject *r = PyObject_CallNoArgs(fn);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* call fn(arg) and drop its result; -1 on error */
static int
call1(PyObject *fn, PyObject *arg)
{
    PyObject *r = PyObject_CallFunctionObjArgs(fn, arg, NULL);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* 1 if obj.<name> is true, 0 if not, -1 on error */
static int
attr_true(PyObject *obj, PyObject *name)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    int t = PyObject_IsTrue(v);
    Py_DECREF(v);
    return t;
}

/* 1 if fn() is true, 0 if not, -1 on error */
static int
call_true(PyObject *fn)
{
    PyObject *v = PyObject_CallNoArgs(fn);
    if (v == NULL)
        return -1;
    int t = PyObject_IsTrue(v);
    Py_DECREF(v);
    return t;
}

/* stream.<name>, new reference: read from the instance dict when the class does not define
 * the name (checked when the writer is made), which is what attribute access would find */
static PyObject *
attr(Writer *self, PyObject *name)
{
    if (self->state != NULL) {
        PyObject *v = PyDict_GetItemWithError(self->state, name);  /* borrowed */
        if (v != NULL)
            return Py_NewRef(v);
        if (PyErr_Occurred())
            return NULL;
    }
    return PyObject_GetAttr(self->stream, name);
}

/* the parent header in the writer's context (else the stream's global one), new reference */
static PyObject *
current_parent(Writer *self)
{
    PyObject *parent = PyObject_CallFunctionObjArgs(self->get_parent, unset, NULL);
    if (parent != unset)
        return parent;
    Py_DECREF(parent);
    return attr(self, s_parent_global);
}

/* the text into the parent's buffer.
 *
 * ipykernel takes its buffer lock around picking the buffer and writing to it, because
 * its flush thread swaps the buffer table (under that lock) and then reads the old
 * table's buffers. Where the parent and the table are those of the last write, reading
 * the table and writing to the cached buffer is one step here: no Python code runs in
 * between (attribute reads of plain attributes, StringIO.write), so the GIL is not let go
 * and the swap lands wholly before (the write is read with the old table) or after (the
 * table differs, and this takes the lock). Finding a buffer anew can run Python code
 * (hashing the header's values, a collection), so it is done under the lock as ipykernel
 * does. */
static int
buffer_text(Writer *self, PyObject *text)
{
    PyObject *parent = current_parent(self);
    if (parent == NULL)
        return -1;
    PyObject *buffers = attr(self, s_buffers);
    if (buffers == NULL) {
        Py_DECREF(parent);
        return -1;
    }
    if (parent == self->last_parent && buffers == self->last_buffers) {
        Py_DECREF(parent);
        Py_DECREF(buffers);
        return call1(self->last_put, text);
    }
    Py_DECREF(buffers);
    if (call0(self->acquire) < 0) {
        Py_DECREF(parent);
        return -1;
    }
    int rc = -1;
    if ((buffers = attr(self, s_buffers)) == NULL)
        goto release;
    PyObject *items = PyObject_CallMethodObjArgs(parent, s_items, NULL);
    if (items == NULL)
        goto release;
    PyObject *key = PyFrozenSet_New(items);
    Py_DECREF(items);
    if (key == NULL)
        goto release;
    PyObject *buf = PyObject_GetItem(buffers, key);
    Py_DECREF(key);
    if (buf == NULL)
        goto release;
    PyObject *put = PyObject_GetAttr(buf, s_write);
    Py_DECREF(buf);
    if (put == NULL)
        goto release;
    Py_XDECREF(self->last_parent);
    Py_XDECREF(self->last_buffers);
    Py_XDECREF(self->last_put);
    self->last_parent = Py_NewRef(parent);
    self->last_buffers = Py_NewRef(buffers);
    self->last_put = put;
    rc = call1(put, text);
release:
    Py_XDECREF(buffers);
    Py_DECREF(parent);
    {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);  /* a failed write still lets go of the lock */
        if (call0(self->release) < 0) {
            Py_XDECREF(type); Py_XDECREF(value); Py_XDECREF(tb);
            return -1;
        }
        PyErr_Restore(type, value, tb);
    }
    return rc;
}

/* 1 if a flag is set, 0 if not, -1 on error: read from state[key] where given and present,
 * else by calling its reader */
static int
flag(PyObject *state, PyObject *key, PyObject *reader)
{
    if (state != NULL) {
        PyObject *v = PyDict_GetItemWithError(state, key);  /* borrowed */
        if (v != NULL)
            return PyObject_IsTrue(v);
        if (PyErr_Occurred())
            return -1;
    }
    return call_true(reader);
}

/* IPython's _tee: keep the text in the cell's stream history */
static int
keep_history(Writer *self, PyObject *text)
{
    int t;
    if ((t = flag(self->publishing_state, self->publishing_key, self->publishing)) != 0)
        return t < 0 ? -1 : 0;
    if ((t = flag(self->active_state, self->active_key, self->active)) != 0)
        return t < 0 ? -1 : 0;
    if (self->shell_state != NULL) {
        PyObject *v = PyDict_GetItemWithError(self->shell_state, s_showing_traceback);
        if (v == NULL && PyErr_Occurred())
            return -1;
        t = v != NULL ? PyObject_IsTrue(v) : attr_true(self->shell, s_showing_traceback);
    } else {
        t = attr_true(self->shell, s_showing_traceback);
    }
    if (t != 0)
        return t < 0 ? -1 : 0;
    PyObject *outputs = PyDict_GetItemWithError(self->by_counter, self->count);  /* borrowed */
    if (outputs == NULL && PyErr_Occurred())
        return -1;
    if (outputs != NULL && PyList_Check(outputs)) {
        Py_ssize_t n = PyList_Size(outputs);
        if (n > 0 && PyList_GetItem(outputs, n - 1) == PyList_GetItem(self->seen, 0))
            return call1(PyList_GetItem(self->seen, 1), text);
    }
    return call1(self->add, text);
}

static PyObject *
Writer_write(Writer *self, PyObject *text)
{
    PyObject *result;
    int plain = PyUnicode_CheckExact(text) && PyList_GetItem(self->forked, 0) != Py_True;
    if (plain) {
        PyObject *echo = attr(self, s_echo);
        if (echo == NULL)
            return NULL;
        plain = echo == Py_None;
        Py_DECREF(echo);
    }
    if (plain) {
        PyObject *pub = attr(self, s_pub_thread);
        if (pub == NULL)
            return NULL;
        plain = pub != Py_None;
        Py_DECREF(pub);
    }
    if (!plain) {
        result = PyObject_CallFunctionObjArgs(self->full_write, self->stream, text, NULL);
        if (result == NULL)
            return NULL;
    } else {
        if (buffer_text(self, text) < 0)
            return NULL;
        PyObject *flag = attr(self, s_flush_pending);
        if (flag == NULL)
            return NULL;
        int pending = PyObject_IsTrue(flag);
        Py_DECREF(flag);
        if (pending < 0)
            return NULL;
        if (!pending) {
            PyObject *r = PyObject_CallMethodObjArgs(self->stream, s_schedule_flush, NULL);
            if (r == NULL)
                return NULL;
            Py_DECREF(r);
        }
        result = PyLong_FromSsize_t(PyUnicode_GetLength(text));
        if (result == NULL)
            return NULL;
    }
    if (self->add != NULL) {
        int nonempty = PyObject_IsTrue(text);
        if (nonempty < 0 || (nonempty && keep_history(self, text) < 0)) {
            Py_DECREF(result);
            return NULL;
        }
    }
    return result;
}

static PyMethodDef Writer_methods[] = {
    {"write", (PyCFunction)Writer_write, METH_O,
     "Write text to the stream as ipykernel's OutStream.write would (and keep it in the "
     "cell's stream history, as IPython's _tee would, if the writer was given one)."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Writer_slots[] = {
    {Py_tp_doc, "The compiled lean write of one ipykernel OutStream (see guest/outstream.py)."},
    {Py_tp_new, Writer_new},
    {Py_tp_dealloc, Writer_dealloc},
    {Py_tp_traverse, Writer_traverse},
    {Py_tp_clear, Writer_clear},
    {Py_tp_methods, Writer_methods},
    {0, NULL},
};

static PyType_Spec Writer_spec = {
    "_vmkg_fastout.Writer", sizeof(Writer), 0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC, Writer_slots,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_vmkg_fastout",
    "The compiled lean write path of guest/outstream.py.", -1, NULL, NULL, NULL, NULL, NULL,
};

#define INTERN(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL

PyMODINIT_FUNC
PyInit__vmkg_fastout(void)
{
    INTERN(s_echo, "echo"); INTERN(s_pub_thread, "pub_thread");
    INTERN(s_parent_global, "_parent_header_global"); INTERN(s_buffers, "_buffers");
    INTERN(s_flush_pending, "_flush_pending"); INTERN(s_schedule_flush, "_schedule_flush");
    INTERN(s_showing_traceback, "showing_traceback"); INTERN(s_items, "items");
    INTERN(s_write, "write"); INTERN(s_get, "get"); INTERN(s_acquire, "acquire");
    INTERN(s_release, "release"); INTERN(s_publishing, "publishing"); INTERN(s_active, "active");
    INTERN(s_shell, "shell"); INTERN(s_by_counter, "outputs_by_counter");
    INTERN(s_count, "execution_count"); INTERN(s_last, "last"); INTERN(s_add, "add");
    INTERN(s_parent_header, "_parent_header"); INTERN(s_buffer_lock, "_buffer_lock");
    INTERN(s_dict, "__dict__"); INTERN(s_publishing_at, "publishing_at"); INTERN(s_active_at, "active_at");
    if (unset == NULL && (unset = PyObject_CallNoArgs((PyObject *)&PyBaseObject_Type)) == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    PyObject *type = PyType_FromSpec(&Writer_spec);
    if (type == NULL || PyModule_AddObject(m, "Writer", type) < 0) {
        Py_XDECREF(type);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
