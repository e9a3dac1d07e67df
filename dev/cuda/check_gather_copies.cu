/*
check_gather_copies.cu - the token reads of the moe layer's CUTLASS grouped GEMMs
(llmc/moe_gemm_gather_sm90.hpp) replayed on the host, without a GPU: for each of the three kinds
(B_ROWS: fch and dh; B_K: dW2; A_K: dW1), problems of random sizes (row counts and column
extents on and off the tile edges) and random schedules, the gathering warps' copies of every
k-tile of every work tile are run lane by lane, each warp's share, through the kernel's own
copy_k_tile (its shuffles answered from the lane that holds the offset) into a host buffer laid
out as the kernel's shared memory (the builder's SmemLayoutA/B, swizzle included), and then every
element of the stage is read back through the layout and checked:
  - written exactly once (a chunk that is not 16 contiguous bytes of the layout, two lanes on one
    element, or an element no lane writes, all fail here), and nothing outside the stage written;
  - equal to the gathered matrix: G(line, e) = src[sorted_pair[j] / k][column] for a pair row j
    and a column inside the problem, zero outside it (as TMA fills the ungathered operand).
What it cannot check: the pipeline (barriers, the arrival count), cp.async itself, the wgmma
reads; dev/cuda/test_moe.cu checks those on a GPU (the layer with and without token reads,
bitwise).

    make dev/cuda/check_gather_copies_bin && ./dev/cuda/check_gather_copies_bin   (needs the CUTLASS headers)
*/
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <vector>

#include "llmc/moe_gemm_cutlass_kernels.hpp"

static uint64_t g_state = 0x9E3779B97F4A7C15ull;
static uint32_t rnd(uint32_t n) {  // xorshift64*, [0, n)
    g_state ^= g_state >> 12; g_state ^= g_state << 25; g_state ^= g_state >> 27;
    return (uint32_t)((g_state * 2685821657736338717ull) >> 33) % n;
}

// one problem of kind Gather: rows pair rows, G's column extent, k pairs per token, tokens rows of
// ld in src; 0 when every k-tile of every work tile checks out
template <class Mainloop>
static int check_problem(int rows, int extent, int k, int tokens, int ld) {
    using namespace cute;
    using ML = Mainloop;
    using G = typename ML::ElementG;
    using SmemLayout = conditional_t<ML::kGatherA, typename ML::SmemLayoutA, typename ML::SmemLayoutB>;
    constexpr int kStages = size<2>(SmemLayout{});
    const size_t smem_elems = cosize(SmemLayout{});
    // the source: random 16-bit patterns, never 0 (zero is what the copies fill outside the problem)
    std::vector<uint16_t> src((size_t)tokens * ld);
    for (auto& v : src) v = (uint16_t)(1 + rnd(65535));
    // a schedule: rows pairs of the tokens * k, in random order
    std::vector<int> pairs(rows);
    for (int j = 0; j < rows; j++) pairs[j] = (int)rnd((uint32_t)tokens * k);
    // the smem stage buffer, aligned as the kernel's (the swizzle is of address bits)
    uint16_t* smem = (uint16_t*)aligned_alloc(1024, (smem_elems * 2 + 1023) / 1024 * 1024);
    std::vector<int> writes(smem_elems);
    Tensor sG = make_tensor(make_smem_ptr((G*)smem), SmemLayout{});
    const int lines_mn = ML::kGatherA ? ML::kBM : ML::kBN;  // the tile's extent along G's MN mode
    const cutlass::FastDivmod token_of_pair(k);  // as the kernel's Params hold it (checked against / below)
    // work tiles: along the rows (B_ROWS) or the extent (K modes); k-tiles: the other
    const bool b_rows = ML::kGather == MOE_GATHER_B_ROWS;
    const int K = b_rows ? extent : rows, MN = b_rows ? rows : extent;
    const int mn_tiles = (MN + lines_mn - 1) / lines_mn, k_tiles = (K + ML::kBK - 1) / ML::kBK;
    int bad = 0;
    for (int t = 0; t < mn_tiles && bad == 0; t++) {
        for (int kt = 0; kt < k_tiles && bad == 0; kt++) {
            const int stage = (t + kt) % kStages;
            memset(smem, 0xA5, smem_elems * 2);
            std::fill(writes.begin(), writes.end(), 0);
            for (int share = 0; share < ML::kGatherWarps; share++) {
                for (int lane = 0; lane < 32; lane++) {
                    auto offset = [&](int r, int from) {  // lane `from`'s register r, as the kernel fills it
                        return ML::source_offset(pairs.data(), rows, token_of_pair, ld, ML::first_offset_row(t, kt) + from + 32 * r);
                    };
                    auto copy = [&](int dst, int src_off, bool ok) {
                        const size_t e = (size_t)dst;
                        if (dst < 0 || e + 8 > smem_elems || (e % 8) != 0) { bad++; return; }  // 16-byte aligned chunks in the buffer
                        for (int i = 0; i < 8; i++) {
                            smem[e + i] = ok ? src[(size_t)src_off + i] : 0;
                            writes[e + i]++;
                        }
                    };
                    ML::copy_k_tile(sG, (G const*)smem, stage, share, lane, kt, t, extent, offset, copy);
                }
            }
            // read the stage back through the layout
            size_t in_stage = 0, written = 0;
            for (size_t e = 0; e < smem_elems; e++) written += writes[e];
            for (int a = 0; a < lines_mn; a++) {
                for (int b = 0; b < ML::kBK; b++) {
                    const size_t e = (size_t)((uint16_t*)&sG(a, b, stage) - smem);
                    in_stage++;
                    // (a, b): a is G's MN coordinate in the tile, b its K coordinate
                    const int mn = t * lines_mn + a, kk = kt * ML::kBK + b;
                    const int j = b_rows ? mn : kk, col = b_rows ? kk : mn;
                    const int want = (j < rows && col < extent)
                                         ? src[(size_t)(pairs[j] / k) * ld + col] : 0;
                    if (writes[e] != 1 || smem[e] != want) {
                        if (bad < 4) {
                            printf("  tile %d k-tile %d stage %d: G(%d, %d) written %d times, %u, want %d\n", t, kt, stage,
                                   a, b, writes[e], smem[e], want);
                        }
                        bad++;
                    }
                }
            }
            if (written != in_stage) {
                printf("  tile %d k-tile %d: %zu elements written, the stage has %zu\n", t, kt, written, in_stage);
                bad++;
            }
        }
    }
    free(smem);
    return bad;
}

