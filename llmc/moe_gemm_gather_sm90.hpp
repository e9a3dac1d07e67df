// moe_gemm_gather_sm90.hpp - the mainloop of llmc/moe_gemm_cutlass.cu's grouped GEMMs that read
// one operand's rows through the expert schedule instead of from a gathered copy (C++, CUTLASS 4.x,
// sm_90a; included by moe_gemm_cutlass.cu only; docs/design.md §10.8).
//
// Contract. The gathered operand G (A or B) of problem a is a view of a row-major matrix src
// (ld elements between rows): its pair row j (0 <= j < rows_a, the problem's MOE_DIM_ROWS
// dimension) is src row sorted_pair[active_offset[a] + j] / k. Three kinds:
//   MOE_GATHER_B_ROWS  B is K-major and its rows are G's N mode (the forward's fch = W1_e x_e,
//                      the backward's dh = W2_e^T dy_e): B(n, kk) = src[tok(n) ld + kk]
//   MOE_GATHER_B_K     B is N-major and G's rows are the K mode (dW2_e += (g h)^T dy_e):
//                      B(n, kk) = src[tok(kk) ld + n]
//   MOE_GATHER_A_K     A is M-major and G's rows are the K mode (dW1_e += x_e^T dfch_e):
//                      A(m, kk) = src[tok(kk) ld + m]
// Rows past the problem's rows and columns past its extent are loaded as zeros, as the TMA loads
// of the ungathered kernel fill them, and the k-tiles run in the same order from 0: every output
// is the same fixed-order fp32 sum of the same products, so the bits equal those of the gathered
// copy's GEMM (dev/cuda/test_moe.cu compares them with memcmp).
//
// How. The persistent ptr-array kernel of CUTLASS runs, beside its TMA producer warp, an auxiliary
// load warp when the mainloop's dispatch policy declares one (HasAuxiliaryLoad). This mainloop is
// CUTLASS's own ptr-array TMA mainloop (the builder's, unchanged smem layouts and wgmma sequence)
// with two changes: the TMA warp loads only the other operand (its transaction bytes only), and
// MOE_GATHER_WARPS warps (the auxiliary warp, and by default the TMA warp's lanes too) fill G's
// stage with 16-byte cp.async copies (zero-filled outside the problem), each warp a fixed half of
// the k-tile, then arrive on the stage's full barrier with cp.async.mbarrier.arrive.noinc: the
// barrier waits for 1 + 32 MOE_GATHER_WARPS arrivals (NumProducerThreadEvents) and the TMA bytes.
// The lanes of a warp copy whole 128-byte runs of a row together (coalesced), and the rows' source
// offsets travel between lanes by shuffles rather than each lane holding all of its rows' (the
// producer warps run with 40 registers; ptxas spills a few registers in the dW1 kernel's
// work-tile set-up, outside its copies' loop). A copy is about seven instructions (the shuffle, the bounds test, the source address,
// the cp.async with an immediate smem offset); a lane's destinations are computed once a work
// tile and a row's token by a multiply-high (cutlass::FastDivmod). One warp at about 20
// instructions a copy fed the wgmma about a third of what TMA does (docs/performance.md, target
// 8). The copies' index arithmetic is one host-device function (copy_k_tile) that
// dev/cuda/check_gather_copies.cu replays on the host against the smem layout, without a GPU.
#pragma once

#include "cutlass/cutlass.h"
#include "cutlass/arch/barrier.h"
#include "cute/tensor.hpp"
#include "cutlass/gemm/dispatch_policy.hpp"

#include "moe_gemm_cutlass.h"  // MOE_GATHER_*

#ifndef MOE_GATHER_WARPS
#define MOE_GATHER_WARPS 2
#endif

// a distinct dispatch policy (the kernel picks its schedule from BasePolicy::Schedule) that turns
// on the kernel's auxiliary load warp
template <class BasePolicy, int Gather>
struct MoeGatherPolicy : BasePolicy {};

namespace cutlass::gemm::kernel::detail {
template <class BasePolicy, int Gather>
struct HasAuxiliaryLoad<MoeGatherPolicy<BasePolicy, Gather>> : cute::true_type {};
}  // namespace cutlass::gemm::kernel::detail

// one 16-byte copy global -> shared; bytes 0 fills the 16 bytes with zeros and reads nothing
__device__ __forceinline__ void moe_cp_async16(uint32_t smem_addr, const void* gmem, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr), "l"(gmem), "r"(bytes) : "memory");
}

