/*
 * proxy.policy._splice: the DataRow masking loop of proxy.policy.masks.RowMasker, in C.
 *
 * A Plan is built once per result (proxy/policy/fastmask.py) from the same maskers the Python
 * RowMasker uses, plus, per masked column, an optional "fast op": the text-level equivalent of
 * a common mask (partial, redact, email on strings; round on integers and numerics in text)
 * for values that are pure ASCII and in the plain form PostgreSQL sends. Any value a fast op
 * does not take (non-ASCII text, an unusual numeric, a number that does not fit 64 bits) and
 * every other mask go to the Python masker of that column, so the output is the Python
 * RowMasker's, byte for byte; tests/unit/test_fastmask.py checks this differentially.
 *
 * Plan.row(body) masks one DataRow body; Plan.run(buf, start, max_rows, max_len) masks the
 * consecutive whole DataRow messages of buf from start, so a result streams through in one call
 * per chunk rather than one Python call per row. Errors in a DataRow raise the error class set
 * with set_error (ProtocolViolation), with the Python RowMasker's messages.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum {
    OP_PASS = 0,
    OP_CALL = 1,
    OP_NULL = 2,
    OP_PARTIAL = 3,
    OP_REDACT = 4,
    OP_EMAIL = 5,
    OP_ROUND_INT = 6,
    OP_ROUND_NUMERIC = 7,
};

enum { FIT_NONE = 0, FIT_CUT = 1, FIT_PAD = 2 };

#define MAX_OP OP_ROUND_NUMERIC
#define MAX_FIT FIT_PAD

static PyObject *error_class = NULL; /* ProtocolViolation, set by set_error */

typedef struct {
    int op;
    int strip;            /* char(n): mask the value without its padding, then pad again */
    int fit;              /* FIT_*: cut to n (varchar(n), name), or cut and pad to n (char(n)) */
    Py_ssize_t n;         /* the fit's length, also the length limit email works to; -1: none */
    Py_ssize_t first;     /* partial: keep_first */
    Py_ssize_t last;      /* partial: keep_last */
    char fill;            /* partial, redact: the ASCII character that replaces */
    uint64_t step;        /* round: the step, in units of the value's last digit */
    int64_t lo, hi;       /* round on integers: the type's range */
    PyObject *call;       /* the Python masker of the column (never NULL for a masked column) */
} Field;

typedef struct {
    PyObject_HEAD
    Py_ssize_t columns;   /* fields the RowDescription announced */
    Py_ssize_t nfields;   /* fields up to the last masked one */
    Field *fields;
    Py_ssize_t rows;      /* rows masked since the last take() */
    Py_ssize_t *nulls;    /* per field: NULLs seen since the last take() */
} Plan;

/* -- output buffer ------------------------------------------------------------------------ */

typedef struct {
    char *p;
    Py_ssize_t len, cap;
} Out;

static int
out_reserve(Out *o, Py_ssize_t extra)
{
    if (o->len + extra <= o->cap)
        return 0;
    Py_ssize_t cap = o->cap ? o->cap : 1024;
    while (cap < o->len + extra)
        cap *= 2;
    char *p = PyMem_Realloc(o->p, (size_t)cap);
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    o->p = p;
    o->cap = cap;
    return 0;
}

static inline int
out_put(Out *o, const char *s, Py_ssize_t n)
{
    if (out_reserve(o, n) < 0)
        return -1;
    memcpy(o->p + o->len, s, (size_t)n);
    o->len += n;
    return 0;
}

static inline int
out_fill(Out *o, char c, Py_ssize_t n)
{
    if (n <= 0)
        return 0;
    if (out_reserve(o, n) < 0)
        return -1;
    memset(o->p + o->len, c, (size_t)n);
    o->len += n;
    return 0;
}

static inline void
put_be32(char *p, uint32_t v)
{
    p[0] = (char)(v >> 24);
    p[1] = (char)(v >> 16);
    p[2] = (char)(v >> 8);
    p[3] = (char)v;
}

