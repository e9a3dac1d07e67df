/*
 * test_expert_shard.c - the column-sharded expert tables (docs/sharding.md §3.1, llmc/expert_shard.h)
 * with P simulated ranks in one process, no GPU needed.
 *
 *   map_*        the column map is a bijection channel <-> (rank, packed column), for many C, P
 *   pack_*       pack/unpack of (rows, C) tables to/from the P slices: round trip bitwise, every
 *                slice entry checked against the map, unpack touches only its rank's columns
 *   tables_*     a rank's share of U and V of a flat parameter buffer (the checkpoint part order)
 *   reshard_*    slices of P2 ranks rebuilt from those of P1 (resume on another count), bitwise,
 *                reading only the old parts q = r2 (mod gcd(P1, P2))
 *   dot_*        the rank partial dot products combined in the fixed tree equal the unsharded
 *                GPU lane order bitwise for P | 32 (and the test can tell a wrong tree apart)
 *   layer_*      the OmniMoE expert branch, forward and backward, with P = 1, 2, 3, 4, 8
 *                simulated ranks exchanging only what docs/sharding.md §3.1 lists, against the
 *                unsharded CPU reference (train_omnimoe.c) on the concatenated batch: out, s, dx,
 *                dgate, dU, dV within 1e-5 (the dot products sum in the GPU's order, the
 *                reference left to right); bitwise against the unsharded run in the GPU's order
 *                for P | 32; and at P = 1 in the reference's own order, bitwise the reference
 *   bug_*        deliberate bugs (wrong column holder, dU/dV unscaled, rank-order sum) fail those
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

// global pair id (rank, local pair) and back, over the concatenated batch's pair order
static void test_pair_ids(void) {
    int bad = 0;
    const long long pairs = 6 * 4;  // BT = 6, k = 4
    long long expect = 0;
    for (int q = 0; q < 5; q++) {
        for (long long p = 0; p < pairs; p++, expect++) {
            long long g = expert_shard_pair_global(q, p, pairs);
            bad += g != expect || expert_shard_pair_owner(g, pairs) != q;
        }
    }
    test_checkf(bad == 0, "map_pair_ids", "%d mismatches", bad);
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

// re-sharding: every new slice built from the old slices equals the slice packed directly; old
// slices that are not needed are passed as NULL (a read of one would crash); the number of old
// parts read is P1 / gcd(P1, P2)
static int gcd_int(int a, int b) { return b == 0 ? a : gcd_int(b, a % b); }

static void test_reshard(void) {
    const int C = 192, N = 37;  // 24 vectors: P in {1, 2, 3, 4, 6, 8, 12, 24}
    const int Ps[] = {1, 2, 3, 4, 6, 8, 12, 24};
    const int nP = (int)(sizeof(Ps) / sizeof(Ps[0]));
    float* full = floats((size_t)N * C);
    float* want = floats((size_t)N * C);
    float* got = floats((size_t)N * C);
    Rng rng = rng_seeded(1807);
    fill_normal(full, (size_t)N * C, 0.0f, 1.0f, &rng);
    int cases = 0, bad = 0, bad_needs = 0;
    for (int a = 0; a < nP; a++) {
        const int P1 = Ps[a];
        float* old[24];
        for (int q = 0; q < P1; q++) {
            old[q] = floats((size_t)N * (C / P1));
            expert_shard_pack(old[q], full, sizeof(float), (size_t)N, C, P1, q);
        }
        for (int b = 0; b < nP; b++) {
            const int P2 = Ps[b];
            for (int r2 = 0; r2 < P2; r2++) {
                const void* given[24];
                int needed = 0;
                for (int q = 0; q < P1; q++) {
                    int need = expert_shard_reshard_needs(q, P1, r2, P2, C);
                    needed += need;
                    bad_needs += need != (q % gcd_int(P1, P2) == r2 % gcd_int(P1, P2));
                    given[q] = need ? old[q] : NULL;
                }
                bad_needs += needed != P1 / gcd_int(P1, P2);
                expert_shard_pack(want, full, sizeof(float), (size_t)N, C, P2, r2);
                memset(got, 0xFF, (size_t)N * C * sizeof(float));
                expert_shard_reshard(got, given, sizeof(float), (size_t)N, C, P1, r2, P2);
                bad += memcmp(got, want, (size_t)N * (C / P2) * sizeof(float)) != 0;
                cases++;
            }
        }
        for (int q = 0; q < P1; q++) free(old[q]);
    }
    test_checkf(bad == 0 && cases > 100, "reshard_bitwise", "%d (P1, P2, new rank) cases over P in 1..24, %d differ",
                cases, bad);
    test_checkf(bad_needs == 0, "reshard_reads_gcd_parts", "%d wrong part selections", bad_needs);
    free(full);
    free(want);
    free(got);
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

// ----------------------------------------------------------------------------
// the OmniMoE expert branch with P simulated ranks (docs/sharding.md §3.1)
//
// Each rank has its own BT tokens (x, the SwiGLU output it adds onto, dout, dx, idx, gate) and
// only its (N, C/P) column slices of U, V, dU and dV. Ranks exchange data ONLY through the two
// collectives below, which copy bytes exactly as NCCL would (all-gather; all-to-all as grouped
// send/recv), and in exactly the exchanges the design lists:
//   forward:  all-gather idx and gate; all-to-all of x columns; partial s to the owner (all-to-all),
//             tree sum there, all-gather of s; y columns back to the owner (all-to-all), added once
//   backward: all-to-all of dout columns; partial h to the owner, tree sum, dgate and ds there,
//             all-gather of ds; dx columns back to the owner, added once; dU, dV local (scaled)
// The column-local arithmetic (y, dx, dU, dV, gates) is written as the CPU reference's
// (train_omnimoe.c, omni_experts_forward/backward); the dot products s and h are either the GPU
// lane order (DOT_GPU, expert_shard_dot_partial) or the reference's left-to-right order over the
// rank's packed channels (DOT_SEQ: at P = 1 that is exactly the reference).

#define SIM_MAX_P 8
enum { DOT_GPU = 0, DOT_SEQ = 1 };
// deliberate bugs, to see the checks fail
enum { BUG_NONE = 0, BUG_WRONG_SLICE, BUG_RANK_ORDER_TREE, BUG_NO_SCALE };

typedef struct {
    int P, BT, C, k, N;       // BT tokens per rank
    int dot_mode, bug;
    float table_grad_scale;   // dU, dV scale: 1/P, the mean over ranks that ncclAvg gives the rest
} SimSetup;

typedef struct {
    // own tokens and pairs
    float *x, *out, *dout, *dx;         // (BT, C)
    int* idx;                            // (BT*k)
    float *gate, *s, *dgate, *h, *ds;   // (BT*k)
    // own column slices
    float *U, *V, *dU, *dV;             // (N, C/P)
    // received and kept between forward and backward
    int* idx_all;                        // (P*BT*k) global pair order
    float *gate_all, *s_all, *a_all, *ds_all;
    float *xcols, *dycols;              // (P*BT, C/P) every token's columns of this rank
    // the collectives' buffers and the owner's full-width scratch
    float *send, *recv, *full;
} SimRank;

// recv[q] = send[0] | send[1] | ... | send[P-1] (bytes each), for every rank q
static void sim_all_gather(void* const* recv, void* const* send, int P, size_t bytes) {
    for (int q = 0; q < P; q++) {
        for (int r = 0; r < P; r++) memcpy((char*)recv[q] + (size_t)r * bytes, send[r], bytes);
    }
}

// send[r] holds P blocks, block q for rank q; recv[q] gets block q of every rank, in rank order
static void sim_all_to_all(void* const* recv, void* const* send, int P, size_t block_bytes) {
    for (int q = 0; q < P; q++) {
        for (int r = 0; r < P; r++) {
            memcpy((char*)recv[q] + (size_t)r * block_bytes, (const char*)send[r] + (size_t)q * block_bytes, block_bytes);
        }
    }
}

// the collectives between fields of the ranks (field: offsetof(SimRank, buffer))
#define SIM_FIELD(f) offsetof(SimRank, f)
static void* sim_field(SimRank* rank, size_t field) { return *(void**)((char*)rank + field); }

static void sim_all_gather_fields(SimRank* R, int P, size_t send_field, size_t recv_field, size_t bytes) {
    void* send[SIM_MAX_P] = {NULL};
    void* recv[SIM_MAX_P] = {NULL};
    for (int r = 0; r < P; r++) { send[r] = sim_field(&R[r], send_field); recv[r] = sim_field(&R[r], recv_field); }
    sim_all_gather(recv, send, P, bytes);
}

static void sim_all_to_all_fields(SimRank* R, int P, size_t send_field, size_t recv_field, size_t block_bytes) {
    void* send[SIM_MAX_P] = {NULL};
    void* recv[SIM_MAX_P] = {NULL};
    for (int r = 0; r < P; r++) { send[r] = sim_field(&R[r], send_field); recv[r] = sim_field(&R[r], recv_field); }
    sim_all_to_all(recv, send, P, block_bytes);
}

static float sim_partial_dot(const float* a, const float* b, int n, const SimSetup* S) {
    if (S->dot_mode == DOT_GPU) return expert_shard_dot_partial(a, b, n, S->P);
    float dot = 0.0f;
    for (int i = 0; i < n; i++) dot += a[i] * b[i];
    return dot;
}

// the owner's sum of the P partials of its pair p (recv: P blocks of BT*k)
static float sim_combine(const float* recv, int p, int pairs, const SimSetup* S) {
    if (S->bug == BUG_RANK_ORDER_TREE) {
        float sum = recv[p];
        for (int q = 1; q < S->P; q++) sum += recv[(size_t)q * pairs + p];
        return sum;
    }
    return expert_shard_tree_sum(recv + p, (size_t)pairs, S->P);
}

// all-to-all of a (BT, C) token tensor's columns: rank q gets every token's columns of q, in
// global token order, into cols_out (P*BT, C/P) = each rank's field at byte offset `field`
static void sim_columns_to_holders(SimRank* R, const SimSetup* S, size_t src_field, size_t dst_field) {
    const int P = S->P, BT = S->BT, C = S->C, cols = C / P;
    for (int r = 0; r < P; r++) {
        const float* src = (const float*)sim_field(&R[r], src_field);
        for (int q = 0; q < P; q++) {
            int holder = S->bug == BUG_WRONG_SLICE ? (q + 1) % P : q;
            expert_shard_pack(R[r].send + (size_t)q * BT * cols, src, sizeof(float), (size_t)BT, C, P, holder);
        }
    }
    sim_all_to_all_fields(R, P, SIM_FIELD(send), dst_field, (size_t)BT * cols * sizeof(float));
}

// partial dots of all pairs over the holder's columns, to the owner, tree-summed into dst_field
static void sim_pair_dots(SimRank* R, const SimSetup* S, int use_v, size_t dst_field) {
    const int P = S->P, BT = S->BT, k = S->k, cols = S->C / P, pairs = BT * k;
    for (int q = 0; q < P; q++) {
        const float* table = use_v ? R[q].V : R[q].U;
        const float* tok = use_v ? R[q].dycols : R[q].xcols;
        for (int owner = 0; owner < P; owner++) {  // block `owner` of the send buffer: its pairs
            for (int p = 0; p < pairs; p++) {
                long long g = expert_shard_pair_global(owner, p, pairs);
                R[q].send[g] = sim_partial_dot(table + (size_t)R[q].idx_all[g] * cols, tok + (size_t)(g / k) * cols, cols, S);
            }
        }
    }
    sim_all_to_all_fields(R, P, SIM_FIELD(send), SIM_FIELD(recv), (size_t)pairs * sizeof(float));
    for (int r = 0; r < P; r++) {
        float* dst = (float*)sim_field(&R[r], dst_field);
        for (int p = 0; p < pairs; p++) dst[p] = sim_combine(R[r].recv, p, pairs, S);
    }
}

// per token: sum over m of coef(pair) * row(expert) on the holder's columns, from 0; back to the
// owner, which adds the full row onto dst_field once per element
static void sim_token_sums(SimRank* R, const SimSetup* S, int use_v, size_t dst_field) {
    const int P = S->P, BT = S->BT, C = S->C, k = S->k, cols = C / P;
    for (int q = 0; q < P; q++) {
        const float* table = use_v ? R[q].V : R[q].U;
        const float* coef = use_v ? R[q].a_all : R[q].ds_all;
        float* acc = R[q].send;  // (P*BT, cols): block r = rank r's tokens
        for (size_t i = 0; i < (size_t)P * BT * cols; i++) acc[i] = 0.0f;
        for (int t = 0; t < P * BT; t++) {
            float* o = acc + (size_t)t * cols;
            for (int m = 0; m < k; m++) {
                size_t g = (size_t)t * k + m;
                const float* row = table + (size_t)R[q].idx_all[g] * cols;
                for (int j = 0; j < cols; j++) o[j] += coef[g] * row[j];
            }
        }
    }
    sim_all_to_all_fields(R, P, SIM_FIELD(send), SIM_FIELD(recv), (size_t)BT * cols * sizeof(float));
    for (int r = 0; r < P; r++) {
        float* dst = (float*)sim_field(&R[r], dst_field);
        for (int q = 0; q < P; q++) {
            expert_shard_unpack(R[r].full, R[r].recv + (size_t)q * BT * cols, sizeof(float), (size_t)BT, C, P, q);
        }
        for (size_t i = 0; i < (size_t)BT * C; i++) dst[i] += R[r].full[i];
    }
}

static void sim_forward(SimRank* R, const SimSetup* S) {
    const int P = S->P, pairs = S->BT * S->k;
    sim_all_gather_fields(R, P, SIM_FIELD(idx), SIM_FIELD(idx_all), (size_t)pairs * sizeof(int));
    sim_all_gather_fields(R, P, SIM_FIELD(gate), SIM_FIELD(gate_all), (size_t)pairs * sizeof(float));
    sim_columns_to_holders(R, S, SIM_FIELD(x), SIM_FIELD(xcols));
    sim_pair_dots(R, S, 0, SIM_FIELD(s));
    sim_all_gather_fields(R, P, SIM_FIELD(s), SIM_FIELD(s_all), (size_t)pairs * sizeof(float));
    for (int r = 0; r < P; r++) {  // a = g SiLU(s) for every pair, on every rank
        for (size_t g = 0; g < (size_t)P * pairs; g++) R[r].a_all[g] = R[r].gate_all[g] * siluf(R[r].s_all[g]);
    }
    sim_token_sums(R, S, 1, SIM_FIELD(out));
}

static void sim_backward(SimRank* R, const SimSetup* S) {
    const int P = S->P, BT = S->BT, k = S->k, N = S->N, cols = S->C / P, pairs = BT * k;
    sim_columns_to_holders(R, S, SIM_FIELD(dout), SIM_FIELD(dycols));
    sim_pair_dots(R, S, 1, SIM_FIELD(h));
    for (int r = 0; r < P; r++) {  // on the owner, as the reference writes them
        for (int p = 0; p < pairs; p++) {
            float h = R[r].h[p], s = R[r].s[p];
            R[r].dgate[p] = h * siluf(s);
            R[r].ds[p] = h * R[r].gate[p] * silu_gradf(s);
        }
    }
    sim_all_gather_fields(R, P, SIM_FIELD(ds), SIM_FIELD(ds_all), (size_t)pairs * sizeof(float));
    sim_token_sums(R, S, 0, SIM_FIELD(dx));
    // dU, dV: local. The pairs of all ranks grouped by expert, stable in global pair order (the
    // reference's order on the concatenated batch), each row summed in that order
    const int all = P * pairs;
    const float scale = S->bug == BUG_NO_SCALE ? 1.0f : S->table_grad_scale;
    int* offsets = (int*)calloc_check((size_t)N + 1, sizeof(int));
    int* list = (int*)malloc_check((size_t)all * sizeof(int));
    for (int q = 0; q < P; q++) {
        const int* idx = R[q].idx_all;
        for (int e = 0; e <= N; e++) offsets[e] = 0;
        for (int g = 0; g < all; g++) offsets[idx[g] + 1]++;
        for (int e = 0; e < N; e++) offsets[e + 1] += offsets[e];
        int* fill = (int*)malloc_check((size_t)N * sizeof(int));
        memcpy(fill, offsets, (size_t)N * sizeof(int));
        for (int g = 0; g < all; g++) list[fill[idx[g]]++] = g;
        free(fill);
        for (int e = 0; e < N; e++) {
            float* du = R[q].dU + (size_t)e * cols;
            float* dv = R[q].dV + (size_t)e * cols;
            for (int i = offsets[e]; i < offsets[e + 1]; i++) {
                const int g = list[i];
                const float cu = R[q].ds_all[g] * scale, cv = R[q].a_all[g] * scale;
                const float* xr = R[q].xcols + (size_t)(g / k) * cols;
                const float* dy = R[q].dycols + (size_t)(g / k) * cols;
                for (int j = 0; j < cols; j++) {
                    du[j] += cu * xr[j];
                    dv[j] += cv * dy[j];
                }
            }
        }
    }
    free(offsets);
    free(list);
}

// ----------------------------------------------------------------------------
// one layer's data for the whole batch (P*BT tokens), random, and the runs on it

typedef struct {
    int T, C, k, N;  // T tokens: the concatenated batch of all ranks
    float *x, *out0, *dout, *dx0, *gate, *U, *V, *dU0, *dV0;
    int* idx;
} LayerData;

static LayerData layer_data(int tokens, int C, int k, int N, uint64_t seed) {
    LayerData d = {tokens, C, k, N, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL};
    const size_t T = (size_t)tokens;
    Rng rng = rng_seeded(seed);
    d.x = floats(T * C); fill_normal(d.x, T * C, 0.0f, 1.0f, &rng);
    d.out0 = floats(T * C); fill_normal(d.out0, T * C, 0.0f, 0.5f, &rng);
    d.dout = floats(T * C); fill_normal(d.dout, T * C, 0.0f, 1.0f, &rng);
    d.dx0 = floats(T * C); fill_normal(d.dx0, T * C, 0.0f, 0.5f, &rng);
    d.U = floats((size_t)N * C); fill_normal(d.U, (size_t)N * C, 0.0f, 1.0f / sqrtf((float)C), &rng);
    d.V = floats((size_t)N * C); fill_normal(d.V, (size_t)N * C, 0.0f, 0.3f, &rng);
    d.dU0 = floats((size_t)N * C); fill_normal(d.dU0, (size_t)N * C, 0.0f, 0.1f, &rng);
    d.dV0 = floats((size_t)N * C); fill_normal(d.dV0, (size_t)N * C, 0.0f, 0.1f, &rng);
    d.idx = (int*)malloc_check(T * k * sizeof(int));
    d.gate = floats(T * k);
    for (size_t t = 0; t < T; t++) {  // k distinct experts per token, a third of them from 4 hot ones
        int* id = d.idx + t * k;
        for (int m = 0; m < k; m++) {
            int e, dup;
            do {
                e = rng_int(&rng, 3) == 0 ? rng_int(&rng, 4) : rng_int(&rng, N);
                dup = 0;
                for (int j = 0; j < m; j++) dup |= id[j] == e;
            } while (dup);
            id[m] = e;
            d.gate[t * k + m] = rng_uniform(&rng, 0.05f, 1.0f);
        }
    }
    return d;
}

static void layer_data_free(LayerData* d) {
    free(d->x); free(d->out0); free(d->dout); free(d->dx0); free(d->gate); free(d->U); free(d->V);
    free(d->dU0); free(d->dV0); free(d->idx);
}

// the outputs of one run, for the whole batch
typedef struct {
    float *out, *s, *dx, *dgate, *dU, *dV;
} LayerOut;

static LayerOut layer_out_alloc(const LayerData* d) {
    const size_t T = (size_t)d->T, NC = (size_t)d->N * d->C;
    LayerOut o = {floats(T * d->C), floats(T * d->k), floats(T * d->C), floats(T * d->k), floats(NC), floats(NC)};
    return o;
}

static void layer_out_free(LayerOut* o) {
    free(o->out); free(o->s); free(o->dx); free(o->dgate); free(o->dU); free(o->dV);
}

// the unsharded CPU reference on the concatenated batch. The owner adds the expert sum onto the
// SwiGLU output (and dx) once, so the reference runs from zero and adds out0 (dx0) after; dU and
// dV are the gradient of the mean over ranks: dout scaled by table_grad_scale for them.
static LayerOut run_reference(const LayerData* d, float table_grad_scale) {
    const int T = d->T, C = d->C, k = d->k, N = d->N;
    LayerOut o = layer_out_alloc(d);
    float* a = floats((size_t)T * k);
    float* ds = floats((size_t)T * k);
    float* dgate2 = floats((size_t)T * k);
    float* dx2 = floats((size_t)T * C);
    float* dout_scaled = floats((size_t)T * C);
    int* offsets = (int*)malloc_check(((size_t)N + 1) * sizeof(int));
    int* list = (int*)malloc_check((size_t)T * k * sizeof(int));
    memset(o.out, 0, (size_t)T * C * sizeof(float));
    omni_experts_forward(o.out, o.s, a, d->x, d->idx, d->gate, d->U, d->V, T, C, k);
    for (size_t i = 0; i < (size_t)T * C; i++) o.out[i] = d->out0[i] + o.out[i];
    memset(o.dx, 0, (size_t)T * C * sizeof(float));
    memcpy(o.dU, d->dU0, (size_t)N * C * sizeof(float));  // this call's dU/dV are discarded
    memcpy(o.dV, d->dV0, (size_t)N * C * sizeof(float));
    omni_experts_backward(o.dx, o.dU, o.dV, o.dgate, ds, offsets, list, d->dout, d->x, d->idx, d->gate, o.s, a,
                          d->U, d->V, T, C, k, N);
    for (size_t i = 0; i < (size_t)T * C; i++) o.dx[i] = d->dx0[i] + o.dx[i];
    for (size_t i = 0; i < (size_t)T * C; i++) dout_scaled[i] = d->dout[i] * table_grad_scale;
    memcpy(o.dU, d->dU0, (size_t)N * C * sizeof(float));
    memcpy(o.dV, d->dV0, (size_t)N * C * sizeof(float));
    memset(dx2, 0, (size_t)T * C * sizeof(float));
    omni_experts_backward(dx2, o.dU, o.dV, dgate2, ds, offsets, list, dout_scaled, d->x, d->idx, d->gate, o.s, a,
                          d->U, d->V, T, C, k, N);
    free(a); free(ds); free(dgate2); free(dx2); free(dout_scaled); free(offsets); free(list);
    return o;
}

// the sharded run: the data split over P ranks (tokens by rank, tables by columns), forward and
// backward, then the outputs assembled back into whole-batch, whole-table form
static LayerOut run_sharded(const LayerData* d, int P, int dot_mode, int bug, float table_grad_scale) {
    const int BT = d->T / P, C = d->C, k = d->k, N = d->N, cols = C / P, pairs = BT * k;
    const size_t T = (size_t)d->T;
    SimSetup S = {P, BT, C, k, N, dot_mode, bug, table_grad_scale};
    SimRank R[SIM_MAX_P];
    const size_t work = (T * C > T * k ? T * C : T * k);  // largest exchange, per rank
    for (int r = 0; r < P; r++) {
        SimRank* q = &R[r];
        const size_t t0 = (size_t)r * BT;
        q->x = floats((size_t)BT * C); memcpy(q->x, d->x + t0 * C, (size_t)BT * C * sizeof(float));
        q->out = floats((size_t)BT * C); memcpy(q->out, d->out0 + t0 * C, (size_t)BT * C * sizeof(float));
        q->dout = floats((size_t)BT * C); memcpy(q->dout, d->dout + t0 * C, (size_t)BT * C * sizeof(float));
        q->dx = floats((size_t)BT * C); memcpy(q->dx, d->dx0 + t0 * C, (size_t)BT * C * sizeof(float));
        q->idx = (int*)malloc_check((size_t)pairs * sizeof(int)); memcpy(q->idx, d->idx + t0 * k, (size_t)pairs * sizeof(int));
        q->gate = floats(pairs); memcpy(q->gate, d->gate + t0 * k, (size_t)pairs * sizeof(float));
        q->s = floats(pairs); q->dgate = floats(pairs); q->h = floats(pairs); q->ds = floats(pairs);
        q->U = floats((size_t)N * cols); expert_shard_pack(q->U, d->U, sizeof(float), (size_t)N, C, P, r);
        q->V = floats((size_t)N * cols); expert_shard_pack(q->V, d->V, sizeof(float), (size_t)N, C, P, r);
        q->dU = floats((size_t)N * cols); expert_shard_pack(q->dU, d->dU0, sizeof(float), (size_t)N, C, P, r);
        q->dV = floats((size_t)N * cols); expert_shard_pack(q->dV, d->dV0, sizeof(float), (size_t)N, C, P, r);
        q->idx_all = (int*)malloc_check(T * k * sizeof(int));
        q->gate_all = floats(T * k); q->s_all = floats(T * k); q->a_all = floats(T * k); q->ds_all = floats(T * k);
        q->xcols = floats(T * cols); q->dycols = floats(T * cols);
        q->send = floats(work); q->recv = floats(work); q->full = floats((size_t)BT * C);
    }
    sim_forward(R, &S);
    sim_backward(R, &S);
    LayerOut o = layer_out_alloc(d);
    for (int r = 0; r < P; r++) {
        SimRank* q = &R[r];
        const size_t t0 = (size_t)r * BT;
        memcpy(o.out + t0 * C, q->out, (size_t)BT * C * sizeof(float));
        memcpy(o.dx + t0 * C, q->dx, (size_t)BT * C * sizeof(float));
        memcpy(o.s + t0 * k, q->s, (size_t)pairs * sizeof(float));
        memcpy(o.dgate + t0 * k, q->dgate, (size_t)pairs * sizeof(float));
        expert_shard_unpack(o.dU, q->dU, sizeof(float), (size_t)N, C, P, r);
        expert_shard_unpack(o.dV, q->dV, sizeof(float), (size_t)N, C, P, r);
        free(q->x); free(q->out); free(q->dout); free(q->dx); free(q->idx); free(q->gate);
        free(q->s); free(q->dgate); free(q->h); free(q->ds);
        free(q->U); free(q->V); free(q->dU); free(q->dV);
        free(q->idx_all); free(q->gate_all); free(q->s_all); free(q->a_all); free(q->ds_all);
        free(q->xcols); free(q->dycols); free(q->send); free(q->recv); free(q->full);
    }
    return o;
}

// comparisons over the six outputs
static const char* const OUT_NAMES[6] = {"out", "s", "dx", "dgate", "dU", "dV"};

static void layer_out_arrays(const LayerOut* o, const LayerData* d, const float* arr[6], size_t n[6]) {
    const size_t T = (size_t)d->T, NC = (size_t)d->N * d->C;
    arr[0] = o->out; arr[1] = o->s; arr[2] = o->dx; arr[3] = o->dgate; arr[4] = o->dU; arr[5] = o->dV;
    n[0] = T * d->C; n[1] = T * d->k; n[2] = T * d->C; n[3] = T * d->k; n[4] = NC; n[5] = NC;
}

// the worst relative L2 error over the six outputs (its name in *worst)
static double layer_rel_err(const LayerOut* got, const LayerOut* ref, const LayerData* d, const char** worst) {
    const float *a[6], *b[6];
    size_t n[6];
    layer_out_arrays(got, d, a, n);
    layer_out_arrays(ref, d, b, n);
    double max_rel = 0.0;
    *worst = OUT_NAMES[0];
    for (int i = 0; i < 6; i++) {
        double e = rel_err(a[i], b[i], n[i]).rel;
        if (!(e <= max_rel)) { max_rel = e; *worst = OUT_NAMES[i]; }  // NaN wins too
    }
    return max_rel;
}

// the outputs that differ in any bit ("" when none)
static void layer_bitwise_diff(char* outbuf, size_t size, const LayerOut* got, const LayerOut* ref, const LayerData* d) {
    const float *a[6], *b[6];
    size_t n[6];
    layer_out_arrays(got, d, a, n);
    layer_out_arrays(ref, d, b, n);
    outbuf[0] = '\0';
    for (int i = 0; i < 6; i++) {
        if (memcmp(a[i], b[i], n[i] * sizeof(float)) != 0) {
            strncat(outbuf, OUT_NAMES[i], size - strlen(outbuf) - 1);
            strncat(outbuf, " ", size - strlen(outbuf) - 1);
        }
    }
}

// Tolerance against the CPU reference: s and h are summed in another order (the GPU lane order
// against left to right), a few ulps of sum |u x| each; everything downstream follows with
// relative errors of the same size. 1e-5 relative L2 is ~100x what the data show and far below
// what a wrong column, pair or scale gives (>= 1e-2).
#define LAYER_TOL 1e-5

// one batch of `tokens` tokens (divisible by every P), split over each P in turn
static void test_layer(int C, int N, int k, int tokens, const int* Ps, int nP, uint64_t seed) {
    LayerData d = layer_data(tokens, C, k, N, seed);
    char name[128], diff[64];
    const char* worst = "";
    for (int i = 0; i < nP; i++) {
        const int P = Ps[i];
        const float scale = 1.0f / (float)P;
        LayerOut ref = run_reference(&d, scale);
        LayerOut got = run_sharded(&d, P, DOT_GPU, BUG_NONE, scale);
        double e = layer_rel_err(&got, &ref, &d, &worst);
        snprintf(name, sizeof(name), "layer_vs_reference_c%d_p%d", C, P);
        test_checkf(e <= LAYER_TOL, name, "worst rel L2 %.2e in %s (tol %.0e), %d tokens on %d ranks", e, worst,
                    LAYER_TOL, d.T, P);
        // against the unsharded run in the same (GPU) dot order: bitwise for P | 32
        LayerOut one = run_sharded(&d, 1, DOT_GPU, BUG_NONE, scale);
        snprintf(name, sizeof(name), "layer_vs_unsharded_gpu_order_c%d_p%d", C, P);
        if (expert_shard_lanes(P) * P == 32) {
            layer_bitwise_diff(diff, sizeof(diff), &got, &one, &d);
            test_checkf(diff[0] == '\0', name, "bitwise: %s", diff[0] ? diff : "all six outputs equal");
        } else {
            double e1 = layer_rel_err(&got, &one, &d, &worst);
            test_checkf(e1 <= LAYER_TOL, name, "P not a power of two: worst rel L2 %.2e in %s (tol %.0e)", e1, worst,
                        LAYER_TOL);
        }
        layer_out_free(&one);
        layer_out_free(&got);
        layer_out_free(&ref);
    }
    {   // P = 1 in the reference's own dot order is the reference, bit for bit: the column-local
        // arithmetic, the exchanges and the pair order of the simulation are the reference's
        LayerOut ref = run_reference(&d, 1.0f);
        LayerOut got = run_sharded(&d, 1, DOT_SEQ, BUG_NONE, 1.0f);
        layer_bitwise_diff(diff, sizeof(diff), &got, &ref, &d);
        snprintf(name, sizeof(name), "layer_seq_order_p1_is_reference_c%d", C);
        test_checkf(diff[0] == '\0', name, "bitwise: %s", diff[0] ? diff : "all six outputs equal");
        layer_out_free(&got);
        layer_out_free(&ref);
    }
    layer_data_free(&d);
}

// deliberate bugs must make the checks above fail
static void test_layer_bugs(void) {
    const int P = 4, C = 768;
    LayerData d = layer_data(P * 8, C, 8, 64, 1810);
    const float scale = 1.0f / P;
    LayerOut ref = run_reference(&d, scale);
    LayerOut one = run_sharded(&d, 1, DOT_GPU, BUG_NONE, scale);
    const char* worst = "";
    char diff[64];
    LayerOut bad = run_sharded(&d, P, DOT_GPU, BUG_WRONG_SLICE, scale);
    double e = layer_rel_err(&bad, &ref, &d, &worst);
    test_checkf(e > 100 * LAYER_TOL, "bug_wrong_slice_detected", "x and dout columns sent to the wrong holder: rel L2 %.2e in %s",
                e, worst);
    layer_out_free(&bad);
    bad = run_sharded(&d, P, DOT_GPU, BUG_NO_SCALE, scale);
    e = layer_rel_err(&bad, &ref, &d, &worst);
    test_checkf(e > 100 * LAYER_TOL, "bug_no_scale_detected", "dU, dV not scaled 1/P: rel L2 %.2e in %s", e, worst);
    layer_out_free(&bad);
    // the rank-order sum stays within rounding of the reference; only the bitwise check sees it
    bad = run_sharded(&d, P, DOT_GPU, BUG_RANK_ORDER_TREE, scale);
    layer_bitwise_diff(diff, sizeof(diff), &bad, &one, &d);
    e = layer_rel_err(&bad, &ref, &d, &worst);
    test_checkf(diff[0] != '\0' && e <= LAYER_TOL, "bug_rank_order_tree_detected",
                "differs bitwise in: %s; rel L2 %.2e", diff, e);
    layer_out_free(&bad);
    layer_out_free(&one);
    layer_out_free(&ref);
    layer_data_free(&d);
}

int main(void) {
    test_begin("test_expert_shard");
    test_unfit();
    test_column_map();
    test_pair_ids();
    test_pack_roundtrip();
    test_tables();
    test_reshard();
    test_dot();
    const int Ps_d12[] = {1, 2, 3, 4, 8};
    test_layer(768, 64, 8, 48, Ps_d12, 5, 1811);  // d12's C: 3 vectors per lane at P = 1
    const int Ps_small[] = {1, 2, 3, 4};
    test_layer(96, 32, 4, 60, Ps_small, 4, 1812);  // 12 vectors: most lanes empty
    test_layer_bugs();
    return test_end();
}
