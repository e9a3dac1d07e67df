/*
 * run_identity.h - what identifies a training run, for the resume check: the settings a
 * checkpoint records (llmc/checkpoint.h) and compares with the run that resumes from it. Plain
 * C (gcc -std=c11 and nvcc). The trainers fill it from their flags (llmc/args.h:
 * train_config_run_identity) and the training data loader (llmc/dataloader.h: fingerprint).
 *
 * Kept apart from TrainConfig so the checkpoint format does not depend on the command line.
 */
#ifndef OMNIMOE_RUN_IDENTITY_H
#define OMNIMOE_RUN_IDENTITY_H

#include <stdint.h>

typedef struct {
    // the data and its order: a resume must match these (checkpoint_compare_run refuses otherwise)
    uint64_t data_fingerprint;     // XXH64 of the training shards' tokens (dataloader.h)
    long long data_tokens;         // tokens in all training shards
    int data_shards;               // number of training shards
    int shuffle;                   // --shuffle
    unsigned long long seed;       // --seed (the shuffle order is drawn from it)
    int B, T;                      // -b, -t: the window geometry of the data order
    // settings a resume may change (a note is printed for each change)
    int grad_accum_steps, num_processes;
    long long total_batch_size;    // tokens per optimiser step (resolved, never -1)
    int num_steps, warmup_steps, lr_schedule, expert_exec, attention;
    int recompute;                 // -r (0, 1, 2): memory; same bits (gelu: unfused GELU, docs/design.md §4.5)
    float learning_rate, final_lr_frac, decay_frac, weight_decay, grad_clip, beta1, beta2, eps;
    float moe_aux, moe_zc_weight, moe_bias_rate;  // moe models only (docs/design.md §10.7), else 0
} RunIdentity;

#endif // OMNIMOE_RUN_IDENTITY_H