static inline int32_t
get_be32(const unsigned char *p)
{
    return (int32_t)(((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) |
                     (uint32_t)p[3]);
}

static void
protocol_error(const char *message)
{
    PyErr_SetString(error_class ? error_class : PyExc_ValueError, message);
}

/* -- fast ops: each writes the masked value at o->len and returns 1, or returns 0 when the
 *    value is not one it takes (the Python masker then decides), or -1 on a Python error. -- */

static int
is_ascii(const unsigned char *s, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        if (s[i] & 0x80)
            return 0;
    return 1;
}

/* The string fits the column: varchar(n) and name cut, char(n) cut and padded (ASCII only). */
static int
fit_string(const Field *f, Out *o, Py_ssize_t start)
{
    if (f->fit == FIT_NONE)
        return 0;
    if (o->len - start > f->n)
        o->len = start + f->n;
    if (f->fit == FIT_PAD)
        return out_fill(o, ' ', f->n - (o->len - start));
    return 0;
}

static int
op_string(const Field *f, const unsigned char *s, Py_ssize_t size, Out *o)
{
    if (!is_ascii(s, size))
        return 0;
    Py_ssize_t start = o->len;
    Py_ssize_t core = size;
    if (f->strip)
        while (core > 0 && s[core - 1] == ' ')
            core--;
    switch (f->op) {
    case OP_PARTIAL:
        /* Python: ch * n if first + last >= n else s[:first] + ch * rest + s[n - last:] */
        if (f->first >= core || f->last >= core - f->first) {
            if (out_fill(o, f->fill, core) < 0)
                return -1;
        }
        else {
            if (out_put(o, (const char *)s, f->first) < 0 ||
                out_fill(o, f->fill, core - f->first - f->last) < 0 ||
                out_put(o, (const char *)s + core - f->last, f->last) < 0)
                return -1;
        }
        break;
    case OP_REDACT:
        if (out_fill(o, f->fill, core) < 0)
            return -1;
        break;
    case OP_EMAIL: {
        Py_ssize_t at = core - 1;
        while (at >= 0 && s[at] != '@')
            at--;
        if (at <= 0) {
            if (out_fill(o, '*', core) < 0)
                return -1;
            break;
        }
        Py_ssize_t head = at > 1 ? 1 : 0;
        Py_ssize_t domain = core - at;
        Py_ssize_t stars = head ? 3 : 1;
        if (f->n >= 0 && head + stars + domain > f->n) {
            stars = f->n - domain - head;
            if (stars < 1)
                stars = 1;
        }
        if (out_put(o, (const char *)s, head) < 0 || out_fill(o, '*', stars) < 0 ||
            out_put(o, (const char *)s + at, domain) < 0)
            return -1;
        break;
    }
    default:
        return 0;
    }
    if (f->strip && out_fill(o, ' ', size - (o->len - start)) < 0)
        return -1;
    if (fit_string(f, o, start) < 0)
        return -1;
    return 1;
}

/* Digits of an unsigned value at o->len. */
static int
put_u64(Out *o, uint64_t v)
{
    char digits[24];
    int n = 0;
    do {
        digits[sizeof digits - 1 - n] = (char)('0' + v % 10);
        v /= 10;
        n++;
    } while (v);
    return out_put(o, digits + sizeof digits - n, n);
}

/* At most 18 digits (so any such value fits int64 and uint64); -1 otherwise. */
static int
parse_digits(const unsigned char *s, Py_ssize_t n, uint64_t *value, int *count)
{
    uint64_t v = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        if (v == 0 && s[i] == '0')
            continue; /* leading zeros carry no value */
        if (++*count > 18)
            return -1;
        v = v * 10 + (uint64_t)(s[i] - '0');
    }
    *value = v;
    return 0;
}

