/*
 * test_param_init.c - CPU tests of the jump-ahead of llmc/rand.h and the parallel initialisation
 * of llmc/param_init.h:
 *
 *   jump_*      rng_jump(j) lands where j calls of rng_u32 land: every j up to 2000, random j up to
 *               2^20, 2^20 itself, and for j beyond stepping range jump(a) then jump(b) == jump(a+b)
 *   init_*      model_init_params_threads with 1..8 threads (and 13) gives the bits of the
 *               sequential model_init_params (llmc/config.h), on configurations whose tensors
 *               have odd sizes (so thread runs and tensors end mid-pair), every FFN kind, seeds
 *   init_random_ranges   model_init_params_range writes exactly [lo, hi) with the sequential
 *               values: 300 random ranges (odd starts and ends inside pairs), 1..5 threads
 *   init_pipelined_*     every chunk reaches the consumer once, in order, already final
 *   tiny_tensors  more threads than pairs in a tensor (threads with nothing to draw)
 *   init_range_into      model_init_params_range_into fills a separate buffer of hi - lo values with
 *               the sequential values of [lo, hi) and writes nothing around it
 *   init_shard_*  model_init_params_shard (the streamed start of --shard-experts 1) gives every rank
 *               of P = 1, 2, 3, 4, 8 (where expert_shard_unfit allows) expert_shard_local_pack of the
 *               sequential draw bitwise, 1 and 3 threads, blocks of one row, of 7 rows (not dividing
 *               the rows) and the default; presets tiny/small and odd sizes
 *
 *   make test_param_init && ./test_param_init
 *
 * One PASS/FAIL line per check, then "test_param_init: N passed, N failed"; exits non-zero on a failure.
 */
#include "llmc/test_harness.h"
#include "llmc/param_init.h"

// odd sizes: C = 13, maxT = 7, Vp = 29 (wte, wpe and most per-layer tensors are odd), n = 3
static const TestDims ODD_DIMS = {7, 27, 29, 3, 1, 13, 52, 11};
static ModelConfig odd_omni(void) { return test_config(ODD_DIMS, FFN_OMNI, 3, 2, ROUTER_NORM_BN, GATE_SOFTMAX); }
// moe with every MoE++ tensor (docs/design.md §10.1), odd sizes
static ModelConfig odd_moe(void) {
    ModelConfig c = test_config(ODD_DIMS, FFN_SWIGLU, 0, 0, ROUTER_NORM_BN, GATE_SOFTMAX);
    c.ffn_kind = FFN_MOE;
    c.ffn_hidden = 7;
    c.moe_experts = 3; c.moe_topk = 2; c.moe_shared = 1; c.moe_zero = 1; c.moe_copy = 1; c.moe_const = 2;
    c.moe_gate_res = 1; c.moe_norm_topk = 1; c.moe_router = MOE_ROUTER_TANH; c.moe_input_scale = 1;
    return c;
}

static void test_jump(const RngJump* jump) {
    // every j in [0, 2000): the generator stepped j times against a fresh one jumped by j
    int bad = -1;
    Rng stepped = rng_seeded(11);
    for (int j = 0; j < 2000 && bad < 0; j++) {
        Rng jumped = rng_seeded(11);
        rng_jump(&jumped, jump, (uint64_t)j);
        if (jumped.state != stepped.state) bad = j;
        rng_u32(&stepped);
    }
    test_checkf(bad < 0, "jump_every_j_below_2000", bad < 0 ? "all equal" : "first difference at j = %d", bad);

    // random j up to 2^20 from random seeds, and j = 2^20 exactly (bit 20 of the table)
    Rng pick = rng_seeded(12);
    int mismatches = 0, cases = 0;
    for (int r = 0; r < 40; r++) {
        uint64_t seed = ((uint64_t)rng_u32(&pick) << 32) | rng_u32(&pick);
        uint64_t j = r == 0 ? (1u << 20) : (rng_u32(&pick) & ((1u << 20) - 1));
        Rng a = rng_seeded(seed), b = rng_seeded(seed);
        for (uint64_t s = 0; s < j; s++) rng_u32(&a);
        rng_jump(&b, jump, j);
        mismatches += a.state != b.state;
        // the next draws agree too (the output, not only the state)
        for (int s = 0; s < 4; s++) mismatches += rng_u32(&a) != rng_u32(&b);
        cases++;
    }
    test_checkf(mismatches == 0, "jump_random_j_to_2^20", "%d of %d cases differ", mismatches, cases);

    // j beyond what can be stepped: jumps compose, jump(a) jump(b) == jump(a + b) == jump(b) jump(a)
    mismatches = 0;
    for (int r = 0; r < 200; r++) {
        uint64_t a = ((uint64_t)rng_u32(&pick) << 32) | rng_u32(&pick);
        uint64_t b = ((uint64_t)rng_u32(&pick) << 32) | rng_u32(&pick);
        if (r % 2) { a >>= 20; b >>= 20; }  // no wrap-around of a + b in half the cases
        Rng x = rng_seeded(13), y = rng_seeded(13), z = rng_seeded(13);
        rng_jump(&x, jump, a);
        rng_jump(&x, jump, b);
        rng_jump(&y, jump, a + b);  // compared only without wrap-around: the period is 2^64 - 1, not 2^64
        rng_jump(&z, jump, b);
        rng_jump(&z, jump, a);
        if (a + b >= a) mismatches += x.state != y.state;
        mismatches += x.state != z.state;
    }
    test_checkf(mismatches == 0, "jump_composes_64bit", "%d mismatches of 200 pairs", mismatches);
}

