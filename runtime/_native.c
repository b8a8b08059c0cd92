/* The compiled sampler as a Python extension: runtime/_stages.c's stages wired into the calls
 * runtime/native.py makes. One dynamic step is one call (`Stepper.step`), from the heads' logits
 * to the tokens; `joint` runs a weighted grid's first stages alone; `marginals` the heads' top-k.
 *
 * Only plain buffers cross the boundary (the buffer protocol, no numpy headers); the
 * Python side (runtime/native.py) checks dtypes and sizes, this side checks lengths
 * again before it reads anything.
 */
#include "_stages.h"

#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    Py_buffer ids, probs, pair_indptr, pair_indices, pair_values, triple_indptr, triple_indices,
        triple_values, rank, out_cells, out_values, work, iwork, flags, pair_grid;
} Buffers;

static void release(Buffers *b) {
    Py_buffer *all[] = {&b->ids, &b->probs, &b->pair_indptr, &b->pair_indices, &b->pair_values,
                        &b->triple_indptr, &b->triple_indices, &b->triple_values, &b->rank,
                        &b->out_cells, &b->out_values, &b->work, &b->iwork, &b->flags, &b->pair_grid};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
        if (all[i]->obj) PyBuffer_Release(all[i]);
}

static int fail(const char *message) {
    PyErr_SetString(PyExc_ValueError, message);
    return -1;
}

/* The CSR tables in `b` as Tables (pairs: one row per token; triples: one row per pair entry,
 * or absent when its indptr is the single 0 of an empty table); -1 with a ValueError when their
 * sizes disagree. Column indices are int32, or uint16 when the buffer holds 2 bytes per entry;
 * every index must be below the vocabulary and a row's indices strictly ascending (the scans'
 * hit lists hold k + 1 entries): runtime/cooccurrence.py checks both on load, once, where a
 * check here would cost every call a pass over a million entries. */
static int tables_agree(const Buffers *b, Py_ssize_t vocab, Table *pairs, Table *triples) {
    if (table_from(b->pair_indptr.buf, b->pair_indptr.len, b->pair_indices.buf, b->pair_indices.len,
                   b->pair_values.buf, b->pair_values.len, pairs) < 0 ||
        table_from(b->triple_indptr.buf, b->triple_indptr.len, b->triple_indices.buf, b->triple_indices.len,
                   b->triple_values.buf, b->triple_values.len, triples) < 0 ||
        pairs->rows != vocab || (triples->rows != 0 && triples->rows != pairs->nnz))
        return fail("the co-occurrence tables' sizes do not agree with each other and the vocabulary");
    return 0;
}

/* The grid stages a weighted joint runs in C on its own (runtime/native.py's GRID_CALL): the
 * count of live cells, -1 when the grid backs off before the adaptive threshold, -2 on error. */
static Py_ssize_t grid_call(const Workspace *w, Grid *g, double static_threshold, int otsu, int blur,
                            int reuse_pairs) {
    if (stage_joint(w, g, reuse_pairs) == -2) return -2;
    if (stage_weight(w, g) < 0) return -1;
    stage_static_threshold(w, g, static_threshold);
    return stage_adaptive_threshold(w, g, otsu, blur);
}

/* joint(shape, ids, probs, pair_indptr, pair_indices, pair_values, triple_indptr, triple_indices,
 *       triple_values, rank, mass, bound, static_threshold, otsu, blur, out_cells, out_values, work,
 *       iwork, flags, pair_grid, reuse_pairs)
 * rank (int32, one per token) must hold -1, the first third of work (float64) and flags (uint8)
 * 0; the call leaves them so. work (float64) and iwork (int64) hold 3 and 5 values per cell,
 * the outputs 1. pair_grid (int64, k1 x k2) holds the pair entry ids; with reuse_pairs set it
 * already holds those of these first two id lists, from the previous call. Candidates of axis a
 * sit in ids / probs after the earlier axes'.
 * -> count of cells written to out_cells / out_values (ascending C-order cell ids, J there),
 *    or -1 when min(max J, 1) <= bound before Otsu (the step backs off). */
