// What the three translation units of fastnote::spectral_power_iteration_ share: the CPU half
// (power_iteration.cpp: schema, CPU kernel, autograd key), the CUDA half (power_iteration_cuda.cu)
// and the Python fast path built on the op (spectral_weight.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdint>
#include <tuple>

namespace fastnote {

// The op's C++ signature: (weight [h, w], u [h] in place, v [w] in place, n, eps, add_rule,
// u_first) -> (sigma, copy of u, copy of v).
using PowerIterationFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, at::Tensor&, at::Tensor&, int64_t, double, bool, bool);

// fastnote::spectral_power_iteration_ from the dispatcher, looked up once on first use (not at
// load time, when the schema may not be registered yet).
const c10::TypedOperatorHandle<PowerIterationFn>& power_iteration_op();

// TORCH_CHECKs the schema's invariants (the Python front ends raise friendlier errors first).
void check_power_iteration_args(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v,
                                int64_t n_power_iterations, double eps);

// weight itself when its columns are contiguous (row stride free), else a contiguous copy.
at::Tensor matrix_with_unit_column_stride(const at::Tensor& weight);

// out = W * r for a contiguous fp32 [h, w] matrix, rows split over threads as the CPU kernel's
// W v splits them, so each thread scales the rows still in its cache from the iteration.
void scale_rows_f32(const float* W, float* out, int64_t h, int64_t w, float r);

}  // namespace fastnote
