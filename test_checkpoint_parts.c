/*
 * test_checkpoint_parts.c - sharded checkpoints (llmc/checkpoint_parts.h, docs/sharding.md §4)
 * with P simulated ranks in one process: each rank packs its ZeRO-1 shard of random master, m
 * and v (llmc/zero_shard.h) and writes its part, then rank 0 writes the manifest.
 *
 *   roundtrip   saved at P = 2, 3 and 4 (P = 3 has replicated tails), loaded by every rank of
 *               P' = 1, 2, 3, 4 from the parts (re-sharding): the shards put together are bitwise
 *               the saved logical state; checkpoint_read assembles the same flat params, m, v and
 *               returns the manifest's BN sets, loader and RNG bytes bitwise
 *   chain       4 -> 3 (shards) -> saved again at 3 -> 1: still bitwise
 *   verify      checkpoint_verify and checkpoint_find_latest accept the manifest; a missing or
 *               truncated part makes verify refuse it (naming the part) and find_latest fall back
 *               to the older checkpoint
 *   bad input   a flipped byte in a part, a missing part, a truncated part, a corrupt manifest,
 *               a part of another step and a part of another run (same step) are each refused
 *               with one message naming the file; the part readers return -1 on a bad part
 *               instead of exiting (a multi-GPU resume lets the ranks agree on it first)
 */
#include "llmc/test_harness.h"
#include "llmc/checkpoint.h"

typedef struct {
    ModelConfig config;
    size_t n;                  // parameters
    float *params, *m, *v;     // the logical state
    float* bn;                 // (sets, NB)
    int sets;
    unsigned char loader[40];
    unsigned char rng[8];
} State;

static void state_random(State* s, const ModelConfig* c, uint64_t seed) {
    memset(s, 0, sizeof(*s));
    s->config = *c;
    s->n = model_config_num_params(c);
    Rng rng = rng_seeded(seed);
    s->params = (float*)malloc_check(s->n * sizeof(float));
    s->m = (float*)malloc_check(s->n * sizeof(float));
    s->v = (float*)malloc_check(s->n * sizeof(float));
    fill_normal(s->params, s->n, 0.0f, 0.1f, &rng);
    fill_normal(s->m, s->n, 0.0f, 1e-3f, &rng);
    fill_uniform(s->v, s->n, 1e-8f, 1e-5f, &rng);
    s->sets = 3;
    size_t nb = model_config_num_bn_stats(c) * s->sets;
    s->bn = (float*)malloc_check((nb > 0 ? nb : 1) * sizeof(float));
    fill_uniform(s->bn, nb, 0.5f, 1.5f, &rng);
    for (size_t i = 0; i < sizeof(s->loader); i++) s->loader[i] = (unsigned char)rng_u32(&rng);
    for (size_t i = 0; i < sizeof(s->rng); i++) s->rng[i] = (unsigned char)rng_u32(&rng);
}

static void state_free(State* s) {
    free(s->params);
    free(s->m);
    free(s->v);
    free(s->bn);
}

// P simulated ranks each write their part of the state, then rank 0 the manifest
static void save_sharded(const State* s, const char* dir, int step, int P, char* out_path) {
    CheckpointPartEntry table[16];
    for (int r = 0; r < P; r++) {
        ZeroShardMap map;
        zero_shard_map(&map, &s->config, P, r);
        size_t e = map.shard_elems;
        float* packed[3];
        const float* full[3] = {s->params, s->m, s->v};
        for (int k = 0; k < 3; k++) {
            packed[k] = (float*)malloc_check((e > 0 ? e : 1) * sizeof(float));
            zero_shard_pack(&map, full[k], packed[k]);
        }
        if (checkpoint_part_write(dir, step, &s->config, r, P, SHARD_MODE_ZERO, packed[0], packed[1], packed[2], e,
                                  &table[r]) != 0) {
            exit(EXIT_FAILURE);  // the writer said why
        }
        for (int k = 0; k < 3; k++) free(packed[k]);
        zero_shard_map_free(&map);
    }
    CheckpointInfo info;
    memset(&info, 0, sizeof(info));
    info.step = step;
    info.adam_t = step;
    info.tokens_seen = 1000LL * step;
    info.run.num_processes = P;
    if (checkpoint_manifest_write(dir, &s->config, &info, s->bn, s->sets, s->loader, sizeof(s->loader), s->rng,
                                  sizeof(s->rng), P, SHARD_MODE_ZERO, table, out_path) != 0) {
        exit(EXIT_FAILURE);
    }
}

