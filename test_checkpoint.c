/*
 * test_checkpoint.c - CPU tests of model files and training checkpoints (llmc/checkpoint.h):
 * round trips bitwise, the checksum, corruption/truncation/mismatch detection, find_latest, the
 * crash-safe write, and the notes of a resume with changed settings (checkpoint_compare_run).
 * Cases that must end the program run in a forked child whose exit status and message are checked.
 * The flags, the learning-rate schedules and the logger have their own tests (test_args.c,
 * test_lr_schedule.c, test_logger.c).
 *
 *   make test_checkpoint && ./test_checkpoint
 *
 * One PASS/FAIL line per check, then "test_checkpoint: N passed, N failed"; exits non-zero on a failure.
 */
#include "llmc/test_harness.h"
#include "llmc/checkpoint.h"
#include "llmc/args.h"

// ----------------------------------------------------------------------------
// damaged copies

// out := dir/name, a copy of the file at from
static void copy_as(char* out, size_t size, const char* dir, const char* name, const char* from) {
    snprintf(out, size, "%s/%s", dir, name);
    test_copy_file(from, out);
}

// the int32 at byte offset := value
static void write_i32_at(const char* path, long offset, int32_t value) {
    FILE* fp = fopen_check(path, "r+b");
    fseek_check(fp, offset, SEEK_SET, path);
    fwrite_check(&value, 4, 1, fp, path);
    fclose_check(fp, path);
}

// ----------------------------------------------------------------------------
// test data

// the file-format model: V = 50 padded to 128, C = 8, 2 layers; omni: n = 4 (16 experts), k = 3
static ModelConfig micro_config(int ffn_kind) {
    return test_config(TEST_DIMS_MICRO, ffn_kind, 4, 3, ROUTER_NORM_BN, GATE_SOFTMAX);
}

// random floats, never 0
static float* random_floats(Rng* rng, size_t n) {
    float* x = (float*)malloc_check((n > 0 ? n : 1) * sizeof(float));
    fill_normal(x, n, 0.0f, 1.0f, rng);
    for (size_t i = 0; i < n; i++) if (x[i] == 0.0f) x[i] = 0.5f;
    return x;
}

static unsigned char* random_bytes(Rng* rng, size_t n) {
    unsigned char* x = (unsigned char*)malloc_check(n > 0 ? n : 1);
    for (size_t i = 0; i < n; i++) x[i] = (unsigned char)(1 + rng_u32(rng) % 255);
    return x;
}

static int bits_equal(const void* a, const void* b, size_t bytes) { return memcmp(a, b, bytes) == 0; }

// one complete checkpoint's worth of random state
typedef struct {
    ModelConfig config;
    CheckpointInfo info;
    size_t P, NB;
    int bn_sets;
    float *params, *m, *v, *bn;
    unsigned char *loader, *rng_blob;
    size_t loader_bytes, rng_bytes;
} CkptData;

static void ckpt_data_make(CkptData* d, uint64_t seed, int step) {
    Rng rng = rng_seeded(seed);
    memset(d, 0, sizeof(*d));
    d->config = micro_config(FFN_OMNI);
    d->P = model_config_num_params(&d->config);
    d->NB = model_config_num_bn_stats(&d->config);
    d->bn_sets = 2;
    d->params = random_floats(&rng, d->P);
    d->m = random_floats(&rng, d->P);
    d->v = random_floats(&rng, d->P);
    d->bn = random_floats(&rng, d->NB * d->bn_sets);
    d->loader_bytes = 37;  // odd sizes: the word-wise checksum must handle partial words
    d->rng_bytes = 19;
    d->loader = random_bytes(&rng, d->loader_bytes);
    d->rng_blob = random_bytes(&rng, d->rng_bytes);
    CheckpointInfo* in = &d->info;
    in->step = step;
    in->adam_t = step + 1;
    in->tokens_seen = 123456789012345LL + step;
    RunIdentity* r = &in->run;
    r->B = 3;
    r->T = 7;
    r->grad_accum_steps = 5;
    r->num_processes = 2;
    r->total_batch_size = 210;
    r->num_steps = 5000;
    r->warmup_steps = 77;
    r->lr_schedule = LR_SCHEDULE_WSD;
    r->shuffle = 1;
    r->expert_exec = EXPERT_EXEC_TOKEN;
    r->attention = ATTENTION_CUDNN;  // slot 47: must come back
    r->learning_rate = 6.1e-4f;
    r->final_lr_frac = 0.13f;
    r->decay_frac = 0.21f;
    r->weight_decay = 0.11f;
    r->grad_clip = 0.9f;
    r->beta1 = 0.91f;
    r->beta2 = 0.951f;
    r->eps = 1.1e-8f;
    r->seed = 0xF123456789ABCDEFull;  // needs all 64 bits
    r->data_fingerprint = 0x8765432187654321ull;
    r->data_tokens = 9876543210LL;
    r->data_shards = 12;
}

static void ckpt_data_free(CkptData* d) {
    free(d->params);
    free(d->m);
    free(d->v);
    free(d->bn);
    free(d->loader);
    free(d->rng_blob);
}

static void ckpt_data_write(const CkptData* d, const char* dir, char* out_path) {
    if (checkpoint_write(dir, &d->config, &d->info, d->params, d->m, d->v, d->bn, d->bn_sets, d->loader,
                         d->loader_bytes, d->rng_blob, d->rng_bytes, out_path) != 0) {
        exit(EXIT_FAILURE);  // the writer said why
    }
}

