// CUDA kernel of fastnote::spectral_power_iteration_ (schema and semantics: power_iteration.cpp).
//
// Two paths, both accumulating in fp32 (fp64 for double weights):
// - small weights (u, v and the products fit in shared memory, few elements): ONE launch runs
//   all n iterations in a single block;
// - larger weights: two launches per iteration, W^T u then W v. Each is a grid-wide product
//   whose last block to finish (a fence plus an atomic ticket) sums the partial results, takes
//   the norm with a block reduction and writes the normalised vector, so normalising costs no
//   extra launch.
// sigma = ||t||^2 / d from the last normalisation (see power_iteration.cpp); with n == 0 one
// launch computes u . (W v).
//
// Only CUDA runtime calls and c10's device-generic stream/guard interfaces are used here, so this
// file compiles against the CPU torch wheel's headers too (tests/test_cuda_compile.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <tuple>

#include "power_iteration.h"

namespace fastnote {
namespace {

constexpr int kThreads = 256;
constexpr int kSmallThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kSmallMaxElems = 1 << 17;   // single-block path up to 128K weight elements
constexpr size_t kSmallMaxSmem = 48 * 1024;   // no opt-in needed below 48 KiB
constexpr int kMaxSplits = 64;

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Sum over a 1-D block; every thread gets the result. scratch holds >= 32 values.
template <typename T>
__device__ T block_sum(T x, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  x = warp_sum(x);
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = threadIdx.x < nwarps ? scratch[threadIdx.x] : T(0);
  if (warp == 0) x = warp_sum(x);
  if (threadIdx.x == 0) scratch[0] = x;
  __syncthreads();
  return scratch[0];
}

template <typename acc_t>
__device__ __forceinline__ acc_t normaliser(acc_t ss, acc_t eps, bool add_rule) {
  const acc_t nrm = sqrt(ss);
  return add_rule ? nrm + eps : (nrm > eps ? nrm : eps);
}

// ---------------------------------------------------------------------------------------------
// Small weights: one block, all iterations. Shared memory holds u and v in acc_t; each product
// overwrites the vector it replaces (W^T u -> v, W v -> u), so h + w values suffice.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
__device__ void block_rows(const scalar_t* __restrict__ W, int64_t h, int64_t w, int64_t ld,
                           const acc_t* x, acc_t* y) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int64_t r = warp; r < h; r += nwarps) {
    acc_t d = 0;
    for (int64_t j = lane; j < w; j += 32) d += static_cast<acc_t>(W[r * ld + j]) * x[j];
    d = warp_sum(d);
    if (lane == 0) y[r] = d;
  }
  __syncthreads();
}

template <typename scalar_t, typename acc_t>
__device__ void block_cols(const scalar_t* __restrict__ W, int64_t h, int64_t w, int64_t ld,
                           const acc_t* y, acc_t* x) {
  for (int64_t j = threadIdx.x; j < w; j += blockDim.x) {
    acc_t s = 0;
    for (int64_t i = 0; i < h; ++i) s += static_cast<acc_t>(W[i * ld + j]) * y[i];
    x[j] = s;
  }
  __syncthreads();
}

template <typename acc_t>
__device__ acc_t block_normalise_inplace(acc_t* x, int64_t n, acc_t eps, bool add_rule, acc_t* scratch) {
  acc_t ss = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) ss += x[i] * x[i];
  ss = block_sum(ss, scratch);
  const acc_t d = normaliser(ss, eps, add_rule);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) x[i] = x[i] / d;
  __syncthreads();
  return ss / d;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kSmallThreads)
