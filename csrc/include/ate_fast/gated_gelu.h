// ate_fast: the flow-transformer MLP's gated GELU and its backward on the CPU, one pass
// each (ATen: gelu + mul forward, mul + gelu_backward + mul + cat backward).
//
//   forward:  out = gelu_tanh(gate)·up,  act = gelu_tanh(gate) (optional)
//   backward: d_gate = dm·up·gelu_tanh′(gate),  d_up = dm·act
//
// gelu_tanh(g) = g·σ(u), u = 2√(2/π)(g + 0.044715 g³) (the tanh form's 0.5(1 + tanh(u/2))
// is σ(u)); gelu_tanh′(g) = σ(u) + g·σ(u)(1 − σ(u))·2√(2/π)(1 + 3·0.044715 g²).
// gate and up are [rows, F] with a common row stride (the halves of the gate|up GEMM's
// output [rows, 2F]: stride 2F); out, act and dm are contiguous [rows, F]; the backward's
// out is contiguous [rows, 2F] (d_gate | d_up: the GEMM output's layout). Both take float32 or
// bfloat16 (computed in float32, each output rounded once).
// Torch-free, like every launcher here.
#pragma once

#include <cstdint>

#include "ate_fast/constants.h"  // DType

namespace ate_fast {

struct GatedGeluArgs {
  int64_t rows = 0;        // B·H
  int64_t width = 0;       // F
  int64_t row_stride = 0;  // elements between rows of gate (and of up)
  const void* gate = nullptr;
  const void* up = nullptr;
  void* out = nullptr;  // [rows, F]
  void* act = nullptr;  // [rows, F] or null: not stored
  int threads = 1;      // OpenMP threads for a large call (the caller's torch setting)
};

struct GeluGateBackwardArgs {
  int64_t rows = 0;
  int64_t width = 0;
  int64_t row_stride = 0;  // of gate and up
  const void* dm = nullptr;    // [rows, F]
  const void* gate = nullptr;
  const void* up = nullptr;
  const void* act = nullptr;   // [rows, F]: gelu_tanh(gate) as the forward stored it
  void* out = nullptr;         // [rows, 2F]
  int threads = 1;
};

}  // namespace ate_fast
