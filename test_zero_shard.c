/*
 * test_zero_shard.c - tests of the ZeRO-1 partition map (llmc/zero_shard.h) and the gradient
 * bucket slices it is built from (llmc/grad_slices.h). Shapes only, no model data, so d12 with
 * a million experts (19.5B parameters) is checked as cheaply as the tiny models.
 *
 * For many configurations (presets tiny .. d48, the three FFN kinds, d12 at N = 16,384 and
 * 1,048,576, the test sizes, and odd shapes whose slices are not multiples of 8) and P = 1..8:
 *   slices     the bucket slices tile the parameters exactly once, in bucket order
 *   tiling     the owned chunks of all P ranks plus the tails (once) tile [0, num_params) exactly
 *              once; every range lies in one slice of one tensor
 *   chunks     q = floor(c/(8P))*8: a multiple of 8, rank r at slice + r*q, tail < 8P
 *   packing    each rank's ranges are packed contiguously from 0, chunks first, tails identical on
 *              every rank, shard_elems equal on every rank
 *   alignment  with 8-aligned slices (every GPU model): every flat and packed offset is a
 *              multiple of 8 elements (16 bytes in bf16)
 *   d12 tails  empty exactly for P in {1, 2, 3, 4, 6, 8} (768 = 2^8 * 3)
 *   roundtrip  pack -> unpack over all ranks restores random full buffers bitwise
 *   update     the one-launch AdamW's table (zero_shard_update_table) for several block sizes:
 *              one row per range in map order (offset, packed offset, count), the weight decay
 *              of the range's tensor, first blocks from 0 with ceil(count / block) blocks each,
 *              so the blocks cover every element of every range exactly once
 *   launch     the one-launch AdamW as llmc/zero.cuh's kernel runs it, on the host: every block
 *              finds its row (zero_update_row_of), each of its block_elems/4 threads takes one quad;
 *              every packed element of every rank's shard is updated exactly once, no block idles
 *              (the 8-aligned shards that zero_init accepts, up to 2^24 elements)
 */
#include "llmc/test_harness.h"
#include "llmc/zero_shard.h"

typedef struct {
    size_t offset, count;
} Span;

static int compare_spans(const void* a, const void* b) {
    size_t x = ((const Span*)a)->offset, y = ((const Span*)b)->offset;
    return x < y ? -1 : (x > y ? 1 : 0);
}

// 1 when the spans, sorted, cover [0, total) exactly once (no gap, no overlap)
static int spans_tile(Span* spans, size_t n, size_t total) {
    qsort(spans, n, sizeof(Span), compare_spans);
    size_t end = 0;
    for (size_t i = 0; i < n; i++) {
        if (spans[i].offset != end || spans[i].count == 0) return 0;
        end += spans[i].count;
    }
    return end == total;
}

// every check of one (config, P); returns the number of problems, printing the first
static int check_maps(const ModelConfig* c, int P, const char* label) {
    size_t sizes[NUM_PARAMETER_TENSORS], toff[NUM_PARAMETER_TENSORS], off = 0;
    model_config_param_sizes(c, sizes);
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) { toff[i] = off; off += sizes[i]; }
    size_t num_params = off;
    ZeroShardMap* maps = (ZeroShardMap*)calloc(P, sizeof(ZeroShardMap));
    for (int r = 0; r < P; r++) zero_shard_map(&maps[r], c, P, r);
    int slices_aligned = 1;
    for (int s = 0; s < maps[0].num_slices; s++) {
        slices_aligned &= maps[0].slices[s].offset % 8 == 0 && maps[0].slices[s].count % 8 == 0;
    }
    Span* spans = (Span*)malloc((size_t)(P + 1) * maps[0].num_ranges * sizeof(Span) + sizeof(Span));
    size_t num_spans = 0;
    int bad = 0;
    char why[256] = "";