small_kernel(const scalar_t* __restrict__ W, int64_t h, int64_t w, int64_t ld, scalar_t* u, scalar_t* v,
             scalar_t* sigma_out, int64_t n, acc_t eps, bool add_rule, bool u_first) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* scratch = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* su = scratch + 32;
  acc_t* sv = su + h;
  for (int64_t i = threadIdx.x; i < h; i += blockDim.x) su[i] = static_cast<acc_t>(u[i]);
  for (int64_t j = threadIdx.x; j < w; j += blockDim.x) sv[j] = static_cast<acc_t>(v[j]);
  __syncthreads();

  acc_t sigma = 0;
  if (n == 0) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    acc_t part = 0;
    for (int64_t r = warp; r < h; r += nwarps) {
      acc_t d = 0;
      for (int64_t j = lane; j < w; j += 32) d += static_cast<acc_t>(W[r * ld + j]) * sv[j];
      d = warp_sum(d);
      part += su[r] * d;
    }
    sigma = block_sum(lane == 0 ? part : acc_t(0), scratch);
  }
  for (int64_t it = 0; it < n; ++it) {
    if (u_first) {
      block_rows(W, h, w, ld, sv, su);
      block_normalise_inplace(su, h, eps, add_rule, scratch);
      block_cols(W, h, w, ld, su, sv);
      sigma = block_normalise_inplace(sv, w, eps, add_rule, scratch);
    } else {
      block_cols(W, h, w, ld, su, sv);
      block_normalise_inplace(sv, w, eps, add_rule, scratch);
      block_rows(W, h, w, ld, sv, su);
      sigma = block_normalise_inplace(su, h, eps, add_rule, scratch);
    }
  }
  if (n > 0) {
    for (int64_t i = threadIdx.x; i < h; i += blockDim.x) u[i] = static_cast<scalar_t>(su[i]);
    for (int64_t j = threadIdx.x; j < w; j += blockDim.x) v[j] = static_cast<scalar_t>(sv[j]);
  }
  if (threadIdx.x == 0) *sigma_out = static_cast<scalar_t>(sigma);
}

// ---------------------------------------------------------------------------------------------
// Larger weights: grid-wide products, the last block normalises.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ bool last_block_to_finish(unsigned int* counter) {
  __shared__ bool is_last;
  __threadfence();  // this block's results are visible before its ticket is taken
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned int total = gridDim.x * gridDim.y;
    is_last = atomicAdd(counter, 1u) == total - 1;
  }
  __syncthreads();
  return is_last;
}

// Normalise t (n values written by the whole grid) into x_acc and x_out; returns ||t||^2 / d.
template <typename scalar_t, typename acc_t>
__device__ acc_t finish_normalise(acc_t* t, int64_t n, acc_t* x_acc, scalar_t* x_out, acc_t eps,
                                  bool add_rule, acc_t* scratch) {
  acc_t ss = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const acc_t ti = __ldcg(t + i);
    ss += ti * ti;
  }
  ss = block_sum(ss, scratch);
  const acc_t d = normaliser(ss, eps, add_rule);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const acc_t xi = __ldcg(t + i) / d;
    x_acc[i] = xi;
    x_out[i] = static_cast<scalar_t>(xi);
  }
  return ss / d;
}

// t = W x (one warp per row); the last block normalises t into y, or with dot_with set, writes
// sigma = dot_with . t instead.
template <typename scalar_t, typename acc_t, typename in_t>
__global__ void __launch_bounds__(kThreads)
rows_kernel(const scalar_t* __restrict__ W, int64_t h, int64_t w, int64_t ld, const in_t* __restrict__ x,
            acc_t* t, acc_t* y_acc, scalar_t* y_out, const scalar_t* dot_with, scalar_t* sigma_out,
            unsigned int* counter, acc_t eps, bool add_rule) {
  __shared__ acc_t scratch[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + warp; r < h;
       r += static_cast<int64_t>(gridDim.x) * kWarps) {
    acc_t d = 0;
    const scalar_t* row = W + r * ld;
    for (int64_t j = lane; j < w; j += 32) d += static_cast<acc_t>(row[j]) * static_cast<acc_t>(x[j]);
    d = warp_sum(d);
    if (lane == 0) t[r] = d;
  }
  if (!last_block_to_finish(counter)) return;
  if (dot_with != nullptr) {
    acc_t s = 0;
    for (int64_t i = threadIdx.x; i < h; i += blockDim.x) s += static_cast<acc_t>(dot_with[i]) * __ldcg(t + i);
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) *sigma_out = static_cast<scalar_t>(s);
  } else {
    const acc_t sigma = finish_normalise(t, h, y_acc, y_out, eps, add_rule, scratch);
    if (threadIdx.x == 0 && sigma_out != nullptr) *sigma_out = static_cast<scalar_t>(sigma);
  }
  if (threadIdx.x == 0) *counter = 0u;  // ready for the next launch on this stream
}

