/*
 * test_dataloader.c - CPU tests of llmc/dataloader.h and llmc/tokenizer.h.
 * Writes small synthetic shards of random tokens to a scratch folder and checks every batch
 * token by token against their known content: headers, streaming across shards and epochs,
 * rank splits, shuffling, position save/restore, reset/eval, a >4 GiB sparse shard (64-bit
 * offsets), bad input (each in a forked child that must exit 1 with the expected message; a
 * FIFO, directory or late out-of-vocabulary token is refused at init), the data fingerprint (one
 * changed token changes it; a sparse shard equals its dense copy), and the committed
 * tinyshakespeare shards + tokenizer. Run from the repo root.
 *
 *   make test_dataloader && ./test_dataloader
 *
 * One PASS/FAIL line per check, then "test_dataloader: N passed, N failed"; exits non-zero on a
 * failure.
 */
#include "llmc/test_harness.h"
#include <fcntl.h>
#include "llmc/dataloader.h"
#include "llmc/tokenizer.h"

#define VOCAB 50257
#define MAX_SHARDS 8

// ----------------------------------------------------------------------------
// synthetic shards

static Rng rng;  // seeded in main; each test group's child starts from the state at its fork

typedef struct {
    int num_shards;
    char paths[MAX_SHARDS][300];
    uint16_t* tokens[MAX_SHARDS];
    int64_t num_tokens[MAX_SHARDS];
    char pattern[300];
} ShardSet;

// writes a shard with a possibly wrong header: header_tokens is what the header claims
static void write_raw_shard(const char* path, const uint16_t* tokens, int64_t n, int32_t magic, int32_t version,
                            int64_t header_tokens) {
    int32_t header[SHARD_HEADER_INTS] = {0};
    header[0] = magic;
    header[1] = version;
    header[2] = (int32_t)header_tokens;
    FILE* fp = fopen_check(path, "wb");
    fwrite_check(header, sizeof(int32_t), SHARD_HEADER_INTS, fp, path);
    if (n > 0) { fwrite_check(tokens, sizeof(uint16_t), (size_t)n, fp, path); }
    fclose_check(fp, path);
}

static void make_shard_set(ShardSet* set, const char* prefix, const int64_t* sizes, int num_shards) {
    set->num_shards = num_shards;
    snprintf(set->pattern, sizeof(set->pattern), "%s/%s_*.bin", test_tmp_root, prefix);
    for (int s = 0; s < num_shards; s++) {
        snprintf(set->paths[s], sizeof(set->paths[s]), "%s/%s_%06d.bin", test_tmp_root, prefix, s);
        set->num_tokens[s] = sizes[s];
        set->tokens[s] = (uint16_t*)malloc_check((size_t)sizes[s] * sizeof(uint16_t));
        for (int64_t i = 0; i < sizes[s]; i++) { set->tokens[s][i] = (uint16_t)(rng_int(&rng, VOCAB)); }
        write_raw_shard(set->paths[s], set->tokens[s], sizes[s], SHARD_MAGIC, SHARD_VERSION, sizes[s]);
    }
}

static void free_shard_set(ShardSet* set) {
    for (int s = 0; s < set->num_shards; s++) { free(set->tokens[s]); remove(set->paths[s]); }
}

static void poison_batch(DataLoader* loader) {
    size_t BT = loader->B * loader->T;
    for (size_t i = 0; i < BT; i++) { loader->inputs[i] = -12345; loader->targets[i] = -12345; }
    loader->last_shard = -1;
    loader->last_window = -1;
}

// the batch must be window last_window of shard last_shard, token by token
static int batch_matches(const DataLoader* loader, const ShardSet* set, char* why, size_t why_len) {
    int s = loader->last_shard;
    int64_t w = loader->last_window;
    int64_t BT = (int64_t)(loader->B * loader->T);
    if (s < 0 || s >= set->num_shards || strcmp(loader->shard_paths[s], set->paths[s]) != 0) {
        snprintf(why, why_len, "batch reports shard %d", s);
        return 0;
    }
    if (w < 0 || (w + 1) * BT + 1 > set->num_tokens[s]) {
        snprintf(why, why_len, "batch reports window %lld of shard %d (%lld tokens)", (long long)w, s,
                 (long long)set->num_tokens[s]);
        return 0;
    }
    const uint16_t* expect = set->tokens[s] + w * BT;
    for (int64_t i = 0; i < BT; i++) {
        if (loader->inputs[i] != (int)expect[i] || loader->targets[i] != (int)expect[i + 1]) {
            snprintf(why, why_len, "shard %d window %lld position %lld: input %d target %d, expected %d %d", s,
                     (long long)w, (long long)i, loader->inputs[i], loader->targets[i], expect[i], expect[i + 1]);
            return 0;
        }
    }
    return 1;
}

// reads n batches, verifying each; records (shard, window) pairs; returns 0 with a reason on mismatch
static int read_batches(DataLoader* loader, const ShardSet* set, int64_t n, int* shards, int64_t* windows,
                        char* why, size_t why_len) {
    for (int64_t k = 0; k < n; k++) {
        poison_batch(loader);
        dataloader_next_batch(loader);
        if (!batch_matches(loader, set, why, why_len)) { return 0; }
        if (shards) { shards[k] = loader->last_shard; }
        if (windows) { windows[k] = loader->last_window; }
    }
    return 1;
}

// ----------------------------------------------------------------------------
// tests on good data

// B=3, T=5 (B*T = 15): shard sizes give W = 20, 30, 15 windows, with unused tails
static const size_t TB = 3, TT = 5;
static const int64_t MAIN_SIZES[3] = {15 * 20 + 1 + 7, 15 * 30 + 1, 15 * 15 + 1 + 14};
static const int64_t MAIN_WINDOWS[3] = {20, 30, 15};

static void test_headers(const ShardSet* set) {
    DataLoader loader;
    dataloader_init(&loader, set->pattern, TB, TT, 0, 1, 0, 0, VOCAB);
    int ok = loader.num_shards == set->num_shards;
    int64_t total = 0, batches = 0;
    for (int s = 0; ok && s < set->num_shards; s++) {
        ok = ok && strcmp(loader.shard_paths[s], set->paths[s]) == 0;
        ok = ok && loader.shard_tokens[s] == set->num_tokens[s];
        ok = ok && loader.shard_windows[s] == MAIN_WINDOWS[s];
        total += set->num_tokens[s];
        batches += MAIN_WINDOWS[s];
    }
    ok = ok && loader.total_tokens == total && dataloader_num_batches(&loader) == batches;
    char detail[200];
    snprintf(detail, sizeof(detail), "%d shards, %lld tokens, %lld batches per epoch", loader.num_shards,
             (long long)loader.total_tokens, (long long)dataloader_num_batches(&loader));
    test_checkf(ok, "headers parsed (shard count, token counts, windows)", "%s", detail);
    dataloader_free(&loader);
}

