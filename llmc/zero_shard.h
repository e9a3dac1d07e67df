/*
zero_shard.h - the ZeRO-1 partition of the optimizer state (docs/sharding.md §2): which elements
of the flat parameter layout rank r of P owns, and where they sit in its packed fp32 master, m
and v. Host code, plain C: the CUDA trainer, the checkpoint code and the tests share it.

Defines:
- ZeroRange            one contiguous range: (flat offset, count, shard offset), its tensor and slice
- ZeroShardMap         rank r's ranges: owned chunks in slice order, then the replicated tails
- zero_chunk_elems()   q = floor(c / (8P)) * 8, the chunk of a slice of c elements
- zero_shard_map()     builds rank r's map from the bucket slices (llmc/grad_slices.h)
- zero_shard_map_free()
- zero_shard_norm_ranges()  how many leading ranges count in rank r's gradient-norm partial
- zero_shard_tail_elems()   elements in the replicated tails (the same on every rank)
- zero_shard_pack()    full (flat layout) -> packed, rank r's ranges (overwrites packed)
- zero_shard_unpack()  packed -> full, rank r's ranges only (other elements untouched)
- ZeroUpdateRange      one row of the update table: a range, its weight decay and its first block
- zero_shard_update_table()  the table of rank r's ranges for llmc/zero.cuh's one-launch AdamW
- zero_update_row_of()  the row of that table a block of the launch updates (host and device)

The partition: the unit is a slice of grad_slices_build (one tensor's part in one gradient
bucket), so the reduce-scatter of a bucket is one call per slice and the partition never crosses
a tensor (weight decay stays per tensor). A slice of c elements at flat offset o is cut into P
chunks of q = zero_chunk_elems(c, P): rank r owns [o + r*q, o + (r+1)*q). The tail
[o + P*q, o + c), fewer than 8P elements, is replicated: all-reduced and updated by every rank
alike. Each rank's packed buffer holds its chunks in slice order, then every tail in slice order,
so shard_elems = sum of q over the slices + sum of the tails, the same on every rank.

Alignment: q is a multiple of 8, so when every slice offset and count is a multiple of 8 (every
model the GPU accepts: C, I, Vp multiples of 8) every range starts 16-byte aligned in bf16 and
32-byte aligned in the packed fp32 buffers, for the x128 kernels. Pure function of (config, P,
r): every rank, the checkpoint re-sharding and the tests compute the same map.
*/
#ifndef OMNIMOE_ZERO_SHARD_H
#define OMNIMOE_ZERO_SHARD_H

#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "config.h"
#include "grad_slices.h"

// zero_update_row_of runs in llmc/zero.cuh's kernel and in test_zero_shard.c
#ifdef __CUDACC__
#define ZERO_SHARD_HD __host__ __device__
#else
#define ZERO_SHARD_HD
#endif

typedef struct {
    size_t offset;        // flat element offset in the parameter layout (config.h)
    size_t count;         // elements (> 0)
    size_t shard_offset;  // position in the rank's packed master, m and v
    int tensor;           // PARAM_*: the weight decay of the range
    int slice;            // index in ZeroShardMap.slices
    int is_tail;          // 1: a replicated tail (every rank holds and updates it)
} ZeroRange;

typedef struct {
    int num_ranks, rank;    // P, r
    int num_slices;
    GradSlice* slices;      // (num_slices) the bucket slices, grad_slices_build order
    size_t* chunk;          // (num_slices) q of each slice
    int num_ranges;
    int num_chunk_ranges;   // ranges[0, num_chunk_ranges) are owned chunks, the rest tails
    ZeroRange* ranges;      // (num_ranges)
    size_t shard_elems;     // packed elements (chunks + tails)
    size_t num_params;      // of the model
} ZeroShardMap;

static inline size_t zero_chunk_elems(size_t count, int P) { return count / (8 * (size_t)P) * 8; }

// Exits with a message on P < 1, r outside [0, P) or out of host memory.
static inline void zero_shard_map(ZeroShardMap* map, const ModelConfig* c, int P, int r) {
    memset(map, 0, sizeof(*map));
    if (P < 1 || r < 0 || r >= P) {
        fprintf(stderr, "zero_shard_map: rank %d of %d ranks is impossible\n", r, P);
        exit(EXIT_FAILURE);
    }
    map->num_ranks = P;
    map->rank = r;
    map->num_params = model_config_num_params(c);
    int max_slices = grad_slices_max(c);
    map->slices = (GradSlice*)malloc(max_slices * sizeof(GradSlice));
    map->chunk = (size_t*)malloc(max_slices * sizeof(size_t));
    map->ranges = (ZeroRange*)malloc(2 * max_slices * sizeof(ZeroRange));
    if (map->slices == NULL || map->chunk == NULL || map->ranges == NULL) {
        fprintf(stderr, "zero_shard_map: out of host memory\n");
        exit(EXIT_FAILURE);
    }
    map->num_slices = grad_slices_build(c, map->slices);
    size_t packed = 0;
    for (int s = 0; s < map->num_slices; s++) {  // the owned chunks, slice order
        const GradSlice* sl = &map->slices[s];
        size_t q = zero_chunk_elems(sl->count, P);
        map->chunk[s] = q;
        if (q == 0) continue;
        ZeroRange rg = {sl->offset + (size_t)r * q, q, packed, sl->tensor, s, 0};
        map->ranges[map->num_ranges++] = rg;
        packed += q;
    }
    map->num_chunk_ranges = map->num_ranges;
    for (int s = 0; s < map->num_slices; s++) {  // then the tails, slice order
        const GradSlice* sl = &map->slices[s];
        size_t owned = (size_t)P * map->chunk[s];
        if (owned == sl->count) continue;
        ZeroRange rg = {sl->offset + owned, sl->count - owned, packed, sl->tensor, s, 1};
        map->ranges[map->num_ranges++] = rg;
        packed += rg.count;
    }
    map->shard_elems = packed;
}

