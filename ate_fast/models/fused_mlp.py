"""The flow-transformer block's gated MLP at few rows: torch's three kernels, or one
persistent Triton kernel (:mod:`ate_fast.models.fused_mlp_triton`).

``out = x + gelu_tanh(g)·u·W_downᵀ`` with ``g | u = RMSNorm(x)·W_gate|upᵀ``. At B = 1 a π0
step runs it on 50 rows: the MLP's weights (25 MB of the block's 35 MB in bf16) are read
once, and on an H200 (2026-12-04) its three kernels (gate|up GEMM, gated GELU, down GEMM
with the residual) took ≈ 16 µs per block against ≈ 6 µs for those bytes at the copy rate —
each kernel ramps up from its first weight loads after the previous one has drained.
``ATE_FAST_FUSED_MLP=persistent`` runs the whole MLP as one kernel (and, outside a captured
graph, one memset of its counters; inside one the capture lends them and the kernel sets
them back to zero, :mod:`ate_fast.ops.split_counters`) wherever it :func:`takes` it:
about one program per SM takes the up products' column tiles, then the down product's
tiles as their hidden columns are ready, with no launch in between.
``ATE_FAST_FUSED_MLP_TILES`` (e.g. ``block_f=64,slice=1024,stages=3``) sets its
:class:`Tiles`.

**Not run on a GPU yet**, so opt-in (unset or ``torch``: the three kernels), with an A/B row
in ``benchmarks/bench_realsize.py`` (``ate_capture_fused_mlp``). A pullback's saving
forward (the input-VJP RTC uses) runs it too, also storing the gate, up and GELU the VJP
reads (:func:`fused_mlp_saving`). Like the block's other Triton paths it has no backward
and no symbolic form: the three kernels run whenever autograd records, under tracing or a
``torch.func`` transform, for more than :data:`MAX_ROWS` rows, on tensor subclasses, and
for mixed dtypes or non-contiguous operands.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ate_fast.argument_checks import env_choice, int_pairs
from ate_fast.errors import InvalidArgumentError
from ate_fast.models.trace_state import opaque_ops_may_run
from ate_fast.ops import backends

ENV_VAR = "ATE_FAST_FUSED_MLP"
TILES_VAR = "ATE_FAST_FUSED_MLP_TILES"
PATHS = ("torch", "persistent")
TILE_FIELDS = ("block_f", "block_n", "slice", "warps", "stages", "programs_per_sm")
MAX_ROWS = 64  # one row tile: every task holds all rows (B = 1 at H = 50)
ALIGN = 16  # width, hidden width and every pointer: multiples of this (vectorised loads)
# K per loop step by (element size, at most 4; row tile): where ptxas spills no register
# on sm_87 nor sm_90 at 8 warps (a search over 2/4/8 warps and steps of 16…128 with
# tests/triton_offline_compile.py's compiler, triton 3.9; the neighbours of each pick spill
# 4–500 bytes on one target or the other)
K_STEPS = {(2, 16): 128, (2, 32): 64, (2, 64): 128, (4, 16): 64, (4, 32): 16, (4, 64): 16}


@dataclass(frozen=True)
class Tiles:
    """The kernel's tunable tiles: ``block_f`` hidden columns per up task (gate and up
    side by side), ``block_n`` output columns per down task, over ``slice`` hidden columns
    (a multiple of ``block_f``: the up tasks a down task waits for), ``warps`` and
    pipeline ``stages`` per program,
    ``programs_per_sm`` programs per SM."""

    block_f: int = 32
    block_n: int = 64
    slice: int = 512
    warps: int = 8
    stages: int = 2
    programs_per_sm: int = 1

    def __post_init__(self) -> None:
        for name in ("block_f", "block_n", "slice"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise InvalidArgumentError(
                    f"Tiles.{name}: expected a power of two >= 16, got {value}"
                )
        if self.slice < self.block_f:
            raise InvalidArgumentError(
                f"Tiles.slice: expected at least block_f ({self.block_f}), got {self.slice}"
            )
        if self.warps not in (1, 2, 4, 8, 16) or self.stages < 1 or self.programs_per_sm < 1:
            raise InvalidArgumentError(
                f"Tiles: expected warps a power of two <= 16, stages and programs_per_sm "
                f">= 1: {self}"
            )


def selected_path() -> str:
    """``$ATE_FAST_FUSED_MLP``: ``torch`` (also where unset) or ``persistent``."""
    return env_choice(ENV_VAR, PATHS)


def tiles_from_env() -> Tiles:
    """:class:`Tiles` with the fields ``$ATE_FAST_FUSED_MLP_TILES`` sets (``key=value``
    pairs of :data:`TILE_FIELDS`), the defaults for the rest."""
    text = os.environ.get(TILES_VAR, "").strip()
    if not text:
        return Tiles()
    try:
        return Tiles(**dict(int_pairs(TILES_VAR, text, TILE_FIELDS)))
    except InvalidArgumentError as exc:
        if str(exc).startswith(TILES_VAR):
            raise
        raise InvalidArgumentError(f"{TILES_VAR}: {exc}") from exc


def takes(x: Tensor, w_gate_up: Tensor, w_down: Tensor, gain: Optional[Tensor] = None) -> bool:
    """Whether the kernel computes the MLP of ``x`` [..., width] with ``w_gate_up``
    [2F, width], ``w_down`` [width, F] (and the norm's ``gain`` [width]): selected, at most
    :data:`MAX_ROWS` rows, width and F multiples of 16, one dtype, every operand contiguous
    and 16-byte aligned, nothing recording or tracing; raises where it is selected and
    Triton cannot run on the tensors' device."""
    if not os.environ.get(ENV_VAR) or selected_path() != "persistent":  # unset: one lookup
        return False
    width = x.shape[-1]
    tensors = (x, w_gate_up, w_down) + (() if gain is None else (gain,))
    if (
        not opaque_ops_may_run(*tensors)  # first: a trace's fake tensors have no data_ptr
        or x.numel() > MAX_ROWS * width
        or w_gate_up.dim() != 2
        or w_down.shape != (width, w_gate_up.shape[0] // 2)
        or w_gate_up.shape != (2 * w_down.shape[1], width)
        or any(v % ALIGN for v in (width, w_down.shape[1]))
        or any(t.dtype != x.dtype or not t.is_contiguous() for t in tensors)
        or any(t.data_ptr() % ALIGN for t in tensors)
    ):
        return False
    backends.require_triton(x.device.type, f"{ENV_VAR}=persistent")
    return True


def fused_mlp_residual(
    x: Tensor, gain: Optional[Tensor], eps: float, w_gate_up: Tensor, w_down: Tensor,
    in_place: bool = False,
) -> Tensor:  # fmt: skip
    """``x + gelu_tanh(g)·u·W_downᵀ`` [..., width], ``g | u = rms_norm(x, gain, eps)·
    W_gate|upᵀ``, on the kernel (call where :func:`takes` is true); ``in_place``: written
    into ``x``."""
    return _launch(x, gain, eps, w_gate_up, w_down, in_place, False)[0]


def fused_mlp_saving(
    x: Tensor, gain: Optional[Tensor], eps: float, w_gate_up: Tensor, w_down: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`fused_mlp_residual` [..., width] with what the block's input-VJP reads:
    ``(out, gate | up [..., 2F] as the MLP used them — the GEMM's rounding, then the
    norm's row factor —, gelu_tanh(gate) [..., F])`` (a pullback's saving forward)."""
    return _launch(x, gain, eps, w_gate_up, w_down, False, True)


def _launch(
    x: Tensor, gain: Optional[Tensor], eps: float, w_gate_up: Tensor, w_down: Tensor,
    in_place: bool, save: bool,
) -> tuple:  # fmt: skip
    import ate_fast.models.fused_mlp_triton as kernels  # imports triton: on use

    rows = x.reshape(-1, x.shape[-1])
    out = rows if in_place else torch.empty_like(rows)
    tiles = launch_tiles(x.dtype, rows)
    out, gu, act = kernels.fused_mlp(rows, gain, eps, w_gate_up, w_down, out, tiles, save)
    if not save:
        return out.view(x.shape), None, None
    lead = x.shape[:-1]
    return out.view(x.shape), gu.view(*lead, -1), act.view(*lead, -1)


def launch_tiles(dtype: torch.dtype, rows: Tensor) -> object:
    """The kernel's :class:`~ate_fast.models.fused_mlp_triton.LaunchTiles` for ``rows``
    [M, width] of ``dtype``: :func:`tiles_from_env`, the row tile the next power of two of
    M (at least 16), the K steps of :data:`K_STEPS`."""
    import ate_fast.models.fused_mlp_triton as kernels  # imports triton: on use

    block_m = max(16, 1 << (rows.shape[0] - 1).bit_length())
    step = K_STEPS[min(dtype.itemsize, 4), block_m]
    fields = dataclasses.asdict(tiles_from_env())
    return kernels.LaunchTiles(block_m=block_m, block_k=step, block_h=step, **fields)
