// ate_fast: the flow-transformer block's RMSNorm and rotary q/k/v epilogue on the CPU, and
// their input-VJPs, one pass each (ATen: rms_norm's composite of pow, mean, add, rsqrt and
// two products; the rotation's view, chunk, cat, product and addcmul per tensor, and the
// copies of v; the VJPs eight to twelve ops each).
//
//   rms_norm:   out[r, :] = x[r, :] · 1/√(mean(x[r, :]²) + eps) · weight   (weight optional)
//   rotate_qkv: q_out[b, kvh, t·g + j, :] = rot(q_lin[b, t, (kvh·g + j)·hd : …], t)
//               k_out[b, kvh, t, :]       = rot(kv_lin[b, t, kvh·hd : …], t)
//               v_out[b, kvh, t, :]       = kv_lin[b, t, (kv_heads + kvh)·hd : …]
//     rot(x, t) = x·cos[t] + swap_halves(x)·sin[t], the tables of models/rotary.py
//     (cos θ on both halves; −sin θ, sin θ), g = heads / kv_heads.
//   rms_norm_vjp: out[r, :] = residual[r, :] + ρ·(gw − x̂·mean(gw·x̂)),
//     ρ = 1/√(mean(x[r, :]²) + eps), x̂ = x[r, :]·ρ, gw = grad[r, :]·weight (weight optional)
//   unrotate_pack: rotate_qkv's transpose for the gradients —
//     dq_out[b, t, (kvh·g + j)·hd : …] = unrot(dq[b, kvh, t·g + j, :], t)
//     dkv_out[b, t, kvh·hd : …] = unrot(dk[b, kvh, t, :], t),
//     dkv_out[b, t, (kv_heads + kvh)·hd : …] = dv[b, kvh, t, :]
//     unrot(y, t) = y·cos[t] − swap_halves(y)·sin[t] (rotation by −θ).
// Rows are one stride apart with unit column stride; the output of rms_norm is contiguous.
// The k / v outputs may sit behind a prefix's rows in a call's buffers (their strides and
// pointers say where). Each takes float32 or bfloat16 (every tensor of a call in one dtype; bf16
// computed in float32, each output rounded once).
// Torch-free, like every launcher here.
#pragma once

#include <cstdint>

#include "ate_fast/constants.h"  // DType

namespace ate_fast {

struct RmsNormArgs {
  int64_t rows = 0;        // B·H
  int64_t width = 0;       // the normalised dim
  int64_t row_stride = 0;  // elements between rows of x
  const void* x = nullptr;
  const void* weight = nullptr;  // [width] or null: no weight
  void* out = nullptr;           // [rows, width], contiguous
  double eps = 0.0;
  int threads = 1;  // OpenMP threads for a large call (the caller's torch setting)
};

struct RotateQkvArgs {
  int64_t batch = 0;
  int64_t horizon = 0;   // H: the action tokens rotated
  int64_t heads = 0;     // query heads
  int64_t kv_heads = 0;  // key/value heads (divides heads)
  int64_t head_dim = 0;  // hd, even
  // q_lin [B, H, heads·hd] and kv_lin [B, H, 2·kv_heads·hd] (keys' heads first)
  const void* q_lin = nullptr;
  int64_t q_batch_stride = 0, q_row_stride = 0;
  const void* kv_lin = nullptr;
  int64_t kv_batch_stride = 0, kv_row_stride = 0;
  // cos, sin [H, hd] rows, row_stride hd; batch stride 0 (shared) or per sample
  const void* cos = nullptr;
  const void* sin = nullptr;
  int64_t table_batch_stride = 0;
  void* q_out = nullptr;  // [B, kv_heads, H·g, hd], contiguous
  // k_out, v_out: rows hd apart; a sample's kv head kvh starts at
  // ptr + b·batch_stride + kvh·head_stride
  void* k_out = nullptr;
  void* v_out = nullptr;
  int64_t out_batch_stride = 0, out_head_stride = 0;
  int threads = 1;
};

struct RmsNormVjpArgs {
  int64_t rows = 0;
  int64_t width = 0;
  const void* grad = nullptr;      // [rows, width], contiguous
  const void* x = nullptr;         // [rows, width], contiguous: the norm's input
  const void* weight = nullptr;    // [width] or null: grad is not multiplied by a weight
  const void* residual = nullptr;  // [rows, width], contiguous, or null: nothing added
  void* out = nullptr;             // [rows, width], contiguous
  double eps = 0.0;
  int threads = 1;
};

struct UnrotatePackArgs {
  int64_t batch = 0;
  int64_t horizon = 0;
  int64_t heads = 0;
  int64_t kv_heads = 0;
  int64_t head_dim = 0;
  const void* dq = nullptr;  // [B, kv_heads, H·g, hd], contiguous (the queries' layout)
  const void* dk = nullptr;  // [B, kv_heads, H, hd], contiguous
  const void* dv = nullptr;  // [B, kv_heads, H, hd], contiguous
  const void* cos = nullptr;  // [H, hd] rows as in RotateQkvArgs
  const void* sin = nullptr;
  int64_t table_batch_stride = 0;
  // dq_out [B, H, heads·hd] and dkv_out [B, H, 2·kv_heads·hd], rows their row stride
  // apart, a sample H rows (the two may interleave in one buffer: the fused projection's
  // [dq | dk | dv], dkv_out = dq_out + heads·hd, both strides (heads + 2·kv_heads)·hd)
  void* dq_out = nullptr;
  int64_t dq_row_stride = 0;
  void* dkv_out = nullptr;
  int64_t dkv_row_stride = 0;
  int threads = 1;
};

}  // namespace ate_fast
