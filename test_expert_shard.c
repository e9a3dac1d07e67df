/*
 * test_expert_shard.c - the column-sharded expert tables (docs/sharding.md §3.1, llmc/expert_shard.h)
 * with P simulated ranks in one process, no GPU needed.
 *
 *   map_*        the column map is a bijection channel <-> (rank, packed column), for many C, P
 *   pack_*       pack/unpack of (rows, C) tables to/from the P slices: round trip bitwise, every
 *                slice entry checked against the map, unpack touches only its rank's columns
 *   tables_*     a rank's share of U and V of a flat parameter buffer (the checkpoint part order)
 *   dot_*        the rank partial dot products combined in the fixed tree equal the unsharded
 *                GPU lane order bitwise for P | 32 (and the test can tell a wrong tree apart)
 *
 * Prints PASS/FAIL lines and the closing line (llmc/test_harness.h).
 * Build: gcc -O2 -Wall -Wextra -std=c11 -fopenmp test_expert_shard.c -lm
 */
#define TESTING
#include "train_omnimoe.c"
#include "llmc/test_harness.h"
#include "llmc/expert_shard.h"

static float* floats(size_t n) { return (float*)malloc_check((n > 0 ? n : 1) * sizeof(float)); }

// ----------------------------------------------------------------------------
// the maps

static void test_unfit(void) {
    int ok = expert_shard_unfit(768, 1) == NULL && expert_shard_unfit(768, 2) == NULL &&
             expert_shard_unfit(768, 3) == NULL && expert_shard_unfit(768, 4) == NULL &&
             expert_shard_unfit(768, 8) == NULL && expert_shard_unfit(768, 96) == NULL &&
             expert_shard_unfit(768, 5) != NULL && expert_shard_unfit(768, 64) != NULL &&
             expert_shard_unfit(768, 0) != NULL && expert_shard_unfit(12, 1) != NULL &&
             expert_shard_unfit(0, 1) != NULL && expert_shard_unfit(16, 2) == NULL && expert_shard_unfit(16, 4) != NULL;
    test_check(ok, "map_unfit: C/8 divisible by P, C a multiple of 8, P >= 1");
}

static void test_column_map(void) {
    int bad = 0, cases = 0;
    for (int C = 8; C <= 1024; C += 8) {
        for (int P = 1; P <= C / 8; P++) {
            if (expert_shard_unfit(C, P) != NULL) continue;
            cases++;
            const int cols = expert_shard_cols(C, P);
            int* seen = (int*)calloc_check((size_t)C, sizeof(int));
            for (int c = 0; c < C; c++) {
                int r = expert_shard_rank_of(c, P), j = expert_shard_packed_of(c, P);
                if (r < 0 || r >= P || j < 0 || j >= cols || expert_shard_channel(j, r, P) != c) bad++;
                if (((c / 8) % P) != r) bad++;  // the documented rule: vector v on rank v mod P
            }
            for (int r = 0; r < P; r++) {
                for (int j = 0; j < cols; j++) seen[expert_shard_channel(j, r, P)]++;
            }
            for (int c = 0; c < C; c++) bad += seen[c] != 1;
            free(seen);
        }
    }
    test_checkf(bad == 0 && cases > 500, "map_bijection", "%d (C, P) cases, %d mismatches", cases, bad);
}

// ----------------------------------------------------------------------------
// pack / unpack

