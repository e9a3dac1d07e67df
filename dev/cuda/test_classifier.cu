/*
test_classifier.cu - llmc/classifier.cuh against CPU (double) loops, then a bandwidth benchmark.

Checks (BT = 4*64, V = 50257 real columns, Vp = 50304; logits ~ U(-4, 4) with the padded
columns set to large values (+30) that would dominate the softmax if they took any mass):
- losses vs CPU log-softmax cross-entropy (losses NaN-poisoned first)
- dlogits = (softmax - onehot) * dloss on the real columns vs CPU, exactly 0 on padded ones
- eval mode (write_dlogits = 0): logits untouched, losses identical to training mode
- mean_loss vs CPU; everything bitwise identical when run twice
*/
#include "../../llmc/test_harness.h"
#include "../../llmc/classifier.cuh"

int main(void) {
    cudaCheck(cudaSetDevice(0));
    test_begin("test_classifier" TEST_FLOATX_SUFFIX);
    printf("test_classifier (%s)\n", FLOATX_NAME);
    Rng rng = rng_seeded(31);
    const int B = 4, T = 64, BT = B * T, V = 50257, Vp = 50304, grad_accum_steps = 3;
    const float dloss = 1.0f / (float)(BT * grad_accum_steps);
    size_t n = (size_t)BT * Vp;
    float* logits = host_alloc(n);
    fill_uniform(logits, n, -4.0f, 4.0f, &rng);
    for (int t = 0; t < BT; t++) {
        for (int c = V; c < Vp; c++) { logits[(size_t)t * Vp + c] = 30.0f; }
    }
    int* targets = (int*)malloc(BT * sizeof(int));
    for (int t = 0; t < BT; t++) { targets[t] = rng_int(&rng, V); }
    targets[0] = 0;
    targets[1] = V - 1;
    for (int t = 0; t < BT; t++) {  // make some rows confident in their target
        if (t % 5 == 0) { logits[(size_t)t * Vp + targets[t]] = 12.0f; }
    }

    floatX* d_logits_init = device_alloc<floatX>(n, "logits (pristine)");
    floatX* d_logits[2] = {device_alloc<floatX>(n, "logits"), device_alloc<floatX>(n, "logits2")};
    float* d_losses[3] = {device_alloc<float>(BT, "losses"), device_alloc<float>(BT, "losses2"),
                          device_alloc<float>(BT, "losses eval")};
    float* d_mean[2] = {device_alloc<float>(1, "mean"), device_alloc<float>(1, "mean2")};
    int* d_targets = device_alloc<int>(BT, "targets");
    upload_rounded(d_logits_init, logits, n);
    cudaCheck(cudaMemcpy(d_targets, targets, BT * sizeof(int), cudaMemcpyHostToDevice));

    for (int run = 0; run < 2; run++) {
        cudaCheck(cudaMemcpy(d_logits[run], d_logits_init, n * sizeof(floatX), cudaMemcpyDeviceToDevice));
        poison(d_losses[run], BT * sizeof(float));
        poison(d_mean[run], sizeof(float));
        fused_classifier(d_logits[run], d_losses[run], d_targets, dloss, BT, V, Vp, 1, 0);
        mean_loss(d_mean[run], d_losses[run], BT, 0);
        cudaCheck(cudaDeviceSynchronize());
    }

    double* ref_losses = ref_alloc(BT);
    double* ref_dlogits = ref_alloc(n);
    double ref_mean = 0.0;
    for (int t = 0; t < BT; t++) {
        const float* x = logits + (size_t)t * Vp;
        double mx = -1e300;
        for (int c = 0; c < V; c++) { mx = x[c] > mx ? x[c] : mx; }
        double s = 0.0;
        for (int c = 0; c < V; c++) { s += exp(x[c] - mx); }
        ref_losses[t] = log(s) + mx - x[targets[t]];
        ref_mean += ref_losses[t];
        for (int c = 0; c < Vp; c++) {
            double g = 0.0;
            if (c < V) { g = (exp(x[c] - mx) / s - (c == targets[t] ? 1.0 : 0.0)) * dloss; }
            ref_dlogits[(size_t)t * Vp + c] = g;
        }
    }
    ref_mean /= BT;

    float* got_losses = download_floats(d_losses[0], BT);
    float* got_dlogits = download_floatX_alloc(d_logits[0], n);
    float* got_mean = download_floats(d_mean[0], 1);
    printf("  mean loss GPU %.6f CPU %.6f\n", got_mean[0], ref_mean);
    test_check_rel("losses (fp32) vs CPU", rel_err_f64(got_losses, ref_losses, BT), 1e-5);
    test_check_rel("dlogits vs CPU (all columns)", rel_err_f64(got_dlogits, ref_dlogits, n), TOL_FLOATX);
    {
        // the target columns alone: the -1 term, easy to get wrong without moving the norm
        std::vector<float> got_t(BT);
        std::vector<double> ref_t(BT);
        for (int t = 0; t < BT; t++) {
            got_t[t] = got_dlogits[(size_t)t * Vp + targets[t]];
            ref_t[t] = ref_dlogits[(size_t)t * Vp + targets[t]];
        }
        test_check_rel("dlogits at target columns", rel_err_f64(got_t.data(), ref_t.data(), BT), TOL_FLOATX);
    }
    int pad_zero = 1;
    for (int t = 0; t < BT; t++) {
        for (int c = V; c < Vp; c++) {
            if (got_dlogits[(size_t)t * Vp + c] != 0.0f || signbit(got_dlogits[(size_t)t * Vp + c])) { pad_zero = 0; }
        }
    }
    test_check(pad_zero, "dlogits exactly +0 on padded columns");
    double ref_mean_d = ref_mean;
    test_check_rel("mean_loss vs CPU", rel_err_f64(got_mean, &ref_mean_d, 1), 1e-5);
    test_check_bitwise("losses", d_losses[0], d_losses[1], BT * sizeof(float));
    test_check_bitwise("dlogits", d_logits[0], d_logits[1], n * sizeof(floatX));
    test_check_bitwise("mean_loss", d_mean[0], d_mean[1], sizeof(float));

    // eval mode
    cudaCheck(cudaMemcpy(d_logits[1], d_logits_init, n * sizeof(floatX), cudaMemcpyDeviceToDevice));
    poison(d_losses[2], BT * sizeof(float));
    fused_classifier(d_logits[1], d_losses[2], d_targets, dloss, BT, V, Vp, 0, 0);
    cudaCheck(cudaDeviceSynchronize());
    test_check(device_bitwise_equal(d_logits[1], d_logits_init, n * sizeof(floatX)), "eval mode leaves logits untouched");
    test_check(device_bitwise_equal(d_losses[2], d_losses[0], BT * sizeof(float)), "eval mode losses == training mode losses (bitwise)");

    free(logits); free(targets); free(ref_losses); free(ref_dlogits); free(got_losses); free(got_dlogits);
    free(got_mean);
    void* bufs[] = {d_logits_init, d_logits[0], d_logits[1], d_losses[0], d_losses[1], d_losses[2],
                    d_mean[0], d_mean[1], d_targets};
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) { cudaCheck(cudaFree(bufs[i])); }

    char perf[512] = "benchmarks only in bf16 builds";
