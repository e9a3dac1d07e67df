/*
 * llmc/dataloader.h: distributed, streaming data loader over llm.c token shards.
 *
 * Shard format (docs/design.md §5): 256 int32 header {20240520 magic, 1 version, token count, 0...},
 * then `token count` uint16 tokens. Shards are streamed with 64-bit seeks; nothing loads a
 * whole shard, so shards of any size work.
 *
 * Windows. With BT = B*T, shard s holds W_s = (n_s - 1) / BT windows; window w covers tokens
 * [w*BT, w*BT + BT] (BT+1 tokens; neighbours share one token). inputs = the first BT tokens,
 * targets = the last BT (inputs shifted by one).
 *
 * Ranks. With P processes the windows of a shard are dealt out in rounds: in round j rank r reads
 * window order[j*P + r], where order is the identity (no shuffle) or a permutation of all W_s
 * windows. A shard gives floor(W_s / P) rounds, so every rank sees the same number of batches
 * per shard and the ranks' windows are disjoint; the last W_s mod P windows of a shard are
 * skipped (with P = 1 nothing is skipped). Without shuffle this is llm.c's layout.
 *
 * Shuffle (optional). Per epoch, the shard order is a permutation drawn from (seed, epoch) and
 * each shard's window order a permutation drawn from (seed, epoch, shard). Being pure functions
 * of those integers, no RNG stream has to be saved: the position {epoch, shard position,
 * windows consumed} fully determines what comes next, for any rank.
 *
 * Position. dataloader_get_state/dataloader_set_state copy the position into/out of a
 * DataLoaderState of plain integers (store it in a checkpoint). Restoring with the same number
 * of processes continues exactly; with a different number, the position within the current
 * shard is rounded up to the next full round (no window is seen twice, at most P-1 are skipped).
 *
 * Evaluation: dataloader_reset() then dataloader_num_batches() calls of dataloader_next_batch()
 * cover the same windows every time (one epoch, for this rank).
 *
 * Validation at init, one pass over every shard: only regular files (a FIFO, directory or device
 * is refused without blocking), header magic/version, token count against the file size, every
 * token < vocab_size. The same pass computes loader->fingerprint, XXH64 of the data (seeded with
 * the shard count, over each shard's header and tokens in path order), which a checkpoint records
 * so that a resume on other data is refused.
 *
 * Bad input (no file matches, not a regular file, bad magic/version, size inconsistent with the
 * header, a shard too small for one round, a token >= vocab_size) prints one message naming the
 * file and what was expected, then exit(EXIT_FAILURE).
 *
 * Not thread-safe; one DataLoader per process (or per thread).
 */
#ifndef LLMC_DATALOADER_H
#define LLMC_DATALOADER_H

#include "utils.h"
#include <glob.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/stat.h>
#ifndef XXH_INLINE_ALL
#define XXH_INLINE_ALL  // xxHash header-only: nothing to link
#endif
#include <xxhash.h>

#define SHARD_HEADER_INTS 256
#define SHARD_HEADER_BYTES (SHARD_HEADER_INTS * (int64_t)sizeof(int32_t))
#define SHARD_MAGIC 20240520
#define SHARD_VERSION 1
#define TOKENIZER_FILE_MAGIC 20240328 // used only to give a better message when a shard is one

// The complete, plain-integer position of a DataLoader (what a checkpoint stores).
typedef struct {
    int64_t epoch;             // completed passes over all shards
    int64_t shard_pos;         // index into this epoch's shard order
    int64_t window_pos;        // windows of the current shard consumed by all ranks together
    uint64_t seed;             // shuffle seed
    int64_t shuffle;           // 0/1
    int64_t num_processes;     // P when saved (window_pos is a multiple of it)
    int64_t tokens_per_window; // B*T when saved; must match on restore
    int64_t num_shards;        // must match on restore
} DataLoaderState;

