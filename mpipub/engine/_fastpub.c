/* mpipub.engine._fastpub: publish_data's common case in C (optional; mpipub works without it).
 *
 * Why: a 64 KiB publish_data in Python cost several times a numpy.copyto of the same array
 * (docs/benchmarks.md, row 3), nearly all of it interpreter work around the one memcpy. Here the
 * whole call is one C function: it copies the arrays into the open batch's slab and appends
 * the publication's metadata exactly as batch.Batch.add would.
 *
 * It only handles what is plain: a dict with str keys whose values are int, float, bool,
 * complex, str, bytes or None, or numpy arrays (exact ndarray, C-contiguous, of a dtype
 * batch.py has found plain: contract.PLAIN_DTYPES). Arrays go where Batch._place puts them:
 * up to SLAB_ITEM_MAX bytes into the slab (the batch's first slab is one the flusher keeps
 * ready), larger ones into a buffer of their own from the pool; zero-copy sends stay with
 * Python. For anything else (and when no task runs, the lock is taken, an abort poll is due,
 * the sender failed, a new slab would be needed, or batches would have to be posted) it
 * changes nothing and returns False:
 * the Python path (loop.Engine.publish, sender.Sender.add) then does the call, and it stays
 * the reference for what a publication is. With a sink on (the sender's check_value is set),
 * it also leaves to Python every value that the sink's table (mpipub/sink/rules.py) does not
 * surely accept, so refusals, and their messages, are layout.check_value's.
 *
 * The two base types hold the state both paths share, as C fields that Python sees as
 * attributes: BatchBase (batch.Batch) and SenderBase (sender.Sender). Every constant, those
 * fields and the accepted values are declared once, in mpipub/engine/contract.py: this module
 * reads the constants from there when it is imported (read_contract) and refuses to import
 * (RuntimeError) when its structs' fields differ from the declared ones.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <limits.h>
#include <string.h>
#include <time.h>

#define MAX_ITEMS 32

/* read from mpipub/engine/contract.py by read_contract() */
static PyObject *plain_dtypes;  /* contract.PLAIN_DTYPES: dtype -> str ("" when pickled) */
static Py_ssize_t slab_item_max, slab_bytes, align, batch_bytes, batch_pubs, zero_copy_min;
static double max_age_s, wake_slack_s;
static long code_value, code_array;
static PyObject *sink_scalar_types;  /* contract.SINK_RULES.SCALAR_TYPES (a tuple) */
static char sink_array_kinds[64];    /* contract.SINK_RULES.ARRAY_KINDS */
static char sink_str_forbidden[16];  /* contract.SINK_RULES.STR_FORBIDDEN (ASCII) */
static Py_ssize_t sink_str_forbidden_len;

static PyObject *ndarray_type;  /* numpy.ndarray, once numpy is imported (find_ndarray) */
static PyObject *str_dtype, *str_shape, *str_take, *str_numpy, *str_ndarray;

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
    .tp_name = "mpipub.engine._fastpub.BatchBase",
    .tp_doc = "The fields of batch.Batch (contract.BATCH_FIELDS), shared with the C publish path.",
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
    PyObject *batch_type;   /* batch.Batch */
    PyObject *sealed;       /* list of complete batches not yet posted */
    PyObject *ready_slab;   /* a pooled slab for the next batch (the flusher keeps one), or None */
    PyObject *task_id;      /* the running task's id, or None */
    PyObject *check_value;  /* the sink's check, or None: take only what the sink accepts */
    PyObject *error;        /* what stopped the flusher, or None */
    PyObject *pool;
    PyObject *lock_acquire, *lock_release, *wake_release;  /* bound methods */
    Py_ssize_t step;        /* publications of the running task so far */
    double last_add, wakes_at, next_abort_poll;
} SenderBase;

static int sender_traverse(SenderBase *self, visitproc visit, void *arg) {
    Py_VISIT(self->batch); Py_VISIT(self->batch_type); Py_VISIT(self->sealed);
    Py_VISIT(self->ready_slab); Py_VISIT(self->task_id); Py_VISIT(self->check_value);
    Py_VISIT(self->error);
    Py_VISIT(self->pool); Py_VISIT(self->lock_acquire); Py_VISIT(self->lock_release);
    Py_VISIT(self->wake_release);
    return 0;
}

