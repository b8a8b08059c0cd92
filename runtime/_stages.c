/* The stages of DynaMo's dynamic step (runtime/stages.py), compiled: runtime/_native.c calls them
 * in the chain's order, from the heads' logits (their marginals: _marginals.c) to the tokens.
 *
 * Why C: with masks, a step of the numpy sampler is ~150 small array calls (the softmax and
 * top-k, lookups in the co-occurrence CSR tables, the joint over the stored n-grams, the
 * blurred Otsu threshold); their dispatch and cache misses cost ~1 ms, a third of a forward
 * pass of the reference model. Here the same work is a few loops over the few thousand
 * stored cells. There is no library for this step: it is the paper's own algorithm, as
 * llama.cpp's samplers are its own C.
 *
 * Each stage_<name> is the numpy function of the same name (runtime/grid.py, runtime/otsu.py,
 * runtime/draws.py) operation for operation and in the same order, so the two agree to the
 * last bit (tests/test_native.py holds them to it):
 *   R = ((f_1 f_2) f_3) * W, sum R = the running sum in C order, J = R * (mass / sum R);
 *   blur = 2 x [1, 2, 1] / 4 per axis as ((l + r) * 0.5) + c with mirrored borders;
 *   Otsu on 256 bins over [min B, max B] with the integer split score.
 * Build flags keep the compiler from contracting a * b + c into one fused rounding.
 */
#include "_stages.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define SCAN_ROW_FACTOR 64 /* scan a row of up to 4 entries per candidate; binary-search longer ones */
#define PREFETCH_AHEAD 16  /* rows ahead to prefetch in the triple table */
#define PAIR_ROWS_AHEAD 4  /* rows ahead to prefetch in the pair table */

static int fail(const char *message) {
    PyErr_SetString(PyExc_ValueError, message);
    return -1;
}

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


static inline Point point(Py_ssize_t x0, Py_ssize_t x1, Py_ssize_t x2, const Py_ssize_t *stride) {
    Point p = {(int32_t)(x0 * stride[0] + x1 * stride[1] + x2), {(int16_t)x0, (int16_t)x1, (int16_t)x2}, 0};
    return p;
}

static int compare_int64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}


/* Otsu's split over a histogram: otsu_split in runtime/otsu.py, the same operations. */
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


int table_from(const int64_t *indptr, Py_ssize_t indptr_len, const void *indices, Py_ssize_t indices_len,
               const float *values, Py_ssize_t values_len, Table *t) {
    t->indptr = indptr;
    t->indices = indices;
    t->values = values;
    t->rows = indptr_len / (Py_ssize_t)sizeof(int64_t) - 1;
    t->nnz = values_len / (Py_ssize_t)sizeof(float);
    t->narrow = t->nnz > 0 && indices_len == t->nnz * (Py_ssize_t)sizeof(uint16_t);
    if (t->rows < 0 || values_len % sizeof(float) ||
        indices_len != t->nnz * (Py_ssize_t)(t->narrow ? sizeof(uint16_t) : sizeof(int32_t)) || t->indptr[0] != 0 ||
        t->indptr[t->rows] != t->nnz)
        return -1;
    return 0;
}

int stage_propose(const float *logits, Py_ssize_t row_stride, Py_ssize_t vocab, Py_ssize_t heads, Py_ssize_t k,
                  double temperature, const uint8_t *generated, int64_t *ids, double *probs, double *mass,
                  uint8_t *in_seen, void *select) {
    mass[0] = 1.0;
    for (Py_ssize_t a = 0; a < heads; a++) {
        if (row_marginals(logits + a * row_stride, vocab, k, temperature, ids + a * k, probs + a * k, select) < 0)
            return -1;
        double sum = 0.0;
        for (Py_ssize_t j = 0; j < k; j++) {
            sum += probs[a * k + j];
            in_seen[a * k + j] = generated[ids[a * k + j]] != 0;
        }
        mass[a + 1] = mass[a] * sum;
    }
    return 0;
}

/* The table entry of each live cell, between the joint and weight stages: after the three
 * pair-grid-sized lists the triple scan keeps in the same scratch. */
static int64_t *cell_entries(const Workspace *w, const Grid *g) {
    return (int64_t *)w->points + 3 * g->shape[0] * g->shape[1];
}

/* The pair scan: the pair entry of every (i, j) cell of heads 1 and 2, -1 where the pair is
 * not stored. */
