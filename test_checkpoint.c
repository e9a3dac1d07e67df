/*
 * test_checkpoint.c - CPU tests of the host-side trainer headers: llmc/checkpoint.h (model files,
 * training checkpoints, corruption/truncation/mismatch detection, find_latest), llmc/args.h (flag
 * parsing and validation), llmc/schedule.h (learning-rate schedules) and llmc/logger.h (JSONL log).
 * Cases that must end the program run in a forked child whose exit status and message are checked.
 *
 *   gcc -O2 -Wall -Wextra -std=c11 test_checkpoint.c -o test_checkpoint -lm && ./test_checkpoint
 *
 * Prints one PASS/FAIL line per check and exits non-zero when any check fails.
 */
#define _POSIX_C_SOURCE 200809L
#include "llmc/utils.h"
#include "llmc/checkpoint.h"
#include "llmc/args.h"
#include "llmc/schedule.h"
#include "llmc/logger.h"
#include "llmc/rand.h"
#include <sys/wait.h>
#include <unistd.h>
#include <dirent.h>

// ----------------------------------------------------------------------------
// reporting

static int num_pass = 0, num_fail = 0;

static void check(int ok, const char* name, const char* detail) {
    if (ok) {
        num_pass++;
        printf("PASS %s\n", name);
    } else {
        num_fail++;
        printf("FAIL %s%s%s\n", name, detail && detail[0] ? ": " : "", detail ? detail : "");
    }
    fflush(stdout);
}

// ----------------------------------------------------------------------------
// files and directories

static char tmp_root[256];

static void remove_tree(const char* path) {
    struct stat st;
    if (lstat(path, &st) != 0) return;
    if (S_ISDIR(st.st_mode)) {
        DIR* d = opendir(path);
        if (d) {
            struct dirent* e;
            while ((e = readdir(d)) != NULL) {
                if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
                char child[1024];
                snprintf(child, sizeof(child), "%s/%s", path, e->d_name);
                remove_tree(child);
            }
            closedir(d);
        }
        rmdir(path);
    } else {
        unlink(path);
    }
}

static void make_subdir(char* out, size_t size, const char* name) {
    snprintf(out, size, "%s/%s", tmp_root, name);
    checkpoint_make_dir(out);
}

static unsigned char* read_all(const char* path, size_t* size) {
    FILE* fp = fopen(path, "rb");
    if (!fp) return NULL;
    int64_t n = ckpt_file_size_(path);
    unsigned char* buf = (unsigned char*)malloc_check((size_t)n + 1);
    size_t got = fread(buf, 1, (size_t)n, fp);
    fclose(fp);
    if (got != (size_t)n) {
        free(buf);
        return NULL;
    }
    *size = (size_t)n;
    return buf;
}

static void write_all(const char* path, const void* data, size_t size) {
    FILE* fp = fopen_check(path, "wb");
    fwrite_check(data, 1, size, fp, path);
    fclose_check(fp, path);
}

static void copy_file(const char* from, const char* to) {
    size_t n;
    unsigned char* buf = read_all(from, &n);
    if (!buf) {
        fprintf(stderr, "test setup: cannot read %s\n", from);
        exit(2);
    }
    write_all(to, buf, n);
    free(buf);
}

static void xor_byte_at(const char* path, long offset, unsigned char mask) {
    FILE* fp = fopen_check(path, "r+b");
    fseek_check(fp, offset, SEEK_SET, path);
    int c = fgetc(fp);
    fseek_check(fp, offset, SEEK_SET, path);
    fputc(c ^ mask, fp);
    fclose_check(fp, path);
}

static void truncate_to(const char* path, long size) {
    if (truncate(path, (off_t)size) != 0) {
        fprintf(stderr, "test setup: truncate %s failed\n", path);
        exit(2);
    }
}

static int file_exists(const char* path) {
    struct stat st;
    return stat(path, &st) == 0;
}

// ----------------------------------------------------------------------------
// forked children: the failing cases must exit non-zero with a message

typedef void (*child_fn)(void* arg);

// Runs fn(arg) in a child with stdout+stderr captured into out. Returns the exit status, 999 when
// the child returned from fn (it should have exited), 1000 + signal when it crashed.
static int run_child(child_fn fn, void* arg, char* out, size_t out_size) {
    char capture[512];
    snprintf(capture, sizeof(capture), "%s/child_output.txt", tmp_root);
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) {
        perror("fork");
        exit(2);
    }
    if (pid == 0) {
        FILE* fp = fopen(capture, "wb");
        if (!fp) _exit(3);
        dup2(fileno(fp), 1);
        dup2(fileno(fp), 2);
        fn(arg);
        fflush(NULL);
        _exit(99);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    out[0] = '\0';
    FILE* fp = fopen(capture, "rb");
    if (fp) {
        size_t n = fread(out, 1, out_size - 1, fp);
        out[n] = '\0';
        fclose(fp);
    }
    if (WIFSIGNALED(status)) return 1000 + WTERMSIG(status);
    int code = WEXITSTATUS(status);
    return code == 99 ? 999 : code;
}

// the child must exit with EXIT_FAILURE and its output must contain every needle (NULL-ended)
static void expect_exit_failure(const char* name, child_fn fn, void* arg, const char* needle1, const char* needle2) {
    char out[8192], detail[8400];
    int code = run_child(fn, arg, out, sizeof(out));
    int ok = code == EXIT_FAILURE;
    if (ok && needle1 && !strstr(out, needle1)) ok = 0;
    if (ok && needle2 && !strstr(out, needle2)) ok = 0;
    // a single line of error is the house style: at most a few lines
    snprintf(detail, sizeof(detail), "exit code %d, output: %.600s", code, out);
    check(ok, name, ok ? "" : detail);
    if (ok) printf("      message: %s", out[0] ? out : "(none)\n");
}

// ----------------------------------------------------------------------------
// test data

static ModelConfig micro_config(int ffn_kind) {
    ModelConfig c;
    memset(&c, 0, sizeof(c));
    c.max_seq_len = 8;
    c.vocab_size = 50;
    c.padded_vocab_size = 128;
    c.num_layers = 2;
    c.num_heads = 2;
    c.channels = 8;
    c.ffn_kind = ffn_kind;
    c.ffn_hidden = ffn_kind == FFN_GELU ? 32 : 16;
    c.router_norm = ROUTER_NORM_BN;
    c.gate = GATE_SOFTMAX;
    if (ffn_kind == FFN_OMNI) {
        c.router_n = 4;
        c.num_experts = 16;
        c.top_k = 3;
    }
    return c;
}

