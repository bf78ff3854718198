"""A π0-action-expert-like flow-matching head.

Structure (as the π0 action expert; our own implementation):

1. ``action_in``: Linear D -> width on the noisy chunk.
2. Time: a sinusoidal embedding of t (π0's periods 4e-3 … 4) repeated over the H
   tokens, concatenated with the action tokens and mixed by Linear(2·width -> width),
   swish, Linear(width -> width).
3. ``depth`` pre-norm blocks (RMSNorm; multi-query/grouped attention with rotary
   positions; gated-GELU MLP, as Gemma). Each block's attention lets the H action tokens
   attend to the conditioning tokens ``cond`` [B, L, width] and to one another
   (bidirectionally); ``cond`` supplies keys and values only, through the block's own
   norm and projections, at positions 0…L−1 (action tokens at L…L+H−1).
4. Final RMSNorm, ``action_out``: Linear width -> D.

Forward is shape-static and free of host syncs, so it captures in a CUDA graph and
compiles with ``torch.compile(fullgraph=True)``. :meth:`FlowTransformerHead.forward_with_vjp`
adds the input-VJP (:mod:`ate_fast.models.flow_transformer_vjp`) that real-time chunking
pulls its guidance back through.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ate_fast.models.flow_transformer_vjp import BlockSaved, head_input_vjp
from ate_fast.models.head_inputs import check_head_inputs, in_dtype
from ate_fast.models.time_embedding import PI0_PERIODS, sinusoidal_embedding


@dataclass(frozen=True)
class FlowTransformerConfig:
    """Sizes of a :class:`FlowTransformerHead`; ``heads·head_dim`` need not equal width."""

    horizon: int = 50
    action_dim: int = 32
    width: int = 1024
    depth: int = 18
    mlp_dim: int = 4096
    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 256
    rope_base: float = 10_000.0
    min_period: float = PI0_PERIODS[0]
    max_period: float = PI0_PERIODS[1]
    time_scale: float = 1.0  # multiply t before embedding (e.g. 1e-3 for integer timesteps)

    def __post_init__(self) -> None:
        for name in ("horizon", "action_dim", "width", "depth", "mlp_dim", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"FlowTransformerConfig.{name} must be >= 1")
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"head_dim must be even (rotary positions), got {self.head_dim}")
        if self.width % 2 or self.width < 4:
            raise ValueError(f"width must be even and >= 4, got {self.width}")


FLOW_TRANSFORMER_CONFIGS: dict[str, FlowTransformerConfig] = {
    # π0's action expert (Gemma-300M-sized): width 1024, 18 layers, MLP 4096, 8 query heads
    # sharing one key/value head of dim 256; H = 50, D = 32.
    "pi0-expert": FlowTransformerConfig(),
    "small": FlowTransformerConfig(
        width=256, depth=4, mlp_dim=1024, num_heads=4, num_kv_heads=1, head_dim=64
    ),
}


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary positions on the last dim of x [B, heads, N, hd] with cos/sin [N, hd/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class _Block(nn.Module):
    def __init__(self, cfg: FlowTransformerConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.attn_norm = nn.RMSNorm(cfg.width, eps=1e-6)
        self.q = nn.Linear(cfg.width, cfg.num_heads * cfg.head_dim, bias=False)
        self.kv = nn.Linear(cfg.width, 2 * cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.width, bias=False)
        self.mlp_norm = nn.RMSNorm(cfg.width, eps=1e-6)
        self.gate_up = nn.Linear(cfg.width, 2 * cfg.mlp_dim, bias=False)
        self.down = nn.Linear(cfg.mlp_dim, cfg.width, bias=False)

    def forward(self, x: Tensor, cond: Optional[Tensor], cos: Tensor, sin: Tensor) -> Tensor:
        return self.forward_saving(x, cond, cos, sin)[0]

    def forward_saving(
        self, x: Tensor, cond: Optional[Tensor], cos: Tensor, sin: Tensor
    ) -> tuple[Tensor, BlockSaved]:
        """The block on ``x`` [B, H, width] and what its input-VJP needs
        (:func:`ate_fast.models.flow_transformer_vjp.block_input_vjp`)."""
        batch, horizon, _ = x.shape
        h = self.attn_norm(x)
        context = h if cond is None else torch.cat([self.attn_norm(cond), h], dim=1)
        q = self.q(h).view(batch, horizon, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv(context).view(batch, context.shape[1], 2 * self.num_kv_heads, self.head_dim)
        k, v = kv.transpose(1, 2).chunk(2, dim=1)  # [B, kv_heads, L+H, hd] each
        q = _rotate(q, cos[-horizon:], sin[-horizon:])
        k = _rotate(k, cos, sin)
        group = self.num_heads // self.num_kv_heads
        k_all, v_all = k, v
        if group > 1:  # share each key/value head across its group of query heads
            k_all = k.repeat_interleave(group, dim=1)
            v_all = v.repeat_interleave(group, dim=1)
        attn = F.scaled_dot_product_attention(q, k_all, v_all)
        x1 = x + self.o(attn.transpose(1, 2).reshape(batch, horizon, -1))
        gate, up = self.gate_up(self.mlp_norm(x1)).chunk(2, dim=-1)
        act = F.gelu(gate, approximate="tanh")
        return x1 + self.down(act * up), BlockSaved(x, q, k, v, x1, gate, up, act)


class FlowTransformerHead(nn.Module):
    """π0-action-expert-like velocity head: ``forward(x [B,H,D], t [B], cond) -> [B,H,D]``.

    ``t`` is the flow time in [0, 1] (openpi: t = 1 is noise). ``cond``: None or
    conditioning tokens [B, L, width] (e.g. a VLM prefix projected to the expert's width).
    """

    def __init__(self, config: Union[str, FlowTransformerConfig] = "small", **overrides: Any):
        super().__init__()
        cfg = FLOW_TRANSFORMER_CONFIGS[config] if isinstance(config, str) else config
        self.config = cfg = replace(cfg, **overrides)
        w = cfg.width
        self.action_in = nn.Linear(cfg.action_dim, w)
        self.time_mlp_in = nn.Linear(2 * w, w)
        self.time_mlp_out = nn.Linear(w, w)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.depth))
        self.final_norm = nn.RMSNorm(w, eps=1e-6)
        self.action_out = nn.Linear(w, cfg.action_dim)
        half = cfg.head_dim // 2
        inv_freq = cfg.rope_base ** (-torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("rope_inv_freq", inv_freq, persistent=False)

    def forward(self, x: Tensor, t: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        tokens, _, cos, sin = self._embed(x, t, cond)
        cond = in_dtype(cond, tokens.dtype)
        for block in self.blocks:
            tokens = block(tokens, cond, cos, sin)
        return self.action_out(self.final_norm(tokens)).to(x.dtype)

    def forward_with_vjp(
        self, x: Tensor, t: Tensor, cond: Optional[Tensor] = None
    ) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """``(out, pullback)``: ``out`` = ``forward(x, t, cond)`` [B, H, D] (the same ops,
        so bit for bit) and ``pullback(u [B, H, D]) -> (∂out/∂x)ᵀ u`` [B, H, D], the
        input-VJP written in forward ops (RMSNorm, attention, softmax, rotary, gated-GELU
        backward; t and cond are constants, no weight gradient is formed). Runs without
        autograd (``no_grad`` / ``inference_mode`` too), captures in a CUDA graph, and
        exports to ONNX like any forward."""
        tokens, pre_silu, cos, sin = self._embed(x, t, cond)
        cond = in_dtype(cond, tokens.dtype)
        saved = []
        for block in self.blocks:
            tokens, kept = block.forward_saving(tokens, cond, cos, sin)
            saved.append(kept)
        out = self.action_out(self.final_norm(tokens)).to(x.dtype)

        def pullback(u: Tensor) -> Tensor:
            grad = head_input_vjp(self, u.to(tokens.dtype), tokens, saved, pre_silu, cos, sin)
            return grad.to(x.dtype)

        return out, pullback

    def _rope_inv_freq(self, device: torch.device) -> Tensor:
        """The rotary frequencies in float32 [hd/2] (recomputed when the module was cast to
        a lower precision, which rounds the buffer too)."""
        inv_freq = self.rope_inv_freq
        if inv_freq.dtype != torch.float32:
            half = self.config.head_dim // 2
            exponent = -torch.arange(half, dtype=torch.float32) / half
            inv_freq = self.config.rope_base**exponent
        return inv_freq.to(device)

    def _embed(
        self, x: Tensor, t: Tensor, cond: Optional[Tensor]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(tokens [B, H, width], the time MLP's SiLU input [B, H, width], cos, sin
        [L + H, hd/2])`` for the blocks."""
        cfg = self.config
        dtype = self.action_in.weight.dtype  # the compute dtype (mixed precision: bf16/fp16)
        check_head_inputs(
            "FlowTransformerHead", x, t, cond, cfg.horizon, cfg.action_dim, (-1, cfg.width),
            weight_dtype=dtype,
        )  # fmt: skip
        horizon = x.shape[1]
        tokens = self.action_in(x.to(dtype))
        time = sinusoidal_embedding(t * cfg.time_scale, cfg.width, cfg.min_period, cfg.max_period)
        time = time.to(tokens.dtype)[:, None, :].expand(-1, horizon, -1)
        pre_silu = self.time_mlp_in(torch.cat([tokens, time], dim=-1))
        tokens = self.time_mlp_out(F.silu(pre_silu))
        length = horizon + (0 if cond is None else cond.shape[1])
        positions = torch.arange(length, device=x.device, dtype=torch.float32)
        angle = positions[:, None] * self._rope_inv_freq(x.device)[None, :]
        cos, sin = angle.cos().to(tokens.dtype), angle.sin().to(tokens.dtype)
        return tokens, pre_silu, cos, sin
