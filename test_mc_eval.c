/*
 * test_mc_eval.c - CPU tests of the multiple-choice eval (llmc/mc_eval.h): the committed eval file
 * data/mc_examples_val.bin (written by dev/data/hellaswag.py from dev/data/mc_examples.jsonl) read
 * back token for token, the packing into (4, T) rows, the scoring against a brute-force
 * computation on random losses, ties, the split over ranks, and malformed files each refused
 * with its message.
 *
 *   make test_mc_eval && ./test_mc_eval      (from the repo root: it reads data/)
 *
 * One PASS/FAIL line per check, then "test_mc_eval: N passed, N failed"; exits non-zero on a failure.
 */
#include "llmc/test_harness.h"
#include "llmc/mc_eval.h"

#define EVAL_FILE "data/mc_examples_val.bin"
#define GPT2_VOCAB 50257
#define K MC_EVAL_NUM_COMPLETIONS

// What dev/data/hellaswag.py printed for example 0 (tiktoken gpt2 of dev/data/mc_examples.jsonl's
// first line: "She filled the kettle ..." and " " + each ending); label 0.
static const int EX0_CONTEXT[] = {3347, 5901, 262, 40231, 351, 1660, 290, 1234, 340, 319, 262, 27635, 13, 317, 1178,
                                  2431, 1568, 11};
static const int EX0_COMP0[] = {262, 40231, 2067, 284, 16121, 13};
static const int EX0_COMP1[] = {262, 27635, 13112, 503, 286, 262, 4324, 13};
static const int EX0_COMP2[] = {262, 1660, 2900, 656, 6450, 13};
static const int EX0_COMP3[] = {673, 18969, 262, 40231, 287, 262, 11376, 13};
// the labels of the 16 lines of dev/data/mc_examples.jsonl
static const int LABELS[16] = {0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3};

static int same_tokens(const uint16_t* got, int n_got, const int* want, int n_want) {
    if (n_got != n_want) return 0;
    for (int i = 0; i < n_want; i++) if (got[i] != want[i]) return 0;
    return 1;
}

// ----------------------------------------------------------------------------
// the committed file

static void test_committed_file(void) {
    MCEval ev;
    mc_eval_open(&ev, EVAL_FILE, 64, GPT2_VOCAB);
    test_checkf(mc_eval_num_examples(&ev) == 16, "file_num_examples", "%d", mc_eval_num_examples(&ev));
    MCExample ex = mc_eval_example(&ev, 0);
    int n_ctx = (int)(sizeof(EX0_CONTEXT) / sizeof(int));
    int ok = ex.label == 0 && ex.num_completions == 4 && same_tokens(ex.context, ex.context_len, EX0_CONTEXT, n_ctx) &&
             same_tokens(ex.completion[0], ex.completion_len[0], EX0_COMP0, 6) &&
             same_tokens(ex.completion[1], ex.completion_len[1], EX0_COMP1, 8) &&
             same_tokens(ex.completion[2], ex.completion_len[2], EX0_COMP2, 6) &&
             same_tokens(ex.completion[3], ex.completion_len[3], EX0_COMP3, 8);
    test_check(ok, "file_example0_tokens");
    int labels_ok = 1;
    for (int i = 0; i < 16; i++) labels_ok &= mc_eval_example(&ev, i).label == LABELS[i];
    test_check(labels_ok, "file_labels");
    // the longest example in bytes, recomputed from the counts
    int longest = 0;
    for (int i = 0; i < 16; i++) {
        MCExample e = mc_eval_example(&ev, i);
        int n = 6 + e.context_len;
        for (int c = 0; c < K; c++) n += 1 + e.completion_len[c];
        if (2 * n > longest) longest = 2 * n;
    }
    test_checkf(longest == ev.longest_example_bytes, "file_longest_example", "%d bytes", longest);
    mc_eval_close(&ev);
}

// ----------------------------------------------------------------------------
// packing

