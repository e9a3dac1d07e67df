/*
 * checkpoint.h - model files (weights only) and training checkpoints (everything a run needs to
 * continue bitwise). Plain C (gcc -std=c11 and nvcc). All files little-endian; this code runs on
 * little-endian hosts only (checked at run time).
 *
 * ---------------------------------------------------------------------------------------------
 * Config header (docs/design.md §5), shared by model files, checkpoints and fixtures: 256 int32.
 *   [0] magic [1] version [2] max_seq_len [3] vocab_size [4] padded_vocab_size [5] num_layers
 *   [6] num_heads [7] channels [8] ffn_kind [9] ffn_hidden [10] router_n [11] num_experts
 *   [12] top_k [13] router_norm [14] gate; [60..69] the moe fields (docs/design.md §10.7: E, k,
 *   S, zero, copy, const, gate_res, norm_topk, router, input_scale; 0 for the other kinds, so
 *   files written before them read unchanged); other slots 0 unless a format below names them.
 *
 * Model file (.bin): magic 20261101, version 2. Header, then fp32 params (model_config_num_params,
 * layout of config.h), then fp32 BN running stats (model_config_num_bn_stats: per layer mean[2n]
 * then var[2n]), then the 16-byte trailer below (hash of header + params + BN stats). The file
 * size must be exactly 1024 + 4 * (params + bn stats) + 16. Version 1 (the same without the
 * trailer) is still read, with a warning that its contents cannot be verified. A model file
 * holding a NaN or Inf weight is refused (written or read).
 *
 * Training checkpoint <dir>/ckpt_<step:08d>.bin: magic 20261102, version 2 (version 1, with a
 * weaker checksum and no data fingerprint, is refused: it cannot prove it belongs to the run).
 *   header, 256 int32 (1024 bytes). Slots [2..14] = the model config as above, then:
 *     [16] B          [17] T                 [18] grad_accum_steps   [19] num_processes
 *     [20] step       [21] adam_t            [22] num_steps          [23] warmup_steps
 *     [24] lr_schedule [25] shuffle          [26] expert_exec        [27] num_bn_sets
 *     [28..29] tokens_seen   [30..31] total_batch_size   [32..33] seed          (int64 / uint64)
 *     [34] learning_rate [35] final_lr_frac [36] decay_frac [37] weight_decay [38] grad_clip
 *     [39] beta1 [40] beta2 [41] eps                                             (fp32 bit patterns)
 *     [42..43] data_fingerprint (uint64, XXH64 of the training shards, dataloader.h)
 *     [44..45] data_tokens (int64)   [46] data_shards   [47] attention (0 ours, 1 cuDNN's SDPA)
 *     [48..49] num_params P        [50..51] num_bn_stats NB (floats of one BN set)
 *     [52..53] loader_bytes LB     [54..55] rng_bytes RB      [56..57] file_bytes (whole file)
 *     [60..69] the moe model fields (above)   [70] moe_aux [71] moe_zc_weight [72] moe_bias_rate
 *     (fp32; moe models only, else 0: docs/design.md §10.7)   [74] recompute (-r: 0, 1, 2)
 *     (an int64 in slots [a..a+1] is the 8 little-endian bytes at byte offset 4a)
 *     all other slots 0.
 *   sections, packed in this order right after the header:
 *     fp32 params[P]              master weights (layout of config.h)
 *     fp32 m[P]                   AdamW first moment
 *     fp32 v[P]                   AdamW second moment
 *     fp32 bn_stats[num_bn_sets * NB]   BN running stats, one set per saved process, each laid out
 *                                 as in the model file (BN statistics are per rank, docs/design.md §2)
 *     u8   loader[LB]             data-loader state, opaque (e.g. DataLoaderState of dataloader.h,
 *                                 one per process, as the trainer chooses)
 *     u8   rng[RB]                RNG states, opaque
 *   trailer, 16 bytes (model files end with the same trailer):
 *     u64  XXH64 (seed 0) of every byte before the trailer (header + sections), little-endian
 *     u8   end_magic[8] = "OMNI-END"
 *   file_bytes = 1024 + 12P + 4*num_bn_sets*NB + LB + RB + 16.
 *
 *   XXH64 is xxHash's 64-bit hash (Debian: libxxhash-dev, used header-only here). Unlike a
 *   checksum of words it does not cancel for changes spread over several words; a random
 *   corruption passes with probability 2^-64. Nothing non-finite is ever written: the writers
 *   refuse NaN/Inf weights, optimiser state or BN statistics.
 *
 * Sharded checkpoint (a --zero 1 or --shard-experts 1 run, docs/sharding.md §4): version 3.
 * ckpt_<step>.bin is the manifest: the same header with [58] num_parts (P at write time) and
 * [59] shard_mode (bit 0 ZeRO-1, bit 1 the column-sharded expert tables), and the sections
 * without params, m and v:
 *     fp32 bn_stats, u8 loader[LB], u8 rng[RB]   as above
 *     part table, num_parts entries of 16 bytes: int64 bytes, uint64 XXH64 of part r's file
 *   then the trailer. file_bytes = 1024 + 4*num_bn_sets*NB + LB + RB + 16*num_parts + 16.
 *   The master weights, m and v are in the part files ckpt_<step>.part<r>of<P>.bin, one per
 *   rank (layout and reading, with re-sharding to any P: llmc/checkpoint_parts.h, included at
 *   the end of this file). checkpoint_verify also checks that every part exists with the size
 *   the table gives (its hash is checked when it is read); checkpoint_read assembles the logical
 *   params, m and v from the parts, so every reader of a version-2 file reads version 3 too.
 *
 * Writing is crash-safe: the file is written to ckpt_<step>.bin.tmp, flushed, fsync'ed, renamed
 * to ckpt_<step>.bin and the directory fsync'ed; an older checkpoint is never touched. Resume
 * looks only at complete names and verifies size, end magic and checksum before use.
 * ---------------------------------------------------------------------------------------------
 *
 * API (every reader exits with one clear message on error; the writers print one message naming
 * the file and the cause and return -1, leaving no .tmp and touching no older file, so that a
 * trainer of several processes can stop all of them together (llmc/train_loop.h); the checkers
 * checkpoint_verify / checkpoint_find_latest return a status):
 *   model_file_write / model_file_read / model_file_read_config
 *   CheckpointInfo, checkpoint_info_from_config, checkpoint_path, checkpoint_make_dir
 *   checkpoint_write                     one call, host buffers
 *   checkpoint_writer_open/put/close     the same file streamed in pieces (e.g. from GPU chunks)
 *   checkpoint_read_info                 header only: config, run fields, section sizes
 *   checkpoint_read                      one call into host buffers, fully verified
 *   checkpoint_reader_open/get/close     the same streamed in pieces
 *   checkpoint_verify, checkpoint_find_latest
 *   checkpoint_info_from_run, checkpoint_compare_run   the run record (llmc/run_identity.h); a
 *                                        resume with other data, order or seed is refused
 *   checkpoint_make_dir                  also removes the .tmp files of interrupted writes
 */
#ifndef OMNIMOE_CHECKPOINT_H
#define OMNIMOE_CHECKPOINT_H

#include "utils.h"  // first: it selects POSIX declarations when it is the first include
#include <stdint.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <errno.h>
#include <sys/types.h>
#include <sys/stat.h>
#include <fcntl.h>
#include <unistd.h>
#include <dirent.h>
#include "config.h"
#include "run_identity.h"
#define XXH_INLINE_ALL  // header-only: nothing to link
#include <xxhash.h>

#define OMNI_HEADER_INTS 256
#define OMNI_HEADER_BYTES 1024
#define MODEL_FILE_MAGIC 20261101
#define MODEL_FILE_VERSION 2
#define MODEL_FILE_VERSION_UNHASHED 1  // no trailer: still read, with a warning
#define CHECKPOINT_MAGIC 20261102
#define CHECKPOINT_VERSION 2
#define CHECKPOINT_VERSION_SHARDED 3   // manifest + part files (llmc/checkpoint_parts.h)
#define CHECKPOINT_PART_ENTRY_BYTES 16  // int64 bytes, uint64 hash
#define FIXTURE_FILE_MAGIC 20261103
#define CHECKPOINT_TRAILER_BYTES 16
#define CHECKPOINT_END_MAGIC "OMNI-END"
#define CHECKPOINT_DIR_MAX 1024  // as TRAIN_PATH_MAX of args.h
#define CHECKPOINT_PATH_MAX (CHECKPOINT_DIR_MAX + 64)
// the writers return a status that must not be dropped (a failed write is never silent)
#if defined(__GNUC__) || defined(__clang__)
#define CKPT_MUST_CHECK __attribute__((warn_unused_result))
#else
#define CKPT_MUST_CHECK
#endif

// ----------------------------------------------------------------------------
// small shared pieces

static inline void ckpt_require_little_endian_(void) {
    uint32_t one = 1;
    unsigned char first;
    memcpy(&first, &one, 1);
    if (first != 1) {
        fprintf(stderr, "Error: omnimoe model and checkpoint files are little-endian; this host is not\n");
        exit(EXIT_FAILURE);
    }
}

static inline int64_t ckpt_file_size_(const char* path) {
    struct stat st;
    if (stat(path, &st) != 0) return -1;
    return (int64_t)st.st_size;
}

