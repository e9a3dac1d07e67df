/*
 * test_loop_ranks.c - G = 3 "ranks" (threads of one process) run llmc/train_loop.h's
 * train_loop_run with a fake backend whose sum_ranks and checkpoint save are real cross-thread
 * collectives (a timed barrier). Each scenario runs in a child process and checks that no rank
 * waits forever, that every rank issues the same sequence of collectives, and that every rank
 * returns the expected exit status: a plain run, a log write error on rank 0 (/dev/full), a stop
 * request on rank 2 alone, a NaN loss on rank 1 alone, a log file rank 0 cannot open, --mc-eval
 * (16 examples: 6, 5, 5 per rank, every rank the same batches), a checkpoint save failing on
 * rank 0 alone (its file or the manifest) or on rank 2 alone (its part of a sharded save), the
 * final model write failing on rank 0 and a malformed tokenizer file read by rank 0 alone (the
 * real tokenizer_init on a file with a bad magic number): every failure stops all ranks together
 * with exit 1. A backend whose forward is collective (column-sharded experts, sample_all_ranks)
 * runs the samples' forwards on every rank. The model is fake (no weights; the save follows the collectives of the CUDA
 * trainer's sharded save, its write statuses are injected); resume is not simulated.
 *   make test_loop_ranks && ./test_loop_ranks
 * (from the repository root: it reads data/tinyshakespeare).
 */
#include "llmc/train_loop.h"  // first: utils.h selects the POSIX declarations
#include "llmc/test_harness.h"
#include <sys/wait.h>
#include <pthread.h>
#include <fcntl.h>

#define G 3
#define MAXLOG 4096

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int arrived = 0, generation = 0, hung = 0;
static double acc[16], result[16];
static int acc_n = -1;

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
static void f_step(void* ctx, int step, float lr, int t, const volatile sig_atomic_t* stop_local, TrainStepResult* out) {
    (void)lr; (void)t; (void)stop_local;
    Rank* r = (Rank*)ctx;
    dataloader_next_batch(&r->train);
    double v[2] = {r->nan_at_step == step ? NAN : 1.0 + 0.01 * r->rank, r->stop_at_step == step ? 1.0 : 0.0};
    collective(r, 1, v, 2);
    out->loss = (float)(v[0] / G);
    out->stop = v[1] > 0;
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
static void f_load(void* ctx, const char* p, CheckpointInfo* i, DataLoaderState* l, uint64_t* rng) {
    (void)ctx; (void)p; (void)i; (void)l; (void)rng;
    fprintf(stderr, "SIM: load not simulated\n");
    exit(2);
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

static TrainConfig cfg;
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
    int sample_all;                      // the samples' forwards are collectives (sample_all_ranks)
} Case;

// one scenario in this process; returns 0 when the ranks agree and all return the expected status
static int scenario(const char* out_dir, const Case* k) {
    const char* log_file = k->log;
    const char* mc_eval = k->mc;
    int expect_rc = k->rc;
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
    pthread_t th[G];
    for (int i = 0; i < G; i++) {
        ranks[i].rank = i;
        ranks[i].stop_at_step = i == k->stop_rank ? k->stop_step : -1;
        ranks[i].nan_at_step = i == k->nan_rank ? k->nan_step : -1;
        ranks[i].save_fail_step = i == k->save_fail_rank ? k->save_fail_step : -1;
        ranks[i].model_fail = i == k->model_fail_rank;
        dataloader_init(&ranks[i].train, "data/tinyshakespeare/tiny_shakespeare_train.bin", B, 32, i, G, 0, 0, 50257);
        dataloader_init(&ranks[i].val, "data/tinyshakespeare/tiny_shakespeare_val.bin", B, 32, i, G, 0, 0, 50257);
    }
    for (int i = 0; i < G; i++) pthread_create(&th[i], NULL, run_rank, &ranks[i]);
    for (int i = 0; i < G; i++) pthread_join(th[i], NULL);
    int ok = !hung;
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
    if (k->save_fail_rank >= 0) {  // the ranks stop at the failed save: no update after it
        int updates = 0;
        for (int c = 0; c < ranks[0].nlog; c++) updates += ranks[0].log[c] / 100 == 1;
        if (updates != k->save_fail_step) {
            fprintf(stderr, "SIM: %d updates, expected the run to stop at the save of step %d\n", updates,
                    k->save_fail_step);
            ok = 0;
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
        {"plain run", "", -1, -1, -1, -1, 6, 0, "", -1, -1, -1, 0, 0},
        {"log write error on rank 0", "/dev/full", -1, -1, -1, -1, 6, 1, "", -1, -1, -1, 0, 0},
        {"stop request on rank 2 alone", "", 2, 3, -1, -1, 8, 130, "", -1, -1, -1, 0, 0},
        {"NaN loss on rank 1 alone", "", -1, -1, 1, 4, 8, 1, "", -1, -1, -1, 0, 0},
        {"log file rank 0 cannot open", "/nonexistent_dir/log.jsonl", -1, -1, -1, -1, 6, 1, "", -1, -1, -1, 0, 0},
        {"--mc-eval, 16 examples over 3 ranks", "", -1, -1, -1, -1, 4, 0, "data/mc_examples_val.bin", -1, -1, -1, 0, 0},
        {"checkpoint save failing on rank 0 alone (step 4)", "", -1, -1, -1, -1, 8, 1, "", 0, 4, -1, 0, 0},
        {"checkpoint save failing on rank 2 alone (its part, step 2)", "", -1, -1, -1, -1, 8, 1, "", 2, 2, -1, 0, 0},
        {"checkpoint save failing on rank 1 alone at the last step", "", -1, -1, -1, -1, 6, 1, "", 1, 6, -1, 0, 0},
        {"final model write failing on rank 0", "", -1, -1, -1, -1, 6, 1, "", -1, -1, 0, 0, 0},
        {"malformed tokenizer file on rank 0", "", -1, -1, -1, -1, 6, 1, "", -1, -1, -1, 1, 0},
        {"checkpoint save failing after a stop request (rank 2 asks, rank 0 fails)", "", 2, 3, -1, -1, 8, 1, "", 0,
         4, -1, 0, 0},
        {"samples whose forward is collective run on every rank (sample_all_ranks)", "", -1, -1, -1, -1, 6, 0, "", -1,
         -1, -1, 0, 1},
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
