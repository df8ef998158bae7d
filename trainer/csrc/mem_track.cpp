// Bytes allocated while a piece of work runs, from the allocators' own reports: the hook
// torch.profiler's `profile_memory` uses (a MemoryReportingInfoBase in the thread's debug info,
// which the CPU allocator and CUDA's caching allocator call on every allocation and free, and
// which autograd carries into its worker threads). Gives the live bytes and their peak over the
// tracked span, per device type, so the memory plan (`motley plan`) can be checked against
// what a step really holds, on CPU as on CUDA.
#include <c10/core/Allocator.h>
#include <c10/util/ThreadLocalDebugInfo.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>

namespace {

struct Tracker : public c10::MemoryReportingInfoBase {
  std::atomic<int64_t> live{0};
  std::atomic<int64_t> peak{0};

  void reportMemoryUsage(void* /*ptr*/, int64_t alloc_size, size_t /*total_allocated*/, size_t /*total_reserved*/,
                         c10::Device /*device*/) override {
    const int64_t now = live.fetch_add(alloc_size) + alloc_size;
    int64_t p = peak.load();
    while (now > p && !peak.compare_exchange_weak(p, now)) {
    }
  }

  bool memoryProfilingEnabled() const override { return true; }
};

}  // namespace

struct MotleyMemTrack {
  std::shared_ptr<Tracker> tracker;
};

extern "C" char* motley_mem_track_start(MotleyMemTrack** out) {
  try {
    auto t = std::make_shared<Tracker>();
    c10::ThreadLocalDebugInfo::_push(c10::DebugInfoKind::PROFILER_STATE, t);
    *out = new MotleyMemTrack{t};
    return nullptr;
  } catch (const std::exception& e) {
    return strdup(e.what());
  }
}

// Ends tracking (spans must nest like the calls that opened them) and reports the bytes
// allocated and not freed since the start, and their peak.
extern "C" char* motley_mem_track_stop(MotleyMemTrack* h, int64_t* live, int64_t* peak) {
  try {
    c10::ThreadLocalDebugInfo::_pop(c10::DebugInfoKind::PROFILER_STATE);
    *live = h->tracker->live.load();
    *peak = h->tracker->peak.load();
    delete h;
    return nullptr;
  } catch (const std::exception& e) {
    delete h;
    return strdup(e.what());
  }
}