// one rank, no shuffle: shard 0 windows 0..W0-1, shard 1 ..., for three epochs, token by token
static void test_sequential_stream(const ShardSet* set) {
    DataLoader loader;
    dataloader_init(&loader, set->pattern, TB, TT, 0, 1, 0, 0, VOCAB);
    int ok = 1;
    char why[300] = "";
    for (int epoch = 0; ok && epoch < 3; epoch++) {
        for (int s = 0; ok && s < set->num_shards; s++) {
            for (int64_t w = 0; ok && w < MAIN_WINDOWS[s]; w++) {
                poison_batch(&loader);
                dataloader_next_batch(&loader);
                if (!batch_matches(&loader, set, why, sizeof(why))) { ok = 0; break; }
                if (loader.last_shard != s || loader.last_window != w) {
                    snprintf(why, sizeof(why), "epoch %d: got shard %d window %lld, expected shard %d window %lld",
                             epoch, loader.last_shard, (long long)loader.last_window, s, (long long)w);
                    ok = 0;
                }
            }
        }
    }
    test_check_why(ok, "sequential streaming across shard boundaries and 3 epochs, token by token", why);
    dataloader_free(&loader);
}

// P ranks together read disjoint windows; on shards whose window count is a multiple of P their
// union is every window (what one rank reads); elsewhere the last W mod P windows are skipped
static void test_rank_split(const ShardSet* set, int P, int shuffle, const char* name) {
    int64_t max_w = 0;
    for (int s = 0; s < set->num_shards; s++) {
        int64_t w = (set->num_tokens[s] - 1) / (int64_t)(TB * TT);
        if (w > max_w) { max_w = w; }
    }
    int* seen = (int*)calloc_check((size_t)(set->num_shards * max_w), sizeof(int));
    int ok = 1;
    char why[300] = "";
    int64_t batches_rank0 = -1;
    for (int r = 0; ok && r < P; r++) {
        DataLoader loader;
        dataloader_init(&loader, set->pattern, TB, TT, r, P, shuffle, 7, VOCAB);
        int64_t n = dataloader_num_batches(&loader);
        if (r == 0) { batches_rank0 = n; }
        if (n != batches_rank0) {
            snprintf(why, sizeof(why), "rank %d has %lld batches per epoch, rank 0 has %lld", r, (long long)n,
                     (long long)batches_rank0);
            ok = 0;
        }
        int* shards = (int*)malloc_check((size_t)n * sizeof(int));
        int64_t* windows = (int64_t*)malloc_check((size_t)n * sizeof(int64_t));
        if (ok && !read_batches(&loader, set, n, shards, windows, why, sizeof(why))) { ok = 0; }
        for (int64_t k = 0; ok && k < n; k++) { seen[shards[k] * max_w + windows[k]]++; }
        free(shards);
        free(windows);
        dataloader_free(&loader);
    }
    for (int s = 0; ok && s < set->num_shards; s++) {
        int64_t W = (set->num_tokens[s] - 1) / (int64_t)(TB * TT);
        int64_t used = W / P * P;
        for (int64_t w = 0; ok && w < W; w++) {
            int count = seen[s * max_w + w];
            int expect_one = shuffle ? -1 : (w < used); // shuffled: which W mod P are skipped is random
            if (count > 1) {
                snprintf(why, sizeof(why), "shard %d window %lld read by %d ranks", s, (long long)w, count);
                ok = 0;
            } else if (expect_one >= 0 && count != expect_one) {
                snprintf(why, sizeof(why), "shard %d window %lld read %d times, expected %d", s, (long long)w,
                         count, expect_one);
                ok = 0;
            }
        }
        int64_t total = 0;
        for (int64_t w = 0; w < W; w++) { total += seen[s * max_w + w]; }
        if (ok && total != used) {
            snprintf(why, sizeof(why), "shard %d: %lld windows read, expected %lld", s, (long long)total,
                     (long long)used);
            ok = 0;
        }
    }
    test_check_why(ok, name, why);
    free(seen);
}

// sequence of (shard, window) over `epochs` epochs of a loader
static int record_sequence(const ShardSet* set, int P, int rank, int shuffle, uint64_t seed, int64_t n, int* shards,
                           int64_t* windows, char* why, size_t why_len) {
    DataLoader loader;
    dataloader_init(&loader, set->pattern, TB, TT, rank, P, shuffle, seed, VOCAB);
    int ok = read_batches(&loader, set, n, shards, windows, why, why_len);
    dataloader_free(&loader);
    return ok;
}