// 1 when path is a regular file; else 0 and why says what it is instead ("is a directory", ...),
// so that a directory is not reported as a truncated file and a FIFO is never opened (it would
// block until a writer appears)
static inline int ckpt_regular_file_(const char* path, char* why, size_t why_size) {
    struct stat st;
    if (stat(path, &st) != 0) {
        snprintf(why, why_size, "cannot open: %s", strerror(errno));
        return 0;
    }
    if (S_ISREG(st.st_mode)) return 1;
    const char* what = S_ISDIR(st.st_mode) ? "is a directory" : S_ISFIFO(st.st_mode) ? "is a FIFO (named pipe)"
                     : S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode) ? "is a device" : S_ISSOCK(st.st_mode) ? "is a socket"
                     : "is not a regular file";
    snprintf(why, why_size, "%s, not a file", what);
    return 0;
}

// index of the first NaN/Inf among x[0..n), -1 when all are finite
static inline int64_t ckpt_first_nonfinite_(const float* x, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(x[i])) return (int64_t)i;
    }
    return -1;
}

// Checks the weights tensor by tensor; 1 when finite, else 0 and why names the tensor, e.g.
// "weight tensor qkvw holds NaN/Inf (element 17 of 49152 is nan)".
static inline int ckpt_params_finite_(const ModelConfig* c, const float* params, const char* what, char* why,
                                      size_t why_size) {
    size_t sizes[NUM_PARAMETER_TENSORS], offset = 0;
    model_config_param_sizes(c, sizes);
    for (int t = 0; t < NUM_PARAMETER_TENSORS; t++) {
        int64_t bad = ckpt_first_nonfinite_(params + offset, sizes[t]);
        if (bad >= 0) {
            snprintf(why, why_size, "%s tensor %s holds NaN/Inf (element %lld of %zu is %g)", what,
                     param_tensor_name(t), (long long)bad, sizes[t], (double)params[offset + (size_t)bad]);
            return 0;
        }
        offset += sizes[t];
    }
    return 1;
}

// the same for a plain array (optimiser state, BN statistics)
static inline int ckpt_floats_finite_(const float* x, size_t n, const char* what, char* why, size_t why_size) {
    int64_t bad = x != NULL ? ckpt_first_nonfinite_(x, n) : -1;
    if (bad < 0) return 1;
    snprintf(why, why_size, "%s hold NaN/Inf (element %lld of %zu is %g)", what, (long long)bad, n,
             (double)x[bad]);
    return 0;
}

static inline void ckpt_put_i64_(int32_t* header, int slot, int64_t v) { memcpy(&header[slot], &v, 8); }
static inline int64_t ckpt_get_i64_(const int32_t* header, int slot) {
    int64_t v;
    memcpy(&v, &header[slot], 8);
    return v;
}
static inline void ckpt_put_f32_(int32_t* header, int slot, float v) { memcpy(&header[slot], &v, 4); }
static inline float ckpt_get_f32_(const int32_t* header, int slot) {
    float v;
    memcpy(&v, &header[slot], 4);
    return v;
}

// the config slots [2..14] and [60..69] of docs/design.md §5.1
#define MOE_HEADER_SLOT 60
#define MOE_HEADER_SLOTS 10
#define MODEL_CONFIG_NUM_FIELDS (13 + MOE_HEADER_SLOTS)
// header slot of config field i (0..MODEL_CONFIG_NUM_FIELDS-1)
static inline int model_config_field_slot(int i) { return i < 13 ? 2 + i : MOE_HEADER_SLOT + (i - 13); }
static inline int model_config_is_slot(int slot) {
    return (slot >= 2 && slot <= 14) || (slot >= MOE_HEADER_SLOT && slot < MOE_HEADER_SLOT + MOE_HEADER_SLOTS);
}
static inline void model_config_to_header(const ModelConfig* c, int32_t* header) {
    header[2] = c->max_seq_len;
    header[3] = c->vocab_size;
    header[4] = c->padded_vocab_size;
    header[5] = c->num_layers;
    header[6] = c->num_heads;
    header[7] = c->channels;
    header[8] = c->ffn_kind;
    header[9] = c->ffn_hidden;
    header[10] = c->router_n;
    header[11] = c->num_experts;
    header[12] = c->top_k;
    header[13] = c->router_norm;
    header[14] = c->gate;
    header[MOE_HEADER_SLOT + 0] = c->moe_experts;
    header[MOE_HEADER_SLOT + 1] = c->moe_topk;
    header[MOE_HEADER_SLOT + 2] = c->moe_shared;
    header[MOE_HEADER_SLOT + 3] = c->moe_zero;
    header[MOE_HEADER_SLOT + 4] = c->moe_copy;
    header[MOE_HEADER_SLOT + 5] = c->moe_const;
    header[MOE_HEADER_SLOT + 6] = c->moe_gate_res;
    header[MOE_HEADER_SLOT + 7] = c->moe_norm_topk;
    header[MOE_HEADER_SLOT + 8] = c->moe_router;
    header[MOE_HEADER_SLOT + 9] = c->moe_input_scale;
}

// a new header of OMNI_HEADER_INTS slots: magic, version and the config; every other slot 0
static inline void omni_header_init(int32_t* h, int32_t magic, int32_t version, const ModelConfig* c) {
    memset(h, 0, OMNI_HEADER_BYTES);
    h[0] = magic;
    h[1] = version;
    model_config_to_header(c, h);
}

static inline void model_config_from_header(const int32_t* header, ModelConfig* c) {
    memset(c, 0, sizeof(*c));
    c->max_seq_len = header[2];
    c->vocab_size = header[3];
    c->padded_vocab_size = header[4];
    c->num_layers = header[5];
    c->num_heads = header[6];
    c->channels = header[7];
    c->ffn_kind = header[8];
    c->ffn_hidden = header[9];
    c->router_n = header[10];
    c->num_experts = header[11];
    c->top_k = header[12];
    c->router_norm = header[13];
    c->gate = header[14];
    c->moe_experts = header[MOE_HEADER_SLOT + 0];
    c->moe_topk = header[MOE_HEADER_SLOT + 1];
    c->moe_shared = header[MOE_HEADER_SLOT + 2];
    c->moe_zero = header[MOE_HEADER_SLOT + 3];
    c->moe_copy = header[MOE_HEADER_SLOT + 4];
    c->moe_const = header[MOE_HEADER_SLOT + 5];
    c->moe_gate_res = header[MOE_HEADER_SLOT + 6];
    c->moe_norm_topk = header[MOE_HEADER_SLOT + 7];
    c->moe_router = header[MOE_HEADER_SLOT + 8];
    c->moe_input_scale = header[MOE_HEADER_SLOT + 9];
}

// index (0..MODEL_CONFIG_NUM_FIELDS-1) of the first config field where a and b differ, -1 when
// equal; the names of the fields are model_config_field_name(i) in header-slot order, except
// that ffn_hidden comes last: a moe model's width follows its expert counts (--hidden unset, it
// is refitted to the preset's active size), so a changed count is named, not the width it moved
static inline int model_config_first_difference(const ModelConfig* a, const ModelConfig* b) {
    const int hidden = 7;  // "ffn_hidden (--hidden)"
    int32_t ha[OMNI_HEADER_INTS], hb[OMNI_HEADER_INTS];
    model_config_to_header(a, ha);
    model_config_to_header(b, hb);
    for (int i = 0; i < MODEL_CONFIG_NUM_FIELDS; i++) {
        if (i != hidden && ha[model_config_field_slot(i)] != hb[model_config_field_slot(i)]) return i;
    }
    return ha[model_config_field_slot(hidden)] != hb[model_config_field_slot(hidden)] ? hidden : -1;
}
static inline const char* model_config_field_name(int i) {
    static const char* names[MODEL_CONFIG_NUM_FIELDS] = {
        "max_seq_len", "vocab_size", "padded_vocab_size", "num_layers", "num_heads", "channels", "ffn_kind (-f)",
        "ffn_hidden (--hidden)", "router_n", "num_experts (--experts)", "top_k (--topk)",
        "router_norm (--router-norm)", "gate (--gate)", "moe_experts (--moe-experts)", "moe_topk (--moe-topk)",
        "moe_shared (--moe-shared)", "moe_zero (--moe-zero)", "moe_copy (--moe-copy)", "moe_const (--moe-const)",
        "moe_gate_res (--moe-gate-res)", "moe_norm_topk (--moe-norm-topk)", "moe_router (--moe-router)",
        "moe_input_scale (--moe-input-scale)"};
    return (i >= 0 && i < MODEL_CONFIG_NUM_FIELDS) ? names[i] : "?";
}
static inline int model_config_field_value(const ModelConfig* c, int i) {
    int32_t h[OMNI_HEADER_INTS];
    memset(h, 0, sizeof(h));
    model_config_to_header(c, h);
    return (i >= 0 && i < MODEL_CONFIG_NUM_FIELDS) ? h[model_config_field_slot(i)] : 0;
}
// the value of field i as text: a number, or the option's word for ffn_kind, router_norm, gate, moe_router
static inline void model_config_field_text(const ModelConfig* c, int i, char* out, size_t size) {
    int v = model_config_field_value(c, i);
    if (i == 6) snprintf(out, size, "%s", ffn_kind_name(v));
    else if (i == 11) snprintf(out, size, "%s", v == ROUTER_NORM_BN ? "bn" : (v == ROUTER_NORM_NONE ? "none" : "?"));
    else if (i == 12) snprintf(out, size, "%s", v == GATE_SOFTMAX ? "softmax" : (v == GATE_PROB ? "prob" : "?"));
    else if (i == 21) snprintf(out, size, "%s", v == MOE_ROUTER_TANH ? "tanh" : (v == MOE_ROUTER_LINEAR ? "linear" : "?"));
    else snprintf(out, size, "%d", v);
}

