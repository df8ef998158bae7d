// Stand-in for gloo/context.h (see ../README.md). torch's inline
// ProcessGroupGloo::setTimeout calls Context::setTimeout, so the class is declared with that
// one member (defined in libtorch_cpu; never called from the shim).
#pragma once
#include <chrono>
#include <memory>

namespace gloo {
class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};
namespace transport {
class Device;
class UnboundBuffer;
}  // namespace transport
}  // namespace gloo
