/* A head's marginals in one pass per stage: the largest logit, the top-k search and the
 * softmax normaliser over the whole vocabulary.
 *
 * Why not numpy: these were a dozen numpy calls per head, each cold after a forward pass has
 * streamed the model's weights through the caches (~0.3 ms a step live, against ~40 us warm).
 *
 * The exp is our own, so that it is the same function on every CPU and in both paths
 * (runtime/marginals.py computes it with numpy ufuncs, operation for operation):
 *   z < -708: 0 (e^-708 is 1e-308: nothing a probability can hold)
 *   n = round-to-even(z log2 e), via the 1.5 * 2^52 shifter; r = (z - n ln2_hi) - n ln2_lo
 *   exp = (Taylor polynomial of degree 13 in r, Horner) * 2^n
 * Cody-Waite reduction with fdlibm's split of ln 2 keeps |r| <= 0.35, where the degree-13
 * remainder is 4e-18: the result is within ~1 ulp of the true exp (tests check 2.5e-16).
 * numpy's own np.exp differs between CPUs (its AVX-512 and scalar paths round differently),
 * so a seed would not give the same tokens on every machine with it.
 *
 * The normaliser is 16 running sums, lane j taking the tokens j, j + 16, ...; then the lanes
 * in order: a summation order numpy can reproduce (accumulate along an axis) and the compiler
 * can vectorise without reassociating anything. The file is compiled for AVX-512, AVX2 and
 * plain x86-64 where the toolchain supports function multiversioning; the build flags forbid
 * FMA contraction, so every version rounds every operation the same way.
 */
#include "_marginals.h"

#include <math.h>
#include <string.h>

#define SELECT_BLOCK 16 /* tokens per block in the top-k search */
#define LANES 16        /* running sums of the softmax normaliser */
#define CHUNK 256       /* exps computed before they are summed into the lanes */
#define EXP_FLOOR (-708.0)
#define LOG2E 1.4426950408889634
#define LN2_HI 6.93147180369123816490e-01 /* fdlibm's ln2_hi: n * LN2_HI is exact */
#define LN2_LO 1.90821492927058770002e-10
#define SHIFTER 6755399441055744.0 /* 1.5 * 2^52: x + SHIFTER - SHIFTER rounds x to an integer, ties to even */

#if defined(__x86_64__) && defined(__GNUC__) && defined(__GLIBC__)
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif

/* The exp described above, written branch-free so that its loops vectorise. */
static inline double exp_poly(double z) {
    double zc = z < EXP_FLOOR ? EXP_FLOOR : z;
    double shifted = zc * LOG2E + SHIFTER;
    double n = shifted - SHIFTER;
    double r = (zc - n * LN2_HI) - n * LN2_LO;
    double p = 1.0 / 6227020800.0; /* 1 / 13! */
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    /* 2^n from the shifter's low bits: n >= -1022, so the scale and the product are normal. */
    double shifter = SHIFTER, scale;
    int64_t bits, base;
    memcpy(&bits, &shifted, sizeof(bits));
    memcpy(&base, &shifter, sizeof(base));
    bits = (bits - base + 1023) * ((int64_t)1 << 52);
    memcpy(&scale, &bits, sizeof(scale));
    return z < EXP_FLOOR ? 0.0 : p * scale;
}

static inline double scaled_logit(float x, double top, double temperature) {
    return ((double)x - top) / temperature;
}

/* sum over the row of exp((x - top) / temperature), in the lane order described above. The
 * division is a third of the work, and at temperature 1 (the default) it is exact, so that case
 * skips it: the same bits, 1.6x faster. */
static inline __attribute__((always_inline)) double exp_lane_sum_of(const float *x, Py_ssize_t vocab, double top,
                                                                    double temperature, const int divide) {
    double lanes[LANES] = {0.0}, e[CHUNK];
    Py_ssize_t v = 0;
    for (; v + CHUNK <= vocab; v += CHUNK) {
        for (int i = 0; i < CHUNK; i++)
            e[i] = exp_poly(divide ? scaled_logit(x[v + i], top, temperature) : (double)x[v + i] - top);
        for (int c = 0; c < CHUNK; c += LANES)
            for (int j = 0; j < LANES; j++) lanes[j] += e[c + j];
    }
    Py_ssize_t rest = vocab - v; /* the tail, as if padded with zeros (x + 0 = x for sums >= 0) */
    for (Py_ssize_t i = 0; i < rest; i++) e[i] = exp_poly(scaled_logit(x[v + i], top, temperature));
    for (Py_ssize_t i = 0; i < rest; i++) lanes[i % LANES] += e[i];
    double total = 0.0;
    for (int j = 0; j < LANES; j++) total += lanes[j];
    return total;
}

VECTOR_CLONES
static double exp_lane_sum(const float *x, Py_ssize_t vocab, double top, double temperature) {
    return temperature == 1.0 ? exp_lane_sum_of(x, vocab, top, 1.0, 0) : exp_lane_sum_of(x, vocab, top, temperature, 1);
}

/* The top-k search's blocks are strided: block b holds the tokens b, b + blocks, b + 2 blocks,
 * ... (SELECT_BLOCK of them, the last round short), so that every block's maximum comes out of
 * one vertical pass of vector max instructions instead of a horizontal reduction per block
 * (4x faster). Which tokens share a block does not change what the search finds. */
static inline Py_ssize_t block_count(Py_ssize_t vocab) { return (vocab + SELECT_BLOCK - 1) / SELECT_BLOCK; }

