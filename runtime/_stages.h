/* The compiled stages of runtime/stages.py: one function per stage, named stage_<name>, each doing
 * what the numpy function of the same name does (runtime/dynamic.py lists them), operation for
 * operation, so the two paths agree to the last bit. runtime/_native.c wires them into Python.
 * docs/METHOD.md defines what every stage computes. */
#ifndef DYNAMO_STAGES_H
#define DYNAMO_STAGES_H

#include "_marginals.h"

#define MAX_ORDER 3
#define OTSU_BINS 256
#define MAX_EXTRA 64 /* generated tokens a verify call takes beside the mask */

/* The dynamic step's stages in runtime/stages.py's order; X(name) for each. _native.c turns the
 * list into `_native.STAGES` and takes every stage_<name>'s address, so a stage listed here
 * without its function does not compile. */
#define DYNAMIC_STAGES(X) \
    X(propose) X(joint) X(weight) X(static_threshold) X(adaptive_threshold) X(penalty) X(backoff) X(draw)
#define VERIFY_STAGES(X) X(draft) X(check) X(residual)

/* A CSR table. Its column indices are uint16 where the vocabulary allows (runtime/cooccurrence.py
 * narrows them): half the bytes to scan, and a row of a dozen entries then fits one cache line. */
typedef struct {
    const int64_t *indptr; /* rows + 1 */
    const void *indices;   /* nnz, int32 or (narrow) uint16 */
    const float *values;
    Py_ssize_t rows;
    Py_ssize_t nnz;
    int narrow;
} Table;

/* A cell of the (padded, three-axis) grid with its coordinates: the blur's passes need both,
 * and dividing them out of the cell id per visit would cost more than the pass itself. */
typedef struct {
    int32_t cell;
    int16_t x[3];
    int16_t bin; /* Otsu's bin, once the cell is a candidate */
} Point;

/* What the grid stages read and write, as plain arrays: the tables, checked against each other
 * once (tables_agree), and scratch for grids of up to `capacity` cells. */
typedef struct {
    Table pairs, triples; /* triples.rows == 0: no triple table */
    int32_t *rank;        /* one per token, all -1 between calls */
    Py_ssize_t vocab;
    int64_t *cells;       /* capacity: the grid's live cell ids, ascending */
    double *values;       /* capacity: J there */
    double *work;         /* 3 x work_third: a zero grid (all 0 between calls), then two pass grids */
    Py_ssize_t work_third;
    Point *points;        /* 3 x point_third: the blur's cell lists; joint and weight read it as int64 */
    Py_ssize_t point_third;
    uint8_t *flags;       /* capacity, all 0 between calls */
    int64_t *pair_grid;   /* pair_capacity: pair entry ids of a k1 x k2 grid */
    Py_ssize_t capacity, pair_capacity;
} Workspace;

/* One candidate grid of n heads on its way through the grid stages. */
typedef struct {
    int ndim;
    Py_ssize_t shape[MAX_ORDER], size;
    const int64_t *ids[MAX_ORDER];  /* each axis' candidate ids */
    const double *probs[MAX_ORDER]; /* and their marginals */
    double mass;                    /* the product's mass over the grid: J's total */
    double bound;                   /* eps_b ** (n - 1) */
    Py_ssize_t count;               /* live cells in the workspace's cells / values */
    const float *weights;           /* joint -> weight: the table the cells' entries index */
} Grid;

/* The back-off rule (stages.beats): a grid whose largest cell is `peak` emits iff min(peak, 1) > bound. */
static inline int beats(double peak, double bound) { return (peak < 1.0 ? peak : 1.0) > bound; }

/* One CSR table over three buffers' memory; -1 when their sizes disagree. */
int table_from(const int64_t *indptr, Py_ssize_t indptr_len, const void *indices, Py_ssize_t indices_len,
               const float *values, Py_ssize_t values_len, Table *t);

/* propose: the marginals of `heads` rows of logits (row_stride floats apart) into ids / probs
 * (heads x k), each head's top-k mass as a running sum multiplied head by head into mass[1..heads]
 * (mass[0] = 1), and in_seen[h k + j] = whether candidate j of head h was generated. -1 when a
 * row's logits are unusable. */
