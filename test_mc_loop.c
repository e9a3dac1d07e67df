/*
 * test_mc_loop.c - CPU tests of the multiple-choice eval in the training loop (--mc-eval,
 * llmc/train_loop.h: train_loop_mc_eval with the CPU model's gpt_forward_losses), against an
 * independent computation: every completion run alone through gpt_forward (one row of exactly
 * context + completion - 1 positions, no padding, no packing), its mean loss over the completion
 * tokens summed here, the smallest mean taken as the prediction.
 *   rows      the packed (4, T) rows of every example of data/mc_examples_val.bin give the same
 *             per-token losses, bit for bit, as the rows run alone
 *   loop      train_loop_mc_eval's count of correct examples equals the independent count, for
 *             B = 4, 6 (2 spare rows) and for 3 and 6 ranks at B = 8 run one after the other (every
 *             rank rank 0's number of batches, the shares summing to the file, and each rank returning
 *             the sums once sum_ranks adds the other ranks' shares)
 *   trainer   ./train_omnimoe_cpu -e tiny -x 2 --mc-every 2 --mc-eval ... prints "mc acc" and logs
 *             mc_eval records at steps 0 and 2 (not 1) whose counts equal the independent
 *             computation on the model from the seed (step 0) and on the model.bin it wrote (step
 *             2: -l 0.02 makes it score differently from the initial model); the training losses
 *             equal those of the same run without --mc-eval
 *   resume    a run resumed (-y 1) from its step-2 checkpoint logs the same mc_eval records, once
 *             each, and the same training losses as the straight run
 *
 *   make test_mc_loop && ./test_mc_loop      (from the repo root: it reads data/ and runs
 *                                             ./train_omnimoe_cpu)
 */
#define TESTING
#include "train_omnimoe.c"
#include "llmc/train_loop.h"
#include "llmc/test_harness.h"

#define EVAL_FILE "data/mc_examples_val.bin"
#define K MC_EVAL_NUM_COMPLETIONS
#define SEED 42  // the trainer's default --seed

// ----------------------------------------------------------------------------
// the independent computation

// completion c of example i alone: losses (n_ctx + n - 1 positions) into out; returns the count
static int row_alone(GPT* model, const MCEval* ev, int i, int c, float* out) {
    MCExample ex = mc_eval_example(ev, i);
    int len = ex.context_len + ex.completion_len[c];
    int* tokens = (int*)malloc_check((size_t)len * sizeof(int));
    for (int t = 0; t < ex.context_len; t++) tokens[t] = ex.context[t];
    for (int t = 0; t < ex.completion_len[c]; t++) tokens[ex.context_len + t] = ex.completion[c][t];
    gpt_forward(model, tokens, tokens + 1, 1, len - 1, 0);
    memcpy(out, model->acts.losses, (size_t)(len - 1) * sizeof(float));
    free(tokens);
    return len - 1;
}

// 1 when the completion of smallest mean loss (over its own tokens, the first on ties) is the label
static int example_correct(GPT* model, const MCEval* ev, int i) {
    MCExample ex = mc_eval_example(ev, i);
    float* losses = (float*)malloc_check((size_t)ev->T * sizeof(float));
    int best = -1;
    double best_mean = 0.0;
    for (int c = 0; c < K; c++) {
        row_alone(model, ev, i, c, losses);
        double sum = 0.0;
        for (int t = 0; t < ex.completion_len[c]; t++) sum += losses[ex.context_len - 1 + t];
        double mean = sum / ex.completion_len[c];
        if (best < 0 || mean < best_mean) {
            best = c;
            best_mean = mean;
        }
    }
    free(losses);
    return best == ex.label;
}

static int count_correct(GPT* model, const MCEval* ev) {
    int correct = 0;
    for (int i = 0; i < mc_eval_num_examples(ev); i++) correct += example_correct(model, ev, i);
    return correct;
}

// ----------------------------------------------------------------------------
// the loop's function with the CPU model as the backend (one rank at a time)

