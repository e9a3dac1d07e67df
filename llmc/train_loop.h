/*
 * train_loop.h - the training loop of both trainers (train_omnimoe.c on the CPU, train_omnimoe.cu
 * on one or several GPUs): the order of a step, what a checkpoint restores, signals, resume rules
 * and the run-safety checks. Each trainer implements the small TrainBackend below (its model) and
 * calls train_loop_run() once. Plain C (gcc -std=c11 and nvcc).
 *
 * The loop, for step = start .. num_steps (step = updates completed so far):
 *   1. evaluate     when -v divides step, and at the last step; a non-finite validation loss
 *                   stops the run here, before anything of this step is written. With --mc-eval
 *                   also the multiple-choice accuracy (train_loop_mc_eval) when --mc-every
 *                   divides step, and at the last step; it changes no state either
 *   2. sample       when -s divides step (step > 0), and at the last step; rank 0 (the other
 *                   ranks run its forwards too when the backend says sample_all_ranks); not at
 *                   the start step of a resumed run (the interrupted run printed that one)
 *   3. checkpoint   with -o: when -n divides step, at the last step, and after a stop request
 *                   or a log write error (whatever -n is; on several ranks the error is learnt
 *                   with a step's loss reduction, train_loop_log_failed_); never at the start step. A save that
 *                   fails on any rank (disk full, I/O error, a non-finite value) stops every
 *                   rank here with exit 1: the backend returns each rank's status, the ranks
 *                   agree on it (train_loop_any_); the older checkpoints are intact
 *   4. stop         at the last step (done), after a stop request (exit 130) or a log write
 *                   error (exit 1)
 *   5. train step   one optimiser update (gradient accumulation inside the backend); the ranks
 *                   agree on the loss, the gradient norm, any stop request and rank 0's log status
 *   6. checks       a non-finite loss or gradient norm stops the run before anything is written
 *   7. log line     console + JSONL (rank 0); expert statistics of OmniMoE layers
 * and after the last step: 8. the final weights to <-o>/model.bin (rank 0; every rank calls the
 * backend and agrees on its status: a failed write is exit 1 on every rank).
 *
 * Why resume is bitwise: the checkpoint of step S is taken after S's evaluation and sample, so it
 * holds the sampling RNG as the next sample will find it, and before S's update, with the data
 * loader where that update starts. The resumed run repeats S's evaluation (it reads the
 * validation data from the start and changes no state) and skips S's sample, so every later
 * step sees the same weights, AdamW moments, BN statistics, batches and RNG as the straight run.
 *
 * A checkpoint restores, never recomputes: step, adam_t (AdamW updates taken), tokens_seen, the
 * data-loader state (position and shuffle order), the sampling RNG, and through the backend the
 * weights, AdamW moments and BN statistics. A checkpoint of other data, order or seed is refused;
 * other run settings that differ are noted (checkpoint_compare_run).
 *
 * Run safety (every check runs on rank 0, which owns the files; the others learn the outcome
 * through train_loop_agree_ or train_loop_any_; nothing that can fail on one rank alone may exit
 * there: it returns a status the ranks agree on, so all stop together with the same exit status
 * and one message from the rank that failed):
 *   - a malformed tokenizer file (read by rank 0 only) stops every rank before anything else;
 *   - a fresh run (no -y 1) into an output directory that holds another run's checkpoints, model
 *     or log is refused, unless --overwrite 1 (then those files are removed first);
 *   - -y 1 without a usable checkpoint (none, or every one corrupt) is an error; nothing is written;
 *   - a checkpoint that fails while it is read (a corrupt part of a sharded checkpoint: only its
 *     existence and size are checked when it is chosen) stops every rank with exit 1;
 *   - a resumed checkpoint past -x is an error; one exactly at -x: the run is complete, exit 0,
 *     nothing written;
 *   - SIGINT, SIGTERM, SIGUSR1 (mpirun forwards SIGUSR1 to every rank without a follow-up
 *     SIGKILL): the step finishes, a checkpoint is written when -o is set, exit 130;
 *   - a log write error: a checkpoint of the state (finite, checked) is written when -o is set,
 *     then exit 1 naming the file;
 *   - non-finite validation loss, loss or gradient norm: exit 1 without writing, naming which; a
 *     checkpoint this run wrote from the weights that diverged is renamed <name>.diverged (a later
 *     -y 1 skips it) and the message names the last good one.
 *
 * What differs between the trainers lives in their backends only: the CPU trainer is one process
 * (sum_ranks does nothing, the stop request is its own), has no MFU (peak_flops 0) and
 * loads the tokenizer only when it samples; the CUDA trainer folds the stop request into the
 * reduction of the step's loss (with the log status) and gathers every rank's BN statistics into its checkpoints, and
 * samples on the (B, T) activations of training (so -g is at most -t there; the CPU trainer
 * allows up to the model's maximum sequence length).
 */