#define PROBLEM(...) do { if (!bad++) snprintf(why, sizeof(why), __VA_ARGS__); } while (0)
    for (int r = 0; r < P; r++) {
        const ZeroShardMap* m = &maps[r];
        if (m->shard_elems != maps[0].shard_elems) PROBLEM("rank %d holds %zu elements, rank 0 %zu", r, m->shard_elems, maps[0].shard_elems);
        if (m->num_params != num_params) PROBLEM("num_params %zu != %zu", m->num_params, num_params);
        size_t packed = 0;
        int last_slice = -1, in_tails = 0;
        for (int i = 0; i < m->num_ranges; i++) {
            const ZeroRange* rg = &m->ranges[i];
            const GradSlice* sl = &m->slices[rg->slice];
            size_t q = m->chunk[rg->slice];
            if (rg->shard_offset != packed) PROBLEM("rank %d range %d packed at %zu, expected %zu", r, i, rg->shard_offset, packed);
            packed += rg->count;
            if (rg->count == 0) PROBLEM("rank %d range %d is empty", r, i);
            if (rg->is_tail != (i >= m->num_chunk_ranges)) PROBLEM("rank %d range %d: chunks must come before tails", r, i);
            if (rg->is_tail && !in_tails) { in_tails = 1; last_slice = -1; }
            if (rg->slice <= last_slice) PROBLEM("rank %d range %d: not in slice order", r, i);
            last_slice = rg->slice;
            if (rg->tensor != sl->tensor) PROBLEM("rank %d range %d: tensor %d, slice's %d", r, i, rg->tensor, sl->tensor);
            if (rg->offset < toff[rg->tensor] || rg->offset + rg->count > toff[rg->tensor] + sizes[rg->tensor]) {
                PROBLEM("rank %d range %d crosses tensor %s", r, i, param_tensor_name(rg->tensor));
            }
            if (q % 8 != 0 || q > sl->count / P || sl->count - (size_t)P * q >= 8 * (size_t)P) {
                PROBLEM("slice %d of %zu: chunk %zu", rg->slice, sl->count, q);
            }
            if (!rg->is_tail && (rg->offset != sl->offset + (size_t)r * q || rg->count != q)) {
                PROBLEM("rank %d range %d: chunk at %zu (+%zu), expected %zu (+%zu)", r, i, rg->offset, rg->count,
                        sl->offset + (size_t)r * q, q);
            }
            if (rg->is_tail && (rg->offset != sl->offset + (size_t)P * q || rg->offset + rg->count != sl->offset + sl->count)) {
                PROBLEM("rank %d range %d: tail [%zu, +%zu) is not the slice's end", r, i, rg->offset, rg->count);
            }
            if (rg->is_tail) {  // replicated: the same range at the same packed place on every rank
                const ZeroShardMap* m0 = &maps[0];
                int j = i - m->num_chunk_ranges + m0->num_chunk_ranges;
                if (j >= m0->num_ranges || m0->ranges[j].offset != rg->offset || m0->ranges[j].count != rg->count ||
                    m0->ranges[j].shard_offset != rg->shard_offset) {
                    PROBLEM("rank %d range %d: tail differs from rank 0's", r, i);
                }
            }
            if (slices_aligned && (rg->offset % 8 != 0 || rg->shard_offset % 8 != 0 || rg->count % 8 != 0)) {
                PROBLEM("rank %d range %d not 8-aligned: offset %zu, packed %zu, count %zu", r, i, rg->offset,
                        rg->shard_offset, rg->count);
            }
            if (!rg->is_tail || r == 0) spans[num_spans++] = (Span){rg->offset, rg->count};
        }
        if (packed != m->shard_elems) PROBLEM("rank %d packs %zu elements, shard_elems %zu", r, packed, m->shard_elems);
        if (zero_shard_norm_ranges(m) != (r == 0 ? m->num_ranges : m->num_chunk_ranges)) PROBLEM("norm ranges of rank %d", r);
    }
    if (!spans_tile(spans, num_spans, num_params)) PROBLEM("chunks + tails do not tile the %zu parameters exactly once", num_params);
#undef PROBLEM
    if (bad) printf("  %s P=%d: %d problem(s), first: %s\n", label, P, bad, why);
    free(spans);
    for (int r = 0; r < P; r++) zero_shard_map_free(&maps[r]);
    free(maps);
    return bad;
}

