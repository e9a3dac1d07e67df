/*
 * test_lr_schedule.c - CPU tests of the learning-rate schedules (llmc/lr_schedule.h): known
 * values of cosine, wsd and constant at the warm-up, decay and end boundaries, the shapes
 * (cosine non-increasing after warm-up, proportional to the peak), learning_rate_at(cfg).
 *
 *   make test_lr_schedule && ./test_lr_schedule
 *
 * One PASS/FAIL line per check, then "test_lr_schedule: N passed, N failed"; exits non-zero on a failure.
 */
#include "llmc/test_harness.h"
#include "llmc/args.h"
#include "llmc/lr_schedule.h"

// equal within 1e-6, relative above 1 and absolute below
static int close_to(float a, double b) { return fabs((double)a - b) <= 1e-6 * (fabs(b) > 1 ? fabs(b) : 1); }

static void test_schedules(void) {
    char detail[256];
    struct { int sched, warmup, steps, step; float frac, decay; double expected; } cases[] = {
        // cosine: lr 1, W = 10, S = 110, final 0.1
        {LR_SCHEDULE_COSINE, 10, 110, 0, 0.1f, 0, 0.1},
        {LR_SCHEDULE_COSINE, 10, 110, 4, 0.1f, 0, 0.5},
        {LR_SCHEDULE_COSINE, 10, 110, 9, 0.1f, 0, 1.0},
        {LR_SCHEDULE_COSINE, 10, 110, 10, 0.1f, 0, 1.0},
        {LR_SCHEDULE_COSINE, 10, 110, 35, 0.1f, 0, 0.1 + 0.9 * 0.5 * (1 + cos(3.14159265358979323846 * 0.25))},
        {LR_SCHEDULE_COSINE, 10, 110, 60, 0.1f, 0, 0.55},
        {LR_SCHEDULE_COSINE, 10, 110, 109, 0.1f, 0, 0.1 + 0.9 * 0.5 * (1 + cos(3.14159265358979323846 * 0.99))},
        {LR_SCHEDULE_COSINE, 10, 110, 110, 0.1f, 0, 0.1},
        {LR_SCHEDULE_COSINE, 10, 110, 5000, 0.1f, 0, 0.1},
        {LR_SCHEDULE_COSINE, 10, 110, -3, 0.1f, 0, 0.1},
        {LR_SCHEDULE_COSINE, 0, 100, 0, 0.0f, 0, 1.0},
        {LR_SCHEDULE_COSINE, 0, 100, 50, 0.0f, 0, 0.5},
        // wsd: lr 1, W = 10, S = 100, decay 0.2 (the last 20 steps), final 0
        {LR_SCHEDULE_WSD, 10, 100, 5, 0.0f, 0.2f, 0.6},
        {LR_SCHEDULE_WSD, 10, 100, 10, 0.0f, 0.2f, 1.0},
        {LR_SCHEDULE_WSD, 10, 100, 79, 0.0f, 0.2f, 1.0},
        {LR_SCHEDULE_WSD, 10, 100, 80, 0.0f, 0.2f, 1.0},
        {LR_SCHEDULE_WSD, 10, 100, 90, 0.0f, 0.2f, 0.5},
        {LR_SCHEDULE_WSD, 10, 100, 99, 0.0f, 0.2f, 0.05},
        {LR_SCHEDULE_WSD, 10, 100, 100, 0.0f, 0.2f, 0.0},
        {LR_SCHEDULE_WSD, 10, 100, 90, 0.1f, 0.2f, 0.55},
        {LR_SCHEDULE_WSD, 0, 100, 50, 0.1f, 0.0f, 1.0},
        {LR_SCHEDULE_WSD, 0, 100, 99, 0.1f, 0.0f, 1.0},
        // decay longer than the stable part: it starts when warm-up ends (D = max(5, 8) = 8)
        {LR_SCHEDULE_WSD, 8, 10, 8, 0.0f, 0.5f, 1.0},
        {LR_SCHEDULE_WSD, 8, 10, 9, 0.0f, 0.5f, 0.5},
        // constant
        {LR_SCHEDULE_CONSTANT, 4, 100, 0, 0.1f, 0, 0.25},
        {LR_SCHEDULE_CONSTANT, 4, 100, 3, 0.1f, 0, 1.0},
        {LR_SCHEDULE_CONSTANT, 4, 100, 99, 0.1f, 0, 1.0},
        {LR_SCHEDULE_CONSTANT, 4, 100, 500, 0.1f, 0, 1.0},
    };
    int n = (int)(sizeof(cases) / sizeof(cases[0]));
    for (int i = 0; i < n; i++) {
        float lr = lr_schedule_value(cases[i].sched, 1.0f, cases[i].warmup, cases[i].frac, cases[i].decay,
                                     cases[i].steps, cases[i].step);
        char name[160];
        snprintf(name, sizeof(name), "schedule %s W=%d S=%d frac=%g decay=%g: lr(step %d) = %.6g",
                 lr_schedule_name(cases[i].sched), cases[i].warmup, cases[i].steps, cases[i].frac, cases[i].decay,
                 cases[i].step, cases[i].expected);
        snprintf(detail, sizeof(detail), "got %.9g", lr);
        test_check_why(close_to(lr, cases[i].expected), name, detail);
    }
    // shapes: cosine non-increasing after warm-up, wsd flat then linear, scaling by the peak lr
    int ok = 1;
    for (int s = 11; s < 200; s++) {
        ok &= lr_schedule_value(LR_SCHEDULE_COSINE, 3e-4f, 10, 0.1f, 0, 200, s) <=
              lr_schedule_value(LR_SCHEDULE_COSINE, 3e-4f, 10, 0.1f, 0, 200, s - 1);
        ok &= close_to(lr_schedule_value(LR_SCHEDULE_COSINE, 3e-4f, 10, 0.1f, 0, 200, s) / 3e-4f,
                       lr_schedule_value(LR_SCHEDULE_COSINE, 1.0f, 10, 0.1f, 0, 200, s));
    }
    test_check_why(ok, "schedule: cosine is non-increasing after warm-up and proportional to the peak lr", "");
    TrainConfig cfg;
    train_config_defaults(&cfg);
    cfg.lr_schedule = LR_SCHEDULE_WSD;
    cfg.num_steps = 300;
    cfg.warmup_steps = 30;
    cfg.decay_frac = 0.25f;
    cfg.final_lr_frac = 0.05f;
    cfg.learning_rate = 2e-3f;
    ok = 1;
    for (int s = 0; s <= 300; s++) {
        ok &= learning_rate_at(&cfg, s) == lr_schedule_value(LR_SCHEDULE_WSD, 2e-3f, 30, 0.05f, 0.25f, 300, s);
    }
    test_check_why(ok && close_to(learning_rate_at(&cfg, 100), 2e-3) && close_to(learning_rate_at(&cfg, 300), 1e-4),
          "schedule: learning_rate_at(cfg) uses the run's settings", "");
}

int main(void) {
    test_begin("test_lr_schedule");
    test_schedules();
    return test_end();
}