#ifndef OMNIMOE_TRAIN_LOOP_H
#define OMNIMOE_TRAIN_LOOP_H

#include "utils.h"  // first: it selects POSIX declarations
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <time.h>
#include <errno.h>
#include <signal.h>
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>
#include "config.h"
#include "rand.h"
#include "args.h"
#include "lr_schedule.h"
#include "logger.h"
#include "checkpoint.h"
#include "dataloader.h"
#include "tokenizer.h"
#include "sampler.h"
#include "mc_eval.h"

typedef struct {
    float loss;   // mean training loss of the step (over micro-batches and ranks)
    float norm;   // global gradient norm, before clipping
    int stop;     // 1 when any rank asked to stop (its stop_local was 1)
    int log_failed;  // 1 when any rank's log_failed_local was 1 (rank 0's log could not be written)
} TrainStepResult;

// One trainer's model. Every function is called on every rank unless it says rank 0.
typedef struct {
    void* ctx;
    int rank, num_processes;
    int num_omni_layers;                 // expert_stats fills this many values in each array
    double flops_per_token_fwd;          // for MFU
    double peak_flops;                   // all ranks together; 0 = unknown (no MFU printed)
    int vocab_size, sample_T;            // sample_logits' vocabulary and window
    const ModelConfig* model_config;     // a checkpoint to resume from must hold this model
    void (*init_weights)(void* ctx);     // a fresh run: from the model file or random (seed)
    // one update: t = AdamW update count after it (1, 2, ...); *stop_local = this rank's stop
    // request, read once the step's gradients are in (a signal during the step counts);
    // log_failed_local = this rank's log status. Both are summed with the loss (no collective of
    // their own)
    void (*train_step)(void* ctx, int step, float lr, int t, const volatile sig_atomic_t* stop_local,
                       int log_failed_local, TrainStepResult* out);
    // evaluation mode (BN running statistics, no state changes): mean loss of one batch
    float (*forward_loss)(void* ctx, const int* inputs, const int* targets, int B, int T);
    // evaluation mode, as forward_loss: the per-token losses (B*T floats, on the host) of one batch
    void (*forward_losses)(void* ctx, float* losses, const int* inputs, const int* targets, int B, int T);
    SamplerLogitsFn sample_logits;       // rank 0 (sampler.h); every rank when sample_all_ranks
    int sample_all_ranks;                // 1: the forward is collective (sharded experts): the other
                                         // ranks run the sample's forwards too, quietly, on a copy of the RNG
    // rank 0 writes the file (out_path; a sharded backend: every rank its part); info, loader
    // state and RNG come from the loop. Returns 0, or non-zero when this rank's part of the save
    // failed (after its message; nothing partial left): the loop agrees on it (train_loop_any_)
    int (*save_checkpoint)(void* ctx, const CheckpointInfo* info, const DataLoaderState* loader,
                           const uint64_t* sample_rng, char* out_path);
    // path valid on rank 0; every rank receives info, loader state and RNG of the file. Returns 0,
    // or non-zero when this rank's read failed (a corrupt part of a sharded checkpoint; after its
    // message) or it learnt that another rank's did: the loop agrees on it (train_loop_any_)
    int (*load_checkpoint)(void* ctx, const char* path, CheckpointInfo* info, DataLoaderState* loader,
                           uint64_t* sample_rng);
    void (*expert_stats)(void* ctx, float* usage, float* kl);   // rank 0, of the last step
    // rank 0, of the last step; NULL unless moe: 4 per layer, the share of (token, slot) pairs
    // sent to FFN, zero, copy and constant experts (docs/design.md §10)
    void (*expert_kind_shares)(void* ctx, float* shares);
    // every rank calls it; rank 0 writes; returns as save_checkpoint
    int (*write_model)(void* ctx, const char* path);
    void (*sum_ranks)(void* ctx, double* values, int n);        // values = their sums over all ranks
} TrainBackend;

