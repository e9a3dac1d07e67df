/*
 * test_loop_ranks.c - G = 3 "ranks" (threads of one process) run llmc/train_loop.h's
 * train_loop_run with a fake backend whose sum_ranks and checkpoint save are real cross-thread
 * collectives (a timed barrier). Each scenario runs in a child process and checks that no rank
 * waits forever, that every rank issues the same sequence of collectives, and that every rank
 * returns the expected exit status: a plain run, a log write error on rank 0 (/dev/full; learnt by
 * the others with the next step's loss reduction, so the run stops after one update), a log write
 * error in the last step's records only (a file size limit: agreed at that ending step), a stop
 * request on rank 2 alone, a NaN loss on rank 1 alone, a log file rank 0 cannot open, --mc-eval
 * (16 examples: 6, 5, 5 per rank, every rank the same batches), a checkpoint save failing on
 * rank 0 alone (its file or the manifest) or on rank 2 alone (its part of a sharded save), the
 * final model write failing on rank 0, a malformed tokenizer file read by rank 0 alone (the
 * real tokenizer_init on a file with a bad magic number), and a resume (-y 1) of a real sharded
 * checkpoint (manifest + 3 parts, llmc/checkpoint_parts.h) with one part corrupt (one flipped
 * byte: checkpoint_find_latest, which checks sizes only, still picks it): read by rank 0 alone
 * (a replicated run) or by the ranks whose shard it holds (ZeRO-1), with the real part readers;
 * every failure stops all ranks together with exit 1, the resume failure's message printed once.
 * The same resume of the sound checkpoint continues to the end (the control). In the plain run
 * no step without an evaluation or a checkpoint issues a collective besides its loss reduction
 * (the log status travels with the loss). A backend whose forward is collective (column-sharded
 * experts, sample_all_ranks) runs the samples' forwards on every rank. The model is fake (no weights; the save follows the collectives of the CUDA
 * trainer's sharded save, its write statuses are injected; its load follows gpu_load_checkpoint's
 * collectives around the real part readers).
 *   make test_loop_ranks && ./test_loop_ranks
 * (from the repository root: it reads data/tinyshakespeare).
 */
#include "llmc/train_loop.h"  // first: utils.h selects the POSIX declarations
#include "llmc/test_harness.h"
#include <sys/wait.h>
#include <pthread.h>
#include <fcntl.h>
#include <sys/resource.h>

#define G 3
#define MAXLOG 4096

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int arrived = 0, generation = 0, hung = 0;
static double acc[16], result[16];
static int acc_n = -1;
static TrainConfig cfg;
static int resume_mode = 0;           // 1: a replicated run's load (rank 0 reads every part), 2: ZeRO-1's
static ModelConfig load_config;       // the model of the sharded checkpoint
static struct {                       // rank 0's resume point, "broadcast" by the collective after it
    CheckpointInfo info;
    DataLoaderState loader;
    uint64_t rng;
} resume_point;

typedef struct {
    int rank;
    int nlog;
    int log[MAXLOG];     // kind*100 + n
    int stop_at_step;    // this rank's local stop request before this train step (-1 never)
    int nan_at_step;     // local loss NaN at this train step (-1 never)
    int save_fail_step;  // this rank's write fails in the checkpoint save of this step (-1 never)
    int model_fail;      // this rank's write of the final model fails
    DataLoader train, val;
} Rank;

static void collective(Rank* r, int kind, double* v, int n) {
    if (r->nlog < MAXLOG) r->log[r->nlog++] = kind * 100 + n;
    pthread_mutex_lock(&mu);
    if (hung) { pthread_mutex_unlock(&mu); return; }
    if (arrived == 0) { memset(acc, 0, sizeof(acc)); acc_n = n; }
    if (acc_n != n) { fprintf(stderr, "SIM: rank %d collective size %d vs %d\n", r->rank, n, acc_n); hung = 1; }
    for (int i = 0; i < n; i++) acc[i] += v[i];
    int gen = generation;
    if (++arrived == G) {
        memcpy(result, acc, sizeof(acc));
        arrived = 0;
        generation++;
        pthread_cond_broadcast(&cv);
    } else {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += 3;
        while (gen == generation && !hung) {
            if (pthread_cond_timedwait(&cv, &mu, &ts) != 0) {
                fprintf(stderr, "SIM: HANG: rank %d waits in collective kind %d\n", r->rank, kind);
                hung = 1;
                pthread_cond_broadcast(&cv);
            }
        }
    }
    if (!hung) for (int i = 0; i < n; i++) v[i] = result[i];
    pthread_mutex_unlock(&mu);
}

