/*
 * checkpoint_parts.h - sharded training checkpoints (docs/sharding.md §4): one manifest
 * (ckpt_<step>.bin, version 3, laid out in llmc/checkpoint.h) and one part file per rank, each
 * written by its rank at the same time as the others; reading re-shards to any process count.
 * Included at the end of llmc/checkpoint.h. Plain C (gcc -std=c11 and nvcc).
 *
 * Part file <dir>/ckpt_<step:08d>.part<r>of<P>.bin:
 *   header, 256 int32: [0] magic 20261104 [1] version 1 [2..14] the model config (as every header)
 *     [16] rank r [17] num_parts P [18] shard_mode [19] step [20..21] elems E (int64)
 *     [22..23] file_bytes (int64); all other slots 0
 *   fp32 master[E], m[E], v[E]: rank r's shard in packed order (checkpoint_parts_map)
 *   trailer, 16 bytes: XXH64 of header + sections, "OMNI-END" (as every file here)
 *   file_bytes = 1024 + 12E + 16. The manifest's part table holds each part's size and hash.
 *
 * The logical content (the flat params, m and v of a version-2 file) is a pure function of
 * (config, P, shard_mode): checkpoint_parts_map gives part r's ranges. shard_mode bit 0 is ZeRO-1
 * (llmc/zero_shard.h: the chunks of rank r, then the replicated tails, which every part holds;
 * readers take them from part 0). Bit 1 alone is the column-sharded expert tables (docs/sharding.md
 * §3, --shard-experts 1): part r holds rank r's local buffers of llmc/expert_shard_layout.h (every
 * tensor whole except U and V, which are rank r's (L*N, C/P) column slices); the whole tensors are
 * in every part and read from part 0; checkpoint_parts_read_tables_local re-shards the columns to
 * any P. Both bits together are refused (no trainer writes them).
 *
 * API (the manifest reader exits with one message naming the file on any problem; the part readers
 * and the writers print that message and return -1, so that the ranks of a multi-GPU resume can
 * agree on a part that one of them found corrupt, as on a failed save):
 *   checkpoint_part_path()          the name of part r of P
 *   checkpoint_parts_map()          part r's ranges of the flat layout, packed order
 *   checkpoint_part_write()         rank r's part, crash-safe (.tmp, fsync, rename); gives its
 *                                   table entry. Refuses non-finite state.
 *   checkpoint_manifest_write()     rank 0, after every part is written: the manifest
 *   checkpoint_parts_remove()       a failed save: the parts of that step that were written
 *   checkpoint_manifest_read_table() the verified manifest's part table (malloc'ed)
 *   checkpoint_parts_read_shard()   the ranges of a new map (any P) from the parts, verified; 0 or -1
 *   checkpoint_parts_tables_layout() part r's local layout under SHARD_MODE_TABLES
 *   checkpoint_parts_read_tables_local() a tables rank's local state (any P) from tables parts; 0 or -1
 *   checkpoint_parts_read_logical() the whole flat params / m / v (what checkpoint_read uses); 0 or -1
 *   checkpoint_parts_check_files()  every part exists with its size (checkpoint_verify uses it)
 *
 * Verification: every part a reader takes bytes from is hashed in full (streamed) and compared
 * with its trailer and the manifest's entry, and its header with the manifest (rank, P, mode,
 * step, model, element count), before any of its bytes are used. A missing, truncated, corrupt
 * or foreign part (another step, another run) is refused with the part's name (a return of -1:
 * checkpoint_read exits on it, the CUDA trainer's resume lets the ranks agree first).
 */
#ifndef OMNIMOE_CHECKPOINT_PARTS_H
#define OMNIMOE_CHECKPOINT_PARTS_H

#include "checkpoint.h"
#include "zero_shard.h"
#include "expert_shard_layout.h"

#define CHECKPOINT_PART_MAGIC 20261104
#define CHECKPOINT_PART_VERSION 1
enum { SHARD_MODE_ZERO = 1, SHARD_MODE_TABLES = 2 };  // bits of shard_mode

static inline void checkpoint_part_path(char* out, size_t size, const char* dir, int step, int rank, int num_parts) {
    snprintf(out, size, "%s/ckpt_%08d.part%dof%d.bin", dir, step, rank, num_parts);
}

