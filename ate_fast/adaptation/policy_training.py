"""The training loop of the adaptation pipelines' chunk policies: pre-training on the
source robot, and fine-tuning on the target robot's demonstrations — directly, or with the
ATE Steer loss in place of the plain one (the same batches, noise and times for a seed).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ate_fast.adaptation.objectives import Objective
from ate_fast.argument_checks import check_float, check_int
from ate_fast.errors import ArgumentTypeError, InvalidArgumentError, NonFiniteError
from ate_fast.steer import Steer


@dataclass
class PolicyFit:
    """What a training run reports: ``loss`` (mean of the last 10 % of steps; for Steer
    the corrected loss), ``seconds``, and for Steer the means over all steps of its
    diagnostics (``grad_norm``, ``clamp_fraction``, ``correction_ratio``)."""

    steps: int
    loss: float
    seconds: float
    steer: dict[str, float] = field(default_factory=dict)


class _DiagnosticSums:
    """Running sums of Steer's per-step diagnostics: as tensors on the training device (no
    host sync per step), or ``on_host`` as float64 Python numbers."""

    def __init__(self, on_host: bool) -> None:
        self.on_host = on_host
        self.sums: dict[str, Union[float, Tensor]] = {}

    def add(self, diagnostics: dict[str, Tensor]) -> None:
        for name, value in diagnostics.items():
            value = float(value) if self.on_host else value
            self.sums[name] = self.sums.get(name, 0.0) + value

    def means(self, steps: int) -> dict[str, float]:
        return {name: float(total) / steps for name, total in self.sums.items()}


def _check_training_data(chunks: object, cond: object, mask: object) -> None:
    """``chunks [M, H, D]`` (M ≥ 1), ``cond [M, C]``, ``mask [D]`` with a slot set; finite."""
    if not isinstance(chunks, Tensor) or chunks.ndim != 3 or not chunks.is_floating_point():
        got = tuple(chunks.shape) if isinstance(chunks, Tensor) else type(chunks).__name__
        raise ArgumentTypeError(f"chunks must be a floating tensor [M, H, D], got {got}")
    if chunks.shape[0] == 0:
        raise InvalidArgumentError("chunks must hold at least one chunk, got M = 0")
    rows = chunks.shape[0]
    if not isinstance(cond, Tensor) or cond.ndim < 1 or cond.shape[0] != rows:
        got = tuple(cond.shape) if isinstance(cond, Tensor) else type(cond).__name__
        raise InvalidArgumentError(f"cond must be a tensor [M, ...] with M = {rows}, got {got}")
    if not isinstance(mask, Tensor) or tuple(mask.shape) != (chunks.shape[2],):
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise InvalidArgumentError(f"mask must be a tensor [D] = [{chunks.shape[2]}], got {got}")
    if not bool(mask.any()):
        raise InvalidArgumentError("mask must mark at least one action slot (it is all zero)")
    for name, t in (("chunks", chunks), ("cond", cond)):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"{name} contains NaN or inf")


def train_chunk_policy(
    policy: nn.Module,
    chunks: Tensor,
    cond: Tensor,
    mask: Tensor,
    objective: Objective,
    *,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    steer: Optional[Steer] = None,
    device: Union[str, torch.device] = "cpu",
    fused: bool = False,
    diagnostics_on_host: bool = False,
    desc: str = "train",
    progress: bool = False,
) -> PolicyFit:
    """Train ``policy`` in place on ``chunks [M, H, D]`` conditioned on ``cond [M, C]`` for
    ``steps`` AdamW steps (weight decay 1e-4, cosine decay to ``lr/10``, gradient norm
    clipped at 1), with ``objective``'s loss or, given ``steer``, its Steer-corrected loss.

    The loss is averaged over the robot's action slots only (``mask [D]``). Batch indices,
    noise and times all come from a CPU generator seeded with ``seed``, so two runs with
    one seed see the same batches (a paired comparison) whatever the ``device``.
    ``fused``: the fused AdamW kernel. ``diagnostics_on_host``: sum Steer's diagnostics
    as float64 Python numbers (a sync per step) rather than on the device.

    Raises :class:`~ate_fast.errors.InvalidArgumentError` (or ``ArgumentTypeError``) naming
    the argument for a bad ``steps`` / ``batch`` / ``lr`` / ``seed``, shapes that do not
    match, an all-zero ``mask``, and NaN/inf in ``chunks`` or ``cond`` (one of them would
    make every weight of ``policy`` NaN).
    """
    steps, batch = check_int("steps", steps, 1), check_int("batch", batch, 1)
    lr, seed = check_float("lr", lr, 0.0, above=True), check_int("seed", seed)
    _check_training_data(chunks, cond, mask)
    gen = torch.Generator().manual_seed(seed)
    policy.to(device).train()
    opt = torch.optim.AdamW(
        policy.parameters(),
        lr=lr,
        weight_decay=1e-4,
        fused=fused or None,  # None: torch picks
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: 0.1 + 0.45 * (1 + math.cos(math.pi * min(k / steps, 1.0)))
    )
    slots = mask.to(device)[None, None, :]
    denom = float(batch * chunks.shape[1] * mask.sum())
    losses: list[Tensor] = []
    diagnostics = _DiagnosticSums(diagnostics_on_host)
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, leave=False, dynamic_ncols=True, disable=not progress)
    for k in bar:
        idx = torch.randint(len(chunks), (batch,), generator=gen)
        a0, c = chunks[idx], cond[idx]
        noise = torch.randn(a0.shape, generator=gen)
        times = objective.draw_times(batch, gen)
        a0, c, noise, times = (v.to(device) for v in (a0, c, noise, times))
        err, diag = objective.error(policy, a0, c, noise, times, steer)
        diagnostics.add(diag)
        loss = (err * slots).sum() / denom
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.detach())
        if progress and (k + 1) % 100 == 0:
            bar.set_postfix(loss=f"{torch.stack(losses[-100:]).mean().item():.4f}")
    tail = torch.stack(losses[-max(1, steps // 10) :]).mean().item()
    policy.eval()
    return PolicyFit(steps, tail, time.perf_counter() - start, diagnostics.means(steps))