// ----------------------------------------------------------------------------
// children

typedef struct {
    const char* path;
    const ModelConfig* config;
    const CkptData* data;
    int bn_sets;
    size_t loader_bytes;
} ReadArgs;

static void child_model_read(void* arg) {
    ModelConfig c;
    float *p, *bn;
    model_file_read((const char*)arg, &c, &p, &bn);
}

static void child_checkpoint_read(void* arg) {
    ReadArgs* a = (ReadArgs*)arg;
    const CkptData* d = a->data;
    float* p = (float*)malloc_check(d->P * sizeof(float));
    float* m = (float*)malloc_check(d->P * sizeof(float));
    float* v = (float*)malloc_check(d->P * sizeof(float));
    float* bn = (float*)malloc_check((d->NB * 4 + 1) * sizeof(float));
    unsigned char loader[256], rng_blob[256];
    checkpoint_read(a->path, a->config, NULL, p, m, v, bn, a->bn_sets, loader, a->loader_bytes, rng_blob, d->rng_bytes);
}

static void child_find_latest(void* arg) {
    char path[CHECKPOINT_PATH_MAX] = "";
    int step = checkpoint_find_latest((const char*)arg, path);
    printf("RESULT %d %s\n", step, path);
    fflush(stdout);
    exit(0);
}

// ----------------------------------------------------------------------------
// model files

