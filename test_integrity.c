/*
 * test_integrity.c - CPU tests of what keeps files and runs honest (issue 13):
 *   hash       random 2-8 bit corruptions anywhere in a small checkpoint or model file are all
 *              caught (XXH64), including the two-high-bit flip a word-wise checksum missed
 *   finite     checkpoint_write, model_file_write and checkpoint_manifest_write refuse NaN/Inf
 *              (returning -1) and leave no file;
 *              model_file_read refuses a (correctly hashed) file holding a NaN weight
 *   files      a directory or FIFO given as a model file or checkpoint is named as such (no hang)
 *   tmp        checkpoint_make_dir removes the .bin.tmp of interrupted writes, nothing else
 *   write errors  a checkpoint, model file, part or manifest write that fails (/dev/full) returns
 *              -1 naming the file and the cause, leaves no .tmp, keeps every file saved before
 *   sizes      batch flags in 64 bits: overflowing -b/-t/-d/-x combinations are refused naming
 *              the flags; -d keeps all 64 bits
 *   memory     gpt_build refuses a model that cannot fit in MemAvailable, with the numbers
 * Cases that must end the program run in a forked child whose exit status and output are checked.
 *
 *   make test_integrity && ./test_integrity
 */
#define TESTING
#include "train_omnimoe.c"
#include "llmc/args.h"
#include "llmc/checkpoint.h"
#include "llmc/test_harness.h"

static char tmp_root[256];

// ----------------------------------------------------------------------------
// children (test_run_child of the harness: exit status, output captured)

// the child must exit with EXIT_FAILURE and print every non-NULL needle
static void expect_refusal(const char* name, TestChildFn fn, void* arg, const char* needle1, const char* needle2) {
    char out[4096];
    int status = test_run_child(fn, arg, out, sizeof(out));
    int ok = status == EXIT_FAILURE && (needle1 == NULL || strstr(out, needle1) != NULL) &&
             (needle2 == NULL || strstr(out, needle2) != NULL);
    test_checkf(ok, name, "exit %d, output: %.400s", status, out);
}

// ----------------------------------------------------------------------------
// files

static unsigned char* read_all(const char* path, size_t* n) {
    FILE* fp = fopen_check(path, "rb");
    int64_t size = file_size_check(fp, path);
    unsigned char* data = (unsigned char*)malloc_check((size_t)size + 1);
    fread_check(data, 1, (size_t)size, fp, path);
    fclose_check(fp, path);
    *n = (size_t)size;
    return data;
}

static void make_dir(char* out, size_t size, const char* name) {
    snprintf(out, size, "%s/%s", tmp_root, name);
    mkdir(out, 0755);
}

static float* random_floats(Rng* rng, size_t n) {
    float* x = (float*)malloc_check((n > 0 ? n : 1) * sizeof(float));
    fill_normal(x, n, 0.0f, 1.0f, rng);
    return x;
}

// a small OmniMoE model (BN statistics included), the files of the tests below
static ModelConfig small_config(void) { return test_config(TEST_DIMS_MICRO, FFN_OMNI, 4, 3, ROUTER_NORM_BN, GATE_SOFTMAX); }

// a checkpoint of random content (two BN sets, odd blob sizes) in dir; its path into path
static void write_random_checkpoint(const char* dir, char* path, Rng* rng) {
    ModelConfig c = small_config();
    size_t P = model_config_num_params(&c), NB = model_config_num_bn_stats(&c);
    float* params = random_floats(rng, P);
    float* m = random_floats(rng, P);
    float* v = random_floats(rng, P);
    float* bn = random_floats(rng, 2 * NB);
    unsigned char loader[37], rng_blob[19];
    for (size_t i = 0; i < sizeof(loader); i++) loader[i] = (unsigned char)rng_u32(rng);
    for (size_t i = 0; i < sizeof(rng_blob); i++) rng_blob[i] = (unsigned char)rng_u32(rng);
    TrainConfig cfg;
    train_config_defaults(&cfg);
    cfg.B = 2;
    cfg.T = 8;
    RunIdentity run = train_config_run_identity(&cfg, ((uint64_t)rng_u32(rng) << 32) | rng_u32(rng), 12345, 2);
    CheckpointInfo info;
    checkpoint_info_from_run(&info, &run, 7, 7, 7 * 16);
    if (checkpoint_write(dir, &c, &info, params, m, v, bn, 2, loader, sizeof(loader), rng_blob, sizeof(rng_blob),
                         path) != 0) {
        exit(EXIT_FAILURE);  // the writer said why
    }
    free(params);
    free(m);
    free(v);
    free(bn);
}