// a readable guess of what a file with this magic number is (for error messages)
static inline const char* ckpt_magic_hint_(int32_t magic) {
    switch (magic) {
        case MODEL_FILE_MAGIC: return " (it is an omnimoe model file: pass it with -e)";
        case CHECKPOINT_MAGIC: return " (it is an omnimoe training checkpoint: resume with -o <dir> -y 1)";
        case FIXTURE_FILE_MAGIC: return " (it is an omnimoe test fixture)";
        case 20240520: return " (it is a token shard: pass it with -i / -j)";
        case 20240326: return " (it is an llm.c GPT-2 checkpoint, which omnimoe does not read)";
        case 20240328: return " (it is a GPT-2 tokenizer file)";
        default: return "";
    }
}

// The hash of the trailer: XXH64 with seed 0, streamed (any split of the bytes gives the same value).
typedef struct {
    XXH64_state_t state;
} CheckpointHash;

static inline void checkpoint_hash_init(CheckpointHash* s) { XXH64_reset(&s->state, 0); }
static inline void checkpoint_hash_update(CheckpointHash* s, const void* data, size_t bytes) {
    if (bytes > 0) XXH64_update(&s->state, data, bytes);
}
static inline uint64_t checkpoint_hash_final(const CheckpointHash* s) { return (uint64_t)XXH64_digest(&s->state); }

// ----------------------------------------------------------------------------
// crash-safe writing: <path>.tmp, fsync, rename, fsync of the directory

// Every function here returns 0, or -1 once the write has failed: the first failure prints one
// message naming the file and the cause, closes and removes the .tmp and marks the file failed;
// later calls then do nothing and return -1, so a writer can check once, at the commit. The final
// name appears only through the rename of a complete, flushed and fsync'ed file.
typedef struct {
    FILE* fp;
    char path[CHECKPOINT_PATH_MAX];
    char tmp_path[CHECKPOINT_PATH_MAX + 8];
    CheckpointHash hash;
    int64_t bytes_written;
    int failed;
} CkptSafeFile;

// the failure after a message already printed: closes, removes the .tmp, marks the file failed
static inline int ckpt_safe_abandon_(CkptSafeFile* f) {
    if (f->fp != NULL) fclose(f->fp);
    f->fp = NULL;
    if (f->tmp_path[0] != '\0') remove(f->tmp_path);  // never leave a partial file behind
    f->failed = 1;
    return -1;
}

static inline int ckpt_safe_fail_(CkptSafeFile* f, const char* what) {
    int err = errno;
    fprintf(stderr, "Error: %s \"%s\" failed: %s\n", what, f->tmp_path, strerror(err));
    return ckpt_safe_abandon_(f);
}

static inline int ckpt_safe_open_(CkptSafeFile* f, const char* path) {
    ckpt_require_little_endian_();
    memset(f, 0, sizeof(*f));
    if (strlen(path) >= sizeof(f->path)) {
        fprintf(stderr, "Error: output path \"%s\" is too long\n", path);
        f->failed = 1;
        return -1;
    }
    strcpy(f->path, path);
    snprintf(f->tmp_path, sizeof(f->tmp_path), "%s.tmp", path);
    f->fp = fopen(f->tmp_path, "wb");
    if (f->fp == NULL) return ckpt_safe_fail_(f, "creating");
    checkpoint_hash_init(&f->hash);
    return 0;
}

static inline int ckpt_safe_write_(CkptSafeFile* f, const void* data, size_t bytes) {
    if (f->failed) return -1;
    if (bytes == 0) return 0;
    checkpoint_hash_update(&f->hash, data, bytes);
    if (fwrite(data, 1, bytes, f->fp) != bytes) return ckpt_safe_fail_(f, "writing");
    f->bytes_written += (int64_t)bytes;
    return 0;
}

// writes `count` zero floats (an optimiser state that does not exist yet)
static inline int ckpt_safe_write_zeros_(CkptSafeFile* f, size_t count) {
    float zeros[1024];
    memset(zeros, 0, sizeof(zeros));
    while (count > 0) {
        size_t n = count < 1024 ? count : 1024;
        if (ckpt_safe_write_(f, zeros, n * sizeof(float)) != 0) return -1;
        count -= n;
    }
    return 0;
}

// fsync of a file or directory; -1 after a message when it fails (a directory that cannot be
// fsync'ed is not an error: some file systems refuse it)
static inline int ckpt_fsync_path_(const char* path, int must_succeed) {
    int fd = open(path, O_RDONLY);
    int failed = fd < 0 || fsync(fd) != 0;
    if (failed && must_succeed) fprintf(stderr, "Error: fsync of \"%s\" failed: %s\n", path, strerror(errno));
    if (fd >= 0) close(fd);
    return failed && must_succeed ? -1 : 0;
}

static inline int ckpt_safe_commit_(CkptSafeFile* f) {
    if (f->failed) return -1;
    if (fflush(f->fp) != 0) return ckpt_safe_fail_(f, "flushing");
    if (fclose(f->fp) != 0) {
        f->fp = NULL;
        return ckpt_safe_fail_(f, "closing");
    }
    f->fp = NULL;
    // the data is on disk before the name appears
    if (ckpt_fsync_path_(f->tmp_path, 1) != 0) return ckpt_safe_abandon_(f);
    if (rename(f->tmp_path, f->path) != 0) return ckpt_safe_fail_(f, "renaming to the final name");
    // make the rename itself durable (some file systems refuse to fsync a directory: ignored)
    char dir[CHECKPOINT_PATH_MAX];
    strcpy(dir, f->path);
    char* slash = strrchr(dir, '/');
    if (slash == NULL) strcpy(dir, ".");
    else if (slash == dir) dir[1] = '\0';
    else *slash = '\0';
    ckpt_fsync_path_(dir, 0);
    return 0;
}

// the 16-byte trailer: XXH64 of everything written so far, then the end magic
static inline int ckpt_safe_write_trailer_(CkptSafeFile* f) {
    if (f->failed) return -1;
    uint64_t hash = checkpoint_hash_final(&f->hash);
    unsigned char trailer[CHECKPOINT_TRAILER_BYTES];
    memcpy(trailer, &hash, 8);
    memcpy(trailer + 8, CHECKPOINT_END_MAGIC, 8);
    if (fwrite(trailer, 1, sizeof(trailer), f->fp) != sizeof(trailer)) return ckpt_safe_fail_(f, "writing");
    return 0;
}

// 1 for the temporary name of a write of this file (checkpoint or model file: "<name>.bin.tmp")
static inline int ckpt_is_tmp_name_(const char* name) {
    size_t len = strlen(name);
    return len > 8 && strcmp(name + len - 8, ".bin.tmp") == 0;
}

// Removes "<dir>/*.bin.tmp": what a write cut short (kill -9, power loss) left behind. The
// complete files are never touched. A note names each file removed.
static inline void checkpoint_remove_stale_tmp_(const char* dir) {
    DIR* d = opendir(dir);
    if (d == NULL) return;
    struct dirent* entry;
    while ((entry = readdir(d)) != NULL) {
        if (!ckpt_is_tmp_name_(entry->d_name)) continue;
        char path[CHECKPOINT_PATH_MAX + 256];
        snprintf(path, sizeof(path), "%s/%s", dir, entry->d_name);
        struct stat st;
        if (lstat(path, &st) != 0 || !S_ISREG(st.st_mode)) continue;
        if (unlink(path) == 0) {
            printf("Note: removed %s, left by a write that was interrupted (the complete files are kept)\n", path);
        } else {
            fprintf(stderr, "Warning: cannot remove the unfinished write %s: %s\n", path, strerror(errno));
        }
    }
    closedir(d);
}

// mkdir -p, then removes the temporary files of interrupted writes (checkpoint_remove_stale_tmp_).
// Returns 0, or -1 after a message when a component exists but is not a directory or cannot be
// created (it does not exit: a trainer of several processes lets all of them stop together).
static inline int checkpoint_try_make_dir(const char* dir) {
    char path[CHECKPOINT_PATH_MAX];
    if (strlen(dir) >= sizeof(path)) {
        fprintf(stderr, "Error: output directory \"%s\" is too long\n", dir);
        return -1;
    }
    strcpy(path, dir);
    size_t len = strlen(path);
    for (size_t i = 1; i <= len; i++) {
        if (path[i] != '/' && path[i] != '\0') continue;
        char saved = path[i];
        path[i] = '\0';
        struct stat st;
        if (stat(path, &st) != 0) {
            if (mkdir(path, 0755) != 0 && errno != EEXIST) {
                fprintf(stderr, "Error: cannot create the output directory \"%s\": %s\n", path, strerror(errno));
                return -1;
            }
        } else if (!S_ISDIR(st.st_mode)) {
            fprintf(stderr, "Error: output directory \"%s\": \"%s\" exists and is not a directory\n", dir, path);
            return -1;
        }
        path[i] = saved;
    }
    checkpoint_remove_stale_tmp_(dir);
    return 0;
}

// checkpoint_try_make_dir, exiting on failure
static inline void checkpoint_make_dir(const char* dir) {
    if (checkpoint_try_make_dir(dir) != 0) exit(EXIT_FAILURE);
}