// the part's name next to its manifest "<...>/ckpt_<step>.bin"
static inline void checkpoint_part_path_of_(char* out, size_t size, const char* manifest_path, int rank,
                                            int num_parts) {
    size_t len = strlen(manifest_path);
    int stem = len >= 4 && strcmp(manifest_path + len - 4, ".bin") == 0 ? (int)(len - 4) : (int)len;
    snprintf(out, size, "%.*s.part%dof%d.bin", stem, manifest_path, rank, num_parts);
}

static inline int64_t checkpoint_part_file_bytes(size_t elems) {
    return OMNI_HEADER_BYTES + 12 * (int64_t)elems + CHECKPOINT_TRAILER_BYTES;
}

// Part r of P's ranges in packed order (ZeRO-1). Returns 0 with the reason for a mode this build
// cannot lay out as ranges (SHARD_MODE_TABLES alone is laid out by checkpoint_parts_tables_layout).
static inline int checkpoint_parts_map(ZeroShardMap* map, const ModelConfig* c, int num_parts, int rank,
                                       int shard_mode, char* why, size_t why_size) {
    if (shard_mode != SHARD_MODE_ZERO) {
        snprintf(why, why_size, "shard mode %d is not one this build lays out as ZeRO-1 ranges (bit 0 = ZeRO-1, "
                 "bit 1 = the column-sharded expert tables; both together are not written by any trainer)",
                 shard_mode);
        return 0;
    }
    if (num_parts < 1 || rank < 0 || rank >= num_parts) {
        snprintf(why, why_size, "part %d of %d is impossible", rank, num_parts);
        return 0;
    }
    zero_shard_map(map, c, num_parts, rank);
    return 1;
}

// Part r of P of the column-sharded tables (SHARD_MODE_TABLES): rank r's local layout
// (llmc/expert_shard_layout.h; part r holds master, m and v in it, lay->num_local each). Returns 0
// with the reason when this model cannot be cut so.
static inline int checkpoint_parts_tables_layout(ExpertShardLayout* lay, const ModelConfig* c, int num_parts, int rank,
                                                 char* why, size_t why_size) {
    const char* unfit = c->ffn_kind != FFN_OMNI ? "an omni model" : expert_shard_unfit(c->channels, num_parts);
    if (unfit != NULL || rank < 0 || rank >= num_parts) {
        snprintf(why, why_size, "part %d of %d of column-sharded expert tables needs %s (C=%d)", rank, num_parts,
                 unfit != NULL ? unfit : "0 <= part < parts", c->channels);
        return 0;
    }
    expert_shard_layout(lay, c, num_parts, rank);
    return 1;
}

// ----------------------------------------------------------------------------
// writing

// Rank `rank` writes its part: master, m, v of `elems` floats each (its packed shard). Crash-safe.
// Returns 0 with the manifest's entry for it in *out_entry, or -1 after one message naming the
// part and the cause: a non-finite value (nothing written) or a failed write (no .tmp left).
CKPT_MUST_CHECK static inline int checkpoint_part_write(const char* dir, int step, const ModelConfig* c, int rank,
                                                        int num_parts, int shard_mode, const float* master,
                                                        const float* m, const float* v, size_t elems,
                                                        CheckpointPartEntry* out_entry) {
    char path[CHECKPOINT_PATH_MAX + 64], why[256];
    checkpoint_part_path(path, sizeof(path), dir, step, rank, num_parts);
    if (!ckpt_floats_finite_(master, elems, "the master weights", why, sizeof(why)) ||
        !ckpt_floats_finite_(m, elems, "the AdamW first moments (m)", why, sizeof(why)) ||
        !ckpt_floats_finite_(v, elems, "the AdamW second moments (v)", why, sizeof(why))) {
        fprintf(stderr, "Error: refusing to write checkpoint part \"%s\": %s; nothing non-finite is saved\n", path, why);
        return -1;
    }
    int32_t h[OMNI_HEADER_INTS];
    omni_header_init(h, CHECKPOINT_PART_MAGIC, CHECKPOINT_PART_VERSION, c);
    h[16] = rank;
    h[17] = num_parts;
    h[18] = shard_mode;
    h[19] = step;
    ckpt_put_i64_(h, 20, (int64_t)elems);
    ckpt_put_i64_(h, 22, checkpoint_part_file_bytes(elems));
    CkptSafeFile f;
    ckpt_safe_open_(&f, path);
    ckpt_safe_write_(&f, h, sizeof(h));
    ckpt_safe_write_(&f, master, elems * sizeof(float));
    ckpt_safe_write_(&f, m, elems * sizeof(float));
    ckpt_safe_write_(&f, v, elems * sizeof(float));
    CheckpointPartEntry entry = {f.bytes_written + CHECKPOINT_TRAILER_BYTES, checkpoint_hash_final(&f.hash)};
    ckpt_safe_write_trailer_(&f);
    if (ckpt_safe_commit_(&f) != 0) return -1;
    *out_entry = entry;
    return 0;
}

