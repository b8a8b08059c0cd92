/* DynaMo's Algorithm 1 with co-occurrence weights, one pass per call: runtime/sampling.py's hot path,
 * from the heads' logits (their marginals: _marginals.c) to the tokens.
 *
 * Why C: with masks, a step of the numpy sampler is ~150 small array calls (the softmax and
 * top-k, lookups in the co-occurrence CSR tables, the joint over the stored n-grams, the
 * blurred Otsu threshold); their dispatch and cache misses cost ~1 ms, a third of a forward
 * pass of the reference model, against a budget of 15%. Here the same work is a few loops over
 * the few thousand stored cells. There is no library for this step: it is the paper's
 * own algorithm, as llama.cpp's samplers are its own C.
 *
 * The arithmetic is runtime/sampling.py's numpy path, operation for operation and in the
 * same order, so the two agree to the last bit (tests/test_native.py holds them to it):
 *   R = ((f_1 f_2) f_3) * W, sum R = the running sum in C order, J = R * (mass / sum R);
 *   blur = 2 x [1, 2, 1] / 4 per axis as ((l + r) * 0.5) + c with mirrored borders;
 *   Otsu on 256 bins over [min B, max B] with the integer split score.
 * Build flags keep the compiler from contracting a * b + c into one fused rounding.
 *
 * Only plain buffers cross the boundary (the buffer protocol, no numpy headers); the
 * Python side (runtime/native.py) checks dtypes and sizes, this side checks lengths
 * again before it reads anything.
 */
#include "_marginals.h"

#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define OTSU_BINS 256
#define SCAN_ROW_FACTOR 64 /* scan a row of up to 4 entries per candidate; binary-search longer ones */
#define MAX_ORDER 3
#define PREFETCH_AHEAD 16 /* rows ahead to prefetch in the triple table */
#define PAIR_ROWS_AHEAD 4 /* rows ahead to prefetch in the pair table */

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

static inline int64_t column(const Table *t, int64_t e, const int narrow) {
    return narrow ? ((const uint16_t *)t->indices)[e] : ((const int32_t *)t->indices)[e];
}

static inline const void *column_address(const Table *t, int64_t e) {
    return (const char *)t->indices + e * (t->narrow ? (int64_t)sizeof(uint16_t) : (int64_t)sizeof(int32_t));
}

/* The candidate tokens of one grid axis: a bitmap to test membership while scanning a row
 * (a vocabulary's worth of int32 ranks would not stay in L1 beside the row) and the rank of
 * each token in the candidate list (-1 elsewhere) for the few that pass. */
typedef struct {
    uint64_t *bits;
    int32_t *rank;
} Candidates;

static void set_candidates(Candidates *c, const int64_t *ids, Py_ssize_t k, int on) {
    for (Py_ssize_t j = 0; j < k; j++) {
        c->rank[ids[j]] = on ? (int32_t)j : -1;
        if (on) c->bits[ids[j] >> 6] |= (uint64_t)1 << (ids[j] & 63);
        else c->bits[ids[j] >> 6] = 0;
    }
}

/* For row `row`: the positions j of cols stored in it, ascending, into found (their count is
 * returned) and entry[j] = their entry ids; `cand` holds cols. Short rows are scanned, long ones
 * binary-searched; entry[] is only written at the found positions, so a caller that resets those
 * keeps it all -1 between rows; base is k + 1 slots of scratch. Each found entry's value, and its
 * slot in next_rows (the next table's row bounds) unless NULL, are prefetched: the caller reads
 * them after the whole grid is found, and by then the misses have overlapped. */
