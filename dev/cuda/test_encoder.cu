/*
test_encoder.cu - llmc/encoder.cuh against CPU loops, then a bandwidth benchmark.

Checks (B=4, T=64, C=768, V=50304 rows of wte; tokens drawn so that many repeat: a quarter
of the positions hold token 7 (64 positions: several segments of ENCODER_SEGMENT_POSITIONS),
a quarter one of 4 ids (about one segment each, around the split size), half random over the
vocabulary; token 0 and V-1 always present):
- encoder_forward vs CPU (output NaN-poisoned first); a token outside [0, V) gives NaN rows
- the host plan: segments cover every position exactly once, each holds one token id, at most
  ENCODER_SEGMENT_POSITIONS positions, increasing; multi-segment tokens own consecutive
  partial rows, one per segment
- encoder_backward: dwpe (+=) and dwte (+=) vs CPU on the touched rows; untouched wte rows
  bitwise unchanged
- forward and backward bitwise identical when run twice from the same state
*/
#include "../../llmc/test_harness.h"
#include "../../llmc/encoder.cuh"

int main(void) {
    cudaCheck(cudaSetDevice(0));
    test_begin("test_encoder" TEST_FLOATX_SUFFIX);
    printf("test_encoder (%s)\n", FLOATX_NAME);
    Rng rng = rng_seeded(11);
    const int B = 4, T = 64, C = 768, V = 50304;
    const int BT = B * T;
    int* tokens = (int*)malloc(BT * sizeof(int));
    for (int i = 0; i < BT; i++) {
        tokens[i] = (i % 4 == 0) ? 7 : (i % 4 == 1 ? 1000 * rng_int(&rng, 4) + 3 : rng_int(&rng, V));
    }
    tokens[5] = 0;
    tokens[77] = V - 1;

    size_t n_wte = (size_t)V * C, n_wpe = (size_t)T * C, n_out = (size_t)BT * C;
    float* wte = host_alloc(n_wte);
    float* wpe = host_alloc(n_wpe);
    float* dout = host_alloc(n_out);
    fill_uniform(wte, n_wte, -1.0f, 1.0f, &rng);
    fill_uniform(wpe, n_wpe, -1.0f, 1.0f, &rng);
    fill_uniform(dout, n_out, -1.0f, 1.0f, &rng);
    floatX* d_wte = device_alloc<floatX>(n_wte, "wte");
    floatX* d_wpe = device_alloc<floatX>(n_wpe, "wpe");
    floatX* d_dout = device_alloc<floatX>(n_out, "dout");
    floatX* d_out[2] = {device_alloc<floatX>(n_out, "out"), device_alloc<floatX>(n_out, "out2")};
    floatX* d_dwte[2] = {device_alloc<floatX>(n_wte, "dwte"), device_alloc<floatX>(n_wte, "dwte2")};
    floatX* d_dwpe[2] = {device_alloc<floatX>(n_wpe, "dwpe"), device_alloc<floatX>(n_wpe, "dwpe2")};
    int* d_tokens = device_alloc<int>(BT, "tokens");
    upload_rounded(d_wte, wte, n_wte);
    upload_rounded(d_wpe, wpe, n_wpe);
    upload_rounded(d_dout, dout, n_out);
    cudaCheck(cudaMemcpy(d_tokens, tokens, BT * sizeof(int), cudaMemcpyHostToDevice));

    // ---- forward
    for (int run = 0; run < 2; run++) {
        poison(d_out[run], n_out * sizeof(floatX));
        encoder_forward(d_out[run], d_tokens, d_wte, d_wpe, B, T, C, V, 0);
        cudaCheck(cudaDeviceSynchronize());
    }
    {
        double* ref = ref_alloc(n_out);
        for (int bt = 0; bt < BT; bt++) {
            for (int c = 0; c < C; c++) {
                ref[(size_t)bt * C + c] = (double)wte[(size_t)tokens[bt] * C + c] + wpe[(size_t)(bt % T) * C + c];
            }
        }
        float* got = download_floatX_alloc(d_out[0], n_out);
        test_check_rel("encoder_forward vs CPU", rel_err_f64(got, ref, n_out), TOL_FLOATX);
        test_check_bitwise("encoder_forward", d_out[0], d_out[1], n_out * sizeof(floatX));
        // a bad token poisons its row with NaN instead of reading out of bounds
        int bad = V + 3;
        cudaCheck(cudaMemcpy(d_tokens + 9, &bad, sizeof(int), cudaMemcpyHostToDevice));
        encoder_forward(d_out[1], d_tokens, d_wte, d_wpe, B, T, C, V, 0);
        download_floatX(got, d_out[1], n_out);
        int row_nan = 1, others_finite = 1;
        for (int bt = 0; bt < BT; bt++) {
            for (int c = 0; c < C; c++) {
                float x = got[(size_t)bt * C + c];
                if (bt == 9 && !isnan(x)) { row_nan = 0; }
                if (bt != 9 && !isfinite(x)) { others_finite = 0; }
            }
        }
        test_check(row_nan && others_finite, "encoder_forward: out-of-range token gives a NaN row only");
        cudaCheck(cudaMemcpy(d_tokens, tokens, BT * sizeof(int), cudaMemcpyHostToDevice));
        free(ref);
        free(got);
    }

    // ---- host plan
    EncoderBackwardPlan plan;
    encoder_backward_plan_init(&plan, BT, V, C);
    encoder_backward_plan_build(&plan, tokens, B, T);
    {
        const int* hb = plan.host_buffer;
        const int mb = plan.max_BT;
        const int* seg_token = hb + ENC_SEG_TOKEN * mb;
        const int* seg_start = hb + ENC_SEG_START * mb;
        const int* seg_end = hb + ENC_SEG_END * mb;
        const int* seg_slot = hb + ENC_SEG_SLOT * mb;
        const int* positions = hb + ENC_POSITIONS * mb;
        const int* multi_token = hb + ENC_MULTI_TOKEN * mb;
        const int* multi_first = hb + ENC_MULTI_FIRST * mb;
        const int* multi_count = hb + ENC_MULTI_COUNT * mb;
        int ok = 1;
        int* seen = (int*)calloc(BT, sizeof(int));
        int* slot_owner = (int*)malloc(plan.max_slots * sizeof(int));
        for (int j = 0; j < plan.max_slots; j++) { slot_owner[j] = -1; }
        int max_count = 0;
        for (int sgm = 0; sgm < plan.num_segments && ok; sgm++) {
            int len = seg_end[sgm] - seg_start[sgm];
            if (len < 1 || len > ENCODER_SEGMENT_POSITIONS) { ok = 0; break; }
            for (int i = seg_start[sgm]; i < seg_end[sgm]; i++) {
                int p = positions[i];
                if (p < 0 || p >= BT || tokens[p] != seg_token[sgm]) { ok = 0; break; }
                if (i > seg_start[sgm] && positions[i - 1] >= p) { ok = 0; break; }
                seen[p]++;
            }
            if (seg_slot[sgm] >= 0) {
                if (seg_slot[sgm] >= plan.num_slots || slot_owner[seg_slot[sgm]] != -1) { ok = 0; break; }
                slot_owner[seg_slot[sgm]] = seg_token[sgm];
            }
        }
        for (int p = 0; p < BT && ok; p++) { ok = seen[p] == 1; }
        int slots_covered = 0;
        for (int m = 0; m < plan.num_multi && ok; m++) {
            if (multi_count[m] < 2) { ok = 0; }
            for (int j = 0; j < multi_count[m] && ok; j++) {
                if (slot_owner[multi_first[m] + j] != multi_token[m]) { ok = 0; }
                slots_covered++;
            }
            if (multi_count[m] > max_count) { max_count = multi_count[m]; }
        }
        ok = ok && slots_covered == plan.num_slots;
        printf("  plan: %d distinct tokens, %d segments, %d multi-segment tokens (most segments %d), %d positions\n",
               plan.num_unique, plan.num_segments, plan.num_multi, max_count, BT);
        test_check(ok, "plan: segments cover every position once, <= S, increasing");
        test_check(plan.num_multi >= 1 && max_count == 4, "plan: token 7 (64 positions) is split into 4 segments");
        free(seen);
        free(slot_owner);
    }

    // ---- backward
    double* ref_dwte_update = ref_alloc(n_wte);
    double* ref_dwpe_update = ref_alloc(n_wpe);
    for (int bt = 0; bt < BT; bt++) {
        for (int c = 0; c < C; c++) {
            double d = dout[(size_t)bt * C + c];
            ref_dwte_update[(size_t)tokens[bt] * C + c] += d;
            ref_dwpe_update[(size_t)(bt % T) * C + c] += d;
        }
    }
    float* old_dwte = host_alloc(n_wte);
    float* old_dwpe = host_alloc(n_wpe);
    for (int run = 0; run < 2; run++) {
        Rng acc_rng = rng_seeded(5);
        fill_uniform(old_dwte, n_wte, -1.0f, 1.0f, &acc_rng);
        fill_uniform(old_dwpe, n_wpe, -1.0f, 1.0f, &acc_rng);
        upload_rounded(d_dwte[run], old_dwte, n_wte);
        upload_rounded(d_dwpe[run], old_dwpe, n_wpe);
        encoder_backward_plan_build(&plan, tokens, B, T);  // rebuild: exercises the copy-done wait
        encoder_backward_plan_upload(&plan, 0);
        encoder_backward(d_dwte[run], d_dwpe[run], d_dout, &plan, B, T, C, 0);
        cudaCheck(cudaDeviceSynchronize());
    }
    {
        float* got_dwte = download_floatX_alloc(d_dwte[0], n_wte);
        float* got_dwpe = download_floatX_alloc(d_dwpe[0], n_wpe);
        double* ref_dwpe = ref_alloc(n_wpe);
        for (size_t i = 0; i < n_wpe; i++) { ref_dwpe[i] = old_dwpe[i] + ref_dwpe_update[i]; }
        test_check_rel("encoder_backward dwpe (+=)", rel_err_f64(got_dwpe, ref_dwpe, n_wpe), TOL_FLOATX);
        // touched wte rows: compare the packed rows; untouched rows must be unchanged bit for bit
        char* touched = (char*)calloc(V, 1);
        for (int bt = 0; bt < BT; bt++) { touched[tokens[bt]] = 1; }
        std::vector<float> got_rows;
        std::vector<double> ref_rows;
        int untouched_same = 1;
        for (int v = 0; v < V; v++) {
            for (int c = 0; c < C; c++) {
                size_t i = (size_t)v * C + c;
                if (touched[v]) {
                    got_rows.push_back(got_dwte[i]);
                    ref_rows.push_back(old_dwte[i] + ref_dwte_update[i]);
                } else if (memcmp(&got_dwte[i], &old_dwte[i], sizeof(float)) != 0) {
                    untouched_same = 0;
                }
            }
        }
        test_check_rel("encoder_backward dwte (+=), touched rows",
                       rel_err_f64(got_rows.data(), ref_rows.data(), got_rows.size()), TOL_FLOATX);
        test_check(untouched_same, "encoder_backward dwte: untouched rows unchanged");
        test_check_bitwise("encoder_backward dwte", d_dwte[0], d_dwte[1], n_wte * sizeof(floatX));
        test_check_bitwise("encoder_backward dwpe", d_dwpe[0], d_dwpe[1], n_wpe * sizeof(floatX));
        free(touched); free(got_dwte); free(got_dwpe); free(ref_dwpe);
    }
    encoder_backward_plan_free(&plan);

    char perf[512] = "benchmarks only in bf16 builds";
#if !defined(ENABLE_FP32)
    {
        // GPT-2 shapes, B*T = 8 * 1024 with realistic (Zipf-like) token repetition
        const int bB = 8, bT = 1024, bBT = bB * bT, bV = 50257;
        int* btokens = (int*)malloc(bBT * sizeof(int));
        Rng trng = rng_seeded(3);
        for (int i = 0; i < bBT; i++) {
            // Zipf-like: 10% of positions on 3 tokens (",", " the", EOT: ~270 positions each),
            // 20% on 50 ids, 20% on 2000 ids, the rest anywhere
            int r = rng_int(&trng, 10);
            btokens[i] = r == 0 ? (11 + 2000 * rng_int(&trng, 3))
                       : (r <= 2 ? rng_int(&trng, 50) : (r <= 4 ? rng_int(&trng, 2000) : rng_int(&trng, bV)));
        }
        size_t bn = (size_t)bBT * C;
        floatX* bout = device_alloc<floatX>(bn, "b out");
        floatX* bdout = device_alloc<floatX>(bn, "b dout");
        floatX* bwpe = device_alloc<floatX>((size_t)bT * C, "b wpe");
        floatX* bdwpe = device_alloc<floatX>((size_t)bT * C, "b dwpe");
        int* bd_tokens = device_alloc<int>(bBT, "b tokens");
        fill_random_device(bout, bn, 1, 1.0f);
        fill_random_device(bdout, bn, 2, 1.0f);
        fill_random_device(bwpe, (size_t)bT * C, 3, 1.0f);
        fill_random_device(bdwpe, (size_t)bT * C, 4, 1.0f);
        cudaCheck(cudaMemcpy(bd_tokens, btokens, bBT * sizeof(int), cudaMemcpyHostToDevice));
        EncoderBackwardPlan bplan;
        encoder_backward_plan_init(&bplan, bBT, bV, C);
        encoder_backward_plan_build(&bplan, btokens, bB, bT);
        encoder_backward_plan_upload(&bplan, 0);
        // host cost of building the plan
        cudaCheck(cudaDeviceSynchronize());
        const int host_iters = 20;
        struct timespec ts0, ts1;
        clock_gettime(CLOCK_MONOTONIC, &ts0);
        for (int i = 0; i < host_iters; i++) { encoder_backward_plan_build(&bplan, btokens, bB, bT); }
        clock_gettime(CLOCK_MONOTONIC, &ts1);
        double host_ms = ((ts1.tv_sec - ts0.tv_sec) * 1e3 + (ts1.tv_nsec - ts0.tv_nsec) * 1e-6) / host_iters;
        encoder_backward_plan_upload(&bplan, 0);
        printf("benchmark B=%d T=%d C=%d (%d distinct tokens, %d segments, %d multi-segment tokens; median of 50 "
               "after 10 warm-up)\n", bB, bT, C, bplan.num_unique, bplan.num_segments, bplan.num_multi);
        printf("  [HOST ] encoder_backward_plan_build: %.3f ms per micro-batch\n", host_ms);
        float ms = bench_median_ms([&] { encoder_forward(bout, bd_tokens, d_wte, bwpe, bB, bT, C, bV, 0); }, 10, 50);
        // 12.5 MB of output stays in the 50 MB L2 between repetitions: an L2 number, not DRAM
        double f_fwd = report_bandwidth("encoder_forward (L2-resident)", ms, 3.0 * bn * sizeof(floatX));
        ms = bench_median_ms([&] { encoder_backward(d_dwte[0], bdwpe, bdout, &bplan, bB, bT, C, 0); }, 10, 50);
        // bytes: dout read twice (wpe pass, wte pass), dwpe r+w, touched dwte rows r+w
        double bytes = (2.0 * bn + 2.0 * bT * C + 2.0 * (double)bplan.num_unique * C) * sizeof(floatX);
        double f_bwd = report_bandwidth("encoder_backward (wpe + wte)", ms, bytes);
        snprintf(perf, sizeof(perf), "fwd %.0f%%, bwd %.0f%% of 3.0 TB/s; host plan %.2f ms", 100 * f_fwd,
                 100 * f_bwd, host_ms);
        encoder_backward_plan_free(&bplan);
        void* bufs[] = {bout, bdout, bwpe, bdwpe, bd_tokens};
        for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) { cudaCheck(cudaFree(bufs[i])); }
        free(btokens);
    }
#endif
    free(tokens); free(wte); free(wpe); free(dout); free(old_dwte); free(old_dwpe);
    free(ref_dwte_update); free(ref_dwpe_update);
    void* bufs[] = {d_wte, d_wpe, d_dout, d_out[0], d_out[1], d_dwte[0], d_dwte[1], d_dwpe[0], d_dwpe[1], d_tokens};
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) { cudaCheck(cudaFree(bufs[i])); }
    printf("performance: %s\n", perf);
    return test_end();
}