// The ranks run one after the other, so sum_ranks cannot wait for the others: a first pass records
// each rank's (correct, scored) as handed to sum_ranks (local[rank]) and leaves them; a second pass
// adds the recorded values of the other ranks, as the all-reduce would (exact: integer counts).
#define MAX_RANKS 8
typedef struct {
    GPT* model;
    int calls;
    int rank, num_processes;
    double (*local)[2];  // NULL: sum_ranks leaves the values (one rank)
    int reduce;          // 0: record into local[rank]; 1: add the other ranks' recorded values
} Backend;

static void be_forward_losses(void* ctx, float* losses, const int* inputs, const int* targets, int B, int T) {
    Backend* b = (Backend*)ctx;
    b->calls++;
    gpt_forward_losses(b->model, losses, inputs, targets, B, T);
}
static void be_sum_ranks(void* ctx, double* values, int n) {
    Backend* b = (Backend*)ctx;
    if (b->local == NULL || n != 2) return;
    if (!b->reduce) {
        b->local[b->rank][0] = values[0];
        b->local[b->rank][1] = values[1];
        return;
    }
    for (int i = 0; i < 2; i++) {
        double sum = 0.0;
        for (int r = 0; r < b->num_processes; r++) sum += r == b->rank ? values[i] : b->local[r][i];
        values[i] = sum;
    }
}

static void loop_eval(GPT* model, const MCEval* ev, int B, int rank, int P, double (*local)[2], int reduce,
                      long long* correct, long long* count, int* calls) {
    Backend b = {model, 0, rank, P, local, reduce};
    TrainBackend be;
    memset(&be, 0, sizeof(be));
    be.ctx = &b;
    be.rank = rank;
    be.num_processes = P;
    be.forward_losses = be_forward_losses;
    be.sum_ranks = be_sum_ranks;
    train_loop_mc_eval(&be, ev, B, correct, count);
    *calls = b.calls;
}

// P ranks, each run alone: the sums of their own counts, whether they all ran rank 0's batches,
// and (second pass, sum_ranks reducing) whether every rank returned those sums
static void ranks_eval(GPT* model, const MCEval* ev, int B, int P, long long* sum_correct, long long* sum_count,
                       int* calls_same, int* calls0, int* reduced_ok) {
    double local[MAX_RANKS][2] = {{0.0}};
    *sum_correct = 0;
    *sum_count = 0;
    *calls_same = 1;
    for (int r = 0; r < P; r++) {
        long long correct = 0, count = 0;
        int calls = 0;
        loop_eval(model, ev, B, r, P, local, 0, &correct, &count, &calls);
        *sum_correct += correct;
        *sum_count += count;
        if (r == 0) *calls0 = calls;
        *calls_same &= calls == *calls0;
    }
    *reduced_ok = 1;
    for (int r = 0; r < P; r++) {
        long long correct = -1, count = -1;
        int calls = 0;
        loop_eval(model, ev, B, r, P, local, 1, &correct, &count, &calls);
        *reduced_ok &= correct == *sum_correct && count == *sum_count;
    }
}

// a tiny omni model (router BN) from the seed, its BN running statistics moved away from their
// initial values by training-mode forwards on random tokens
static void build_model(GPT* model, int T) {
    ModelConfig c;
    model_config_preset(&c, "tiny", FFN_OMNI);
    gpt_build(model, &c);
    gpt_init_random(model, 7);
    Rng rng = rng_seeded(11);
    int* tokens = (int*)malloc_check((size_t)4 * (T + 1) * sizeof(int));
    for (int pass = 0; pass < 3; pass++) {
        fill_tokens(tokens, (size_t)4 * (T + 1), c.vocab_size, &rng);
        gpt_forward(model, tokens, tokens + 1, 4, T, 1);  // targets: the inputs shifted by one
    }
    free(tokens);
}

