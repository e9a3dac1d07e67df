/*
 * args.h - the command line shared by the CPU reference trainer (train_omnimoe.c) and the CUDA
 * trainer (train_omnimoe.cu). Plain C: compiles with gcc -std=c11 and nvcc (C++).
 *
 * Defines:
 *   TrainConfig                    every run setting (data, batch, optimiser, eval, model knobs)
 *   train_config_defaults()        the documented defaults
 *   train_config_parse()           argv -> TrainConfig; every bad flag or value: one message, exit
 *   train_config_print_help()      the flag table with defaults (also what --help prints)
 *   train_config_print()           the settings of this run, one per line
 *   train_config_model()           -e preset + overrides -> ModelConfig (0 when -e is a file)
 *   train_config_check_file_model() overrides given with -e <file> must agree with the file
 *   train_config_validate()        checks that need the model (T <= max_seq_len, batch division,
 *                                  a micro-batch's bytes below 2^60: train_config_micro_batch_bytes_bound)
 *   train_config_total_batch_tokens(), train_config_grad_accum_steps()
 *
 * Flags come in pairs, llm.c style: a short form (-b 4) and/or a long one (--batch-size 4 or
 * --batch-size=4). The flag table train_flags[] below is the single source of truth: parsing,
 * range checks, error messages and the help text all come from it.
 *
 * num_processes and process_rank are not flags: the trainer sets them (MPI / NCCL setup,
 * llmc/multi_gpu.cuh) before train_config_validate(), which derives grad accumulation =
 * d / (B * T * num_processes). The launch flags -pn / -pr / -pf only say how a launch without
 * mpirun connects its processes.
 */
#ifndef OMNIMOE_ARGS_H
#define OMNIMOE_ARGS_H

#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <math.h>
#include <float.h>
#include <stdint.h>
#include <sys/stat.h>
#include "config.h"
#include "run_identity.h"
#include "expert_shard.h"

// learning-rate schedules (lr_schedule.h computes them)
enum { LR_SCHEDULE_COSINE = 0, LR_SCHEDULE_WSD = 1, LR_SCHEDULE_CONSTANT = 2 };

static inline const char* lr_schedule_name(int s) {
    return s == LR_SCHEDULE_WSD ? "wsd" : (s == LR_SCHEDULE_CONSTANT ? "constant" : "cosine");
}
static inline const char* expert_exec_name(int e) { return e == EXPERT_EXEC_TOKEN ? "token" : "expert"; }
// attention kernels of the CUDA trainer: ours (llmc/attention.cuh) or cuDNN's SDPA (llmc/attention_cudnn.h)
enum { ATTENTION_OURS = 0, ATTENTION_CUDNN = 1 };

#define TRAIN_PATH_MAX 1024

typedef struct {
    // data and output
    char train_data_pattern[TRAIN_PATH_MAX];  // -i  glob of training shards
    char val_data_pattern[TRAIN_PATH_MAX];    // -j  glob of validation shards ("" = no validation)
    char output_dir[TRAIN_PATH_MAX];          // -o  logs + checkpoints ("" = neither)
    char log_file[TRAIN_PATH_MAX];            // --log-file  ("" = <output_dir>/log.jsonl, none without -o)
    char model[TRAIN_PATH_MAX];               // -e  preset name (config.h) or path of a model .bin
    // batch
    int B;                                    // -b  micro-batch size per process
    int T;                                    // -t  sequence length
    long long total_batch_size;               // -d  tokens per optimiser step; -1 = B*T*num_processes
    int num_processes;                        // not a flag: set by the trainer (default 1)
    int process_rank;                         // not a flag: set by the trainer (default 0)
    // multi-GPU launch without mpirun (multi_gpu.cuh)
    int launch_processes;                     // -pn  processes of the job (1 = one GPU)
    int launch_rank;                          // -pr  this process's rank, in [0, -pn)
    char launch_id_file[TRAIN_PATH_MAX];      // -pf  file (shared by all hosts) where the ranks meet
    int overlap_comm;                         // --overlap-comm  1 = the gradient all-reduce runs under the backward
    int shard_experts;                        // --shard-experts  1 = U, V split by columns over the processes (docs/sharding.md §3.1)
    int zero;                                 // --zero  1 = ZeRO-1: optimizer state sharded over the processes (docs/sharding.md §2)
    // optimisation
    int num_steps;                            // -x  optimiser steps
    float learning_rate;                      // -l  peak learning rate
    int warmup_steps;                         // -u  linear warm-up steps
    float final_lr_frac;                      // -q  final lr = final_lr_frac * lr
    int lr_schedule;                          // --schedule  LR_SCHEDULE_*
    float decay_frac;                         // --decay-frac  WSD: share of steps in the final decay
    float weight_decay;                       // -c  AdamW weight decay (matrices only)
    float grad_clip;                          // --grad-clip  global-norm clip (0 = off)
    float beta1, beta2, eps;                  // --beta1 --beta2 --eps  AdamW
    // evaluation, sampling, checkpoints
    int val_every;                            // -v  evaluate every this many steps (0 = never)
    int val_max_batches;                      // -m  batches per evaluation (-1 = the whole val set)
    int sample_every;                         // -s  sample every this many steps (0 = never)
    char mc_eval_path[TRAIN_PATH_MAX];        // --mc-eval  multiple-choice eval file ("" = off; llmc/mc_eval.h)
    int mc_every;                             // --mc-every  its interval (-1 = the -v interval; 0 = last step only)
    int gen_tokens;                           // -g  tokens generated per sample
    int checkpoint_every;                     // -n  checkpoint every this many steps (0 = never)
    int resume;                               // -y  1 = resume from the latest complete checkpoint in -o
    int overwrite;                            // --overwrite  1 = a fresh run may replace another run's files in -o
    unsigned long long seed;                  // --seed  init, shuffling and sampling seed
    int shuffle;                              // --shuffle  1 = shuffle training windows per epoch
    // model knobs (-1 / 0 = take the preset's value)
    int ffn_kind;                             // -f  FFN_* ; -1 = omni for a preset, the file's kind for a file
    int ffn_hidden;                           // --hidden  I (gelu: the 4C width); 0 = preset
    int num_experts;                          // --experts  N = n*n; 0 = preset
    int top_k;                                // --topk  k; 0 = preset
    int router_norm;                          // --router-norm  ROUTER_NORM_*; -1 = preset (bn)
    int gate;                                 // --gate  GATE_*; -1 = preset (softmax)
    int expert_exec;                          // --expert-exec  EXPERT_EXEC_* (run-time choice, not saved in the model)
    int attention;                            // --attention  ATTENTION_* (CUDA trainer; run-time choice, in checkpoints)
    int recompute;                            // -r  --recompute  0 keep, 1 recompute the FFN activation, 2 also LN1/LN2 (CUDA trainer)
    int gelu_fusion;                          // --gelu-fusion  gelu's GELU in GEMM epilogues: 0 none, 1 forward, 2 also backward, 3 both in CUTLASS's (CUDA trainer)
    int overlap_dweight;                      // --overlap-dweight  1 = the backward's weight-gradient GEMMs on a second stream, -1 = on unless -r (CUDA trainer)
    int matmul_tune;                          // --matmul-tune  1 = each GEMM the fastest cuBLASLt candidate with the same bits (CUDA trainer)
    // the memory plan (llmc/memory_plan.h)
    int plan_gpus;                            // --plan  print the per-GPU memory plan of a run on this many GPUs, exit (0 = train)
    // moe knobs (docs/design.md §10.7); model fields: -1 = the preset's (or --moepp's) value
    int moe_experts, moe_topk, moe_shared;    // --moe-experts --moe-topk --moe-shared  E, k, S
    int moe_zero, moe_copy, moe_const;        // --moe-zero --moe-copy --moe-const  MoE++ expert counts
    int moe_gate_res, moe_norm_topk;          // --moe-gate-res --moe-norm-topk  0/1
    int moe_router, moe_input_scale;          // --moe-router MOE_ROUTER_*  --moe-input-scale 0/1
    int moepp;                                // --moepp  1 = the MoE++ release's choices as the defaults above
    float moe_aux;                            // --moe-aux  load-balance loss coefficient alpha (0 = off)
    float moe_zc_weight;                      // --moe-zc-weight  tau: its weight for zero-computation experts
    float moe_bias_rate;                      // --moe-bias-rate  gamma of the loss-free bias update (0 = off)
    int moe_gemm;                             // --moe-gemm  the experts' grouped GEMM: 0 loop, 1 cublas, 2 cutlass (CUDA trainer; MOE_GEMM_* in llmc/moe_experts.cuh)
    int moe_token_reads;                      // --moe-token-reads  1 = CUTLASS's grouped GEMMs read x's and dy's rows through the schedule (CUDA trainer)
} TrainConfig;

