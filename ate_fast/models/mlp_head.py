"""A small MLP policy head, per-timestep or over the flattened chunk.

``flatten=False``: each of the H action vectors goes through the same MLP, with the time
embedding, the optional cond [B, cond_dim] and a learned per-step embedding added to the
first layer (so steps are told apart). ``flatten=True``: one MLP maps the whole chunk
[B, H·D] (with time and cond concatenated) to [B, H·D].

:meth:`MLPHead.forward_with_vjp` is the input-VJP real-time chunking needs: the same
forward (the same ops, so the same output bit for bit), keeping each SiLU's input, and
a pullback ``u -> (∂out/∂x)ᵀ u`` written in forward ops (transposed matmuls and the SiLU
derivative; no autograd tape, no weight gradients), so it also exports to ONNX.

:meth:`MLPHead.step_features` / :meth:`MLPHead.forward_features` split the forward for
the samplers (:mod:`ate_fast.sampling.step_features`): the time embedding and cond
through the first layer's context part, for every step at once, then the rest per step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from ate_fast.models.cpu_gemm import (
    linear_of,
    linear_residual_rows,
    reaches_onednn_size,
    times_weight,
)
from ate_fast.models.direct_weights import autograd_input_vjp
from ate_fast.models.head_inputs import check_head_inputs, in_dtype
from ate_fast.models.time_embedding import PI0_PERIODS, sinusoidal_embedding
from ate_fast.module_checks import plain_linear, plain_tree


@dataclass(frozen=True)
class MLPHeadConfig:
    """Sizes of an :class:`MLPHead`; ``depth`` is the number of hidden layers (≥ 1)."""

    horizon: int = 50
    action_dim: int = 32
    hidden: int = 256
    depth: int = 2
    time_dim: int = 32
    cond_dim: int = 0
    flatten: bool = False
    min_period: float = PI0_PERIODS[0]
    max_period: float = PI0_PERIODS[1]
    time_scale: float = 1.0  # multiply t before embedding (e.g. 1e-3 for integer timesteps)

    def __post_init__(self) -> None:
        for name in ("horizon", "action_dim", "hidden", "depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"MLPHeadConfig.{name} must be >= 1")


# The most elements per sample of one call's folded first-layer biases (N steps × H ×
# hidden: 1 MB per sample in float32); above it (many steps) a step adds the context row
# instead. Per sample, not per call: the choice must not depend on the batch size, which an
# exported graph keeps symbolic.
FOLDED_BIAS_ELEMENTS = 1 << 18

MLP_HEAD_CONFIGS: dict[str, MLPHeadConfig] = {
    "small": MLPHeadConfig(),
    "flat": MLPHeadConfig(hidden=512, flatten=True),
}


class MLPHead(nn.Module):
    """``forward(x [B,H,D], t [B], cond [B, cond_dim] or None) -> [B,H,D]``."""

    def __init__(self, config: Union[str, MLPHeadConfig] = "small", **overrides: Any) -> None:
        super().__init__()
        cfg = MLP_HEAD_CONFIGS[config] if isinstance(config, str) else config
        self.config = cfg = replace(cfg, **overrides)
        context = cfg.time_dim + cfg.cond_dim
        width_in = cfg.horizon * cfg.action_dim if cfg.flatten else cfg.action_dim
        width_out = width_in
        # first layer split in two: the chunk part, and the per-sample context part
        self.input = nn.Linear(width_in, cfg.hidden)
        self.context = nn.Linear(context, cfg.hidden, bias=False)
        self.step = None if cfg.flatten else nn.Parameter(torch.zeros(cfg.horizon, cfg.hidden))
        layers: list[nn.Module] = [nn.SiLU()]
        for _ in range(cfg.depth - 1):
            layers += [nn.Linear(cfg.hidden, cfg.hidden), nn.SiLU()]
        layers.append(nn.Linear(cfg.hidden, width_out))
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        self._check(x, t, cond)
        return self._forward_saving(x, self._features(t[None], cond)[0])[0]

    def step_features(self, x: Tensor, t: Tensor, cond: Optional[Tensor] = None) -> list[Tensor]:
        """One step's first-layer terms besides the chunk's for each of N times ``t`` [N, B]
        (time embedding and cond through the context part, computed in one pass); ``x``
        [B, H, D] (the sample) is only checked. ``forward_features(x, features[k])`` is
        ``forward(x, t[k], cond)``.

        Each is the whole first-layer bias [B, H, hidden] (context + per-step embedding +
        bias: the step's first layer is then one batched GEMM with it), or — when N·H·hidden
        exceeds :data:`FOLDED_BIAS_ELEMENTS` — the context row [B, hidden] (flatten: always
        [B, hidden], context + bias)."""
        if t.ndim != 2:
            raise ValueError(f"MLPHead: t must have shape [N, B], got {tuple(t.shape)}")
        self._check(x, t[0], cond)
        return list(self._features(t, cond).unbind(0))

    def forward_features(self, x: Tensor, features: Tensor) -> Tensor:
        """The forward at ``x`` [B, H, D] from one step's ``features`` (:meth:`step_features`:
        [B, H, hidden] or [B, hidden])."""
        cfg, batch = self.config, x.shape[0]
        shapes = [(batch, cfg.hidden)] + ([] if cfg.flatten else [(batch, cfg.horizon, cfg.hidden)])
        if features.shape not in shapes:
            raise ValueError(
                f"MLPHead: features must have shape {' or '.join(str(list(s)) for s in shapes)}"
                f" (from step_features), got {list(features.shape)}"
            )
        return self._forward_saving(x, features)[0]

    def forward_with_vjp(
        self, x: Tensor, t: Tensor, cond: Optional[Tensor] = None
    ) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """``(out, pullback)``: ``out`` = ``forward(x, t, cond)`` [B, H, D] (bit for bit) and
        ``pullback(u [B, H, D]) -> (∂out/∂x)ᵀ u`` [B, H, D], the input-VJP in forward ops
        (t and cond are constants; no weight gradient is formed). Runs without autograd
        (under ``no_grad`` / ``inference_mode`` too) and captures in a CUDA graph."""
        self._check(x, t, cond)
        return self.forward_with_vjp_features(x, self._features(t[None], cond)[0])

    def forward_with_vjp_features(
        self, x: Tensor, features: Tensor
    ) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """:meth:`forward_with_vjp` from one step's ``features`` (:meth:`step_features`)."""
        if not plain_tree(self):  # wrapped or hooked layers: the weights alone are not it
            return autograd_input_vjp("MLPHead", lambda y: self._forward_saving(y, features)[0], x)
        out, pres = self._forward_saving(x, features)
        flatten, dtype = self.config.flatten, self.input.weight.dtype
        linears = [m for m in self.body if isinstance(m, nn.Linear)]
        slopes = [_silu_slope(pre) for pre in pres]  # σ(h)·(1 + h·(1 − σ(h))) per layer
        # the forward's library (_onednn_rows), for the same rows
        times = times_weight if self._onednn_rows(pres[0].numel() // pres[0].shape[-1]) else _times

        def pullback(u: Tensor) -> Tensor:
            g = u.to(dtype)
            g = g.flatten(1) if flatten else g
            for linear, slope in zip(reversed(linears), reversed(slopes)):
                g = times(g, linear.weight) * slope
            return times(g, self.input.weight).view_as(x).to(x.dtype)

        return out, pullback

    def _check(self, x: Tensor, t: Tensor, cond: Optional[Tensor]) -> None:
        cfg = self.config
        check_head_inputs(
            "MLPHead", x, t, cond, cfg.horizon, cfg.action_dim,
            (cfg.cond_dim,) if cfg.cond_dim else None, cond_required=bool(cfg.cond_dim),
            weight_dtype=self.input.weight.dtype,
        )  # fmt: skip

    def _features(self, t: Tensor, cond: Optional[Tensor]) -> Tensor:
        """[N, B, H, hidden] (folded first-layer bias) or [N, B, hidden]: see step_features."""
        ctx = self._context(t, cond)
        steps, _, hidden = ctx.shape
        if not plain_linear(self.input):  # the first layer is called (it may add more)
            return ctx
        if self.config.flatten:
            return ctx + self.input.bias
        if steps * self.config.horizon * hidden > FOLDED_BIAS_ELEMENTS:
            return ctx
        return ctx[:, :, None, :] + (self.step + self.input.bias)

    def _context(self, t: Tensor, cond: Optional[Tensor]) -> Tensor:
        """[N, B, hidden]: the context part of the first layer at times ``t`` [N, B]."""
        cfg = self.config
        dtype = self.input.weight.dtype
        steps, batch = t.shape
        time = sinusoidal_embedding(  # in t's precision, then the weights' dtype
            t.reshape(-1) * cfg.time_scale, cfg.time_dim, cfg.min_period, cfg.max_period
        )
        context = time.to(dtype)
        if cfg.cond_dim:
            context = torch.cat([context, in_dtype(cond, dtype).repeat(steps, 1)], dim=-1)
        return self.context(context).view(steps, batch, -1)

    def _forward_saving(self, x: Tensor, features: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The forward [B, H, D] (in ``x``'s dtype) from one step's ``features``
        (:meth:`step_features`), and the input of every SiLU ([B, H, hidden]; flatten:
        [B, hidden]), computed in the weights' dtype."""
        weight = self.input.weight
        inputs = x.to(weight.dtype)
        if self.config.flatten and not plain_linear(self.input):  # features: the context
            h = self.input(inputs.flatten(1)) + features
        elif self.config.flatten:  # features: context + bias [B, hidden]
            h = linear_residual_rows(inputs.flatten(1), weight, features)
        elif features.ndim == 3:  # the folded bias [B, H, hidden]: one batched GEMM
            h = torch.baddbmm(features, inputs, weight.t().expand(x.shape[0], -1, -1))
        else:  # the context row [B, hidden] (also for a first layer that is not plain)
            h = self.input(inputs) + features[:, None, :] + self.step
        pres = []
        one_library = self._onednn_rows(h.numel() // h.shape[-1])
        for module in self.body:
            if isinstance(module, nn.SiLU):
                pres.append(h)
            linear = isinstance(module, nn.Linear) and one_library
            h = linear_of(module, h) if linear else module(h)
        return (h.view_as(x) if self.config.flatten else h).to(x.dtype), pres

    def _onednn_rows(self, rows: int) -> bool:
        """Whether the body's layers may take oneDNN (:mod:`~ate_fast.models.cpu_gemm`'s
        choice) for ``rows`` rows: only where every layer, the first included, reaches its
        size, so that a step's GEMMs share one library; else ATen's (at batch 1 the small
        head's 0.4 M-MAC first and last layers run there, and its hidden layer with them).
        The layers' sizes from the config (a step's hot path: ≈ 1 µs, not a module walk)."""
        cfg = self.config
        width = cfg.horizon * cfg.action_dim if cfg.flatten else cfg.action_dim  # in and out
        smallest = cfg.hidden * (min(width, cfg.hidden) if cfg.depth > 1 else width)
        return reaches_onednn_size(rows, smallest)


def _times(g: Tensor, weight: Tensor) -> Tensor:
    """``g @ weight`` on ATen (:func:`~ate_fast.models.cpu_gemm.times_weight`'s product)."""
    return g @ weight


def _silu_slope(h: Tensor) -> Tensor:
    """d silu(h)/dh = σ(h)·(1 + h·(1 − σ(h))), element-wise."""
    s = torch.sigmoid(h)
    return s * (1 + h * (1 - s))
