// Activation checkpointing of one block, as torch.utils.checkpoint does it (the reentrant
// form): the forward runs the block without recording a graph, so none of its activations are
// kept; one autograd node takes the block's place, holding only its input. In backward that
// node runs the block's forward again with the graph on, from a detached copy of the input,
// and back-propagates through it (a nested backward): the block's parameters receive their
// gradients as they would have, and the node returns the input's gradient. The forward is
// Rust code (the model), reached through a callback the node owns; the block draws no random
// numbers, so the recomputation is exact.
//
// The callback is told which run it is (`phase`), so a block whose weights are sharded over
// ranks (ZeRO-3, trainer/src/fsdp.rs) can gather them before each run, free them after the
// graph-free one, and reduce its gradients once the backward through the recomputation is done.
//
// Errors come back as a malloc'd message (free with motley_free_error), never as an
// exception across the FFI.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <stdexcept>
#include <string>

// The block's forward, `x -> y`, as a Rust closure: `call` returns a malloc'd error or null and
// hands over a new heap tensor; `drop` frees the closure once the node that needs it is gone.
// Phases: 0 the forward without a graph, 1 the recomputation in backward (a graph follows),
// 2 after the backward through that recomputation (`x` and `out` null).
enum { PHASE_FORWARD = 0, PHASE_RECOMPUTE = 1, PHASE_BACKWARD_DONE = 2 };
typedef char* (*motley_block_call)(void* data, int phase, const at::Tensor* x, at::Tensor** out);
typedef void (*motley_block_drop)(void* data);

namespace {

struct Closure {
  void* data;
  motley_block_call call;
  motley_block_drop drop;
  Closure(void* d, motley_block_call c, motley_block_drop r) : data(d), call(c), drop(r) {}
  Closure(const Closure&) = delete;
  Closure& operator=(const Closure&) = delete;
  ~Closure() { drop(data); }

  static void check(char* err) {
    if (err != nullptr) {
      std::string msg(err);
      free(err);
      throw std::runtime_error("checkpointed block: " + msg);
    }
  }

  at::Tensor run(const at::Tensor& x, int phase) const {
    at::Tensor* out = nullptr;
    check(call(data, phase, &x, &out));
    at::Tensor y = *out;
    delete out;
    return y;
  }

  void backward_done() const { check(call(data, PHASE_BACKWARD_DONE, nullptr, nullptr)); }
};

struct CheckpointBackward : public torch::autograd::Node {
  std::shared_ptr<Closure> block;
  at::Tensor input;  // detached: the data only, no reference back into the graph

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    if (!grads[0].defined()) return {at::Tensor()};
    auto x = input.detach().requires_grad_(true);
    at::Tensor y;
    {
      at::AutoGradMode enable(true);
      y = block->run(x, PHASE_RECOMPUTE);
    }
    torch::autograd::backward({y}, {grads[0]});
    y.reset();
    block->backward_done();
    return {x.grad()};
  }

  std::string name() const override { return "motley::CheckpointBackward"; }

  void release_variables() override { input.reset(); }
};

}  // namespace

extern "C" char* motley_checkpoint(const at::Tensor* x, void* data, motley_block_call call, motley_block_drop drop,
                                   at::Tensor** out) {
  // The closure is ours from here on, whatever happens.
  auto block = std::make_shared<Closure>(data, call, drop);
  try {
    at::Tensor y;
    {
      at::NoGradGuard no_grad;
      y = block->run(*x, PHASE_FORWARD);
    }
    if (x->requires_grad() && at::GradMode::is_enabled()) {
      auto node = std::shared_ptr<CheckpointBackward>(new CheckpointBackward(), torch::autograd::deleteNode);
      node->block = block;
      node->input = x->detach();
      node->set_next_edges(torch::autograd::collect_next_edges(*x));
      torch::autograd::set_history(y, node);
    }
    *out = new at::Tensor(y);
    return nullptr;
  } catch (const c10::Error& e) {
    return strdup(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return strdup(e.what());
  } catch (...) {
    return strdup("unknown C++ exception in checkpoint");
  }
}