static void test_model_files(void) {
    char dir[512], path[600], detail[256];
    test_tmp_subdir(dir, sizeof(dir), "model");
    Rng rng = rng_seeded(7);

    // omni round trip, bitwise
    ModelConfig c = micro_config(FFN_OMNI);
    size_t P = model_config_num_params(&c), NB = model_config_num_bn_stats(&c);
    float* params = random_floats(&rng, P);
    float* bn = random_floats(&rng, NB);
    snprintf(path, sizeof(path), "%s/omni.bin", dir);
    test_check_why(model_file_write(path, &c, params, bn) == 0, "model_file_write returns 0", "");
    ModelConfig c2;
    float *p2 = NULL, *bn2 = NULL;
    model_file_read(path, &c2, &p2, &bn2);
    int ok = model_config_first_difference(&c, &c2) < 0 && bits_equal(params, p2, P * 4) && bn2 != NULL &&
             bits_equal(bn, bn2, NB * 4);
    snprintf(detail, sizeof(detail), "P=%zu NB=%zu", P, NB);
    test_check_why(ok, "model file round trip (omni, params + BN stats) is bitwise", detail);
    test_check_why(ckpt_file_size_(path) == 1024 + 4 * (int64_t)(P + NB) + 16, "model file size = 1024 + 4*(params + bn) + 16", "");
    {
        size_t n;
        unsigned char* raw = test_read_file(path, &n);
        int32_t h[256];
        memcpy(h, raw, sizeof(h));
        int slots_ok = h[0] == 20261101 && h[1] == 2 && h[2] == 8 && h[3] == 50 && h[4] == 128 && h[5] == 2 &&
                       h[6] == 2 && h[7] == 8 && h[8] == 2 && h[9] == 16 && h[10] == 4 && h[11] == 16 && h[12] == 3 &&
                       h[13] == 1 && h[14] == 0;
        for (int s = 15; s < 256; s++) slots_ok &= h[s] == 0;
        slots_ok &= bits_equal(raw + 1024, params, P * 4);
        test_check_why(slots_ok, "model file header slots follow docs/design.md §5", "");
        free(raw);
    }
    char tmp[640];
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    test_check_why(!test_file_exists(tmp), "model_file_write leaves no .tmp behind", "");
    ModelConfig c3;
    model_file_read_config(path, &c3);
    test_check_why(model_config_first_difference(&c, &c3) < 0, "model_file_read_config returns the config", "");
    free(p2);
    free(bn2);

    // bn_stats NULL writes the initial statistics: mean 0, var 1 per layer
    char path_init[600];
    snprintf(path_init, sizeof(path_init), "%s/omni_init.bin", dir);
    if (model_file_write(path_init, &c, params, NULL) != 0) exit(EXIT_FAILURE);
    model_file_read(path_init, &c2, &p2, &bn2);
    int n2 = 2 * c.router_n;
    ok = 1;
    for (int l = 0; l < c.num_layers; l++) {
        for (int i = 0; i < n2; i++) {
            ok &= bn2[l * 2 * n2 + i] == 0.0f;
            ok &= bn2[l * 2 * n2 + n2 + i] == 1.0f;
        }
    }
    test_check_why(ok, "model_file_write(bn_stats = NULL) stores mean 0 / var 1 per layer", "");
    free(p2);
    free(bn2);

    // gelu: no BN section
    ModelConfig g = micro_config(FFN_GELU);
    size_t Pg = model_config_num_params(&g);
    float* pg = random_floats(&rng, Pg);
    char path_gelu[600];
    snprintf(path_gelu, sizeof(path_gelu), "%s/gelu.bin", dir);
    if (model_file_write(path_gelu, &g, pg, NULL) != 0) exit(EXIT_FAILURE);
    model_file_read(path_gelu, &c2, &p2, &bn2);
    ok = model_config_first_difference(&g, &c2) < 0 && bits_equal(pg, p2, Pg * 4) && bn2 == NULL &&
         ckpt_file_size_(path_gelu) == 1024 + 4 * (int64_t)Pg + 16;
    test_check_why(ok, "model file round trip (gelu, no BN section) is bitwise", "");
    free(p2);
    free(pg);

    // moe (docs/design.md §10): its fields in slots 60-69, every one of them compared on resume
    ModelConfig mc = micro_config(FFN_SWIGLU);
    mc.ffn_kind = FFN_MOE;
    mc.ffn_hidden = 8;
    mc.moe_experts = 3; mc.moe_topk = 2; mc.moe_shared = 1; mc.moe_zero = 1; mc.moe_copy = 1; mc.moe_const = 2;
    mc.moe_gate_res = 1; mc.moe_norm_topk = 1; mc.moe_router = MOE_ROUTER_TANH; mc.moe_input_scale = 1;
    size_t Pm = model_config_num_params(&mc);
    float* pm = random_floats(&rng, Pm);
    char path_moe[600];
    snprintf(path_moe, sizeof(path_moe), "%s/moe.bin", dir);
    if (model_file_write(path_moe, &mc, pm, NULL) != 0) exit(EXIT_FAILURE);
    model_file_read(path_moe, &c2, &p2, &bn2);
    ok = model_config_first_difference(&mc, &c2) < 0 && bits_equal(pm, p2, Pm * 4) && bn2 == NULL;
    {
        size_t n;
        unsigned char* raw = test_read_file(path_moe, &n);
        int32_t h[256];
        memcpy(h, raw, sizeof(h));
        const int want[10] = {3, 2, 1, 1, 1, 2, 1, 1, 1, 1};
        for (int i = 0; i < 10; i++) ok &= h[60 + i] == want[i];
        ok &= h[8] == FFN_MOE && h[9] == 8;
        free(raw);
    }
    int fields_ok = 1;
    const size_t moe_fields[10] = {offsetof(ModelConfig, moe_experts), offsetof(ModelConfig, moe_topk),
                                   offsetof(ModelConfig, moe_shared), offsetof(ModelConfig, moe_zero),
                                   offsetof(ModelConfig, moe_copy), offsetof(ModelConfig, moe_const),
                                   offsetof(ModelConfig, moe_gate_res), offsetof(ModelConfig, moe_norm_topk),
                                   offsetof(ModelConfig, moe_router), offsetof(ModelConfig, moe_input_scale)};
    for (int i = 0; i < 10; i++) {  // each moe field alone makes the configs differ, named by its flag
        ModelConfig other = mc;
        *(int*)((char*)&other + moe_fields[i]) += 1;
        int d = model_config_first_difference(&mc, &other);
        fields_ok &= d == 13 + i && strstr(model_config_field_name(d), "--moe-") != NULL;
    }
    test_check_why(ok && fields_ok, "model file round trip (moe with every MoE++ option) is bitwise, fields in slots "
                   "60-69, each compared by model_config_first_difference", "");
    free(p2);
    free(pm);

    // errors
    char bad[600];
    snprintf(bad, sizeof(bad), "%s/missing.bin", dir);
    test_expect_exit_failure("model file: missing file is refused", child_model_read, bad, "missing.bin", "cannot open");

    copy_as(bad, sizeof(bad), dir, "badmagic.bin", path);
    write_i32_at(bad, 0, CHECKPOINT_MAGIC);
    test_expect_exit_failure("model file: wrong magic is refused (with a hint)", child_model_read, bad, "bad magic",
                        "training checkpoint");

    copy_as(bad, sizeof(bad), dir, "badversion.bin", path);
    test_xor_byte(bad, 4, 0x01);  // version 2 -> 3
    test_expect_exit_failure("model file: wrong version is refused", child_model_read, bad, "version 3", NULL);

    copy_as(bad, sizeof(bad), dir, "truncated.bin", path);
    test_truncate(bad, (long)(ckpt_file_size_(path) - 4));
    test_expect_exit_failure("model file: truncated by 4 bytes is refused", child_model_read, bad, "truncated", NULL);

    copy_as(bad, sizeof(bad), dir, "shortheader.bin", path);
    test_truncate(bad, 100);
    test_expect_exit_failure("model file: truncated header is refused", child_model_read, bad, "truncated", "100 bytes");

    copy_as(bad, sizeof(bad), dir, "extra.bin", path);
    {
        FILE* fp = fopen_check(bad, "ab");
        float extra = 1.0f;
        fwrite_check(&extra, 4, 1, fp, bad);
        fclose_check(fp, bad);
    }
    test_expect_exit_failure("model file: trailing bytes are refused", child_model_read, bad, "extra bytes", NULL);

    copy_as(bad, sizeof(bad), dir, "badconfig.bin", path);
    write_i32_at(bad, 11 * 4, 15);  // num_experts slot: not n*n
    test_expect_exit_failure("model file: impossible config is refused", child_model_read, bad, "num_experts must equal",
                        "badconfig.bin");

    copy_as(bad, sizeof(bad), dir, "badslot.bin", path);
    test_xor_byte(bad, 20 * 4, 0x01);
    test_expect_exit_failure("model file: non-zero unused header slot is refused", child_model_read, bad, "slot 20", NULL);

    free(params);
    free(bn);
}

// ----------------------------------------------------------------------------
// checksum

