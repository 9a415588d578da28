/* mpipub._fastpub: publish_data's common case in C (optional; mpipub works without it).
 *
 * Why: a 64 KiB publish_data in Python cost 2.4-4.7x a numpy.copyto of the same array
 * (benchmarks/, row 3), nearly all of it interpreter work around the one memcpy. Here the
 * whole call is one C function: it copies the arrays into the open batch's slab and appends
 * the publication's metadata exactly as packing.Batch.add would.
 *
 * It only handles what is plain: a dict with str keys whose values are int, float, bool,
 * complex, str, bytes or None, or numpy arrays (exact ndarray, a dtype packing has found
 * plain, C-contiguous, at most SLAB_ITEM_MAX bytes) that fit in the slab. For anything else
 * (and when the lock is taken, an abort poll is due, the sender failed, or no slab is ready)
 * it changes nothing and returns False: the Python path (sender.Sender.publish) then does
 * the call, and it stays the reference for what a publication is.
 *
 * The two base types hold the state both paths share, as C fields that Python sees as
 * attributes: BatchBase (packing.Batch) and SenderBase (sender.Sender).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <string.h>
#include <time.h>

#define MAX_ITEMS 32

/* set by configure(): constants and objects owned by the Python modules */
static PyObject *ndarray_type;  /* numpy.ndarray */
static PyObject *plain_dtypes;  /* packing._plain_dtypes: dtype -> str ("" when pickled) */
static PyObject *str_dtype, *str_shape, *str_post_sealed;
static Py_ssize_t slab_item_max = -1, slab_bytes, align = 64, batch_bytes, batch_pubs;
static double max_age_s, wake_slack_s;
static long code_value, code_array;

/* ---------------------------------------------------------------- BatchBase */
typedef struct {
    PyObject_HEAD
    PyObject *task_id, *pubs, *recycle, *bufs, *slab, *slab_mv, *pool;
    Py_ssize_t nbytes, slab_index, slab_off;
    double first_t;
} BatchBase;

static int batch_init(BatchBase *self, PyObject *args, PyObject *kw) {
    PyObject *task_id, *pool;
    static char *names[] = {"task_id", "pool", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO", names, &task_id, &pool)) return -1;
    PyObject *pubs = PyList_New(0), *recycle = PyList_New(0), *bufs = PyList_New(0);
    if (!pubs || !recycle || !bufs) {
        Py_XDECREF(pubs); Py_XDECREF(recycle); Py_XDECREF(bufs);
        return -1;
    }
    Py_INCREF(task_id); Py_INCREF(pool);
    Py_XSETREF(self->task_id, task_id);
    Py_XSETREF(self->pool, pool);
    Py_XSETREF(self->pubs, pubs);
    Py_XSETREF(self->recycle, recycle);
    Py_XSETREF(self->bufs, bufs);
    Py_CLEAR(self->slab);
    Py_CLEAR(self->slab_mv);
    self->nbytes = 0;
    self->slab_index = -1;
    self->slab_off = 0;
    self->first_t = 0.0;
    return 0;
}

static int batch_traverse(BatchBase *self, visitproc visit, void *arg) {
    Py_VISIT(self->task_id); Py_VISIT(self->pubs); Py_VISIT(self->recycle);
    Py_VISIT(self->bufs); Py_VISIT(self->slab); Py_VISIT(self->slab_mv); Py_VISIT(self->pool);
    return 0;
}

static int batch_clear(BatchBase *self) {
    Py_CLEAR(self->task_id); Py_CLEAR(self->pubs); Py_CLEAR(self->recycle);
    Py_CLEAR(self->bufs); Py_CLEAR(self->slab); Py_CLEAR(self->slab_mv); Py_CLEAR(self->pool);
    return 0;
}

static void batch_dealloc(BatchBase *self) {
    PyObject_GC_UnTrack(self);
    batch_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef batch_members[] = {
    {"task_id", T_OBJECT, offsetof(BatchBase, task_id), 0, NULL},
    {"pubs", T_OBJECT, offsetof(BatchBase, pubs), 0, "[(step, time, nbytes, entries)]"},
    {"recycle", T_OBJECT, offsetof(BatchBase, recycle), 0, "pooled buffers to give back"},
    {"_bufs", T_OBJECT, offsetof(BatchBase, bufs), 0, NULL},
    {"_slab", T_OBJECT, offsetof(BatchBase, slab), 0, NULL},
    {"_slab_mv", T_OBJECT, offsetof(BatchBase, slab_mv), 0, NULL},
    {"_pool", T_OBJECT, offsetof(BatchBase, pool), 0, NULL},
    {"nbytes", T_PYSSIZET, offsetof(BatchBase, nbytes), 0, NULL},
    {"_slab_index", T_PYSSIZET, offsetof(BatchBase, slab_index), 0, NULL},
    {"_slab_off", T_PYSSIZET, offsetof(BatchBase, slab_off), 0, NULL},
    {"first_t", T_DOUBLE, offsetof(BatchBase, first_t), 0, NULL},
    {NULL}};

static PyTypeObject BatchBase_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "mpipub._fastpub.BatchBase",
    .tp_doc = "The fields of packing.Batch, shared with the C publish path.",
    .tp_basicsize = sizeof(BatchBase),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)batch_init,
    .tp_traverse = (traverseproc)batch_traverse,
    .tp_clear = (inquiry)batch_clear,
    .tp_dealloc = (destructor)batch_dealloc,
    .tp_members = batch_members,
};