typedef struct {
    // configuration
    size_t B, T;
    int process_rank, num_processes;
    int shuffle;
    uint64_t seed;
    int vocab_size;             // tokens >= vocab_size are an error; <= 0 disables the check
    // shards (sorted by path, as glob returns them)
    int num_shards;
    char** shard_paths;
    int64_t* shard_tokens;      // tokens in each shard (from the validated header)
    int64_t* shard_windows;     // W_s: all windows of each shard
    int64_t* shard_rounds;      // floor(W_s / P): batches per rank from each shard
    int64_t total_tokens;       // sum of shard_tokens
    uint64_t fingerprint;       // XXH64 (seed: the shard count) over each shard's header and tokens in
                                // path order: identifies the data (a checkpoint records it)
    // position
    int64_t epoch, shard_pos, window_pos;
    int* shard_order;           // this epoch's shard order (identity without shuffle)
    int64_t order_epoch;        // epoch shard_order was built for (-1: none)
    int64_t* window_order;      // window permutation of one shard (shuffle only)
    int window_order_shard;     // shard and epoch window_order was built for (-1: none)
    int64_t window_order_epoch;
    // reading
    FILE* fp;                   // the shard being read (kept open between batches)
    int fp_shard;
    uint16_t* buffer;           // B*T+1 tokens
    // output of dataloader_next_batch
    int* inputs;                // B*T
    int* targets;               // B*T
    int last_shard;             // shard index (into shard_paths) of the last batch
    int64_t last_window;        // window index within that shard of the last batch
} DataLoader;

// ----------------------------------------------------------------------------
// deterministic random numbers (splitmix64): a permutation is a function of its seed only

static inline uint64_t dataloader_splitmix64(uint64_t* state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

// uniform integer in [0, n), without modulo bias
static inline uint64_t dataloader_random_below(uint64_t* state, uint64_t n) {
    uint64_t limit = UINT64_MAX - (UINT64_MAX % n); // accept values in [0, limit)
    uint64_t x;
    do { x = dataloader_splitmix64(state); } while (x >= limit);
    return x % n;
}

// seed for one permutation: mixes the user seed with what the permutation is for
static inline uint64_t dataloader_mix_seed(uint64_t seed, uint64_t epoch, uint64_t what) {
    uint64_t s = seed ^ 0x5851F42D4C957F2DULL;
    uint64_t h = dataloader_splitmix64(&s);
    s = h ^ (epoch * 0xD1B54A32D192ED03ULL);
    h = dataloader_splitmix64(&s);
    s = h ^ (what * 0x8CB92BA72F3D8DD7ULL);
    return dataloader_splitmix64(&s);
}

// ----------------------------------------------------------------------------
// shard validation

// Opens a shard for reading, refusing anything but a regular file. The open is non-blocking, so
// a FIFO given as a shard is refused instead of waiting forever for a writer.
static inline FILE* dataloader_open_shard_(const char* path) {
    int fd = open(path, O_RDONLY | O_NONBLOCK);
    if (fd < 0) {
        fprintf(stderr, "Error: dataloader: cannot open shard '%s': %s\n", path, strerror(errno));
        exit(EXIT_FAILURE);
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        fprintf(stderr, "Error: dataloader: cannot stat shard '%s': %s\n", path, strerror(errno));
        exit(EXIT_FAILURE);
    }
    if (!S_ISREG(st.st_mode)) {
        const char* what = S_ISDIR(st.st_mode) ? "a directory" : S_ISFIFO(st.st_mode) ? "a FIFO (named pipe)"
                         : S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode) ? "a device" : "not a regular file";
        fprintf(stderr, "Error: dataloader: shard '%s' is %s; a token shard must be a regular file\n", path, what);
        exit(EXIT_FAILURE);
    }
    int flags = fcntl(fd, F_GETFL);  // back to blocking reads for a regular file
    if (flags >= 0) fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
    FILE* fp = fdopen(fd, "rb");
    if (fp == NULL) {
        fprintf(stderr, "Error: dataloader: cannot open shard '%s': %s\n", path, strerror(errno));
        exit(EXIT_FAILURE);
    }
    return fp;
}