static void test_shuffle(const ShardSet* set) {
    const int64_t per_epoch = MAIN_WINDOWS[0] + MAIN_WINDOWS[1] + MAIN_WINDOWS[2];
    const int64_t n = 3 * per_epoch;
    int *sa = malloc_check(n * sizeof(int)), *sb = malloc_check(n * sizeof(int)), *sc = malloc_check(n * sizeof(int));
    int64_t *wa = malloc_check(n * sizeof(int64_t)), *wb = malloc_check(n * sizeof(int64_t)),
            *wc = malloc_check(n * sizeof(int64_t));
    char why[300] = "";
    int ok = record_sequence(set, 1, 0, 1, 42, n, sa, wa, why, sizeof(why)) &&
             record_sequence(set, 1, 0, 1, 42, n, sb, wb, why, sizeof(why)) &&
             record_sequence(set, 1, 0, 1, 43, n, sc, wc, why, sizeof(why));
    if (ok) {
        for (int64_t k = 0; k < n; k++) {
            if (sa[k] != sb[k] || wa[k] != wb[k]) {
                snprintf(why, sizeof(why), "seed 42 twice differs at batch %lld", (long long)k);
                ok = 0;
                break;
            }
        }
    }
    if (ok) {
        int64_t same_c = 0, same_next_epoch = 0, sequential = 0;
        for (int64_t k = 0; k < per_epoch; k++) {
            same_c += (sa[k] == sc[k] && wa[k] == wc[k]);
            same_next_epoch += (sa[k] == sa[k + per_epoch] && wa[k] == wa[k + per_epoch]);
        }
        int64_t k = 0; // where the unshuffled order would be
        for (int s = 0; s < 3; s++) {
            for (int64_t w = 0; w < MAIN_WINDOWS[s]; w++, k++) { sequential += (sa[k] == s && wa[k] == w); }
        }
        // 65 windows: a random permutation matches another in ~1 position on average
        if (same_c > per_epoch / 4 || same_next_epoch > per_epoch / 4 || sequential > per_epoch / 4) {
            snprintf(why, sizeof(why), "orders too similar: seed 43 %lld/%lld, next epoch %lld, unshuffled %lld",
                     (long long)same_c, (long long)per_epoch, (long long)same_next_epoch, (long long)sequential);
            ok = 0;
        }
        // every epoch is a permutation of all windows
        for (int e = 0; ok && e < 3; e++) {
            int seen[3][30] = {{0}};
            for (int64_t j = e * per_epoch; j < (e + 1) * per_epoch; j++) { seen[sa[j]][wa[j]]++; }
            for (int s = 0; ok && s < 3; s++) {
                for (int64_t w = 0; ok && w < MAIN_WINDOWS[s]; w++) {
                    if (seen[s][w] != 1) {
                        snprintf(why, sizeof(why), "epoch %d: shard %d window %lld read %d times", e, s, (long long)w,
                                 seen[s][w]);
                        ok = 0;
                    }
                }
            }
        }
        // shard order differs between some epochs (3 shards: 6 orders); windows of a shard stay together
        int shard_order_changed = 0;
        for (int e = 1; e < 3; e++) { shard_order_changed |= sa[e * per_epoch] != sa[0]; }
        if (ok && !shard_order_changed) {
            int64_t extra = 10 * per_epoch; // look further: with 3 shards, 3 epochs may share the first shard
            int* sx = malloc_check(extra * sizeof(int));
            int64_t* wx = malloc_check(extra * sizeof(int64_t));
            ok = record_sequence(set, 1, 0, 1, 42, extra, sx, wx, why, sizeof(why));
            for (int e = 1; e < 10; e++) { shard_order_changed |= sx[e * per_epoch] != sx[0]; }
            free(sx);
            free(wx);
            if (ok && !shard_order_changed) {
                snprintf(why, sizeof(why), "shard order identical in 10 epochs");
                ok = 0;
            }
        }
    }
    test_check_why(ok, "shuffle: same seed same order, other seed/epoch different, each epoch a permutation", why);
    free(sa); free(sb); free(sc); free(wa); free(wb); free(wc);
}

// one shard: every epoch boundary stays in the same shard, whose window order must be redrawn
static void test_shuffle_single_shard(const ShardSet* one) {
    const int64_t W = (one->num_tokens[0] - 1) / (int64_t)(TB * TT);
    const int epochs = 4;
    int* s = malloc_check(epochs * W * sizeof(int));
    int64_t* w = malloc_check(epochs * W * sizeof(int64_t));
    char why[300] = "";
    int ok = record_sequence(one, 1, 0, 1, 42, epochs * W, s, w, why, sizeof(why));
    for (int e = 0; ok && e < epochs; e++) {
        int seen[64] = {0};
        int64_t same_as_previous = 0;
        for (int64_t k = 0; k < W; k++) {
            seen[w[e * W + k]]++;
            if (e > 0) { same_as_previous += w[e * W + k] == w[(e - 1) * W + k]; }
        }
        for (int64_t k = 0; ok && k < W; k++) {
            if (seen[k] != 1) {
                snprintf(why, sizeof(why), "epoch %d: window %lld read %d times", e, (long long)k, seen[k]);
                ok = 0;
            }
        }
        if (ok && same_as_previous > W / 4) {
            snprintf(why, sizeof(why), "epoch %d repeats %lld of %lld positions of epoch %d's window order", e,
                     (long long)same_as_previous, (long long)W, e - 1);
            ok = 0;
        }
    }
    test_check_why(ok, "shuffle, one shard: window order redrawn every epoch, each a permutation", why);
    free(s);
    free(w);
}

// state saved after k batches, restored in a fresh loader, continues with the identical batches
static void test_state_restore(const ShardSet* set, int shuffle, const char* name) {
    const int P = 2, rank = 1;
    const int64_t total = 120; // > one epoch per rank (32 batches): crosses shards and epochs
    int* shards = malloc_check(total * sizeof(int));
    int64_t* windows = malloc_check(total * sizeof(int64_t));
    char why[300] = "";
    int ok = 1;
    const int64_t save_points[] = {0, 1, 9, 10, 31, 32, 33, 77};
    for (size_t i = 0; ok && i < sizeof(save_points) / sizeof(save_points[0]); i++) {
        int64_t k = save_points[i];
        DataLoader a;
        dataloader_init(&a, set->pattern, TB, TT, rank, P, shuffle, 1234, VOCAB);
        ok = read_batches(&a, set, k, NULL, NULL, why, sizeof(why));
        DataLoaderState state = dataloader_get_state(&a);
        ok = ok && read_batches(&a, set, total - k, shards, windows, why, sizeof(why));
        // fresh loader, built with a different seed and no shuffle: the state must bring both back
        DataLoader b;
        dataloader_init(&b, set->pattern, TB, TT, rank, P, 0, 999, VOCAB);
        dataloader_set_state(&b, &state);
        for (int64_t j = 0; ok && j < total - k; j++) {
            poison_batch(&b);
            dataloader_next_batch(&b);
            if (!batch_matches(&b, set, why, sizeof(why))) { ok = 0; break; }
            if (b.last_shard != shards[j] || b.last_window != windows[j]) {
                snprintf(why, sizeof(why), "saved after %lld batches: batch %lld after restore is shard %d window %lld, "
                         "expected shard %d window %lld", (long long)k, (long long)j, b.last_shard,
                         (long long)b.last_window, shards[j], (long long)windows[j]);
                ok = 0;
            }
        }
        // restoring on the loader that saved it rewinds it too
        dataloader_set_state(&a, &state);
        poison_batch(&a);
        dataloader_next_batch(&a);
        if (ok && (a.last_shard != shards[0] || a.last_window != windows[0])) {
            snprintf(why, sizeof(why), "rewinding the same loader to batch %lld gave another batch", (long long)k);
            ok = 0;
        }
        dataloader_free(&a);
        dataloader_free(&b);
    }
    test_check_why(ok, name, why);
    free(shards);
    free(windows);
}