// ----------------------------------------------------------------------------
// hash: multi-bit corruptions

static void child_model_read(void* arg) {
    ModelConfig c;
    float *p = NULL, *bn = NULL;
    model_file_read((const char*)arg, &c, &p, &bn);
}

// flips `bits` distinct random bits of data[0..n) in place
static void flip_random_bits(unsigned char* data, size_t n, int bits, Rng* rng) {
    size_t chosen[8];
    for (int b = 0; b < bits; b++) {
        size_t bit;
        int fresh;
        do {  // distinct bits: two flips of one bit would undo each other
            bit = ((size_t)rng_u32(rng) * 4294967296ull + rng_u32(rng)) % (n * 8);
            fresh = 1;
            for (int j = 0; j < b; j++) fresh &= chosen[j] != bit;
        } while (!fresh);
        chosen[b] = bit;
        data[bit / 8] ^= (unsigned char)(1u << (bit % 8));
    }
}

static void test_hash_catches_corruption(void) {
    Rng rng = rng_seeded(1301);
    char dir[512], path[CHECKPOINT_PATH_MAX], bad[600];
    make_dir(dir, sizeof(dir), "hash");
    write_random_checkpoint(dir, path, &rng);
    size_t n;
    unsigned char* good = read_all(path, &n);
    unsigned char* copy = (unsigned char*)malloc_check(n);
    snprintf(bad, sizeof(bad), "%s/ckpt_00000001.bin", dir);
    char why[256];

    // the case a word-wise FNV checksum misses: bit 63 of two different 64-bit words of the weights
    memcpy(copy, good, n);
    copy[1024 + 8 * 3 + 7] ^= 0x80;
    copy[1024 + 8 * 10 + 7] ^= 0x80;
    test_write_file(bad, copy, n);
    int caught = !checkpoint_verify(bad, why, sizeof(why));
    test_checkf(caught && strstr(why, "checksum mismatch") != NULL, "hash: two flipped high bits in different words "
                "of a checkpoint are caught", "%s", caught ? why : "accepted");

    // 1000 random corruptions of 2-8 bits anywhere in the file
    int missed = 0, trials = 1000;
    for (int t = 0; t < trials; t++) {
        memcpy(copy, good, n);
        flip_random_bits(copy, n, 2 + rng_int(&rng, 7), &rng);
        test_write_file(bad, copy, n);
        if (checkpoint_verify(bad, why, sizeof(why))) missed++;
    }
    test_checkf(missed == 0, "hash: 1000 random 2-8 bit corruptions of a checkpoint are all caught",
                "%d of %d accepted (file of %zu bytes)", missed, trials, n);
    free(good);
    free(copy);

    // model files: the same over a model file (each read in a child: model_file_read exits)
    ModelConfig c = small_config();
    size_t P = model_config_num_params(&c), NB = model_config_num_bn_stats(&c);
    float* params = random_floats(&rng, P);
    float* bn = random_floats(&rng, NB);
    char model_path[600];
    snprintf(model_path, sizeof(model_path), "%s/model.bin", dir);
    if (model_file_write(model_path, &c, params, bn) != 0) exit(EXIT_FAILURE);
    good = read_all(model_path, &n);
    copy = (unsigned char*)malloc_check(n);
    snprintf(bad, sizeof(bad), "%s/bad_model.bin", dir);
    char out[4096];
    missed = 0;
    trials = 300;  // a fork each
    for (int t = 0; t < trials; t++) {
        memcpy(copy, good, n);
        flip_random_bits(copy, n, 2 + rng_int(&rng, 7), &rng);
        test_write_file(bad, copy, n);
        if (test_run_child(child_model_read, bad, out, sizeof(out)) != EXIT_FAILURE) missed++;
    }
    test_checkf(missed == 0, "hash: 300 random 2-8 bit corruptions of a model file are all refused",
                "%d of %d accepted", missed, trials);
    // one flipped weight bit: the message names the file and the hash
    memcpy(copy, good, n);
    copy[1024 + 4 * 100 + 1] ^= 0x10;
    test_write_file(bad, copy, n);
    expect_refusal("hash: a model file with one flipped weight bit is refused as corrupt", child_model_read, bad,
                   "bad_model.bin\": checksum mismatch", "corrupt");
    // and the intact file still reads bitwise
    ModelConfig c2;
    float *p2 = NULL, *bn2 = NULL;
    model_file_read(model_path, &c2, &p2, &bn2);
    test_check(memcmp(p2, params, P * 4) == 0 && memcmp(bn2, bn, NB * 4) == 0, "hash: an intact model file reads bitwise");
    free(p2);
    free(bn2);
    free(params);
    free(bn);
    free(good);
    free(copy);
}

