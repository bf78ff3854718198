"""The flow-transformer block's attention against its prefix: torch's SDPA, or Triton
kernels that split the keys over many programs (:mod:`ate_fast.models.split_kv_attention_triton`).

At B = 1 π0's step attends 400 query rows (50 tokens × 8 heads on one key/value head) to
866 keys: on an H200 the SDPA kernel torch picks runs that on 7 programs, and it took 38 %
of the step's kernel time (2026-12-04). ``ATE_FAST_PREFIX_ATTENTION=split_kv`` runs it on
the split-key kernels instead, wherever there is no attention mask (the padded prompt's
keeps SDPA), nothing records or traces, and the head dim is at most :data:`MAX_HEAD_DIM`;
unset, or ``sdpa``, SDPA runs — the default, as measured: on an H200 (2026-12-04,
``bench_realsize.py``, π0 bf16, B = 1) the kernels took attention's share of a step's
kernel time from 0.44 to ≈ 0.37 ms, but the captured call went from 13.31 to 14.35 ms
(RTC: 28.75 → 31.33 ms): two kernels per block instead of one, and the partial outputs
(float32, one per key slice) written and read back. It stays as an option and an A/B row
(``ate_capture_split_kv_attention``). Its combine was as slow as its partial kernel (10.7
vs 10.2 µs per block: a loop over 14 slices, one dependent load after another); the kernels
now combine all slices of a row in one load, skip the combine with one slice, and take their
tiles as an argument — ``ATE_FAST_SPLIT_KV_TILES`` (e.g. ``block_q=16,block_k=64,splits=1``)
sets them for a whole sampler, and ``benchmarks/bench_prefix_attention.py`` times many
against SDPA's backends. That form has not run on a GPU yet.

``ATE_FAST_PREFIX_ATTENTION=flex`` runs it on torch's compiled FlexAttention instead, whose
decoding kernel splits the keys the same way (:mod:`ate_fast.models.flex_prefix_attention`;
the same conditions, a torch with FlexAttention, and not float64, which it has no CPU
kernel for); not run on a GPU yet either. ``ATE_FAST_PREFIX_ATTENTION=split_sdpa`` cuts the
keys into slices, each a head of one call of torch's flash-attention kernel, and combines
them by their log-sum-exps (:mod:`ate_fast.models.split_sdpa_attention`; one key/value
head, float16 / bfloat16 on CUDA); not run on a GPU yet. ``ATE_FAST_PREFIX_ATTENTION=gemm``
writes it as two GEMMs and a softmax (:mod:`ate_fast.models.gemm_attention`: cuBLAS spreads
the products over the GPU); not run on a GPU yet.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from ate_fast.argument_checks import env_choice, int_pairs
from ate_fast.errors import BackendUnavailableError, InvalidArgumentError
from ate_fast.models import flex_prefix_attention as flex
from ate_fast.models import gemm_attention as gemm
from ate_fast.models import split_sdpa_attention as split_sdpa
from ate_fast.models.trace_state import opaque_ops_may_run
from ate_fast.ops import backends

ENV_VAR = "ATE_FAST_PREFIX_ATTENTION"
TILES_VAR = "ATE_FAST_SPLIT_KV_TILES"
PATHS = ("sdpa", "split_kv", "flex", "split_sdpa", "gemm")
TILE_FIELDS = ("block_q", "block_k", "splits", "programs_per_sm", "warps", "stages")
MAX_HEAD_DIM = 256  # the kernels hold a query row's head dim in one tile


@dataclass(frozen=True)
class Tiles:
    """Launch shape of the kernels: ``block_q`` query rows per program, keys in chunks of
    ``block_k`` (one pair of dots each), ``splits`` key slices per block of queries (0: as
    many as give :attr:`programs_per_sm` programs per SM; 1: one kernel, no partials and
    no combine), ``warps`` and pipeline ``stages`` of the partial kernel."""

    block_q: int
    block_k: int
    splits: int = 0
    programs_per_sm: int = 1
    warps: int = 4
    stages: int = 1

    def __post_init__(self) -> None:
        for name in ("block_q", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise InvalidArgumentError(
                    f"Tiles.{name}: expected a power of two >= 16, got {value}"
                )
        if self.splits < 0 or self.programs_per_sm < 1 or self.stages < 1:
            raise InvalidArgumentError(
                f"Tiles: expected splits >= 0 and programs_per_sm, stages >= 1: {self}"
            )
        if self.warps not in (1, 2, 4, 8, 16):
            raise InvalidArgumentError(
                f"Tiles.warps: expected a power of two <= 16, got {self.warps}"
            )


def selected_path() -> str:
    """``$ATE_FAST_PREFIX_ATTENTION``: ``sdpa`` (also where unset), ``split_kv``, ``flex``,
    ``split_sdpa`` or ``gemm``."""
    return env_choice(ENV_VAR, PATHS)


def tiles_from_env() -> Optional[dict]:
    """``$ATE_FAST_SPLIT_KV_TILES``: the kernels' tiles as ``key=value`` pairs (any of
    :data:`TILE_FIELDS`, e.g. ``block_q=32,block_k=64,splits=4``; the rest from the
    defaults), or None where unset — what ``benchmarks/bench_prefix_attention.py`` found
    fastest can run in a whole sampler without a code change. Each value is checked as
    :class:`Tiles` checks it; a setting is parsed once (an eager call reads it per block)."""
    text = os.environ.get(TILES_VAR, "").strip()
    return dict(_parsed_tiles(text)) if text else None


@functools.lru_cache(maxsize=8)
def _parsed_tiles(text: str) -> tuple[tuple[str, int], ...]:
    fields = int_pairs(TILES_VAR, text, TILE_FIELDS)
    try:  # the values as Tiles checks them (placeholders for the fields not given)
        Tiles(**{"block_q": 16, "block_k": 16, **dict(fields)})
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"{TILES_VAR}: {exc}") from exc
    return fields


def _plain_case(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> bool:
    """No mask, 4-d, one key/value head per query head group, one dtype, unit last strides,
    head dim ≤ :data:`MAX_HEAD_DIM`, nothing recording or tracing."""
    tensors = (q, k, v)
    return not (
        mask is not None
        or q.dim() != 4
        or q.shape[-1] > MAX_HEAD_DIM
        or k.shape[:2] != q.shape[:2]
        or any(t.dtype != q.dtype or t.stride(-1) != 1 for t in tensors)
        or not opaque_ops_may_run(*tensors)
    )


def takes(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], path: str = "split_kv") -> bool:
    """Whether ``path`` (``split_kv``: the Triton kernels; ``flex``: FlexAttention;
    ``split_sdpa``: flash attention per key slice; ``gemm``: two GEMMs and a softmax) runs
    ``q`` [B, heads, rows, hd] against ``k``, ``v`` [B, heads, keys, hd]: selected, and
    :func:`_plain_case` (flex: ``q`` contiguous too, not float64; split_sdpa:
    :func:`~ate_fast.models.split_sdpa_attention.runs_on`);
    raises where selected and it cannot run (no Triton on the tensors' device; a torch
    without FlexAttention)."""
    if not os.environ.get(ENV_VAR) or selected_path() != path:  # unset: one lookup
        return False
    if path == "gemm":  # torch's GEMMs (its softmax kernel where the epilogues' Triton runs)
        if mask is not None and not (gemm.takes_mask(mask, q, k) and opaque_ops_may_run(mask)):
            return False
        return _plain_case(q, k, v, None)
    if not _plain_case(q, k, v, mask):
        return False
    setting = f"{ENV_VAR}={path}"
    if path == "flex":
        if not q.is_contiguous() or q.dtype not in flex.DTYPES:
            return False
        reason = flex.unavailable_reason()
        if reason is not None:
            raise BackendUnavailableError(f"{setting}: {reason}")
        return True
    if path == "split_sdpa" and not split_sdpa.runs_on(q, k):
        return False
    backends.require_triton(q.device.type, setting)  # split_kv's kernels, split_sdpa's combine
    return True


def prefix_attention_saving(
    q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None
) -> tuple[Tensor, Optional[Tensor]]:
    """``(prefix_attention(q, k, v, mask), p)``: ``p`` the probabilities [B, heads, rows,
    N] where the ``gemm`` path ran (it forms them anyway; an input-VJP then need not
    recompute them), else None."""
    if takes(q, k, v, mask, "gemm"):
        return gemm.gemm_attention_saving(q, k, v, mask)
    return prefix_attention(q, k, v, mask), None


def prefix_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=mask)`` [B, heads, rows, hd]: on
    the selected path where it :func:`takes` it, else SDPA."""
    path = selected_path() if os.environ.get(ENV_VAR) else "sdpa"  # unset: one lookup
    if path == "sdpa" or not takes(q, k, v, mask, path):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if path == "flex":
        return flex.flex_prefix_attention(q, k, v)
    if path == "split_sdpa":
        return split_sdpa.split_sdpa_attention(q, k, v)
    if path == "gemm":
        return gemm.gemm_attention(q, k, v, mask)
    from ate_fast.models.split_kv_attention_triton import (  # triton
        default_tiles,
        split_kv_attention,
    )

    fields, tiles = tiles_from_env(), None  # checked: replacing the defaults' cannot fail
    if fields:
        tiles = dataclasses.replace(default_tiles(q.dtype, q.shape[-1]), **fields)
    return split_kv_attention(q, k, v, tiles)
