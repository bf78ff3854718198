"""The guidance gradient through the paper's Transformer encoder by a hand-written VJP.

``g = ∇_x −s‖z(x) − z*‖²`` for ``ate_fast.align``'s :class:`TransformerEncoder`
(``s = 1/d_z`` per sample, ``1/(B·d_z)`` for the batch mean), computed by one explicit
forward that keeps what the backward needs and one explicit input-only backward — the
same function as the autograd reference in :mod:`ate_fast.steer.latent_gradient`, with
less work:

* no autograd tape (on the CPU at B = 1 its bookkeeping is a visible share of ~300 ops);
* the **last** Transformer layer and the final LayerNorm run only on the rows the latent
  reads — the μ token (and the log σ² token for ``latent="sample"``): its queries,
  attention output, feed-forward and norms shrink from ``H + 2`` rows to 1 (or 2); keys
  and values still cover every token;
* the log σ² head is skipped for ``latent="mean"``; no weight gradient is ever formed.

Layers must be ``nn.TransformerEncoderLayer`` in post-norm form (``norm_first=False``,
``batch_first=True``, as ``ate_fast.align`` builds them) with a GELU or ReLU activation
and no dropout in effect; :func:`align_transformer_encoder` returns ``None`` otherwise and
:class:`~ate_fast.steer.encoder.FrozenEncoder` keeps autograd.

Which path runs: ``ATE_FAST_TRANSFORMER_GUIDANCE=autograd|vjp|compiled|triton`` forces one;
unset, the default of :data:`DEFAULT_PATH` for the tensor's device type, or for a batch of
one (in bf16 / fp16: up to :data:`HALF_PRECISION_MAX_BATCH`) that of
:data:`SINGLE_SAMPLE_PATH` where Triton runs (the measured winners; see
``benchmarks/README.md``, "Guidance gradient through the Transformer encoder" and "GPU:
NVIDIA H200").

``compiled`` runs this same VJP through ``torch.compile`` (Inductor, ``fullgraph=True``,
static shapes). The VJP is written in forward ops only, so Inductor compiles one
inference graph (no AOT autograd backward) and fuses its elementwise chains — LayerNorm
backward, GELU backward, the residual adds, the softmax backward — into fewer kernels:
on the GPU the graphed VJP is bound by its kernel count, not its FLOPs or bytes. The first
call per (encoder, shape, dtype) compiles (seconds); past dynamo's recompile limit (8 by
default) further shapes run the uncompiled VJP. The sampler's capture warms the guidance
up before it captures, so compiling never happens inside a CUDA graph.

``triton`` (CUDA's default at B = 1) runs this same VJP with the layer's chains of small
kernels replaced by the Triton kernels of :mod:`ate_fast.steer.transformer_triton`:
residual add + LayerNorm (forward and input-VJP, the backward also adding the residual's
or the skip connection's gradient), bias + activation, and multi-head attention forward
and backward (one kernel each per layer, any token count). Kernels per full layer, counted
from the code: forward 14 → 8 (in-projection, attention, out-projection, add+norm,
linear1, bias+GELU, linear2, add+norm), backward 22 → 8 (norm backward, ·W2, GELU
backward, ·W1, norm backward + residual gradient, ·W_out, attention backward, one in-place
``addmm_`` for ``dr1 + dqkv·W_in``); 17 → 8 and 27 → 8 counting the copies
``torch.matmul`` makes of the strided per-head views, and the input layers' skip-gradient
add (one more kernel on the torch path) is fused into the first norm backward. The
matmuls stay torch's (cuBLAS) unless ``ATE_FAST_SKINNY_GEMM=triton``, where at B = 1 (≤ 64
rows) they run on the few-row Triton GEMM (:mod:`ate_fast.models.skinny_gemm`: x·Wᵀ forward,
x·W with the weight as stored backward) — with linear1's bias and activation in its
epilogue (the pre-activation kept in the compute dtype) and the activation's derivative in
the epilogue of the product with W2, so a layer is 7 + 7 kernels
(``tests/test_transformer_triton.py::test_an_encoder_layer_is_fourteen_launches``); the
input and skip projections and the latent's heads run on it too — and, with
``ATE_FAST_TRITON_PDL=on``, every kernel of a layer is a programmatic dependent launch
(never run on a GPU). Otherwise bias + GELU is a 1:1 swap (the bias leaves the matmul for
the element-wise kernel, which also keeps the pre-activation for the backward). Tested on
the CPU through the Triton interpreter (float32, float64) and compiled offline for sm_87
and sm_90; on an H200 (2026-12-04, ``bench_transformer_guidance.py``, each path replayed
from a CUDA graph, the paper's 9-layer encoder) the gradient took 0.61 ms against the VJP's
0.97 ms in bf16 at B = 1 (1.58×) and 1.58 vs 1.63 ms in float32 (1.03×); at B = 8 and 64
(float32) the VJP was faster (1.06×, 1.53×), and bf16 at B = 8 was not reached.

The torch path's score-sized matrices [B, heads, Tq, T] (the scores, ``p``, ``dp``,
``ds``) are written into rows padded to 16 bytes where an ``out=`` write may run, and
``q``, ``k``, ``v`` are made head-major once (``kᵀ``, ``vᵀ`` then transposed views, not
copies into rows of T elements): at the paper's T = 52 tokens a bf16 / fp16 row is 104
bytes, which leaves cuBLAS its two-element-aligned kernels (as π0's 866-key rows did on an
H200, :mod:`ate_fast.models.gemm_alignment`). The products are bitwise unchanged
(``tests/test_gemm_alignment.py``); not measured on a GPU yet.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from types import ModuleType
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ate_fast.align.action_mask import apply_mask
from ate_fast.align.transformer_vae import TransformerEncoder
from ate_fast.align.vae import ActionVAE
from ate_fast.errors import InvalidArgumentError
from ate_fast.models import skinny_gemm
from ate_fast.models.cpu_gemm import linear, times_weight
from ate_fast.models.gemm_alignment import aligned_rows, aligned_writes_may_run
from ate_fast.models.skinny_gemm import block_linear, block_times_weight
from ate_fast.module_checks import plain_tree
from ate_fast.ops import backends

ENV_VAR = "ATE_FAST_TRANSFORMER_GUIDANCE"
PATHS = ("autograd", "vjp", "compiled", "triton")
# device type -> default path; device types not listed use "autograd". Both measured
# (benchmarks/README.md): CPU 1.05-1.36x; H100, each replayed from a CUDA graph, 1.11-1.60x.
DEFAULT_PATH = {"cpu": "vjp", "cuda": "vjp"}
# device type -> the default for a batch of one where Triton runs there: on an H200 the
# Triton kernels beat the VJP at B = 1 in bf16 (1.58x) and float32 (1.03x), not at B = 8
# in float32 (0.94x)
SINGLE_SAMPLE_PATH = {"cuda": "triton"}
# device type -> the largest batch for which a half-precision (bf16 / fp16) gradient takes
# the single-sample path too: on an H200 (2026-12-04, graphed) bf16 at B = 8 ran 720 µs on
# the Triton kernels against the VJP's 1288 µs (1.79x; B = 1: 1.59x)
HALF_PRECISION_MAX_BATCH = {"cuda": 8}


def selected_path(
    device_type: str, batch: Optional[int] = None, dtype: Optional[torch.dtype] = None
) -> str:
    """One of :data:`PATHS`: the forced path (``$ATE_FAST_TRANSFORMER_GUIDANCE``), or the
    default for ``device_type`` and, where given, the ``batch`` size and the data's
    ``dtype``."""
    forced = os.environ.get(ENV_VAR, "").strip().lower()  # any case, as the other selectors
    if forced:
        if forced not in PATHS:
            raise InvalidArgumentError(f"{ENV_VAR}: expected one of {list(PATHS)}, got {forced!r}")
        return forced
    single = SINGLE_SAMPLE_PATH.get(device_type)
    half = dtype in (torch.bfloat16, torch.float16)
    largest = HALF_PRECISION_MAX_BATCH.get(device_type, 1) if half else 1
    if batch is not None and 1 <= batch <= largest and single is not None:
        if single != "triton" or backends.availability("triton", device_type)[0]:
            return single
    return DEFAULT_PATH.get(device_type, "autograd")


def vjp_function(
    device_type: str, batch: Optional[int] = None, dtype: Optional[torch.dtype] = None
) -> Callable[..., Tensor]:
    """:func:`transformer_latent_gradient`, its ``torch.compile`` form where the
    ``compiled`` path is selected for ``device_type``, or its Triton-kernel form
    (``kernels="triton"``) where the ``triton`` path is (raises
    :class:`~ate_fast.errors.BackendUnavailableError` where Triton cannot run)."""
    global _COMPILED
    path = selected_path(device_type, batch, dtype)
    if path == "triton":
        backends.require_triton(device_type, f"{ENV_VAR}=triton")
        return functools.partial(transformer_latent_gradient, kernels="triton")
    if path != "compiled":
        return transformer_latent_gradient
    if _COMPILED is None:
        _COMPILED = torch.compile(transformer_latent_gradient, dynamic=False, fullgraph=True)
    return _COMPILED


_COMPILED: Optional[Callable[..., Tensor]] = None


def _supported_layer(layer: nn.Module) -> bool:
    if type(layer) is not nn.TransformerEncoderLayer or layer.norm_first:
        return False
    attn = layer.self_attn
    if not (attn.batch_first and attn._qkv_same_embed_dim and attn.in_proj_bias is not None):
        return False
    if attn.bias_k is not None or attn.add_zero_attn or attn.out_proj.bias is None:
        return False
    if layer.training and (attn.dropout > 0 or layer.dropout.p > 0 or layer.dropout1.p > 0):
        return False
    return layer.activation in (F.gelu, F.relu) and layer.linear1.bias is not None


def _layers(blocks: nn.Module) -> list[nn.Module]:
    """A skip stack's Transformer layers in forward order: input, middle, output."""
    return [*blocks.input_blocks, blocks.middle_block, *blocks.output_blocks]


