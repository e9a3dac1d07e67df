/*
router.cuh - the OmniMoE Cartesian-product router on the GPU (docs/design.md §2), forward and backward.

Defines:
- RouterOptions {n, k, norm, gate, training}: the router's shape and options
- RouterSaved: what the forward writes and the backward reads (logits, logp, BN statistics, ids,
  gates)
- router_forward(saved, running_mean, running_var, X, Wrc, BT, C, opt, scratch, bytes, stream):
  logits = X Wrc^T (fp32), optional batch norm (batch or running stats), log-softmax of each
  n-half, exact top-k of S(i,j) = pr[i] + pc[j], gates
- router_backward(dX, dWrc, dgate, saved, X, Wrc, BT, C, opt, scratch, bytes, stream):
  gates -> S -> (pr, pc) -> log-softmax -> BN -> GEMM backward
- router_forward_scratch_bytes(BT, n), router_backward_scratch_bytes(BT, n): scratch sizes
- router_topk_warp<KEYS>(...): the per-token exact top-k (a __device__ function, also used by tests;
  KEYS = router_topk_keys_per_lane(n))
The GEMMs run on matmul.cuh's cuBLAS handle (matmul_init() first).

Shapes (BT tokens, C channels, n = sqrt(N), k experts per token, R = 2n logits per token):
  X (BT, C) floatX (LN2 output)            Wrc (R, C) floatX: rows [0,n) = Wr, [n,2n) = Wc
  logits (BT, R) fp32  raw GEMM output     logp (BT, R) fp32: [pr | pc] log-softmax of each half
  bn_mean, bn_rstd (R) fp32               running_mean, running_var (R) fp32 (BN state)
  idx (BT, k) int32 expert ids e = i*n+j   gate (BT, k) fp32
Options: norm (ROUTER_NORM_BN or ROUTER_NORM_NONE, config.h), gate (GATE_SOFTMAX: softmax over
the k selected S; GATE_PROB: g = exp(S)), training (BN: 1 = batch statistics + running-stat
update with momentum BATCHNORM_MOMENTUM and the unbiased batch variance, like torch
BatchNorm1d; 0 = running statistics).

Top-k (per token, one warp). The order is: higher S first, equal S -> smaller expert id first,
where S is the fp32 sum pr[i] + pc[j]. The result is the exact top-k of all N pairs in that
order, sorted. Method (docs/design.md §2 product-key argument, O(n + k^2) work):
  1. take the k' = min(n, k) best rows of pr and the k' best columns of pc (same order rule);
  2. rounding guard: an fp32 sum can tie two rows whose pr differ by about an ulp, and then the
     tie goes to the smaller id, which may be a row outside the k' best. Rows (columns) outside
     that lie within tol = 2^-20 (max|pr| + max|pc|) below a selected one of larger index, or
     selected ones closer than tol, mark the token as near-tied (below that distance the fp32
     sums are strictly ordered). A few percent of real tokens; adversarial cases are tested;
  3. the candidate at sorted position (a, b) is beaten by all (a', b') with a' <= a, b' <= b,
     so only (a+1)(b+1) <= k can be in the top-k: about k (1 + ln k) staircase candidates.
     Selection (rows and columns in step 1 when n > 64, and these candidates when more than
     64): router_select_topk finds the k-th largest score key by a bitwise search of warp
     counts (from the keys' common prefix, stopping once exactly k keys lie at or above the
     bits found: about 10 steps of 32 on normal scores), takes what lies above it plus the
     smallest ids equal to it, and sorts those by rank; with at most 64 elements every one is
     ranked at once by counting who beats it.
     The search keeps up to 8 keys a lane in registers (256 candidates), 32 (1024) when
     n > 256; for rows and columns with 256 < n <= 1024 the two searches run interleaved, so
     that each step's two warp counts overlap. Rows and columns with n > 256 and k' < 32
     take k' rounds of "best after the previous one" (two redux.sync each) instead: no slower
     there (measured at n = 1024);
  4. when step 2 found near-ties, the staircase is still exact in score values but a tie at the
     k-th value may belong to a smaller id outside it: router_fix_ties refills the slots of the
     k-th value with the smallest ids scoring exactly that value, found by a scan of the rows
     and columns that can reach it (usually a handful; all n in fully tied degenerate cases).
NaN scores are treated as -inf so the selection is always well defined.

Determinism: every reduction has a fixed order (per-lane sequential + xor butterfly, fixed
chunk order for BN statistics); no atomics; cuBLAS GEMMs with a fixed workspace and default
(non-atomic) mode. No host synchronisation: all launchers are graph-capturable.

Backward writes: dX += dlogits Wrc (accumulate into the caller's dX, which usually already
holds the expert-branch and SwiGLU contributions), dWrc += dlogits^T X (gradient accumulation).
dlogits is rounded to floatX for the two GEMMs.
*/
#ifndef OMNIMOE_ROUTER_CUH
#define OMNIMOE_ROUTER_CUH

#include "config.h"      // ROUTER_NORM_*, GATE_*, BATCHNORM_*
#include "cuda_utils.cuh"
#include "matmul.cuh"      // the cuBLAS handle of the router's GEMMs

#define ROUTER_MAX_K 256
#define ROUTER_BN_CHUNK 128        // tokens per partial-statistics chunk of the BN reductions
#define ROUTER_TOKEN_SMEM_BUDGET (48 * 1024)

typedef struct {
    int n;         // grid side: N = n*n experts, R = 2n logits per token
    int k;         // experts per token
    int norm;      // ROUTER_NORM_BN or ROUTER_NORM_NONE
    int gate;      // GATE_SOFTMAX or GATE_PROB
    int training;  // BN statistics: 1 = of the batch (and update the running ones), 0 = running
} RouterOptions;

// written by router_forward, read by router_backward (BT tokens)
typedef struct {
    float* logits;   // (BT, R) raw GEMM output
    float* logp;     // (BT, R) log-softmax of each half
    float* bn_mean;  // (R) the statistics BN used (norm = bn only)
    float* bn_rstd;  // (R)
    int* idx;        // (BT, k) expert ids, best first
    float* gate;     // (BT, k)
} RouterSaved;

// ----------------------------------------------------------------------------
// sizes

static inline int router_bn_num_chunks(int BT) { return ceil_div(BT, ROUTER_BN_CHUNK); }

// number of staircase candidates (a+1)(b+1) <= k inside the k' x k' grid
static inline __host__ __device__ int router_staircase_count(int n, int k) {
    int kp = n < k ? n : k;
    int count = 0;
    for (int a = 0; a < kp; a++) {
        int bmax = k / (a + 1);
        count += bmax < kp ? bmax : kp;
    }
    return count;
}

// 32-bit words of shared memory one token (warp) needs: pr, pc, rows, cols (n each),
// the k selected scores and ids and the staircase candidates (score and id)
static inline __host__ __device__ int router_token_smem_words(int n, int k) {
    return 4 * n + 2 * k + 2 * router_staircase_count(n, k);
}

// the backward's per-token words: dpr, dpc (n each)
static inline __host__ __device__ int router_backward_smem_words(int n) { return 2 * n; }

static inline size_t router_forward_scratch_bytes(int BT, int n) {
    return 2 * align256((size_t)router_bn_num_chunks(BT) * 2 * n * sizeof(float));
}

static inline size_t router_backward_scratch_bytes(int BT, int n) {
    return align256((size_t)BT * 2 * n * sizeof(float))      // dL/d(normalised logits)
         + align256((size_t)BT * 2 * n * sizeof(floatX))     // dL/dlogits for the GEMMs
         + 2 * align256((size_t)router_bn_num_chunks(BT) * 2 * n * sizeof(float));
}

