/*
 * logger.h - what a training run reports: one console line per step and a machine-readable JSONL
 * log, written by process rank 0 only (every call is a no-op on other ranks). Functions take
 * plain numbers, so the CPU and the CUDA trainer share them. Plain C (gcc and nvcc).
 *
 * JSONL records (one per line, flushed as written; NaN/Inf are written as null):
 *   {"type":"train","step":S,"tokens":N,"loss":x,"lr":x,"norm":x,"ms":x,"tok_s":x,"mfu":x,
 *    "expert_usage":[...],"expert_kl":[...](,"expert_kind_share":[[f,z,c,k],...])}
 *       S = updates completed including this one (1-based, as the console's "step S/total"),
 *       tokens = training tokens consumed so far (all processes), mfu a fraction (null if unknown),
 *       expert_usage[l] = share of the N experts that at least one token chose in OmniMoE layer l
 *       this step, expert_kl[l] = KL(load || uniform) in nats (0 = perfectly balanced); both
 *       arrays are empty for models without OmniMoE layers. moe layers (docs/design.md §10) log
 *       usage and KL over their FFN experts, and expert_kind_share[l] = the shares of the step's
 *       (token, slot) pairs routed to FFN, zero, copy and constant experts (only for moe).
 *   {"type":"eval","step":S,"tokens":N,"val_loss":x}
 *       S = updates completed when the validation loss was measured (0 = before training).
 *   {"type":"mc_eval","step":S,"tokens":N,"accuracy":x,"correct":c,"examples":n}
 *       the multiple-choice eval (--mc-eval, llmc/mc_eval.h) at step S: c of the n examples
 *       right, accuracy = c / n.
 *
 * Resume: logger_init(..., resume_step = S) keeps the records of the interrupted run up to the
 * checkpoint (train records with step <= S, eval and mc_eval records with step < S: the resumed
 * run evaluates step S again) and appends after them; resume_step < 0 starts a new log.
 *
 * Write errors (a full disk, a closed pipe): every record's writes and its flush are checked.
 * The first failure prints one message naming the file and the reason, closes the file and sets
 * lg->failed; later records go to the console only. The caller (llmc/train_loop.h) then saves a
 * checkpoint and ends the run with a non-zero exit: the log calls themselves never exit.
 */
#ifndef OMNIMOE_LOGGER_H
#define OMNIMOE_LOGGER_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <errno.h>
#include <sys/stat.h>

typedef struct {
    int active;        // 1 on rank 0
    FILE* fp;          // the JSONL file, NULL when there is none (or after a write error)
    int failed;        // a write or flush of the file failed (the message is printed)
    char path[1100];
} Logger;

// after a record's writes: checks them and the flush; the first failure is reported once
static inline void logger_check_write_(Logger* lg) {
    if (lg->fp == NULL) return;
    int failed = ferror(lg->fp);
    int err = errno;
    if (fflush(lg->fp) != 0) {
        failed = 1;
        err = errno;
    }
    if (!failed) return;
    fprintf(stderr, "Error: cannot write the log file \"%s\": %s\n", lg->path, strerror(err));
    fclose(lg->fp);  // its error, if any, is the same one
    lg->fp = NULL;
    lg->failed = 1;
}

// share of experts used and KL(load || uniform) of one layer from its per-expert counts
// (number of (token, slot) pairs routed to each expert); both 0 when nothing was routed
static inline void expert_load_stats(const int* counts, int num_experts, float* usage, float* kl) {
    long long total = 0;
    int used = 0;
    for (int e = 0; e < num_experts; e++) {
        total += counts[e];
        used += counts[e] > 0;
    }
    double sum = 0.0;
    if (total > 0) {
        for (int e = 0; e < num_experts; e++) {
            if (counts[e] <= 0) continue;
            double p = (double)counts[e] / (double)total;
            sum += p * log(p * (double)num_experts);
        }
    }
    *usage = num_experts > 0 ? (float)used / (float)num_experts : 0.0f;
    *kl = (float)sum;
}

// model FLOPs utilisation: training costs 3x the forward FLOPs (forward + 2x backward);
// returns -1 (unknown) when the peak is not known
static inline double logger_mfu(double flops_per_token_fwd, double tokens_per_s, double peak_flops_per_s) {
    if (peak_flops_per_s <= 0.0) return -1.0;
    return 3.0 * flops_per_token_fwd * tokens_per_s / peak_flops_per_s;
}

static inline void logger_json_number_(FILE* fp, double x, const char* format) {
    if (isfinite(x)) fprintf(fp, format, x);
    else fputs("null", fp);
}