// ----------------------------------------------------------------------------
// the flag table

enum { TRAIN_ARG_INT, TRAIN_ARG_LONG, TRAIN_ARG_U64, TRAIN_ARG_FLOAT, TRAIN_ARG_STRING, TRAIN_ARG_CHOICE };

typedef struct {
    const char* short_name;   // "-b", or NULL
    const char* long_name;    // "--batch-size"
    int kind;                 // TRAIN_ARG_*
    size_t offset;            // of the field in TrainConfig
    double min, max;          // numbers: allowed range (inclusive); strings: min 1 = must not be empty
    int minus_one_ok;         // numbers: -1 is allowed besides [min, max] (a special meaning)
    const char* choices;      // TRAIN_ARG_CHOICE: words separated by '|', word i is stored as value i
    const char* help;         // one line
} TrainFlag;

#define TRAIN_NO_MAX 1e300
#define TRAIN_INT_MAX 2147483647.0

// Order = order of --help. The CHOICE word lists follow the enum values of config.h and above.
static const TrainFlag train_flags[] = {
    {"-i", "--train-data", TRAIN_ARG_STRING, offsetof(TrainConfig, train_data_pattern), 1, 0, 0, NULL, "training shards (glob pattern)"},
    {"-j", "--val-data", TRAIN_ARG_STRING, offsetof(TrainConfig, val_data_pattern), 0, 0, 0, NULL, "validation shards (glob pattern; \"\" = no validation)"},
    {"-o", "--output-dir", TRAIN_ARG_STRING, offsetof(TrainConfig, output_dir), 0, 0, 0, NULL, "directory for the log and checkpoints (\"\" = none)"},
    {"-e", "--model", TRAIN_ARG_STRING, offsetof(TrainConfig, model), 1, 0, 0, NULL, "preset (tiny small d6 d12 d24 d36 d48) or a model .bin file to start from"},
    {"-b", "--batch-size", TRAIN_ARG_INT, offsetof(TrainConfig, B), 1, TRAIN_INT_MAX, 0, NULL, "micro-batch size B (sequences per process per micro-step)"},
    {"-t", "--seq-len", TRAIN_ARG_INT, offsetof(TrainConfig, T), 1, TRAIN_INT_MAX, 0, NULL, "sequence length T (<= the model's max_seq_len)"},
    {"-d", "--total-batch-size", TRAIN_ARG_LONG, offsetof(TrainConfig, total_batch_size), 1, 9.0e18, 1, NULL, "tokens per optimiser step, a multiple of B*T*processes (-1 = B*T*processes)"},
    {"-x", "--steps", TRAIN_ARG_INT, offsetof(TrainConfig, num_steps), 0, TRAIN_INT_MAX - 1, 0, NULL, "number of optimiser steps"},
    {"-l", "--lr", TRAIN_ARG_FLOAT, offsetof(TrainConfig, learning_rate), 0, TRAIN_NO_MAX, 0, NULL, "peak learning rate"},
    {"-u", "--warmup", TRAIN_ARG_INT, offsetof(TrainConfig, warmup_steps), 0, TRAIN_INT_MAX, 0, NULL, "linear warm-up steps"},
    {"-q", "--final-lr-frac", TRAIN_ARG_FLOAT, offsetof(TrainConfig, final_lr_frac), 0, 1, 0, NULL, "final learning rate as a fraction of the peak (cosine, wsd)"},
    {NULL, "--schedule", TRAIN_ARG_CHOICE, offsetof(TrainConfig, lr_schedule), 0, 0, 0, "cosine|wsd|constant", "learning-rate schedule after warm-up"},
    {NULL, "--decay-frac", TRAIN_ARG_FLOAT, offsetof(TrainConfig, decay_frac), 0, 1, 0, NULL, "wsd: fraction of all steps spent in the final linear decay"},
    {"-c", "--weight-decay", TRAIN_ARG_FLOAT, offsetof(TrainConfig, weight_decay), 0, TRAIN_NO_MAX, 0, NULL, "AdamW weight decay (matrices and embeddings only)"},
    {NULL, "--grad-clip", TRAIN_ARG_FLOAT, offsetof(TrainConfig, grad_clip), 0, TRAIN_NO_MAX, 0, NULL, "clip the global gradient norm to this (0 = off)"},
    {NULL, "--beta1", TRAIN_ARG_FLOAT, offsetof(TrainConfig, beta1), 0, 0.999999, 0, NULL, "AdamW beta1, in [0, 1)"},
    {NULL, "--beta2", TRAIN_ARG_FLOAT, offsetof(TrainConfig, beta2), 0, 0.999999, 0, NULL, "AdamW beta2, in [0, 1)"},
    {NULL, "--eps", TRAIN_ARG_FLOAT, offsetof(TrainConfig, eps), 1e-30, 1, 0, NULL, "AdamW epsilon (> 0)"},
    {"-v", "--val-every", TRAIN_ARG_INT, offsetof(TrainConfig, val_every), 0, TRAIN_INT_MAX, 0, NULL, "evaluate the validation loss every this many steps (0 = never)"},
    {"-m", "--val-max-batches", TRAIN_ARG_INT, offsetof(TrainConfig, val_max_batches), 1, TRAIN_INT_MAX, 1, NULL, "batches per evaluation (-1 = the whole validation set)"},
    {NULL, "--mc-eval", TRAIN_ARG_STRING, offsetof(TrainConfig, mc_eval_path), 0, 0, 0, NULL, "multiple-choice eval file, llm.c's HellaSwag format (\"\" = none; needs -b >= 4)"},
    {NULL, "--mc-every", TRAIN_ARG_INT, offsetof(TrainConfig, mc_every), 0, TRAIN_INT_MAX, 1, NULL, "--mc-eval every this many steps, and at the last step (-1 = the -v interval; 0 = the last step only)"},
    {"-s", "--sample-every", TRAIN_ARG_INT, offsetof(TrainConfig, sample_every), 0, TRAIN_INT_MAX, 0, NULL, "print a generated sample every this many steps (0 = never)"},
    {"-g", "--gen-tokens", TRAIN_ARG_INT, offsetof(TrainConfig, gen_tokens), 1, TRAIN_INT_MAX, 0, NULL, "tokens per generated sample (<= max_seq_len)"},
    {"-n", "--checkpoint-every", TRAIN_ARG_INT, offsetof(TrainConfig, checkpoint_every), 0, TRAIN_INT_MAX, 0, NULL, "write a checkpoint to -o every this many steps (0 = never)"},
    {"-y", "--resume", TRAIN_ARG_INT, offsetof(TrainConfig, resume), 0, 1, 0, NULL, "1 = resume from the latest complete checkpoint in -o"},
    {NULL, "--overwrite", TRAIN_ARG_INT, offsetof(TrainConfig, overwrite), 0, 1, 0, NULL, "1 = a fresh run may replace the checkpoints, log and model of another run in -o (else refused)"},
    {NULL, "--seed", TRAIN_ARG_U64, offsetof(TrainConfig, seed), 0, 0, 0, NULL, "seed of initialisation, data shuffling and sampling"},
    {NULL, "--shuffle", TRAIN_ARG_INT, offsetof(TrainConfig, shuffle), 0, 1, 0, NULL, "1 = shuffle the training windows each epoch, 0 = read in order"},
    {"-f", "--ffn", TRAIN_ARG_CHOICE, offsetof(TrainConfig, ffn_kind), 0, 0, 0, "gelu|swiglu|omni|moe", "feed-forward kind (unset = omni for a preset, the file's for a file)"},
    {NULL, "--hidden", TRAIN_ARG_INT, offsetof(TrainConfig, ffn_hidden), 0, TRAIN_INT_MAX, 0, NULL, "FFN width: I for swiglu/omni, 4C for gelu, one expert's I_e for moe (0 = the preset's)"},
    {NULL, "--experts", TRAIN_ARG_INT, offsetof(TrainConfig, num_experts), 0, TRAIN_INT_MAX, 0, NULL, "omni: number of experts N, a perfect square n*n (0 = the preset's)"},
    {NULL, "--topk", TRAIN_ARG_INT, offsetof(TrainConfig, top_k), 0, TRAIN_INT_MAX, 0, NULL, "omni: experts per token k <= N (0 = the preset's)"},
    {NULL, "--router-norm", TRAIN_ARG_CHOICE, offsetof(TrainConfig, router_norm), 0, 0, 0, "none|bn", "omni: router normalisation (unset = bn)"},
    {NULL, "--gate", TRAIN_ARG_CHOICE, offsetof(TrainConfig, gate), 0, 0, 0, "softmax|prob", "omni: gate over the k selected scores (unset = softmax)"},
    {NULL, "--expert-exec", TRAIN_ARG_CHOICE, offsetof(TrainConfig, expert_exec), 0, 0, 0, "token|expert", "omni: expert-branch execution, token-centric (default) or expert-centric (same bits)"},
    {NULL, "--attention", TRAIN_ARG_CHOICE, offsetof(TrainConfig, attention), 0, 0, 0, "ours|cudnn", "CUDA trainer: attention kernels, ours (default) or cuDNN's SDPA (a `make USE_CUDNN=1` build; other bits)"},
    {NULL, "--gelu-fusion", TRAIN_ARG_INT, offsetof(TrainConfig, gelu_fusion), 0, 3, 0, NULL, "CUDA trainer, -f gelu: the GELU in cuBLASLt's GEMM epilogues, 0 none, 1 the forward, 2 also the backward (the DGELU epilogue; the CUDA trainer's default), 3 both in CUTLASS's epilogues instead (`make USE_CUTLASS=1` builds); each rounds differently (the CPU reference: 1 only)"},
    {NULL, "--matmul-tune", TRAIN_ARG_INT, offsetof(TrainConfig, matmul_tune), 0, 1, 0, NULL, "CUDA trainer: 1 = each GEMM shape runs the fastest of cuBLASLt's first 8 candidates whose output has the bits of its first (timed once, at the shape's first call); 0 = the first (same bits either way); the CUDA trainer's default 1"},
    {NULL, "--overlap-dweight", TRAIN_ARG_INT, offsetof(TrainConfig, overlap_dweight), -1, 1, 0, NULL, "CUDA trainer: 1 = the backward's weight-gradient GEMMs (qkv, attproj, gelu's fc and fcproj) on a second stream beside the rest, 0 = in line (same bits; 1 not with -r), -1 (the CUDA trainer's default) = 1 with -r 0, else 0"},
    {"-r", "--recompute", TRAIN_ARG_INT, offsetof(TrainConfig, recompute), 0, 2, 0, NULL, "CUDA trainer: activation recomputation, 0 keep all (default), 1 recompute the FFN activation in the backward, 2 also the LayerNorm outputs (less memory, same bits; gelu: the unfused GELU)"},
    {NULL, "--moe-experts", TRAIN_ARG_INT, offsetof(TrainConfig, moe_experts), 0, 65536, 1, NULL, "moe: routed SwiGLU experts E (-1 = the preset's)"},
    {NULL, "--moe-topk", TRAIN_ARG_INT, offsetof(TrainConfig, moe_topk), 1, 65536, 1, NULL, "moe: experts per token k, among all routed experts (-1 = the preset's)"},
    {NULL, "--moe-shared", TRAIN_ARG_INT, offsetof(TrainConfig, moe_shared), 0, 65536, 1, NULL, "moe: shared experts S, each of width I_e (-1 = the preset's)"},
    {NULL, "--moepp", TRAIN_ARG_INT, offsetof(TrainConfig, moepp), 0, 1, 0, NULL, "moe: 1 = the MoE++ release's choices: 1 zero, 1 copy, 2 constant experts, gating residuals, --moe-norm-topk 1, --moe-router tanh, --moe-input-scale 1"},
    {NULL, "--moe-zero", TRAIN_ARG_INT, offsetof(TrainConfig, moe_zero), 0, 65536, 1, NULL, "moe: MoE++ zero experts (-1 = 0, or 1 with --moepp 1)"},
    {NULL, "--moe-copy", TRAIN_ARG_INT, offsetof(TrainConfig, moe_copy), 0, 65536, 1, NULL, "moe: MoE++ copy experts (-1 = 0, or 1 with --moepp 1)"},
    {NULL, "--moe-const", TRAIN_ARG_INT, offsetof(TrainConfig, moe_const), 0, 65536, 1, NULL, "moe: MoE++ constant experts (-1 = 0, or 2 with --moepp 1)"},
    {NULL, "--moe-gate-res", TRAIN_ARG_INT, offsetof(TrainConfig, moe_gate_res), 0, 1, 1, NULL, "moe: 1 = gating residuals, each router adds G times the previous layer's logits (-1 = 0, or 1 with --moepp 1)"},
    {NULL, "--moe-norm-topk", TRAIN_ARG_INT, offsetof(TrainConfig, moe_norm_topk), 0, 1, 1, NULL, "moe: 1 = gates renormalised over the chosen non-zero experts (MoE++), 0 = softmax probabilities (DeepSeekMoE) (-1 = 0, or 1 with --moepp 1)"},
    {NULL, "--moe-router", TRAIN_ARG_CHOICE, offsetof(TrainConfig, moe_router), 0, 0, 0, "linear|tanh", "moe: router, linear (DeepSeekMoE) or the two-layer tanh gate C -> 8E_t -> E_t (MoE++ release) (unset = linear, or tanh with --moepp 1)"},
    {NULL, "--moe-input-scale", TRAIN_ARG_INT, offsetof(TrainConfig, moe_input_scale), 0, 1, 1, NULL, "moe: 1 = the routed experts see k*x, as the MoE++ release (-1 = 0, or 1 with --moepp 1)"},
    {NULL, "--moe-aux", TRAIN_ARG_FLOAT, offsetof(TrainConfig, moe_aux), 0, TRAIN_NO_MAX, 0, NULL, "moe: load-balance loss coefficient alpha (0 = off)"},
    {NULL, "--moe-zc-weight", TRAIN_ARG_FLOAT, offsetof(TrainConfig, moe_zc_weight), 0, TRAIN_NO_MAX, 0, NULL, "moe: the balance loss's weight tau of zero, copy and constant experts (FFN experts: 1)"},
    {NULL, "--moe-gemm", TRAIN_ARG_CHOICE, offsetof(TrainConfig, moe_gemm), 0, 0, 0, "loop|cublas|cutlass", "CUDA trainer, moe: the routed experts' GEMMs, one per expert, cuBLAS's grouped GEMM (the default of builds without CUTLASS) or CUTLASS's (the default of a `make USE_CUTLASS=1` build: the d12 moe step 1.9x faster on an H100); the same math"},
    {NULL, "--moe-token-reads", TRAIN_ARG_INT, offsetof(TrainConfig, moe_token_reads), 0, 1, 0, NULL, "CUDA trainer, moe with --moe-gemm cutlass: 1 = the grouped GEMMs read the experts' input and output-gradient rows through the schedule, with no gathered copies and no per-layer copy of the inputs kept (less memory, and faster: the moe layer 1.385x against 1.450x the dense SwiGLU at 32,768 tokens, C=1024, on an H100, one call); 0 = gather them first (same bits either way; default 1 in CUTLASS builds, else 0)"},
    {NULL, "--moe-bias-rate", TRAIN_ARG_FLOAT, offsetof(TrainConfig, moe_bias_rate), 0, TRAIN_NO_MAX, 0, NULL, "moe: loss-free balancing, bias step gamma per optimiser step (0 = off)"},
    {NULL, "--log-file", TRAIN_ARG_STRING, offsetof(TrainConfig, log_file), 0, 0, 0, NULL, "JSONL log path (\"\" = <output dir>/log.jsonl when -o is set)"},
    {"-pn", "--num-processes", TRAIN_ARG_INT, offsetof(TrainConfig, launch_processes), 1, 65536, 0, NULL, "launch without mpirun: number of processes (one per GPU; needs -pf; ignored under mpirun)"},
    {"-pr", "--process-rank", TRAIN_ARG_INT, offsetof(TrainConfig, launch_rank), 0, 65535, 0, NULL, "launch without mpirun: this process's rank in [0, -pn)"},
    {"-pf", "--nccl-id-file", TRAIN_ARG_STRING, offsetof(TrainConfig, launch_id_file), 0, 0, 0, NULL, "launch without mpirun: a new file path (on a file system all hosts share) where rank 0 leaves the NCCL id"},
    {NULL, "--overlap-comm", TRAIN_ARG_INT, offsetof(TrainConfig, overlap_comm), 0, 1, 0, NULL, "several GPUs: 1 (default) = average each layer's gradients while the backward goes on, 0 = after it (same bits)"},
    {NULL, "--shard-experts", TRAIN_ARG_INT, offsetof(TrainConfig, shard_experts), 0, 1, 0, NULL, "several GPUs, omni: 1 = split the expert tables U, V by columns over the processes (needs C/8 divisible by them), 0 (default) = every GPU holds them whole"},
    {NULL, "--zero", TRAIN_ARG_INT, offsetof(TrainConfig, zero), 0, 1, 0, NULL, "several GPUs: 1 = ZeRO-1, each process keeps 1/P of the fp32 master weights and AdamW state (0 = every process all of it)"},
    {NULL, "--plan", TRAIN_ARG_INT, offsetof(TrainConfig, plan_gpus), 0, 65536, 0, NULL, "print the memory plan per GPU of this run on this many GPUs (with --zero, --shard-experts) and exit, no GPU needed (0 = train)"},
};
#define TRAIN_NUM_FLAGS ((int)(sizeof(train_flags) / sizeof(train_flags[0])))

