/*
 * lr_schedule.h - the learning-rate schedules of both trainers: a pure function of the step, so a
 * resumed run gets exactly the rates of an uninterrupted one. Plain C (gcc and nvcc).
 *
 * `step` is the 0-based index of the optimiser update (0 .. num_steps-1). With lr = peak rate,
 * W = warmup_steps, S = num_steps, min = final_lr_frac * lr:
 *   warm-up (all schedules): step < W:  lr * (step + 1) / W   (the W-th update runs at lr)
 *   cosine:   min + (lr - min) * 0.5 * (1 + cos(pi * (step - W) / (S - W)))
 *   wsd:      lr until the decay starts at D = S - round(decay_frac * S) (never before W), then
 *             linear: lr - (lr - min) * (step - D) / (S - D)
 *   constant: lr
 * Cosine and wsd reach min at step = S (one past the last update, llm.c's convention) and stay
 * there for any later step; negative steps count as step 0.
 */
#ifndef OMNIMOE_LR_SCHEDULE_H
#define OMNIMOE_LR_SCHEDULE_H

#include <math.h>
#include "args.h"

static inline float lr_schedule_value(int schedule, float max_lr, int warmup_steps, float final_lr_frac,
                                      float decay_frac, int num_steps, int step) {
    if (step < 0) step = 0;
    double lr = max_lr;
    if (step < warmup_steps) return (float)(lr * (double)(step + 1) / (double)warmup_steps);
    if (schedule == LR_SCHEDULE_CONSTANT) return max_lr;
    double min_lr = lr * (double)final_lr_frac;
    if (step >= num_steps) return (float)min_lr;
    if (schedule == LR_SCHEDULE_WSD) {
        int decay_steps = (int)floor((double)decay_frac * (double)num_steps + 0.5);
        int decay_start = num_steps - decay_steps;
        if (decay_start < warmup_steps) decay_start = warmup_steps;
        if (step < decay_start) return max_lr;
        double ratio = (double)(step - decay_start) / (double)(num_steps - decay_start);
        return (float)(lr - (lr - min_lr) * ratio);
    }
    // cosine; here warmup_steps <= step < num_steps, so the denominator is >= 1
    const double pi = 3.14159265358979323846;
    double ratio = (double)(step - warmup_steps) / (double)(num_steps - warmup_steps);
    return (float)(min_lr + (lr - min_lr) * 0.5 * (1.0 + cos(pi * ratio)));
}

// the learning rate of update `step` (0-based) of this run
static inline float learning_rate_at(const TrainConfig* cfg, int step) {
    return lr_schedule_value(cfg->lr_schedule, cfg->learning_rate, cfg->warmup_steps, cfg->final_lr_frac,
                             cfg->decay_frac, cfg->num_steps, step);
}

#endif // OMNIMOE_LR_SCHEDULE_H