static void pair_lookup(const Workspace *w, const Grid *g, Candidates *cand, int64_t *base, Py_ssize_t *found) {
    const Table *pairs = &w->pairs;
    Py_ssize_t k1 = g->shape[0], k2 = g->shape[1];
    int64_t *pair_entry = w->pair_grid;
    for (Py_ssize_t c = 0; c < k1 * k2; c++) pair_entry[c] = -1;
    set_candidates(cand, g->ids[1], k2, 1);
    /* Each row is two misses (its bounds, its first entries) before the scan streams: start
     * them all at once, then each row's entries a few rows ahead. */
    for (Py_ssize_t i = 0; i < k1; i++) __builtin_prefetch(&pairs->indptr[g->ids[0][i]]);
    for (Py_ssize_t i = 0; i < k1; i++) {
        if (i + PAIR_ROWS_AHEAD < k1)
            __builtin_prefetch(column_address(pairs, pairs->indptr[g->ids[0][i + PAIR_ROWS_AHEAD]]));
        row_entries(pairs, g->ids[0][i], g->ids[1], k2, cand, pair_entry + i * k2, found, base,
                    g->ndim == 3 ? w->triples.indptr : NULL);
    }
    set_candidates(cand, g->ids[1], k2, 0);
}

/* The triple scan: for every stored pair, its triple row's entries among head 3's candidates,
 * as cells with R = (f_1 f_2) f_3 and their triple entries. */
static Py_ssize_t triple_lookup(const Workspace *w, const Grid *g, Candidates *cand, int64_t *entry, int64_t *base,
                                Py_ssize_t *found) {
    const Table *triples = &w->triples;
    const int64_t *pair_entry = w->pair_grid;
    Py_ssize_t k1 = g->shape[0], k2 = g->shape[1], k3 = g->shape[2], pair_cells = k1 * k2, n_live = 0, hits = 0;
    /* The stored pairs with f_1 f_2 and their triple rows' bounds, read with prefetches
     * running ahead: each row is a miss in a table of megabytes, and a step visits a thousand.
     * (No divisions by k2 per cell: they would cost more than the rest of the loop.) */
    int64_t *live = (int64_t *)w->points, *row_start = live + pair_cells, *row_end = row_start + pair_cells;
    int64_t *hit_entry = cell_entries(w, g);
    double *lead = w->work + w->work_third; /* pass0's third */
    for (Py_ssize_t i = 0, c = 0; i < k1; i++)
        for (Py_ssize_t j = 0; j < k2; j++, c++)
            if (pair_entry[c] >= 0) {
                lead[n_live] = g->probs[0][i] * g->probs[1][j];
                live[n_live++] = c;
            }
    for (Py_ssize_t i = 0; i < n_live; i++) {
        if (i + PREFETCH_AHEAD < n_live) __builtin_prefetch(&triples->indptr[pair_entry[live[i + PREFETCH_AHEAD]]]);
        int64_t p = pair_entry[live[i]];
        row_start[i] = triples->indptr[p];
        row_end[i] = triples->indptr[p + 1];
    }
    set_candidates(cand, g->ids[2], k3, 1);
    for (Py_ssize_t i = 0; i < n_live; i++) {
        if (i + PREFETCH_AHEAD < n_live) __builtin_prefetch(column_address(triples, row_start[i + PREFETCH_AHEAD]));
        if (row_start[i] == row_end[i]) continue;
        Py_ssize_t c = live[i];
        Py_ssize_t n_found = row_entries(triples, pair_entry[c], g->ids[2], k3, cand, entry, found, base, NULL);
        for (Py_ssize_t f = 0; f < n_found; f++) {
            Py_ssize_t l = found[f];
            w->cells[hits] = c * k3 + l;
            hit_entry[hits] = entry[l];
            w->values[hits++] = lead[i] * g->probs[2][l];
        }
    }
    set_candidates(cand, g->ids[2], k3, 0);
    return hits;
}