/* round on an integer in text: towards zero to a multiple of step; -0 is 0. */
static int
op_round_int(const Field *f, const unsigned char *s, Py_ssize_t size, Out *o)
{
    int neg = size > 0 && s[0] == '-';
    const unsigned char *d = s + neg;
    Py_ssize_t n = size - neg;
    uint64_t v;
    int count = 0;
    if (n <= 0 || parse_digits(d, n, &v, &count) < 0)
        return 0;
    int64_t signed_v = neg ? -(int64_t)v : (int64_t)v;
    if (signed_v < f->lo || signed_v > f->hi)
        return 0; /* out of the type's range: the Python masker's business (it gives NULL) */
    uint64_t q = v / f->step * f->step;
    if (neg && q && out_put(o, "-", 1) < 0)
        return -1;
    return put_u64(o, q) < 0 ? -1 : 1;
}

/* round on a numeric in text, plain form -?digits(.digits)?: towards zero, scale kept. */
static int
op_round_numeric(const Field *f, const unsigned char *s, Py_ssize_t size, Out *o)
{
    int neg = size > 0 && s[0] == '-';
    Py_ssize_t i = neg, whole_end, scale = 0;
    while (i < size && s[i] >= '0' && s[i] <= '9')
        i++;
    whole_end = i;
    if (whole_end == neg)
        return 0;
    if (i < size) {
        if (s[i] != '.')
            return 0;
        i++;
        Py_ssize_t frac_start = i;
        while (i < size && s[i] >= '0' && s[i] <= '9')
            i++;
        scale = i - frac_start;
        if (i < size || scale == 0)
            return 0;
    }
    if (scale > 18)
        return 0;
    /* the step in units of the last digit: step * 10^scale, if it fits */
    uint64_t units = f->step;
    for (Py_ssize_t k = 0; k < scale; k++) {
        if (units > UINT64_MAX / 10)
            return 0;
        units *= 10;
    }
    /* the value in the same units: whole and fraction digits together */
    uint64_t v = 0;
    int count = 0;
    if (parse_digits(s + neg, whole_end - neg, &v, &count) < 0)
        return 0;
    if (scale) {
        for (Py_ssize_t k = whole_end + 1; k < size; k++) {
            if (v == 0 && s[k] == '0')
                continue;
            if (++count > 18)
                return 0;
            v = v * 10 + (uint64_t)(s[k] - '0');
        }
    }
    uint64_t q = v / units * units;
    if (neg && q && out_put(o, "-", 1) < 0)
        return -1;
    if (!scale)
        return put_u64(o, q) < 0 ? -1 : 1;
    /* str(q), left-padded with zeros to scale + 1 digits, the point before the last scale */
    char digits[48];
    int n = 0;
    uint64_t r = q;
    do {
        digits[sizeof digits - 1 - n] = (char)('0' + r % 10);
        r /= 10;
        n++;
    } while (r);
    while (n < scale + 1) {
        digits[sizeof digits - 1 - n] = '0';
        n++;
    }
    const char *p = digits + sizeof digits - n;
    if (out_put(o, p, n - scale) < 0 || out_put(o, ".", 1) < 0 ||
        out_put(o, p + n - scale, scale) < 0)
        return -1;
    return 1;
}

/* The Python masker of the column: 1 written, 0 NULL, -1 error. */
static int
call_python(const Field *f, const unsigned char *s, Py_ssize_t size, Out *o)
{
    PyObject *copy = PyBytes_FromStringAndSize((const char *)s, size);
    if (copy == NULL)
        return -1;
    PyObject *view = PyMemoryView_FromObject(copy);
    Py_DECREF(copy);
    if (view == NULL)
        return -1;
    PyObject *res = PyObject_CallOneArg(f->call, view);
    Py_DECREF(view);
    if (res == NULL)
        return -1;
    if (res == Py_None) {
        Py_DECREF(res);
        return 0;
    }
    if (!PyBytes_Check(res)) {
        PyErr_Format(PyExc_TypeError, "a field masker returned %.100s, not bytes or None",
                     Py_TYPE(res)->tp_name);
        Py_DECREF(res);
        return -1;
    }
    int rc = out_put(o, PyBytes_AS_STRING(res), PyBytes_GET_SIZE(res));
    Py_DECREF(res);
    return rc < 0 ? -1 : 1;
}