static void test_rows_and_loop(void) {
    const int T = 32;  // the longest row of the file is 26 tokens (mc_eval_open checks T)
    GPT model;
    build_model(&model, T);
    MCEval ev;
    mc_eval_open(&ev, EVAL_FILE, T, model.config.vocab_size);
    const int E = mc_eval_num_examples(&ev);

    // rows: the packed rows against each row alone, bit for bit at every scored position
    int* inputs = (int*)malloc_check((size_t)K * T * sizeof(int));
    int* targets = (int*)malloc_check((size_t)K * T * sizeof(int));
    unsigned char* mask = (unsigned char*)malloc_check((size_t)K * T);
    float* packed = (float*)malloc_check((size_t)K * T * sizeof(float));
    float* alone = (float*)malloc_check((size_t)T * sizeof(float));
    int same = 1, scored = 0;
    for (int i = 0; i < E; i++) {
        mc_eval_pack(inputs, targets, mask, &ev, i);
        gpt_forward_losses(&model, packed, inputs, targets, K, T);
        for (int c = 0; c < K; c++) {
            int n = row_alone(&model, &ev, i, c, alone);
            for (int t = 0; t < n; t++) {
                if (!mask[(size_t)c * T + t]) continue;
                scored++;
                same &= memcmp(&packed[(size_t)c * T + t], &alone[t], sizeof(float)) == 0;
            }
        }
    }
    test_checkf(same && scored > 0, "rows: packed rows = each row alone, bitwise", "%d scored positions", scored);

    // loop: the count of train_loop_mc_eval against the independent one
    int want = count_correct(&model, &ev);
    const int Bs[] = {4, 6};
    for (int b = 0; b < 2; b++) {
        long long correct = -1, count = -1;
        int calls = 0;
        loop_eval(&model, &ev, Bs[b], 0, 1, NULL, 0, &correct, &count, &calls);
        char name[64];
        snprintf(name, sizeof(name), "loop: B=%d, one rank", Bs[b]);
        int batches = (E + Bs[b] / K - 1) / (Bs[b] / K);
        test_checkf(correct == want && count == E && calls == batches, name,
                    "%lld of %lld correct (independent: %d of %d), %d batches", correct, count, want, E, calls);
    }
    // three ranks (16 examples: 6, 5, 5), each run alone; their sums make the file
    long long sum_correct = 0, sum_count = 0;
    int calls_same = 1, calls0 = -1, reduced_ok = 0;
    ranks_eval(&model, &ev, 8, 3, &sum_correct, &sum_count, &calls_same, &calls0, &reduced_ok);
    test_checkf(sum_correct == want && sum_count == E && calls_same && calls0 == 3, "loop: 3 ranks sum to the file",
                "%lld of %lld correct, %d batches per rank", sum_correct, sum_count, calls0);
    test_check(reduced_ok, "loop: 3 ranks each return the counts summed over the ranks");
    // six ranks (3, 3, 3, 3, 2, 2 examples, 2 per batch): ranks 4 and 5 need one batch for their own
    // examples but must run rank 0's two, the second all padding
    ranks_eval(&model, &ev, 8, 6, &sum_correct, &sum_count, &calls_same, &calls0, &reduced_ok);
    test_checkf(sum_correct == want && sum_count == E && calls_same && calls0 == 2, "loop: 6 ranks run the same batches",
                "%lld of %lld correct, %d batches on rank 0, same on all: %d", sum_correct, sum_count, calls0, calls_same);
    printf("  (independent: %d of %d correct)\n", want, E);

    free(inputs);
    free(targets);
    free(mask);
    free(packed);
    free(alone);
    mc_eval_close(&ev);
    gpt_free(&model);
}

// ----------------------------------------------------------------------------
// the trainer, end to end

// the value of "key":<number> in the log line of type `type` at `step`; -1 when absent
static double log_value(const char* log, const char* type, int step, const char* key) {
    char head[96];
    snprintf(head, sizeof(head), "{\"type\":\"%s\",\"step\":%d,", type, step);
    const char* line = strstr(log, head);
    if (line == NULL) return -1.0;
    const char* end = strchr(line, '\n');
    const char* p = strstr(line, key);
    if (p == NULL || (end != NULL && p > end)) return -1.0;
    return strtod(p + strlen(key), NULL);
}