/* Each block's largest logit into block_max; the row's into *top. 0, or -1 for a NaN. */
VECTOR_CLONES
static int block_maxima(const float *x, Py_ssize_t vocab, float *block_max, float *top) {
    Py_ssize_t blocks = block_count(vocab);
    int nan = 0;
    for (Py_ssize_t b = 0; b < blocks; b++) {
        block_max[b] = x[b];
        nan |= x[b] != x[b];
    }
    for (Py_ssize_t round = 1; round < SELECT_BLOCK; round++) {
        const float *row = x + round * blocks;
        Py_ssize_t width = vocab - round * blocks < blocks ? vocab - round * blocks : blocks;
        for (Py_ssize_t b = 0; b < width; b++) {
            block_max[b] = row[b] > block_max[b] ? row[b] : block_max[b];
            nan |= row[b] != row[b];
        }
    }
    float row_max = block_max[0];
    for (Py_ssize_t b = 1; b < blocks; b++) row_max = block_max[b] > row_max ? block_max[b] : row_max;
    *top = row_max;
    return nan ? -1 : 0;
}

/* Better candidate first: higher logit, then lower token id. */
static inline int ranks_before(float la, int64_t a, float lb, int64_t b) { return la > lb || (la == lb && a < b); }

/* The k-th largest of `count` values (count > k): a min-heap of the k largest, in `heap`. */
static float kth_largest(const float *values, Py_ssize_t count, Py_ssize_t k, float *heap) {
    Py_ssize_t n = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        float m = values[i];
        if (n == k && !(m > heap[0])) continue;
        Py_ssize_t at;
        if (n < k) {
            at = n++;
            while (at > 0 && heap[(at - 1) / 2] > m) {
                heap[at] = heap[(at - 1) / 2];
                at = (at - 1) / 2;
            }
        } else {
            at = 0;
            for (;;) {
                Py_ssize_t child = 2 * at + 1;
                if (child >= n) break;
                if (child + 1 < n && heap[child + 1] < heap[child]) child++;
                if (!(heap[child] < m)) break;
                heap[at] = heap[child];
                at = child;
            }
        }
        heap[at] = m;
    }
    return heap[0];
}

/* The k best tokens by (-logit, id) into ids, best first. The k-th largest block maximum
 * bounds the k-th best logit from below (k blocks reach it), so only blocks reaching it are
 * searched, with a min-heap of the best k so far. */
static void select_topk(const float *x, Py_ssize_t vocab, Py_ssize_t k, const float *block_max, float *maxima,
                        int64_t *heap, int64_t *ids) {
    Py_ssize_t blocks = block_count(vocab);
    float floor = blocks > k ? kth_largest(block_max, blocks, k, maxima) : -HUGE_VALF;
    /* heap[0] is the worst of the best k; a token displaces it only by ranking before it. */
    Py_ssize_t size = 0;
    float worst = 0.0f; /* x[heap[0]] once the heap is full */
    for (Py_ssize_t bl = 0; bl < blocks; bl++) {
        if (!(block_max[bl] >= floor)) continue;
        for (int64_t v = bl; v < vocab; v += blocks) {
            if (!(x[v] >= floor) || (size == k && !(x[v] > worst || (x[v] == worst && v < heap[0])))) continue;
            Py_ssize_t at;
            if (size < k) { /* sift up */
                at = size++;
                while (at > 0) {
                    Py_ssize_t parent = (at - 1) / 2;
                    if (!ranks_before(x[heap[parent]], heap[parent], x[v], v)) break;
                    heap[at] = heap[parent];
                    at = parent;
                }
            } else { /* replace the root, sift down */
                at = 0;
                for (;;) {
                    Py_ssize_t child = 2 * at + 1;
                    if (child >= size) break;
                    if (child + 1 < size && ranks_before(x[heap[child]], heap[child], x[heap[child + 1]], heap[child + 1]))
                        child++;
                    if (!ranks_before(x[v], v, x[heap[child]], heap[child])) break;
                    heap[at] = heap[child];
                    at = child;
                }
            }
            heap[at] = v;
            if (size == k) worst = x[heap[0]];
        }
    }
    for (Py_ssize_t i = 0; i < k; i++) { /* best first: insertion sort of the k survivors */
        int64_t v = heap[i];
        Py_ssize_t at = i;
        while (at > 0 && ranks_before(x[v], v, x[ids[at - 1]], ids[at - 1])) {
            ids[at] = ids[at - 1];
            at--;
        }
        ids[at] = v;
    }
}

size_t marginals_scratch_bytes(Py_ssize_t vocab, Py_ssize_t k) {
    Py_ssize_t blocks = block_count(vocab);
    return (size_t)k * sizeof(int64_t) + (size_t)(blocks + k) * sizeof(float);
}

int row_marginals(const float *x, Py_ssize_t vocab, Py_ssize_t k, double temperature, int64_t *ids, double *probs,
                  void *scratch) {
    int64_t *heap = scratch;
    float *block_max = (float *)(heap + k), *maxima = block_max + block_count(vocab);
    float top;
    if (block_maxima(x, vocab, block_max, &top) < 0 || !isfinite(top)) return -1;
    select_topk(x, vocab, k, block_max, maxima, heap, ids);
    double total = exp_lane_sum(x, vocab, (double)top, temperature);
    for (Py_ssize_t i = 0; i < k; i++) probs[i] = exp_poly(scaled_logit(x[ids[i]], top, temperature)) / total;
    return 0;
}