static void test_packing(void) {
    int T = 40;
    MCEval ev;
    mc_eval_open(&ev, EVAL_FILE, T, GPT2_VOCAB);
    int* inputs = (int*)malloc_check(K * T * sizeof(int));
    int* targets = (int*)malloc_check(K * T * sizeof(int));
    unsigned char* mask = (unsigned char*)malloc_check(K * T);
    // example 0 against the tokens the script printed: row c = context + completion c
    for (int i = 0; i < K * T; i++) { inputs[i] = -7; targets[i] = -7; mask[i] = 0xAA; }  // all must be overwritten
    int label = mc_eval_pack(inputs, targets, mask, &ev, 0);
    const int* comps[K] = {EX0_COMP0, EX0_COMP1, EX0_COMP2, EX0_COMP3};
    const int comp_len[K] = {6, 8, 6, 8};
    int n_ctx = (int)(sizeof(EX0_CONTEXT) / sizeof(int));
    int ok = label == 0;
    for (int c = 0; c < K; c++) {
        int seq[64], len = 0;
        for (int t = 0; t < n_ctx; t++) seq[len++] = EX0_CONTEXT[t];
        for (int t = 0; t < comp_len[c]; t++) seq[len++] = comps[c][t];
        for (int t = 0; t < T; t++) {
            int want_in = t < len ? seq[t] : 0;
            int want_tg = t + 1 < len ? seq[t + 1] : 0;
            int want_mask = t >= n_ctx - 1 && t < len - 1;  // the targets that are completion tokens
            if (inputs[c * T + t] != want_in || targets[c * T + t] != want_tg || mask[c * T + t] != want_mask) ok = 0;
        }
    }
    test_check(ok, "pack_example0");
    // every example: the masked targets, in order, are exactly the completion's tokens, and the
    // first masked position is the last context token
    int all_ok = 1;
    for (int i = 0; i < mc_eval_num_examples(&ev); i++) {
        for (int j = 0; j < K * T; j++) { inputs[j] = -7; targets[j] = -7; mask[j] = 0xAA; }
        MCExample ex = mc_eval_example(&ev, i);
        if (mc_eval_pack(inputs, targets, mask, &ev, i) != ex.label) all_ok = 0;
        for (int c = 0; c < K; c++) {
            int n = 0, first = -1;
            for (int t = 0; t < T; t++) {
                if (mask[c * T + t] > 1 || inputs[c * T + t] < 0 || targets[c * T + t] < 0) all_ok = 0;
                if (!mask[c * T + t]) continue;
                if (first < 0) first = t;
                if (n >= ex.completion_len[c] || targets[c * T + t] != ex.completion[c][n]) all_ok = 0;
                n++;
            }
            if (n != ex.completion_len[c] || first != ex.context_len - 1) all_ok = 0;
        }
    }
    test_check(all_ok, "pack_all_examples");
    free(inputs);
    free(targets);
    free(mask);
    mc_eval_close(&ev);
}

// ----------------------------------------------------------------------------
// scoring

// the brute-force reference: gather each row's masked losses, average, take the first minimum
static int brute_predict(double* mean, const float* losses, const unsigned char* mask, int rows, int T) {
    int best = -1;
    for (int r = 0; r < rows; r++) {
        double vals[256];
        int n = 0;
        for (int t = 0; t < T; t++) if (mask[r * T + t]) vals[n++] = losses[r * T + t];
        double s = 0.0;
        for (int j = 0; j < n; j++) s += vals[j];
        mean[r] = n > 0 ? s / n : INFINITY;
        if (best < 0 || mean[r] < mean[best]) best = r;
    }
    return best;
}