static inline void train_config_defaults(TrainConfig* cfg) {
    memset(cfg, 0, sizeof(*cfg));
    strcpy(cfg->train_data_pattern, "data/tinyshakespeare/tiny_shakespeare_train.bin");
    strcpy(cfg->val_data_pattern, "data/tinyshakespeare/tiny_shakespeare_val.bin");
    cfg->output_dir[0] = '\0';
    cfg->log_file[0] = '\0';
    strcpy(cfg->model, "d12");
    cfg->B = 4;
    cfg->T = 1024;
    cfg->total_batch_size = -1;
    cfg->num_processes = 1;
    cfg->process_rank = 0;
    cfg->launch_processes = 1;
    cfg->launch_rank = 0;
    cfg->launch_id_file[0] = '\0';
    cfg->overlap_comm = 1;
    cfg->zero = 0;  // ZeRO-1 off until it has been measured (docs/sharding.md §2)
#if defined(__CUDACC__)
    // the CUDA trainer's step options (docs/performance.md target 5): the GELU backward in the DGELU
    // epilogue too (1.7 ms of a d12 step; other bits than 1); the fastest same-bits cuBLASLt
    // candidates; the weight-gradient GEMMs on a second stream where -r allows (-1: on with -r 0)
    cfg->gelu_fusion = 2;
    cfg->matmul_tune = 1;
    cfg->overlap_dweight = -1;
#else
    cfg->gelu_fusion = 1;  // the CPU reference computes the GELU itself and accepts only this value
    cfg->matmul_tune = 0;
    cfg->overlap_dweight = 0;
#endif
    cfg->num_steps = 1000;
    cfg->learning_rate = 6e-4f;
    cfg->warmup_steps = 100;
    cfg->final_lr_frac = 0.1f;
    cfg->lr_schedule = LR_SCHEDULE_COSINE;
    cfg->decay_frac = 0.2f;
    cfg->weight_decay = 0.1f;
    cfg->grad_clip = 1.0f;
    cfg->beta1 = 0.9f;
    cfg->beta2 = 0.95f;
    cfg->eps = 1e-8f;
    cfg->val_every = 100;
    cfg->val_max_batches = 20;
    cfg->mc_eval_path[0] = '\0';
    cfg->mc_every = -1;
    cfg->sample_every = 200;
    cfg->gen_tokens = 64;
    cfg->checkpoint_every = 0;
    cfg->resume = 0;
    cfg->seed = 42;
    cfg->shuffle = 1;
    cfg->ffn_kind = -1;
    cfg->ffn_hidden = 0;
    cfg->num_experts = 0;
    cfg->top_k = 0;
    cfg->router_norm = -1;
    cfg->gate = -1;
    cfg->expert_exec = EXPERT_EXEC_TOKEN;  // measured faster in the trainer (docs/performance.md)
    cfg->plan_gpus = 0;
    cfg->moe_experts = cfg->moe_topk = cfg->moe_shared = -1;
    cfg->moe_zero = cfg->moe_copy = cfg->moe_const = -1;
    cfg->moe_gate_res = cfg->moe_norm_topk = -1;
    cfg->moe_router = cfg->moe_input_scale = -1;
    cfg->moepp = 0;
    cfg->moe_aux = 0.01f;        // DeepSeekMoE's expert-level balance factor
    cfg->moe_zc_weight = 0.75f;
    cfg->moe_bias_rate = 0.0f;
#if defined(ENABLE_CUTLASS) && !defined(ENABLE_FP32)
    cfg->moe_gemm = 2;  // CUTLASS's grouped GEMM where the build has it: the d12 moe step in half the time (docs/design.md §10.8)
    cfg->moe_token_reads = 1;  // and its GEMMs read x's and dy's rows through the schedule (no gathered copies)
#else
    cfg->moe_gemm = 1;  // cuBLAS's grouped GEMM
    cfg->moe_token_reads = 0;
#endif
}