// saved with P=2 after some rounds, restored with P=3: the three ranks continue with the next
// whole round of 3 in the global window order, never repeating a window consumed before
static void test_state_restore_other_process_count(const ShardSet* set) {
    // global order of one shard = what a single rank reads from it (P=1, same seed)
    const int64_t per_epoch = MAIN_WINDOWS[0] + MAIN_WINDOWS[1] + MAIN_WINDOWS[2];
    int ref_s[65];
    int64_t ref_w[65];
    char why[300] = "";
    int ok = record_sequence(set, 1, 0, 1, 5, per_epoch, ref_s, ref_w, why, sizeof(why));
    const int64_t rounds = 4; // P=2 ranks read 4 rounds = 8 windows of the first shard in the order
    DataLoaderState state;
    if (ok) {
        DataLoader a;
        dataloader_init(&a, set->pattern, TB, TT, 0, 2, 1, 5, VOCAB);
        ok = read_batches(&a, set, rounds, NULL, NULL, why, sizeof(why));
        state = dataloader_get_state(&a);
        dataloader_free(&a);
    }
    int64_t consumed = 2 * rounds;                    // 8
    int64_t resume = (consumed + 3 - 1) / 3 * 3;      // 9: next whole round of 3
    for (int r = 0; ok && r < 3; r++) {
        DataLoader b;
        dataloader_init(&b, set->pattern, TB, TT, r, 3, 1, 5, VOCAB);
        dataloader_set_state(&b, &state);
        poison_batch(&b);
        dataloader_next_batch(&b);
        ok = batch_matches(&b, set, why, sizeof(why));
        int64_t j = resume + r;
        if (ok && (b.last_shard != ref_s[j] || b.last_window != ref_w[j])) {
            snprintf(why, sizeof(why), "rank %d of 3 resumed at shard %d window %lld, expected shard %d window %lld",
                     r, b.last_shard, (long long)b.last_window, ref_s[j], (long long)ref_w[j]);
            ok = 0;
        }
        dataloader_free(&b);
    }
    test_check_why(ok, "state restore with another process count (2 -> 3 ranks) resumes at the next whole round", why);
}

// eval: after reset, num_batches batches cover the same windows every time, then it wraps
static void test_reset_eval(const ShardSet* set) {
    DataLoader loader;
    dataloader_init(&loader, set->pattern, TB, TT, 1, 2, 0, 0, VOCAB);
    int64_t n = dataloader_num_batches(&loader);
    int* s1 = malloc_check((n + 1) * sizeof(int));
    int* s2 = malloc_check((n + 1) * sizeof(int));
    int64_t* w1 = malloc_check((n + 1) * sizeof(int64_t));
    int64_t* w2 = malloc_check((n + 1) * sizeof(int64_t));
    char why[300] = "";
    int ok = n == MAIN_WINDOWS[0] / 2 + MAIN_WINDOWS[1] / 2 + MAIN_WINDOWS[2] / 2;
    if (!ok) { snprintf(why, sizeof(why), "num_batches %lld for 2 ranks", (long long)n); }
    ok = ok && read_batches(&loader, set, n + 1, s1, w1, why, sizeof(why)); // one epoch and one more
    ok = ok && read_batches(&loader, set, 5, NULL, NULL, why, sizeof(why));
    dataloader_reset(&loader);
    ok = ok && read_batches(&loader, set, n + 1, s2, w2, why, sizeof(why));
    for (int64_t k = 0; ok && k <= n; k++) {
        if (s1[k] != s2[k] || w1[k] != w2[k]) {
            snprintf(why, sizeof(why), "after reset batch %lld differs", (long long)k);
            ok = 0;
        }
    }
    if (ok && (s1[n] != s1[0] || w1[n] != w1[0])) {
        snprintf(why, sizeof(why), "batch num_batches is not the first batch again (epoch did not wrap)");
        ok = 0;
    }
    // the epoch holds every window of this rank exactly once
    for (int64_t k = 0; ok && k < n; k++) {
        for (int64_t j = k + 1; j < n; j++) {
            if (s1[k] == s1[j] && w1[k] == w1[j]) {
                snprintf(why, sizeof(why), "window repeated within one eval pass");
                ok = 0;
                break;
            }
        }
    }
    test_check_why(ok, "reset + num_batches: eval pass repeats the same batches, then wraps", why);
    free(s1); free(s2); free(w1); free(w2);
    dataloader_free(&loader);
}

// a sparse shard of 2^31-1 tokens (4 GiB): known tokens at its very end must come back, which
// needs 64-bit offsets all the way through
static void test_large_sparse_shard(void) {
    char path[300];
    snprintf(path, sizeof(path), "%s/large_000000.bin", test_tmp_root);
    const int64_t n = INT32_MAX; // largest count the int32 header can hold
    const int64_t BT = 1024;
    const int64_t windows = (n - 1) / BT;
    const int64_t last = windows - 1;
    uint16_t tail[1025];
    for (int i = 0; i < 1025; i++) { tail[i] = (uint16_t)(rng_int(&rng, VOCAB)); }
    int32_t header[SHARD_HEADER_INTS] = {SHARD_MAGIC, SHARD_VERSION, (int32_t)n};
    FILE* fp = fopen_check(path, "wb");
    fwrite_check(header, sizeof(int32_t), SHARD_HEADER_INTS, fp, path);
    // everything between header and the last window stays a hole (reads as token 0)
    fseek_check(fp, SHARD_HEADER_BYTES + last * BT * 2, SEEK_SET, path);
    fwrite_check(tail, sizeof(uint16_t), 1025, fp, path);
    fseek_check(fp, SHARD_HEADER_BYTES + n * 2 - 2, SEEK_SET, path); // file length = header + 2n
    uint16_t final_token = tail[0];
    fwrite_check(&final_token, sizeof(uint16_t), 1, fp, path);
    fclose_check(fp, path);

    DataLoader loader;
    dataloader_init(&loader, path, 1, (size_t)BT, 0, 1, 0, 0, VOCAB);
    int ok = loader.shard_tokens[0] == n && loader.shard_windows[0] == windows;
    DataLoaderState state = dataloader_get_state(&loader);
    state.window_pos = last; // jump to the last window: byte offset ~4 GiB
    dataloader_set_state(&loader, &state);
    poison_batch(&loader);
    dataloader_next_batch(&loader);
    ok = ok && loader.last_window == last;
    for (int i = 0; ok && i < BT; i++) { ok = loader.inputs[i] == tail[i] && loader.targets[i] == tail[i + 1]; }
    // and the first window (all holes) is token 0
    dataloader_reset(&loader);
    poison_batch(&loader);
    dataloader_next_batch(&loader);
    for (int i = 0; ok && i < BT; i++) { ok = loader.inputs[i] == 0 && loader.targets[i] == 0; }
    test_check(ok, "64-bit offsets: last window of a 2^31-1 token (4 GiB sparse) shard reads back");
    dataloader_free(&loader);
    remove(path);
}