// every rank of P' reads its shard from the parts; the shards unpacked into NaN buffers must give
// back the state bitwise. Returns 1 when they do.
static int load_resharded(const State* s, const char* manifest, int P2, State* out_state) {
    size_t n = s->n;
    float* full[3];
    for (int k = 0; k < 3; k++) {
        full[k] = (float*)malloc_check(n * sizeof(float));
        for (size_t i = 0; i < n; i++) full[k][i] = NAN;
    }
    for (int r = 0; r < P2; r++) {
        ModelConfig c;
        CheckpointInfo info;
        CheckpointPartEntry* table = checkpoint_manifest_read_table(manifest, &s->config, &c, &info);
        ZeroShardMap map;
        zero_shard_map(&map, &c, P2, r);
        float* packed[3];
        for (int k = 0; k < 3; k++) packed[k] = (float*)malloc_check((map.shard_elems + 1) * sizeof(float));
        if (checkpoint_parts_read_shard(manifest, &c, &info, table, &map, packed[0], packed[1], packed[2]) != 0) {
            exit(EXIT_FAILURE);  // the reader named the part (child_read_shard expects this exit)
        }
        for (int k = 0; k < 3; k++) {
            zero_shard_unpack(&map, packed[k], full[k]);
            free(packed[k]);
        }
        zero_shard_map_free(&map);
        free(table);
    }
    int ok = memcmp(full[0], s->params, n * 4) == 0 && memcmp(full[1], s->m, n * 4) == 0 &&
             memcmp(full[2], s->v, n * 4) == 0;
    if (out_state != NULL) {  // hand the loaded state on (the chain test)
        *out_state = *s;
        out_state->params = full[0];
        out_state->m = full[1];
        out_state->v = full[2];
        out_state->bn = (float*)malloc_check((model_config_num_bn_stats(&s->config) * s->sets + 1) * sizeof(float));
        memcpy(out_state->bn, s->bn, model_config_num_bn_stats(&s->config) * s->sets * sizeof(float));
    } else {
        for (int k = 0; k < 3; k++) free(full[k]);
    }
    return ok;
}

// checkpoint_read of a manifest: the flat state and the manifest's sections, bitwise
static int read_logical_equal(const State* s, const char* manifest) {
    size_t n = s->n, nb = model_config_num_bn_stats(&s->config) * s->sets;
    float* p = (float*)malloc_check(n * 4);
    float* m = (float*)malloc_check(n * 4);
    float* v = (float*)malloc_check(n * 4);
    float* bn = (float*)malloc_check((nb + 1) * 4);
    unsigned char loader[sizeof(s->loader)], rng[sizeof(s->rng)];
    CheckpointInfo info;
    checkpoint_read(manifest, &s->config, &info, p, m, v, bn, s->sets, loader, sizeof(loader), rng, sizeof(rng));
    int ok = memcmp(p, s->params, n * 4) == 0 && memcmp(m, s->m, n * 4) == 0 && memcmp(v, s->v, n * 4) == 0 &&
             memcmp(bn, s->bn, nb * 4) == 0 && memcmp(loader, s->loader, sizeof(loader)) == 0 &&
             memcmp(rng, s->rng, sizeof(rng)) == 0 && info.num_parts > 0 && info.shard_mode == SHARD_MODE_ZERO;
    free(p);
    free(m);
    free(v);
    free(bn);
    return ok;
}

// ----------------------------------------------------------------------------
// bad input, in children

typedef struct {
    const State* s;
    const char* manifest;
} ReadArgs;

static void child_read_logical(void* arg) {
    ReadArgs* a = (ReadArgs*)arg;
    read_logical_equal(a->s, a->manifest);
    exit(0);
}

static void child_read_shard(void* arg) {  // rank 0 of 2 (reads part 0 and, from a P=3 save, part 1)
    ReadArgs* a = (ReadArgs*)arg;
    load_resharded(a->s, a->manifest, 2, NULL);
    exit(0);
}

// part r of P of src_dir's step src_step, copied as part r of dst_dir's step dst_step
static void copy_part(const char* src_dir, int src_step, const char* dst_dir, int dst_step, int r, int P) {
    char a[CHECKPOINT_PATH_MAX + 64], b[CHECKPOINT_PATH_MAX + 64];
    checkpoint_part_path(a, sizeof(a), src_dir, src_step, r, P);
    checkpoint_part_path(b, sizeof(b), dst_dir, dst_step, r, P);
    test_copy_file(a, b);
}