// ----------------------------------------------------------------------------
// model files

// the initial BN statistics (mean 0, var 1), for a model file written without them
static inline float* ckpt_initial_bn_stats_(const ModelConfig* config) {
    size_t num_bn = model_config_num_bn_stats(config), n2 = (size_t)2 * config->router_n;
    float* init = (float*)malloc_check(num_bn * sizeof(float));
    for (size_t i = 0; i < num_bn; i++) init[i] = ((i / n2) % 2 == 0) ? 0.0f : 1.0f;
    return init;
}

// Writes a model file (version 2, with its hash) crash-safely. bn_stats NULL = the initial
// statistics. Returns 0, or -1 after one message naming the file and the cause: a weight or
// statistic is NaN/Inf (nothing is written), or the write failed (the .tmp is removed and an
// older file of that name is untouched).
CKPT_MUST_CHECK static inline int model_file_write(const char* path, const ModelConfig* config, const float* params,
                                                   const float* bn_stats) {
    if (!model_config_validate(config)) {
        fprintf(stderr, "  (refusing to write model file \"%s\")\n", path);
        return -1;
    }
    size_t num_params = model_config_num_params(config);
    size_t num_bn = model_config_num_bn_stats(config);
    char why[256];
    if (!ckpt_params_finite_(config, params, "weight", why, sizeof(why)) ||
        !ckpt_floats_finite_(num_bn > 0 ? bn_stats : NULL, num_bn, "the BN running statistics", why, sizeof(why))) {
        fprintf(stderr, "Error: refusing to write model file \"%s\": %s; nothing non-finite is saved (the "
                "training diverged)\n", path, why);
        return -1;
    }
    int32_t header[OMNI_HEADER_INTS];
    omni_header_init(header, MODEL_FILE_MAGIC, MODEL_FILE_VERSION, config);
    float* init = num_bn > 0 && bn_stats == NULL ? ckpt_initial_bn_stats_(config) : NULL;
    CkptSafeFile f;
    ckpt_safe_open_(&f, path);  // each step does nothing once one has failed
    ckpt_safe_write_(&f, header, sizeof(header));
    ckpt_safe_write_(&f, params, num_params * sizeof(float));
    ckpt_safe_write_(&f, init != NULL ? init : bn_stats, num_bn * sizeof(float));
    ckpt_safe_write_trailer_(&f);
    int rc = ckpt_safe_commit_(&f);
    free(init);
    return rc;
}

// one message "Error: <kind> "<path>": <what>", then exit (closing fp first when not NULL)
static inline void ckpt_vfail_(FILE* fp, const char* kind, const char* path, const char* fmt, va_list args) {
    fprintf(stderr, "Error: %s \"%s\": ", kind, path);
    vfprintf(stderr, fmt, args);
    fprintf(stderr, "\n");
    if (fp != NULL) fclose(fp);
    exit(EXIT_FAILURE);
}

static inline void model_file_fail_(FILE* fp, const char* path, const char* fmt, ...) {
    va_list args;
    va_start(args, fmt);
    ckpt_vfail_(fp, "model file", path, fmt, args);
    va_end(args);
}

// Opens a model file and checks its header and size; returns the stream positioned after the
// header. *out_version: MODEL_FILE_VERSION (hashed) or MODEL_FILE_VERSION_UNHASHED.
static inline FILE* model_file_open_(const char* path, ModelConfig* out_config, int* out_version) {
    ckpt_require_little_endian_();
    char why[256];
    if (!ckpt_regular_file_(path, why, sizeof(why))) model_file_fail_(NULL, path, "%s", why);
    FILE* fp = fopen(path, "rb");
    if (fp == NULL) model_file_fail_(NULL, path, "cannot open: %s", strerror(errno));
    int64_t size = ckpt_file_size_(path);
    int32_t header[OMNI_HEADER_INTS];
    if (size < OMNI_HEADER_BYTES || fread(header, sizeof(header), 1, fp) != 1) {
        model_file_fail_(fp, path, "truncated: %lld bytes, shorter than the %d-byte header", (long long)size,
                         OMNI_HEADER_BYTES);
    }
    if (header[0] != MODEL_FILE_MAGIC) {
        model_file_fail_(fp, path, "bad magic number %d, expected %d%s", header[0], MODEL_FILE_MAGIC,
                         ckpt_magic_hint_(header[0]));
    }
    if (header[1] != MODEL_FILE_VERSION && header[1] != MODEL_FILE_VERSION_UNHASHED) {
        model_file_fail_(fp, path, "version %d, this program reads versions %d and %d", header[1],
                         MODEL_FILE_VERSION_UNHASHED, MODEL_FILE_VERSION);
    }
    for (int slot = 15; slot < OMNI_HEADER_INTS; slot++) {
        if (header[slot] != 0 && !model_config_is_slot(slot)) {
            model_file_fail_(fp, path, "header slot %d is %d, expected 0 (corrupt, or written by another version)",
                             slot, header[slot]);
        }
    }
    ModelConfig c;
    model_config_from_header(header, &c);
    if (!model_config_validate(&c)) model_file_fail_(fp, path, "the configuration in its header is impossible");
    int64_t expected = OMNI_HEADER_BYTES +
                       (int64_t)sizeof(float) * (int64_t)(model_config_num_params(&c) + model_config_num_bn_stats(&c)) +
                       (header[1] == MODEL_FILE_VERSION ? CHECKPOINT_TRAILER_BYTES : 0);
    if (size < expected) {
        model_file_fail_(fp, path, "truncated: %lld bytes, expected %lld for the configuration in its header",
                         (long long)size, (long long)expected);
    }
    if (size > expected) {
        model_file_fail_(fp, path, "%lld bytes, expected %lld for the configuration in its header (%lld extra bytes)",
                         (long long)size, (long long)expected, (long long)(size - expected));
    }
    *out_config = c;
    *out_version = header[1];
    return fp;
}

// reads the configuration only (so a caller can build the model before reading the weights)
static inline void model_file_read_config(const char* path, ModelConfig* out_config) {
    int version;
    FILE* fp = model_file_open_(path, out_config, &version);
    fclose(fp);
}

// The hash in a version-2 model file's trailer: XXH64 of the header (magic, version 2, the
// config, other slots 0), the params and the BN statistics (bn_stats NULL when there are none).
static inline uint64_t model_file_hash(const ModelConfig* config, const float* params, const float* bn_stats) {
    int32_t header[OMNI_HEADER_INTS];
    omni_header_init(header, MODEL_FILE_MAGIC, MODEL_FILE_VERSION, config);
    CheckpointHash hash;
    checkpoint_hash_init(&hash);
    checkpoint_hash_update(&hash, header, sizeof(header));
    checkpoint_hash_update(&hash, params, model_config_num_params(config) * sizeof(float));
    checkpoint_hash_update(&hash, bn_stats, model_config_num_bn_stats(config) * sizeof(float));
    return checkpoint_hash_final(&hash);
}

// Reads a model file into new buffers (free() them): *params gets model_config_num_params floats,
// *bn_stats model_config_num_bn_stats floats (NULL when the model has none). Verifies the hash
// (version 2; version 1 files have none: a warning says so) and refuses NaN/Inf weights.
static inline void model_file_read(const char* path, ModelConfig* out_config, float** params, float** bn_stats) {
    ModelConfig c;
    int version;
    FILE* fp = model_file_open_(path, &c, &version);
    size_t num_params = model_config_num_params(&c);
    size_t num_bn = model_config_num_bn_stats(&c);
    float* p = (float*)malloc_check(num_params * sizeof(float));
    float* bn = num_bn > 0 ? (float*)malloc_check(num_bn * sizeof(float)) : NULL;
    unsigned char trailer[CHECKPOINT_TRAILER_BYTES];
    size_t trailer_bytes = version == MODEL_FILE_VERSION ? sizeof(trailer) : 0;
    if (fread(p, sizeof(float), num_params, fp) != num_params ||
        (num_bn > 0 && fread(bn, sizeof(float), num_bn, fp) != num_bn) ||
        fread(trailer, 1, trailer_bytes, fp) != trailer_bytes) {
        free(p);
        free(bn);
        model_file_fail_(fp, path, "read error: %s", ferror(fp) ? strerror(errno) : "unexpected end of file");
    }
    fclose(fp);
    if (version == MODEL_FILE_VERSION) {
        uint64_t stored, computed = model_file_hash(&c, p, bn);
        memcpy(&stored, trailer, 8);
        if (memcmp(trailer + 8, CHECKPOINT_END_MAGIC, 8) != 0 || stored != computed) {
            free(p);
            free(bn);
            model_file_fail_(NULL, path, "%s: the file is corrupt", memcmp(trailer + 8, CHECKPOINT_END_MAGIC, 8) != 0
                             ? "end magic missing" : "checksum mismatch (XXH64)");
        }
    } else {
        fprintf(stderr, "Warning: model file \"%s\" is version 1, which has no hash: its contents cannot be "
                "verified (files written now are version 2)\n", path);
    }
    char why[256];
    if (!ckpt_params_finite_(&c, p, "weight", why, sizeof(why)) ||
        !ckpt_floats_finite_(bn, num_bn, "the BN running statistics", why, sizeof(why))) {
        free(p);
        free(bn);
        model_file_fail_(NULL, path, "%s: not a usable model", why);
    }
    *out_config = c;
    *params = p;
    *bn_stats = bn;
}