/* One masked value with its length word at o->len. */
static int
mask_value(const Field *f, const unsigned char *s, Py_ssize_t size, Out *o)
{
    if (out_reserve(o, 4 + size) < 0)
        return -1;
    Py_ssize_t head = o->len;
    o->len += 4;
    int rc = 0;
    switch (f->op) {
    case OP_NULL:
        o->len = head;
        return out_put(o, "\xff\xff\xff\xff", 4);
    case OP_PARTIAL:
    case OP_REDACT:
    case OP_EMAIL:
        rc = op_string(f, s, size, o);
        break;
    case OP_ROUND_INT:
        rc = op_round_int(f, s, size, o);
        break;
    case OP_ROUND_NUMERIC:
        rc = op_round_numeric(f, s, size, o);
        break;
    default:
        break;
    }
    if (rc == 0) {
        o->len = head + 4; /* drop anything a fast op wrote before it gave up */
        rc = call_python(f, s, size, o);
    }
    if (rc < 0)
        return -1;
    if (rc == 0) {
        o->len = head;
        return out_put(o, "\xff\xff\xff\xff", 4);
    }
    Py_ssize_t value_len = o->len - head - 4;
    if (value_len > INT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "masked value too long");
        return -1;
    }
    put_be32(o->p + head, (uint32_t)value_len);
    return 0;
}

/* One DataRow body, whole message (type, length, body) appended to o. */
static int
mask_row(Plan *plan, const unsigned char *body, Py_ssize_t end, Out *o)
{
    if (end < 2) {
        protocol_error("DataRow: message too short");
        return -1;
    }
    Py_ssize_t count = ((Py_ssize_t)body[0] << 8) | body[1];
    if (count != plan->columns) {
        PyErr_Format(error_class ? error_class : PyExc_ValueError,
                     "DataRow has %zd fields where RowDescription announced %zd", count,
                     plan->columns);
        return -1;
    }
    if (out_reserve(o, 5 + end) < 0)
        return -1;
    Py_ssize_t message = o->len;
    o->len += 5;
    Py_ssize_t pos = 2, run = 0;
    for (Py_ssize_t i = 0; i < plan->nfields; i++) {
        const Field *f = &plan->fields[i];
        if (pos + 4 > end) {
            protocol_error("DataRow: message too short");
            return -1;
        }
        int32_t size = get_be32(body + pos);
        if (size < 0) {
            if (size != -1) {
                protocol_error("DataRow: invalid field length");
                return -1;
            }
            if (f->op != OP_PASS)
                plan->nulls[i]++;
            pos += 4;
            continue;
        }
        Py_ssize_t next = pos + 4 + size;
        if (next > end) {
            protocol_error("DataRow: invalid field length");
            return -1;
        }
        if (f->op != OP_PASS) {
            if (run < pos && out_put(o, (const char *)body + run, pos - run) < 0)
                return -1;
            if (mask_value(f, body + pos + 4, size, o) < 0)
                return -1;
            run = next;
        }
        pos = next;
    }
    if (run < end && out_put(o, (const char *)body + run, end - run) < 0)
        return -1;
    Py_ssize_t length = o->len - message - 1;
    if (length > INT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "masked DataRow too long");
        return -1;
    }
    o->p[message] = 'D';
    put_be32(o->p + message + 1, (uint32_t)length);
    plan->rows++;
    return 0;
}

/* -- the Plan type ------------------------------------------------------------------------ */

static void
plan_clear_fields(Plan *self)
{
    if (self->fields) {
        for (Py_ssize_t i = 0; i < self->nfields; i++)
            Py_CLEAR(self->fields[i].call);
        PyMem_Free(self->fields);
        self->fields = NULL;
    }
    PyMem_Free(self->nulls);
    self->nulls = NULL;
}

