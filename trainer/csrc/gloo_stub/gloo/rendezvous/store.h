// Stand-in for gloo/rendezvous/store.h (see ../README.md): the virtual interface torch's
// inline `ProcessGroupGloo::GlooStore` overrides. GLOO_STORE_HAS_STORE_V2 stays undefined,
// so the header compiles only the four overrides declared here.
#pragma once
#include <chrono>
#include <string>
#include <vector>

#include "gloo/context.h"

namespace gloo {
namespace rendezvous {
class Store {
 public:
  virtual ~Store() = default;
  virtual void set(const std::string& key, const std::vector<char>& data) = 0;
  virtual std::vector<char> get(const std::string& key) = 0;
  virtual void wait(const std::vector<std::string>& keys) = 0;
  virtual void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) = 0;
};
}  // namespace rendezvous
}  // namespace gloo
