/*
bench_gemm_energy.cu - the d12 step's GEMMs under sustained load: time and energy per call of each
of cuBLASLt's candidates, and which candidate each choice rule would take.

Why: the dense d12 step at B=32 runs at the card's power limit (docs/performance.md, "The step is
power-bound"), so what a GEMM costs the step is its energy: a candidate that is fastest in a short
burst at full clock (what --matmul-tune times) may draw more power and lower the clock of
everything else. For each GEMM of dev/cuda/step_gemms.h and each of the heuristic's first
CANDIDATES candidates: its output bits against the first candidate's, then back-to-back calls for
WARM seconds (the power controller settles) and for SECONDS seconds measured, twice (the second pass in reverse order): ms per call from
CUDA events, J per call from NVML's total-energy counter (mJ, read before and after), the median
SM clock and the share of samples with the software power cap active (NVML, every batch).

NVML is opened at run time (dlopen of the driver's libnvidia-ml.so.1), so the build needs no NVML
header or stub; the few calls used are declared here from NVML's documented C API.

Usage: dev/cuda/bench_gemm_energy_bin [SECONDS [WARM]]   (defaults 1.0 and 0.5)
Prints per candidate "ms burst, ms sustained, mJ, MHz, capped%, bits" (each sustained value for
both passes), then the step's totals (per_step calls of each GEMM, the passes' means) for: the
heuristic's first candidates (the untuned trainer), the fastest-in-a-burst candidates with the
first's bits (--matmul-tune 1), and the least energy and the fastest sustained with the first's
bits.
*/
#include <dlfcn.h>
#include <algorithm>
#include <chrono>
#include "../../llmc/test_harness.h"
#include "../../llmc/matmul.cuh"
#include "step_gemms.h"

#define CANDIDATES 8

// --- NVML, opened at run time -------------------------------------------------------------
typedef struct NvmlDevice* NvmlDeviceHandle;
typedef int (*NvmlInitFn)(void);
typedef int (*NvmlByBusIdFn)(const char*, NvmlDeviceHandle*);
typedef int (*NvmlEnergyFn)(NvmlDeviceHandle, unsigned long long*);
typedef int (*NvmlClockFn)(NvmlDeviceHandle, int, unsigned int*);
typedef int (*NvmlReasonsFn)(NvmlDeviceHandle, unsigned long long*);
#define NVML_CLOCK_SM_ 1
#define NVML_REASON_SW_POWER_CAP_ 0x4ull

static struct {
    NvmlDeviceHandle device;
    NvmlEnergyFn energy_mj;     // nvmlDeviceGetTotalEnergyConsumption: mJ since the driver loaded
    NvmlClockFn clock_mhz;      // nvmlDeviceGetClockInfo
    NvmlReasonsFn reasons;      // nvmlDeviceGetCurrentClocksEventReasons (or ...ThrottleReasons)
} nvml;

static void nvml_open_or_die(void) {
    void* lib = dlopen("libnvidia-ml.so.1", RTLD_NOW);
    if (!lib) { fprintf(stderr, "bench_gemm_energy: cannot open libnvidia-ml.so.1: %s\n", dlerror()); exit(1); }
    NvmlInitFn init = (NvmlInitFn)dlsym(lib, "nvmlInit_v2");
    NvmlByBusIdFn by_bus = (NvmlByBusIdFn)dlsym(lib, "nvmlDeviceGetHandleByPciBusId_v2");
    nvml.energy_mj = (NvmlEnergyFn)dlsym(lib, "nvmlDeviceGetTotalEnergyConsumption");
    nvml.clock_mhz = (NvmlClockFn)dlsym(lib, "nvmlDeviceGetClockInfo");
    nvml.reasons = (NvmlReasonsFn)dlsym(lib, "nvmlDeviceGetCurrentClocksEventReasons");
    if (!nvml.reasons) nvml.reasons = (NvmlReasonsFn)dlsym(lib, "nvmlDeviceGetCurrentClocksThrottleReasons");
    char bus_id[64];
    int dev = 0;
    cudaCheck(cudaGetDevice(&dev));
    cudaCheck(cudaDeviceGetPCIBusId(bus_id, sizeof(bus_id), dev));
    unsigned long long mj = 0;
    if (!init || !by_bus || !nvml.energy_mj || !nvml.clock_mhz || init() != 0 || by_bus(bus_id, &nvml.device) != 0 ||
        nvml.energy_mj(nvml.device, &mj) != 0) {
        fprintf(stderr, "bench_gemm_energy: NVML has no energy counter for device %s\n", bus_id);
        exit(1);
    }
}

static unsigned long long nvml_energy_mj(void) {
    unsigned long long mj = 0;
    if (nvml.energy_mj(nvml.device, &mj) != 0) { fprintf(stderr, "bench_gemm_energy: NVML energy read failed\n"); exit(1); }
    return mj;
}

