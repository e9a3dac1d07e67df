/*
 * llmc/utils.h: small checked wrappers around stdio and malloc.
 * Each *_check wrapper prints the call site (file:line), the path or size involved and the reason,
 * then exits with EXIT_FAILURE, so callers need no error handling of their own. The file ones
 * have a *_try form that prints the same and returns -1 instead (a rank of several processes must
 * not exit alone: the others would wait in their next collective).
 * Plain C (gcc -std=c11 and nvcc). File offsets are 64-bit (fseeko/ftello; see LLMC_FSEEK).
 * Also host_memory_available(): MemAvailable, for refusing an allocation that cannot fit.
 */
#ifndef LLMC_UTILS_H
#define LLMC_UTILS_H

#if !defined(__cplusplus) && !defined(_GNU_SOURCE) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L
#define _XOPEN_SOURCE 700  // (XSI: sigaction's SA_RESTART, llmc/train_loop.h)
#endif

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

// 64-bit file offsets: POSIX fseeko/ftello when <stdio.h> declared them; otherwise (strict
// -std=c11 with <stdio.h> included before this header) plain fseek/ftell, which are 64-bit where
// long is (LP64 Linux/macOS); anywhere else that is a compile error rather than a silent 2 GiB limit.
#if defined(__GLIBC__) && !defined(__USE_XOPEN2K) && !defined(__USE_LARGEFILE)
_Static_assert(sizeof(long) >= 8, "llmc/utils.h: 64-bit file offsets need fseeko here: "
               "compile with -D_POSIX_C_SOURCE=200809L");
#define LLMC_FSEEK(fp, offset, whence) fseek(fp, (long)(offset), whence)
#define LLMC_FTELL(fp) ((int64_t)ftell(fp))
#else
#define LLMC_FSEEK(fp, offset, whence) fseeko(fp, (off_t)(offset), whence)
#define LLMC_FTELL(fp) ((int64_t)ftello(fp))
#endif

// ----------------------------------------------------------------------------
// files

static inline FILE* fopen_check_(const char* path, const char* mode, const char* file, int line) {
    FILE* fp = fopen(path, mode);
    if (fp == NULL) {
        fprintf(stderr, "Error: could not open '%s' (mode \"%s\"): %s\n", path, mode, strerror(errno));
        fprintf(stderr, "  at %s:%d\n", file, line);
        exit(EXIT_FAILURE);
    }
    return fp;
}
#define fopen_check(path, mode) fopen_check_(path, mode, __FILE__, __LINE__)

// The *_try_ forms print the same message and return -1 (0 on success) instead of exiting, for
// callers that must not end the process alone (a rank of several: llmc/train_loop.h agrees on
// the outcome first); the *_check forms exit after that message.

// reads exactly count items; `what` names the file for the message
static inline int fread_try_(void* ptr, size_t size, size_t count, FILE* fp, const char* what, const char* file,
                             int line) {
    size_t got = fread(ptr, size, count, fp);
    if (got != count) {
        fprintf(stderr, "Error: short read from '%s': wanted %zu items of %zu bytes, got %zu (%s)\n",
                what, count, size, got,
                feof(fp) ? "unexpected end of file" : (ferror(fp) ? strerror(errno) : "unknown"));
        fprintf(stderr, "  at %s:%d\n", file, line);
        return -1;
    }
    return 0;
}
#define fread_try(ptr, size, count, fp, what) fread_try_(ptr, size, count, fp, what, __FILE__, __LINE__)

static inline void fread_check_(void* ptr, size_t size, size_t count, FILE* fp, const char* what,
                                const char* file, int line) {
    if (fread_try_(ptr, size, count, fp, what, file, line) != 0) exit(EXIT_FAILURE);
}
#define fread_check(ptr, size, count, fp, what) fread_check_(ptr, size, count, fp, what, __FILE__, __LINE__)

static inline void fwrite_check_(const void* ptr, size_t size, size_t count, FILE* fp, const char* what,
                                 const char* file, int line) {
    size_t put = fwrite(ptr, size, count, fp);
    if (put != count) {
        fprintf(stderr, "Error: short write to '%s': wanted %zu items of %zu bytes, wrote %zu (%s)\n",
                what, count, size, put, strerror(errno));
        fprintf(stderr, "  at %s:%d\n", file, line);
        exit(EXIT_FAILURE);
    }
}
#define fwrite_check(ptr, size, count, fp, what) fwrite_check_(ptr, size, count, fp, what, __FILE__, __LINE__)

