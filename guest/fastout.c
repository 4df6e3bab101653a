/* The lean write of guest/outstream.py, compiled: the same steps in the same order, with
 * no Python frame per write.
 *
 * Why: under an emulated CPU (QEMU TCG) each interpreted bytecode costs ~0.5-1 us, and the
 * Python lean write (guest/outstream.py's ``lean_write``) is ~25 of them: 27-32 us a write,
 * so 200,000 small writes kept the kernel busy 6-7 s while the bare loop takes 0.23 s.
 * Here each step is one call into C that the interpreter would have made anyway (a context
 * variable's get, the buffer lock, ...). Under TCG even those calls are dear (~0.3 us each,
 * measured in a guest: a call through Python's call machinery, such as StringIO.write's,
 * several): the hot path makes as few as it can, hence the Buffer and the history's list
 * of chunks appended to directly (a write with the cell's history: 7-8 us -> 5-6 us).
 *
 * What it does is outstream.lean_write's, step for step; see there for why each is needed:
 *   - anything unusual (not exactly a str, a forked child, an echo stream, a closed stream)
 *     goes through ipykernel's own OutStream.write;
 *   - otherwise the text goes to ipykernel's buffer for the parent header in the writer's
 *     context (the same buffer ipykernel would pick: frozenset(parent.items()) in the
 *     stream's _buffers), under ipykernel's buffer lock, found by identity of the parent
 *     and of the buffer table since the last write; a flush is scheduled if none is pending.
 *     Where the table has no buffer for that parent yet, the buffer put there is a Buffer
 *     of this module (StringIO's write, getvalue and close over a list of the pieces
 *     written), which takes a write as one list append;
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
#include <pthread.h>

typedef struct {
    PyObject_HEAD
    PyObject *stream;       /* the ipykernel OutStream */
    PyObject *state;        /* its instance __dict__, where its plain attributes live */
    PyObject *full_write;   /* type(stream).write, called as full_write(stream, text) */
    PyObject *get_parent;   /* stream._parent_header.get (a ContextVar's) */
    PyObject *acquire;      /* stream._buffer_lock.acquire */
    PyObject *release;      /* stream._buffer_lock.release */
    PyObject *forked;       /* a list: [True] in a forked child (read when the writer is made) */
    int child;              /* made in a forked child: every write takes the full path */
    PyObject *last_parent;  /* the parent header, buffer table and buffer write of last time */
    PyObject *last_buffers;
    PyObject *last_put;
    PyObject *last_buffer;  /* that buffer, if it is a Buffer of this module (else NULL) */
    /* the history entry written to last and its list of chunks (history.last, as of the
     * writer's last call of history.add) */
    PyObject *entry, *chunks;
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

/* set in a child process made by fork (pthread_atfork): its writes take ipykernel's path */
static volatile int forked_child;

static void
after_fork_in_child(void)
{
    forked_child = 1;
}

/* ipykernel's per-cell output buffer, for the writes of this module.
 *
 * ipykernel keeps a StringIO per parent header in OutStream._buffers and uses three of
 * its methods: write (from OutStream.write), then getvalue and close (from the flush, on
 * its IO thread, after it swapped the table). Where the table has no buffer for a parent
 * yet, the compiled write puts one of these there instead: the same three methods, but
 * the text is kept as the list of the str objects written and joined once at getvalue,
 * so that the compiled write adds a piece with one list append instead of calling
 * StringIO.write through Python's call machinery (under TCG the call was most of a
 * small write's cost). ipykernel's own write (for what the compiled write leaves to it)
 * calls write here and lands in the same list, in order. */
typedef struct {
    PyObject_HEAD
    PyObject *pieces;   /* a list of str; NULL once closed */
} Buffer;

static PyObject *BufferType;

static void
Buffer_dealloc(Buffer *self)
{
    PyTypeObject *tp = Py_TYPE((PyObject *)self);
    Py_CLEAR(self->pieces);
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    tp_free(self);
    Py_DECREF(tp);
}