#if !defined(ENABLE_FP32)
    {
        const int bBT = 8192;
        size_t bn = (size_t)bBT * Vp;
        floatX* blogits = device_alloc<floatX>(bn, "b logits");
        float* blosses = device_alloc<float>(bBT, "b losses");
        float* bmean = device_alloc<float>(1, "b mean");
        int* btargets = device_alloc<int>(bBT, "b targets");
        int* htargets = (int*)malloc(bBT * sizeof(int));
        for (int t = 0; t < bBT; t++) { htargets[t] = rng_int(&rng, V); }
        cudaCheck(cudaMemcpy(btargets, htargets, bBT * sizeof(int), cudaMemcpyHostToDevice));
        // re-filling the logits each time would dominate; the kernel overwrites them with small
        // gradients, which still exercise every exp, so time it on its own output
        fill_random_device(blogits, bn, 9, 4.0f);
        printf("benchmark B*T=%d Vp=%d (median of 30 after 5 warm-up)\n", bBT, Vp);
        float ms = bench_median_ms([&] { fused_classifier(blogits, blosses, btargets, dloss, bBT, V, Vp, 1, 0); }, 5, 30);
        // the minimum traffic is one read and one write of the logits
        double f1 = report_bandwidth("fused_classifier (train, 1R+1W counted)", ms, 2.0 * bn * sizeof(floatX));
        ms = bench_median_ms([&] { fused_classifier(blogits, blosses, btargets, dloss, bBT, V, Vp, 0, 0); }, 5, 30);
        double f2 = report_bandwidth("fused_classifier (eval, 1R counted)", ms, 1.0 * bn * sizeof(floatX));
        ms = bench_median_ms([&] { mean_loss(bmean, blosses, bBT, 0); }, 5, 30);
        printf("  [BENCH] mean_loss over %d tokens: %.4f ms\n", bBT, ms);
        snprintf(perf, sizeof(perf), "train %.0f%%, eval %.0f%% of 3.0 TB/s", 100 * f1, 100 * f2);
        free(htargets);
        void* bbufs[] = {blogits, blosses, bmean, btargets};
        for (size_t i = 0; i < sizeof(bbufs) / sizeof(bbufs[0]); i++) { cudaCheck(cudaFree(bbufs[i])); }
    }
#endif
    printf("performance: %s\n", perf);
    return test_end();
}