static int sender_clear(SenderBase *self) {
    Py_CLEAR(self->batch); Py_CLEAR(self->batch_type); Py_CLEAR(self->sealed);
    Py_CLEAR(self->ready_slab); Py_CLEAR(self->task_id); Py_CLEAR(self->check_value);
    Py_CLEAR(self->error);
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

enum { VALUE_ITEM, SLAB_ITEM, OWN_ITEM };  /* how Batch._place places a value */

typedef struct {
    PyObject *key, *value;  /* held: pool.take runs Python, and another thread might change
                               the dict meanwhile */
    PyObject *dts;          /* borrowed from plain_dtypes, which only grows (arrays) */
    PyObject *raw;          /* OWN_ITEM: the pooled buffer it is copied into (owned) */
    Py_buffer view;         /* held (arrays) */
    int kind;
} Item;

static void release_items(Item *items, int n) {
    for (int i = 0; i < n; i++) {
        if (items[i].kind != VALUE_ITEM) PyBuffer_Release(&items[i].view);
        Py_CLEAR(items[i].raw);
        Py_DECREF(items[i].key);
        Py_DECREF(items[i].value);
    }
}

/* With a sink on, does the sink's table (mpipub/sink/rules.py) surely accept this plain
 * value? (Stricter is fine: what is refused here goes to Python, whose layout.check_value
 * reads the same table and accepts it or names the problem.) */
static int sink_accepts_value(PyObject *v) {
    PyTypeObject *tv = Py_TYPE(v);
    int stored = 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(sink_scalar_types); i++)
        stored |= (PyObject *)tv == PyTuple_GET_ITEM(sink_scalar_types, i);
    if (!stored) return 0;  /* (None, for one) */
    if (tv == &PyLong_Type) {
        int overflow = 0;
        long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (x == -1 && PyErr_Occurred()) { PyErr_Clear(); return 0; }
        return !overflow;  /* INT_MIN..INT_MAX: the 64-bit range (read_contract checks) */
    }
    if (tv == &PyUnicode_Type) {
        Py_ssize_t len;
        const char *u = PyUnicode_AsUTF8AndSize(v, &len);
        if (u == NULL) { PyErr_Clear(); return 0; }  /* not valid unicode */
        for (Py_ssize_t i = 0; i < sink_str_forbidden_len; i++)
            if (memchr(u, sink_str_forbidden[i], (size_t)len) != NULL) return 0;
        return 1;
    }
    return 1;  /* float, bool, complex, bytes */
}

static int sink_accepts_dtype(PyObject *dts) {
    /* dtype.str is byte order, kind, size ("<f8", "|S5"); fields were ruled out already */
    Py_UCS4 kind = PyUnicode_READ_CHAR(dts, 1);
    return kind != 0 && kind < 128 && strchr(sink_array_kinds, (int)kind) != NULL;
}

/* numpy.ndarray once numpy is imported (this module never imports it: engines start without
 * it); 1 when known. */
static int find_ndarray(void) {
    if (ndarray_type != NULL) return 1;
    PyObject *np = PyImport_GetModule(str_numpy);  /* (sys.modules only) */
    if (np == NULL) { PyErr_Clear(); return 0; }
    PyObject *nd = PyObject_GetAttr(np, str_ndarray);
    Py_DECREF(np);
    if (nd == NULL || !PyType_Check(nd)) { Py_XDECREF(nd); PyErr_Clear(); return 0; }
    ndarray_type = nd;
    return 1;
}

/* Pass 1, before the lock: is every item plain? Fills items (holding array views); returns
 * the count, or -1 when the Python path must take the call (nothing held then). */
static int scan(PyObject *data, int copy, int sink_on, Item *items, int *slab_items,
                Py_ssize_t *pub_bytes) {
    PyObject *k, *v;
    Py_ssize_t pos = 0;
    int n = 0;
    *slab_items = 0;
    *pub_bytes = 0;
    while (PyDict_Next(data, &pos, &k, &v)) {
        if (n == MAX_ITEMS || !PyUnicode_CheckExact(k)) goto bail;
        Item *it = &items[n];
        PyTypeObject *tv = Py_TYPE(v);
        it->raw = NULL;
        it->kind = VALUE_ITEM;
        if (tv == &PyLong_Type || tv == &PyFloat_Type || tv == &PyBool_Type ||
            tv == &PyUnicode_Type || tv == &PyBytes_Type || v == Py_None ||
            tv == &PyComplex_Type) {
            if (sink_on && !sink_accepts_value(v)) goto bail;
        } else {
            if ((PyObject *)tv != ndarray_type && (!find_ndarray() ||
                                                   (PyObject *)tv != ndarray_type))
                goto bail;
            PyObject *dt = PyObject_GetAttr(v, str_dtype);
            if (dt == NULL) { PyErr_Clear(); goto bail; }
            PyObject *dts = PyDict_GetItemWithError(plain_dtypes, dt);  /* borrowed */
            Py_DECREF(dt);
            if (dts == NULL) { PyErr_Clear(); goto bail; }  /* not seen yet: Python caches it */
            if (!PyUnicode_Check(dts) || PyUnicode_GET_LENGTH(dts) < 2) goto bail;
            if (sink_on && !sink_accepts_dtype(dts)) goto bail;
            if (PyObject_GetBuffer(v, &it->view, PyBUF_C_CONTIGUOUS) < 0) {
                PyErr_Clear();
                goto bail;
            }
            Py_ssize_t len = it->view.len;
            if (len == 0 || (len > slab_item_max && !copy && len >= zero_copy_min)) {
                PyBuffer_Release(&it->view);  /* (zero-copy sends are Python's) */
                goto bail;
            }
            it->kind = len <= slab_item_max ? SLAB_ITEM : OWN_ITEM;
            *slab_items += it->kind == SLAB_ITEM;
            it->dts = dts;
        }
        *pub_bytes += it->kind == VALUE_ITEM ? 8 : it->view.len;  /* as Batch.add counts */
        Py_INCREF(k);
        Py_INCREF(v);
        it->key = k;
        it->value = v;
        n++;
    }
    return n;
bail:
    release_items(items, n);
    return -1;
}

