/*
grad_slices.h - the gradient buckets of data parallelism as a host list of slices, one list for
the CUDA gradient reducer (train_omnimoe.cu, llmc/multi_gpu.cuh), the ZeRO-1 partition
(llmc/zero_shard.h) and the tests. Plain C: compiles with gcc and nvcc.

Defines:
- GradSlice                  one tensor's part in one bucket: (bucket, tensor, layer, flat offset, count)
- grad_slices_num_buckets()  L + 1
- grad_slices_max()          an upper bound of the number of slices (to size the output)
- grad_slices_build()        the slices, in bucket order and, within a bucket, in tensor order;
                             returns how many
- grad_slices_check_tiling() 1 when the slices cover [0, num_params) exactly once
- param_is_per_layer()       whether a tensor has one slice per layer

Buckets (docs/design.md §7.2): bucket b < L holds layer l = L-1-b's slice of every per-layer
tensor (the backward finishes the layers top down, so the buckets become final in index order);
bucket L holds the tensors that are not per layer: wte (written by the LM head first and by the
encoder last), wpe, lnfw, lnfb. A new tensor must go into the bucket of the last backward step
that writes it. Pure functions of the configuration: every rank and every test builds the same
list.
*/
#ifndef OMNIMOE_GRAD_SLICES_H
#define OMNIMOE_GRAD_SLICES_H

#include <stddef.h>
#include <stdlib.h>
#include "config.h"

typedef struct {
    int bucket;     // 0 .. L: the order in which the backward finishes them
    int tensor;     // PARAM_*
    int layer;      // -1 for a tensor that is not per layer
    size_t offset;  // flat element offset in the parameter layout (config.h)
    size_t count;   // elements (> 0)
} GradSlice;

static inline int param_is_per_layer(int tensor) {
    return tensor != PARAM_WTE && tensor != PARAM_WPE && tensor != PARAM_LNFW && tensor != PARAM_LNFB;
}

static inline int grad_slices_num_buckets(const ModelConfig* c) { return c->num_layers + 1; }

static inline int grad_slices_max(const ModelConfig* c) { return (c->num_layers + 1) * NUM_PARAMETER_TENSORS; }

// out: room for grad_slices_max(c) slices. Tensors of size 0 get no slice.
static inline int grad_slices_build(const ModelConfig* c, GradSlice* out) {
    size_t sizes[NUM_PARAMETER_TENSORS], offsets[NUM_PARAMETER_TENSORS], off = 0;
    model_config_param_sizes(c, sizes);
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        offsets[i] = off;
        off += sizes[i];
    }
    const int L = c->num_layers;
    int n = 0;
    for (int l = L - 1; l >= -1; l--) {  // l = -1: the bucket after the layers
        for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
            if (sizes[i] == 0 || param_is_per_layer(i) != (l >= 0)) continue;
            size_t count = l >= 0 ? sizes[i] / L : sizes[i];
            GradSlice s = {l >= 0 ? L - 1 - l : L, i, l, offsets[i] + (l >= 0 ? (size_t)l * count : 0), count};
            out[n++] = s;
        }
    }
    return n;
}

static inline int grad_slices_compare_offset_(const void* a, const void* b) {
    size_t x = ((const GradSlice*)a)->offset, y = ((const GradSlice*)b)->offset;
    return x < y ? -1 : (x > y ? 1 : 0);
}

// 1 when the n slices, sorted by offset, each start where the last ended and end at num_params
static inline int grad_slices_check_tiling(const GradSlice* slices, int n, size_t num_params) {
    GradSlice* sorted = (GradSlice*)malloc((n > 0 ? n : 1) * sizeof(GradSlice));
    if (sorted == NULL) return 0;
    for (int i = 0; i < n; i++) sorted[i] = slices[i];
    qsort(sorted, n, sizeof(GradSlice), grad_slices_compare_offset_);
    size_t end = 0;
    int ok = 1;
    for (int i = 0; i < n && ok; i++) {
        ok = sorted[i].offset == end && sorted[i].count > 0;
        end += sorted[i].count;
    }
    free(sorted);
    return ok && end == num_params;
}

#endif  // OMNIMOE_GRAD_SLICES_H