// ----------------------------------------------------------------------------
// bad input: each case runs in a child that must exit non-zero and print the expected text

typedef struct {
    const char* pattern;
    size_t B, T;
    int P;
    int batches;       // batches to read after init
    const char* tokenizer_path; // when set: load this tokenizer instead of a data loader
    int poke;                   // when set: after init, token poke_index of the shard (pattern is its
    int64_t poke_index;         //   path) becomes poke_value, as if the file changed during training:
    uint16_t poke_value;        //   the check of each batch read must catch what init could not
} BadCase;

static void child_bad_case(void* arg) {
    const BadCase* c = (const BadCase*)arg;
    if (c->tokenizer_path) {
        Tokenizer tok;
        if (tokenizer_init(&tok, c->tokenizer_path) != 0) exit(EXIT_FAILURE);  // the message is printed
        tokenizer_free(&tok);
        return;
    }
    DataLoader loader;
    dataloader_init(&loader, c->pattern, c->B, c->T, 0, c->P, 0, 0, VOCAB);
    if (c->poke) {
        FILE* fp = fopen_check(c->pattern, "r+b");
        fseek_check(fp, SHARD_HEADER_BYTES + c->poke_index * (int64_t)sizeof(uint16_t), SEEK_SET, c->pattern);
        fwrite_check(&c->poke_value, sizeof(uint16_t), 1, fp, c->pattern);
        fclose_check(fp, c->pattern);
    }
    for (int i = 0; i < c->batches; i++) { dataloader_next_batch(&loader); }
    dataloader_free(&loader);
}

static void expect_failure(const char* name, BadCase* c, const char* expect1, const char* expect2) {
    test_expect_exit_failure(name, child_bad_case, c, expect1, expect2);
}

// the control for the cases above: the same machinery on good input must return silently
static void expect_success(const char* name, BadCase* c) {
    char out[4096], why[4200];
    int code = test_run_child(child_bad_case, c, out, sizeof(out));
    snprintf(why, sizeof(why), "exit code %d (999: returned), output: %s", code, out);
    test_check_why(code == 999 && out[0] == '\0', name, why);
}

static void test_bad_inputs(void) {
    uint16_t tokens[200];
    for (int i = 0; i < 200; i++) { tokens[i] = (uint16_t)(rng_int(&rng, VOCAB)); }
    char path[300], pattern[300];

    // good shard + bad one in the same glob: the bad one must be named
    snprintf(path, sizeof(path), "%s/badmagic_000000.bin", test_tmp_root);
    write_raw_shard(path, tokens, 200, SHARD_MAGIC, SHARD_VERSION, 200);
    snprintf(path, sizeof(path), "%s/badmagic_000001.bin", test_tmp_root);
    write_raw_shard(path, tokens, 200, 20240521, SHARD_VERSION, 200);
    snprintf(pattern, sizeof(pattern), "%s/badmagic_*.bin", test_tmp_root);
    BadCase c = {.pattern = pattern, .B = 2, .T = 8, .P = 1};
    expect_failure("bad input: wrong magic number", &c, "bad magic number 20240521, expected 20240520", path);

    snprintf(path, sizeof(path), "%s/badversion_000000.bin", test_tmp_root);
    write_raw_shard(path, tokens, 200, SHARD_MAGIC, 2, 200);
    c.pattern = path;
    expect_failure("bad input: wrong version", &c, "unsupported version 2, expected 1", path);

    snprintf(path, sizeof(path), "%s/truncated_000000.bin", test_tmp_root);
    write_raw_shard(path, tokens, 150, SHARD_MAGIC, SHARD_VERSION, 200); // header claims 200, file has 150
    c.pattern = path;
    expect_failure("bad input: truncated shard", &c, "header says 200 tokens", "truncated");

    snprintf(path, sizeof(path), "%s/oversize_000000.bin", test_tmp_root);
    write_raw_shard(path, tokens, 200, SHARD_MAGIC, SHARD_VERSION, 150); // file longer than the header says
    c.pattern = path;
    expect_failure("bad input: file longer than its header says", &c, "header says 150 tokens", "size mismatch");

    snprintf(path, sizeof(path), "%s/headeronly_000000.bin", test_tmp_root);
    FILE* fp = fopen_check(path, "wb");
    fwrite_check(tokens, 1, 100, fp, path);
    fclose_check(fp, path);
    c.pattern = path;
    expect_failure("bad input: file shorter than the header", &c, "smaller than the 1024-byte header", path);

    snprintf(path, sizeof(path), "%s/small_000000.bin", test_tmp_root);
    write_raw_shard(path, tokens, 48, SHARD_MAGIC, SHARD_VERSION, 48); // 2 ranks * 3*8 + 1 = 49 needed
    c.pattern = path;
    c.B = 3; c.T = 8; c.P = 2;
    expect_failure("bad input: shard too small for one window per rank", &c, "holds 48 tokens", "= 49 tokens");
    c.P = 1; // with one rank 48 tokens are enough: must load and read fine
    c.batches = 3;
    expect_success("control: the same 48-token shard with one rank loads and reads 3 batches", &c);

    // out-of-vocabulary token in the middle: found by init's pass over every token, with its offset
    uint16_t oov[200];
    memcpy(oov, tokens, sizeof(oov));
    oov[37] = VOCAB; // 50257
    snprintf(path, sizeof(path), "%s/oov_000000.bin", test_tmp_root);
    write_raw_shard(path, oov, 200, SHARD_MAGIC, SHARD_VERSION, 200);
    c.pattern = path; c.B = 2; c.T = 8; c.P = 1; c.batches = 12;
    expect_failure("bad input: out-of-vocab token (middle)", &c, "token 37 (byte offset 1098) is 50257", path);

    // out-of-vocab as the very last target of the only window: the target must be checked too
    oov[37] = tokens[37];
    oov[16] = 65535;
    snprintf(path, sizeof(path), "%s/oovlast_000000.bin", test_tmp_root);
    write_raw_shard(path, oov, 17, SHARD_MAGIC, SHARD_VERSION, 17);
    c.pattern = path; c.batches = 1;
    expect_failure("bad input: out-of-vocab token as the last target", &c, "token 16 (byte offset 1056) is 65535",
                   "expected < vocab_size 50257");

    // the same two tokens written after init (the shard changed during training): init saw good
    // data, so only the check of each batch read can find them; vocab_size itself is the smallest
    // bad value
    snprintf(path, sizeof(path), "%s/oovlate_000000.bin", test_tmp_root);
    write_raw_shard(path, tokens, 200, SHARD_MAGIC, SHARD_VERSION, 200);
    c.pattern = path; c.batches = 12; c.poke = 1; c.poke_index = 37; c.poke_value = VOCAB;
    expect_failure("bad input: out-of-vocab token (middle), written after init, found by the batch read", &c,
                   "token 37 (byte offset 1098) is 50257", path);
    snprintf(path, sizeof(path), "%s/oovlastlate_000000.bin", test_tmp_root);
    write_raw_shard(path, tokens, 17, SHARD_MAGIC, SHARD_VERSION, 17);
    c.pattern = path; c.batches = 1; c.poke_index = 16; c.poke_value = 65535;
    expect_failure("bad input: out-of-vocab token as the last target, written after init, found by the batch read",
                   &c, "token 16 (byte offset 1056) is 65535", "expected < vocab_size 50257");
    c.poke = 0;

    snprintf(pattern, sizeof(pattern), "%s/does_not_exist_*.bin", test_tmp_root);
    c.pattern = pattern; c.batches = 0;
    expect_failure("bad input: empty glob", &c, "no shard files match", pattern);

    snprintf(pattern, sizeof(pattern), "%s/missing.bin", test_tmp_root);
    c.pattern = pattern;
    expect_failure("bad input: missing file", &c, "no shard files match", pattern);

    c.pattern = "data/gpt2_tokenizer.bin"; // a tokenizer file given as a shard
    expect_failure("bad input: tokenizer file given as a shard", &c, "this looks like a tokenizer file",
                   "data/gpt2_tokenizer.bin");

    // a shard given as the tokenizer: malformed tokenizer files are an error
    snprintf(path, sizeof(path), "%s/badmagic_000000.bin", test_tmp_root);
    BadCase t = {.tokenizer_path = path};
    expect_failure("bad input: tokenizer file with wrong magic", &t, "bad magic number 20240520, expected 20240328",
                   path);

    const char* names[] = {"badmagic_000000", "badmagic_000001", "badversion_000000", "truncated_000000",
                           "oversize_000000", "headeronly_000000", "small_000000", "oov_000000", "oovlast_000000",
                           "oovlate_000000", "oovlastlate_000000"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        snprintf(path, sizeof(path), "%s/%s.bin", test_tmp_root, names[i]);
        remove(path);
    }
}