static Py_ssize_t padded(Py_ssize_t len) { return len + ((align - len % align) % align); }

/* Would the slab items fit in a slab from offset `off`, placed as Batch._place places them? */
static int fits(Item *items, int n, Py_ssize_t off) {
    for (int i = 0; i < n; i++) {
        if (items[i].kind != SLAB_ITEM) continue;
        if (off + items[i].view.len > slab_bytes) return 0;
        off += padded(items[i].view.len);
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

/* A buffer joins the batch: sent with it, back to the pool once the send completes. */
static int batch_keep(BatchBase *b, PyObject *buf) {
    if (PyList_Append(b->recycle, buf) < 0 || PyList_Append(b->bufs, buf) < 0) return -1;
    return 0;
}

/* Copy v's bytes into buf at off. */
static int copy_into(PyObject *buf, Py_ssize_t off, Py_buffer *v) {
    Py_buffer dst;
    if (PyObject_GetBuffer(buf, &dst, PyBUF_WRITABLE) < 0) return -1;
    memcpy((char *)dst.buf + off, v->buf, v->len);
    PyBuffer_Release(&dst);
    return 0;
}

/* Pass 2, under the lock: copy and append. Returns 1 done, 2 done and the flusher must be
 * woken, 0 not taken (nothing changed), -1 error. */
static int add(SenderBase *self, Item *items, int n, int slab_items,
               Py_ssize_t pub_bytes, double t) {
    BatchBase *b = (BatchBase *)self->batch;
    int new_batch = b == NULL || (PyObject *)b == Py_None;
    int have_ready = self->ready_slab != NULL && self->ready_slab != Py_None;
    if (!new_batch && !PyObject_TypeCheck((PyObject *)b, &BatchBase_Type)) return 0;
    /* Sealing a batch while the flusher has not posted the last one: then the caller posts
     * both (Sender.add), and that is Python's, with signals deferred meanwhile
     * (Engine.publish; a Ctrl-C between a header and its buffers would leave the client
     * waiting for buffers that never come). */
    if (PyList_GET_SIZE(self->sealed) > 0) {
        Py_ssize_t pubs = new_batch ? 0 : PyList_GET_SIZE(b->pubs);
        double first = pubs ? b->first_t : t;
        if ((new_batch ? 0 : b->nbytes) + pub_bytes >= batch_bytes || pubs + 1 >= batch_pubs ||
            t - first >= max_age_s)
            return 0;
    }
    if (slab_items) {
        if (new_batch || b->slab == NULL || b->slab == Py_None) {
            if (!have_ready || !fits(items, n, 0)) return 0;
        } else if (!fits(items, n, b->slab_off)) {
            return 0;  /* Python starts a new slab */
        }
    }
    for (int i = 0; i < n; i++) {  /* arrays too big for a slab get a pooled buffer each */
        if (items[i].kind != OWN_ITEM) continue;
        PyObject *len = PyLong_FromSsize_t(items[i].view.len);
        if (len == NULL) return -1;
        items[i].raw = PyObject_CallMethodOneArg(self->pool, str_take, len);
        Py_DECREF(len);
        if (items[i].raw == NULL) return -1;
    }
    if (new_batch) {
        b = (BatchBase *)PyObject_CallFunctionObjArgs(self->batch_type, self->task_id,
                                                       self->pool, NULL);
        if (b == NULL) return -1;
        if (!PyObject_TypeCheck((PyObject *)b, &BatchBase_Type)) {
            Py_DECREF(b);
            PyErr_SetString(PyExc_TypeError, "Sender.batch_type is not a BatchBase");
            return -1;
        }
    } else {
        Py_INCREF(b);
    }
    /* in dict order, as Batch.add: the same buffer indices and offsets */
    PyObject *entries = PyList_New(n);
    if (entries == NULL) goto error;
    Py_ssize_t nbytes = 0;
    for (int i = 0; i < n; i++) {
        Item *it = &items[i];
        PyObject *e;
        if (it->kind == VALUE_ITEM) {
            e = Py_BuildValue("(OlO)", it->key, code_value, it->value);
            nbytes += 8;
        } else {
            Py_ssize_t len = it->view.len, count = 1, bi, off;
            for (int d = 0; d < it->view.ndim; d++) count *= it->view.shape[d];
            if (it->kind == SLAB_ITEM) {
                if (b->slab == NULL || b->slab == Py_None) {  /* its first slab: the ready one */
                    PyObject *mv = PyMemoryView_FromObject(self->ready_slab);
                    if (mv == NULL || batch_keep(b, self->ready_slab) < 0) {
                        Py_XDECREF(mv);
                        goto error_entries;
                    }
                    Py_XSETREF(b->slab, self->ready_slab);  /* (takes the sender's reference) */
                    self->ready_slab = Py_None;
                    Py_INCREF(Py_None);
                    Py_XSETREF(b->slab_mv, mv);
                    b->slab_index = PyList_GET_SIZE(b->bufs) - 1;
                    b->slab_off = 0;
                }
                bi = b->slab_index;
                off = b->slab_off;
                if (copy_into(b->slab, off, &it->view) < 0) goto error_entries;
                b->slab_off = off + padded(len);
            } else {
                if (copy_into(it->raw, 0, &it->view) < 0 || batch_keep(b, it->raw) < 0)
                    goto error_entries;
                Py_CLEAR(it->raw);
                bi = PyList_GET_SIZE(b->bufs) - 1;
                off = 0;
            }
            PyObject *shape = PyObject_GetAttr(it->value, str_shape);
            if (shape == NULL) goto error_entries;
            e = Py_BuildValue("(OlONnnn)", it->key, code_array, it->dts, shape, count, bi, off);
            nbytes += len;
        }
        if (e == NULL) goto error_entries;
        PyList_SET_ITEM(entries, i, e);
    }
    PyObject *pub = Py_BuildValue("(ndnN)", self->step, t, nbytes, entries);
    if (pub == NULL || PyList_Append(b->pubs, pub) < 0) { Py_XDECREF(pub); goto error; }
    Py_DECREF(pub);
    if (PyList_GET_SIZE(b->pubs) == 1) b->first_t = t;
    b->nbytes += nbytes;
    self->step += 1;
    self->last_add = t;
    if (new_batch) Py_XSETREF(self->batch, (PyObject *)b);
    else Py_DECREF(b);

    if (b->nbytes >= batch_bytes || PyList_GET_SIZE(b->pubs) >= batch_pubs ||
        t - b->first_t >= max_age_s) {
        if (PyList_Append(self->sealed, (PyObject *)b) < 0) return -1;
        Py_INCREF(Py_None);
        Py_XSETREF(self->batch, Py_None);
        return self->wakes_at - t > wake_slack_s ? 2 : 1;  /* it posts the sealed batch */
    }
    /* the first publication of a batch starts the flusher's linger clock */
    return PyList_GET_SIZE(b->pubs) == 1 && self->wakes_at - t > wake_slack_s ? 2 : 1;
error_entries:
    Py_DECREF(entries);
error:
    /* (what the batch took is sent with it, unused; a new batch is dropped) */
    Py_DECREF(b);
    return -1;
}

/* The whole C path: 1 published, 0 not taken (the Python path must take the call; nothing
 * changed), -1 error. */
static int try_publish(SenderBase *self, PyObject *data, int copy) {
    if (!PyDict_CheckExact(data) || (self->error != NULL && self->error != Py_None) ||
        self->task_id == NULL || self->task_id == Py_None)
        return 0;
    double t = now_s();
    if (t >= self->next_abort_poll) return 0;
    Item items[MAX_ITEMS];
    int slab_items = 0;
    Py_ssize_t pub_bytes = 0;
    int sink_on = self->check_value != NULL && self->check_value != Py_None;
    int n = scan(data, copy, sink_on, items, &slab_items, &pub_bytes);
    if (n < 0) return 0;
    int got = lock_try(self);
    if (got <= 0) {
        release_items(items, n);
        return got;  /* 0: the flusher holds it, the Python path waits for it */
    }
    int r = add(self, items, n, slab_items, pub_bytes, t);
    release_items(items, n);
    PyObject *exc_type = NULL, *exc_value = NULL, *exc_tb = NULL;
    if (r < 0) PyErr_Fetch(&exc_type, &exc_value, &exc_tb);
    if (lock_release(self) < 0) {
        Py_XDECREF(exc_type); Py_XDECREF(exc_value); Py_XDECREF(exc_tb);
        return -1;
    }
    if (r < 0) {
        PyErr_Restore(exc_type, exc_value, exc_tb);
        return -1;
    }
    if (r == 0) return 0;
    if (r == 2) {
        self->wakes_at = -Py_HUGE_VAL;  /* woken: it looks by itself now */
        PyObject *res = PyObject_CallNoArgs(self->wake_release);
        if (res == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_RuntimeError)) return -1;
            PyErr_Clear();  /* already released: it woke on its own meanwhile */
        } else {
            Py_DECREF(res);
        }
    }
    return 1;
}