static void test_checksum(void) {
    CheckpointHash s;
    unsigned char bytes[100];
    for (int i = 0; i < 100; i++) bytes[i] = (unsigned char)i;
    checkpoint_hash_init(&s);
    uint64_t empty = checkpoint_hash_final(&s);
    checkpoint_hash_update(&s, bytes, 100);
    uint64_t h100 = checkpoint_hash_final(&s);
    checkpoint_hash_init(&s);
    checkpoint_hash_update(&s, "OMNI", 4);
    uint64_t omni = checkpoint_hash_final(&s);
    checkpoint_hash_init(&s);
    checkpoint_hash_update(&s, "abc", 3);
    uint64_t abc = checkpoint_hash_final(&s);
    // XXH64 (seed 0) test vectors published with xxHash (e.g. python-xxhash's xxh64("abc"))
    int ok = empty == 0xef46db3751d8e999ull && abc == 0x44bc2cf5ad770999ull && omni != h100;
    test_check_why(ok, "checksum is XXH64 (known answers)", "");
    // any split of the input gives the same value
    ok = 1;
    for (int split = 1; split < 17 && ok; split++) {
        checkpoint_hash_init(&s);
        for (int i = 0; i < 100; i += split) checkpoint_hash_update(&s, bytes + i, (size_t)(100 - i < split ? 100 - i : split));
        ok = checkpoint_hash_final(&s) == h100;
    }
    test_check_why(ok, "checksum is independent of how the bytes are split into updates", "");
}

// ----------------------------------------------------------------------------
// checkpoints