static inline __attribute__((always_inline)) Py_ssize_t
row_entries_of(const Table *t, int64_t row, const int64_t *cols, Py_ssize_t k, const Candidates *cand, int64_t *entry,
               Py_ssize_t *found, int64_t *base, const int64_t *next_rows, const int narrow) {
    int64_t start = t->indptr[row], end = t->indptr[row + 1];
    Py_ssize_t count = 0;
    if (end - start <= SCAN_ROW_FACTOR * k) {
        /* Branch-free: every entry is written to the hit list in base, which grows only for
         * hits (a row holds a token once: at most k of them, k + 1 slots). A branch per entry,
         * mispredicted on the ~10% that hit, cost more than the scan itself. */
        Py_ssize_t hits = 0;
        for (int64_t e = start; e < end; e++) {
            uint32_t token = (uint32_t)column(t, e, narrow);
            base[hits] = e;
            hits += (Py_ssize_t)((cand->bits[token >> 6] >> (token & 63)) & 1);
        }
        for (Py_ssize_t h = 0; h < hits; h++) {
            int64_t e = base[h];
            int32_t j = cand->rank[column(t, e, narrow)];
            entry[j] = e;
            __builtin_prefetch(&t->values[e]);
            if (next_rows) __builtin_prefetch(&next_rows[e]);
            Py_ssize_t at = count++; /* insertion sort: a row holds few of the candidates */
            while (at > 0 && found[at - 1] > j) {
                found[at] = found[at - 1];
                at--;
            }
            found[at] = j;
        }
    } else {
        /* All k binary searches a level at a time: their loads are independent, so the
         * memory system overlaps the misses that one search after another would wait out. */
        for (Py_ssize_t j = 0; j < k; j++) base[j] = start;
        for (int64_t n = end - start; n > 1; n -= n / 2) {
            int64_t half = n / 2;
            for (Py_ssize_t j = 0; j < k; j++)
                base[j] = column(t, base[j] + half, narrow) < cols[j] ? base[j] + half : base[j];
        }
        for (Py_ssize_t j = 0; j < k; j++) {
            int64_t e = base[j] + (column(t, base[j], narrow) < cols[j]);
            entry[j] = -1;
            if (e < end && column(t, e, narrow) == cols[j]) {
                entry[j] = e;
                __builtin_prefetch(&t->values[e]);
                if (next_rows) __builtin_prefetch(&next_rows[e]);
                found[count++] = j;
            }
        }
    }
    return count;
}

/* row_entries_of, compiled once per index width. */
static Py_ssize_t row_entries(const Table *t, int64_t row, const int64_t *cols, Py_ssize_t k, const Candidates *cand,
                              int64_t *entry, Py_ssize_t *found, int64_t *base, const int64_t *next_rows) {
    return t->narrow ? row_entries_of(t, row, cols, k, cand, entry, found, base, next_rows, 1)
                     : row_entries_of(t, row, cols, k, cand, entry, found, base, next_rows, 0);
}

/* A cell of the (padded, three-axis) grid with its coordinates: the blur's passes need both,
 * and dividing them out of the cell id per visit would cost more than the pass itself. */
typedef struct {
    int32_t cell;
    int16_t x[3];
    int16_t bin; /* Otsu's bin, once the cell is a candidate */
} Point;

static inline Point point(Py_ssize_t x0, Py_ssize_t x1, Py_ssize_t x2, const Py_ssize_t *stride) {
    Point p = {(int32_t)(x0 * stride[0] + x1 * stride[1] + x2), {(int16_t)x0, (int16_t)x1, (int16_t)x2}, 0};
    return p;
}

static int compare_int64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Otsu's split over a histogram: numpy's otsu_split in runtime/sampling.py, the same operations. */
static int otsu_split(const int64_t *counts) {
    int64_t total = 0, index_sum = 0;
    for (int b = 0; b < OTSU_BINS; b++) {
        total += counts[b];
        index_sum += counts[b] * b;
    }
    int64_t n0 = 0, s0 = 0;
    int best = 0;
    double best_score = 0.0;
    for (int b = 0; b < OTSU_BINS - 1; b++) {
        n0 += counts[b];
        s0 += counts[b] * b;
        int64_t n1 = total - n0;
        double score = -1.0;
        if (n0 > 0 && n1 > 0) {
            double numerator = (double)(total * s0 - n0 * index_sum);
            numerator = numerator * numerator;
            score = numerator / (double)(n0 * n1);
        }
        if (b == 0 || score > best_score) {
            best = b;
            best_score = score;
        }
    }
    return best;
}

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

/* What joint_core reads and writes, as plain arrays: the tables, checked against each other
 * once (tables_from), and scratch for grids of up to `capacity` cells. */
typedef struct {
    Table pairs, triples; /* triples.rows == 0: no triple table */
    int32_t *rank;        /* one per token, all -1 between calls */
    Py_ssize_t vocab;
    int64_t *cells;       /* capacity: the output cell ids */
    double *values;       /* capacity: J there */
    double *work;         /* 3 x work_third: a zero grid (all 0 between calls), then two pass grids */
    Py_ssize_t work_third;
    Point *points;        /* 3 x point_third: the blur's cell lists; the triple phase reads it as int64 */
    Py_ssize_t point_third;
    uint8_t *flags;       /* capacity, all 0 between calls */
    int64_t *pair_grid;   /* pair_capacity: pair entry ids of a k1 x k2 grid */
    Py_ssize_t capacity, pair_capacity;
} Workspace;