template <class Base, int Gather>
struct MoeGatherMainloop : Base {
    static_assert(Gather == MOE_GATHER_B_ROWS || Gather == MOE_GATHER_B_K || Gather == MOE_GATHER_A_K,
                  "MoeGatherMainloop: an unknown gather kind");
    using DispatchPolicy = MoeGatherPolicy<typename Base::DispatchPolicy, Gather>;
    using typename Base::TileShape;
    using typename Base::ElementA;
    using typename Base::ElementB;
    using typename Base::SmemLayoutA;
    using typename Base::SmemLayoutB;
    using typename Base::MainloopPipeline;
    using typename Base::PipelineState;
    using typename Base::TensorStorage;
    static_assert(cute::size(typename DispatchPolicy::ClusterShape{}) == 1,
                  "MoeGatherMainloop: a cluster of one CTA (no TMA multicast of the gathered operand)");
    static constexpr int kGather = Gather;
    static constexpr bool kGatherA = Gather == MOE_GATHER_A_K;
    using ElementG = cute::conditional_t<kGatherA, ElementA, ElementB>;
    static_assert(sizeof(ElementG) == 2, "MoeGatherMainloop: 16-bit elements (8 to a 16-byte copy)");
    static constexpr int kVec = 8;                          // elements per 16-byte copy
    static constexpr int kBM = cute::size<0>(TileShape{});  // tile M, N, K
    static constexpr int kBN = cute::size<1>(TileShape{});
    static constexpr int kBK = cute::size<2>(TileShape{});

    // the warps that gather: the auxiliary warp, and with MOE_GATHER_WARPS 2 also the TMA warp
    // (beside its one elected lane's TMA of the other operand), each a fixed half of every k-tile's
    // passes; the kernel's pipeline counts one TMA arrival and one cp.async arrival per gathering lane
    static constexpr int kGatherWarps = MOE_GATHER_WARPS;
    static_assert(kGatherWarps == 1 || kGatherWarps == 2, "MOE_GATHER_WARPS: 1 or 2");
    static constexpr int NumProducerThreadEvents = 1 + 32 * kGatherWarps;
    static constexpr uint32_t TmaTransactionBytes =
        kGatherA ? cutlass::bits_to_bytes(cute::size<0>(SmemLayoutB{}) * cute::size<1>(SmemLayoutB{}) *
                                          static_cast<uint32_t>(cute::sizeof_bits<ElementB>::value))
                 : cutlass::bits_to_bytes(cute::size<0>(SmemLayoutA{}) * cute::size<1>(SmemLayoutA{}) *
                                          static_cast<uint32_t>(cute::sizeof_bits<ElementA>::value));

    // Base's arguments (its pointers of G's operand point at src: it builds a TMA descriptor for
    // each operand that this mainloop never loads through) and the gather's
    struct Arguments : Base::Arguments {
        ElementG const* gather_src;
        int gather_ld;
        int const* sorted_pair;
        int const* active_offset;
        int pairs_per_token;  // k: sorted_pair / k is the token, src's row
    };
    struct Params : Base::Params {
        ElementG const* gather_src;
        int gather_ld;
        int const* sorted_pair;
        int const* active_offset;
        cutlass::FastDivmod token_of_pair;  // sorted_pair / k by a multiply-high and a shift
    };

    template <class ProblemShape>
    static Params to_underlying_arguments(ProblemShape problem_shapes, Arguments const& args, void* workspace) {
        Params p;
        static_cast<typename Base::Params&>(p) = Base::to_underlying_arguments(problem_shapes, args, workspace);
        p.tma_transaction_bytes = TmaTransactionBytes;
        p.gather_src = args.gather_src;
        p.gather_ld = args.gather_ld;
        p.sorted_pair = args.sorted_pair;
        p.active_offset = args.active_offset;
        p.token_of_pair = cutlass::FastDivmod(args.pairs_per_token);
        return p;
    }

    // Base's tiled TMA tensors plus the current problem: its first sorted row (active_offset of
    // its index), its rows and G's column extent (the other mode of G: K for B_ROWS, N for B_K, M
    // for A_K)
    template <class ProblemShape_MNKL>
    CUTLASS_DEVICE auto load_init(ProblemShape_MNKL const& problem_shape_MNKL, Params const& params) const {
        auto base = Base::load_init(problem_shape_MNKL, params);
        return cute::make_tuple(cute::get<0>(base), cute::get<1>(base), 0, 0, 0);
    }

