// LM head and cross-entropy in row chunks, as one autograd node: per-token loss of
// `x @ wᵀ` (x: [N, D], w: [V, D], both in the compute dtype) against `targets` (-100: no
// loss), without the full [N, V] logits ever existing — in the forward (logits of `chunk` rows
// at a time, only their log-sum-exp kept) or in the backward (each chunk's logits recomputed,
// turned into softmax − one-hot, multiplied into both gradients, dropped). At N = 32k rows and
// V = 65k that is 8.6 GB of fp32 logits (and as much again for their gradient) replaced by
// `chunk × V`. Logits and the softmax are fp32 whatever the compute dtype, as the unchunked
// path (`cross_entropy(logits.float())`) computes them.
//
// Errors come back as a malloc'd message (free with motley_free_error), never as an
// exception across the FFI.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdlib>
#include <cstring>
#include <exception>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kIgnore = -100;

struct LinearCrossEntropy : public torch::autograd::Function<LinearCrossEntropy> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, const at::Tensor& targets,
                            int64_t chunk) {
    const int64_t n = x.size(0);
    auto loss = at::zeros({n}, x.options().dtype(at::kFloat));
    auto lse = at::zeros({n}, x.options().dtype(at::kFloat));
    const auto wt = w.t();
    for (int64_t s = 0; s < n; s += chunk) {
      const int64_t c = std::min(chunk, n - s);
      const auto logits = at::mm(x.slice(0, s, s + c), wt).to(at::kFloat);
      const auto t = targets.slice(0, s, s + c);
      const auto valid = t.ne(kIgnore);
      const auto l = at::logsumexp(logits, {1});
      const auto picked = logits.gather(1, t.clamp_min(0).unsqueeze(1)).squeeze(1);
      loss.slice(0, s, s + c).copy_((l - picked) * valid);
      lse.slice(0, s, s + c).copy_(l);
    }
    ctx->save_for_backward({x, w, targets, lse});
    ctx->saved_data["chunk"] = chunk;
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const auto& w = saved[1];
    const auto& targets = saved[2];
    const auto& lse = saved[3];
    const int64_t chunk = ctx->saved_data["chunk"].toInt();
    const int64_t n = x.size(0);
    const auto g = grads[0].to(at::kFloat);
    at::Tensor gx, gw;
    if (ctx->needs_input_grad(0)) gx = at::empty_like(x, at::MemoryFormat::Contiguous);
    // The weight gradient sums over every chunk: accumulate in fp32.
    if (ctx->needs_input_grad(1)) gw = at::zeros(w.sizes(), w.options().dtype(at::kFloat));
    const auto wt = w.t();
    for (int64_t s = 0; s < n; s += chunk) {
      const int64_t c = std::min(chunk, n - s);
      const auto xc = x.slice(0, s, s + c);
      const auto t = targets.slice(0, s, s + c);
      const auto valid = t.ne(kIgnore);
      // d loss_i / d logits_i = softmax_i − onehot(target_i), times the upstream gradient.
      auto d = (at::mm(xc, wt).to(at::kFloat) - lse.slice(0, s, s + c).unsqueeze(1)).exp_();
      d.scatter_add_(1, t.clamp_min(0).unsqueeze(1), at::full({c, 1}, -1.0, d.options()));
      d.mul_((g.slice(0, s, s + c) * valid).unsqueeze(1));
      const auto dk = d.to(x.scalar_type());
      if (gx.defined()) {
        auto out = gx.slice(0, s, s + c);
        at::mm_out(out, dk, w);
      }
      if (gw.defined()) gw.add_(at::mm(dk.t(), xc).to(at::kFloat));
    }
    return {gx, gw.defined() ? gw.to(w.scalar_type()) : gw, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

extern "C" char* motley_linear_cross_entropy(const at::Tensor* x, const at::Tensor* w, const at::Tensor* targets,
                                              int64_t chunk, at::Tensor** out) {
  try {
    TORCH_CHECK(x->dim() == 2 && w->dim() == 2 && targets->dim() == 1,
                "linear_cross_entropy: x must be [N, D], w [V, D], targets [N]; got ", x->sizes(), ", ", w->sizes(),
                ", ", targets->sizes());
    TORCH_CHECK(x->size(1) == w->size(1), "linear_cross_entropy: x has ", x->size(1), " columns, w takes ",
                w->size(1));
    TORCH_CHECK(targets->size(0) == x->size(0), "linear_cross_entropy: ", targets->size(0), " targets for ",
                x->size(0), " rows");
    TORCH_CHECK(targets->scalar_type() == at::kLong, "linear_cross_entropy: targets must be int64");
    TORCH_CHECK(chunk > 0, "linear_cross_entropy: chunk must be positive, got ", chunk);
    TORCH_CHECK(x->scalar_type() == w->scalar_type() && x->device() == w->device(),
                "linear_cross_entropy: x and w differ in dtype or device");
    *out = new at::Tensor(LinearCrossEntropy::apply(*x, *w, *targets, chunk));
    return nullptr;
  } catch (const c10::Error& e) {
    return strdup(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return strdup(e.what());
  } catch (...) {
    return strdup("unknown C++ exception in linear_cross_entropy");
  }
}