// the update table of every rank against its map; returns the number of problems, printing the first
static int check_update_table(const ModelConfig* c, int P, size_t block_elems, const char* label) {
    int bad = 0;
    char why[256] = "";
#define PROBLEM(...) do { if (!bad++) snprintf(why, sizeof(why), __VA_ARGS__); } while (0)
    for (int r = 0; r < P; r++) {
        ZeroShardMap m;
        zero_shard_map(&m, c, P, r);
        ZeroUpdateRange* table = (ZeroUpdateRange*)malloc_check((m.num_ranges + 1) * sizeof(ZeroUpdateRange));
        int blocks = zero_shard_update_table(&m, block_elems, table);
        size_t next_block = 0, covered = 0;
        for (int i = 0; i < m.num_ranges; i++) {
            const ZeroRange* rg = &m.ranges[i];
            const ZeroUpdateRange* row = &table[i];
            if (row->offset != rg->offset || row->shard_offset != rg->shard_offset || row->count != rg->count) {
                PROBLEM("rank %d row %d: [%zu +%zu] packed %zu, range [%zu +%zu] packed %zu", r, i, row->offset,
                        row->count, row->shard_offset, rg->offset, rg->count, rg->shard_offset);
            }
            if (row->decay != param_is_decayed(rg->tensor)) {
                PROBLEM("rank %d row %d (%s): decay %d", r, i, param_tensor_name(rg->tensor), row->decay);
            }
            if ((size_t)row->first_block != next_block) {
                PROBLEM("rank %d row %d: first block %d, expected %zu", r, i, row->first_block, next_block);
            }
            size_t n = i + 1 < m.num_ranges ? (size_t)table[i + 1].first_block - row->first_block
                                            : (size_t)blocks - row->first_block;
            // the row's blocks hold every element once: n blocks, the last one not empty
            if (n * block_elems < row->count || (n - 1) * block_elems >= row->count) {
                PROBLEM("rank %d row %d: %zu blocks of %zu for %zu elements", r, i, n, block_elems, row->count);
            }
            next_block += (rg->count + block_elems - 1) / block_elems;
            covered += row->count;
        }
        if ((size_t)blocks != next_block) PROBLEM("rank %d: %d blocks, rows need %zu", r, blocks, next_block);
        if (covered != m.shard_elems) PROBLEM("rank %d: rows cover %zu of %zu elements", r, covered, m.shard_elems);
        free(table);
        zero_shard_map_free(&m);
    }
#undef PROBLEM
    if (bad) printf("  %s P=%d block %zu: %d problem(s), first: %s\n", label, P, block_elems, bad, why);
    return bad;
}

// zero_adamw_kernel's blocks and threads over every rank's update table, simulated; returns the
// number of problems, printing the first. 8-aligned shards of up to 2^24 elements (else 0, skipped).
static int check_update_launch(const ModelConfig* c, int P, size_t block_elems, const char* label, int* simulated) {
    int bad = 0;
    char why[256] = "";
#define PROBLEM(...) do { if (!bad++) snprintf(why, sizeof(why), __VA_ARGS__); } while (0)
    const size_t threads = block_elems / 4;  // one quad per thread
    for (int r = 0; r < P; r++) {
        ZeroShardMap m;
        zero_shard_map(&m, c, P, r);
        int aligned = block_elems % 4 == 0 && m.num_ranges > 0;
        for (int i = 0; i < m.num_ranges; i++) {
            aligned &= m.ranges[i].offset % 8 == 0 && m.ranges[i].count % 8 == 0 && m.ranges[i].shard_offset % 8 == 0;
        }
        if (!aligned || m.shard_elems > ((size_t)1 << 24)) {
            zero_shard_map_free(&m);
            continue;
        }
        (*simulated)++;
        ZeroUpdateRange* table = (ZeroUpdateRange*)malloc_check((m.num_ranges + 1) * sizeof(ZeroUpdateRange));
        int blocks = zero_shard_update_table(&m, block_elems, table);
        unsigned char* hits = (unsigned char*)calloc(m.shard_elems, 1);
        for (int b = 0; b < blocks; b++) {
            int i = zero_update_row_of(table, m.num_ranges, b);
            if (i < 0 || i >= m.num_ranges || table[i].first_block > b ||
                (i + 1 < m.num_ranges && table[i + 1].first_block <= b)) {
                PROBLEM("rank %d block %d: row %d", r, b, i);
                continue;
            }
            const ZeroUpdateRange* row = &table[i];
            int active = 0;
            for (size_t t = 0; t < threads; t++) {
                size_t q = (size_t)(b - row->first_block) * threads + t;
                if (q >= row->count / 4) continue;  // the kernel's bound
                active = 1;
                for (int e = 0; e < 4; e++) {
                    size_t j = row->shard_offset + 4 * q + (size_t)e;
                    if (j < m.shard_elems && hits[j] < 255) hits[j]++;
                    else if (j >= m.shard_elems) PROBLEM("rank %d block %d: packed element %zu past the shard", r, b, j);
                }
            }
            if (!active) PROBLEM("rank %d block %d (row %d): no thread has a quad", r, b, i);
        }
        for (size_t j = 0; j < m.shard_elems; j++) {
            if (hits[j] != 1) {
                PROBLEM("rank %d: packed element %zu updated %d times", r, j, hits[j]);
                break;
            }
        }
        free(hits);
        free(table);
        zero_shard_map_free(&m);
    }
#undef PROBLEM
    if (bad) printf("  %s P=%d block %zu: %d problem(s), first: %s\n", label, P, block_elems, bad, why);
    return bad;
}