// random floats, never 0
static float* random_floats(Rng* rng, size_t n) {
    float* x = (float*)malloc_check((n > 0 ? n : 1) * sizeof(float));
    rng_normal(rng, x, n, 0.0f, 1.0f);
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
    Rng rng;
    rng_init(&rng, seed);
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
    checkpoint_write(dir, &d->config, &d->info, d->params, d->m, d->v, d->bn, d->bn_sets, d->loader, d->loader_bytes,
                     d->rng_blob, d->rng_bytes, out_path);
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

typedef struct {
    int argc;
    char** argv;
    int num_processes;
    int validate;       // also run train_config_model + train_config_validate
} ParseArgs;

static void child_parse(void* arg) {
    ParseArgs* a = (ParseArgs*)arg;
    TrainConfig cfg;
    train_config_defaults(&cfg);
    train_config_parse(&cfg, a->argc, a->argv);
    cfg.num_processes = a->num_processes > 0 ? a->num_processes : 1;
    if (a->validate) {
        ModelConfig mc;
        if (train_config_model(&cfg, &mc)) train_config_validate(&cfg, &mc);
        else {
            model_file_read_config(cfg.model, &mc);
            train_config_check_file_model(&cfg, &mc);
            train_config_validate(&cfg, &mc);
        }
    }
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
    make_subdir(dir, sizeof(dir), "model");
    Rng rng;
    rng_init(&rng, 7);

    // omni round trip, bitwise
    ModelConfig c = micro_config(FFN_OMNI);
    size_t P = model_config_num_params(&c), NB = model_config_num_bn_stats(&c);
    float* params = random_floats(&rng, P);
    float* bn = random_floats(&rng, NB);
    snprintf(path, sizeof(path), "%s/omni.bin", dir);
    model_file_write(path, &c, params, bn);
    ModelConfig c2;
    float *p2 = NULL, *bn2 = NULL;
    model_file_read(path, &c2, &p2, &bn2);
    int ok = model_config_first_difference(&c, &c2) < 0 && bits_equal(params, p2, P * 4) && bn2 != NULL &&
             bits_equal(bn, bn2, NB * 4);
    snprintf(detail, sizeof(detail), "P=%zu NB=%zu", P, NB);
    check(ok, "model file round trip (omni, params + BN stats) is bitwise", detail);
    check(ckpt_file_size_(path) == 1024 + 4 * (int64_t)(P + NB) + 16, "model file size = 1024 + 4*(params + bn) + 16", "");
    {
        size_t n;
        unsigned char* raw = read_all(path, &n);
        int32_t h[256];
        memcpy(h, raw, sizeof(h));
        int slots_ok = h[0] == 20261101 && h[1] == 2 && h[2] == 8 && h[3] == 50 && h[4] == 128 && h[5] == 2 &&
                       h[6] == 2 && h[7] == 8 && h[8] == 2 && h[9] == 16 && h[10] == 4 && h[11] == 16 && h[12] == 3 &&
                       h[13] == 1 && h[14] == 0;
        for (int s = 15; s < 256; s++) slots_ok &= h[s] == 0;
        slots_ok &= bits_equal(raw + 1024, params, P * 4);
        check(slots_ok, "model file header slots follow formats.md", "");
        free(raw);
    }
    char tmp[640];
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    check(!file_exists(tmp), "model_file_write leaves no .tmp behind", "");
    ModelConfig c3;
    model_file_read_config(path, &c3);
    check(model_config_first_difference(&c, &c3) < 0, "model_file_read_config returns the config", "");
    free(p2);
    free(bn2);

    // bn_stats NULL writes the initial statistics: mean 0, var 1 per layer
    char path_init[600];
    snprintf(path_init, sizeof(path_init), "%s/omni_init.bin", dir);
    model_file_write(path_init, &c, params, NULL);
    model_file_read(path_init, &c2, &p2, &bn2);
    int n2 = 2 * c.router_n;
    ok = 1;
    for (int l = 0; l < c.num_layers; l++) {
        for (int i = 0; i < n2; i++) {
            ok &= bn2[l * 2 * n2 + i] == 0.0f;
            ok &= bn2[l * 2 * n2 + n2 + i] == 1.0f;
        }
    }
    check(ok, "model_file_write(bn_stats = NULL) stores mean 0 / var 1 per layer", "");
    free(p2);
    free(bn2);

    // gelu: no BN section
    ModelConfig g = micro_config(FFN_GELU);
    size_t Pg = model_config_num_params(&g);
    float* pg = random_floats(&rng, Pg);
    char path_gelu[600];
    snprintf(path_gelu, sizeof(path_gelu), "%s/gelu.bin", dir);
    model_file_write(path_gelu, &g, pg, NULL);
    model_file_read(path_gelu, &c2, &p2, &bn2);
    ok = model_config_first_difference(&g, &c2) < 0 && bits_equal(pg, p2, Pg * 4) && bn2 == NULL &&
         ckpt_file_size_(path_gelu) == 1024 + 4 * (int64_t)Pg + 16;
    check(ok, "model file round trip (gelu, no BN section) is bitwise", "");
    free(p2);
    free(pg);

    // errors
    char bad[600];
    snprintf(bad, sizeof(bad), "%s/missing.bin", dir);
    expect_exit_failure("model file: missing file is refused", child_model_read, bad, "missing.bin", "cannot open");

    snprintf(bad, sizeof(bad), "%s/badmagic.bin", dir);
    copy_file(path, bad);
    {
        int32_t magic = CHECKPOINT_MAGIC;
        FILE* fp = fopen_check(bad, "r+b");
        fwrite_check(&magic, 4, 1, fp, bad);
        fclose_check(fp, bad);
    }
    expect_exit_failure("model file: wrong magic is refused (with a hint)", child_model_read, bad, "bad magic",
                        "training checkpoint");

    snprintf(bad, sizeof(bad), "%s/badversion.bin", dir);
    copy_file(path, bad);
    xor_byte_at(bad, 4, 0x01);  // version 2 -> 3
    expect_exit_failure("model file: wrong version is refused", child_model_read, bad, "version 3", NULL);

    snprintf(bad, sizeof(bad), "%s/truncated.bin", dir);
    copy_file(path, bad);
    truncate_to(bad, (long)(ckpt_file_size_(path) - 4));
    expect_exit_failure("model file: truncated by 4 bytes is refused", child_model_read, bad, "truncated", NULL);

    snprintf(bad, sizeof(bad), "%s/shortheader.bin", dir);
    copy_file(path, bad);
    truncate_to(bad, 100);
    expect_exit_failure("model file: truncated header is refused", child_model_read, bad, "truncated", "100 bytes");

    snprintf(bad, sizeof(bad), "%s/extra.bin", dir);
    copy_file(path, bad);
    {
        FILE* fp = fopen_check(bad, "ab");
        float extra = 1.0f;
        fwrite_check(&extra, 4, 1, fp, bad);
        fclose_check(fp, bad);
    }
    expect_exit_failure("model file: trailing bytes are refused", child_model_read, bad, "extra bytes", NULL);

    snprintf(bad, sizeof(bad), "%s/badconfig.bin", dir);
    copy_file(path, bad);
    {
        int32_t fifteen = 15;  // num_experts slot: not n*n
        FILE* fp = fopen_check(bad, "r+b");
        fseek_check(fp, 11 * 4, SEEK_SET, bad);
        fwrite_check(&fifteen, 4, 1, fp, bad);
        fclose_check(fp, bad);
    }
    expect_exit_failure("model file: impossible config is refused", child_model_read, bad, "num_experts must equal",
                        "badconfig.bin");

    snprintf(bad, sizeof(bad), "%s/badslot.bin", dir);
    copy_file(path, bad);
    xor_byte_at(bad, 20 * 4, 0x01);
    expect_exit_failure("model file: non-zero unused header slot is refused", child_model_read, bad, "slot 20", NULL);

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
    check(ok, "checksum is XXH64 (known answers)", "");
    // any split of the input gives the same value
    ok = 1;
    for (int split = 1; split < 17 && ok; split++) {
        checkpoint_hash_init(&s);
        for (int i = 0; i < 100; i += split) checkpoint_hash_update(&s, bytes + i, (size_t)(100 - i < split ? 100 - i : split));
        ok = checkpoint_hash_final(&s) == h100;
    }
    check(ok, "checksum is independent of how the bytes are split into updates", "");
}

// ----------------------------------------------------------------------------
// checkpoints

static void test_checkpoint_roundtrip(void) {
    char dir[512], path[CHECKPOINT_PATH_MAX], detail[256];
    make_subdir(dir, sizeof(dir), "ckpt");
    CkptData d;
    ckpt_data_make(&d, 11, 1234);
    ckpt_data_write(&d, dir, path);
    char expected_path[CHECKPOINT_PATH_MAX];
    snprintf(expected_path, sizeof(expected_path), "%s/ckpt_00001234.bin", dir);
    check(strcmp(path, expected_path) == 0, "checkpoint_write names the file ckpt_<step:08d>.bin", path);
    char tmp[CHECKPOINT_PATH_MAX + 8];
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    check(file_exists(path) && !file_exists(tmp), "checkpoint_write leaves no .tmp behind", "");
    int64_t expected_size = 1024 + 12 * (int64_t)d.P + 4 * (int64_t)(d.NB * d.bn_sets) + 37 + 19 + 16;
    snprintf(detail, sizeof(detail), "size %lld, expected %lld", (long long)ckpt_file_size_(path), (long long)expected_size);
    check(ckpt_file_size_(path) == expected_size, "checkpoint size = header + sections + trailer", detail);
    char why[256] = "";
    check(checkpoint_verify(path, why, sizeof(why)) == 1, "checkpoint_verify accepts a good checkpoint", why);

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
    check(ok, "checkpoint round trip: params, m, v, BN sets, loader and RNG blobs bitwise", "");
    const CheckpointInfo* in = &d.info;
    ok = info.step == in->step && info.adam_t == in->adam_t && info.tokens_seen == in->tokens_seen &&
         bits_equal(&info.run, &in->run, sizeof(RunIdentity)) &&
         info.num_params == (long long)d.P && info.num_bn_stats == (long long)d.NB && info.num_bn_sets == d.bn_sets &&
         info.loader_bytes == 37 && info.rng_bytes == 19;
    check(ok, "checkpoint round trip: every run field and section size", "");

    ModelConfig c_info;
    CheckpointInfo info2;
    checkpoint_read_info(path, &c_info, &info2);
    check(model_config_first_difference(&c_info, &d.config) < 0 && info2.step == 1234 && info2.loader_bytes == 37,
          "checkpoint_read_info returns config, run fields and sizes", "");

    // streamed writer, odd pieces: the same bytes as the one-call writer
    char dir2[512], path2[CHECKPOINT_PATH_MAX];
    make_subdir(dir2, sizeof(dir2), "ckpt_stream");
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
            check(!file_exists(final2) && file_exists(tmp2) && checkpoint_find_latest(dir2, found) == -1,
                  "mid-write only <name>.tmp exists and find_latest finds nothing", "");
        }
    }
    checkpoint_writer_close(&w, path2);
    check(strcmp(path2, final2) == 0 && file_exists(final2) && !file_exists(tmp2),
          "after close the final name exists and the .tmp is gone", path2);
    size_t n1, n2;
    unsigned char* f1 = read_all(path, &n1);
    unsigned char* f2 = read_all(path2, &n2);
    check(f1 && f2 && n1 == n2 && memcmp(f1, f2, n1) == 0, "streamed writer (odd pieces) = one-call writer, byte for byte", "");
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
    check(memcmp(back, concat, all) == 0, "streamed reader (odd pieces) returns every section byte", "");
    // skipping sections (NULL destinations) still verifies
    checkpoint_read(path, &d.config, NULL, p, NULL, NULL, NULL, d.bn_sets, NULL, 37, NULL, 19);
    check(bits_equal(p, d.params, d.P * 4), "checkpoint_read with NULL destinations reads the rest", "");
    free(back);
    free(concat);
    free(f1);
    free(f2);

    // m, v NULL -> zeros
    char dir3[512], path3[CHECKPOINT_PATH_MAX];
    make_subdir(dir3, sizeof(dir3), "ckpt_nomv");
    checkpoint_write(dir3, &d.config, &d.info, d.params, NULL, NULL, d.bn, d.bn_sets, d.loader, 37, d.rng_blob, 19, path3);
    checkpoint_read(path3, &d.config, NULL, p, m, v, bn, d.bn_sets, loader, 37, rng_blob, 19);
    ok = 1;
    for (size_t i = 0; i < d.P; i++) ok &= m[i] == 0.0f && v[i] == 0.0f;
    check(ok && bits_equal(p, d.params, d.P * 4), "checkpoint_write(m = v = NULL) stores zero moments", "");

    // a newer checkpoint leaves the older one untouched
    size_t before_n;
    unsigned char* before = read_all(path, &before_n);
    CkptData d2;
    ckpt_data_make(&d2, 12, 1300);
    ckpt_data_write(&d2, dir, NULL);
    size_t after_n;
    unsigned char* after = read_all(path, &after_n);
    check(before && after && before_n == after_n && memcmp(before, after, before_n) == 0,
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
    make_subdir(dir, sizeof(dir), "damage");
    CkptData d;
    ckpt_data_make(&d, 21, 500);
    ckpt_data_write(&d, dir, good);
    int64_t size = ckpt_file_size_(good);
    snprintf(bad, sizeof(bad), "%s/flipped.bin", dir);
    copy_file(good, bad);

    // flip every byte of the file, one at a time: verify must reject each
    long undetected = 0, first_undetected = -1;
    for (long off = 0; off < (long)size; off++) {
        xor_byte_at(bad, off, 0xFF);
        if (checkpoint_verify(bad, why, sizeof(why))) {
            if (first_undetected < 0) first_undetected = off;
            undetected++;
        }
        xor_byte_at(bad, off, 0xFF);
    }
    snprintf(detail, sizeof(detail), "%ld of %lld flips undetected (first at byte %ld)", undetected, (long long)size,
             first_undetected);
    check(undetected == 0, "a flipped byte anywhere in the file is detected by checkpoint_verify", detail);
    check(checkpoint_verify(bad, why, sizeof(why)) == 1, "the file verifies again once restored", why);

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
        xor_byte_at(bad, (long)flips[i].offset, 0x10);
        ReadArgs a = {bad, &d.config, &d, d.bn_sets, 37};
        char name[256];
        snprintf(name, sizeof(name), "checkpoint_read refuses a flipped byte in the %s", flips[i].region);
        expect_exit_failure(name, child_checkpoint_read, &a, flips[i].needle, "flipped.bin");
        xor_byte_at(bad, (long)flips[i].offset, 0x10);
    }

    // truncation
    long cuts[] = {(long)size - 1, (long)size - 16, (long)size - 17, (long)size / 2, 1024, 10, 0};
    for (size_t i = 0; i < sizeof(cuts) / sizeof(cuts[0]); i++) {
        char tpath[CHECKPOINT_PATH_MAX + 32], name[256];
        snprintf(tpath, sizeof(tpath), "%s/trunc_%zu.bin", dir, i);
        copy_file(good, tpath);
        truncate_to(tpath, cuts[i]);
        snprintf(name, sizeof(name), "checkpoint_verify rejects a file truncated to %ld bytes", cuts[i]);
        check(checkpoint_verify(tpath, why, sizeof(why)) == 0 && strstr(why, "truncated") != NULL, name, why);
        ReadArgs a = {tpath, &d.config, &d, d.bn_sets, 37};
        snprintf(name, sizeof(name), "checkpoint_read refuses a file truncated to %ld bytes", cuts[i]);
        expect_exit_failure(name, child_checkpoint_read, &a, "truncated", "trunc_");
    }

    // wrong magic, wrong version
    char mpath[CHECKPOINT_PATH_MAX + 32];
    snprintf(mpath, sizeof(mpath), "%s/magic.bin", dir);
    copy_file(good, mpath);
    {
        int32_t magic = MODEL_FILE_MAGIC;
        FILE* fp = fopen_check(mpath, "r+b");
        fwrite_check(&magic, 4, 1, fp, mpath);
        fclose_check(fp, mpath);
    }
    ReadArgs am = {mpath, &d.config, &d, d.bn_sets, 37};
    expect_exit_failure("checkpoint_read refuses a wrong magic (model file given)", child_checkpoint_read, &am,
                        "bad magic number 20261101", "model file");
    check(checkpoint_verify(mpath, why, sizeof(why)) == 0 && strstr(why, "magic"), "checkpoint_verify rejects a wrong magic", why);
    char vpath[CHECKPOINT_PATH_MAX + 32];
    snprintf(vpath, sizeof(vpath), "%s/version.bin", dir);
    copy_file(good, vpath);
    xor_byte_at(vpath, 4, 0x03);  // version 1 -> 2
    ReadArgs av = {vpath, &d.config, &d, d.bn_sets, 37};
    expect_exit_failure("checkpoint_read refuses version 2", child_checkpoint_read, &av, "version 2", NULL);

    // model mismatch: the first differing field is named
    ModelConfig other = d.config;
    other.top_k = 4;
    ReadArgs ak = {good, &other, &d, d.bn_sets, 37};
    expect_exit_failure("checkpoint_read refuses a different top_k, naming it", child_checkpoint_read, &ak,
                        "top_k (--topk) is 3 in the checkpoint but 4", NULL);
    other = d.config;
    other.channels = 16;
    other.num_heads = 4;
    ReadArgs ac = {good, &other, &d, d.bn_sets, 37};
    expect_exit_failure("checkpoint_read names the first differing field (num_heads before channels)",
                        child_checkpoint_read, &ac, "num_heads is 2 in the checkpoint but 4", NULL);
    other = d.config;
    other.gate = GATE_PROB;
    ReadArgs ag = {good, &other, &d, d.bn_sets, 37};
    expect_exit_failure("checkpoint_read refuses a different gate (same sizes)", child_checkpoint_read, &ag,
                        "gate (--gate) is softmax in the checkpoint but prob", NULL);

    // wrong caller sizes
    ReadArgs al = {good, &d.config, &d, d.bn_sets, 36};
    expect_exit_failure("checkpoint_read refuses a data-loader blob of another size", child_checkpoint_read, &al,
                        "data-loader state has 37 bytes", NULL);
    ReadArgs ab = {good, &d.config, &d, 1, 37};
    expect_exit_failure("checkpoint_read refuses another number of BN sets", child_checkpoint_read, &ab,
                        "2 sets of BN statistics", NULL);
    ReadArgs ax = {"/nonexistent/ckpt_00000001.bin", &d.config, &d, d.bn_sets, 37};
    expect_exit_failure("checkpoint_read refuses a missing file", child_checkpoint_read, &ax, "cannot open", NULL);
    ckpt_data_free(&d);
}

