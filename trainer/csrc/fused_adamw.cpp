// One AdamW update of flat parameter buffers by `at::_fused_adamw_` (the kernel behind
// `torch.optim.AdamW(fused=True)`): a single pass over parameters, gradients and moments.
// tch 0.24 has no binding for in-place tensor-list ops, hence this shim. Errors come back as
// a malloc'd message (free with motley_free_error), never as an exception across the FFI.
#include <ATen/core/Tensor.h>
#include <ATen/ops/_fused_adamw.h>

#include <cstdlib>
#include <cstring>
#include <exception>

extern "C" char* motley_fused_adamw(const at::Tensor* param, const at::Tensor* grad, const at::Tensor* exp_avg,
                                    const at::Tensor* exp_avg_sq, const at::Tensor* step, double lr, double beta1,
                                    double beta2, double weight_decay, double eps) {
  try {
    at::_fused_adamw_({*param}, {*grad}, {*exp_avg}, {*exp_avg_sq}, {}, {*step}, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false);
    return nullptr;
  } catch (const std::exception& e) {
    return strdup(e.what());
  } catch (...) {
    return strdup("unknown C++ exception in at::_fused_adamw_");
  }
}

extern "C" void motley_free_error(char* message) { free(message); }
