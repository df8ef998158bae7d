// Types shared by the c10d shims (c10d.cpp, c10d_nccl.cpp, grad_sync.cpp): opaque handles that
// Rust holds as raw pointers. CUDA-free, so only c10d_nccl.cpp ever sees a CUDA header.
#pragma once

#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

struct MotleyStore {
  c10::intrusive_ptr<c10d::Store> store;
  // The TCP port when this is a TCPStore (a server started on port 0 picks its own).
  int port = -1;
};

struct MotleyGroup {
  c10::intrusive_ptr<c10d::Backend> backend;
};

struct MotleyWork {
  c10::intrusive_ptr<c10d::Work> work;
};

// Errors cross the FFI as malloc'd messages (free with motley_free_error), never as exceptions.
inline char* motley_error(const std::string& what) { return strdup(what.c_str()); }

// Variadic: the body's own commas would otherwise split it into macro arguments.
#define MOTLEY_TRY(...)                                         \
  try {                                                         \
    __VA_ARGS__;                                                \
    return nullptr;                                             \
  } catch (const c10::Error& e) {                               \
    return motley_error(e.what_without_backtrace());            \
  } catch (const std::exception& e) {                           \
    return motley_error(e.what());                              \
  } catch (...) {                                               \
    return motley_error("unknown C++ exception in c10d shim"); \
  }
