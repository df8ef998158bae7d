// torch's own profiler (Kineto, what torch.profiler drives) over a window of training steps,
// saved as the Chrome trace torch.profiler writes, and user-scope ranges (ProfilerStep#N,
// motley::optimizer, ...) that show in it as user annotations. tch 0.24 binds none of it.
#include <ATen/record_function.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include <cstring>
#include <exception>
#include <set>
#include <string>

namespace {

namespace prof = torch::profiler::impl;

prof::ProfilerConfig profiler_config() {
  // Shapes and FLOP estimates as torch.profiler(record_shapes=True, with_flops=True) records.
  return prof::ProfilerConfig(prof::ProfilerState::KINETO, /*report_input_shapes=*/true,
                              /*profile_memory=*/false, /*with_stack=*/false, /*with_flops=*/true);
}

std::set<prof::ActivityType> activities(int cuda) {
  std::set<prof::ActivityType> a = {prof::ActivityType::CPU};
  if (cuda) a.insert(prof::ActivityType::CUDA);
  return a;
}

template <typename F>
char* guarded(const char* what, F f) {
  try {
    f();
    return nullptr;
  } catch (const std::exception& e) {
    return strdup(e.what());
  } catch (...) {
    return strdup(what);
  }
}

}  // namespace

// Warms the profiler up (CUPTI's start-up on CUDA) outside the window it records. Returns an
// error message (free with motley_free_error) or null.
extern "C" char* motley_profiler_prepare(int cuda) {
  return guarded("unknown C++ exception in prepareProfiler",
                 [&] { torch::autograd::profiler::prepareProfiler(profiler_config(), activities(cuda)); });
}

// Starts recording this thread (and the autograd threads its backward passes use).
extern "C" char* motley_profiler_start(int cuda) {
  return guarded("unknown C++ exception in enableProfiler",
                 [&] { torch::autograd::profiler::enableProfiler(profiler_config(), activities(cuda)); });
}

// Stops recording and writes the trace to `path` (Chrome trace JSON).
extern "C" char* motley_profiler_stop(const char* path) {
  return guarded("unknown C++ exception in disableProfiler", [&] {
    auto result = torch::autograd::profiler::disableProfiler();
    if (!result) throw std::runtime_error("the profiler was not running");
    result->save(path);
  });
}

// Opens a user-scope range named `name` (copied); null when no profiler listens. Close it
// with motley_range_pop on the same thread.
extern "C" void* motley_range_push(const char* name) {
  try {
    auto* rf = new at::RecordFunction(at::RecordScope::USER_SCOPE);
    if (!rf->isActive()) {
      delete rf;
      return nullptr;
    }
    rf->before(std::string(name));
    return rf;
  } catch (...) {
    return nullptr;
  }
}

extern "C" void motley_range_pop(void* range) {
  try {
    delete static_cast<at::RecordFunction*>(range);
  } catch (...) {
  }
}
