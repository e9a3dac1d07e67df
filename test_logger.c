/*
 * test_logger.c - CPU tests of the console/JSONL logger (llmc/logger.h): expert usage and KL,
 * MFU, exact JSONL records flushed per line (NaN as null), a resumed log trimmed to the
 * checkpoint's step, ranks other than 0 writing nothing.
 *
 *   make test_logger && ./test_logger
 *
 * One PASS/FAIL line per check, then "test_logger: N passed, N failed"; exits non-zero on a failure.
 */
#include "llmc/test_harness.h"
#include "llmc/logger.h"

// equal within 1e-6, relative above 1 and absolute below
static int close_to(float a, double b) { return fabs((double)a - b) <= 1e-6 * (fabs(b) > 1 ? fabs(b) : 1); }

// ----------------------------------------------------------------------------
// logger

static char* slurp_text(const char* path) {
    size_t n;
    return (char*)test_read_file(path, &n);
}

static void test_logger(void) {
    char dir[512], path[600];
    test_tmp_subdir(dir, sizeof(dir), "log");
    snprintf(path, sizeof(path), "%s/log.jsonl", dir);
    // expert statistics
    int counts_half[4] = {4, 0, 4, 0}, counts_flat[4] = {3, 3, 3, 3}, counts_none[4] = {0, 0, 0, 0};
    float usage, kl;
    expert_load_stats(counts_half, 4, &usage, &kl);
    int ok = close_to(usage, 0.5) && close_to(kl, log(2.0));
    expert_load_stats(counts_flat, 4, &usage, &kl);
    ok &= close_to(usage, 1.0) && close_to(kl, 0.0);
    expert_load_stats(counts_none, 4, &usage, &kl);
    ok &= usage == 0.0f && kl == 0.0f;
    int counts_one[4] = {0, 0, 9, 0};
    expert_load_stats(counts_one, 4, &usage, &kl);
    ok &= close_to(usage, 0.25) && close_to(kl, log(4.0));
    test_check_why(ok, "logger: expert usage share and KL(load || uniform)", "");
    test_check_why(close_to((float)logger_mfu(1e9, 1e5, 1e15), 0.3) && logger_mfu(1e9, 1e5, 0) < 0, "logger: MFU = 3 * fwd FLOPs * tok/s / peak", "");

    Logger lg;
    logger_init(&lg, path, 0, -1);
    float usage2[2] = {0.5f, 0.25f}, kl2[2] = {0.125f, 1.5f};
    logger_log_eval(&lg, 0, 0, 10.75f);
    logger_log_train(&lg, 1, 3, 4096, 10.5f, 2.25f, 1e-4f, 123.5, 33165.0, 0.375, 2, usage2, kl2, NULL);
    logger_log_train(&lg, 2, 3, 8192, NAN, 1.0f, 2e-4f, 100.0, 40960.0, -1.0, 2, usage2, kl2, NULL);
    logger_log_eval(&lg, 2, 8192, 9.5f);
    logger_log_train(&lg, 3, 3, 12288, 9.25f, 0.5f, 3e-4f, 100.0, 40960.0, 0.5, 0, NULL, NULL, NULL);
    char* text = slurp_text(path);   // read while the logger is still open: lines are flushed
    const char* expected =
        "{\"type\":\"eval\",\"step\":0,\"tokens\":0,\"val_loss\":10.75}\n"
        "{\"type\":\"train\",\"step\":1,\"tokens\":4096,\"loss\":10.5,\"lr\":9.99999975e-05,\"norm\":2.25,\"ms\":123.5000,"
        "\"tok_s\":33165.00,\"mfu\":0.375000,\"expert_usage\":[0.500000,0.250000],\"expert_kl\":[0.125000,1.500000]}\n"
        "{\"type\":\"train\",\"step\":2,\"tokens\":8192,\"loss\":null,\"lr\":0.000199999995,\"norm\":1,\"ms\":100.0000,"
        "\"tok_s\":40960.00,\"mfu\":null,\"expert_usage\":[0.500000,0.250000],\"expert_kl\":[0.125000,1.500000]}\n"
        "{\"type\":\"eval\",\"step\":2,\"tokens\":8192,\"val_loss\":9.5}\n"
        "{\"type\":\"train\",\"step\":3,\"tokens\":12288,\"loss\":9.25,\"lr\":0.000300000014,\"norm\":0.5,\"ms\":100.0000,"
        "\"tok_s\":40960.00,\"mfu\":0.500000,\"expert_usage\":[],\"expert_kl\":[]}\n";
    test_check_why(text && strcmp(text, expected) == 0, "logger: JSONL records exact and flushed per line (NaN -> null)", text);
    free(text);
    logger_close(&lg);

    // a crash left a partial line; resume from step 2 keeps train <= 2 and eval < 2
    FILE* fp = fopen_check(path, "ab");
    fputs("{\"type\":\"train\",\"step\":4,\"tok", fp);
    fclose_check(fp, path);
    logger_init(&lg, path, 0, 2);
    logger_log_eval(&lg, 2, 8192, 9.0f);
    logger_close(&lg);
    text = slurp_text(path);
    ok = text != NULL && strstr(text, "\"step\":0,") && strstr(text, "\"type\":\"train\",\"step\":1,") &&
         strstr(text, "\"type\":\"train\",\"step\":2,") && !strstr(text, "\"step\":3,") && !strstr(text, "\"step\":4") &&
         !strstr(text, "9.5}") && strstr(text, "\"val_loss\":9}\n");
    int lines = 0;
    for (const char* p = text; p && *p; p++) lines += *p == '\n';
    test_check_why(ok && lines == 4, "logger: resume trims the log to the checkpoint and appends", text);
    free(text);

    // another rank writes nothing
    char path1[600];
    snprintf(path1, sizeof(path1), "%s/rank1.jsonl", dir);
    logger_init(&lg, path1, 1, -1);
    logger_log_eval(&lg, 0, 0, 1.0f);
    logger_close(&lg);
    test_check_why(!test_file_exists(path1), "logger: ranks other than 0 write nothing", "");
}

int main(void) {
    test_begin("test_logger");
    test_tmp_begin("test_logger");
    test_logger();
    test_tmp_end();
    return test_end();
}
