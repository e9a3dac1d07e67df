/*
scheduler.cuh - expert-centric scheduling of the OmniMoE (token, expert) pairs (docs/design.md §3).

Defines:
- ExpertSchedule: device buffers describing the BT*k pairs sorted by expert
- scheduler_scratch_bytes(P, N): scratch bytes scheduler_build needs
- scheduler_build(sched, expert_counts_or_NULL, idx, P, N, scratch, scratch_bytes, stream)

A pair is p = t*k + m (token t, its m-th selected expert idx[p]). scheduler_build sorts the P
pairs by expert id with a stable device radix sort (CUB DeviceRadixSort, keys = expert ids on
ceil(log2 N) bits, values = pair ids), so within one expert the pairs keep increasing pair id
(= increasing token). A stable sort's output is unique, so it is deterministic whatever order
the sort's blocks run in. Then a scan over "expert changes here" flags numbers the active
experts (experts with at least one pair) in increasing id order and builds CSR offsets over
them. Everything stays on the device: the number of active experts is written to device memory
and later kernels size their grids by the upper bound min(N, P) and exit early; no host
synchronisation, so the whole thing can be captured in a CUDA graph.

Buffers of an ExpertSchedule (the caller allocates them; A_max = min(N, P)):
  sorted_pair   (P)         int32  pair ids t*k+m, by expert, ties by pair id
  sorted_expert (P)         int32  expert id of each sorted pair (non-decreasing)
  sorted_active (P)         int32  active-expert index a of each sorted pair
  active_expert (A_max)     int32  expert id of active expert a (increasing in a)
  active_offset (A_max + 1) int32  pairs of active expert a are sorted_pair[off[a] .. off[a+1])
  num_active    (1)         int32  number of active experts
Entries past num_active (and past off[num_active]) are left unwritten; the others are
overwritten by every build. expert_counts, when given, is (N) int32, overwritten with each
expert's number of pairs (0 for the inactive ones).
*/
#ifndef OMNIMOE_SCHEDULER_CUH
#define OMNIMOE_SCHEDULER_CUH

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>
#include "cuda_utils.cuh"

typedef struct {
    int* sorted_pair;
    int* sorted_expert;
    int* sorted_active;
    int* active_expert;
    int* active_offset;
    int* num_active;
} ExpertSchedule;

// upper bound of the number of active experts: every one has at least one of the P pairs
static inline int scheduler_max_active(int P, int N) { return P < N ? P : N; }

// bits needed to hold expert ids 0 .. N-1 (at least 1 so the sort has something to do)
static inline int scheduler_key_bits(int N) {
    int bits = 1;
    while (bits < 31 && (1 << bits) < N) { bits++; }
    return bits;
}

// CUB's temporary storage for the sort and the scan (sizes only: no allocation, no sync)
static inline size_t scheduler_cub_bytes(int P, int N) {
    size_t sort_bytes = 0, scan_bytes = 0;
    cudaCheck(cub::DeviceRadixSort::SortPairs(NULL, sort_bytes, (const unsigned int*)NULL, (unsigned int*)NULL,
                                              (const int*)NULL, (int*)NULL, P, 0, scheduler_key_bits(N)));
    cudaCheck(cub::DeviceScan::InclusiveSum(NULL, scan_bytes, (const int*)NULL, (int*)NULL, P));
    return sort_bytes > scan_bytes ? sort_bytes : scan_bytes;
}

// scratch: CUB temporary storage, then the iota values (P int32), then the change flags (P int32)
static inline size_t scheduler_scratch_bytes(int P, int N) {
    return align256(scheduler_cub_bytes(P, N)) + 2 * align256((size_t)P * sizeof(int));
}

// ----------------------------------------------------------------------------
// kernels

__global__ void scheduler_iota_kernel(int* values, int P) {
    int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p < P) { values[p] = p; }
}