static PyObject *sender_fast_add(SenderBase *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "fast_add(data, copy=True)");
        return NULL;
    }
    int copy = nargs < 2 || PyObject_IsTrue(args[1]);
    if (copy < 0) return NULL;
    int r = try_publish(self, args[0], copy);
    if (r < 0) return NULL;
    return PyBool_FromLong(r);
}

static PyMethodDef sender_methods[] = {
    {"fast_add", (PyCFunction)(void (*)(void))sender_fast_add, METH_FASTCALL,
     "fast_add(data, copy=True) -> bool: what publish_data's C path does with ``data`` "
     "(add it to the open batch if it is plain, see the module's doc); False, with nothing "
     "changed, when the Python path must take it."},
    {NULL}};

static PyMemberDef sender_members[] = {
    {"batch", T_OBJECT, offsetof(SenderBase, batch), 0, "the open batch, or None"},
    {"batch_type", T_OBJECT, offsetof(SenderBase, batch_type), 0, NULL},
    {"sealed", T_OBJECT, offsetof(SenderBase, sealed), 0, NULL},
    {"ready_slab", T_OBJECT, offsetof(SenderBase, ready_slab), 0, NULL},
    {"task_id", T_OBJECT, offsetof(SenderBase, task_id), 0, NULL},
    {"check_value", T_OBJECT, offsetof(SenderBase, check_value), 0, NULL},
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
    .tp_name = "mpipub.engine._fastpub.SenderBase",
    .tp_doc = "The fields of sender.Sender (contract.SENDER_FIELDS) that the C publish path reads and writes.",
    .tp_basicsize = sizeof(SenderBase),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_traverse = (traverseproc)sender_traverse,
    .tp_clear = (inquiry)sender_clear,
    .tp_dealloc = (destructor)sender_dealloc,
    .tp_members = sender_members,
    .tp_methods = sender_methods,
};