static void test_find_latest(void) {
    char dir[512], path[CHECKPOINT_PATH_MAX], out[8192], expect[1024];
    make_subdir(dir, sizeof(dir), "latest");
    char found[CHECKPOINT_PATH_MAX] = "";
    check(checkpoint_find_latest(dir, found) == -1, "find_latest: empty directory -> -1", "");
    check(checkpoint_find_latest("/nonexistent_dir_for_test", found) == -1, "find_latest: missing directory -> -1", "");

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
    xor_byte_at(path, 2000, 0x40);
    d.info.step = 50;
    ckpt_data_write(&d, dir, path);
    truncate_to(path, 3000);
    char junk[CHECKPOINT_PATH_MAX];
    snprintf(junk, sizeof(junk), "%s/ckpt_abc.bin", dir);
    write_all(junk, "x", 1);
    snprintf(junk, sizeof(junk), "%s/ckpt_00000070.binx", dir);
    write_all(junk, "x", 1);
    snprintf(junk, sizeof(junk), "%s/notes.txt", dir);
    write_all(junk, "x", 1);

    int code = run_child(child_find_latest, dir, out, sizeof(out));
    snprintf(expect, sizeof(expect), "RESULT 20 %s/ckpt_00000020.bin", dir);
    check(code == 0 && strstr(out, expect) != NULL, "find_latest picks the newest complete, verified checkpoint (20)", out);
    check(strstr(out, "ckpt_00000030.bin.tmp") && strstr(out, "unfinished"), "find_latest warns about the .tmp file", out);
    check(strstr(out, "ckpt_00000040.bin: checksum mismatch") != NULL, "find_latest skips the corrupt newest with a warning", out);
    check(strstr(out, "ckpt_00000050.bin: truncated") != NULL, "find_latest skips the truncated one with a warning", out);
    check(strstr(out, "ckpt_abc") == NULL && strstr(out, "00000070") == NULL, "find_latest ignores other names", out);
    printf("      find_latest output: %s", out);

    // once 20 is gone too, 10 is next (9 < 10 by number, not by listing order)
    snprintf(path, sizeof(path), "%s/ckpt_00000020.bin", dir);
    xor_byte_at(path, 1500, 0x01);
    int step = checkpoint_find_latest(dir, found);
    snprintf(expect, sizeof(expect), "%s/ckpt_00000010.bin", dir);
    check(step == 10 && strcmp(found, expect) == 0, "find_latest falls back to the next complete one (10)", found);
    ckpt_data_free(&d);
}