static void test_scoring(void) {
    const int T = 48, trials = 2000;
    Rng rng = rng_seeded(1501);
    float losses[K * 48], means[K];
    unsigned char mask[K * 48];
    double ref[K];
    int pred_ok = 1, mean_ok = 1, counts[K] = {0, 0, 0, 0};
    for (int trial = 0; trial < trials; trial++) {
        fill_uniform(losses, K * T, 0.5f, 6.0f, &rng);
        // each row: a context of random length, then a completion of random length (>= 1)
        for (int r = 0; r < K; r++) {
            int ctx = 1 + rng_int(&rng, T / 2), n = 1 + rng_int(&rng, T - ctx);
            for (int t = 0; t < T; t++) mask[r * T + t] = t >= ctx - 1 && t < ctx - 1 + n;
        }
        int pred = mc_eval_predict(means, losses, mask, K, T);
        int want = brute_predict(ref, losses, mask, K, T);
        if (pred != want) pred_ok = 0;
        for (int r = 0; r < K; r++) if (means[r] != (float)ref[r]) mean_ok = 0;  // same order of sums: bitwise
        counts[pred]++;
        if (mc_eval_correct(losses, mask, T, want) != 1 || mc_eval_correct(losses, mask, T, (want + 1) % K) != 0) pred_ok = 0;
    }
    test_checkf(pred_ok, "score_vs_brute_force", "%d random examples, predictions per row %d %d %d %d", trials,
                counts[0], counts[1], counts[2], counts[3]);
    test_check(mean_ok, "score_means_bitwise");
    test_check(counts[0] > 0 && counts[1] > 0 && counts[2] > 0 && counts[3] > 0, "score_every_row_wins_sometimes");

    // ties: the smaller index wins
    fill_uniform(losses, K * T, 2.0f, 3.0f, &rng);
    for (int t = 0; t < K * T; t++) mask[t] = (t % T) >= 3 && (t % T) < 9;
    for (int t = 0; t < T; t++) { losses[1 * T + t] = 0.25f; losses[3 * T + t] = 0.25f; }
    test_checkf(mc_eval_predict(NULL, losses, mask, K, T) == 1, "score_tie_smaller_index", "rows 1 and 3 tie, got %d",
                mc_eval_predict(NULL, losses, mask, K, T));
    for (int t = 0; t < K * T; t++) losses[t] = 1.5f;
    test_check(mc_eval_predict(NULL, losses, mask, K, T) == 0, "score_all_equal_row0");
    // the same mean from different token counts is a tie too: row 2 has mean 1 over 2 tokens,
    // row 3 mean 1 over 4 tokens, the rest are higher
    for (int t = 0; t < K * T; t++) { losses[t] = 2.0f + rng_f32(&rng); mask[t] = 0; }
    mask[2 * T + 5] = mask[2 * T + 6] = 1;
    losses[2 * T + 5] = 0.5f; losses[2 * T + 6] = 1.5f;
    for (int t = 10; t < 14; t++) { mask[3 * T + t] = 1; losses[3 * T + t] = 1.0f; }
    mask[0 * T + 1] = mask[1 * T + 1] = 1;
    test_check(mc_eval_predict(means, losses, mask, K, T) == 2 && means[2] == 1.0f && means[3] == 1.0f,
               "score_tie_different_lengths");
    // an empty row never wins over a scored one; a NaN row never wins
    for (int t = 0; t < K * T; t++) mask[t] = (t % T) < 5;
    fill_uniform(losses, K * T, 1.0f, 2.0f, &rng);
    for (int t = 0; t < T; t++) { mask[0 * T + t] = 0; losses[0 * T + t] = 0.0f; losses[1 * T + t] = NAN; }
    losses[2 * T + 2] = -1.0f;  // row 2 the clear minimum
    test_check(mc_eval_predict(means, losses, mask, K, T) == 2 && isinf(means[0]) && isnan(means[1]),
               "score_empty_and_nan_rows");
    // a NaN in row 0 must not stop the later rows from winning
    for (int t = 0; t < K * T; t++) mask[t] = (t % T) < 5;
    fill_uniform(losses, K * T, 1.0f, 2.0f, &rng);
    losses[0 * T + 1] = NAN;
    losses[2 * T + 2] = -1.0f;
    int p = mc_eval_predict(NULL, losses, mask, K, T);
    test_checkf(p == 2, "score_nan_row0_does_not_block", "got %d", p);
}

