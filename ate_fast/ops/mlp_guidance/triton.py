"""Triton kernels of the fused MLP-encoder guidance gradient (CUDA, or the CPU through
``TRITON_INTERPRET=1``).

Same computation and semantics as the other backends of
:func:`ate_fast.mlp_guidance` (see :mod:`ate_fast.ops.mlp_guidance.ref`). Storage in
float32/float64 (and float16/bfloat16 on CUDA), arithmetic in float32 (float64 for
float64 data): weight tiles are converted to the compute type before ``tl.dot``, which
runs with ``input_precision="ieee"`` (no TF32), and the activations between layers live
in a compute-type scratch buffer from torch's caching allocator (so the call can be
captured in a CUDA graph).

Launches per call: ``2·L`` for an encoder of ``L`` linear layers.

* ``L − 1`` forward kernels, one per hidden layer: a GEMM tile (rows × out-features)
  over K-tiles of the layer's input, bias in the epilogue; it stores the
  *pre-activation*. The activation is applied when the next kernel loads its input
  (prologue), and the backward kernel takes act' from the same stored pre-activation,
  so one buffer per hidden layer serves both directions. The first kernel reads
  ``mask ⊙ x`` (and ``mask ⊙ a0`` as extra rows) straight from the inputs.
* 1 latent kernel for the last layer: each program computes matching column tiles of
  μ and (with ``eps``) log σ² for x's rows and a0's rows, and in its epilogue forms
  ``z``, ``z*`` and ``δ = ∂y/∂(μ, log σ²)``; it writes ``z``.
* ``L`` backward kernels, one per layer from the last: ``δ_l = (δ_{l+1} W_l) ⊙ act'(u_l)``
  as a GEMM tile (rows × in-features) over tiles of the layer's outputs with act' fused
  in the epilogue; the last one (layer 0) applies the mask and writes ``g`` in x's
  dtype. Without ``eps`` the log σ² half of δ is zero and is not read.

Why not one kernel: Triton has no grid-wide barrier (the CUDA backend's cooperative
launch), so a kernel spread over many SMs cannot wait for a layer to finish; the
alternative — one program per block of batch rows carrying the whole network — leaves a
control-rate batch (B ≤ 16) on a single SM that streams every weight alone, and needs
compile-time tiles sized to the widest layer. One launch per layer and direction
spreads each layer's weight read over ``cdiv(width, tile)`` programs instead.

Tiling: ``BLOCK_B`` ∈ {16, 32} batch rows per program (``tl.dot``'s minimum is 16;
rows beyond the batch are masked), forward tiles of 16 output features × 64 inputs,
backward tiles of 32 input features × 64 outputs; 4 warps, no software pipelining
(``num_stages=1``), so every kernel stays within 32 KiB of shared memory.

Status: float32 and float64 match the float64 reference on an H100 (Triton 3.6, every
``test_mlp_guidance_triton`` case); the tile sizes are untuned, and it trails the
``cuda`` backend at B ≤ 8 (launch-bound: 2·L launches per call; benchmarks/README.md).
The float16/bfloat16 paths compile for sm_90 (``tests/triton_offline_compile.py``) but
have never run. ``tl.dot`` gets ``out_dtype`` explicitly: Triton before 3.7 defaults it
to float32, and a float64 accumulator then fails to compile (the interpreter never
noticed; the first H100 run did).

``distance_weight`` reaches the kernels as the 64-bit pattern of the Python float (Triton passes
Python floats as float32, which would round float64 results).

Imported only when the triton backend is selected (importing triton costs a second);
the interpreter reads ``TRITON_INTERPRET`` when a kernel is decorated, so the variable
must be set before this module is first imported.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ate_fast.ops.triton_activations import activation as _act
from ate_fast.ops.triton_activations import activation_grad as _act_grad
from ate_fast.ops.triton_resources import COMPILE_OPTIONS, OTHER_BACKEND, launch_limits

FWD_BLOCK_N = 16  # output features per forward program
FWD_BLOCK_K = 64  # input features per forward K-step
BWD_BLOCK_K = 32  # input features per backward program
BWD_BLOCK_O = 64  # output features per backward step
NUM_WARPS = 4
# No software pipelining of the K loops: with the x/a0/mask/weight loads of the first
# layer, 2 stages need up to 64 KiB (float32) / 128 KiB (float64) of shared memory per
# program, 1 stage at most 32 KiB (compiled for sm_90; never measured).
NUM_STAGES = 1


def latent_block_k(has_a0: bool, has_eps: bool) -> int:
    """The latent kernel's K-step. With a0 and eps it keeps four [BLOCK_B, BLOCK_N]
    accumulators (μ and log σ² of x and of a0) beside two K-tiles of rows: at a K-step of
    32 its float32 / bf16 / fp16 variants spill (ptxas, sm_90: 255 registers, 48–52 B;
    at 64, the K-step of every variant before, 16–4678 B), at 16 none does. Every other
    variant is spill-free at 32 (80–182 registers) and two of them spill 8 B at 16."""
    return 16 if has_a0 and has_eps else 32


@triton.jit
def _load_h(
    src_ptr, a0_ptr, mask_ptr, r, r_ok, k, k_ok, batch, in_dim, mask_stride, action_dim,
    C: tl.constexpr, ACT: tl.constexpr, FROM_INPUT: tl.constexpr, HAS_A0: tl.constexpr,
    HAS_MASK: tl.constexpr,
):  # fmt: skip
    """``[rows, K]`` tile of a layer's input in the compute type ``C``. Rows index the
    stacked batch (x's rows, then a0's); out-of-range rows and columns read 0."""
    if FROM_INPUT:
        is_x = r < batch
        b = tl.where(is_x, r, r - batch).to(tl.int64)
        offs = b[:, None] * in_dim + k[None, :]
        ok = r_ok[:, None] & k_ok[None, :]
        h = tl.load(src_ptr + offs, mask=ok & is_x[:, None], other=0.0).to(C)
        if HAS_A0:
            ha = tl.load(a0_ptr + offs, mask=ok & (r >= batch)[:, None], other=0.0).to(C)
            h = tl.where(is_x[:, None], h, ha)
        if HAS_MASK:
            m_offs = b[:, None] * mask_stride + (k % action_dim)[None, :]
            h = h * tl.load(mask_ptr + m_offs, mask=ok, other=0.0).to(C)
    else:  # the previous layer's pre-activation, activated here
        offs = r.to(tl.int64)[:, None] * in_dim + k[None, :]
        ok = r_ok[:, None] & k_ok[None, :]
        u = tl.load(src_ptr + offs, mask=ok, other=0.0)
        h = tl.where(ok, _act(u, ACT), 0.0)
    return h


@triton.jit
def _w_t(w_ptr, n, n_ok, k, k_ok, in_dim, C: tl.constexpr):
    """``W[n, k]`` as a ``[K, N]`` tile (W is ``[out, in]`` row-major) in type ``C``."""
    offs = n.to(tl.int64)[None, :] * in_dim + k[:, None]
    return tl.load(w_ptr + offs, mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(C)


# ---------------------------------------------------------------- kernels
@triton.jit
def _forward_kernel(
    src_ptr, a0_ptr, mask_ptr, w_ptr, b_ptr, dst_ptr,
    rows, batch, in_dim, out_dim, mask_stride, action_dim,
    ACT: tl.constexpr, FROM_INPUT: tl.constexpr, HAS_A0: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # One program per (tile of BLOCK_N output features, block of BLOCK_B rows).
    C: tl.constexpr = dst_ptr.dtype.element_ty
    r = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok = r < rows
    n_ok = n < out_dim
    acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=C)
    for k0 in range(0, in_dim, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < in_dim
        h = _load_h(src_ptr, a0_ptr, mask_ptr, r, r_ok, k, k_ok, batch, in_dim, mask_stride,
                    action_dim, C, ACT, FROM_INPUT, HAS_A0, HAS_MASK)  # fmt: skip
        w = _w_t(w_ptr, n, n_ok, k, k_ok, in_dim, C)
        # out_dtype explicit: Triton < 3.7 defaults it to float32, which float64 fails
        acc = tl.dot(h, w, acc, input_precision="ieee", out_dtype=C)
    if HAS_BIAS:
        acc = acc + tl.load(b_ptr + n, mask=n_ok, other=0.0).to(C)[None, :]
    offs = r.to(tl.int64)[:, None] * out_dim + n[None, :]
    tl.store(dst_ptr + offs, acc, mask=r_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["weight_bits"])
def _latent_kernel(
    src_ptr, a0_ptr, mask_ptr, w_ptr, b_ptr, target_ptr, eps_ptr, z_ptr, delta_ptr,
    batch, in_dim, dz, target_stride, mask_stride, action_dim, weight_bits,
    ACT: tl.constexpr, FROM_INPUT: tl.constexpr, HAS_A0: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_EPS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # One program per (tile of BLOCK_N latent dims j, block of BLOCK_B batch rows): it
    # computes μ_j (W rows j) and log σ²_j (W rows d_z + j) for x's rows and a0's rows.
    C: tl.constexpr = delta_ptr.dtype.element_ty
    r = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    j = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok = r < batch
    j_ok = j < dz
    mu = tl.zeros([BLOCK_B, BLOCK_N], dtype=C)
    lv = tl.zeros([BLOCK_B, BLOCK_N], dtype=C)
    mu_a = tl.zeros([BLOCK_B, BLOCK_N], dtype=C)
    lv_a = tl.zeros([BLOCK_B, BLOCK_N], dtype=C)
    for k0 in range(0, in_dim, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < in_dim
        hx = _load_h(src_ptr, a0_ptr, mask_ptr, r, r_ok, k, k_ok, batch, in_dim, mask_stride,
                     action_dim, C, ACT, FROM_INPUT, HAS_A0, HAS_MASK)  # fmt: skip
        w_mu = _w_t(w_ptr, j, j_ok, k, k_ok, in_dim, C)
        mu = tl.dot(hx, w_mu, mu, input_precision="ieee", out_dtype=C)
        if HAS_EPS:
            w_lv = _w_t(w_ptr, dz + j, j_ok, k, k_ok, in_dim, C)
            lv = tl.dot(hx, w_lv, lv, input_precision="ieee", out_dtype=C)
        if HAS_A0:  # a0's rows follow x's in the stacked batch
            ha = _load_h(src_ptr, a0_ptr, mask_ptr, r + batch, r_ok, k, k_ok, batch, in_dim,
                         mask_stride, action_dim, C, ACT, FROM_INPUT, HAS_A0, HAS_MASK)  # fmt: skip
            mu_a = tl.dot(ha, w_mu, mu_a, input_precision="ieee", out_dtype=C)
            if HAS_EPS:
                lv_a = tl.dot(ha, w_lv, lv_a, input_precision="ieee", out_dtype=C)
    if HAS_BIAS:
        b_mu = tl.load(b_ptr + j, mask=j_ok, other=0.0).to(C)[None, :]
        b_lv = tl.load(b_ptr + dz + j, mask=j_ok, other=0.0).to(C)[None, :]
        mu = mu + b_mu
        mu_a = mu_a + b_mu
        lv = lv + b_lv
        lv_a = lv_a + b_lv
    ok = r_ok[:, None] & j_ok[None, :]
    offs = r.to(tl.int64)[:, None] * dz + j[None, :]
    z = mu
    sx = mu  # (unused without eps)
    ev = mu
    if HAS_EPS:
        ev = tl.load(eps_ptr + offs, mask=ok, other=0.0).to(C)
        sx = tl.exp(0.5 * lv)
        z = mu + sx * ev
    if HAS_A0:
        zt = mu_a
        if HAS_EPS:
            zt = mu_a + tl.exp(0.5 * lv_a) * ev
    else:
        t_offs = r.to(tl.int64)[:, None] * target_stride + j[None, :]
        zt = tl.load(target_ptr + t_offs, mask=ok, other=0.0).to(C)
    w = weight_bits.to(tl.int64).to(tl.float64, bitcast=True).to(C)
    d = -2.0 * w * (z - zt)
    d_offs = r.to(tl.int64)[:, None] * (2 * dz) + j[None, :]
    tl.store(delta_ptr + d_offs, d, mask=ok)
    if HAS_EPS:
        tl.store(delta_ptr + d_offs + dz, d * ev * 0.5 * sx, mask=ok)
    tl.store(z_ptr + offs, z.to(z_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _backward_kernel(
    delta_ptr, w_ptr, pre_ptr, out_ptr, mask_ptr,
    batch, in_dim, used_out, delta_stride, mask_stride, action_dim,
    ACT: tl.constexpr, TO_INPUT: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr,
):  # fmt: skip
    # One program per (tile of BLOCK_K input features, block of BLOCK_B rows):
    # δ_in = δ_out W (over the first used_out outputs), then ⊙ act'(u) or ⊙ mask.
    C: tl.constexpr = delta_ptr.dtype.element_ty
    r = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    r_ok = r < batch
    k_ok = k < in_dim
    r64 = r.to(tl.int64)
    acc = tl.zeros([BLOCK_B, BLOCK_K], dtype=C)
    for o0 in range(0, used_out, BLOCK_O):
        o = o0 + tl.arange(0, BLOCK_O)
        o_ok = o < used_out
        d = tl.load(delta_ptr + r64[:, None] * delta_stride + o[None, :],
                    mask=r_ok[:, None] & o_ok[None, :], other=0.0)  # fmt: skip
        w = tl.load(w_ptr + o.to(tl.int64)[:, None] * in_dim + k[None, :],
                    mask=o_ok[:, None] & k_ok[None, :], other=0.0).to(C)  # fmt: skip
        acc = tl.dot(d, w, acc, input_precision="ieee", out_dtype=C)
    ok = r_ok[:, None] & k_ok[None, :]
    offs = r64[:, None] * in_dim + k[None, :]
    if TO_INPUT:
        if HAS_MASK:
            m_offs = r64[:, None] * mask_stride + (k % action_dim)[None, :]
            acc = acc * tl.load(mask_ptr + m_offs, mask=ok, other=0.0).to(C)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)
    else:
        u = tl.load(pre_ptr + offs, mask=ok, other=0.0)
        tl.store(out_ptr + offs, acc * _act_grad(u, ACT), mask=ok)


# ---------------------------------------------------------------- launcher
def _block_b(rows: int) -> int:
    return 16 if rows <= 16 else 32


def _float64_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


@launch_limits("mlp_guidance's triton backend", OTHER_BACKEND)
def mlp_guidance_triton_into(
    g: Tensor,
    z: Tensor,
    x: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Optional[Tensor]],
    activation: int,
    target: Optional[Tensor],
    a0: Optional[Tensor],
    mask: Optional[Tensor],
    eps: Optional[Tensor],
    distance_weight: float,
) -> None:
    """Write ``g`` [B, H, D] and ``z`` [B, d_z]; inputs validated by the caller."""
    if x.shape[0] == 0:
        return
    call = _Call(x, weights, biases, activation, a0, mask)
    pre, delta_out, ping = call.scratch()
    last_hidden = call.forward(pre)
    call.latent(last_hidden, target, eps, z, delta_out, distance_weight)
    call.backward(delta_out, pre, ping, g, eps is not None)


class _Call:
    """The sizes, flags and launch options one call's kernels share."""

    def __init__(self, x, weights, biases, activation, a0, mask) -> None:
        self.x, self.weights, self.biases, self.a0 = x, weights, biases, a0
        self.batch, self.action_dim = x.shape[0], x.shape[2]
        self.dims = [x.shape[1] * x.shape[2]] + [w.shape[0] for w in weights]
        self.dz = self.dims[-1] // 2
        self.rows = 2 * self.batch if a0 is not None else self.batch  # x's rows, then a0's
        has_mask = mask is not None
        self.mask_arg = mask if has_mask else x
        self.mask_stride = self.action_dim if has_mask and mask.ndim == 2 else 0
        self.options = dict(
            ACT=activation, HAS_MASK=has_mask, num_warps=NUM_WARPS, num_stages=NUM_STAGES
        )

    def scratch(self) -> tuple[list[Tensor], Tensor, list[Tensor]]:
        """Pre-activations of the hidden layers (rows × d_l each), δ at the output
        (B × 2·d_z) and two δ buffers for the hidden layers (B × widest), one allocation."""
        compute = torch.float64 if self.x.dtype == torch.float64 else torch.float32
        hidden = self.dims[1:-1]
        widest = max(hidden, default=0)
        sizes = [self.rows * d for d in hidden] + [self.batch * 2 * self.dz]
        sizes += [self.batch * widest] * 2
        scratch = torch.empty(sum(sizes), dtype=compute, device=self.x.device)
        views, offset = [], 0
        for size in sizes:
            views.append(scratch[offset : offset + size])
            offset += size
        return views[: len(hidden)], views[len(hidden)], views[len(hidden) + 1 :]

    def forward(self, pre: list[Tensor]) -> Tensor:
        """The hidden layers over the stacked rows; returns the last one's input."""
        x, a0, dims = self.x, self.a0, self.dims
        block_rows = _block_b(self.rows)
        src = x
        for layer in range(len(self.weights) - 1):
            w, b = self.weights[layer], self.biases[layer]
            grid = (triton.cdiv(dims[layer + 1], FWD_BLOCK_N), triton.cdiv(self.rows, block_rows))
            if grid[0]:
                _forward_kernel[grid](
                    src, x if a0 is None else a0, self.mask_arg, w, w if b is None else b,
                    pre[layer], self.rows, self.batch, dims[layer], dims[layer + 1],
                    self.mask_stride, self.action_dim, FROM_INPUT=layer == 0,
                    HAS_A0=a0 is not None, HAS_BIAS=b is not None, BLOCK_B=block_rows,
                    BLOCK_N=FWD_BLOCK_N, BLOCK_K=FWD_BLOCK_K, **self.options, **COMPILE_OPTIONS,
                )  # fmt: skip
            src = pre[layer]
        return src

    def latent(self, src, target, eps, z, delta_out, distance_weight: float) -> None:
        """Last layer + latent + δ at the output; writes ``z``."""
        x, a0, dz = self.x, self.a0, self.dz
        w, b = self.weights[-1], self.biases[-1]
        block_b = _block_b(self.batch)
        grid = (triton.cdiv(dz, FWD_BLOCK_N), triton.cdiv(self.batch, block_b))
        if grid[0]:
            _latent_kernel[grid](
                src, x if a0 is None else a0, self.mask_arg, w, w if b is None else b,
                x if target is None else target, x if eps is None else eps, z, delta_out,
                self.batch, self.dims[-2], dz, dz if target is not None and target.ndim == 2 else 0,
                self.mask_stride, self.action_dim, _float64_bits(distance_weight),
                FROM_INPUT=len(self.weights) == 1, HAS_A0=a0 is not None, HAS_BIAS=b is not None,
                HAS_EPS=eps is not None, BLOCK_B=block_b, BLOCK_N=FWD_BLOCK_N,
                BLOCK_K=latent_block_k(a0 is not None, eps is not None), **self.options,
                **COMPILE_OPTIONS,
            )  # fmt: skip

    def backward(self, delta_out, pre, ping, g, has_eps: bool) -> None:
        """Back to the input, writing ``g``; without eps the log σ² half of δ is zero and
        skipped."""
        block_b = _block_b(self.batch)
        used_out = 2 * self.dz if has_eps else self.dz
        delta, delta_stride = delta_out, 2 * self.dz
        for layer in range(len(self.weights) - 1, -1, -1):
            in_dim = self.dims[layer]
            to_input = layer == 0
            out = g if to_input else ping[layer % 2]
            grid = (triton.cdiv(in_dim, BWD_BLOCK_K), triton.cdiv(self.batch, block_b))
            if grid[0]:
                _backward_kernel[grid](
                    delta, self.weights[layer], out if to_input else pre[layer - 1], out,
                    self.mask_arg, self.batch, in_dim, used_out, delta_stride, self.mask_stride,
                    self.action_dim, TO_INPUT=to_input, BLOCK_B=block_b, BLOCK_K=BWD_BLOCK_K,
                    BLOCK_O=BWD_BLOCK_O, **self.options, **COMPILE_OPTIONS,
                )  # fmt: skip
            delta, used_out, delta_stride = out, in_dim, in_dim