// ----------------------------------------------------------------------------
// training checkpoints: the run record

typedef struct {
    // where the run stands
    int step;                    // optimiser updates completed; the file is ckpt_<step>.bin
    int adam_t;                  // AdamW bias-correction counter (normally == step)
    long long tokens_seen;       // training tokens consumed by all processes together
    // what identifies the run (checkpoint_compare_run checks it on resume)
    RunIdentity run;
    // section sizes: filled by the writers from their arguments and by the readers from the file
    long long num_params;        // floats in each of params, m, v
    long long num_bn_stats;      // floats in one set of BN running statistics
    int num_bn_sets;             // sets stored
    long long loader_bytes;      // data-loader blob
    long long rng_bytes;         // RNG blob
    // sharded checkpoints (version 3): 0, 0 for a single file (version 2)
    int num_parts;               // part files (the process count that wrote them)
    int shard_mode;              // bit 0: ZeRO-1 (llmc/checkpoint_parts.h)
} CheckpointInfo;

// the run record of a checkpoint (sizes are left 0 for the writers)
static inline void checkpoint_info_from_run(CheckpointInfo* info, const RunIdentity* run, int step, int adam_t,
                                            long long tokens_seen) {
    memset(info, 0, sizeof(*info));
    info->step = step;
    info->adam_t = adam_t;
    info->tokens_seen = tokens_seen;
    info->run = *run;
}

// <dir>/ckpt_<step:08d>.bin
static inline void checkpoint_path(char* out, size_t size, const char* dir, int step) {
    snprintf(out, size, "%s/ckpt_%08d.bin", dir, step);
}

static inline int64_t checkpoint_file_bytes_(const CheckpointInfo* info) {
    int64_t state = info->num_parts > 0 ? CHECKPOINT_PART_ENTRY_BYTES * (int64_t)info->num_parts  // the part table
                                        : 3 * 4 * (int64_t)info->num_params;                     // params, m, v
    return OMNI_HEADER_BYTES + state + 4 * (int64_t)info->num_bn_sets * info->num_bn_stats + info->loader_bytes +
           info->rng_bytes + CHECKPOINT_TRAILER_BYTES;
}

static inline void checkpoint_header_from_(const ModelConfig* config, const CheckpointInfo* info, int32_t* h) {
    int version = info->num_parts > 0 ? CHECKPOINT_VERSION_SHARDED : CHECKPOINT_VERSION;
    omni_header_init(h, CHECKPOINT_MAGIC, version, config);
    const RunIdentity* r = &info->run;
    h[16] = r->B;
    h[17] = r->T;
    h[18] = r->grad_accum_steps;
    h[19] = r->num_processes;
    h[20] = info->step;
    h[21] = info->adam_t;
    h[22] = r->num_steps;
    h[23] = r->warmup_steps;
    h[24] = r->lr_schedule;
    h[25] = r->shuffle;
    h[26] = r->expert_exec;
    h[27] = info->num_bn_sets;
    ckpt_put_i64_(h, 28, info->tokens_seen);
    ckpt_put_i64_(h, 30, r->total_batch_size);
    ckpt_put_i64_(h, 32, (int64_t)r->seed);
    ckpt_put_f32_(h, 34, r->learning_rate);
    ckpt_put_f32_(h, 35, r->final_lr_frac);
    ckpt_put_f32_(h, 36, r->decay_frac);
    ckpt_put_f32_(h, 37, r->weight_decay);
    ckpt_put_f32_(h, 38, r->grad_clip);
    ckpt_put_f32_(h, 39, r->beta1);
    ckpt_put_f32_(h, 40, r->beta2);
    ckpt_put_f32_(h, 41, r->eps);
    ckpt_put_i64_(h, 42, (int64_t)r->data_fingerprint);
    ckpt_put_i64_(h, 44, r->data_tokens);
    h[46] = r->data_shards;
    h[47] = r->attention;
    ckpt_put_f32_(h, 70, r->moe_aux);
    ckpt_put_f32_(h, 71, r->moe_zc_weight);
    ckpt_put_f32_(h, 72, r->moe_bias_rate);
    h[74] = r->recompute;
    ckpt_put_i64_(h, 48, info->num_params);
    ckpt_put_i64_(h, 50, info->num_bn_stats);
    ckpt_put_i64_(h, 52, info->loader_bytes);
    ckpt_put_i64_(h, 54, info->rng_bytes);
    ckpt_put_i64_(h, 56, checkpoint_file_bytes_(info));
    h[58] = info->num_parts;
    h[59] = info->shard_mode;
}

static inline void checkpoint_header_to_(const int32_t* h, ModelConfig* config, CheckpointInfo* info) {
    model_config_from_header(h, config);
    memset(info, 0, sizeof(*info));
    RunIdentity* r = &info->run;
    r->B = h[16];
    r->T = h[17];
    r->grad_accum_steps = h[18];
    r->num_processes = h[19];
    info->step = h[20];
    info->adam_t = h[21];
    r->num_steps = h[22];
    r->warmup_steps = h[23];
    r->lr_schedule = h[24];
    r->shuffle = h[25];
    r->expert_exec = h[26];
    info->num_bn_sets = h[27];
    info->tokens_seen = ckpt_get_i64_(h, 28);
    r->total_batch_size = ckpt_get_i64_(h, 30);
    r->seed = (unsigned long long)ckpt_get_i64_(h, 32);
    r->learning_rate = ckpt_get_f32_(h, 34);
    r->final_lr_frac = ckpt_get_f32_(h, 35);
    r->decay_frac = ckpt_get_f32_(h, 36);
    r->weight_decay = ckpt_get_f32_(h, 37);
    r->grad_clip = ckpt_get_f32_(h, 38);
    r->beta1 = ckpt_get_f32_(h, 39);
    r->beta2 = ckpt_get_f32_(h, 40);
    r->eps = ckpt_get_f32_(h, 41);
    r->data_fingerprint = (uint64_t)ckpt_get_i64_(h, 42);
    r->data_tokens = ckpt_get_i64_(h, 44);
    r->data_shards = h[46];
    r->attention = h[47];
    r->moe_aux = ckpt_get_f32_(h, 70);
    r->moe_zc_weight = ckpt_get_f32_(h, 71);
    r->moe_bias_rate = ckpt_get_f32_(h, 72);
    r->recompute = h[74];
    info->num_params = ckpt_get_i64_(h, 48);
    info->num_bn_stats = ckpt_get_i64_(h, 50);
    info->loader_bytes = ckpt_get_i64_(h, 52);
    info->rng_bytes = ckpt_get_i64_(h, 54);
    info->num_parts = h[58];
    info->shard_mode = h[59];
}

// Checks of a checkpoint header, without printing; each returns 1 when sound, else 0 with the
// reason in why. basic: magic, version and the stated file size; sizes: the section sizes agree
// with the model configuration and the stated size (run after the checksum where possible, so
// a corrupt header is reported as corrupt).
static inline int checkpoint_check_header_basic_(const int32_t* h, int64_t file_size, char* why, size_t why_size) {
    if (h[0] != CHECKPOINT_MAGIC) {
        snprintf(why, why_size, "bad magic number %d, expected %d%s", h[0], CHECKPOINT_MAGIC, ckpt_magic_hint_(h[0]));
        return 0;
    }
    if (h[1] != CHECKPOINT_VERSION && h[1] != CHECKPOINT_VERSION_SHARDED) {
        snprintf(why, why_size, "version %d, this program reads version %d (one file) and %d (sharded)%s", h[1],
                 CHECKPOINT_VERSION, CHECKPOINT_VERSION_SHARDED,
                 h[1] == 1 ? " (version 1 was written before checkpoints recorded the training data and got a "
                 "64-bit hash: start a new run in another -o directory, e.g. from a model file with -e)" : "");
        return 0;
    }
    int64_t stated = ckpt_get_i64_(h, 56);
    if (stated != file_size) {
        snprintf(why, why_size, "%s: the file has %lld bytes, its header says %lld",
                 file_size < stated ? "truncated" : "wrong size", (long long)file_size, (long long)stated);
        return 0;
    }
    return 1;
}

static inline int checkpoint_check_header_sizes_(const int32_t* h, ModelConfig* config, CheckpointInfo* info,
                                                 char* why, size_t why_size) {
    checkpoint_header_to_(h, config, info);
    int64_t stated = ckpt_get_i64_(h, 56);
    const long long limit = 1LL << 44;  // keeps the size sum below overflow for any header content
    if (info->num_params < 0 || info->num_params > limit || info->num_bn_stats < 0 || info->num_bn_stats > limit ||
        info->num_bn_sets < 0 || info->num_bn_sets > (1 << 16) || info->loader_bytes < 0 ||
        info->loader_bytes > limit || info->rng_bytes < 0 || info->rng_bytes > limit ||
        (h[1] == CHECKPOINT_VERSION_SHARDED) != (info->num_parts > 0) || info->num_parts < 0 ||
        info->num_parts > (1 << 16) || (info->num_parts > 0) != (info->shard_mode > 0) ||
        checkpoint_file_bytes_(info) != stated ||
        (uint64_t)info->num_params != (uint64_t)model_config_num_params(config) ||
        (uint64_t)info->num_bn_stats != (uint64_t)model_config_num_bn_stats(config)) {
        snprintf(why, why_size, "inconsistent header (section sizes do not match the model configuration or the size)");
        return 0;
    }
    return 1;
}

// ----------------------------------------------------------------------------
// writing a checkpoint