static void f_init(void* ctx) { (void)ctx; }
// as gpu_train_step: the loss, the stop requests and the log status in one reduction
static void f_step(void* ctx, int step, float lr, int t, const volatile sig_atomic_t* stop_local, int log_failed_local,
                   TrainStepResult* out) {
    (void)lr; (void)t; (void)stop_local;
    Rank* r = (Rank*)ctx;
    dataloader_next_batch(&r->train);
    double v[3] = {r->nan_at_step == step ? NAN : 1.0 + 0.01 * r->rank, r->stop_at_step == step ? 1.0 : 0.0,
                   log_failed_local ? 1.0 : 0.0};
    collective(r, 1, v, 3);
    out->loss = (float)(v[0] / G);
    out->stop = v[1] > 0;
    out->log_failed = v[2] > 0;
    out->norm = 1.0f;
}
static float f_fwd(void* ctx, const int* i, const int* t, int B, int T) { (void)ctx; (void)i; (void)t; (void)B; (void)T; return 2.0f; }
// not a collective, but logged as one: every rank must run the same number of eval batches
static void f_losses(void* ctx, float* losses, const int* i, const int* t, int B, int T) {
    Rank* r = (Rank*)ctx;
    if (r->nlog < MAXLOG) r->log[r->nlog++] = 400 + B;
    for (int p = 0; p < B * T; p++) losses[p] = (float)((i[p] * 7 + t[p]) % 13);
}
static int g_sample_all;  // the backend's sample_all_ranks: its forward is a collective (sharded experts)
static void f_logits(void* ctx, const int* tokens, int T, int t, float* out) {
    (void)tokens; (void)T; (void)t;
    if (g_sample_all) {  // as the column-sharded experts' exchanges: every rank must be in this forward
        double v[1] = {1};
        collective((Rank*)ctx, 5, v, 1);
    }
    for (int v = 0; v < 50; v++) out[v] = (float)v / 50;
}
// as gpu_save_checkpoint_parts: the BN allgather, every rank writes its part, the parts' table
// and statuses reach rank 0 (an allgather), rank 0 writes the manifest when every part is written
static int f_save(void* ctx, const CheckpointInfo* info, const DataLoaderState* loader, const uint64_t* rng, char* path) {
    (void)loader; (void)rng;
    Rank* r = (Rank*)ctx;
    double v[1] = {1};
    collective(r, 2, v, 1);  // the BN allgather
    int failed = r->save_fail_step == info->step;  // this rank's part (rank 0: or the manifest)
    if (failed) fprintf(stderr, "SIM: rank %d: the write of checkpoint step %d fails\n", r->rank, info->step);
    double parts[1] = {failed ? 1.0 : 0.0};
    collective(r, 5, parts, 1);  // the table with each part's status
    if (r->rank == 0 && parts[0] == 0.0) snprintf(path, CHECKPOINT_PATH_MAX, "ckpt_%08d(fake)", info->step);
    return failed;
}
// as gpu_load_checkpoint on a sharded checkpoint: rank 0 reads the manifest's sections and, in a
// replicated run, assembles every part; the resume point (with rank 0's status) is broadcast.
// ZeRO-1: then every rank reads its own shard and the statuses are summed before the gather.
static int f_load(void* ctx, const char* path, CheckpointInfo* info, DataLoaderState* loader, uint64_t* rng) {
    Rank* r = (Rank*)ctx;
    if (resume_mode == 0) {
        fprintf(stderr, "SIM: load outside a resume case\n");
        exit(2);
    }
    int failed = 0;
    double status[1] = {0.0};
    if (r->rank == 0) {
        checkpoint_read(path, &load_config, &resume_point.info, NULL, NULL, NULL, NULL, 1, &resume_point.loader,
                        sizeof(resume_point.loader), &resume_point.rng, sizeof(resume_point.rng));
        if (resume_mode == 1) {
            size_t n = model_config_num_params(&load_config);
            float* flat[3];
            for (int k = 0; k < 3; k++) flat[k] = (float*)malloc_check(n * sizeof(float));
            ModelConfig c;
            CheckpointInfo i;
            CheckpointPartEntry* table = checkpoint_manifest_read_table(path, &load_config, &c, &i);
            failed = checkpoint_parts_read_logical(path, &c, &i, table, flat[0], flat[1], flat[2]) != 0;
            free(table);
            for (int k = 0; k < 3; k++) free(flat[k]);
        }
        status[0] = failed;
    }
    collective(r, 7, status, 1);  // the resume point's broadcast
    if (status[0] > 0.0) return failed;
    if (resume_mode == 2) {  // path is rank 0's alone: each rank names the manifest of the step
        char manifest[CHECKPOINT_PATH_MAX];
        checkpoint_path(manifest, sizeof(manifest), cfg.output_dir, resume_point.info.step);
        path = manifest;
        ModelConfig c;
        CheckpointInfo i;
        CheckpointPartEntry* table = checkpoint_manifest_read_table(path, &load_config, &c, &i);
        ZeroShardMap map;
        zero_shard_map(&map, &c, G, r->rank);
        float* packed[3];
        for (int k = 0; k < 3; k++) packed[k] = (float*)malloc_check((map.shard_elems + 1) * sizeof(float));
        double bad[1] = {checkpoint_parts_read_shard(path, &c, &i, table, &map, packed[0], packed[1], packed[2]) != 0};
        failed = bad[0] > 0.0;
        collective(r, 8, bad, 1);  // the statuses, before the gather
        for (int k = 0; k < 3; k++) free(packed[k]);
        zero_shard_map_free(&map);
        free(table);
        if (bad[0] > 0.0) return 1;
    }
    *info = resume_point.info;
    *loader = resume_point.loader;
    *rng = resume_point.rng;
    return 0;
}
static void f_stats(void* ctx, float* u, float* k) { (void)ctx; (void)u; (void)k; }
// as gpu_write_model with ZeRO-1: every rank takes part in the gather, rank 0 writes
static int f_model(void* ctx, const char* path) {
    (void)path;
    Rank* r = (Rank*)ctx;
    double v[1] = {1};
    collective(r, 6, v, 1);  // the gather of the master weights
    return r->model_fail;
}
static void f_sum(void* ctx, double* v, int n) { collective((Rank*)ctx, 3, v, n); }

