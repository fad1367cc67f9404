// fastnote::spectral_power_iteration_ (docs/ops.md section 6.1): the op's schema, its CPU kernel and its
// Autograd-key kernel, laid out as pytorch/extension-cpp lays out an op (schema and CPU kernel
// here, the CUDA kernel in power_iteration_cuda.cu). The Python fast path built on the op,
// fastnote._C.spectral_weight, is in spectral_weight.cpp: it is a pybind function with its own
// autograd, not part of the op, and torch.compile never sees it.
//
// fastnote::spectral_power_iteration_(weight [h, w], u [h], v [w], n, eps, add_rule, u_first)
//   runs n iterations in place on u and v and returns (sigma, copy of u, copy of v).
//   v_first (torch's hook, SAGAN):   v = N(W^T u), u = N(W v)
//   u_first (torch's parametrization): u = N(W v), v = N(W^T u)
//   N(a) = a / max(||a||, eps) (torch) or a / (||a|| + eps) (SAGAN, add_rule).
//   sigma = u . (W v) for the updated u, v. After an iteration the last normalised vector is
//   t / d with t the product just formed and d its normaliser, so u . (W v) = ||t||^2 / d: no
//   third pass over W. With n == 0 sigma takes one pass (W v, then the dot with u).
// The copies of u and v are what the autograd side saves: the buffers themselves change again on
// the next call (GAN training runs D(real) and D(fake) before one backward).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "power_iteration.h"

namespace fastnote {
namespace {

// Rows (or row chunks) smaller than this many elements run on one thread: for the small
// discriminator weights the thread hand-off costs more than the arithmetic.
constexpr int64_t kGrainElems = 1 << 15;

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__) && !defined(__CUDACC__)
// One build runs on every x86-64 machine, and picks the widest vectors it has at load time.
#define FASTNOTE_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTNOTE_TARGET_CLONES
#endif

// Independent partial sums let the compiler vectorise without -ffast-math reassociation.
FASTNOTE_TARGET_CLONES float dot_f32(const float* a, const float* b, int64_t n) {
  constexpr int K = 32;
  float acc[K] = {};
  int64_t i = 0;
  for (; i + K <= n; i += K) {
    for (int k = 0; k < K; ++k) acc[k] += a[i + k] * b[i + k];
  }
  float s = 0.f;
  for (int k = 0; k < K; ++k) s += acc[k];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

FASTNOTE_TARGET_CLONES void axpy_f32(float* y, float alpha, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// Four rows at once: four memory streams in flight (a single row stream leaves bandwidth
// unused) and x, resp. y, is loaded once per four rows.
FASTNOTE_TARGET_CLONES void dot4_f32(const float* a, int64_t ld, const float* x, int64_t n, float* out) {
  constexpr int K = 16;
  const float* a0 = a;
  const float* a1 = a + ld;
  const float* a2 = a + 2 * ld;
  const float* a3 = a + 3 * ld;
  float s0[K] = {}, s1[K] = {}, s2[K] = {}, s3[K] = {};
  int64_t i = 0;
  for (; i + K <= n; i += K) {
    for (int k = 0; k < K; ++k) {
      const float xv = x[i + k];
      s0[k] += a0[i + k] * xv;
      s1[k] += a1[i + k] * xv;
      s2[k] += a2[i + k] * xv;
      s3[k] += a3[i + k] * xv;
    }
  }
  float r0 = 0.f, r1 = 0.f, r2 = 0.f, r3 = 0.f;
  for (int k = 0; k < K; ++k) {
    r0 += s0[k];
    r1 += s1[k];
    r2 += s2[k];
    r3 += s3[k];
  }
  for (; i < n; ++i) {
    r0 += a0[i] * x[i];
    r1 += a1[i] * x[i];
    r2 += a2[i] * x[i];
    r3 += a3[i] * x[i];
  }
  out[0] = r0;
  out[1] = r1;
  out[2] = r2;
  out[3] = r3;
}

FASTNOTE_TARGET_CLONES void axpy4_f32(float* y, const float* c, const float* a, int64_t ld, int64_t n) {
  const float* a0 = a;
  const float* a1 = a + ld;
  const float* a2 = a + 2 * ld;
  const float* a3 = a + 3 * ld;
  const float c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3];
  for (int64_t i = 0; i < n; ++i) y[i] += (a0[i] * c0 + a1[i] * c1) + (a2[i] * c2 + a3[i] * c3);
}


template <typename scalar_t, typename acc_t>
acc_t dot_row(const scalar_t* a, const acc_t* b, int64_t n) {
  constexpr int K = 8;
  acc_t acc[K] = {};
  int64_t i = 0;
  for (; i + K <= n; i += K) {
    for (int k = 0; k < K; ++k) acc[k] += static_cast<acc_t>(a[i + k]) * b[i + k];
  }
  acc_t s = 0;
  for (int k = 0; k < K; ++k) s += acc[k];
  for (; i < n; ++i) s += static_cast<acc_t>(a[i]) * b[i];
  return s;
}

template <>
float dot_row<float, float>(const float* a, const float* b, int64_t n) {
  return dot_f32(a, b, n);
}

template <typename scalar_t, typename acc_t>
void axpy_row(acc_t* y, acc_t alpha, const scalar_t* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * static_cast<acc_t>(x[i]);
}

template <>
void axpy_row<float, float>(float* y, float alpha, const float* x, int64_t n) {
  axpy_f32(y, alpha, x, n);
}

// Rows [begin, end) of W x into t, resp. of W^T y accumulated into acc; fp32 four rows at a time.
template <typename scalar_t, typename acc_t>
void rows_dot(const scalar_t* W, int64_t ld, int64_t w, const acc_t* x, acc_t* t, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) t[i] = dot_row<scalar_t, acc_t>(W + i * ld, x, w);
}

// Last row first: W v follows W^T u, which read each thread's rows first to last, so the rows it
// read last are still in that core's cache (measured on a 2-core Xeon, 512x4096 fp32: the
// iteration takes 204 us instead of 282). The scale pass then goes first to last again.
template <>
void rows_dot<float, float>(const float* W, int64_t ld, int64_t w, const float* x, float* t, int64_t begin,
                            int64_t end) {
  int64_t i = end;
  for (; i - 4 >= begin; i -= 4) dot4_f32(W + (i - 4) * ld, ld, x, w, t + i - 4);
  for (; i > begin; --i) t[i - 1] = dot_f32(W + (i - 1) * ld, x, w);
}

template <typename scalar_t, typename acc_t>
void rows_axpy(const scalar_t* W, int64_t ld, int64_t w, const acc_t* y, acc_t* acc, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) axpy_row<scalar_t, acc_t>(acc, y[i], W + i * ld, w);
}