typedef struct {
    CkptSafeFile file;
    int64_t payload_bytes;   // header + sections: what put() must deliver in total
} CheckpointWriter;

// Starts <dir>/ckpt_<info->step>.bin(.tmp) and writes the header. The section sizes in *info
// (num_params, num_bn_stats, num_bn_sets, loader_bytes, rng_bytes) must be set; num_params and
// num_bn_stats must equal the model's. Then put() the sections in order, then close(). Each
// returns 0, or -1 once the write has failed (one message; the .tmp is removed; later calls do
// nothing and return -1, so checking close() is enough).
static inline int checkpoint_writer_open(CheckpointWriter* w, const char* dir, const ModelConfig* config,
                                         const CheckpointInfo* info) {
    memset(w, 0, sizeof(*w));
    w->file.failed = 1;  // until the file is open
    if (!model_config_validate(config)) return -1;
    if ((uint64_t)info->num_params != (uint64_t)model_config_num_params(config) ||
        (uint64_t)info->num_bn_stats != (uint64_t)model_config_num_bn_stats(config) || info->num_bn_sets < 1 ||
        info->loader_bytes < 0 || info->rng_bytes < 0 || info->step < 0) {
        fprintf(stderr, "Error: checkpoint_writer_open: bad sizes (params %lld, model has %zu; bn %lld x %d sets, model has "
                "%zu; loader %lld; rng %lld; step %d)\n", info->num_params, model_config_num_params(config),
                info->num_bn_stats, info->num_bn_sets, model_config_num_bn_stats(config), info->loader_bytes,
                info->rng_bytes, info->step);
        return -1;
    }
    char path[CHECKPOINT_PATH_MAX];
    checkpoint_path(path, sizeof(path), dir, info->step);
    int32_t header[OMNI_HEADER_INTS];
    checkpoint_header_from_(config, info, header);
    w->payload_bytes = checkpoint_file_bytes_(info) - CHECKPOINT_TRAILER_BYTES;
    ckpt_safe_open_(&w->file, path);
    return ckpt_safe_write_(&w->file, header, sizeof(header));
}

// the next `bytes` of the sections (any split: a section may come in many pieces)
static inline int checkpoint_writer_put(CheckpointWriter* w, const void* data, size_t bytes) {
    if (w->file.failed) return -1;
    if (w->file.bytes_written + (int64_t)bytes > w->payload_bytes) {
        fprintf(stderr, "Error: checkpoint \"%s\": more section bytes than the header announced (%lld)\n",
                w->file.path, (long long)w->payload_bytes);
        return ckpt_safe_abandon_(&w->file);
    }
    return ckpt_safe_write_(&w->file, data, bytes);
}

// Writes the trailer and makes the file visible under its final name. out_path (may be NULL,
// else CHECKPOINT_PATH_MAX chars) receives the name. 0, or -1 when the write failed at any step
// (then nothing of it is left and out_path is untouched).
CKPT_MUST_CHECK static inline int checkpoint_writer_close(CheckpointWriter* w, char* out_path) {
    if (w->file.failed) return -1;
    if (w->file.bytes_written != w->payload_bytes) {
        fprintf(stderr, "Error: checkpoint \"%s\": %lld section bytes written, the header announced %lld\n",
                w->file.path, (long long)w->file.bytes_written, (long long)w->payload_bytes);
        return ckpt_safe_abandon_(&w->file);
    }
    ckpt_safe_write_trailer_(&w->file);
    if (ckpt_safe_commit_(&w->file) != 0) return -1;
    if (out_path != NULL) strcpy(out_path, w->file.path);
    return 0;
}

// One call: writes <dir>/ckpt_<info->step>.bin from host buffers. The section sizes of *info are
// ignored and taken from the model and the arguments. m, v NULL = zeros (optimiser not started).
// bn_stats: num_bn_sets * model_config_num_bn_stats floats (NULL allowed when that is 0).
// Returns 0, or -1 after one message naming the file and the cause: a NaN/Inf in any section
// (nothing is written) or a failed write (the .tmp is removed; the checkpoints already in dir are
// untouched). It does not exit: with several ranks the loop agrees on the outcome first.
CKPT_MUST_CHECK static inline int checkpoint_write(const char* dir, const ModelConfig* config, const CheckpointInfo* info,
                                                   const float* params, const float* m, const float* v,
                                                   const float* bn_stats, int num_bn_sets, const void* loader_state,
                                                   size_t loader_bytes, const void* rng_state, size_t rng_bytes,
                                                   char* out_path) {
    CheckpointInfo full = *info;
    full.num_parts = 0;  // one file, version 2
    full.shard_mode = 0;
    full.num_params = (long long)model_config_num_params(config);
    full.num_bn_stats = (long long)model_config_num_bn_stats(config);
    full.num_bn_sets = num_bn_sets;
    full.loader_bytes = (long long)loader_bytes;
    full.rng_bytes = (long long)rng_bytes;
    size_t P = (size_t)full.num_params, bn_floats = (size_t)full.num_bn_stats * (size_t)(num_bn_sets > 0 ? num_bn_sets : 0);
    if (params == NULL || (bn_floats > 0 && bn_stats == NULL) || (loader_bytes > 0 && loader_state == NULL) ||
        (rng_bytes > 0 && rng_state == NULL)) {
        fprintf(stderr, "Error: checkpoint_write: a NULL buffer for a non-empty section\n");
        return -1;
    }
    char why[256];
    if (!ckpt_params_finite_(config, params, "weight", why, sizeof(why)) ||
        !ckpt_floats_finite_(m, P, "the AdamW first moments (m)", why, sizeof(why)) ||
        !ckpt_floats_finite_(v, P, "the AdamW second moments (v)", why, sizeof(why)) ||
        !ckpt_floats_finite_(bn_stats, bn_floats, "the BN running statistics", why, sizeof(why))) {
        char path[CHECKPOINT_PATH_MAX];
        checkpoint_path(path, sizeof(path), dir, info->step);
        fprintf(stderr, "Error: refusing to write checkpoint \"%s\": %s; nothing non-finite is saved (the training "
                "diverged; the checkpoints already in %s are untouched)\n", path, why, dir);
        return -1;
    }
    CheckpointWriter w;  // each call does nothing once one has failed: close() reports it
    checkpoint_writer_open(&w, dir, config, &full);
    checkpoint_writer_put(&w, params, P * sizeof(float));
    if (m != NULL) checkpoint_writer_put(&w, m, P * sizeof(float));
    else ckpt_safe_write_zeros_(&w.file, P);
    if (v != NULL) checkpoint_writer_put(&w, v, P * sizeof(float));
    else ckpt_safe_write_zeros_(&w.file, P);
    checkpoint_writer_put(&w, bn_stats, bn_floats * sizeof(float));
    checkpoint_writer_put(&w, loader_state, loader_bytes);
    checkpoint_writer_put(&w, rng_state, rng_bytes);
    return checkpoint_writer_close(&w, out_path);
}

// ----------------------------------------------------------------------------
// the sharded format's hooks (defined in llmc/checkpoint_parts.h, included at the end)

typedef struct {
    int64_t bytes;   // the part file's size
    uint64_t hash;   // XXH64 of the part file before its trailer (= the hash in its trailer)
} CheckpointPartEntry;

static inline int checkpoint_parts_check_files(const char* manifest_path, const CheckpointInfo* info, char* why,
                                               size_t why_size);
static inline int checkpoint_parts_read_logical(const char* manifest_path, const ModelConfig* config,
                                                const CheckpointInfo* info, const CheckpointPartEntry* table,
                                                float* params, float* m, float* v);

// ----------------------------------------------------------------------------
// checking a checkpoint without trusting it

// Returns 1 when the file is a complete, uncorrupted checkpoint (header sound, size as stated,
// end magic and checksum right); else 0 and the reason in why. Prints nothing.
static inline int checkpoint_verify(const char* path, char* why, size_t why_size) {
    ckpt_require_little_endian_();
    if (!ckpt_regular_file_(path, why, why_size)) return 0;
    FILE* fp = fopen(path, "rb");
    if (fp == NULL) {
        snprintf(why, why_size, "cannot open: %s", strerror(errno));
        return 0;
    }
    int64_t size = ckpt_file_size_(path);
    int32_t header[OMNI_HEADER_INTS];
    if (size < OMNI_HEADER_BYTES + CHECKPOINT_TRAILER_BYTES || fread(header, sizeof(header), 1, fp) != 1) {
        snprintf(why, why_size, "truncated: %lld bytes, too short for a checkpoint", (long long)size);
        fclose(fp);
        return 0;
    }
    if (!checkpoint_check_header_basic_(header, size, why, why_size)) {
        fclose(fp);
        return 0;
    }
    CheckpointHash hash;
    checkpoint_hash_init(&hash);
    checkpoint_hash_update(&hash, header, sizeof(header));
    int64_t left = size - OMNI_HEADER_BYTES - CHECKPOINT_TRAILER_BYTES;
    size_t chunk_size = 1 << 20;
    unsigned char* chunk = (unsigned char*)malloc_check(chunk_size);
    while (left > 0) {
        size_t n = left < (int64_t)chunk_size ? (size_t)left : chunk_size;
        if (fread(chunk, 1, n, fp) != n) {
            snprintf(why, why_size, "read error: %s", ferror(fp) ? strerror(errno) : "unexpected end of file");
            free(chunk);
            fclose(fp);
            return 0;
        }
        checkpoint_hash_update(&hash, chunk, n);
        left -= (int64_t)n;
    }
    free(chunk);
    unsigned char trailer[CHECKPOINT_TRAILER_BYTES];
    int ok = fread(trailer, 1, sizeof(trailer), fp) == sizeof(trailer);
    fclose(fp);
    if (!ok) {
        snprintf(why, why_size, "truncated trailer");
        return 0;
    }
    if (memcmp(trailer + 8, CHECKPOINT_END_MAGIC, 8) != 0) {
        snprintf(why, why_size, "end magic missing (incomplete or corrupt file)");
        return 0;
    }
    uint64_t stored, computed = checkpoint_hash_final(&hash);
    memcpy(&stored, trailer, 8);
    if (stored != computed) {
        snprintf(why, why_size, "checksum mismatch (stored %016llx, computed %016llx): the file is corrupt",
                 (unsigned long long)stored, (unsigned long long)computed);
        return 0;
    }
    ModelConfig config;
    CheckpointInfo info;
    if (!checkpoint_check_header_sizes_(header, &config, &info, why, why_size)) return 0;
    return info.num_parts > 0 ? checkpoint_parts_check_files(path, &info, why, why_size) : 1;
}

