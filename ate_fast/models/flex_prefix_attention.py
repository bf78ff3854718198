"""The flow-transformer block's attention on torch's FlexAttention
(``ATE_FAST_PREFIX_ATTENTION=flex``): torch's own split-key ("flex decoding") kernel.

At B = 1 π0's block attends 400 query rows (50 tokens × 8 heads, folded onto its one
key/value head) to 866 keys; SDPA's kernels give each program a tile of rows and walk all
the keys in it, so 400 rows are 7 programs on a 132-SM GPU (H200, 2026-12-04: 24.5 µs per
block, 38 % of the step's kernel time). ``flex_attention`` under ``torch.compile`` takes
queries this short (< 128 rows per head) to its decoding kernel, which splits the keys
over the GPU and combines the slices — what ``split_kv_attention_triton`` does by hand,
from a library that keeps it.

The rows go in as ``m`` query heads of ``rows / m`` rows each on their key/value head
(``enable_gqa``): a view of the head's contiguous ``q`` [B, kv_heads, rows, hd], not a
copy — attention's rows are independent of one another, so any grouping of them into heads
of the same key/value head is exact, and the output's view back is the head's layout.
``m`` is the smallest divisor of ``rows`` that leaves at most :data:`MAX_ROWS_PER_HEAD`
rows per head (π0: 8 heads of 50, its own query heads).

Compiled once per shape and dtype (``dynamic=False``) at the first call — a sampler's
capture warms up before it records, so the compile never happens inside a CUDA graph. On
the CPU (Inductor's C++ backend) it runs too; the tests check it there against SDPA.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import torch
from torch import Tensor

try:  # torch ≥ 2.5
    from torch.nn.attention.flex_attention import flex_attention
except ImportError:  # pragma: no cover - an older torch: the path raises where selected
    flex_attention = None

MAX_ROWS_PER_HEAD = 64  # below flex decoding's 128-row limit, one tile of rows per head
# the dtypes it takes (the CPU's Inductor backend has no float64 FlexAttention: SDPA runs)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def unavailable_reason() -> Optional[str]:
    """Why FlexAttention cannot run in this torch, or None where it can."""
    if flex_attention is None:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention (≥ 2.5)"
    return None


def query_heads(rows: int) -> int:
    """``m``: the smallest divisor of ``rows`` with at most :data:`MAX_ROWS_PER_HEAD` rows
    per head (``rows`` itself, one row each, at worst)."""
    return next(m for m in range(1, rows + 1) if rows % m == 0 and rows // m <= MAX_ROWS_PER_HEAD)


@functools.cache
def _compiled() -> Callable[..., Any]:
    return torch.compile(flex_attention, dynamic=False)


def flex_prefix_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``softmax(q·kᵀ/√hd)·v`` [B, kv_heads, rows, hd] for ``q`` [B, kv_heads, rows, hd]
    (contiguous) and ``k``, ``v`` [B, kv_heads, keys, hd], on compiled FlexAttention."""
    batch, kv_heads, rows, hd = q.shape
    heads = query_heads(rows)
    grouped = q.view(batch, kv_heads * heads, rows // heads, hd)
    out = _compiled()(grouped, k, v, enable_gqa=True)
    return out.reshape(q.shape)