def supported_encoder(module: nn.Module) -> bool:
    """Whether :func:`transformer_latent_gradient` computes ``module`` (an
    ``ate_fast.align`` ``TransformerEncoder``) exactly: every layer in the supported form, and
    no forward hook or wrapped submodule anywhere in it (the VJP reads their weights)."""
    plain = plain_tree(module)  # no hooks, no wrapped layer whose weights the VJP would read
    return plain and all(_supported_layer(layer) for layer in _layers(module.blocks))


def align_transformer_encoder(source: object) -> Optional[nn.Module]:
    """The ``ate_fast.align`` ``TransformerEncoder`` that ``source`` computes (an
    ``ActionVAE`` of that arch, or the encoder itself) if every layer is in the form
    :func:`transformer_latent_gradient` covers; else ``None``."""
    module = source.encoder if isinstance(source, ActionVAE) else source
    if isinstance(module, TransformerEncoder) and supported_encoder(module):
        return module
    return None


# --- pieces -------------------------------------------------------------------------------
def _norm(x: Tensor, norm: nn.LayerNorm) -> tuple[Tensor, tuple]:
    out, mean, rstd = torch.native_layer_norm(
        x, norm.normalized_shape, norm.weight, norm.bias, norm.eps
    )
    return out, (x, mean, rstd, norm)