/* ---------------------------------------------------------------- SenderBase */
typedef struct {
    PyObject_HEAD
    PyObject *batch;        /* the open Batch, or None */
    PyObject *batch_type;   /* packing.Batch */
    PyObject *sealed;       /* list of complete batches not yet posted */
    PyObject *ready_slab;   /* a pooled slab for the next batch (the flusher keeps one), or None */
    PyObject *task_id;      /* the running task's id, or None */
    PyObject *error;        /* what stopped the flusher, or None */
    PyObject *pool;
    PyObject *lock_acquire, *lock_release, *wake_release;  /* bound methods */
    Py_ssize_t step;        /* publications of the running task so far */
    double last_add, wakes_at, next_abort_poll;
} SenderBase;

static int sender_traverse(SenderBase *self, visitproc visit, void *arg) {
    Py_VISIT(self->batch); Py_VISIT(self->batch_type); Py_VISIT(self->sealed);
    Py_VISIT(self->ready_slab); Py_VISIT(self->task_id); Py_VISIT(self->error);
    Py_VISIT(self->pool); Py_VISIT(self->lock_acquire); Py_VISIT(self->lock_release);
    Py_VISIT(self->wake_release);
    return 0;
}

static int sender_clear(SenderBase *self) {
    Py_CLEAR(self->batch); Py_CLEAR(self->batch_type); Py_CLEAR(self->sealed);
    Py_CLEAR(self->ready_slab); Py_CLEAR(self->task_id); Py_CLEAR(self->error);
    Py_CLEAR(self->pool); Py_CLEAR(self->lock_acquire); Py_CLEAR(self->lock_release);
    Py_CLEAR(self->wake_release);
    return 0;
}

static void sender_dealloc(SenderBase *self) {
    PyObject_GC_UnTrack(self);
    sender_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);  /* what time.time() reads */
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

typedef struct {
    PyObject *key, *value;  /* borrowed from the dict */
    PyObject *dts;          /* borrowed (arrays) */
    Py_buffer view;         /* held (arrays) */
    int is_array;
} Item;

static void release_items(Item *items, int n) {
    for (int i = 0; i < n; i++)
        if (items[i].is_array) PyBuffer_Release(&items[i].view);
}

/* Pass 1: is every item plain? Fills items (holding array views); returns the count, or -1
 * when the Python path must take the call (nothing held then), or -2 on an error. */
static int scan(PyObject *data, Item *items, Py_ssize_t *slab_need) {
    PyObject *k, *v;
    Py_ssize_t pos = 0, off = 0;
    int n = 0;
    while (PyDict_Next(data, &pos, &k, &v)) {
        if (n == MAX_ITEMS || !PyUnicode_CheckExact(k)) goto bail;
        Item *it = &items[n];
        it->key = k;
        it->value = v;
        it->is_array = 0;
        PyTypeObject *tv = Py_TYPE(v);
        if (tv == &PyLong_Type || tv == &PyFloat_Type || tv == &PyBool_Type ||
            tv == &PyUnicode_Type || tv == &PyBytes_Type || v == Py_None ||
            tv == &PyComplex_Type) {
            n++;
            continue;
        }
        if ((PyObject *)tv != ndarray_type) goto bail;
        PyObject *dt = PyObject_GetAttr(v, str_dtype);
        if (dt == NULL) { PyErr_Clear(); goto bail; }
        PyObject *dts = PyDict_GetItemWithError(plain_dtypes, dt);  /* borrowed */
        Py_DECREF(dt);
        if (dts == NULL) { PyErr_Clear(); goto bail; }  /* not seen yet: Python caches it */
        if (!PyUnicode_Check(dts) || PyUnicode_GET_LENGTH(dts) == 0) goto bail;
        if (PyObject_GetBuffer(v, &it->view, PyBUF_C_CONTIGUOUS) < 0) {
            PyErr_Clear();
            goto bail;
        }
        if (it->view.len > slab_item_max || it->view.len == 0) {
            PyBuffer_Release(&it->view);
            goto bail;
        }
        it->is_array = 1;
        it->dts = dts;
        off += it->view.len + ((align - it->view.len % align) % align);
        n++;
    }
    *slab_need = off;
    return n;
bail:
    release_items(items, n);
    return -1;
}