// version 1 model files (no hash) are still read, with a warning
static void test_model_file_v1(void) {
    Rng rng = rng_seeded(1302);
    char dir[512], v2[600], v1[600];
    make_dir(dir, sizeof(dir), "v1");
    ModelConfig c = small_config();
    size_t P = model_config_num_params(&c), NB = model_config_num_bn_stats(&c);
    float* params = random_floats(&rng, P);
    snprintf(v2, sizeof(v2), "%s/v2.bin", dir);
    if (model_file_write(v2, &c, params, NULL) != 0) exit(EXIT_FAILURE);
    size_t n;
    unsigned char* data = read_all(v2, &n);
    int32_t version = 1;
    memcpy(data + 4, &version, 4);
    snprintf(v1, sizeof(v1), "%s/v1.bin", dir);
    test_write_file(v1, data, n - CHECKPOINT_TRAILER_BYTES);  // version 1: no trailer
    char out[4096];
    int status = test_run_child(child_model_read, v1, out, sizeof(out));
    test_checkf(status == 999 && strstr(out, "is version 1, which has no hash") != NULL,
                "model file version 1 is read, with a warning that it cannot be verified", "exit %d: %s", status, out);
    float *p2 = NULL, *bn2 = NULL;
    ModelConfig c2;
    FILE* saved = stderr;
    stderr = fopen("/dev/null", "w");  // the warning, checked above
    model_file_read(v1, &c2, &p2, &bn2);
    fclose(stderr);
    stderr = saved;
    int ok = memcmp(p2, params, P * 4) == 0;
    for (size_t i = 0; i < NB; i++) ok &= bn2[i] == (((i / (2 * (size_t)c.router_n)) % 2 == 0) ? 0.0f : 1.0f);
    test_check(ok, "model file version 1: weights and BN statistics read bitwise");
    free(p2);
    free(bn2);
    free(params);
    free(data);
}

// ----------------------------------------------------------------------------
// nothing non-finite is written or read

typedef struct {
    char dir[512];
    int poison;  // 0: params, 1: m, 2: v, 3: bn
} NonFiniteArgs;

// the run record of the refused checkpoints below (step 9)
static CheckpointInfo nonfinite_info(void) {
    TrainConfig cfg;
    train_config_defaults(&cfg);
    RunIdentity run = train_config_run_identity(&cfg, 1, 2, 3);
    CheckpointInfo info;
    checkpoint_info_from_run(&info, &run, 9, 9, 0);
    return info;
}

