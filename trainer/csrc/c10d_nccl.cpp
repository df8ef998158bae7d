// The NCCL process group (CUDA ranks). The only translation unit that includes CUDA headers:
// ProcessGroupNCCL.hpp pulls in nccl.h and ATen's CUDA headers, and its Options hold an
// ncclConfig_t by value. The headers come from the torch wheel (nvidia/cu13, nvidia/nccl) and
// two header-only PyPI wheels scripts/setup installs; the symbols from libtorch_cuda.so.
// Everything else talks to the group through c10d::Backend's CUDA-free interface.
#include "c10d_shim.h"

#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

#include <chrono>

extern "C" char* motley_group_nccl(MotleyStore* s, int rank, int size, int64_t timeout_ms, int device,
                                   MotleyGroup** out) {
  MOTLEY_TRY({
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = std::chrono::milliseconds(timeout_ms);
    auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(s->store, rank, size, opts);
    // One GPU per rank: bind it now, so the communicator is made for this device.
    pg->setBoundDeviceId(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device)));
    *out = new MotleyGroup{pg};
  })
}