// step of a name "ckpt_<digits>.bin", else -1; *is_tmp = 1 for "ckpt_<digits>.bin.tmp"
static inline int checkpoint_name_step_(const char* name, int* is_tmp) {
    *is_tmp = 0;
    if (strncmp(name, "ckpt_", 5) != 0) return -1;
    const char* p = name + 5;
    long long step = 0;
    int digits = 0;
    while (*p >= '0' && *p <= '9') {
        step = step * 10 + (*p - '0');
        if (step > 2147483647LL) return -1;
        p++;
        digits++;
    }
    if (digits == 0) return -1;
    if (strcmp(p, ".bin") == 0) return (int)step;
    if (strcmp(p, ".bin.tmp") == 0) {
        *is_tmp = 1;
        return (int)step;
    }
    return -1;
}

// The complete, verified checkpoint with the highest step in dir: its path goes to out_path
// (CHECKPOINT_PATH_MAX chars) and its step is returned; -1 when there is none (or no dir).
// Unfinished (.tmp) and corrupt checkpoints are skipped with a warning on stderr.
static inline int checkpoint_find_latest(const char* dir, char* out_path) {
    DIR* d = opendir(dir);
    if (d == NULL) return -1;
    int* steps = NULL;
    int count = 0, capacity = 0;
    struct dirent* entry;
    while ((entry = readdir(d)) != NULL) {
        int is_tmp;
        int step = checkpoint_name_step_(entry->d_name, &is_tmp);
        if (step < 0) continue;
        if (is_tmp) {
            fprintf(stderr, "Warning: ignoring unfinished checkpoint %s/%s (its write was interrupted)\n", dir,
                    entry->d_name);
            continue;
        }
        if (count == capacity) {
            capacity = capacity ? 2 * capacity : 16;
            int* bigger = (int*)realloc(steps, (size_t)capacity * sizeof(int));
            if (bigger == NULL) {
                fprintf(stderr, "Error: out of memory listing %s\n", dir);
                exit(EXIT_FAILURE);
            }
            steps = bigger;
        }
        steps[count++] = step;
    }
    closedir(d);
    int found = -1;
    while (count > 0 && found < 0) {
        int best = 0;  // newest remaining
        for (int i = 1; i < count; i++) if (steps[i] > steps[best]) best = i;
        char path[CHECKPOINT_PATH_MAX], why[256];
        checkpoint_path(path, sizeof(path), dir, steps[best]);
        if (checkpoint_verify(path, why, sizeof(why))) {
            found = steps[best];
            strcpy(out_path, path);
        } else {
            fprintf(stderr, "Warning: skipping checkpoint %s: %s\n", path, why);
            steps[best] = steps[--count];
        }
    }
    free(steps);
    return found;
}

// ----------------------------------------------------------------------------
// reading a checkpoint

typedef struct {
    FILE* fp;
    char path[CHECKPOINT_PATH_MAX];
    CheckpointHash hash;
    int64_t payload_bytes;   // header + sections
    int64_t bytes_read;
} CheckpointReader;

static inline void checkpoint_fail_(FILE* fp, const char* path, const char* fmt, ...) {
    va_list args;
    va_start(args, fmt);
    ckpt_vfail_(fp, "checkpoint", path, fmt, args);
    va_end(args);
}

// A checkpoint's model (config, from its header) must equal this run's (expected): returns 1
// after one message naming the first differing field, else 0. Does not exit (see
// checkpoint_run_differs).
static inline int checkpoint_model_differs(const char* path, const ModelConfig* config, const ModelConfig* expected) {
    int field = model_config_first_difference(config, expected);
    if (field < 0) return 0;
    char in_file[32], in_run[32];
    model_config_field_text(config, field, in_file, sizeof(in_file));
    model_config_field_text(expected, field, in_run, sizeof(in_run));
    fprintf(stderr, "Error: checkpoint \"%s\": it was written for a different model: %s is %s in the checkpoint but %s "
            "in this run (use the same -e and model flags as the run that wrote it)\n", path,
            model_config_field_name(field), in_file, in_run);
    return 1;
}

// Opens a checkpoint and checks its header; with expected_config != NULL, the model in the file
// must equal it (else the message names the first differing field; a corrupt file is reported
// as corrupt instead). Fills out_config / out_info when not NULL. Then get() the sections in
// order and close(), which verifies the checksum.
static inline void checkpoint_reader_open(CheckpointReader* r, const char* path, const ModelConfig* expected_config,
                                          ModelConfig* out_config, CheckpointInfo* out_info) {
    ckpt_require_little_endian_();
    memset(r, 0, sizeof(*r));
    if (strlen(path) >= sizeof(r->path)) checkpoint_fail_(NULL, path, "path too long");
    strcpy(r->path, path);
    char why[256], why_verify[256];
    if (!ckpt_regular_file_(path, why, sizeof(why))) checkpoint_fail_(NULL, path, "%s", why);
    FILE* fp = fopen(path, "rb");
    if (fp == NULL) checkpoint_fail_(NULL, path, "cannot open: %s", strerror(errno));
    int64_t size = ckpt_file_size_(path);
    int32_t header[OMNI_HEADER_INTS];
    if (size < OMNI_HEADER_BYTES + CHECKPOINT_TRAILER_BYTES || fread(header, sizeof(header), 1, fp) != 1) {
        checkpoint_fail_(fp, path, "truncated: %lld bytes, too short for a checkpoint", (long long)size);
    }
    ModelConfig config;
    CheckpointInfo info;
    if (!checkpoint_check_header_basic_(header, size, why, sizeof(why))) checkpoint_fail_(fp, path, "%s", why);
    if (!checkpoint_check_header_sizes_(header, &config, &info, why, sizeof(why))) {
        // an inconsistent header: say "corrupt" when the checksum says so
        if (!checkpoint_verify(path, why_verify, sizeof(why_verify))) checkpoint_fail_(fp, path, "%s", why_verify);
        checkpoint_fail_(fp, path, "%s", why);
    }
    if (expected_config != NULL && model_config_first_difference(&config, expected_config) >= 0) {
        if (!checkpoint_verify(path, why_verify, sizeof(why_verify))) checkpoint_fail_(fp, path, "%s", why_verify);
        checkpoint_model_differs(path, &config, expected_config);
        fclose(fp);
        exit(EXIT_FAILURE);
    }
    if (!model_config_validate(&config)) checkpoint_fail_(fp, path, "the model configuration in its header is impossible");
    r->fp = fp;
    r->payload_bytes = size - CHECKPOINT_TRAILER_BYTES;
    r->bytes_read = OMNI_HEADER_BYTES;
    checkpoint_hash_init(&r->hash);
    checkpoint_hash_update(&r->hash, header, sizeof(header));
    if (out_config != NULL) *out_config = config;
    if (out_info != NULL) *out_info = info;
}

// the next `bytes` of the sections into dst (dst NULL = skip them; they are still checksummed)
static inline void checkpoint_reader_get(CheckpointReader* r, void* dst, size_t bytes) {
    if (r->bytes_read + (int64_t)bytes > r->payload_bytes) {
        checkpoint_fail_(r->fp, r->path, "a read past the end of the sections (internal error)");
    }
    if (dst != NULL) {
        if (fread(dst, 1, bytes, r->fp) != bytes) {
            checkpoint_fail_(r->fp, r->path, "read error: %s", ferror(r->fp) ? strerror(errno) : "unexpected end of file");
        }
        checkpoint_hash_update(&r->hash, dst, bytes);
    } else {
        unsigned char chunk[1 << 14];
        size_t left = bytes;
        while (left > 0) {
            size_t n = left < sizeof(chunk) ? left : sizeof(chunk);
            if (fread(chunk, 1, n, r->fp) != n) {
                checkpoint_fail_(r->fp, r->path, "read error: %s", ferror(r->fp) ? strerror(errno) : "unexpected end of file");
            }
            checkpoint_hash_update(&r->hash, chunk, n);
            left -= n;
        }
    }
    r->bytes_read += (int64_t)bytes;
}

