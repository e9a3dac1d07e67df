/*
 * expert_shard.h - the bookkeeping of the column-sharded expert tables (docs/sharding.md §3.1),
 * as pure host functions: no allocation, no I/O, no globals. Plain C: gcc -std=c11 and nvcc.
 *
 * The partition. A table row of C channels is cut into C/8 column vectors of 8 channels (16 bytes
 * of bf16: the unit the GPU kernels load). With P ranks, rank r holds the vectors v with
 * v mod P == r of EVERY row, packed in order: vector v sits at packed vector v div P. A rank's
 * slice of an (rows, C) table is therefore an (rows, C/P) table. Interleaved, not contiguous
 * C/P blocks, because the GPU's warp dot product gives lane L the vectors L, L+32, L+64, ...
 * (llmc/experts.cuh): with P | 32, rank r's vectors are exactly those of lanes r, r+P, r+2P, ...
 * so the P partial dot products combined in the warp's xor-butterfly order give the unsharded
 * kernel's bits (docs/sharding.md §3.1, "Exactness").
 *
 * Defines:
 *   EXPERT_SHARD_VEC                         channels per column vector (8)
 *   expert_shard_unfit(C, P)                 NULL when (C, P) can be sharded, else what is wrong
 *   expert_shard_cols(C, P)                  channels per rank, C/P
 *   expert_shard_rank_of(c, P), expert_shard_packed_of(c, P), expert_shard_channel(j, r, P)
 *                                            the column map: channel c <-> (rank, packed column j)
 *   expert_shard_pack(slice, full, elem, rows, C, P, r)     rank r's columns of full -> slice
 *   expert_shard_unpack(full, slice, elem, rows, C, P, r)   slice -> rank r's columns of full
 *       elem = bytes per element (4 fp32, 2 bf16); slice is (rows, C/P) packed, full (rows, C);
 *       both OVERWRITE only their destination's rank-r entries (unpack leaves the other ranks'
 *       columns of full untouched, so P unpacks rebuild the whole table)
 *   expert_shard_pair_global(q, p, pairs_per_rank), expert_shard_pair_owner(g, pairs_per_rank)
 *                                            global pair id = (rank, local pair): q*BT*k + p
 *   expert_shard_lanes(P)                    lanes of a rank's dot product (32/P for P | 32)
 *   expert_shard_dot_partial(a, b, n, P)     a rank's partial dot product in the GPU lane order
 *   expert_shard_tree_sum(partials, stride, P)   the P partials combined in the fixed tree
 *   expert_shard_reshard(dst, old, elem, rows, C, P1, r2, P2)   new rank r2's slice of P2 from the
 *                                            old slices of P1 (a resume on another count);
 *                                            expert_shard_reshard_needs(q, P1, r2, P2, C): is old q read
 *   expert_shard_table_elems(cfg, P)         elements of a rank's share of U and V (all layers)
 *   expert_shard_gather_tables(out, flat, cfg, P, r)   rank r's share of a flat parameter-shaped
 *                                            fp32 buffer (params, grads, m, v): U slice, V slice
 *   expert_shard_scatter_tables(flat, in, cfg, P, r)   the reverse (the checkpoint part order)
 *
 * Determinism: every function is a fixed sequence of operations; the two sums
 * (expert_shard_dot_partial, expert_shard_tree_sum) have one fixed order each, documented there.
 */
#ifndef OMNIMOE_EXPERT_SHARD_H
#define OMNIMOE_EXPERT_SHARD_H

#include <stddef.h>
#include <string.h>
#include <math.h>
#include "config.h"

// the map and the tree are also called by the rank kernels (llmc/experts_shard.cuh)
#ifdef __CUDACC__
#define EXPERT_SHARD_HD __host__ __device__
#else
#define EXPERT_SHARD_HD
#endif

#define EXPERT_SHARD_VEC 8     // channels per column vector: 16 bytes of bf16
#define EXPERT_SHARD_WARP 32   // lanes of the unsharded dot product (one warp)

// NULL when a table of C channels can be split over P ranks; otherwise the condition that fails
static inline const char* expert_shard_unfit(int C, int P) {
    if (P < 1) return "at least one rank";
    if (C < EXPERT_SHARD_VEC || C % EXPERT_SHARD_VEC != 0) return "C a positive multiple of 8";
    if ((C / EXPERT_SHARD_VEC) % P != 0) return "C/8 (the 16-byte column vectors) divisible by the number of ranks";
    return NULL;
}

static inline int expert_shard_cols(int C, int P) { return C / P; }

// channel c lives on rank (c/8) mod P ...
EXPERT_SHARD_HD static inline int expert_shard_rank_of(int c, int P) { return (c / EXPERT_SHARD_VEC) % P; }
// ... at packed column ((c/8) div P)*8 + c%8 of that rank's slice
EXPERT_SHARD_HD static inline int expert_shard_packed_of(int c, int P) {
    return (c / EXPERT_SHARD_VEC) / P * EXPERT_SHARD_VEC + c % EXPERT_SHARD_VEC;
}
// the inverse: packed column j of rank r is channel ((j/8)*P + r)*8 + j%8
EXPERT_SHARD_HD static inline int expert_shard_channel(int j, int r, int P) {
    return ((j / EXPERT_SHARD_VEC) * P + r) * EXPERT_SHARD_VEC + j % EXPERT_SHARD_VEC;
}

