/*
 * test_args.c - CPU tests of the command line shared by both trainers (llmc/args.h): every flag
 * sets its field, the model from -e and the overrides, grad accumulation and the log path, each
 * bad flag or value exits 1 with a message naming the flag (in a forked child), -e <model file>
 * with agreeing and conflicting overrides, --help.
 *
 *   make test_args && ./test_args
 *
 * One PASS/FAIL line per check, then "test_args: N passed, N failed"; exits non-zero on a failure.
 */
#include "llmc/test_harness.h"
#include "llmc/checkpoint.h"
#include "llmc/args.h"

typedef struct {
    int argc;
    char** argv;
    int num_processes;
    int validate;       // also run train_config_model + train_config_validate
} ParseArgs;

static void child_parse(void* arg) {
    ParseArgs* a = (ParseArgs*)arg;
    TrainConfig cfg;
    train_config_defaults(&cfg);
    train_config_parse(&cfg, a->argc, a->argv);
    cfg.num_processes = a->num_processes > 0 ? a->num_processes : 1;
    if (a->validate) {
        ModelConfig mc;
        if (train_config_model(&cfg, &mc)) train_config_validate(&cfg, &mc);
        else {
            model_file_read_config(cfg.model, &mc);
            train_config_check_file_model(&cfg, &mc);
            train_config_validate(&cfg, &mc);
        }
    }
}

// ----------------------------------------------------------------------------
// args

