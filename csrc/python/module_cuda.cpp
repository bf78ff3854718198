// ate_fast._C_cuda: the CUDA kernels. cudart is linked statically, so this module
// imports on machines without a driver; calls then report the driver error.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "ate_fast/launchers.h"
#include "pointer_args.h"

namespace py = pybind11;
using namespace ate_fast;

#ifndef ATE_FAST_CUDA_ARCHS
#define ATE_FAST_CUDA_ARCHS "unknown"
#endif

PYBIND11_MODULE(_C_cuda, mod) {
  mod.doc() = "ate_fast CUDA kernels (torch-free; raw pointers, sizes and a stream handle)";
  mod.def(
      "guided_step",
      [](int dtype, int64_t batch, int64_t row, uintptr_t out, uintptr_t x, uintptr_t m,
         uintptr_t g, uintptr_t m_prev, uintptr_t z, uintptr_t a, uintptr_t b, uintptr_t c,
         uintptr_t d, uintptr_t s, double scale, double clamp, int device, uintptr_t stream) {
        GuidedStepArgs p = make_guided_step_args(batch, row, out, x, m, g, m_prev, z, a, b,
                                                 c, d, s, scale, clamp);
        int status = guided_step_cuda(as_dtype(dtype), p, device, reinterpret_cast<void*>(stream));
        if (status == kCudaError)
          throw std::runtime_error(std::string("ate_fast._C_cuda.guided_step: ") + last_cuda_error());
        check_status(status, "ate_fast._C_cuda.guided_step");
      },
      ATE_FAST_GUIDED_STEP_PYARGS, py::arg("device"), py::arg("stream"),
      "CUDA guided step on `stream` (a cudaStream_t as int, 0 = legacy default stream);"
      " dtype 0=float32, 1=float64, 2=float16, 3=bfloat16.");
  mod.def(
      "mlp_guidance",
      [](int dtype, int64_t batch, const std::vector<int64_t>& dims,
         const std::vector<uintptr_t>& weights, const std::vector<uintptr_t>& biases,
         int activation, uintptr_t x, uintptr_t a0, uintptr_t target, int64_t target_stride,
         uintptr_t mask, int64_t mask_stride, int64_t action_dim, uintptr_t eps, double distance_weight,
         uintptr_t grad, uintptr_t latent, uintptr_t scratch, int64_t scratch_elems, int device,
         uintptr_t stream, int unroll) {
        if (unroll != 4 && unroll != 16)
          throw std::invalid_argument("ate_fast._C_cuda.mlp_guidance: unroll must be 4 or 16, got " +
                                      std::to_string(unroll));
        MlpGuidanceArgs p = make_mlp_guidance_args(batch, dims, weights, biases, activation, x,
                                                   a0, target, target_stride, mask, mask_stride,
                                                   action_dim, eps, distance_weight, grad, latent);
        int status = mlp_guidance_cuda(as_dtype(dtype), p, reinterpret_cast<void*>(scratch),
                                       scratch_elems, device, reinterpret_cast<void*>(stream),
                                       unroll);
        if (status == kCudaError)
          throw std::runtime_error(std::string("ate_fast._C_cuda.mlp_guidance: ") + last_cuda_error());
        check_status(status, "ate_fast._C_cuda.mlp_guidance");
      },
      ATE_FAST_MLP_GUIDANCE_PYARGS, py::arg("scratch"), py::arg("scratch_elems"),
      py::arg("device"), py::arg("stream"), py::arg("unroll") = 4,
      "Fused MLP-encoder guidance gradient in one cooperative kernel on `stream`; `unroll`"
      " (4 or 16): the unroll depth of its layers' loops.");
  mod.def(
      "mlp_guidance_scratch_elements",
      [](int64_t batch, const std::vector<int64_t>& dims, bool with_a0) {
        MlpGuidanceArgs p;
        p.batch = batch;
        p.num_layers = static_cast<int>(dims.size()) - 1;
        if (p.num_layers < 1 || p.num_layers > kMaxMlpLayers)
          throw std::invalid_argument("mlp_guidance_scratch_elements: bad dims");
        for (size_t l = 0; l < dims.size(); ++l) p.dims[l] = dims[l];
        p.a0 = with_a0 ? reinterpret_cast<const void*>(1) : nullptr;
        return mlp_guidance_scratch_elements(p);
      },
      py::arg("batch"), py::arg("dims"), py::arg("with_a0"),
      "Scratch elements (compute dtype) mlp_guidance needs.");
  mod.def("device_count", []() {
    int n = cuda_device_count();
    if (n < 0) throw std::runtime_error(last_cuda_error());
    return n;
  }, "Visible CUDA devices; raises with the runtime's reason when there is no usable driver.");
  mod.def("runtime_version", &cuda_runtime_version, "CUDA runtime version (e.g. 13000).");
  mod.attr("archs") = ATE_FAST_CUDA_ARCHS;
}
