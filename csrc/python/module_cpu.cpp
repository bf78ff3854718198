// ate_fast._C: the C++ CPU kernels. Thin: pointers in, launcher call, errors out.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <vector>

#include "ate_fast/launchers.h"
#include "pointer_args.h"

namespace py = pybind11;
using namespace ate_fast;

namespace {
// Run a launcher with the GIL released (other Python threads go on), then raise on its status.
template <typename Launch>
void without_gil(const char* what, Launch launch) {
  int status;
  {
    py::gil_scoped_release release;
    status = launch();
  }
  check_status(status, what);
}
}  // namespace

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "ate_fast C++ CPU kernels (torch-free; raw pointers and sizes)";
  mod.def(
      "guided_step",
      [](int dtype, int64_t batch, int64_t row, uintptr_t out, uintptr_t x, uintptr_t m,
         uintptr_t g, uintptr_t m_prev, uintptr_t z, uintptr_t a, uintptr_t b, uintptr_t c,
         uintptr_t d, uintptr_t s, double scale, double clamp) {
        GuidedStepArgs p = make_guided_step_args(batch, row, out, x, m, g, m_prev, z, a, b,
                                                 c, d, s, scale, clamp);
        int status;
        {
          // Large updates run on the OpenMP pool; let other Python threads go on.
          py::gil_scoped_release release;
          status = guided_step_cpu(as_dtype(dtype), p);
        }
        check_status(status, "ate_fast._C.guided_step");
      },
      ATE_FAST_GUIDED_STEP_PYARGS,
      "out = a*x + b*(m + scale*clip(c*g, -clamp, clamp)) + d*m_prev + s*z over [batch, row]"
      " contiguous arrays (pointers as ints, 0 = absent); dtype 0=float32, 1=float64.");
  mod.def(
      "mlp_guidance",
      [](int dtype, int64_t batch, const std::vector<int64_t>& dims,
         const std::vector<uintptr_t>& weights, const std::vector<uintptr_t>& biases,
         int activation, uintptr_t x, uintptr_t a0, uintptr_t target, int64_t target_stride,
         uintptr_t mask, int64_t mask_stride, int64_t action_dim, uintptr_t eps, double distance_weight,
         uintptr_t grad, uintptr_t latent) {
        MlpGuidanceArgs p = make_mlp_guidance_args(batch, dims, weights, biases, activation, x,
                                                   a0, target, target_stride, mask, mask_stride,
                                                   action_dim, eps, distance_weight, grad, latent);
        int status;
        {
          py::gil_scoped_release release;
          status = mlp_guidance_cpu(as_dtype(dtype), p);
        }
        check_status(status, "ate_fast._C.mlp_guidance");
      },
      ATE_FAST_MLP_GUIDANCE_PYARGS,
      "Fused MLP-encoder latent guidance gradient (see csrc/include/ate_fast/mlp_guidance.h).");
  mod.def(
      "gated_gelu",
      [](int dtype, int64_t rows, int64_t width, int64_t row_stride, uintptr_t gate,
         uintptr_t up, uintptr_t out, uintptr_t act, int threads) {
        GatedGeluArgs p;
        p.threads = threads;
        p.rows = rows;
        p.width = width;
        p.row_stride = row_stride;
        p.gate = as_ptr(gate);
        p.up = as_ptr(up);
        p.out = reinterpret_cast<void*>(out);
        p.act = reinterpret_cast<void*>(act);
        without_gil("ate_fast._C.gated_gelu", [&] { return gated_gelu_cpu(as_dtype(dtype), p); });
      },
      py::arg("dtype"), py::arg("rows"), py::arg("width"), py::arg("row_stride"),
      py::arg("gate"), py::arg("up"), py::arg("out"), py::arg("act"), py::arg("threads") = 1,
      "out = gelu_tanh(gate)·up (and act = gelu_tanh(gate) unless act is 0) over [rows, width]"
      " (gate, up: rows row_stride apart; out, act contiguous); float32 (dtype 0); threads:"
      " OpenMP threads for a large call.");
  mod.def(
      "gelu_gate_backward",
      [](int dtype, int64_t rows, int64_t width, int64_t row_stride, uintptr_t dm,
         uintptr_t gate, uintptr_t up, uintptr_t act, uintptr_t out, int threads) {
        GeluGateBackwardArgs p;
        p.threads = threads;
        p.rows = rows;
        p.width = width;
        p.row_stride = row_stride;
        p.dm = as_ptr(dm);
        p.gate = as_ptr(gate);
        p.up = as_ptr(up);
        p.act = as_ptr(act);
        p.out = reinterpret_cast<void*>(out);
        without_gil("ate_fast._C.gelu_gate_backward",
                    [&] { return gelu_gate_backward_cpu(as_dtype(dtype), p); });
      },
      py::arg("dtype"), py::arg("rows"), py::arg("width"), py::arg("row_stride"),
      py::arg("dm"), py::arg("gate"), py::arg("up"), py::arg("act"), py::arg("out"),
      py::arg("threads") = 1,
      "out [rows, 2·width] = [dm·up·gelu_tanh'(gate), dm·act]; float32 (dtype 0).");
  mod.def(
      "rms_norm",
      [](int dtype, int64_t rows, int64_t width, int64_t row_stride, uintptr_t x,
         uintptr_t weight, uintptr_t out, double eps, int threads) {
        RmsNormArgs p;
        p.rows = rows;
        p.width = width;
        p.row_stride = row_stride;
        p.x = as_ptr(x);
        p.weight = as_ptr(weight);
        p.out = reinterpret_cast<void*>(out);
        p.eps = eps;
        p.threads = threads;
        without_gil("ate_fast._C.rms_norm", [&] { return rms_norm_cpu(as_dtype(dtype), p); });
      },
      py::arg("dtype"), py::arg("rows"), py::arg("width"), py::arg("row_stride"), py::arg("x"),
      py::arg("weight"), py::arg("out"), py::arg("eps"), py::arg("threads") = 1,
      "out = x/sqrt(mean(x^2) + eps)*weight over [rows, width] (x: rows row_stride apart; out"
      " contiguous; weight 0: none); float32 (dtype 0).");
  mod.def(
      "rotate_qkv",
      [](int dtype, const std::vector<int64_t>& sizes, uintptr_t q_lin,
         const std::vector<int64_t>& q_strides, uintptr_t kv_lin,
         const std::vector<int64_t>& kv_strides, uintptr_t cos, uintptr_t sin,
         int64_t table_batch_stride, uintptr_t q_out, uintptr_t k_out, uintptr_t v_out,
         const std::vector<int64_t>& out_strides, int threads) {
        if (sizes.size() != 5 || q_strides.size() != 2 || kv_strides.size() != 2 ||
            out_strides.size() != 2)
          check_status(kBadShape, "ate_fast._C.rotate_qkv");
        RotateQkvArgs p;
        p.batch = sizes[0];
        p.horizon = sizes[1];
        p.heads = sizes[2];
        p.kv_heads = sizes[3];
        p.head_dim = sizes[4];
        p.q_lin = as_ptr(q_lin);
        p.q_batch_stride = q_strides[0];
        p.q_row_stride = q_strides[1];
        p.kv_lin = as_ptr(kv_lin);
        p.kv_batch_stride = kv_strides[0];
        p.kv_row_stride = kv_strides[1];
        p.cos = as_ptr(cos);
        p.sin = as_ptr(sin);
        p.table_batch_stride = table_batch_stride;
        p.q_out = reinterpret_cast<void*>(q_out);
        p.k_out = reinterpret_cast<void*>(k_out);
        p.v_out = reinterpret_cast<void*>(v_out);
        p.out_batch_stride = out_strides[0];
        p.out_head_stride = out_strides[1];
        p.threads = threads;
        without_gil("ate_fast._C.rotate_qkv", [&] { return rotate_qkv_cpu(as_dtype(dtype), p); });
      },
      py::arg("dtype"), py::arg("sizes"), py::arg("q_lin"), py::arg("q_strides"),
      py::arg("kv_lin"), py::arg("kv_strides"), py::arg("cos"), py::arg("sin"),
      py::arg("table_batch_stride"), py::arg("q_out"), py::arg("k_out"), py::arg("v_out"),
      py::arg("out_strides"), py::arg("threads") = 1,
      "Rotary q and k and v's copy of the projections (see block_norm_rotary.h): sizes (B, H,"
      " heads, kv_heads, hd); strides (batch, row) of q_lin and kv_lin, (batch, kv head) of"
      " k_out and v_out; float32 (dtype 0).");
  mod.def(
      "rms_norm_vjp",
      [](int dtype, int64_t rows, int64_t width, uintptr_t grad, uintptr_t x, uintptr_t weight,
         uintptr_t residual, uintptr_t out, double eps, int threads) {
        RmsNormVjpArgs p;
        p.rows = rows;
        p.width = width;
        p.grad = as_ptr(grad);
        p.x = as_ptr(x);
        p.weight = as_ptr(weight);
        p.residual = as_ptr(residual);
        p.out = reinterpret_cast<void*>(out);
        p.eps = eps;
        p.threads = threads;
        without_gil("ate_fast._C.rms_norm_vjp",
                    [&] { return rms_norm_vjp_cpu(as_dtype(dtype), p); });
      },
      py::arg("dtype"), py::arg("rows"), py::arg("width"), py::arg("grad"), py::arg("x"),
      py::arg("weight"), py::arg("residual"), py::arg("out"), py::arg("eps"),
      py::arg("threads") = 1,
      "out = residual + RMSNorm's input-VJP of grad at x over contiguous [rows, width] (weight,"
      " residual 0: none); float32 (dtype 0).");
  mod.def(
      "unrotate_pack",
      [](int dtype, const std::vector<int64_t>& sizes, uintptr_t dq, uintptr_t dk,
         uintptr_t dv, uintptr_t cos, uintptr_t sin, int64_t table_batch_stride,
         uintptr_t dq_out, int64_t dq_row_stride, uintptr_t dkv_out, int64_t dkv_row_stride,
         int threads) {
        if (sizes.size() != 5) check_status(kBadShape, "ate_fast._C.unrotate_pack");
        UnrotatePackArgs p;
        p.batch = sizes[0];
        p.horizon = sizes[1];
        p.heads = sizes[2];
        p.kv_heads = sizes[3];
        p.head_dim = sizes[4];
        p.dq = as_ptr(dq);
        p.dk = as_ptr(dk);
        p.dv = as_ptr(dv);
        p.cos = as_ptr(cos);
        p.sin = as_ptr(sin);
        p.table_batch_stride = table_batch_stride;
        p.dq_out = reinterpret_cast<void*>(dq_out);
        p.dq_row_stride = dq_row_stride;
        p.dkv_out = reinterpret_cast<void*>(dkv_out);
        p.dkv_row_stride = dkv_row_stride;
        p.threads = threads;
        without_gil("ate_fast._C.unrotate_pack",
                    [&] { return unrotate_pack_cpu(as_dtype(dtype), p); });
      },
      py::arg("dtype"), py::arg("sizes"), py::arg("dq"), py::arg("dk"), py::arg("dv"),
      py::arg("cos"), py::arg("sin"), py::arg("table_batch_stride"), py::arg("dq_out"),
      py::arg("dq_row_stride"), py::arg("dkv_out"), py::arg("dkv_row_stride"),
      py::arg("threads") = 1,
      "The q and kv projections' output gradients from attention's (see block_norm_rotary.h):"
      " sizes (B, H, heads, kv_heads, hd); float32 (dtype 0).");
  mod.def(
      "softmax_backward",
      [](int dtype, int64_t rows, int64_t n, uintptr_t scores, int64_t scores_row_stride,
         uintptr_t p, int64_t p_row_stride, uintptr_t dp, int64_t dp_row_stride, uintptr_t ds,
         int64_t ds_row_stride, double scale, int threads) {
        SoftmaxBackwardArgs a;
        a.rows = rows;
        a.n = n;
        a.scores = as_ptr(scores);
        a.scores_row_stride = scores_row_stride;
        a.p = reinterpret_cast<void*>(p);
        a.p_row_stride = p_row_stride;
        a.dp = as_ptr(dp);
        a.dp_row_stride = dp_row_stride;
        a.ds = reinterpret_cast<void*>(ds);
        a.ds_row_stride = ds_row_stride;
        a.scale = scale;
        a.threads = threads;
        without_gil("ate_fast._C.softmax_backward",
                    [&] { return softmax_backward_cpu(as_dtype(dtype), a); });
      },
      py::arg("dtype"), py::arg("rows"), py::arg("n"), py::arg("scores"),
      py::arg("scores_row_stride"), py::arg("p"), py::arg("p_row_stride"), py::arg("dp"),
      py::arg("dp_row_stride"), py::arg("ds"), py::arg("ds_row_stride"), py::arg("scale"),
      py::arg("threads") = 1,
      "p = softmax(scores·scale) (scores 0: p is read) and ds = p ⊙ (dp − Σ dp ⊙ p)·scale"
      " over [rows, n] rows, each tensor its row stride (see attention_softmax.h); float32"
      " (dtype 0).");
  mod.def("num_threads", &cpu_num_threads, "OpenMP threads the CPU kernels use.");
#if defined(_OPENMP)
  mod.attr("openmp") = true;
#else
  mod.attr("openmp") = false;
#endif
}