// the bits of the threaded init against the sequential one
static int init_equal(const ModelConfig* c, uint64_t seed, int threads, size_t* first_diff) {
    size_t P = model_config_num_params(c);
    float* ref = (float*)malloc_check(P * sizeof(float));
    float* got = (float*)malloc_check(P * sizeof(float));
    model_init_params(c, ref, seed);
    memset(got, 0xFF, P * sizeof(float));  // NaN everywhere: an unwritten value cannot pass
    model_init_params_threads(c, got, seed, threads);
    int equal = memcmp(ref, got, P * sizeof(float)) == 0;
    *first_diff = P;
    for (size_t i = 0; i < P && !equal; i++) {
        if (memcmp(&ref[i], &got[i], sizeof(float)) != 0) { *first_diff = i; break; }
    }
    free(ref);
    free(got);
    return equal;
}

static void test_init(void) {
    struct { const char* name; ModelConfig c; } configs[] = {
        {"odd_omni", odd_omni()},
        {"odd_swiglu", test_config(ODD_DIMS, FFN_SWIGLU, 0, 0, ROUTER_NORM_BN, GATE_SOFTMAX)},
        {"odd_gelu", test_config(ODD_DIMS, FFN_GELU, 0, 0, ROUTER_NORM_BN, GATE_SOFTMAX)},
        {"odd_moe++", odd_moe()},
        {"tiny_omni", test_config(TEST_DIMS_TINY, FFN_OMNI, 4, 3, ROUTER_NORM_BN, GATE_SOFTMAX)},
        {"small_omni", test_config(TEST_DIMS_SMALL, FFN_OMNI, 16, 8, ROUTER_NORM_BN, GATE_PROB)},
    };
    int threads[] = {1, 2, 3, 4, 5, 6, 7, 8, 13};
    for (size_t i = 0; i < sizeof(configs) / sizeof(configs[0]); i++) {
        for (uint64_t seed = 1; seed <= 3; seed++) {
            int bad_threads = 0;
            size_t diff = 0;
            for (size_t t = 0; t < sizeof(threads) / sizeof(threads[0]); t++) {
                size_t d;
                if (!init_equal(&configs[i].c, seed * 977, threads[t], &d)) { bad_threads = threads[t]; diff = d; }
            }
            char name[96];
            snprintf(name, sizeof(name), "init_%s_seed%d_threads_1_to_8_and_13", configs[i].name, (int)seed);
            if (bad_threads) test_checkf(0, name, "differs with %d threads at parameter %zu", bad_threads, diff);
            else test_checkf(1, name, "bitwise equal (%zu parameters)", model_config_num_params(&configs[i].c));
        }
    }
    // a preset: the layout of the real models (small: 1.1M parameters), 2 and 7 threads
    ModelConfig c;
    model_config_preset(&c, "small", FFN_OMNI);
    size_t d2, d7;
    int ok = init_equal(&c, 42, 2, &d2) && init_equal(&c, 42, 7, &d7);
    test_checkf(ok, "init_preset_small_omni", "%zu parameters", model_config_num_params(&c));
}

