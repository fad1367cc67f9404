// Shared between the CPU (power_iteration.cpp) and CUDA (power_iteration_cuda.cu) halves of
// fastnote::spectral_power_iteration_.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fastnote {

// TORCH_CHECKs the schema's invariants (the Python front ends raise friendlier errors first).
void check_power_iteration_args(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v,
                                int64_t n_power_iterations, double eps);

// weight itself when its columns are contiguous (row stride free), else a contiguous copy.
at::Tensor matrix_with_unit_column_stride(const at::Tensor& weight);

}  // namespace fastnote