// ----------------------------------------------------------------------------
// args

static void test_args(void) {
    char detail[512];
    TrainConfig cfg, def;
    train_config_defaults(&def);
    cfg = def;
    char* none[] = {(char*)"prog"};
    train_config_parse(&cfg, 1, none);
    check(memcmp(&cfg, &def, sizeof(cfg)) == 0, "args: no flags = the defaults", "");

    char* good[] = {(char*)"prog", (char*)"-i", (char*)"train_*.bin", (char*)"-j", (char*)"", (char*)"-o", (char*)"out/run1",
                    (char*)"-e", (char*)"tiny", (char*)"-b", (char*)"8", (char*)"--seq-len", (char*)"64", (char*)"-d", (char*)"2048",
                    (char*)"-x", (char*)"500", (char*)"-l", (char*)"1e-3", (char*)"-u", (char*)"50", (char*)"-q", (char*)"0",
                    (char*)"--schedule", (char*)"wsd", (char*)"--decay-frac=0.3", (char*)"-c", (char*)"0.05",
                    (char*)"--grad-clip", (char*)"0", (char*)"--beta2", (char*)"0.99", (char*)"--eps", (char*)"1e-6",
                    (char*)"-v", (char*)"25", (char*)"-m", (char*)"-1", (char*)"-s", (char*)"0", (char*)"-g", (char*)"32",
                    (char*)"-n", (char*)"100", (char*)"-y", (char*)"1", (char*)"--seed", (char*)"18446744073709551615",
                    (char*)"--shuffle", (char*)"0", (char*)"-f", (char*)"omni", (char*)"--hidden", (char*)"128",
                    (char*)"--experts", (char*)"64", (char*)"--topk", (char*)"8", (char*)"--router-norm", (char*)"none",
                    (char*)"--gate", (char*)"prob", (char*)"--expert-exec", (char*)"token", (char*)"--log-file", (char*)"l.jsonl",
                    (char*)"--overlap-comm", (char*)"1"};
    int argc = (int)(sizeof(good) / sizeof(good[0]));
    cfg = def;
    train_config_parse(&cfg, argc, good);
    int ok = strcmp(cfg.train_data_pattern, "train_*.bin") == 0 && cfg.val_data_pattern[0] == '\0' &&
             strcmp(cfg.output_dir, "out/run1") == 0 && strcmp(cfg.model, "tiny") == 0 && cfg.B == 8 && cfg.T == 64 &&
             cfg.total_batch_size == 2048 && cfg.num_steps == 500 && cfg.learning_rate == 1e-3f &&
             cfg.warmup_steps == 50 && cfg.final_lr_frac == 0.0f && cfg.lr_schedule == LR_SCHEDULE_WSD &&
             cfg.decay_frac == 0.3f && cfg.weight_decay == 0.05f && cfg.grad_clip == 0.0f && cfg.beta1 == def.beta1 &&
             cfg.beta2 == 0.99f && cfg.eps == 1e-6f && cfg.val_every == 25 && cfg.val_max_batches == -1 &&
             cfg.sample_every == 0 && cfg.gen_tokens == 32 && cfg.checkpoint_every == 100 && cfg.resume == 1 &&
             cfg.seed == 18446744073709551615ull && cfg.shuffle == 0 && cfg.ffn_kind == FFN_OMNI &&
             cfg.ffn_hidden == 128 && cfg.num_experts == 64 && cfg.top_k == 8 && cfg.router_norm == ROUTER_NORM_NONE &&
             cfg.gate == GATE_PROB && cfg.expert_exec == EXPERT_EXEC_TOKEN && strcmp(cfg.log_file, "l.jsonl") == 0 &&
             cfg.overlap_comm == 1;
    check(ok, "args: every flag (short, long, --flag=value) sets its field", "");

    // the model from the flags
    ModelConfig mc;
    cfg.num_processes = 2;
    ok = train_config_model(&cfg, &mc) == 1 && mc.num_layers == 2 && mc.channels == 64 && mc.ffn_kind == FFN_OMNI &&
         mc.ffn_hidden == 128 && mc.num_experts == 64 && mc.router_n == 8 && mc.top_k == 8 &&
         mc.router_norm == ROUTER_NORM_NONE && mc.gate == GATE_PROB && mc.max_seq_len == 64;
    check(ok, "args: train_config_model applies the preset and every override", "");
    train_config_validate(&cfg, &mc);
    snprintf(detail, sizeof(detail), "grad accum %d", train_config_grad_accum_steps(&cfg));
    check(train_config_grad_accum_steps(&cfg) == 2 && train_config_total_batch_tokens(&cfg) == 2048,
          "args: grad accumulation = d / (B*T*processes) = 2048 / (8*64*2) = 2", detail);
    cfg.total_batch_size = -1;
    check(train_config_grad_accum_steps(&cfg) == 1 && train_config_total_batch_tokens(&cfg) == 8 * 64 * 2,
          "args: -d -1 = B*T*processes, no accumulation", "");
    char log_path[2048];
    train_config_log_path(&cfg, log_path, sizeof(log_path));
    check(strcmp(log_path, "l.jsonl") == 0, "args: --log-file wins over the default log path", log_path);
    cfg.log_file[0] = '\0';
    train_config_log_path(&cfg, log_path, sizeof(log_path));
    check(strcmp(log_path, "out/run1/log.jsonl") == 0, "args: default log is <output dir>/log.jsonl", log_path);

    // gelu preset: the omni knobs stay untouched
    TrainConfig g = def;
    char* gelu_args[] = {(char*)"prog", (char*)"-e", (char*)"d12", (char*)"-f", (char*)"gelu"};
    train_config_parse(&g, 5, gelu_args);
    ok = train_config_model(&g, &mc) == 1 && mc.ffn_kind == FFN_GELU && mc.ffn_hidden == 4 * 768 && mc.num_layers == 12;
    check(ok, "args: -e d12 -f gelu gives GPT-2 124M's shape", "");

    // bad flags: each exits 1 with a message naming the flag (and the value)
    struct { const char* name; const char* args[8]; const char* needle1; const char* needle2; int validate; int procs; } bad[] = {
        {"unknown short flag", {"-z", "1"}, "unknown flag \"-z\"", NULL, 0, 1},
        {"unknown long flag", {"--learning-rate", "1"}, "unknown flag \"--learning-rate\"", NULL, 0, 1},
        {"missing value", {"-l", "1e-4", "-b"}, "flag -b", "missing its value", 0, 1},
        {"missing value (long)", {"--schedule"}, "--schedule", "missing", 0, 1},
        {"non-number integer", {"-b", "abc"}, "\"abc\" for flag -b", "expected an integer >= 1", 0, 1},
        {"trailing junk in a number", {"-l", "1e-3x"}, "\"1e-3x\" for flag -l", "not a number", 0, 1},
        {"non-integer steps", {"-x", "10.5"}, "flag -x", "not an integer", 0, 1},
        {"negative steps", {"-x", "-5"}, "\"-5\" for flag -x", "negative", 0, 1},
        {"zero batch", {"-b", "0"}, "flag -b", ">= 1", 0, 1},
        {"int overflow", {"-t", "3000000000"}, "flag -t", "int range", 0, 1},
        {"fraction > 1", {"-q", "1.5"}, "flag -q", "[0, 1]", 0, 1},
        {"beta1 = 1", {"--beta1", "1"}, "--beta1", "[0, 1)", 0, 1},
        {"eps = 0", {"--eps", "0"}, "--eps", "> 0", 0, 1},
        {"inf lr", {"-l", "inf"}, "flag -l", "finite", 0, 1},
        {"-d 0", {"-d", "0"}, "flag -d", "-1 or an integer >= 1", 0, 1},
        {"-m 0", {"-m", "0"}, "flag -m", "-1 or an integer >= 1", 0, 1},
        {"-y 2", {"-y", "2"}, "flag -y", "0 or 1", 0, 1},
        {"negative seed", {"--seed", "-1"}, "--seed", "negative", 0, 1},
        {"unknown schedule", {"--schedule", "linear"}, "\"linear\" for flag --schedule", "cosine|wsd|constant", 0, 1},
        {"unknown ffn", {"-f", "relu"}, "flag -f", "gelu|swiglu|omni", 0, 1},
        {"unknown gate", {"--gate=hard"}, "--gate", "softmax|prob", 0, 1},
        {"empty train data", {"-i", ""}, "flag -i", "empty", 0, 1},
        {"positional argument", {"model.bin"}, "unexpected argument \"model.bin\"", NULL, 0, 1},
        {"experts not a square", {"--experts", "15"}, "--experts", "perfect square", 0, 1},
        {"topk > experts", {"--experts", "16", "--topk", "17"}, "--topk", "N=16", 0, 1},
        {"topk > preset experts", {"-e", "tiny", "--topk", "65", "-t", "64"}, "\"65\" for flag --topk", "N=64", 1, 1},
        {"T > max_seq_len", {"-e", "tiny", "-t", "65"}, "flag -t", "max_seq_len 64", 1, 1},
        {"gen tokens > max_seq_len", {"-e", "tiny", "-t", "64", "-g", "100"}, "flag -g", "max_seq_len 64", 1, 1},
        {"total batch not divisible", {"-e", "tiny", "-b", "4", "-t", "64", "-d", "1000"}, "flag -d", "4*64*1", 1, 1},
        {"total batch not divisible by processes", {"-e", "tiny", "-b", "4", "-t", "64", "-d", "256"}, "flag -d", "4*64*2", 1, 2},
        {"-n without -o", {"-e", "tiny", "-t", "64", "-n", "10"}, "flag -n", "-o", 1, 1},
        {"-y 1 without -o", {"-e", "tiny", "-t", "64", "-y", "1"}, "flag -y", "-o", 1, 1},
        {"unknown model", {"-e", "d13"}, "\"d13\" for flag -e", "not a preset", 1, 1},
        {"omni knob on gelu", {"-e", "tiny", "-t", "64", "-f", "gelu", "--experts", "16"}, "--experts", "gelu", 1, 1},
        {"negative process rank", {"-pr", "-1"}, "\"-1\" for flag -pr", NULL, 0, 1},
        {"process rank >= processes", {"-pn", "2", "-pr", "2", "-pf", "id"}, "\"2\" for flag -pr", "-pn 2", 0, 1},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char* argv[10];
        int n = 0;
        argv[n++] = (char*)"prog";
        for (int j = 0; j < 8 && bad[i].args[j]; j++) argv[n++] = (char*)bad[i].args[j];
        ParseArgs pa = {n, argv, bad[i].procs, bad[i].validate};
        char name[256];
        snprintf(name, sizeof(name), "args: %s exits 1 naming the flag", bad[i].name);
        expect_exit_failure(name, child_parse, &pa, bad[i].needle1, bad[i].needle2);
    }

    // -e <model file>: returns 0; the overrides must agree with the file
    char mdir[512], mpath[600];
    make_subdir(mdir, sizeof(mdir), "args_model");
    snprintf(mpath, sizeof(mpath), "%s/init.bin", mdir);
    ModelConfig fc = micro_config(FFN_OMNI);
    Rng rng;
    rng_init(&rng, 5);
    float* fp = random_floats(&rng, model_config_num_params(&fc));
    model_file_write(mpath, &fc, fp, NULL);
    free(fp);
    TrainConfig fcfg = def;
    strcpy(fcfg.model, mpath);
    fcfg.top_k = 3;
    check(train_config_model(&fcfg, &mc) == 0, "args: -e <existing file> returns 0 (read the file)", "");
    {
        char* argv[] = {(char*)"prog", (char*)"-e", mpath, (char*)"-t", (char*)"8", (char*)"--topk", (char*)"3", (char*)"-g", (char*)"8"};
        ParseArgs pa = {9, argv, 1, 1};
        char out[4096];
        int code = run_child(child_parse, &pa, out, sizeof(out));
        check(code == 999, "args: -e <file> with agreeing overrides is accepted", out);
    }
    {
        char* argv[] = {(char*)"prog", (char*)"-e", mpath, (char*)"-t", (char*)"8", (char*)"--topk", (char*)"2"};
        ParseArgs pa = {7, argv, 1, 1};
        expect_exit_failure("args: -e <file> with a conflicting --topk exits naming it", child_parse, &pa,
                            "--topk 2 conflicts", "which has 3");
    }
    {
        char* argv[] = {(char*)"prog", (char*)"-e", mpath, (char*)"-f", (char*)"swiglu"};
        ParseArgs pa = {5, argv, 1, 1};
        expect_exit_failure("args: -e <file> with a conflicting -f exits naming it", child_parse, &pa, "flag -f swiglu", "omni");
    }

    // --help: exit 0, every flag with its default
    {
        char* argv[] = {(char*)"prog", (char*)"-b", (char*)"8", (char*)"--help"};
        ParseArgs pa = {4, argv, 1, 0};
        char out[16384];
        int code = run_child(child_parse, &pa, out, sizeof(out));
        ok = code == 0;
        for (int i = 0; i < TRAIN_NUM_FLAGS; i++) {
            ok &= strstr(out, train_flags[i].long_name) != NULL;
            if (train_flags[i].short_name) {
                char both[64];
                snprintf(both, sizeof(both), "%s/%s", train_flags[i].short_name, train_flags[i].long_name);
                ok &= strstr(out, both) != NULL;
            }
        }
        // defaults are the values before parsing (-b 8 came before --help)
        ok &= strstr(out, "default: 4\n") != NULL && strstr(out, "default: cosine") != NULL &&
              strstr(out, "default: 0.0006") != NULL;
        int defaults = 0;
        for (const char* p = out; (p = strstr(p, "default:")) != NULL; p++) defaults++;
        snprintf(detail, sizeof(detail), "exit %d, %d defaults for %d flags", code, defaults, TRAIN_NUM_FLAGS);
        check(ok && defaults == TRAIN_NUM_FLAGS, "args: --help exits 0 and documents every flag with its default", detail);
    }
}