// Linux reports the holes of a sparse file (lseek SEEK_DATA / SEEK_HOLE); a hole reads as zeros,
// so it is hashed from memory instead of being read (a 4 GiB sparse test shard takes no time).
#if defined(__linux__) && !defined(SEEK_DATA)  // glibc declares them only with _GNU_SOURCE
#define SEEK_DATA 3
#define SEEK_HOLE 4
#endif

// want_data 1: the start of the data at or after `from` (`end` when only a hole is left);
// want_data 0: the start of the next hole (`end` when none). Where holes cannot be found: all data.
static inline int64_t dataloader_seek_(int fd, int64_t from, int64_t end, int want_data) {
#if defined(SEEK_DATA) && defined(SEEK_HOLE)
    off_t at = lseek(fd, (off_t)from, want_data ? SEEK_DATA : SEEK_HOLE);
    if (at < 0) return want_data && errno != ENXIO ? from : end;
    return (int64_t)at < end ? (int64_t)at : end;
#else
    (void)fd;
    return want_data ? from : end;
#endif
}

// The one pass over a shard's tokens (header already read): every token < vocab_size (when > 0),
// and the tokens into the fingerprint (when not NULL). Exits naming the first bad token.
static inline void dataloader_scan_tokens_(FILE* fp, const char* path, int64_t num_tokens, int vocab_size,
                                           XXH64_state_t* fingerprint) {
    const size_t chunk = 1 << 19;  // tokens per read (1 MiB)
    uint16_t* tokens = (uint16_t*)malloc_check(chunk * sizeof(uint16_t));
    static const uint16_t zeros[4096] = {0};
    int fd = fileno(fp);
    int64_t end = SHARD_HEADER_BYTES + num_tokens * (int64_t)sizeof(uint16_t), pos = SHARD_HEADER_BYTES;
    while (pos < end) {
        // a hole [pos, data): zero tokens, valid for any vocabulary (vocab_size >= 1)
        int64_t data = dataloader_seek_(fd, pos, end, 1);
        data -= (data - SHARD_HEADER_BYTES) % 2;  // whole tokens
        for (int64_t at = pos; fingerprint != NULL && at < data;) {
            int64_t n = data - at < (int64_t)sizeof(zeros) ? data - at : (int64_t)sizeof(zeros);
            XXH64_update(fingerprint, zeros, (size_t)n);
            at += n;
        }
        pos = data > pos ? data : pos;
        int64_t hole = dataloader_seek_(fd, pos, end, 0);
        hole += (hole - SHARD_HEADER_BYTES) % 2;
        if (hole > end || hole <= pos) hole = end;
        fseek_check(fp, pos, SEEK_SET, path);
        while (pos < hole) {  // data [pos, hole)
            size_t n = (size_t)((hole - pos) / 2 < (int64_t)chunk ? (hole - pos) / 2 : (int64_t)chunk);
            fread_check(tokens, sizeof(uint16_t), n, fp, path);
            if (fingerprint != NULL) XXH64_update(fingerprint, tokens, n * sizeof(uint16_t));
            for (size_t i = 0; vocab_size > 0 && i < n; i++) {
                if ((int)tokens[i] >= vocab_size) {
                    int64_t token_index = (pos - SHARD_HEADER_BYTES) / 2 + (int64_t)i;
                    fprintf(stderr, "Error: dataloader: shard '%s' token %lld (byte offset %lld) is %d, "
                            "outside the vocabulary: expected < vocab_size %d\n", path, (long long)token_index,
                            (long long)(SHARD_HEADER_BYTES + token_index * (int64_t)sizeof(uint16_t)), (int)tokens[i],
                            vocab_size);
                    exit(EXIT_FAILURE);
                }
            }
            pos += (int64_t)n * 2;
        }
    }
    free(tokens);
}