typedef struct {
    const TrainConfig* cfg;
    TrainBackend* be;
    DataLoader* train_loader;      // the backend's train_step reads it; the loop saves its state
    DataLoader* val_loader;        // this rank's slice of the validation windows (when have_val)
    int val_batches;               // batches per evaluation on this rank (-1 = all)
    const Tokenizer* tokenizer;    // rank 0, for samples (may be unloaded: ids are printed)
    int have_val;                  // -j set and -v > 0
    int tokenizer_failed;          // non-zero: this rank's tokenizer_init refused a malformed file
} TrainLoop;

// ----------------------------------------------------------------------------
// signals

static volatile sig_atomic_t train_loop_stop_requested = 0;
static void train_loop_on_signal(int sig) {
    (void)sig;
    train_loop_stop_requested = 1;
}
// sigaction, not signal(): under -std=c11 glibc's signal() has System V semantics, the handler is
// reset after one delivery, so a second SIGTERM killed the run before its checkpoint was written.
// SA_RESTART as signal() has in C++ (BSD semantics): a read or write the signal interrupts (a pipe,
// a socket of the launcher or NCCL) resumes instead of failing with EINTR
static inline void train_loop_catch_signal_(int sig) {
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = train_loop_on_signal;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(sig, &sa, NULL);
}

static inline double train_loop_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return 1e3 * (double)ts.tv_sec + 1e-6 * (double)ts.tv_nsec;
}

// rank 0's value, on every rank (the others add 0: exact in double for any int)
static inline int train_loop_agree_(TrainBackend* be, int value) {
    double v = be->rank == 0 ? (double)value : 0.0;
    be->sum_ranks(be->ctx, &v, 1);
    return (int)v;
}

// how many ranks report a failure (failed != 0): the same count on every rank, so that all stop
// together when one rank alone could not write (an exit there would leave the others waiting in
// their next collective)
static inline int train_loop_any_(TrainBackend* be, int failed) {
    double v = failed != 0 ? 1.0 : 0.0;
    be->sum_ranks(be->ctx, &v, 1);
    return (int)v;
}

// Whether the log failed (rank 0's logger), the same on every rank, for step 3 of the loop. One
// process: the logger's flag now (agreeing costs nothing there). Several: the flag the last train
// step summed with its loss (carried), so a failure after that reduction is acted on one step
// later and needs no collective of its own; a step that ends the run anyway (the last, or after a
// stop request) has no later reduction, so it agrees on the flag directly (once per run).
static inline int train_loop_log_failed_(TrainBackend* be, const Logger* logger, int carried, int ending) {
    if (be->num_processes == 1 || ending) return train_loop_agree_(be, logger->failed);
    return carried;
}

// Mean loss over the first val_batches batches of each rank's slice (all when < 0), averaged
// over the ranks, which all run the same number of batches; the same tokens every time, so
// curves of different runs compare. Every rank calls it.
static inline float train_loop_evaluate_(const TrainLoop* tl) {
    TrainBackend* be = tl->be;
    DataLoader* loader = tl->val_loader;
    dataloader_reset(loader);
    int64_t n = dataloader_num_batches(loader);
    if (tl->val_batches >= 0 && tl->val_batches < n) n = tl->val_batches;
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) {
        dataloader_next_batch(loader);
        sum += be->forward_loss(be->ctx, loader->inputs, loader->targets, (int)loader->B, (int)loader->T);
    }
    double mean = n > 0 ? sum / (double)n : NAN;
    be->sum_ranks(be->ctx, &mean, 1);
    return (float)(mean / be->num_processes);
}