template <class Kernel>
static void check_kind(const char* name, int* passed, int* failed) {
    using ML = typename Kernel::Mainloop;
    // row counts: under a tile, on its edges, several tiles with a ragged end; extents likewise
    // (multiples of 8: the layer's C and I_e are)
    const int row_counts[] = {1, 7, 31, 32, 33, 63, 64, 65, 255, 256, 257, 700, 1025};
    const int extents[] = {8, 64, 392, 512, 1024, 1032};
    int bad_cases = 0, cases = 0;
    for (int rows : row_counts) {
        for (int extent : extents) {
            const int k = 1 + (int)rnd(8), tokens = rows + (int)rnd(300), ld = extent + 8 * (int)rnd(3);
            cases++;
            const int bad = check_problem<ML>(rows, extent, k, tokens, ld);
            if (bad) {
                printf("FAIL %s: rows %d extent %d k %d tokens %d ld %d: %d bad elements\n", name, rows, extent, k, tokens,
                       ld, bad);
                bad_cases++;
            }
        }
    }
    if (bad_cases == 0) {
        printf("PASS %s: %d problems (tile %dx%dx%d, %d lines of %d chunks, %d passes a k-tile, %d warps)\n", name, cases,
               ML::kBM, ML::kBN, ML::kBK, ML::kLines, ML::kChunks, ML::kPasses, ML::kGatherWarps);
        (*passed)++;
    } else {
        (*failed)++;
    }
}

int main() {
    int passed = 0, failed = 0;
    // the kernel's sorted_pair / k (cutlass::FastDivmod) against division, over pair indices far
    // past the problems below (2^28: a million tokens at k = 256)
    int div_bad = 0;
    for (int k = 1; k <= 256; k++) {
        const cutlass::FastDivmod token_of_pair(k);
        for (int i = 0; i < 4000; i++) {
            const int x = i < 1000 ? i : (int)rnd(1u << 28);
            div_bad += token_of_pair.div(x) != x / k;
        }
    }
    printf("%s token_of_pair: FastDivmod == division for k = 1..256 (%d wrong)\n", div_bad ? "FAIL" : "PASS", div_bad);
    div_bad ? failed++ : passed++;
    check_kind<KernelTNGatherB>("B_ROWS (fch = W1 x, TN)", &passed, &failed);
    check_kind<KernelNNGatherB>("B_ROWS (dh = W2^T dy, NN)", &passed, &failed);
    check_kind<KernelNTGatherB>("B_K (dW2 += (g h) dy^T, NT)", &passed, &failed);
    check_kind<KernelNTGatherA>("A_K (dW1 += x dfch^T, NT)", &passed, &failed);
    printf("check_gather_copies: %d passed, %d failed\n", passed, failed);
    return failed != 0;
}
