"""A π0-action-expert-like flow-matching head.

Structure (as the π0 action expert; our own implementation):

1. ``action_in``: Linear D -> width on the noisy chunk.
2. Time: a sinusoidal embedding of t (π0's periods 4e-3 … 4) repeated over the H
   tokens, concatenated with the action tokens and mixed by Linear(2·width -> width),
   swish, Linear(width -> width). (Computed as the tokens' half of that Linear plus its
   time half, which is the same for every token: the time half is a step feature.)
3. ``depth`` pre-norm blocks (RMSNorm; multi-query/grouped attention with rotary
   positions; gated-GELU MLP, as Gemma). Each block's attention lets the H action tokens
   attend to the conditioning tokens ``cond`` [B, L, width] and to one another
   (bidirectionally); ``cond`` supplies keys and values only, through the block's own
   norm and projections, at positions 0…L−1 (action tokens at L…L+H−1). A
   :class:`PrefixCache` with a padding ``mask`` (openpi's prefix mask) hides its padded
   tokens, and positions count real tokens only (openpi: ``cumsum(mask) − 1``).
4. Final RMSNorm, ``action_out``: Linear width -> D.

Forward is shape-static and free of host syncs, so it captures in a CUDA graph and
compiles with ``torch.compile(fullgraph=True)``. :meth:`FlowTransformerHead.forward_with_vjp`
adds the input-VJP (:mod:`ate_fast.models.flow_transformer_vjp`) that real-time chunking
pulls its guidance back through.

:meth:`FlowTransformerHead.step_features` computes what does not depend on the sample
(:mod:`ate_fast.sampling.step_features`): the time half of the time MLP's first layer for
every step at once, the rotary tables, and conditioning tokens' keys and values (a
:class:`PrefixCache`), so a sampler computes them once per call, not once per step — and,
on a GPU, each block's ``[W_q; W_kv]``, so a step projects queries, keys and values with
one GEMM (:attr:`FlowTransformerHead.fuse_qkv`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Callable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ate_fast.models import fused_mlp, l2_prefetch, skinny_gemm
from ate_fast.models.block_epilogues import (
    PrefixSlot,
    fold_norm_weight,
    gated_gelu,
    norm_eps,
    norm_gated_gelu,
    rms_norm,
    rotate_qkv,
    use_triton,
    writes_in_place,
)
from ate_fast.models.cpu_gemm import linear_of
from ate_fast.models.direct_weights import autograd_input_vjp, linear_residual
from ate_fast.models.flow_transformer_vjp import BlockSaved, head_input_vjp
from ate_fast.models.head_inputs import check_head_inputs
from ate_fast.models.norm_folding import fold_norm_weights_
from ate_fast.models.rotary import rotary_tables, rotate
from ate_fast.models.skinny_gemm import block_linear, block_linear_of
from ate_fast.models.split_kv_attention import prefix_attention, prefix_attention_saving
from ate_fast.models.time_embedding import PI0_PERIODS, sinusoidal_embedding
from ate_fast.models.trace_state import autocast_active, exporting_graph
from ate_fast.module_checks import plain_linear, plain_rms_norm, plain_tree
from ate_fast.ops.constants import ACTIVATIONS

SILU = ACTIVATIONS.index("silu")  # the time MLP's activation, as the kernels code it


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


class FlowStepFeatures(NamedTuple):
    """What one step of :class:`FlowTransformerHead` reads besides the sample
    (:meth:`FlowTransformerHead.step_features`)."""

    # [B, 1, width]: the time MLP's first layer on the time embedding, + bias — or, when
    # that layer is not plain (``split_time`` False: a wrapper or hook), the embedding itself
    time: Tensor
    cos: Tensor  # [L + H, hd] rotary tables (positions 0…L+H−1), :func:`rotary_tables`
    sin: Tensor
    blocks: tuple[Any, ...]  # per block: None, or the prefix's (keys, values)
    split_time: bool = True  # the time MLP's first layer is applied in halves (its weights)
    # no hook or foreign module anywhere in the head: the hand-written input-VJP is exact,
    # and a forward owns its residual stream (nothing else can hold a reference to it, so
    # the blocks' residual GEMMs may accumulate into it in place)
    plain: bool = True
    # with a prefix, per block: the call's key/value buffers (shared by its steps), the
    # prefix written once and each step's action rows in place (block_epilogues.PrefixSlot)
    slots: Optional[tuple[PrefixSlot, ...]] = None
    # with a padded prefix (PrefixCache.mask): attention's additive mask [B, 1, 1, L + H]
    # (0, or −inf on a padded key), and cos / sin are then per sample, [B, 1, L + H, hd]
    bias: Optional[Tensor] = None
    # with N > 1 steps and plain q and kv layers, per block: [W_q; W_kv]
    # [(heads + 2·kv_heads)·hd, width], concatenated once per call, so that each step
    # projects queries, keys and values in one GEMM (and its pullback in one), not two
    qkv: Optional[tuple[Tensor, ...]] = None
    # with qkv and the Triton epilogues running: the attention norm's weight is folded into
    # qkv (block_epilogues.fold_norm_weight), so the q|kv GEMM takes the un-normed rows and
    # the rotation kernel scales each by its norm factor 1/√(mean(x²) + ε) — no norm kernel,
    # for no extra bytes (the call copies those weights for qkv anyway)
    attn_norm_folded: bool = False
    # and with FlowTransformerHead.fold_mlp_norm, per block W_gate_up with the MLP norm's
    # weight folded in (the gated-GELU kernel applies the factor): a per-call copy, or the
    # layer's weight itself where the norm is weightless (fold_norm_weights_)
    gate_up: Optional[tuple[Tensor, ...]] = None
    # with the few-row GEMM selected (ATE_FAST_SKINNY_GEMM=triton), B = 1 and split_time:
    # the tokens' half of the time MLP's first layer [width, width], contiguous (one copy
    # per call), so that a step runs that layer on the kernel with its time half as the
    # bias and SiLU in the epilogue — one launch for a GEMM, an add and a SiLU
    time_weight: Optional[Tensor] = None

    def per_block(self) -> Iterator[tuple[Any, ...]]:
        """``(prefix (keys, values) or None, PrefixSlot or None, [W_q; W_kv] or None, the
        folded W_gate_up or None)`` for each block in turn (no slots: every block
        concatenates its prefix; no qkv: two GEMMs project it; no gate_up: the norms run
        as layers)."""
        none = (None,) * len(self.blocks)
        return zip(self.blocks, self.slots or none, self.qkv or none, self.gate_up or none)


class PrefixCache(NamedTuple):
    """The conditioning prefix as keys and values, per block: what π0's action expert reads
    every step (the VLM's KV cache) — computed once per observation, not per step.

    ``keys[i]``, ``values[i]``: block i's [B, kv_heads, L, head_dim]; keys already rotated
    at their positions. :meth:`FlowTransformerHead.prefix_cache` builds one from tokens
    [B, L, width] (then equal to passing the tokens as ``cond``); a VLM's own cache can be
    passed as it is (projected to the expert's kv heads and head_dim).

    ``mask``: None (every token real; positions 0…L−1, the action tokens at L…L+H−1), or
    bool [B, L], True on a real token and False on padding — openpi's prefix mask, e.g. a
    prompt padded to a fixed length, so that one static shape (a CUDA graph, an exported
    engine) serves every prompt. As in openpi, padded keys are not attended and positions
    count real tokens only (``cumsum(mask) − 1``): sample b's action tokens sit at
    n_b…n_b+H−1 for its n_b real tokens, and its cached keys must be rotated at the real
    tokens' positions (as :meth:`~FlowTransformerHead.prefix_cache` does). A padded
    prefix then gives what its real tokens alone give.
    """

    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]
    mask: Optional[Tensor] = None

    @property
    def length(self) -> int:
        """L, the prefix length."""
        return prefix_length(self)


def prefix_length(cache: PrefixCache) -> int:
    """L of ``cache``: :attr:`PrefixCache.length` as a function, which the head's traced
    code calls (torch 2.10's Dynamo cannot trace a property of a NamedTuple: a graph break,
    an error under ``fullgraph=True``)."""
    return cache.keys[0].shape[2]


FLOW_TRANSFORMER_CONFIGS: dict[str, FlowTransformerConfig] = {
    # π0's action expert (Gemma-300M-sized): width 1024, 18 layers, MLP 4096, 8 query heads
    # sharing one key/value head of dim 256; H = 50, D = 32.
    "pi0-expert": FlowTransformerConfig(),
    "small": FlowTransformerConfig(
        width=256, depth=4, mlp_dim=1024, num_heads=4, num_kv_heads=1, head_dim=64
    ),
}


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

    def forward(
        self, x: Tensor, cond: Any, cos: Tensor, sin: Tensor, slot: Any = None,
        bias: Optional[Tensor] = None, qkv: Optional[Tensor] = None,
        gate_up: Optional[Tensor] = None, attn_norm_folded: bool = False,
        overwrite_input: bool = False,
    ) -> Tensor:  # fmt: skip
        """The block on ``x`` [B, H, width]; ``cond``: None, or this block's prefix
        ``(keys, values)`` [B, kv_heads, L, hd] each; ``slot`` (with a prefix): its
        :class:`~ate_fast.models.block_epilogues.PrefixSlot` for the call, or None;
        ``bias``: None, or attention's additive mask [B, 1, 1, L + H] (a padded prefix,
        :attr:`FlowStepFeatures.bias`; ``cos`` / ``sin`` then [B, 1, L + H, hd]);
        ``qkv``: None, or ``[W_q; W_kv]`` (:attr:`FlowStepFeatures.qkv`): one GEMM for both
        projections; ``attn_norm_folded``: ``qkv`` holds the attention norm's weight;
        ``gate_up``: None, or W_gate_up with the MLP norm's weight
        (:attr:`FlowStepFeatures.attn_norm_folded`, :attr:`FlowStepFeatures.gate_up`);
        ``overwrite_input``: the caller never reads ``x`` again and nothing holds a reference
        to it or to the block's tensors (the head's own tokens, no hooks:
        :attr:`FlowStepFeatures.plain`), so the residual stream may be accumulated in place
        in ``x`` — the block's two residual GEMMs then copy nothing first
        (:func:`~ate_fast.models.cpu_gemm.linear_residual_rows`); the returned tensor may
        be ``x`` itself."""
        return self._run(x, cond, cos, sin, False, slot, bias, qkv, gate_up, attn_norm_folded,
                         overwrite_input)[0]  # fmt: skip

    def _mlp(
        self, x1: Tensor, gate_up: Optional[Tensor], save: bool, in_place: bool
    ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """``(x1 + MLP(x1), gate | up as the pullback reads it, gelu_tanh(gate))`` — the
        last two None unless ``save``; ``gate_up``: the folded W_gate|up or None;
        ``in_place``: the output written into ``x1``."""
        eps = norm_eps(self.mlp_norm, x1.dtype)
        if self._mlp_fuses(x1, gate_up):  # ATE_FAST_FUSED_MLP: one kernel
            gain = None if gate_up is not None else self.mlp_norm.weight
            weight = self.gate_up.weight if gate_up is None else gate_up
            if save:
                return fused_mlp.fused_mlp_saving(x1, gain, eps, weight, self.down.weight)
            out = fused_mlp.fused_mlp_residual(x1, gain, eps, weight, self.down.weight, in_place)
            return out, None, None
        if gate_up is not None:  # gu: the scaled gate | up the pullback reads
            hidden, act, gu = norm_gated_gelu(block_linear(x1, gate_up), x1, eps, save_act=save)
        else:
            gu = block_linear_of(self.gate_up, rms_norm(self.mlp_norm, x1))
            hidden, act = gated_gelu(gu, save_act=save)
        return linear_residual(self.down, hidden, x1, in_place=in_place), gu, act

    def _mlp_fuses(self, x1: Tensor, gate_up: Optional[Tensor]) -> bool:
        """Whether the persistent kernel (:mod:`ate_fast.models.fused_mlp`) runs this MLP
        on ``x1``: selected, plain modules without biases, and it :func:`takes` the
        operands (``gate_up``: the folded W_gate|up, else the layer's own with the norm's
        weight)."""
        if not os.environ.get(fused_mlp.ENV_VAR):  # unset: one lookup
            return False
        plain = plain_rms_norm(self.mlp_norm) and plain_linear(self.gate_up)
        if not (plain and plain_linear(self.down)) or self.gate_up.bias is not None:
            return False
        if self.down.bias is not None:
            return False
        weight = self.gate_up.weight if gate_up is None else gate_up
        gain = None if gate_up is not None else self.mlp_norm.weight
        return fused_mlp.takes(x1, weight, self.down.weight, gain)

    def prefix_kv(self, cond: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values [B, kv_heads, L, hd] of tokens [B, L, width], the keys rotated
        with the tables ``cos``, ``sin`` [≥ L, hd] (positions 0…L−1) or [B, 1, ≥ L, hd]."""
        batch, length, _ = cond.shape
        kv = linear_of(self.kv, rms_norm(self.attn_norm, cond))
        kv = kv.view(batch, length, 2 * self.num_kv_heads, -1)
        k, v = kv.transpose(1, 2).chunk(2, dim=1)
        return rotate(k, cos[..., :length, :], sin[..., :length, :]), v

    def forward_saving(
        self, x: Tensor, cond: Any, cos: Tensor, sin: Tensor, slot: Any = None,
        bias: Optional[Tensor] = None, qkv: Optional[Tensor] = None,
        gate_up: Optional[Tensor] = None, attn_norm_folded: bool = False,
    ) -> tuple[Tensor, BlockSaved]:  # fmt: skip
        """The block on ``x`` [B, H, width] and what its input-VJP needs
        (:func:`ate_fast.models.flow_transformer_vjp.block_input_vjp`). ``cond``: None, or
        this block's cached prefix ``(keys, values)`` [B, kv_heads, L, hd] each; ``slot``,
        ``bias``, ``qkv``, ``gate_up``, ``attn_norm_folded``: as in :meth:`forward` (with a
        slot the pullback must run before the next forward)."""
        return self._run(x, cond, cos, sin, True, slot, bias, qkv, gate_up, attn_norm_folded)

    def _run(
        self, x: Tensor, cond: Any, cos: Tensor, sin: Tensor, save: bool, slot: Any = None,
        bias: Optional[Tensor] = None, qkv: Optional[Tensor] = None,
        gate_up: Optional[Tensor] = None, attn_norm_folded: bool = False,
        overwrite_input: bool = False,
    ) -> tuple[Tensor, Optional[BlockSaved]]:  # fmt: skip
        batch, horizon, _ = x.shape
        # a folded norm: its GEMM takes x (x1) itself, the norm's weight is in the GEMM's
        # weight, and the epilogue scales each row by the norm's factor
        attn_norm_folded = attn_norm_folded and qkv is not None
        h = x if attn_norm_folded else rms_norm(self.attn_norm, x)
        if qkv is None:
            q_lin, kv_lin = block_linear_of(self.q, h), block_linear_of(self.kv, h)
        else:  # one GEMM; q_lin and kv_lin are column ranges of its rows (views)
            widths = [self.q.out_features, self.kv.out_features]
            q_lin, kv_lin = block_linear(h, qkv).split(widths, dim=-1)
        # the prefix's keys and values stay in the call's buffers, each step's action rows
        # written behind them — not where the in-place write cannot run (autograd, tracing)
        buffers = None
        if slot is not None and cond is not None and writes_in_place(kv_lin, *cond):
            buffers = slot.get(cond, horizon)
        # rotary q and k, the prefix in front (block_epilogues: torch ops or one kernel);
        # the query heads sharing a key/value head are folded into its rows, token-major: no
        # copy of K and V per query head (at B = 8 with an 816-token prefix that copy would
        # move more bytes per step than the weights) and, with one kv head (π0), attention's
        # output [B, 1, H·heads, hd] is already the o projection's input [B, H, heads·hd]
        norm = (x, norm_eps(self.attn_norm, x.dtype)) if attn_norm_folded else None
        q, k, v = rotate_qkv(q_lin, kv_lin, cos, sin, cond, self.num_heads, self.num_kv_heads,
                             buffers, norm)  # fmt: skip
        # ATE_FAST_L2_PREFETCH=mlp: the MLP's weights into L2 on a second stream meanwhile
        mlp_weights = [self.gate_up.weight if gate_up is None else gate_up, self.down.weight]
        prefetching = l2_prefetch.start(mlp_weights)
        if save:  # with the gemm path's probabilities: the pullback need not recompute them
            attn, probs = prefix_attention_saving(q, k, v, bias)
        else:
            attn, probs = prefix_attention(q, k, v, bias), None
        # (reshape: a view wherever torch's attention returns the layout it does since 2.5;
        # torch 2.4's may not be viewable so)
        attn = attn.reshape(batch, self.num_kv_heads, horizon, -1).transpose(1, 2)
        # the residual adds ride in the output projections' GEMMs (no biases there), in
        # place where nothing reads the residual again (not saved for a pullback): no copy
        # of it into a new output first
        x1 = linear_residual(self.o, attn.reshape(batch, horizon, -1), x,
                             in_place=overwrite_input and not save)  # fmt: skip
        out, gu, act = self._mlp(x1, gate_up, save, overwrite_input and not save)
        l2_prefetch.join(prefetching)
        if not save:
            return out, None
        gate, up = gu.chunk(2, dim=-1)
        # k and v in the call's buffers: the pullback checks they were not rewritten since
        written = None if buffers is None else (slot, slot.writes)
        return out, BlockSaved(x, q, k, v, x1, gate, up, act, written, bias, qkv, gate_up,
                               attn_norm_folded, probs)  # fmt: skip