static PyObject *joint(PyObject *self, PyObject *args) {
    PyObject *shape_obj;
    Buffers b;
    memset(&b, 0, sizeof(b));
    double mass, bound, static_threshold;
    int otsu, blur, reuse_pairs;
    if (!PyArg_ParseTuple(args, "O!y*y*y*y*y*y*y*y*w*dddiiw*w*w*w*w*w*i", &PyTuple_Type, &shape_obj, &b.ids, &b.probs,
                          &b.pair_indptr, &b.pair_indices, &b.pair_values, &b.triple_indptr, &b.triple_indices,
                          &b.triple_values, &b.rank, &mass, &bound, &static_threshold, &otsu, &blur,
                          &b.out_cells, &b.out_values, &b.work, &b.iwork, &b.flags, &b.pair_grid, &reuse_pairs)) {
        release(&b);
        return NULL;
    }
    Grid g = {.ndim = (int)PyTuple_GET_SIZE(shape_obj), .mass = mass, .bound = bound};
    Py_ssize_t ksum = 0, result = -2;
    if (g.ndim < 2 || g.ndim > MAX_ORDER) {
        fail("joint: the grid must have 2 or 3 axes");
        goto done;
    }
    for (int a = 0; a < g.ndim; a++) {
        g.shape[a] = PyLong_AsSsize_t(PyTuple_GET_ITEM(shape_obj, a));
        if (g.shape[a] < 1) {
            if (!PyErr_Occurred()) fail("joint: every axis needs at least one candidate");
            goto done;
        }
        g.ids[a] = (const int64_t *)b.ids.buf + ksum;
        g.probs[a] = (const double *)b.probs.buf + ksum;
        ksum += g.shape[a];
    }
    if (b.ids.len != ksum * (Py_ssize_t)sizeof(int64_t) || b.probs.len != ksum * (Py_ssize_t)sizeof(double)) {
        fail("joint: buffer sizes do not match the grid and the tables");
        goto done;
    }
    Py_ssize_t vocab = b.rank.len / (Py_ssize_t)sizeof(int32_t);
    Workspace w = {.rank = b.rank.buf, .vocab = vocab, .cells = b.out_cells.buf, .values = b.out_values.buf,
                   .work = b.work.buf, .work_third = b.work.len / (3 * (Py_ssize_t)sizeof(double)),
                   .points = b.iwork.buf, .point_third = b.iwork.len / (3 * (Py_ssize_t)sizeof(Point)),
                   .flags = b.flags.buf, .pair_grid = b.pair_grid.buf,
                   .pair_capacity = b.pair_grid.len / (Py_ssize_t)sizeof(int64_t)};
    w.capacity = b.out_cells.len / (Py_ssize_t)sizeof(int64_t);
    if (b.out_values.len / (Py_ssize_t)sizeof(double) < w.capacity) w.capacity = b.out_values.len / (Py_ssize_t)sizeof(double);
    if (b.flags.len < w.capacity) w.capacity = b.flags.len;
    if (tables_agree(&b, vocab, &w.pairs, &w.triples) < 0) goto done;
    result = grid_call(&w, &g, static_threshold, otsu, blur, reuse_pairs);
done:
    release(&b);
    if (result == -2) return NULL;
    return PyLong_FromSsize_t(result);
}

/* Logits as the kernel reads them: a 2-D buffer of float32 rows, each of unit stride, rows a
 * non-negative multiple of a float apart (e.g. numpy's logits[:, -1] of a (heads, T, vocab)
 * output). 0, or -1 with a ValueError (the buffer is released). */
static int get_rows(PyObject *obj, Py_buffer *view, Py_ssize_t *rows, Py_ssize_t *vocab, Py_ssize_t *row_stride) {
    if (PyObject_GetBuffer(obj, view, PyBUF_STRIDES | PyBUF_FORMAT) < 0) return -1;
    if (view->ndim != 2 || view->itemsize != (Py_ssize_t)sizeof(float) || strcmp(view->format, "f") ||
        view->strides[1] != (Py_ssize_t)sizeof(float) || view->strides[0] < 0 || view->strides[0] % sizeof(float) ||
        view->shape[0] < 1 || view->shape[1] < 1 || (view->shape[0] > 1 && view->strides[0] < view->shape[1] * 4)) {
        PyBuffer_Release(view);
        return fail("logits must be (heads, vocab) float32 rows of unit stride");
    }
    *rows = view->shape[0];
    *vocab = view->shape[1];
    *row_stride = view->strides[0] / (Py_ssize_t)sizeof(float);
    return 0;
}

/* Stepper(k, n_used, pair_indptr, pair_indices, pair_values, triple_indptr, triple_indices,
 *         triple_values), then .configure(bounds, temperature, static_threshold, penalty, otsu,
 *         blur, greedy): DynaMo's dynamic step for one sampler, the tables and k x n_used grids:
 *         the stages of _stages.h in the chain's order.
 * It holds the tables' buffers while it lives and owns its scratch, so that a step hands over
 * only what changes: a step used to acquire twenty buffers and parse twenty-seven arguments,
 * which cost more than the Otsu threshold once a forward pass had left Python's own data cold.
 * A new configuration keeps the scratch (whose pages are already faulted in).
 *
 * .step(logits, seen, random) -> the tokens to emit as a tuple; None when a head's logits hold
 * a NaN or an infinite maximum; NotImplemented for logits it does not read (get_rows: e.g.
 * float16). logits holds heads 1.. in its rows (at least n_used, vocab wide); their marginals as
 * _marginals.c computes them, each head's top-k mass as a running sum, the masses multiplied
 * head by head (the numpy path's order). Then for n = n_used .. 2: back off at once if mass n
 * cannot beat bounds[n], else the joint, the repetition penalty on its kept cells, the bound,
 * and the draw; at n = 1 head 1 alone. seen (one byte per token) marks the generated tokens;
 * bounds (float64) is indexed by n; `random` is rng.random, called once per non-greedy draw as
 * the numpy path calls it. The pair grid of the last step is reused when the first two heads'
 * candidates are the same (a 3 -> 2 back-off always; a next step sometimes). */