    template <class InputTensors, class ProblemShape_MNKL>
    CUTLASS_DEVICE InputTensors tensors_perform_update(InputTensors const& in, Params const& params,
                                                       ProblemShape_MNKL problem_shape_mnkl, int32_t next_batch) {
        const int M = cute::get<0>(problem_shape_mnkl), N = cute::get<1>(problem_shape_mnkl),
                  K = cute::get<2>(problem_shape_mnkl);
        const int rows = Gather == MOE_GATHER_B_ROWS ? N : K;
        const int extent = Gather == MOE_GATHER_B_ROWS ? K : Gather == MOE_GATHER_B_K ? N : M;
        return cute::make_tuple(cute::get<0>(in), cute::get<1>(in), params.active_offset[next_batch], rows, extent);
    }

    // ---- the copies, written once for the device (load, load_auxiliary) and the host
    // (dev/cuda/check_gather_copies.cu replays them without a GPU and checks every smem element)
    //
    // G's pair rows j (0..rows-1 of the problem) are the tile's N rows (B_ROWS: lane l holds the
    // source offsets of the work tile's rows l + 32 r, r < kOffsetRegs, for all its k-tiles) or its
    // K rows (B_K, A_K: lane l holds those of the k-tile's rows l and l + 32). A pass copies
    // kLinesPerPass tile lines (rows of the K-major B, k-rows of the MN-major G) of kChunks 16-byte
    // chunks, one chunk a lane; the line's source offset comes from the lane that holds it.
    static constexpr int kLineElems = Gather == MOE_GATHER_B_ROWS ? kBK : (kGatherA ? kBM : kBN);
    static constexpr int kChunks = kLineElems / kVec;
    static constexpr int kLinesPerPass = 32 / kChunks;
    static constexpr int kLines = Gather == MOE_GATHER_B_ROWS ? kBN : kBK;
    static constexpr int kPasses = kLines / kLinesPerPass;
    static constexpr int kOffsetRegs = kLines / 32;
    // a warp's share of a k-tile's passes. The smem layouts' swizzle repeats every 8 lines (1024
    // bytes), so a lane's destinations repeat every kPhases passes, kStep8 elements further each
    // time: the unswizzled layout's distance of 8 lines (the host replay checks where every
    // element lands)
    static constexpr int kSharePasses = kPasses / kGatherWarps;
    static constexpr int kPhases = 8 / kLinesPerPass;
    static constexpr int flat_offset(int line, int stage) {  // the unswizzled layout's element of (line, 0, stage)
        auto flat = cute::get_nonswizzle_portion(cute::conditional_t<kGatherA, SmemLayoutA, SmemLayoutB>{});
        return Gather == MOE_GATHER_B_ROWS ? static_cast<int>(flat(line, 0, stage)) : static_cast<int>(flat(0, line, stage));
    }
    static constexpr int kStep8 = flat_offset(8, 0);
    // likewise a stage is whole swizzle periods: the destinations of stage 0 plus the stage's
    // distance (so a lane's destinations need computing once a work tile, not once a k-tile)
    static constexpr int kStageStride = flat_offset(0, 1);
    static_assert(kChunks * kLinesPerPass == 32 && kLines % 32 == 0 && kLineElems % kVec == 0,
                  "MoeGatherMainloop: a tile line of whole 16-byte chunks, 32 chunks a pass, 32 lines per offset register");
    static_assert(kPasses % kGatherWarps == 0 && kLinesPerPass <= 8 && kLines >= 16,
                  "MoeGatherMainloop: whole shares of passes, whole swizzle periods of 8 lines");