// Multiple-choice accuracy over the whole eval file (llmc/mc_eval.h), every rank calls it: a
// batch holds B/4 examples of 4 rows each; rank r scores its examples (i % P == r). Every rank runs
// as many batches as rank 0 (the largest share), so the collectives match: the slots a rank has no
// example for, and the B % 4 spare rows, hold copies of a valid example and are not scored.
// *correct and *count are summed over the ranks (exact in double). Deterministic: the same batches
// and the same order of every sum each time.
static inline void train_loop_mc_eval(TrainBackend* be, const MCEval* ev, int B, long long* correct, long long* count) {
    const int T = ev->T, K = MC_EVAL_NUM_COMPLETIONS, per_batch = B / K, P = be->num_processes;
    const int mine = mc_eval_rank_count(ev, be->rank, P);
    const int batches = (mc_eval_rank_count(ev, 0, P) + per_batch - 1) / per_batch;
    // the padding example: this rank's last one, or the file's last when it has none (E < P)
    const int pad = mine > 0 ? mc_eval_rank_example(be->rank, P, mine - 1) : ev->num_examples - 1;
    const size_t BT = (size_t)B * T, rowK = (size_t)K * T;
    int* inputs = (int*)malloc_check(BT * sizeof(int));
    int* targets = (int*)malloc_check(BT * sizeof(int));
    unsigned char* mask = (unsigned char*)malloc_check(BT);
    float* losses = (float*)malloc_check(BT * sizeof(float));
    int* labels = (int*)malloc_check((size_t)per_batch * sizeof(int));
    double sums[2] = {0.0, 0.0};  // correct, scored
    for (int b = 0; b < batches; b++) {
        for (int s = 0; s < per_batch; s++) {
            int j = b * per_batch + s;
            int i = j < mine ? mc_eval_rank_example(be->rank, P, j) : pad;
            labels[s] = mc_eval_pack(inputs + s * rowK, targets + s * rowK, mask + s * rowK, ev, i);
        }
        for (size_t r = (size_t)per_batch * K; r < (size_t)B; r++) {  // spare rows: the rows 4 above
            memcpy(inputs + r * T, inputs + (r - K) * T, (size_t)T * sizeof(int));
            memcpy(targets + r * T, targets + (r - K) * T, (size_t)T * sizeof(int));
        }
        be->forward_losses(be->ctx, losses, inputs, targets, B, T);
        for (int s = 0; s < per_batch && b * per_batch + s < mine; s++) {
            sums[0] += mc_eval_correct(losses + s * rowK, mask + s * rowK, T, labels[s]);
            sums[1] += 1.0;
        }
    }
    be->sum_ranks(be->ctx, sums, 2);
    *correct = (long long)sums[0];
    *count = (long long)sums[1];
    free(inputs);
    free(targets);
    free(mask);
    free(losses);
    free(labels);
}

// ----------------------------------------------------------------------------
// the output directory (rank 0)

// how many names of ckpt_* files dir holds, and whether it holds model.bin
static inline int train_loop_count_outputs_(const char* dir, int* has_model) {
    *has_model = 0;
    DIR* d = opendir(dir);
    if (d == NULL) return 0;
    int count = 0;
    struct dirent* e;
    while ((e = readdir(d)) != NULL) {
        if (strncmp(e->d_name, "ckpt_", 5) == 0) count++;
        if (strcmp(e->d_name, "model.bin") == 0) *has_model = 1;
    }
    closedir(d);
    return count;
}

static inline int train_loop_nonempty_file_(const char* path) {
    struct stat st;
    return path[0] != '\0' && stat(path, &st) == 0 && S_ISREG(st.st_mode) && st.st_size > 0;
}

// --overwrite 1: removes another run's checkpoints (complete, unfinished, diverged) and model.bin
static inline int train_loop_remove_outputs_(const char* dir) {
    DIR* d = opendir(dir);
    if (d == NULL) return 0;
    int removed = 0;
    struct dirent* e;
    while ((e = readdir(d)) != NULL) {
        if (strncmp(e->d_name, "ckpt_", 5) != 0 && strcmp(e->d_name, "model.bin") != 0) continue;
        char path[CHECKPOINT_PATH_MAX + 256];
        snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
        if (unlink(path) != 0) {
            fprintf(stderr, "Error: --overwrite 1: cannot remove %s: %s\n", path, strerror(errno));
            closedir(d);
            return -1;
        }
        removed++;
    }
    closedir(d);
    return removed;
}