typedef struct {
    PyObject_HEAD
    Buffers held; /* the six tables' buffers */
    Workspace w;
    Py_ssize_t k, n_used;
    double bounds[MAX_ORDER + 1], temperature, static_threshold, penalty;
    int otsu, blur, greedy, configured;
    int pairs_valid; /* w.pair_grid holds the pairs of pair_ids */
    int64_t *pair_ids; /* 2 k: heads 1 and 2's candidates */
    void *select;      /* _marginals.c's scratch */
    int64_t *ids;      /* n_used x k candidates */
    double *probs;     /* n_used x k */
    uint8_t *in_seen;  /* n_used x k: whether each candidate was generated */
} Stepper;

static void stepper_dealloc(Stepper *self) {
    void *owned[] = {self->w.rank, self->w.cells, self->w.values, self->w.work, self->w.points, self->w.flags,
                     self->w.pair_grid, self->pair_ids, self->select, self->ids, self->probs, self->in_seen};
    for (size_t i = 0; i < sizeof(owned) / sizeof(owned[0]); i++) PyMem_Free(owned[i]);
    release(&self->held);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* What Stepper and Verifier are built from, (k, n, the six CSR tables): parsed into b and
 * checked against each other into w's tables and vocabulary; -1 with an error set. */
static int parse_tables(const char *who, int initialised, PyObject *args, PyObject *kwargs, Buffers *b, Py_ssize_t *k,
                        Py_ssize_t *n, Workspace *w) {
    if (initialised) return PyErr_Format(PyExc_ValueError, "%s: already initialised", who), -1;
    if (kwargs && PyDict_GET_SIZE(kwargs)) return PyErr_Format(PyExc_ValueError, "%s: positional arguments only", who), -1;
    if (!PyArg_ParseTuple(args, "nny*y*y*y*y*y*", k, n, &b->pair_indptr, &b->pair_indices, &b->pair_values,
                          &b->triple_indptr, &b->triple_indices, &b->triple_values))
        return -1;
    w->vocab = b->pair_indptr.len / (Py_ssize_t)sizeof(int64_t) - 1;
    if (*k < 1 || *k > w->vocab) return PyErr_Format(PyExc_ValueError, "%s: needs 1 <= k <= vocab", who), -1;
    return tables_agree(b, w->vocab, &w->pairs, &w->triples);
}

static int stepper_init(Stepper *self, PyObject *args, PyObject *kwargs) {
    Buffers b;
    memset(&b, 0, sizeof(b));
    Py_ssize_t k, n_used;
    int result = -1;
    if (parse_tables("Stepper", self->w.rank != NULL, args, kwargs, &b, &k, &n_used, &self->w) < 0) goto done;
    Py_ssize_t vocab = self->w.vocab;
    if (n_used < 2 || n_used > MAX_ORDER) {
        fail("Stepper: needs 2 or 3 heads");
        goto done;
    }
    if (n_used == 3 && self->w.triples.rows != self->w.pairs.nnz) {
        fail("Stepper: three heads need the triple table");
        goto done;
    }
    Py_ssize_t cells = n_used == 3 ? k * k * k : k * k;
    self->k = k;
    self->n_used = n_used;
    self->w.capacity = self->w.work_third = self->w.point_third = cells;
    self->w.pair_capacity = k * k;
    self->w.rank = PyMem_Malloc((size_t)vocab * sizeof(int32_t));
    self->w.cells = PyMem_Malloc((size_t)cells * sizeof(int64_t));
    self->w.values = PyMem_Malloc((size_t)cells * sizeof(double));
    self->w.work = PyMem_Calloc((size_t)(3 * cells), sizeof(double));
    self->w.points = PyMem_Malloc((size_t)(3 * cells) * sizeof(Point));
    self->w.flags = PyMem_Calloc((size_t)cells, 1);
    self->w.pair_grid = PyMem_Malloc((size_t)(k * k) * sizeof(int64_t));
    self->pair_ids = PyMem_Malloc((size_t)(2 * k) * sizeof(int64_t));
    self->select = PyMem_Malloc(marginals_scratch_bytes(vocab, k));
    self->ids = PyMem_Malloc((size_t)(n_used * k) * sizeof(int64_t));
    self->probs = PyMem_Malloc((size_t)(n_used * k) * sizeof(double));
    self->in_seen = PyMem_Malloc((size_t)(n_used * k));
    if (!self->w.rank || !self->w.cells || !self->w.values || !self->w.work || !self->w.points || !self->w.flags ||
        !self->w.pair_grid || !self->pair_ids || !self->select || !self->ids || !self->probs || !self->in_seen) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t v = 0; v < vocab; v++) self->w.rank[v] = -1;
    /* Keep the tables' buffers (and so their arrays) for the stepper's life. */
    self->held = b;
    memset(&b, 0, sizeof(b));
    result = 0;
done:
    release(&b);
    return result;
}