Py_ssize_t stage_joint(const Workspace *w, Grid *g, int reuse_pairs) {
    Py_ssize_t vocab = w->vocab, k1 = g->shape[0], k2 = g->shape[1], klast = g->shape[g->ndim - 1];
    g->size = 1;
    for (int a = 0; a < g->ndim; a++) g->size *= g->shape[a];
    if ((g->ndim == 3 && w->triples.rows != w->pairs.nnz) || w->capacity < g->size || w->work_third < g->size ||
        w->point_third < g->size || w->pair_capacity < k1 * k2)
        return fail("joint: the scratch or the tables do not fit the grid") - 1;
    for (int a = 0; a < g->ndim; a++)
        for (Py_ssize_t j = 0; j < g->shape[a]; j++)
            if (g->ids[a][j] < 0 || g->ids[a][j] >= vocab) return fail("joint: a candidate id is outside the vocabulary") - 1;
    Py_ssize_t kmax = k2 > klast ? k2 : klast;
    int64_t *part = PyMem_Calloc((size_t)(3 * kmax + 1 + vocab / 64 + 1), sizeof(int64_t));
    if (!part) {
        PyErr_NoMemory();
        return -2;
    }
    Candidates cand = {(uint64_t *)part + 3 * kmax + 1, w->rank};
    int64_t *entry = part, *base = entry + kmax; /* base: kmax + 1 slots */
    Py_ssize_t *found = (Py_ssize_t *)(base + kmax + 1);
    /* A step that backs off from three tokens to two asks for the same pairs again, and gets
     * the last grid. */
    if (!reuse_pairs) pair_lookup(w, g, &cand, base, found);
    if (g->ndim == 2) {
        int64_t *hit_entry = cell_entries(w, g);
        Py_ssize_t hits = 0;
        for (Py_ssize_t i = 0, c = 0; i < k1; i++)
            for (Py_ssize_t j = 0; j < k2; j++, c++) {
                if (w->pair_grid[c] < 0) continue;
                w->cells[hits] = c;
                hit_entry[hits] = w->pair_grid[c];
                w->values[hits++] = g->probs[0][i] * g->probs[1][j];
            }
        g->count = hits;
        g->weights = w->pairs.values;
    } else {
        g->count = triple_lookup(w, g, &cand, entry, base, found);
        g->weights = w->triples.values;
    }
    PyMem_Free(part);
    return g->count;
}

Py_ssize_t stage_weight(const Workspace *w, Grid *g) {
    double *values = w->values;
    const int64_t *hit_entry = cell_entries(w, g);
    /* W in a pass of its own: the scans prefetched each hit's weight, and by now they have arrived. */
    for (Py_ssize_t h = 0; h < g->count; h++) values[h] = values[h] * (double)g->weights[hit_entry[h]];
    double total = 0.0, top = 0.0;
    for (Py_ssize_t h = 0; h < g->count; h++) {
        total += values[h];
        if (values[h] > top) top = values[h];
    }
    if (!(total > 0)) { /* every cell masked (or underflowed): J = 0 */
        if (g->bound >= 0) return -1;
        g->count = 0;
        return 0;
    }
    double scale = g->mass / total;
    if (!beats(top * scale, g->bound)) return -1; /* the largest of values * scale: rounding is monotone */
    for (Py_ssize_t h = 0; h < g->count; h++) values[h] = values[h] * scale;
    return g->count;
}

void stage_static_threshold(const Workspace *w, const Grid *g, double threshold) {
    if (!(threshold > 0)) return;
    for (Py_ssize_t h = 0; h < g->count; h++)
        if (w->values[h] < threshold) w->values[h] = 0.0;
}
Py_ssize_t stage_adaptive_threshold(const Workspace *w, Grid *grid, int otsu, int blur) {
    if (!otsu) return grid->count;
    int ndim = grid->ndim;
    Py_ssize_t size = grid->size, hits = grid->count, positive = 0;
    const Py_ssize_t *shape = grid->shape;
    int64_t *cells = w->cells;
    double *values = w->values, largest = 0.0;
    for (Py_ssize_t h = 0; h < hits; h++) {
        if (values[h] > 0) positive++;
        if (values[h] > largest) largest = values[h];
    }
    if (positive == 0) { /* J = 0: nothing to keep */
        grid->count = 0;
        return 0;
    }

    /* Otsu, as sparse_otsu / dense_otsu in runtime/otsu.py. When the live cells' neighbourhoods
     * cannot cover the grid, min B = 0 and only cells within one step of a cell with
     * J >= max J / (1024 * 2^ndim) can leave bin 0 (see sparse_otsu): B is computed on those
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
    grid->count = kept;
    return kept;
}

void stage_penalty(const Workspace *w, const Grid *g, const uint8_t *in_seen, Py_ssize_t stride, double penalty) {
    if (penalty == 1.0) return;
    /* once per axis whose candidate was generated or repeats an earlier axis' (ar's history), axis by axis */
    for (Py_ssize_t c = 0; c < g->count; c++) {
        Py_ssize_t coord[MAX_ORDER], rest = w->cells[c];
        for (int a = g->ndim - 1; a >= 0; a--) {
            coord[a] = rest % g->shape[a];
            rest /= g->shape[a];
        }
        for (int a = 0; a < g->ndim; a++) {
            int repeated = in_seen[a * stride + coord[a]];
            for (int b = 0; b < a && !repeated; b++) repeated = g->ids[b][coord[b]] == g->ids[a][coord[a]];
            if (repeated) w->values[c] = w->values[c] / penalty;
        }
    }
}