static void
plan_dealloc(Plan *self)
{
    PyObject_GC_UnTrack(self);
    plan_clear_fields(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
plan_traverse(Plan *self, visitproc visit, void *arg)
{
    if (self->fields)
        for (Py_ssize_t i = 0; i < self->nfields; i++)
            Py_VISIT(self->fields[i].call);
    return 0;
}

static int
plan_tp_clear(Plan *self)
{
    if (self->fields)
        for (Py_ssize_t i = 0; i < self->nfields; i++)
            Py_CLEAR(self->fields[i].call);
    return 0;
}

/* Plan(columns, fields): fields[i] is None (passes) or
 * (op, call, strip, fit, n, first, last, fill, step, lo, hi). */
static int
plan_init(Plan *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"columns", "fields", NULL};
    Py_ssize_t columns;
    PyObject *fields;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "nO!", kwlist, &columns, &PyTuple_Type,
                                     &fields))
        return -1;
    Py_ssize_t nfields = PyTuple_GET_SIZE(fields);
    if (columns < 0 || columns > 0xFFFF || nfields > columns) {
        PyErr_SetString(PyExc_ValueError, "fields do not fit the columns");
        return -1;
    }
    plan_clear_fields(self);
    self->fields = PyMem_Calloc((size_t)(nfields ? nfields : 1), sizeof(Field));
    self->nulls = PyMem_Calloc((size_t)(nfields ? nfields : 1), sizeof(Py_ssize_t));
    if (self->fields == NULL || self->nulls == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->nfields = nfields;
    self->columns = columns;
    self->rows = 0;
    for (Py_ssize_t i = 0; i < nfields; i++) {
        PyObject *item = PyTuple_GET_ITEM(fields, i);
        Field *f = &self->fields[i];
        if (item == Py_None) {
            f->op = OP_PASS;
            continue;
        }
        int op, strip, fit;
        Py_ssize_t n, first, last;
        int fill;
        unsigned long long step;
        long long lo, hi;
        PyObject *call;
        if (!PyArg_ParseTuple(item, "iOiinnniKLL;a field is (op, call, strip, fit, n, first, "
                              "last, fill, step, lo, hi)",
                              &op, &call, &strip, &fit, &n, &first, &last, &fill, &step, &lo,
                              &hi))
            return -1;
        if (op < OP_CALL || op > MAX_OP || fit < FIT_NONE || fit > MAX_FIT || first < 0 ||
            last < 0 || fill < 1 || fill > 0x7F || !PyCallable_Check(call) ||
            (fit != FIT_NONE && n < 0) ||
            ((op == OP_ROUND_INT || op == OP_ROUND_NUMERIC) && step == 0)) {
            PyErr_Format(PyExc_ValueError, "invalid field %zd", i);
            return -1;
        }
        f->op = op;
        f->strip = strip;
        f->fit = fit;
        f->n = n;
        f->first = first;
        f->last = last;
        f->fill = (char)fill;
        f->step = step;
        f->lo = lo;
        f->hi = hi;
        Py_INCREF(call);
        f->call = call;
    }
    return 0;
}

static PyObject *
plan_row(Plan *self, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Out o = {NULL, 0, 0};
    PyObject *res = NULL;
    if (mask_row(self, (const unsigned char *)view.buf, view.len, &o) == 0)
        res = PyBytes_FromStringAndSize(o.p, o.len);
    PyMem_Free(o.p);
    PyBuffer_Release(&view);
    return res;
}

/* run(buf, start, max_rows, max_len) -> (bytes, end, rows): the DataRows of buf from start,
 * up to the first message that is not a whole DataRow of at most max_len (length word
 * included), or max_rows rows. */
static PyObject *
plan_run(Plan *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t start, max_rows, max_len;
    if (!PyArg_ParseTuple(args, "y*nnn", &view, &start, &max_rows, &max_len))
        return NULL;
    const unsigned char *buf = (const unsigned char *)view.buf;
    Py_ssize_t len = view.len, pos = start, rows = 0;
    if (start < 0 || start > len) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "start outside the buffer");
        return NULL;
    }
    Out o = {NULL, 0, 0};
    while (rows < max_rows && len - pos >= 5 && buf[pos] == 'D') {
        int32_t length = get_be32(buf + pos + 1);
        if (length < 4 || length > max_len || length > len - pos - 1)
            break; /* the framing layer reports it, or waits for the rest */
        if (mask_row(self, buf + pos + 5, length - 4, &o) < 0) {
            PyMem_Free(o.p);
            PyBuffer_Release(&view);
            return NULL;
        }
        pos += 1 + (Py_ssize_t)length;
        rows++;
    }
    PyBuffer_Release(&view);
    PyObject *out = PyBytes_FromStringAndSize(o.p ? o.p : "", o.len);
    PyMem_Free(o.p);
    if (out == NULL)
        return NULL;
    return Py_BuildValue("(Nnn)", out, pos, rows);
}