static double wall_seconds(void) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// --- one candidate under sustained load ------------------------------------------------------
typedef struct {
    double ms, mj, mhz, capped;  // per call; median SM clock; share of samples power-capped
} Sustained;

static Sustained run_sustained(const StepGemm* p, const StepGemmBuffers* bufs, double warm_s, double seconds,
                               float burst_ms) {
    // batches of about 20 ms; at most two in flight, so NVML is sampled while the GPU stays busy
    const int batch = std::max(1, (int)(20.0 / burst_ms));
    cudaEvent_t done[2], start, stop;
    for (int i = 0; i < 2; i++) cudaCheck(cudaEventCreate(&done[i]));
    cudaCheck(cudaEventCreate(&start));
    cudaCheck(cudaEventCreate(&stop));
    std::vector<unsigned> clocks;
    int capped = 0, samples = 0;
    long calls = 0;
    unsigned long long mj0 = 0;
    double t_begin = wall_seconds(), t_measure = t_begin + warm_s, t_end = t_measure + seconds;
    int measuring = 0, b = 0;
    for (;;) {
        double now = wall_seconds();
        if (!measuring && now >= t_measure) {
            cudaCheck(cudaDeviceSynchronize());
            mj0 = nvml_energy_mj();
            cudaCheck(cudaEventRecord(start, 0));
            measuring = 1;
        } else if (measuring && now >= t_end) {
            break;
        }
        for (int i = 0; i < batch; i++) step_gemm_run(p, bufs);
        if (measuring) calls += batch;
        cudaCheck(cudaEventRecord(done[b & 1], 0));
        if (b > 0) cudaCheck(cudaEventSynchronize(done[(b - 1) & 1]));
        b++;
        if (measuring) {
            unsigned mhz = 0;
            unsigned long long why = 0;
            if (nvml.clock_mhz(nvml.device, NVML_CLOCK_SM_, &mhz) == 0) clocks.push_back(mhz);
            if (nvml.reasons && nvml.reasons(nvml.device, &why) == 0) {
                samples++;
                capped += (why & NVML_REASON_SW_POWER_CAP_) != 0;
            }
        }
    }
    cudaCheck(cudaEventRecord(stop, 0));
    cudaCheck(cudaEventSynchronize(stop));
    unsigned long long mj1 = nvml_energy_mj();
    float ms = 0.0f;
    cudaCheck(cudaEventElapsedTime(&ms, start, stop));
    Sustained s;
    s.ms = ms / calls;
    s.mj = (double)(mj1 - mj0) / calls;
    std::sort(clocks.begin(), clocks.end());
    s.mhz = clocks.empty() ? 0.0 : clocks[clocks.size() / 2];
    s.capped = samples ? (double)capped / samples : 0.0;
    for (int i = 0; i < 2; i++) cudaCheck(cudaEventDestroy(done[i]));
    cudaCheck(cudaEventDestroy(start));
    cudaCheck(cudaEventDestroy(stop));
    return s;
}