// partial[s, j] = sum over the rows of split s of W[i, j] y[i] (coalesced across j); the last
// block sums the splits into partial[0, :] and normalises it into x.
template <typename scalar_t, typename acc_t, typename in_t>
__global__ void __launch_bounds__(kThreads)
cols_kernel(const scalar_t* __restrict__ W, int64_t h, int64_t w, int64_t ld, const in_t* __restrict__ y,
            acc_t* partial, int64_t rows_per_split, acc_t* x_acc, scalar_t* x_out, scalar_t* sigma_out,
            unsigned int* counter, acc_t eps, bool add_rule) {
  __shared__ acc_t scratch[32];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t split = blockIdx.y;
  const int64_t r0 = split * rows_per_split;
  const int64_t r1 = r0 + rows_per_split < h ? r0 + rows_per_split : h;
  if (j < w) {
    acc_t s = 0;
    for (int64_t i = r0; i < r1; ++i) s += static_cast<acc_t>(W[i * ld + j]) * static_cast<acc_t>(y[i]);
    partial[split * w + j] = s;
  }
  if (!last_block_to_finish(counter)) return;
  const int64_t splits = gridDim.y;
  for (int64_t c = threadIdx.x; c < w; c += blockDim.x) {
    acc_t s = 0;
    for (int64_t k = 0; k < splits; ++k) s += __ldcg(partial + k * w + c);
    partial[c] = s;
  }
  __syncthreads();
  __threadfence_block();
  const acc_t sigma = finish_normalise(partial, w, x_acc, x_out, eps, add_rule, scratch);
  if (threadIdx.x == 0 && sigma_out != nullptr) *sigma_out = static_cast<scalar_t>(sigma);
  if (threadIdx.x == 0) *counter = 0u;
}

inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "fastnote::spectral_power_iteration_: ", what, " launch failed: ",
              cudaGetErrorString(err));
}

int sm_count(int device) {
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) {
    (void)cudaGetLastError();
    n = 80;
  }
  return n;
}

}  // namespace

// Raw-pointer launcher: everything stays on `stream`. workspace holds
// 2 * h + w + splits * w values of acc_t (see workspace_size); counter is one zeroed unsigned int.
template <typename scalar_t>
void launch_power_iteration(const scalar_t* W, int64_t h, int64_t w, int64_t ld, scalar_t* u, scalar_t* v,
                            scalar_t* sigma_out, at::opmath_type<scalar_t>* workspace, unsigned int* counter,
                            int64_t splits, int64_t n, double eps, bool add_rule, bool u_first,
                            cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t e = static_cast<acc_t>(eps);
  acc_t* u_acc = workspace;
  acc_t* v_acc = u_acc + h;
  acc_t* t_h = v_acc + w;
  acc_t* partial = t_h + h;
  const int64_t rows_per_split = (h + splits - 1) / splits;
  const dim3 cols_grid(static_cast<unsigned>((w + kThreads - 1) / kThreads), static_cast<unsigned>(splits));
  const unsigned rows_grid = static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((h + kWarps - 1) / kWarps, 65535)));

  if (n == 0) {
    rows_kernel<scalar_t, acc_t, scalar_t><<<rows_grid, kThreads, 0, stream>>>(
        W, h, w, ld, v, t_h, nullptr, nullptr, u, sigma_out, counter, e, add_rule);
    check_launch("rows_kernel");
    return;
  }
  for (int64_t it = 0; it < n; ++it) {
    const bool first = it == 0;
    const bool last = it == n - 1;
    if (u_first) {
      if (first) {
        rows_kernel<scalar_t, acc_t, scalar_t><<<rows_grid, kThreads, 0, stream>>>(
            W, h, w, ld, v, t_h, u_acc, u, nullptr, nullptr, counter, e, add_rule);
      } else {
        rows_kernel<scalar_t, acc_t, acc_t><<<rows_grid, kThreads, 0, stream>>>(
            W, h, w, ld, v_acc, t_h, u_acc, u, nullptr, nullptr, counter, e, add_rule);
      }
      check_launch("rows_kernel");
      cols_kernel<scalar_t, acc_t, acc_t><<<cols_grid, kThreads, 0, stream>>>(
          W, h, w, ld, u_acc, partial, rows_per_split, v_acc, v, last ? sigma_out : nullptr, counter, e, add_rule);
      check_launch("cols_kernel");
    } else {
      if (first) {
        cols_kernel<scalar_t, acc_t, scalar_t><<<cols_grid, kThreads, 0, stream>>>(
            W, h, w, ld, u, partial, rows_per_split, v_acc, v, nullptr, counter, e, add_rule);
      } else {
        cols_kernel<scalar_t, acc_t, acc_t><<<cols_grid, kThreads, 0, stream>>>(
            W, h, w, ld, u_acc, partial, rows_per_split, v_acc, v, nullptr, counter, e, add_rule);
      }
      check_launch("cols_kernel");
      rows_kernel<scalar_t, acc_t, acc_t><<<rows_grid, kThreads, 0, stream>>>(
          W, h, w, ld, v_acc, t_h, u_acc, u, nullptr, last ? sigma_out : nullptr, counter, e, add_rule);
      check_launch("rows_kernel");
    }
  }
}