static Rank ranks[G];
static int rcs[G];
static char tokenizer_path[600];  // "" = none: the real tokenizer_init reads it on rank 0

static void* run_rank(void* arg) {
    Rank* r = (Rank*)arg;
    TrainBackend be;
    memset(&be, 0, sizeof(be));
    be.ctx = r;
    be.rank = r->rank;
    be.num_processes = G;
    be.model_config = resume_mode ? &load_config : NULL;
    be.vocab_size = cfg.mc_eval_path[0] ? 50257 : 50;  // the eval file holds GPT-2 tokens (no samples then)
    be.sample_T = 4;
    be.init_weights = f_init;
    be.train_step = f_step;
    be.forward_loss = f_fwd;
    be.forward_losses = f_losses;
    be.sample_logits = f_logits;
    be.sample_all_ranks = g_sample_all;
    be.save_checkpoint = f_save;
    be.load_checkpoint = f_load;
    be.expert_stats = f_stats;
    be.write_model = f_model;
    be.sum_ranks = f_sum;
    Tokenizer tok;
    memset(&tok, 0, sizeof(tok));
    int tokenizer_failed = r->rank == 0 && tokenizer_path[0] && tokenizer_init(&tok, tokenizer_path) != 0;
    TrainLoop tl = {&cfg, &be, &r->train, &r->val, 1, &tok, 1, tokenizer_failed};
    rcs[r->rank] = train_loop_run(&tl);
    tokenizer_free(&tok);
    return NULL;
}