int stage_backoff(const Workspace *w, const Grid *g) {
    double peak = 0.0;
    for (Py_ssize_t c = 0; c < g->count; c++)
        if (w->values[c] > peak) peak = w->values[c];
    return beats(peak, g->bound);
}

Py_ssize_t stage_draw(const double *weights, Py_ssize_t n, int greedy, PyObject *random) {
    if (greedy) {
        Py_ssize_t best = 0;
        for (Py_ssize_t i = 1; i < n; i++)
            if (weights[i] > weights[best]) best = i;
        return best;
    }
    PyObject *drawn = PyObject_CallNoArgs(random);
    if (!drawn) return -2;
    double u = PyFloat_AsDouble(drawn);
    Py_DECREF(drawn);
    if (u == -1.0 && PyErr_Occurred()) return -2;
    double total = 0.0;
    for (Py_ssize_t i = 0; i < n; i++) total += weights[i];
    double target = u * total, running = 0.0;
    for (Py_ssize_t i = 0; i < n; i++) {
        running += weights[i];
        if (running > target) return i;
    }
    /* Rounding left no sum above the target: the last step of positive mass. */
    Py_ssize_t last = -1;
    double previous = 0.0;
    running = 0.0;
    for (Py_ssize_t i = 0; i < n; i++) {
        running += weights[i];
        if (running - previous > 0) last = i;
        previous = running;
    }
    return last;
}

/* --- verify ------------------------------------------------------------------------------------ */

/* The entry of pair (a, b) in the pair table, -1 when it is not stored: a row's columns ascend. */
static int64_t pair_entry_of(const Table *pairs, int64_t a, int64_t b) {
    int64_t lo = pairs->indptr[a], hi = pairs->indptr[a + 1];
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (column(pairs, mid, pairs->narrow) < b) lo = mid + 1;
        else hi = mid;
    }
    return lo < pairs->indptr[a + 1] && column(pairs, lo, pairs->narrow) == b ? lo : -1;
}

/* weighted[j] = probs[j] W(row's context, ids[j]) for the candidates stored in `row` of `t`, 0
 * for the others; whether any was stored with a positive running sum (grid.running_sum). */
static int weigh_row(const Workspace *w, const Table *t, int64_t row, const int64_t *ids, const double *probs,
                     Py_ssize_t k, double *weighted, int64_t *scratch) {
    int64_t *entry = scratch, *base = entry + k; /* base: k + 1 slots */
    Py_ssize_t *found = (Py_ssize_t *)(base + k + 1);
    Candidates cand = {(uint64_t *)(found + k), w->rank};
    set_candidates(&cand, ids, k, 1);
    Py_ssize_t n_found = row_entries(t, row, ids, k, &cand, entry, found, base, NULL);
    set_candidates(&cand, ids, k, 0);
    if (!n_found) return 0;
    for (Py_ssize_t j = 0; j < k; j++) weighted[j] = 0.0;
    for (Py_ssize_t f = 0; f < n_found; f++) weighted[found[f]] = probs[found[f]] * (double)t->values[entry[found[f]]];
    double total = 0.0;
    for (Py_ssize_t j = 0; j < k; j++) total += weighted[j];
    return total > 0;
}

size_t draft_scratch_words(Py_ssize_t vocab, Py_ssize_t k) { return (size_t)(4 * k + 1 + vocab / 64 + 1); }

/* Whether `token` is generated: in the mask, or among the extra tokens. */
static int is_seen(int64_t token, const uint8_t *generated, const int64_t *extra, Py_ssize_t n_extra) {
    if (generated[token]) return 1;
    for (Py_ssize_t i = 0; i < n_extra; i++)
        if (extra[i] == token) return 1;
    return 0;
}