// The start of a run (rank 0): returns 0 and sets *found_step (-1 = fresh run) or prints why
// the run cannot start and returns 1.
static inline int train_loop_check_output_(const TrainConfig* cfg, const char* log_path, char* resume_path,
                                           int* found_step) {
    *found_step = -1;
    const char* dir = cfg->output_dir;
    int has_model = 0;
    int ckpts = dir[0] ? train_loop_count_outputs_(dir, &has_model) : 0;
    if (cfg->resume) {
        if (cfg->overwrite) {
            fprintf(stderr, "Error: flags -y 1 and --overwrite 1 contradict: resume the run in %s or replace it\n", dir);
            return 1;
        }
        *found_step = checkpoint_find_latest(dir, resume_path);
        if (*found_step >= 0) return 0;
        if (ckpts == 0) {
            struct stat st;
            fprintf(stderr, "Error: -y 1: no checkpoint in %s to resume from%s (drop -y 1 to start a new run)\n", dir,
                    stat(dir, &st) != 0 ? ": the directory does not exist" : "");
        } else {
            fprintf(stderr, "Error: -y 1: none of the %d checkpoint file(s) in %s is usable (unfinished, corrupt or "
                    "diverged: the warnings above name the corrupt ones; <name>.diverged files hold weights that diverged "
                    "and are never resumed); nothing was changed\n", ckpts, dir);
        }
        return 1;
    }
    int has_log = train_loop_nonempty_file_(log_path);
    if (ckpts == 0 && !has_model && !has_log) return 0;
    if (!cfg->overwrite) {
        fprintf(stderr, "Error: another run's files are in the way of this new run: ");
        if (ckpts > 0) fprintf(stderr, "%d checkpoint file(s) in %s; ", ckpts, dir);
        if (has_model) fprintf(stderr, "%s/model.bin; ", dir);
        if (has_log) fprintf(stderr, "the log %s; ", log_path);
        fprintf(stderr, "resume that run with -y 1, choose another -o / --log-file, or replace them with "
                "--overwrite 1\n");
        return 1;
    }
    int removed = dir[0] ? train_loop_remove_outputs_(dir) : 0;
    if (removed < 0) return 1;
    printf("--overwrite 1: removed %d checkpoint/model file(s) of another run in %s%s\n", removed, dir,
           has_log ? "; the log is rewritten" : "");
    return 0;
}

// -y 1 (rank 0): the checkpoint found must hold this model and this run's data, order and seed;
// returns 1 after the message when not. Checked before any rank loads it, so that every rank
// stops together (an exit on rank 0 alone would leave the others waiting inside NCCL).
static inline int train_loop_check_resume_(const char* resume_path, const ModelConfig* model_config,
                                           const RunIdentity* run) {
    ModelConfig file_config;
    CheckpointInfo info;
    checkpoint_read_info(resume_path, &file_config, &info);  // a verified file (checkpoint_find_latest)
    return checkpoint_model_differs(resume_path, &file_config, model_config) ||
           checkpoint_run_differs(resume_path, &info, run);
}

// ----------------------------------------------------------------------------
// the loop

typedef struct {
    int step;       // of the newest checkpoint this run holds (-1 = none)
    int written;    // 1 when this run wrote it (0: the one it resumed from)
    char path[CHECKPOINT_PATH_MAX];
} TrainLoopCkpt;

// the message after a non-finite value from the weights after `step` updates (rank 0): a
// checkpoint of those weights is not good; one this run wrote is moved aside
static inline void train_loop_report_divergence_(const TrainLoopCkpt* last, const TrainLoopCkpt* good, int step) {
    fflush(stdout);
    if (last->step == step) {
        char aside[CHECKPOINT_PATH_MAX + 16];
        snprintf(aside, sizeof(aside), "%s.diverged", last->path);
        if (last->written && rename(last->path, aside) == 0) {
            fprintf(stderr, "       %s holds these weights: renamed to %s (-y 1 will not resume from it)\n",
                    last->path, aside);
        } else {
            fprintf(stderr, "       %s holds these weights: do not resume from it\n", last->path);
        }
        last = good;
    }
    if (last->step >= 0) {
        fprintf(stderr, "       the last good checkpoint is %s (step %d): resume from it with a lower -l\n", last->path,
                last->step);
    } else {
        fprintf(stderr, "       no checkpoint of earlier weights exists: start again with a lower -l\n");
    }
}

static inline void train_loop_note_checkpoint_(TrainLoopCkpt* last, TrainLoopCkpt* good, int step, const char* path,
                                               int written) {
    *good = *last;
    last->step = step;
    last->written = written;
    snprintf(last->path, sizeof(last->path), "%s", path);
}