// ----------------------------------------------------------------------------
// schedules

static int close_to(float a, double b) { return fabs((double)a - b) <= 1e-6 * (fabs(b) > 1 ? fabs(b) : 1); }

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
    int notes = run_child(child_compare_run, &a, out, sizeof(out));
    check(notes == 0 && out[0] == '\0', "compare_run: the same settings give no note", out);
    cfg.learning_rate = 1e-4f;
    cfg.num_steps = 2000;
    cfg.total_batch_size = 512;
    a.now = train_config_run_identity(&cfg, 0x1234abcd5678ef90ull, 338025, 1);
    notes = run_child(child_compare_run, &a, out, sizeof(out));
    int ok = notes == 3 && strstr(out, "resuming with -l 0.0001") && strstr(out, "resuming with -x 2000 (") &&
             strstr(out, "resuming with -d (tokens per step) 512 (");
    check(ok, "compare_run: changed -l, -x and -d give one note each", out);
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
        int status = run_child(child_compare_run, &a, out, sizeof(out));
        char name[128];
        snprintf(name, sizeof(name), "compare_run: a changed %s is refused, naming it", refused[i].name);
        check(status == EXIT_FAILURE && strstr(out, "checkpoint \"dir/ckpt_00000010.bin\" was written with") &&
              strstr(out, refused[i].expected) && strstr(out, "another -o directory"), name, out);
    }
}