/* Would the arrays fit in a slab from offset `off`, placed as Batch._place places them? */
static int fits(Item *items, int n, Py_ssize_t off) {
    for (int i = 0; i < n; i++) {
        if (!items[i].is_array) continue;
        Py_ssize_t len = items[i].view.len;
        if (off + len > slab_bytes) return 0;
        off += len + ((align - len % align) % align);
    }
    return 1;
}

static int lock_try(SenderBase *self) {
    PyObject *r = PyObject_CallOneArg(self->lock_acquire, Py_False);
    if (r == NULL) return -1;
    int got = (r == Py_True);
    Py_DECREF(r);
    return got;
}

static int lock_release(SenderBase *self) {
    PyObject *r = PyObject_CallNoArgs(self->lock_release);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

/* Give the open batch the ready slab (its first buffer). */
static int batch_take_slab(BatchBase *b, PyObject *slab) {
    PyObject *mv = PyMemoryView_FromObject(slab);
    if (mv == NULL) return -1;
    if (PyList_Append(b->recycle, slab) < 0 || PyList_Append(b->bufs, slab) < 0) {
        Py_DECREF(mv);
        return -1;
    }
    Py_INCREF(slab);
    Py_XSETREF(b->slab, slab);
    Py_XSETREF(b->slab_mv, mv);
    b->slab_index = PyList_GET_SIZE(b->bufs) - 1;
    b->slab_off = 0;
    return 0;
}

/* Pass 2, under the lock: copy and append. Returns 1 done, 0 not taken, -1 error. */
static int add(SenderBase *self, Item *items, int n, Py_ssize_t slab_need, double t) {
    BatchBase *b = (BatchBase *)self->batch;
    int new_batch = 0;
    if ((PyObject *)b == Py_None || b == NULL) {
        if (slab_need > 0 && (self->ready_slab == NULL || self->ready_slab == Py_None ||
                              !fits(items, n, 0)))
            return 0;
        b = (BatchBase *)PyObject_CallFunctionObjArgs(self->batch_type, self->task_id,
                                                       self->pool, NULL);
        if (b == NULL) return -1;
        if (!PyObject_TypeCheck((PyObject *)b, &BatchBase_Type)) {
            Py_DECREF(b);
            PyErr_SetString(PyExc_TypeError, "Sender.batch_type is not a BatchBase");
            return -1;
        }
        if (slab_need > 0) {
            if (batch_take_slab(b, self->ready_slab) < 0) { Py_DECREF(b); return -1; }
            Py_CLEAR(self->ready_slab);
            Py_INCREF(Py_None);
            self->ready_slab = Py_None;
        }
        new_batch = 1;
    } else {
        if (!PyObject_TypeCheck((PyObject *)b, &BatchBase_Type)) return 0;
        if (slab_need > 0 && (b->slab == NULL || b->slab == Py_None || !fits(items, n, b->slab_off)))
            return 0;  /* Python starts a new slab */
        Py_INCREF(b);
    }
    /* from here on the publication is added: nothing below returns 0 */
    char *base = NULL;
    Py_buffer sv;
    int have_sv = 0;
    if (slab_need > 0) {
        if (PyObject_GetBuffer(b->slab, &sv, PyBUF_WRITABLE) < 0) goto error;
        have_sv = 1;
        base = (char *)sv.buf;
    }
    PyObject *entries = PyList_New(n);
    if (entries == NULL) goto error;
    Py_ssize_t off = b->slab_off, nbytes = 0;
    for (int i = 0; i < n; i++) {
        Item *it = &items[i];
        PyObject *e;
        if (!it->is_array) {
            e = Py_BuildValue("(OlO)", it->key, code_value, it->value);
            nbytes += 8;
        } else {
            Py_ssize_t len = it->view.len, count = 1;
            for (int d = 0; d < it->view.ndim; d++) count *= it->view.shape[d];
            memcpy(base + off, it->view.buf, len);
            PyObject *shape = PyObject_GetAttr(it->value, str_shape);
            if (shape == NULL) { Py_DECREF(entries); goto error; }
            e = Py_BuildValue("(OlONnnn)", it->key, code_array, it->dts, shape, count,
                              b->slab_index, off);
            off += len + ((align - len % align) % align);
            nbytes += len;
        }
        if (e == NULL) { Py_DECREF(entries); goto error; }
        PyList_SET_ITEM(entries, i, e);
    }
    PyObject *pub = Py_BuildValue("(ndnN)", self->step, t, nbytes, entries);
    if (pub == NULL || PyList_Append(b->pubs, pub) < 0) { Py_XDECREF(pub); goto error; }
    Py_DECREF(pub);
    if (have_sv) PyBuffer_Release(&sv);
    if (PyList_GET_SIZE(b->pubs) == 1) b->first_t = t;
    b->slab_off = off;
    b->nbytes += nbytes;
    self->step += 1;
    self->last_add = t;
    if (new_batch) Py_XSETREF(self->batch, (PyObject *)b);
    else Py_DECREF(b);

    int wake = 0;
    if (b->nbytes >= batch_bytes || PyList_GET_SIZE(b->pubs) >= batch_pubs ||
        t - b->first_t >= max_age_s) {
        if (PyList_Append(self->sealed, (PyObject *)b) < 0) return -1;
        Py_INCREF(Py_None);
        Py_XSETREF(self->batch, Py_None);
        if (PyList_GET_SIZE(self->sealed) > 1) {
            /* the flusher has not had the GIL since the last one: post them here */
            PyObject *r = PyObject_CallMethodNoArgs((PyObject *)self, str_post_sealed);
            if (r == NULL) return -1;
            Py_DECREF(r);
        }
        wake = self->wakes_at - t > wake_slack_s;  /* it posts the sealed batch */
    } else {
        wake = PyList_GET_SIZE(b->pubs) == 1 && self->wakes_at - t > wake_slack_s;
    }
    return wake ? 2 : 1;
error:
    if (have_sv) PyBuffer_Release(&sv);
    if (new_batch) {
        /* an empty batch that was never open: its slab goes back to being the ready one */
        if (b->slab != NULL && b->slab != Py_None) {
            Py_INCREF(b->slab);
            Py_XSETREF(self->ready_slab, b->slab);
        }
    }
    Py_DECREF(b);
    return -1;
}

static PyObject *sender_fast_publish(SenderBase *self, PyObject *data) {
    if (!PyDict_CheckExact(data) || (self->error != NULL && self->error != Py_None) ||
        self->task_id == NULL || self->task_id == Py_None ||
        slab_item_max < 0)
        Py_RETURN_FALSE;
    double t = now_s();
    if (t >= self->next_abort_poll) Py_RETURN_FALSE;
    Item items[MAX_ITEMS];
    Py_ssize_t slab_need = 0;
    int n = scan(data, items, &slab_need);
    if (n < 0) Py_RETURN_FALSE;
    int got = lock_try(self);
    if (got <= 0) {
        release_items(items, n);
        if (got < 0) return NULL;
        Py_RETURN_FALSE;  /* the flusher holds it: the Python path waits for it */
    }
    int r = add(self, items, n, slab_need, t);
    release_items(items, n);
    PyObject *exc_type = NULL, *exc_value = NULL, *exc_tb = NULL;
    if (r < 0) PyErr_Fetch(&exc_type, &exc_value, &exc_tb);
    if (lock_release(self) < 0) {
        Py_XDECREF(exc_type); Py_XDECREF(exc_value); Py_XDECREF(exc_tb);
        return NULL;
    }
    if (r < 0) {
        PyErr_Restore(exc_type, exc_value, exc_tb);
        return NULL;
    }
    if (r == 0) Py_RETURN_FALSE;
    if (r == 2) {
        self->wakes_at = -Py_HUGE_VAL;  /* woken: it looks by itself now */
        PyObject *res = PyObject_CallNoArgs(self->wake_release);
        if (res == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_RuntimeError)) return NULL;
            PyErr_Clear();  /* already released: it woke on its own meanwhile */
        } else {
            Py_DECREF(res);
        }
    }
    Py_RETURN_TRUE;
}