static void test_pack_roundtrip(void) {
    static const int Cs[] = {8, 16, 24, 64, 96, 128, 768, 1024};
    static const int Ns[] = {1, 3, 17, 64, 257};
    static const size_t elems[] = {4, 2};
    Rng rng = rng_seeded(1801);
    int cases = 0, bad_roundtrip = 0, bad_content = 0, bad_untouched = 0;
    for (size_t ci = 0; ci < sizeof(Cs) / sizeof(Cs[0]); ci++) {
        for (size_t ni = 0; ni < sizeof(Ns) / sizeof(Ns[0]); ni++) {
            for (size_t ei = 0; ei < 2; ei++) {
                const int C = Cs[ci], N = Ns[ni];
                const size_t elem = elems[ei], bytes = (size_t)N * C * elem;
                unsigned char* full = (unsigned char*)malloc_check(bytes);
                unsigned char* back = (unsigned char*)malloc_check(bytes);
                unsigned char* slice = (unsigned char*)malloc_check(bytes);
                for (size_t i = 0; i < bytes; i++) full[i] = (unsigned char)rng_u32(&rng);
                for (int P = 1; P <= C / 8; P++) {
                    if (expert_shard_unfit(C, P) != NULL) continue;
                    cases++;
                    const int cols = C / P;
                    memset(back, 0xA5, bytes);
                    for (int r = 0; r < P; r++) {
                        memset(slice, 0x5A, bytes);
                        expert_shard_pack(slice, full, elem, (size_t)N, C, P, r);
                        // every slice entry is full[row][channel(j, r)], element by element
                        for (int row = 0; row < N; row++) {
                            for (int j = 0; j < cols; j++) {
                                const unsigned char* s = slice + ((size_t)row * cols + j) * elem;
                                const unsigned char* f = full + ((size_t)row * C + expert_shard_channel(j, r, P)) * elem;
                                bad_content += memcmp(s, f, elem) != 0;
                            }
                        }
                        // the pack writes exactly (N, C/P) elements: the rest of slice is untouched
                        for (size_t i = (size_t)N * cols * elem; i < bytes; i++) bad_content += slice[i] != 0x5A;
                        expert_shard_unpack(back, slice, elem, (size_t)N, C, P, r);
                        if (r == 0 && P > 1) {  // after one rank: the other ranks' columns untouched
                            for (int row = 0; row < N; row++) {
                                for (int c = 0; c < C; c++) {
                                    if (expert_shard_rank_of(c, P) == 0) continue;
                                    const unsigned char* b = back + ((size_t)row * C + c) * elem;
                                    for (size_t i = 0; i < elem; i++) bad_untouched += b[i] != 0xA5;
                                }
                            }
                        }
                    }
                    bad_roundtrip += memcmp(back, full, bytes) != 0;
                }
                free(full);
                free(back);
                free(slice);
            }
        }
    }
    test_checkf(bad_roundtrip == 0 && cases > 100, "pack_roundtrip_bitwise", "%d (N, C, P, elem) cases, %d differ",
                cases, bad_roundtrip);
    test_checkf(bad_content == 0, "pack_content", "%d slice entries not at their mapped channel", bad_content);
    test_checkf(bad_untouched == 0, "pack_unpack_untouched", "%d bytes of other ranks' columns written",
                bad_untouched);
}

// a rank's share of U and V of a whole flat buffer: P shares rebuild exactly U and V, nothing else
static int tables_case(int C, int P, uint64_t seed) {
    ModelConfig cfg = test_config(TEST_DIMS_SMALL, FFN_OMNI, 4, 3, ROUTER_NORM_BN, GATE_SOFTMAX);
    cfg.channels = C;  // shapes only: the layout, not a model that runs
    size_t sizes[NUM_PARAMETER_TENSORS], total = 0, off_u = 0;
    model_config_param_sizes(&cfg, sizes);
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) total += sizes[i];
    for (int i = 0; i < PARAM_EXPERTU; i++) off_u += sizes[i];
    const size_t table = sizes[PARAM_EXPERTU] + sizes[PARAM_EXPERTV];
    const size_t elems = expert_shard_table_elems(&cfg, P);
    float* flat = floats(total);
    float* back = floats(total);
    float* part = floats(elems);
    Rng rng = rng_seeded(seed);
    fill_normal(flat, total, 0.0f, 1.0f, &rng);
    int bad = elems * (size_t)P != table;
    memcpy(back, flat, total * sizeof(float));
    for (size_t i = off_u; i < off_u + table; i++) back[i] = NAN;
    for (int r = 0; r < P; r++) {
        expert_shard_gather_tables(part, flat, &cfg, P, r);
        // U's slice first, then V's: spot entries against the map
        const size_t rows = sizes[PARAM_EXPERTU] / (size_t)C, j = (size_t)(C / P) - 1;
        bad += memcmp(&part[5 * (C / P) + 3], &flat[off_u + 5 * C + expert_shard_channel(3, r, P)], sizeof(float)) != 0;
        bad += memcmp(&part[rows * (C / P) + 7 * (C / P) + j],
                      &flat[off_u + sizes[PARAM_EXPERTU] + 7 * C + expert_shard_channel((int)j, r, P)], sizeof(float)) != 0;
        expert_shard_scatter_tables(back, part, &cfg, P, r);
    }
    bad += memcmp(back, flat, total * sizeof(float)) != 0;
    free(flat);
    free(back);
    free(part);
    return bad;
}

static void test_tables(void) {
    int bad = 0;
    bad += tables_case(32, 1, 1802) + tables_case(32, 2, 1803) + tables_case(32, 4, 1804);
    bad += tables_case(48, 3, 1805) + tables_case(48, 6, 1806);
    test_checkf(bad == 0, "tables_gather_scatter_bitwise", "small omni layout, C = 32 (P 1 2 4) and 48 (P 3 6): %d mismatches", bad);
}

// ----------------------------------------------------------------------------
// dot products: the rank partials in the tree against the GPU lane order

