"""The flow-transformer block's attention against its prefix as two GEMMs and a softmax
(``ATE_FAST_PREFIX_ATTENTION=gemm``).

At B = 1 π0's block attends 400 query rows (50 tokens × 8 heads folded onto the one
key/value head) to 866 keys: 0.9 MB of keys and values and 0.35 GFLOP, which an H200 reads
in well under a microsecond. SDPA's fused kernels give each program a tile of 64–128 rows
and walk every key inside it, so the 400 rows are 7 programs on 132 SMs: cuDNN's kernel
took 24.5 µs per block, 0.44 of the step's 1.17 ms (2026-12-04). Written as matrix
products the same attention is

    S = q·kᵀ        cuBLAS: 400 × 866 outputs over dozens of tiles
    P = softmax(S / √hd)   one row per program
    O = P·v

three kernels, each short and spread over the GPU. What a fused kernel saves — the score
matrix's round trip through memory — is 1.4 MB at B = 1 in float32 (11 MB at B = 8), which
stays in L2.

Numerics as flash attention's: the scores and the softmax in float32 (float64 for float64
inputs), the probabilities rounded once to the inputs' dtype for ``P·v``. For bfloat16 /
float16 on CUDA the first GEMM writes float32 itself (``torch.bmm(..., out_dtype=)``, where
this torch has it); elsewhere q and k are upcast first. The softmax is one Triton kernel
where the block's Triton epilogues run (:func:`ate_fast.models.block_epilogues.use_triton`),
else torch's. Scores and probabilities are written into rows padded to 16 bytes
(:mod:`ate_fast.models.gemm_alignment`: at 866 keys a bf16 row is 1732 bytes, which left
cuBLAS its slowest kernels in the input-VJP's products). Takes what the other split paths
take (:func:`ate_fast.models.split_kv_attention.takes`: nothing recording or tracing) and
a padded prefix's additive mask too (:func:`takes_mask`: added to the scores in the
softmax kernel), which keeps SDPA on the other paths; any number of key/value heads. A
forward that saves for its input-VJP (real-time chunking's pullback) keeps the
probabilities (:func:`gemm_attention_saving`), and the pullback takes them instead of its
own product of q and k and the softmax it recomputes:
one score-sized GEMM fewer per block there. **Not run on a GPU yet**: bench_realsize's
``ate_capture_gemm_attention`` row and bench_prefix_attention's ``gemm`` rows.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ate_fast.models import block_epilogues
from ate_fast.models.block_epilogues import MAX_ROW
from ate_fast.models.gemm_alignment import aligned_rows, aligned_writes_may_run

HALF = (torch.float16, torch.bfloat16)


def float32_output_gemm() -> bool:
    """Whether this torch has ``bmm(..., out_dtype=)`` (a half-precision product written
    in float32 by cuBLAS; CUDA only)."""
    return "dtype" in torch.ops.aten.bmm.overloads()


def _scores(q: Tensor, k: Tensor, accumulate: torch.dtype) -> Tensor:
    """``q·kᵀ`` [BH, rows, N] in ``accumulate`` (float32 / float64) for ``q`` [BH, rows,
    hd], ``k`` [BH, N, hd]; into 16-byte-aligned rows where an ``out=`` write may run."""
    half_on_cuda = q.dtype in HALF and q.is_cuda and float32_output_gemm()
    if q.dtype != accumulate and not half_on_cuda:
        q, k = q.to(accumulate), k.to(accumulate)
    kt = k.transpose(-1, -2)
    if not aligned_writes_may_run(q, k):
        return torch.bmm(q, kt, out_dtype=accumulate) if half_on_cuda else torch.bmm(q, kt)
    out = aligned_rows((q.shape[0], q.shape[1], k.shape[1]), q.new_empty((), dtype=accumulate))
    if half_on_cuda:
        return torch.bmm(q, kt, out_dtype=accumulate, out=out)
    return torch.bmm(q, kt, out=out)


def takes_mask(mask: Tensor, q: Tensor, k: Tensor) -> bool:
    """Whether ``mask`` is what the head passes for a padded prefix and this path adds:
    additive, floating, [B, 1, 1, N] for ``q`` [B, heads, rows, hd], ``k`` [B, heads, N, hd]
    (a boolean or per-row mask keeps SDPA)."""
    return (
        mask.is_floating_point()
        and mask.dim() == 4
        and tuple(mask.shape) == (q.shape[0], 1, 1, k.shape[-2])
        and mask.device == q.device
    )


def _probabilities(scores: Tensor, scale: float, dtype: torch.dtype, like: Tensor,
                   bias: Optional[Tensor], heads: int) -> Tensor:  # fmt: skip
    """``softmax(scores·scale + bias)`` [B·heads, rows, N] in ``dtype`` (``bias`` [B, 1, 1,
    N] or None, each sample's row for its ``heads`` slices): one Triton kernel where the
    block's epilogues run on Triton (``like``: the inputs that decide), else torch's ops."""
    if scores.shape[-1] <= MAX_ROW and block_epilogues.use_triton(like):
        import ate_fast.models.block_epilogues_triton as kernels

        return kernels.softmax(scores, scale, dtype, bias, heads * scores.shape[1])
    logits = scores * scale
    if bias is not None:  # [B, 1, 1, N] -> each of the sample's B·heads slices [.., 1, N]
        logits = logits.view(bias.shape[0], heads, *scores.shape[1:]) + bias
    p = torch.softmax(logits, dim=-1).view(scores.shape)
    if not aligned_writes_may_run(like):
        return p.to(dtype)
    return aligned_rows(p.shape, like).copy_(p)


def gemm_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=mask)`` [B, heads, rows, hd] as
    ``softmax(q·kᵀ/√hd + mask)·v``: ``q`` [B, heads, rows, hd], ``k``, ``v`` [B, heads, N,
    hd] (heads: the key/value heads, each with its query heads folded into its rows);
    ``mask``: None, or additive [B, 1, 1, N] (:func:`takes_mask`: a padded prefix's −∞)."""
    return gemm_attention_saving(q, k, v, mask)[0]


def gemm_attention_saving(
    q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """``(gemm_attention(q, k, v, mask), p)`` with the probabilities ``p`` [B, heads, rows,
    N] (in q's dtype, 16-byte rows) it multiplied v by — what the input-VJP would recompute
    (:func:`ate_fast.models.flow_transformer_vjp.attention_input_vjp` takes them instead)."""
    batch, heads, rows, hd = q.shape
    n = k.shape[-2]
    accumulate = torch.float64 if q.dtype == torch.float64 else torch.float32
    q3, k3, v3 = q.reshape(-1, rows, hd), k.reshape(-1, n, hd), v.reshape(-1, n, hd)
    scores = _scores(q3, k3, accumulate)
    p = _probabilities(scores, hd**-0.5, q.dtype, q3, mask, heads)
    return torch.bmm(p, v3).view(batch, heads, rows, hd), p.view(batch, heads, rows, n)