// ----------------------------------------------------------------------------
// helpers of the table

static inline void* train_flag_field_(TrainConfig* cfg, const TrainFlag* f) { return (char*)cfg + f->offset; }
static inline const void* train_flag_cfield_(const TrainConfig* cfg, const TrainFlag* f) {
    return (const char*)cfg + f->offset;
}

// "-b/--batch-size" or "--schedule"
static inline void train_flag_names_(const TrainFlag* f, char* out, size_t size) {
    if (f->short_name) snprintf(out, size, "%s/%s", f->short_name, f->long_name);
    else snprintf(out, size, "%s", f->long_name);
}

// the word of choice `value` in "a|b|c"; returns 0 if out of range
static inline int train_choice_word_(const char* choices, int value, char* out, size_t size) {
    const char* p = choices;
    for (int i = 0; ; i++) {
        const char* bar = strchr(p, '|');
        size_t len = bar ? (size_t)(bar - p) : strlen(p);
        if (i == value) {
            if (len >= size) len = size - 1;
            memcpy(out, p, len);
            out[len] = '\0';
            return 1;
        }
        if (!bar) return 0;
        p = bar + 1;
    }
}

// index of `word` in "a|b|c", -1 if absent
static inline int train_choice_index_(const char* choices, const char* word) {
    const char* p = choices;
    size_t wlen = strlen(word);
    for (int i = 0; ; i++) {
        const char* bar = strchr(p, '|');
        size_t len = bar ? (size_t)(bar - p) : strlen(p);
        if (len == wlen && strncmp(p, word, len) == 0) return i;
        if (!bar) return -1;
        p = bar + 1;
    }
}

// what a value of this flag must look like, for messages and --help
static inline void train_flag_expected_(const TrainFlag* f, char* out, size_t size) {
    const char* minus = f->minus_one_ok ? "-1 or " : "";
    switch (f->kind) {
        case TRAIN_ARG_STRING:
            snprintf(out, size, "%s", f->min >= 1 ? "a non-empty string" : "a string");
            break;
        case TRAIN_ARG_CHOICE:
            snprintf(out, size, "one of %s", f->choices);
            break;
        case TRAIN_ARG_U64:
            snprintf(out, size, "an unsigned integer");
            break;
        case TRAIN_ARG_INT:
        case TRAIN_ARG_LONG:
            if (f->max == 1 && f->min == 0) snprintf(out, size, "%s0 or 1", minus);
            else if (f->max >= TRAIN_INT_MAX) snprintf(out, size, "%san integer >= %.0f", minus, f->min);
            else snprintf(out, size, "%san integer in [%.0f, %.0f]", minus, f->min, f->max);
            break;
        default:  // TRAIN_ARG_FLOAT
            if (f->max >= TRAIN_NO_MAX) snprintf(out, size, "%sa number >= %g", minus, f->min);
            else if (f->min > 0 && f->min < 1e-20) snprintf(out, size, "%sa number > 0 and <= %g", minus, f->max);
            else if (f->max < 1 && f->max > 0.99) snprintf(out, size, "%sa number in [%g, 1)", minus, f->min);
            else snprintf(out, size, "%sa number in [%g, %g]", minus, f->min, f->max);
            break;
    }
}

// the current value of a flag as text (for --help defaults and train_config_print)
static inline void train_flag_value_text_(const TrainConfig* cfg, const TrainFlag* f, char* out, size_t size) {
    const void* p = train_flag_cfield_(cfg, f);
    switch (f->kind) {
        case TRAIN_ARG_STRING: snprintf(out, size, "\"%s\"", (const char*)p); break;
        case TRAIN_ARG_INT: snprintf(out, size, "%d", *(const int*)p); break;
        case TRAIN_ARG_LONG: snprintf(out, size, "%lld", *(const long long*)p); break;
        case TRAIN_ARG_U64: snprintf(out, size, "%llu", *(const unsigned long long*)p); break;
        case TRAIN_ARG_FLOAT: snprintf(out, size, "%g", (double)*(const float*)p); break;
        default: {
            int v = *(const int*)p;
            if (!train_choice_word_(f->choices, v, out, size)) snprintf(out, size, "unset");
            break;
        }
    }
}

