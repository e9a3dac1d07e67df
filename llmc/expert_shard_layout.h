/*
 * expert_shard_layout.h - a rank's flat parameter-shaped buffers when the expert tables are
 * column-sharded (docs/sharding.md §3.1, --shard-experts 1): the host bookkeeping the CUDA
 * trainer (train_omnimoe.cu) and the simulated-rank test (test_shard_tables.c) share. Plain C
 * (gcc -std=c11 and nvcc), no allocation, no I/O.
 *
 * The local layout. Rank r of P keeps the llmc/config.h layout with U and V cut to its columns:
 * every tensor in the usual order and size, except PARAM_EXPERTU and PARAM_EXPERTV, which hold
 * (L*N, C/P) packed slices (llmc/expert_shard.h's column map). The weights, gradients, fp32
 * master, m and v of the rank are flat buffers in this layout, so the per-tensor AdamW loop and
 * the per-layer views work unchanged on the smaller buffer; the tensors other than U and V (the
 * "replicated" part) are whole and identical on every rank.
 *
 * Defines:
 *   ExpertShardLayout, expert_shard_layout(lay, cfg, P, r)   sizes/offsets local and full
 *   expert_shard_is_table(tensor)                            U or V
 *   expert_shard_local_pack(local, full, elem, lay)          full flat -> rank's local (overwrite)
 *   expert_shard_local_unpack(full, local, elem, lay)        rank's local -> full: the replicated
 *                                                            tensors and rank r's columns of U, V
 *                                                            (other columns untouched)
 *   expert_shard_local_needs(q, P1, lay2)                    does new rank lay2->rank of lay2->P read
 *                                                            old rank q's local of P1 (re-sharding,
 *                                                            llmc/checkpoint_parts.h; the replicated
 *                                                            part comes from old rank 0)
 *   expert_shard_norm_squared(replicated, partials, P)       the global sum of squares
 *   expert_shard_grad_slices(lay, slices, n)                 the data-parallel gradient buckets of
 *                                                            the rank (llmc/grad_slices.h's slices):
 *                                                            U, V dropped, the rest at local offsets
 *
 * The global gradient norm. The replicated part's gradients are the same bits on every rank
 * (after the data-parallel mean), so every rank computes their sum of squares itself; the table
 * slices are disjoint, so each rank computes its slices' partial and the P partials are
 * exchanged (all-gather, no arithmetic) and added: replicated + partial[0] + ... + partial[P-1],
 * in that order, in double, on every rank. Every rank gets the same bits whatever P's exchange
 * algorithm; against the unsharded double sum it differs only in the summation order.
 *
 * Checkpoint parts (llmc/checkpoint_parts.h, shard_mode SHARD_MODE_TABLES): part r holds rank r's
 * local master, m and v in this layout; every part holds the replicated part, readers take it
 * from part 0.
 */
#ifndef OMNIMOE_EXPERT_SHARD_LAYOUT_H
#define OMNIMOE_EXPERT_SHARD_LAYOUT_H

#include <stddef.h>
#include <string.h>
#include "config.h"
#include "expert_shard.h"
#include "grad_slices.h"

typedef struct {
    int P, rank, C;
    size_t rows;                                  // L*N: rows of U and of V
    size_t full_sizes[NUM_PARAMETER_TENSORS];     // model_config_param_sizes
    size_t full_offsets[NUM_PARAMETER_TENSORS];
    size_t sizes[NUM_PARAMETER_TENSORS];          // local: U and V divided by P
    size_t offsets[NUM_PARAMETER_TENSORS];
    size_t num_full, num_local;                   // elements of the full and of the local buffer
    size_t table_local;                           // of num_local: U and V
} ExpertShardLayout;

static inline int expert_shard_is_table(int tensor) { return tensor == PARAM_EXPERTU || tensor == PARAM_EXPERTV; }

// the caller has checked expert_shard_unfit(C, P) == NULL
static inline void expert_shard_layout(ExpertShardLayout* lay, const ModelConfig* c, int P, int r) {
    memset(lay, 0, sizeof(*lay));
    lay->P = P;
    lay->rank = r;
    lay->C = c->channels;
    model_config_param_sizes(c, lay->full_sizes);
    lay->rows = lay->full_sizes[PARAM_EXPERTU] / (size_t)c->channels;
    size_t full = 0, local = 0;
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        lay->full_offsets[i] = full;
        lay->offsets[i] = local;
        lay->sizes[i] = expert_shard_is_table(i) ? lay->full_sizes[i] / (size_t)P : lay->full_sizes[i];
        if (expert_shard_is_table(i)) lay->table_local += lay->sizes[i];
        full += lay->full_sizes[i];
        local += lay->sizes[i];
    }
    lay->num_full = full;
    lay->num_local = local;
}

// to_local = 1: local <- full (the rank's pack); 0: full <- local (its columns and the replicated tensors)
static inline void expert_shard_local_copy_(void* local, void* full, size_t elem, const ExpertShardLayout* lay,
                                            int to_local) {
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        char* l = (char*)local + lay->offsets[i] * elem;
        char* f = (char*)full + lay->full_offsets[i] * elem;
        if (expert_shard_is_table(i) && to_local) expert_shard_pack(l, f, elem, lay->rows, lay->C, lay->P, lay->rank);
        else if (expert_shard_is_table(i)) expert_shard_unpack(f, l, elem, lay->rows, lay->C, lay->P, lay->rank);
        else if (to_local) memcpy(l, f, lay->sizes[i] * elem);
        else memcpy(f, l, lay->sizes[i] * elem);
    }
}

static inline void expert_shard_local_pack(void* local, const void* full, size_t elem, const ExpertShardLayout* lay) {
    expert_shard_local_copy_(local, (void*)full, elem, lay, 1);
}

static inline void expert_shard_local_unpack(void* full, const void* local, size_t elem, const ExpertShardLayout* lay) {
    expert_shard_local_copy_((void*)local, full, elem, lay, 0);
}

// 1 when new rank lay2->rank of lay2->P reads old rank q's local of P1 (part 0: the replicated part)
static inline int expert_shard_local_needs(int q, int P1, const ExpertShardLayout* lay2) {
    return q == 0 || expert_shard_reshard_needs(q, P1, lay2->rank, lay2->P, lay2->C);
}

static inline double expert_shard_norm_squared(double replicated, const double* partials, int P) {
    double sum = replicated;
    for (int r = 0; r < P; r++) sum += partials[r];
    return sum;
}

// The slices of llmc/grad_slices.h (whole layout, grad_slices_build) that the rank's gradient
// reducer averages over the ranks: the U and V slices dropped (their gradients are complete on
// their owner: the exchanges gave it every rank's pairs, times 1/P, docs/sharding.md §3.1), every
// other slice moved to its local offset. In place, the order kept; returns how many remain.
static inline int expert_shard_grad_slices(const ExpertShardLayout* lay, GradSlice* slices, int n) {
    int kept = 0;
    for (int i = 0; i < n; i++) {
        GradSlice s = slices[i];
        if (expert_shard_is_table(s.tensor)) continue;
        s.offset = s.offset - lay->full_offsets[s.tensor] + lay->offsets[s.tensor];
        slices[kept++] = s;
    }
    return kept;
}

#endif  // OMNIMOE_EXPERT_SHARD_LAYOUT_H