// After a failed save of a step (a part or the manifest could not be written): removes the part
// files of that step written by the ranks that succeeded, so that nothing of it is left (without
// a manifest they are no checkpoint). Returns how many were removed.
static inline int checkpoint_parts_remove(const char* dir, int step, int num_parts) {
    int removed = 0;
    for (int r = 0; r < num_parts; r++) {
        char path[CHECKPOINT_PATH_MAX + 64];
        checkpoint_part_path(path, sizeof(path), dir, step, r, num_parts);
        if (unlink(path) == 0) removed++;
    }
    return removed;
}

// Rank 0, once every part of the step is on disk: the manifest <dir>/ckpt_<info->step>.bin with
// the manifest sections (as checkpoint_write) and the parts' table. The checkpoint exists from here
// on. Returns 0, or -1 after one message (as checkpoint_write).
CKPT_MUST_CHECK static inline int checkpoint_manifest_write(const char* dir, const ModelConfig* config, const CheckpointInfo* info,
                                             const float* bn_stats, int num_bn_sets, const void* loader_state,
                                             size_t loader_bytes, const void* rng_state, size_t rng_bytes,
                                             int num_parts, int shard_mode, const CheckpointPartEntry* table,
                                             char* out_path) {
    CheckpointInfo full = *info;
    full.num_params = (long long)model_config_num_params(config);
    full.num_bn_stats = (long long)model_config_num_bn_stats(config);
    full.num_bn_sets = num_bn_sets;
    full.loader_bytes = (long long)loader_bytes;
    full.rng_bytes = (long long)rng_bytes;
    full.num_parts = num_parts;
    full.shard_mode = shard_mode;
    size_t bn_floats = (size_t)full.num_bn_stats * (size_t)(num_bn_sets > 0 ? num_bn_sets : 0);
    char why[256];
    if (num_parts < 1 || shard_mode < 1 || table == NULL ||
        !ckpt_floats_finite_(bn_stats, bn_floats, "the BN running statistics", why, sizeof(why))) {
        fprintf(stderr, "Error: refusing to write the manifest of checkpoint step %d in %s: %s\n", info->step, dir,
                num_parts < 1 || shard_mode < 1 || table == NULL ? "no parts" : why);
        return -1;
    }
    CheckpointWriter w;
    checkpoint_writer_open(&w, dir, config, &full);
    checkpoint_writer_put(&w, bn_stats, bn_floats * sizeof(float));
    checkpoint_writer_put(&w, loader_state, loader_bytes);
    checkpoint_writer_put(&w, rng_state, rng_bytes);
    checkpoint_writer_put(&w, table, (size_t)num_parts * sizeof(CheckpointPartEntry));
    return checkpoint_writer_close(&w, out_path);
}

// ----------------------------------------------------------------------------
// reading

// the message naming the part; closes fp; the caller returns its failure (no exit)
static inline void ckpt_part_fail_(FILE* fp, const char* part, const char* manifest, const char* fmt, ...) {
    va_list args;
    va_start(args, fmt);
    fprintf(stderr, "Error: checkpoint part \"%s\" (of %s): ", part, manifest);
    vfprintf(stderr, fmt, args);
    fprintf(stderr, "\n");
    va_end(args);
    if (fp != NULL) fclose(fp);
}

// pread of exactly `bytes` at `offset`, 1 on success
static inline int ckpt_pread_all_(int fd, void* dst, size_t bytes, int64_t offset) {
    unsigned char* p = (unsigned char*)dst;
    while (bytes > 0) {
        ssize_t n = pread(fd, p, bytes, (off_t)offset);
        if (n <= 0) return 0;
        p += n;
        bytes -= (size_t)n;
        offset += n;
    }
    return 1;
}