// ----------------------------------------------------------------------------
// validation at init and the data fingerprint

static uint64_t fingerprint_of(const char* pattern, size_t B, size_t T, int P, int shuffle) {
    DataLoader loader;
    dataloader_init(&loader, pattern, B, T, 0, P, shuffle, 3, VOCAB);
    uint64_t fp = loader.fingerprint;
    dataloader_free(&loader);
    return fp;
}

static void test_fingerprint(void) {
    const int64_t sizes[3] = {301, 257, 333};
    ShardSet set;
    make_shard_set(&set, "fpa", sizes, 3);
    uint64_t base = fingerprint_of(set.pattern, 2, 8, 1, 0);
    int ok = fingerprint_of(set.pattern, 2, 8, 1, 0) == base && fingerprint_of(set.pattern, 4, 4, 2, 1) == base;
    test_check(ok, "fingerprint: the same data give the same fingerprint, whatever B, T, ranks or shuffle");

    // one token of the last shard changed
    set.tokens[2][200] = (uint16_t)((set.tokens[2][200] + 1) % VOCAB);
    write_raw_shard(set.paths[2], set.tokens[2], sizes[2], SHARD_MAGIC, SHARD_VERSION, sizes[2]);
    uint64_t changed = fingerprint_of(set.pattern, 2, 8, 1, 0);
    char detail[128];
    snprintf(detail, sizeof(detail), "%016llx vs %016llx", (unsigned long long)base, (unsigned long long)changed);
    test_checkf(changed != base, "fingerprint: one changed token changes it", "%s", detail);
    set.tokens[2][200] = (uint16_t)((set.tokens[2][200] + VOCAB - 1) % VOCAB);
    write_raw_shard(set.paths[2], set.tokens[2], sizes[2], SHARD_MAGIC, SHARD_VERSION, sizes[2]);
    test_check(fingerprint_of(set.pattern, 2, 8, 1, 0) == base, "fingerprint: restoring the token restores it");

    // the same tokens cut into shards differently (first two shards joined into one)
    char joined[300], pattern[300];
    snprintf(pattern, sizeof(pattern), "%s/fpb_*.bin", test_tmp_root);
    uint16_t* both = (uint16_t*)malloc_check((size_t)(sizes[0] + sizes[1]) * sizeof(uint16_t));
    memcpy(both, set.tokens[0], (size_t)sizes[0] * 2);
    memcpy(both + sizes[0], set.tokens[1], (size_t)sizes[1] * 2);
    snprintf(joined, sizeof(joined), "%s/fpb_000000.bin", test_tmp_root);
    write_raw_shard(joined, both, sizes[0] + sizes[1], SHARD_MAGIC, SHARD_VERSION, sizes[0] + sizes[1]);
    char third[300];
    snprintf(third, sizeof(third), "%s/fpb_000001.bin", test_tmp_root);
    write_raw_shard(third, set.tokens[2], sizes[2], SHARD_MAGIC, SHARD_VERSION, sizes[2]);
    test_check(fingerprint_of(pattern, 2, 8, 1, 0) != base, "fingerprint: the same tokens in other shard boundaries differ");
    remove(joined);
    remove(third);
    free(both);

    // a sparse shard (a hole the scan hashes from memory) and its dense copy: same fingerprint
    const int64_t n = 3 * 1048576 + 17;  // a hole of ~6 MiB, data at both ends
    uint16_t* dense = (uint16_t*)calloc_check((size_t)n, sizeof(uint16_t));
    for (int64_t i = 0; i < 1000; i++) dense[i] = (uint16_t)(1 + rng_int(&rng, VOCAB - 1));
    for (int64_t i = n - 3000; i < n; i++) dense[i] = (uint16_t)(1 + rng_int(&rng, VOCAB - 1));
    char sparse_path[300], dense_path[300];
    snprintf(dense_path, sizeof(dense_path), "%s/dense_000000.bin", test_tmp_root);
    write_raw_shard(dense_path, dense, n, SHARD_MAGIC, SHARD_VERSION, n);
    snprintf(sparse_path, sizeof(sparse_path), "%s/sparse_000000.bin", test_tmp_root);
    write_raw_shard(sparse_path, dense, 1000, SHARD_MAGIC, SHARD_VERSION, n);
    FILE* fp = fopen_check(sparse_path, "r+b");
    fseek_check(fp, SHARD_HEADER_BYTES + (n - 3000) * 2, SEEK_SET, sparse_path);
    fwrite_check(dense + n - 3000, sizeof(uint16_t), 3000, fp, sparse_path);
    fclose_check(fp, sparse_path);
    struct stat st;
    stat(sparse_path, &st);
    uint64_t fp_dense = fingerprint_of(dense_path, 4, 64, 1, 0), fp_sparse = fingerprint_of(sparse_path, 4, 64, 1, 0);
    snprintf(detail, sizeof(detail), "sparse file uses %lld of %lld bytes", (long long)st.st_blocks * 512,
             (long long)st.st_size);
    test_checkf(fp_dense == fp_sparse, "fingerprint: a sparse shard and its dense copy agree (holes read as zeros)", "%s",
                detail);
    // an out-of-vocabulary token after the hole is still found
    dense[n - 5] = 65535;
    fp = fopen_check(sparse_path, "r+b");
    fseek_check(fp, SHARD_HEADER_BYTES + (n - 5) * 2, SEEK_SET, sparse_path);
    fwrite_check(&dense[n - 5], sizeof(uint16_t), 1, fp, sparse_path);
    fclose_check(fp, sparse_path);
    BadCase c = {.pattern = sparse_path, .B = 4, .T = 64, .P = 1};
    snprintf(detail, sizeof(detail), "token %lld (byte offset", (long long)(n - 5));
    expect_failure("bad input: out-of-vocab token after a hole of a sparse shard, found at init", &c, detail, "is 65535");
    remove(dense_path);
    remove(sparse_path);
    free(dense);
    free_shard_set(&set);
}

