"""The Triton kernels of :mod:`ate_fast.models.split_kv_attention`: attention of a few
hundred query rows against a long key/value sequence, the keys split over many programs
(flash-decoding), then one combine.

**Status: ran on an H200 (2026-12-04), correct (``test_pi0_step_on_cuda``) and not
faster than SDPA in the captured call** (see the module that selects it). It passes
the CPU tests through the Triton interpreter (float64, float32, bfloat16 against
``F.scaled_dot_product_attention``) and compiles offline for sm_87 and sm_90
(``tests/triton_offline_compile.py``).

Why: in π0's step at B = 1 attention is 400 query rows (50 tokens × 8 heads folded onto the
one key/value head) against 866 keys of 256 dims. The SDPA kernel torch picks on an H200
(cuDNN's flash forward, 64 × 128 tiles of queries × keys) runs it on 7 programs, one per 64
query rows, each reading all 0.9 MB of keys and values: 24.5 µs per block, 38 % of the step's
kernel time (2026-12-04). Here every (block of queries, slice of keys) pair is a program:

* :func:`_partial_kernel` — per program ``BLOCK_Q`` queries against its slice of keys, in
  ``BLOCK_K`` chunks with the online softmax; writes its un-normalised output and its rows'
  running max and sum (float32);
* :func:`_combine_kernel` — per block of rows, the slices' outputs weighted by
  ``exp(m_s − M)`` and divided by the weighted sums: the softmax over all keys.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ate_fast.ops.constants import compute_dtype
from ate_fast.ops.triton_dot import accumulator_type
from ate_fast.ops.triton_dot import tile_dot as _dot
from ate_fast.ops.triton_resources import launch_limits

_limits = launch_limits(
    "ATE_FAST_PREFIX_ATTENTION=split_kv",
    "Unset ATE_FAST_PREFIX_ATTENTION (or set it to sdpa) to run torch's attention.",
)

# (queries, keys) per tile by element size: bf16 / fp16 on tensor cores; float32 / float64
# (FMA dots) smaller, so that no tile spills registers (tests/triton_offline_compile.py)
TILES = {2: (32, 32), 4: (16, 32), 8: (16, 16)}


def num_warps(block_d: int) -> int:
    """Warps per program: 8 for head dims above 128 (float32's FMA dots over 256 dims spill
    registers in 4 warps on sm_90), else 4."""
    return 8 if block_d > 128 else 4


COMBINE_ROWS = 16  # rows per combine program
# programs to aim for: this many per SM (the keys split until the grid has them)
PROGRAMS_PER_SM = 2
_SM_COUNT: dict = {}


@triton.jit
def _partial_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, m_ptr, l_ptr, rows, keys, heads, per_split, splits, scale,
    q_sb, q_sh, q_sr, k_sb, k_sh, k_sr, v_sb, v_sh, v_sr,
    HD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    C: tl.constexpr, INTERPRETED: tl.constexpr,
):  # fmt: skip
    """Program (query block, key slice, sample × head): its queries' softmax-weighted sum of
    the slice's values, un-normalised, into ``o`` [B·heads, splits, rows, HD] and the rows'
    max / sum of exp into ``m``, ``l`` [B·heads, splits, rows]."""
    split, bh = tl.program_id(1), tl.program_id(2)
    b, h = (bh // heads).to(tl.int64), (bh % heads).to(tl.int64)
    iq = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    q_ok, d_ok = iq < rows, d < HD
    q = tl.load(q_ptr + b * q_sb + h * q_sh + iq.to(tl.int64)[:, None] * q_sr + d[None, :],
                mask=q_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
    m = tl.full([BLOCK_Q], float("-inf"), C)
    l_sum = tl.zeros([BLOCK_Q], C)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], C)
    start = split * per_split
    end = tl.minimum(start + per_split, keys)
    for k0 in range(start, end, BLOCK_K):  # every slice has at least one key
        ik = k0 + tl.arange(0, BLOCK_K)
        kv_ok = (ik < end)[:, None] & d_ok[None, :]
        rows_k = ik.to(tl.int64)[:, None]
        k = tl.load(k_ptr + b * k_sb + h * k_sh + rows_k * k_sr + d[None, :], mask=kv_ok, other=0.0)
        s = _dot(q, tl.trans(k), None, C, INTERPRETED) * scale
        s = tl.where((ik < end)[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + b * v_sb + h * v_sh + rows_k * v_sr + d[None, :], mask=kv_ok, other=0.0)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], C, INTERPRETED)
        m = m_new
    row = (bh * splits + split).to(tl.int64) * rows + iq
    tl.store(o_ptr + row[:, None] * HD + d[None, :], acc, mask=q_ok[:, None] & d_ok[None, :])
    tl.store(m_ptr + row, m, mask=q_ok)
    tl.store(l_ptr + row, l_sum, mask=q_ok)


@triton.jit
def _combine_kernel(
    o_ptr, m_ptr, l_ptr, y_ptr, rows, splits,
    HD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, C: tl.constexpr,
):  # fmt: skip
    """Rows ``BLOCK_R`` of sample × head ``program_id(1)``: Σ_s exp(m_s − M)·O_s over
    Σ_s exp(m_s − M)·l_s into ``y`` [B·heads, rows, HD] (the output's dtype)."""
    bh = tl.program_id(1).to(tl.int64)
    ir = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    r_ok = ir < rows
    ok = r_ok[:, None] & (d < HD)[None, :]
    top = tl.full([BLOCK_R], float("-inf"), C)
    for s in range(0, splits):
        top = tl.maximum(top, tl.load(m_ptr + (bh * splits + s) * rows + ir, mask=r_ok, other=0.0))
    total = tl.zeros([BLOCK_R], C)
    acc = tl.zeros([BLOCK_R, BLOCK_D], C)
    for s in range(0, splits):
        row = (bh * splits + s) * rows + ir
        w = tl.exp(tl.load(m_ptr + row, mask=r_ok, other=0.0) - top)
        total += w * tl.load(l_ptr + row, mask=r_ok, other=0.0)
        acc += w[:, None] * tl.load(o_ptr + row[:, None] * HD + d[None, :], mask=ok, other=0.0)
    out = (acc / tl.where(r_ok, total, 1.0)[:, None]).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + (bh * rows + ir)[:, None] * HD + d[None, :], out, mask=ok)