static inline void train_flag_fail_(const TrainFlag* f, const char* value, const char* why) {
    char names[64], expected[128];
    train_flag_names_(f, names, sizeof(names));
    train_flag_expected_(f, expected, sizeof(expected));
    fprintf(stderr, "Error: bad value \"%s\" for flag %s (%s): %s; expected %s\n", value, names, f->help, why,
            expected);
    exit(EXIT_FAILURE);
}

// parses `value` into the field of flag f or exits with a message naming the flag
static inline void train_flag_set_(TrainConfig* cfg, const TrainFlag* f, const char* value) {
    void* p = train_flag_field_(cfg, f);
    if (f->kind == TRAIN_ARG_STRING) {
        size_t len = strlen(value);
        if (f->min >= 1 && len == 0) train_flag_fail_(f, value, "empty");
        if (len >= TRAIN_PATH_MAX) train_flag_fail_(f, value, "longer than 1023 characters");
        memcpy(p, value, len + 1);
        return;
    }
    if (f->kind == TRAIN_ARG_CHOICE) {
        int index = train_choice_index_(f->choices, value);
        if (index < 0) train_flag_fail_(f, value, "not a known word");
        *(int*)p = index;
        return;
    }
    if (value[0] == '\0') train_flag_fail_(f, value, "empty");
    char* end = NULL;
    errno = 0;
    if (f->kind == TRAIN_ARG_U64) {
        const char* s = value;
        while (*s == ' ' || *s == '\t') s++;
        if (*s == '-') train_flag_fail_(f, value, "negative");
        unsigned long long u = strtoull(value, &end, 10);
        if (*end != '\0') train_flag_fail_(f, value, "not an integer");
        if (errno == ERANGE) train_flag_fail_(f, value, "out of range");
        *(unsigned long long*)p = u;
        return;
    }
    double x;
    if (f->kind == TRAIN_ARG_FLOAT) {
        x = strtod(value, &end);
        if (*end != '\0' || end == value) train_flag_fail_(f, value, "not a number");
        if (!isfinite(x) || errno == ERANGE) train_flag_fail_(f, value, "not a finite number in float range");
        if (fabs(x) > FLT_MAX) train_flag_fail_(f, value, "too large for a float");
        if (x != 0.0 && (float)x == 0.0f) train_flag_fail_(f, value, "too small for a float (it would be 0)");
    } else {
        long long v = strtoll(value, &end, 10);
        if (*end != '\0' || end == value) train_flag_fail_(f, value, "not an integer");
        if (errno == ERANGE) train_flag_fail_(f, value, "out of range");
        x = (double)v;
        if (f->kind == TRAIN_ARG_INT && (v > 2147483647LL || v < -2147483647LL)) {
            train_flag_fail_(f, value, "out of the int range");
        }
    }
    int ok = (x >= f->min && x <= f->max) || (f->minus_one_ok && x == -1.0);
    if (!ok) {
        const char* why = x < 0 && f->min >= 0 ? "negative" : "out of range";
        train_flag_fail_(f, value, why);
    }
    if (f->kind == TRAIN_ARG_FLOAT) *(float*)p = (float)x;
    else if (f->kind == TRAIN_ARG_LONG) *(long long*)p = strtoll(value, NULL, 10);  // exact: x rounds above 2^53
    else *(int*)p = (int)x;
}

static inline const TrainFlag* train_flag_find_(const char* name) {
    for (int i = 0; i < TRAIN_NUM_FLAGS; i++) {
        const TrainFlag* f = &train_flags[i];
        if ((f->short_name && strcmp(name, f->short_name) == 0) || strcmp(name, f->long_name) == 0) return f;
    }
    return NULL;
}

// ----------------------------------------------------------------------------
// help and printing

// the flag table with the values of `defaults` (what the trainer set before parsing)
static inline void train_config_print_help_with(const char* prog, const TrainConfig* defaults) {
    printf("Usage: %s [flags]   (each flag takes one value: -b 4, --batch-size 4 or --batch-size=4)\n", prog);
    printf("Trains a GPT-2-style model with gelu, SwiGLU, OmniMoE or moe (DeepSeekMoE, MoE++) feed-forward layers.\n\n");
    for (int i = 0; i < TRAIN_NUM_FLAGS; i++) {
        const TrainFlag* f = &train_flags[i];
        char names[64], def[TRAIN_PATH_MAX + 8], expected[128];
        train_flag_names_(f, names, sizeof(names));
        train_flag_value_text_(defaults, f, def, sizeof(def));
        train_flag_expected_(f, expected, sizeof(expected));
        printf("  %-24s %s\n  %-24s   value: %s; default: %s\n", names, f->help, "", expected, def);
    }
    printf("  %-24s %s\n", "-h/--help", "print this help and exit");
    printf("\nThe JSONL log gets one line per step and per evaluation; checkpoints are <output dir>/ckpt_<step>.bin.\n");
    printf("\nSeveral GPUs (the CUDA trainer; data parallel, one process per GPU):\n"
           "  mpirun -np 4 ./train_omnimoe [flags]              one host; several hosts: mpirun --hostfile\n"
           "  ./train_omnimoe -pn 2 -pr R -pf /tmp/omni.id ...  without MPI: one process per rank R = 0, 1\n"
           "                                                    (scripts/run_multi_gpu.sh starts them)\n"
           "  -b is per process and -d the global batch: grad accumulation = d / (B*T*processes).\n"
           "  Rank 0 alone prints, logs and writes files. Each rank reads its own slice of the data and keeps\n"
           "  its own router BN statistics; a checkpoint holds every rank's set. Resuming on another GPU count\n"
           "  works: rank r takes BN set r mod (the saved process count), and the data position is rounded up\n"
           "  to a whole round of the new count. Evaluation: ceil(-m / processes) batches per rank, averaged.\n");
}

// the flag table with the library defaults
static inline void train_config_print_help(const char* prog) {
    TrainConfig defaults;
    train_config_defaults(&defaults);
    train_config_print_help_with(prog, &defaults);
}

static inline void train_config_print(const TrainConfig* cfg) {
    printf("+-----------------------+----------------------------------------------------+\n");
    for (int i = 0; i < TRAIN_NUM_FLAGS; i++) {
        const TrainFlag* f = &train_flags[i];
        char value[TRAIN_PATH_MAX + 8];
        train_flag_value_text_(cfg, f, value, sizeof(value));
        printf("| %-21s | %-50s |\n", f->long_name + 2, value);
    }
    printf("| %-21s | %-50d |\n", "num_processes", cfg->num_processes);
    printf("+-----------------------+----------------------------------------------------+\n");
}

// ----------------------------------------------------------------------------
// parsing