// the part table at the end of a manifest whose header is sound (no hash check: see the callers)
static inline int ckpt_manifest_table_(const char* path, const CheckpointInfo* info, CheckpointPartEntry* table) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return 0;
    int64_t size = ckpt_file_size_(path);
    int64_t at = size - CHECKPOINT_TRAILER_BYTES - (int64_t)info->num_parts * CHECKPOINT_PART_ENTRY_BYTES;
    int ok = ckpt_pread_all_(fd, table, (size_t)info->num_parts * sizeof(CheckpointPartEntry), at);
    close(fd);
    return ok;
}

// checkpoint_verify's check of a version-3 manifest (itself already verified): every part exists,
// is a regular file and has the size of its table entry. Returns 0 with the reason otherwise.
static inline int checkpoint_parts_check_files(const char* manifest_path, const CheckpointInfo* info, char* why,
                                               size_t why_size) {
    CheckpointPartEntry* table = (CheckpointPartEntry*)malloc_check((size_t)info->num_parts * sizeof(CheckpointPartEntry));
    int ok = ckpt_manifest_table_(manifest_path, info, table);
    if (!ok) snprintf(why, why_size, "cannot read its part table");
    for (int r = 0; ok && r < info->num_parts; r++) {
        char part[CHECKPOINT_PATH_MAX + 64], what[200];
        checkpoint_part_path_of_(part, sizeof(part), manifest_path, r, info->num_parts);
        const char* name = strrchr(part, '/') ? strrchr(part, '/') + 1 : part;  // why is short: the name only
        if (!ckpt_regular_file_(part, what, sizeof(what))) {
            snprintf(why, why_size, "part file %.120s: %.100s", name, what);
            ok = 0;
        } else if (ckpt_file_size_(part) != table[r].bytes) {
            snprintf(why, why_size, "part file %.120s has %lld bytes, the manifest says %lld%s", name,
                     (long long)ckpt_file_size_(part), (long long)table[r].bytes,
                     ckpt_file_size_(part) < table[r].bytes ? " (truncated)" : "");
            ok = 0;
        }
    }
    free(table);
    return ok;
}

// The manifest at path, fully verified (hash, sizes, model = expected_config when not NULL):
// its run record into *info and its part table (malloc'ed; the caller frees it).
static inline CheckpointPartEntry* checkpoint_manifest_read_table(const char* path, const ModelConfig* expected_config,
                                                                  ModelConfig* out_config, CheckpointInfo* info) {
    CheckpointReader r;
    checkpoint_reader_open(&r, path, expected_config, out_config, info);
    if (info->num_parts < 1) checkpoint_fail_(r.fp, path, "it is a single-file checkpoint (version 2), not a manifest");
    checkpoint_reader_get(&r, NULL, (size_t)info->num_bn_stats * (size_t)info->num_bn_sets * sizeof(float) +
                                        (size_t)info->loader_bytes + (size_t)info->rng_bytes);
    CheckpointPartEntry* table = (CheckpointPartEntry*)malloc_check((size_t)info->num_parts * sizeof(CheckpointPartEntry));
    checkpoint_reader_get(&r, table, (size_t)info->num_parts * sizeof(CheckpointPartEntry));
    checkpoint_reader_close(&r);
    return table;
}