/* One CSR table from its three buffers; -1 when their sizes disagree. */
static int table_from(const Py_buffer *indptr, const Py_buffer *indices, const Py_buffer *values, Table *t) {
    t->indptr = indptr->buf;
    t->indices = indices->buf;
    t->values = values->buf;
    t->rows = indptr->len / (Py_ssize_t)sizeof(int64_t) - 1;
    t->nnz = values->len / (Py_ssize_t)sizeof(float);
    t->narrow = t->nnz > 0 && indices->len == t->nnz * (Py_ssize_t)sizeof(uint16_t);
    if (t->rows < 0 || values->len % sizeof(float) ||
        indices->len != t->nnz * (Py_ssize_t)(t->narrow ? sizeof(uint16_t) : sizeof(int32_t)) || t->indptr[0] != 0 ||
        t->indptr[t->rows] != t->nnz)
        return -1;
    return 0;
}

/* The CSR tables in `b` as Tables (pairs: one row per token; triples: one row per pair entry,
 * or absent when its indptr is the single 0 of an empty table); -1 with a ValueError when their
 * sizes disagree. Column indices are int32, or uint16 when the buffer holds 2 bytes per entry;
 * every index must be below the vocabulary and a row's indices strictly ascending (the scans'
 * hit lists hold k + 1 entries): runtime/cooccurrence.py checks both on load, once, where a
 * check here would cost every call a pass over a million entries. */
static int tables_from(const Buffers *b, Py_ssize_t vocab, Table *pairs, Table *triples) {
    if (table_from(&b->pair_indptr, &b->pair_indices, &b->pair_values, pairs) < 0 ||
        table_from(&b->triple_indptr, &b->triple_indices, &b->triple_values, triples) < 0 || pairs->rows != vocab ||
        (triples->rows != 0 && triples->rows != pairs->nnz))
        return fail("the co-occurrence tables' sizes do not agree with each other and the vocabulary");
    return 0;
}

/* The weighted joint over the grid of `shape` (candidates of axis a at ids + sum of the earlier
 * axes' sizes, likewise probs) into w->cells / w->values: the count, -1 when
 * min(max J, 1) <= bound before Otsu, -2 with a Python error set. */