// model_init_params_range writes exactly [lo, hi), with the sequential values, for random ranges
// (odd starts and ends inside pairs and tensors) and thread counts
static void test_ranges(void) {
    ModelConfig c = odd_omni();
    size_t P = model_config_num_params(&c);
    float* ref = (float*)malloc_check(P * sizeof(float));
    float* got = (float*)malloc_check(P * sizeof(float));
    model_init_params(&c, ref, 31);
    Rng pick = rng_seeded(32);
    int bad = 0, cases = 0, odd_starts = 0;
    for (int r = 0; r < 300; r++) {
        size_t lo = rng_u32(&pick) % P, hi = lo + 1 + rng_u32(&pick) % (P - lo);
        int threads = 1 + rng_int(&pick, 5);
        memset(got, 0xFF, P * sizeof(float));  // NaN: what must stay untouched stays NaN
        model_init_params_range(&c, got, 31, lo, hi, threads);
        int ok = memcmp(got + lo, ref + lo, (hi - lo) * sizeof(float)) == 0;
        for (size_t i = 0; i < P && ok; i++) ok = (i >= lo && i < hi) || got[i] != got[i];
        bad += !ok;
        odd_starts += lo & 1;
        cases++;
    }
    test_checkf(bad == 0, "init_random_ranges", "%d of %d ranges differ (%d odd starts)", bad, cases, odd_starts);
    free(ref);
    free(got);
}

// the pipeline: every chunk reaches the consumer once, in order, already final
typedef struct { const float* ref; const float* params; float* copy; size_t next; int out_of_order, not_final; } Consumer;

static void consume_chunk(void* ctx, size_t lo, size_t n) {
    Consumer* k = (Consumer*)ctx;
    k->out_of_order += lo != k->next;
    k->next = lo + n;
    memcpy(k->copy + lo, k->params + lo, n * sizeof(float));  // what a GPU copy would take now
    k->not_final += memcmp(k->copy + lo, k->ref + lo, n * sizeof(float)) != 0;
}

static void test_pipeline(void) {
    ModelConfig c = odd_omni();
    size_t P = model_config_num_params(&c);
    float* ref = (float*)malloc_check(P * sizeof(float));
    float* params = (float*)malloc_check(P * sizeof(float));
    float* copy = (float*)malloc_check(P * sizeof(float));
    model_init_params(&c, ref, 77);
    size_t chunks[] = {7, 64, 1001, P, P + 5};
    int bad = 0;
    char detail[160] = "";
    for (size_t i = 0; i < sizeof(chunks) / sizeof(chunks[0]); i++) {
        for (int threads = 1; threads <= 3; threads += 2) {
            memset(params, 0xFF, P * sizeof(float));
            memset(copy, 0xFF, P * sizeof(float));
            Consumer k = {ref, params, copy, 0, 0, 0};
            model_init_params_pipelined(&c, params, 77, chunks[i], threads, consume_chunk, &k);
            int ok = k.out_of_order == 0 && k.not_final == 0 && k.next == P &&
                     memcmp(params, ref, P * sizeof(float)) == 0 && memcmp(copy, ref, P * sizeof(float)) == 0;
            if (!ok && !bad) {
                snprintf(detail, sizeof(detail), "chunk %zu, %d threads: %d out of order, %d not final, %zu consumed",
                         chunks[i], threads, k.out_of_order, k.not_final, k.next);
            }
            bad += !ok;
        }
    }
    test_checkf(bad == 0, "init_pipelined_chunks_in_order_and_final", bad ? "%s" : "chunks 7..P+5, 1 and 3 threads (%s)",
                bad ? detail : "all equal");
    free(ref);
    free(params);
    free(copy);
}

// more threads than pairs in many tensors: those threads draw nothing, the others still match
static void test_tiny_tensors(void) {
    TestDims d = {1, 3, 3, 1, 1, 3, 4, 3};  // C = 3: LayerNorm tensors of 3 values, wpe 3
    ModelConfig c = test_config(d, FFN_OMNI, 1, 1, ROUTER_NORM_NONE, GATE_SOFTMAX);
    size_t diff;
    int ok = init_equal(&c, 5, 64, &diff);
    test_checkf(ok, "tiny_tensors_64_threads", ok ? "%zu parameters" : "first difference at %zu",
                ok ? model_config_num_params(&c) : diff);
}

// model_init_params_range_into: out[0, hi - lo) holds [lo, hi), the guards around it stay NaN
static void test_range_into(void) {
    ModelConfig c = odd_omni();
    size_t P = model_config_num_params(&c);
    const size_t guard = 4;
    float* ref = (float*)malloc_check(P * sizeof(float));
    float* out = (float*)malloc_check((P + 2 * guard) * sizeof(float));
    model_init_params(&c, ref, 41);
    Rng pick = rng_seeded(42);
    int bad = 0, cases = 0;
    for (int r = 0; r < 200; r++) {
        size_t lo = rng_u32(&pick) % P, hi = lo + 1 + rng_u32(&pick) % (P - lo);
        int threads = 1 + rng_int(&pick, 4);
        memset(out, 0xFF, (P + 2 * guard) * sizeof(float));
        model_init_params_range_into(&c, out + guard, 41, lo, hi, threads);
        int ok = memcmp(out + guard, ref + lo, (hi - lo) * sizeof(float)) == 0;
        for (size_t i = 0; i < P + 2 * guard && ok; i++) ok = (i >= guard && i < guard + hi - lo) || out[i] != out[i];
        bad += !ok;
        cases++;
    }
    test_checkf(bad == 0, "init_range_into", "%d of %d ranges differ or write outside", bad, cases);
    free(ref);
    free(out);
}