// the loop; mc_eval: the opened --mc-eval file, or NULL
static inline int train_loop_run_(const TrainLoop* tl, const MCEval* mc_eval) {
    const TrainConfig cfg_local = *tl->cfg;  // a local copy: the compiler then knows its path sizes
    const TrainConfig* cfg = &cfg_local;
    TrainBackend* be = tl->be;
    void* ctx = be->ctx;
    const int master = be->rank == 0;
    const int have_dir = cfg->output_dir[0] != '\0';
    char log_path[TRAIN_PATH_MAX + 32];
    train_config_log_path(cfg, log_path, sizeof(log_path));
    char model_path[TRAIN_PATH_MAX + 32];
    snprintf(model_path, sizeof(model_path), "%.*s/model.bin", TRAIN_PATH_MAX - 1, cfg->output_dir);

    // what identifies this run in its checkpoints (llmc/run_identity.h)
    RunIdentity run = train_config_run_identity(cfg, tl->train_loader->fingerprint, tl->train_loader->total_tokens,
                                                tl->train_loader->num_shards);
    if (be->model_config == NULL || be->model_config->ffn_kind != FFN_MOE) {  // moe settings: moe models only
        run.moe_aux = run.moe_zc_weight = run.moe_bias_rate = 0.0f;
    }
    // where the run starts: the output directory decides (rank 0), every rank follows
    char resume_path[CHECKPOINT_PATH_MAX] = "";
    int found_step = -1, refused = 0;
    if (master) {
        refused = train_loop_check_output_(cfg, log_path, resume_path, &found_step);
        if (!refused && found_step >= 0) refused = train_loop_check_resume_(resume_path, be->model_config, &run);
    }
    if (train_loop_agree_(be, refused)) return EXIT_FAILURE;
    found_step = train_loop_agree_(be, found_step);
    int step = 0, adam_t = 0;
    long long tokens_seen = 0;
    Rng sample_rng;
    rng_init(&sample_rng, cfg->seed ^ 0x53414D504C45ull);  // its own stream ("SAMPLE")
    TrainLoopCkpt last_ckpt, good_ckpt;
    last_ckpt.step = good_ckpt.step = -1;
    last_ckpt.written = good_ckpt.written = 0;
    last_ckpt.path[0] = good_ckpt.path[0] = '\0';
    if (found_step < 0) {
        be->init_weights(ctx);
    } else {
        CheckpointInfo info;
        DataLoaderState loader_state;
        int load_failed = be->load_checkpoint(ctx, resume_path, &info, &loader_state, &sample_rng.state);
        if (train_loop_any_(be, load_failed)) return EXIT_FAILURE;  // the rank that failed said why
        // notes of the settings that changed (the data, order and seed were checked above)
        if (master) checkpoint_compare_run(resume_path, &info, &run);
        dataloader_set_state(tl->train_loader, &loader_state);
        step = info.step;
        adam_t = info.adam_t;
        tokens_seen = info.tokens_seen;
        train_loop_note_checkpoint_(&last_ckpt, &good_ckpt, step, resume_path, 0);
        if (master) printf("resumed from %s at step %d\n", resume_path, step);
        if (step > cfg->num_steps) {
            if (master) {
                fprintf(stderr, "Error: the checkpoint %s is at step %d, past the %d steps asked for (-x %d): raise -x "
                        "to continue training; nothing was written\n", resume_path, step, cfg->num_steps,
                        cfg->num_steps);
            }
            return EXIT_FAILURE;
        }
        if (step == cfg->num_steps) {
            if (master) printf("the run is already complete: the checkpoint is at step %d = -x; nothing to do\n", step);
            return 0;
        }
    }
    const int start_step = step, resumed = found_step >= 0;
    // the directory and the log (rank 0), agreed: rank 0 alone must not stop
    int setup_failed = have_dir && master && checkpoint_try_make_dir(cfg->output_dir) != 0;
    Logger logger;
    if (!setup_failed) setup_failed = logger_init(&logger, log_path, be->rank, resumed ? start_step : -1) != 0;
    if (train_loop_agree_(be, setup_failed)) return EXIT_FAILURE;
    train_loop_catch_signal_(SIGINT);
    train_loop_catch_signal_(SIGTERM);
    train_loop_catch_signal_(SIGUSR1);

    const long long tokens_per_step = train_config_total_batch_tokens(cfg);
    const int mc_every = train_config_mc_interval(cfg);
    int L = be->num_omni_layers;
    float* usage = (float*)calloc_check(L > 0 ? L : 1, sizeof(float));
    float* kl = (float*)calloc_check(L > 0 ? L : 1, sizeof(float));
    float* kind_shares = be->expert_kind_shares != NULL ? (float*)calloc_check(4 * (L > 0 ? L : 1), sizeof(float)) : NULL;
    float val_loss = NAN;
    int stop = 0, log_failed = 0, log_failed_carried = 0, rc = 0, timed_steps = 0;
    double total_ms = 0.0;
    for (;; step++) {
        int last = step == cfg->num_steps;
        // 1. evaluate
        if (tl->have_val && (last || (cfg->val_every > 0 && step % cfg->val_every == 0))) {
            val_loss = train_loop_evaluate_(tl);
            if (!isfinite(val_loss)) {  // the same on every rank
                if (master) {
                    fprintf(stderr, "Error: the validation loss is %f at step %d: the weights after %d updates give a "
                            "non-finite loss on the validation data; stopping before this step's log line, checkpoint "
                            "or model is written\n", val_loss, step, step);
                    train_loop_report_divergence_(&last_ckpt, &good_ckpt, step);
                }
                rc = EXIT_FAILURE;
                break;
            }
            logger_log_eval(&logger, step, tokens_seen, val_loss);
        }
        if (mc_eval != NULL && (last || (mc_every > 0 && step % mc_every == 0))) {
            long long correct = 0, count = 0;
            train_loop_mc_eval(be, mc_eval, cfg->B, &correct, &count);
            logger_log_mc_eval(&logger, step, tokens_seen, correct, count);
        }
        // 2. sample
        if ((master || be->sample_all_ranks) && cfg->sample_every > 0 && !(resumed && step == start_step) &&
            (last || (step > 0 && step % cfg->sample_every == 0))) {
            if (master) {
                sample_and_print_with(be->sample_logits, ctx, be->vocab_size, be->sample_T, tl->tokenizer,
                                      &sample_rng, NULL);
            } else {  // in step with rank 0's forwards; the RNG that checkpoints keep is rank 0's
                Rng copy = sample_rng;
                sample_quietly_with(be->sample_logits, ctx, be->vocab_size, be->sample_T, &copy);
            }
        }
        log_failed = train_loop_log_failed_(be, &logger, log_failed_carried, last || stop);
        // 3. checkpoint
        if (have_dir && step > start_step &&
            (last || stop || log_failed || (cfg->checkpoint_every > 0 && step % cfg->checkpoint_every == 0))) {
            CheckpointInfo info;
            checkpoint_info_from_run(&info, &run, step, adam_t, tokens_seen);
            DataLoaderState loader_state = dataloader_get_state(tl->train_loader);
            char path[CHECKPOINT_PATH_MAX] = "";
            int failed = be->save_checkpoint(ctx, &info, &loader_state, &sample_rng.state, path);
            if (train_loop_any_(be, failed)) {  // the rank that failed said why; older checkpoints are intact
                rc = EXIT_FAILURE;
                break;
            }
            if (master) printf("wrote checkpoint %s\n", path);
            train_loop_note_checkpoint_(&last_ckpt, &good_ckpt, step, path, 1);
        }
        // 4. stop
        if (log_failed) {
            if (master) {
                fflush(stdout);
                fprintf(stderr, "Error: stopping at step %d: the log file \"%s\" cannot be written (see above)", step,
                        log_path);
                if (last_ckpt.step >= 0) fprintf(stderr, "; the run is saved in %s", last_ckpt.path);
                fprintf(stderr, "\n");
            }
            rc = EXIT_FAILURE;
            break;
        }
        if (last) break;
        if (stop) {
            if (master) printf("stopped by a signal at step %d\n", step);
            rc = 130;
            break;
        }
        // 5. train step
        double start = train_loop_now_ms();
        float lr = learning_rate_at(cfg, step);
        TrainStepResult res;
        be->train_step(ctx, step, lr, adam_t + 1, &train_loop_stop_requested, logger.failed, &res);
        // 6. checks: loss and norm are the same on every rank, so all stop together
        if (!isfinite(res.loss) || !isfinite(res.norm)) {
            if (master) {
                fflush(stdout);
                if (!isfinite(res.loss)) {
                    fprintf(stderr, "Error: the training loss is %f at step %d (gradient norm %f): the weights after %d "
                            "updates have diverged; stopping before this step's log line, checkpoint or model is "
                            "written\n", res.loss, step + 1,
                            res.norm, step);
                } else {
                    fprintf(stderr, "Error: the gradient norm is %f at step %d (the loss %f is finite): the update would "
                            "make the weights non-finite; stopping before this step's log line, checkpoint or model is "
                            "written\n", res.norm, step + 1,
                            res.loss);
                }
                train_loop_report_divergence_(&last_ckpt, &good_ckpt, step);
            }
            rc = EXIT_FAILURE;
            break;
        }
        adam_t++;
        tokens_seen += tokens_per_step;
        stop = res.stop;
        log_failed_carried = res.log_failed;
        // 7. log line
        if (master && L > 0) be->expert_stats(ctx, usage, kl);
        if (master && L > 0 && kind_shares != NULL) be->expert_kind_shares(ctx, kind_shares);
        double ms = train_loop_now_ms() - start;  // the expert statistics count too
        if (step > start_step) {  // the first step warms caches up
            total_ms += ms;
            timed_steps++;
        }
        double tok_s = 1e3 * (double)tokens_per_step / ms;
        logger_log_train(&logger, step + 1, cfg->num_steps, tokens_seen, res.loss, res.norm, lr, ms, tok_s,
                         logger_mfu(be->flops_per_token_fwd, tok_s, be->peak_flops), L, usage, kl, kind_shares);
    }
    // 8. the final weights, after a complete run only
    if (rc == 0 && have_dir) {  // every rank: a sharded backend gathers the weights first
        int failed = be->write_model(ctx, model_path);
        if (train_loop_any_(be, failed)) rc = EXIT_FAILURE;  // rank 0 said why; the checkpoints are intact
        else if (master) printf("wrote model %s\n", model_path);
    }
    if (master && rc == 0) {
        if (tl->have_val) printf("final val loss %.6f\n", val_loss);
        if (timed_steps > 0) {
            printf("total average step time: %.1f ms (%.0f tok/s) over %d steps\n", total_ms / timed_steps,
                   1e3 * (double)tokens_per_step * timed_steps / total_ms, timed_steps);
        }
    }
    if (logger_close(&logger) != 0 && rc == 0) rc = EXIT_FAILURE;
    free(usage);
    free(kl);
    free(kind_shares);
    return rc;
}