// Applies argv over the values already in cfg (normally train_config_defaults, possibly changed
// by the trainer). -h/--help prints the help with the values cfg held on entry and exits 0.
// Any unknown flag, missing or bad value prints one message naming the flag and exits 1.
static inline void train_config_parse(TrainConfig* cfg, int argc, char** argv) {
    TrainConfig on_entry = *cfg;
    const char* prog = argc > 0 ? argv[0] : "train_omnimoe";
    for (int i = 1; i < argc; i++) {
        const char* arg = argv[i];
        if (strcmp(arg, "-h") == 0 || strcmp(arg, "--help") == 0) {
            train_config_print_help_with(prog, &on_entry);
            exit(EXIT_SUCCESS);
        }
        if (arg[0] != '-' || arg[1] == '\0') {
            fprintf(stderr, "Error: unexpected argument \"%s\": flags come in pairs (-flag value); see --help\n", arg);
            exit(EXIT_FAILURE);
        }
        char name[128];
        const char* value = NULL;
        const char* eq = strncmp(arg, "--", 2) == 0 ? strchr(arg, '=') : NULL;
        size_t name_len = eq ? (size_t)(eq - arg) : strlen(arg);
        if (name_len >= sizeof(name)) name_len = sizeof(name) - 1;
        memcpy(name, arg, name_len);
        name[name_len] = '\0';
        const TrainFlag* f = train_flag_find_(name);
        if (f == NULL) {
            fprintf(stderr, "Error: unknown flag \"%s\"; run %s --help for the list of flags\n", name, prog);
            exit(EXIT_FAILURE);
        }
        if (eq) {
            value = eq + 1;
        } else {
            if (i + 1 >= argc) {
                char names[64], expected[128];
                train_flag_names_(f, names, sizeof(names));
                train_flag_expected_(f, expected, sizeof(expected));
                fprintf(stderr, "Error: flag %s (%s) is missing its value; expected %s\n", names, f->help, expected);
                exit(EXIT_FAILURE);
            }
            value = argv[++i];
        }
        train_flag_set_(cfg, f, value);
    }
    // checks between flags that need no model
    if (cfg->launch_rank >= cfg->launch_processes) {
        fprintf(stderr, "Error: bad value \"%d\" for flag -pr (--process-rank): the rank must be below the number of "
                "processes -pn %d\n", cfg->launch_rank, cfg->launch_processes);
        exit(EXIT_FAILURE);
    }
    if (cfg->mc_every != -1 && cfg->mc_eval_path[0] == '\0') {
        fprintf(stderr, "Error: flag --mc-every %d sets the interval of the multiple-choice eval, but --mc-eval (its "
                "file) is not given\n", cfg->mc_every);
        exit(EXIT_FAILURE);
    }
    if (cfg->mc_eval_path[0] != '\0' && cfg->B < 4) {
        fprintf(stderr, "Error: bad value \"%d\" for flag -b (--batch-size): --mc-eval needs B >= 4 (the 4 "
                "completions of an example fill 4 rows of a batch)\n", cfg->B);
        exit(EXIT_FAILURE);
    }
    if (cfg->num_experts > 0) {
        long long n = (long long)floor(sqrt((double)cfg->num_experts) + 0.5);
        if (n * n != cfg->num_experts) {
            fprintf(stderr, "Error: bad value \"%d\" for flag --experts: the number of experts N must be a perfect "
                    "square n*n (e.g. 1024, 4096, 16384)\n", cfg->num_experts);
            exit(EXIT_FAILURE);
        }
    }
    if (cfg->num_experts > 0 && cfg->top_k > cfg->num_experts) {
        fprintf(stderr, "Error: bad value \"%d\" for flag --topk: k must be <= the number of experts N=%d (--experts)\n",
                cfg->top_k, cfg->num_experts);
        exit(EXIT_FAILURE);
    }
}

// ----------------------------------------------------------------------------
// the model

static inline void train_config_omni_only_(const ModelConfig* c, const char* flag, int given) {
    if (given && c->ffn_kind != FFN_OMNI) {
        fprintf(stderr, "Error: flag %s is an OmniMoE option, but the model's FFN is %s (-f omni to use it)\n", flag,
                ffn_kind_name(c->ffn_kind));
        exit(EXIT_FAILURE);
    }
}

static inline void train_config_moe_only_(const ModelConfig* c, const char* flag, int given) {
    if (given && c->ffn_kind != FFN_MOE) {
        fprintf(stderr, "Error: flag %s is an option of the moe FFN, but the model's FFN is %s (-f moe to use it)\n",
                flag, ffn_kind_name(c->ffn_kind));
        exit(EXIT_FAILURE);
    }
}

// the moe flags that were given, checked against the model's kind: the model fields, and the
// run settings of the moe layer when they differ from their defaults (else they would be ignored)
static inline void train_config_moe_flags_only_(const TrainConfig* cfg, const ModelConfig* c) {
    TrainConfig d;
    train_config_defaults(&d);
    train_config_moe_only_(c, "--moe-aux", cfg->moe_aux != d.moe_aux);
    train_config_moe_only_(c, "--moe-zc-weight", cfg->moe_zc_weight != d.moe_zc_weight);
    train_config_moe_only_(c, "--moe-bias-rate", cfg->moe_bias_rate != d.moe_bias_rate);
    train_config_moe_only_(c, "--moe-gemm", cfg->moe_gemm != d.moe_gemm);
    train_config_moe_only_(c, "--moe-token-reads", cfg->moe_token_reads != d.moe_token_reads);
    train_config_moe_only_(c, "--moe-experts", cfg->moe_experts >= 0);
    train_config_moe_only_(c, "--moe-topk", cfg->moe_topk >= 0);
    train_config_moe_only_(c, "--moe-shared", cfg->moe_shared >= 0);
    train_config_moe_only_(c, "--moepp", cfg->moepp != 0);
    train_config_moe_only_(c, "--moe-zero", cfg->moe_zero >= 0);
    train_config_moe_only_(c, "--moe-copy", cfg->moe_copy >= 0);
    train_config_moe_only_(c, "--moe-const", cfg->moe_const >= 0);
    train_config_moe_only_(c, "--moe-gate-res", cfg->moe_gate_res >= 0);
    train_config_moe_only_(c, "--moe-norm-topk", cfg->moe_norm_topk >= 0);
    train_config_moe_only_(c, "--moe-router", cfg->moe_router >= 0);
    train_config_moe_only_(c, "--moe-input-scale", cfg->moe_input_scale >= 0);
}

// moe (docs/design.md §10.6): --moepp defaults, then the flags given, then the expert width
// refitted to the preset's active size unless --hidden fixed it
static inline void train_config_moe_apply_(const TrainConfig* cfg, ModelConfig* c) {
    if (c->ffn_kind != FFN_MOE) return;
    if (cfg->moepp) {
        c->moe_zero = 1;
        c->moe_copy = 1;
        c->moe_const = 2;
        c->moe_gate_res = 1;
        c->moe_norm_topk = 1;
        c->moe_router = MOE_ROUTER_TANH;
        c->moe_input_scale = 1;
    }
    if (cfg->moe_experts >= 0) c->moe_experts = cfg->moe_experts;
    if (cfg->moe_topk >= 0) c->moe_topk = cfg->moe_topk;
    if (cfg->moe_shared >= 0) c->moe_shared = cfg->moe_shared;
    if (cfg->moe_zero >= 0) c->moe_zero = cfg->moe_zero;
    if (cfg->moe_copy >= 0) c->moe_copy = cfg->moe_copy;
    if (cfg->moe_const >= 0) c->moe_const = cfg->moe_const;
    if (cfg->moe_gate_res >= 0) c->moe_gate_res = cfg->moe_gate_res;
    if (cfg->moe_norm_topk >= 0) c->moe_norm_topk = cfg->moe_norm_topk;
    if (cfg->moe_router >= 0) c->moe_router = cfg->moe_router;
    if (cfg->moe_input_scale >= 0) c->moe_input_scale = cfg->moe_input_scale;
    long long Et = (long long)c->moe_experts + c->moe_const + c->moe_copy + c->moe_zero;
    if (c->moe_topk > Et) {
        fprintf(stderr, "Error: bad value \"%d\" for flag --moe-topk: k must be <= the routed experts E + zero + copy + "
                "constant = %lld of model %s\n", c->moe_topk, Et, cfg->model);
        exit(EXIT_FAILURE);
    }
    if (cfg->ffn_hidden <= 0 && Et >= 1 && c->moe_shared + c->moe_topk > 0)
        c->ffn_hidden = model_config_moe_fit_width(c, model_config_swiglu_width(c->channels));
}

// Fills *out from -e and the model flags. Returns 1 for a preset (out is complete and valid).
// Returns 0 when -e names an existing file: out is untouched; read the file's config
// (checkpoint.h: model_file_read_config) and pass it to train_config_check_file_model().
// Exits with a message when -e is neither a preset nor a readable file, or an override is invalid.
static inline int train_config_model(const TrainConfig* cfg, ModelConfig* out) {
    ModelConfig c;
    int ffn = cfg->ffn_kind >= 0 ? cfg->ffn_kind : FFN_OMNI;
    if (!model_config_preset(&c, cfg->model, ffn)) {
        struct stat st;  // stat, not fopen: opening a FIFO would block; model_file_read names a non-file
        if (stat(cfg->model, &st) == 0) return 0;
        fprintf(stderr, "Error: bad value \"%s\" for flag -e (--model): not a preset (tiny, small, d6, d12, d24, d36, "
                "d48) and not a readable model file (%s)\n", cfg->model, strerror(errno));
        exit(EXIT_FAILURE);
    }
    train_config_omni_only_(&c, "--experts", cfg->num_experts > 0);
    train_config_omni_only_(&c, "--topk", cfg->top_k > 0);
    train_config_omni_only_(&c, "--router-norm", cfg->router_norm >= 0);
    train_config_omni_only_(&c, "--gate", cfg->gate >= 0);
    train_config_moe_flags_only_(cfg, &c);
    if (cfg->ffn_hidden > 0) c.ffn_hidden = cfg->ffn_hidden;
    train_config_moe_apply_(cfg, &c);
    if (cfg->num_experts > 0) {
        c.num_experts = cfg->num_experts;
        c.router_n = (int)floor(sqrt((double)cfg->num_experts) + 0.5);
    }
    if (cfg->top_k > 0) c.top_k = cfg->top_k;
    if (cfg->router_norm >= 0) c.router_norm = cfg->router_norm;
    if (cfg->gate >= 0) c.gate = cfg->gate;
    if (c.ffn_kind == FFN_OMNI && c.top_k > c.num_experts) {
        fprintf(stderr, "Error: bad value \"%d\" for flag --topk: k must be <= the number of experts N=%d of model %s "
                "(--experts)\n", c.top_k, c.num_experts, cfg->model);
        exit(EXIT_FAILURE);
    }
    if (!model_config_validate(&c)) {
        fprintf(stderr, "  (model -e %s with the flags given)\n", cfg->model);
        exit(EXIT_FAILURE);
    }
    *out = c;
    return 1;
}