/* take() -> (rows, nulls): counts since the last take, reset. */
static PyObject *
plan_take(Plan *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *nulls = PyTuple_New(self->nfields);
    if (nulls == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < self->nfields; i++) {
        PyObject *v = PyLong_FromSsize_t(self->nulls[i]);
        if (v == NULL) {
            Py_DECREF(nulls);
            return NULL;
        }
        PyTuple_SET_ITEM(nulls, i, v);
        self->nulls[i] = 0;
    }
    Py_ssize_t rows = self->rows;
    self->rows = 0;
    return Py_BuildValue("(nN)", rows, nulls);
}

static PyMethodDef plan_methods[] = {
    {"row", (PyCFunction)plan_row, METH_O, "The whole new DataRow message for a DataRow body."},
    {"run", (PyCFunction)plan_run, METH_VARARGS,
     "run(buf, start, max_rows, max_len) -> (bytes, end, rows)"},
    {"take", (PyCFunction)plan_take, METH_NOARGS, "(rows, nulls per field) since the last take"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject PlanType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "proxy.policy._splice.Plan",
    .tp_basicsize = sizeof(Plan),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The masking plan of one result: Plan(columns, fields).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)plan_init,
    .tp_dealloc = (destructor)plan_dealloc,
    .tp_traverse = (traverseproc)plan_traverse,
    .tp_clear = (inquiry)plan_tp_clear,
    .tp_methods = plan_methods,
};

/* -- module functions --------------------------------------------------------------------- */

static PyObject *
splice_set_error(PyObject *Py_UNUSED(module), PyObject *cls)
{
    if (!PyType_Check(cls) || !PyType_IsSubtype((PyTypeObject *)cls,
                                                (PyTypeObject *)PyExc_Exception)) {
        PyErr_SetString(PyExc_TypeError, "set_error needs an exception class");
        return NULL;
    }
    Py_INCREF(cls);
    Py_XSETREF(error_class, cls);
    Py_RETURN_NONE;
}

static PyMethodDef splice_functions[] = {
    {"set_error", splice_set_error, METH_O, "The exception class of malformed DataRows."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef splice_module = {
    PyModuleDef_HEAD_INIT, "proxy.policy._splice",
    "The DataRow masking loop in C (see proxy/policy/fastmask.py).", -1, splice_functions,
};

PyMODINIT_FUNC
PyInit__splice(void)
{
    if (PyType_Ready(&PlanType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&splice_module);
    if (module == NULL)
        return NULL;
    Py_INCREF(&PlanType);
    if (PyModule_AddObject(module, "Plan", (PyObject *)&PlanType) < 0 ||
        PyModule_AddIntConstant(module, "OP_CALL", OP_CALL) < 0 ||
        PyModule_AddIntConstant(module, "OP_NULL", OP_NULL) < 0 ||
        PyModule_AddIntConstant(module, "OP_PARTIAL", OP_PARTIAL) < 0 ||
        PyModule_AddIntConstant(module, "OP_REDACT", OP_REDACT) < 0 ||
        PyModule_AddIntConstant(module, "OP_EMAIL", OP_EMAIL) < 0 ||
        PyModule_AddIntConstant(module, "OP_ROUND_INT", OP_ROUND_INT) < 0 ||
        PyModule_AddIntConstant(module, "OP_ROUND_NUMERIC", OP_ROUND_NUMERIC) < 0 ||
        PyModule_AddIntConstant(module, "FIT_NONE", FIT_NONE) < 0 ||
        PyModule_AddIntConstant(module, "FIT_CUT", FIT_CUT) < 0 ||
        PyModule_AddIntConstant(module, "FIT_PAD", FIT_PAD) < 0) {
        Py_DECREF(&PlanType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