// the unsharded kernel's order written out on its own (llmc/experts.cuh, experts_dot_mem and
// warp_reduce_sum): lane L of 32 accumulates the vectors at channels L*8, L*8 + 256, ... with
// fmaf; then lane values are combined with xor offsets 16, 8, 4, 2, 1
static float warp_order_dot(const float* a, const float* b, int C) {
    float lane[32];
    for (int L = 0; L < 32; L++) {
        float acc = 0.0f;
        for (int c = L * 8; c < C; c += 32 * 8) {
            for (int i = 0; i < 8; i++) acc = fmaf(a[c + i], b[c + i], acc);
        }
        lane[L] = acc;
    }
    for (int offset = 16; offset > 0; offset /= 2) {
        float next[32];
        for (int L = 0; L < 32; L++) next[L] = lane[L] + lane[L ^ offset];
        memcpy(lane, next, sizeof(lane));
    }
    return lane[0];
}

// sharded dot of full rows a, b over P ranks: pack each rank's columns, partial, tree
static float sharded_dot(const float* a, const float* b, int C, int P, int wrong_tree) {
    float as[1024], bs[1024], partial[64] = {0.0f};
    for (int r = 0; r < P; r++) {
        expert_shard_pack(as, a, sizeof(float), 1, C, P, r);
        expert_shard_pack(bs, b, sizeof(float), 1, C, P, r);
        partial[r] = expert_shard_dot_partial(as, bs, C / P, P);
    }
    if (wrong_tree) {  // the rank-order sum a naive implementation would write
        float sum = partial[0];
        for (int r = 1; r < P; r++) sum += partial[r];
        return sum;
    }
    return expert_shard_tree_sum(partial, 1, P);
}

static void test_dot(void) {
    static const int Cs[] = {256, 512, 768, 1024};
    Rng rng = rng_seeded(1803);
    float a[1024], b[1024];
    int trials = 0, bad_p1 = 0, bad_pow2 = 0, naive_differs = 0, naive_trials = 0;
    double worst_p3 = 0.0;
    for (size_t ci = 0; ci < sizeof(Cs) / sizeof(Cs[0]); ci++) {
        const int C = Cs[ci];
        for (int trial = 0; trial < 50; trial++) {
            // magnitudes spread over a few decades, so that orders of summation round differently
            for (int c = 0; c < C; c++) {
                a[c] = rng_uniform(&rng, -1.0f, 1.0f) * exp2f((float)rng_int(&rng, 12) - 6.0f);
                b[c] = rng_uniform(&rng, -1.0f, 1.0f);
            }
            trials++;
            const float ref = warp_order_dot(a, b, C);
            bad_p1 += memcmp(&ref, &(float){sharded_dot(a, b, C, 1, 0)}, sizeof(float)) != 0;
            for (int P = 2; P <= 32; P *= 2) {
                if (expert_shard_unfit(C, P) != NULL) continue;
                float got = sharded_dot(a, b, C, P, 0);
                bad_pow2 += memcmp(&ref, &got, sizeof(float)) != 0;
                if (P >= 4) {
                    naive_trials++;
                    float naive = sharded_dot(a, b, C, P, 1);
                    naive_differs += memcmp(&ref, &naive, sizeof(float)) != 0;
                }
            }
            if (expert_shard_unfit(C, 3) == NULL) {
                double scale = 0.0;
                for (int c = 0; c < C; c++) scale += fabs((double)a[c] * b[c]);
                double err = fabs((double)sharded_dot(a, b, C, 3, 0) - (double)ref) / scale;
                if (err > worst_p3) worst_p3 = err;
            }
        }
    }
    test_checkf(bad_p1 == 0, "dot_p1_is_warp_order", "%d of %d trials differ", bad_p1, trials);
    test_checkf(bad_pow2 == 0, "dot_pow2_tree_bitwise", "P = 2..32 | C/8: %d of the trials differ", bad_pow2);
    // sensitivity: the rank-order sum is a different tree, and the data must show it
    test_checkf(naive_differs > naive_trials / 10, "dot_wrong_tree_detected",
                "the rank-order sum differs in %d of %d trials", naive_differs, naive_trials);
    // P = 3: another fixed order; any two orders of a C-term fp32 sum differ by at most
    // 2 C 2^-24 sum |a b| (the worst case; a lost or doubled partial is ~1/sqrt(C) of it)
    test_check_le("dot_p3_within_rounding", worst_p3, 2.0 * 1024 / 16777216.0);
}

int main(void) {
    test_begin("test_expert_shard");
    test_unfit();
    test_column_map();
    test_pack_roundtrip();
    test_tables();
    test_dot();
    return test_end();
}