static void test_checkpoint_roundtrip(void) {
    char dir[512], path[CHECKPOINT_PATH_MAX], detail[256];
    test_tmp_subdir(dir, sizeof(dir), "ckpt");
    CkptData d;
    ckpt_data_make(&d, 11, 1234);
    ckpt_data_write(&d, dir, path);
    char expected_path[CHECKPOINT_PATH_MAX];
    snprintf(expected_path, sizeof(expected_path), "%s/ckpt_00001234.bin", dir);
    test_check_why(strcmp(path, expected_path) == 0, "checkpoint_write names the file ckpt_<step:08d>.bin", path);
    char tmp[CHECKPOINT_PATH_MAX + 8];
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    test_check_why(test_file_exists(path) && !test_file_exists(tmp), "checkpoint_write leaves no .tmp behind", "");
    int64_t expected_size = 1024 + 12 * (int64_t)d.P + 4 * (int64_t)(d.NB * d.bn_sets) + 37 + 19 + 16;
    snprintf(detail, sizeof(detail), "size %lld, expected %lld", (long long)ckpt_file_size_(path), (long long)expected_size);
    test_check_why(ckpt_file_size_(path) == expected_size, "checkpoint size = header + sections + trailer", detail);
    char why[256] = "";
    test_check_why(checkpoint_verify(path, why, sizeof(why)) == 1, "checkpoint_verify accepts a good checkpoint", why);

    float* p = (float*)malloc_check(d.P * 4);
    float* m = (float*)malloc_check(d.P * 4);
    float* v = (float*)malloc_check(d.P * 4);
    float* bn = (float*)malloc_check(d.NB * d.bn_sets * 4);
    unsigned char loader[37], rng_blob[19];
    // poison the destinations: unwritten bytes would show
    memset(p, 0xFF, d.P * 4);
    memset(m, 0xFF, d.P * 4);
    memset(v, 0xFF, d.P * 4);
    memset(bn, 0xFF, d.NB * d.bn_sets * 4);
    memset(loader, 0xFF, sizeof(loader));
    memset(rng_blob, 0xFF, sizeof(rng_blob));
    CheckpointInfo info;
    checkpoint_read(path, &d.config, &info, p, m, v, bn, d.bn_sets, loader, 37, rng_blob, 19);
    int ok = bits_equal(p, d.params, d.P * 4) && bits_equal(m, d.m, d.P * 4) && bits_equal(v, d.v, d.P * 4) &&
             bits_equal(bn, d.bn, d.NB * d.bn_sets * 4) && bits_equal(loader, d.loader, 37) &&
             bits_equal(rng_blob, d.rng_blob, 19);
    test_check_why(ok, "checkpoint round trip: params, m, v, BN sets, loader and RNG blobs bitwise", "");
    const CheckpointInfo* in = &d.info;
    ok = info.step == in->step && info.adam_t == in->adam_t && info.tokens_seen == in->tokens_seen &&
         bits_equal(&info.run, &in->run, sizeof(RunIdentity)) &&
         info.num_params == (long long)d.P && info.num_bn_stats == (long long)d.NB && info.num_bn_sets == d.bn_sets &&
         info.loader_bytes == 37 && info.rng_bytes == 19;
    test_check_why(ok, "checkpoint round trip: every run field and section size", "");

    ModelConfig c_info;
    CheckpointInfo info2;
    checkpoint_read_info(path, &c_info, &info2);
    test_check_why(model_config_first_difference(&c_info, &d.config) < 0 && info2.step == 1234 && info2.loader_bytes == 37,
          "checkpoint_read_info returns config, run fields and sizes", "");

    // streamed writer, odd pieces: the same bytes as the one-call writer
    char dir2[512], path2[CHECKPOINT_PATH_MAX];
    test_tmp_subdir(dir2, sizeof(dir2), "ckpt_stream");
    CheckpointInfo sinfo = d.info;
    sinfo.num_params = (long long)d.P;
    sinfo.num_bn_stats = (long long)d.NB;
    sinfo.num_bn_sets = d.bn_sets;
    sinfo.loader_bytes = 37;
    sinfo.rng_bytes = 19;
    CheckpointWriter w;
    checkpoint_writer_open(&w, dir2, &d.config, &sinfo);
    size_t all = 3 * d.P * 4 + d.NB * d.bn_sets * 4 + 37 + 19;
    unsigned char* concat = (unsigned char*)malloc_check(all);
    size_t o = 0;
    memcpy(concat + o, d.params, d.P * 4); o += d.P * 4;
    memcpy(concat + o, d.m, d.P * 4); o += d.P * 4;
    memcpy(concat + o, d.v, d.P * 4); o += d.P * 4;
    memcpy(concat + o, d.bn, d.NB * d.bn_sets * 4); o += d.NB * d.bn_sets * 4;
    memcpy(concat + o, d.loader, 37); o += 37;
    memcpy(concat + o, d.rng_blob, 19); o += 19;
    char final2[CHECKPOINT_PATH_MAX], tmp2[CHECKPOINT_PATH_MAX + 8];
    checkpoint_path(final2, sizeof(final2), dir2, d.info.step);
    snprintf(tmp2, sizeof(tmp2), "%s.tmp", final2);
    int half_done = 0;
    for (size_t i = 0, piece = 1; i < all; i += piece, piece = piece * 3 % 1001 + 1) {
        size_t n = all - i < piece ? all - i : piece;
        checkpoint_writer_put(&w, concat + i, n);
        if (!half_done && i > all / 2) {
            half_done = 1;
            // mid-write (a crash here): only the .tmp name exists, resume would find nothing
            char found[CHECKPOINT_PATH_MAX];
            test_check_why(!test_file_exists(final2) && test_file_exists(tmp2) && checkpoint_find_latest(dir2, found) == -1,
                  "mid-write only <name>.tmp exists and find_latest finds nothing", "");
        }
    }
    int closed = checkpoint_writer_close(&w, path2);
    test_check_why(closed == 0 && strcmp(path2, final2) == 0 && test_file_exists(final2) && !test_file_exists(tmp2),
          "after close the final name exists and the .tmp is gone", path2);
    size_t n1, n2;
    unsigned char* f1 = test_read_file(path, &n1);
    unsigned char* f2 = test_read_file(path2, &n2);
    test_check_why(f1 && f2 && n1 == n2 && memcmp(f1, f2, n1) == 0, "streamed writer (odd pieces) = one-call writer, byte for byte", "");
    // streamed reader, odd pieces
    CheckpointReader r;
    checkpoint_reader_open(&r, path2, &d.config, NULL, NULL);
    unsigned char* back = (unsigned char*)malloc_check(all);
    memset(back, 0xFF, all);
    for (size_t i = 0, piece = 5; i < all; i += piece, piece = piece * 7 % 997 + 1) {
        size_t n = all - i < piece ? all - i : piece;
        checkpoint_reader_get(&r, back + i, n);
    }
    checkpoint_reader_close(&r);
    test_check_why(memcmp(back, concat, all) == 0, "streamed reader (odd pieces) returns every section byte", "");
    // skipping sections (NULL destinations) still verifies
    checkpoint_read(path, &d.config, NULL, p, NULL, NULL, NULL, d.bn_sets, NULL, 37, NULL, 19);
    test_check_why(bits_equal(p, d.params, d.P * 4), "checkpoint_read with NULL destinations reads the rest", "");
    free(back);
    free(concat);
    free(f1);
    free(f2);

    // m, v NULL -> zeros
    char dir3[512], path3[CHECKPOINT_PATH_MAX];
    test_tmp_subdir(dir3, sizeof(dir3), "ckpt_nomv");
    if (checkpoint_write(dir3, &d.config, &d.info, d.params, NULL, NULL, d.bn, d.bn_sets, d.loader, 37, d.rng_blob, 19,
                         path3) != 0) {
        exit(EXIT_FAILURE);
    }
    checkpoint_read(path3, &d.config, NULL, p, m, v, bn, d.bn_sets, loader, 37, rng_blob, 19);
    ok = 1;
    for (size_t i = 0; i < d.P; i++) ok &= m[i] == 0.0f && v[i] == 0.0f;
    test_check_why(ok && bits_equal(p, d.params, d.P * 4), "checkpoint_write(m = v = NULL) stores zero moments", "");

    // a newer checkpoint leaves the older one untouched
    size_t before_n;
    unsigned char* before = test_read_file(path, &before_n);
    CkptData d2;
    ckpt_data_make(&d2, 12, 1300);
    ckpt_data_write(&d2, dir, NULL);
    size_t after_n;
    unsigned char* after = test_read_file(path, &after_n);
    test_check_why(before && after && before_n == after_n && memcmp(before, after, before_n) == 0,
          "writing a newer checkpoint leaves the previous one byte-identical", "");
    free(before);
    free(after);
    ckpt_data_free(&d2);

    free(p);
    free(m);
    free(v);
    free(bn);
    ckpt_data_free(&d);
}