/* configure(bounds, temperature, static_threshold, penalty, otsu, blur, greedy): the settings
 * of the steps to come (a Stepper steps only once configured). */
static PyObject *stepper_configure(Stepper *self, PyObject *args) {
    Py_buffer bounds = {0};
    double temperature, static_threshold, penalty;
    int otsu, blur, greedy;
    PyObject *result = NULL;
    if (!self->w.rank) {
        fail("Stepper: not initialised");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "y*dddiii", &bounds, &temperature, &static_threshold, &penalty, &otsu, &blur, &greedy))
        return NULL;
    if (bounds.len != (self->n_used + 1) * (Py_ssize_t)sizeof(double) || !(temperature > 0) ||
        (blur != 0 && blur != 1 && blur != 3)) {
        fail("Stepper.configure: needs bounds for n = 0..n_used, temperature > 0, blur 0, 1 or 3");
        goto done;
    }
    memcpy(self->bounds, bounds.buf, (size_t)bounds.len);
    self->temperature = temperature;
    self->static_threshold = static_threshold;
    self->penalty = penalty;
    self->otsu = otsu;
    self->blur = blur;
    self->greedy = greedy;
    self->configured = 1;
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&bounds);
    return result;
}

/* The grids n = n_used .. 2 through their stages until one emits, else head 1 alone; the
 * tokens into `tokens`, their count returned (-2: a Python error). */
static Py_ssize_t stepper_chain(Stepper *self, const double *mass, PyObject *random, int64_t *tokens) {
    const Workspace *w = &self->w;
    Py_ssize_t k = self->k;
    int pairs_ready = self->pairs_valid && !memcmp(self->pair_ids, self->ids, 2 * k * sizeof(int64_t));
    for (Py_ssize_t n = self->n_used; n >= 2; n--) {
        if (!beats(mass[n] * (1 + 1e-9), self->bounds[n])) continue; /* J <= mass: see grid.joint */
        Grid g = {.ndim = (int)n, .mass = mass[n], .bound = self->bounds[n]};
        for (Py_ssize_t a = 0; a < n; a++) {
            g.shape[a] = k;
            g.ids[a] = self->ids + a * k;
            g.probs[a] = self->probs + a * k;
        }
        self->pairs_valid = pairs_ready; /* the call below writes the pair grid unless it reuses it */
        Py_ssize_t count = grid_call(w, &g, self->static_threshold, self->otsu, self->blur, pairs_ready);
        if (count == -2) return -2;
        if (!pairs_ready) memcpy(self->pair_ids, self->ids, 2 * k * sizeof(int64_t));
        self->pairs_valid = pairs_ready = 1;
        if (count < 0) continue;
        stage_penalty(w, &g, self->in_seen, k, self->penalty);
        if (!stage_backoff(w, &g)) continue;
        Py_ssize_t pick = stage_draw(w->values, g.count, self->greedy, random);
        if (pick == -2) return -2;
        Py_ssize_t rest = w->cells[pick];
        for (Py_ssize_t a = n - 1; a >= 0; a--) {
            tokens[a] = g.ids[a][rest % k];
            rest /= k;
        }
        return n;
    }
    double *weights = w->values; /* head 1 alone: its top-k over the penalty (x / 1.0 is x) */
    for (Py_ssize_t j = 0; j < k; j++)
        weights[j] = self->probs[j] / (self->in_seen[j] && self->penalty != 1.0 ? self->penalty : 1.0);
    Py_ssize_t pick = stage_draw(weights, k, self->greedy, random);
    if (pick == -2) return -2;
    tokens[0] = self->ids[pick];
    return 1;
}

/* step(logits, seen, random): propose, then the chain. */
static PyObject *stepper_step(Stepper *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "step(logits, seen, random) takes three arguments");
        return NULL;
    }
    if (!self->configured) {
        fail("Stepper: not configured");
        return NULL;
    }
    Py_buffer logits = {0}, seen = {0};
    Py_ssize_t rows = 0, vocab = 0, row_stride = 0;
    PyObject *random = args[2], *result = NULL;
    if (get_rows(args[0], &logits, &rows, &vocab, &row_stride) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_ValueError)) return NULL;
        PyErr_Clear(); /* a layout this kernel does not read: the numpy path's */
        return Py_NewRef(Py_NotImplemented);
    }
    if (PyObject_GetBuffer(args[1], &seen, PyBUF_SIMPLE) < 0) goto done;
    if (rows < self->n_used || vocab != self->w.vocab || seen.len != vocab || !PyCallable_Check(random)) {
        fail("Stepper.step: logits need n_used rows of the tables' vocabulary, seen one byte per token");
        goto done;
    }
    double mass[MAX_ORDER + 1];
    if (stage_propose(logits.buf, row_stride, vocab, self->n_used, self->k, self->temperature, seen.buf, self->ids,
                      self->probs, mass, self->in_seen, self->select) < 0) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    int64_t tokens[MAX_ORDER];
    Py_ssize_t emitted = stepper_chain(self, mass, random, tokens);
    if (emitted == -2) goto done;
    result = PyTuple_New(emitted);
    if (!result) goto done;
    for (Py_ssize_t i = 0; i < emitted; i++) {
        PyObject *token = PyLong_FromLongLong(tokens[i]);
        if (!token) {
            Py_CLEAR(result);
            goto done;
        }
        PyTuple_SET_ITEM(result, i, token);
    }
