// C++ CPU guided step: one pass over memory, vectorised inner loop, OpenMP over
// (batch row, chunk) tasks. Optional tensors are template flags so that the inner
// loop carries no branches and the compiler vectorises it.
#include <algorithm>
#include <cstdint>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "ate_fast/launchers.h"

namespace ate_fast {
namespace {

// Elements per task: large enough that a thread's work dwarfs scheduling, small
// enough that a [64, 50, 32] problem still spreads over the cores.
constexpr int64_t kChunk = 8192;
// Below this many elements the whole update runs on the calling thread: waking the
// OpenMP pool costs more than the pass itself.
constexpr int64_t kParallelThreshold = 1 << 15;

template <typename T, bool HAS_X, bool HAS_G, bool HAS_P, bool HAS_Z>
void run_rows(const GuidedStepArgs& p) {
  const int64_t chunks_per_row = (p.row + kChunk - 1) / kChunk;
  const int64_t tasks = p.batch * chunks_per_row;
  const bool parallel = p.batch * p.row >= kParallelThreshold;
  T* out = static_cast<T*>(p.out);  // may alias an input (in-place update)
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ m = static_cast<const T*>(p.m);
  const T* __restrict__ g = static_cast<const T*>(p.g);
  const T* __restrict__ mp = static_cast<const T*>(p.m_prev);
  const T* __restrict__ z = static_cast<const T*>(p.z);
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  const T* c = static_cast<const T*>(p.c);
  const T* d = static_cast<const T*>(p.d);
  const T* s = static_cast<const T*>(p.s);
  const T scale = static_cast<T>(p.scale);
  const T clamp = static_cast<T>(p.clamp);

#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t r = task / chunks_per_row;
    const int64_t begin = (task % chunks_per_row) * kChunk;
    const int64_t end = std::min(begin + kChunk, p.row);
    const RowCoefficients<T> k =
        row_coefficients<T>(a, b, c, d, s, r, HAS_X, HAS_G, HAS_P, HAS_Z, scale, clamp);
    const int64_t base = r * p.row;
#pragma omp simd
    for (int64_t i = base + begin; i < base + end; ++i) {
      out[i] = guided_step_value<T>(k, HAS_X, HAS_G, HAS_P, HAS_Z, HAS_X ? x[i] : T(0), m[i],
                                    HAS_G ? g[i] : T(0), HAS_P ? mp[i] : T(0),
                                    HAS_Z ? z[i] : T(0));
    }
  }
}

// Turns four runtime presence flags into one of sixteen branch-free instantiations.
template <typename T, bool... Flags>
void dispatch_flags(const GuidedStepArgs& p) {
  constexpr int n = sizeof...(Flags);
  if constexpr (n == 4) {
    run_rows<T, Flags...>(p);
  } else {
    const void* ptrs[4] = {p.x, p.g, p.m_prev, p.z};
    if (ptrs[n] != nullptr) {
      dispatch_flags<T, Flags..., true>(p);
    } else {
      dispatch_flags<T, Flags..., false>(p);
    }
  }
}

}  // namespace

int guided_step_cpu(DType dtype, const GuidedStepArgs& args) {
  if (args.batch < 0 || args.row < 0) return kBadShape;
  if (args.batch == 0 || args.row == 0) return kOk;
  if (args.out == nullptr || args.m == nullptr || args.b == nullptr) return kNullPointer;
  if ((args.x && !args.a) || (args.g && !args.c) || (args.m_prev && !args.d) ||
      (args.z && !args.s))
    return kNullPointer;
  switch (dtype) {
    case DType::kFloat32:
      dispatch_flags<float>(args);
      return kOk;
    case DType::kFloat64:
      dispatch_flags<double>(args);
      return kOk;
    default:
      return kBadDType;
  }
}

int cpu_num_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace ate_fast