// ----------------------------------------------------------------------------
// ranks: every example exactly once over the ranks, rank r owning i % P == r; the correct counts
// summed over ranks equal the single-process count

static void test_ranks(void) {
    int T = 64;
    MCEval ev;
    mc_eval_open(&ev, EVAL_FILE, T, GPT2_VOCAB);
    int E = mc_eval_num_examples(&ev);
    int* inputs = (int*)malloc_check(K * T * sizeof(int));
    int* targets = (int*)malloc_check(K * T * sizeof(int));
    unsigned char* mask = (unsigned char*)malloc_check(K * T);
    float* losses = (float*)malloc_check(K * T * sizeof(float));
    // per example, random losses, and a prediction that is right on about half of the examples
    int correct_single = 0, correct_of[64];
    Rng rng = rng_seeded(77);
    for (int i = 0; i < E; i++) {
        int label = mc_eval_pack(inputs, targets, mask, &ev, i);
        fill_uniform(losses, K * T, 2.0f, 4.0f, &rng);
        int favoured = rng_int(&rng, 2) == 0 ? label : (label + 1 + rng_int(&rng, K - 1)) % K;
        for (int t = 0; t < T; t++) losses[favoured * T + t] -= 2.5f;  // [-0.5, 1.5) against [2, 4): never a tie
        correct_of[i] = mc_eval_correct(losses, mask, T, label);
        if (correct_of[i] != (favoured == label)) correct_single = -1000;
        correct_single += correct_of[i];
    }
    test_checkf(correct_single > 0 && correct_single < E, "ranks_single_accuracy", "%d/%d correct", correct_single, E);
    int ok = 1;
    const int procs[] = {1, 2, 3, 5, 16, 20};
    for (int pi = 0; pi < 6; pi++) {
        int P = procs[pi], seen[64] = {0}, total = 0, correct = 0;
        for (int r = 0; r < P; r++) {
            int n = mc_eval_rank_count(&ev, r, P);
            for (int j = 0; j < n; j++) {
                int i = mc_eval_rank_example(r, P, j);
                if (i < 0 || i >= E || i % P != r) { ok = 0; continue; }
                seen[i]++;
                total++;
                correct += correct_of[i];
            }
        }
        for (int i = 0; i < E; i++) if (seen[i] != 1) ok = 0;
        if (total != E || correct != correct_single) ok = 0;
    }
    test_check(ok, "ranks_split_disjoint_complete");
    free(inputs);
    free(targets);
    free(mask);
    free(losses);
    mc_eval_close(&ev);
}

// ----------------------------------------------------------------------------
// malformed files

typedef struct {
    char path[600];
    int T, V;
} OpenArgs;

static void open_child(void* arg) {
    OpenArgs* a = (OpenArgs*)arg;
    MCEval ev;
    mc_eval_open(&ev, a->path, a->T, a->V);
    printf("opened %d examples\n", ev.num_examples);
}

static unsigned char* file_bytes;  // the committed file
static size_t file_size;
static int64_t ex_off[64];         // byte offset of each example, found by our own walk

static void u16_put(unsigned char* b, int64_t off, int v) { b[off] = (unsigned char)(v & 0xFF); b[off + 1] = (unsigned char)(v >> 8); }
static int u16_get(const unsigned char* b, int64_t off) { return b[off] | (b[off + 1] << 8); }

// writes the committed file with one change (edit may be NULL) and size n, then expects refusal
static void expect_refused(const char* name, const char* file, size_t n, void (*edit)(unsigned char*), int T, int V,
                           const char* needle1, const char* needle2) {
    OpenArgs a;
    snprintf(a.path, sizeof(a.path), "%s/%s", test_tmp_root, file);
    unsigned char* b = (unsigned char*)malloc_check(file_size + 64);
    memcpy(b, file_bytes, file_size);
    memset(b + file_size, 0, 64);
    if (edit) edit(b);
    FILE* fp = fopen(a.path, "wb");
    if (fp == NULL || fwrite(b, 1, n, fp) != n || fclose(fp) != 0) {
        test_check(0, name);
        free(b);
        return;
    }
    free(b);
    a.T = T;
    a.V = V;
    test_expect_exit_failure(name, open_child, &a, needle1, needle2);
}

