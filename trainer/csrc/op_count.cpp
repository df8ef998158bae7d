// Counts the ATen operators libtorch dispatches (forward and autograd alike) through a
// thread-local RecordFunction callback, the hook torch.profiler uses. The autograd engine
// carries the caller's thread-local state into its worker threads, so backward ops on CUDA's
// device threads are counted too, while ops of unrelated threads are not. Each dispatched op costs host time and,
// on CUDA, usually a kernel launch, so the count is a device-independent measure of how
// launch-bound a step is. tch 0.24 binds no profiler, hence this shim.
#include <ATen/record_function.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace {

std::mutex g_mutex;
// Per name: [dispatched, work-doing leaves] (a leaf is no view and dispatched nothing but
// views while it ran: a kernel, not a composite such as linear or matmul).
std::map<std::string, std::pair<uint64_t, uint64_t>> g_by_name;
bool g_active = false;
at::CallbackHandle g_handle = 0;
// Per thread: for each operator running, whether it dispatched a work-doing one.
thread_local std::vector<bool> t_had_child;

// Operators that only make views, allocate or read metadata: no kernel runs for them, and an
// operator that dispatches only these (mm resolving conjugation, say) still counts as a leaf.
bool is_view(const char* name) {
  static const std::set<std::string> views = {
      "aten::_reshape_alias", "aten::alias",     "aten::as_strided",   "aten::detach",
      "aten::empty",          "aten::empty_strided", "aten::expand",   "aten::lift_fresh",
      "aten::narrow",         "aten::permute",   "aten::resolve_conj", "aten::resolve_neg",
      "aten::select",         "aten::slice",     "aten::squeeze",      "aten::t",
      "aten::transpose",      "aten::unsqueeze", "aten::view",         "aten::unbind",
      "aten::split",          "aten::split_with_sizes", "aten::reshape", "aten::contiguous",
      "aten::_unsafe_view",   "aten::empty_like", "aten::numpy_T",     "aten::flatten",
      "aten::expand_as",      "aten::view_as",    "detach",
  };
  return views.count(name) != 0;
}

std::unique_ptr<at::ObserverContext> on_start(const at::RecordFunction& fn) {
  if (!t_had_child.empty() && !is_view(fn.name())) t_had_child.back() = true;
  t_had_child.push_back(false);
  std::lock_guard<std::mutex> lock(g_mutex);
  g_by_name[fn.name()].first += 1;
  return nullptr;
}

void on_end(const at::RecordFunction& fn, at::ObserverContext*) {
  if (t_had_child.empty()) return;  // started before counting did
  bool leaf = !t_had_child.back() && !is_view(fn.name());
  t_had_child.pop_back();
  if (!leaf) return;
  std::lock_guard<std::mutex> lock(g_mutex);
  g_by_name[fn.name()].second += 1;
}

}  // namespace

// Starts counting from zero. Returns an error message (free with motley_free_error) or null.
extern "C" char* motley_op_count_start() {
  try {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (g_active) return strdup("op counting is already running");
    g_by_name.clear();
    t_had_child.clear();
    // FUNCTION scope only: autograd nodes (BACKWARD_FUNCTION) dispatch their own ops, which
    // are counted as ops; counting the node too would count the backward twice.
    g_handle = at::addThreadLocalCallback(at::RecordFunctionCallback(on_start, on_end).scopes({at::RecordScope::FUNCTION}));
    g_active = true;
    return nullptr;
  } catch (const std::exception& e) {
    return strdup(e.what());
  } catch (...) {
    return strdup("unknown C++ exception in at::addThreadLocalCallback");
  }
}

// Stops counting (a no-op if it was not running).
extern "C" void motley_op_count_stop() {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (!g_active) return;
  at::removeCallback(g_handle);
  g_active = false;
}

// The per-name counts of the last run as "name\tdispatched\tleaves\n" lines (free with
// motley_free_error).
extern "C" char* motley_op_count_names() {
  std::lock_guard<std::mutex> lock(g_mutex);
  std::string out;
  for (const auto& [name, n] : g_by_name) {
    out += name;
    out += '\t';
    out += std::to_string(n.first);
    out += '\t';
    out += std::to_string(n.second);
    out += '\n';
  }
  return strdup(out.c_str());
}