static void test_args(void) {
    char detail[512];
    TrainConfig cfg, def;
    train_config_defaults(&def);
    cfg = def;
    char* none[] = {(char*)"prog"};
    train_config_parse(&cfg, 1, none);
    test_check_why(memcmp(&cfg, &def, sizeof(cfg)) == 0, "args: no flags = the defaults", "");

    char* good[] = {(char*)"prog", (char*)"-i", (char*)"train_*.bin", (char*)"-j", (char*)"", (char*)"-o", (char*)"out/run1",
                    (char*)"-e", (char*)"tiny", (char*)"-b", (char*)"8", (char*)"--seq-len", (char*)"64", (char*)"-d", (char*)"2048",
                    (char*)"-x", (char*)"500", (char*)"-l", (char*)"1e-3", (char*)"-u", (char*)"50", (char*)"-q", (char*)"0",
                    (char*)"--schedule", (char*)"wsd", (char*)"--decay-frac=0.3", (char*)"-c", (char*)"0.05",
                    (char*)"--grad-clip", (char*)"0", (char*)"--beta2", (char*)"0.99", (char*)"--eps", (char*)"1e-6",
                    (char*)"-v", (char*)"25", (char*)"-m", (char*)"-1", (char*)"-s", (char*)"0", (char*)"-g", (char*)"32",
                    (char*)"-n", (char*)"100", (char*)"-y", (char*)"1", (char*)"--seed", (char*)"18446744073709551615",
                    (char*)"--shuffle", (char*)"0", (char*)"-f", (char*)"omni", (char*)"--hidden", (char*)"128",
                    (char*)"--experts", (char*)"64", (char*)"--topk", (char*)"8", (char*)"--router-norm", (char*)"none",
                    (char*)"--gate", (char*)"prob", (char*)"--expert-exec", (char*)"token", (char*)"--log-file", (char*)"l.jsonl",
                    (char*)"--overlap-comm", (char*)"1", (char*)"--shard-experts", (char*)"1", (char*)"-r", (char*)"2",
                    (char*)"--gelu-fusion", (char*)"2", (char*)"--moe-gemm", (char*)"cutlass", (char*)"--matmul-tune",
                    (char*)"1"};
    int argc = (int)(sizeof(good) / sizeof(good[0]));
    cfg = def;
    train_config_parse(&cfg, argc, good);
    int ok = strcmp(cfg.train_data_pattern, "train_*.bin") == 0 && cfg.val_data_pattern[0] == '\0' &&
             strcmp(cfg.output_dir, "out/run1") == 0 && strcmp(cfg.model, "tiny") == 0 && cfg.B == 8 && cfg.T == 64 &&
             cfg.total_batch_size == 2048 && cfg.num_steps == 500 && cfg.learning_rate == 1e-3f &&
             cfg.warmup_steps == 50 && cfg.final_lr_frac == 0.0f && cfg.lr_schedule == LR_SCHEDULE_WSD &&
             cfg.decay_frac == 0.3f && cfg.weight_decay == 0.05f && cfg.grad_clip == 0.0f && cfg.beta1 == def.beta1 &&
             cfg.beta2 == 0.99f && cfg.eps == 1e-6f && cfg.val_every == 25 && cfg.val_max_batches == -1 &&
             cfg.sample_every == 0 && cfg.gen_tokens == 32 && cfg.checkpoint_every == 100 && cfg.resume == 1 &&
             cfg.seed == 18446744073709551615ull && cfg.shuffle == 0 && cfg.ffn_kind == FFN_OMNI &&
             cfg.ffn_hidden == 128 && cfg.num_experts == 64 && cfg.top_k == 8 && cfg.router_norm == ROUTER_NORM_NONE &&
             cfg.gate == GATE_PROB && cfg.expert_exec == EXPERT_EXEC_TOKEN && strcmp(cfg.log_file, "l.jsonl") == 0 &&
             cfg.overlap_comm == 1 && cfg.shard_experts == 1 && cfg.recompute == 2 && cfg.gelu_fusion == 2 &&
             cfg.moe_gemm == 2 && cfg.matmul_tune == 1;
    test_check_why(ok, "args: every flag (short, long, --flag=value) sets its field", "");
    cfg.moe_gemm = def.moe_gemm;  // a moe run setting: refused with this omni model ("moe run setting on omni")

    // the model from the flags
    ModelConfig mc;
    cfg.num_processes = 2;
    ok = train_config_model(&cfg, &mc) == 1 && mc.num_layers == 2 && mc.channels == 64 && mc.ffn_kind == FFN_OMNI &&
         mc.ffn_hidden == 128 && mc.num_experts == 64 && mc.router_n == 8 && mc.top_k == 8 &&
         mc.router_norm == ROUTER_NORM_NONE && mc.gate == GATE_PROB && mc.max_seq_len == 64;
    test_check_why(ok, "args: train_config_model applies the preset and every override", "");
    train_config_validate(&cfg, &mc);
    snprintf(detail, sizeof(detail), "grad accum %d", train_config_grad_accum_steps(&cfg));
    test_check_why(train_config_grad_accum_steps(&cfg) == 2 && train_config_total_batch_tokens(&cfg) == 2048,
          "args: grad accumulation = d / (B*T*processes) = 2048 / (8*64*2) = 2", detail);
    cfg.total_batch_size = -1;
    test_check_why(train_config_grad_accum_steps(&cfg) == 1 && train_config_total_batch_tokens(&cfg) == 8 * 64 * 2,
          "args: -d -1 = B*T*processes, no accumulation", "");
    char log_path[2048];
    train_config_log_path(&cfg, log_path, sizeof(log_path));
    test_check_why(strcmp(log_path, "l.jsonl") == 0, "args: --log-file wins over the default log path", log_path);
    cfg.log_file[0] = '\0';
    train_config_log_path(&cfg, log_path, sizeof(log_path));
    test_check_why(strcmp(log_path, "out/run1/log.jsonl") == 0, "args: default log is <output dir>/log.jsonl", log_path);

    // gelu preset: the omni knobs stay untouched
    TrainConfig g = def;
    char* gelu_args[] = {(char*)"prog", (char*)"-e", (char*)"d12", (char*)"-f", (char*)"gelu"};
    train_config_parse(&g, 5, gelu_args);
    ok = train_config_model(&g, &mc) == 1 && mc.ffn_kind == FFN_GELU && mc.ffn_hidden == 4 * 768 && mc.num_layers == 12;
    test_check_why(ok, "args: -e d12 -f gelu gives GPT-2 124M's shape", "");

    // bad flags: each exits 1 with a message naming the flag (and the value)
    struct { const char* name; const char* args[8]; const char* needle1; const char* needle2; int validate; int procs; } bad[] = {
        {"unknown short flag", {"-z", "1"}, "unknown flag \"-z\"", NULL, 0, 1},
        {"unknown long flag", {"--learning-rate", "1"}, "unknown flag \"--learning-rate\"", NULL, 0, 1},
        {"missing value", {"-l", "1e-4", "-b"}, "flag -b", "missing its value", 0, 1},
        {"missing value (long)", {"--schedule"}, "--schedule", "missing", 0, 1},
        {"non-number integer", {"-b", "abc"}, "\"abc\" for flag -b", "expected an integer >= 1", 0, 1},
        {"trailing junk in a number", {"-l", "1e-3x"}, "\"1e-3x\" for flag -l", "not a number", 0, 1},
        {"non-integer steps", {"-x", "10.5"}, "flag -x", "not an integer", 0, 1},
        {"negative steps", {"-x", "-5"}, "\"-5\" for flag -x", "negative", 0, 1},
        {"zero batch", {"-b", "0"}, "flag -b", ">= 1", 0, 1},
        {"int overflow", {"-t", "3000000000"}, "flag -t", "int range", 0, 1},
        {"fraction > 1", {"-q", "1.5"}, "flag -q", "[0, 1]", 0, 1},
        {"beta1 = 1", {"--beta1", "1"}, "--beta1", "[0, 1)", 0, 1},
        {"eps = 0", {"--eps", "0"}, "--eps", "> 0", 0, 1},
        {"inf lr", {"-l", "inf"}, "flag -l", "finite", 0, 1},
        {"a clip that rounds to 0 (= off) as a float", {"--grad-clip", "1e-50"}, "\"1e-50\" for flag --grad-clip",
         "too small for a float", 0, 1},
        {"-d 0", {"-d", "0"}, "flag -d", "-1 or an integer >= 1", 0, 1},
        {"-m 0", {"-m", "0"}, "flag -m", "-1 or an integer >= 1", 0, 1},
        {"-y 2", {"-y", "2"}, "flag -y", "0 or 1", 0, 1},
        {"--zero 2", {"--zero", "2"}, "--zero", "0 or 1", 0, 1},
        {"-r 3", {"-r", "3"}, "-r/--recompute", "[0, 2]", 0, 1},
        {"--recompute -1", {"--recompute", "-1"}, "--recompute", "negative", 0, 1},
        {"--gelu-fusion 4", {"--gelu-fusion", "4"}, "--gelu-fusion", "[0, 3]", 0, 1},
        {"unknown moe gemm", {"--moe-gemm", "cutless"}, "--moe-gemm", "loop|cublas|cutlass", 0, 1},
        {"negative seed", {"--seed", "-1"}, "--seed", "negative", 0, 1},
        {"unknown schedule", {"--schedule", "linear"}, "\"linear\" for flag --schedule", "cosine|wsd|constant", 0, 1},
        {"unknown ffn", {"-f", "relu"}, "flag -f", "gelu|swiglu|omni", 0, 1},
        {"unknown gate", {"--gate=hard"}, "--gate", "softmax|prob", 0, 1},
        {"empty train data", {"-i", ""}, "flag -i", "empty", 0, 1},
        {"positional argument", {"model.bin"}, "unexpected argument \"model.bin\"", NULL, 0, 1},
        {"experts not a square", {"--experts", "15"}, "--experts", "perfect square", 0, 1},
        {"topk > experts", {"--experts", "16", "--topk", "17"}, "--topk", "N=16", 0, 1},
        {"topk > preset experts", {"-e", "tiny", "--topk", "65", "-t", "64"}, "\"65\" for flag --topk", "N=64", 1, 1},
        {"T > max_seq_len", {"-e", "tiny", "-t", "65"}, "flag -t", "max_seq_len 64", 1, 1},
        {"gen tokens > max_seq_len", {"-e", "tiny", "-t", "64", "-g", "100"}, "flag -g", "max_seq_len 64", 1, 1},
        {"total batch not divisible", {"-e", "tiny", "-b", "4", "-t", "64", "-d", "1000"}, "flag -d", "4*64*1", 1, 1},
        {"total batch not divisible by processes", {"-e", "tiny", "-b", "4", "-t", "64", "-d", "256"}, "flag -d", "4*64*2", 1, 2},
        {"-n without -o", {"-e", "tiny", "-t", "64", "-n", "10"}, "flag -n", "-o", 1, 1},
        {"-y 1 without -o", {"-e", "tiny", "-t", "64", "-y", "1"}, "flag -y", "-o", 1, 1},
        {"--overlap-dweight 1 with -r", {"-e", "tiny", "-t", "64", "--overlap-dweight", "1", "-r", "2"}, "flag --overlap-dweight 1", "-r 2", 1, 1},
        {"--overlap-dweight 2", {"--overlap-dweight", "2"}, "--overlap-dweight", "[-1, 1]", 0, 1},
        {"--matmul-tune 2", {"--matmul-tune", "2"}, "--matmul-tune", "0 or 1", 0, 1},
        {"unknown model", {"-e", "d13"}, "\"d13\" for flag -e", "not a preset", 1, 1},
        {"omni knob on gelu", {"-e", "tiny", "-t", "64", "-f", "gelu", "--experts", "16"}, "--experts", "gelu", 1, 1},
        {"moe knob on swiglu", {"-e", "tiny", "-t", "64", "-f", "swiglu", "--moe-zero", "1"}, "--moe-zero", "swiglu", 1, 1},
        {"omni knob on moe", {"-e", "tiny", "-t", "64", "-f", "moe", "--experts", "16"}, "--experts", "moe", 1, 1},
        {"moe topk > routed experts", {"-e", "tiny", "-t", "64", "-f", "moe", "--moe-topk", "9"}, "\"9\" for flag --moe-topk",
         "= 8 of model tiny", 1, 1},
        {"unknown moe router", {"--moe-router", "mlp"}, "--moe-router", "linear|tanh", 0, 1},
        {"moe run setting on omni", {"-e", "tiny", "-t", "64", "--moe-aux", "0.5"}, "--moe-aux", "omni", 1, 1},
        {"moe run setting on gelu", {"-e", "tiny", "-t", "64", "-f", "gelu", "--moe-bias-rate", "0.001"}, "--moe-bias-rate",
         "gelu", 1, 1},
        {"negative process rank", {"-pr", "-1"}, "\"-1\" for flag -pr", NULL, 0, 1},
        {"process rank >= processes", {"-pn", "2", "-pr", "2", "-pf", "id"}, "\"2\" for flag -pr", "-pn 2", 0, 1},
        {"--shard-experts 2", {"--shard-experts", "2"}, "\"2\" for flag --shard-experts", "0 or 1", 0, 1},
        {"--shard-experts with one process", {"-e", "tiny", "-t", "64", "--shard-experts", "1"}, "--shard-experts 1", "several processes", 1, 1},
        {"--shard-experts on gelu", {"-e", "tiny", "-t", "64", "-f", "gelu", "--shard-experts", "1"}, "--shard-experts 1", "an omni model", 1, 2},
        {"--shard-experts, C/8 not divisible", {"-e", "tiny", "-t", "64", "--shard-experts", "1"}, "--shard-experts 1", "C=64, 3 process", 1, 3},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char* argv[10];
        int n = 0;
        argv[n++] = (char*)"prog";
        for (int j = 0; j < 8 && bad[i].args[j]; j++) argv[n++] = (char*)bad[i].args[j];
        ParseArgs pa = {n, argv, bad[i].procs, bad[i].validate};
        char name[256];
        snprintf(name, sizeof(name), "args: %s exits 1 naming the flag", bad[i].name);
        test_expect_exit_failure(name, child_parse, &pa, bad[i].needle1, bad[i].needle2);
    }

    {   // --shard-experts 1 with 4 processes and C = 64 (8 vectors): accepted
        char* argv[] = {(char*)"prog", (char*)"-e", (char*)"tiny", (char*)"-t", (char*)"64", (char*)"--shard-experts", (char*)"1"};
        ParseArgs pa = {7, argv, 4, 1};
        char out[4096];
        int code = test_run_child(child_parse, &pa, out, sizeof(out));
        test_check_why(code == 999, "args: --shard-experts 1 with 4 processes and C/8 = 8 is accepted", out);
    }
    {   // --overlap-dweight -1 (the CUDA trainer's default) with -r 2: accepted, and resolved to off
        char* argv[] = {(char*)"prog", (char*)"-e", (char*)"tiny", (char*)"-t", (char*)"64", (char*)"--overlap-dweight",
                        (char*)"-1", (char*)"-r", (char*)"2"};
        ParseArgs pa = {9, argv, 1, 1};
        char out[4096];
        int code = test_run_child(child_parse, &pa, out, sizeof(out));
        test_check_why(code == 999, "args: --overlap-dweight -1 with -r 2 is accepted", out);
    }
    {   // train_config_overlap_dweight: -1 is on with -r 0, off with -r 1 or 2; 0 and 1 stay as given
        const int cases[][3] = {{-1, 0, 1}, {-1, 1, 0}, {-1, 2, 0}, {0, 0, 0}, {0, 2, 0}, {1, 0, 1}};
        int ok_all = 1;
        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
            TrainConfig o = def;
            o.overlap_dweight = cases[i][0];
            o.recompute = cases[i][1];
            ok_all &= train_config_overlap_dweight(&o) == cases[i][2];
        }
        test_check_why(ok_all, "args: --overlap-dweight -1 resolves to 1 with -r 0 and to 0 with -r 1, 2", "");
    }

    // -e <model file>: returns 0; the overrides must agree with the file
    char mdir[512], mpath[600];
    test_tmp_subdir(mdir, sizeof(mdir), "args_model");
    snprintf(mpath, sizeof(mpath), "%s/init.bin", mdir);
    ModelConfig fc = test_config(TEST_DIMS_MICRO, FFN_OMNI, 4, 3, ROUTER_NORM_BN, GATE_SOFTMAX);
    Rng rng = rng_seeded(5);
    size_t fc_params = model_config_num_params(&fc);
    float* fp = (float*)malloc_check(fc_params * sizeof(float));
    fill_normal(fp, fc_params, 0.0f, 1.0f, &rng);
    if (model_file_write(mpath, &fc, fp, NULL) != 0) exit(EXIT_FAILURE);
    free(fp);
    TrainConfig fcfg = def;
    strcpy(fcfg.model, mpath);
    fcfg.top_k = 3;
    test_check_why(train_config_model(&fcfg, &mc) == 0, "args: -e <existing file> returns 0 (read the file)", "");
    {
        char* argv[] = {(char*)"prog", (char*)"-e", mpath, (char*)"-t", (char*)"8", (char*)"--topk", (char*)"3", (char*)"-g", (char*)"8"};
        ParseArgs pa = {9, argv, 1, 1};
        char out[4096];
        int code = test_run_child(child_parse, &pa, out, sizeof(out));
        test_check_why(code == 999, "args: -e <file> with agreeing overrides is accepted", out);
    }
    {
        char* argv[] = {(char*)"prog", (char*)"-e", mpath, (char*)"-t", (char*)"8", (char*)"--topk", (char*)"2"};
        ParseArgs pa = {7, argv, 1, 1};
        test_expect_exit_failure("args: -e <file> with a conflicting --topk exits naming it", child_parse, &pa,
                            "--topk 2 conflicts", "which has 3");
    }
    {
        char* argv[] = {(char*)"prog", (char*)"-e", mpath, (char*)"-f", (char*)"swiglu"};
        ParseArgs pa = {5, argv, 1, 1};
        test_expect_exit_failure("args: -e <file> with a conflicting -f exits naming it", child_parse, &pa, "flag -f swiglu", "omni");
    }

    // moe: --moepp 1 sets the MoE++ release's fields, a flag overrides one, the width is refitted
    {
        TrainConfig m = def;
        strcpy(m.model, "d12");
        m.ffn_kind = FFN_MOE;
        m.moepp = 1;
        m.moe_const = 1;
        ModelConfig moe_c, plain;
        train_config_model(&m, &moe_c);
        m.moepp = 0;
        m.moe_const = -1;
        train_config_model(&m, &plain);
        ok = moe_c.ffn_kind == FFN_MOE && moe_c.moe_experts == 64 && moe_c.moe_topk == 6 && moe_c.moe_shared == 2 &&
             moe_c.moe_zero == 1 && moe_c.moe_copy == 1 && moe_c.moe_const == 1 && moe_c.moe_gate_res == 1 &&
             moe_c.moe_norm_topk == 1 && moe_c.moe_router == MOE_ROUTER_TANH && moe_c.moe_input_scale == 1 &&
             plain.moe_zero == 0 && plain.moe_router == MOE_ROUTER_LINEAR && plain.ffn_hidden == 256;
        snprintf(detail, sizeof(detail), "I_e %d (--moepp 1) and %d (plain)", moe_c.ffn_hidden, plain.ffn_hidden);
        test_check_why(ok, "args: -f moe --moepp 1 --moe-const 1 sets the MoE++ fields, the flag wins", detail);
        ModelConfig sw;
        m.ffn_kind = FFN_SWIGLU;
        train_config_model(&m, &sw);
        double rel = fabs((double)model_config_active_params(&plain) - (double)model_config_active_params(&sw)) /
                     (double)model_config_active_params(&sw);
        snprintf(detail, sizeof(detail), "moe %zu vs swiglu %zu active parameters (%.2f%%, tol 1%%)",
                 model_config_active_params(&plain), model_config_active_params(&sw), 100.0 * rel);
        test_check_why(rel < 0.01, "args: the d12 moe preset has the active parameters of swiglu", detail);
    }
    {  // a moe model file: --moepp 1 conflicts with a file without the MoE++ experts
        char moe_path[600];
        snprintf(moe_path, sizeof(moe_path), "%s/moe.bin", mdir);
        ModelConfig moe_f = test_config(TEST_DIMS_MICRO, FFN_SWIGLU, 0, 0, ROUTER_NORM_BN, GATE_SOFTMAX);
        moe_f.ffn_kind = FFN_MOE;
        moe_f.moe_experts = 4;
        moe_f.moe_topk = 2;
        moe_f.moe_shared = 1;
        size_t moe_params = model_config_num_params(&moe_f);
        float* mp = (float*)malloc_check(moe_params * sizeof(float));
        fill_normal(mp, moe_params, 0.0f, 1.0f, &rng);
        if (model_file_write(moe_path, &moe_f, mp, NULL) != 0) exit(EXIT_FAILURE);
        free(mp);
        char* argv[] = {(char*)"prog", (char*)"-e", moe_path, (char*)"-t", (char*)"8", (char*)"--moepp", (char*)"1"};
        ParseArgs pa = {7, argv, 1, 1};
        test_expect_exit_failure("args: -e <moe file> with a conflicting --moepp 1 exits naming the field", child_parse,
                                 &pa, "--moe-zero (set by --moepp 1) 1 conflicts", "which has 0");
        char* argv2[] = {(char*)"prog", (char*)"-e", moe_path, (char*)"-t", (char*)"8", (char*)"--moe-topk", (char*)"2",
                         (char*)"-g", (char*)"8"};
        ParseArgs pa2 = {9, argv2, 1, 1};
        char out[4096];
        int code = test_run_child(child_parse, &pa2, out, sizeof(out));
        test_check_why(code == 999, "args: -e <moe file> with an agreeing --moe-topk is accepted", out);
    }

    // --help: exit 0, every flag with its default
    {
        char* argv[] = {(char*)"prog", (char*)"-b", (char*)"8", (char*)"--help"};
        ParseArgs pa = {4, argv, 1, 0};
        char out[16384];
        int code = test_run_child(child_parse, &pa, out, sizeof(out));
        ok = code == 0;
        for (int i = 0; i < TRAIN_NUM_FLAGS; i++) {
            ok &= strstr(out, train_flags[i].long_name) != NULL;
            if (train_flags[i].short_name) {
                char both[64];
                snprintf(both, sizeof(both), "%s/%s", train_flags[i].short_name, train_flags[i].long_name);
                ok &= strstr(out, both) != NULL;
            }
        }
        // defaults are the values before parsing (-b 8 came before --help)
        ok &= strstr(out, "default: 4\n") != NULL && strstr(out, "default: cosine") != NULL &&
              strstr(out, "default: 0.0006") != NULL;
        int defaults = 0;
        for (const char* p = out; (p = strstr(p, "default:")) != NULL; p++) defaults++;
        snprintf(detail, sizeof(detail), "exit %d, %d defaults for %d flags", code, defaults, TRAIN_NUM_FLAGS);
        test_check_why(ok && defaults == TRAIN_NUM_FLAGS, "args: --help exits 0 and documents every flag with its default", detail);
    }
}

int main(void) {
    test_begin("test_args");
    test_tmp_begin("test_args");
    test_args();
    test_tmp_end();
    return test_end();
}