class FlowTransformerHead(nn.Module):
    """π0-action-expert-like velocity head: ``forward(x [B,H,D], t [B], cond) -> [B,H,D]``.

    ``t`` is the flow time in [0, 1] (openpi: t = 1 is noise). ``cond``: None,
    conditioning tokens [B, L, width] (e.g. a VLM prefix projected to the expert's width),
    or their :class:`PrefixCache`.
    """

    # Whether a sampler call (N > 1 steps) projects each block's queries, keys and values
    # with one GEMM through [W_q; W_kv] concatenated once per call (FlowStepFeatures.qkv),
    # and its pullback takes them back with one. None (auto): on a GPU (any device but the
    # CPU), outside an ONNX / torch.export trace and autocast. On a GPU at B = 1 a launch
    # costs about what the GEMM's bytes do (π0's q and kv weights are 5 MB in bf16, ≈ 1.6 µs
    # of an H100's 3.35 TB/s), so the call saves a launch per block and step for one
    # concatenation per block and call; on the CPU a GEMM has no launch to save and the
    # concatenation costs more than the one larger GEMM gains (captured flow Euler 10, one
    # thread, float32: π0 expert 2.34 → 2.74 s per call, the small head 51 → 54 ms;
    # benchmarks/cpu_head_targets.py --fuse-qkv). True / False: always / never (the tests
    # set True on the CPU).
    fuse_qkv: Optional[bool] = None
    # With the Triton epilogues (ATE_FAST_FLOW_EPILOGUES=triton) in a fused call, also fold
    # each block's MLP norm weight into W_gate_up, so that the gated-GELU kernel applies the
    # norm and its kernel goes (the attention norm is folded whenever the path runs: it
    # rides on the q|kv concatenation). None (auto): only where every MLP norm is weightless
    # (fold_norm_weights_), for free — W_gate_up is then its own fold. True: also into a
    # per-call copy of a weighted norm's W_gate_up, reading and writing it once per call
    # (π0, bf16: 604 MB); on the H200 (2026-12-04, bench_realsize's
    # ate_capture_triton_fold_mlp, B = 1) that made the call slower, 13.72 vs 13.58 ms.
    # False: never.
    fold_mlp_norm: Optional[bool] = None

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

    def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        self._check(x, t, cond)
        return self.forward_features(x, self._features(t[None], cond)[0])

    def step_features(self, x: Tensor, t: Tensor, cond: Any = None) -> list[FlowStepFeatures]:
        """The :class:`FlowStepFeatures` of N times ``t`` [N, B] (the time half of the time
        MLP's first layer in one pass; rotary tables and the prefix's keys and values once,
        shared); ``x`` [B, H, D] (the sample) is only checked.
        ``forward_features(x, features[k])`` is ``forward(x, t[k], cond)``."""
        if t.ndim != 2:
            raise ValueError(f"FlowTransformerHead: t must have shape [N, B], got {tuple(t.shape)}")
        self._check(x, t[0], cond)
        return self._features(t, cond)

    def forward_features(self, x: Tensor, features: FlowStepFeatures) -> Tensor:
        """The forward at ``x`` [B, H, D] from one step's ``features`` (:meth:`step_features`)."""
        tokens = self._embed_tokens(x, features)
        rows = self._block_rows(features)
        for i, (block, block_cond, slot, qkv, gate_up) in enumerate(rows):
            ahead = self._prefetch_ahead(rows, i)
            # tokens are the head's own: in place unless a hook could hold a reference
            tokens = block(tokens, block_cond, features.cos, features.sin, slot, features.bias,
                           qkv, gate_up, features.attn_norm_folded,
                           overwrite_input=features.plain)  # fmt: skip
            l2_prefetch.join(ahead)
        return block_linear_of(self.action_out, rms_norm(self.final_norm, tokens)).to(x.dtype)

    def _block_rows(self, features: FlowStepFeatures) -> list[tuple[Any, ...]]:
        """``(block, prefix, slot, qkv, gate_up)`` for each block in turn
        (:meth:`FlowStepFeatures.per_block`). A list, not a generator: ``torch.compile`` of
        torch < 2.6 breaks its graph at a generator."""
        return [(block, *row) for block, row in zip(self.blocks, features.per_block())]

    def _prefetch_ahead(self, rows: list[tuple[Any, ...]], i: int) -> Optional[tuple]:
        """With ``ATE_FAST_L2_PREFETCH=all``: block ``i + 1``'s attention weights read into L2
        while block ``i`` runs (:mod:`~ate_fast.models.l2_prefetch`); the handle to join
        after block ``i``, or None."""
        if i + 1 >= len(rows):
            return None
        block, _, _, qkv, _ = rows[i + 1]
        return l2_prefetch.start(l2_prefetch.attention_weights(block, qkv), site="ahead")

    def fold_norm_weights_(self) -> FlowTransformerHead:
        """For inference: fold every RMSNorm's weight into the linear layers that read it
        (attention norm → q, kv; MLP norm → gate_up; final norm → action_out), in place,
        leaving weightless norms; returns the head. The same function, each folded product
        rounded once in the weights' dtype; on the GPU's Triton path each block's MLP norm
        kernel then goes at no per-call cost (:attr:`fold_mlp_norm` auto). The parameters
        change: a state dict of the unfolded head no longer loads (fold after loading).
        Every norm must be a plain ``nn.RMSNorm`` and every reader a plain ``nn.Linear``
        (:mod:`ate_fast.models.norm_folding`)."""
        return fold_norm_weights_(self)

    def prefix_cache(self, cond: Tensor, mask: Optional[Tensor] = None) -> PrefixCache:
        """The :class:`PrefixCache` of conditioning tokens ``cond`` [B, L, width]: each
        block's keys and values of the prefix, computed once (then ``forward(x, t, cache)``
        equals ``forward(x, t, cond)`` and projects only the H action rows per step).
        ``mask``: None, or bool [B, L] (True: a real token, False: padding), kept in the
        cache; the keys are then rotated at the real tokens' positions ``cumsum(mask) − 1``
        (a padded token's keys and values are computed but never attended)."""
        cfg = self.config
        if not isinstance(cond, Tensor) or cond.ndim != 3 or cond.shape[2] != cfg.width:
            got = tuple(cond.shape) if isinstance(cond, Tensor) else type(cond).__name__
            raise ValueError(
                f"FlowTransformerHead: cond must have shape [B, L, width] = [B, L, {cfg.width}], "
                f"got {got}"
            )
        batch, length, _ = cond.shape
        if mask is not None:
            self._check_mask(mask, batch, length, cond.device)
        dtype = self.action_in.weight.dtype
        if mask is None:
            angle = self._rope_angle(length, cond.device)
        else:
            angle = self._position_angle(_real_positions(mask))[:, None]  # [B, 1, L, hd/2]
        cos, sin = rotary_tables(angle, dtype)
        pairs = [block.prefix_kv(cond.to(dtype), cos, sin) for block in self.blocks]
        return PrefixCache(tuple(k for k, _ in pairs), tuple(v for _, v in pairs), mask)

    def _check_mask(self, mask: object, batch: int, length: int, device: torch.device) -> None:
        """A prefix mask must be a bool tensor [B, L] on the prefix's device."""
        ok = isinstance(mask, Tensor) and mask.dtype == torch.bool
        if not ok or tuple(mask.shape) != (batch, length) or mask.device != device:
            got = (
                f"{mask.dtype} {tuple(mask.shape)} on {mask.device}"
                if isinstance(mask, Tensor) else type(mask).__name__
            )  # fmt: skip
            raise ValueError(
                f"FlowTransformerHead: the prefix mask must be a bool tensor [B, L] = "
                f"[{batch}, {length}] on {device} (True: a real token, False: padding; "
                f"convert a 0/1 attention_mask with .bool()), got {got}"
            )

    def _check_cache(self, cache: PrefixCache, x: Tensor) -> None:
        """A PrefixCache must have one [B, kv_heads, L, head_dim] key and value per block."""
        cfg = self.config
        if len(cache.keys) != cfg.depth or len(cache.values) != cfg.depth:
            raise ValueError(
                f"FlowTransformerHead: cond is a PrefixCache of {len(cache.keys)} keys and "
                f"{len(cache.values)} values; this head has {cfg.depth} blocks"
            )
        shape = (x.shape[0], cfg.num_kv_heads, prefix_length(cache), cfg.head_dim)
        if cache.mask is not None:
            self._check_mask(cache.mask, x.shape[0], prefix_length(cache), x.device)
        for i, (k, v) in enumerate(zip(cache.keys, cache.values)):
            for name, t in (("keys", k), ("values", v)):
                if tuple(t.shape) != shape or not t.is_floating_point() or t.device != x.device:
                    raise ValueError(
                        f"FlowTransformerHead: cond.{name}[{i}] must be a floating tensor "
                        f"[B, kv_heads, L, head_dim] = {list(shape)} on {x.device}, got "
                        f"{t.dtype} {tuple(t.shape)} on {t.device}"
                    )

    def forward_with_vjp(
        self, x: Tensor, t: Tensor, cond: Any = None
    ) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """``(out, pullback)``: ``out`` = ``forward(x, t, cond)`` [B, H, D] (the same ops,
        so bit for bit) and ``pullback(u [B, H, D]) -> (∂out/∂x)ᵀ u`` [B, H, D], the
        input-VJP written in forward ops (RMSNorm, attention, softmax, rotary, gated-GELU
        backward; t and cond are constants, no weight gradient is formed). Runs without
        autograd (``no_grad`` / ``inference_mode`` too), captures in a CUDA graph, and
        exports to ONNX like any forward."""
        self._check(x, t, cond)
        return self.forward_with_vjp_features(x, self._features(t[None], cond)[0])

    def forward_with_vjp_features(
        self, x: Tensor, features: FlowStepFeatures
    ) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """:meth:`forward_with_vjp` from one step's ``features`` (:meth:`step_features`)."""
        if not features.plain:  # wrapped or hooked layers: the weights alone are not it
            forward = functools.partial(self.forward_features, features=features)
            return autograd_input_vjp("FlowTransformerHead", forward, x)
        tokens, pre_silu = self._embed(x, features)
        cos, sin = features.cos, features.sin
        saved = []
        rows = self._block_rows(features)
        for i, (block, block_cond, slot, qkv, gate_up) in enumerate(rows):
            ahead = self._prefetch_ahead(rows, i)
            tokens, kept = block.forward_saving(
                tokens, block_cond, cos, sin, slot, features.bias, qkv, gate_up,
                features.attn_norm_folded,
            )  # fmt: skip
            l2_prefetch.join(ahead)
            saved.append(kept)
        out = linear_of(self.action_out, rms_norm(self.final_norm, tokens)).to(x.dtype)

        def pullback(u: Tensor) -> Tensor:
            grad = head_input_vjp(self, u.to(tokens.dtype), tokens, saved, pre_silu, cos, sin)
            return grad.to(x.dtype)

        return out, pullback

    def _rope_inv_freq(self, device: torch.device) -> Tensor:
        """The rotary frequencies in float32 [hd/2] (recomputed when the module was cast to
        a lower precision, which rounds the buffer too)."""
        inv_freq = self.rope_inv_freq
        if inv_freq.dtype != torch.float32:
            # on ``device``: a host tensor's copy there would fail in a CUDA graph capture
            half = self.config.head_dim // 2
            exponent = -torch.arange(half, dtype=torch.float32, device=device) / half
            inv_freq = self.config.rope_base**exponent
        return inv_freq.to(device)

    def _rope_angle(self, length: int, device: torch.device) -> Tensor:
        """Rotary angles [length, hd/2] (float32) at positions 0…length−1."""
        return self._position_angle(torch.arange(length, device=device, dtype=torch.float32))

    def _position_angle(self, positions: Tensor) -> Tensor:
        """Rotary angles [..., hd/2] (float32) at ``positions`` [...]."""
        inv_freq = self._rope_inv_freq(positions.device)
        return positions.to(torch.float32)[..., None] * inv_freq

    def _check(self, x: Tensor, t: Tensor, cond: Any) -> None:
        cfg = self.config
        if isinstance(cond, PrefixCache):
            self._check_cache(cond, x)
            check_head_inputs("FlowTransformerHead", x, t, None, cfg.horizon, cfg.action_dim,
                              None)  # fmt: skip
        else:
            check_head_inputs(
                "FlowTransformerHead", x, t, cond, cfg.horizon, cfg.action_dim,
                (-1, cfg.width), weight_dtype=self.action_in.weight.dtype,
            )  # fmt: skip

    def _features(self, t: Tensor, cond: Any) -> list[FlowStepFeatures]:
        """One :class:`FlowStepFeatures` per row of ``t`` [N, B] (inputs checked; ``plain``:
        one pass over the modules, ≈ 35 µs for the π0 expert, per call)."""
        cfg = self.config
        dtype = self.action_in.weight.dtype  # the compute dtype (mixed precision: bf16/fp16)
        steps, batch = t.shape
        w = cfg.width
        time = sinusoidal_embedding(t.reshape(-1) * cfg.time_scale, w, cfg.min_period,
                                    cfg.max_period).to(dtype)  # fmt: skip
        split = plain_linear(self.time_mlp_in)
        if split:  # the time half of the first layer, for every step at once
            time = F.linear(time, self.time_mlp_in.weight[:, w:], self.time_mlp_in.bias)
        time_in = time.view(steps, batch, 1, w)
        mask, bias = None, None
        if cond is None:
            blocks: tuple[Any, ...] = (None,) * cfg.depth
            prefix = 0
        else:
            cache = cond if isinstance(cond, PrefixCache) else self.prefix_cache(cond)
            blocks = tuple((k.to(dtype), v.to(dtype)) for k, v in zip(cache.keys, cache.values))
            prefix, mask = prefix_length(cache), cache.mask
        if mask is None:
            angle = self._rope_angle(cfg.horizon + prefix, t.device)
        else:  # openpi's positions: real tokens counted, per sample; padded keys hidden
            real = torch.cat([mask, mask.new_ones(batch, cfg.horizon)], dim=1)  # [B, L + H]
            angle = self._position_angle(_real_positions(real))[:, None]  # [B, 1, L + H, hd/2]
            zero = torch.zeros((), dtype=dtype, device=mask.device)
            bias = torch.where(real, zero, float("-inf"))[:, None, None, :]  # [B, 1, 1, L + H]
        cos, sin = rotary_tables(angle, dtype)
        plain = plain_tree(self)
        # the prefix's key/value buffers, shared by the N steps (one step: concatenating the
        # prefix once costs what writing it into a buffer once does, in fewer kernels)
        slots = None
        if cond is not None and steps > 1:
            slots = tuple(PrefixSlot() for _ in range(cfg.depth))
        qkv, attn_folded, gate_up = self._projection_weights(steps, t.device)
        time_weight = None
        if split and batch == 1 and skinny_gemm.selected(cfg.horizon, t):
            time_weight = self.time_mlp_in.weight[:, :w].contiguous()
        shared = (cos, sin, blocks, split, plain, slots, bias, qkv, attn_folded, gate_up,
                  time_weight)  # fmt: skip
        return [FlowStepFeatures(time_in[k], *shared) for k in range(steps)]

    def _projection_weights(
        self, steps: int, device: torch.device
    ) -> tuple[Optional[tuple[Tensor, ...]], bool, Optional[tuple[Tensor, ...]]]:
        """``(qkv, attn_norm_folded, gate_up)`` of :class:`FlowStepFeatures` for a call of
        ``steps`` steps on ``device``, built in the call (a CUDA graph replays the build, so
        in-place weight updates are seen).

        ``qkv``: each block's ``[W_q; W_kv]`` where :meth:`_fuses_qkv`, else None. With it
        and the Triton epilogues running (:func:`~ate_fast.models.block_epilogues.use_triton`)
        the attention norm's weight is folded in as the two are stacked (the same bytes as
        the concatenation): the rotation kernel applies the norm's per-row factor and no
        kernel runs that norm. ``gate_up``: with that and :attr:`fold_mlp_norm`, each
        W_gate_up with the MLP norm's weight folded in (a copy, 2 × its bytes per call; the
        weight itself where the norm is weightless, :meth:`fold_norm_weights_`). Plain
        ``nn.RMSNorm`` s and a plain bias-free gate_up layer only; the torch ops gain
        nothing from a fold (CUDA's RMSNorm is one kernel)."""
        if not self._fuses_qkv(steps, device):
            return None, False, None
        blocks = self.blocks
        fold = all(plain_rms_norm(b.attn_norm) for b in blocks)
        if fold:  # and the kernels run (no autograd record: the stacking writes in place)
            stacked = [t for b in blocks for t in (b.q.weight, b.kv.weight, b.attn_norm.weight)]
            fold = use_triton(*(t for t in stacked if t is not None))
        qkv = tuple(
            _stacked(b.q.weight, b.kv.weight, b.attn_norm.weight if fold else None) for b in blocks
        )
        want = self.fold_mlp_norm
        if want is None:  # free only where W_gate_up is its own fold
            want = all(b.mlp_norm.weight is None for b in blocks)
        mlp = fold and want and all(
            plain_rms_norm(b.mlp_norm) and plain_linear(b.gate_up) and b.gate_up.bias is None
            for b in blocks
        )  # fmt: skip
        if not mlp:
            return qkv, fold, None
        return qkv, fold, tuple(fold_norm_weight(b.gate_up.weight, b.mlp_norm) for b in blocks)

    def _fuses_qkv(self, steps: int, device: torch.device) -> bool:
        """Whether a call of ``steps`` steps on ``device`` projects q and kv with one GEMM:
        :attr:`fuse_qkv` (auto: off the CPU, outside an export trace and autocast), more
        than one step, and plain bias-free ``nn.Linear`` q and kv layers (a LoRA wrapper or
        a hook computes something else)."""
        fuse = self.fuse_qkv
        if fuse is None:  # auto: where a launch costs what the GEMM's bytes do
            # (not under autocast: it casts a leaf weight once per region, the call's
            # concatenation at every step)
            fuse = not (device.type == "cpu" or exporting_graph() or autocast_active(device.type))
        if not fuse or steps < 2:  # one step would read the weights twice for one GEMM
            return False
        return all(
            plain_linear(b.q) and plain_linear(b.kv) and b.q.bias is None and b.kv.bias is None
            for b in self.blocks
        )

    def _embed(self, x: Tensor, features: FlowStepFeatures) -> tuple[Tensor, Tensor]:
        """``(tokens [B, H, width], the time MLP's SiLU input [B, H, width])`` for the
        blocks: the time MLP's first layer is its tokens' half plus the step's time half."""
        tokens = linear_of(self.action_in, x.to(self.action_in.weight.dtype))
        pre_silu = self._time_pre_silu(tokens, features)
        return linear_of(self.time_mlp_out, F.silu(pre_silu)), pre_silu

    def _time_pre_silu(self, tokens: Tensor, features: FlowStepFeatures) -> Tensor:
        """The time MLP's first layer [B, H, width] on the action ``tokens`` [B, H, width]
        and the step's time."""
        if features.split_time:
            w = self.config.width
            return F.linear(tokens, self.time_mlp_in.weight[:, :w]) + features.time
        time = features.time.expand(-1, tokens.shape[1], -1)  # the layer on [tokens, time]
        return self.time_mlp_in(torch.cat([tokens, time], dim=-1))

    def _embed_tokens(self, x: Tensor, features: FlowStepFeatures) -> Tensor:
        """:meth:`_embed`'s tokens [B, H, width] (a forward keeps no SiLU input): with
        :attr:`FlowStepFeatures.time_weight` set and the few-row GEMM taking the rows, the
        time MLP's first layer, its time half (the bias) and SiLU in one launch; the
        step's other GEMMs on the kernel wherever it takes them."""
        tokens = block_linear_of(self.action_in, x.to(self.action_in.weight.dtype))
        w_tokens, time = features.time_weight, features.time
        if w_tokens is not None and skinny_gemm.takes(tokens, w_tokens, time):
            _, hidden = skinny_gemm.skinny_linear_act(tokens, w_tokens, time.view(-1), SILU)
        else:
            hidden = F.silu(self._time_pre_silu(tokens, features))
        return block_linear_of(self.time_mlp_out, hidden)


def _stacked(w_q: Tensor, w_kv: Tensor, gain: Optional[Tensor]) -> Tensor:
    """``[W_q; W_kv]`` [N_q + N_kv, width], each column times ``gain`` [width] (an RMSNorm's
    weight, :func:`~ate_fast.models.block_epilogues.fold_norm_weight`) when given — written
    straight into the stacked tensor: the bytes of the concatenation alone."""
    if gain is None:
        return torch.cat([w_q, w_kv])
    out = w_q.new_empty(w_q.shape[0] + w_kv.shape[0], w_q.shape[1])
    gain = gain.to(w_q.dtype)
    torch.mul(w_q, gain, out=out[: w_q.shape[0]])
    torch.mul(w_kv, gain, out=out[w_q.shape[0] :])
    return out


def _real_positions(mask: Tensor) -> Tensor:
    """openpi's positions of a padded sequence: ``cumsum(mask) − 1`` [B, N] (float32, exact
    below 2²⁴ tokens; TensorRT's CumSum takes floating types only) for a bool ``mask``
    [B, N]: a real token's index among the real tokens (a pad repeats its predecessor's)."""
    return mask.to(torch.float32).cumsum(dim=1) - 1