static void test_schedules(void) {
    char detail[256];
    struct { int sched, warmup, steps, step; float frac, decay; double expected; } cases[] = {
        // cosine: lr 1, W = 10, S = 110, final 0.1
        {LR_SCHEDULE_COSINE, 10, 110, 0, 0.1f, 0, 0.1},
        {LR_SCHEDULE_COSINE, 10, 110, 4, 0.1f, 0, 0.5},
        {LR_SCHEDULE_COSINE, 10, 110, 9, 0.1f, 0, 1.0},
        {LR_SCHEDULE_COSINE, 10, 110, 10, 0.1f, 0, 1.0},
        {LR_SCHEDULE_COSINE, 10, 110, 35, 0.1f, 0, 0.1 + 0.9 * 0.5 * (1 + cos(3.14159265358979323846 * 0.25))},
        {LR_SCHEDULE_COSINE, 10, 110, 60, 0.1f, 0, 0.55},
        {LR_SCHEDULE_COSINE, 10, 110, 109, 0.1f, 0, 0.1 + 0.9 * 0.5 * (1 + cos(3.14159265358979323846 * 0.99))},
        {LR_SCHEDULE_COSINE, 10, 110, 110, 0.1f, 0, 0.1},
        {LR_SCHEDULE_COSINE, 10, 110, 5000, 0.1f, 0, 0.1},
        {LR_SCHEDULE_COSINE, 10, 110, -3, 0.1f, 0, 0.1},
        {LR_SCHEDULE_COSINE, 0, 100, 0, 0.0f, 0, 1.0},
        {LR_SCHEDULE_COSINE, 0, 100, 50, 0.0f, 0, 0.5},
        // wsd: lr 1, W = 10, S = 100, decay 0.2 (the last 20 steps), final 0
        {LR_SCHEDULE_WSD, 10, 100, 5, 0.0f, 0.2f, 0.6},
        {LR_SCHEDULE_WSD, 10, 100, 10, 0.0f, 0.2f, 1.0},
        {LR_SCHEDULE_WSD, 10, 100, 79, 0.0f, 0.2f, 1.0},
        {LR_SCHEDULE_WSD, 10, 100, 80, 0.0f, 0.2f, 1.0},
        {LR_SCHEDULE_WSD, 10, 100, 90, 0.0f, 0.2f, 0.5},
        {LR_SCHEDULE_WSD, 10, 100, 99, 0.0f, 0.2f, 0.05},
        {LR_SCHEDULE_WSD, 10, 100, 100, 0.0f, 0.2f, 0.0},
        {LR_SCHEDULE_WSD, 10, 100, 90, 0.1f, 0.2f, 0.55},
        {LR_SCHEDULE_WSD, 0, 100, 50, 0.1f, 0.0f, 1.0},
        {LR_SCHEDULE_WSD, 0, 100, 99, 0.1f, 0.0f, 1.0},
        // decay longer than the stable part: it starts when warm-up ends (D = max(5, 8) = 8)
        {LR_SCHEDULE_WSD, 8, 10, 8, 0.0f, 0.5f, 1.0},
        {LR_SCHEDULE_WSD, 8, 10, 9, 0.0f, 0.5f, 0.5},
        // constant
        {LR_SCHEDULE_CONSTANT, 4, 100, 0, 0.1f, 0, 0.25},
        {LR_SCHEDULE_CONSTANT, 4, 100, 3, 0.1f, 0, 1.0},
        {LR_SCHEDULE_CONSTANT, 4, 100, 99, 0.1f, 0, 1.0},
        {LR_SCHEDULE_CONSTANT, 4, 100, 500, 0.1f, 0, 1.0},
    };
    int n = (int)(sizeof(cases) / sizeof(cases[0]));
    for (int i = 0; i < n; i++) {
        float lr = lr_schedule_value(cases[i].sched, 1.0f, cases[i].warmup, cases[i].frac, cases[i].decay,
                                     cases[i].steps, cases[i].step);
        char name[160];
        snprintf(name, sizeof(name), "schedule %s W=%d S=%d frac=%g decay=%g: lr(step %d) = %.6g",
                 lr_schedule_name(cases[i].sched), cases[i].warmup, cases[i].steps, cases[i].frac, cases[i].decay,
                 cases[i].step, cases[i].expected);
        snprintf(detail, sizeof(detail), "got %.9g", lr);
        check(close_to(lr, cases[i].expected), name, detail);
    }
    // shapes: cosine non-increasing after warm-up, wsd flat then linear, scaling by the peak lr
    int ok = 1;
    for (int s = 11; s < 200; s++) {
        ok &= lr_schedule_value(LR_SCHEDULE_COSINE, 3e-4f, 10, 0.1f, 0, 200, s) <=
              lr_schedule_value(LR_SCHEDULE_COSINE, 3e-4f, 10, 0.1f, 0, 200, s - 1);
        ok &= close_to(lr_schedule_value(LR_SCHEDULE_COSINE, 3e-4f, 10, 0.1f, 0, 200, s) / 3e-4f,
                       lr_schedule_value(LR_SCHEDULE_COSINE, 1.0f, 10, 0.1f, 0, 200, s));
    }
    check(ok, "schedule: cosine is non-increasing after warm-up and proportional to the peak lr", "");
    TrainConfig cfg;
    train_config_defaults(&cfg);
    cfg.lr_schedule = LR_SCHEDULE_WSD;
    cfg.num_steps = 300;
    cfg.warmup_steps = 30;
    cfg.decay_frac = 0.25f;
    cfg.final_lr_frac = 0.05f;
    cfg.learning_rate = 2e-3f;
    ok = 1;
    for (int s = 0; s <= 300; s++) {
        ok &= learning_rate_at(&cfg, s) == lr_schedule_value(LR_SCHEDULE_WSD, 2e-3f, 30, 0.05f, 0.25f, 300, s);
    }
    check(ok && close_to(learning_rate_at(&cfg, 100), 2e-3) && close_to(learning_rate_at(&cfg, 300), 1e-4),
          "schedule: learning_rate_at(cfg) uses the run's settings", "");
}