def _sm_count(device: torch.device) -> int:
    """SMs of a CUDA device (cached: no host sync in a capture); 8 for the interpreter."""
    if device.type != "cuda":
        return 8
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def key_slices(rows: int, keys: int, programs: int, dtype: torch.dtype, sms: int) -> int:
    """Keys per slice: whole ``BLOCK_K`` chunks, as few per slice as fill
    :data:`PROGRAMS_PER_SM` × ``sms`` programs with ``programs`` (samples × heads) ×
    query blocks."""
    block_q, block_k = TILES[dtype.itemsize]
    chunks = triton.cdiv(keys, block_k)
    grid = programs * triton.cdiv(rows, block_q)
    splits = min(chunks, max(1, triton.cdiv(PROGRAMS_PER_SM * sms, grid)))
    return block_k * triton.cdiv(chunks, splits)


@_limits
def split_kv_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``softmax(q kᵀ/√hd) v``: ``q`` [B, heads, rows, hd], ``k``, ``v`` [B, heads, keys, hd]
    (any batch / head / row strides, unit last stride; one dtype) -> [B, heads, rows, hd]
    contiguous, in q's dtype."""
    batch, heads, rows, hd = q.shape
    keys = k.shape[2]
    block_q, block_k = TILES[q.element_size()]
    block_d = max(16, triton.next_power_of_2(hd))
    per_split = key_slices(rows, keys, batch * heads, q.dtype, _sm_count(q.device))
    splits = triton.cdiv(keys, per_split)
    torch_c, c = compute_dtype(q.dtype), accumulator_type(q.dtype)
    o = torch.empty((batch * heads, splits, rows, hd), dtype=torch_c, device=q.device)
    m = torch.empty((batch * heads, splits, rows), dtype=torch_c, device=q.device)
    l_sum = torch.empty_like(m)
    interpreted = q.device.type == "cpu"
    _partial_kernel[(triton.cdiv(rows, block_q), splits, batch * heads)](
        q, k, v, o, m, l_sum, rows, keys, heads, per_split, splits, hd**-0.5,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        HD=hd, BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_D=block_d, C=c, INTERPRETED=interpreted,
        num_warps=num_warps(block_d), num_stages=1,
    )  # fmt: skip
    y = torch.empty((batch, heads, rows, hd), dtype=q.dtype, device=q.device)
    _combine_kernel[(triton.cdiv(rows, COMBINE_ROWS), batch * heads)](
        o, m, l_sum, y, rows, splits, HD=hd, BLOCK_R=COMBINE_ROWS, BLOCK_D=block_d, C=c,
        num_warps=num_warps(block_d),
    )  # fmt: skip
    return y
