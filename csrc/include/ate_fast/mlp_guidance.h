// The fused MLP-encoder latent guidance gradient (torch-free launcher API).
//
// Encoder: h_0 = mask ⊙ x (flattened to [B, F]), h_{l+1} = act(W_l h_l + b_l) for
// l < L−1, out = W_{L−1} h_{L−1} + b_{L−1} = concat(μ, log σ²) ∈ R^{2·d_z}.
// Latent: z = μ (+ exp(log σ² / 2) ⊙ ε when eps is given, the reparameterised sample).
// Target z*: `target` [B or 1, d_z], or the encoder's latent of `a0` (same ε) when a0 is
// given. Output: g = ∇_x y with y = −w·‖z − z*‖² summed per sample, i.e.
// g = mask ⊙ J_xᵀ(−2·w·(z − z*)); w (`distance_weight`) = 1/d_z for the paper's per-sample mean,
// 1/(B·d_z) for the released code's batch mean. Optionally also writes z [B, d_z].
#pragma once

#include <cstdint>

#include "ate_fast/activations.h"
#include "ate_fast/constants.h"  // kMaxMlpLayers
#include "ate_fast/guided_step.h"

namespace ate_fast {

struct MlpGuidanceArgs {
  int64_t batch = 0;
  int num_layers = 0;                     // L ≥ 1
  int64_t dims[kMaxMlpLayers + 1] = {0};  // dims[0] = F = H·D, dims[L] = 2·d_z
  const void* weights[kMaxMlpLayers] = {nullptr};  // W_l [dims[l+1], dims[l]] row-major
  const void* biases[kMaxMlpLayers] = {nullptr};   // b_l [dims[l+1]] (null = no bias)
  Activation activation = Activation::kGelu;
  const void* x = nullptr;       // [B, F]
  const void* a0 = nullptr;      // [B, F] or null
  const void* target = nullptr;  // [B or 1, d_z] or null (then a0 is required)
  int64_t target_stride = 0;     // d_z, or 0 to broadcast one target to every row
  const void* mask = nullptr;    // [B or 1, D] or null
  int64_t mask_stride = 0;       // D, or 0 to broadcast one mask to every row
  int64_t action_dim = 1;        // D: element f of a row has action dim f % D
  const void* eps = nullptr;     // [B, d_z] or null (latent = mean)
  double distance_weight = 1.0;  // w
  void* grad = nullptr;    // out: g [B, F]
  void* latent = nullptr;  // out (optional): z(x) [B, d_z]
};

}  // namespace ate_fast
