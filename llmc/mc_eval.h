/*
 * llmc/mc_eval.h: multiple-choice evaluation (HellaSwag-style) from llm.c's eval file format:
 * the loader, the packing of one example into model rows and the scoring of its completions.
 *
 * File format (docs/design.md §5.7; the layout llm.c's dev/data/hellaswag.py writes and its
 * EvalLoader reads). A header of 256 int32: [0] magic 20240522, [1] version 1, [2] the number of
 * examples E, [3] the size in bytes of the longest example; the rest are zero. Then E examples
 * back to back, each a run of uint16 values:
 *     65535                 the example delimiter (no token can take this value)
 *     nbytes                the size of this example in bytes, these 6 header values included
 *     index                 the example's position in the file (0, 1, 2, ...)
 *     label                 the index of the right completion
 *     K                     the number of completions (4: the loader requires it, as llm.c does)
 *     n_ctx, n_ctx tokens   the shared context
 *     K times: n, n tokens  each completion (GPT-2 tokens of " " + the ending)
 * so nbytes = 2 * (6 + n_ctx + sum over completions of (1 + n)).
 *
 * Validation at mc_eval_open, over the whole file (it is read into memory: HellaSwag's 10042
 * validation examples take 3.6 MB): a regular file; the header's magic, version, 1 <= E <= 65535
 * and longest-example size; per example the delimiter, the index, nbytes against the counts and
 * against what is left of the file, K == 4, label < K, n_ctx >= 1, every n >= 1, every token
 * < vocab_size, n_ctx + n <= T for every completion; no bytes after the last example. A bad file
 * prints one message naming the file, the example and what was expected, then exit(EXIT_FAILURE).
 *
 * Packing (mc_eval_pack), as llm.c: completion c fills row c of (4, T) inputs/targets/mask (all
 * overwritten). inputs = context then completion (n_ctx + n tokens); targets[t] = inputs[t+1];
 * mask[t] = 1 exactly where the target is a completion token (t = n_ctx-1 ... n_ctx+n-2), so the
 * last context token predicts the first completion token. Positions past the sequence hold token
 * 0 in inputs and targets (their losses are masked out; a causal model's earlier positions never
 * see them).
 *
 * Scoring (mc_eval_predict), as llm.c's acc_norm: per row the mean of the per-token losses where
 * mask = 1 (summed in double over t = 0..T-1 in order: deterministic); the prediction is the row of
 * smallest mean, the smaller index on ties (llm.c's strict "<"). A row without a masked position,
 * or with a NaN mean, scores +inf. The example is correct when the prediction equals the label.
 *
 * Ranks: with P processes rank r owns the examples i with i % P == r (mc_eval_rank_count of them,
 * the j-th being r + j*P); summing correct and counted examples over ranks gives the whole file.
 * (llm.c deals contiguous blocks instead; the sum is the same.)
 *
 * Not thread-safe to open; the opened MCEval is read-only afterwards.
 */
#ifndef LLMC_MC_EVAL_H
#define LLMC_MC_EVAL_H

#include "utils.h"
#include <stdarg.h>
#include <math.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/stat.h>

#define MC_EVAL_HEADER_INTS 256
#define MC_EVAL_HEADER_BYTES (MC_EVAL_HEADER_INTS * (int64_t)sizeof(int32_t))
#define MC_EVAL_MAGIC 20240522
#define MC_EVAL_VERSION 1
#define MC_EVAL_DELIMITER 65535
#define MC_EVAL_NUM_COMPLETIONS 4
#define MC_EVAL_MAX_EXAMPLES 65535  // the index is a uint16 (llm.c's writer refuses more)

typedef struct {
    char path[1024];
    int num_examples;
    int T, vocab_size;        // what the file was validated against
    int longest_example_bytes;
    uint16_t* stream;         // every example, as read (the uint16 values after the header)
    int64_t* offset;          // offset[i]: where example i starts in stream (at its delimiter)
} MCEval;

// One example, pointing into the loader's stream (valid until mc_eval_close).
typedef struct {
    int label;
    int num_completions;
    int context_len;
    const uint16_t* context;
    int completion_len[MC_EVAL_NUM_COMPLETIONS];
    const uint16_t* completion[MC_EVAL_NUM_COMPLETIONS];
} MCExample;