// Opens part `rank` of the manifest and proves it is the one the manifest names: size, header
// (rank, parts, mode, step, model, elements) and the XXH64 of all of it against its trailer and
// the manifest's table. Returns the open file, or NULL after a message naming the part.
static inline FILE* ckpt_part_open_verified_(const char* manifest, const ModelConfig* config,
                                             const CheckpointInfo* info, const CheckpointPartEntry* entry, int rank,
                                             size_t elems) {
    char part[CHECKPOINT_PATH_MAX + 64], why[200];
    checkpoint_part_path_of_(part, sizeof(part), manifest, rank, info->num_parts);
    if (!ckpt_regular_file_(part, why, sizeof(why))) {
        ckpt_part_fail_(NULL, part, manifest, "missing part: %s", why);
        return NULL;
    }
    int64_t size = ckpt_file_size_(part);
    if (size != entry->bytes || size != checkpoint_part_file_bytes(elems)) {
        ckpt_part_fail_(NULL, part, manifest, "%s: %lld bytes, the manifest says %lld (and %zu elements need %lld)",
                        size < entry->bytes ? "truncated" : "wrong size", (long long)size, (long long)entry->bytes,
                        elems, (long long)checkpoint_part_file_bytes(elems));
        return NULL;
    }
    FILE* fp = fopen(part, "rb");
    if (fp == NULL) {
        ckpt_part_fail_(NULL, part, manifest, "cannot open: %s", strerror(errno));
        return NULL;
    }
    int32_t h[OMNI_HEADER_INTS];
    if (fread(h, sizeof(h), 1, fp) != 1) {
        ckpt_part_fail_(fp, part, manifest, "cannot read its header");
        return NULL;
    }
    CheckpointHash hash;
    checkpoint_hash_init(&hash);
    checkpoint_hash_update(&hash, h, sizeof(h));
    size_t chunk_size = 1 << 20;
    unsigned char* chunk = (unsigned char*)malloc_check(chunk_size);
    int64_t left = size - OMNI_HEADER_BYTES - CHECKPOINT_TRAILER_BYTES;
    while (left > 0) {
        size_t n = left < (int64_t)chunk_size ? (size_t)left : chunk_size;
        if (fread(chunk, 1, n, fp) != n) {
            free(chunk);
            ckpt_part_fail_(fp, part, manifest, "read error: %s", ferror(fp) ? strerror(errno) : "unexpected end");
            return NULL;
        }
        checkpoint_hash_update(&hash, chunk, n);
        left -= (int64_t)n;
    }
    free(chunk);
    unsigned char trailer[CHECKPOINT_TRAILER_BYTES];
    if (fread(trailer, 1, sizeof(trailer), fp) != sizeof(trailer) || memcmp(trailer + 8, CHECKPOINT_END_MAGIC, 8) != 0) {
        ckpt_part_fail_(fp, part, manifest, "end magic missing (incomplete or corrupt file)");
        return NULL;
    }
    uint64_t stored, computed = checkpoint_hash_final(&hash);
    memcpy(&stored, trailer, 8);
    if (stored != computed) {
        ckpt_part_fail_(fp, part, manifest, "checksum mismatch (stored %016llx, computed %016llx): the part is corrupt",
                        (unsigned long long)stored, (unsigned long long)computed);
        return NULL;
    }
    ModelConfig part_config;
    model_config_from_header(h, &part_config);
    if (h[0] != CHECKPOINT_PART_MAGIC || h[1] != CHECKPOINT_PART_VERSION || h[16] != rank ||
        h[17] != info->num_parts || h[18] != info->shard_mode || h[19] != info->step ||
        ckpt_get_i64_(h, 20) != (int64_t)elems || model_config_first_difference(&part_config, config) >= 0) {
        ckpt_part_fail_(fp, part, manifest, "its header (magic %d, version %d, part %d of %d, mode %d, step %d, %lld "
                        "elements) does not match the manifest (part %d of %d, mode %d, step %d, %zu elements, the "
                        "same model)", h[0], h[1], h[16], h[17], h[18], h[19], (long long)ckpt_get_i64_(h, 20), rank,
                        info->num_parts, info->shard_mode, info->step, elems);
        return NULL;
    }
    if (computed != entry->hash) {
        ckpt_part_fail_(fp, part, manifest, "its hash %016llx is not the manifest's %016llx: a part of another "
                        "checkpoint or run", (unsigned long long)computed, (unsigned long long)entry->hash);
        return NULL;
    }
    return fp;
}

// ----------------------------------------------------------------------------
// column-sharded tables (SHARD_MODE_TABLES): re-sharding to any P on load

// the message; the caller returns -1 (no exit: the ranks of a multi-GPU resume agree first)
static inline int ckpt_tables_fail_(const char* manifest, const char* why) {
    fprintf(stderr, "Error: checkpoint \"%s\": %s\n", manifest, why);
    return -1;
}

