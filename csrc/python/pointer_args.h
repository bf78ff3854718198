// Shared by the two pybind11 modules: turn Python integers (data_ptr() values, 0 for
// an absent tensor) into the launcher's argument struct. The Python side has already
// checked shapes, dtypes, devices and contiguity; this layer checks only what would
// crash the process.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "ate_fast/guided_step.h"

namespace ate_fast {

inline const void* as_ptr(uintptr_t value) { return reinterpret_cast<const void*>(value); }

inline GuidedStepArgs make_guided_step_args(int64_t batch, int64_t row, uintptr_t out,
                                            uintptr_t x, uintptr_t m, uintptr_t g,
                                            uintptr_t m_prev, uintptr_t z, uintptr_t a,
                                            uintptr_t b, uintptr_t c, uintptr_t d,
                                            uintptr_t s, double lam, double kappa) {
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
  p.lam = lam;
  p.kappa = kappa;
  return p;
}

inline DType as_dtype(int code) {
  if (code < 0 || code > 3) throw std::invalid_argument("dtype code must be 0..3, got " + std::to_string(code));
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
      pybind11::arg("d"), pybind11::arg("s"), pybind11::arg("lam"), pybind11::arg("kappa")