static Py_ssize_t joint_core(const Workspace *w, int ndim, const Py_ssize_t *shape, const int64_t *ids_base,
                             const double *probs_base, double mass, double bound, double static_threshold, int otsu,
                             int blur, int reuse_pairs) {
    Py_ssize_t size = 1, result = -2;
    int64_t *part = NULL;
    for (int a = 0; a < ndim; a++) size *= shape[a];
    Py_ssize_t vocab = w->vocab;
    Table pairs = w->pairs, triples = w->triples;
    if ((ndim == 3 && triples.rows != pairs.nnz) || w->capacity < size || w->work_third < size ||
        w->point_third < size || w->pair_capacity < shape[0] * shape[1]) {
        fail("joint: the scratch or the tables do not fit the grid");
        goto done;
    }
    const int64_t *ids[MAX_ORDER];
    const double *probs[MAX_ORDER];
    for (int a = 0, offset = 0; a < ndim; offset += (int)shape[a], a++) {
        ids[a] = ids_base + offset;
        probs[a] = probs_base + offset;
        for (Py_ssize_t j = 0; j < shape[a]; j++)
            if (ids[a][j] < 0 || ids[a][j] >= vocab) {
                fail("joint: a candidate id is outside the vocabulary");
                goto done;
            }
    }
    int32_t *rank = w->rank;
    int64_t *cells = w->cells;
    double *values = w->values;
    Py_ssize_t k1 = shape[0], k2 = shape[1], pair_cells = k1 * k2;
    Py_ssize_t klast = shape[ndim - 1];
    Py_ssize_t kmax = k2 > klast ? k2 : klast;
    part = PyMem_Calloc((size_t)(3 * kmax + 1 + vocab / 64 + 1), sizeof(int64_t));
    if (!part) {
        PyErr_NoMemory();
        goto done;
    }
    Candidates cand = {(uint64_t *)part + 3 * kmax + 1, rank};
    int64_t *pair_entry = w->pair_grid, *entry = part, *base = entry + kmax; /* base: kmax + 1 slots */
    Py_ssize_t *found = (Py_ssize_t *)(base + kmax + 1);

    /* Pair entry of every (i, j) cell, -1 where the pair is not stored; a step that backs off
     * from three tokens to two asks for the same pairs again, and gets the last grid. */
    if (!reuse_pairs) {
        for (Py_ssize_t c = 0; c < pair_cells; c++) pair_entry[c] = -1;
        set_candidates(&cand, ids[1], k2, 1);
        /* Each row is two misses (its bounds, its first entries) before the scan streams: start
         * them all at once, then each row's entries a few rows ahead. */
        for (Py_ssize_t i = 0; i < k1; i++) __builtin_prefetch(&pairs.indptr[ids[0][i]]);
        for (Py_ssize_t i = 0; i < k1; i++) {
            if (i + PAIR_ROWS_AHEAD < k1) __builtin_prefetch(column_address(&pairs, pairs.indptr[ids[0][i + PAIR_ROWS_AHEAD]]));
            row_entries(&pairs, ids[0][i], ids[1], k2, &cand, pair_entry + i * k2, found, base,
                        ndim == 3 ? triples.indptr : NULL);
        }
        set_candidates(&cand, ids[1], k2, 0);
    }

    /* The stored cells in C order with R there (cells / values double as the hit list). */
    Py_ssize_t hits = 0;
    if (ndim == 2) {
        for (Py_ssize_t i = 0, c = 0; i < k1; i++)
            for (Py_ssize_t j = 0; j < k2; j++, c++) {
                if (pair_entry[c] < 0) continue;
                double r = probs[0][i] * probs[1][j];
                cells[hits] = c;
                values[hits++] = r * (double)pairs.values[pair_entry[c]];
            }
    } else {
        Py_ssize_t k3 = shape[2], n_live = 0;
        /* The stored pairs with f_1 f_2 and their triple rows' bounds, read with prefetches
         * running ahead: each row is a miss in a table of megabytes, and a step visits a thousand.
         * (No divisions by k2 per cell: they would cost more than the rest of the loop.) */
        int64_t *live = (int64_t *)w->points, *row_start = live + pair_cells, *row_end = row_start + pair_cells;
        int64_t *hit_entry = row_end + pair_cells; /* the triple entry of each hit */
        double *lead = w->work + w->work_third; /* pass0's third */
        for (Py_ssize_t i = 0, c = 0; i < k1; i++)
            for (Py_ssize_t j = 0; j < k2; j++, c++)
                if (pair_entry[c] >= 0) {
                    lead[n_live] = probs[0][i] * probs[1][j];
                    live[n_live++] = c;
                }
        for (Py_ssize_t i = 0; i < n_live; i++) {
            if (i + PREFETCH_AHEAD < n_live) __builtin_prefetch(&triples.indptr[pair_entry[live[i + PREFETCH_AHEAD]]]);
            int64_t p = pair_entry[live[i]];
            row_start[i] = triples.indptr[p];
            row_end[i] = triples.indptr[p + 1];
        }
        set_candidates(&cand, ids[2], k3, 1);
        for (Py_ssize_t i = 0; i < n_live; i++) {
            if (i + PREFETCH_AHEAD < n_live) __builtin_prefetch(column_address(&triples, row_start[i + PREFETCH_AHEAD]));
            if (row_start[i] == row_end[i]) continue;
            Py_ssize_t c = live[i];
            Py_ssize_t n_found = row_entries(&triples, pair_entry[c], ids[2], k3, &cand, entry, found, base, NULL);
            for (Py_ssize_t f = 0; f < n_found; f++) {
                Py_ssize_t l = found[f];
                cells[hits] = c * k3 + l;
                hit_entry[hits] = entry[l];
                values[hits++] = lead[i] * probs[2][l]; /* R before W */
            }
        }
        set_candidates(&cand, ids[2], k3, 0);
        /* W in a second pass: the scans prefetched each hit's weight, and by now they have arrived. */
        for (Py_ssize_t h = 0; h < hits; h++) values[h] = values[h] * (double)triples.values[hit_entry[h]];
    }

    double total = 0.0, top = 0.0;
    for (Py_ssize_t h = 0; h < hits; h++) {
        total += values[h];
        if (values[h] > top) top = values[h];
    }
    if (!(total > 0)) { /* every cell masked (or underflowed): J = 0 */
        result = bound >= 0 ? -1 : 0;
        goto done;
    }
    double scale = mass / total, peak = top * scale;
    if ((peak < 1.0 ? peak : 1.0) <= bound) {
        result = -1;
        goto done;
    }
    Py_ssize_t positive = 0;
    double largest = 0.0;
    for (Py_ssize_t h = 0; h < hits; h++) {
        double j = values[h] * scale;
        if (static_threshold > 0 && j < static_threshold) j = 0.0;
        values[h] = j;
        if (j > 0) positive++;
        if (j > largest) largest = j;
    }
    if (!otsu) {
        result = hits;
        goto done;
    }
    if (positive == 0) { /* J = 0: nothing to keep */
        result = 0;
        goto done;
    }

    /* Otsu, as _sparse_otsu / _otsu in runtime/sampling.py. When the live cells' neighbourhoods
     * cannot cover the grid, min B = 0 and only cells within one step of a cell with
     * J >= max J / (1024 * 2^ndim) can leave bin 0 (see _sparse_otsu): B is computed on those
     * cells alone, through the same three separable passes, each on the cells the next one
     * reads. Otherwise every cell is computed and min B taken. Geometry is on three axes: a
     * two-token grid is 1 x k1 x k2, and its padded axis is neither blurred nor dilated. */
    int radius = blur == 3 ? 1 : 0, pad = MAX_ORDER - ndim;
    Py_ssize_t g[3], reach = 1;
    for (int a = 0; a < 3; a++) g[a] = a < pad ? 1 : shape[a - pad];
    for (int a = 0; a < ndim; a++) reach *= 2 * radius + 1;
    int whole = positive * reach >= size;
    /* Thirds of the scratch at fixed offsets: the zero grid must stay where it was for a call
     * on a larger grid, whatever this one's size. */
    double *dense_j = w->work, *pass0 = dense_j + w->work_third, *pass1 = pass0 + w->work_third;
    Point *list_x = w->points, *list_1 = list_x + w->point_third, *list_0 = list_1 + w->point_third;
    uint8_t *flags = w->flags;
    for (Py_ssize_t h = 0; h < hits; h++) dense_j[cells[h]] = values[h]; /* dense_j is all 0 between calls */
    Py_ssize_t n_x = 0, n_1 = 0, n_0 = 0;
    int sparse = !whole && radius;
    const Py_ssize_t stride[3] = {g[1] * g[2], g[2], 1};
    if (whole) { /* every cell */
        for (Py_ssize_t x0 = 0; x0 < g[0]; x0++)
            for (Py_ssize_t x1 = 0; x1 < g[1]; x1++)
                for (Py_ssize_t x2 = 0; x2 < g[2]; x2++) list_x[n_x++] = point(x0, x1, x2, stride);
        memcpy(list_1, list_x, (size_t)n_x * sizeof(Point));
        memcpy(list_0, list_x, (size_t)n_x * sizeof(Point));
        n_1 = n_0 = n_x;
    } else if (!radius) { /* B = J: only live cells can leave bin 0 */
        for (Py_ssize_t h = 0; h < hits; h++)
            list_x[n_x++] = point(cells[h] / stride[0], cells[h] / stride[1] % g[1], cells[h] % g[2], stride);
    } else {
        double spread = 1.0;
        for (int a = 0; a < ndim; a++) spread *= 2.0;
        double floor = largest / (2 * 2 * OTSU_BINS * spread);
        for (Py_ssize_t h = 0; h < hits; h++) {
            if (!(values[h] >= floor)) continue;
            Py_ssize_t y0 = cells[h] / stride[0], y1 = cells[h] / stride[1] % g[1], y2 = cells[h] % g[2];
            for (Py_ssize_t x0 = y0 - 1; x0 <= y0 + 1; x0++)
                for (Py_ssize_t x1 = y1 - 1; x1 <= y1 + 1; x1++)
                    for (Py_ssize_t x2 = y2 - 1; x2 <= y2 + 1; x2++) {
                        if (x0 < 0 || x0 >= g[0] || x1 < 0 || x1 >= g[1] || x2 < 0 || x2 >= g[2]) continue;
                        Py_ssize_t x = x0 * stride[0] + x1 * stride[1] + x2;
                        if (flags[x] & 1) continue;
                        flags[x] |= 1;
                        list_x[n_x++] = point(x0, x1, x2, stride);
                    }
        }
        /* What the passes read: the last pass (axis 2) reads list_1, the one before it list_0. */
        for (Py_ssize_t i = 0; i < n_x; i++)
            for (int d = -1; d <= 1; d++) {
                Point q = list_x[i];
                q.x[2] += d;
                q.cell += d;
                if (q.x[2] < 0 || q.x[2] >= g[2] || (flags[q.cell] & 2)) continue;
                flags[q.cell] |= 2;
                list_1[n_1++] = q;
            }
        for (Py_ssize_t i = 0; i < n_1; i++)
            for (int d = -1; d <= 1; d++) {
                Point q = list_1[i];
                q.x[1] += d;
                q.cell += d * (int32_t)stride[1];
                if (q.x[1] < 0 || q.x[1] >= g[1] || (flags[q.cell] & 4)) continue;
                flags[q.cell] |= 4;
                list_0[n_0++] = q;
            }
        for (Py_ssize_t i = 0; i < n_x; i++) flags[list_x[i].cell] = 0;
        for (Py_ssize_t i = 0; i < n_1; i++) flags[list_1[i].cell] = 0;
        for (Py_ssize_t i = 0; i < n_0; i++) flags[list_0[i].cell] = 0;
    }
    const double *blurred = dense_j;
    if (radius) {
        /* Axis a's pass runs over the cells the next pass reads (all of list_x for the last) and
         * writes pass0, pass1, pass0: the last pass reads pass1 only. */
        const Point *lists[3] = {list_0, list_1, list_x};
        const Py_ssize_t counts_of[3] = {n_0, n_1, n_x};
        double *outs[3] = {pass0, pass1, pass0};
        for (int a = pad; a < 3; a++) {
            Py_ssize_t len = g[a], s = stride[a];
            double *dst = outs[a];
            for (Py_ssize_t i = 0; i < counts_of[a]; i++) {
                Py_ssize_t x = lists[a][i].cell, coord = lists[a][i].x[a];
                Py_ssize_t left = len == 1 ? x : (coord == 0 ? x + s : x - s);
                Py_ssize_t right = len == 1 ? x : (coord == len - 1 ? x - s : x + s);
                double t = blurred[left] + blurred[right];
                t = t * 0.5;
                dst[x] = t + blurred[x];
            }
            blurred = dst;
        }
    }

    double lo = 0.0, hi = 0.0;
    for (Py_ssize_t i = 0; i < n_x; i++) {
        double v = blurred[list_x[i].cell];
        if (i == 0 || v > hi) hi = v;
        if (i == 0 || v < lo) lo = v;
    }
    if (!whole) lo = 0.0; /* min B over the grid: a cell beyond every live neighbourhood */
    Py_ssize_t kept = 0;
    int64_t *kept_cells = (int64_t *)list_0; /* free once the passes are done */
    if (!(hi > lo)) { /* a constant B keeps every live cell */
        for (Py_ssize_t h = 0; h < hits; h++)
            if (values[h] > 0) kept_cells[kept++] = cells[h];
    } else {
        double bin_scale = OTSU_BINS / (hi - lo), threshold = lo + 0.5 / bin_scale;
        int64_t counts[OTSU_BINS] = {0};
        Point *cand = list_1; /* free too; a candidate's bin goes where its padding was */
        Py_ssize_t n_cand = 0;
        for (Py_ssize_t i = 0; i < n_x; i++) {
            double v = blurred[list_x[i].cell];
            if (!(v >= threshold)) continue;
            double shifted = v - lo;
            shifted = shifted * bin_scale;
            Py_ssize_t bin = (Py_ssize_t)shifted;
            if (bin > OTSU_BINS - 1) bin = OTSU_BINS - 1;
            counts[bin]++;
            cand[n_cand] = list_x[i];
            cand[n_cand++].bin = (int16_t)bin;
        }
        counts[0] += size - n_cand;
        int split = otsu_split(counts);
        for (Py_ssize_t c = 0; c < n_cand; c++)
            if (cand[c].bin > split && dense_j[cand[c].cell] > 0) kept_cells[kept++] = cand[c].cell;
        if (sparse) qsort(kept_cells, (size_t)kept, sizeof(int64_t), compare_int64);
    }
    for (Py_ssize_t i = 0; i < kept; i++) pass1[i] = dense_j[kept_cells[i]];
    for (Py_ssize_t h = 0; h < hits; h++) dense_j[cells[h]] = 0.0;
    for (Py_ssize_t i = 0; i < kept; i++) {
        cells[i] = kept_cells[i];
        values[i] = pass1[i];
    }
    result = kept;

done:
    PyMem_Free(part);
    return result;
}

