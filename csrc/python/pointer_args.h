// Shared by the two pybind11 modules: turn Python integers (data_ptr() values, 0 for
// an absent tensor) into the launcher's argument struct. The Python side has already
// checked shapes, dtypes, devices and contiguity; this layer checks only what would
// crash the process.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "ate_fast/constants.h"
#include "ate_fast/guided_step.h"
#include "ate_fast/mlp_guidance.h"

namespace ate_fast {

inline const void* as_ptr(uintptr_t value) { return reinterpret_cast<const void*>(value); }

inline GuidedStepArgs make_guided_step_args(int64_t batch, int64_t row, uintptr_t out,
                                            uintptr_t x, uintptr_t m, uintptr_t g,
                                            uintptr_t m_prev, uintptr_t z, uintptr_t a,
                                            uintptr_t b, uintptr_t c, uintptr_t d,
                                            uintptr_t s, double scale, double clamp) {
  GuidedStepArgs p;
  p.batch = batch;
  p.row = row;
  p.out = reinterpret_cast<void*>(out);
  p.x = as_ptr(x);
  p.m = as_ptr(m);
  p.g = as_ptr(g);
  p.m_prev = as_ptr(m_prev);
  p.z = as_ptr(z);
  p.a = as_ptr(a);
  p.b = as_ptr(b);
  p.c = as_ptr(c);
  p.d = as_ptr(d);
  p.s = as_ptr(s);
  p.scale = scale;
  p.clamp = clamp;
  return p;
}

// MLP guidance arguments from Python: layer dims and per-layer weight/bias pointers as
// lists of ints (0 for an absent bias or optional tensor).
inline MlpGuidanceArgs make_mlp_guidance_args(
    int64_t batch, const std::vector<int64_t>& dims, const std::vector<uintptr_t>& weights,
    const std::vector<uintptr_t>& biases, int activation, uintptr_t x, uintptr_t a0,
    uintptr_t target, int64_t target_stride, uintptr_t mask, int64_t mask_stride,
    int64_t action_dim, uintptr_t eps, double distance_weight, uintptr_t grad, uintptr_t latent) {
  const size_t layers = weights.size();
  if (layers < 1 || layers > static_cast<size_t>(kMaxMlpLayers))
    throw std::invalid_argument("mlp_guidance: 1.." + std::to_string(kMaxMlpLayers) +
                                " layers supported, got " + std::to_string(layers));
  if (dims.size() != layers + 1 || biases.size() != layers)
    throw std::invalid_argument("mlp_guidance: need len(dims) == layers + 1 == len(biases) + 1");
  if (activation < 0 || activation >= kNumActivations)
    throw std::invalid_argument("mlp_guidance: activation code must be 0.." +
                                std::to_string(kNumActivations - 1));
  MlpGuidanceArgs p;
  p.batch = batch;
  p.num_layers = static_cast<int>(layers);
  for (size_t l = 0; l < layers; ++l) {
    p.dims[l] = dims[l];
    p.weights[l] = as_ptr(weights[l]);
    p.biases[l] = as_ptr(biases[l]);
  }
  p.dims[layers] = dims[layers];
  p.activation = static_cast<Activation>(activation);
  p.x = as_ptr(x);
  p.a0 = as_ptr(a0);
  p.target = as_ptr(target);
  p.target_stride = target_stride;
  p.mask = as_ptr(mask);
  p.mask_stride = mask_stride;
  p.action_dim = action_dim;
  p.eps = as_ptr(eps);
  p.distance_weight = distance_weight;
  p.grad = reinterpret_cast<void*>(grad);
  p.latent = reinterpret_cast<void*>(latent);
  return p;
}

inline DType as_dtype(int code) {
  if (code < 0 || code >= kNumDTypes)
    throw std::invalid_argument("dtype code must be 0.." + std::to_string(kNumDTypes - 1) +
                                ", got " + std::to_string(code));
  return static_cast<DType>(code);
}

inline void check_status(int status, const char* what) {
  switch (status) {
    case kOk: return;
    case kBadDType: throw std::invalid_argument(std::string(what) + ": unsupported dtype for this backend");
    case kBadShape: throw std::invalid_argument(std::string(what) + ": negative size");
    case kNullPointer: throw std::invalid_argument(std::string(what) + ": a required pointer is null (m, b, out, or the coefficient of a given tensor)");
    default: throw std::runtime_error(std::string(what) + ": failed with status " + std::to_string(status));
  }
}

}  // namespace ate_fast

#define ATE_FAST_GUIDED_STEP_PYARGS                                                        \
  pybind11::arg("dtype"), pybind11::arg("batch"), pybind11::arg("row"), pybind11::arg("out"), \
      pybind11::arg("x"), pybind11::arg("m"), pybind11::arg("g"), pybind11::arg("m_prev"),    \
      pybind11::arg("z"), pybind11::arg("a"), pybind11::arg("b"), pybind11::arg("c"),         \
      pybind11::arg("d"), pybind11::arg("s"), pybind11::arg("scale"), pybind11::arg("clamp")

#define ATE_FAST_MLP_GUIDANCE_PYARGS                                                        \
  pybind11::arg("dtype"), pybind11::arg("batch"), pybind11::arg("dims"),                     \
      pybind11::arg("weights"), pybind11::arg("biases"), pybind11::arg("activation"),        \
      pybind11::arg("x"), pybind11::arg("a0"), pybind11::arg("target"),                      \
      pybind11::arg("target_stride"), pybind11::arg("mask"), pybind11::arg("mask_stride"),   \
      pybind11::arg("action_dim"), pybind11::arg("eps"), pybind11::arg("distance_weight"),   \
      pybind11::arg("grad"), pybind11::arg("latent")
