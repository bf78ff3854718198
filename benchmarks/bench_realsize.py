"""Real size: π0's action expert in bf16, the whole flow Euler 10 call, against its
weight-read floor and against ``torch.compile(mode="max-autotune")``.

Run:  pytest benchmarks/bench_realsize.py -k cuda -p no:cacheprovider \\
          --benchmark-json=bench_realsize.json
          (also writes realsize.json and realsize.md into $ATE_FAST_REALSIZE_OUT, else
          $OUT, else benchmarks/results/latest; rewritten after every case)
      python benchmarks/bench_realsize.py --plan      (cases, compile units, time guess)
      python benchmarks/bench_realsize.py bench_realsize.json [OUT_DIR]
          (the report again, from the pytest-benchmark JSON)
      ATE_FAST_REALSIZE_DRY_RUN=1 pytest benchmarks/bench_realsize.py -k cuda \\
          -p no:cacheprovider --benchmark-disable
          (no GPU: the GPU rows built, checked and run once on the CPU, the expert cut to
          2 of its 18 blocks, the Transformer encoder to 3 of its 9 layers, B = 8 to 2, one
          torch thread; the compiled rows at B = 1 only, ``ATE_FAST_REALSIZE_DRY_RUN=full``
          adds B = 2; ≈ 75 s with a cold compile cache on 2 shared cores; the Triton
          epilogue rows only with ``TRITON_INTERPRET=1``, interpreted: ≈ 4 min more)

Problem: ``make_head("flow-transformer", "pi0-expert")`` (width 1024, 18 blocks, MLP 4096,
8 query heads sharing one key/value head of dim 256; 314M parameters) cast to bf16
(weights and activations; it takes and returns the sampler's float32 state), flow Euler
10 steps (openpi grid), H = 50, D = 32, B ∈ {1, 8}, conditioned on an 816-token prefix
(three 256-token images + 48 language tokens, random [B, 816, 1024] tokens) given as a
:class:`~ate_fast.models.flow_transformer.PrefixCache` (per-block keys/values, 15 MB per
sample in bf16). π0 computes the prefix once per observation: the cache is built once per
B, outside the timed region, and every timed call is the sampler call with the cache given.

Guidance: ``unguided``; ``mlp-guided``: ``LatentGuidance`` (λ = 2, κ = 0.1, direct)
through a bf16 ``ActionVAE(arch="mlp")`` encoder (1600 → 512 → 512 → 2·64, the default);
``transformer-guided``: through the paper's ``ActionVAE(arch="transformer")`` encoder
(d_model 512, 4 heads, 9 layers, d_z 512; 21M parameters) in bf16; ``rtc-guided`` (B = 1):
real-time chunking, ``RTCGuidance`` (delay 5, execution horizon 20, β = 5) — guidance
through the head itself (its input-VJP every step), what a π0 deployment that chunks in
real time runs.

Rows (``extra_info["impl"]``), all computing the same function from the same noise:

- ``eager``: the loop a user writes under ``torch.no_grad()``: per step ``v = head(x, t,
  cache)``, guided ``v = v + λ·clamp(c·g, −κ, κ)`` with ``g`` by ``torch.autograd.grad``
  through the bf16 encoder, ``x = x + dt·v`` (float32 x, precomputed float32 times);
  ``rtc-guided``: the RTC loop written out, ``g`` by ``torch.autograd.grad`` through the
  head (openpi convention, as ``bench_rtc.py``'s ``eager`` row).
- ``compile_max_autotune``: the same loop with the head and the guidance correction
  ``λ·clamp(c·∇ₓy, −κ, κ)`` (``torch.func.grad`` of the same objective) each
  ``torch.compile(mode="max-autotune", dynamic=False)`` (GEMM autotuning + CUDA graph
  trees), the update ``x + dt·v`` eager; the cache's tensors are marked static
  (``torch._dynamo.mark_static_address``: no copy into the graphs per step), c and t are
  device tensors (one compiled graph per B, not per step). The strongest peer.
- ``ate_capture``: ``FlowSampler(head, 10).capture(noise, cache, guidance=...)`` replayed
  (one CUDA graph) as ``captured(noise, cache)``: the cache is copied into the graph's
  buffers once per call, inside the timed region.
- ``ate_capture_triton_epilogues``: ``ate_capture`` with the block's element-wise epilogues
  as two Triton kernels (``ATE_FAST_FLOW_EPILOGUES=triton``,
  :mod:`ate_fast.models.block_epilogues`: −8 kernels per block) and, there, the attention
  RMSNorm folded into the q|kv GEMM and the rotation kernel (−1 more:
  ``FlowStepFeatures.attn_norm_folded``): their A/B in the dry run (B = 1 unguided and
  rtc-guided, B = 2 unguided). On CUDA these kernels are the default since the H200 run,
  so there this row is ``ate_capture`` and the A/B is
- ``ate_capture_torch_epilogues``: ``ate_capture`` with ``ATE_FAST_FLOW_EPILOGUES=torch``
  (GPU: B = 1 unguided and rtc-guided, B = 8 unguided).
- ``ate_capture_triton_fold_mlp``: the same with the head's ``fold_mlp_norm = True``
  (B = 1, unguided): the MLP norm folded too, into a per-call copy of W_gate_up (−1 kernel
  per block and step, +2 × 302 MB per call); against ``ate_capture_triton_epilogues``,
  whether that pays on this GPU.
- ``ate_capture_folded_norms``: ``ate_capture`` (B = 1, unguided) of a copy of the head
  with every RMSNorm's weight folded into the layers that read it
  (``FlowTransformerHead.fold_norm_weights_``, for inference): on the Triton path the MLP
  norm then folds for free (−1 kernel per block and step, no per-call copy); its A/B
  against ``ate_capture``.
- ``ate_capture_static_cond``: ``ate_capture`` (B = 1, unguided) given the capture's own
  cache buffers back (``captured.static_cond``: a deployment's VLM writes its prefix cache
  there), so no copy of the 36 keys and values per call — as ``compile_max_autotune``
  reads its static cache in place; against ``ate_capture``, the copy's cost.
- ``ate_capture_skinny_gemm_n16`` / ``…_split_k``: ``ate_capture`` (B = 1, unguided) with
  ``ATE_FAST_SKINNY_GEMM=triton``: each block's four projections on the few-row Triton GEMM
  (``ate_fast.models.skinny_gemm``) with 16- / 32-column tiles and K split in slices where
  the tiles alone leave SMs idle, instead of cuBLAS; its A/B against ``ate_capture`` (H200,
  whole K: slower than cuBLAS at 16, 32 and 64 columns; the split has not run on a GPU).
- ``ate_capture_skinny_gemm_sum_kernel``: ``…_split_k`` with the slices summed by a second
  kernel per split GEMM (``ATE_FAST_SPLIT_REDUCE=kernel``) instead of by each
  tile's last program (the default inside a capture; 54 launches fewer per step): its A/B.
- ``ate_capture_skinny_gemm_pdl``: ``…_split_k`` with ``ATE_FAST_TRITON_PDL=on``: those
  kernels and the Triton epilogues launched with programmatic dependent launch
  (``ate_fast.ops.triton_pdl``; Hopper and later, so not in the dry run); against
  ``…_split_k``, what overlapping each kernel's start with the one before saves.
- ``ate_capture_skinny_gemm_split_kv_pdl``: ``…_pdl`` with the attention on the split-key
  kernels (``ATE_FAST_PREFIX_ATTENTION=split_kv``), which PDL launches too: every kernel of
  a block on Triton, each starting while the one before it ends; against ``…_pdl`` and
  ``ate_capture_split_kv_attention``.
- ``ate_capture_skinny_gemm_split_kv_fused_mlp_pdl``: the same with the MLP as the
  persistent kernel (``ATE_FAST_FUSED_MLP=persistent``, PDL-launched, on the capture's
  counters): five launches per block; against ``…_split_kv_pdl`` and
  ``ate_capture_fused_mlp``.
- ``ate_capture_split_kv_attention``: ``ate_capture`` (B = 1, unguided and rtc-guided)
  with ``ATE_FAST_PREFIX_ATTENTION=split_kv``: each block's attention on the split-key
  Triton kernels (``ate_fast.models.split_kv_attention``) instead of SDPA; its A/B.
- ``ate_capture_split_kv_combine_kernel``: ``…_split_kv_attention`` (B = 1, unguided) with
  the key slices combined by a second kernel per block (``ATE_FAST_SPLIT_REDUCE=kernel``)
  instead of by each query block's last partial program (the default inside a capture);
  its A/B.
- ``ate_capture_flex_attention``: ``ate_capture`` (B = 1, unguided) with
  ``ATE_FAST_PREFIX_ATTENTION=flex``: each block's attention on torch's compiled
  FlexAttention (``ate_fast.models.flex_prefix_attention``: the rows as 8 query heads of
  the one key/value head, its decoding kernel splitting the keys); its A/B against SDPA.
- ``ate_capture_split_sdpa_attention``: ``ate_capture`` (B = 1, unguided) with
  ``ATE_FAST_PREFIX_ATTENTION=split_sdpa``: each block's 866 keys in 8 slices (6 of 128
  and 98 more), each slice a head of one call of torch's flash-attention kernel
  (``ate_fast.models.split_sdpa_attention``), combined by log-sum-exp in one Triton kernel;
  its A/B against SDPA.
- ``ate_capture_gemm_attention``: ``ate_capture`` (B = 1, unguided and rtc-guided) with
  ``ATE_FAST_PREFIX_ATTENTION=gemm``: each block's attention as cuBLAS's q·kᵀ written in
  float32, a softmax kernel and P·v (``ate_fast.models.gemm_attention``); its A/B against SDPA.
- ``ate_capture_l2_prefetch``: ``ate_capture`` (B = 1, unguided) with
  ``ATE_FAST_L2_PREFETCH=mlp``: as each block's attention starts, a second stream reads the
  block's W_gate_up and W_down (25 MB) once into L2 (``ate_fast.models.l2_prefetch``), so
  that the MLP's GEMMs — at 32 % of the copy rate from HBM on the H200 — find them there;
  its A/B against ``ate_capture``; rtc-guided too, where the input-VJP reads, during each
  block's attention VJP, the MLP weights the next block's VJP reads first.
- ``ate_capture_l2_prefetch_all``: the same with ``ATE_FAST_L2_PREFETCH=all``: also, while
  a block runs, the next block's ``[W_q; W_kv]`` and W_o (9 MB).
- ``ate_capture_fused_mlp``: ``ate_capture`` (B = 1, unguided) with
  ``ATE_FAST_FUSED_MLP=persistent``: each block's gated MLP (norm, gate|up, gated GELU,
  down + residual) as one persistent Triton kernel (``ate_fast.models.fused_mlp``) instead
  of three kernels; its A/B against ``ate_capture`` (unguided, and rtc-guided: the input-VJP's
  saving forward runs it too). ``…_st3`` and ``…_f64_s1024``:
  the same at other tiles (``ATE_FAST_FUSED_MLP_TILES``); ``ate_capture_fused_mlp_folded``:
  of the norm-folded copy (``ate_capture_folded_norms``'s head), against that row.
- ``ate_capture_side_stream``: ``ate_capture`` (mlp- and transformer-guided, B = 1 and 8)
  with ``ATE_FAST_GUIDANCE_STREAM=side``: the latent guidance's gradient (mode ``direct``:
  it reads x alone) on a second CUDA stream while the head runs
  (``ate_fast.sampling.guidance_stream``; two parallel branches of the graph); its A/B
  against ``ate_capture``, and its guidance overhead against unguided ``ate_capture``.
- ``ate_capture_sdpa_flash``, ``ate_capture_sdpa_efficient``: ``ate_capture`` (B = 1,
  unguided) captured with one SDPA backend forced (``torch.nn.attention.sdpa_kernel``;
  torch's own pick on the H200 is cuDNN's); ``ate_capture_cublaslt``: captured with
  ``torch.backends.cuda.preferred_blas_library("cublaslt")``. A/Bs of torch's settings
  against ``ate_capture`` (the efficient and cuBLASLt rows are GPU-only).
- ``ate_capture_padded_prompt``: ``ate_capture`` (B = 1, unguided) with openpi's padded
  prompt: the language tokens' last ``PADDED_TOKENS`` of 48 are padding, hidden by the
  cache's ``mask`` (``PrefixCache.mask``: attention's additive mask, per-sample rotary
  positions) — what a real π0 deployment runs; its A/B against ``ate_capture`` is the cost
  of the mask (another attention kernel where flash attention takes no mask).
- ``ate_capture_padded_prompt_gemm_attention``: the same on
  ``ATE_FAST_PREFIX_ATTENTION=gemm``, the one attention path that takes the mask (added to
  the scores in its softmax kernel); its A/B against ``ate_capture_padded_prompt``.
- ``ate_capture_two_gemms``: ``ate_capture`` (B = 1, unguided) with the head's
  ``fuse_qkv = False``: each block's q and kv projections as two GEMMs per step, as before
  ``FlowStepFeatures.qkv`` (on a GPU ``ate_capture`` concatenates ``[W_q; W_kv]`` once per
  call and projects with one); its A/B against ``ate_capture`` is what that saves.
- ``ate_capture_tuned``: ``ate_capture`` (B = 1, unguided, transformer- and rtc-guided) under the
  settings ``ate_fast.tuning.autotune`` kept for the case in this run: every ``ATE_FAST_*``
  path that runs on the device tried on the captured call (``default_choices``), one
  choice after the other on top of the winners, kept where ≥ 2 % faster with its output
  within ``ATOL_REL``, re-timed against the defaults alternately; within
  ``ATE_FAST_REALSIZE_TUNE_S`` seconds (default 60), after the single A/B rows (their
  kernels compiled by then). The A/B rows combined in the same GPU call; realsize.md lists
  every trial.
- ``ate_capture_compiled``: the same capture of ``torch.compile(head, dynamic=False)``
  (default mode: Inductor's kernels, replayed by the sampler's one graph); guidance on its
  default path (the fused MLP kernel; through the Transformer encoder its Triton kernels
  at B = 1, the hand-written VJP at B = 8 — not compiled).

Kernels: after its timing, each row's call is profiled once (``kernel_profile.py``):
device kernels per call (inside the CUDA graphs too) and their summed device time
(``busy``); the report gives kernels per step and busy ms, so ``median − busy`` is the time
the GPU sat between kernels — what decides whether a row is bound by its kernel count (the
dry run counts ATen ops, composite ones and their parts alike, and their CPU time). The
busy time is also split by kernel kind (GEMM, attention, Triton, other: from the kernels'
names, ``kernel_profile.kernel_kind``) with the GEMMs' achieved bandwidth (the floor's
bytes over the GEMM time), and the costliest kernels of the fastest B = 1 ate row are
listed: where a step's time goes, to choose the next kernel by.

Floor (per problem): the bytes that must be read per call, STEPS × (the head's bf16
weights + the encoder's bf16 weights when guided, each weight once per step + the prefix
cache; ``rtc-guided``: the head's weights and the cache twice, forward and input-VJP),
divided by the device copy bandwidth measured in the same run (a 1 GiB
device-to-device copy, bytes moved = 2 × size, best of ``COPY_REPEATS``). Each row reports
``x_floor`` = median / floor (target ≤ 2) and ``floor_fraction`` = floor / median. Each
row also records ``floor_flops`` (:func:`floor_flops`: the GEMM and attention FLOPs per
call) and ``compute_floor_s``, those FLOPs at the bf16 GEMM rate measured in the same run
(:func:`gemm_throughput`); where it exceeds the bytes' floor (B = 8) the row's floor
target is marked compute-bound.

Jetson: realsize.json/.md end with the AGX Orin projection of every timed row
(``jetson_projection.py``: the row's ``x_floor`` applied to the Orin's weight-read floor at
204.8 GB/s, labelled a projection; compute-bound rows flagged).

Targets (reported met / not met for ``ate_capture`` and ``ate_capture_compiled``): the
whole call ≤ 2× its floor; ≥ 1.3× faster than ``compile_max_autotune``; Transformer
guidance adds ≤ 25 % and MLP guidance ≤ 5 % to the unguided call of the same row and B.
What RTC adds is reported, with no target of its own.

Before timing, every row's output is checked against ``FlowSampler.sample`` (the same bf16
head, guidance and cache) for the same noise: max error ≤ ``ATOL_REL``·max|ref| (bf16
rounding, not timings; guided rows + ``FLIP_ALLOWANCE``, see :func:`check`), and a guided
row must move from the unguided output by ≥ half the guidance's own effect (so a lost
guidance term fails). A round is one call and one synchronisation. Rounds are capped
(``ROW_SECONDS``, ``MAX_ROUNDS``).

Budget: ``ATE_FAST_REALSIZE_BUDGET_S`` (seconds from import). Cases run in priority order
(the eager and ate_capture rows, the epilogues', RTC and padded-prompt rows at B = 1, the
unguided compiled rows at B = 1, the eager and ate_capture rows at B = 8, the two-GEMM and
folded-MLP-norm rows, the other compiled rows at B = 1, the epilogues' row at B = 8, the
compiled rows at B = 8); a case is skipped, and recorded as skipped in realsize.json/.md,
when the seconds spent plus its guessed cost (``CASE_GUESS_S`` + the ``COMPILE_GUESS_S``
of the compile units it would be first to build) exceed the budget.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch

from ate_fast.align.atomic_io import atomic_write_text
from ate_fast.models import make_head
from ate_fast.models.flow_transformer import PrefixCache
from ate_fast.realtime import RTCGuidance
from ate_fast.realtime.rtc import rtc_guidance_weight
from ate_fast.sampling import FlowSampler
from ate_fast.tuning import autotune
from ate_fast.tuning.switches import COMBINATIONS

sys.path.insert(0, str(Path(__file__).resolve().parent))
import jetson_projection
from kernel_profile import KINDS, kernel_profile
from rtc_reference import autograd_rtc_velocity

HAS_GPU = torch.cuda.is_available()
DRY_RUN = os.environ.get("ATE_FAST_REALSIZE_DRY_RUN") in ("1", "full") and not HAS_GPU
# the dry run's compiled rows at its second B too (the per-B recompiles; ≈ 2 more minutes
# of cold-cache compiling on a 2-core CPU)
DRY_RUN_FULL = DRY_RUN and os.environ.get("ATE_FAST_REALSIZE_DRY_RUN") == "full"
DEVICE = "cuda" if HAS_GPU else "cpu"
DTYPE = torch.bfloat16
H, D, STEPS = 50, 32, 10
PREFIX_IMAGES, IMAGE_TOKENS, LANGUAGE_TOKENS = 3, 256, 48
PREFIX = PREFIX_IMAGES * IMAGE_TOKENS + LANGUAGE_TOKENS  # 816
PADDED_TOKENS = 20  # PADDED_ROW: a 28-token instruction in openpi's 48-token prompt
BATCHES = (1, 2) if DRY_RUN else (1, 8)
RTC = "rtc-guided"  # real-time chunking: guidance through the head's own input-VJP (B = 1)
GUIDANCES = ("unguided", "mlp-guided", "transformer-guided", RTC)
LATENT_GUIDANCES = GUIDANCES[:3]  # every B; RTC at the first only
RTC_DELAY, RTC_EXECUTION_HORIZON, RTC_BETA = 5, 20, 5.0  # bench_rtc.py's
EPILOGUES_ROW = "ate_capture_triton_epilogues"  # ate_capture, ATE_FAST_FLOW_EPILOGUES=triton
PADDED_ROW = "ate_capture_padded_prompt"  # ate_capture with a padded prompt (its mask)
# the same on ATE_FAST_PREFIX_ATTENTION=gemm: the one attention path that takes the mask
PADDED_GEMM_ROW = "ate_capture_padded_prompt_gemm_attention"
PADDED_ROWS = (PADDED_ROW, PADDED_GEMM_ROW)
TWO_GEMMS_ROW = "ate_capture_two_gemms"  # ate_capture with q and kv as two GEMMs per block
FOLD_MLP_ROW = "ate_capture_triton_fold_mlp"  # EPILOGUES_ROW with the MLP norm folded too
# ate_capture of a copy of the head with its norms' weights folded into the layers that read
# them (FlowTransformerHead.fold_norm_weights_): on the Triton path the MLP norm then folds
# for free, no norm kernel in a block (−18 per step), no per-call copy of W_gate_up
FOLDED_NORMS_ROW = "ate_capture_folded_norms"
# ate_capture given its own cache buffers back (the prefix cache written there by its
# producer): no per-call copy of the cache, as compile_max_autotune reads its static cache
STATIC_COND_ROW = "ate_capture_static_cond"
# under ATE_FAST_FLOW_EPILOGUES=triton (CUDA's default; the dry run's is torch)
TRITON_ROWS = (EPILOGUES_ROW, FOLD_MLP_ROW, FOLDED_NORMS_ROW)
# ate_capture under ATE_FAST_FLOW_EPILOGUES=torch: on CUDA, where the Triton epilogues are
# the default (so EPILOGUES_ROW is ate_capture there), the A/B against the torch ops
TORCH_EPILOGUES_ROW = "ate_capture_torch_epilogues"
# the epilogues' A/B row: the path other than the default (the dry run's default is torch)
OTHER_EPILOGUES_ROW = EPILOGUES_ROW if DRY_RUN else TORCH_EPILOGUES_ROW
# ate_capture with ATE_FAST_SKINNY_GEMM=triton: the block's GEMMs on the few-row kernel,
# with its column tile (ATE_FAST_SKINNY_GEMM_BLOCK_N) and K's slices
# (ATE_FAST_SKINNY_GEMM_SPLIT_K): against cuBLAS (ate_capture). H200, 2026-12-04, whole K:
# 32 → 15.19, 16 → 14.30, 64 → 20.97 ms against cuBLAS's 13.58 (the n16 row, now with K
# split by the SM count as the path's default; the split_k row: the default tile, 32)
# The search's Triton-block combinations (ate_fast.tuning.switches.COMBINATIONS), a row
# each: the few-row GEMM launched with programmatic dependent launch (ATE_FAST_TRITON_PDL:
# the epilogues too), then with the split-key attention (every kernel of a block on
# Triton), then with the persistent MLP (five launches per block); sm_90 and later — not
# in the CPU's dry run
PDL_ROWS = dict(
    zip(
        ("ate_capture_skinny_gemm_pdl", "ate_capture_skinny_gemm_split_kv_pdl",
         "ate_capture_skinny_gemm_split_kv_fused_mlp_pdl"),
        COMBINATIONS["Triton block with PDL"],
        strict=True,
    )
)  # fmt: skip
# the split's slices summed by a second kernel (ATE_FAST_SPLIT_REDUCE=kernel), not
# by each tile's last program as in the other rows (the default inside a capture)
SUM_KERNEL_ROW = "ate_capture_skinny_gemm_sum_kernel"
# every few-row GEMM row's settings, and each row's own on top of them
SKINNY_SETTINGS = {
    "ATE_FAST_SKINNY_GEMM": "triton", "ATE_FAST_SKINNY_GEMM_BLOCK_N": "32",
    "ATE_FAST_SKINNY_GEMM_SPLIT_K": "auto", "ATE_FAST_TRITON_PDL": "off",
    "ATE_FAST_SPLIT_REDUCE": "auto",
}  # fmt: skip
SKINNY_ROWS = {
    "ate_capture_skinny_gemm_n16": {"ATE_FAST_SKINNY_GEMM_BLOCK_N": "16"},
    "ate_capture_skinny_gemm_split_k": {},
    SUM_KERNEL_ROW: {"ATE_FAST_SPLIT_REDUCE": "kernel"},
    **({} if DRY_RUN else PDL_ROWS),
}
# ate_capture with ATE_FAST_PREFIX_ATTENTION=split_kv: the block's attention on the
# split-key kernels instead of SDPA (B = 1 unguided and rtc-guided)
SPLIT_KV_ROW = "ate_capture_split_kv_attention"
# ... with its slices combined by a second kernel (ATE_FAST_SPLIT_REDUCE=kernel), not by each
# query block's last program as in SPLIT_KV_ROW (the default inside a capture)
COMBINE_KERNEL_ROW = "ate_capture_split_kv_combine_kernel"
# ate_capture with ATE_FAST_PREFIX_ATTENTION=flex: the block's attention on torch's compiled
# FlexAttention (its decoding kernel splits the keys too) instead of SDPA (B = 1 unguided)
FLEX_ROW = "ate_capture_flex_attention"
# ate_capture with ATE_FAST_PREFIX_ATTENTION=split_sdpa: the keys in 8 slices, each a head
# of one flash-attention call, combined by log-sum-exp (B = 1 unguided)
SPLIT_SDPA_ROW = "ate_capture_split_sdpa_attention"
# ate_capture with ATE_FAST_PREFIX_ATTENTION=gemm: q·kᵀ, softmax, P·v — products spread over
# the GPU instead of one fused kernel on 7 programs (B = 1 unguided and rtc-guided)
GEMM_ATTENTION_ROW = "ate_capture_gemm_attention"
# ate_capture with ATE_FAST_L2_PREFETCH=mlp: each block's MLP weights read into L2 on a
# second stream during its attention (B = 1 unguided)
L2_PREFETCH_ROW = "ate_capture_l2_prefetch"
# ... =all: also the next block's attention weights while a block runs
L2_PREFETCH_ALL_ROW = "ate_capture_l2_prefetch_all"
# ate_capture with ATE_FAST_FUSED_MLP=persistent: each block's MLP as one persistent kernel
# (B = 1 unguided), at its default tiles and two others (ATE_FAST_FUSED_MLP_TILES); and of
# the folded copy of the head (no norm weight to apply), the combination it is made for
FUSED_MLP_ROWS = {
    "ate_capture_fused_mlp": "",
    "ate_capture_fused_mlp_st3": "stages=3",  # loads 2 tiles ahead, not 1: 2x the bytes in flight
    "ate_capture_fused_mlp_f64_s1024": "block_f=64,slice=1024",  # half the reads of x
}
FUSED_MLP_FOLDED_ROW = "ate_capture_fused_mlp_folded"
# ate_capture with ATE_FAST_GUIDANCE_STREAM=side: the latent guidance's gradient on a second
# CUDA stream beside the head (mlp- and transformer-guided, B = 1 and 8); unguided it is
# ate_capture itself, the base of its guidance-overhead target
SIDE_STREAM_ROW = "ate_capture_side_stream"
# ate_capture with the MLP-guidance CUDA kernel's loops unrolled 16 deep, not 4
# (ATE_FAST_MLP_GUIDANCE_UNROLL=16: four times the weight loads in flight; bit-equal):
# B = 1, mlp-guided, against ate_capture and its guidance-overhead target
MLP_UNROLL_ROW = "ate_capture_mlp_unroll16"
# ate_capture captured with one SDPA backend forced (B = 1, unguided): torch's pick on the
# H200, cuDNN's flash forward, ran the block's attention on 7 programs (24.5 µs per block);
# bench_prefix_attention.py times the backends alone. Memory-efficient attention has no
# CPU kernel: not in the dry run.
SDPA_ROWS = {"ate_capture_sdpa_flash": "FLASH_ATTENTION"}
if not DRY_RUN:
    SDPA_ROWS["ate_capture_sdpa_efficient"] = "EFFICIENT_ATTENTION"
# ate_capture captured with cuBLASLt as torch's preferred BLAS library (B = 1, unguided):
# the GEMMs took 0.49 ms per step at 32 % of the copy rate with torch's default (cuBLAS).
# A CPU build of torch has no cuBLASLt: not in the dry run either.
CUBLASLT_ROW = "ate_capture_cublaslt"
# ate_capture under the settings ate_fast.tuning.autotune picked for this case in this run
# (B = 1, unguided, transformer-guided and rtc-guided): every ATE_FAST_* path that runs on
# the device tried on the captured call, kept where ≥ 2 % faster and its output matches (within
# ATE_FAST_REALSIZE_TUNE_S seconds), then timed as a row like the others — the A/B rows
# combined without a second GPU call; realsize.md lists each trial
TUNED_ROW = "ate_capture_tuned"
TUNE_S = float(os.environ.get("ATE_FAST_REALSIZE_TUNE_S", "60"))
LATENT_GUIDED = ("mlp-guided", "transformer-guided")  # the guidance stream's workloads
# FlexAttention's torch.compile (≈ 30 s, guessed) would take half the budget: its own row
TUNE_EXCLUDE = ("ATE_FAST_PREFIX_ATTENTION=flex",)
# ate_capture under a setting of torch's
SETTING_ROWS = (*SDPA_ROWS, *(() if DRY_RUN else (CUBLASLT_ROW,)))
ROWS = ("eager", "compile_max_autotune", "ate_capture", EPILOGUES_ROW, TORCH_EPILOGUES_ROW,
        FOLD_MLP_ROW, FOLDED_NORMS_ROW, STATIC_COND_ROW, *SKINNY_ROWS, SPLIT_KV_ROW,
        COMBINE_KERNEL_ROW, FLEX_ROW, SPLIT_SDPA_ROW, GEMM_ATTENTION_ROW, L2_PREFETCH_ROW,
        L2_PREFETCH_ALL_ROW, *FUSED_MLP_ROWS, FUSED_MLP_FOLDED_ROW, SIDE_STREAM_ROW, MLP_UNROLL_ROW,
        *SETTING_ROWS, *PADDED_ROWS, TWO_GEMMS_ROW, TUNED_ROW, "ate_capture_compiled")  # fmt: skip
ATE_ROWS = ("ate_capture", EPILOGUES_ROW, SIDE_STREAM_ROW, MLP_UNROLL_ROW, TUNED_ROW,
            "ate_capture_compiled")  # fmt: skip
# a guided-only row's unguided twin
UNGUIDED_OF = {SIDE_STREAM_ROW: "ate_capture", MLP_UNROLL_ROW: "ate_capture"}
# the package's settings each A/B row runs under (set for its case only)
ROW_ENV = {
    TORCH_EPILOGUES_ROW: {"ATE_FAST_FLOW_EPILOGUES": "torch"},
    **{row: {"ATE_FAST_FLOW_EPILOGUES": "triton"} for row in TRITON_ROWS},
    SPLIT_KV_ROW: {"ATE_FAST_PREFIX_ATTENTION": "split_kv"},
    COMBINE_KERNEL_ROW: {"ATE_FAST_PREFIX_ATTENTION": "split_kv",
                         "ATE_FAST_SPLIT_REDUCE": "kernel"},
    FLEX_ROW: {"ATE_FAST_PREFIX_ATTENTION": "flex"},
    SPLIT_SDPA_ROW: {"ATE_FAST_PREFIX_ATTENTION": "split_sdpa"},
    GEMM_ATTENTION_ROW: {"ATE_FAST_PREFIX_ATTENTION": "gemm"},
    PADDED_GEMM_ROW: {"ATE_FAST_PREFIX_ATTENTION": "gemm"},
    L2_PREFETCH_ROW: {"ATE_FAST_L2_PREFETCH": "mlp"},
    L2_PREFETCH_ALL_ROW: {"ATE_FAST_L2_PREFETCH": "all"},
    SIDE_STREAM_ROW: {"ATE_FAST_GUIDANCE_STREAM": "side"},
    MLP_UNROLL_ROW: {"ATE_FAST_MLP_GUIDANCE_UNROLL": "16"},
    **{row: {"ATE_FAST_FUSED_MLP": "persistent", "ATE_FAST_FUSED_MLP_TILES": tiles}
       for row, tiles in FUSED_MLP_ROWS.items()},
    FUSED_MLP_FOLDED_ROW: {"ATE_FAST_FUSED_MLP": "persistent", "ATE_FAST_FLOW_EPILOGUES": "triton"},
    **{row: {**SKINNY_SETTINGS, **own} for row, own in SKINNY_ROWS.items()},
}  # fmt: skip
BASELINE = "compile_max_autotune"
DEPTH = 2 if DRY_RUN else None  # None: the config's 18 blocks
ENCODER_LAYERS = 3 if DRY_RUN else 9
LAMBDA, KAPPA = 2.0, 0.1
FLOOR_DENOMINATOR = 1e-6  # the flow guidance coefficient's denominator floor (ate_fast.steer)
# Targets (the issue's, for the ate rows)
FLOOR_TARGET = 2.0  # median ≤ 2× the weight-read floor
VS_BASELINE = 1.3  # ≥ 1.3× faster than compile_max_autotune
GUIDANCE_OVERHEAD = {"mlp-guided": 0.05, "transformer-guided": 0.25}
# Check tolerance, relative to max|ref|: bf16 weights and activations, so rows whose
# kernels round differently (Inductor fusions, the fused guidance paths) differ by a few
# bf16 ulps per step: measured ≤ 1.9e-3 unguided on the CPU dry run (2 blocks; 18 blocks
# round more), a lost prefix or time term changes the output by O(1).
ATOL_REL = 5e-2
# Guided rows may differ by more: an element of g that flips sign between two bf16 paths
# flips its clamped correction λ·clamp(c·g, −κ, κ) by up to 2λκ in that step (dt-weighted in
# x): at most 2·λ·κ·Σ|dt| = 0.4 in absolute value if it flipped in every step. Measured on
# the dry run: one step's flip (≈ 0.04, 1.1e-2 of max|ref|).
FLIP_ALLOWANCE = 2 * LAMBDA * KAPPA * 1.0  # Σ|dt| = 1 over the flow grid
COPY_BYTES = 1 << 26 if DRY_RUN else 1 << 30
COPY_REPEATS = 10
GEMM_SIZE = 1024 if DRY_RUN else 8192  # the throughput GEMM's n (8192: 1.1 TFLOP per call)
ROW_SECONDS = 0.0 if DRY_RUN else 0.6
MAX_ROUNDS = 1 if DRY_RUN else 30
MIN_ROUNDS = 1 if DRY_RUN else 3
WARMUP_CALLS = 1 if DRY_RUN else 2
TOP_KERNELS = 12  # the costliest kernels kept per row (JSON; the report lists the best row's)
KERNEL_KINDS = (*(kind for kind, _ in KINDS), "other")
# Cold-cache seconds on the GPU host for the plan and the budget: the H200's measured set-up
# times (2026-12-04, realsize.json "setup_s", rounded up: max-autotune head 135-148 s,
# default-mode head 16 s, max-autotune MLP correction 23-27 s with the head built); the
# Transformer correction's never finished in a run's budget (a guess).
COMPILE_GUESS_S = {
    "max-autotune-head": 150.0,
    "default-head": 20.0,
    "max-autotune-mlp-corr": 30.0,
    "max-autotune-transformer-corr": 60.0,
}
CASE_GUESS_S = {  # each + 1 s for the profiled call (the profiler's start-up)
    "eager": 5.0,
    "ate_capture": 4.0,
    EPILOGUES_ROW: 10.0,  # + Triton compiling its two kernels at first use
    TORCH_EPILOGUES_ROW: 4.0,
    PADDED_ROW: 4.0,
    PADDED_GEMM_ROW: 5.0,
    TWO_GEMMS_ROW: 4.0,
    FOLD_MLP_ROW: 10.0,  # + Triton compiling its kernels' folded variants at first use
    FOLDED_NORMS_ROW: 10.0,  # the same, + a copy of the head
    STATIC_COND_ROW: 4.0,
    **dict.fromkeys(SKINNY_ROWS, 8.0),  # + Triton compiling the GEMM's variants
    SPLIT_KV_ROW: 8.0,  # + Triton compiling its two kernels
    COMBINE_KERNEL_ROW: 4.0,
    FLEX_ROW: 30.0,  # + torch.compile of FlexAttention (a guess: never run on a GPU)
    SPLIT_SDPA_ROW: 6.0,  # + Triton compiling its combine
    GEMM_ATTENTION_ROW: 5.0,  # + Triton compiling its softmax
    L2_PREFETCH_ROW: 6.0,  # + Triton compiling the prefetch kernel
    L2_PREFETCH_ALL_ROW: 4.0,
    **{row: 8.0 for row in FUSED_MLP_ROWS},  # + Triton compiling the kernel per tile
    FUSED_MLP_FOLDED_ROW: 10.0,  # + a copy of the head (the folded one, if not built yet)
    SIDE_STREAM_ROW: 4.0,
    MLP_UNROLL_ROW: 4.0,
    TUNED_ROW: TUNE_S + 8.0,  # its budget, the re-timing (4 captures), then the row
    **dict.fromkeys(SETTING_ROWS, 4.0),
    "compile_max_autotune": 4.0,
    "ate_capture_compiled": 4.0,
}
BUDGET_S = float(os.environ.get("ATE_FAST_REALSIZE_BUDGET_S", "inf"))
_STARTED = time.monotonic()


def _out_dir() -> Path:
    return Path(
        os.environ.get("ATE_FAST_REALSIZE_OUT") or os.environ.get("OUT")
        or "benchmarks/results/latest"
    )  # fmt: skip


# -- cases and their cost --------------------------------------------------------------------
def _cases() -> list[tuple[int, str, str]]:
    """(B, guidance, row) in run order: a budget cut drops the most expensive, least needed
    cases (the compiled rows at B = 8) first. The B = 1 peer (``compile_max_autotune``,
    ≈ 150 s of autotuning) comes right after the cheap B = 1 rows, so that the suite's
    default 240 s reach it."""
    b1, b8 = BATCHES
    cheap = [(b1, g, r) for g in LATENT_GUIDANCES for r in ("eager", "ate_capture")]
    side = [g for g in LATENT_GUIDANCES if g != "unguided"]
    cheap += [(b1, g, SIDE_STREAM_ROW) for g in side]  # the guidance beside the head
    cheap.append((b1, "mlp-guided", MLP_UNROLL_ROW))  # the MLP guidance's loops unrolled 16
    cheap.append((b1, "unguided", OTHER_EPILOGUES_ROW))  # the epilogues' A/B (B = 8: later)
    cheap.append((b1, "unguided", FOLDED_NORMS_ROW))  # norms folded for inference: its A/B
    cheap.append((b1, "unguided", STATIC_COND_ROW))  # the cache not copied per call
    cheap += [(b1, RTC, r) for r in ("eager", "ate_capture", OTHER_EPILOGUES_ROW)]
    cheap += [(b1, g, SPLIT_KV_ROW) for g in ("unguided", RTC)]  # split-key attention vs SDPA
    cheap.append((b1, "unguided", COMBINE_KERNEL_ROW))  # its combine: in-kernel vs a kernel
    cheap.append((b1, "unguided", FLEX_ROW))  # FlexAttention's split keys vs SDPA
    cheap.append((b1, "unguided", SPLIT_SDPA_ROW))  # flash attention per key slice vs SDPA
    cheap += [(b1, g, GEMM_ATTENTION_ROW) for g in ("unguided", RTC)]  # two GEMMs vs SDPA
    cheap.append((b1, "unguided", L2_PREFETCH_ROW))  # the MLP's weights into L2 meanwhile
    cheap.append((b1, "unguided", L2_PREFETCH_ALL_ROW))  # + the next block's attention's
    cheap.append((b1, RTC, L2_PREFETCH_ROW))  # + in the pullback: the next VJP's MLP weights
    cheap += [(b1, "unguided", r) for r in (*FUSED_MLP_ROWS, FUSED_MLP_FOLDED_ROW)]  # 1 kernel
    cheap.append((b1, RTC, "ate_capture_fused_mlp"))  # + the saving launch in RTC's forward
    cheap += [(b1, "unguided", r) for r in SKINNY_ROWS]  # the few-row GEMM vs cuBLAS
    cheap.append((b1, "unguided", PADDED_ROW))  # the prompt's padding mask: its A/B
    cheap.append((b1, "unguided", PADDED_GEMM_ROW))  # and on the path that takes the mask
    # the paths tuned together, after their own rows (their kernels compiled by then)
    cheap += [(b1, g, TUNED_ROW) for g in ("unguided", "transformer-guided", RTC)]
    cheap_b8 = [(b8, g, r) for g in LATENT_GUIDANCES for r in ("eager", "ate_capture")]
    cheap_b8 += [(b8, g, SIDE_STREAM_ROW) for g in side]
    # A/Bs of a default's parts, after the unguided compiled baseline (the targets' peer)
    parts = [(b1, "unguided", TWO_GEMMS_ROW), (b1, "unguided", FOLD_MLP_ROW)]
    parts += [(b1, "unguided", r) for r in SETTING_ROWS]  # SDPA backends, cuBLASLt
    compiled_b1 = [
        (b1, "unguided", "compile_max_autotune"),
        (b1, "unguided", "ate_capture_compiled"),
        (b1, "mlp-guided", "ate_capture_compiled"),
        (b1, "transformer-guided", "ate_capture_compiled"),
        (b1, "mlp-guided", "compile_max_autotune"),
        (b1, "transformer-guided", "compile_max_autotune"),
    ]
    compiled_b8 = [(b8, g, r) for (_, g, r) in compiled_b1]
    if DRY_RUN and not DRY_RUN_FULL:
        compiled_b8 = []
    first_compiled, compiled_b1 = compiled_b1[:2], compiled_b1[2:]
    tail = [(b8, "unguided", OTHER_EPILOGUES_ROW), *compiled_b8]
    return cheap + first_compiled + cheap_b8 + parts + compiled_b1 + tail


CASES = _cases() if HAS_GPU or DRY_RUN else []


def _units(batch: int, guidance: str, row: str) -> list[tuple[str, int]]:
    """The torch.compile units (name, B) a case needs."""
    if row == "compile_max_autotune":
        units = [("max-autotune-head", batch)]
        if guidance != "unguided":
            units.append((f"max-autotune-{guidance.split('-')[0]}-corr", batch))
        return units
    if row == "ate_capture_compiled":
        return [("default-head", batch)]
    return []


_BUILT_UNITS: set = set()


def _guess(case: tuple[int, str, str], built: set) -> float:
    """Guessed seconds for a case: its own plus the compile units not built yet."""
    new = [u for u in _units(*case) if u not in built]
    return CASE_GUESS_S[case[2]] + sum(COMPILE_GUESS_S[name] for name, _ in new)


def plan(cases: Optional[list] = None) -> str:
    """The cases, the compile units and a rough time estimate, as text."""
    if cases is None:
        cases = CASES or _cases()
    built: set = set()
    total = 0.0
    for case in cases:
        total += _guess(case, built)
        built.update(_units(*case))
    compiling = sum(COMPILE_GUESS_S[name] for name, _ in built)
    return (
        f"bench_realsize plan: {len(cases)} benchmarks in {len({c[:2] for c in cases})} "
        f"groups; {len(built)} torch.compile units; estimate ≈ {compiling:.0f} s compiling + "
        f"≈ {total - compiling:.0f} s checking and timing (rough guesses, cold compile cache)"
    )


# -- problem set-up (cached: one head, encoder, cache and compiled graph each) ---------------
_CACHE: dict = {}


def _cached(key: Any, build: Callable[[], Any]) -> Any:
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _head() -> torch.nn.Module:
    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        overrides = {} if DEPTH is None else {"depth": DEPTH}
        with torch.device(DEVICE):
            head = make_head("flow-transformer", "pi0-expert", horizon=H, action_dim=D,
                             **overrides)  # fmt: skip
        return head.to(DTYPE).eval().requires_grad_(False)

    return _cached("head", build)


def _folded(head: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``head`` with its norms' weights folded in (FOLDED_NORMS_ROW)."""
    return copy.deepcopy(head).fold_norm_weights_()


