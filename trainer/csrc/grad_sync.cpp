// Gradient reduction overlapped with backward, the way torch DDP's Reducer does it: a hook
// after each parameter's gradient accumulation counts the parameter ready; when every
// parameter of a bucket (a slice of the flat gradient buffer) is ready, that bucket's
// collective starts while backward goes on. Buckets start strictly in index order, so every
// rank issues the same collectives in the same order even when gradients arrive in another
// order; buckets whose parameters got no gradient start at `finish`. Only an armed round
// (the last micro-batch of an optimizer step) communicates, as DDP's no_sync does.
//
// A bucket either all-reduces in place (plain data parallel) or reduce-scatters into this
// rank's shard buffer (ZeRO). Hooks run on autograd's threads; the state is behind a mutex.
#include "c10d_shim.h"

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/utils/lambda_post_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <memory>
#include <mutex>
#include <vector>

namespace {

struct Bucket {
  at::Tensor grad;   // the bucket's slice of the flat gradient buffer
  at::Tensor shard;  // reduce-scatter output (this rank's chunk); undefined: all-reduce
  int64_t params = 0;
};

struct State {
  std::mutex mu;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::vector<Bucket> buckets;
  std::vector<int64_t> bucket_of;  // per parameter
  std::vector<char> ready;         // per parameter, this round
  std::vector<int64_t> pending;    // per bucket, this round
  size_t next = 0;                 // first bucket not started
  bool armed = false;
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  std::string error;
  int64_t started_in_backward = 0;
  int64_t started_at_finish = 0;

  void start(size_t b) {
    try {
      Bucket& k = buckets[b];
      if (k.shard.defined()) {
        c10d::ReduceScatterOptions opts;
        opts.reduceOp = c10d::ReduceOp::SUM;
        works.push_back(backend->_reduce_scatter_base(k.shard, k.grad, opts));
      } else {
        std::vector<at::Tensor> ts{k.grad};
        c10d::AllreduceOptions opts;
        opts.reduceOp = c10d::ReduceOp::SUM;
        works.push_back(backend->allreduce(ts, opts));
      }
    } catch (const c10::Error& e) {
      if (error.empty()) error = e.what_without_backtrace();
    } catch (const std::exception& e) {
      if (error.empty()) error = e.what();
    }
  }

  void mark_ready(size_t param) {
    std::lock_guard<std::mutex> lock(mu);
    if (!armed || ready[param]) return;
    ready[param] = 1;
    pending[bucket_of[param]] -= 1;
    while (next < buckets.size() && pending[next] == 0) {
      start(next++);
      started_in_backward += 1;
    }
  }
};

}  // namespace

struct MotleyGradSync {
  std::shared_ptr<State> state;
  // The accumulators are kept alive (a leaf holds its own only weakly) so the hooks stay.
  std::vector<std::pair<std::shared_ptr<torch::autograd::Node>, uintptr_t>> hooks;
};

extern "C" {

// `params[i]` belongs to bucket `bucket_of[i]`; `grads[b]` is bucket b's slice of the flat
// gradient buffer, `shards[b]` (may be null) its reduce-scatter output.
char* motley_grad_sync_new(MotleyGroup* g, const at::Tensor* const* params, const int64_t* bucket_of,
                           size_t n_params, const at::Tensor* const* grads, const at::Tensor* const* shards,
                           size_t n_buckets, MotleyGradSync** out) {
  MOTLEY_TRY({
    auto state = std::make_shared<State>();
    state->backend = g->backend;
    state->buckets.resize(n_buckets);
    for (size_t b = 0; b < n_buckets; ++b) {
      state->buckets[b].grad = *grads[b];
      if (shards != nullptr && shards[b] != nullptr) state->buckets[b].shard = *shards[b];
    }
    state->bucket_of.assign(bucket_of, bucket_of + n_params);
    for (size_t i = 0; i < n_params; ++i) {
      TORCH_CHECK(bucket_of[i] >= 0 && static_cast<size_t>(bucket_of[i]) < n_buckets, "parameter ", i,
                  " names bucket ", bucket_of[i], " of ", n_buckets);
      state->buckets[bucket_of[i]].params += 1;
    }
    state->ready.assign(n_params, 0);
    state->pending.assign(n_buckets, 0);
    auto sync = std::make_unique<MotleyGradSync>();
    sync->state = state;
    std::weak_ptr<State> weak = state;
    for (size_t i = 0; i < n_params; ++i) {
      const at::Tensor& p = *params[i];
      TORCH_CHECK(p.requires_grad() && p.is_leaf(), "parameter ", i, " is not a leaf that requires grad");
      auto acc = torch::autograd::impl::grad_accumulator(p);
      auto key = acc->add_post_hook(std::make_unique<torch::autograd::utils::LambdaPostHook>(
          [weak, i](const torch::autograd::variable_list& outputs, const torch::autograd::variable_list&) {
            if (auto s = weak.lock()) s->mark_ready(i);
            return outputs;
          }));
      sync->hooks.emplace_back(acc, key);
    }
    *out = sync.release();
  })
}

// Starts a communicating round: the next backward's gradients are reduced as they complete.
void motley_grad_sync_arm(MotleyGradSync* sync) {
  State& s = *sync->state;
  std::lock_guard<std::mutex> lock(s.mu);
  std::fill(s.ready.begin(), s.ready.end(), 0);
  for (size_t b = 0; b < s.buckets.size(); ++b) s.pending[b] = s.buckets[b].params;
  s.next = 0;
  s.works.clear();
  s.error.clear();
  s.armed = true;
}

// Starts every bucket not yet started (in order), waits for all, and ends the round. Bucket
// counts of this round go to the out-parameters.
char* motley_grad_sync_finish(MotleyGradSync* sync, int64_t* in_backward, int64_t* at_finish) {
  State& s = *sync->state;
  std::lock_guard<std::mutex> lock(s.mu);
  s.armed = false;
  int64_t before = static_cast<int64_t>(s.next);
  while (s.next < s.buckets.size()) s.start(s.next++);
  *in_backward = before;
  *at_finish = static_cast<int64_t>(s.buckets.size()) - before;
  std::string error = s.error;
  for (auto& w : s.works) {
    try {
      w->wait();
    } catch (const c10::Error& e) {
      if (error.empty()) error = e.what_without_backtrace();
    } catch (const std::exception& e) {
      if (error.empty()) error = e.what();
    }
  }
  s.works.clear();
  s.error.clear();
  if (!error.empty()) return motley_error(error);
  return nullptr;
}

void motley_grad_sync_free(MotleyGradSync* sync) {
  for (auto& [acc, key] : sync->hooks) acc->del_post_hook(key);
  delete sync;
}

}  // extern "C"