/* joint(shape, ids, probs, pair_indptr, pair_indices, pair_values, triple_indptr, triple_indices,
 *       triple_values, rank, mass, bound, static_threshold, otsu, blur, out_cells, out_values, work,
 *       iwork, flags, pair_grid, reuse_pairs)
 * rank (int32, one per token) must hold -1, the first third of work (float64) and flags (uint8)
 * 0; the call leaves them so. work (float64) and iwork (int64) hold 3 and 5 values per cell,
 * the outputs 1. pair_grid (int64, k1 x k2) holds the pair entry ids; with reuse_pairs set it
 * already holds those of these first two id lists, from the previous call.
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
    int ndim = (int)PyTuple_GET_SIZE(shape_obj);
    Py_ssize_t shape[MAX_ORDER], ksum = 0, result = -2;
    if (ndim < 2 || ndim > MAX_ORDER) {
        fail("joint: the grid must have 2 or 3 axes");
        goto done;
    }
    for (int a = 0; a < ndim; a++) {
        shape[a] = PyLong_AsSsize_t(PyTuple_GET_ITEM(shape_obj, a));
        if (shape[a] < 1) {
            if (!PyErr_Occurred()) fail("joint: every axis needs at least one candidate");
            goto done;
        }
        ksum += shape[a];
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
    if (tables_from(&b, vocab, &w.pairs, &w.triples) < 0) goto done;
    result = joint_core(&w, ndim, shape, b.ids.buf, b.probs.buf, mass, bound, static_threshold, otsu, blur, reuse_pairs);
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

/* A draw over w[0..n): argmax (the first) if greedy, else one call of `random` and the first
 * running sum above u * (running total): _draw_sequential in runtime/sampling.py. -2: error. */
