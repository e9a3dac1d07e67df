// cutlass_strides.hpp - a CUTLASS 3.x stride from a leading dimension (C++, the CUTLASS headers),
// shared by llmc/moe_gemm_cutlass.cu and llmc/matmul_gelu_cutlass.cu
#pragma once

#include "cute/tensor.hpp"

// the stride of a packed 2-D matrix: its int64 mode (between columns, or between rows) is ld, its
// unit mode 1, its batch mode 0
template <class Stride>
CUTE_HOST_DEVICE Stride cutlass_ld_stride(int64_t ld) {
    Stride s{};
    if constexpr (cute::is_same_v<cute::remove_cvref_t<decltype(cute::get<0>(s))>, int64_t>) cute::get<0>(s) = ld;
    else cute::get<1>(s) = ld;
    return s;
}