    // src's element offset of pair row j (-1: past the problem's rows), in two steps the kernel
    // runs apart (the schedule's entry is loaded a k-tile before it is used)
    CUTLASS_HOST_DEVICE static int schedule_entry(const int* pairs, int rows, int j) { return j < rows ? pairs[j] : -1; }
    CUTLASS_HOST_DEVICE static int entry_offset(cutlass::FastDivmod const& token_of_pair, int ld, int pair) {
        return pair >= 0 ? token_of_pair.div(pair) * ld : -1;
    }
    CUTLASS_HOST_DEVICE static int source_offset(const int* pairs, int rows, cutlass::FastDivmod const& token_of_pair,
                                                 int ld, int j) {
        return entry_offset(token_of_pair, ld, schedule_entry(pairs, rows, j));
    }
    // the first pair row of lane 0's offset register 0: the work tile's first row (B_ROWS) or the
    // k-tile's (K modes)
    CUTLASS_HOST_DEVICE static int first_offset_row(int mn_tile, int kt) {
        return Gather == MOE_GATHER_B_ROWS ? mn_tile * kBN : kt * kBK;
    }
    // share `share` of one k-tile of G into stage `stage` of sG (whose storage starts at sG_base)
    // by lane `lane`: offset(r, from_lane) is lane from_lane's offset register r; copy(dst, src_off,
    // ok) copies 16 bytes from src + src_off to element dst of sG's storage if ok, else writes 16
    // zero bytes. mn_tile: the work tile's M (A_K) or N (B modes) index; extent: G's column extent
    // (K for B_ROWS, N or M for the K modes). The destinations of the first kPhases passes are
    // computed through the layout, the rest are those plus whole 8-line blocks
    template <class SmemTensor, class Offset, class Copy>
    CUTLASS_HOST_DEVICE static void copy_k_tile(SmemTensor&& sG, ElementG const* sG_base, int stage, int share, int lane,
                                                int kt, int mn_tile, int extent, Offset&& offset, Copy&& copy) {
        const int chunk = lane % kChunks, sub = lane / kChunks;
        const int col = (Gather == MOE_GATHER_B_ROWS ? kt * kBK : mn_tile * kLineElems) + chunk * kVec;
        const bool col_ok = col < extent;
        auto dst_of = [&](int line) {  // element of stage 0 where this lane's chunk of `line` goes
            ElementG const* p = Gather == MOE_GATHER_B_ROWS ? &sG(line, chunk * kVec, 0) : &sG(chunk * kVec, line, 0);
            return static_cast<int>(p - sG_base);
        };
        const int first = share * kSharePasses;
        int dst[kPhases];
        CUTLASS_PRAGMA_UNROLL
        for (int p = 0; p < kPhases; p++) dst[p] = dst_of((first + p) * kLinesPerPass + sub) + stage * kStageStride;
        CUTLASS_PRAGMA_UNROLL
        for (int q = 0; q < kSharePasses; q++) {
            const int line = (first + q) * kLinesPerPass + sub;  // line / 32 == (first + q) / (32 / kLinesPerPass)
            const int off = offset((first + q) / (32 / kLinesPerPass), line % 32);
            copy(dst[q % kPhases] + (q / kPhases) * kStep8, off + col, col_ok && off >= 0);
        }
    }

    // the device's copy: 16 bytes from src + src_off to element dst of G's smem storage (whose
    // shared-space address is smem_base), or 16 zero bytes
    struct GatherCopier {
        uint32_t smem_base;
        ElementG const* src;
        CUTLASS_DEVICE void operator()(int dst, int src_off, bool ok) const {
            // (unsigned offsets: one wide multiply-add for the address)
            moe_cp_async16(smem_base + 2u * static_cast<uint32_t>(dst), src + (ok ? static_cast<uint32_t>(src_off) : 0u),
                           ok ? 16 : 0);
        }
    };

    // one gathering warp's loop over the work tile's k-tiles: acquire the stage, let `tma` (the TMA
    // warp: its elected lane's load of the other operand) go first, copy this warp's share, and
    // arrive on the stage's full barrier when this lane's copies land
    template <class LoadInputs, class KTileIterator, class BlockCoord, class Tma>
    CUTLASS_DEVICE void gather_k_tiles(Params const& params, MainloopPipeline& pipeline, PipelineState smem_pipe_write,
                                       LoadInputs const& load_inputs, BlockCoord const& blk_coord,
                                       KTileIterator k_tile_iter, int k_tile_count, int share, int lane,
                                       TensorStorage& shared_tensors, Tma&& tma) {
        using namespace cute;
        auto [m_coord, n_coord, k_coord, l_coord] = blk_coord;
        const int mn_tile = kGatherA ? int(m_coord) : int(n_coord);
        const int first = get<2>(load_inputs), rows = get<3>(load_inputs), extent = get<4>(load_inputs);
        const int* pairs = params.sorted_pair + first;
        const int ld = params.gather_ld;
        ElementG* base = kGatherA ? (ElementG*)shared_tensors.smem_A.data() : (ElementG*)shared_tensors.smem_B.data();
        Tensor sG = make_tensor(make_smem_ptr(base), conditional_t<kGatherA, SmemLayoutA, SmemLayoutB>{});  // (BLK_MN, BLK_K, PIPE)
        const GatherCopier copy{cast_smem_ptr_to_uint(base), params.gather_src};
        // offset registers: B_ROWS the work tile's rows, for all its k-tiles; the K modes the
        // k-tile's rows, whose schedule entries are loaded a k-tile ahead (next: the pair, or -1
        // past the rows) and turned into offsets after the copies, so no k-tile waits on the load
        auto pair_of = [&](int kt, int r) { return schedule_entry(pairs, rows, first_offset_row(mn_tile, kt) + lane + 32 * r); };
        auto offset_of = [&](int pair) { return entry_offset(params.token_of_pair, ld, pair); };
        int regs[kOffsetRegs], next[kOffsetRegs];
        CUTLASS_PRAGMA_UNROLL
        for (int r = 0; r < kOffsetRegs; r++) regs[r] = offset_of(pair_of(static_cast<int>(*k_tile_iter), r));
        CUTLASS_PRAGMA_NO_UNROLL
        for (int kt = static_cast<int>(*k_tile_iter); k_tile_count > 0; --k_tile_count, ++kt) {
            if constexpr (Gather != MOE_GATHER_B_ROWS) {
                CUTLASS_PRAGMA_UNROLL
                for (int r = 0; r < kOffsetRegs; r++) next[r] = pair_of(kt + 1, r);
            }
            pipeline.producer_acquire(smem_pipe_write);
            tma(kt, smem_pipe_write);
            copy_k_tile(sG, base, smem_pipe_write.index(), share, lane, kt, mn_tile, extent,
                        [&](int r, int from) { return __shfl_sync(0xffffffffu, regs[r], from); }, copy);
            pipeline.producer_commit(smem_pipe_write, cutlass::arch::cpasync_barrier_arrive_noinc);
            ++smem_pipe_write;
            if constexpr (Gather != MOE_GATHER_B_ROWS) {
                CUTLASS_PRAGMA_UNROLL
                for (int r = 0; r < kOffsetRegs; r++) regs[r] = offset_of(next[r]);
            }
        }
    }