typedef struct {
    const char* name;
    const char* log;
    int stop_rank, stop_step, nan_rank, nan_step, steps, rc;
    const char* mc;
    int save_fail_rank, save_fail_step;  // a checkpoint save failing on one rank (-1: none)
    int model_fail_rank;                 // the final model write failing on one rank (-1: none)
    int bad_tokenizer;                   // rank 0 reads a malformed tokenizer file
    int updates;                         // > 0: the run must stop after this many updates
    int last_records_fail;               // the log fails in the last step's records only (size limit)
    int quiet_steps;                     // check: odd steps (no eval, no checkpoint) add no collective
    int resume;                          // -y 1 from a sharded checkpoint at step 2: 1 replicated, 2 ZeRO-1
    int corrupt_part;                    // that checkpoint's part with a flipped byte (-1: none)
    int sample_all;                      // the samples' forwards are collectives (sample_all_ranks)
} Case;

// runs the G ranks of case k through the loop, logging to log_file
static void run_ranks(const char* out_dir, const Case* k, const char* log_file) {
    const char* mc_eval = k->mc;
    if (k->bad_tokenizer) {  // a header whose magic number is wrong (the real reader refuses it)
        snprintf(tokenizer_path, sizeof(tokenizer_path), "%s/bad_tokenizer.bin", out_dir);
        int32_t header[TOKENIZER_HEADER_INTS];
        Rng rng = rng_seeded(13);
        for (int i = 0; i < TOKENIZER_HEADER_INTS; i++) header[i] = (int32_t)rng_u32(&rng);
        FILE* fp = fopen_check(tokenizer_path, "wb");
        fwrite_check(header, sizeof(header), 1, fp, tokenizer_path);
        fclose_check(fp, tokenizer_path);
    }
    train_config_defaults(&cfg);
    g_sample_all = k->sample_all;
    int B = mc_eval[0] ? 4 : 2;
    snprintf(cfg.mc_eval_path, sizeof(cfg.mc_eval_path), "%s", mc_eval);
    snprintf(cfg.output_dir, sizeof(cfg.output_dir), "%s", out_dir);
    snprintf(cfg.log_file, sizeof(cfg.log_file), "%s", log_file);
    cfg.num_steps = k->steps;
    cfg.B = B; cfg.T = 32; cfg.val_every = 2; cfg.sample_every = 3; cfg.checkpoint_every = 2;
    cfg.total_batch_size = G * B * 32;
    if (mc_eval[0]) cfg.sample_every = 0;
    cfg.num_processes = G;
    cfg.resume = k->resume != 0;
    pthread_t th[G];
    for (int i = 0; i < G; i++) {
        ranks[i].rank = i;
        ranks[i].nlog = 0;
        ranks[i].stop_at_step = i == k->stop_rank ? k->stop_step : -1;
        ranks[i].nan_at_step = i == k->nan_rank ? k->nan_step : -1;
        ranks[i].save_fail_step = i == k->save_fail_rank ? k->save_fail_step : -1;
        ranks[i].model_fail = i == k->model_fail_rank;
        dataloader_init(&ranks[i].train, "data/tinyshakespeare/tiny_shakespeare_train.bin", B, 32, i, G, 0, 0, 50257);
        dataloader_init(&ranks[i].val, "data/tinyshakespeare/tiny_shakespeare_val.bin", B, 32, i, G, 0, 0, 50257);
    }
    for (int i = 0; i < G; i++) pthread_create(&th[i], NULL, run_rank, &ranks[i]);
    for (int i = 0; i < G; i++) pthread_join(th[i], NULL);
}

// the size of a file and of its last line (0, 0 when it cannot be read)
static void file_sizes(const char* path, long* size, long* last_line) {
    *size = *last_line = 0;
    FILE* fp = fopen(path, "rb");
    if (fp == NULL) return;
    long line = 0;
    int c;
    while ((c = fgetc(fp)) != EOF) {
        (*size)++;
        line++;
        if (c == '\n') { *last_line = line; line = 0; }
    }
    fclose(fp);
}