static PyMethodDef sender_methods[] = {
    {"fast_publish", (PyCFunction)sender_fast_publish, METH_O,
     "fast_publish(data) -> bool: publish ``data`` if it is plain (see the module's doc); "
     "False, with nothing changed, when the Python path must take it."},
    {NULL}};

static PyMemberDef sender_members[] = {
    {"batch", T_OBJECT, offsetof(SenderBase, batch), 0, "the open batch, or None"},
    {"batch_type", T_OBJECT, offsetof(SenderBase, batch_type), 0, NULL},
    {"sealed", T_OBJECT, offsetof(SenderBase, sealed), 0, NULL},
    {"ready_slab", T_OBJECT, offsetof(SenderBase, ready_slab), 0, NULL},
    {"task_id", T_OBJECT, offsetof(SenderBase, task_id), 0, NULL},
    {"error", T_OBJECT, offsetof(SenderBase, error), 0, NULL},
    {"pool", T_OBJECT, offsetof(SenderBase, pool), 0, NULL},
    {"_lock_acquire", T_OBJECT, offsetof(SenderBase, lock_acquire), 0, NULL},
    {"_lock_release", T_OBJECT, offsetof(SenderBase, lock_release), 0, NULL},
    {"_wake_release", T_OBJECT, offsetof(SenderBase, wake_release), 0, NULL},
    {"step", T_PYSSIZET, offsetof(SenderBase, step), 0, NULL},
    {"last_add", T_DOUBLE, offsetof(SenderBase, last_add), 0, NULL},
    {"wakes_at", T_DOUBLE, offsetof(SenderBase, wakes_at), 0, NULL},
    {"next_abort_poll", T_DOUBLE, offsetof(SenderBase, next_abort_poll), 0, NULL},
    {NULL}};