int main(int argc, char** argv) {
#ifdef ENABLE_FP32
    (void)argc; (void)argv;
    printf("bench_gemm_energy: the step's GEMMs are bf16; build without ENABLE_FP32\n");
    return 0;
#else
    const double seconds = argc > 1 ? atof(argv[1]) : 1.0, warm = argc > 2 ? atof(argv[2]) : 0.5;
    if (!(seconds > 0.0) || !(warm >= 0.0)) {
        fprintf(stderr, "usage: %s [SECONDS > 0 [WARM >= 0]]\n", argv[0]);
        return 1;
    }
    nvml_open_or_die();
    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, 0));
    matmul_init();
    StepGemmBuffers bufs = step_gemm_buffers_alloc();
    const size_t max_out = (size_t)STEP_GEMM_BT * STEP_GEMM_VP;
    floatX* init = device_alloc<floatX>(max_out, "energy init");
    floatX* first = device_alloc<floatX>(max_out, "energy first");
    fill_random_device(init, max_out, 24, 1e-3f);
    printf("step GEMMs under sustained load on %s: %.2f s warm-up, %.2f s measured per candidate\n", prop.name, warm,
           seconds);
    // the step's totals (per_step x per call) for each choice rule
    double first_ms = 0, first_mj = 0, tune_ms = 0, tune_mj = 0, energy_ms = 0, energy_mj = 0, fast_ms = 0, fast_mj = 0;
    double any_mj = 0, first_mj_pass[2] = {0, 0};
    for (int g = 0; g < STEP_GEMM_COUNT; g++) {
        const StepGemm* p = &step_gemms[g];
        floatX* d = step_gemm_output(p, &bufs);
        const size_t d_count = step_gemm_output_count(p);
        Sustained s[CANDIDATES][2];
        float burst[CANDIDATES];
        int same[CANDIDATES], count = 0;
        printf("%s (x%d per step, %.1f GFLOP)\n", p->name, p->per_step, step_gemm_flops(p) / 1e9);
        for (int rank = 0; rank < CANDIDATES; rank++) {
            matmul_algo_cache_clear();
            matmul_heuristic_rank = rank;
            cudaCheck(cudaMemcpy(d, init, d_count * sizeof(floatX), cudaMemcpyDeviceToDevice));
            if (!step_gemm_run(p, &bufs)) break;
            cudaCheck(cudaDeviceSynchronize());
            if (rank == 0) cudaCheck(cudaMemcpy(first, d, d_count * sizeof(floatX), cudaMemcpyDeviceToDevice));
            same[rank] = rank == 0 || device_bitwise_equal(d, first, d_count * sizeof(floatX));
            burst[rank] = bench_median_ms([&] { step_gemm_run(p, &bufs); }, 5, 20);
            count++;
        }
        // two passes, the second in reverse order, so a drift of the card's state shows as a
        // difference between a candidate's two readings rather than as a ranking
        for (int pass = 0; pass < 2; pass++) {
            for (int i = 0; i < count; i++) {
                const int rank = pass == 0 ? i : count - 1 - i;
                matmul_algo_cache_clear();
                matmul_heuristic_rank = rank;
                s[rank][pass] = run_sustained(p, &bufs, warm, seconds, burst[rank]);
            }
        }
        for (int rank = 0; rank < count; rank++) {
            const Sustained* r = s[rank];
            const double ms = 0.5 * (r[0].ms + r[1].ms);
            printf("  #%d burst %.3f ms  sustained %.3f/%.3f ms %6.1f TFLOP/s  %7.2f/%7.2f mJ  %4.0f/%4.0f MHz  "
                   "capped %3.0f/%3.0f%%%s\n", rank, burst[rank], r[0].ms, r[1].ms, step_gemm_flops(p) / (ms * 1e-3) / 1e12,
                   r[0].mj, r[1].mj, r[0].mhz, r[1].mhz, 100.0 * r[0].capped, 100.0 * r[1].capped,
                   same[rank] ? "" : "  other bits");
        }
        matmul_heuristic_rank = 0;
        matmul_algo_cache_clear();
        if (count == 0) { printf("  no candidate\n"); continue; }
        double ms[CANDIDATES], mj[CANDIDATES];  // the two passes' means
        for (int c = 0; c < count; c++) {
            ms[c] = 0.5 * (s[c][0].ms + s[c][1].ms);
            mj[c] = 0.5 * (s[c][0].mj + s[c][1].mj);
        }
        int tune = 0, least = 0, fast = 0, any = 0;
        for (int c = 1; c < count; c++) {
            if (same[c] && burst[c] < burst[tune]) tune = c;
            if (same[c] && mj[c] < mj[least]) least = c;
            if (same[c] && ms[c] < ms[fast]) fast = c;
            if (mj[c] < mj[any]) any = c;
        }
        printf("  first #0; --matmul-tune #%d; least energy #%d (%.1f%% less than #0); fastest sustained #%d; "
               "least energy, any bits #%d\n", tune, least, 100.0 * (1.0 - mj[least] / mj[0]), fast, any);
        const int n = p->per_step;
        first_ms += n * ms[0]; first_mj += n * mj[0];
        first_mj_pass[0] += n * s[0][0].mj; first_mj_pass[1] += n * s[0][1].mj;
        tune_ms += n * ms[tune]; tune_mj += n * mj[tune];
        energy_ms += n * ms[least]; energy_mj += n * mj[least];
        fast_ms += n * ms[fast]; fast_mj += n * mj[fast];
        any_mj += n * mj[any];
    }
    printf("step GEMMs, sustained (ms and J per step): first %.2f ms %.2f J; --matmul-tune %.2f ms %.2f J; "
           "least energy %.2f ms %.2f J; fastest sustained %.2f ms %.2f J; least energy with any bits %.2f J\n",
           first_ms, first_mj / 1e3, tune_ms, tune_mj / 1e3, energy_ms, energy_mj / 1e3, fast_ms, fast_mj / 1e3,
           any_mj / 1e3);
    printf("the first candidates' J per step in the two passes: %.2f / %.2f (the measurement's spread)\n",
           first_mj_pass[0] / 1e3, first_mj_pass[1] / 1e3);
    step_gemm_buffers_free(&bufs);
    cudaCheck(cudaFree(init));
    cudaCheck(cudaFree(first));
    matmul_free();
    return 0;
#endif
}