// 64-bit seek (offsets beyond 2 GiB work on every platform with a 64-bit off_t)
static inline int fseek_try_(FILE* fp, int64_t offset, int whence, const char* what, const char* file, int line) {
    if (LLMC_FSEEK(fp, offset, whence) != 0) {
        fprintf(stderr, "Error: seek to offset %lld (whence %d) failed in '%s': %s\n",
                (long long)offset, whence, what, strerror(errno));
        fprintf(stderr, "  at %s:%d\n", file, line);
        return -1;
    }
    return 0;
}
static inline void fseek_check_(FILE* fp, int64_t offset, int whence, const char* what,
                                const char* file, int line) {
    if (fseek_try_(fp, offset, whence, what, file, line) != 0) exit(EXIT_FAILURE);
}
#define fseek_check(fp, offset, whence, what) fseek_check_(fp, offset, whence, what, __FILE__, __LINE__)

// the position, or -1 after the message
static inline int64_t ftell_try_(FILE* fp, const char* what, const char* file, int line) {
    int64_t pos = LLMC_FTELL(fp);
    if (pos < 0) {
        fprintf(stderr, "Error: ftello failed on '%s': %s\n", what, strerror(errno));
        fprintf(stderr, "  at %s:%d\n", file, line);
        return -1;
    }
    return pos;
}
#define ftell_try(fp, what) ftell_try_(fp, what, __FILE__, __LINE__)
static inline int64_t ftell_check_(FILE* fp, const char* what, const char* file, int line) {
    int64_t pos = ftell_try_(fp, what, file, line);
    if (pos < 0) exit(EXIT_FAILURE);
    return pos;
}
#define ftell_check(fp, what) ftell_check_(fp, what, __FILE__, __LINE__)

static inline int fclose_try_(FILE* fp, const char* what, const char* file, int line) {
    if (fclose(fp) != 0) {
        fprintf(stderr, "Error: closing '%s' failed: %s\n", what, strerror(errno));
        fprintf(stderr, "  at %s:%d\n", file, line);
        return -1;
    }
    return 0;
}
#define fclose_try(fp, what) fclose_try_(fp, what, __FILE__, __LINE__)
static inline void fclose_check_(FILE* fp, const char* what, const char* file, int line) {
    if (fclose_try_(fp, what, file, line) != 0) exit(EXIT_FAILURE);
}
#define fclose_check(fp, what) fclose_check_(fp, what, __FILE__, __LINE__)

// size in bytes of an open file, or -1 after the message; leaves the position at the start
static inline int64_t file_size_try_(FILE* fp, const char* what, const char* file, int line) {
    if (fseek_try_(fp, 0, SEEK_END, what, file, line) != 0) return -1;
    int64_t size = ftell_try_(fp, what, file, line);
    if (size < 0 || fseek_try_(fp, 0, SEEK_SET, what, file, line) != 0) return -1;
    return size;
}
#define file_size_try(fp, what) file_size_try_(fp, what, __FILE__, __LINE__)
static inline int64_t file_size_check_(FILE* fp, const char* what, const char* file, int line) {
    int64_t size = file_size_try_(fp, what, file, line);
    if (size < 0) exit(EXIT_FAILURE);
    return size;
}
#define file_size_check(fp, what) file_size_check_(fp, what, __FILE__, __LINE__)

// ----------------------------------------------------------------------------
// memory

static inline void* malloc_check_(size_t size, const char* file, int line) {
    void* ptr = malloc(size);
    if (ptr == NULL && size > 0) {
        fprintf(stderr, "Error: malloc of %zu bytes failed\n  at %s:%d\n", size, file, line);
        exit(EXIT_FAILURE);
    }
    return ptr;
}
#define malloc_check(size) malloc_check_(size, __FILE__, __LINE__)

static inline void* calloc_check_(size_t count, size_t size, const char* file, int line) {
    void* ptr = calloc(count, size);
    if (ptr == NULL && count > 0 && size > 0) {
        fprintf(stderr, "Error: calloc of %zu x %zu bytes failed\n  at %s:%d\n", count, size, file, line);
        exit(EXIT_FAILURE);
    }
    return ptr;
}
#define calloc_check(count, size) calloc_check_(count, size, __FILE__, __LINE__)

// Bytes of host memory the kernel says can be allocated without swapping (MemAvailable of
// /proc/meminfo); -1 where that is unknown (no /proc, an old kernel).
static inline long long host_memory_available(void) {
    FILE* fp = fopen("/proc/meminfo", "r");
    if (fp == NULL) return -1;
    char line[256];
    long long kib = -1;
    while (fgets(line, sizeof(line), fp) != NULL) {
        if (strncmp(line, "MemAvailable:", 13) == 0) {
            kib = strtoll(line + 13, NULL, 10);
            break;
        }
    }
    fclose(fp);
    return kib >= 0 ? kib * 1024 : -1;
}

#endif // LLMC_UTILS_H