static void test_validation_at_init(void) {
    // an out-of-vocabulary token as the very last token of the last of three shards: init finds
    // it, before any batch is read
    const int64_t sizes[3] = {401, 402, 403};
    ShardSet set;
    make_shard_set(&set, "late", sizes, 3);
    set.tokens[2][402] = VOCAB + 7;
    write_raw_shard(set.paths[2], set.tokens[2], sizes[2], SHARD_MAGIC, SHARD_VERSION, sizes[2]);
    BadCase c = {.pattern = set.pattern, .B = 2, .T = 8, .P = 1};
    expect_failure("bad input: out-of-vocab token at the end of a late shard is found at init", &c,
                   "token 402 (byte offset 1828) is 50264", set.paths[2]);
    free_shard_set(&set);

    // a FIFO matching the glob: refused at once (no reader blocks on it), named
    const int64_t one[1] = {300};
    ShardSet good;
    make_shard_set(&good, "fifo", one, 1);
    char fifo[300];
    snprintf(fifo, sizeof(fifo), "%s/fifo_000001.bin", test_tmp_root);
    if (mkfifo(fifo, 0644) != 0) {
        test_check_why(0, "bad input: mkfifo", strerror(errno));
    } else {
        c.pattern = good.pattern;
        expect_failure("bad input: a FIFO as a shard is refused without hanging", &c, "is a FIFO", fifo);
        remove(fifo);
    }
    // a directory matching the glob
    char sub[300];
    snprintf(sub, sizeof(sub), "%s/fifo_000002.bin", test_tmp_root);
    mkdir(sub, 0755);
    c.pattern = good.pattern;
    expect_failure("bad input: a directory as a shard is refused", &c, "is a directory", sub);
    rmdir(sub);
    free_shard_set(&good);
}

// ----------------------------------------------------------------------------
// committed data

static void test_tokenizer(void) {
    Tokenizer tok;
    tokenizer_init(&tok, "data/gpt2_tokenizer.bin");
    int ok = tok.init_ok && tok.vocab_size == 50257 && tok.eot_token == 50256;
    const char* hello = tokenizer_decode(&tok, 31373);
    const char* world = tokenizer_decode(&tok, 995);
    ok = ok && hello && world && strcmp(hello, "hello") == 0 && strcmp(world, " world") == 0;
    ok = ok && tokenizer_decode(&tok, 50256) && strcmp(tokenizer_decode(&tok, 50256), "<|endoftext|>") == 0;
    ok = ok && tokenizer_decode(&tok, 50257) == NULL;
    test_check(ok, "tokenizer: data/gpt2_tokenizer.bin loads, decodes 31373 'hello', 995 ' world', 50256 <|endoftext|>");
    tokenizer_free(&tok);

    // missing file: a note, no exit, token ids printed instead
    char path[300];
    snprintf(path, sizeof(path), "%s/no_tokenizer.bin", test_tmp_root);
    fflush(stderr);
    int saved_stderr = dup(STDERR_FILENO); // silence the expected note
    int devnull = open("/dev/null", O_WRONLY);
    dup2(devnull, STDERR_FILENO);
    tokenizer_init(&tok, path);
    fflush(stderr);
    dup2(saved_stderr, STDERR_FILENO);
    close(saved_stderr);
    close(devnull);
    ok = !tok.init_ok && tokenizer_decode(&tok, 31373) == NULL;
    test_check(ok, "tokenizer: a missing file is not fatal (init_ok 0, decode gives NULL)");
    tokenizer_free(&tok);
}