// the value of "key":<int> in a JSON line, or 0 when absent
static inline int logger_line_field_(const char* line, const char* key, long long* out) {
    const char* p = strstr(line, key);
    if (p == NULL) return 0;
    p += strlen(key);
    char* end = NULL;
    long long v = strtoll(p, &end, 10);
    if (end == p) return 0;
    *out = v;
    return 1;
}

// keeps the complete records at or before the resume point (see the top of the file); 0, or -1
// after a message
static inline int logger_truncate_for_resume_(const char* path, int resume_step) {
    struct stat st;
    if (stat(path, &st) != 0) return 0;   // no old log: nothing to keep
    if (!S_ISREG(st.st_mode)) return 0;   // a device or pipe (/dev/null, /dev/full): appended to as it is
    FILE* in = fopen(path, "rb");
    if (in == NULL) return 0;
    char tmp_path[1200];
    snprintf(tmp_path, sizeof(tmp_path), "%s.tmp", path);
    FILE* out = fopen(tmp_path, "wb");
    if (out == NULL) {
        fprintf(stderr, "Error: cannot write \"%s\" while trimming the log for resume: %s\n", tmp_path, strerror(errno));
        fclose(in);
        return -1;
    }
    size_t cap = 4096, len = 0;
    char* line = (char*)malloc(cap);
    int c;
    while (line != NULL && (c = fgetc(in)) != EOF) {
        if (len + 2 > cap) {
            cap *= 2;
            char* bigger = (char*)realloc(line, cap);
            if (bigger == NULL) { free(line); line = NULL; break; }
            line = bigger;
        }
        line[len++] = (char)c;
        if (c != '\n') continue;
        line[len] = '\0';
        long long step;
        int keep = 1;
        if (logger_line_field_(line, "\"step\":", &step)) {
            if (strstr(line, "\"type\":\"eval\"") || strstr(line, "\"type\":\"mc_eval\"")) keep = step < resume_step;
            else keep = step <= resume_step;
        }
        if (keep) fwrite(line, 1, len, out);
        len = 0;
    }
    // a last line without '\n' was cut by the crash: dropped
    int failed = line == NULL || ferror(in) || ferror(out);
    free(line);
    fclose(in);
    if (fclose(out) != 0 || failed || rename(tmp_path, path) != 0) {
        fprintf(stderr, "Error: could not trim the log \"%s\" for resume: %s\n", path, strerror(errno));
        return -1;
    }
    return 0;
}

// path NULL or "" = console only. resume_step >= 0: keep the old log up to that step and append.
// Returns 0, or -1 after a message when the log cannot be opened or trimmed (no exit: the caller
// lets every rank stop together).
static inline int logger_init(Logger* lg, const char* path, int process_rank, int resume_step) {
    memset(lg, 0, sizeof(*lg));
    lg->active = process_rank == 0;
    if (!lg->active || path == NULL || path[0] == '\0') return 0;
    if (strlen(path) >= sizeof(lg->path)) {
        fprintf(stderr, "Error: log file path \"%s\" is too long\n", path);
        return -1;
    }
    strcpy(lg->path, path);
    if (resume_step >= 0 && logger_truncate_for_resume_(path, resume_step) != 0) return -1;
    lg->fp = fopen(path, resume_step >= 0 ? "ab" : "wb");
    if (lg->fp == NULL) {
        fprintf(stderr, "Error: cannot open the log file \"%s\" for writing: %s\n", path, strerror(errno));
        return -1;
    }
    return 0;
}