static void test_checkpoint_damage(void) {
    char dir[512], good[CHECKPOINT_PATH_MAX], bad[CHECKPOINT_PATH_MAX + 32], why[256], detail[512];
    test_tmp_subdir(dir, sizeof(dir), "damage");
    CkptData d;
    ckpt_data_make(&d, 21, 500);
    ckpt_data_write(&d, dir, good);
    int64_t size = ckpt_file_size_(good);
    copy_as(bad, sizeof(bad), dir, "flipped.bin", good);

    // flip every byte of the file, one at a time: verify must reject each
    long undetected = 0, first_undetected = -1;
    for (long off = 0; off < (long)size; off++) {
        test_xor_byte(bad, off, 0xFF);
        if (checkpoint_verify(bad, why, sizeof(why))) {
            if (first_undetected < 0) first_undetected = off;
            undetected++;
        }
        test_xor_byte(bad, off, 0xFF);
    }
    snprintf(detail, sizeof(detail), "%ld of %lld flips undetected (first at byte %ld)", undetected, (long long)size,
             first_undetected);
    test_check_why(undetected == 0, "a flipped byte anywhere in the file is detected by checkpoint_verify", detail);
    test_check_why(checkpoint_verify(bad, why, sizeof(why)) == 1, "the file verifies again once restored", why);

    // checkpoint_read must exit with a clear message for flips in every region
    int64_t P4 = 4 * (int64_t)d.P;
    struct { const char* region; int64_t offset; const char* needle; } flips[] = {
        {"header config slot (num_layers)", 5 * 4, "checksum mismatch"},
        {"header run field (step)", 20 * 4 + 1, "checksum mismatch"},
        {"header size field", 56 * 4, "header says"},
        {"params", 1024 + 17, "checksum mismatch"},
        {"m", 1024 + P4 + 5, "checksum mismatch"},
        {"v", 1024 + 2 * P4 + P4 - 1, "checksum mismatch"},
        {"bn stats", 1024 + 3 * P4 + 3, "checksum mismatch"},
        {"loader blob", size - 16 - 19 - 37 + 36, "checksum mismatch"},
        {"rng blob", size - 16 - 1, "checksum mismatch"},
        {"stored checksum", size - 16 + 2, "checksum mismatch"},
        {"end magic", size - 3, "end magic"},
    };
    for (size_t i = 0; i < sizeof(flips) / sizeof(flips[0]); i++) {
        test_xor_byte(bad, (long)flips[i].offset, 0x10);
        ReadArgs a = {bad, &d.config, &d, d.bn_sets, 37};
        char name[256];
        snprintf(name, sizeof(name), "checkpoint_read refuses a flipped byte in the %s", flips[i].region);
        test_expect_exit_failure(name, child_checkpoint_read, &a, flips[i].needle, "flipped.bin");
        test_xor_byte(bad, (long)flips[i].offset, 0x10);
    }

    // truncation
    long cuts[] = {(long)size - 1, (long)size - 16, (long)size - 17, (long)size / 2, 1024, 10, 0};
    for (size_t i = 0; i < sizeof(cuts) / sizeof(cuts[0]); i++) {
        char tpath[CHECKPOINT_PATH_MAX + 32], name[256];
        char tname[32];
        snprintf(tname, sizeof(tname), "trunc_%zu.bin", i);
        copy_as(tpath, sizeof(tpath), dir, tname, good);
        test_truncate(tpath, cuts[i]);
        snprintf(name, sizeof(name), "checkpoint_verify rejects a file truncated to %ld bytes", cuts[i]);
        test_check_why(checkpoint_verify(tpath, why, sizeof(why)) == 0 && strstr(why, "truncated") != NULL, name, why);
        ReadArgs a = {tpath, &d.config, &d, d.bn_sets, 37};
        snprintf(name, sizeof(name), "checkpoint_read refuses a file truncated to %ld bytes", cuts[i]);
        test_expect_exit_failure(name, child_checkpoint_read, &a, "truncated", "trunc_");
    }

    // wrong magic, wrong version
    char mpath[CHECKPOINT_PATH_MAX + 32];
    copy_as(mpath, sizeof(mpath), dir, "magic.bin", good);
    write_i32_at(mpath, 0, MODEL_FILE_MAGIC);
    ReadArgs am = {mpath, &d.config, &d, d.bn_sets, 37};
    test_expect_exit_failure("checkpoint_read refuses a wrong magic (model file given)", child_checkpoint_read, &am,
                        "bad magic number 20261101", "model file");
    test_check_why(checkpoint_verify(mpath, why, sizeof(why)) == 0 && strstr(why, "magic"), "checkpoint_verify rejects a wrong magic", why);
    char vpath[CHECKPOINT_PATH_MAX + 32];
    copy_as(vpath, sizeof(vpath), dir, "version.bin", good);
    test_xor_byte(vpath, 4, 0x03);  // version 1 -> 2
    ReadArgs av = {vpath, &d.config, &d, d.bn_sets, 37};
    test_expect_exit_failure("checkpoint_read refuses version 2", child_checkpoint_read, &av, "version 2", NULL);

    // model mismatch: the first differing field is named
    ModelConfig other = d.config;
    other.top_k = 4;
    ReadArgs ak = {good, &other, &d, d.bn_sets, 37};
    test_expect_exit_failure("checkpoint_read refuses a different top_k, naming it", child_checkpoint_read, &ak,
                        "top_k (--topk) is 3 in the checkpoint but 4", NULL);
    other = d.config;
    other.channels = 16;
    other.num_heads = 4;
    ReadArgs ac = {good, &other, &d, d.bn_sets, 37};
    test_expect_exit_failure("checkpoint_read names the first differing field (num_heads before channels)",
                        child_checkpoint_read, &ac, "num_heads is 2 in the checkpoint but 4", NULL);
    other = d.config;
    other.gate = GATE_PROB;
    ReadArgs ag = {good, &other, &d, d.bn_sets, 37};
    test_expect_exit_failure("checkpoint_read refuses a different gate (same sizes)", child_checkpoint_read, &ag,
                        "gate (--gate) is softmax in the checkpoint but prob", NULL);

    // wrong caller sizes
    ReadArgs al = {good, &d.config, &d, d.bn_sets, 36};
    test_expect_exit_failure("checkpoint_read refuses a data-loader blob of another size", child_checkpoint_read, &al,
                        "data-loader state has 37 bytes", NULL);
    ReadArgs ab = {good, &d.config, &d, 1, 37};
    test_expect_exit_failure("checkpoint_read refuses another number of BN sets", child_checkpoint_read, &ab,
                        "2 sets of BN statistics", NULL);
    ReadArgs ax = {"/nonexistent/ckpt_00000001.bin", &d.config, &d, d.bn_sets, 37};
    test_expect_exit_failure("checkpoint_read refuses a missing file", child_checkpoint_read, &ax, "cannot open", NULL);
    ckpt_data_free(&d);
}