static Py_ssize_t draw_sequential(const double *w, Py_ssize_t n, int greedy, PyObject *random) {
    if (greedy) {
        Py_ssize_t best = 0;
        for (Py_ssize_t i = 1; i < n; i++)
            if (w[i] > w[best]) best = i;
        return best;
    }
    PyObject *drawn = PyObject_CallNoArgs(random);
    if (!drawn) return -2;
    double u = PyFloat_AsDouble(drawn);
    Py_DECREF(drawn);
    if (u == -1.0 && PyErr_Occurred()) return -2;
    double total = 0.0;
    for (Py_ssize_t i = 0; i < n; i++) total += w[i];
    double target = u * total, running = 0.0;
    for (Py_ssize_t i = 0; i < n; i++) {
        running += w[i];
        if (running > target) return i;
    }
    /* Rounding left no sum above the target: the last step of positive mass. */
    Py_ssize_t last = -1;
    double previous = 0.0;
    running = 0.0;
    for (Py_ssize_t i = 0; i < n; i++) {
        running += w[i];
        if (running - previous > 0) last = i;
        previous = running;
    }
    return last;
}

/* Stepper(k, n_used, pair_indptr, pair_indices, pair_values, triple_indptr, triple_indices,
 *         triple_values), then .configure(bounds, temperature, static_threshold, penalty, otsu,
 *         blur, greedy): DynaMo's dynamic step for one sampler, the tables and k x n_used grids.
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

static int stepper_init(Stepper *self, PyObject *args, PyObject *kwargs) {
    Buffers b;
    memset(&b, 0, sizeof(b));
    Py_ssize_t k, n_used;
    int result = -1;
    if (self->w.rank) return fail("Stepper: already initialised");
    if (kwargs && PyDict_GET_SIZE(kwargs)) return fail("Stepper: positional arguments only");
    if (!PyArg_ParseTuple(args, "nny*y*y*y*y*y*", &k, &n_used, &b.pair_indptr, &b.pair_indices, &b.pair_values,
                          &b.triple_indptr, &b.triple_indices, &b.triple_values))
        goto done;
    Py_ssize_t vocab = b.pair_indptr.len / (Py_ssize_t)sizeof(int64_t) - 1;
    if (n_used < 2 || n_used > MAX_ORDER || k < 1 || k > vocab) {
        fail("Stepper: needs 2 or 3 heads and 1 <= k <= vocab");
        goto done;
    }
    if (tables_from(&b, vocab, &self->w.pairs, &self->w.triples) < 0) goto done;
    if (n_used == 3 && self->w.triples.rows != self->w.pairs.nnz) {
        fail("Stepper: three heads need the triple table");
        goto done;
    }
    Py_ssize_t cells = n_used == 3 ? k * k * k : k * k;
    self->k = k;
    self->n_used = n_used;
    self->w.vocab = vocab;
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

/* The first of the top-k mass products, per n, that can beat its bound, down to the draw. */
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
    Py_ssize_t rows = 0, vocab = 0, row_stride = 0, k = self->k, n_used = self->n_used;
    PyObject *random = args[2], *result = NULL;
    const Workspace *w = &self->w;
    if (get_rows(args[0], &logits, &rows, &vocab, &row_stride) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_ValueError)) return NULL;
        PyErr_Clear(); /* a layout this kernel does not read: the numpy path's */
        return Py_NewRef(Py_NotImplemented);
    }
    if (PyObject_GetBuffer(args[1], &seen, PyBUF_SIMPLE) < 0) goto done;
    if (rows < n_used || vocab != w->vocab || seen.len != vocab || !PyCallable_Check(random)) {
        fail("Stepper.step: logits need n_used rows of the tables' vocabulary, seen one byte per token");
        goto done;
    }
    const uint8_t *generated = seen.buf;
    int64_t *ids = self->ids;
    double *probs = self->probs, mass[MAX_ORDER + 1] = {1.0};
    uint8_t *in_seen = self->in_seen;
    for (Py_ssize_t a = 0; a < n_used; a++) {
        if (row_marginals((const float *)logits.buf + a * row_stride, vocab, k, self->temperature, ids + a * k,
                          probs + a * k, self->select) < 0) {
            result = Py_NewRef(Py_None);
            goto done;
        }
        double sum = 0.0;
        for (Py_ssize_t j = 0; j < k; j++) {
            sum += probs[a * k + j];
            in_seen[a * k + j] = generated[ids[a * k + j]] != 0;
        }
        mass[a + 1] = mass[a] * sum;
    }
    int64_t tokens[MAX_ORDER];
    Py_ssize_t emitted = 0;
    int pairs_ready = self->pairs_valid && !memcmp(self->pair_ids, ids, 2 * k * sizeof(int64_t));
    for (Py_ssize_t n = n_used; n >= 2 && !emitted; n--) {
        double capped = mass[n] * (1 + 1e-9); /* J <= mass: see DynamicSampler._weighted_joint */
        if ((capped < 1.0 ? capped : 1.0) <= self->bounds[n]) continue;
        Py_ssize_t shape[MAX_ORDER] = {k, k, k};
        self->pairs_valid = pairs_ready; /* the call below writes the pair grid unless it reuses it */
        Py_ssize_t count = joint_core(w, (int)n, shape, ids, probs, mass[n], self->bounds[n], self->static_threshold,
                                      self->otsu, self->blur, pairs_ready);
        if (count == -2) goto done;
        if (!pairs_ready) memcpy(self->pair_ids, ids, 2 * k * sizeof(int64_t));
        self->pairs_valid = pairs_ready = 1;
        if (count < 0) continue;
        int64_t *cells = w->cells;
        double *values = w->values, peak = 0.0;
        for (Py_ssize_t c = 0; c < count; c++) {
            if (self->penalty != 1.0) { /* once per axis whose candidate was generated, axis by axis */
                Py_ssize_t coord[MAX_ORDER], rest = cells[c];
                for (Py_ssize_t a = n - 1; a >= 0; a--) {
                    coord[a] = rest % k;
                    rest /= k;
                }
                for (Py_ssize_t a = 0; a < n; a++)
                    if (in_seen[a * k + coord[a]]) values[c] = values[c] / self->penalty;
            }
            if (values[c] > peak) peak = values[c];
        }
        if (!((peak < 1.0 ? peak : 1.0) > self->bounds[n])) continue;
        Py_ssize_t pick = draw_sequential(values, count, self->greedy, random);
        if (pick == -2) goto done;
        Py_ssize_t rest = cells[pick];
        for (Py_ssize_t a = n - 1; a >= 0; a--) {
            tokens[a] = ids[a * k + rest % k];
            rest /= k;
        }
        emitted = n;
    }
    if (!emitted) { /* head 1 alone: its top-k over the penalty (x / 1.0 is x) */
        double *weights = w->values;
        for (Py_ssize_t j = 0; j < k; j++)
            weights[j] = probs[j] / (in_seen[j] && self->penalty != 1.0 ? self->penalty : 1.0);
        Py_ssize_t pick = draw_sequential(weights, k, self->greedy, random);
        if (pick == -2) goto done;
        tokens[0] = ids[pick];
        emitted = 1;
    }
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

static PyMethodDef methods[] = {
    {"marginals", marginals, METH_VARARGS, "Each row's top-k ids and softmax probabilities (see runtime/native.py)."},
    {"joint", joint, METH_VARARGS, "DynaMo's co-occurrence weighted joint over the stored n-grams (see runtime/native.py)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "runtime._native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&StepperType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddObjectRef(m, "Stepper", (PyObject *)&StepperType) < 0) Py_CLEAR(m);
    return m;
}