done:
    PyBuffer_Release(&logits);
    PyBuffer_Release(&seen);
    return result;
}

static PyMethodDef stepper_methods[] = {
    {"configure", (PyCFunction)stepper_configure, METH_VARARGS,
     "configure(bounds, temperature, static_threshold, penalty, otsu, blur, greedy): the coming steps' settings."},
    {"step", (PyCFunction)(void (*)(void))stepper_step, METH_FASTCALL,
     "step(logits, seen, random) -> tokens, None for unusable logits, NotImplemented for unread ones."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject StepperType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "runtime._native.Stepper",
    .tp_doc = "One sampler's compiled dynamic step for one plan (see runtime/native.py).",
    .tp_basicsize = sizeof(Stepper),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)stepper_init,
    .tp_dealloc = (destructor)stepper_dealloc,
    .tp_methods = stepper_methods,
};

/* Verifier(k, n_drafts, pair_indptr, pair_indices, pair_values, triple_indptr, triple_indices,
 *          triple_values), then .configure(temperature, penalty, weighted, greedy): verify mode's
 * stages (draft, check, residual) for one stream, holding the tables and its scratch like Stepper.
 *
 * .draft(logits, after, seen, extra, random, q_ids, q_probs) -> (tokens, orders): one draft per
 * row of logits (heads 2.., n_drafts rows) after `after`, q of each written to row j of q_ids
 * (int64) / q_probs (float64), both n_drafts x k. seen marks the generated tokens (one byte per
 * token), extra (int64) holds more of them.
 * .check(logits, drafts, q_ids, q_probs, seen, extra, random) -> (tokens, accepted): head 1's rows
 * (one per draft and one more) against the drafts (int64) and their q.
 * Both: None when a row's logits are unusable, NotImplemented for logits they do not read; a
 * draft of probability 0 under its own q is a ValueError. runtime/verify.py is the numpy twin. */
typedef struct {
    PyObject_HEAD
    Buffers held;
    Workspace w;
    Py_ssize_t k, n_drafts;
    double temperature, penalty;
    int weighted, greedy, configured;
    void *select;    /* _marginals.c's scratch */
    int64_t *ids;    /* k: one row's candidates */
    double *probs;   /* k: their marginals */
    double *target;  /* k: head 1's sampling distribution at a fed position */
    double *scratch; /* 3 k: the residual's */
    int64_t *words;  /* draft_scratch_words: the lookups' */
} Verifier;

static void verifier_dealloc(Verifier *self) {
    void *owned[] = {self->w.rank, self->select, self->ids, self->probs, self->target, self->scratch, self->words};
    for (size_t i = 0; i < sizeof(owned) / sizeof(owned[0]); i++) PyMem_Free(owned[i]);
    release(&self->held);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int verifier_init(Verifier *self, PyObject *args, PyObject *kwargs) {
    Buffers b;
    memset(&b, 0, sizeof(b));
    Py_ssize_t k, n_drafts;
    int result = -1;
    if (parse_tables("Verifier", self->w.rank != NULL, args, kwargs, &b, &k, &n_drafts, &self->w) < 0) goto done;
    Py_ssize_t vocab = self->w.vocab;
    if (n_drafts < 1 || n_drafts > MAX_ORDER) {
        fail("Verifier: needs 1 to 3 drafts");
        goto done;
    }
    self->k = k;
    self->n_drafts = n_drafts;
    self->w.rank = PyMem_Malloc((size_t)vocab * sizeof(int32_t));
    self->select = PyMem_Malloc(marginals_scratch_bytes(vocab, k));
    self->ids = PyMem_Malloc((size_t)k * sizeof(int64_t));
    self->probs = PyMem_Malloc((size_t)k * sizeof(double));
    self->target = PyMem_Malloc((size_t)k * sizeof(double));
    self->scratch = PyMem_Malloc((size_t)(3 * k) * sizeof(double));
    self->words = PyMem_Calloc(draft_scratch_words(vocab, k), sizeof(int64_t));
    if (!self->w.rank || !self->select || !self->ids || !self->probs || !self->target || !self->scratch ||
        !self->words) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t v = 0; v < vocab; v++) self->w.rank[v] = -1;
    self->held = b;
    memset(&b, 0, sizeof(b));
    result = 0;
done:
    release(&b);
    return result;
}