template <>
void rows_axpy<float, float>(const float* W, int64_t ld, int64_t w, const float* y, float* acc, int64_t begin,
                             int64_t end) {
  int64_t i = begin;
  for (; i + 4 <= end; i += 4) axpy4_f32(acc, y + i, W + i * ld, ld, w);
  for (; i < end; ++i) axpy_f32(acc, y[i], W + i * ld, w);
}

// t = W x, parallel over rows.
template <typename scalar_t, typename acc_t>
void mat_vec(const scalar_t* W, int64_t h, int64_t w, int64_t ld, const acc_t* x, acc_t* t) {
  const int64_t grain = std::max<int64_t>(4, kGrainElems / std::max<int64_t>(w, 1));
  at::parallel_for(0, h, grain, [&](int64_t begin, int64_t end) {
    rows_dot<scalar_t, acc_t>(W, ld, w, x, t, begin, end);
  });
}

// t = W^T y: each chunk of rows accumulates its own partial t (contiguous row reads, vector
// axpy), then the partials are summed column-wise.
template <typename scalar_t, typename acc_t>
void mat_t_vec(const scalar_t* W, int64_t h, int64_t w, int64_t ld, const acc_t* y, acc_t* t,
               std::vector<acc_t>& partial) {
  std::fill(t, t + w, acc_t(0));
  const int64_t work_chunks = std::max<int64_t>(1, (h * w) / kGrainElems);
  const int64_t chunks = std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), work_chunks, h});
  if (chunks <= 1) {
    rows_axpy<scalar_t, acc_t>(W, ld, w, y, t, 0, h);
    return;
  }
  partial.assign(static_cast<size_t>((chunks - 1) * w), acc_t(0));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      acc_t* acc = c == 0 ? t : partial.data() + (c - 1) * w;
      rows_axpy<scalar_t, acc_t>(W, ld, w, y, acc, c * h / chunks, (c + 1) * h / chunks);
    }
  });
  const int64_t col_grain = std::max<int64_t>(1, kGrainElems / chunks);
  at::parallel_for(0, w, col_grain, [&](int64_t begin, int64_t end) {
    for (int64_t c = 1; c < chunks; ++c) {
      const acc_t* p = partial.data() + (c - 1) * w;
      for (int64_t j = begin; j < end; ++j) t[j] += p[j];
    }
  });
}

FASTNOTE_TARGET_CLONES void scale_f32(float* y, const float* x, float r, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * r;
}

template <typename acc_t>
acc_t sum_squares(const acc_t* t, int64_t n) {
  return dot_row<acc_t, acc_t>(t, t, n);
}

