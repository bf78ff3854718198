// ate_fast._C: the C++ CPU kernels. Thin: pointers in, launcher call, errors out.
#include <pybind11/pybind11.h>

#include "ate_fast/launchers.h"
#include "pointer_args.h"

namespace py = pybind11;
using namespace ate_fast;

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "ate_fast C++ CPU kernels (torch-free; raw pointers and sizes)";
  mod.def(
      "guided_step",
      [](int dtype, int64_t batch, int64_t row, uintptr_t out, uintptr_t x, uintptr_t m,
         uintptr_t g, uintptr_t m_prev, uintptr_t z, uintptr_t a, uintptr_t b, uintptr_t c,
         uintptr_t d, uintptr_t s, double lam, double kappa) {
        GuidedStepArgs p = make_guided_step_args(batch, row, out, x, m, g, m_prev, z, a, b,
                                                 c, d, s, lam, kappa);
        int status;
        {
          // Large updates run on the OpenMP pool; let other Python threads go on.
          py::gil_scoped_release release;
          status = guided_step_cpu(as_dtype(dtype), p);
        }
        check_status(status, "ate_fast._C.guided_step");
      },
      ATE_FAST_GUIDED_STEP_PYARGS,
      "out = a*x + b*(m + lam*clamp(c*g, -kappa, kappa)) + d*m_prev + s*z over [batch, row]"
      " contiguous arrays (pointers as ints, 0 = absent); dtype 0=float32, 1=float64.");
  mod.def("num_threads", &cpu_num_threads, "OpenMP threads the CPU kernels use.");
#if defined(_OPENMP)
  mod.attr("openmp") = true;
#else
  mod.attr("openmp") = false;
#endif
}