static size_t total_tail_elems(const ModelConfig* c, int P) {
    ZeroShardMap m;
    zero_shard_map(&m, c, P, 0);
    size_t t = zero_shard_tail_elems(&m);
    zero_shard_map_free(&m);
    return t;
}

// pack every rank's share of random full buffers, unpack them into a NaN-filled buffer: bitwise equal
static int roundtrip(const ModelConfig* c, int P, uint64_t seed) {
    size_t n = model_config_num_params(c);
    float* full = (float*)malloc_check(((n) > 0 ? (n) : 1) * sizeof(float));
    float* back = (float*)malloc_check(((n) > 0 ? (n) : 1) * sizeof(float));
    Rng rng = rng_seeded(seed);
    fill_normal(full, n, 0.0f, 1.0f, &rng);
    for (size_t i = 0; i < n; i++) back[i] = NAN;
    for (int r = 0; r < P; r++) {
        ZeroShardMap m;
        zero_shard_map(&m, c, P, r);
        float* packed = (float*)malloc_check(((m.shard_elems) > 0 ? (m.shard_elems) : 1) * sizeof(float));
        zero_shard_pack(&m, full, packed);
        zero_shard_unpack(&m, packed, back);
        free(packed);
        zero_shard_map_free(&m);
    }
    int ok = memcmp(full, back, n * sizeof(float)) == 0;
    free(full);
    free(back);
    return ok;
}