/* weights / penalty where generated (draws.penalised; x / 1.0 is x), over their running sum. */
static void penalise_normalise(const int64_t *ids, const double *weights, Py_ssize_t k, const uint8_t *generated,
                               const int64_t *extra, Py_ssize_t n_extra, double penalty, double *out) {
    double total = 0.0;
    for (Py_ssize_t j = 0; j < k; j++) {
        double x = weights[j];
        if (penalty != 1.0 && is_seen(ids[j], generated, extra, n_extra)) x = x / penalty;
        out[j] = x;
        total += x;
    }
    for (Py_ssize_t j = 0; j < k; j++) out[j] = out[j] / total;
}

int stage_draft(const Workspace *w, const int64_t *ids, const double *probs, Py_ssize_t k, const int64_t *prefix,
                int n_prefix, int weighted, const uint8_t *generated, const int64_t *extra, Py_ssize_t n_extra,
                double penalty, double *q, int64_t *scratch) {
    const double *weights = probs;
    int order = 1;
    double *found = q; /* the weighted marginal, before the penalty: normalised in place below */
    if (weighted) {
        int longest = w->triples.rows ? 2 : 1;
        for (int length = n_prefix < longest ? n_prefix : longest; length >= 1; length--) {
            int64_t last = prefix[n_prefix - 1];
            if (length == 2) {
                int64_t entry = pair_entry_of(&w->pairs, prefix[n_prefix - 2], last);
                if (entry < 0 || !weigh_row(w, &w->triples, entry, ids, probs, k, found, scratch)) continue;
            } else if (!weigh_row(w, &w->pairs, last, ids, probs, k, found, scratch)) {
                continue;
            }
            weights = found;
            order = length + 1;
            break;
        }
    }
    int64_t seen_extra[MAX_EXTRA + MAX_ORDER + 1]; /* the extra tokens and the prefix, as one list */
    for (Py_ssize_t i = 0; i < n_extra; i++) seen_extra[i] = extra[i];
    for (int i = 0; i < n_prefix; i++) seen_extra[n_extra + i] = prefix[i];
    penalise_normalise(ids, weights, k, generated, seen_extra, n_extra + n_prefix, penalty, q);
    return order;
}

void stage_target(const int64_t *ids, const double *probs, Py_ssize_t k, const uint8_t *generated,
                  const int64_t *extra, Py_ssize_t n_extra, double penalty, double *p) {
    penalise_normalise(ids, probs, k, generated, extra, n_extra, penalty, p);
}

/* The probability of `token` under a distribution over `ids` (0 off its candidates). */
static double probability_of(const int64_t *ids, const double *probs, Py_ssize_t k, int64_t token) {
    for (Py_ssize_t j = 0; j < k; j++)
        if (ids[j] == token) return probs[j];
    return 0.0;
}

int stage_check(const int64_t *p_ids, const double *p, const int64_t *q_ids, const double *q, Py_ssize_t k,
                int64_t token, PyObject *random) {
    double q_x = probability_of(q_ids, q, k, token);
    if (!(q_x > 0)) return -1;
    PyObject *drawn = PyObject_CallNoArgs(random);
    if (!drawn) return -2;
    double u = PyFloat_AsDouble(drawn);
    Py_DECREF(drawn);
    if (u == -1.0 && PyErr_Occurred()) return -2;
    return !(u >= probability_of(p_ids, p, k, token) / q_x);
}

int64_t stage_residual(const int64_t *p_ids, const double *p, const int64_t *q_ids, const double *q, Py_ssize_t k,
                       double *scratch, PyObject *random) {
    int64_t *ids = (int64_t *)scratch; /* p's candidates in ascending id order, then the residual */
    double *left = scratch + k, *sorted_p = left + k;
    for (Py_ssize_t j = 0; j < k; j++) { /* insertion sort: k <= 100, ids distinct */
        Py_ssize_t at = j;
        while (at > 0 && ids[at - 1] > p_ids[j]) {
            ids[at] = ids[at - 1];
            sorted_p[at] = sorted_p[at - 1];
            at--;
        }
        ids[at] = p_ids[j];
        sorted_p[at] = p[j];
    }
    int any = 0;
    for (Py_ssize_t j = 0; j < k; j++) {
        double d = sorted_p[j] - probability_of(q_ids, q, k, ids[j]);
        left[j] = d > 0.0 ? d : 0.0;
        any |= left[j] != 0.0;
    }
    Py_ssize_t pick = stage_draw(any ? left : sorted_p, k, 0, random);
    return pick < 0 ? -2 : ids[pick];
}