// New rank lay2->rank of lay2->P: its local master, m and v (lay2->num_local each, any NULL to
// skip) from a SHARD_MODE_TABLES checkpoint of any part count P1: the replicated tensors from part
// 0, the columns of U and V from the old parts that hold them (expert_shard_reshard_needs), read
// by pread in blocks of rows. Every part read is verified in full first. With lay2 of P = 1 this
// is the whole flat state (what checkpoint_read gives a replicated or CPU run). Returns 0, or -1
// after one message naming the checkpoint or part (the outputs then hold a partial state).
static inline int checkpoint_parts_read_tables_local(const char* manifest, const ModelConfig* config,
                                                      const CheckpointInfo* info, const CheckpointPartEntry* table,
                                                      const ExpertShardLayout* lay2, float* master, float* m,
                                                      float* v) {
    const int P1 = info->num_parts;
    char why[256];
    ExpertShardLayout lay1;  // the offsets are every old part's
    if (info->shard_mode != SHARD_MODE_TABLES) {
        snprintf(why, sizeof(why), "shard mode %d, not the column-sharded tables' %d", info->shard_mode,
                 SHARD_MODE_TABLES);
        return ckpt_tables_fail_(manifest, why);
    }
    if (!checkpoint_parts_tables_layout(&lay1, config, P1, 0, why, sizeof(why))) return ckpt_tables_fail_(manifest, why);
    if (lay2->num_full != lay1.num_full || lay2->C != lay1.C) return ckpt_tables_fail_(manifest, "another model's layout");
    FILE** fps = (FILE**)calloc((size_t)P1, sizeof(FILE*));
    const void** blocks = (const void**)calloc((size_t)P1, sizeof(void*));
    float** bufs = (float**)calloc((size_t)P1, sizeof(float*));
    int ok = fps != NULL && blocks != NULL && bufs != NULL;
    if (!ok) ckpt_tables_fail_(manifest, "out of host memory");
    const int C = lay1.C, cols1 = C / P1, cols2 = C / lay2->P;
    const size_t block_rows = ((size_t)1 << 22) / (size_t)C > 0 ? ((size_t)1 << 22) / (size_t)C : 1;
    for (int q = 0; q < P1 && ok; q++) {
        if (!expert_shard_local_needs(q, P1, lay2)) continue;
        fps[q] = ckpt_part_open_verified_(manifest, config, info, &table[q], q, lay1.num_local);
        ok = fps[q] != NULL;  // it said why
        if (ok) bufs[q] = (float*)malloc_check(block_rows * (size_t)cols1 * sizeof(float));
    }
    float* out[3] = {master, m, v};
    for (int k = 0; k < 3 && ok; k++) {
        if (out[k] == NULL) continue;
        const int64_t section = OMNI_HEADER_BYTES + 4 * (int64_t)k * (int64_t)lay1.num_local;
        for (int i = 0; i < NUM_PARAMETER_TENSORS && ok; i++) {
            if (!expert_shard_is_table(i)) {  // replicated: part 0's
                ok = ckpt_pread_all_(fileno(fps[0]), out[k] + lay2->offsets[i], lay2->sizes[i] * sizeof(float),
                                     section + 4 * (int64_t)lay1.offsets[i]);
                continue;
            }
            for (size_t r0 = 0; r0 < lay1.rows && ok; r0 += block_rows) {
                const size_t nb = lay1.rows - r0 < block_rows ? lay1.rows - r0 : block_rows;
                for (int q = 0; q < P1 && ok; q++) {
                    blocks[q] = bufs[q];
                    if (fps[q] == NULL) continue;
                    ok = ckpt_pread_all_(fileno(fps[q]), bufs[q], nb * (size_t)cols1 * sizeof(float),
                                         section + 4 * (int64_t)(lay1.offsets[i] + r0 * (size_t)cols1));
                }
                if (ok) expert_shard_reshard(out[k] + lay2->offsets[i] + r0 * (size_t)cols2, blocks, sizeof(float), nb,
                                             C, P1, lay2->rank, lay2->P);
            }
        }
        if (!ok) ckpt_tables_fail_(manifest, "read error in one of its parts (they were verified: changed since?)");
    }
    for (int q = 0; q < P1 && fps != NULL && bufs != NULL; q++) {
        if (fps[q] != NULL) fclose(fps[q]);
        free(bufs[q]);
    }
    free(fps);
    free(blocks);
    free(bufs);
    return ok ? 0 : -1;
}