// A sharded checkpoint of step 2 in out_dir, as the G ranks and rank 0 of a ZeRO-1 run save it, of
// random state of load_config and this run's identity (rank 0's data); part `corrupt` (>= 0) gets
// one flipped byte in its master weights (its size unchanged). Returns 0.
static int write_sharded_checkpoint(const char* out_dir, int corrupt) {
    load_config = test_config(TEST_DIMS_TINY, FFN_GELU, 0, 0, ROUTER_NORM_BN, GATE_SOFTMAX);
    DataLoader train;
    dataloader_init(&train, "data/tinyshakespeare/tiny_shakespeare_train.bin", cfg.B, cfg.T, 0, G, 0, 0, 50257);
    RunIdentity run = train_config_run_identity(&cfg, train.fingerprint, train.total_tokens, train.num_shards);
    run.moe_aux = run.moe_zc_weight = run.moe_bias_rate = 0.0f;  // as the loop has it for a model other than moe
    for (int b = 0; b < 2; b++) dataloader_next_batch(&train);   // where step 2 starts
    DataLoaderState loader = dataloader_get_state(&train);
    dataloader_free(&train);
    size_t n = model_config_num_params(&load_config);
    float* full[3];
    Rng rng = rng_seeded(77);
    for (int k = 0; k < 3; k++) {
        full[k] = (float*)malloc_check(n * sizeof(float));
        fill_uniform(full[k], n, 1e-6f, 0.1f, &rng);
    }
    CheckpointPartEntry table[G];
    for (int r = 0; r < G; r++) {
        ZeroShardMap map;
        zero_shard_map(&map, &load_config, G, r);
        float* packed[3];
        for (int k = 0; k < 3; k++) {
            packed[k] = (float*)malloc_check((map.shard_elems + 1) * sizeof(float));
            zero_shard_pack(&map, full[k], packed[k]);
        }
        if (checkpoint_part_write(out_dir, 2, &load_config, r, G, SHARD_MODE_ZERO, packed[0], packed[1], packed[2],
                                  map.shard_elems, &table[r]) != 0) {
            exit(2);
        }
        for (int k = 0; k < 3; k++) free(packed[k]);
        zero_shard_map_free(&map);
    }
    CheckpointInfo info;
    checkpoint_info_from_run(&info, &run, 2, 2, 2LL * cfg.total_batch_size);
    uint64_t sample_rng = rng_u32(&rng);
    char path[CHECKPOINT_PATH_MAX];
    if (checkpoint_manifest_write(out_dir, &load_config, &info, NULL, 1, &loader, sizeof(loader), &sample_rng,
                                  sizeof(sample_rng), G, SHARD_MODE_ZERO, table, path) != 0) {
        exit(2);
    }
    if (corrupt >= 0) {
        char part[CHECKPOINT_PATH_MAX + 64];
        checkpoint_part_path(part, sizeof(part), out_dir, 2, corrupt, G);
        test_xor_byte(part, OMNI_HEADER_BYTES + 4 * 3 + 1, 0x20);
    }
    for (int k = 0; k < 3; k++) free(full[k]);
    return 0;
}

// how many lines of the file at path contain `what`
static int count_lines_with(const char* path, const char* what) {
    FILE* fp = fopen(path, "rb");
    if (fp == NULL) return -1;
    char line[4096];
    int count = 0;
    while (fgets(line, sizeof(line), fp) != NULL) count += strstr(line, what) != NULL;
    fclose(fp);
    return count;
}