/* ---------------------------------------------------------------- Publisher */
/* The public publish_data when this module is built: a C callable that tries the C path
 * first and calls the Python publish_data (datapub.py, its ``fallback``) for everything else.
 * Why not a Python function calling fast_add: after a pause (a simulation's compute
 * phase) that one Python frame cost more than the C path itself (docs/benchmarks.md,
 * row 3). It looks like the Python function (functools.update_wrapper: __doc__, __name__,
 * __wrapped__ for inspect.signature) and pickles by reference, as the function does. */
/* The engine serving in this process: the one pointer to it. Python reads it through
 * loop.current_engine() (current()), the C path through current_sender; loop sets it for as
 * long as the engine serves (set_current). The per-task state the C path needs (task id,
 * step, abort poll deadline, sink check) lives on that engine's sender. */
static PyObject *current_engine;  /* the engine (loop.Engine), or NULL */
static PyObject *current_sender;  /* current_engine.sender (a SenderBase), or NULL */
static unsigned long current_thread;  /* the thread that serves, and runs tasks (set_current's
                                       * caller): other threads take the Python path, which
                                       * tells a thread that outlived its task from one of
                                       * this task */
static PyObject *str_copy;

typedef struct {
    PyObject_HEAD
    PyObject *fallback;
    PyObject *dict;
    vectorcallfunc vectorcall;
} Publisher;

static PyObject *publisher_vectorcall(Publisher *self, PyObject *const *args, size_t nargsf,
                                      PyObject *kwnames) {
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *sender = current_sender;
    if (sender != NULL && nargs == 1 && PyThread_get_thread_ident() == current_thread) {
        int copy = 1;
        Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
        if (nkw == 1 && PyUnicode_Check(PyTuple_GET_ITEM(kwnames, 0)) &&
            PyUnicode_Compare(PyTuple_GET_ITEM(kwnames, 0), str_copy) == 0) {
            copy = PyObject_IsTrue(args[1]);
            if (copy < 0) return NULL;
        } else if (nkw != 0) {
            goto python;
        }
        Py_INCREF(sender);  /* (the task's thread may end the task only after we return) */
        int r = try_publish((SenderBase *)sender, args[0], copy);
        Py_DECREF(sender);
        if (r < 0) return NULL;
        if (r == 1) Py_RETURN_NONE;
    }
python:
    return PyObject_Vectorcall(self->fallback, args, nargsf, kwnames);
}

