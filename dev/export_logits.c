/*
 * export_logits.c - the CPU trainer's logits for a model file, for dev/test_export_hf.py to
 * compare with the Hugging Face export. Includes train_omnimoe.c (-DTESTING: no main), loads the
 * model file with model_file_read (hash and finiteness checked), runs gpt_forward in evaluation
 * mode (training=0: router BN with the running statistics) and writes the logits.
 *
 *   gcc -O2 -std=c11 -fopenmp -I. dev/export_logits.c -o /tmp/export_logits -lm
 *   /tmp/export_logits model.bin tokens.i32 B T logits.f32 [experts.i32]
 * tokens.i32: B*T little-endian int32 token ids; logits.f32: B*T*Vp float32 (all Vp columns);
 * experts.i32 (omni): the selected expert ids, (L, B*T, k) int32, best first.
 */
#define TESTING
#include "train_omnimoe.c"
#include "llmc/checkpoint.h"  // model_file_read (train_omnimoe.c includes it only in main())

int main(int argc, char** argv) {
    if (argc != 6 && argc != 7) {
        fprintf(stderr, "usage: %s model.bin tokens.i32 B T logits.f32 [experts.i32]\n", argv[0]);
        return 1;
    }
    ModelConfig config;
    float *params, *bn_stats;
    model_file_read(argv[1], &config, &params, &bn_stats);
    int B = atoi(argv[3]), T = atoi(argv[4]);
    if (B < 1 || T < 1 || T > config.max_seq_len) {
        fprintf(stderr, "Error: need B >= 1 and 1 <= T <= %d, got B=%d T=%d\n", config.max_seq_len, B, T);
        return 1;
    }
    int* tokens = (int*)malloc_check((size_t)B * T * sizeof(int));
    FILE* f = fopen(argv[2], "rb");
    if (f == NULL || fread(tokens, sizeof(int), (size_t)B * T, f) != (size_t)B * T || fgetc(f) != EOF) {
        fprintf(stderr, "Error: %s: expected exactly %d int32 tokens\n", argv[2], B * T);
        return 1;
    }
    fclose(f);
    GPT model;
    gpt_build(&model, &config);
    memcpy(model.params, params, model.num_params * sizeof(float));
    if (model.num_bn_stats > 0) memcpy(model.bn_stats, bn_stats, model.num_bn_stats * sizeof(float));
    gpt_forward(&model, tokens, NULL, B, T, 0);
    size_t count = (size_t)B * T * config.padded_vocab_size;
    f = fopen(argv[5], "wb");
    if (f == NULL || fwrite(model.logits, sizeof(float), count, f) != count || fclose(f) != 0) {
        fprintf(stderr, "Error: %s: cannot write the logits\n", argv[5]);
        return 1;
    }
    if (argc == 7) {
        size_t ids = (size_t)config.num_layers * B * T * config.top_k;
        f = fopen(argv[6], "wb");
        if (f == NULL || fwrite(model.acts.topk_idx, sizeof(int), ids, f) != ids || fclose(f) != 0) {
            fprintf(stderr, "Error: %s: cannot write the expert ids\n", argv[6]);
            return 1;
        }
    }
    gpt_free(&model);
    free(params);
    free(bn_stats);
    free(tokens);
    return 0;
}