// x = t / d with d = max(||t||, eps) or ||t|| + eps (x may be t); returns ||t||^2 / d (= x . t).
template <typename acc_t>
acc_t normalise(const acc_t* t, acc_t* x, int64_t n, double eps, bool add_rule) {
  const acc_t ss = sum_squares<acc_t>(t, n);
  const acc_t nrm = std::sqrt(ss);
  const acc_t e = static_cast<acc_t>(eps);
  const acc_t d = add_rule ? nrm + e : std::max(nrm, e);
  const acc_t r = acc_t(1) / d;
  for (int64_t i = 0; i < n; ++i) x[i] = t[i] * r;
  return ss / d;
}

// The vectors the iteration works on, in acc_t: u's and v's own memory when they already are
// contiguous acc_t tensors (fp32, fp64), else copies written back by finish().
template <typename scalar_t>
struct WorkVector {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor& dst;
  std::vector<acc_t> copy;
  acc_t* data;

  explicit WorkVector(at::Tensor& t) : dst(t), data(nullptr) {
    if (std::is_same<scalar_t, acc_t>::value && t.is_contiguous()) {
      data = reinterpret_cast<acc_t*>(t.mutable_data_ptr<scalar_t>());
      return;
    }
    const at::Tensor c = t.contiguous();
    const scalar_t* p = c.const_data_ptr<scalar_t>();
    copy.resize(static_cast<size_t>(t.numel()));
    for (size_t i = 0; i < copy.size(); ++i) copy[i] = static_cast<acc_t>(p[i]);
    data = copy.data();
  }

  void finish() {
    if (copy.empty()) return;
    at::Tensor tmp = at::empty(dst.sizes(), dst.options());
    scalar_t* p = tmp.mutable_data_ptr<scalar_t>();
    for (size_t i = 0; i < copy.size(); ++i) p[i] = static_cast<scalar_t>(copy[i]);
    dst.copy_(tmp);
  }
};

// Each product is written straight into the vector it replaces (W^T u -> v, W v -> u) and
// normalised in place: no temporaries beyond the W^T u partial sums.
template <typename scalar_t>
double run_cpu(const at::Tensor& weight, at::Tensor& u, at::Tensor& v, int64_t n, double eps,
               bool add_rule, bool u_first) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t h = weight.size(0), w = weight.size(1);
  const int64_t ld = h > 1 ? weight.stride(0) : w;
  const scalar_t* W = weight.const_data_ptr<scalar_t>();
  if (n == 0) {
    const WorkVector<scalar_t> uw(u), vw(v);
    std::vector<acc_t> th(static_cast<size_t>(h));
    mat_vec<scalar_t, acc_t>(W, h, w, ld, vw.data, th.data());
    return static_cast<double>(dot_row<acc_t, acc_t>(uw.data, th.data(), h));
  }
  WorkVector<scalar_t> uw(u), vw(v);
  acc_t* ua = uw.data;
  acc_t* va = vw.data;
  std::vector<acc_t> partial;
  acc_t sigma = 0;
  for (int64_t it = 0; it < n; ++it) {
    if (u_first) {
      mat_vec<scalar_t, acc_t>(W, h, w, ld, va, ua);
      normalise<acc_t>(ua, ua, h, eps, add_rule);
      mat_t_vec<scalar_t, acc_t>(W, h, w, ld, ua, va, partial);
      sigma = normalise<acc_t>(va, va, w, eps, add_rule);
    } else {
      mat_t_vec<scalar_t, acc_t>(W, h, w, ld, ua, va, partial);
      normalise<acc_t>(va, va, w, eps, add_rule);
      mat_vec<scalar_t, acc_t>(W, h, w, ld, va, ua);
      sigma = normalise<acc_t>(ua, ua, h, eps, add_rule);
    }
  }
  uw.finish();
  vw.finish();
  return static_cast<double>(sigma);
}

// A contiguous copy of a CPU vector: for the small discriminator weights the whole call costs
// a few microseconds, and a dispatched clone() each for u and v was a third of the kernel's
// instructions (callgrind, 64x48 fp32).
at::Tensor copy_vector(const at::Tensor& t) {
  if (!t.is_contiguous()) return t.clone(at::MemoryFormat::Contiguous);
  at::Tensor c = at::empty(t.sizes(), t.options());
  std::memcpy(c.mutable_data_ptr(), t.const_data_ptr(), static_cast<size_t>(t.numel()) * t.element_size());
  return c;
}