static PyObject *verifier_configure(Verifier *self, PyObject *args) {
    if (!self->w.rank) {
        fail("Verifier: not initialised");
        return NULL;
    }
    double temperature, penalty;
    int weighted, greedy;
    if (!PyArg_ParseTuple(args, "ddii", &temperature, &penalty, &weighted, &greedy)) return NULL;
    if (!(temperature > 0) || !(penalty >= 1)) {
        fail("Verifier.configure: needs temperature > 0 and penalty >= 1");
        return NULL;
    }
    self->temperature = temperature;
    self->penalty = penalty;
    self->weighted = weighted;
    self->greedy = greedy;
    self->configured = 1;
    return Py_NewRef(Py_None);
}

/* What draft and check share: the logits' rows, the seen mask, the extra tokens. */
typedef struct {
    Py_buffer logits, seen, extra;
    Py_ssize_t rows, vocab, row_stride;
} Inputs;

static void release_inputs(Inputs *in) {
    PyBuffer_Release(&in->logits);
    PyBuffer_Release(&in->seen);
    PyBuffer_Release(&in->extra);
}

/* 0; 1 when the logits are a layout the kernel does not read; -1 with an error set. */
static int get_inputs(Verifier *self, PyObject *logits, PyObject *seen, PyObject *extra, Inputs *in) {
    memset(in, 0, sizeof(*in));
    if (!self->configured) return fail("Verifier: not configured");
    if (get_rows(logits, &in->logits, &in->rows, &in->vocab, &in->row_stride) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_ValueError)) return -1;
        PyErr_Clear();
        return 1;
    }
    if (PyObject_GetBuffer(seen, &in->seen, PyBUF_SIMPLE) < 0 || PyObject_GetBuffer(extra, &in->extra, PyBUF_SIMPLE) < 0)
        return -1;
    if (in->vocab != self->w.vocab || in->seen.len != in->vocab || in->extra.len % (Py_ssize_t)sizeof(int64_t) ||
        in->extra.len > MAX_EXTRA * (Py_ssize_t)sizeof(int64_t))
        return fail("Verifier: logits of the tables' vocabulary, seen one byte per token, at most 64 extra int64 ids");
    const int64_t *ids = in->extra.buf;
    for (Py_ssize_t i = 0; i < in->extra.len / (Py_ssize_t)sizeof(int64_t); i++)
        if (ids[i] < 0 || ids[i] >= in->vocab) return fail("Verifier: an extra token is outside the vocabulary");
    return 0;
}

static PyObject *as_tuple(const int64_t *values, Py_ssize_t n) {
    PyObject *tuple = PyTuple_New(n);
    for (Py_ssize_t i = 0; tuple && i < n; i++) {
        PyObject *item = PyLong_FromLongLong(values[i]);
        if (!item) {
            Py_CLEAR(tuple);
            break;
        }
        PyTuple_SET_ITEM(tuple, i, item);
    }
    return tuple;
}

static PyObject *verifier_draft(Verifier *self, PyObject *args) {
    PyObject *logits_obj, *seen_obj, *extra_obj, *random;
    long long after;
    Py_buffer q_ids = {0}, q_probs = {0};
    Inputs in;
    PyObject *result = NULL;
    Py_ssize_t k = self->k;
    if (!PyArg_ParseTuple(args, "OLOOOw*w*", &logits_obj, &after, &seen_obj, &extra_obj, &random, &q_ids, &q_probs))
        return NULL;
    int got = get_inputs(self, logits_obj, seen_obj, extra_obj, &in);
    if (got != 0) {
        if (got == 1) result = Py_NewRef(Py_NotImplemented);
        goto done;
    }
    Py_ssize_t n = in.rows;
    if (n < 1 || n > self->n_drafts || after < 0 || after >= in.vocab || !PyCallable_Check(random) ||
        q_ids.len < n * k * (Py_ssize_t)sizeof(int64_t) || q_probs.len < n * k * (Py_ssize_t)sizeof(double)) {
        fail("Verifier.draft: 1..n_drafts rows, `after` in the vocabulary, q buffers of rows x k");
        goto done;
    }
    int64_t prefix[MAX_ORDER + 1] = {after}, orders[MAX_ORDER];
    for (Py_ssize_t j = 0; j < n; j++) {
        int64_t *ids = (int64_t *)q_ids.buf + j * k;
        double *q = (double *)q_probs.buf + j * k;
        if (row_marginals((const float *)in.logits.buf + j * in.row_stride, in.vocab, k, self->temperature, ids,
                          self->probs, self->select) < 0) {
            result = Py_NewRef(Py_None);
            goto done;
        }
        orders[j] = stage_draft(&self->w, ids, self->probs, k, prefix, (int)(j + 1), self->weighted, in.seen.buf,
                                in.extra.buf, in.extra.len / (Py_ssize_t)sizeof(int64_t), self->penalty, q,
                                self->words);
        Py_ssize_t pick = stage_draw(q, k, self->greedy, random);
        if (pick == -2) goto done;
        prefix[j + 1] = ids[pick];
    }
    PyObject *tokens = as_tuple(prefix + 1, n), *used = as_tuple(orders, n);
    if (tokens && used) result = PyTuple_Pack(2, tokens, used);
    Py_XDECREF(tokens);
    Py_XDECREF(used);
done:
    release_inputs(&in);
    PyBuffer_Release(&q_ids);
    PyBuffer_Release(&q_probs);
    return result;
}

