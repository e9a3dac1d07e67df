/*
 * llmc/tokenizer.h: GPT-2 token decoder for printing samples (decode only; encoding is done
 * offline by dev/data/prepro.py).
 *
 * File format (data/gpt2_tokenizer.bin, written by dev/data/prepro.py, same layout as llm.c's):
 *   header: 256 int32 {20240328 magic, version (1 or 2), vocab_size, eot_token (version 2 only)}
 *   then for each token id 0..vocab_size-1: uint8 length (>= 1), then `length` raw bytes.
 * Pieces are raw bytes: a multi-byte UTF-8 character may be split across tokens.
 *
 * A missing file is not an error: tokenizer_init prints a note, init_ok stays 0, and
 * tokenizer_print_token prints "<id>" instead of text. A malformed file is an error: one message,
 * tokenizer_init returns -1 (it does not exit: with several ranks only rank 0 reads the file, and
 * llmc/train_loop.h lets every rank stop together).
 */
#ifndef LLMC_TOKENIZER_H
#define LLMC_TOKENIZER_H

#include "utils.h"
#include <ctype.h>

#define TOKENIZER_MAGIC 20240328
#define TOKENIZER_HEADER_INTS 256

typedef struct {
    uint32_t vocab_size;
    char** token_table;   // vocab_size NUL-terminated pieces
    uint8_t* token_lengths; // byte length of each piece (a piece may contain a NUL byte)
    int init_ok;
    int eot_token;
} Tokenizer;

static inline void tokenizer_free(Tokenizer* tokenizer) {
    if (tokenizer->token_table != NULL) {
        for (uint32_t i = 0; i < tokenizer->vocab_size; i++) { free(tokenizer->token_table[i]); }
    }
    free(tokenizer->token_table);
    free(tokenizer->token_lengths);
    memset(tokenizer, 0, sizeof(*tokenizer));
}

// A malformed file, after its message: the partial table is freed and the file closed (fp may be NULL)
static inline int tokenizer_fail_(Tokenizer* tokenizer, FILE* fp) {
    if (fp != NULL) fclose(fp);
    tokenizer_free(tokenizer);
    tokenizer->eot_token = -1;
    return -1;
}

// Returns 0 when loaded or when the file is missing (a note; init_ok 0), -1 after one message when
// the file is malformed (the caller stops: llmc/train_loop.h agrees on it across ranks first).
static inline int tokenizer_init(Tokenizer* tokenizer, const char* filename) {
    memset(tokenizer, 0, sizeof(*tokenizer));
    tokenizer->eot_token = -1;
    FILE* fp = fopen(filename, "rb");
    if (fp == NULL) {
        fprintf(stderr, "Note: tokenizer file '%s' not found (%s); samples will print token ids.\n"
                "      Write it with: python dev/data/prepro.py tinyshakespeare\n", filename, strerror(errno));
        return 0;
    }
    int64_t file_bytes = file_size_try(fp, filename);
    if (file_bytes < 0) return tokenizer_fail_(tokenizer, fp);
    int32_t header[TOKENIZER_HEADER_INTS];
    if (file_bytes < (int64_t)sizeof(header)) {
        fprintf(stderr, "Error: tokenizer file '%s' is %lld bytes, smaller than its 1024-byte header\n",
                filename, (long long)file_bytes);
        return tokenizer_fail_(tokenizer, fp);
    }
    if (fread_try(header, sizeof(int32_t), TOKENIZER_HEADER_INTS, fp, filename) != 0) return tokenizer_fail_(tokenizer, fp);
    if (header[0] != TOKENIZER_MAGIC) {
        fprintf(stderr, "Error: tokenizer file '%s' has bad magic number %d, expected %d\n",
                filename, header[0], TOKENIZER_MAGIC);
        return tokenizer_fail_(tokenizer, fp);
    }
    if (header[1] != 1 && header[1] != 2) {
        fprintf(stderr, "Error: tokenizer file '%s' has unsupported version %d, expected 1 or 2\n", filename, header[1]);
        return tokenizer_fail_(tokenizer, fp);
    }
    if (header[2] <= 0 || header[2] > (1 << 24)) {
        fprintf(stderr, "Error: tokenizer file '%s' has implausible vocab_size %d\n", filename, header[2]);
        return tokenizer_fail_(tokenizer, fp);
    }
    tokenizer->vocab_size = (uint32_t)header[2];
    // version 1 files predate the eot field; GPT-2's end-of-text is 50256
    tokenizer->eot_token = header[1] == 2 ? header[3] : 50256;
    tokenizer->token_table = (char**)calloc_check(tokenizer->vocab_size, sizeof(char*));
    tokenizer->token_lengths = (uint8_t*)malloc_check(tokenizer->vocab_size * sizeof(uint8_t));
    for (uint32_t i = 0; i < tokenizer->vocab_size; i++) {
        uint8_t length;
        if (fread_try(&length, sizeof(uint8_t), 1, fp, filename) != 0) return tokenizer_fail_(tokenizer, fp);
        if (length == 0) {
            fprintf(stderr, "Error: tokenizer file '%s': token %u has length 0, expected >= 1\n", filename, i);
            return tokenizer_fail_(tokenizer, fp);
        }
        char* piece = (char*)malloc_check((size_t)length + 1);
        tokenizer->token_table[i] = piece;
        if (fread_try(piece, sizeof(char), length, fp, filename) != 0) return tokenizer_fail_(tokenizer, fp);
        piece[length] = '\0';
        tokenizer->token_lengths[i] = length;
    }
    int64_t end = ftell_try(fp, filename);
    if (end < 0) return tokenizer_fail_(tokenizer, fp);
    if (end != file_bytes) {
        fprintf(stderr, "Error: tokenizer file '%s' has %lld trailing bytes after %u tokens (corrupt?)\n",
                filename, (long long)(file_bytes - end), tokenizer->vocab_size);
        return tokenizer_fail_(tokenizer, fp);
    }
    if (fclose_try(fp, filename) != 0) return tokenizer_fail_(tokenizer, NULL);
    tokenizer->init_ok = 1;
    return 0;
}

// the piece of one token (NUL-terminated), or NULL if the tokenizer is not loaded or the id is out of range
static inline const char* tokenizer_decode(const Tokenizer* tokenizer, uint32_t token_id) {
    if (!tokenizer->init_ok || token_id >= tokenizer->vocab_size) { return NULL; }
    return tokenizer->token_table[token_id];
}

// prints a piece, skipping lone bytes that are neither printable nor whitespace
// (raw control bytes would garble a terminal; multi-byte pieces are UTF-8 text or parts of it)
static inline void safe_printf(const char* piece) {
    if (piece == NULL || piece[0] == '\0') { return; }
    if (piece[1] == '\0') {
        unsigned char byte = (unsigned char)piece[0];
        if (!(isprint(byte) || isspace(byte))) { return; }
    }
    printf("%s", piece);
}

// prints the token's text, or "<id>" when no tokenizer is loaded or the id is unknown
static inline void tokenizer_print_token(const Tokenizer* tokenizer, uint32_t token_id) {
    const char* piece = tokenizer_decode(tokenizer, token_id);
    if (piece == NULL) { printf("<%u>", token_id); return; }
    safe_printf(piece);
}

#endif // LLMC_TOKENIZER_H