// Reads and checks one shard: a regular file, its header against the file size, and (one pass
// over the tokens) every token < vocab_size when vocab_size > 0. Adds the shard to the data
// fingerprint (when fingerprint != NULL): its header (with the token count), then its tokens.
// Returns the token count.
static inline int64_t dataloader_validate_shard_tokens(const char* path, int vocab_size, XXH64_state_t* fingerprint) {
    FILE* fp = dataloader_open_shard_(path);
    int64_t file_bytes = file_size_check(fp, path);
    if (file_bytes < SHARD_HEADER_BYTES) {
        fprintf(stderr, "Error: dataloader: shard '%s' is %lld bytes, smaller than the %lld-byte header "
                "(256 int32) of a token shard\n", path, (long long)file_bytes, (long long)SHARD_HEADER_BYTES);
        exit(EXIT_FAILURE);
    }
    int32_t header[SHARD_HEADER_INTS];
    fread_check(header, sizeof(int32_t), SHARD_HEADER_INTS, fp, path);
    if (header[0] != SHARD_MAGIC) {
        fprintf(stderr, "Error: dataloader: shard '%s' has bad magic number %d, expected %d (llm.c token shard)%s\n",
                path, header[0], SHARD_MAGIC,
                header[0] == TOKENIZER_FILE_MAGIC ? "; this looks like a tokenizer file" : "");
        exit(EXIT_FAILURE);
    }
    if (header[1] != SHARD_VERSION) {
        fprintf(stderr, "Error: dataloader: shard '%s' has unsupported version %d, expected %d (uint16 tokens)\n",
                path, header[1], SHARD_VERSION);
        exit(EXIT_FAILURE);
    }
    int64_t num_tokens = header[2];
    int64_t expected_bytes = SHARD_HEADER_BYTES + num_tokens * (int64_t)sizeof(uint16_t);
    if (num_tokens < 0 || file_bytes != expected_bytes) {
        fprintf(stderr, "Error: dataloader: shard '%s' header says %lld tokens, so the file should be %lld bytes, "
                "but it is %lld bytes (%s)\n", path, (long long)num_tokens, (long long)expected_bytes,
                (long long)file_bytes, file_bytes < expected_bytes ? "truncated" : "corrupt: size mismatch");
        exit(EXIT_FAILURE);
    }
    if (fingerprint != NULL) XXH64_update(fingerprint, header, sizeof(header));  // with the token count
    dataloader_scan_tokens_(fp, path, num_tokens, vocab_size, fingerprint);
    fclose_check(fp, path);
    return num_tokens;
}

// the header and size checks alone (no token pass, no fingerprint); returns the token count
static inline int64_t dataloader_validate_shard(const char* path) {
    return dataloader_validate_shard_tokens(path, 0, NULL);
}

// ----------------------------------------------------------------------------
// position bookkeeping

static inline void dataloader_build_shard_order_(DataLoader* loader) {
    for (int i = 0; i < loader->num_shards; i++) { loader->shard_order[i] = i; }
    if (loader->shuffle) {
        uint64_t rng = dataloader_mix_seed(loader->seed, (uint64_t)loader->epoch, 0);
        for (int i = loader->num_shards - 1; i > 0; i--) { // Fisher-Yates
            int j = (int)dataloader_random_below(&rng, (uint64_t)i + 1);
            int tmp = loader->shard_order[i]; loader->shard_order[i] = loader->shard_order[j]; loader->shard_order[j] = tmp;
        }
    }
    loader->order_epoch = loader->epoch;
}

static inline void dataloader_build_window_order_(DataLoader* loader, int shard) {
    int64_t n = loader->shard_windows[shard];
    for (int64_t i = 0; i < n; i++) { loader->window_order[i] = i; }
    uint64_t rng = dataloader_mix_seed(loader->seed, (uint64_t)loader->epoch, (uint64_t)shard + 1);
    for (int64_t i = n - 1; i > 0; i--) {
        int64_t j = (int64_t)dataloader_random_below(&rng, (uint64_t)i + 1);
        int64_t tmp = loader->window_order[i]; loader->window_order[i] = loader->window_order[j]; loader->window_order[j] = tmp;
    }
    loader->window_order_shard = shard;
    loader->window_order_epoch = loader->epoch;
}