// the "loss" fields of the train records, in order, as text (the bits, not a parse)
static void train_losses(const char* log, char* out, size_t size) {
    size_t len = 0;
    out[0] = '\0';
    for (const char* p = strstr(log, "{\"type\":\"train\""); p != NULL; p = strstr(p + 1, "{\"type\":\"train\"")) {
        const char* l = strstr(p, "\"loss\":");
        const char* e = l ? strchr(l, ',') : NULL;
        if (e == NULL || len + (size_t)(e - l) + 2 > size) break;
        len += (size_t)snprintf(out + len, size - len, "%.*s;", (int)(e - l), l);
    }
}

static void test_trainer(void) {
    char dir_mc[512], dir_plain[512], cmd[2048];
    test_tmp_subdir(dir_mc, sizeof(dir_mc), "mc");
    test_tmp_subdir(dir_plain, sizeof(dir_plain), "plain");
    const char* run = "./train_omnimoe_cpu -e tiny -b 6 -t 32 -x 2 -v 1 -m 1 -s 0 -u 0 -l 0.02 --seed 42 --overwrite 1";
    snprintf(cmd, sizeof(cmd), "%s --mc-every 2 --mc-eval " EVAL_FILE " -o %s > %s/out.txt 2>&1", run, dir_mc, dir_mc);
    int rc_mc = system(cmd);
    snprintf(cmd, sizeof(cmd), "%s -o %s > %s/out.txt 2>&1", run, dir_plain, dir_plain);
    int rc_plain = system(cmd);
    test_checkf(rc_mc == 0 && rc_plain == 0, "trainer: runs with and without --mc-eval", "exit %d, %d", rc_mc,
                rc_plain);
    char path[600];
    size_t size;
    snprintf(path, sizeof(path), "%s/log.jsonl", dir_mc);
    char* log = (char*)test_read_file(path, &size);
    snprintf(path, sizeof(path), "%s/out.txt", dir_mc);
    char* out = (char*)test_read_file(path, &size);
    snprintf(path, sizeof(path), "%s/log.jsonl", dir_plain);
    char* log_plain = (char*)test_read_file(path, &size);
    if (log == NULL || out == NULL || log_plain == NULL) {
        test_check(0, "trainer: log and output readable");
        free(log); free(out); free(log_plain);
        return;
    }
    MCEval ev;
    mc_eval_open(&ev, EVAL_FILE, 32, 50257);
    const int E = mc_eval_num_examples(&ev);
    int records = log_value(log, "mc_eval", 0, "\"examples\":") == E && log_value(log, "mc_eval", 2, "\"examples\":") == E &&
                  log_value(log, "mc_eval", 1, "\"examples\":") == -1.0;
    test_check(records, "trainer: mc_eval records of 16 examples at steps 0 and 2 (--mc-every 2), none at 1");

    // step 0: the model from the seed; step 2: the model file the run wrote
    GPT model;
    ModelConfig c;
    model_config_preset(&c, "tiny", FFN_OMNI);
    gpt_build(&model, &c);
    gpt_init_random(&model, SEED);
    int want0 = count_correct(&model, &ev);
    snprintf(path, sizeof(path), "%s/model.bin", dir_mc);
    ModelConfig file_config;
    float *params = NULL, *bn = NULL;
    model_file_read(path, &file_config, &params, &bn);
    memcpy(model.params, params, model.num_params * sizeof(float));
    memcpy(model.bn_stats, bn, model.num_bn_stats * sizeof(float));
    int want2 = count_correct(&model, &ev);
    double got0 = log_value(log, "mc_eval", 0, "\"correct\":"), got2 = log_value(log, "mc_eval", 2, "\"correct\":");
    double acc2 = log_value(log, "mc_eval", 2, "\"accuracy\":");
    test_checkf(got0 == want0, "trainer: step 0 count = independent (model from the seed)", "%g vs %d", got0, want0);
    test_checkf(got2 == want2 && acc2 == (double)want2 / E, "trainer: step 2 count and accuracy = independent "
                "(its model.bin)", "%g (%g) vs %d", got2, acc2, want2);
    // -l 0.02 moves the weights enough in 2 steps that the two counts differ: step 2's record is
    // not the initial model's
    test_checkf(want0 != want2, "trainer: the trained model scores differently from the initial one", "%d vs %d",
                want0, want2);
    char line[128];
    snprintf(line, sizeof(line), "mc acc %.4f (%d) (step 2)", (double)want2 / E, E);
    test_checkf(strstr(out, line) != NULL, "trainer: the step line", "\"%s\"", line);
    char a[4096], b[4096];
    train_losses(log, a, sizeof(a));
    train_losses(log_plain, b, sizeof(b));
    test_checkf(a[0] != '\0' && strcmp(a, b) == 0, "trainer: training losses unchanged by --mc-eval", "%s", a);
    printf("  (independent: step 0 %d of %d, step 2 %d of %d)\n", want0, E, want2, E);
    free(params);
    free(bn);
    gpt_free(&model);
    mc_eval_close(&ev);
    free(log);
    free(out);
    free(log_plain);
}