static PyObject *publisher_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    PyObject *fallback;
    if (!PyArg_ParseTuple(args, "O:Publisher", &fallback)) return NULL;
    if (!PyCallable_Check(fallback)) {
        PyErr_SetString(PyExc_TypeError, "Publisher(fallback): fallback must be callable");
        return NULL;
    }
    Publisher *self = (Publisher *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    Py_INCREF(fallback);
    self->fallback = fallback;
    self->vectorcall = (vectorcallfunc)publisher_vectorcall;
    return (PyObject *)self;
}

static int publisher_traverse(Publisher *self, visitproc visit, void *arg) {
    Py_VISIT(self->fallback); Py_VISIT(self->dict);
    return 0;
}

static int publisher_clear(Publisher *self) {
    Py_CLEAR(self->fallback); Py_CLEAR(self->dict);
    return 0;
}

static void publisher_dealloc(Publisher *self) {
    PyObject_GC_UnTrack(self);
    publisher_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* pickled by name, like the function it stands for (cloudpickle: tasks that use it) */
static PyObject *publisher_reduce(Publisher *self, PyObject *unused) {
    return PyObject_GetAttrString(self->fallback, "__qualname__");
}

static PyObject *publisher_repr(Publisher *self) {
    return PyUnicode_FromFormat("<function publish_data (C path first, then %R)>",
                                self->fallback);
}

static PyMethodDef publisher_methods[] = {
    {"__reduce__", (PyCFunction)publisher_reduce, METH_NOARGS, NULL}, {NULL}};

static PyMemberDef publisher_members[] = {
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(Publisher, vectorcall), READONLY, NULL},
    {"fallback", T_OBJECT, offsetof(Publisher, fallback), READONLY,
     "the Python function that takes what the C path does not"},
    {NULL}};

static PyGetSetDef publisher_getset[] = {
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL}, {NULL}};

static PyTypeObject Publisher_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "mpipub.engine._fastpub.Publisher",
    .tp_doc = "Publisher(fallback): publish_data with its common case in C (see _fastpub.c).",
    .tp_basicsize = sizeof(Publisher),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = publisher_new,
    .tp_call = PyVectorcall_Call,
    .tp_repr = (reprfunc)publisher_repr,
    .tp_vectorcall_offset = offsetof(Publisher, vectorcall),
    .tp_dictoffset = offsetof(Publisher, dict),
    .tp_traverse = (traverseproc)publisher_traverse,
    .tp_clear = (inquiry)publisher_clear,
    .tp_dealloc = (destructor)publisher_dealloc,
    .tp_methods = publisher_methods,
    .tp_members = publisher_members,
    .tp_getset = publisher_getset,
};

/* set_current(engine or None): the engine serving in this process; the C path publishes
 * through its ``sender`` */
static PyObject *set_current(PyObject *mod, PyObject *engine) {
    if (engine == Py_None) {
        Py_CLEAR(current_sender);
        Py_CLEAR(current_engine);
        Py_RETURN_NONE;
    }
    PyObject *sender = PyObject_GetAttrString(engine, "sender");
    if (sender == NULL) return NULL;
    if (!PyObject_TypeCheck(sender, &SenderBase_Type)) {
        Py_DECREF(sender);
        PyErr_SetString(PyExc_TypeError, "set_current(engine): engine.sender is not a SenderBase");
        return NULL;
    }
    Py_INCREF(engine);
    Py_XSETREF(current_engine, engine);
    Py_XSETREF(current_sender, sender);
    current_thread = PyThread_get_thread_ident();
    Py_RETURN_NONE;
}

static PyObject *get_current(PyObject *mod, PyObject *unused) {
    PyObject *e = current_engine != NULL ? current_engine : Py_None;
    Py_INCREF(e);
    return e;
}

/* ---------------------------------------------------------------- the contract */
static int read_ssize(PyObject *c, const char *name, Py_ssize_t *out) {
    PyObject *v = PyObject_GetAttrString(c, name);
    if (v == NULL) return -1;
    Py_ssize_t x = PyLong_AsSsize_t(v);
    Py_DECREF(v);
    if (x == -1 && PyErr_Occurred()) return -1;
    if (x <= 0) {
        PyErr_Format(PyExc_RuntimeError, "mpipub/engine/contract.py: %s must be > 0", name);
        return -1;
    }
    *out = x;
    return 0;
}