// moves past finished shards/epochs so that (shard_pos, window_pos) names a round still to read
static inline void dataloader_normalize_position_(DataLoader* loader) {
    if (loader->order_epoch != loader->epoch) { dataloader_build_shard_order_(loader); }
    for (;;) {
        int shard = loader->shard_order[loader->shard_pos];
        int64_t usable = loader->shard_rounds[shard] * loader->num_processes;
        if (loader->window_pos < usable) { return; }
        loader->window_pos = 0;
        loader->shard_pos++;
        if (loader->shard_pos == loader->num_shards) {
            loader->shard_pos = 0;
            loader->epoch++;
            dataloader_build_shard_order_(loader);
        }
    }
}

// ----------------------------------------------------------------------------
// public API

// back to the start of epoch 0 (for evaluation: the same batches every time)
static inline void dataloader_reset(DataLoader* loader) {
    loader->epoch = 0;
    loader->shard_pos = 0;
    loader->window_pos = 0;
    loader->order_epoch = -1;
    loader->window_order_shard = -1;
    loader->window_order_epoch = -1;
    dataloader_normalize_position_(loader);
}

// B, T: batch geometry; process_rank in [0, num_processes); shuffle 0/1 with seed;
// vocab_size: tokens must be < vocab_size (<= 0: unchecked). filename_pattern is a glob.
static inline void dataloader_init(DataLoader* loader, const char* filename_pattern, size_t B, size_t T,
                                   int process_rank, int num_processes, int shuffle,
                                   unsigned long long seed, int vocab_size) {
    memset(loader, 0, sizeof(*loader));
    if (B == 0 || T == 0 || num_processes < 1 || process_rank < 0 || process_rank >= num_processes) {
        fprintf(stderr, "Error: dataloader: invalid arguments B=%zu T=%zu process_rank=%d num_processes=%d "
                "(need B, T >= 1 and 0 <= process_rank < num_processes)\n", B, T, process_rank, num_processes);
        exit(EXIT_FAILURE);
    }
    if (vocab_size > 65536) {
        fprintf(stderr, "Error: dataloader: vocab_size %d cannot be stored in uint16 shards (max 65536)\n", vocab_size);
        exit(EXIT_FAILURE);
    }
    loader->B = B;
    loader->T = T;
    loader->process_rank = process_rank;
    loader->num_processes = num_processes;
    loader->shuffle = shuffle ? 1 : 0;
    loader->seed = (uint64_t)seed;
    loader->vocab_size = vocab_size;

    glob_t glob_result;
    int glob_status = glob(filename_pattern, 0, NULL, &glob_result);
    if (glob_status != 0 || glob_result.gl_pathc == 0) {
        fprintf(stderr, "Error: dataloader: no shard files match '%s'%s\n", filename_pattern,
                glob_status == GLOB_NOMATCH || glob_status == 0 ? "" : " (glob failed)");
        fprintf(stderr, "  make shards with: python dev/data/prepro.py (see dev/data/README.md)\n");
        if (glob_status == 0) { globfree(&glob_result); }
        exit(EXIT_FAILURE);
    }
    if (glob_result.gl_pathc > (size_t)INT32_MAX) {
        fprintf(stderr, "Error: dataloader: too many files match '%s'\n", filename_pattern);
        exit(EXIT_FAILURE);
    }
    int num_shards = (int)glob_result.gl_pathc;
    loader->num_shards = num_shards;
    loader->shard_paths = (char**)malloc_check((size_t)num_shards * sizeof(char*));
    loader->shard_tokens = (int64_t*)malloc_check((size_t)num_shards * sizeof(int64_t));
    loader->shard_windows = (int64_t*)malloc_check((size_t)num_shards * sizeof(int64_t));
    loader->shard_rounds = (int64_t*)malloc_check((size_t)num_shards * sizeof(int64_t));
    loader->shard_order = (int*)malloc_check((size_t)num_shards * sizeof(int));

    int64_t BT = (int64_t)B * (int64_t)T;
    int64_t max_windows = 0;
    XXH64_state_t fingerprint;
    XXH64_reset(&fingerprint, (XXH64_hash_t)num_shards);  // the shard count is the seed
    for (int i = 0; i < num_shards; i++) {
        const char* path = glob_result.gl_pathv[i];
        size_t len = strlen(path);
        loader->shard_paths[i] = (char*)malloc_check(len + 1);
        memcpy(loader->shard_paths[i], path, len + 1);
        int64_t n = dataloader_validate_shard_tokens(path, vocab_size, &fingerprint);
        int64_t windows = n >= 1 ? (n - 1) / BT : 0;
        int64_t rounds = windows / num_processes;
        if (rounds < 1) {
            fprintf(stderr, "Error: dataloader: shard '%s' holds %lld tokens, too few for one batch on each rank: "
                    "need at least num_processes*B*T+1 = %d*%zu*%zu+1 = %lld tokens\n", path, (long long)n,
                    num_processes, B, T, (long long)(num_processes * BT + 1));
            exit(EXIT_FAILURE);
        }
        loader->shard_tokens[i] = n;
        loader->shard_windows[i] = windows;
        loader->shard_rounds[i] = rounds;
        loader->total_tokens += n;
        if (windows > max_windows) { max_windows = windows; }
    }
    globfree(&glob_result);
    loader->fingerprint = (uint64_t)XXH64_digest(&fingerprint);

    loader->window_order = loader->shuffle ? (int64_t*)malloc_check((size_t)max_windows * sizeof(int64_t)) : NULL;
    loader->buffer = (uint16_t*)malloc_check((size_t)(BT + 1) * sizeof(uint16_t));
    loader->inputs = (int*)malloc_check((size_t)BT * sizeof(int));
    loader->targets = (int*)malloc_check((size_t)BT * sizeof(int));
    loader->fp = NULL;
    loader->fp_shard = -1;
    loader->last_shard = -1;
    loader->last_window = -1;
    dataloader_reset(loader);
}