static void edit_magic(unsigned char* b) { b[0] ^= 0x10; }
static void edit_version(unsigned char* b) { b[4] = 2; }
static void edit_label(unsigned char* b) { u16_put(b, ex_off[3] + 6, 4); }
static void edit_token(unsigned char* b) { u16_put(b, ex_off[2] + 12 + 2 * 3, GPT2_VOCAB); }  // context token 3
static void edit_completion_token(unsigned char* b) {
    // example 11, completion 2, token 1 (the walk: context, then completions 0 and 1)
    int64_t q = ex_off[11] + 10;
    q += 2 + 2 * u16_get(b, q);
    for (int c = 0; c < 2; c++) q += 2 + 2 * u16_get(b, q);
    u16_put(b, q + 2 + 2 * 1, 60000);
}
static void edit_delimiter(unsigned char* b) { u16_put(b, ex_off[5], 65534); }
static void edit_index(unsigned char* b) { u16_put(b, ex_off[7] + 4, 8); }
static void edit_nbytes(unsigned char* b) { u16_put(b, ex_off[4] + 2, u16_get(b, ex_off[4] + 2) + 2); }
static void edit_completions(unsigned char* b) { u16_put(b, ex_off[6] + 8, 3); }
static void edit_count_more(unsigned char* b) { b[8] = 17; }
static void edit_count_zero(unsigned char* b) { b[8] = 0; }
static void edit_longest(unsigned char* b) { b[12] ^= 2; }
static void edit_empty_completion(unsigned char* b) {
    // example 9's first completion length 0: the counts no longer add up to its bytes
    int n_ctx = u16_get(b, ex_off[9] + 10);
    u16_put(b, ex_off[9] + 12 + 2 * n_ctx, 0);
}
static void edit_shard_magic(unsigned char* b) { int32_t m = 20240520; memcpy(b, &m, 4); }  // a token shard's magic