static void child_write_nonfinite_checkpoint(void* arg) {
    NonFiniteArgs* a = (NonFiniteArgs*)arg;
    Rng rng = rng_seeded(1303);
    ModelConfig c = small_config();
    size_t P = model_config_num_params(&c), NB = model_config_num_bn_stats(&c);
    float* params = random_floats(&rng, P);
    float* m = random_floats(&rng, P);
    float* v = random_floats(&rng, P);
    float* bn = random_floats(&rng, NB);
    size_t sizes[NUM_PARAMETER_TENSORS], qkvw = 0;
    model_config_param_sizes(&c, sizes);
    for (int t = 0; t < PARAM_QKVW; t++) qkvw += sizes[t];
    if (a->poison == 0) params[qkvw + 5] = NAN;
    if (a->poison == 1) m[P - 1] = INFINITY;
    if (a->poison == 2) v[3] = -INFINITY;
    if (a->poison == 3) bn[NB / 2] = NAN;
    CheckpointInfo info = nonfinite_info();
    unsigned char blob[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    // a refusal returns -1 (the trainer's loop then stops every rank): the child's exit status says it
    if (checkpoint_write(a->dir, &c, &info, params, m, v, bn, 1, blob, 8, blob, 8, NULL) != 0) exit(EXIT_FAILURE);
}

static void child_write_nonfinite_model(void* arg) {
    const char* path = (const char*)arg;
    Rng rng = rng_seeded(1304);
    ModelConfig c = small_config();
    float* params = random_floats(&rng, model_config_num_params(&c));
    params[0] = NAN;  // wte
    if (model_file_write(path, &c, params, NULL) != 0) exit(EXIT_FAILURE);
}

// the manifest of a sharded checkpoint whose BN statistics hold a NaN (rank 0's refusal in a
// ZeRO-1 save: the loop then stops every rank)
static void child_write_nonfinite_manifest(void* arg) {
    const NonFiniteArgs* a = (const NonFiniteArgs*)arg;
    Rng rng = rng_seeded(1307);
    ModelConfig c = small_config();
    size_t NB = model_config_num_bn_stats(&c);
    float* bn = random_floats(&rng, 2 * NB);
    bn[NB + 3] = NAN;  // rank 1's set
    CheckpointInfo info = nonfinite_info();
    unsigned char blob[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    CheckpointPartEntry table[2] = {{1, 2}, {3, 4}};
    if (checkpoint_manifest_write(a->dir, &c, &info, bn, 2, blob, 8, blob, 8, 2, SHARD_MODE_ZERO, table, NULL) != 0) {
        exit(EXIT_FAILURE);
    }
}

static void test_nonfinite(void) {
    NonFiniteArgs a;
    make_dir(a.dir, sizeof(a.dir), "nonfinite");
    const char* expected[4] = {"weight tensor qkvw holds NaN/Inf (element 5", "AdamW first moments (m) hold NaN/Inf",
                               "AdamW second moments (v) hold NaN/Inf", "BN running statistics hold NaN/Inf"};
    const char* names[4] = {"finite: checkpoint_write refuses a NaN weight, naming the tensor",
                            "finite: checkpoint_write refuses an Inf in AdamW m",
                            "finite: checkpoint_write refuses an Inf in AdamW v",
                            "finite: checkpoint_write refuses a NaN BN statistic"};
    char path[CHECKPOINT_PATH_MAX], tmp[CHECKPOINT_PATH_MAX + 8];
    checkpoint_path(path, sizeof(path), a.dir, 9);
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    for (int i = 0; i < 4; i++) {
        a.poison = i;
        expect_refusal(names[i], child_write_nonfinite_checkpoint, &a, expected[i], "refusing to write checkpoint");
        test_check(!test_file_exists(path) && !test_file_exists(tmp), "finite: the refused checkpoint left no file (nor .tmp)");
    }
    char model_path[600], model_tmp[620];
    snprintf(model_path, sizeof(model_path), "%s/model.bin", a.dir);
    snprintf(model_tmp, sizeof(model_tmp), "%s.tmp", model_path);
    expect_refusal("finite: model_file_write refuses a NaN weight", child_write_nonfinite_model, model_path,
                   "refusing to write model file", "weight tensor wte holds NaN/Inf");
    test_check(!test_file_exists(model_path) && !test_file_exists(model_tmp), "finite: the refused model file left no file");
    expect_refusal("finite: checkpoint_manifest_write refuses a NaN BN statistic", child_write_nonfinite_manifest, &a,
                   "refusing to write the manifest of checkpoint step 9", "BN running statistics hold NaN/Inf");
    test_check(!test_file_exists(path) && !test_file_exists(tmp), "finite: the refused manifest left no file (nor .tmp)");

    // a model file holding a NaN with a correct hash (written by hand): refused on read
    Rng rng = rng_seeded(1305);
    ModelConfig c = small_config();
    size_t P = model_config_num_params(&c), NB = model_config_num_bn_stats(&c);
    float* params = random_floats(&rng, P);
    size_t sizes[NUM_PARAMETER_TENSORS], offset = 0;
    model_config_param_sizes(&c, sizes);
    for (int t = 0; t < PARAM_EXPERTV; t++) offset += sizes[t];
    params[offset + 7] = NAN;
    float* bn = ckpt_initial_bn_stats_(&c);
    int32_t header[OMNI_HEADER_INTS];
    memset(header, 0, sizeof(header));
    header[0] = MODEL_FILE_MAGIC;
    header[1] = MODEL_FILE_VERSION;
    model_config_to_header(&c, header);
    uint64_t h = model_file_hash(&c, params, bn);
    snprintf(model_path, sizeof(model_path), "%s/nan_model.bin", a.dir);
    FILE* fp = fopen_check(model_path, "wb");
    fwrite_check(header, sizeof(header), 1, fp, model_path);
    fwrite_check(params, 4, P, fp, model_path);
    fwrite_check(bn, 4, NB, fp, model_path);
    fwrite_check(&h, 8, 1, fp, model_path);
    fwrite_check(CHECKPOINT_END_MAGIC, 1, 8, fp, model_path);
    fclose_check(fp, model_path);
    expect_refusal("finite: model_file_read refuses a model file holding a NaN weight", child_model_read, model_path,
                   "nan_model.bin\": weight tensor expert_v holds NaN/Inf", "not a usable model");
    free(params);
    free(bn);
}

// ----------------------------------------------------------------------------
// a directory or FIFO where a file is expected

static void child_checkpoint_read(void* arg) {
    ModelConfig c = small_config();
    CheckpointInfo info;
    checkpoint_read_info((const char*)arg, &c, &info);
}

static void test_not_a_file(void) {
    char dir[512], sub[600], fifo[600], why[256];
    make_dir(dir, sizeof(dir), "notfile");
    snprintf(sub, sizeof(sub), "%s/model.bin", dir);
    mkdir(sub, 0755);
    expect_refusal("files: a directory given as a model file is reported as a directory", child_model_read, sub,
                   "model.bin\": is a directory", NULL);
    expect_refusal("files: a directory given as a checkpoint is reported as a directory", child_checkpoint_read, sub,
                   "is a directory", NULL);
    int ok = !checkpoint_verify(sub, why, sizeof(why)) && strstr(why, "is a directory") != NULL;
    test_checkf(ok, "files: checkpoint_verify calls a directory a directory", "%s", why);
    snprintf(fifo, sizeof(fifo), "%s/fifo.bin", dir);
    if (mkfifo(fifo, 0644) != 0) {
        test_checkf(0, "files: mkfifo for the FIFO case", "%s", strerror(errno));
        return;
    }
    expect_refusal("files: a FIFO given as a model file is refused without blocking", child_model_read, fifo,
                   "is a FIFO", NULL);
    expect_refusal("files: a FIFO given as a checkpoint is refused without blocking", child_checkpoint_read, fifo,
                   "is a FIFO", NULL);
}

// ----------------------------------------------------------------------------
// stale .tmp files

static void child_make_dir(void* arg) { checkpoint_make_dir((const char*)arg); }

static void test_stale_tmp(void) {
    Rng rng = rng_seeded(1306);
    char dir[512], complete[CHECKPOINT_PATH_MAX], names[4][700];
    make_dir(dir, sizeof(dir), "stale");
    write_random_checkpoint(dir, complete, &rng);
    size_t n;
    unsigned char* before = read_all(complete, &n);
    const char* files[4] = {"ckpt_00000020.bin.tmp", "model.bin.tmp", "notes.tmp", "log.jsonl"};
    for (int i = 0; i < 4; i++) {
        snprintf(names[i], sizeof(names[i]), "%s/%s", dir, files[i]);
        test_write_file(names[i], "partial", 7);
    }
    char out[4096];
    int status = test_run_child(child_make_dir, dir, out, sizeof(out));
    int ok = status == 999 && !test_file_exists(names[0]) && !test_file_exists(names[1]) && strstr(out, "ckpt_00000020.bin.tmp") &&
             strstr(out, "model.bin.tmp") && strstr(out, "Note: removed");
    test_checkf(ok, "tmp: checkpoint_make_dir removes the .bin.tmp of interrupted writes, with a note", "exit %d: %s",
                status, out);
    size_t n2;
    unsigned char* after = read_all(complete, &n2);
    ok = n2 == n && memcmp(before, after, n) == 0 && test_file_exists(names[2]) && test_file_exists(names[3]);
    test_check(ok, "tmp: the complete checkpoint and other files are untouched");
    free(before);
    free(after);
}

// ----------------------------------------------------------------------------
// write errors: a write that fails (its .tmp is a link to /dev/full: "No space left on device",
// as on a full disk) returns -1 after one message naming the file and the cause; it leaves no
// .tmp and no final name, every file saved before is intact, and the parts of a sharded save that
// failed are removed (checkpoint_parts_remove). The trainers' loop then stops every rank together.

enum { WF_CHECKPOINT, WF_MODEL, WF_PART, WF_MANIFEST, WF_CASES };
typedef struct {
    const char* dir;
    int what;
} WriteFailArgs;

// the write of step 8 (WF_PART: part 2 of 3 fails; WF_MANIFEST: the parts are written, the
// manifest fails); exit 3 when the failing writer returned -1, 0 when everything was written
static void child_write_failing(void* arg) {
    const WriteFailArgs* a = (const WriteFailArgs*)arg;
    Rng rng = rng_seeded(1310 + a->what);
    ModelConfig c = small_config();
    size_t P = model_config_num_params(&c), NB = model_config_num_bn_stats(&c);
    float* state[3] = {random_floats(&rng, P), random_floats(&rng, P), random_floats(&rng, P)};
    float* bn = random_floats(&rng, NB);
    unsigned char blob[8] = {8, 7, 6, 5, 4, 3, 2, 1};
    TrainConfig cfg;
    train_config_defaults(&cfg);
    RunIdentity run = train_config_run_identity(&cfg, 1, 2, 3);
    CheckpointInfo info;
    checkpoint_info_from_run(&info, &run, 8, 8, 0);
    int rc = 0;
    if (a->what == WF_CHECKPOINT) {
        rc = checkpoint_write(a->dir, &c, &info, state[0], state[1], state[2], bn, 1, blob, 8, blob, 8, NULL);
    } else if (a->what == WF_MODEL) {
        char path[600];
        snprintf(path, sizeof(path), "%s/model.bin", a->dir);
        rc = model_file_write(path, &c, state[0], bn);
    } else {  // three ranks, one after the other, as gpu_save_checkpoint_parts does at once
        CheckpointPartEntry table[3];
        int failed = 0;
        for (int r = 0; r < 3; r++) {
            ZeroShardMap map;
            zero_shard_map(&map, &c, 3, r);
            float* packed[3];
            for (int k = 0; k < 3; k++) {
                packed[k] = (float*)malloc_check((map.shard_elems > 0 ? map.shard_elems : 1) * sizeof(float));
                zero_shard_pack(&map, state[k], packed[k]);
            }
            int part_rc = checkpoint_part_write(a->dir, 8, &c, r, 3, SHARD_MODE_ZERO, packed[0], packed[1], packed[2],
                                                map.shard_elems, &table[r]);
            if (part_rc != 0) rc = part_rc;
            failed += part_rc != 0;
            for (int k = 0; k < 3; k++) free(packed[k]);
            zero_shard_map_free(&map);
        }
        if (failed == 0) {
            rc = checkpoint_manifest_write(a->dir, &c, &info, bn, 1, blob, 8, blob, 8, 3, SHARD_MODE_ZERO, table, NULL);
        }
        if (rc != 0) printf("removed %d part(s)\n", checkpoint_parts_remove(a->dir, 8, 3));
    }
    exit(rc == -1 ? 3 : rc == 0 ? 0 : 4);
}

// "name size hash" of every entry of dir, sorted by name (a directory's listing and contents)
static void dir_snapshot(const char* dir, char* out, size_t size) {
    struct dirent** names;
    int n = scandir(dir, &names, NULL, alphasort);
    out[0] = '\0';
    for (int i = 0; i < n; i++) {
        char path[700], line[400];
        snprintf(path, sizeof(path), "%s/%s", dir, names[i]->d_name);
        struct stat st;
        uint64_t h = 0;
        if (lstat(path, &st) == 0 && S_ISREG(st.st_mode)) {
            size_t bytes;
            unsigned char* data = read_all(path, &bytes);
            h = (uint64_t)XXH64(data, bytes, 0);
            free(data);
        }
        snprintf(line, sizeof(line), "%s %lld %016llx\n", names[i]->d_name, (long long)st.st_size, (unsigned long long)h);
        if (strlen(out) + strlen(line) < size) strcat(out, line);
        free(names[i]);
    }
    free(names);
}

static void test_write_errors(void) {
    struct stat st;
    if (stat("/dev/full", &st) != 0 || !S_ISCHR(st.st_mode)) {
        test_check(0, "write errors: /dev/full exists (the full disk these tests write to)");
        return;
    }
    const char* tmp_names[WF_CASES] = {"ckpt_00000008.bin.tmp", "model.bin.tmp", "ckpt_00000008.part2of3.bin.tmp",
                                       "ckpt_00000008.bin.tmp"};
    const char* names[WF_CASES] = {"write errors: a checkpoint write to a full disk returns -1 naming the .tmp and the cause",
                                   "write errors: a model file write to a full disk returns -1 naming the .tmp and the cause",
                                   "write errors: part 2 of 3 failing returns -1 naming the part and the cause",
                                   "write errors: the manifest failing after the parts returns -1 naming it and the cause"};
    for (int what = 0; what < WF_CASES; what++) {
        Rng rng = rng_seeded(1320 + what);
        char dir[512], sub[32], previous[CHECKPOINT_PATH_MAX], link[700];
        snprintf(sub, sizeof(sub), "write_error%d", what);
        make_dir(dir, sizeof(dir), sub);
        // what a run saved before: a checkpoint (step 7) and a model file
        write_random_checkpoint(dir, previous, &rng);
        ModelConfig c = small_config();
        float* params = random_floats(&rng, model_config_num_params(&c));
        snprintf(link, sizeof(link), "%s/model.bin", dir);
        if (model_file_write(link, &c, params, NULL) != 0) exit(EXIT_FAILURE);
        free(params);
        static char before[8192], after[8192];
        dir_snapshot(dir, before, sizeof(before));
        snprintf(link, sizeof(link), "%s/%s", dir, tmp_names[what]);
        if (symlink("/dev/full", link) != 0) {
            test_checkf(0, names[what], "symlink %s: %s", link, strerror(errno));
            continue;
        }
        WriteFailArgs a = {dir, what};
        char out[4096];
        int status = test_run_child(child_write_failing, &a, out, sizeof(out));
        int ok = status == 3 && strstr(out, tmp_names[what]) != NULL && strstr(out, "No space left on device") != NULL &&
                 strstr(out, "Error: ") != NULL;
        test_checkf(ok, names[what], "exit %d (3 = returned -1): %.400s", status, out);
        dir_snapshot(dir, after, sizeof(after));
        ok = strcmp(before, after) == 0 && lstat(link, &st) != 0;
        test_checkf(ok, "write errors: ... no .tmp, no new file, the checkpoint and model saved before intact",
                    "%s%s%s%s", ok ? "" : "before:\n", ok ? "" : before, ok ? "" : "after:\n", ok ? "" : after);
        if (what >= WF_PART) {
            test_checkf(strstr(out, what == WF_PART ? "removed 2 part(s)" : "removed 3 part(s)") != NULL,
                        "write errors: ... the parts written by the other ranks are removed", "%.300s", out);
        }
    }
}

// ----------------------------------------------------------------------------
// sizes of the batch flags

typedef struct {
    const char* argv[16];
    int argc;
} FlagArgs;

static void child_flags(void* arg) {
    FlagArgs* a = (FlagArgs*)arg;
    TrainConfig cfg;
    train_config_defaults(&cfg);
    train_config_parse(&cfg, a->argc, (char**)a->argv);
    ModelConfig mc;
    if (!train_config_model(&cfg, &mc)) exit(7);
    train_config_validate(&cfg, &mc);
    printf("grad_accum %d tokens %lld\n", train_config_grad_accum_steps(&cfg), train_config_total_batch_tokens(&cfg));
}

static FlagArgs flags(const char* a1, const char* a2, const char* a3, const char* a4, const char* a5, const char* a6,
                      const char* a7, const char* a8) {
    FlagArgs f;
    memset(&f, 0, sizeof(f));
    const char* given[8] = {a1, a2, a3, a4, a5, a6, a7, a8};
    f.argv[f.argc++] = "train";
    f.argv[f.argc++] = "-e";
    f.argv[f.argc++] = "d6";  // max_seq_len 1024; no allocation
    for (int i = 0; i < 8 && given[i] != NULL; i++) f.argv[f.argc++] = given[i];
    return f;
}

static void test_sizes(void) {
    FlagArgs f = flags("-b", "1", "-t", "1", "-d", "2147483648", NULL, NULL);
    expect_refusal("sizes: -b 1 -t 1 -d 2^31 (grad accumulation past an int) is refused naming -d", child_flags, &f,
                   "bad value \"2147483648\" for flag -d (--total-batch-size): total batch must be a multiple of",
                   "at most 2147483647 times it");
    f = flags("-b", "4", "-t", "64", "-d", "549755813888", NULL, NULL);
    expect_refusal("sizes: -b 4 -t 64 -d 549755813888 is refused naming -d", child_flags, &f,
                   "\"549755813888\" for flag -d", "= 4*64*1 = 256 tokens");
    f = flags("-b", "2097152", "-t", "1024", NULL, NULL, NULL, NULL);
    expect_refusal("sizes: -b 2097152 -t 1024 (B*T = 2^31, past an int) is refused naming -b and -t", child_flags, &f,
                   "flags -b 2097152 -t 1024: B*T = 2147483648 tokens", "at most 2147483647");
    f = flags("-b", "1024", "-t", "1024", "-d", "1099511627776", "-x", "2000000000");
    expect_refusal("sizes: -x * -d past 64 bits is refused naming -x and -d", child_flags, &f,
                   "flags -x 2000000000 and -d 1099511627776", "overflows");
    f = flags("-x", "2147483647", NULL, NULL, NULL, NULL, NULL, NULL);
    expect_refusal("sizes: -x 2^31-1 (the step loop would wrap) is refused", child_flags, &f, "for flag -x", NULL);
    f = flags("-b", "4", "-t", "64", "-d", "-1", NULL, NULL);
    char out[4096];
    int status = test_run_child(child_flags, &f, out, sizeof(out));
    test_checkf(status == 999 && strstr(out, "grad_accum 1 tokens 256"), "sizes: -d -1 is B*T*processes", "%s", out);
    f = flags("-b", "1024", "-t", "1024", "-d", "2251799812636672", NULL, NULL);  // (2^31 - 1) * 2^20
    status = test_run_child(child_flags, &f, out, sizeof(out));
    test_checkf(status == 999 && strstr(out, "grad_accum 2147483647 tokens 2251799812636672"),
                "sizes: the largest grad accumulation (2^31-1 micro-batches) is accepted exactly", "%s", out);
    TrainConfig cfg;
    train_config_defaults(&cfg);
    const char* argv[] = {"train", "-d", "9007199254740993"};  // 2^53 + 1: a double would round it
    train_config_parse(&cfg, 3, (char**)argv);
    test_checkf(cfg.total_batch_size == 9007199254740993LL, "sizes: -d keeps all 64 bits", "%lld", cfg.total_batch_size);
}

// ----------------------------------------------------------------------------
// host memory

static void child_build(void* arg) {
    GPT model;
    gpt_build(&model, (const ModelConfig*)arg);
    printf("built %zu params\n", model.num_params);
}

static void test_memory(void) {
    long long available = host_memory_available();
    if (available < 0) {
        test_check(0, "memory: MemAvailable is readable from /proc/meminfo");
        return;
    }
    // a gelu model whose weights, gradients and AdamW state (16 bytes a parameter) need twice
    // what is available: layers of 8C^2 + 4C parameters with C = 4096
    ModelConfig c;
    model_config_preset(&c, "d12", FFN_GELU);
    c.channels = 4096;
    c.num_heads = 32;
    c.ffn_hidden = 4 * 4096;
    double per_layer = 12.0 * 4096.0 * 4096.0 * 16.0;
    c.num_layers = (int)(2.0 * (double)available / per_layer) + 1;
    char out[4096];
    int status = test_run_child(child_build, &c, out, sizeof(out));
    test_checkf(status == EXIT_FAILURE && strstr(out, "GiB of host memory for the model's") && strstr(out, "MemAvailable") &&
                strstr(out, "AdamW state"), "memory: gpt_build refuses a model that cannot fit, with the numbers",
                "L=%d, exit %d: %.300s", c.num_layers, status, out);
    ModelConfig small = small_config();
    status = test_run_child(child_build, &small, out, sizeof(out));
    test_checkf(status == 999 && strstr(out, "built"), "memory: a small model builds", "exit %d: %s", status, out);
}

int main(void) {
    test_begin("test_integrity");
    snprintf(tmp_root, sizeof(tmp_root), "/tmp/test_integrity_XXXXXX");
    if (mkdtemp(tmp_root) == NULL) {
        perror("mkdtemp");
        return EXIT_FAILURE;
    }
    test_hash_catches_corruption();
    test_model_file_v1();
    test_nonfinite();
    test_not_a_file();
    test_stale_tmp();
    test_write_errors();
    test_sizes();
    test_memory();
    test_remove_tree(tmp_root);
    return test_end();
}