// out_*[want[i].shard_offset + j] = the saved state at flat want[i].offset + j, for every wanted
// range; out_* may be NULL to skip a section. Reads only the parts that hold wanted elements
// (part q's chunks; the replicated tails from part 0), each verified in full first. Returns 0, or
// -1 after one message naming the part (the out_* buffers then hold a partial state: unusable).
static inline int checkpoint_parts_read_ranges(const char* manifest, const ModelConfig* config,
                                                const CheckpointInfo* info, const CheckpointPartEntry* table,
                                                const ZeroRange* want, int num_want, float* out_master, float* out_m,
                                                float* out_v) {
    float* out[3] = {out_master, out_m, out_v};
    if (info->shard_mode == SHARD_MODE_TABLES) {  // the whole state (P = 1), then the wanted ranges
        ExpertShardLayout whole;
        expert_shard_layout(&whole, config, 1, 0);
        float* full[3] = {NULL, NULL, NULL};
        for (int k = 0; k < 3; k++) {
            if (out[k] != NULL) full[k] = (float*)malloc_check(whole.num_full * sizeof(float));
        }
        int rc = checkpoint_parts_read_tables_local(manifest, config, info, table, &whole, full[0], full[1], full[2]);
        for (int k = 0; k < 3; k++) {
            if (full[k] == NULL) continue;
            for (int j = 0; j < num_want && rc == 0; j++) {
                memcpy(out[k] + want[j].shard_offset, full[k] + want[j].offset, want[j].count * sizeof(float));
            }
            free(full[k]);
        }
        return rc;
    }
    for (int q = 0; q < info->num_parts; q++) {
        ZeroShardMap old;
        char why[256];
        if (!checkpoint_parts_map(&old, config, info->num_parts, q, info->shard_mode, why, sizeof(why))) {
            fprintf(stderr, "Error: checkpoint \"%s\": %s\n", manifest, why);
            return -1;
        }
        FILE* fp = NULL;
        for (int i = 0; i < old.num_ranges; i++) {
            const ZeroRange* R = &old.ranges[i];
            if (R->is_tail && q != 0) continue;  // tails: every part holds them, part 0 serves them
            for (int j = 0; j < num_want; j++) {
                const ZeroRange* W = &want[j];
                size_t lo = R->offset > W->offset ? R->offset : W->offset;
                size_t hi = R->offset + R->count < W->offset + W->count ? R->offset + R->count : W->offset + W->count;
                if (lo >= hi) continue;
                if (fp == NULL) fp = ckpt_part_open_verified_(manifest, config, info, &table[q], q, old.shard_elems);
                if (fp == NULL) {
                    zero_shard_map_free(&old);
                    return -1;
                }
                for (int k = 0; k < 3; k++) {
                    if (out[k] == NULL) continue;
                    int64_t at = OMNI_HEADER_BYTES + 4 * ((int64_t)k * (int64_t)old.shard_elems +
                                                          (int64_t)(R->shard_offset + (lo - R->offset)));
                    if (!ckpt_pread_all_(fileno(fp), out[k] + W->shard_offset + (lo - W->offset), (hi - lo) * sizeof(float), at)) {
                        char part[CHECKPOINT_PATH_MAX + 64];
                        checkpoint_part_path_of_(part, sizeof(part), manifest, q, info->num_parts);
                        ckpt_part_fail_(fp, part, manifest, "read error: %s", strerror(errno));
                        zero_shard_map_free(&old);
                        return -1;
                    }
                }
            }
        }
        if (fp != NULL) fclose(fp);
        zero_shard_map_free(&old);
    }
    return 0;
}

// A rank's shard under a new map (any P, the same model): packed master, m, v (map->shard_elems
// each). Returns 0, or -1 after the message (checkpoint_parts_read_ranges).
static inline int checkpoint_parts_read_shard(const char* manifest, const ModelConfig* config,
                                               const CheckpointInfo* info, const CheckpointPartEntry* table,
                                               const ZeroShardMap* map, float* master, float* m, float* v) {
    return checkpoint_parts_read_ranges(manifest, config, info, table, map->ranges, map->num_ranges, master, m, v);
}

// the whole flat params, m, v (num_params each; any may be NULL), as a version-2 file holds them.
// Returns 0, or -1 after the message (checkpoint_parts_read_ranges).
static inline int checkpoint_parts_read_logical(const char* manifest_path, const ModelConfig* config,
                                                 const CheckpointInfo* info, const CheckpointPartEntry* table,
                                                 float* params, float* m, float* v) {
    ZeroRange all = {0, (size_t)info->num_params, 0, 0, 0, 0};
    return checkpoint_parts_read_ranges(manifest_path, config, info, table, &all, 1, params, m, v);
}

#endif  // OMNIMOE_CHECKPOINT_PARTS_H