static void test_malformed(void) {
    size_t n = 0;
    file_bytes = test_read_file(EVAL_FILE, &n);
    if (!test_check(file_bytes != NULL && n > 1024, "malformed_setup_read")) return;
    file_size = n;
    int E = u16_get(file_bytes, 8);
    int64_t off = 1024;
    for (int i = 0; i < E && i < 64; i++) {
        ex_off[i] = off;
        off += u16_get(file_bytes, off + 2);
    }
    test_check(E == 16 && off == (int64_t)file_size, "malformed_setup_walk");
    expect_refused("refuse_truncated", "truncated.bin", file_size - 10, NULL, 64, GPT2_VOCAB, "example 15",
                   "truncated");
    expect_refused("refuse_header_only_part", "short.bin", 600, NULL, 64, GPT2_VOCAB, "smaller than the 1024-byte header",
                   "short.bin");
    expect_refused("refuse_bad_magic", "magic.bin", file_size, edit_magic, 64, GPT2_VOCAB, "bad magic", "expected 20240522");
    expect_refused("refuse_token_shard", "shard.bin", file_size, edit_shard_magic, 64, GPT2_VOCAB, "token shard", NULL);
    expect_refused("refuse_bad_version", "version.bin", file_size, edit_version, 64, GPT2_VOCAB, "unsupported version 2",
                   NULL);
    expect_refused("refuse_label_out_of_range", "label.bin", file_size, edit_label, 64, GPT2_VOCAB,
                   "example 3: has label 4", "expected 0 to 3");
    expect_refused("refuse_token_ge_vocab", "token.bin", file_size, edit_token, 64, GPT2_VOCAB,
                   "example 2: context token 3 is 50257", "expected < vocab_size 50257");
    expect_refused("refuse_completion_token_ge_vocab", "ctoken.bin", file_size, edit_completion_token, 64, GPT2_VOCAB,
                   "example 11: completion 2 token 1 is 60000", "expected < vocab_size 50257");
    expect_refused("refuse_token_ge_small_vocab", "vocab.bin", file_size, NULL, 64, 1000, "example 0", "< vocab_size 1000");
    expect_refused("refuse_longer_than_T", "long.bin", file_size, NULL, 20, GPT2_VOCAB, "example 0",
                   "expected at most T = 20");
    expect_refused("refuse_bad_delimiter", "delim.bin", file_size, edit_delimiter, 64, GPT2_VOCAB,
                   "example 5: starts with 65534", "delimiter 65535");
    expect_refused("refuse_bad_index", "index.bin", file_size, edit_index, 64, GPT2_VOCAB, "example 7: has index 8", NULL);
    expect_refused("refuse_bad_example_bytes", "nbytes.bin", file_size, edit_nbytes, 64, GPT2_VOCAB, "example 4",
                   "its counts make");
    expect_refused("refuse_three_completions", "k3.bin", file_size, edit_completions, 64, GPT2_VOCAB,
                   "example 6: has 3 completions", "expected 4");
    expect_refused("refuse_more_examples_than_file", "count.bin", file_size, edit_count_more, 64, GPT2_VOCAB,
                   "example 16", "file ends");
    expect_refused("refuse_zero_examples", "zero.bin", file_size, edit_count_zero, 64, GPT2_VOCAB, "0 examples",
                   "expected 1 to 65535");
    expect_refused("refuse_trailing_bytes", "trailing.bin", file_size + 4, NULL, 64, GPT2_VOCAB,
                   "4 bytes follow the last", NULL);
    expect_refused("refuse_bad_longest", "longest.bin", file_size, edit_longest, 64, GPT2_VOCAB, "longest example", NULL);
    expect_refused("refuse_empty_completion", "empty.bin", file_size, edit_empty_completion, 64, GPT2_VOCAB,
                   "example 9: completion 0 is empty", NULL);
    OpenArgs dir;
    snprintf(dir.path, sizeof(dir.path), "%s", test_tmp_root);
    dir.T = 64;
    dir.V = GPT2_VOCAB;
    test_expect_exit_failure("refuse_directory", open_child, &dir, "is a directory", NULL);
    OpenArgs missing;
    snprintf(missing.path, sizeof(missing.path), "%s/missing.bin", test_tmp_root);
    missing.T = 64;
    missing.V = GPT2_VOCAB;
    test_expect_exit_failure("refuse_missing", open_child, &missing, "missing.bin", "cannot open");
    // the unmodified file at the boundaries: T = the longest context + completion exactly
    OpenArgs fits;
    snprintf(fits.path, sizeof(fits.path), "%s", EVAL_FILE);
    MCEval ev;
    mc_eval_open(&ev, EVAL_FILE, 64, GPT2_VOCAB);
    int longest = 0;
    for (int i = 0; i < ev.num_examples; i++) {
        MCExample ex = mc_eval_example(&ev, i);
        for (int c = 0; c < K; c++) if (ex.context_len + ex.completion_len[c] > longest) longest = ex.context_len + ex.completion_len[c];
    }
    mc_eval_close(&ev);
    char out[4096];
    fits.T = longest;
    fits.V = GPT2_VOCAB;
    int code = test_run_child(open_child, &fits, out, sizeof(out));
    test_checkf(code == 999 && strstr(out, "opened 16 examples"), "accept_T_exactly_longest", "T = %d", longest);
    fits.T = longest - 1;
    test_expect_exit_failure("refuse_T_one_short", open_child, &fits, "expected at most T", NULL);
    free(file_bytes);
}

int main(void) {
    test_begin("test_mc_eval");
    test_tmp_begin("test_mc_eval");
    test_committed_file();
    test_packing();
    test_scoring();
    test_ranks();
    test_malformed();
    test_tmp_end();
    return test_end();
}