// slice (rows, C/P) = rank r's columns of full (rows, C); elements of elem bytes, copied as bytes
static inline void expert_shard_pack(void* slice, const void* full, size_t elem, size_t rows, int C, int P, int r) {
    const size_t vec_bytes = EXPERT_SHARD_VEC * elem;
    const int nv = C / EXPERT_SHARD_VEC / P;  // vectors per row on one rank
    for (size_t row = 0; row < rows; row++) {
        const char* src = (const char*)full + row * (size_t)C * elem;
        char* dst = (char*)slice + row * (size_t)(C / P) * elem;
        for (int j = 0; j < nv; j++) {
            memcpy(dst + (size_t)j * vec_bytes, src + (size_t)(j * P + r) * vec_bytes, vec_bytes);
        }
    }
}

// rank r's columns of full (rows, C) = slice (rows, C/P); the other columns are not touched
static inline void expert_shard_unpack(void* full, const void* slice, size_t elem, size_t rows, int C, int P, int r) {
    const size_t vec_bytes = EXPERT_SHARD_VEC * elem;
    const int nv = C / EXPERT_SHARD_VEC / P;
    for (size_t row = 0; row < rows; row++) {
        const char* src = (const char*)slice + row * (size_t)(C / P) * elem;
        char* dst = (char*)full + row * (size_t)C * elem;
        for (int j = 0; j < nv; j++) {
            memcpy(dst + (size_t)(j * P + r) * vec_bytes, src + (size_t)j * vec_bytes, vec_bytes);
        }
    }
}

// The pairs of all ranks (after the all-gather of idx and gate) in one order: rank q's local
// pair p = t*k + m is global pair q*BT*k + p. That is the concatenated batch's own pair order,
// so the expert-sorted order (stable, by global id) is the unsharded run's.
static inline long long expert_shard_pair_global(int q, long long p, long long pairs_per_rank) {
    return (long long)q * pairs_per_rank + p;
}
static inline int expert_shard_pair_owner(long long g, long long pairs_per_rank) { return (int)(g / pairs_per_rank); }

// lanes of one rank's dot product: the 32/P lanes of a warp that the unsharded kernel gives its
// vectors when P divides 32; otherwise a whole warp over the packed slice (then sharded results
// are deterministic for that P but not the unsharded bits)
EXPERT_SHARD_HD static inline int expert_shard_lanes(int P) {
    return (P <= EXPERT_SHARD_WARP && (P & (P - 1)) == 0) ? EXPERT_SHARD_WARP / P : EXPERT_SHARD_WARP;
}

// <a, b> over n channels of a packed slice (n a multiple of 8), in the order of the rank kernel:
// lane j of L = expert_shard_lanes(P) lanes takes the vectors j, j+L, j+2L, ... and accumulates
// their 8 channels with fmaf in order; then the lanes are combined by the xor butterfly with
// offsets L/2, ..., 2, 1 (warp_reduce_sum restricted to L lanes). With P = 1 this is the
// unsharded GPU kernel's dot product (llmc/experts.cuh, experts_dot_mem), here on the host.
static inline float expert_shard_dot_partial(const float* a, const float* b, int n, int P) {
    float lane[EXPERT_SHARD_WARP];
    const int L = expert_shard_lanes(P);
    const int nv = n / EXPERT_SHARD_VEC;
    for (int j = 0; j < L; j++) {
        float acc = 0.0f;
        for (int v = j; v < nv; v += L) {
            for (int i = 0; i < EXPERT_SHARD_VEC; i++) {
                acc = fmaf(a[v * EXPERT_SHARD_VEC + i], b[v * EXPERT_SHARD_VEC + i], acc);
            }
        }
        lane[j] = acc;
    }
    // xor butterfly: after offset o, lanes j and j^o hold the same value (addition commutes),
    // so lane 0's value is every lane's
    for (int o = L / 2; o >= 1; o /= 2) {
        float next[EXPERT_SHARD_WARP];
        for (int j = 0; j < L; j++) next[j] = lane[j] + lane[j ^ o];
        for (int j = 0; j < L; j++) lane[j] = next[j];
    }
    return lane[0];
}