// One optimiser step. step = updates completed (1-based), mfu a fraction (< 0: unknown),
// expert_usage / expert_kl: num_omni_layers values each (may be NULL when 0 layers); kind_share:
// 4 per layer (FFN, zero, copy, constant shares of a moe layer), NULL for other kinds.
static inline void logger_log_train(Logger* lg, int step, int num_steps, long long tokens, float loss, float norm,
                                    float lr, double ms, double tokens_per_s, double mfu, int num_omni_layers,
                                    const float* expert_usage, const float* expert_kl, const float* kind_share) {
    if (!lg->active) return;
    printf("step %5d/%d | loss %.6f | norm %.4f | lr %.3e | %.2f ms | %.0f tok/s", step, num_steps, loss, norm, lr, ms,
           tokens_per_s);
    if (mfu >= 0.0) printf(" | MFU %.1f%%", 100.0 * mfu);
    if (num_omni_layers > 0) {
        double usage = 0.0, kl = 0.0;
        for (int l = 0; l < num_omni_layers; l++) {
            usage += expert_usage[l];
            kl += expert_kl[l];
        }
        printf(" | experts %.1f%% KL %.3f", 100.0 * usage / num_omni_layers, kl / num_omni_layers);
    }
    if (num_omni_layers > 0 && kind_share != NULL) {  // the layers' mean, per kind
        double mean[4] = {0.0, 0.0, 0.0, 0.0};
        for (int l = 0; l < num_omni_layers; l++) {
            for (int j = 0; j < 4; j++) mean[j] += kind_share[4 * l + j] / num_omni_layers;
        }
        printf(" | ffn/zero/copy/const %.1f/%.1f/%.1f/%.1f%%", 100.0 * mean[0], 100.0 * mean[1], 100.0 * mean[2],
               100.0 * mean[3]);
    }
    printf("\n");
    fflush(stdout);
    if (lg->fp == NULL) return;
    FILE* fp = lg->fp;
    fprintf(fp, "{\"type\":\"train\",\"step\":%d,\"tokens\":%lld,\"loss\":", step, tokens);
    logger_json_number_(fp, loss, "%.9g");
    fputs(",\"lr\":", fp);
    logger_json_number_(fp, lr, "%.9g");
    fputs(",\"norm\":", fp);
    logger_json_number_(fp, norm, "%.9g");
    fputs(",\"ms\":", fp);
    logger_json_number_(fp, ms, "%.4f");
    fputs(",\"tok_s\":", fp);
    logger_json_number_(fp, tokens_per_s, "%.2f");
    fputs(",\"mfu\":", fp);
    logger_json_number_(fp, mfu >= 0.0 ? mfu : NAN, "%.6f");
    fputs(",\"expert_usage\":[", fp);
    for (int l = 0; l < num_omni_layers; l++) {
        if (l) fputc(',', fp);
        logger_json_number_(fp, expert_usage[l], "%.6f");
    }
    fputs("],\"expert_kl\":[", fp);
    for (int l = 0; l < num_omni_layers; l++) {
        if (l) fputc(',', fp);
        logger_json_number_(fp, expert_kl[l], "%.6f");
    }
    fputc(']', fp);
    if (kind_share != NULL) {
        fputs(",\"expert_kind_share\":[", fp);
        for (int l = 0; l < num_omni_layers; l++) {
            fputs(l ? ",[" : "[", fp);
            for (int j = 0; j < 4; j++) {
                if (j) fputc(',', fp);
                logger_json_number_(fp, kind_share[4 * l + j], "%.6f");
            }
            fputc(']', fp);
        }
        fputc(']', fp);
    }
    fputs("}\n", fp);
    logger_check_write_(lg);
}

// one evaluation: step = updates completed when measured
static inline void logger_log_eval(Logger* lg, int step, long long tokens, float val_loss) {
    if (!lg->active) return;
    printf("val loss %.6f (step %d)\n", val_loss, step);
    fflush(stdout);
    if (lg->fp == NULL) return;
    fprintf(lg->fp, "{\"type\":\"eval\",\"step\":%d,\"tokens\":%lld,\"val_loss\":", step, tokens);
    logger_json_number_(lg->fp, val_loss, "%.9g");
    fputs("}\n", lg->fp);
    logger_check_write_(lg);
}

// one multiple-choice eval: `correct` of `examples` right at step (updates completed)
static inline void logger_log_mc_eval(Logger* lg, int step, long long tokens, long long correct, long long examples) {
    if (!lg->active) return;
    double accuracy = examples > 0 ? (double)correct / (double)examples : NAN;
    printf("mc acc %.4f (%lld) (step %d)\n", accuracy, examples, step);
    fflush(stdout);
    if (lg->fp == NULL) return;
    fprintf(lg->fp, "{\"type\":\"mc_eval\",\"step\":%d,\"tokens\":%lld,\"accuracy\":", step, tokens);
    logger_json_number_(lg->fp, accuracy, "%.9g");
    fprintf(lg->fp, ",\"correct\":%lld,\"examples\":%lld}\n", correct, examples);
    logger_check_write_(lg);
}

// returns 0 when every record reached the file (or there is none), else -1 (reported)
static inline int logger_close(Logger* lg) {
    if (lg->fp != NULL && fclose(lg->fp) != 0 && !lg->failed) {
        fprintf(stderr, "Error: cannot write the log file \"%s\": %s\n", lg->path, strerror(errno));
        lg->failed = 1;
    }
    lg->fp = NULL;
    return lg->failed ? -1 : 0;
}

#endif // OMNIMOE_LOGGER_H