static PyTypeObject SenderBase_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "mpipub._fastpub.SenderBase",
    .tp_doc = "The fields of sender.Sender that the C publish path reads and writes.",
    .tp_basicsize = sizeof(SenderBase),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_traverse = (traverseproc)sender_traverse,
    .tp_clear = (inquiry)sender_clear,
    .tp_dealloc = (destructor)sender_dealloc,
    .tp_members = sender_members,
    .tp_methods = sender_methods,
};

/* ---------------------------------------------------------------- module */
static PyObject *configure(PyObject *mod, PyObject *args, PyObject *kw) {
    static char *names[] = {"ndarray", "plain_dtypes", "slab_item_max", "slab_bytes", "align",
                            "batch_bytes", "batch_pubs", "max_age_s", "wake_slack_s",
                            "value_code", "array_code", NULL};
    PyObject *nd, *pd;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!O!nnnnnddll", names, &PyType_Type, &nd,
                                     &PyDict_Type, &pd, &slab_item_max, &slab_bytes, &align,
                                     &batch_bytes, &batch_pubs, &max_age_s, &wake_slack_s,
                                     &code_value, &code_array))
        return NULL;
    Py_INCREF(nd); Py_XSETREF(ndarray_type, nd);
    Py_INCREF(pd); Py_XSETREF(plain_dtypes, pd);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"configure", (PyCFunction)(void (*)(void))configure, METH_VARARGS | METH_KEYWORDS,
     "Set the constants and objects the fast path shares with packing.py and sender.py."},
    {NULL}};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "mpipub._fastpub",
    "publish_data's common case in C (see _fastpub.c).", -1, module_methods};

PyMODINIT_FUNC PyInit__fastpub(void) {
    if (PyType_Ready(&BatchBase_Type) < 0 || PyType_Ready(&SenderBase_Type) < 0) return NULL;
    str_dtype = PyUnicode_InternFromString("dtype");
    str_shape = PyUnicode_InternFromString("shape");
    str_post_sealed = PyUnicode_InternFromString("_post_sealed");
    if (!str_dtype || !str_shape || !str_post_sealed) return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL) return NULL;
    Py_INCREF(&BatchBase_Type);
    Py_INCREF(&SenderBase_Type);
    if (PyModule_AddObject(m, "BatchBase", (PyObject *)&BatchBase_Type) < 0 ||
        PyModule_AddObject(m, "SenderBase", (PyObject *)&SenderBase_Type) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