static int listed(const int64_t *list, Py_ssize_t n, int64_t token) {
    for (Py_ssize_t i = 0; i < n; i++)
        if (list[i] == token) return 1;
    return 0;
}

/* target = head 1's top-k over the penalty where generated (draws.penalised; x / 1.0 is x). */
static void head1_weights(Verifier *self, const uint8_t *seen, const int64_t *context, Py_ssize_t n_context) {
    for (Py_ssize_t i = 0; i < self->k; i++) {
        int generated = seen[self->ids[i]] || listed(context, n_context, self->ids[i]);
        self->target[i] = self->probs[i] / (generated && self->penalty != 1.0 ? self->penalty : 1.0);
    }
}

static PyObject *verifier_check(Verifier *self, PyObject *args) {
    PyObject *logits_obj, *seen_obj, *extra_obj, *random;
    Py_buffer drafts = {0}, q_ids = {0}, q_probs = {0};
    Inputs in;
    PyObject *result = NULL;
    Py_ssize_t k = self->k;
    if (!PyArg_ParseTuple(args, "Oy*y*y*OOO", &logits_obj, &drafts, &q_ids, &q_probs, &seen_obj, &extra_obj, &random))
        return NULL;
    int got = get_inputs(self, logits_obj, seen_obj, extra_obj, &in);
    if (got != 0) {
        if (got == 1) result = Py_NewRef(Py_NotImplemented);
        goto done;
    }
    Py_ssize_t m = drafts.len / (Py_ssize_t)sizeof(int64_t), n_extra = in.extra.len / (Py_ssize_t)sizeof(int64_t);
    if (m > self->n_drafts || in.rows != m + 1 || drafts.len % (Py_ssize_t)sizeof(int64_t) ||
        q_ids.len != m * k * (Py_ssize_t)sizeof(int64_t) || q_probs.len != m * k * (Py_ssize_t)sizeof(double) ||
        !PyCallable_Check(random)) {
        fail("Verifier.check: one row of head-1 logits per draft and one more, q of drafts x k");
        goto done;
    }
    /* The penalty's context at position j: the mask, extra, and the drafts before j. */
    int64_t context[MAX_EXTRA + MAX_ORDER], out[MAX_ORDER + 1];
    memcpy(context, in.extra.buf, (size_t)n_extra * sizeof(int64_t));
    const int64_t *draft = drafts.buf;
    Py_ssize_t accepted = 0;
    int64_t last = -1;
    for (Py_ssize_t j = 0; j <= m; j++) {
        if (row_marginals((const float *)in.logits.buf + j * in.row_stride, in.vocab, k, self->temperature, self->ids,
                          self->probs, self->select) < 0) {
            result = Py_NewRef(Py_None);
            goto done;
        }
        if (j == m || self->greedy) { /* the bonus token, or greedy's: head 1's own draw over the penalty */
            head1_weights(self, in.seen.buf, context, n_extra + j);
            Py_ssize_t pick = stage_draw(self->target, k, self->greedy, random);
            if (pick == -2) goto done;
            last = self->ids[pick];
            if (j == m || last != draft[j]) break;
        } else {
            const int64_t *qi = (const int64_t *)q_ids.buf + j * k;
            const double *qp = (const double *)q_probs.buf + j * k;
            stage_target(self->ids, self->probs, k, in.seen.buf, context, n_extra + j, self->penalty, self->target);
            int passed = stage_check(self->ids, self->target, qi, qp, k, draft[j], random);
            if (passed == -2) goto done;
            if (passed == -1) {
                fail("Verifier.check: a draft token has probability 0 under its own draft distribution");
                goto done;
            }
            if (!passed) {
                last = stage_residual(self->ids, self->target, qi, qp, k, self->scratch, random);
                if (last == -2) goto done;
                break;
            }
        }
        out[j] = draft[j];
        context[n_extra + j] = draft[j];
        accepted++;
    }
    out[accepted] = last;
    PyObject *tokens = as_tuple(out, accepted + 1);
    if (tokens) result = Py_BuildValue("(Nn)", tokens, accepted);
done:
    release_inputs(&in);
    PyBuffer_Release(&drafts);
    PyBuffer_Release(&q_ids);
    PyBuffer_Release(&q_probs);
    return result;
}