// ----------------------------------------------------------------------------
// logger

static char* slurp_text(const char* path) {
    size_t n;
    unsigned char* raw = read_all(path, &n);
    if (!raw) return NULL;
    raw[n] = '\0';
    return (char*)raw;
}

static void test_logger(void) {
    char dir[512], path[600];
    make_subdir(dir, sizeof(dir), "log");
    snprintf(path, sizeof(path), "%s/log.jsonl", dir);
    // expert statistics
    int counts_half[4] = {4, 0, 4, 0}, counts_flat[4] = {3, 3, 3, 3}, counts_none[4] = {0, 0, 0, 0};
    float usage, kl;
    expert_load_stats(counts_half, 4, &usage, &kl);
    int ok = close_to(usage, 0.5) && close_to(kl, log(2.0));
    expert_load_stats(counts_flat, 4, &usage, &kl);
    ok &= close_to(usage, 1.0) && close_to(kl, 0.0);
    expert_load_stats(counts_none, 4, &usage, &kl);
    ok &= usage == 0.0f && kl == 0.0f;
    int counts_one[4] = {0, 0, 9, 0};
    expert_load_stats(counts_one, 4, &usage, &kl);
    ok &= close_to(usage, 0.25) && close_to(kl, log(4.0));
    check(ok, "logger: expert usage share and KL(load || uniform)", "");
    check(close_to((float)logger_mfu(1e9, 1e5, 1e15), 0.3) && logger_mfu(1e9, 1e5, 0) < 0, "logger: MFU = 3 * fwd FLOPs * tok/s / peak", "");

    Logger lg;
    logger_init(&lg, path, 0, -1);
    float usage2[2] = {0.5f, 0.25f}, kl2[2] = {0.125f, 1.5f};
    logger_log_eval(&lg, 0, 0, 10.75f);
    logger_log_train(&lg, 1, 3, 4096, 10.5f, 2.25f, 1e-4f, 123.5, 33165.0, 0.375, 2, usage2, kl2);
    logger_log_train(&lg, 2, 3, 8192, NAN, 1.0f, 2e-4f, 100.0, 40960.0, -1.0, 2, usage2, kl2);
    logger_log_eval(&lg, 2, 8192, 9.5f);
    logger_log_train(&lg, 3, 3, 12288, 9.25f, 0.5f, 3e-4f, 100.0, 40960.0, 0.5, 0, NULL, NULL);
    char* text = slurp_text(path);   // read while the logger is still open: lines are flushed
    const char* expected =
        "{\"type\":\"eval\",\"step\":0,\"tokens\":0,\"val_loss\":10.75}\n"
        "{\"type\":\"train\",\"step\":1,\"tokens\":4096,\"loss\":10.5,\"lr\":9.99999975e-05,\"norm\":2.25,\"ms\":123.5000,"
        "\"tok_s\":33165.00,\"mfu\":0.375000,\"expert_usage\":[0.500000,0.250000],\"expert_kl\":[0.125000,1.500000]}\n"
        "{\"type\":\"train\",\"step\":2,\"tokens\":8192,\"loss\":null,\"lr\":0.000199999995,\"norm\":1,\"ms\":100.0000,"
        "\"tok_s\":40960.00,\"mfu\":null,\"expert_usage\":[0.500000,0.250000],\"expert_kl\":[0.125000,1.500000]}\n"
        "{\"type\":\"eval\",\"step\":2,\"tokens\":8192,\"val_loss\":9.5}\n"
        "{\"type\":\"train\",\"step\":3,\"tokens\":12288,\"loss\":9.25,\"lr\":0.000300000014,\"norm\":0.5,\"ms\":100.0000,"
        "\"tok_s\":40960.00,\"mfu\":0.500000,\"expert_usage\":[],\"expert_kl\":[]}\n";
    check(text && strcmp(text, expected) == 0, "logger: JSONL records exact and flushed per line (NaN -> null)", text);
    free(text);
    logger_close(&lg);

    // a crash left a partial line; resume from step 2 keeps train <= 2 and eval < 2
    FILE* fp = fopen_check(path, "ab");
    fputs("{\"type\":\"train\",\"step\":4,\"tok", fp);
    fclose_check(fp, path);
    logger_init(&lg, path, 0, 2);
    logger_log_eval(&lg, 2, 8192, 9.0f);
    logger_close(&lg);
    text = slurp_text(path);
    ok = text != NULL && strstr(text, "\"step\":0,") && strstr(text, "\"type\":\"train\",\"step\":1,") &&
         strstr(text, "\"type\":\"train\",\"step\":2,") && !strstr(text, "\"step\":3,") && !strstr(text, "\"step\":4") &&
         !strstr(text, "9.5}") && strstr(text, "\"val_loss\":9}\n");
    int lines = 0;
    for (const char* p = text; p && *p; p++) lines += *p == '\n';
    check(ok && lines == 4, "logger: resume trims the log to the checkpoint and appends", text);
    free(text);

    // another rank writes nothing
    char path1[600];
    snprintf(path1, sizeof(path1), "%s/rank1.jsonl", dir);
    logger_init(&lg, path1, 1, -1);
    logger_log_eval(&lg, 0, 0, 1.0f);
    logger_close(&lg);
    check(!file_exists(path1), "logger: ranks other than 0 write nothing", "");
}

// ----------------------------------------------------------------------------

int main(void) {
    snprintf(tmp_root, sizeof(tmp_root), "/tmp/test_checkpoint_XXXXXX");
    if (mkdtemp(tmp_root) == NULL) {
        perror("mkdtemp");
        return 2;
    }
    test_checksum();
    test_model_files();
    test_checkpoint_roundtrip();
    test_compare_run();
    test_checkpoint_damage();
    test_find_latest();
    test_args();
    test_schedules();
    test_logger();
    remove_tree(tmp_root);
    printf("\n%d passed, %d failed\n", num_pass, num_fail);
    printf(num_fail == 0 ? "ALL TESTS PASSED\n" : "SOME TESTS FAILED\n");
    return num_fail == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
