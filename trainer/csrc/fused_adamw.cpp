// One AdamW update of lists of flat ranges by `at::_fused_adamw_` (the kernel behind
// `torch.optim.AdamW(fused=True)`): a single pass over parameters, gradients and moments.
// tch 0.24 has no binding for in-place tensor-list ops, nor a setter for a gradient, hence
// this shim. Errors come back as a malloc'd message (free with motley_free_error), never as an
// exception across the FFI.
#include <ATen/core/Tensor.h>
#include <ATen/ops/_fused_adamw.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <vector>

static std::vector<at::Tensor> list(const at::Tensor* const* ts, size_t n) {
  std::vector<at::Tensor> v;
  v.reserve(n);
  for (size_t i = 0; i < n; ++i) v.push_back(*ts[i]);
  return v;
}

extern "C" char* motley_fused_adamw(const at::Tensor* const* params, const at::Tensor* const* grads,
                                    const at::Tensor* const* exp_avgs, const at::Tensor* const* exp_avg_sqs, size_t n,
                                    const at::Tensor* step, double lr, double beta1, double beta2,
                                    double weight_decay, double eps) {
  try {
    std::vector<at::Tensor> steps(n, *step);
    at::_fused_adamw_(list(params, n), list(grads, n), list(exp_avgs, n), list(exp_avg_sqs, n), {}, steps, lr, beta1,
                      beta2, weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false);
    return nullptr;
  } catch (const std::exception& e) {
    return strdup(e.what());
  } catch (...) {
    return strdup("unknown C++ exception in at::_fused_adamw_");
  }
}

// `param.grad = grad`: backward then accumulates into `grad` in place (a view of the flat
// gradient buffer), which is what the optimizer and the gradient buckets read.
extern "C" char* motley_set_grad(const at::Tensor* param, const at::Tensor* grad) {
  try {
    at::Tensor p = *param;
    p.mutable_grad() = *grad;
    return nullptr;
  } catch (const std::exception& e) {
    return strdup(e.what());
  } catch (...) {
    return strdup("unknown C++ exception in set_grad");
  }
}

extern "C" void motley_free_error(char* message) { free(message); }
