// Per-tower linear over rows sorted by tower, as one autograd node: rows [s_m, s_m + n_m) of
// x times w[m]ᵀ, for every tower m. Written as the sum of its parts in ATen (split x, one
// linear per tower, cat the outputs; unbind w) autograd records a split, a cat and a stack per
// call and its backward copies every activation and weight gradient once more to assemble
// them. Here each tower's matmul writes straight into its rows of one output (`mm_out`), in
// the forward and in both backward products, so the only kernels are the matmuls.
//
// Errors come back as a malloc'd message (free with motley_free_error, fused_adamw.cpp), never
// as an exception across the FFI.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <vector>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct TowerLinear : public torch::autograd::Function<TowerLinear> {
  // x: [N, in] rows grouped by tower (sizes[m] rows each, in order); w: [towers, out, in].
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            std::vector<int64_t> sizes) {
    ctx->save_for_backward({x, w});
    ctx->saved_data["sizes"] = sizes;
    auto y = at::empty({x.size(0), w.size(1)}, x.options());
    // Views are dispatched ops too (host time per call): slice rather than narrow (one level
    // less), and one transpose of w for all towers.
    const auto wt = w.transpose(1, 2);
    int64_t start = 0;
    for (size_t m = 0; m < sizes.size(); ++m) {
      const int64_t n = sizes[m];
      if (n > 0) {
        auto out = y.slice(0, start, start + n);
        at::mm_out(out, x.slice(0, start, start + n), wt.select(0, static_cast<int64_t>(m)));
      }
      start += n;
    }
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const auto& w = saved[1];
    const auto sizes = ctx->saved_data["sizes"].toIntVector();
    // mm on non-contiguous row slices would copy per tower; one copy up front instead.
    const auto g = grads[0].contiguous();
    const auto gt = g.t();
    at::Tensor gx, gw;
    if (ctx->needs_input_grad(0)) {
      gx = at::empty_like(x, at::MemoryFormat::Contiguous);
    }
    if (ctx->needs_input_grad(1)) {
      gw = at::empty_like(w, at::MemoryFormat::Contiguous);
    }
    int64_t start = 0;
    for (size_t m = 0; m < sizes.size(); ++m) {
      const int64_t n = sizes[m];
      const auto t = static_cast<int64_t>(m);
      if (gw.defined()) {
        auto gw_m = gw.select(0, t);
        if (n > 0) {
          at::mm_out(gw_m, gt.slice(1, start, start + n), x.slice(0, start, start + n));
        } else {
          gw_m.zero_();  // a tower with no rows this batch: zero gradient, as unbind's backward gives
        }
      }
      if (gx.defined() && n > 0) {
        auto gx_m = gx.slice(0, start, start + n);
        at::mm_out(gx_m, g.slice(0, start, start + n), w.select(0, t));
      }
      start += n;
    }
    return {gx, gw, at::Tensor()};
  }
};

}  // namespace

extern "C" char* motley_tower_linear(const at::Tensor* x, const at::Tensor* w, const int64_t* sizes,
                                     size_t n_sizes, at::Tensor** out) {
  try {
    std::vector<int64_t> s(sizes, sizes + n_sizes);
    int64_t rows = 0;
    for (auto n : s) {
      TORCH_CHECK(n >= 0, "tower_linear: negative tower size ", n);
      rows += n;
    }
    TORCH_CHECK(x->dim() == 2 && w->dim() == 3, "tower_linear: x must be [N, in] and w [towers, out, in], got ",
                x->sizes(), " and ", w->sizes());
    TORCH_CHECK(w->size(0) == static_cast<int64_t>(s.size()), "tower_linear: ", s.size(), " tower sizes for ",
                w->size(0), " towers");
    TORCH_CHECK(rows == x->size(0), "tower_linear: tower sizes add up to ", rows, ", x has ", x->size(0), " rows");
    TORCH_CHECK(x->size(1) == w->size(2), "tower_linear: x has ", x->size(1), " columns, w takes ", w->size(2));
    TORCH_CHECK(x->scalar_type() == w->scalar_type() && x->device() == w->device(),
                "tower_linear: x and w differ in dtype or device");
    *out = new at::Tensor(TowerLinear::apply(*x, *w, s));
    return nullptr;
  } catch (const std::exception& e) {
    return strdup(e.what());
  } catch (...) {
    return strdup("unknown C++ exception in tower_linear");
  }
}