def _prefix_cache(batch: int, padded: bool = False) -> PrefixCache:
    """The 816-token prefix's per-block keys/values (bf16), built once per B; ``padded``:
    the prompt's last PADDED_TOKENS tokens padding (the cache's ``mask``)."""

    def build() -> PrefixCache:
        head = _head()
        gen = torch.Generator().manual_seed(4)
        tokens = torch.randn(batch, PREFIX, head.config.width, generator=gen).to(DEVICE)
        mask = None
        if padded:
            mask = torch.ones(batch, PREFIX, dtype=torch.bool, device=DEVICE)
            mask[:, PREFIX - PADDED_TOKENS :] = False
        with torch.no_grad():
            cache = head.prefix_cache(tokens.to(DTYPE), mask)
        return PrefixCache(
            tuple(k.contiguous() for k in cache.keys),
            tuple(v.contiguous() for v in cache.values),
            mask,
        )

    return _cached(("prefix", batch, padded), build)


def _noise(batch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(batch, H, D, generator=gen).to(DEVICE)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class _Encoder:
    """One bf16 ActionVAE encoder, its target z*, ate_fast's guidance and the user's
    objective."""

    def __init__(self, kind: str) -> None:
        from ate_fast.align import ActionVAE
        from ate_fast.steer import LatentGuidance

        torch.manual_seed(2)
        if kind == "mlp":  # the default MLP encoder: 1600 -> 512 -> 512 -> 2·64
            vae = ActionVAE(D, H, latent_dim=64, arch="mlp")
        else:  # the paper's encoder: d_model 512, 4 heads, ff 1024, 9 layers, d_z 512
            vae = ActionVAE(D, H, latent_dim=512, arch="transformer", num_layers=ENCODER_LAYERS)
        self.vae = vae.to(DEVICE).to(DTYPE).eval().requires_grad_(False)
        gen = torch.Generator().manual_seed(3)
        self.target = torch.randn(vae.latent_dim, generator=gen).to(DEVICE)
        self.target_low = self.target.to(DTYPE)
        self.guidance = LatentGuidance(self.vae, self.target, scale=LAMBDA, clamp=KAPPA)
        self.weight_bytes = _nbytes(self.vae.encoder.parameters())

    def objective(self, u: torch.Tensor) -> torch.Tensor:
        """y = −Σ_b mean_j (μ(u)_bj − z*_j)² on the bf16 chunk u: ATE's per-sample objective."""
        mu, _ = self.vae.encoder(u)
        return -(mu - self.target_low).square().mean(dim=1).sum()

    def autograd_gradient(self, x: torch.Tensor) -> torch.Tensor:
        """What a user writes: cast the float32 chunk to the encoder's bf16, ∇ by autograd,
        back to float32 (called inside ``torch.no_grad()``)."""
        with torch.enable_grad():
            u = x.detach().to(DTYPE).requires_grad_(True)
            (g,) = torch.autograd.grad(self.objective(u), u)
        return g.to(x.dtype)

    def correction(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """λ·clamp(c·∇ₓy, −κ, κ) (what ``compile_max_autotune`` compiles)."""
        g = torch.func.grad(lambda u: self.objective(u.to(DTYPE)))(x)
        return LAMBDA * torch.clamp(c * g, -KAPPA, KAPPA)


def _encoder(kind: str) -> _Encoder:
    return _cached(("encoder", kind), lambda: _Encoder(kind))


def _guidance_encoder(guidance: str) -> Optional[_Encoder]:
    return None if guidance in ("unguided", RTC) else _encoder(guidance.split("-")[0])


class _RealTimeChunking:
    """The previous chunk (random, fixed seed), its ``RTCGuidance`` and the per-step
    guidance weights min(β, w(t)) of the user's loop (openpi's grid)."""

    def __init__(self, batch: int) -> None:
        gen = torch.Generator().manual_seed(6)
        self.prev = torch.randn(batch, H, D, generator=gen).to(DEVICE)
        self.guidance = RTCGuidance(
            self.prev, RTC_DELAY, execution_horizon=RTC_EXECUTION_HORIZON,
            max_guidance_weight=RTC_BETA,
        )  # fmt: skip
        t_values = _flow_times()[0]
        self.step_weights = rtc_guidance_weight(torch.tensor(t_values).numpy(), RTC_BETA).tolist()

    def velocity(self, head: Callable, x: torch.Tensor, t: torch.Tensor, t_value: float,
                 step: int, cache: PrefixCache) -> torch.Tensor:  # fmt: skip
        """v − min(β, w(t))·g, g = VJP of x̂₁ = x − t·v(x) with (prev − x̂₁)·W: what a user
        writes with autograd through the head (inside ``torch.no_grad()``)."""
        return autograd_rtc_velocity(
            head, x, t, t_value, cache, self.prev, self.guidance.weights, self.step_weights[step]
        )


def _rtc(batch: int) -> _RealTimeChunking:
    return _cached(("rtc", batch), lambda: _RealTimeChunking(batch))


def _guidance(batch: int, guidance: str) -> Any:
    """The sampler's ``guidance=`` argument for the problem (None: unguided)."""
    if guidance == RTC:
        return _rtc(batch).guidance
    enc = _guidance_encoder(guidance)
    return None if enc is None else enc.guidance


def _compiled(unit: str, batch: int) -> Callable:
    """The torch.compile'd callable of a unit (one object per unit; dynamic=False, so each
    B is its own static graph)."""
    key = ("compiled", unit)
    if unit == "max-autotune-head":
        fn = _cached(key, lambda: torch.compile(_head(), mode="max-autotune", dynamic=False))
    elif unit == "default-head":
        fn = _cached(key, lambda: torch.compile(_head(), dynamic=False))
    else:  # max-autotune-{mlp,transformer}-corr
        enc = _encoder(unit.split("-")[2])
        fn = _cached(key, lambda: torch.compile(enc.correction, mode="max-autotune", dynamic=False))
    _BUILT_UNITS.add((unit, batch))
    return fn


def _best_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """The fastest of ``repeats`` calls of ``fn`` after two warm-up calls (CUDA events on
    the GPU)."""
    for _ in range(2):
        fn()
    _sync()
    times = []
    for _ in range(repeats):
        if DEVICE == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e-3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return min(times)


def copy_bandwidth() -> dict:
    """Device copy bandwidth: a ``COPY_BYTES`` device-to-device copy, bytes moved = 2 ×
    size, best of ``COPY_REPEATS`` (CUDA events on the GPU)."""

    def build() -> dict:
        src = torch.ones(COPY_BYTES, dtype=torch.uint8, device=DEVICE)
        dst = torch.empty_like(src)
        best = _best_seconds(lambda: dst.copy_(src), COPY_REPEATS)
        return {"copy_bytes": COPY_BYTES, "repeats": COPY_REPEATS, "best_s": best,
                "bytes_per_s": 2 * COPY_BYTES / best}  # fmt: skip

    return _cached("bandwidth", build)


def gemm_throughput() -> dict:
    """Device bf16 GEMM throughput: a [n, n] @ [n, n] matmul (2n³ FLOPs, n = ``GEMM_SIZE``),
    best of ``COPY_REPEATS`` — the compute side of a row's floor (what cuBLAS reaches on
    the tensor cores, not the data sheet's peak)."""

    def build() -> dict:
        n = GEMM_SIZE
        gen = torch.Generator().manual_seed(5)
        a, b = (torch.randn(n, n, generator=gen).to(DEVICE, DTYPE) for _ in range(2))
        out = torch.empty(n, n, dtype=DTYPE, device=DEVICE)
        best = _best_seconds(lambda: torch.mm(a, b, out=out), COPY_REPEATS)
        return {"n": n, "repeats": COPY_REPEATS, "best_s": best, "flops_per_s": 2 * n**3 / best}

    return _cached("gemm", build)


def floor_bytes(batch: int, guidance: str) -> dict:
    """Bytes that must be read per call: every bf16 weight of the head (and of the encoder
    when guided) once per step, and the prefix cache once per step."""
    head = _head()
    enc = _guidance_encoder(guidance)
    parts = {
        "head_weights": _nbytes(head.parameters()),
        "encoder_weights": 0 if enc is None else enc.weight_bytes,
        "prefix_cache": _nbytes(_prefix_cache(batch).keys + _prefix_cache(batch).values),
    }
    if guidance == RTC:  # the input-VJP reads them again (629 MB + the cache: not in L2)
        parts["head_weights_vjp"] = parts["head_weights"]
        parts["prefix_cache_vjp"] = parts["prefix_cache"]
    return {**parts, "steps": STEPS, "per_call": STEPS * sum(parts.values())}


def _matrix_elements(module: torch.nn.Module) -> int:
    """Elements of a module's 2-D parameters: its GEMMs' weights (one multiply-add each per
    row through them)."""
    return sum(p.numel() for p in module.parameters() if p.ndim == 2)


def floor_flops(batch: int, guidance: str) -> int:
    """FLOPs per call no kernel can skip (2 per multiply-add), for a compute floor: per step
    the head's weight matrices on its B·H tokens, attention of those tokens' queries
    against the prefix and the chunk (QKᵀ and PV), and, guided, the encoder's forward and
    input-VJP (each a pass through its matrices: the MLP encoder's on one flattened row per
    sample, the Transformer encoder's on H tokens per sample); ``rtc-guided``: twice the
    head's, its input-VJP (dX through every matrix, dO·Vᵀ and dS·K in attention) as much
    as its forward."""
    head = _head()
    cfg = head.config
    tokens = batch * H
    step = 2 * _matrix_elements(head) * tokens
    step += 2 * 2 * tokens * (PREFIX + H) * cfg.num_heads * cfg.head_dim * cfg.depth
    enc = _guidance_encoder(guidance)
    if enc is not None:
        rows = batch if guidance == "mlp-guided" else tokens
        step += 2 * 2 * _matrix_elements(enc.vae.encoder) * rows
    if guidance == RTC:
        step *= 2
    return STEPS * step


# -- the rows --------------------------------------------------------------------------------
def _flow_times() -> tuple[list[float], list[float], float]:
    """openpi's grid: t = 1, 0.9, …, 0.1; the guidance coefficients c = −t/(1−t); dt."""
    t_values = [1.0 - i / STEPS for i in range(STEPS)]
    cs = [-t / max(1.0 - t, FLOOR_DENOMINATOR) for t in t_values]
    return t_values, cs, -1.0 / STEPS


def user_loop(
    batch: int,
    head: Callable,
    gradient: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    correction: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    mark_step: bool = False,
    rtc: Optional[_RealTimeChunking] = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The loop a user writes around ``head(x, t, cache)``: ``gradient(x)`` -> g (eager:
    the correction in tensor ops with Python floats) or ``correction(x, c)`` -> λ·clamp(c·g)
    (compiled, c a device tensor), or ``rtc``'s guided velocity; none: unguided."""
    cache = _prefix_cache(batch)
    t_values, cs, dt = _flow_times()
    tt = [torch.full((batch,), t, dtype=torch.float32, device=DEVICE) for t in t_values]
    ct = [torch.tensor(c, dtype=torch.float32, device=DEVICE) for c in cs]

    def run(noise: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = noise.clone()
            for i in range(STEPS):
                if mark_step:
                    torch.compiler.cudagraph_mark_step_begin()
                if rtc is not None:
                    v = rtc.velocity(head, x, tt[i], t_values[i], i, cache)
                else:
                    v = head(x, tt[i], cache)
                if gradient is not None:
                    v = v + LAMBDA * torch.clamp(cs[i] * gradient(x), -KAPPA, KAPPA)
                elif correction is not None:
                    v = v + correction(x, ct[i])
                x = torch.add(x, v, alpha=dt)
            return x

    return run


def _ate_call(
    batch: int, guidance: str, model: Callable, padded: bool = False, in_place: bool = False
) -> Callable[[torch.Tensor], Any]:
    """The captured call; ``in_place``: given the capture's own cache buffers back (a cache
    written there by its producer: no copy per call, as compile_max_autotune's static
    addresses), else the cache (copied into them per call)."""
    cache = _prefix_cache(batch, padded)
    sampler = FlowSampler(model, STEPS)
    with torch.no_grad():
        captured = sampler.capture(
            _noise(batch), cache, guidance=_guidance(batch, guidance), check_finite=False
        )
    given = captured.static_cond if in_place else cache
    return lambda noise: captured(noise, given)


def build_row(batch: int, guidance: str, row: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The row's call ``fn(noise) -> actions`` (before its warm-up calls)."""
    enc = _guidance_encoder(guidance)
    if row == "eager":
        rtc = _rtc(batch) if guidance == RTC else None
        return user_loop(batch, _head(), None if enc is None else enc.autograd_gradient, rtc=rtc)
    if row == "compile_max_autotune":
        for t in _prefix_cache(batch).keys + _prefix_cache(batch).values:
            torch._dynamo.mark_static_address(t)
        head = _compiled("max-autotune-head", batch)
        corr = None
        if enc is not None:
            corr = _compiled(f"max-autotune-{guidance.split('-')[0]}-corr", batch)
        return user_loop(batch, head, correction=corr, mark_step=DEVICE == "cuda")
    if row in ("ate_capture", EPILOGUES_ROW, TORCH_EPILOGUES_ROW, SPLIT_KV_ROW,
               COMBINE_KERNEL_ROW, FLEX_ROW,
               SPLIT_SDPA_ROW, GEMM_ATTENTION_ROW, L2_PREFETCH_ROW, L2_PREFETCH_ALL_ROW,
               SIDE_STREAM_ROW, MLP_UNROLL_ROW,
               *SKINNY_ROWS, *SETTING_ROWS, *FUSED_MLP_ROWS, TUNED_ROW):  # fmt: skip
        return _ate_call(batch, guidance, _head())
    if row in PADDED_ROWS:
        return _ate_call(batch, guidance, _head(), padded=True)
    if row == STATIC_COND_ROW:
        return _ate_call(batch, guidance, _head(), in_place=True)
    if row in (TWO_GEMMS_ROW, FOLD_MLP_ROW):  # the same weights and modules, own settings
        head = copy.copy(_head())
        if row == TWO_GEMMS_ROW:
            head.fuse_qkv = False
        else:
            head.fold_mlp_norm = True
        return _ate_call(batch, guidance, head)
    if row in (FOLDED_NORMS_ROW, FUSED_MLP_FOLDED_ROW):  # a folded copy, built once
        return _ate_call(batch, guidance, _cached("folded", lambda: _folded(_head())))
    if row == "ate_capture_compiled":
        return _ate_call(batch, guidance, _compiled("default-head", batch))
    raise ValueError(row)


def reference(batch: int, guidance: str, padded: bool = False) -> torch.Tensor:
    """``FlowSampler.sample``'s output for the problem (computed once); ``padded``: with
    the padded prompt's cache (PADDED_ROW)."""

    def build() -> torch.Tensor:
        sampler = FlowSampler(_head(), STEPS)
        with torch.no_grad():
            return sampler.sample(
                _noise(batch), _prefix_cache(batch, padded), guidance=_guidance(batch, guidance)
            ).clone()

    return _cached(("reference", batch, guidance, padded), build)


def check(row: str, out: torch.Tensor, batch: int, guidance: str) -> dict:
    """The row's output against ``sample()``'s: max error ≤ ATOL_REL·max|ref| (guided: +
    FLIP_ALLOWANCE) and, guided, moved from the unguided output by at least half the
    guidance's own effect (so a lost guidance term fails). Returns the distances (relative
    to max|ref|).

    Not "closer to the guided than to the unguided output": with κ = 0.1 the early steps'
    correction is ≈ κ·sign(g) (c = −t/(1−t) is large), and near-zero elements of g flip
    sign between two bf16 paths, so two correct guided rows differ by about the guidance's
    own effect (docs/precision.md, "The clamp amplifies precision")."""
    ref = reference(batch, guidance, row in PADDED_ROWS)
    scale = max(float(ref.abs().max()), 1.0)
    out = out.float()
    err = float((out - ref).abs().max()) / scale
    clamped = guidance not in ("unguided", RTC)  # RTC's correction has no clamp to flip
    allowed = ATOL_REL + (FLIP_ALLOWANCE / scale if clamped else 0.0)
    assert bool(torch.isfinite(out).all()), f"{row}: non-finite output"
    assert err <= allowed, (
        f"{row} differs from sample(): max |Δ| = {err:.3g} of max |ref| (allowed {allowed:.3g})"
    )
    result = {"max_rel_error": err}
    if guidance != "unguided":
        unguided = reference(batch, "unguided")
        effect = float((ref - unguided).abs().max()) / scale
        moved = float((out - unguided).abs().max()) / scale
        result.update(guidance_effect=effect, moved_from_unguided=moved)
        assert moved >= 0.5 * effect, (
            f"{row}: moved {moved:.3g} from the unguided output, the guidance's effect is "
            f"{effect:.3g}: guidance lost?"
        )
    return result


# -- results: accumulated per case, rewritten after each ------------------------------------
_RESULTS: dict = {"rows": {}, "skipped": [], "failed": [], "setup_s": {}, "tuning": {}}


def _device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"


# the package's settings the run was started with (e.g. ATE_FAST_SPLIT_KV_TILES for the
# split-key row), read at import: the rows' own settings come and go with each case
_RUN_SPOT = ("ATE_FAST_REALSIZE_", "ATE_FAST_SUITE", "ATE_FAST_TEST", "ATE_FAST_BENCH")
SETTINGS = {
    k: v for k, v in os.environ.items() if k.startswith("ATE_FAST_") and not k.startswith(_RUN_SPOT)
}


def _environment() -> dict:
    env = {
        "settings": SETTINGS,
        "device": _device_name(),
        "torch": torch.__version__,
        "dry_run": DRY_RUN,
        "dtype": "bfloat16",
        "head": "flow-transformer pi0-expert" + (f" (depth {DEPTH})" if DEPTH else ""),
        "head_parameters": sum(p.numel() for p in _head().parameters()),
        "encoder_layers_transformer": ENCODER_LAYERS,
        "H": H, "D": D, "steps": STEPS, "prefix_tokens": PREFIX, "batches": list(BATCHES),
        "date": datetime.date.today().isoformat(),
    }  # fmt: skip
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def write_report(out_dir: Optional[Path] = None) -> None:
    """realsize.json and realsize.md from the cases run so far."""
    out_dir = _out_dir() if out_dir is None else out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {
        "environment": _environment(),
        "bandwidth": copy_bandwidth(),
        "gemm": gemm_throughput(),
        "floors": {f"B={b} {g}": floor_bytes(b, g) for b in BATCHES for g in GUIDANCES},
        **_RESULTS,
    }
    data["rows"] = _ordered(_RESULTS["rows"])
    done = {*data["rows"], *(s["case"] for s in data["skipped"] + data["failed"])}
    # not yet reached, deselected (-k), or cut by the suite's limit when the module ended
    data["not_run"] = [_row_key(*c) for c in CASES if _row_key(*c) not in done]
    data["targets"] = targets(data)
    data["jetson_projection"] = jetson_projection.project(data)
    # whole or not at all: a kill mid-write keeps the last report
    atomic_write_text(out_dir / "realsize.json", json.dumps(data, indent=2) + "\n")
    atomic_write_text(out_dir / "realsize.md", markdown(data))


def _ordered(rows: dict) -> dict:
    """``rows`` in the report's order: by B, then guidance and row as in GUIDANCES, ROWS."""

    def order(item: tuple) -> tuple:
        e = item[1]
        row = ROWS.index(e["row"]) if e["row"] in ROWS else len(ROWS)
        return e["B"], GUIDANCES.index(e["guidance"]), row, e["row"]

    return dict(sorted(rows.items(), key=order))


def _row_key(batch: int, guidance: str, row: str) -> str:
    return f"B={batch} {guidance} {row}"


def targets(data: dict) -> list[dict]:
    """The issue's targets for each ate row, from ``data["rows"]`` (median seconds)."""
    rows = data["rows"]
    env = data["environment"]
    out = []

    def median(b: int, g: str, r: str) -> Optional[float]:
        entry = rows.get(_row_key(b, g, r))
        return None if entry is None else entry["median_s"]

    for b in env["batches"]:
        for g in GUIDANCES:
            for r in ATE_ROWS:
                t = median(b, g, r)
                if t is None:
                    continue
                entry = rows[_row_key(b, g, r)]
                compute = entry.get("compute_floor_s")
                out.append({
                    "target": f"whole call <= {FLOOR_TARGET:g}x floor", "B": b, "guidance": g,
                    "row": r, "value": entry["x_floor"], "met": entry["x_floor"] <= FLOOR_TARGET,
                    "compute_bound": compute is not None and compute > entry["floor_s"],
                })  # fmt: skip
                base = median(b, g, BASELINE)
                if base is not None:
                    out.append({
                        "target": f">= {VS_BASELINE:g}x faster than {BASELINE}", "B": b,
                        "guidance": g, "row": r, "value": base / t, "met": base / t >= VS_BASELINE,
                    })  # fmt: skip
                limit = GUIDANCE_OVERHEAD.get(g)
                plain = median(b, "unguided", UNGUIDED_OF.get(r, r))
                if g != "unguided" and plain is not None:
                    added = t / plain - 1.0
                    name = g.split("-")[0]
                    out.append({
                        "target": f"{name} guidance adds <= {limit:.0%}" if limit is not None
                        else f"{name} guidance adds (reported; no target)",
                        "B": b, "guidance": g, "row": r, "value": added,
                        "met": None if limit is None else added <= limit,
                    })  # fmt: skip
    return out


def _gemm_line(gemm: Optional[dict]) -> str:
    if not gemm:
        return ""
    return (
        f"; bf16 GEMM {gemm['flops_per_s'] / 1e12:.0f} TFLOP/s ({gemm['n']}³, best of "
        f"{gemm['repeats']}: the compute floor's rate)"
    )


def _settings_line(settings: Optional[dict]) -> list[str]:
    """The package's settings the run started with, where there were any."""
    if not settings:
        return []
    return ["Settings: " + ", ".join(f"`{k}={v}`" for k, v in sorted(settings.items()))]


def _tuning_lines(tuning: dict) -> list[str]:
    """The tuned rows' trials: each option's time and status, the settings kept."""
    lines = []
    for key, t in tuning.items():
        kept = ", ".join(f"{k}={v}" for k, v in t["settings"].items()) or "none"
        lines += [
            "", f"Tuning for {key} (ate_fast.tuning.autotune): kept {kept}, "
            f"{t['baseline_s'] * 1e3:.3f} → {t['tuned_s'] * 1e3:.3f} ms re-timed "
            f"({t['speedup']:.3f}×)", "",
            "| choice | settings | ms | max rel error | status |", "|---|---|---|---|---|",
        ]  # fmt: skip
        for trial in t["trials"]:
            shown = ", ".join(f"{k}={v}" for k, v in trial["settings"].items()) or "(defaults)"
            ms = "–" if trial["seconds"] is None else f"{trial['seconds'] * 1e3:.3f}"
            err = "–" if trial["error"] is None else f"{trial['error']:.2e}"
            status = trial["status"] + (f": {trial['reason']}" if trial["reason"] else "")
            lines.append(f"| {trial['choice']} | {shown} | {ms} | {err} | {status} |")
    return lines


def markdown(data: dict) -> str:
    env, bw = data["environment"], data["bandwidth"]
    n = env.get("head_parameters")
    params = "parameters ?" if n is None else f"{n / 1e6:.1f}M parameters"
    kernels = "ATen ops" if env["dry_run"] else "kernels"
    lines = [
        f"# Real size: π0 expert bf16, flow Euler {env['steps']}, H {env['H']}, D {env['D']}, "
        f"{env['prefix_tokens']}-token prefix cache ({env['device']})",
        "",
        f"torch {env['torch']}, {env['head']}, {params}"
        + (" — DRY RUN on the CPU (cut model; timings mean nothing)" if env["dry_run"] else ""),
        f"copy bandwidth {bw['bytes_per_s'] / 1e9:.0f} GB/s ({bw['copy_bytes'] >> 20} MiB copy, "
        f"2× bytes moved, best of {bw['repeats']})" + _gemm_line(data.get("gemm")),
        "The cache is built once per B outside the timed region; each timed call is the "
        "sampler call with the cache given.",
        *_settings_line(env.get("settings")),
        "",
        "| B | guidance | row | median ms | min ms | × compile_max_autotune | × floor | "
        f"floor fraction | floor ms | compute floor ms | {kernels} per step | busy ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = data["rows"]
    for b in env["batches"]:
        for g in GUIDANCES:
            base = rows.get(_row_key(b, g, BASELINE))
            for r in ROWS:
                e = rows.get(_row_key(b, g, r))
                if e is None:
                    continue
                vs = f"{base['median_s'] / e['median_s']:.2f}×" if base else "–"
                per_step = f"{e['kernels'] / env['steps']:.0f}" if "kernels" in e else "–"
                busy = f"{e['busy_s'] * 1e3:.3f}" if "busy_s" in e else "–"
                compute = e.get("compute_floor_s")
                compute = "–" if compute is None else f"{compute * 1e3:.3f}"
                lines.append(
                    f"| {b} | {g} | {r} | {e['median_s'] * 1e3:.3f} | {e['min_s'] * 1e3:.3f} | "
                    f"{vs} | {e['x_floor']:.2f} | {e['floor_fraction']:.3f} | "
                    f"{e['floor_s'] * 1e3:.3f} | {compute} | {per_step} | {busy} |"
                )
    lines += ["", "Targets (ate rows):", ""]
    for t in data["targets"]:
        value = f"{t['value']:+.1%}" if "adds" in t["target"] else f"{t['value']:.2f}×"
        verdict = "measured" if t["met"] is None else "met" if t["met"] else "not met"
        if t.get("compute_bound"):
            verdict += " (compute-bound: its FLOPs at the measured GEMM rate exceed its bytes)"
        lines.append(f"- B={t['B']} {t['guidance']} {t['row']}: {t['target']}: {value} — {verdict}")
    if not data["targets"]:
        lines.append("(no ate row timed)")
    if data["skipped"]:
        lines += ["", "Skipped (budget):", ""]
        lines += [f"- {s['case']}: {s['reason']}" for s in data["skipped"]]
    if data.get("failed"):
        lines += ["", "Failed (the log in raw.tgz has the traceback):", ""]
        lines += [f"- {s['case']}: {s['error']}" for s in data["failed"]]
    if data.get("not_run"):
        lines += ["", "Not run (not reached, deselected, or cut by the suite's limit):", ""]
        lines.append(", ".join(data["not_run"]))
    lines += _time_split_lines(data)
    lines += _tuning_lines(data.get("tuning") or {})
    if data["setup_s"]:
        setups = ", ".join(f"{k} {v:.1f} s" for k, v in data["setup_s"].items())
        lines += ["", f"Set-up (build, compile, capture, warm-up) per case: {setups}"]
    lines += ["", jetson_projection.markdown(data).rstrip("\n")]
    return "\n".join(lines) + "\n"


def _time_split_lines(data: dict) -> list[str]:
    """The report's "where the time goes": each profiled row's busy time by kernel kind (GEMM,
    attention, Triton, other), and the bytes of its floor over its GEMM time — the GEMMs'
    achieved weight bandwidth (the floor's bytes are nearly all weights), against the copy
    bandwidth; then the costliest kernels of the fastest B = 1 ate row."""
    steps, bw = data["environment"]["steps"], data["bandwidth"]["bytes_per_s"]
    profiled = [e for e in data["rows"].values() if e.get("busy_by_kind_s")]
    if not profiled:
        return []
    lines = [
        "", "Where the time goes (one profiled call; ms per step by kernel kind; GEMM GB/s = "
        "the floor's bytes over the GEMM time):", "",
        "| B | guidance | row | busy | gemm | attention | triton | other | GEMM GB/s | of copy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for e in profiled:
        kinds = e["busy_by_kind_s"]
        cells = [f"{kinds.get(k, 0.0) * 1e3 / steps:.3f}" for k in KERNEL_KINDS]
        gemm_s = kinds.get("gemm", 0.0)
        rate = e["floor_bytes"] / gemm_s if gemm_s > 0 else None
        rate_cells = ["–", "–"] if rate is None else [f"{rate / 1e9:.0f}", f"{rate / bw:.0%}"]
        lines.append(
            f"| {e['B']} | {e['guidance']} | {e['row']} | {e['busy_s'] * 1e3 / steps:.3f} | "
            + " | ".join(cells + rate_cells)
            + " |"
        )
    ate = [e for e in profiled if e["B"] == 1 and e["row"].startswith("ate_") and e["top_kernels"]]
    if ate:
        best = min(ate, key=lambda e: e["median_s"])
        lines += [
            "",
            f"Costliest kernels of B=1 {best['guidance']} {best['row']} (µs per step):",
            "",
        ]
        for k in best["top_kernels"]:
            name = k["name"] if len(k["name"]) <= 110 else k["name"][:107] + "..."
            lines.append(
                f"- {k['us_per_call'] / steps:.1f} µs, ×{k['count_per_call'] / steps:.0f}: `{name}`"
            )
    return lines


# -- the benchmark ---------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _one_thread_dry_run():
    """The dry run on one torch thread: on a shared 2-core machine two threads' barriers
    made the bf16 calls 20–30× slower."""
    threads = torch.get_num_threads()
    if DRY_RUN:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def _announce(request):
    """Print the plan; write the report when the module ends (also after a budget cut)."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\n{plan()}", flush=True)
    yield
    if _RESULTS["rows"] or _RESULTS["skipped"] or _RESULTS["failed"]:
        write_report()


def _case_id(case: tuple[int, str, str]) -> str:
    return f"cuda-pi0-expert-bf16-B{case[0]}-{case[1]}-{case[2]}"


@pytest.mark.parametrize("batch,guidance,row", CASES, ids=[_case_id(c) for c in CASES])
def test_realsize(benchmark, monkeypatch, batch: int, guidance: str, row: str) -> None:
    case = (batch, guidance, row)
    triton_rows = (*TRITON_ROWS, *SKINNY_ROWS, SPLIT_KV_ROW, COMBINE_KERNEL_ROW, *FUSED_MLP_ROWS,
                   FUSED_MLP_FOLDED_ROW)  # fmt: skip
    if row in triton_rows and DRY_RUN:
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("the Triton kernels on the CPU need TRITON_INTERPRET=1 (dry run)")
    for name, value in ROW_ENV.get(row, {}).items():
        monkeypatch.setenv(name, value)
    spent = time.monotonic() - _STARTED
    guess = _guess(case, _BUILT_UNITS)
    if spent + guess > BUDGET_S:
        reason = (f"ATE_FAST_REALSIZE_BUDGET_S={BUDGET_S:.0f} s: {spent:.0f} s spent + "
                  f"≈ {guess:.0f} s guessed for this case")  # fmt: skip
        _RESULTS["skipped"].append({"case": _row_key(*case), "reason": reason})
        write_report()
        pytest.skip(reason)
    try:
        if row == TUNED_ROW:
            for name, value in _tune(batch, guidance).items():
                monkeypatch.setenv(name, value)
        with _torch_setting(row):
            _time_case(benchmark, case)
    except Exception as exc:  # named in the report (not only in the log)
        first_line = (str(exc).splitlines() or [""])[0][:300]
        error = f"{type(exc).__name__}: {first_line}"
        _RESULTS["failed"].append({"case": _row_key(*case), "error": error})
        write_report()
        raise


def _tune(batch: int, guidance: str) -> dict[str, str]:
    """The settings ``ate_fast.tuning.autotune`` keeps for the case's captured call (each
    trial into the report's ``tuning``); the dry run tries the CPU's choices."""
    noise = _noise(batch)

    def build() -> Callable[[], torch.Tensor]:
        fn = _ate_call(batch, guidance, _head())
        return lambda: fn(noise)

    result = autotune(
        build, rounds=20, warmup=3, tolerance=ATOL_REL, budget_s=TUNE_S, progress=False,
        guided=guidance in LATENT_GUIDED, transformer_encoder=guidance == "transformer-guided",
        exclude=TUNE_EXCLUDE,
    )  # fmt: skip
    _RESULTS["tuning"][_row_key(batch, guidance, TUNED_ROW)] = {
        "settings": result.settings,
        **result.to_dict(),
    }
    write_report()
    return result.settings


@contextlib.contextmanager
def _torch_setting(row: str) -> Iterator[None]:
    """The setting of torch's a :data:`SETTING_ROWS` row is built (captured) and timed
    under; nothing for the other rows."""
    if row in SDPA_ROWS:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([getattr(SDPBackend, SDPA_ROWS[row])]):
            yield
    elif row == CUBLASLT_ROW:
        before = torch.backends.cuda.preferred_blas_library()
        torch.backends.cuda.preferred_blas_library("cublaslt")
        try:
            yield
        finally:
            torch.backends.cuda.preferred_blas_library(before)
    else:
        yield


def _time_case(benchmark, case: tuple[int, str, str]) -> None:
    """Build, check and time one case; its row into the report."""
    batch, guidance, row = case
    benchmark.group = f"cuda realsize pi0-expert bf16 flow-euler-10 B={batch} {guidance} L={PREFIX}"
    bw = copy_bandwidth()
    floor = floor_bytes(batch, guidance)
    floor_s = floor["per_call"] / bw["bytes_per_s"]
    flops = floor_flops(batch, guidance)
    compute_floor_s = flops / gemm_throughput()["flops_per_s"]
    benchmark.extra_info.update(
        impl=row, suite="realsize", device=DEVICE, device_name=_device_name(), B=batch,
        guidance=guidance, calls=1, H=H, D=D, prefix=PREFIX, dtype="bfloat16",
        floor_bytes=floor["per_call"], floor_s=floor_s, copy_bytes_per_s=bw["bytes_per_s"],
        copy_bytes=bw["copy_bytes"], torch=torch.__version__, dry_run=DRY_RUN, floor_flops=flops,
        compute_floor_s=compute_floor_s,
    )  # fmt: skip
    noise = _noise(batch)
    reference(batch, guidance, row in PADDED_ROWS)
    if guidance != "unguided":
        reference(batch, "unguided")

    start = time.perf_counter()
    fn = build_row(batch, guidance, row)
    for _ in range(WARMUP_CALLS):  # compile, record the CUDA graph trees / capture
        out = fn(noise)
        _sync()
    setup_s = time.perf_counter() - start
    # GPU: a call after the warm-up (a replay) is checked; dry run: the warm-up's output
    errors = check(row, out if DRY_RUN else fn(noise), batch, guidance)
    benchmark.extra_info.update(setup_s=setup_s, **errors)

    times: list[float] = []

    def call() -> torch.Tensor:
        t0 = time.perf_counter()
        out = fn(noise)
        _sync()
        times.append(time.perf_counter() - t0)
        return out

    rounds = MAX_ROUNDS
    if MIN_ROUNDS < MAX_ROUNDS:  # rounds for ≈ ROW_SECONDS, from one call
        call()
        rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, ROW_SECONDS / max(times[-1], 1e-6))))
        times.clear()
    benchmark.extra_info["rounds"] = rounds
    benchmark.pedantic(call, rounds=rounds, iterations=1)
    median = statistics.median(times)
    kernels = _kernels_per_call(lambda: fn(noise))
    benchmark.extra_info.update(kernels)
    _RESULTS["rows"][_row_key(*case)] = {
        "B": batch, "guidance": guidance, "row": row, "median_s": median, "min_s": min(times),
        "rounds": len(times), "floor_s": floor_s, "x_floor": median / floor_s,
        "floor_fraction": floor_s / median, "floor_bytes": floor["per_call"],
        "floor_flops": flops, "compute_floor_s": compute_floor_s, **errors, **kernels,
    }  # fmt: skip
    _RESULTS["setup_s"][_row_key(*case)] = setup_s
    write_report()


def _kernels_per_call(fn: Callable[[], Any]) -> dict:
    """One profiled call after the timing: ``kernels`` per call (CUDA device kernels; the
    dry run: ATen ops) and their summed ``busy_s`` — against the row's median, the time the
    device sat between kernels (a call bound by its kernel count, not its bytes, shows it)."""
    profiled = kernel_profile(fn, DEVICE, calls=1, top=TOP_KERNELS)
    label = "kernels" if DEVICE == "cuda" else "aten_ops"
    return {
        "kernels": profiled[f"{label}_per_call"],
        "busy_s": profiled[f"{label}_us_per_call"] * 1e-6,
        "busy_by_kind_s": {k: us * 1e-6 for k, us in profiled["by_kind"].items()},
        "top_kernels": profiled["top"],
    }


# -- the report again, from a pytest-benchmark JSON -------------------------------------------
def report_from_benchmark_json(path: Path, out_dir: Path) -> str:
    """realsize.json/.md from a ``--benchmark-json`` file (median per row, its floor)."""
    bench = json.loads(path.read_text())
    entries = [
        b for b in bench.get("benchmarks", []) if b.get("extra_info", {}).get("suite") == "realsize"
    ]
    if not entries:
        raise SystemExit(f"{path}: no bench_realsize rows")
    rows = {}
    for b in entries:
        e = b["extra_info"]
        median, floor_s = b["stats"]["median"], e["floor_s"]
        rows[_row_key(e["B"], e["guidance"], e["impl"])] = {
            "B": e["B"], "guidance": e["guidance"], "row": e["impl"], "median_s": median,
            "min_s": b["stats"]["min"], "rounds": b["stats"]["rounds"], "floor_s": floor_s,
            "x_floor": median / floor_s, "floor_fraction": floor_s / median,
            **{
                k: e[k]
                for k in (
                    "kernels", "busy_s", "busy_by_kind_s", "top_kernels", "floor_bytes",
                    "floor_flops", "compute_floor_s",
                )
                if k in e
            },
        }  # fmt: skip
    first = entries[0]["extra_info"]
    data = {
        "environment": {
            "device": first.get("device_name", first["device"]),
            "torch": first.get("torch", "?"),
            "dry_run": first.get("dry_run", False),
            "dtype": "bfloat16",
            "head": "flow-transformer pi0-expert",
            "head_parameters": None,
            "H": first["H"],
            "D": first["D"],
            "steps": STEPS,
            "prefix_tokens": first["prefix"],
            "batches": sorted({e["extra_info"]["B"] for e in entries}),
        },
        "bandwidth": {
            "copy_bytes": first.get("copy_bytes", COPY_BYTES),
            "repeats": COPY_REPEATS,
            "best_s": None,
            "bytes_per_s": first["copy_bytes_per_s"],
        },
        "rows": _ordered(rows),
        "skipped": [],
        "failed": [],
        "setup_s": {},
    }
    data["targets"] = targets(data)
    data["jetson_projection"] = jetson_projection.project(data)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "realsize.json").write_text(json.dumps(data, indent=2) + "\n")
    text = markdown(data)
    (out_dir / "realsize.md").write_text(text)
    return text


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--plan"]:
        print(plan(_cases()))
        return 0
    if not args:
        print(__doc__)
        return 2
    out_dir = Path(args[1]) if len(args) > 1 else _out_dir()
    print(report_from_benchmark_json(Path(args[0]), out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