int main(void) {
    test_begin("test_zero_shard");
    ModelConfig configs[32];
    const char* labels[32];
    int nc = 0;
    const char* presets[] = {"tiny", "small", "d6", "d12", "d24", "d48"};
    for (int p = 0; p < 6; p++) {
        for (int kind = FFN_GELU; kind <= FFN_OMNI; kind++) {
            if (p >= 4 && kind != FFN_OMNI) continue;
            model_config_preset(&configs[nc], presets[p], kind);
            static char names[32][48];
            snprintf(names[nc], sizeof(names[nc]), "%s %s", presets[p], ffn_kind_name(kind));
            labels[nc] = names[nc];
            nc++;
        }
    }
    ModelConfig d12;
    model_config_preset(&d12, "d12", FFN_OMNI);
    configs[nc] = d12; model_config_set_experts(&configs[nc], 16384, 32); labels[nc++] = "d12 N=16384";
    configs[nc] = d12; model_config_set_experts(&configs[nc], 1048576, 32); labels[nc++] = "d12 N=1048576";
    configs[nc] = test_config(TEST_DIMS_TINY, FFN_OMNI, 4, 3, ROUTER_NORM_BN, GATE_SOFTMAX); labels[nc++] = "test tiny omni";
    configs[nc] = test_config(TEST_DIMS_SMALL, FFN_GELU, 0, 0, ROUTER_NORM_BN, GATE_SOFTMAX); labels[nc++] = "test small gelu";
    configs[nc] = test_config(TEST_DIMS_GPU, FFN_OMNI, 8, 4, ROUTER_NORM_BN, GATE_SOFTMAX); labels[nc++] = "test gpu omni";
    // odd shapes: slices that are not multiples of 8 (CPU-only models), tiny slices (q = 0)
    TestDims odd = {7, 29, 31, 3, 3, 9, 36, 15};
    configs[nc] = test_config(odd, FFN_OMNI, 3, 2, ROUTER_NORM_BN, GATE_SOFTMAX); labels[nc++] = "odd omni C=9";
    configs[nc] = test_config(odd, FFN_GELU, 0, 0, ROUTER_NORM_BN, GATE_SOFTMAX); labels[nc++] = "odd gelu C=9";

    // the bucket slices the CUDA reducer uses: tile the parameters, buckets in launch order
    int slice_problems = 0;
    for (int i = 0; i < nc; i++) {
        GradSlice* s = (GradSlice*)malloc(grad_slices_max(&configs[i]) * sizeof(GradSlice));
        int n = grad_slices_build(&configs[i], s);
        int ok = grad_slices_check_tiling(s, n, model_config_num_params(&configs[i]));
        for (int j = 1; j < n; j++) ok &= s[j].bucket >= s[j - 1].bucket;
        ok &= n > 0 && s[0].bucket == 0 && s[n - 1].bucket == grad_slices_num_buckets(&configs[i]) - 1;
        if (!ok) { slice_problems++; printf("  %s: bucket slices wrong\n", labels[i]); }
        free(s);
    }
    test_checkf(slice_problems == 0, "slices tile the parameters in bucket order", "%d configs", nc);
    // a deliberate overlap must be refused by the tiling check (the check can fail)
    {
        GradSlice s[64];
        int n = grad_slices_build(&configs[0], s);
        s[1].count += 8;
        test_check(!grad_slices_check_tiling(s, n, model_config_num_params(&configs[0])), "tiling check refuses an overlap");
    }

    int problems = 0, cases = 0;
    for (int i = 0; i < nc; i++) {
        for (int P = 1; P <= 8; P++) {
            problems += check_maps(&configs[i], P, labels[i]) != 0;
            cases++;
        }
    }
    test_checkf(problems == 0, "maps: tiling, chunks, packing, tails, alignment", "%d of %d (config, P) cases wrong",
                problems, cases);

    // the one-launch AdamW table: the kernel's block (2048), a small one (many blocks per range), an odd one
    const size_t block_sizes[] = {2048, 8, 24, 1000};
    int table_problems = 0, table_cases = 0;
    for (int i = 0; i < nc; i++) {
        for (int P = 1; P <= 8; P++) {
            for (int b = 0; b < 4; b++) {
                // d12 at N = 1,048,576 (19.5B parameters) needs more than a grid of blocks of 8
                if (block_sizes[b] < 24 && model_config_num_params(&configs[i]) > ((size_t)1 << 30)) continue;
                table_cases++;
                table_problems += check_update_table(&configs[i], P, block_sizes[b], labels[i]) != 0;
            }
        }
    }
    test_checkf(table_problems == 0, "update table: rows, decay, blocks cover every range once", "%d of %d cases wrong",
                table_problems, table_cases);
    int launch_problems = 0, launch_cases = 0, simulated = 0;
    for (int i = 0; i < nc; i++) {
        for (int P = 1; P <= 8; P++) {
            for (int b = 0; b < 4; b++) {
                launch_cases++;
                launch_problems += check_update_launch(&configs[i], P, block_sizes[b], labels[i], &simulated) != 0;
            }
        }
    }
    test_checkf(launch_problems == 0 && simulated > 100, "update launch: each block finds its row, every element once",
                "%d of %d cases wrong, %d rank shards simulated", launch_problems, launch_cases, simulated);

    // the tails at d12 (C = 768 = 2^8 * 3): empty when 8P divides every slice
    for (int P = 1; P <= 8; P++) {
        size_t tails = total_tail_elems(&d12, P);
        int expect_empty = P == 1 || P == 2 || P == 3 || P == 4 || P == 6 || P == 8;
        test_checkf((tails == 0) == expect_empty, "d12 tails", "P=%d: %zu tail elements", P, tails);
    }
    // the odd model has tails and empty chunks at P=8, and still tiles (checked above)
    test_checkf(total_tail_elems(&configs[nc - 2], 3) > 0, "odd model has tails", "P=3");

    for (int P = 1; P <= 8; P++) {
        test_checkf(roundtrip(&configs[nc - 3], P, 100 + P) && roundtrip(&configs[nc - 2], P, 200 + P),
                    "pack/unpack roundtrip bitwise", "P=%d", P);
    }
    return test_end();
}
