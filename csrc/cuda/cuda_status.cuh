// Error recording and device queries shared by the CUDA launchers.
#pragma once

#include <cuda_runtime.h>

namespace ate_fast {

// kOk on success; otherwise keep "what: name (message)" for last_cuda_error() and
// return kCudaError.
int record_cuda(cudaError_t err, const char* what);

// Multiprocessor count of `device` (cached).
int sm_count(int device);

// Makes `device` current for the launch and restores the caller's device afterwards:
// the current device is shared with torch's runtime through the driver context.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  int status() const { return status_; }

 private:
  int previous_ = -1;
  bool changed_ = false;
  int status_ = 0;
};

}  // namespace ate_fast