static void test_find_latest(void) {
    char dir[512], path[CHECKPOINT_PATH_MAX], out[8192], expect[1024];
    test_tmp_subdir(dir, sizeof(dir), "latest");
    char found[CHECKPOINT_PATH_MAX] = "";
    test_check_why(checkpoint_find_latest(dir, found) == -1, "find_latest: empty directory -> -1", "");
    test_check_why(checkpoint_find_latest("/nonexistent_dir_for_test", found) == -1, "find_latest: missing directory -> -1", "");

    CkptData d;
    ckpt_data_make(&d, 31, 10);
    ckpt_data_write(&d, dir, NULL);
    d.info.step = 20;
    ckpt_data_write(&d, dir, NULL);
    d.info.step = 9;
    ckpt_data_write(&d, dir, NULL);
    // step 30: complete bytes but still under the .tmp name (crash before rename)
    d.info.step = 30;
    ckpt_data_write(&d, dir, path);
    char tmp30[CHECKPOINT_PATH_MAX + 8];
    snprintf(tmp30, sizeof(tmp30), "%s.tmp", path);
    rename(path, tmp30);
    // step 40: corrupt payload; step 50: truncated; step 60: garbage name variants
    d.info.step = 40;
    ckpt_data_write(&d, dir, path);
    test_xor_byte(path, 2000, 0x40);
    d.info.step = 50;
    ckpt_data_write(&d, dir, path);
    test_truncate(path, 3000);
    char junk[CHECKPOINT_PATH_MAX];
    snprintf(junk, sizeof(junk), "%s/ckpt_abc.bin", dir);
    test_write_file(junk, "x", 1);
    snprintf(junk, sizeof(junk), "%s/ckpt_00000070.binx", dir);
    test_write_file(junk, "x", 1);
    snprintf(junk, sizeof(junk), "%s/notes.txt", dir);
    test_write_file(junk, "x", 1);

    int code = test_run_child(child_find_latest, dir, out, sizeof(out));
    snprintf(expect, sizeof(expect), "RESULT 20 %s/ckpt_00000020.bin", dir);
    test_check_why(code == 0 && strstr(out, expect) != NULL, "find_latest picks the newest complete, verified checkpoint (20)", out);
    test_check_why(strstr(out, "ckpt_00000030.bin.tmp") && strstr(out, "unfinished"), "find_latest warns about the .tmp file", out);
    test_check_why(strstr(out, "ckpt_00000040.bin: checksum mismatch") != NULL, "find_latest skips the corrupt newest with a warning", out);
    test_check_why(strstr(out, "ckpt_00000050.bin: truncated") != NULL, "find_latest skips the truncated one with a warning", out);
    test_check_why(strstr(out, "ckpt_abc") == NULL && strstr(out, "00000070") == NULL, "find_latest ignores other names", out);
    printf("      find_latest output: %s", out);

    // once 20 is gone too, 10 is next (9 < 10 by number, not by listing order)
    snprintf(path, sizeof(path), "%s/ckpt_00000020.bin", dir);
    test_xor_byte(path, 1500, 0x01);
    int step = checkpoint_find_latest(dir, found);
    snprintf(expect, sizeof(expect), "%s/ckpt_00000010.bin", dir);
    test_check_why(step == 10 && strcmp(found, expect) == 0, "find_latest falls back to the next complete one (10)", found);
    ckpt_data_free(&d);
}

// checkpoint_compare_run in a child: its exit code is the number of notes it printed
typedef struct {
    CheckpointInfo saved;
    RunIdentity now;
} CompareRunArgs;

static void child_compare_run(void* arg) {
    CompareRunArgs* a = (CompareRunArgs*)arg;
    int notes = checkpoint_compare_run("dir/ckpt_00000010.bin", &a->saved, &a->now);
    fflush(NULL);
    _exit(notes);
}

// the run settings of `written` (the data of test_compare_run) through a checkpoint header h of a
// micro model of `ffn_kind`, read back into `back`; then a resume with `resumed`'s settings: its
// notes (out) and their count
static int run_header_resume_notes(const TrainConfig* written, const TrainConfig* resumed, int ffn_kind, int32_t* h,
                                   CheckpointInfo* back, char* out, size_t out_size) {
    RunIdentity run = train_config_run_identity(written, 0x1234abcd5678ef90ull, 338025, 1);
    CheckpointInfo info;
    checkpoint_info_from_run(&info, &run, 10, 10, 2560);
    ModelConfig mc = micro_config(ffn_kind), mc_back;
    checkpoint_header_from_(&mc, &info, h);
    checkpoint_header_to_(h, &mc_back, back);
    CompareRunArgs b;
    b.saved = *back;
    b.now = train_config_run_identity(resumed, 0x1234abcd5678ef90ull, 338025, 1);
    return test_run_child(child_compare_run, &b, out, out_size);
}