// flag[p] = 1 where a new expert starts in the sorted order
__global__ void scheduler_flag_kernel(int* flags, const int* sorted_expert, int P) {
    int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p < P) { flags[p] = (p == 0 || sorted_expert[p] != sorted_expert[p - 1]) ? 1 : 0; }
}

// sorted_active holds the inclusive scan of the flags on entry: turn it into 0-based active
// indices and write the active list, the CSR offsets and the active count
__global__ void scheduler_active_kernel(ExpertSchedule sched, int P) {
    int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= P) { return; }
    int a = sched.sorted_active[p] - 1;
    sched.sorted_active[p] = a;
    int e = sched.sorted_expert[p];
    if (p == 0 || e != sched.sorted_expert[p - 1]) {
        sched.active_expert[a] = e;
        sched.active_offset[a] = p;
    }
    if (p == P - 1) {
        sched.active_offset[a + 1] = P;
        sched.num_active[0] = a + 1;
    }
}

// optional per-expert pair counts over all N experts (for load statistics)
__global__ void scheduler_counts_kernel(int* expert_counts, ExpertSchedule sched) {
    int a = blockIdx.x * blockDim.x + threadIdx.x;
    if (a >= sched.num_active[0]) { return; }
    expert_counts[sched.active_expert[a]] = sched.active_offset[a + 1] - sched.active_offset[a];
}

// ----------------------------------------------------------------------------
// launcher

// idx: (P) expert ids in [0, N) of the pairs, P = BT*k (the router's (BT, k) output).
// expert_counts: optional (N) int32, overwritten with each expert's number of pairs (NULL: skip).
static void scheduler_build(ExpertSchedule sched, int* expert_counts, const int* idx, int P, int N,
                            void* scratch, size_t scratch_bytes, cudaStream_t stream) {
    if (P < 1 || N < 1) {
        fprintf(stderr, "scheduler_build: expected P = BT*k >= 1 pairs and N >= 1 experts, got P=%d N=%d\n", P, N);
        exit(EXIT_FAILURE);
    }
    size_t need = scheduler_scratch_bytes(P, N);
    if (scratch == NULL || scratch_bytes < need) {
        fprintf(stderr, "scheduler_build: scratch of %zu bytes given, %zu needed (scheduler_scratch_bytes)\n",
                scratch_bytes, need);
        exit(EXIT_FAILURE);
    }
    size_t cub_bytes = scheduler_cub_bytes(P, N);
    char* base = (char*)scratch;
    void* cub_temp = base;
    int* iota = (int*)(base + align256(cub_bytes));
    int* flags = (int*)((char*)iota + align256((size_t)P * sizeof(int)));

    const int block = 256;
    const int grid = ceil_div(P, block);
    scheduler_iota_kernel<<<grid, block, 0, stream>>>(iota, P);
    cudaCheckLast();
    size_t temp_bytes = cub_bytes;
    cudaCheck(cub::DeviceRadixSort::SortPairs(cub_temp, temp_bytes, (const unsigned int*)idx,
                                              (unsigned int*)sched.sorted_expert, (const int*)iota,
                                              sched.sorted_pair, P, 0, scheduler_key_bits(N), stream));
    scheduler_flag_kernel<<<grid, block, 0, stream>>>(flags, sched.sorted_expert, P);
    cudaCheckLast();
    temp_bytes = cub_bytes;
    cudaCheck(cub::DeviceScan::InclusiveSum(cub_temp, temp_bytes, (const int*)flags, sched.sorted_active, P, stream));
    scheduler_active_kernel<<<grid, block, 0, stream>>>(sched, P);
    cudaCheckLast();
    if (expert_counts != NULL) {
        cudaCheck(cudaMemsetAsync(expert_counts, 0, (size_t)N * sizeof(int), stream));
        int amax = scheduler_max_active(P, N);
        scheduler_counts_kernel<<<ceil_div(amax, block), block, 0, stream>>>(expert_counts, sched);
        cudaCheckLast();
    }
}

#endif  // OMNIMOE_SCHEDULER_CUH
