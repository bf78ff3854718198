// Torch-free launchers: raw pointers, sizes and (for CUDA) a stream handle.
#pragma once

#include "ate_fast/attention_softmax.h"
#include "ate_fast/block_norm_rotary.h"
#include "ate_fast/gated_gelu.h"
#include "ate_fast/guided_step.h"
#include "ate_fast/mlp_guidance.h"

namespace ate_fast {

// CPU: float32 and float64 (dtype must be kFloat32 or kFloat64). OpenMP over rows.
int guided_step_cpu(DType dtype, const GuidedStepArgs& args);

// CPU: fused MLP-encoder guidance gradient (see mlp_guidance.h); float32, float64, and
// bfloat16 storage computed in float32.
int mlp_guidance_cpu(DType dtype, const MlpGuidanceArgs& args);

// CPU: the flow-transformer MLP's gated GELU (tanh form) and its backward (see
// gated_gelu.h); float32 or bfloat16 (computed in float32; kBadDType otherwise).
int gated_gelu_cpu(DType dtype, const GatedGeluArgs& args);
int gelu_gate_backward_cpu(DType dtype, const GeluGateBackwardArgs& args);

// CPU: the flow-transformer block's RMSNorm and rotary q/k/v epilogue and their input-VJPs
// (see block_norm_rotary.h); float32 or bfloat16 (computed in float32; kBadDType otherwise).
int rms_norm_cpu(DType dtype, const RmsNormArgs& args);
int rotate_qkv_cpu(DType dtype, const RotateQkvArgs& args);
int rms_norm_vjp_cpu(DType dtype, const RmsNormVjpArgs& args);
int unrotate_pack_cpu(DType dtype, const UnrotatePackArgs& args);

// CPU: attention's softmax of the scores and its backward (see attention_softmax.h);
// float32 or bfloat16 (computed in float32; kBadDType otherwise).
int softmax_backward_cpu(DType dtype, const SoftmaxBackwardArgs& args);

// Number of OpenMP threads the CPU kernels use (1 when built without OpenMP).
int cpu_num_threads();

#if defined(ATE_FAST_WITH_CUDA)
// CUDA: float32, float64, float16, bfloat16 (compute in float32, float64 for float64).
// `stream` is a cudaStream_t passed as an opaque pointer; `device` the CUDA ordinal
// the pointers live on. Returns kCudaError with the message in last_cuda_error().
int guided_step_cuda(DType dtype, const GuidedStepArgs& args, int device, void* stream);
// CUDA: fused MLP-encoder guidance gradient, one cooperative kernel. `scratch` is device
// memory of at least mlp_guidance_scratch_elements(args) elements of the compute type
// (double for float64 data, float otherwise). `unroll`: 4 or 16, the unroll depth of the
// layers' loops (weight loads in flight per thread); anything else is kBadShape.
int mlp_guidance_cuda(DType dtype, const MlpGuidanceArgs& args, void* scratch,
                      int64_t scratch_elems, int device, void* stream, int unroll = 4);
int64_t mlp_guidance_scratch_elements(const MlpGuidanceArgs& args);
const char* last_cuda_error();
// Number of visible devices, or -1 with last_cuda_error() set (e.g. no driver).
int cuda_device_count();
int cuda_runtime_version();
#endif

}  // namespace ate_fast