static inline void train_config_file_conflict_(const char* path, const char* flag, long long given, long long in_file) {
    fprintf(stderr, "Error: flag %s %lld conflicts with the model file \"%s\", which has %lld (drop the flag to use "
            "the file's value)\n", flag, given, path, in_file);
    exit(EXIT_FAILURE);
}

// With -e <file>: every model flag that was given must equal the file's value (a model file fixes
// the shapes of its weights). Exits naming the first conflicting flag.
static inline void train_config_check_file_model(const TrainConfig* cfg, const ModelConfig* file_config) {
    const char* path = cfg->model;
    if (cfg->ffn_kind >= 0 && cfg->ffn_kind != file_config->ffn_kind) {
        fprintf(stderr, "Error: flag -f %s conflicts with the model file \"%s\", which has ffn %s\n",
                ffn_kind_name(cfg->ffn_kind), path, ffn_kind_name(file_config->ffn_kind));
        exit(EXIT_FAILURE);
    }
    train_config_omni_only_(file_config, "--experts", cfg->num_experts > 0);
    train_config_omni_only_(file_config, "--topk", cfg->top_k > 0);
    train_config_omni_only_(file_config, "--router-norm", cfg->router_norm >= 0);
    train_config_omni_only_(file_config, "--gate", cfg->gate >= 0);
    train_config_moe_flags_only_(cfg, file_config);
    if (file_config->ffn_kind == FFN_MOE) {  // every moe field the flags set must be the file's
        ModelConfig want = *file_config;
        train_config_moe_apply_(cfg, &want);
        const char* names[10] = {"--moe-experts", "--moe-topk", "--moe-shared", "--moe-zero", "--moe-copy",
                                 "--moe-const", "--moe-gate-res", "--moe-norm-topk", "--moe-router", "--moe-input-scale"};
        const int given[10] = {cfg->moe_experts, cfg->moe_topk, cfg->moe_shared, cfg->moe_zero, cfg->moe_copy,
                               cfg->moe_const, cfg->moe_gate_res, cfg->moe_norm_topk, cfg->moe_router,
                               cfg->moe_input_scale};
        const int w[10] = {want.moe_experts, want.moe_topk, want.moe_shared, want.moe_zero, want.moe_copy,
                           want.moe_const, want.moe_gate_res, want.moe_norm_topk, want.moe_router,
                           want.moe_input_scale};
        const int f[10] = {file_config->moe_experts, file_config->moe_topk, file_config->moe_shared,
                           file_config->moe_zero, file_config->moe_copy, file_config->moe_const,
                           file_config->moe_gate_res, file_config->moe_norm_topk, file_config->moe_router,
                           file_config->moe_input_scale};
        for (int i = 0; i < 10; i++) {
            if (w[i] == f[i]) continue;
            char flag[64];
            snprintf(flag, sizeof(flag), "%s%s", names[i], given[i] >= 0 ? "" : " (set by --moepp 1)");
            train_config_file_conflict_(path, flag, w[i], f[i]);
        }
    }
    if (cfg->ffn_hidden > 0 && cfg->ffn_hidden != file_config->ffn_hidden)
        train_config_file_conflict_(path, "--hidden", cfg->ffn_hidden, file_config->ffn_hidden);
    if (cfg->num_experts > 0 && cfg->num_experts != file_config->num_experts)
        train_config_file_conflict_(path, "--experts", cfg->num_experts, file_config->num_experts);
    if (cfg->top_k > 0 && cfg->top_k != file_config->top_k)
        train_config_file_conflict_(path, "--topk", cfg->top_k, file_config->top_k);
    if (cfg->router_norm >= 0 && cfg->router_norm != file_config->router_norm) {
        fprintf(stderr, "Error: flag --router-norm %s conflicts with the model file \"%s\", which has %s\n",
                router_norm_name(cfg->router_norm), path, router_norm_name(file_config->router_norm));
        exit(EXIT_FAILURE);
    }
    if (cfg->gate >= 0 && cfg->gate != file_config->gate) {
        fprintf(stderr, "Error: flag --gate %s conflicts with the model file \"%s\", which has %s\n",
                gate_name(cfg->gate), path, gate_name(file_config->gate));
        exit(EXIT_FAILURE);
    }
}

// ----------------------------------------------------------------------------
// sizes: every count derived from the flags is computed in 64 bits and checked, so an impossible
// combination is refused with the flags named instead of wrapping around

#define TRAIN_MAX_MICRO_TOKENS 2147483647LL   // B*T: tokens of one micro-batch are indexed with int
#define TRAIN_MAX_GRAD_ACCUM 2147483647LL     // micro-batches per optimiser step (an int)

// a * b for a, b >= 0; 0 when the product does not fit in int64 (*out untouched then)
static inline int train_mul_ok_(long long a, long long b, long long* out) {
    if (a < 0 || b < 0) return 0;
    if (a != 0 && b > INT64_MAX / a) return 0;
    *out = a * b;
    return 1;
}

// tokens of one micro-step over all processes, B*T*processes; exits when B*T is too large
static inline long long train_config_micro_step_tokens(const TrainConfig* cfg) {
    long long BT, all;
    if (!train_mul_ok_(cfg->B, cfg->T, &BT) || BT > TRAIN_MAX_MICRO_TOKENS) {
        fprintf(stderr, "Error: flags -b %d -t %d: B*T = %.0f tokens per micro-batch, at most %lld\n", cfg->B,
                cfg->T, (double)cfg->B * (double)cfg->T, TRAIN_MAX_MICRO_TOKENS);
        exit(EXIT_FAILURE);
    }
    if (!train_mul_ok_(BT, cfg->num_processes, &all)) {  // BT < 2^31, processes < 2^31: cannot happen
        fprintf(stderr, "Error: B*T*processes = %lld*%d overflows\n", BT, cfg->num_processes);
        exit(EXIT_FAILURE);
    }
    return all;
}

// tokens per optimiser step (resolves -d -1)
static inline long long train_config_total_batch_tokens(const TrainConfig* cfg) {
    long long per_micro_step = train_config_micro_step_tokens(cfg);
    return cfg->total_batch_size == -1 ? per_micro_step : cfg->total_batch_size;
}

// micro-steps per optimiser step = d / (B * T * num_processes); exits when that is not whole,
// not positive or more than an int holds
static inline int train_config_grad_accum_steps(const TrainConfig* cfg) {
    long long per_micro_step = train_config_micro_step_tokens(cfg);
    long long total = train_config_total_batch_tokens(cfg);
    if (per_micro_step <= 0 || total <= 0 || total % per_micro_step != 0 ||
        total / per_micro_step > TRAIN_MAX_GRAD_ACCUM) {
        fprintf(stderr, "Error: bad value \"%lld\" for flag -d (--total-batch-size): total batch must be a multiple of "
                "B*T*processes = %d*%d*%d = %lld tokens and at most %lld times it (%lld tokens)\n", total, cfg->B,
                cfg->T, cfg->num_processes, per_micro_step, TRAIN_MAX_GRAD_ACCUM,
                per_micro_step <= INT64_MAX / TRAIN_MAX_GRAD_ACCUM ? per_micro_step * TRAIN_MAX_GRAD_ACCUM : INT64_MAX);
        exit(EXIT_FAILURE);
    }
    return (int)(total / per_micro_step);
}

