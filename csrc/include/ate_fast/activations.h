// Activations of the MLP encoder and their derivatives, shared by the CPU and CUDA
// kernels. The codes are in ate_fast/constants.h.
#pragma once

#include <cmath>

#include "ate_fast/constants.h"    // Activation
#include "ate_fast/guided_step.h"  // ATE_HD

namespace ate_fast {

// 1/sqrt(2) and 1/sqrt(2π), for the exact (erf) GELU.
constexpr double kInvSqrt2 = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;

template <typename C>
ATE_HD C activate(Activation act, C u) {
  switch (act) {
    case Activation::kGelu: return C(0.5) * u * (C(1) + erf(u * C(kInvSqrt2)));
    case Activation::kSilu: return u / (C(1) + exp(-u));
    case Activation::kRelu: return u < C(0) ? C(0) : u;  // NaN propagates, like torch.relu
    case Activation::kTanh: return tanh(u);
  }
  return u;
}

// d activate(u) / du, matching torch's backward formulas.
template <typename C>
ATE_HD C activate_grad(Activation act, C u) {
  switch (act) {
    case Activation::kGelu:
      return C(0.5) * (C(1) + erf(u * C(kInvSqrt2))) + u * C(kInvSqrt2Pi) * exp(C(-0.5) * u * u);
    case Activation::kSilu: {
      const C s = C(1) / (C(1) + exp(-u));
      return s * (C(1) + u * (C(1) - s));
    }
    case Activation::kRelu: return u > C(0) ? C(1) : C(0);
    case Activation::kTanh: {
      const C t = tanh(u);
      return C(1) - t * t;
    }
  }
  return C(1);
}

// activate(u) and activate_grad(u) together, GELU's sharing its erf (the same expressions
// as the two functions; the compiler may contract them differently: float32 results moved
// by ~1e-9 relative, float64 unchanged, in a test here); the others call the two functions
// (SiLU's shared exp moved a degenerate fuzz case past the float32 tolerance).
template <typename C>
ATE_HD void activate_with_grad(Activation act, C u, C& value, C& grad) {
  switch (act) {
    case Activation::kGelu: {
      const C cdf2 = C(1) + erf(u * C(kInvSqrt2));  // 2·Φ(u)
      value = C(0.5) * u * cdf2;
      grad = C(0.5) * cdf2 + u * C(kInvSqrt2Pi) * exp(C(-0.5) * u * u);
      return;
    }
    default:
      value = activate(act, u);
      grad = activate_grad(act, u);
  }
}

}  // namespace ate_fast