// one scenario in this process; returns 0 when the ranks agree and all return the expected status
static int scenario(const char* out_dir, const Case* k) {
    int expect_rc = k->rc;
    char err_path[600] = "";
    int saved_stderr = -1;
    if (k->resume) {  // the run's settings (run_ranks sets the same), the checkpoint, stderr into a file
        train_config_defaults(&cfg);
        cfg.B = 2; cfg.T = 32; cfg.total_batch_size = G * 2 * 32; cfg.num_processes = G;
        write_sharded_checkpoint(out_dir, k->corrupt_part);
        resume_mode = k->resume;
        snprintf(err_path, sizeof(err_path), "%s/stderr.txt", out_dir);
        fflush(stderr);
        saved_stderr = dup(2);
        int fd = open(err_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        dup2(fd, 2);
        close(fd);
    }
    if (k->last_records_fail) {
        // a plain run sizes the log; the real run may write all but the second half of its last
        // record (the final evaluation), so the write fails after the last loss reduction
        char sizing[600], log_path[600];
        snprintf(sizing, sizeof(sizing), "%s/sizing.jsonl", out_dir);
        snprintf(log_path, sizeof(log_path), "%s/limited.jsonl", out_dir);
        run_ranks(out_dir, k, sizing);
        long size = 0, last_line = 0;
        file_sizes(sizing, &size, &last_line);
        if (hung || last_line < 8) { fprintf(stderr, "SIM: the sizing run failed\n"); return 1; }
        signal(SIGXFSZ, SIG_IGN);  // a write past the limit then fails with EFBIG
        struct rlimit lim = {(rlim_t)(size - last_line / 2), (rlim_t)(size - last_line / 2)};
        setrlimit(RLIMIT_FSIZE, &lim);
        run_ranks(out_dir, k, log_path);
        long limited = 0, limited_last = 0;
        file_sizes(log_path, &limited, &limited_last);
        if (limited >= size) { fprintf(stderr, "SIM: the limited log holds %ld bytes, all of them\n", limited); return 1; }
    } else {
        run_ranks(out_dir, k, k->log);
    }
    int ok = !hung;
    if (saved_stderr >= 0) {  // the resume's messages: shown, and a corrupt part's named exactly once
        fflush(stderr);
        dup2(saved_stderr, 2);
        close(saved_stderr);
        size_t size = 0;
        unsigned char* text = test_read_file(err_path, &size);
        if (text != NULL) fwrite(text, 1, size, stderr);
        free(text);
        int named = count_lines_with(err_path, "Error: checkpoint part");
        if (named != (k->corrupt_part >= 0 ? 1 : 0)) {
            fprintf(stderr, "SIM: the part's message printed %d times\n", named);
            ok = 0;
        }
    }
    for (int i = 0; i < G; i++) {
        if (ranks[i].nlog != ranks[0].nlog || memcmp(ranks[i].log, ranks[0].log, ranks[0].nlog * sizeof(int)) != 0) {
            fprintf(stderr, "SIM: rank %d collective sequence differs (%d vs %d calls)\n", i, ranks[i].nlog, ranks[0].nlog);
            ok = 0;
        }
        if (rcs[i] != expect_rc) {
            fprintf(stderr, "SIM: rank %d returned %d, expected %d\n", i, rcs[i], expect_rc);
            ok = 0;
        }
    }
    int updates = 0;
    for (int c = 0; c < ranks[0].nlog; c++) updates += ranks[0].log[c] / 100 == 1;
    if (k->save_fail_rank >= 0 && updates != k->save_fail_step) {  // the ranks stop at the failed save
        fprintf(stderr, "SIM: %d updates, expected the run to stop at the save of step %d\n", updates,
                k->save_fail_step);
        ok = 0;
    }
    if (k->updates > 0 && updates != k->updates) {
        fprintf(stderr, "SIM: %d updates, expected %d\n", updates, k->updates);
        ok = 0;
    }
    if (k->quiet_steps) {  // the update of an even step s leads to step s + 1: no eval, no checkpoint
        int s = 0;
        for (int c = 0; c + 1 < ranks[0].nlog; c++) {
            if (ranks[0].log[c] / 100 != 1) continue;
            if (s % 2 == 0 && s + 1 < k->steps && ranks[0].log[c + 1] / 100 != 1) {
                fprintf(stderr, "SIM: step %d issues collective kind %d besides its loss reduction\n", s + 1,
                        ranks[0].log[c + 1] / 100);
                ok = 0;
            }
            s++;
        }
    }
    if (k->sample_all) {  // the samples ran on every rank: samples of sample_T - 1 = 3 forwards
        int forwards = 0;
        for (int c = 0; c < ranks[2].nlog; c++) forwards += ranks[2].log[c] / 100 == 5;
        if (forwards == 0 || forwards % 3 != 0) {  // (rank 0's count: the sequences are compared above)
            fprintf(stderr, "SIM: rank 2 ran %d sample forwards, expected whole samples of 3\n", forwards);
            ok = 0;
        }
    }
    fprintf(stderr, "SIM: %d collectives per rank\n", ranks[0].nlog);
    return ok ? 0 : 1;
}

int main(void) {
    test_begin("test_loop_ranks");
    test_tmp_begin("test_loop_ranks");
    Case cases[] = {
        {"plain run", "", -1, -1, -1, -1, 6, 0, "", -1, -1, -1, 0, 0, 0, 1, 0, -1, 0},
        {"log write error on rank 0 (stops after the update that carried it)", "/dev/full", -1, -1, -1, -1, 6, 1, "",
         -1, -1, -1, 0, 1, 0, 0, 0, -1, 0},
        {"log write error on rank 0 in the last step's records (agreed at that step)", "", -1, -1, -1, -1, 2, 1, "",
         -1, -1, -1, 0, 2, 1, 0, 0, -1, 0},
        {"stop request on rank 2 alone", "", 2, 3, -1, -1, 8, 130, "", -1, -1, -1, 0, 0, 0, 0, 0, -1, 0},
        {"NaN loss on rank 1 alone", "", -1, -1, 1, 4, 8, 1, "", -1, -1, -1, 0, 0, 0, 0, 0, -1, 0},
        {"log file rank 0 cannot open", "/nonexistent_dir/log.jsonl", -1, -1, -1, -1, 6, 1, "", -1, -1, -1, 0, 0, 0, 0, 0, -1, 0},
        {"--mc-eval, 16 examples over 3 ranks", "", -1, -1, -1, -1, 4, 0, "data/mc_examples_val.bin", -1, -1, -1, 0, 0, 0, 0, 0, -1, 0},
        {"checkpoint save failing on rank 0 alone (step 4)", "", -1, -1, -1, -1, 8, 1, "", 0, 4, -1, 0, 0, 0, 0, 0, -1, 0},
        {"checkpoint save failing on rank 2 alone (its part, step 2)", "", -1, -1, -1, -1, 8, 1, "", 2, 2, -1, 0, 0, 0, 0, 0, -1, 0},
        {"checkpoint save failing on rank 1 alone at the last step", "", -1, -1, -1, -1, 6, 1, "", 1, 6, -1, 0, 0, 0, 0, 0, -1, 0},
        {"final model write failing on rank 0", "", -1, -1, -1, -1, 6, 1, "", -1, -1, 0, 0, 0, 0, 0, 0, -1, 0},
        {"malformed tokenizer file on rank 0", "", -1, -1, -1, -1, 6, 1, "", -1, -1, -1, 1, 0, 0, 0, 0, -1, 0},
        {"checkpoint save failing after a stop request (rank 2 asks, rank 0 fails)", "", 2, 3, -1, -1, 8, 1, "", 0,
         4, -1, 0, 0, 0, 0, 0, -1, 0},
        {"resume of a sharded checkpoint: rank 0 alone reads a corrupt part (replicated run)", "", -1, -1, -1, -1, 4,
         1, "", -1, -1, -1, 0, 0, 0, 0, 1, 1, 0},
        {"resume of a sharded checkpoint: rank 2 alone reads a corrupt part (ZeRO-1)", "", -1, -1, -1, -1, 4, 1, "",
         -1, -1, -1, 0, 0, 0, 0, 2, 2, 0},
        {"resume of the sound sharded checkpoint (replicated) runs to the end", "", -1, -1, -1, -1, 4, 0, "", -1, -1,
         -1, 0, 2, 0, 0, 1, -1, 0},
        {"resume of the sound sharded checkpoint (ZeRO-1) runs to the end", "", -1, -1, -1, -1, 4, 0, "", -1, -1, -1,
         0, 2, 0, 0, 2, -1, 0},
        {"samples whose forward is collective run on every rank (sample_all_ranks)", "", -1, -1, -1, -1, 6, 0, "", -1,
         -1, -1, 0, 0, 0, 0, 0, -1, 1},
    };
    for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        char out[512];
        char sub[32];
        snprintf(sub, sizeof(sub), "case%zu", c);
        test_tmp_subdir(out, sizeof(out), sub);
        fflush(stdout);
        pid_t pid = fork();
        if (pid == 0) {
            int quiet = open("/dev/null", O_WRONLY);
            dup2(quiet, 1);  // the ranks' console lines
            _exit(scenario(out, &cases[c]));
        }
        int status = 0;
        waitpid(pid, &status, 0);
        int ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
        test_checkf(ok, cases[c].name, "every rank returns %d, same collectives, no wait forever", cases[c].rc);
    }
    test_tmp_end();
    return test_end();
}