template <typename scalar_t>
bool launch_small(const scalar_t* W, int64_t h, int64_t w, int64_t ld, scalar_t* u, scalar_t* v,
                  scalar_t* sigma_out, int64_t n, double eps, bool add_rule, bool u_first, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const size_t smem = static_cast<size_t>(32 + h + w) * sizeof(acc_t);
  if (h * w > kSmallMaxElems || smem > kSmallMaxSmem) return false;
  small_kernel<scalar_t, acc_t><<<1, kSmallThreads, smem, stream>>>(
      W, h, w, ld, u, v, sigma_out, n, static_cast<acc_t>(eps), add_rule, u_first);
  check_launch("small_kernel");
  return true;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> power_iteration_cuda(
    const at::Tensor& weight, at::Tensor& u, at::Tensor& v, int64_t n_power_iterations, double eps,
    bool add_rule, bool u_first) {
  check_power_iteration_args(weight, u, v, n_power_iterations, eps);
  TORCH_CHECK(weight.is_cuda(), "fastnote::spectral_power_iteration_: CUDA kernel got ", weight.device(), " tensors");
  const c10::DeviceGuard guard(weight.device());
  const c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  const cudaStream_t stream = static_cast<cudaStream_t>(impl.getStream(weight.device()).native_handle());

  const at::Tensor W = matrix_with_unit_column_stride(weight);
  const int64_t h = W.size(0), w = W.size(1);
  const int64_t ld = h > 1 ? W.stride(0) : w;
  at::Tensor sigma = at::empty({}, weight.options());
  // In-place on contiguous storage; a strided u or v gets a contiguous copy written back below.
  at::Tensor uc = u.is_contiguous() ? u : u.contiguous();
  at::Tensor vc = v.is_contiguous() ? v : v.contiguous();

  if (h == 0 || w == 0) {
    sigma.zero_();
    if (n_power_iterations > 0) {
      uc.zero_();
      vc.zero_();
    }
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "spectral_power_iteration_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* Wp = W.const_data_ptr<scalar_t>();
      scalar_t* up = uc.mutable_data_ptr<scalar_t>();
      scalar_t* vp = vc.mutable_data_ptr<scalar_t>();
      scalar_t* sp = sigma.mutable_data_ptr<scalar_t>();
      if (launch_small<scalar_t>(Wp, h, w, ld, up, vp, sp, n_power_iterations, eps, add_rule, u_first, stream)) return;
      const int64_t col_blocks = (w + kThreads - 1) / kThreads;
      const int64_t want = (2 * sm_count(weight.get_device()) + col_blocks - 1) / col_blocks;
      const int64_t splits = std::max<int64_t>(1, std::min<int64_t>({want, h, kMaxSplits}));
      at::Tensor workspace = at::empty({2 * h + w + splits * w}, W.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      at::Tensor counter = at::empty({1}, W.options().dtype(at::kInt));
      TORCH_CHECK(cudaMemsetAsync(counter.mutable_data_ptr(), 0, sizeof(unsigned int), stream) == cudaSuccess,
                  "fastnote::spectral_power_iteration_: cudaMemsetAsync failed");
      launch_power_iteration<scalar_t>(Wp, h, w, ld, up, vp, sp, workspace.mutable_data_ptr<acc_t>(),
                                       static_cast<unsigned int*>(counter.mutable_data_ptr()), splits,
                                       n_power_iterations, eps, add_rule, u_first, stream);
    });
  }
  if (n_power_iterations > 0) {
    if (!uc.is_same(u)) u.copy_(uc);
    if (!vc.is_same(v)) v.copy_(vc);
  }
  return {sigma, u.clone(), v.clone()};
}

}  // namespace fastnote

TORCH_LIBRARY_IMPL(fastnote, CUDA, m) {
  m.impl("spectral_power_iteration_", &fastnote::power_iteration_cuda);
}