static int read_double(PyObject *c, const char *name, double *out) {
    PyObject *v = PyObject_GetAttrString(c, name);
    if (v == NULL) return -1;
    double x = PyFloat_AsDouble(v);
    Py_DECREF(v);
    if (x == -1.0 && PyErr_Occurred()) return -1;
    *out = x;
    return 0;
}

static int read_long(PyObject *c, const char *name, long *out) {
    PyObject *v = PyObject_GetAttrString(c, name);
    if (v == NULL) return -1;
    long x = PyLong_AsLong(v);
    Py_DECREF(v);
    if (x == -1 && PyErr_Occurred()) return -1;
    *out = x;
    return 0;
}

/* An ASCII str attribute into buf (NUL-terminated; its length in *out_len). */
static int read_ascii(PyObject *c, const char *name, char *buf, size_t size,
                      Py_ssize_t *out_len) {
    PyObject *v = PyObject_GetAttrString(c, name);
    if (v == NULL) return -1;
    Py_ssize_t len;
    const char *u = PyUnicode_Check(v) ? PyUnicode_AsUTF8AndSize(v, &len) : NULL;
    if (u == NULL || (size_t)len >= size || !PyUnicode_IS_ASCII(v)) {
        Py_DECREF(v);
        PyErr_Clear();
        PyErr_Format(PyExc_RuntimeError, "mpipub/sink/rules.py: %s must be an ASCII str of "
                     "fewer than %zu characters for the C path", name, size);
        return -1;
    }
    memset(buf, 0, size);
    memcpy(buf, u, (size_t)len);
    *out_len = len;
    Py_DECREF(v);
    return 0;
}

static const char *member_kind(int type) {
    switch (type) {
    case T_OBJECT: return "object";
    case T_PYSSIZET: return "ssize";
    case T_DOUBLE: return "double";
    case T_BOOL: return "bool";
    default: return "?";
    }
}

/* The C struct's members are exactly the contract's ``decl`` fields, in order and kind. */
static int check_fields(PyObject *c, const char *decl, const char *type_name,
                        PyMemberDef *members) {
    PyObject *fields = PyObject_GetAttrString(c, decl);
    if (fields == NULL) return -1;
    PyObject *seq = PySequence_Fast(fields, "contract fields must be a sequence");
    Py_DECREF(fields);
    if (seq == NULL) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), i = 0;
    int bad = 0;
    const char *c_name = "(none)", *c_kind = "", *py_name = "(none)", *py_kind = "";
    for (;; i++) {
        int have_c = members[i].name != NULL, have_py = i < n;
        if (!have_c && !have_py) break;
        c_name = have_c ? members[i].name : "(none)";
        c_kind = have_c ? member_kind(members[i].type) : "";
        py_name = "(none)";
        py_kind = "";
        if (have_py) {
            PyObject *f = PySequence_Fast_GET_ITEM(seq, i);
            if (!PyArg_ParseTuple(f, "ss", &py_name, &py_kind)) {
                Py_DECREF(seq);
                return -1;
            }
        }
        if (!have_c || !have_py || strcmp(c_name, py_name) != 0 || strcmp(c_kind, py_kind) != 0) {
            bad = 1;
            break;
        }
    }
    if (bad)
        PyErr_Format(PyExc_RuntimeError,
                     "mpipub.engine._fastpub does not match mpipub/engine/contract.py: %s's field "
                     "%zd is %s %s in C but %s %s in %s; rebuild the extension from the same "
                     "sources (pip install -e .), or make _fastpub.c and the contract agree",
                     type_name, i, c_name, c_kind, py_name, py_kind, decl);
    Py_DECREF(seq);
    return bad ? -1 : 0;
}

/* Read every constant and accepted value from mpipub/engine/contract.py (at import, and
 * again when a test changed one). */