#if defined(__GNUC__)
__attribute__((format(printf, 3, 4), noreturn))
#endif
static void mc_eval_fail_(const char* path, int example, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    if (example >= 0) fprintf(stderr, "Error: mc_eval: eval file '%s' example %d: ", path, example);
    else fprintf(stderr, "Error: mc_eval: eval file '%s': ", path);
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(EXIT_FAILURE);
}

// Reads the whole file; refuses anything but a regular file without blocking on a FIFO.
static inline unsigned char* mc_eval_read_file_(const char* path, int64_t* size) {
    int fd = open(path, O_RDONLY | O_NONBLOCK);
    if (fd < 0) mc_eval_fail_(path, -1, "cannot open: %s", strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) mc_eval_fail_(path, -1, "cannot stat: %s", strerror(errno));
    if (!S_ISREG(st.st_mode)) {
        mc_eval_fail_(path, -1, "is %s, expected a regular file",
                      S_ISDIR(st.st_mode) ? "a directory" : S_ISFIFO(st.st_mode) ? "a FIFO (named pipe)"
                                                                                : "not a regular file");
    }
    int64_t n = (int64_t)st.st_size;
    // E <= 65535 examples of at most 65535 bytes each: anything bigger is not an eval file
    if (n > MC_EVAL_HEADER_BYTES + (int64_t)MC_EVAL_MAX_EXAMPLES * 65535) {
        mc_eval_fail_(path, -1, "is %lld bytes, larger than any eval file (at most 65535 examples of < 64 KiB)",
                      (long long)n);
    }
    unsigned char* buf = (unsigned char*)malloc_check((size_t)(n > 0 ? n : 1));
    int64_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, buf + got, (size_t)(n - got));
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) mc_eval_fail_(path, -1, "read failed after %lld of %lld bytes", (long long)got, (long long)n);
        got += r;
    }
    close(fd);
    *size = n;
    return buf;
}

