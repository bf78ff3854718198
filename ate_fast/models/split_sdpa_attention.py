"""The flow-transformer block's attention with its keys split into chunks, each chunk on
torch's flash-attention kernel (``ATE_FAST_PREFIX_ATTENTION=split_sdpa``), combined by their
log-sum-exps.

At B = 1 π0's block attends 400 query rows (50 tokens × 8 heads folded onto the one
key/value head) to 866 keys: every SDPA kernel gives a program a tile of rows and walks all
the keys in it, so the 400 rows are 7 programs on a 132-SM GPU (H200, 2026-12-04: cuDNN's
kernel 24.5 µs per block, as long at B = 8 with 8× the rows — bound by each program's walk
over the keys, not by the GPU). Here the keys are cut into ``chunks`` slices of whole
64-key tiles and each slice is a head of one flash-attention call (the rows repeated per
slice, a 0.2 MB copy at π0's B = 1), so each program walks ``1/chunks`` of the keys; a
shorter last slice is a second call; one Triton kernel
(:func:`~ate_fast.models.split_kv_attention_triton.combine_lse`) weights the slices'
outputs by ``exp(lse − max lse)``. Four kernels instead of one, each short: the vendor's
tuned attention kernel does the work (``split_kv`` does it in our own Triton kernel,
``flex`` in Inductor's).

The log-sum-exps come from ATen's flash-attention op (``_scaled_dot_product_flash_attention``
on CUDA, ``…_for_cpu`` on the CPU, where the tests check the path in float64); the public
SDPA does not return them. CUDA's flash kernel takes float16 / bfloat16 and head dims up
to 256: other dtypes keep SDPA (as does more than one key/value head, whose chunks would
not be a view). ``ATE_FAST_SPLIT_SDPA_CHUNKS`` (default :data:`DEFAULT_CHUNKS`) sets the
number of slices. **Not run on a GPU yet**: an A/B row of ``bench_realsize.py``
(``ate_capture_split_sdpa_attention``) and a sweep of ``bench_prefix_attention.py``.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from ate_fast.errors import InvalidArgumentError

CHUNKS_VAR = "ATE_FAST_SPLIT_SDPA_CHUNKS"
DEFAULT_CHUNKS = 8
TILE_KEYS = 64  # a slice is whole tiles of the flash kernel's keys (64 for head dim 256)
CUDA_DTYPES = (torch.float16, torch.bfloat16)  # what CUDA's flash kernel takes
MAX_HEAD_DIM = 256


def chunks_from_env() -> int:
    """``$ATE_FAST_SPLIT_SDPA_CHUNKS``: key slices per call (≥ 2), :data:`DEFAULT_CHUNKS`
    where unset."""
    text = os.environ.get(CHUNKS_VAR, "").strip()
    if not text:
        return DEFAULT_CHUNKS
    if not text.isdigit() or int(text) < 2:
        raise InvalidArgumentError(f"{CHUNKS_VAR}: expected a whole number >= 2, got {text!r}")
    return int(text)


def runs_on(q: Tensor, k: Tensor) -> bool:
    """Whether the flash op takes ``q`` [B, kv_heads, rows, hd] against ``k``: one
    key/value head, head dim ≤ 256 (a multiple of 8 on CUDA), and on CUDA float16 /
    bfloat16."""
    hd = q.shape[-1]
    if k.shape[1] != 1 or hd > MAX_HEAD_DIM:
        return False
    return q.device.type != "cuda" or (q.dtype in CUDA_DTYPES and hd % 8 == 0)


def slices(keys: int, chunks: int) -> tuple[int, int, int]:
    """``(width, full, rest)``: slices of ``width`` keys (whole :data:`TILE_KEYS` tiles,
    about ``keys / chunks``), ``full`` of them, and the ``rest`` keys after them (0: none)."""
    width = -(-keys // chunks)
    width = min(keys, -(-width // TILE_KEYS) * TILE_KEYS)
    return width, keys // width, keys % width


def lse_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``(softmax(q·kᵀ·scale)·v, logsumexp(q·kᵀ·scale))`` [B, H, rows, hd], [B, H, rows]
    (float32; float64 for float64 data) on ATen's flash-attention op."""
    aten = torch.ops.aten
    if q.device.type == "cuda":  # (output, logsumexp, then the varlen and RNG outputs)
        out = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
        return out[0], out[1]
    return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)


def split_sdpa_attention(q: Tensor, k: Tensor, v: Tensor, chunks: Optional[int] = None) -> Tensor:
    """``softmax(q·kᵀ/√hd)·v`` [B, 1, rows, hd] (contiguous, q's dtype) for ``q`` [B, 1,
    rows, hd] and ``k``, ``v`` [B, 1, keys, hd] (unit last stride; :func:`runs_on`), the
    keys in ``chunks`` slices (:func:`chunks_from_env` where None)."""
    from ate_fast.models.split_kv_attention_triton import combine_lse  # triton

    batch, _, rows, hd = q.shape
    width, full, rest = slices(k.shape[2], chunks or chunks_from_env())
    scale = hd**-0.5
    sliced = width * full
    # the slices as heads: views of the keys and values, the rows repeated per slice
    kk = k[:, :, :sliced].reshape(batch, full, width, hd)
    vv = v[:, :, :sliced].reshape(batch, full, width, hd)
    qq = q.expand(batch, full, rows, hd).contiguous()
    o1, l1 = lse_attention(qq, kk, vv, scale)
    tail = None
    if rest:
        tail = lse_attention(q, k[:, :, sliced:], v[:, :, sliced:], scale)
    return combine_lse(o1, l1, tail, full)