// batches this rank gets per epoch (= batches in one pass of an eval loop after dataloader_reset)
static inline int64_t dataloader_num_batches(const DataLoader* loader) {
    int64_t total = 0;
    for (int i = 0; i < loader->num_shards; i++) { total += loader->shard_rounds[i]; }
    return total;
}

// fills loader->inputs and loader->targets (B*T ints each) with the next batch of this rank
static inline void dataloader_next_batch(DataLoader* loader) {
    dataloader_normalize_position_(loader);
    int shard = loader->shard_order[loader->shard_pos];
    int64_t slot = loader->window_pos + loader->process_rank;
    int64_t window = slot;
    if (loader->shuffle) {
        if (loader->window_order_shard != shard || loader->window_order_epoch != loader->epoch) {
            dataloader_build_window_order_(loader, shard);
        }
        window = loader->window_order[slot];
    }
    const char* path = loader->shard_paths[shard];
    if (loader->fp_shard != shard) {
        if (loader->fp != NULL) { fclose_check(loader->fp, loader->shard_paths[loader->fp_shard]); }
        loader->fp = fopen_check(path, "rb");
        loader->fp_shard = shard;
    }
    int64_t BT = (int64_t)loader->B * (int64_t)loader->T;
    int64_t first_token = window * BT;
    fseek_check(loader->fp, SHARD_HEADER_BYTES + first_token * (int64_t)sizeof(uint16_t), SEEK_SET, path);
    fread_check(loader->buffer, sizeof(uint16_t), (size_t)(BT + 1), loader->fp, path);
    if (loader->vocab_size > 0) {
        for (int64_t i = 0; i <= BT; i++) {
            if ((int)loader->buffer[i] >= loader->vocab_size) {
                int64_t token_index = first_token + i;
                fprintf(stderr, "Error: dataloader: shard '%s' token %lld (byte offset %lld) is %d, "
                        "outside the vocabulary: expected < vocab_size %d\n", path, (long long)token_index,
                        (long long)(SHARD_HEADER_BYTES + token_index * (int64_t)sizeof(uint16_t)),
                        (int)loader->buffer[i], loader->vocab_size);
                exit(EXIT_FAILURE);
            }
        }
    }
    for (int64_t i = 0; i < BT; i++) {
        loader->inputs[i] = (int)loader->buffer[i];
        loader->targets[i] = (int)loader->buffer[i + 1];
    }
    loader->last_shard = shard;
    loader->last_window = window;
    loader->window_pos += loader->num_processes;
}