static PyMethodDef verifier_methods[] = {
    {"configure", (PyCFunction)verifier_configure, METH_VARARGS,
     "configure(temperature, penalty, weighted, greedy): the coming passes' settings."},
    {"draft", (PyCFunction)verifier_draft, METH_VARARGS,
     "draft(logits, after, seen, extra, random, q_ids, q_probs) -> (tokens, orders)."},
    {"check", (PyCFunction)verifier_check, METH_VARARGS,
     "check(logits, drafts, q_ids, q_probs, seen, extra, random) -> (tokens, accepted)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject VerifierType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "runtime._native.Verifier",
    .tp_doc = "One stream's compiled verify stages (see runtime/native.py).",
    .tp_basicsize = sizeof(Verifier),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)verifier_init,
    .tp_dealloc = (destructor)verifier_dealloc,
    .tp_methods = verifier_methods,
};

/* marginals(logits, k, temperature, ids, probs) -> whether every row was usable: per row of
 * logits (get_rows), the k best tokens by (-logit, id) into
 * ids (rows x k, int64) and their softmax(logits / temperature) into probs (float64); see
 * _marginals.c. False when a row holds a NaN or an infinite maximum. */
static PyObject *marginals(PyObject *self, PyObject *args) {
    Py_buffer logits = {0}, ids = {0}, probs = {0};
    Py_ssize_t rows, vocab, row_stride, k;
    double temperature;
    PyObject *logits_obj, *result = NULL;
    if (!PyArg_ParseTuple(args, "Ondw*w*", &logits_obj, &k, &temperature, &ids, &probs)) return NULL;
    void *scratch = NULL;
    if (get_rows(logits_obj, &logits, &rows, &vocab, &row_stride) < 0) goto done;
    if (k < 1 || k > vocab || !(temperature > 0) || ids.len < rows * k * (Py_ssize_t)sizeof(int64_t) ||
        probs.len < rows * k * (Py_ssize_t)sizeof(double)) {
        PyErr_SetString(PyExc_ValueError, "marginals: buffer sizes do not match rows x vocab and k");
        goto done;
    }
    scratch = PyMem_Malloc(marginals_scratch_bytes(vocab, k));
    if (!scratch) {
        PyErr_NoMemory();
        goto done;
    }
    int usable = 1;
    for (Py_ssize_t r = 0; r < rows && usable; r++)
        usable = row_marginals((const float *)logits.buf + r * row_stride, vocab, k, temperature,
                               (int64_t *)ids.buf + r * k, (double *)probs.buf + r * k, scratch) == 0;
    result = PyBool_FromLong(usable);
done:
    PyMem_Free(scratch);
    PyBuffer_Release(&logits);
    PyBuffer_Release(&ids);
    PyBuffer_Release(&probs);
    return result;
}

/* The stages this kernel compiles, in runtime/stages.py's order: their names for
 * `_native.STAGES` (runtime/native.py checks them against the list), and their addresses, so
 * a stage missing its function fails the build. */
#define STAGE_NAME(name) #name,
#define STAGE_ADDRESS(name) (void (*)(void))stage_##name,
static const char *const stage_names[] = {DYNAMIC_STAGES(STAGE_NAME)};
static void (*const stage_functions[])(void) = {DYNAMIC_STAGES(STAGE_ADDRESS)};
static const char *const verify_stage_names[] = {VERIFY_STAGES(STAGE_NAME)};
static void (*const verify_stage_functions[])(void) = {VERIFY_STAGES(STAGE_ADDRESS)};

/* A tuple of the names whose functions exist (every one, or the build would have failed). */
static PyObject *stage_tuple(const char *const *names, void (*const *functions)(void), size_t count) {
    PyObject *tuple = PyTuple_New((Py_ssize_t)count);
    for (size_t i = 0; tuple && i < count; i++) {
        PyObject *name = functions[i] ? PyUnicode_FromString(names[i]) : NULL;
        if (!name) Py_CLEAR(tuple);
        else PyTuple_SET_ITEM(tuple, (Py_ssize_t)i, name);
    }
    return tuple;
}

static PyMethodDef methods[] = {
    {"marginals", marginals, METH_VARARGS, "Each row's top-k ids and softmax probabilities (see runtime/native.py)."},
    {"joint", joint, METH_VARARGS, "A weighted grid's joint, weight and threshold stages (see runtime/native.py)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "runtime._native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&StepperType) < 0 || PyType_Ready(&VerifierType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    PyObject *dynamic = stage_tuple(stage_names, stage_functions, sizeof(stage_names) / sizeof(stage_names[0]));
    PyObject *verify = stage_tuple(verify_stage_names, verify_stage_functions,
                                   sizeof(verify_stage_names) / sizeof(verify_stage_names[0]));
    if (!dynamic || !verify || PyModule_AddObjectRef(m, "STAGES", dynamic) < 0 ||
        PyModule_AddObjectRef(m, "VERIFY_STAGES", verify) < 0 ||
        PyModule_AddObjectRef(m, "Stepper", (PyObject *)&StepperType) < 0 ||
        PyModule_AddObjectRef(m, "Verifier", (PyObject *)&VerifierType) < 0)
        Py_CLEAR(m);
    Py_XDECREF(dynamic);
    Py_XDECREF(verify);
    return m;
}
