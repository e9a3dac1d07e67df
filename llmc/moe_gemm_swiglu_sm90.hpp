// moe_gemm_swiglu_sm90.hpp - the moe experts' fch GEMM with the SwiGLU in its epilogue (C++,
// CUTLASS 4.x, sm_90a; included by llmc/moe_gemm_cutlass_kernels.hpp; docs/design.md §10.8).
//
// Contract. fch_a = W1_a x_a over problem a's pair rows (the B_ROWS token reads of
// llmc/moe_gemm_gather_sm90.hpp), W1_a (2 Ie, K) row-major with the gate rows [0, Ie) above the up
// rows [Ie, 2 Ie), Ie a multiple of 64. Two outputs:
//   fch (stored as D, column-major, ld 2 Ie): the GEMM's bf16 result with each pair row's 2 Ie values
//       interleaved in blocks of 8: position 16 b + i holds gate unit 8 b + i, position 16 b + 8 + i
//       holds up unit 8 b + i (i < 8). Its bits are those of the concatenated [gate | up] row of
//       the plain GEMM, moved (moe_ffn_dgate_dfch reads either order).
//   h (Ie per pair row, row j of problem a at h + (active_offset[a] + j) Ie): swiglu_value of the
//       rounded gate and up (llmc/swiglu_value.h), the bits of swiglu_forward over the plain fch.
//
// Why the interleave. A wgmma accumulator fragment gives each thread rows r and r + 8 of a 16-row
// band of the tile, and the epilogue visits all of a thread's accumulators of a subtile at once.
// Loading A's rows in the order above puts gate unit u and up unit u in one thread's registers, so
// the epilogue can form h without another pass over fch (which reads 2 Ie and writes Ie values a
// pair row; docs/performance.md, target 8). The interleave is only in the TMA's view of W1: its
// descriptor walks the rows as a (8, 2, Ie / 8) mode with strides (ld, Ie ld, 8 ld), so each
// k-tile is still one TMA box of the same bytes, and the smem tile is the standard swizzled layout
// of the interleaved rows. W1, its gradient and every other consumer keep the [gate; up] order.
#pragma once

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_tma_warpspecialized.hpp"

#include "moe_gemm_gather_sm90.hpp"
#include "swiglu_value.h"

// the fch GEMM's mainloop: the B_ROWS token reads, with A loaded through the interleaved view
template <class Base>
struct MoeSwigluMainloop : MoeGatherMainloop<Base, MOE_GATHER_B_ROWS> {
    using Gather = MoeGatherMainloop<Base, MOE_GATHER_B_ROWS>;
    using typename Gather::TileShape;
    using typename Gather::SmemLayoutA;
    using typename Gather::MainloopPipeline;
    using typename Gather::PipelineState;
    using typename Gather::TensorStorage;
    using typename Gather::TensorMapStorage;
    using InternalElementA = typename Base::InternalElementA;
    static constexpr int kBM = Gather::kBM;
    static_assert(kBM % 16 == 0, "MoeSwigluMainloop: whole 16-row bands (8 gate rows, 8 up rows) in a tile");

    // A's rows in the interleaved order: row m = i + 8 gu + 16 b of the view is W1 row gu Ie + 8 b + i
    using InterleavedStrideA = cute::Stride<cute::Stride<int64_t, int64_t, int64_t>, cute::_1, cute::_0>;
    CUTLASS_HOST_DEVICE static auto interleaved_shape(int M, int K) {
        return cute::make_shape(cute::make_shape(cute::_8{}, cute::_2{}, M / 16), K, 1);
    }
    static auto interleaved_a(InternalElementA const* ptr, int M, int K, int64_t ld) {
        const InterleavedStrideA stride{{ld, int64_t(M / 2) * ld, 8 * ld}, {}, {}};
        return cute::make_tensor(ptr, cute::make_layout(interleaved_shape(M, K), stride));
    }
    static auto make_tma_a(InternalElementA const* ptr, int M, int K, int64_t ld) {
        return cute::make_tma_copy(cute::SM90_TMA_LOAD{}, interleaved_a(ptr, M, K, ld),
                                   SmemLayoutA{}(cute::_, cute::_, cute::Int<0>{}),
                                   cute::make_shape(cute::get<0>(TileShape{}), cute::get<2>(TileShape{})), cute::_1{});
    }
    using TmaA = decltype(make_tma_a(nullptr, 16, 64, 64));

    // every problem has A's shape (M, K) and leading dimension: the descriptor is built once on the
    // host and only its address changes from one problem to the next
    struct Arguments : Gather::Arguments {
        int a_ld;
    };
    struct Params : Gather::Params {
        TmaA tma_load_a_interleaved;
        int a_rows;
    };