// the mc_eval lines of a log, in order
static void mc_lines(const char* log, char* out, size_t size) {
    size_t len = 0;
    out[0] = '\0';
    for (const char* p = strstr(log, "{\"type\":\"mc_eval\""); p != NULL; p = strstr(p + 1, "{\"type\":\"mc_eval\"")) {
        const char* e = strchr(p, '\n');
        if (e == NULL || len + (size_t)(e - p) + 2 > size) break;
        len += (size_t)snprintf(out + len, size - len, "%.*s\n", (int)(e - p), p);
    }
}

static void test_resume(void) {
    char dir[512], cmd[2048], path[600];
    test_tmp_subdir(dir, sizeof(dir), "resume");
    const char* run = "./train_omnimoe_cpu -e tiny -b 4 -t 32 -x 3 -v 1 -m 1 -s 0 -u 0 -l 0.02 -n 1 --mc-every 1 "
                      "--mc-eval " EVAL_FILE;
    snprintf(cmd, sizeof(cmd), "%s -o %s > %s/out1.txt 2>&1", run, dir, dir);
    int rc1 = system(cmd);
    size_t size;
    snprintf(path, sizeof(path), "%s/log.jsonl", dir);
    char* straight = (char*)test_read_file(path, &size);
    // back to the state after step 2: the later checkpoint and the model go, the log stays
    snprintf(path, sizeof(path), "%s/ckpt_00000003.bin", dir);
    int removed = unlink(path) == 0;
    snprintf(path, sizeof(path), "%s/model.bin", dir);
    removed &= unlink(path) == 0;
    snprintf(cmd, sizeof(cmd), "%s -o %s -y 1 > %s/out2.txt 2>&1", run, dir, dir);
    int rc2 = system(cmd);
    snprintf(path, sizeof(path), "%s/log.jsonl", dir);
    char* resumed = (char*)test_read_file(path, &size);
    char a[4096], b[4096], la[4096], lb[4096];
    int ok = rc1 == 0 && rc2 == 0 && removed && straight != NULL && resumed != NULL;
    if (ok) {
        mc_lines(straight, a, sizeof(a));
        mc_lines(resumed, b, sizeof(b));
        train_losses(straight, la, sizeof(la));
        train_losses(resumed, lb, sizeof(lb));
        ok = strcmp(a, b) == 0 && strcmp(la, lb) == 0 && strstr(a, "\"step\":3,") != NULL;
    }
    test_checkf(ok, "resume: mc_eval records (steps 0-3, once each) and losses as the straight run",
                "exit %d, %d", rc1, rc2);
    free(straight);
    free(resumed);
}

int main(void) {
    test_begin("test_mc_loop");
    test_tmp_begin("test_mc_loop");
    test_rows_and_loop();
    test_trainer();
    test_resume();
    test_tmp_end();
    return test_end();
}