static int read_contract_into_globals(void) {
    PyObject *c = PyImport_ImportModule("mpipub.engine.contract");
    if (c == NULL) return -1;
    PyObject *rules = NULL, *pd = NULL, *types = NULL, *lo = NULL, *hi = NULL;
    int r = -1;
    if (read_ssize(c, "SLAB_ITEM_MAX", &slab_item_max) < 0 ||
        read_ssize(c, "SLAB_BYTES", &slab_bytes) < 0 || read_ssize(c, "ALIGN", &align) < 0 ||
        read_ssize(c, "ZERO_COPY_MIN", &zero_copy_min) < 0 ||
        read_ssize(c, "BATCH_BYTES", &batch_bytes) < 0 ||
        read_ssize(c, "BATCH_PUBS", &batch_pubs) < 0 ||
        read_double(c, "MAX_AGE_S", &max_age_s) < 0 ||
        read_double(c, "WAKE_SLACK_S", &wake_slack_s) < 0 ||
        read_long(c, "VALUE_CODE", &code_value) < 0 || read_long(c, "ARRAY_CODE", &code_array) < 0 ||
        check_fields(c, "BATCH_FIELDS", "BatchBase", batch_members) < 0 ||
        check_fields(c, "SENDER_FIELDS", "SenderBase", sender_members) < 0)
        goto done;
    pd = PyObject_GetAttrString(c, "PLAIN_DTYPES");
    if (pd == NULL) goto done;
    if (!PyDict_CheckExact(pd)) {
        PyErr_SetString(PyExc_RuntimeError, "mpipub/engine/contract.py: PLAIN_DTYPES is a dict");
        goto done;
    }
    rules = PyObject_GetAttrString(c, "SINK_RULES");
    Py_ssize_t kinds_len;
    if (rules == NULL || read_ascii(rules, "ARRAY_KINDS", sink_array_kinds,
                                    sizeof sink_array_kinds, &kinds_len) < 0 ||
        read_ascii(rules, "STR_FORBIDDEN", sink_str_forbidden, sizeof sink_str_forbidden,
                   &sink_str_forbidden_len) < 0)
        goto done;
    types = PyObject_GetAttrString(rules, "SCALAR_TYPES");
    lo = PyObject_GetAttrString(rules, "INT_MIN");
    hi = PyObject_GetAttrString(rules, "INT_MAX");
    if (types == NULL || lo == NULL || hi == NULL) goto done;
    if (!PyTuple_CheckExact(types)) {
        PyErr_SetString(PyExc_RuntimeError, "mpipub/sink/rules.py: SCALAR_TYPES is a tuple");
        goto done;
    }
    int overflow_lo = 0, overflow_hi = 0;
    long long l = PyLong_AsLongLongAndOverflow(lo, &overflow_lo);
    long long h = PyLong_AsLongLongAndOverflow(hi, &overflow_hi);
    if (PyErr_Occurred()) goto done;
    if (overflow_lo || overflow_hi || l != LLONG_MIN || h != LLONG_MAX) {
        PyErr_SetString(PyExc_RuntimeError, "mpipub/sink/rules.py: the C path checks ints "
                        "against the 64-bit range; INT_MIN/INT_MAX say otherwise");
        goto done;
    }
    Py_INCREF(pd); Py_XSETREF(plain_dtypes, pd);
    Py_INCREF(types); Py_XSETREF(sink_scalar_types, types);
    r = 0;
done:
    Py_XDECREF(types); Py_XDECREF(lo); Py_XDECREF(hi);
    Py_XDECREF(rules); Py_XDECREF(pd);
    Py_DECREF(c);
    return r;
}

static PyObject *read_contract(PyObject *mod, PyObject *unused) {
    if (read_contract_into_globals() < 0) return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"read_contract", (PyCFunction)read_contract, METH_NOARGS,
     "read_contract(): read the constants and accepted values from mpipub/engine/contract.py "
     "again (done at import; tests that change one call it)."},
    {"set_current", (PyCFunction)set_current, METH_O,
     "set_current(engine or None): the engine serving in this process; publish_data's C path "
     "publishes through engine.sender, from the calling thread only."},
    {"current", (PyCFunction)get_current, METH_NOARGS,
     "current() -> the engine set by set_current, or None (loop.current_engine())."},
    {NULL}};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "mpipub.engine._fastpub",
    "publish_data's common case in C (see _fastpub.c).", -1, module_methods};

PyMODINIT_FUNC PyInit__fastpub(void) {
    if (PyType_Ready(&BatchBase_Type) < 0 || PyType_Ready(&SenderBase_Type) < 0 ||
        PyType_Ready(&Publisher_Type) < 0)
        return NULL;
    str_dtype = PyUnicode_InternFromString("dtype");
    str_shape = PyUnicode_InternFromString("shape");
    str_take = PyUnicode_InternFromString("take");
    str_copy = PyUnicode_InternFromString("copy");
    str_numpy = PyUnicode_InternFromString("numpy");
    str_ndarray = PyUnicode_InternFromString("ndarray");
    if (!str_dtype || !str_shape || !str_take || !str_copy || !str_numpy || !str_ndarray)
        return NULL;
    if (read_contract_into_globals() < 0) return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL) return NULL;
    Py_INCREF(&BatchBase_Type);
    Py_INCREF(&SenderBase_Type);
    Py_INCREF(&Publisher_Type);
    if (PyModule_AddObject(m, "BatchBase", (PyObject *)&BatchBase_Type) < 0 ||
        PyModule_AddObject(m, "SenderBase", (PyObject *)&SenderBase_Type) < 0 ||
        PyModule_AddObject(m, "Publisher", (PyObject *)&Publisher_Type) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