    template <class ProblemShape>
    static Params to_underlying_arguments(ProblemShape problem_shapes, Arguments const& args, void* workspace) {
        Params p;
        static_cast<typename Gather::Params&>(p) = Gather::to_underlying_arguments(problem_shapes, args, workspace);
        int M = 16, K = 64;  // (sizing the workspace: no problems yet, the descriptor is not used)
        if (problem_shapes.is_host_problem_shape_available() && problem_shapes.groups() > 0) {
            auto mnk = problem_shapes.get_host_problem_shape(0);
            M = cute::get<0>(mnk);
            K = cute::get<2>(mnk);
        }
        // (as Base: a 16-byte aligned stand-in address, replaced before the first load)
        auto first = reinterpret_cast<InternalElementA const*>(reinterpret_cast<uint64_t>(args.ptr_A) & ~uint64_t(15));
        p.tma_load_a_interleaved = make_tma_a(first, M, K, args.a_ld > 0 ? args.a_ld : K);
        p.a_rows = M;
        return p;
    }

    template <class ProblemShape>
    static bool can_implement(ProblemShape problem_shapes, Arguments const& args) {
        if (!Gather::can_implement(problem_shapes, args) || !problem_shapes.is_host_problem_shape_available()) return false;
        auto first = problem_shapes.get_host_problem_shape(0);
        for (int i = 0; i < problem_shapes.groups(); i++) {
            auto mnk = problem_shapes.get_host_problem_shape(i);
            if (cute::get<0>(mnk) != cute::get<0>(first) || cute::get<2>(mnk) != cute::get<2>(first)) return false;
        }
        return cute::get<0>(first) % kBM == 0 && args.a_ld % 8 == 0 && args.a_ld >= cute::get<2>(first);
    }

    // the load inputs: A's tiled view through the interleaved descriptor, then Gather's
    template <class ProblemShape_MNKL>
    CUTLASS_DEVICE auto load_init(ProblemShape_MNKL const& problem_shape_MNKL, Params const& params) const {
        using namespace cute;
        auto [M, N, K, L] = problem_shape_MNKL;
        Tensor mA = params.tma_load_a_interleaved.get_tma_tensor(interleaved_shape(params.a_rows, K));
        Tensor gA = local_tile(mA, TileShape{}, make_coord(_, _, _), Step<_1, Underscore, _1>{});  // (BLK_M, BLK_K, m, k, l)
        auto rest = Gather::load_init(problem_shape_MNKL, params);
        return cute::make_tuple(gA, get<1>(rest), get<2>(rest), get<3>(rest), get<4>(rest));
    }

    template <class InputTensors, class ProblemShape_MNKL>
    CUTLASS_DEVICE InputTensors tensors_perform_update(InputTensors const& in, Params const& params,
                                                       ProblemShape_MNKL problem_shape_mnkl, int32_t next_batch) {
        return Gather::tensors_perform_update(in, params, problem_shape_mnkl, next_batch);
    }

    template <class LoadInputs, class TensorMapA, class TensorMapB, class KTileIterator, class BlockCoord>
    CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                             LoadInputs const& load_inputs, cute::tuple<TensorMapA, TensorMapB> const& input_tensormaps,
                             BlockCoord const& blk_coord, KTileIterator k_tile_iter, int k_tile_count, int thread_idx,
                             uint32_t, TensorStorage& shared_tensors) {
        using namespace cute;
        auto [m_coord, n_coord, k_coord, l_coord] = blk_coord;
        Gather::load_operand(params, pipeline, smem_pipe_write, load_inputs, params.tma_load_a_interleaved,
                             get<0>(input_tensormaps), get<0>(load_inputs)(_, _, m_coord, _, l_coord),
                             make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{}), blk_coord,
                             k_tile_iter, k_tile_count, thread_idx, shared_tensors);
    }

    // the per-SM descriptors: A's from the interleaved TMA (B's is never loaded: its operand is
    // gathered); a new problem replaces A's address only (its dims and strides are every problem's)
    CUTLASS_DEVICE auto tensormaps_init(Params const& params, TensorMapStorage& shared_tensormaps, int32_t sm_count,
                                        int32_t sm_idx) {
        auto maps = Gather::tensormaps_init(params, shared_tensormaps, sm_count, sm_idx);
        if (cute::elect_one_sync()) {
            shared_tensormaps.smem_tensormap_A = *params.tma_load_a_interleaved.get_tma_descriptor();
        }
        __syncwarp();
        return maps;
    }

    template <class TensorMapA, class TensorMapB, class ProblemShape_MNKL>
    CUTLASS_DEVICE void tensormaps_perform_update(TensorMapStorage& shared_tensormaps, Params const& params,
                                                  cute::tuple<TensorMapA, TensorMapB> const&, ProblemShape_MNKL,
                                                  int32_t next_batch) {
        if (cute::elect_one_sync()) {
            cute::tma_descriptor_replace_addr_in_shared_mem(shared_tensormaps.smem_tensormap_A, params.ptr_A[next_batch]);
        }
    }
};