static inline DataLoaderState dataloader_get_state(const DataLoader* loader) {
    DataLoaderState state;
    memset(&state, 0, sizeof(state));
    state.epoch = loader->epoch;
    state.shard_pos = loader->shard_pos;
    state.window_pos = loader->window_pos;
    state.seed = loader->seed;
    state.shuffle = loader->shuffle;
    state.num_processes = loader->num_processes;
    state.tokens_per_window = (int64_t)loader->B * (int64_t)loader->T;
    state.num_shards = loader->num_shards;
    return state;
}

// continues from a saved position; the seed and shuffle flag come from the state
static inline void dataloader_set_state(DataLoader* loader, const DataLoaderState* state) {
    int64_t BT = (int64_t)loader->B * (int64_t)loader->T;
    if (state->tokens_per_window != BT || state->num_shards != loader->num_shards) {
        fprintf(stderr, "Error: dataloader: saved position is for %lld shards and B*T = %lld, but this loader has "
                "%d shards and B*T = %lld (same data and same B*T expected)\n", (long long)state->num_shards,
                (long long)state->tokens_per_window, loader->num_shards, (long long)BT);
        exit(EXIT_FAILURE);
    }
    if (state->epoch < 0 || state->shard_pos < 0 || state->shard_pos >= state->num_shards ||
        state->window_pos < 0 || state->num_processes < 1) {
        fprintf(stderr, "Error: dataloader: saved position is invalid (epoch %lld, shard_pos %lld, window_pos %lld, "
                "num_processes %lld)\n", (long long)state->epoch, (long long)state->shard_pos,
                (long long)state->window_pos, (long long)state->num_processes);
        exit(EXIT_FAILURE);
    }
    loader->seed = state->seed;
    loader->shuffle = state->shuffle ? 1 : 0;
    if (loader->shuffle && loader->window_order == NULL) {
        int64_t max_windows = 0;
        for (int i = 0; i < loader->num_shards; i++) {
            if (loader->shard_windows[i] > max_windows) { max_windows = loader->shard_windows[i]; }
        }
        loader->window_order = (int64_t*)malloc_check((size_t)max_windows * sizeof(int64_t));
    }
    loader->epoch = state->epoch;
    loader->shard_pos = state->shard_pos;
    int64_t P = loader->num_processes;
    loader->window_pos = (state->window_pos + P - 1) / P * P; // whole rounds of this process count
    loader->order_epoch = -1;
    loader->window_order_shard = -1;
    loader->window_order_epoch = -1;
    dataloader_normalize_position_(loader);
}

static inline void dataloader_free(DataLoader* loader) {
    if (loader->fp != NULL) { fclose_check(loader->fp, loader->shard_paths[loader->fp_shard]); }
    for (int i = 0; i < loader->num_shards; i++) { free(loader->shard_paths[i]); }
    free(loader->shard_paths);
    free(loader->shard_tokens);
    free(loader->shard_windows);
    free(loader->shard_rounds);
    free(loader->shard_order);
    free(loader->window_order);
    free(loader->buffer);
    free(loader->inputs);
    free(loader->targets);
    memset(loader, 0, sizeof(*loader));
}

#endif // LLMC_DATALOADER_H
