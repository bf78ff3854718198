#include "cuda_status.cuh"

#include <string>

#include "ate_fast/launchers.h"

namespace ate_fast {
namespace {
thread_local std::string g_last_error;
}  // namespace

int record_cuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return kOk;
  g_last_error = std::string(what) + ": " + cudaGetErrorName(err) + " (" +
                 cudaGetErrorString(err) + ")";
  return kCudaError;
}

int sm_count(int device) {
  static int cached[64] = {0};
  if (device >= 0 && device < 64 && cached[device] > 0) return cached[device];
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0)
    n = 80;
  if (device >= 0 && device < 64) cached[device] = n;
  return n;
}

DeviceGuard::DeviceGuard(int device) {
  status_ = record_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
  if (status_ == kOk && previous_ != device) {
    status_ = record_cuda(cudaSetDevice(device), "cudaSetDevice");
    changed_ = status_ == kOk;
  }
}

DeviceGuard::~DeviceGuard() {
  if (changed_) cudaSetDevice(previous_);
}

const char* last_cuda_error() { return g_last_error.c_str(); }

int cuda_device_count() {
  int n = 0;
  if (record_cuda(cudaGetDeviceCount(&n), "cudaGetDeviceCount") != kOk) return -1;
  return n;
}

int cuda_runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

}  // namespace ate_fast