static void test_tinyshakespeare(void) {
    const char* val = "data/tinyshakespeare/tiny_shakespeare_val.bin";
    const char* train = "data/tinyshakespeare/tiny_shakespeare_train.bin";
    char why[300] = "";
    int ok = 1;
    FILE* fp = fopen(val, "rb");
    if (fp == NULL) {
        snprintf(why, sizeof(why), "%s missing (python dev/data/prepro.py tinyshakespeare)", val);
        ok = 0;
    } else {
        fclose(fp);
    }
    if (ok) {
        DataLoader loader;
        dataloader_init(&loader, val, 4, 64, 0, 1, 0, 0, VOCAB);
        Tokenizer tok;
        tokenizer_init(&tok, "data/gpt2_tokenizer.bin");
        dataloader_next_batch(&loader);
        char text[2048] = "";
        for (int i = 1; i < 40 && tok.init_ok; i++) {
            const char* piece = tokenizer_decode(&tok, (uint32_t)loader.inputs[i]);
            if (piece) { strncat(text, piece, sizeof(text) - strlen(text) - 1); }
        }
        const char* expect = "First Citizen:\nBefore we proceed any further, hear me speak.";
        ok = loader.shard_tokens[0] == 32768 && loader.inputs[0] == 50256 && tok.init_ok &&
             strncmp(text, expect, strlen(expect)) == 0;
        if (!ok) { snprintf(why, sizeof(why), "val starts with token %d, text \"%.60s\"", loader.inputs[0], text); }
        tokenizer_free(&tok);
        dataloader_free(&loader);
        if (ok) {
            dataloader_init(&loader, train, 8, 1024, 0, 1, 1, 1, VOCAB); // every token checked < vocab
            int64_t n = dataloader_num_batches(&loader);
            for (int64_t k = 0; k < n; k++) { dataloader_next_batch(&loader); }
            ok = loader.shard_tokens[0] == 305260 && n == 305259 / 8192;
            if (!ok) { snprintf(why, sizeof(why), "train shard has %lld tokens", (long long)loader.shard_tokens[0]); }
            dataloader_free(&loader);
        }
    }
    test_check_why(ok, "committed tinyshakespeare shards load; val decodes to \"First Citizen:...\"", why);
}

// ----------------------------------------------------------------------------

// Each test group runs in a forked child (test_run_child), so a loader that exits or crashes on a
// bug gives a FAIL line named after the group and the remaining groups still run. The child's
// check lines are printed here and counted into the harness's totals (its counters die with it).

static ShardSet main_set, even_set, one_set;

typedef struct {
    const char* name;  // a prefix of the group's check names: the FAIL line when the child dies
    void (*run)(void);
} TestGroup;

// a group forks children of its own (bad input), each stopped by the harness's 10 s alarm: the
// group's limit must be longer, so a hanging case gives its own FAIL line, not the group's
static void child_group(void* arg) {
    alarm(120);
    ((const TestGroup*)arg)->run();
}

static void run_isolated(const TestGroup* g) {
    static char out[1 << 16];
    int code = test_run_child(child_group, (void*)g, out, sizeof(out));
    fputs(out, stdout);
    for (const char* line = out; *line != '\0';) {
        if (strncmp(line, "PASS ", 5) == 0 || strncmp(line, "PASS\n", 5) == 0) test_num_passed++;
        if (strncmp(line, "FAIL ", 5) == 0 || strncmp(line, "FAIL\n", 5) == 0) test_num_failed++;
        const char* next = strchr(line, '\n');
        line = next != NULL ? next + 1 : line + strlen(line);
    }
    if (code != 999) {
        test_checkf(0, g->name, "test process %s %d", code > 1000 ? "killed by signal" : "exited with",
                    code > 1000 ? code - 1000 : code);
    } else if (strlen(out) + 1 >= sizeof(out)) {
        test_check(0, g->name);  // output truncated: some check lines went uncounted
    }
}

static void group_headers(void) { test_headers(&main_set); }
static void group_sequential(void) { test_sequential_stream(&main_set); }
static void group_rank_split_3(void) {
    test_rank_split(&even_set, 3, 0, "rank split: 3 ranks disjoint, together exactly the windows of 1 rank");
}
static void group_rank_split_2(void) {
    test_rank_split(&main_set, 2, 0, "rank split: 2 ranks disjoint, W mod 2 tail windows skipped");
}
static void group_rank_split_shuffle(void) {
    test_rank_split(&main_set, 3, 1, "rank split with shuffle: 3 ranks disjoint, W mod 3 per shard skipped");
}
static void group_shuffle(void) { test_shuffle(&main_set); }
static void group_shuffle_one_shard(void) { test_shuffle_single_shard(&one_set); }
static void group_restore(void) {
    test_state_restore(&main_set, 0, "state save/restore (2 ranks, no shuffle): identical continuation");
}
static void group_restore_shuffle(void) {
    test_state_restore(&main_set, 1, "state save/restore (2 ranks, shuffle): identical continuation");
}
static void group_restore_other_count(void) { test_state_restore_other_process_count(&main_set); }
static void group_reset_eval(void) { test_reset_eval(&main_set); }

int main(void) {
    test_begin("test_dataloader");
    test_tmp_begin("test_dataloader");
    rng = rng_seeded(0x2545F4914F6CDD1DULL);

    make_shard_set(&main_set, "main", MAIN_SIZES, 3);
    // window counts 15, 9, 24: all multiples of 3, so 3 ranks cover exactly what 1 rank reads
    const int64_t even_sizes[3] = {15 * 15 + 1 + 3, 15 * 9 + 1, 15 * 24 + 1 + 14};
    make_shard_set(&even_set, "even", even_sizes, 3);
    const int64_t one_size[1] = {15 * 40 + 1 + 5}; // 40 windows
    make_shard_set(&one_set, "one", one_size, 1);

    const TestGroup groups[] = {
        {"headers parsed", group_headers},
        {"sequential streaming", group_sequential},
        {"rank split 3 ranks", group_rank_split_3},
        {"rank split 2 ranks", group_rank_split_2},
        {"rank split with shuffle", group_rank_split_shuffle},
        {"shuffle", group_shuffle},
        {"shuffle, one shard", group_shuffle_one_shard},
        {"state save/restore, no shuffle", group_restore},
        {"state save/restore, shuffle", group_restore_shuffle},
        {"state restore 2 -> 3 ranks", group_restore_other_count},
        {"reset + num_batches", group_reset_eval},
        {"64-bit offsets", test_large_sparse_shard},
        {"bad inputs", test_bad_inputs},
        {"validation at init", test_validation_at_init},
        {"fingerprint", test_fingerprint},
        {"tokenizer", test_tokenizer},
        {"committed tinyshakespeare", test_tinyshakespeare},
    };
    for (size_t i = 0; i < sizeof(groups) / sizeof(groups[0]); i++) run_isolated(&groups[i]);

    free_shard_set(&main_set);
    free_shard_set(&even_set);
    free_shard_set(&one_set);
    test_tmp_end();  // whatever a failed group left behind (e.g. the 4 GiB sparse shard) goes too
    return test_end();
}