// reads (and checksums) what was not read, then checks the end magic and the checksum
static inline void checkpoint_reader_close(CheckpointReader* r) {
    if (r->bytes_read < r->payload_bytes) checkpoint_reader_get(r, NULL, (size_t)(r->payload_bytes - r->bytes_read));
    unsigned char trailer[CHECKPOINT_TRAILER_BYTES];
    if (fread(trailer, 1, sizeof(trailer), r->fp) != sizeof(trailer)) checkpoint_fail_(r->fp, r->path, "truncated trailer");
    if (memcmp(trailer + 8, CHECKPOINT_END_MAGIC, 8) != 0) {
        checkpoint_fail_(r->fp, r->path, "end magic missing (incomplete or corrupt file)");
    }
    uint64_t stored, computed = checkpoint_hash_final(&r->hash);
    memcpy(&stored, trailer, 8);
    if (stored != computed) {
        checkpoint_fail_(r->fp, r->path, "checksum mismatch (stored %016llx, computed %016llx): the file is corrupt",
                         (unsigned long long)stored, (unsigned long long)computed);
    }
    fclose(r->fp);
    r->fp = NULL;
}

// The header only (checked for consistency, not checksummed): the model and the run record with
// the section sizes, so a caller can size its buffers before checkpoint_read.
static inline void checkpoint_read_info(const char* path, ModelConfig* out_config, CheckpointInfo* out_info) {
    CheckpointReader r;
    checkpoint_reader_open(&r, path, NULL, out_config, out_info);
    fclose(r.fp);
}

// One call: reads a whole checkpoint into host buffers and verifies it; exits with a message on
// any problem. The model must equal expected_config. num_bn_sets, loader_bytes and rng_bytes must
// equal the file's (see checkpoint_read_info). Any destination may be NULL to skip its section.
static inline void checkpoint_read(const char* path, const ModelConfig* expected_config, CheckpointInfo* out_info,
                                   float* params, float* m, float* v, float* bn_stats, int num_bn_sets,
                                   void* loader_state, size_t loader_bytes, void* rng_state, size_t rng_bytes) {
    CheckpointReader r;
    CheckpointInfo info;
    ModelConfig config;
    checkpoint_reader_open(&r, path, expected_config, &config, &info);
    if (info.num_bn_sets != num_bn_sets && info.num_bn_stats > 0) {
        checkpoint_fail_(r.fp, path, "it holds %d sets of BN statistics, the caller expects %d", info.num_bn_sets,
                         num_bn_sets);
    }
    if ((size_t)info.loader_bytes != loader_bytes) {
        checkpoint_fail_(r.fp, path, "its data-loader state has %lld bytes, %zu expected (a different data-loader "
                         "version or process count?)", info.loader_bytes, loader_bytes);
    }
    if ((size_t)info.rng_bytes != rng_bytes) {
        checkpoint_fail_(r.fp, path, "its RNG state has %lld bytes, %zu expected", info.rng_bytes, rng_bytes);
    }
    size_t P = (size_t)info.num_params;
    if (info.num_parts > 0) {  // version 3: the manifest's sections, then params, m, v from the parts
        CheckpointPartEntry* table = (CheckpointPartEntry*)malloc_check((size_t)info.num_parts * sizeof(CheckpointPartEntry));
        checkpoint_reader_get(&r, bn_stats, (size_t)info.num_bn_stats * (size_t)info.num_bn_sets * sizeof(float));
        checkpoint_reader_get(&r, loader_state, loader_bytes);
        checkpoint_reader_get(&r, rng_state, rng_bytes);
        checkpoint_reader_get(&r, table, (size_t)info.num_parts * sizeof(CheckpointPartEntry));
        checkpoint_reader_close(&r);
        if ((params != NULL || m != NULL || v != NULL) &&
            checkpoint_parts_read_logical(path, &config, &info, table, params, m, v) != 0) {
            exit(EXIT_FAILURE);  // the part is named above
        }
        free(table);
        if (out_info != NULL) *out_info = info;
        return;
    }
    checkpoint_reader_get(&r, params, P * sizeof(float));
    checkpoint_reader_get(&r, m, P * sizeof(float));
    checkpoint_reader_get(&r, v, P * sizeof(float));
    checkpoint_reader_get(&r, bn_stats, (size_t)info.num_bn_stats * (size_t)info.num_bn_sets * sizeof(float));
    checkpoint_reader_get(&r, loader_state, loader_bytes);
    checkpoint_reader_get(&r, rng_state, rng_bytes);
    checkpoint_reader_close(&r);
    if (out_info != NULL) *out_info = info;
}

// What fixes the data and its order (the training data, --shuffle, --seed, -b, -t) must equal the
// checkpoint's, since continuing would silently train on other data or in another order: returns
// 1 after one message naming the first difference, else 0. Does not exit, so a trainer of several
// processes can let all of them stop together.
static inline int checkpoint_run_differs(const char* path, const CheckpointInfo* saved, const RunIdentity* now) {
    const RunIdentity* was = &saved->run;
    const char* advice = "resume with the same flags and data, or start a new run in another -o directory";
    char detail[256] = "";
    if (was->data_shards != now->data_shards || was->data_tokens != now->data_tokens) {
        snprintf(detail, sizeof(detail), "training data (-i) of %d shard(s) with %lld tokens, this run has %d shard(s) "
                 "with %lld tokens", was->data_shards, was->data_tokens, now->data_shards, now->data_tokens);
    } else if (was->data_fingerprint != now->data_fingerprint) {
        snprintf(detail, sizeof(detail), "training data (-i) of fingerprint %016llx, this run's data (as many shards and "
                 "tokens) has %016llx: the tokens differ", (unsigned long long)was->data_fingerprint,
                 (unsigned long long)now->data_fingerprint);
    } else if (was->shuffle != now->shuffle) {
        snprintf(detail, sizeof(detail), "--shuffle %d, this run has --shuffle %d", was->shuffle, now->shuffle);
    } else if (was->seed != now->seed) {
        snprintf(detail, sizeof(detail), "--seed %llu, this run has --seed %llu", was->seed, now->seed);
    } else if (was->B != now->B || was->T != now->T) {
        snprintf(detail, sizeof(detail), "-b %d -t %d, this run has -b %d -t %d", was->B, was->T, now->B, now->T);
    }
    if (detail[0] == '\0') return 0;
    fprintf(stderr, "Error: checkpoint \"%s\" was written with %s: %s\n", path, detail, advice);
    return 1;
}

// The resume check: exits when checkpoint_run_differs. The other settings may change on resume
// (e.g. a longer -x, another -l, another process count): a note is printed for each; returns how
// many.
static inline int checkpoint_compare_run(const char* path, const CheckpointInfo* saved, const RunIdentity* now) {
    if (checkpoint_run_differs(path, saved, now)) exit(EXIT_FAILURE);
    const RunIdentity* was = &saved->run;
    int diffs = 0;
#define CKPT_CMP_INT_(flag, saved_value, now_value)                                                          \
    if ((long long)(saved_value) != (long long)(now_value)) {                                               \
        printf("Note: resuming with %s %lld (the checkpoint was written with %lld)\n", flag,                \
               (long long)(now_value), (long long)(saved_value));                                            \
        diffs++;                                                                                              \
    }
#define CKPT_CMP_FLOAT_(flag, saved_value, now_value)                                                        \
    if ((saved_value) != (now_value)) {                                                                       \
        printf("Note: resuming with %s %g (the checkpoint was written with %g)\n", flag, (double)(now_value), \
               (double)(saved_value));                                                                        \
        diffs++;                                                                                              \
    }
    CKPT_CMP_INT_("-d (tokens per step)", was->total_batch_size, now->total_batch_size)
    CKPT_CMP_INT_("processes", was->num_processes, now->num_processes)
    CKPT_CMP_INT_("-x", was->num_steps, now->num_steps)
    CKPT_CMP_INT_("-u", was->warmup_steps, now->warmup_steps)
    CKPT_CMP_INT_("--schedule", was->lr_schedule, now->lr_schedule)
    CKPT_CMP_INT_("--expert-exec", was->expert_exec, now->expert_exec)
    CKPT_CMP_INT_("--attention (0 ours, 1 cudnn)", was->attention, now->attention)
    CKPT_CMP_INT_("-r (--recompute)", was->recompute, now->recompute)
    CKPT_CMP_FLOAT_("-l", was->learning_rate, now->learning_rate)
    CKPT_CMP_FLOAT_("-q", was->final_lr_frac, now->final_lr_frac)
    CKPT_CMP_FLOAT_("--decay-frac", was->decay_frac, now->decay_frac)
    CKPT_CMP_FLOAT_("-c", was->weight_decay, now->weight_decay)
    CKPT_CMP_FLOAT_("--grad-clip", was->grad_clip, now->grad_clip)
    CKPT_CMP_FLOAT_("--beta1", was->beta1, now->beta1)
    CKPT_CMP_FLOAT_("--beta2", was->beta2, now->beta2)
    CKPT_CMP_FLOAT_("--eps", was->eps, now->eps)
    CKPT_CMP_FLOAT_("--moe-aux", was->moe_aux, now->moe_aux)
    CKPT_CMP_FLOAT_("--moe-zc-weight", was->moe_zc_weight, now->moe_zc_weight)
    CKPT_CMP_FLOAT_("--moe-bias-rate", was->moe_bias_rate, now->moe_bias_rate)
#undef CKPT_CMP_INT_
#undef CKPT_CMP_FLOAT_
    return diffs;
}

#include "checkpoint_parts.h"  // the sharded format (version 3): part files and re-sharding

#endif // OMNIMOE_CHECKPOINT_H