// Opens and validates the whole file for a model of sequence length T and vocabulary vocab_size
// (the true vocabulary, not the padded one). Exits with a message on any bad input.
static inline void mc_eval_open(MCEval* ev, const char* path, int T, int vocab_size) {
    memset(ev, 0, sizeof(*ev));
    if (T < 2 || vocab_size < 1 || vocab_size > 65535) {
        fprintf(stderr, "Error: mc_eval: invalid arguments T=%d vocab_size=%d for '%s' (need T >= 2, "
                "1 <= vocab_size <= 65535)\n", T, vocab_size, path);
        exit(EXIT_FAILURE);
    }
    snprintf(ev->path, sizeof(ev->path), "%s", path);
    ev->T = T;
    ev->vocab_size = vocab_size;
    int64_t size;
    unsigned char* buf = mc_eval_read_file_(path, &size);
    if (size < MC_EVAL_HEADER_BYTES) {
        mc_eval_fail_(path, -1, "is %lld bytes, smaller than the %lld-byte header", (long long)size,
                      (long long)MC_EVAL_HEADER_BYTES);
    }
    int32_t header[MC_EVAL_HEADER_INTS];
    memcpy(header, buf, sizeof(header));
    if (header[0] != MC_EVAL_MAGIC) {
        mc_eval_fail_(path, -1, "bad magic number %d, expected %d (llm.c multiple-choice eval file%s)", header[0],
                      MC_EVAL_MAGIC, header[0] == 20240520 ? "; this is a token shard" : "");
    }
    if (header[1] != MC_EVAL_VERSION) {
        mc_eval_fail_(path, -1, "unsupported version %d, expected %d", header[1], MC_EVAL_VERSION);
    }
    int E = header[2];
    if (E < 1 || E > MC_EVAL_MAX_EXAMPLES) {
        mc_eval_fail_(path, -1, "header says %d examples, expected 1 to %d", E, MC_EVAL_MAX_EXAMPLES);
    }
    int64_t n_values = (size - MC_EVAL_HEADER_BYTES) / 2;
    if ((size - MC_EVAL_HEADER_BYTES) % 2 != 0) {
        mc_eval_fail_(path, -1, "is %lld bytes: the examples after the header are not a whole number of uint16 "
                      "values", (long long)size);
    }
    ev->stream = (uint16_t*)malloc_check((size_t)(n_values > 0 ? n_values : 1) * sizeof(uint16_t));
    memcpy(ev->stream, buf + MC_EVAL_HEADER_BYTES, (size_t)n_values * sizeof(uint16_t));
    free(buf);
    ev->offset = (int64_t*)malloc_check((size_t)E * sizeof(int64_t));
    const uint16_t* s = ev->stream;
    int64_t pos = 0;
    int longest = 0;
    for (int i = 0; i < E; i++) {
        ev->offset[i] = pos;
        int64_t left = n_values - pos;  // uint16 values left in the file
        if (left < 6) {
            mc_eval_fail_(path, i, "the file ends %lld bytes into the example, expected its 12-byte header "
                          "(truncated, or the header's %d examples is wrong)", (long long)(2 * left), E);
        }
        if (s[pos] != MC_EVAL_DELIMITER) {
            mc_eval_fail_(path, i, "starts with %d, expected the delimiter %d (byte offset %lld)", s[pos],
                          MC_EVAL_DELIMITER, (long long)(MC_EVAL_HEADER_BYTES + 2 * pos));
        }
        int nbytes = s[pos + 1], index = s[pos + 2], label = s[pos + 3], K = s[pos + 4];
        if (index != i) mc_eval_fail_(path, i, "has index %d, expected %d (examples in order)", index, i);
        if (nbytes % 2 != 0 || nbytes < 12) {
            mc_eval_fail_(path, i, "says it is %d bytes, expected an even size of at least 12", nbytes);
        }
        if (nbytes / 2 > left) {
            mc_eval_fail_(path, i, "says it is %d bytes but only %lld are left in the file (truncated)", nbytes,
                          (long long)(2 * left));
        }
        if (K != MC_EVAL_NUM_COMPLETIONS) {
            mc_eval_fail_(path, i, "has %d completions, expected %d", K, MC_EVAL_NUM_COMPLETIONS);
        }
        if (label >= K) mc_eval_fail_(path, i, "has label %d, expected 0 to %d", label, K - 1);
        // walk the context and the completions inside the example's nbytes
        int64_t end = pos + nbytes / 2;
        int64_t p = pos + 5;
        int n_ctx = s[p++];  // p < end: nbytes >= 12
        if (n_ctx < 1) mc_eval_fail_(path, i, "has an empty context, expected at least 1 token");
        if (p + n_ctx > end) {
            mc_eval_fail_(path, i, "context of %d tokens runs past the example's %d bytes", n_ctx, nbytes);
        }
        for (int t = 0; t < n_ctx; t++) {
            if (s[p + t] >= vocab_size) {
                mc_eval_fail_(path, i, "context token %d is %d, expected < vocab_size %d", t, s[p + t], vocab_size);
            }
        }
        p += n_ctx;
        for (int c = 0; c < K; c++) {
            if (p >= end) {
                mc_eval_fail_(path, i, "completion %d starts past the example's %d bytes", c, nbytes);
            }
            int n = s[p++];
            if (n < 1) mc_eval_fail_(path, i, "completion %d is empty, expected at least 1 token", c);
            if (p + n > end) {
                mc_eval_fail_(path, i, "completion %d of %d tokens runs past the example's %d bytes", c, n, nbytes);
            }
            if (n_ctx + n > T) {
                mc_eval_fail_(path, i, "context (%d tokens) + completion %d (%d tokens) = %d tokens, expected at "
                              "most T = %d", n_ctx, c, n, n_ctx + n, T);
            }
            for (int t = 0; t < n; t++) {
                if (s[p + t] >= vocab_size) {
                    mc_eval_fail_(path, i, "completion %d token %d is %d, expected < vocab_size %d", c, t, s[p + t],
                                  vocab_size);
                }
            }
            p += n;
        }
        if (p != end) {
            mc_eval_fail_(path, i, "says it is %d bytes, but its counts make %lld bytes", nbytes, (long long)(2 * (p - pos)));
        }
        if (nbytes > longest) longest = nbytes;
        pos = end;
    }
    if (pos != n_values) {
        mc_eval_fail_(path, -1, "%lld bytes follow the last of the header's %d examples, expected none",
                      (long long)(2 * (n_values - pos)), E);
    }
    if (header[3] != longest) {
        mc_eval_fail_(path, -1, "header says the longest example is %d bytes, but it is %d", header[3], longest);
    }
    ev->num_examples = E;
    ev->longest_example_bytes = longest;
}