// The P partials (partials[r * stride], r = 0..P-1) combined in one fixed tree: with Q the
// smallest power of two >= P, for o = Q/2, ..., 2, 1: value[r] += value[r + o] for r < o
// (where r + o < P). For P a power of two this is the last log2(P) steps of the warp's xor
// butterfly (offsets P/2 ... 1 on lanes r + P*j), so a rank partial of expert_shard_dot_partial
// combined here gives the unsharded dot product bit for bit. P=4: (G0 + G2) + (G1 + G3);
// P=3: (G0 + G2) + G1.
EXPERT_SHARD_HD static inline float expert_shard_tree_sum(const float* partials, size_t stride, int P) {
    float value[64];
    int Q = 1;
    while (Q < P) Q *= 2;
    if (P > 64) {  // not a sharding we run; a plain fixed order keeps the function total
        float sum = partials[0];
        for (int r = 1; r < P; r++) sum += partials[(size_t)r * stride];
        return sum;
    }
    for (int r = 0; r < P; r++) value[r] = partials[(size_t)r * stride];
    for (int o = Q / 2; o >= 1; o /= 2) {
        for (int r = 0; r < o && r + o < P; r++) value[r] = value[r] + value[r + o];
    }
    return value[0];
}

// ----------------------------------------------------------------------------
// re-sharding (docs/sharding.md §4): a slice of P2 ranks built from the slices of P1 ranks, as a
// resume on another process count reads the parts of a checkpoint. New rank r2 holds the vectors
// v = r2 + P2*j; each lives on old rank v mod P1 at packed vector v div P1, so only the old
// ranks q with q = r2 (mod gcd(P1, P2)) are read.

// 1 when old rank q of P1 holds any vector of new rank r2 of P2 (a table of C channels)
static inline int expert_shard_reshard_needs(int q, int P1, int r2, int P2, int C) {
    const int nv2 = C / EXPERT_SHARD_VEC / P2;
    for (int j = 0; j < nv2; j++) {
        if ((j * P2 + r2) % P1 == q) return 1;
    }
    return 0;
}

// dst (rows, C/P2) = new rank r2's slice, from old[q] (rows, C/P1) of the old ranks it needs
// (old[q] of the others is never read and may be NULL). rows may be a block of rows: pass the
// pointers at its first row.
static inline void expert_shard_reshard(void* dst, const void* const* old, size_t elem, size_t rows, int C, int P1,
                                        int r2, int P2) {
    const size_t vec_bytes = EXPERT_SHARD_VEC * elem;
    const int nv2 = C / EXPERT_SHARD_VEC / P2;
    for (size_t row = 0; row < rows; row++) {
        char* d = (char*)dst + row * (size_t)(C / P2) * elem;
        for (int j = 0; j < nv2; j++) {
            const int v = j * P2 + r2;
            const char* src = (const char*)old[v % P1] + row * (size_t)(C / P1) * elem;
            memcpy(d + (size_t)j * vec_bytes, src + (size_t)(v / P1) * vec_bytes, vec_bytes);
        }
    }
}

// ----------------------------------------------------------------------------
// a rank's share of the expert tables of a flat parameter-shaped buffer (docs/design.md §1.3
// layout: U of all layers is one (L*N, C) tensor, V likewise). Its order - U's (L*N, C/P)
// slice, then V's - is the order of the tables in a checkpoint part (docs/sharding.md §4).

static inline size_t expert_shard_table_elems(const ModelConfig* c, int P) {
    size_t sizes[NUM_PARAMETER_TENSORS];
    model_config_param_sizes(c, sizes);
    return (sizes[PARAM_EXPERTU] + sizes[PARAM_EXPERTV]) / (size_t)P;
}

// flat offsets of U and V in the layout
static inline void expert_shard_table_offsets_(const ModelConfig* c, size_t* off_u, size_t* off_v, size_t* rows) {
    size_t sizes[NUM_PARAMETER_TENSORS], off = 0;
    model_config_param_sizes(c, sizes);
    for (int i = 0; i < PARAM_EXPERTU; i++) off += sizes[i];
    *off_u = off;
    *off_v = off + sizes[PARAM_EXPERTU];
    *rows = sizes[PARAM_EXPERTU] / (size_t)c->channels;
}

// out (expert_shard_table_elems) = rank r's columns of U then V of flat (fp32)
static inline void expert_shard_gather_tables(float* out, const float* flat, const ModelConfig* c, int P, int r) {
    size_t off_u, off_v, rows;
    expert_shard_table_offsets_(c, &off_u, &off_v, &rows);
    const size_t slice = rows * (size_t)(c->channels / P);
    expert_shard_pack(out, flat + off_u, sizeof(float), rows, c->channels, P, r);
    expert_shard_pack(out + slice, flat + off_v, sizeof(float), rows, c->channels, P, r);
}

// rank r's columns of U and V of flat = in (the layout of expert_shard_gather_tables)
static inline void expert_shard_scatter_tables(float* flat, const float* in, const ModelConfig* c, int P, int r) {
    size_t off_u, off_v, rows;
    expert_shard_table_offsets_(c, &off_u, &off_v, &rows);
    const size_t slice = rows * (size_t)(c->channels / P);
    expert_shard_unpack(flat + off_u, in, sizeof(float), rows, c->channels, P, r);
    expert_shard_unpack(flat + off_v, in + slice, sizeof(float), rows, c->channels, P, r);
}

#endif  // OMNIMOE_EXPERT_SHARD_H