static PyObject *
Buffer_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    if (!PyArg_ParseTuple(args, ":Buffer") || (kwargs != NULL && PyDict_Size(kwargs) > 0)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "Buffer() takes no arguments");
        return NULL;
    }
    allocfunc tp_alloc = (allocfunc)PyType_GetSlot(type, Py_tp_alloc);
    Buffer *self = (Buffer *)tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    if ((self->pieces = PyList_New(0)) == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int
buffer_closed(Buffer *self)
{
    if (self->pieces != NULL)
        return 0;
    PyErr_SetString(PyExc_ValueError, "I/O operation on closed file.");
    return 1;
}

static PyObject *
Buffer_write(Buffer *self, PyObject *text)
{
    if (!PyUnicode_Check(text)) {
        PyObject *name = PyType_GetName(Py_TYPE(text));
        if (name != NULL) {
            PyErr_Format(PyExc_TypeError, "string argument expected, got '%U'", name);
            Py_DECREF(name);
        }
        return NULL;
    }
    if (buffer_closed(self) || PyList_Append(self->pieces, text) < 0)
        return NULL;
    return PyLong_FromSsize_t(PyUnicode_GetLength(text));
}

static PyObject *
Buffer_getvalue(Buffer *self, PyObject *unused)
{
    if (buffer_closed(self))
        return NULL;
    PyObject *empty = PyUnicode_FromStringAndSize("", 0);
    if (empty == NULL)
        return NULL;
    PyObject *value = PyUnicode_Join(empty, self->pieces);
    Py_DECREF(empty);
    return value;
}

static PyObject *
Buffer_close(Buffer *self, PyObject *unused)
{
    Py_CLEAR(self->pieces);
    Py_RETURN_NONE;
}

static PyObject *
Buffer_get_closed(Buffer *self, void *unused)
{
    return PyBool_FromLong(self->pieces == NULL);
}

static PyMethodDef Buffer_methods[] = {
    {"write", (PyCFunction)Buffer_write, METH_O, "Add text; its length, as StringIO.write."},
    {"getvalue", (PyCFunction)Buffer_getvalue, METH_NOARGS, "All the text written, as StringIO.getvalue."},
    {"close", (PyCFunction)Buffer_close, METH_NOARGS, "Drop the text; later writes and reads raise ValueError."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Buffer_getset[] = {
    {"closed", (getter)Buffer_get_closed, NULL, "True once closed.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot Buffer_slots[] = {
    {Py_tp_doc, "ipykernel's per-parent output buffer (write, getvalue, close), as a list of the pieces written."},
    {Py_tp_new, Buffer_new},
    {Py_tp_dealloc, Buffer_dealloc},
    {Py_tp_methods, Buffer_methods},
    {Py_tp_getset, Buffer_getset},
    {0, NULL},
};

static PyType_Spec Buffer_spec = {
    "_vmkg_fastout.Buffer", sizeof(Buffer), 0, Py_TPFLAGS_DEFAULT, Buffer_slots,
};

static int
Writer_traverse(Writer *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE((PyObject *)self));
    Py_VISIT(self->stream); Py_VISIT(self->state); Py_VISIT(self->full_write); Py_VISIT(self->get_parent);
    Py_VISIT(self->acquire); Py_VISIT(self->release); Py_VISIT(self->forked);
    Py_VISIT(self->last_parent); Py_VISIT(self->last_buffers); Py_VISIT(self->last_put);
    Py_VISIT(self->last_buffer); Py_VISIT(self->entry); Py_VISIT(self->chunks);
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
    Py_CLEAR(self->last_buffer); Py_CLEAR(self->entry); Py_CLEAR(self->chunks);
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
    self->child = PyList_GetItem(forked, 0) == Py_True;
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

/* add the text to a buffer found before: one list append for a Buffer of this module
 * (unless it was closed: then its write raises as StringIO's would), else its write */
static int
put_text(Writer *self, PyObject *text)
{
    if (self->last_buffer != NULL && ((Buffer *)self->last_buffer)->pieces != NULL)
        return PyList_Append(((Buffer *)self->last_buffer)->pieces, text);
    return call1(self->last_put, text);
}

/* the text into the parent's buffer.
 *
 * ipykernel takes its buffer lock around picking the buffer and writing to it, because
 * its flush thread swaps the buffer table (under that lock) and then reads the old
 * table's buffers. Where the parent and the table are those of the last write, reading
 * the table and writing to the cached buffer is one step here: no Python code runs in
 * between (attribute reads of plain attributes, a list append or StringIO.write), so the
 * GIL is not let go and the swap lands wholly before (the write is read with the old
 * table) or after (the table differs, and this takes the lock). Finding a buffer anew can
 * run Python code (hashing the header's values, a collection), so it is done under the
 * lock as ipykernel does; where the table (a dict, as ipykernel's defaultdict) has no
 * buffer for the parent yet, a Buffer of this module is put there (see Buffer). */
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
        return put_text(self, text);
    }
    Py_DECREF(buffers);
    if (call0(self->acquire) < 0) {
        Py_DECREF(parent);
        return -1;
    }
    int rc = -1;
    PyObject *buf = NULL;
    if ((buffers = attr(self, s_buffers)) == NULL)
        goto release;
    PyObject *items = PyObject_CallMethodObjArgs(parent, s_items, NULL);
    if (items == NULL)
        goto release;
    PyObject *key = PyFrozenSet_New(items);
    Py_DECREF(items);
    if (key == NULL)
        goto release;
    if (PyDict_Check(buffers)) {
        buf = PyDict_GetItemWithError(buffers, key);  /* borrowed; no __missing__ */
        if (buf != NULL) {
            Py_INCREF(buf);
        } else if (!PyErr_Occurred()
                   && (buf = PyObject_CallNoArgs(BufferType)) != NULL
                   && PyDict_SetItem(buffers, key, buf) < 0) {
            Py_CLEAR(buf);
        }
    } else {
        buf = PyObject_GetItem(buffers, key);
    }
    Py_DECREF(key);
    if (buf == NULL)
        goto release;
    PyObject *put = PyObject_GetAttr(buf, s_write);
    if (put == NULL)
        goto release;
    Py_XDECREF(self->last_parent);
    Py_XDECREF(self->last_buffers);
    Py_XDECREF(self->last_put);
    Py_CLEAR(self->last_buffer);
    self->last_parent = Py_NewRef(parent);
    self->last_buffers = Py_NewRef(buffers);
    self->last_put = put;
    if (Py_TYPE(buf) == (PyTypeObject *)BufferType)
        self->last_buffer = Py_NewRef(buf);
    rc = put_text(self, text);
release:
    Py_XDECREF(buf);
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
    if (self->entry != NULL && outputs != NULL && PyList_Check(outputs)) {
        Py_ssize_t n = PyList_Size(outputs);
        if (n > 0 && PyList_GetItem(outputs, n - 1) == self->entry)
            return PyList_Append(self->chunks, text);
    }
    if (call1(self->add, text) < 0)
        return -1;
    /* the entry add wrote to, and its chunks, for the next write (history.last) */
    Py_CLEAR(self->entry);
    Py_CLEAR(self->chunks);
    PyObject *entry = PyList_GetItem(self->seen, 0), *chunks = PyList_GetItem(self->seen, 1);
    if (entry != NULL && chunks != NULL && entry != Py_None && PyList_Check(chunks)) {
        self->entry = Py_NewRef(entry);
        self->chunks = Py_NewRef(chunks);
    }
    PyErr_Clear();  /* a last list someone shortened: no cache, add decides next time */
    return 0;
}

static PyObject *
Writer_write(Writer *self, PyObject *text)
{
    PyObject *result;
    int plain = PyUnicode_CheckExact(text) && !self->child && !forked_child;
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
    Py_ssize_t length = 0;
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
        int pending = flag == Py_True ? 1 : flag == Py_False ? 0 : PyObject_IsTrue(flag);
        Py_DECREF(flag);
        if (pending < 0)
            return NULL;
        if (!pending) {
            PyObject *r = PyObject_CallMethodObjArgs(self->stream, s_schedule_flush, NULL);
            if (r == NULL)
                return NULL;
            Py_DECREF(r);
        }
        length = PyUnicode_GetLength(text);
        result = PyLong_FromSsize_t(length);
        if (result == NULL)
            return NULL;
    }
    if (self->add != NULL) {
        int nonempty = plain ? length > 0 : PyObject_IsTrue(text);
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
    if (BufferType == NULL) {
        if ((BufferType = PyType_FromSpec(&Buffer_spec)) == NULL) {
            Py_DECREF(m);
            return NULL;
        }
        if (pthread_atfork(NULL, NULL, after_fork_in_child) != 0) {
            Py_CLEAR(BufferType);
            Py_DECREF(m);
            PyErr_SetString(PyExc_OSError, "pthread_atfork failed");
            return NULL;
        }
    }
    if (PyModule_AddObject(m, "Buffer", Py_NewRef(BufferType)) < 0) {
        Py_DECREF(BufferType);
        Py_DECREF(m);
        return NULL;
    }
    PyObject *type = PyType_FromSpec(&Writer_spec);
    if (type == NULL || PyModule_AddObject(m, "Writer", type) < 0) {
        Py_XDECREF(type);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