def _norm_backward(grad: Tensor, saved: tuple) -> Tensor:
    x, mean, rstd, norm = saved
    dx, _, _ = torch.ops.aten.native_layer_norm_backward(
        grad, x, norm.normalized_shape, mean, rstd, norm.weight, norm.bias, [True, False, False]
    )
    return dx


def _activation_backward(grad: Tensor, pre: Tensor, activation) -> Tensor:
    if activation is F.gelu:
        return torch.ops.aten.gelu_backward(grad, pre)
    return grad * (pre > 0).to(grad.dtype)  # relu


def _heads(t: Tensor, num_heads: int) -> Tensor:
    """[B, T, d] -> [B, nh, T, d/nh]."""
    b, n, d = t.shape
    return t.view(b, n, num_heads, d // num_heads).transpose(1, 2)


def _merge(t: Tensor) -> Tensor:
    """[B, nh, T, hd] -> [B, T, nh·hd]."""
    b, nh, n, hd = t.shape
    return t.transpose(1, 2).reshape(b, n, nh * hd)


def _score_buffer(like: Tensor, shape: Optional[tuple] = None) -> Optional[Tensor]:
    """An ``out=`` buffer of ``shape`` (default ``like``'s) [B, nh, Tq, T] for a
    score-sized attention matrix, its rows padded to 16 bytes — at the paper's T = H + 2 =
    52 tokens a bf16 row is 104 bytes, and cuBLAS takes its two-element-aligned kernels for
    a batched GEMM that reads or writes such rows (:mod:`ate_fast.models.gemm_alignment`);
    None (a plain result) where an ``out=`` write may not run (autograd records, a
    transform, a trace, autocast) or pads nothing (float32 at 52 tokens: 208 bytes)."""
    shape = tuple(like.shape) if shape is None else shape
    if (shape[-1] * like.element_size()) % 16 == 0 or not aligned_writes_may_run(like):
        return None
    return aligned_rows(shape, like)


def _product(a: Tensor, b: Tensor) -> Tensor:
    """``a·b`` [B, nh, Tq, T] (``b`` a transposed [B, nh, T, hd]), into a
    :func:`_score_buffer` where it pads."""
    buffer = _score_buffer(a, (*a.shape[:-1], b.shape[-1]))
    return a @ b if buffer is None else torch.matmul(a, b, out=buffer)


def _softmax(scores: Tensor) -> Tensor:
    """``softmax`` over the last dim of ``scores``, into a :func:`_score_buffer` where it
    pads (``p`` is the A operand of ``p·v`` and of the backward's products)."""
    buffer = _score_buffer(scores)
    if buffer is None:
        return torch.softmax(scores, dim=-1)
    return torch.softmax(scores, dim=-1, out=buffer)


def _layer_forward(layer: nn.TransformerEncoderLayer, h: Tensor, rows: Optional[int]):
    """Post-norm layer on ``h`` [B, T, d]; output rows ``[:rows]`` only when ``rows`` is set
    (keys and values still from all T tokens) -> ``(out [B, rows or T, d], saved)``."""
    attn = layer.self_attn
    d, nh = attn.embed_dim, attn.num_heads
    w_in, b_in = attn.in_proj_weight, attn.in_proj_bias
    if rows is None:
        q, k, v = linear(h, w_in, b_in).split(d, dim=-1)
        hq = h
    else:
        hq = h[:, :rows]
        q = linear(hq, w_in[:d], b_in[:d])
        k, v = linear(h, w_in[d:], b_in[d:]).split(d, dim=-1)
    # head-major copies, made once: each is a GEMM operand twice (forward and backward),
    # and kᵀ, vᵀ then stay transposed views (row stride hd); a strided view would be copied
    # by every matmul, kᵀ and vᵀ into rows of T elements (misaligned: _score_buffer)
    q, k, v = _heads(q, nh).contiguous(), _heads(k, nh).contiguous(), _heads(v, nh).contiguous()
    scale = 1.0 / math.sqrt(d // nh)
    p = _softmax(_product(q, k.transpose(-1, -2)) * scale)  # [B, nh, Tq, T]
    o = _merge(p @ v)
    h1, n1 = _norm(hq + linear(o, attn.out_proj.weight, attn.out_proj.bias), layer.norm1)
    pre = linear(h1, layer.linear1.weight, layer.linear1.bias)
    r2 = h1 + linear(layer.activation(pre), layer.linear2.weight, layer.linear2.bias)
    out, n2 = _norm(r2, layer.norm2)
    return out, (layer, rows, q, k, v, p, n1, pre, n2, scale)


def _layer_backward(grad: Tensor, extra: Optional[Tensor], saved: tuple) -> Tensor:
    """``∂/∂h`` [B, T, d] of the layer from ``grad (+ extra)`` [B, rows or T, d] on its
    output."""
    layer, rows, q, k, v, p, n1, pre, n2, scale = saved
    attn = layer.self_attn
    d, nh = attn.embed_dim, attn.num_heads
    dr2 = _norm_backward(grad if extra is None else grad + extra, n2)
    dpre = _activation_backward(times_weight(dr2, layer.linear2.weight), pre, layer.activation)
    dr1 = _norm_backward(dr2 + times_weight(dpre, layer.linear1.weight), n1)
    do = _heads(times_weight(dr1, attn.out_proj.weight), nh)  # [B, nh, Tq, hd]
    dp = _product(do, v.transpose(-1, -2))
    ds = p * (dp - (dp * p).sum(dim=-1, keepdim=True))  # softmax backward
    buffer = _score_buffer(ds)
    ds = ds * scale if buffer is None else torch.mul(ds, scale, out=buffer)
    dq, dk, dv = _merge(ds @ k), _merge(ds.transpose(-1, -2) @ q), _merge(p.transpose(-1, -2) @ do)
    w_in = attn.in_proj_weight
    if rows is None:
        return dr1 + times_weight(torch.cat([dq, dk, dv], dim=-1), w_in)
    dh = times_weight(torch.cat([dk, dv], dim=-1), w_in[d:])
    dh[:, :rows].add_(dr1 + times_weight(dq, w_in[:d]))  # (`+=` would copy it back)
    return dh


# --- the same layer on the Triton kernels (the ``triton`` path) --------------------------
def _kernels() -> ModuleType:
    """:mod:`ate_fast.steer.transformer_triton`, imported on first use (importing triton
    costs a second)."""
    import ate_fast.steer.transformer_triton as kernels

    return kernels


def _act_code(layer: nn.TransformerEncoderLayer) -> int:
    tt = _kernels()
    return tt.ACT_GELU if layer.activation is F.gelu else tt.ACT_RELU


def _layer_forward_triton(layer: nn.TransformerEncoderLayer, h: Tensor, rows: Optional[int]):
    """:func:`_layer_forward` on the Triton kernels: attention, add + norm and bias + act
    in one kernel each; the projections torch matmuls or, with
    ``ATE_FAST_SKINNY_GEMM=triton`` at few rows, the few-row Triton GEMM."""
    tt = _kernels()
    attn = layer.self_attn
    d, nh = attn.embed_dim, attn.num_heads
    w_in, b_in = attn.in_proj_weight, attn.in_proj_bias
    if rows is None:
        hq = h
        q, k, v = block_linear(h, w_in, b_in).split(d, dim=-1)  # views of one [B, T, 3d]
    else:
        hq = h[:, :rows]
        q = block_linear(hq, w_in[:d], b_in[:d])
        k, v = block_linear(h, w_in[d:], b_in[d:]).split(d, dim=-1)
    o, att = tt.attention(q, k, v, nh)
    h1, n1 = tt.add_norm(hq, block_linear(o, attn.out_proj.weight, attn.out_proj.bias), layer.norm1)
    act, w1, b1 = _act_code(layer), layer.linear1.weight, layer.linear1.bias
    if skinny_gemm.takes(h1, w1, b1):  # linear1 and bias + act in one launch
        pre, a = skinny_gemm.skinny_linear_act(h1, w1, b1, act)
    else:
        pre, a = tt.bias_act(block_linear(h1, w1), b1, act)
    r2 = block_linear(a, layer.linear2.weight, layer.linear2.bias)
    out, n2 = tt.add_norm(h1, r2, layer.norm2)
    return out, (layer, rows, att, n1, pre, n2, act)


def _layer_backward_triton(grad: Tensor, extra: Optional[Tensor], saved: tuple) -> Tensor:
    """:func:`_layer_backward` on the Triton kernels."""
    tt = _kernels()
    layer, rows, att, n1, pre, n2, act = saved
    attn = layer.self_attn
    d = attn.embed_dim
    dr2 = tt.norm_backward(grad, extra, n2, layer.norm2.weight)
    w2 = layer.linear2.weight
    if skinny_gemm.takes(dr2, w2) and pre.is_contiguous():
        dpre = skinny_gemm.skinny_matmul_act_grad(dr2, w2, pre, act)  # ·W2 and act' at once
    else:
        dpre = tt.act_backward(block_times_weight(dr2, w2), pre, act)
    dh1 = block_times_weight(dpre, layer.linear1.weight)
    dr1 = tt.norm_backward(dr2, dh1, n1, layer.norm1.weight)
    do = block_times_weight(dr1, attn.out_proj.weight)  # [B, rows or T, d]
    batch, tokens = att[1].shape[:2]
    w_in = attn.in_proj_weight
    if rows is None:
        dqkv = torch.empty((batch, tokens, 3 * d), dtype=grad.dtype, device=grad.device)
        tt.attention_backward(do, att, *dqkv.split(d, dim=-1))
        return block_times_weight(dqkv, w_in, dr1)  # dr1 + dqkv·W_in
    dq = torch.empty((batch, rows, d), dtype=grad.dtype, device=grad.device)
    dkv = torch.empty((batch, tokens, 2 * d), dtype=grad.dtype, device=grad.device)
    tt.attention_backward(do, att, dq, *dkv.split(d, dim=-1))
    dh = block_times_weight(dkv, w_in[d:])
    dh[:, :rows].add_(block_times_weight(dq, w_in[:d], dr1))  # (`+=` would copy it back)
    return dh


def _norm_triton(x: Tensor, norm: nn.LayerNorm) -> tuple[Tensor, tuple]:
    out, saved = _kernels().add_norm(x, None, norm)
    return out, (saved, norm.weight)


def _norm_backward_triton(grad: Tensor, saved: tuple) -> Tensor:
    stats, weight = saved
    return _kernels().norm_backward(grad, None, stats, weight)


class _Kernels(NamedTuple):
    layer_forward: Callable
    layer_backward: Callable
    norm: Callable
    norm_backward: Callable
    linear: Callable  # F.linear(x, W, b) of the encoder's other projections
    times_weight: Callable  # g @ W: their input-VJP


KERNELS = {
    "torch": _Kernels(_layer_forward, _layer_backward, _norm, _norm_backward, linear, times_weight),
    # the input and skip projections and the heads on the few-row GEMM too where it runs
    "triton": _Kernels(
        _layer_forward_triton,
        _layer_backward_triton,
        _norm_triton,
        _norm_backward_triton,
        block_linear,
        block_times_weight,
    ),
}


# --- the encoder --------------------------------------------------------------------------
def transformer_latent_gradient(
    module: nn.Module,
    x: Tensor,
    target: Tensor,
    *,
    mask: Optional[Tensor] = None,
    eps: Optional[Tensor] = None,
    reduction: str = "sample",
    kernels: str = "torch",
) -> Tensor:
    """``g`` [B, H, D] of ``−s‖z(x) − target‖²`` through ``module`` (a supported
    ``TransformerEncoder``) for ``x`` [B, H, D] and ``target`` [d_z] or [B, d_z].

    ``z = μ`` when ``eps`` is None, else ``μ + exp(½ log σ²)·eps`` (``eps`` [B, d_z]);
    ``mask`` ([D] or [B, D]) zeroes absent action dims as the encoder does. ``kernels``:
    ``"torch"`` (torch ops) or ``"triton"`` (:mod:`ate_fast.steer.transformer_triton`'s
    kernels).
    """
    ops = KERNELS[kernels]
    blocks = module.blocks
    rows = 1 if eps is None else 2  # the tokens the latent reads: μ (and log σ²)
    batch = x.shape[0]

    # forward, keeping what the backward needs
    masked = apply_mask(x, mask)
    tokens = module.dist_tokens.unsqueeze(0).expand(batch, -1, -1)
    projected = ops.linear(masked, module.input_proj.weight, module.input_proj.bias)
    h = torch.cat([tokens, projected], 1)
    h = h + module.positions
    layers = _layers(blocks)
    saved, skips = [], []
    for i, layer in enumerate(layers):
        j = i - len(blocks.input_blocks) - 1  # index among the output layers
        if j >= 0:
            proj = blocks.skip_projections[j]
            h = ops.linear(torch.cat([h, skips[-1 - j]], dim=-1), proj.weight, proj.bias)
        h, kept = ops.layer_forward(layer, h, rows if i == len(layers) - 1 else None)
        saved.append(kept)
        if i < len(blocks.input_blocks):
            skips.append(h)
    h, final = ops.norm(h, blocks.norm)  # [B, rows, d]

    def head(m: nn.Module, t: Tensor) -> Tensor:
        return t if isinstance(m, nn.Identity) else ops.linear(t, m.weight, m.bias)

    def head_backward(m: nn.Module, grad: Tensor) -> Tensor:
        return grad if isinstance(m, nn.Identity) else ops.times_weight(grad, m.weight)

    mu = head(module.mu_head, h[:, 0])
    dz = mu.shape[-1]
    coef = 1.0 / dz if reduction == "sample" else 1.0 / (batch * dz)
    if eps is None:
        dy_dz = -2.0 * coef * (mu - target)
        rows_grad = [head_backward(module.mu_head, dy_dz)]
    else:  # z = μ + exp(½ log σ²)·ε: ∂z/∂ log σ² = ½ exp(½ log σ²)·ε
        spread = torch.exp(0.5 * head(module.logvar_head, h[:, 1])) * eps
        dy_dz = -2.0 * coef * (mu + spread - target)
        rows_grad = [head_backward(module.mu_head, dy_dz),
                     head_backward(module.logvar_head, 0.5 * spread * dy_dz)]  # fmt: skip
    # [B, rows, d] in h's dtype: the μ token's row (and log σ²'s) — no zeroed buffer to copy
    # the rows into (rows are the tokens the latent reads: the last layer's only outputs)
    dh = (rows_grad[0][:, None] if eps is None else torch.stack(rows_grad, dim=1)).to(h.dtype)

    # backward, input gradient only
    dh = ops.norm_backward(dh, final)
    skip_grads: list[Optional[Tensor]] = [None] * len(blocks.input_blocks)
    for i in reversed(range(len(layers))):
        extra = skip_grads[i] if i < len(blocks.input_blocks) else None
        dh = ops.layer_backward(dh, extra, saved[i])
        j = i - len(blocks.input_blocks) - 1
        if j >= 0:
            dcat = ops.times_weight(dh, blocks.skip_projections[j].weight)
            d = dh.shape[-1]
            dh = dcat[..., :d]
            skip_grads[len(blocks.input_blocks) - 1 - j] = dcat[..., d:]
    g = ops.times_weight(dh[:, 2:], module.input_proj.weight)
    return apply_mask(g, mask).contiguous()
