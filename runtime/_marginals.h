/* A head's marginals from its logits: the top-k candidates and their softmax probabilities
 * (runtime/_marginals.c; runtime/marginals.py is the numpy twin, equal to the last bit). */
#ifndef DYNAMO_MARGINALS_H
#define DYNAMO_MARGINALS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* Bytes of scratch row_marginals needs for a row of `vocab` logits and `k` candidates. */
size_t marginals_scratch_bytes(Py_ssize_t vocab, Py_ssize_t k);

/* The k best tokens of one row of float32 logits by (-logit, id) into ids, and
 * softmax(logits / temperature) there into probs. 0, or -1 when the row holds a NaN or its
 * largest logit is infinite (nothing is a distribution then). 1 <= k <= vocab. */
int row_marginals(const float *logits, Py_ssize_t vocab, Py_ssize_t k, double temperature, int64_t *ids,
                  double *probs, void *scratch);

#endif