// every rank's streamed local buffer against expert_shard_local_pack of the sequential draw; all
// (block, threads) pairs for every rank, or (sweep = 0, the big presets) one pair per rank in turn
static void test_shard(const char* name, const ModelConfig* c, uint64_t seed, int sweep) {
    size_t num = model_config_num_params(c);
    float* ref = (float*)malloc_check(num * sizeof(float));
    float* want = (float*)malloc_check(num * sizeof(float));
    float* got = (float*)malloc_check(num * sizeof(float));
    model_init_params(c, ref, seed);
    const size_t C = (size_t)c->channels;
    size_t blocks[] = {C - 1, 7 * C + 3, PARAM_INIT_SHARD_BLOCK};  // 1 row, 7 rows, all rows
    int Ps[] = {1, 2, 3, 4, 8};
    int cases = 0, bad = 0;
    char detail[160] = "", ranks[32] = "";
    for (size_t p = 0; p < sizeof(Ps) / sizeof(Ps[0]); p++) {
        if (expert_shard_unfit(c->channels, Ps[p]) != NULL) continue;
        snprintf(ranks + strlen(ranks), sizeof(ranks) - strlen(ranks), "%s%d", ranks[0] ? "," : "", Ps[p]);
        for (int r = 0; r < Ps[p]; r++) {
            ExpertShardLayout lay;
            expert_shard_layout(&lay, c, Ps[p], r);
            expert_shard_local_pack(want, ref, sizeof(float), &lay);
            for (size_t b = 0; b < sizeof(blocks) / sizeof(blocks[0]); b++) {
                for (int threads = 1; threads <= 3; threads += 2) {
                    if (!sweep && (size_t)((r + p) % 6) != b * 2 + (threads == 3)) continue;
                    memset(got, 0xFF, num * sizeof(float));  // NaN: an unwritten value cannot pass
                    model_init_params_shard(c, got, seed, &lay, blocks[b], threads);
                    int ok = memcmp(got, want, lay.num_local * sizeof(float)) == 0;
                    if (!ok && !bad) {
                        size_t i = 0;
                        while (i < lay.num_local && memcmp(&got[i], &want[i], sizeof(float)) == 0) i++;
                        snprintf(detail, sizeof(detail), "P %d rank %d block %zu, %d threads: first difference at local %zu",
                                 Ps[p], r, blocks[b], threads, i);
                    }
                    bad += !ok;
                    cases++;
                }
            }
        }
    }
    char check[96];
    snprintf(check, sizeof(check), "init_shard_%s", name);
    if (bad) test_checkf(0, check, "%d of %d cases differ (%s)", bad, cases, detail);
    else test_checkf(cases > 0, check, "%d cases bitwise equal (P = %s, %zu parameters)", cases, ranks, num);
    free(ref);
    free(want);
    free(got);
}

static void test_shards(void) {
    ModelConfig c;
    model_config_preset(&c, "tiny", FFN_OMNI);
    test_shard("preset_tiny", &c, 51, 0);
    model_config_preset(&c, "small", FFN_OMNI);
    test_shard("preset_small", &c, 52, 0);
    c = test_config(TEST_DIMS_SMALL, FFN_OMNI, 16, 8, ROUTER_NORM_BN, GATE_PROB);
    test_shard("small_dims", &c, 53, 1);
    // odd sizes with C/8 = 3 and 6 (P = 3 fits, rows L*N = 27 and 75 odd), maxT, Vp and hidden odd
    TestDims d24 = {7, 27, 29, 3, 1, 24, 52, 11}, d48 = {5, 27, 31, 3, 3, 48, 52, 13};
    c = test_config(d24, FFN_OMNI, 3, 2, ROUTER_NORM_BN, GATE_SOFTMAX);
    test_shard("odd_C24", &c, 54, 1);
    c = test_config(d48, FFN_OMNI, 5, 3, ROUTER_NORM_BN, GATE_SOFTMAX);
    test_shard("odd_C48", &c, 55, 1);
}

int main(void) {
    test_begin("test_param_init");
    RngJump* jump = (RngJump*)malloc_check(sizeof(RngJump));
    rng_jump_init(jump);
    test_jump(jump);
    free(jump);
    test_init();
    test_ranges();
    test_pipeline();
    test_tiny_tensors();
    test_range_into();
    test_shards();
    return test_end();
}
