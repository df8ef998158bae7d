// The compute capability of a CUDA device, from the CUDA runtime that libtorch_cuda has
// already loaded. Looked up by name, so this file needs no CUDA headers and links no cudart:
// on a machine without CUDA the lookup fails and the caller learns "unknown".
#include <dlfcn.h>

extern "C" int motley_cuda_capability(int device, int* major, int* minor) {
  using GetAttribute = int (*)(int*, int, int);
  auto get = reinterpret_cast<GetAttribute>(dlsym(RTLD_DEFAULT, "cudaDeviceGetAttribute"));
  if (get == nullptr) return -1;
  // cudaDevAttrComputeCapabilityMajor / Minor (cuda_runtime_api.h; unchanged since CUDA 5).
  constexpr int kMajor = 75, kMinor = 76;
  if (get(major, kMajor, device) != 0 || get(minor, kMinor, device) != 0) return -2;
  return 0;
}
