// Constants shared by the C++/CUDA kernels, the Triton kernels and Python.
//
// The Python mirror is ate_fast/ops/constants.py; tests/test_ops_constants.py parses this
// file and fails if the two disagree. Change a value here and there together.
#pragma once

namespace ate_fast {

// Element types the launchers accept (the `dtype` argument of every native entry point).
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };
constexpr int kNumDTypes = 4;

// Activations of the MLP encoder (the `activation` argument of mlp_guidance).
enum class Activation : int { kGelu = 0, kSilu = 1, kRelu = 2, kTanh = 3 };
constexpr int kNumActivations = 4;

// The most Linear layers the fused MLP guidance kernels take.
constexpr int kMaxMlpLayers = 16;

}  // namespace ate_fast