static inline void zero_shard_map_free(ZeroShardMap* map) {
    free(map->slices);
    free(map->chunk);
    free(map->ranges);
    memset(map, 0, sizeof(*map));
}

// The gradient-norm partial of rank r sums the squares of ranges[0, this) in order: its chunks,
// and on rank 0 the tails too (they are replicated, so exactly one rank counts them).
static inline int zero_shard_norm_ranges(const ZeroShardMap* map) {
    return map->rank == 0 ? map->num_ranges : map->num_chunk_ranges;
}

static inline size_t zero_shard_tail_elems(const ZeroShardMap* map) {
    size_t t = 0;
    for (int i = map->num_chunk_ranges; i < map->num_ranges; i++) t += map->ranges[i].count;
    return t;
}

// packed[shard_offset + j] = full[offset + j] over rank r's ranges
static inline void zero_shard_pack(const ZeroShardMap* map, const float* full, float* packed) {
    for (int i = 0; i < map->num_ranges; i++) {
        const ZeroRange* rg = &map->ranges[i];
        memcpy(packed + rg->shard_offset, full + rg->offset, rg->count * sizeof(float));
    }
}

// full[offset + j] = packed[shard_offset + j] over rank r's ranges; other elements untouched
static inline void zero_shard_unpack(const ZeroShardMap* map, const float* packed, float* full) {
    for (int i = 0; i < map->num_ranges; i++) {
        const ZeroRange* rg = &map->ranges[i];
        memcpy(full + rg->offset, packed + rg->shard_offset, rg->count * sizeof(float));
    }
}

// The update table: the shard's AdamW is one launch whose blocks each cover block_elems elements
// of one range (llmc/zero.cuh). Row i is ranges[i] of the map, in map order, with the blocks
// [first_block, first_block + ceil(count / block_elems)): the rows' first blocks increase strictly,
// so a block finds its row by binary search. decay is param_is_decayed(tensor) of the range.
typedef struct {
    size_t offset;        // flat element offset (ZeroRange.offset)
    size_t shard_offset;  // packed offset (ZeroRange.shard_offset)
    size_t count;         // elements (> 0)
    int first_block;      // the launch's first block on this range
    int decay;            // 1: the range gets weight decay
} ZeroUpdateRange;

// Fills table[0, map->num_ranges); returns the launch's number of blocks. Exits with a message
// when block_elems is 0 or the blocks would not fit a grid (2^31 - 1).
static inline int zero_shard_update_table(const ZeroShardMap* map, size_t block_elems, ZeroUpdateRange* table) {
    if (block_elems == 0) {
        fprintf(stderr, "zero_shard_update_table: 0 elements per block\n");
        exit(EXIT_FAILURE);
    }
    size_t blocks = 0;
    for (int i = 0; i < map->num_ranges; i++) {
        const ZeroRange* rg = &map->ranges[i];
        ZeroUpdateRange row = {rg->offset, rg->shard_offset, rg->count, (int)blocks, param_is_decayed(rg->tensor)};
        table[i] = row;
        blocks += (rg->count + block_elems - 1) / block_elems;
        if (blocks > 2147483647u) {
            fprintf(stderr, "zero_shard_update_table: %zu elements need more than 2^31 - 1 blocks of %zu\n",
                    map->shard_elems, block_elems);
            exit(EXIT_FAILURE);
        }
    }
    return (int)blocks;
}

// The row of the table (num_ranges >= 1 rows of zero_shard_update_table) that block `block` of the
// launch updates: the last row whose first block is <= block (binary search; the first blocks
// increase strictly). The block's thread t then takes quad (block - first_block) * threads + t.
ZERO_SHARD_HD static inline int zero_update_row_of(const ZeroUpdateRange* table, int num_ranges, int block) {
    int lo = 0, hi = num_ranges - 1;
    while (lo < hi) {
        int mid = lo + (hi - lo + 1) / 2;
        if (table[mid].first_block <= block) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

#endif  // OMNIMOE_ZERO_SHARD_H