// The epilogue node (a root over the plain GEMM's linear combination, whose bf16 fragment it
// passes on unchanged as D): for each of the thread's gate values (row m % 16 < 8) and the up value
// 8 rows below it in the same column, h = swiglu_value(gate, up), stored to h's pair row. The
// coordinates come from the epilogue's thread-relative coordinate tensor (static, so the pairing
// of fragment elements is fixed at compile time) plus the thread's first element.
struct MoeSwigluStore {
    using ElementH = cutlass::bfloat16_t;
    struct SharedStorage {};
    struct Arguments {
        ElementH* h = nullptr;
        int Ie = 0;
        int const* active_offset = nullptr;
    };
    using Params = Arguments;

    template <class ProblemShape>
    static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) { return args; }
    template <class ProblemShape>
    static bool can_implement(ProblemShape const&, Arguments const& args) { return args.Ie > 0 && args.Ie % 8 == 0; }
    template <class ProblemShape>
    static size_t get_workspace_size(ProblemShape const&, Arguments const&) { return 0; }
    template <class ProblemShape>
    static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                               cutlass::CudaHostAdapter* = nullptr) {
        return cutlass::Status::kSuccess;
    }

    CUTLASS_HOST_DEVICE MoeSwigluStore() {}
    CUTLASS_HOST_DEVICE MoeSwigluStore(Params const& params, SharedStorage const&) : params_ptr(&params) {}
    Params const* params_ptr = nullptr;

    CUTLASS_DEVICE bool is_producer_load_needed() const { return false; }
    CUTLASS_DEVICE bool is_C_load_needed() const { return false; }
    template <class... Args>
    CUTLASS_DEVICE auto get_producer_load_callbacks(cutlass::epilogue::fusion::detail::ProducerLoadArgs<Args...> const&) {
        return cutlass::epilogue::fusion::EmptyProducerLoadCallbacks{};
    }

    template <class CoordTensor>
    struct ConsumerStoreCallbacks : cutlass::epilogue::fusion::EmptyConsumerStoreCallbacks {
        CUTLASS_DEVICE ConsumerStoreCallbacks(CoordTensor tc, int m0, int n0, int N, ElementH* h, int Ie)
            : tCcD(tc), m0(m0), n0(n0), N(N), h(h), Ie(Ie) {}
        CoordTensor tCcD;  // (R2S, R2S_M, R2S_N, EPI_M, EPI_N): offsets from the thread's first element
        int m0, n0;        // the thread's first element in the problem
        int N;             // the problem's pair rows
        ElementH* h;       // the problem's first h row
        int Ie;

        template <class ElementAccumulator, class ElementInput, int FragmentSize>
        CUTLASS_DEVICE auto visit(cutlass::Array<ElementAccumulator, FragmentSize> const&, int epi_v, int epi_m,
                                  int epi_n, cutlass::Array<ElementInput, FragmentSize> const& frg) {
            using namespace cute;
            Tensor c = tCcD(_, _, _, epi_m, epi_n);
            static_assert(decltype(size(c))::value == FragmentSize,
                          "MoeSwigluStore: one visit sees the thread's whole subtile (its gate and up rows together)");
            CUTLASS_PRAGMA_UNROLL
            for (int i = 0; i < FragmentSize; i++) {
                CUTLASS_PRAGMA_UNROLL
                for (int j = 0; j < FragmentSize; j++) {
                    if (get<0>(c(j)) == get<0>(c(i)) + 8 && get<1>(c(j)) == get<1>(c(i))) {  // (static)
                        const int m = m0 + get<0>(c(i)), n = n0 + get<1>(c(i));
                        if (m % 16 < 8 && n < N) {
                            const float v = swiglu_value(float(frg[i]), float(frg[j]));
                            h[(size_t)n * Ie + (m / 16) * 8 + m % 8] = ElementH(v);
                        }
                    }
                }
            }
            (void)epi_v;
            return frg;
        }
    };

    template <bool ReferenceSrc, class... Args>
    CUTLASS_DEVICE auto get_consumer_store_callbacks(
        cutlass::epilogue::fusion::detail::ConsumerStoreArgs<Args...> const& args) {
        auto [M, N, K, L] = args.problem_shape_mnkl;
        auto [m, n, k, l] = args.tile_coord_mnkl;
        // the thread's first element: the problem's extent less its residue
        const int m0 = int(M) - int(cute::get<0>(args.residue_tCcD));
        const int n0 = int(N) - int(cute::get<1>(args.residue_tCcD));
        ElementH* h = params_ptr->h + (size_t)params_ptr->active_offset[l] * params_ptr->Ie;
        return ConsumerStoreCallbacks<decltype(args.tCcD)>(args.tCcD, m0, n0, int(N), h, params_ptr->Ie);
    }
};