at::Tensor scalar_like(double value, const at::Tensor& like) {
  at::Tensor s = at::empty({}, like.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "scalar_like", [&] {
    *s.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(value);
  });
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> power_iteration_cpu(
    const at::Tensor& weight, at::Tensor& u, at::Tensor& v, int64_t n_power_iterations, double eps,
    bool add_rule, bool u_first) {
  check_power_iteration_args(weight, u, v, n_power_iterations, eps);
  TORCH_CHECK(weight.device().is_cpu(), "fastnote::spectral_power_iteration_: CPU kernel got ",
              weight.device(), " tensors");
  const at::Tensor W = matrix_with_unit_column_stride(weight);
  double sigma = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "spectral_power_iteration_cpu", [&] {
    sigma = run_cpu<scalar_t>(W, u, v, n_power_iterations, eps, add_rule, u_first);
  });
  return {scalar_like(sigma, weight), copy_vector(u), copy_vector(v)};
}

// The iteration is a constant for autograd (u and v are not differentiated, docs/ops.md section 6.2): below
// autograd run the backend kernel, then bump u's and v's version counters as any in-place op
// does, so a graph that saved the buffers themselves notices the change.
std::tuple<at::Tensor, at::Tensor, at::Tensor> power_iteration_autograd(
    const at::Tensor& weight, at::Tensor& u, at::Tensor& v, int64_t n_power_iterations, double eps,
    bool add_rule, bool u_first) {
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = power_iteration_op().call(weight, u, v, n_power_iterations, eps, add_rule, u_first);
  }
  if (n_power_iterations > 0) {
    u.unsafeGetTensorImpl()->bump_version();
    v.unsafeGetTensorImpl()->bump_version();
  }
  return out;
}

}  // namespace

void check_power_iteration_args(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v,
                                int64_t n_power_iterations, double eps) {
  TORCH_CHECK(weight.dim() == 2, "fastnote::spectral_power_iteration_: weight must be 2-D, got shape ",
              weight.sizes());
  TORCH_CHECK(u.dim() == 1 && u.size(0) == weight.size(0),
              "fastnote::spectral_power_iteration_: u must have shape [", weight.size(0), "], got ", u.sizes());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == weight.size(1),
              "fastnote::spectral_power_iteration_: v must have shape [", weight.size(1), "], got ", v.sizes());
  TORCH_CHECK(u.scalar_type() == weight.scalar_type() && v.scalar_type() == weight.scalar_type(),
              "fastnote::spectral_power_iteration_: weight, u and v must share one dtype, got ",
              weight.scalar_type(), ", ", u.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(u.device() == weight.device() && v.device() == weight.device(),
              "fastnote::spectral_power_iteration_: weight, u and v must be on one device");
  TORCH_CHECK(n_power_iterations >= 0, "fastnote::spectral_power_iteration_: n_power_iterations must be >= 0, got ",
              n_power_iterations);
  TORCH_CHECK(eps >= 0, "fastnote::spectral_power_iteration_: eps must be >= 0, got ", eps);
}

at::Tensor matrix_with_unit_column_stride(const at::Tensor& weight) {
  const bool rows_ok = weight.size(0) <= 1 || weight.stride(0) >= weight.size(1);
  const bool cols_ok = weight.size(1) <= 1 || weight.stride(1) == 1;
  return rows_ok && cols_ok ? weight : weight.contiguous();
}

// Mirrors mat_vec's split (first row to last), so each thread scales the rows whose reads are
// still in its cache.
void scale_rows_f32(const float* W, float* out, int64_t h, int64_t w, float r) {
  const int64_t grain = std::max<int64_t>(4, kGrainElems / std::max<int64_t>(w, 1));
  at::parallel_for(0, h, grain, [&](int64_t begin, int64_t end) {
    scale_f32(out + begin * w, W + begin * w, r, (end - begin) * w);
  });
}

const c10::TypedOperatorHandle<PowerIterationFn>& power_iteration_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastnote::spectral_power_iteration_", "")
                             .typed<PowerIterationFn>();
  return op;
}

}  // namespace fastnote

// The Python side defines other ops in the `fastnote` namespace with torch.library.custom_op
// (Library(..., "FRAGMENT")); a fragment here coexists with those and with any later C++ op file.
// TORCH_LIBRARY(fastnote) would claim the namespace instead: a second claim fails, and during the
// extension's static initialisation that aborts the process.
TORCH_LIBRARY_FRAGMENT(fastnote, m) {
  m.def(
      "spectral_power_iteration_(Tensor weight, Tensor(a!) u, Tensor(b!) v, int n_power_iterations, "
      "float eps, bool add_rule, bool u_first) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastnote, CPU, m) {
  m.impl("spectral_power_iteration_", &fastnote::power_iteration_cpu);
}

TORCH_LIBRARY_IMPL(fastnote, Autograd, m) {
  m.impl("spectral_power_iteration_", &fastnote::power_iteration_autograd);
}