static inline void mc_eval_close(MCEval* ev) {
    free(ev->stream);
    free(ev->offset);
    memset(ev, 0, sizeof(*ev));
}

static inline int mc_eval_num_examples(const MCEval* ev) { return ev->num_examples; }

// number of examples rank r of P owns (those with i % P == r)
static inline int mc_eval_rank_count(const MCEval* ev, int rank, int num_processes) {
    if (rank >= ev->num_examples) return 0;
    return (ev->num_examples - rank + num_processes - 1) / num_processes;
}

// the global index of rank r's j-th example, j < mc_eval_rank_count(ev, r, P)
static inline int mc_eval_rank_example(int rank, int num_processes, int j) { return rank + j * num_processes; }

// example i (0 <= i < num_examples; the file was validated at open)
static inline MCExample mc_eval_example(const MCEval* ev, int i) {
    MCExample ex;
    const uint16_t* s = ev->stream + ev->offset[i];
    ex.label = s[3];
    ex.num_completions = s[4];
    ex.context_len = s[5];
    ex.context = s + 6;
    const uint16_t* p = ex.context + ex.context_len;
    for (int c = 0; c < MC_EVAL_NUM_COMPLETIONS; c++) {
        ex.completion_len[c] = p[0];
        ex.completion[c] = p + 1;
        p += 1 + p[0];
    }
    return ex;
}

// Writes example i into rows 0..3 of inputs, targets (4, T) and mask (4, T), overwriting every
// element (the layout in the contract above). Returns the label.
static inline int mc_eval_pack(int* inputs, int* targets, unsigned char* mask, const MCEval* ev, int i) {
    int T = ev->T;
    MCExample ex = mc_eval_example(ev, i);
    for (int c = 0; c < MC_EVAL_NUM_COMPLETIONS; c++) {
        int* in = inputs + (size_t)c * T;
        int* tg = targets + (size_t)c * T;
        unsigned char* m = mask + (size_t)c * T;
        int len = ex.context_len + ex.completion_len[c];  // <= T (validated)
        for (int t = 0; t < T; t++) {
            in[t] = t < ex.context_len ? ex.context[t] : t < len ? ex.completion[c][t - ex.context_len] : 0;
        }
        for (int t = 0; t < T; t++) {
            tg[t] = t + 1 < len ? in[t + 1] : 0;
            m[t] = (unsigned char)(t >= ex.context_len - 1 && t + 1 < len);
        }
    }
    return ex.label;
}

// Scores the `rows` completions of one example from per-token losses (rows, T) and the mask
// (rows, T): mean_loss[r] (may be NULL) = mean of losses where mask = 1 (+inf for an empty row).
// Returns the predicted row: the smallest mean, the smaller index on ties.
static inline int mc_eval_predict(float* mean_loss, const float* losses, const unsigned char* mask, int rows, int T) {
    int best = 0;
    double best_mean = INFINITY;
    for (int r = 0; r < rows; r++) {
        double sum = 0.0;
        int count = 0;
        for (int t = 0; t < T; t++) {
            if (mask[(size_t)r * T + t]) {
                sum += (double)losses[(size_t)r * T + t];
                count++;
            }
        }
        double mean = count > 0 ? sum / count : INFINITY;
        if (mean_loss != NULL) mean_loss[r] = (float)mean;
        if (isnan(mean)) mean = INFINITY;  // a NaN loss never wins (it would also stop any later row winning)
        if (r == 0 || mean < best_mean) {
            best_mean = mean;
            best = r;
        }
    }
    return best;
}

// 1 when the prediction from (4, T) losses and mask is the label, else 0
static inline int mc_eval_correct(const float* losses, const unsigned char* mask, int T, int label) {
    return mc_eval_predict(NULL, losses, mask, MC_EVAL_NUM_COMPLETIONS, T) == label;
}

#endif // LLMC_MC_EVAL_H