    // the TMA warp: the ungathered operand's tile of each k-tile, as Base loads it (its elected
    // lane), and with two gathering warps share 0 of G's copies (all its lanes)
    template <class LoadInputs, class TensorMapA, class TensorMapB, class KTileIterator, class BlockCoord>
    CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                             LoadInputs const& load_inputs, cute::tuple<TensorMapA, TensorMapB> const& input_tensormaps,
                             BlockCoord const& blk_coord, KTileIterator k_tile_iter, int k_tile_count, int thread_idx,
                             uint32_t block_rank_in_cluster, TensorStorage& shared_tensors) {
        using namespace cute;
        auto [m_coord, n_coord, k_coord, l_coord] = blk_coord;
        const bool elected = cute::elect_one_sync();
        auto tma_k_tiles = [&](auto const& tma, auto const& tensormap, auto const& g, auto const& s) {
            auto block_tma = tma.get_slice(0);
            Tensor tg = block_tma.partition_S(g);  // (TMA, TMA_MN, TMA_K, k)
            Tensor ts = block_tma.partition_D(s);  // (TMA, TMA_MN, TMA_K, PIPE)
            auto load_one = [&](int kt, PipelineState const& state) {
                if (elected) {
                    auto* bar = pipeline.producer_get_barrier(state);
                    copy(tma.with(tensormap, *bar, uint16_t(0)), tg(_, _, _, kt), ts(_, _, _, state.index()));
                }
            };
            if constexpr (kGatherWarps == 2) {
                gather_k_tiles(params, pipeline, smem_pipe_write, load_inputs, blk_coord, k_tile_iter, k_tile_count, 0,
                               thread_idx, shared_tensors, load_one);
            } else if (elected) {
                CUTLASS_PRAGMA_NO_UNROLL
                for (int kt = static_cast<int>(*k_tile_iter); k_tile_count > 0; --k_tile_count, ++kt) {
                    pipeline.producer_acquire(smem_pipe_write);
                    load_one(kt, smem_pipe_write);
                    ++smem_pipe_write;
                }
            }
        };
        if constexpr (kGatherA) {
            tma_k_tiles(params.tma_load_b, get<1>(input_tensormaps), get<1>(load_inputs)(_, _, n_coord, _, l_coord),
                        make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{}));
        } else {
            tma_k_tiles(params.tma_load_a, get<0>(input_tensormaps), get<0>(load_inputs)(_, _, m_coord, _, l_coord),
                        make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{}));
        }
    }

    // the auxiliary warp (thread_idx = its lane): the last share of G's copies
    template <class LoadInputs, class KTileIterator, class BlockCoord>
    CUTLASS_DEVICE void load_auxiliary(Params const& params, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                                       LoadInputs const& load_inputs, BlockCoord const& blk_coord,
                                       KTileIterator k_tile_iter, int k_tile_count, int lane, uint32_t,
                                       TensorStorage& shared_tensors) {
        gather_k_tiles(params, pipeline, smem_pipe_write, load_inputs, blk_coord, k_tile_iter, k_tile_count,
                       kGatherWarps - 1, lane, shared_tensors, [](int, PipelineState const&) {});
    }
};