// The settings that identify this run in a checkpoint (llmc/run_identity.h), with the training
// data's fingerprint, token and shard count (dataloader.h: DataLoader fingerprint, total_tokens,
// num_shards).
static inline RunIdentity train_config_run_identity(const TrainConfig* cfg, uint64_t data_fingerprint,
                                                    long long data_tokens, int data_shards) {
    RunIdentity r;
    memset(&r, 0, sizeof(r));
    r.data_fingerprint = data_fingerprint;
    r.data_tokens = data_tokens;
    r.data_shards = data_shards;
    r.shuffle = cfg->shuffle;
    r.seed = cfg->seed;
    r.B = cfg->B;
    r.T = cfg->T;
    r.grad_accum_steps = train_config_grad_accum_steps(cfg);
    r.num_processes = cfg->num_processes;
    r.total_batch_size = train_config_total_batch_tokens(cfg);
    r.num_steps = cfg->num_steps;
    r.warmup_steps = cfg->warmup_steps;
    r.lr_schedule = cfg->lr_schedule;
    r.expert_exec = cfg->expert_exec;
    r.attention = cfg->attention;
    r.recompute = cfg->recompute;
    r.learning_rate = cfg->learning_rate;
    r.final_lr_frac = cfg->final_lr_frac;
    r.decay_frac = cfg->decay_frac;
    r.weight_decay = cfg->weight_decay;
    r.grad_clip = cfg->grad_clip;
    r.beta1 = cfg->beta1;
    r.beta2 = cfg->beta2;
    r.eps = cfg->eps;
    r.moe_aux = cfg->moe_aux;
    r.moe_zc_weight = cfg->moe_zc_weight;
    r.moe_bias_rate = cfg->moe_bias_rate;
    return r;
}

// An upper bound, in double (no overflow), of one process's bytes of activations, scratch and
// workspace for one micro-batch: every such buffer of the CPU trainer (layout_activations) and of
// the memory plan (llmc/memory_plan.h, which the CUDA trainer allocates from) is B*T times at
// most these per-token widths (8 bytes an element), plus per-expert counts, 256-byte alignment
// and CUB's 1 MiB, so below TRAIN_MAX_MICRO_BATCH_BYTES their size_t products and sums cannot
// wrap around to a small, wrong size.
#define TRAIN_MAX_MICRO_BATCH_BYTES 1152921504606846976.0  // 2^60 bytes: more than any machine holds
static inline double train_config_micro_batch_bytes_bound(const TrainConfig* cfg, const ModelConfig* c) {
    const double C = c->channels, L = c->num_layers, NH = c->num_heads, Vp = c->padded_vocab_size, T = cfg->T;
    const double H = (double)model_config_dense_width(c), FI = (double)model_config_ffn_in_width(c);
    const int omni = c->ffn_kind == FFN_OMNI, moe = c->ffn_kind == FFN_MOE;
    const double R = omni ? 2.0 * c->router_n : 0, K = omni ? c->top_k : 0, N = omni ? c->num_experts : 0;
    const double Et = model_config_moe_routed(c), MK = moe ? c->moe_topk : 0, Ie = moe ? c->ffn_hidden : 0;
    const double P = cfg->shard_experts ? cfg->num_processes : 1;  // tables: the pairs of all P processes
    const double per_layer = 16 * C + 2 * FI + 2 * H + 2 * NH * (T + 64) + 4 * R + 8 * K + K * C + 16 * P * K +
                             16 * Et + 8 * MK + MK * (3 * Ie + C) + Et * Et + (moe ? c->moe_const : 0) * MK * C;
    return 8.0 * cfg->B * T * ((L + 2) * per_layer + 4 * Vp) + 8 * (L + 2) * (N + Et + 1024) + 4194304.0;
}

// --shard-experts 1 splits the columns of U and V over the processes (llmc/expert_shard.h):
// refused where that cannot apply
static inline void train_config_validate_shard_experts(const TrainConfig* cfg, const ModelConfig* model) {
    if (!cfg->shard_experts) return;
    const char* why = NULL;
    if (model->ffn_kind != FFN_OMNI) why = "an omni model (it splits the expert tables U and V)";
    else if (cfg->num_processes < 2) why = "several processes (one process holds the whole tables)";
    else why = expert_shard_unfit(model->channels, cfg->num_processes);
    if (why != NULL) {
        fprintf(stderr, "Error: flag --shard-experts 1 needs %s; here: %s model, C=%d, %d process(es)\n", why,
                ffn_kind_name(model->ffn_kind), model->channels, cfg->num_processes);
        exit(EXIT_FAILURE);
    }
}

// The checks that need the model (and num_processes/process_rank, set by the trainer by now).
static inline void train_config_validate(const TrainConfig* cfg, const ModelConfig* model) {
    if (!model_config_validate(model)) exit(EXIT_FAILURE);
    if (cfg->num_processes < 1 || cfg->process_rank < 0 || cfg->process_rank >= cfg->num_processes) {
        fprintf(stderr, "Error: process rank %d of %d processes is impossible\n", cfg->process_rank, cfg->num_processes);
        exit(EXIT_FAILURE);
    }
    if (cfg->T > model->max_seq_len) {
        fprintf(stderr, "Error: bad value \"%d\" for flag -t (--seq-len): T must be <= the model's max_seq_len %d\n",
                cfg->T, model->max_seq_len);
        exit(EXIT_FAILURE);
    }
    if (cfg->sample_every > 0 && cfg->gen_tokens > model->max_seq_len) {
        fprintf(stderr, "Error: bad value \"%d\" for flag -g (--gen-tokens): must be <= the model's max_seq_len %d\n",
                cfg->gen_tokens, model->max_seq_len);
        exit(EXIT_FAILURE);
    }
    (void)train_config_grad_accum_steps(cfg);  // exits unless d is a whole number of micro-steps
    long long run_tokens;
    if (!train_mul_ok_(train_config_total_batch_tokens(cfg), (long long)cfg->num_steps + 1, &run_tokens)) {
        fprintf(stderr, "Error: flags -x %d and -d %lld: the run's token count (steps * tokens per step) overflows a "
                "64-bit counter\n", cfg->num_steps, train_config_total_batch_tokens(cfg));
        exit(EXIT_FAILURE);
    }
    double micro_bytes = train_config_micro_batch_bytes_bound(cfg, model);
    if (micro_bytes > TRAIN_MAX_MICRO_BATCH_BYTES) {
        fprintf(stderr, "Error: flags -b %d -t %d: one micro-batch of this model needs up to %.3g bytes of activations "
                "and scratch per process, more than 2^60 (no machine holds that, and the byte counts would overflow): "
                "lower -b or -t, or the model's widths\n", cfg->B, cfg->T, micro_bytes);
        exit(EXIT_FAILURE);
    }
    if (cfg->checkpoint_every > 0 && cfg->output_dir[0] == '\0') {
        fprintf(stderr, "Error: flag -n %d asks for checkpoints, which need an output directory (-o)\n",
                cfg->checkpoint_every);
        exit(EXIT_FAILURE);
    }
    if (cfg->resume && cfg->output_dir[0] == '\0') {
        fprintf(stderr, "Error: flag -y 1 resumes from the checkpoints in the output directory, but -o is not set\n");
        exit(EXIT_FAILURE);
    }
    if (cfg->overlap_dweight > 0 && cfg->recompute) {
        fprintf(stderr, "Error: flag --overlap-dweight 1 with -r %d: the recomputed activations share one layer's "
                "buffers, which the next layer overwrites while the second stream still reads them (use -r 0)\n",
                cfg->recompute);
        exit(EXIT_FAILURE);
    }
    train_config_validate_shard_experts(cfg, model);
}

// --overlap-dweight as the CUDA trainer runs it: -1 (its default) is on unless -r recomputes
static inline int train_config_overlap_dweight(const TrainConfig* cfg) {
    return cfg->overlap_dweight < 0 ? cfg->recompute == 0 : cfg->overlap_dweight;
}

// the steps --mc-eval runs at, besides the last: every this many (0 = none)
static inline int train_config_mc_interval(const TrainConfig* cfg) {
    return cfg->mc_every >= 0 ? cfg->mc_every : cfg->val_every;
}

// the JSONL log path of this run ("" when there is none)
static inline void train_config_log_path(const TrainConfig* cfg, char* out, size_t size) {
    if (cfg->log_file[0] != '\0') snprintf(out, size, "%s", cfg->log_file);
    else if (cfg->output_dir[0] != '\0') snprintf(out, size, "%s/log.jsonl", cfg->output_dir);
    else if (size > 0) out[0] = '\0';
}

#endif // OMNIMOE_ARGS_H