// the manifest and every part of a step
static void fresh_copy(const char* src_dir, const char* dst_dir, int step, int P) {
    char a[CHECKPOINT_PATH_MAX + 64], b[CHECKPOINT_PATH_MAX + 64];
    checkpoint_path(a, sizeof(a), src_dir, step);
    checkpoint_path(b, sizeof(b), dst_dir, step);
    test_copy_file(a, b);
    for (int r = 0; r < P; r++) copy_part(src_dir, step, dst_dir, step, r, P);
}

// a new scratch directory `name` (its path in dir, 512 chars) holding good's step of 3 parts, to
// be damaged; manifest (CHECKPOINT_PATH_MAX chars) := the path of its manifest
static void damaged_copy(char* dir, const char* name, const char* good, int step, char* manifest) {
    test_tmp_subdir(dir, 512, name);
    fresh_copy(good, dir, step, 3);
    checkpoint_path(manifest, CHECKPOINT_PATH_MAX, dir, step);
}

int main(void) {
    test_begin("test_checkpoint_parts");
    test_tmp_begin("test_checkpoint_parts");
    ModelConfig configs[2] = {
        test_config(TEST_DIMS_MICRO, FFN_OMNI, 4, 3, ROUTER_NORM_BN, GATE_SOFTMAX),
        test_config((TestDims){16, 61, 64, 3, 2, 32, 128, 48}, FFN_GELU, 0, 0, ROUTER_NORM_BN, GATE_SOFTMAX),
    };
    const char* labels[2] = {"micro omni", "C=32 gelu"};
    char dir[512], manifest[CHECKPOINT_PATH_MAX], why[512];
    for (int ci = 0; ci < 2; ci++) {
        State s;
        state_random(&s, &configs[ci], 77 + ci);
        const int saves[3] = {2, 3, 4};
        for (int si = 0; si < 3; si++) {
            int P = saves[si];
            char name[64];
            snprintf(name, sizeof(name), "rt%d_%d", ci, P);
            test_tmp_subdir(dir, sizeof(dir), name);
            save_sharded(&s, dir, 10, P, manifest);
            char what[160];
            int ok = checkpoint_verify(manifest, why, sizeof(why));
            snprintf(what, sizeof(what), "%s saved at P=%d: checkpoint_verify accepts the manifest", labels[ci], P);
            test_check_why(ok, what, why);
            char found[CHECKPOINT_PATH_MAX];
            snprintf(what, sizeof(what), "%s saved at P=%d: checkpoint_find_latest finds it", labels[ci], P);
            test_check(checkpoint_find_latest(dir, found) == 10 && strcmp(found, manifest) == 0, what);
            snprintf(what, sizeof(what), "%s saved at P=%d: checkpoint_read = the logical state and sections, bitwise",
                     labels[ci], P);
            test_check(read_logical_equal(&s, manifest), what);
            for (int P2 = 1; P2 <= 4; P2++) {
                snprintf(what, sizeof(what), "%s saved at P=%d, loaded at P=%d: shards bitwise", labels[ci], P, P2);
                test_check(load_resharded(&s, manifest, P2, NULL), what);
            }
        }
        state_free(&s);
    }

    // the chain 4 -> 3 -> 1, through shards loaded and saved again
    {
        State s, mid;
        state_random(&s, &configs[0], 5);
        test_tmp_subdir(dir, sizeof(dir), "chain");
        save_sharded(&s, dir, 4, 4, manifest);
        int ok = load_resharded(&s, manifest, 3, &mid);
        save_sharded(&mid, dir, 8, 3, manifest);
        ok &= read_logical_equal(&s, manifest);
        test_check(ok, "chain: saved at 4, loaded at 3, saved at 3, read at 1: bitwise");
        state_free(&mid);
        state_free(&s);
    }

    // bad input: one good set at step 10 (P=3) and a newer one at step 20 in "bad"
    State s, other;
    state_random(&s, &configs[0], 11);
    state_random(&other, &configs[0], 12);
    char good[512], bad[512], part[CHECKPOINT_PATH_MAX + 64], found[CHECKPOINT_PATH_MAX];
    test_tmp_subdir(good, sizeof(good), "good");
    save_sharded(&s, good, 10, 3, manifest);
    save_sharded(&s, good, 20, 3, manifest);
    ReadArgs ra = {&s, manifest};

    damaged_copy(bad, "flip", good, 20, manifest);
    checkpoint_part_path(part, sizeof(part), bad, 20, 1, 3);
    test_xor_byte(part, OMNI_HEADER_BYTES + 4 * 17 + 2, 0x10);  // one byte of part 1's master
    test_expect_exit_failure("a flipped byte in a part is refused, naming the part", child_read_logical, &ra,
                             "ckpt_00000020.part1of3.bin", "checksum mismatch");
    test_expect_exit_failure("a flipped byte in a part is refused by a re-sharded reader too", child_read_shard, &ra,
                             "part1of3", "corrupt");
    {  // in a child: the readers return -1 (status 3 when both do); an exit inside them ends it with 1
        fflush(stdout);
        fflush(stderr);
        pid_t pid = fork();
        if (pid == 0) {
            ModelConfig c;
            CheckpointInfo info;
            CheckpointPartEntry* table = checkpoint_manifest_read_table(manifest, &s.config, &c, &info);
            ZeroShardMap map;
            zero_shard_map(&map, &c, 2, 0);  // rank 0 of 2 reads parts 0 and 1
            float* packed[3];
            for (int k = 0; k < 3; k++) packed[k] = (float*)malloc_check((map.shard_elems + 1) * sizeof(float));
            float* flat = (float*)malloc_check(s.n * sizeof(float));
            int shard_rc = checkpoint_parts_read_shard(manifest, &c, &info, table, &map, packed[0], packed[1], packed[2]);
            int logical_rc = checkpoint_parts_read_logical(manifest, &c, &info, table, flat, NULL, NULL);
            _exit(shard_rc == -1 && logical_rc == -1 ? 3 : 4);
        }
        int status = 0;
        waitpid(pid, &status, 0);
        test_checkf(WIFEXITED(status) && WEXITSTATUS(status) == 3, "a corrupt part: the part readers return -1, no exit",
                    "child status %d (3: both returned -1, 4: one did not, 1: a reader exited)",
                    WIFEXITED(status) ? WEXITSTATUS(status) : -1);
    }

    damaged_copy(bad, "missing", good, 20, manifest);
    fresh_copy(good, bad, 10, 3);
    checkpoint_part_path(part, sizeof(part), bad, 20, 2, 3);
    remove(part);
    test_check(!checkpoint_verify(manifest, why, sizeof(why)) && strstr(why, "part2of3") != NULL,
               "checkpoint_verify refuses a manifest whose part is missing");
    test_checkf(checkpoint_find_latest(bad, found) == 10, "find_latest falls back past a missing part", "%s", why);
    test_expect_exit_failure("a missing part is refused, naming it", child_read_logical, &ra, "part2of3",
                             "missing part");

    damaged_copy(bad, "truncated", good, 20, manifest);
    checkpoint_part_path(part, sizeof(part), bad, 20, 0, 3);
    test_truncate(part, (long)ckpt_file_size_(part) - 100);
    test_check(!checkpoint_verify(manifest, why, sizeof(why)) && strstr(why, "truncated") != NULL,
               "checkpoint_verify refuses a manifest whose part is truncated");
    test_expect_exit_failure("a truncated part is refused, naming it", child_read_logical, &ra, "part0of3",
                             "truncated");

    damaged_copy(bad, "manifest", good, 20, manifest);
    test_xor_byte(manifest, (long)ckpt_file_size_(manifest) - 20, 0x01);  // in the part table
    test_check(!checkpoint_verify(manifest, why, sizeof(why)) && strstr(why, "checksum mismatch") != NULL,
               "checkpoint_verify refuses a corrupt manifest");
    test_expect_exit_failure("a corrupt manifest is refused", child_read_logical, &ra, "ckpt_00000020.bin",
                             "checksum mismatch");

    damaged_copy(bad, "otherstep", good, 10, manifest);
    copy_part(good, 20, bad, 10, 1, 3);  // step 20's part 1 under step 10's name
    test_expect_exit_failure("a part of another step is refused", child_read_logical, &ra, "part1of3",
                             "does not match the manifest");

    test_tmp_subdir(bad, sizeof(bad), "otherrun");
    save_sharded(&other, bad, 10, 3, manifest);  // another run's state at the same step
    copy_part(good, 10, bad, 10, 1, 3);
    test_expect_exit_failure("a part of another run (same step) is refused", child_read_logical, &ra, "part1of3",
                             "not the manifest's");

    state_free(&s);
    state_free(&other);
    test_tmp_end();
    return test_end();
}