int stage_propose(const float *logits, Py_ssize_t row_stride, Py_ssize_t vocab, Py_ssize_t heads, Py_ssize_t k,
                  double temperature, const uint8_t *generated, int64_t *ids, double *probs, double *mass,
                  uint8_t *in_seen, void *select);

/* joint: R = the product of marginals, rounded ((f_1 f_2) f_3), on the grid's stored n-grams only
 * (W = 0 masks every other cell), into w->cells / w->values with each cell's table entry for the
 * weight stage. With reuse_pairs, w->pair_grid already holds the pair entries of these first
 * two candidate lists. g->count, or -2 with a Python error set. */
Py_ssize_t stage_joint(const Workspace *w, Grid *g, int reuse_pairs);

/* weight: J = R W * (mass / sum R W), the sum a running sum in C order. -1 when J cannot beat
 * the bound (every stage after this one only lowers cells), or is 0 and the bound >= 0. */
Py_ssize_t stage_weight(const Workspace *w, Grid *g);

/* static_threshold: cells below `threshold` become 0. */
void stage_static_threshold(const Workspace *w, const Grid *g, double threshold);

/* adaptive_threshold: with otsu, only the cells outside Otsu's low class of the blurred J stay
 * live (ascending); blur 0, 1 or 3. g->count. */
Py_ssize_t stage_adaptive_threshold(const Workspace *w, Grid *g, int otsu, int blur);

/* penalty: J divided by `penalty` once per axis whose candidate was generated (in_seen: one
 * flag per candidate, axis a's at a * stride) or equals the cell's candidate on an earlier axis. */
void stage_penalty(const Workspace *w, const Grid *g, const uint8_t *in_seen, Py_ssize_t stride, double penalty);

/* backoff: whether the grid's largest cell beats its bound. */
int stage_backoff(const Workspace *w, const Grid *g);

/* draw: over weights[0..n): the first argmax if greedy, else one call of `random` and the first
 * running sum above u * (running total). The index, or -2 with a Python error set. */
Py_ssize_t stage_draw(const double *weights, Py_ssize_t n, int greedy, PyObject *random);

/* --- verify --- */

/* Words of scratch stage_draft needs for `k` candidates over a vocabulary of `vocab`. */
size_t draft_scratch_words(Py_ssize_t vocab, Py_ssize_t k);

/* draft: q over one draft head's candidates (ids, probs: its top-k) after the fixed tokens
 * prefix[0..n_prefix <= MAX_ORDER] (head 1's choice, then the earlier drafts), with n_extra <=
 * MAX_EXTRA: probs times W(s, c) for the
 * longest suffix s of the prefix whose n-gram is stored for a candidate (when `weighted`),
 * divided by the penalty where the candidate is generated (the mask, `extra`, the prefix),
 * over its running sum. The order used (len(s) + 1, or 1 for the marginal). */
int stage_draft(const Workspace *w, const int64_t *ids, const double *probs, Py_ssize_t k, const int64_t *prefix,
                int n_prefix, int weighted, const uint8_t *generated, const int64_t *extra, Py_ssize_t n_extra,
                double penalty, double *q, int64_t *scratch);

/* The target of a check: head 1's top-k probs divided by the penalty where generated, normalised. */
void stage_target(const int64_t *ids, const double *probs, Py_ssize_t k, const uint8_t *generated,
                  const int64_t *extra, Py_ssize_t n_extra, double penalty, double *p);

/* check: whether draft `token`, drawn from q, passes against the target p: one call of `random`,
 * accepted iff u < p(token) / q(token). 1 / 0; -1 when q(token) = 0; -2 with a Python error. */
int stage_check(const int64_t *p_ids, const double *p, const int64_t *q_ids, const double *q, Py_ssize_t k,
                int64_t token, PyObject *random);

/* residual: a token from norm(max(0, p - q)) over p's candidates in ascending id order (p itself
 * where rounding leaves nothing), one call of `random`; -2 with a Python error. scratch: 3 k. */
int64_t stage_residual(const int64_t *p_ids, const double *p, const int64_t *q_ids, const double *q, Py_ssize_t k,
                       double *scratch, PyObject *random);

#endif