// resuming with changed hyperparameters prints one note per change, none when nothing changed;
// other data, order, seed or window shape end the program naming the difference
static void test_compare_run(void) {
    CompareRunArgs a;
    TrainConfig cfg;
    train_config_defaults(&cfg);
    cfg.B = 4;
    cfg.T = 64;
    RunIdentity run = train_config_run_identity(&cfg, 0x1234abcd5678ef90ull, 338025, 1);
    checkpoint_info_from_run(&a.saved, &run, 10, 10, 2560);
    a.now = run;
    char out[4096];
    int notes = test_run_child(child_compare_run, &a, out, sizeof(out));
    test_check_why(notes == 0 && out[0] == '\0', "compare_run: the same settings give no note", out);
    cfg.learning_rate = 1e-4f;
    cfg.num_steps = 2000;
    cfg.total_batch_size = 512;
    a.now = train_config_run_identity(&cfg, 0x1234abcd5678ef90ull, 338025, 1);
    notes = test_run_child(child_compare_run, &a, out, sizeof(out));
    int ok = notes == 3 && strstr(out, "resuming with -l 0.0001") && strstr(out, "resuming with -x 2000 (") &&
             strstr(out, "resuming with -d (tokens per step) 512 (");
    test_check_why(ok, "compare_run: changed -l, -x and -d give one note each", out);
    {  // moe run settings: kept in header slots 70-72, a change gives a note
        TrainConfig m = cfg;
        m.moe_aux = 0.03f;
        m.moe_zc_weight = 0.5f;
        m.moe_bias_rate = 1e-3f;
        TrainConfig resumed = m;
        resumed.moe_aux = 0.01f;
        CheckpointInfo back;
        int32_t h[OMNI_HEADER_INTS];
        int moe_notes = run_header_resume_notes(&m, &resumed, FFN_SWIGLU, h, &back, out, sizeof(out));
        int round_trip = back.run.moe_aux == 0.03f && back.run.moe_zc_weight == 0.5f && back.run.moe_bias_rate == 1e-3f;
        test_check_why(round_trip && moe_notes == 1 && strstr(out, "resuming with --moe-aux 0.01 (the checkpoint was "
                       "written with 0.03)"), "compare_run: the moe run settings survive the header, a changed "
                       "--moe-aux gives a note", out);
    }
    {  // -r (--recompute): kept in header slot 74, a change on resume gives a note (memory only)
        TrainConfig rc = cfg;
        rc.recompute = 2;
        TrainConfig resumed = rc;
        resumed.recompute = 1;
        CheckpointInfo back;
        int32_t h[OMNI_HEADER_INTS];
        int rc_notes = run_header_resume_notes(&rc, &resumed, FFN_GELU, h, &back, out, sizeof(out));
        int round_trip = h[74] == 2 && back.run.recompute == 2;
        test_check_why(round_trip && rc_notes == 1 && strstr(out, "resuming with -r (--recompute) 1 (the checkpoint "
                       "was written with 2)"), "compare_run: -r survives the header (slot 74), a changed -r gives a "
                       "note", out);
    }
    struct { const char* name; unsigned long long seed; int shuffle, B, T; uint64_t fp; long long tokens; int shards;
             const char* expected; } refused[] = {
        {"--seed", 43, 1, 4, 64, 0x1234abcd5678ef90ull, 338025, 1, "was written with --seed 42, this run has --seed 43"},
        {"--shuffle", 42, 0, 4, 64, 0x1234abcd5678ef90ull, 338025, 1, "was written with --shuffle 1, this run has --shuffle 0"},
        {"-b", 42, 1, 8, 32, 0x1234abcd5678ef90ull, 338025, 1, "was written with -b 4 -t 64, this run has -b 8 -t 32"},
        {"data tokens", 42, 1, 4, 64, 0x1234abcd5678ef90ull, 338026, 1, "1 shard(s) with 338025 tokens, this run has 1 shard(s) with 338026"},
        {"data shards", 42, 1, 4, 64, 0x1234abcd5678ef90ull, 338025, 2, "this run has 2 shard(s)"},
        {"data fingerprint", 42, 1, 4, 64, 0x1234abcd5678ef91ull, 338025, 1, "fingerprint 1234abcd5678ef90, this run's data"},
    };
    for (size_t i = 0; i < sizeof(refused) / sizeof(refused[0]); i++) {
        TrainConfig c2 = cfg;
        c2.seed = refused[i].seed;
        c2.shuffle = refused[i].shuffle;
        c2.B = refused[i].B;
        c2.T = refused[i].T;
        c2.total_batch_size = -1;
        a.now = train_config_run_identity(&c2, refused[i].fp, refused[i].tokens, refused[i].shards);
        int status = test_run_child(child_compare_run, &a, out, sizeof(out));
        char name[128];
        snprintf(name, sizeof(name), "compare_run: a changed %s is refused, naming it", refused[i].name);
        test_check_why(status == EXIT_FAILURE && strstr(out, "checkpoint \"dir/ckpt_00000010.bin\" was written with") &&
              strstr(out, refused[i].expected) && strstr(out, "another -o directory"), name, out);
    }
}

// ----------------------------------------------------------------------------

int main(void) {
    test_begin("test_checkpoint");
    test_tmp_begin("test_checkpoint");
    test_checksum();
    test_model_files();
    test_checkpoint_roundtrip();
    test_compare_run();
    test_checkpoint_damage();
    test_find_latest();
    test_tmp_end();
    return test_end();
}