// ----------------------------------------------------------------------------
// top-k building blocks (one warp per token)

// the selection order: (va, ia) comes before (vb, ib)
__device__ inline bool router_beats(float va, int ia, float vb, int ib) {
    return va > vb || (va == vb && ia < ib);
}

// float -> uint32 with the same order (for non-NaN values; -0 is first turned into +0, as the
// two compare equal as floats), and back
__device__ inline unsigned router_order_key(float v) {
    unsigned u = __float_as_uint(v + 0.0f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ inline float router_key_to_float(unsigned key) {
    return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// Every lane ends with the best (v, i) of the warp, best = router_beats order; lanes without a
// candidate hold i == INT_MAX. Two warp-wide integer reductions (redux.sync): the largest order
// key, then the smallest index among the lanes holding it. Same result as a butterfly of
// router_beats, in a fixed (hardware) order, so deterministic.
__device__ inline void router_warp_argbest(float& v, int& i) {
    const unsigned key = (i == INT_MAX) ? 0u : router_order_key(v);  // real keys are never 0 (no NaN)
    const unsigned best_key = __reduce_max_sync(0xffffffffu, key);
    const unsigned best_i = __reduce_min_sync(0xffffffffu, key == best_key ? (unsigned)i : 0xffffffffu);
    v = router_key_to_float(best_key);
    i = (int)best_i;
}

// out_r[0..kk) / out_c[0..kk) = indices of the kk best of vr[0..n) / vc[0..n), in order:
// kk rounds of "best after the previous one", rows and columns interleaved (two independent
// reduction chains per round)
__device__ inline void router_select_sorted2(const float* vr, const float* vc, int n, int kk, int* out_r, int* out_c, int lane) {
    float prev_r = INFINITY, prev_c = INFINITY;
    int prev_ri = -1, prev_ci = -1;  // everything comes after (+inf, -1)
    for (int r = 0; r < kk; r++) {
        float best_r = -INFINITY, best_c = -INFINITY;
        int best_ri = INT_MAX, best_ci = INT_MAX;
        for (int i = lane; i < n; i += 32) {
            float x = vr[i], y = vc[i];
            if (router_beats(prev_r, prev_ri, x, i) && router_beats(x, i, best_r, best_ri)) { best_r = x; best_ri = i; }
            if (router_beats(prev_c, prev_ci, y, i) && router_beats(y, i, best_c, best_ci)) { best_c = y; best_ci = i; }
        }
        router_warp_argbest(best_r, best_ri);
        router_warp_argbest(best_c, best_ci);
        if (lane == 0) { out_r[r] = best_ri; out_c[r] = best_ci; }
        prev_r = best_r; prev_ri = best_ri;
        prev_c = best_c; prev_ci = best_ci;
    }
    __syncwarp();
}

// Same result as router_select_sorted2 for n <= 64, without serial rounds: each lane ranks its
// (at most two) elements by counting the elements that beat them (the order is strict, so ranks
// are distinct) and the kk best land at out[rank], already sorted.
__device__ inline void router_select_sorted2_rank(const float* vr, const float* vc, int n, int kk, int* out_r, int* out_c, int lane) {
    const int i0 = lane, i1 = lane + 32;
    const float r0 = i0 < n ? vr[i0] : 0.0f, r1 = i1 < n ? vr[i1] : 0.0f;
    const float c0 = i0 < n ? vc[i0] : 0.0f, c1 = i1 < n ? vc[i1] : 0.0f;
    int rank_r0 = 0, rank_r1 = 0, rank_c0 = 0, rank_c1 = 0;
    for (int j = 0; j < n; j++) {
        const float xr = vr[j], xc = vc[j];
        rank_r0 += router_beats(xr, j, r0, i0);
        rank_r1 += router_beats(xr, j, r1, i1);
        rank_c0 += router_beats(xc, j, c0, i0);
        rank_c1 += router_beats(xc, j, c1, i1);
    }
    if (i0 < n && rank_r0 < kk) { out_r[rank_r0] = i0; }
    if (i1 < n && rank_r1 < kk) { out_r[rank_r1] = i1; }
    if (i0 < n && rank_c0 < kk) { out_c[rank_c0] = i0; }
    if (i1 < n && rank_c1 < kk) { out_c[rank_c1] = i1; }
    __syncwarp();
}

// sorts the kk (<= 32 PER_LANE) entries of (id, val) in place into router_beats order: each lane
// reads its PER_LANE entries, counts the entries that beat each (a strict order, so ranks are
// distinct), then writes it at that rank
template <int PER_LANE>
__device__ inline void router_rank_sort(int* id, float* val, int kk, int lane) {
    int my_id[PER_LANE], my_rank[PER_LANE];
    float my_val[PER_LANE];
#pragma unroll
    for (int r = 0; r < PER_LANE; r++) {
        const int q = lane + 32 * r;
        my_rank[r] = 0;
        my_id[r] = q < kk ? id[q] : INT_MAX;
        my_val[r] = q < kk ? val[q] : -INFINITY;
    }
    for (int q = 0; q < kk; q++) {
        const float v = val[q];
        const int i = id[q];
#pragma unroll
        for (int r = 0; r < PER_LANE; r++) { my_rank[r] += router_beats(v, i, my_val[r], my_id[r]); }
    }
    __syncwarp();
#pragma unroll
    for (int r = 0; r < PER_LANE; r++) {
        if (lane + 32 * r < kk) { id[my_rank[r]] = my_id[r]; val[my_rank[r]] = my_val[r]; }
    }
    __syncwarp();
}

// candidate q's order key, 0 past the end
__device__ inline unsigned router_select_key(const float* vals, int q, int count) {
    return q < count ? router_order_key(vals[q]) : 0u;  // 0: below every real key (-inf is 0x007fffff)
}

// Where the k-th key search starts. Every key lies between the smallest and the largest, so all
// share the bits above the highest bit where those two differ, and so does the answer: the
// search starts from that prefix at that bit (-1: every key is equal). lo_key, hi_key: this
// lane's smallest and largest real key (0xffffffff and 0 when it holds none).
__device__ inline unsigned router_key_prefix(unsigned lo_key, unsigned hi_key, int& first_bit) {
    const unsigned lo = __reduce_min_sync(0xffffffffu, lo_key), hi = __reduce_max_sync(0xffffffffu, hi_key);
    first_bit = 31 - __clz(lo ^ hi);  // __clz(0) = 32: -1
    return first_bit < 0 ? hi : hi & ~((2u << first_bit) - 1u);
}

// A threshold K that selects the kk best keys of vals[0..count): the kk-th largest order key, or
// a K with exactly kk keys >= K (the same kk: no key outside them ties with one inside). Found
// MSB first by warp counts of "key >= trial", from the keys' common prefix, stopping as soon as
// exactly kk keys are >= K (about 10 of the 32 steps for normal scores, by a simulation of
// log-softmax rows and staircase sums at n = 256..1024). PER_LANE > 0: the count <= 32
// PER_LANE keys are held in registers; PER_LANE = 0: they are recomputed from shared memory.
template <int PER_LANE>
__device__ inline unsigned router_kth_key(const float* vals, int count, int kk, int lane) {
    unsigned key[PER_LANE > 0 ? PER_LANE : 1];
    unsigned lo_key = 0xffffffffu, hi_key = 0u;
    if (PER_LANE > 0) {
#pragma unroll
        for (int r = 0; r < PER_LANE; r++) {
            key[r] = router_select_key(vals, lane + 32 * r, count);
            if (lane + 32 * r < count) { lo_key = min(lo_key, key[r]); hi_key = max(hi_key, key[r]); }
        }
    } else {
        for (int q = lane; q < count; q += 32) {
            const unsigned kq = router_order_key(vals[q]);
            lo_key = min(lo_key, kq);
            hi_key = max(hi_key, kq);
        }
    }
    int bit;
    unsigned K = router_key_prefix(lo_key, hi_key, bit);
    if (count == kk) { return K; }  // every key is taken
    for (; bit >= 0; bit--) {
        const unsigned trial = K | (1u << bit);
        int at_least = 0;
        if (PER_LANE > 0) {
#pragma unroll
            for (int r = 0; r < PER_LANE; r++) { at_least += key[r] >= trial; }
        } else {
            for (int q = lane; q < count; q += 32) { at_least += router_order_key(vals[q]) >= trial; }
        }
        const int total = (int)__reduce_add_sync(0xffffffffu, (unsigned)at_least);
        if (total >= kk) {
            K = trial;
            if (total == kk) { break; }
        }
    }
    return K;
}

// router_kth_key of va[0..count) and of vb[0..count), the two searches interleaved (so each
// step's two warp counts overlap), keys held in registers: count <= 32 PER_LANE
template <int PER_LANE>
__device__ inline void router_kth_key_pair(const float* va, const float* vb, int count, int kk, unsigned& Ka,
                                           unsigned& Kb, int lane) {
    unsigned key_a[PER_LANE], key_b[PER_LANE];
    unsigned lo_a = 0xffffffffu, hi_a = 0u, lo_b = 0xffffffffu, hi_b = 0u;
#pragma unroll
    for (int r = 0; r < PER_LANE; r++) {
        key_a[r] = router_select_key(va, lane + 32 * r, count);
        key_b[r] = router_select_key(vb, lane + 32 * r, count);
        if (lane + 32 * r < count) {
            lo_a = min(lo_a, key_a[r]); hi_a = max(hi_a, key_a[r]);
            lo_b = min(lo_b, key_b[r]); hi_b = max(hi_b, key_b[r]);
        }
    }
    int bit_a, bit_b;
    unsigned A = router_key_prefix(lo_a, hi_a, bit_a), B = router_key_prefix(lo_b, hi_b, bit_b);
    bool done_a = count == kk, done_b = count == kk;
    for (int bit = max(bit_a, bit_b); bit >= 0 && !(done_a && done_b); bit--) {
        const unsigned trial_a = A | (1u << bit), trial_b = B | (1u << bit);
        int at_least_a = 0, at_least_b = 0;
#pragma unroll
        for (int r = 0; r < PER_LANE; r++) {
            at_least_a += key_a[r] >= trial_a;
            at_least_b += key_b[r] >= trial_b;
        }
        const int total_a = (int)__reduce_add_sync(0xffffffffu, (unsigned)at_least_a);
        const int total_b = (int)__reduce_add_sync(0xffffffffu, (unsigned)at_least_b);
        // a search whose prefix still covers this bit, or that has finished, leaves its K alone
        if (!done_a && bit <= bit_a && total_a >= kk) { A = trial_a; done_a = total_a == kk; }
        if (!done_b && bit <= bit_b && total_b >= kk) { B = trial_b; done_b = total_b == kk; }
    }
    Ka = A;
    Kb = B;
}

// the kk-th largest order key of vals[0..count), keys in registers where count <= 32 KEYS
// (KEYS = 8 or 32: a kernel's register budget, router_topk_keys_per_lane), else from shared memory
template <int KEYS>
__device__ inline unsigned router_kth_key_any(const float* vals, int count, int kk, int lane) {
    if (count <= 128) return router_kth_key<4>(vals, count, kk, lane);
    if (count <= 256) return router_kth_key<8>(vals, count, kk, lane);
    if constexpr (KEYS >= 32) {
        if (count <= 512) return router_kth_key<16>(vals, count, kk, lane);
        if (count <= 1024) return router_kth_key<32>(vals, count, kk, lane);
    }
    return router_kth_key<0>(vals, count, kk, lane);
}

// The kk best of count candidates in router_beats order, sorted, one warp: out_id[0..kk),
// out_val[0..kk) (shared memory, not overlapping the inputs), given router_kth_key*'s threshold K
// (the kk-th largest order key, or one with exactly kk keys >= it). Candidate q has value vals[q]
// (no NaN) and id ids[q] (ids == NULL: id = q); ids are distinct; kk <= count, kk <= ROUTER_MAX_K.
//   1. every candidate with key > K (at most kk), then the kk - above smallest ids with key == K
//      (one ballot pass when all of them fit, else repeated min-id extraction: exact ties only);
//   2. each selected one goes to out[rank], rank = how many selected beat it (a strict order).
__device__ inline void router_select_topk_at(const float* vals, const int* ids, int count, int kk, unsigned K,
                                             int* out_id, float* out_val, int lane) {
    // 1. compact: key > K in storage order, then the ties at K
    int above = 0, at_k = 0;
    for (int q = lane; q < count; q += 32) {
        const unsigned kq = router_order_key(vals[q]);
        above += kq > K;
        at_k += kq == K;
    }
    above = (int)__reduce_add_sync(0xffffffffu, (unsigned)above);
    at_k = (int)__reduce_add_sync(0xffffffffu, (unsigned)at_k);
    const int need = kk - above;  // >= 0
    const unsigned below_lane = (1u << lane) - 1u;
    int pos = 0;
    for (int base = 0; base < count; base += 32) {
        const int q = base + lane;
        const unsigned kq = router_select_key(vals, q, count);
        const bool take = q < count && (kq > K || (kq == K && at_k == need));
        const unsigned mask = __ballot_sync(0xffffffffu, take);
        if (take) {
            const int slot = pos + __popc(mask & below_lane);
            out_id[slot] = ids ? ids[q] : q;
            out_val[slot] = vals[q];
        }
        pos += __popc(mask);
    }
    if (at_k != need) {  // more candidates tie at K than slots left: the smallest ids, one by one
        int prev = -1;
        for (int r = 0; r < need; r++) {
            unsigned best = 0xffffffffu;
            for (int q = lane; q < count; q += 32) {
                const int id = ids ? ids[q] : q;
                if (router_order_key(vals[q]) == K && id > prev) { best = min(best, (unsigned)id); }
            }
            best = __reduce_min_sync(0xffffffffu, best);
            if (lane == 0) { out_id[above + r] = (int)best; out_val[above + r] = router_key_to_float(K); }
            prev = (int)best;
        }
    }
    __syncwarp();
    // 2. rank sort in place (PER_LANE items per lane)
    if (kk <= 32) { router_rank_sort<1>(out_id, out_val, kk, lane); }
    else if (kk <= 64) { router_rank_sort<2>(out_id, out_val, kk, lane); }
    else if (kk <= 128) { router_rank_sort<4>(out_id, out_val, kk, lane); }
    else { router_rank_sort<ROUTER_MAX_K / 32>(out_id, out_val, kk, lane); }
}

// router_select_topk_at with K found first: instead of kk rounds of "best after the previous
// one" (two warp reductions each), a threshold by a bitwise search, MSB first: warp counts of
// "key >= trial" (router_kth_key; keys held in registers when count <= 32 KEYS)
template <int KEYS>
__device__ inline void router_select_topk(const float* vals, const int* ids, int count, int kk,
                                          int* out_id, float* out_val, int lane) {
    router_select_topk_at(vals, ids, count, kk, router_kth_key_any<KEYS>(vals, count, kk, lane), out_id, out_val, lane);
}

// Is i outside sel[0..kk) (whose last is (v_last, i_last)) with some selected i2 > i and
// 0 < v[i2] - v[i] <= tol? Only values within 2 tol below v_last can be.
__device__ inline bool router_near_tie_outside(const float* v, int i, const int* sel, int kk, float v_last, int i_last,
                                               float tol) {
    const float x = v[i];
    if (i == i_last || router_beats(x, i, v_last, i_last) || x < v_last - 2.0f * tol) { return false; }
    for (int a = 0; a < kk; a++) {
        const int i2 = sel[a];
        const float gap = v[i2] - x;
        if (i2 > i && gap > 0.0f && gap <= tol) { return true; }
    }
    return false;
}

// Does some index outside sel[0..kk) lie within tol below a selected one of larger index
// (0 < v[i2] - v[i] <= tol)? Only such an index can win an fp32 tie against a selected one by
// id; a token that has one takes router_fix_ties.
__device__ inline bool router_has_outside_near_ties(const float* v, int n, int kk, const int* sel, float tol, int lane) {
    const float v_last = v[sel[kk - 1]];
    const int i_last = sel[kk - 1];
    bool any = false;
    for (int i = lane; i < n; i += 32) { any |= router_near_tie_outside(v, i, sel, kk, v_last, i_last, tol); }
    return __any_sync(0xffffffffu, any) != 0;
}

// any two consecutive selected values closer than tol but not equal?
__device__ inline bool router_has_near_ties(const float* v, const int* sel, int kk, float tol, int lane) {
    bool near = false;
    for (int a = lane + 1; a < kk; a += 32) {
        float gap = v[sel[a - 1]] - v[sel[a]];
        if (gap > 0.0f && gap <= tol) { near = true; }
    }
    return __any_sync(0xffffffff, near) != 0;
}

__device__ inline float router_nan_to_neg_inf(float x) { return x != x ? -INFINITY : x; }

// Tie fix-up after the staircase selection, for tokens whose rows or columns have near-ties
// (the staircase is then still exact in VALUES, not necessarily in which of several equal
// scores win). Let v = sel_s[k-1], the k-th largest score value of the staircase, which is the
// k-th largest of all N: an element outside the staircase at sorted position (a, b) has
// (a+1)(b+1) - 1 >= k others scoring at least as much, so it scores <= v; and the k best under
// "score, then fewer dominators first" all lie inside. So the c scores > v are exactly the
// staircase's, already in place at out[0..c), and the other k - c slots go to the elements
// scoring exactly v with the smallest ids, anywhere in the grid. Rounding is monotone, so
// S(i,j) <= fl(pr[i] + max pc): only rows with fl(pr[i] + max pc) >= v and columns with
// fl(max pr + pc[j]) >= v can hold one; those rows are scanned in increasing i, their columns
// in increasing j (= increasing id) until k - c are found. Overwrites rows and cols.
__device__ inline void router_fix_ties(const float* pr, const float* pc, int n, int k, int* rows, int* cols,
                                       const float* sel_s, int* out_idx, int lane) {
    const float v = sel_s[k - 1];
    const float pr_max = pr[rows[0]], pc_max = pc[cols[0]];
    int above = 0;  // c: the selected scores strictly above v
    for (int m = lane; m < k; m += 32) { above += sel_s[m] > v; }
    above = __reduce_add_sync(0xffffffffu, above);
    __syncwarp();  // rows, cols are read above and rewritten below
    int num_rows = 0, num_cols = 0;
    for (int base = 0; base < n; base += 32) {
        const int i = base + lane;
        const bool row_ok = i < n && router_nan_to_neg_inf(pr[i] + pc_max) >= v;
        const bool col_ok = i < n && router_nan_to_neg_inf(pr_max + pc[i]) >= v;
        const unsigned row_mask = __ballot_sync(0xffffffffu, row_ok), col_mask = __ballot_sync(0xffffffffu, col_ok);
        const unsigned below_lane = (1u << lane) - 1u;
        if (row_ok) { rows[num_rows + __popc(row_mask & below_lane)] = i; }
        if (col_ok) { cols[num_cols + __popc(col_mask & below_lane)] = i; }
        num_rows += __popc(row_mask);
        num_cols += __popc(col_mask);
    }
    __syncwarp();
    const int need = k - above;
    int found = 0;
    for (int a = 0; a < num_rows && found < need; a++) {
        const int i = rows[a];
        for (int base = 0; base < num_cols && found < need; base += 32) {
            const int b = base + lane;
            const bool hit = b < num_cols && router_nan_to_neg_inf(pr[i] + pc[cols[b]]) == v;
            const unsigned mask = __ballot_sync(0xffffffffu, hit);
            const int pos = found + __popc(mask & ((1u << lane) - 1u));
            if (hit && pos < need) { out_idx[above + pos] = i * n + cols[b]; }
            found += __popc(mask);
        }
    }
    __syncwarp();
}


// rows[0..kp) and cols[0..kp): the kp best of pr and of pc, sorted, by the k-th key search; for
// 256 < n <= 1024 with 32 keys a lane the two searches run interleaved (their warp counts
// overlap). scratch: kp floats.
template <int KEYS>
__device__ inline void router_select_rows_cols(const float* pr, const float* pc, int n, int kp, int* rows, int* cols,
                                               float* scratch, int lane) {
    if constexpr (KEYS >= 32) {  // compiled only into the kernel that has the registers for it
        if (n > 256 && n <= 1024) {
            unsigned K_r, K_c;
            if (n <= 512) router_kth_key_pair<16>(pr, pc, n, kp, K_r, K_c, lane);
            else router_kth_key_pair<32>(pr, pc, n, kp, K_r, K_c, lane);
            router_select_topk_at(pr, NULL, n, kp, K_r, rows, scratch, lane);
            router_select_topk_at(pc, NULL, n, kp, K_c, cols, scratch, lane);
            return;
        }
    }
    router_select_topk<KEYS>(pr, NULL, n, kp, rows, scratch, lane);
    router_select_topk<KEYS>(pc, NULL, n, kp, cols, scratch, lane);
}

// The staircase candidates, row by row: sorted row a (a < kp) pairs with the
// bmax(a) = min(k / (a+1), kp) best columns, at cand[off(a) + b], off(a) = the bmax of the rows
// before it. Lanes take 32 rows at a time (each its row's bmax, score and id, then a warp scan of
// the offsets) and the columns' scores and ids for b < 64 stay in registers, so the loop over
// rows only shuffles and stores. Returns the count (router_staircase_count(n, k)).
__device__ inline int router_staircase(const float* pr, const float* pc, const int* rows, const int* cols, int n, int k,
                                       int kp, float* cand_s, int* cand_id, int lane) {
    const int col_id0 = lane < kp ? cols[lane] : 0, col_id1 = lane + 32 < kp ? cols[lane + 32] : 0;
    const float col_s0 = pc[col_id0], col_s1 = pc[col_id1];
    int num_cand = 0;
    for (int a0 = 0; a0 < kp; a0 += 32) {
        const int a = a0 + lane;
        const int bmax = a < kp ? min(k / (a + 1), kp) : 0;
        const float row_s = a < kp ? pr[rows[a]] : 0.0f;
        const int row_id = a < kp ? rows[a] * n : 0;
        int end = bmax;  // inclusive scan: where this lane's row ends
        for (int o = 1; o < 32; o <<= 1) {
            const int v = __shfl_up_sync(0xffffffffu, end, o);
            if (lane >= o) { end += v; }
        }
        const int last = min(32, kp - a0);
        for (int r = 0; r < last; r++) {
            const int bm = __shfl_sync(0xffffffffu, bmax, r);
            const int off = num_cand + __shfl_sync(0xffffffffu, end, r) - bm;
            const float rs = __shfl_sync(0xffffffffu, row_s, r);
            const int rid = __shfl_sync(0xffffffffu, row_id, r);
            for (int b = lane; b < bm; b += 32) {
                const int c = b < 32 ? col_id0 : b < 64 ? col_id1 : cols[b];
                const float cs = b < 32 ? col_s0 : b < 64 ? col_s1 : pc[c];
                cand_s[off + b] = router_nan_to_neg_inf(rs + cs);
                cand_id[off + b] = rid + c;
            }
        }
        num_cand += __shfl_sync(0xffffffffu, end, 31);
    }
    __syncwarp();
    return num_cand;
}

// Exact top-k of S(i,j) = pr[i] + pc[j] (fp32 sum) over all n*n pairs, one warp.
// pr, pc: n values each in shared memory, NaN already replaced by -inf.
// rows, cols: n ints each; cand_s, cand_id: router_staircase_count(n,k) each; sel_s: k floats
// (all per-warp shared memory). Writes out_idx[0..k) (any memory) and sel_s[0..k) (the scores).
// allow_fast = 0 runs the tie fix-up on every token (tests). KEYS: keys a lane may hold in
// registers, router_topk_keys_per_lane(n) (any value gives the same result).
template <int KEYS>
__device__ inline void router_topk_warp(const float* pr, const float* pc, int n, int k,
                                        int* rows, int* cols, float* cand_s, int* cand_id, float* sel_s,
                                        int* sel_id, int* out_idx, int allow_fast, int lane) {
    const int kp = n < k ? n : k;
    float max_abs_r = 0.0f, max_abs_c = 0.0f;
    for (int i = lane; i < n; i += 32) {
        max_abs_r = fmaxf(max_abs_r, fabsf(pr[i]));
        max_abs_c = fmaxf(max_abs_c, fabsf(pc[i]));
    }
    max_abs_r = warp_reduce_max(max_abs_r);
    max_abs_c = warp_reduce_max(max_abs_c);
    // below this gap two rows (columns) can give equal fp32 sums; above 2^-23 (max|pr|+max|pc|)
    // they cannot, so 2^-20 leaves a safety factor of 8
    const float tol = ldexpf(max_abs_r + max_abs_c, -20);

    if (n <= 64) {
        router_select_sorted2_rank(pr, pc, n, kp, rows, cols, lane);
    } else if (n > 256 && kp < 32) {  // fewer rounds than search steps, over many keys: rounds
        router_select_sorted2(pr, pc, n, kp, rows, cols, lane);
    } else {  // sel_s is free until the final selection: scratch for the values
        router_select_rows_cols<KEYS>(pr, pc, n, kp, rows, cols, sel_s, lane);
    }
    bool fast = allow_fast && !router_has_outside_near_ties(pr, n, kp, rows, tol, lane) &&
                !router_has_outside_near_ties(pc, n, kp, cols, tol, lane);
    if (fast) {
        bool near_r = router_has_near_ties(pr, rows, kp, tol, lane);
        bool near_c = router_has_near_ties(pc, cols, kp, tol, lane);
        fast = !near_r && !near_c;
    }

    const int num_cand = router_staircase(pr, pc, rows, cols, n, k, kp, cand_s, cand_id, lane);
    if (num_cand <= 64) {  // rank every candidate at once (the top-k is among them: num_cand >= k)
        for (int q = lane; q < num_cand; q += 32) {
            const float s = cand_s[q];
            const int id = cand_id[q];
            int rank = 0;
            for (int r = 0; r < num_cand; r++) { rank += router_beats(cand_s[r], cand_id[r], s, id); }
            if (rank < k) { sel_id[rank] = id; sel_s[rank] = s; }
        }
        __syncwarp();
    } else {
        router_select_topk<KEYS>(cand_s, cand_id, num_cand, k, sel_id, sel_s, lane);
    }
    for (int m = lane; m < k; m += 32) { out_idx[m] = sel_id[m]; }
    __syncwarp();
    if (!fast) { router_fix_ties(pr, pc, n, k, rows, cols, sel_s, out_idx, lane); }
}

// 4-byte asynchronous global -> shared copy (cp.async.ca; any 4-byte aligned addresses)
__device__ inline void router_cp_async_4(float* smem_dst, const float* gmem_src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n"
                 :: "r"((unsigned)__cvta_generic_to_shared(smem_dst)), "l"(gmem_src) : "memory");
}

// carve the per-warp shared memory of router_topk_warp
struct RouterTokenSmem {
    float* pr; float* pc; float* sel_s; float* cand_s;
    int* rows; int* cols; int* cand_id; int* sel_id;
};

// cap = router_staircase_count(n, k) (computed once on the host)
__device__ inline RouterTokenSmem router_token_smem(float* warp_base, int n, int k, int cap) {
    RouterTokenSmem s;
    s.pr = warp_base;
    s.pc = s.pr + n;
    s.sel_s = s.pc + n;
    s.cand_s = s.sel_s + k;
    s.rows = (int*)(s.cand_s + cap);
    s.cols = s.rows + n;
    s.cand_id = s.cols + n;
    s.sel_id = s.cand_id + cap;
    return s;
}

// keys a lane of the top-k may hold in registers (router_topk_warp's KEYS): 32 only where rows
// and columns outnumber 256, since the wider search's registers lower the occupancy that the
// smaller n keep (measured: 64 against 89 registers a thread, n = 256 up to 1.3x slower with 32)
static inline int router_topk_keys_per_lane(int n) { return n > 256 ? 32 : 8; }

// warps per block for the per-token kernels, from the shared-memory budget
static inline int router_token_warps_per_block(int n, int k) {
    size_t per_warp = (size_t)router_token_smem_words(n, k) * 4;
    int warps = (int)(ROUTER_TOKEN_SMEM_BUDGET / per_warp);
    if (warps > 8) { warps = 8; }
    return warps;
}

// ----------------------------------------------------------------------------
// BN statistics (deterministic: fixed chunks of tokens, fixed order everywhere)

// per chunk of ROUTER_BN_CHUNK tokens and per channel: the chunk mean and sum of squared
// deviations from it (two passes over the chunk). block (32, 8), grid (chunks, ceil(R/32))
__global__ void router_bn_partial_stats_kernel(float* part_mean, float* part_m2, const float* logits, int BT, int R) {
    __shared__ float red[8][33];
    __shared__ float chunk_mean[32];
    const int cx = threadIdx.x, ty = threadIdx.y;
    const int c = blockIdx.y * 32 + cx;
    const int t0 = blockIdx.x * ROUTER_BN_CHUNK;
    const int count = min(ROUTER_BN_CHUNK, BT - t0);
    float sum = 0.0f;
    if (c < R) {
        for (int t = ty; t < count; t += 8) { sum += logits[(size_t)(t0 + t) * R + c]; }
    }
    red[ty][cx] = sum;
    __syncthreads();
    if (ty == 0) {
        float total = 0.0f;
        for (int j = 0; j < 8; j++) { total += red[j][cx]; }
        chunk_mean[cx] = total / (float)count;
    }
    __syncthreads();
    const float mean = chunk_mean[cx];
    float m2 = 0.0f;
    if (c < R) {
        for (int t = ty; t < count; t += 8) {
            float dev = logits[(size_t)(t0 + t) * R + c] - mean;
            m2 = fmaf(dev, dev, m2);
        }
    }
    red[ty][cx] = m2;
    __syncthreads();
    if (ty == 0 && c < R) {
        float total = 0.0f;
        for (int j = 0; j < 8; j++) { total += red[j][cx]; }
        part_mean[(size_t)blockIdx.x * R + c] = mean;
        part_m2[(size_t)blockIdx.x * R + c] = total;
    }
}

// Chan et al.: merge the statistics (count, mean, M2) of two disjoint sets of tokens
__device__ inline void router_bn_merge(double& count, double& mean, double& m2, double count_b, double mean_b, double m2_b) {
    if (count_b == 0.0) { return; }
    if (count == 0.0) { count = count_b; mean = mean_b; m2 = m2_b; return; }
    const double total = count + count_b;
    const double delta = mean_b - mean;
    mean += delta * (count_b / total);
    m2 += m2_b + delta * delta * (count * count_b / total);
    count = total;
}

// One warp per channel: lane L merges chunks L, L+32, ... in order, then a fixed tree
// (shfl_down 16, 8, 4, 2, 1) merges the lanes, in double. Writes mean and 1/sqrt(var + eps) and
// updates the running statistics. Eval: running statistics only. block 128 (4 channels).
__global__ void router_bn_finalize_kernel(float* bn_mean, float* bn_rstd, float* running_mean, float* running_var,
                                          const float* part_mean, const float* part_m2, int BT, int R, int training) {
    const int lane = threadIdx.x % 32;
    const int c = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (c >= R) { return; }
    if (!training) {
        if (lane == 0) {
            bn_mean[c] = running_mean[c];
            bn_rstd[c] = 1.0f / sqrtf(running_var[c] + BATCHNORM_EPS);
        }
        return;
    }
    const int num_chunks = ceil_div(BT, ROUTER_BN_CHUNK);
    double count = 0.0, mean = 0.0, m2 = 0.0;
    for (int ch = lane; ch < num_chunks; ch += 32) {
        router_bn_merge(count, mean, m2, (double)min(ROUTER_BN_CHUNK, BT - ch * ROUTER_BN_CHUNK),
                        (double)part_mean[(size_t)ch * R + c], (double)part_m2[(size_t)ch * R + c]);
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
        double count_b = __shfl_down_sync(0xffffffffu, count, offset);
        double mean_b = __shfl_down_sync(0xffffffffu, mean, offset);
        double m2_b = __shfl_down_sync(0xffffffffu, m2, offset);
        if (lane + offset < 32) { router_bn_merge(count, mean, m2, count_b, mean_b, m2_b); }
    }
    if (lane == 0) {
        const float var_biased = (float)(m2 / (double)BT);
        const float var_unbiased = (float)(m2 / (double)(BT - 1));
        bn_mean[c] = (float)mean;
        bn_rstd[c] = 1.0f / sqrtf(var_biased + BATCHNORM_EPS);
        running_mean[c] = (1.0f - BATCHNORM_MOMENTUM) * running_mean[c] + BATCHNORM_MOMENTUM * (float)mean;
        running_var[c] = (1.0f - BATCHNORM_MOMENTUM) * running_var[c] + BATCHNORM_MOMENTUM * var_unbiased;
    }
}

// ----------------------------------------------------------------------------
// per-token forward: normalise, log-softmax both halves, top-k, gates

template <int KEYS>
__global__ void router_token_forward_kernel(float* logp, int* idx, float* gate, const float* logits,
                                            const float* bn_mean, const float* bn_rstd,
                                            int BT, int n, int k, int use_bn, int gate_prob, int smem_words, int cap) {
    extern __shared__ float router_smem[];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int t = blockIdx.x * (blockDim.x / 32) + warp;
    if (t >= BT) { return; }  // whole warps leave; only __syncwarp is used below
    RouterTokenSmem sm = router_token_smem(router_smem + (size_t)warp * smem_words, n, k, cap);
    const int R = 2 * n;
    const float* lrow = logits + (size_t)t * R;
    float* prow = logp + (size_t)t * R;
    // the token's 2n logits into pr, pc (adjacent) all at once: one memory latency, not one
    // per unrolled batch of the loop below
    for (int c = lane; c < R; c += 32) { router_cp_async_4(sm.pr + c, lrow + c); }
    asm volatile("cp.async.wait_all;\n" ::: "memory");
    __syncwarp();
    for (int half = 0; half < 2; half++) {
        float* buf = half == 0 ? sm.pr : sm.pc;
        float mx = -INFINITY;
        for (int i = lane; i < n; i += 32) {
            int c = half * n + i;
            float x = buf[i];
            if (use_bn) { x = (x - bn_mean[c]) * bn_rstd[c]; }
            buf[i] = x;
            mx = fmaxf(mx, x);
        }
        mx = warp_reduce_max(mx);
        float sum = 0.0f;
        for (int i = lane; i < n; i += 32) { sum += expf(buf[i] - mx); }
        sum = warp_reduce_sum(sum);
        const float lse = mx + logf(sum);
        for (int i = lane; i < n; i += 32) {
            float lp = buf[i] - lse;
            prow[half * n + i] = lp;
            buf[i] = router_nan_to_neg_inf(lp);
        }
    }
    __syncwarp();
    int* idx_t = idx + (size_t)t * k;
    router_topk_warp<KEYS>(sm.pr, sm.pc, n, k, sm.rows, sm.cols, sm.cand_s, sm.cand_id, sm.sel_s, sm.sel_id, idx_t, 1, lane);
    float* gate_t = gate + (size_t)t * k;
    if (gate_prob) {
        for (int m = lane; m < k; m += 32) { gate_t[m] = expf(sm.sel_s[m]); }
    } else {
        const float s_max = sm.sel_s[0];  // sorted: the first is the largest
        float sum = 0.0f;
        for (int m = lane; m < k; m += 32) { sum += expf(sm.sel_s[m] - s_max); }
        sum = warp_reduce_sum(sum);
        for (int m = lane; m < k; m += 32) { gate_t[m] = expf(sm.sel_s[m] - s_max) / sum; }
    }
}

// ----------------------------------------------------------------------------
// per-token backward: dgate -> dS -> (dpr, dpc) -> d(normalised logits)

// writes dlhat (fp32, when use_bn) or dlogits (floatX, when not). Per-warp shared memory:
// dpr, dpc (n each). dpr[i] is the sum of the dS of the selected experts in row i, added in
// selection order m = 0..k-1 (so the result does not depend on the launch): lane i % 32 owns
// row i and adds the dS that the other lanes broadcast, one m at a time; columns alike.
__global__ void router_token_backward_kernel(float* __restrict__ dlhat, floatX* __restrict__ dlogits,
                                             const float* __restrict__ dgate, const float* __restrict__ gate,
                                             const int* __restrict__ idx, const float* __restrict__ logp, int BT, int n,
                                             int k, int use_bn, int gate_prob) {
    extern __shared__ float router_smem[];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int t = blockIdx.x * (blockDim.x / 32) + warp;
    if (t >= BT) { return; }
    float* dpr = router_smem + (size_t)warp * router_backward_smem_words(n);
    float* dpc = dpr + n;
    const float* g_t = gate + (size_t)t * k;
    const float* dg_t = dgate + (size_t)t * k;
    const int* idx_t = idx + (size_t)t * k;
    float dot = 0.0f;  // sum_l g_l dg_l (softmax gate)
    if (!gate_prob) {
        for (int m = lane; m < k; m += 32) { dot = fmaf(g_t[m], dg_t[m], dot); }
        dot = warp_reduce_sum(dot);
    }
    for (int i = lane; i < n; i += 32) { dpr[i] = 0.0f; dpc[i] = 0.0f; }
    __syncwarp();
    for (int m0 = 0; m0 < k; m0 += 32) {
        const int m = m0 + lane;
        float dS = 0.0f;
        int row = 0, col = 0;
        if (m < k) {
            const float g = g_t[m], dg = dg_t[m];
            dS = gate_prob ? g * dg : g * (dg - dot);
            row = idx_t[m] / n;
            col = idx_t[m] - row * n;
        }
        const int count = min(32, k - m0);
        for (int src = 0; src < count; src++) {
            const float v = __shfl_sync(0xffffffffu, dS, src);
            const int r = __shfl_sync(0xffffffffu, row, src), c = __shfl_sync(0xffffffffu, col, src);
            if ((r & 31) == lane) { dpr[r] += v; }
            if ((c & 31) == lane) { dpc[c] += v; }
        }
    }
    __syncwarp();
    float sum_r = 0.0f, sum_c = 0.0f;
    for (int i = lane; i < n; i += 32) { sum_r += dpr[i]; sum_c += dpc[i]; }
    sum_r = warp_reduce_sum(sum_r);
    sum_c = warp_reduce_sum(sum_c);
    const int R = 2 * n;
    const float* lp = logp + (size_t)t * R;
    for (int c = lane; c < R; c += 32) {
        float dl = c < n ? dpr[c] - expf(lp[c]) * sum_r : dpc[c - n] - expf(lp[c]) * sum_c;
        if (use_bn) { dlhat[(size_t)t * R + c] = dl; }
        else { dlogits[(size_t)t * R + c] = (floatX)dl; }
    }
}

// BN backward, pass 1: per chunk and channel, sum of dy and of dy * xhat. block (32, 8)
__global__ void router_bn_backward_partial_kernel(float* part_dy, float* part_dyx, const float* dlhat, const float* logits,
                                                  const float* bn_mean, const float* bn_rstd, int BT, int R) {
    __shared__ float red_dy[8][33];
    __shared__ float red_dyx[8][33];
    const int cx = threadIdx.x, ty = threadIdx.y;
    const int c = blockIdx.y * 32 + cx;
    const int t0 = blockIdx.x * ROUTER_BN_CHUNK;
    const int count = min(ROUTER_BN_CHUNK, BT - t0);
    float sum_dy = 0.0f, sum_dyx = 0.0f;
    if (c < R) {
        const float mean = bn_mean[c], rstd = bn_rstd[c];
        for (int t = ty; t < count; t += 8) {
            size_t o = (size_t)(t0 + t) * R + c;
            float dy = dlhat[o];
            float xhat = (logits[o] - mean) * rstd;
            sum_dy += dy;
            sum_dyx = fmaf(dy, xhat, sum_dyx);
        }
    }
    red_dy[ty][cx] = sum_dy;
    red_dyx[ty][cx] = sum_dyx;
    __syncthreads();
    if (ty == 0 && c < R) {
        float a = 0.0f, b = 0.0f;
        for (int j = 0; j < 8; j++) { a += red_dy[j][cx]; b += red_dyx[j][cx]; }
        part_dy[(size_t)blockIdx.x * R + c] = a;
        part_dyx[(size_t)blockIdx.x * R + c] = b;
    }
}

// BN backward, pass 2: dlogits = rstd * (dy - mean(dy) - xhat * mean(dy * xhat)) with batch
// statistics; rstd * dy with running statistics. Every block sums the chunk partials of its
// channels in the same fixed order, so all blocks agree bitwise. block (32, 8)
__global__ void router_bn_backward_apply_kernel(floatX* __restrict__ dlogits, const float* __restrict__ dlhat,
                                                const float* __restrict__ logits,
                                                const float* bn_mean, const float* bn_rstd,
                                                const float* part_dy, const float* part_dyx,
                                                int BT, int R, int batch_stats) {
    __shared__ float red_dy[8][33];
    __shared__ float red_dyx[8][33];
    __shared__ float mean_dy[32];
    __shared__ float mean_dyx[32];
    const int cx = threadIdx.x, ty = threadIdx.y;
    const int c = blockIdx.y * 32 + cx;
    {   // thread row ty sums chunks ty, ty+8, ...; row 0 then adds the 8 row sums in order
        float a = 0.0f, b = 0.0f;
        if (c < R && batch_stats) {
            const int num_chunks = ceil_div(BT, ROUTER_BN_CHUNK);
            for (int ch = ty; ch < num_chunks; ch += 8) {
                a += part_dy[(size_t)ch * R + c];
                b += part_dyx[(size_t)ch * R + c];
            }
        }
        red_dy[ty][cx] = a;
        red_dyx[ty][cx] = b;
    }
    __syncthreads();
    if (ty == 0) {
        float a = 0.0f, b = 0.0f;
        for (int j = 0; j < 8; j++) { a += red_dy[j][cx]; b += red_dyx[j][cx]; }
        mean_dy[cx] = a / (float)BT;
        mean_dyx[cx] = b / (float)BT;
    }
    __syncthreads();
    if (c >= R) { return; }
    const float mean = bn_mean[c], rstd = bn_rstd[c];
    const int t0 = blockIdx.x * ROUTER_BN_CHUNK;
    const int count = min(ROUTER_BN_CHUNK, BT - t0);
    for (int t = ty; t < count; t += 8) {
        size_t o = (size_t)(t0 + t) * R + c;
        float dy = dlhat[o];
        float dl;
        if (batch_stats) {
            float xhat = (logits[o] - mean) * rstd;
            dl = rstd * (dy - mean_dy[cx] - xhat * mean_dyx[cx]);
        } else {
            dl = rstd * dy;
        }
        dlogits[o] = (floatX)dl;
    }
}

// ----------------------------------------------------------------------------
// launchers

static inline void router_check_args(const char* who, int BT, int C, RouterOptions opt) {
    const char* why = NULL;
    const int n = opt.n, k = opt.k;
    if (BT < 1) why = "BT >= 1 tokens";
    else if (C < 1) why = "C >= 1 channels";
    else if (n < 1) why = "n >= 1 (N = n*n experts)";
    else if (k < 1 || (long long)k > (long long)n * n) why = "1 <= k <= N = n*n";
    else if (k > ROUTER_MAX_K) why = "k <= ROUTER_MAX_K (256)";
    else if (router_token_warps_per_block(n, k) < 1 || (size_t)router_backward_smem_words(n) * 4 > ROUTER_TOKEN_SMEM_BUDGET)
        why = "n, k small enough for one warp's shared memory (48 KiB) in the forward and the backward";
    else if (opt.norm != ROUTER_NORM_BN && opt.norm != ROUTER_NORM_NONE) why = "norm bn or none";
    else if (opt.gate != GATE_SOFTMAX && opt.gate != GATE_PROB) why = "gate softmax or prob";
    else if (opt.norm == ROUTER_NORM_BN && opt.training && BT < 2) why = "BT >= 2 tokens for BN statistics in training";
    if (why != NULL) {
        fprintf(stderr, "%s: bad arguments BT=%d C=%d n=%d k=%d: expected %s\n", who, BT, C, n, k, why);
        exit(EXIT_FAILURE);
    }
    if (matmul_cublas_handle == NULL) {
        fprintf(stderr, "%s: matmul_init() was not called\n", who);
        exit(EXIT_FAILURE);
    }
}

// Forward. Writes every field of out (bn_mean, bn_rstd with norm = bn only); updates
// running_mean / running_var with norm = bn in training. scratch: router_forward_scratch_bytes.
static void router_forward(RouterSaved out, float* running_mean, float* running_var,
                           const floatX* X, const floatX* Wrc, int BT, int C, RouterOptions opt,
                           void* scratch, size_t scratch_bytes, cudaStream_t stream) {
    router_check_args("router_forward", BT, C, opt);
    const int n = opt.n, k = opt.k, R = 2 * n;
    const int use_bn = opt.norm == ROUTER_NORM_BN, gate_prob = opt.gate == GATE_PROB, training = opt.training;
    if (use_bn && (scratch == NULL || scratch_bytes < router_forward_scratch_bytes(BT, n))) {
        fprintf(stderr, "router_forward: scratch of %zu bytes given, %zu needed\n", scratch_bytes,
                router_forward_scratch_bytes(BT, n));
        exit(EXIT_FAILURE);
    }
    // logits (BT, R) = X (BT, C) Wrc^T: column-major logits_cm (R x BT) = Wrc_cm^T (R x C) X_cm (C x BT)
    const float one = 1.0f, zero = 0.0f;
    cublasCheck(cublasSetStream(matmul_cublas_handle, stream));
    cublasCheck(cublasGemmEx(matmul_cublas_handle, CUBLAS_OP_T, CUBLAS_OP_N, R, BT, C, &one,
                             Wrc, CUDA_R_FLOATX, C, X, CUDA_R_FLOATX, C, &zero,
                             out.logits, CUDA_R_32F, R, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    if (use_bn) {
        const int num_chunks = router_bn_num_chunks(BT);
        float* part_mean = (float*)scratch;
        float* part_m2 = (float*)((char*)scratch + align256((size_t)num_chunks * R * sizeof(float)));
        if (training) {
            dim3 grid(num_chunks, ceil_div(R, 32));
            router_bn_partial_stats_kernel<<<grid, dim3(32, 8), 0, stream>>>(part_mean, part_m2, out.logits, BT, R);
            cudaCheckLast();
        }
        router_bn_finalize_kernel<<<ceil_div(R, 4), 128, 0, stream>>>(out.bn_mean, out.bn_rstd, running_mean,
                                                                      running_var, part_mean, part_m2, BT, R, training);
        cudaCheckLast();
    }
    const int warps = router_token_warps_per_block(n, k);
    const size_t smem = (size_t)warps * router_token_smem_words(n, k) * 4;
    auto* token_kernel = router_topk_keys_per_lane(n) == 32 ? router_token_forward_kernel<32> : router_token_forward_kernel<8>;
    token_kernel<<<ceil_div(BT, warps), warps * 32, smem, stream>>>(out.logp, out.idx, out.gate, out.logits, out.bn_mean,
                                                                    out.bn_rstd, BT, n, k, use_bn, gate_prob,
                                                                    router_token_smem_words(n, k),
                                                                    router_staircase_count(n, k));
    cudaCheckLast();
}

// Backward. dgate (BT, k): dL/dgate from experts_backward; saved: what the forward wrote, with
// the same opt (opt.training selects the BN backward: batch or running statistics).
// Accumulates dX += dlogits Wrc and dWrc += dlogits^T X. scratch: router_backward_scratch_bytes.
static void router_backward(floatX* dX, floatX* dWrc, const float* dgate, RouterSaved saved,
                            const floatX* X, const floatX* Wrc, int BT, int C, RouterOptions opt,
                            void* scratch, size_t scratch_bytes, cudaStream_t stream) {
    router_check_args("router_backward", BT, C, opt);
    if (scratch == NULL || scratch_bytes < router_backward_scratch_bytes(BT, opt.n)) {
        fprintf(stderr, "router_backward: scratch of %zu bytes given, %zu needed\n", scratch_bytes,
                router_backward_scratch_bytes(BT, opt.n));
        exit(EXIT_FAILURE);
    }
    const int n = opt.n, k = opt.k, R = 2 * n;
    const int use_bn = opt.norm == ROUTER_NORM_BN, gate_prob = opt.gate == GATE_PROB, training = opt.training;
    const int num_chunks = router_bn_num_chunks(BT);
    char* base = (char*)scratch;
    float* dlhat = (float*)base;
    base += align256((size_t)BT * R * sizeof(float));
    floatX* dlogits = (floatX*)base;
    base += align256((size_t)BT * R * sizeof(floatX));
    float* part_dy = (float*)base;
    base += align256((size_t)num_chunks * R * sizeof(float));
    float* part_dyx = (float*)base;

    // one warp per token with 2n floats of shared memory each: 4 warps a block, fewer when n is
    // large (four fit in the default 48 KiB up to n = 1536; router_check_args ensures one does)
    int warps = 4;
    while (warps > 1 && (size_t)warps * router_backward_smem_words(n) * 4 > ROUTER_TOKEN_SMEM_BUDGET) warps--;
    const size_t smem = (size_t)warps * router_backward_smem_words(n) * 4;
    router_token_backward_kernel<<<ceil_div(BT, warps), warps * 32, smem, stream>>>(dlhat, dlogits, dgate, saved.gate,
                                                                                   saved.idx, saved.logp, BT, n, k,
                                                                                   use_bn, gate_prob);
    cudaCheckLast();
    if (use_bn) {
        dim3 grid(num_chunks, ceil_div(R, 32));
        if (training) {
            router_bn_backward_partial_kernel<<<grid, dim3(32, 8), 0, stream>>>(part_dy, part_dyx, dlhat, saved.logits,
                                                                               saved.bn_mean, saved.bn_rstd, BT, R);
            cudaCheckLast();
        }
        router_bn_backward_apply_kernel<<<grid, dim3(32, 8), 0, stream>>>(dlogits, dlhat, saved.logits, saved.bn_mean,
                                                                         saved.bn_rstd, part_dy, part_dyx, BT, R,
                                                                         training);
        cudaCheckLast();
    }
    const float one = 1.0f;
    cublasCheck(cublasSetStream(matmul_cublas_handle, stream));
    // dX (BT, C) += dlogits (BT, R) Wrc (R, C): column-major dX_cm (C x BT) += Wrc_cm (C x R) dlogits_cm (R x BT)
    cublasCheck(cublasGemmEx(matmul_cublas_handle, CUBLAS_OP_N, CUBLAS_OP_N, C, BT, R, &one,
                             Wrc, CUDA_R_FLOATX, C, dlogits, CUDA_R_FLOATX, R, &one,
                             dX, CUDA_R_FLOATX, C, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    // dWrc (R, C) += dlogits^T X: column-major dWrc_cm (C x R) += X_cm (C x BT) dlogits_cm^T (BT x R)
    cublasCheck(cublasGemmEx(matmul_cublas_handle, CUBLAS_OP_N, CUBLAS_OP_T, C, R, BT, &one,
                             X, CUDA_R_FLOATX, C, dlogits, CUDA_R_FLOATX, R, &one,
                             dWrc, CUDA_R_FLOATX, C, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

#endif  // OMNIMOE_ROUTER_CUH