// Runs the whole training (see the top of the file). Returns the exit status: 0, 1 (an error,
// already reported) or 130 (stopped by a signal after a checkpoint). A malformed tokenizer file
// (tl->tokenizer_failed) stops every rank first. A --mc-eval file is opened
// and checked first, for the run's T and the model's vocabulary: a bad one ends the program with
// its message (llmc/mc_eval.h) on every rank (each reads it), before a checkpoint, log or output
// directory is looked at or written.
static inline int train_loop_run(const TrainLoop* tl) {
    const TrainConfig* cfg = tl->cfg;
    TrainBackend* be = tl->be;
    if (train_loop_any_(be, tl->tokenizer_failed)) return EXIT_FAILURE;  // rank 0 read it and said why
    if (cfg->mc_eval_path[0] == '\0') return train_loop_run_(tl, NULL);
    char path[TRAIN_PATH_MAX];  // a bounded copy: the compiler then knows it fits MCEval's path
    snprintf(path, sizeof(path), "%.*s", TRAIN_PATH_MAX - 1, cfg->mc_eval_path);
    MCEval mc_eval;
    mc_eval_open(&mc_eval, path, cfg->T, be->vocab_size);
    if (be->rank == 0) {
        int per_batch = cfg->B / MC_EVAL_NUM_COMPLETIONS, most = mc_eval_rank_count(&mc_eval, 0, be->num_processes);
        int every = train_config_mc_interval(cfg);
        printf("| mc eval: %s, %d examples, %d per batch, %d batches per rank; ", cfg->mc_eval_path,
               mc_eval_num_examples(&mc_eval), per_batch, (most + per_batch - 1) / per_batch);
        if (every > 0) printf("every %d steps and at the last\n", every);
        else printf("at the last step\n");
    }
    int rc = train_loop_run_(tl, &mc_eval);
    mc_eval_close(&mc_eval);
    return rc;
}

#endif // OMNIMOE_TRAIN_LOOP_H
