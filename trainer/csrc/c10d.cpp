// torch's c10d for Rust: TCPStore / PrefixStore rendezvous, the Gloo process group, and the
// collectives the trainer uses, on at::Tensor handles that tch owns. Everything here is torch's
// own code (libtorch_cpu exports it); the shim only adapts calls and turns exceptions into
// error strings. NCCL lives in c10d_nccl.cpp, the only unit that needs CUDA headers.
#include "c10d_shim.h"

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <optional>
#include <vector>

using std::chrono::milliseconds;

extern "C" {

char* motley_store_tcp(const char* host, int port, int is_server, int num_workers, int wait_workers,
                       int64_t timeout_ms, MotleyStore** out) {
  MOTLEY_TRY({
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(port);
    opts.isServer = is_server != 0;
    if (num_workers > 0) opts.numWorkers = static_cast<std::size_t>(num_workers);
    opts.waitWorkers = wait_workers != 0;
    opts.timeout = milliseconds(timeout_ms);
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    int bound = static_cast<int>(store->getPort());
    *out = new MotleyStore{store, bound};
  })
}

char* motley_store_prefixed(MotleyStore* base, const char* prefix, MotleyStore** out) {
  MOTLEY_TRY({
    auto store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), base->store);
    *out = new MotleyStore{store, base->port};
  })
}

// A second connection to the same store (for a thread of its own).
char* motley_store_clone(MotleyStore* s, MotleyStore** out) {
  MOTLEY_TRY({ *out = new MotleyStore{s->store->clone(), s->port}; })
}

int motley_store_port(MotleyStore* s) { return s->port; }

void motley_store_free(MotleyStore* s) { delete s; }

char* motley_store_set_timeout(MotleyStore* s, int64_t timeout_ms) {
  MOTLEY_TRY({ s->store->setTimeout(milliseconds(timeout_ms)); })
}

char* motley_store_set(MotleyStore* s, const char* key, const uint8_t* data, size_t len) {
  MOTLEY_TRY({ s->store->set(std::string(key), std::vector<uint8_t>(data, data + len)); })
}

// Blocks until `key` exists (up to the store's timeout). The bytes are malloc'd: free them
// with motley_free_bytes.
char* motley_store_get(MotleyStore* s, const char* key, uint8_t** data, size_t* len) {
  MOTLEY_TRY({
    auto v = s->store->get(std::string(key));
    *len = v.size();
    *data = static_cast<uint8_t*>(malloc(v.size() > 0 ? v.size() : 1));
    if (!v.empty()) memcpy(*data, v.data(), v.size());
  })
}

void motley_free_bytes(uint8_t* data) { free(data); }

char* motley_store_check(MotleyStore* s, const char* key, int* present) {
  MOTLEY_TRY({ *present = s->store->check({std::string(key)}) ? 1 : 0; })
}

char* motley_store_add(MotleyStore* s, const char* key, int64_t delta, int64_t* value) {
  MOTLEY_TRY({ *value = s->store->add(std::string(key), delta); })
}

// Gloo over `store`. The transport binds to `iface` (GLOO_SOCKET_IFNAME) when given, else to
// the address `hostname` resolves to, else to what torch's default resolution picks.
char* motley_group_gloo(MotleyStore* s, int rank, int size, int64_t timeout_ms, const char* iface,
                        const char* hostname, MotleyGroup** out) {
  MOTLEY_TRY({
    auto opts = c10d::ProcessGroupGloo::Options::create(milliseconds(timeout_ms));
    if (iface != nullptr && iface[0] != '\0') {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(std::string(iface)));
    } else if (hostname != nullptr && hostname[0] != '\0') {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(std::string(hostname)));
    } else {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(s->store, rank, size, opts);
    *out = new MotleyGroup{pg};
  })
}

void motley_group_free(MotleyGroup* g) { delete g; }

static c10d::ReduceOp reduce_op(int op) {
  switch (op) {
    case 1:
      return c10d::ReduceOp::AVG;
    case 2:
      return c10d::ReduceOp::MAX;
    default:
      return c10d::ReduceOp::SUM;
  }
}

// Every collective starts asynchronously and hands back its Work; wait on it with
// motley_work_wait. op: 0 sum, 1 average, 2 max.
char* motley_group_allreduce(MotleyGroup* g, const at::Tensor* t, int op, MotleyWork** work) {
  MOTLEY_TRY({
    std::vector<at::Tensor> ts{*t};
    c10d::AllreduceOptions opts;
    opts.reduceOp = reduce_op(op);
    *work = new MotleyWork{g->backend->allreduce(ts, opts)};
  })
}

char* motley_group_broadcast(MotleyGroup* g, const at::Tensor* t, int root, MotleyWork** work) {
  MOTLEY_TRY({
    std::vector<at::Tensor> ts{*t};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    *work = new MotleyWork{g->backend->broadcast(ts, opts)};
  })
}

// `output` (size × input's numel) receives every rank's `input`, rank order.
char* motley_group_allgather_into(MotleyGroup* g, const at::Tensor* output, const at::Tensor* input,
                                  MotleyWork** work) {
  MOTLEY_TRY({
    at::Tensor o = *output, i = *input;
    *work = new MotleyWork{g->backend->_allgather_base(o, i)};
  })
}

// `output` receives this rank's chunk of the reduction of every rank's `input`.
char* motley_group_reduce_scatter_into(MotleyGroup* g, const at::Tensor* output, const at::Tensor* input, int op,
                                       MotleyWork** work) {
  MOTLEY_TRY({
    at::Tensor o = *output, i = *input;
    c10d::ReduceScatterOptions opts;
    opts.reduceOp = reduce_op(op);
    *work = new MotleyWork{g->backend->_reduce_scatter_base(o, i, opts)};
  })
}

char* motley_group_barrier(MotleyGroup* g, MotleyWork** work) {
  MOTLEY_TRY({ *work = new MotleyWork{g->backend->barrier()}; })
}

// Gloo: blocks until done (its own timeout applies). NCCL: makes the current stream wait.
char* motley_work_wait(MotleyWork* w) {
  MOTLEY_TRY({ w->work->wait(); })
}

void motley_work_free(MotleyWork* w) { delete w; }

}  // extern "C"
