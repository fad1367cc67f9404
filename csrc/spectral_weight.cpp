// fastnote._C.spectral_weight: the spectral-norm front ends' eager step in one call from Python
// (the fastnote::spectral_power_iteration_ op, then W / sigma with its gradient as a C++ autograd
// function), and the PYBIND11_MODULE that exposes it. Separate from power_iteration.cpp because it
// is not part of the op: it is reached through pybind, not the dispatcher, and torch.compile never
// sees it (fastnote/ops/power_iteration.py traces the op plus torch ops instead).
#include <torch/extension.h>

#include <optional>
#include <vector>

#include "power_iteration.h"

namespace fastnote {
namespace {

// torch's reshape_weight_to_matrix (axis dim first, the rest flattened) and its inverse. Python
// has the same pair (as_matrix / _from_matrix in fastnote/ops/power_iteration.py) for the paths
// that do not come here: no extension, torch.compile, tensor subclasses. The two must agree, as
// the u and v buffers carry over between paths; tests/test_spectral_norm.py compares them.
// They are repeated here so that the fast path and its backward make no call back into Python.
at::Tensor as_matrix(const at::Tensor& t, int64_t dim) {
  const at::Tensor m = dim == 0 ? t : t.movedim(dim, 0);
  return m.reshape({m.size(0), -1});
}

at::Tensor from_matrix(const at::Tensor& mat, const at::Tensor& like, int64_t dim) {
  if (dim == 0) return mat.reshape(like.sizes());
  std::vector<int64_t> shape(like.sizes().begin(), like.sizes().end());
  const int64_t d = shape[dim];
  shape.erase(shape.begin() + dim);
  shape.insert(shape.begin(), d);
  return mat.reshape(shape).movedim(0, dim);
}

// weight / sigma as weight * (1 / sigma): one rounding more than a division (<= 1 ulp apart),
// and a vector division is compute-bound on CPUs (a 512 KB weight: 23 us against ~5 us).
at::Tensor scale_by_inverse(const at::Tensor& weight, const at::Tensor& sigma, const std::optional<at::Tensor>& out) {
  if (weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.dim() >= 1 && weight.is_contiguous()
      && sigma.device().is_cpu() && sigma.scalar_type() == at::kFloat
      && (!out.has_value() || (out->is_contiguous() && out->sizes() == weight.sizes()))) {
    at::Tensor o = out.has_value() ? *out : at::empty(weight.sizes(), weight.options());
    const int64_t h = weight.size(0);
    // 1 / sigma rounded to fp32 once, as sigma.reciprocal() would give it
    const float inv = 1.0f / *sigma.const_data_ptr<float>();
    scale_rows_f32(weight.const_data_ptr<float>(), o.mutable_data_ptr<float>(), h, h ? weight.numel() / h : 0, inv);
    return o;
  }
  const at::Tensor inv = sigma.reciprocal();
  if (!out.has_value()) return weight * inv;
  at::Tensor o = *out;
  return at::mul_out(o, weight, inv);
}

// weight / sigma with sigma = u . (W_mat v), u and v constants, sigma's value given (the kernel's):
// dL/dW = G / sigma - (<G, W> / sigma^2) u v^T. Under create_graph the backward recomputes sigma
// from weight with ATen ops, so the second derivative sees sigma's dependence on W.
struct DivideBySigma : public torch::autograd::Function<DivideBySigma> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& weight,
                            const at::Tensor& sigma, const at::Tensor& u, const at::Tensor& v, int64_t dim,
                            const std::optional<at::Tensor>& out) {
    ctx->save_for_backward({weight, sigma, u, v});
    ctx->saved_data["dim"] = dim;
    return scale_by_inverse(weight, sigma, out);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& weight = saved[0];
    at::Tensor sigma = saved[1];
    const at::Tensor& u = saved[2];
    const at::Tensor& v = saved[3];
    const int64_t dim = ctx->saved_data["dim"].toInt();
    const at::Tensor& grad = grads[0];
    const bool create_graph = at::GradMode::is_enabled();
    if (create_graph) sigma = at::dot(u, at::mv(as_matrix(weight, dim), v));
    const at::Tensor c = at::dot(grad.reshape({-1}), weight.reshape({-1})) / (sigma * sigma);
    at::Tensor g = as_matrix(grad, dim) / sigma;
    g = create_graph ? at::addr(g, u * -c, v) : g.addr_(u * -c, v);
    return {from_matrix(g, weight, dim), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The front ends' whole step in one call from Python: n iterations on the buffers u, v in place
// (through the registered op), then weight / sigma, differentiable w.r.t. weight (twice). `out`,
// when given, receives W / sigma (the caller's reusable buffer for large CPU weights).
at::Tensor spectral_weight(const at::Tensor& weight, at::Tensor& u, at::Tensor& v, int64_t dim,
                           int64_t n_power_iterations, double eps, bool add_rule, bool u_first,
                           const std::optional<at::Tensor>& out) {
  const at::Tensor mat = as_matrix(weight, dim);
  auto [sigma, u_c, v_c] = power_iteration_op().call(mat, u, v, n_power_iterations, eps, add_rule, u_first);
  if (at::GradMode::is_enabled() && weight.requires_grad()) {
    return DivideBySigma::apply(weight, sigma, u_c, v_c, dim, out);
  }
  return scale_by_inverse(weight, sigma, out);
}

}  // namespace
}  // namespace fastnote

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastnote C++/CUDA kernels; the ops register themselves under torch.ops.fastnote";
  m.def("spectral_weight", &fastnote::spectral_weight, pybind11::arg("weight"), pybind11::arg("u"),
        pybind11::arg("v"), pybind11::arg("dim"), pybind11::arg("n_power_iterations"), pybind11::arg("eps"),
        pybind11::arg("add_rule"), pybind11::arg("u_first"), pybind11::arg("out") = pybind11::none(),
        "n power iterations on u, v in place, then weight / sigma, differentiable w.r.t. weight");
#ifdef FASTNOTE_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
