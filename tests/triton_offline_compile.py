"""Compile the project's Triton kernels for a CUDA target without a GPU (run as a script).

    TRITON_INTERPRET=0 python tests/triton_offline_compile.py [ARCH [GROUP]] [--spills report]
        ARCH: default 90; GROUP: all (default), or a comma-separated list of mlp,
        guided_step, transformer, flow_block, skinny_gemm,
        split_kv, l2_prefetch, fused_mlp; --spills report: list the spilling variants
        instead of failing on the first (for a Triton whose register allocation
        :data:`KNOWN_SPILLS` does not list: it has 3.6, the GPU machine's
        ``tests/gpu_image_triton.txt``, 3.8 and 3.9)

Prints one line per kernel variant (its shared memory) and exits non-zero on the first
compile error, on a variant that needs more shared memory than one block of ARCH may have
(for ARCH 87: of sm_86, sm_87 and sm_89, whose code Triton generates alike)
(Triton would refuse its launch: ``OutOfResources``), or on a flow-transformer epilogue
variant, an MLP-guidance variant or an attention variant in bf16, fp16 or float32 (the
precisions guidance runs in) whose registers spill (the report of the ptxas run Triton makes,
with its flags; :data:`KNOWN_SPILLS` the exceptions). The interpreter (how
the CPU tests run the kernels) skips Triton's code generator, so a kernel can pass every
CPU test and still fail to compile, or to launch, on a GPU: this runs the real compiler
(front end, LLVM, ptxas) on the launch configurations the launchers use.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import itertools
import os
import re
import shutil
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: real JITFunctions
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # its ptxas -v report printed: registers, spills
# a fresh cache: a variant found in the cache runs no ptxas, so prints no report
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-offline-compile-")

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ate_fast.models import block_epilogues_triton as fb
from ate_fast.models import fused_mlp, split_kv_attention
from ate_fast.models import fused_mlp_triton as fm
from ate_fast.models import l2_prefetch_triton as lp
from ate_fast.models import skinny_gemm_triton as sg
from ate_fast.models import split_kv_attention_triton as sk
from ate_fast.ops import triton_activations as ta
from ate_fast.ops import triton_pdl
from ate_fast.ops.guided_step import triton as gs
from ate_fast.ops.mlp_guidance import triton as mg
from ate_fast.ops.triton_resources import COMPILE_OPTIONS
from ate_fast.steer import transformer_triton as tt
from ate_fast.tuning.switches import PARAMETER_OPTIONS


def signature(kernel, constexprs: dict, pointer_type, scalar_types: dict) -> dict:
    """Triton signature: ``*_ptr`` arguments typed by ``pointer_type(name)``; the rest i32
    unless ``scalar_types`` says otherwise; constexprs marked as such — every one of the
    kernel's (a constexpr left out would compile as a run-time argument, silently)."""
    missing = [p.name for p in kernel.params if p.is_constexpr and p.name not in constexprs]
    if missing:
        sys.exit(f"FAIL {kernel.__name__}: constexprs {missing} not given")
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + pointer_type(name)
        else:
            sig[name] = scalar_types.get(name, "i32")
    return sig


# the most shared memory one block may use, per compute capability (CUDA C++ Programming
# Guide, "Technical Specifications per Compute Capability"); Triton refuses a launch that
# needs more
SHARED_LIMIT = {80: 166_912, 86: 101_376, 87: 166_912, 89: 101_376, 90: 232_448}
# Triton generates the same code for every 8.x target (its Ampere path: mma.sync, cp.async;
# the 8.9 extras are fp8 conversions, which no kernel here uses), so a variant compiled for
# sm_87 needs the same shared memory on an RTX 30x0 (sm_86) or 40x0 (sm_89): one compile
# for the Orin is checked against the least of the three limits (with triton 3.9 all 270
# variants compiled for sm_87 and for sm_89 gave the same shared memory and registers)
FITS_ALSO = {87: (86, 89)}
# --spills report: the spilling variants listed at the end instead of failing the run
REPORT_SPILLS = False
SPILLED: list[str] = []
# gated variants that spill with Triton's own ptxas flags, exactly so many bytes, by Triton
# version (each allocates registers its own way; the fixes found — other warps or pipeline
# stages — change GPU launch settings no GPU has timed). Any other spill fails, and so does
# one of these spilling more or less, or no longer (a stale entry).
_CANDIDATE_FORWARD = "_attention_kernel {}->fp32 forward tile (64, 64)"  # CANDIDATE_TILES'
_SKINNY_SPLIT_64 = ("_skinny_gemm_kernel {} BLOCK_N=64 bias=False residual=False even_k=True "
                    "split=True sum=False pdl=False w_kn=False act=-1 grad=False")  # fmt: skip
_PARTIAL_HD64 = ("_partial_kernel {} hd=64 Tiles(block_q=32, block_k=32, splits=0, "
                 "programs_per_sm=1, warps=4, stages=2) single=False combine=False")  # fmt: skip
_PERSISTENT_MLP = "_fused_mlp_kernel {} gain=True rows=50 save={} reset={} default"
KNOWN_SPILLS = {
    # 3.9 (the tests' Triton) passes ptxas --regAllocOptLevel=2 (its workaround for a
    # ptxas 13 bug): these two float32 variants spill one 4-byte register at 56 and 80
    # registers of 255 (no pressure: without the flag, and with 3.6 / 3.8, none)
    ("3.9", 90): {
        "_attention_backward_kernel fp32->fp32 Tq=50 T=50 hd=16": 4,
        "_fused_mlp_kernel fp32 gain=False rows=20 save=False reset=False default": 4,
    },
    # 3.6 (the GPU machine's, tests/gpu_image_triton.txt; torch 2.11's): the encoder
    # attention's benchmark-only candidate tile at 255 registers; for the Orin the few-row
    # GEMM's split 64-column tile at 64 registers and the split-key attention's partial
    # kernel at head dim 64 (128 registers)
    ("3.6", 90): {_CANDIDATE_FORWARD.format("bf16"): 20, _CANDIDATE_FORWARD.format("fp16"): 20},
    ("3.6", 87): {
        _SKINNY_SPLIT_64.format("bf16"): 8,
        _SKINNY_SPLIT_64.format("fp16"): 8,
        _PARTIAL_HD64.format("bf16"): 16,
        _PARTIAL_HD64.format("fp16"): 16,
    },
    # 3.8 (torch 2.14's): the candidate tile; for the Orin the persistent MLP with the
    # folded norm's gain at 50 rows, 255 registers
    ("3.8", 90): {_CANDIDATE_FORWARD.format("bf16"): 20, _CANDIDATE_FORWARD.format("fp16"): 56},
    ("3.8", 87): {
        _PERSISTENT_MLP.format("bf16", False, False): 16,
        _PERSISTENT_MLP.format("fp16", False, False): 16,
        _PERSISTENT_MLP.format("bf16", True, False): 24,
        _PERSISTENT_MLP.format("bf16", False, True): 16,
    },
}
KNOWN_SEEN: set[str] = set()  # the KNOWN_SPILLS variants this run compiled


def shared_limit(arch: int) -> tuple[int, str]:
    """The most shared memory per block a variant compiled for ``arch`` may use — the least
    over ``arch`` and the targets in :data:`FITS_ALSO` — and which targets that covers."""
    archs = (arch, *FITS_ALSO.get(arch, ()))
    return min(SHARED_LIMIT[a] for a in archs), "/".join(f"sm_{a}" for a in archs)


def register_usage(log: str, label: str) -> tuple[int, int]:
    """``(registers per thread, bytes of spill stores)`` from the ``ptxas -v`` report Triton
    printed while compiling the variant (``TRITON_DUMP_PTXAS_LOG``): the allocation of the
    cubin Triton loads, with its own ptxas flags (3.9: ``--regAllocOptLevel=2``)."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    if not (regs and spills):
        sys.exit(f"FAIL {label}: Triton printed no ptxas register report:\n{log}")
    return int(regs.group(1)), int(spills.group(1))


# each compiled variant's ptxas report, by its hash: a variant compiled again in the run
# comes from Triton's cache, which runs no ptxas and prints nothing
PTXAS_LOGS: dict[str, str] = {}


def _compile_logged(source: ASTSource, target, options: dict):
    """``triton.compile`` and the ``ptxas -v`` report Triton printed for it."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        compiled = triton.compile(source, target=target, options=options)
    PTXAS_LOGS.setdefault(compiled.hash, printed.getvalue())
    return compiled, PTXAS_LOGS[compiled.hash]


def _known_spills(arch: int) -> dict[str, int]:
    """:data:`KNOWN_SPILLS` of this Triton's major.minor version for ``arch``."""
    return KNOWN_SPILLS.get((".".join(triton.__version__.split(".")[:2]), arch), {})


def compile_one(
    kernel, constexprs: dict, pointer_type, scalar_types: dict, target, label: str,
    options: dict | None = None, spill_free: bool = False, divisible: tuple[str, ...] = (),
):  # fmt: skip
    """Compile one variant and check its shared memory against the target's per-block limit
    (and, ``spill_free``, that no register spills); ``options`` default to the
    MLP-guidance launch options, and :data:`COMPILE_OPTIONS` join them; ``divisible``: the
    arguments a launch sees divisible by 16 (pointers: 16-byte aligned), as Triton's JIT
    specialises them at run time."""
    sig = signature(kernel, constexprs, pointer_type, scalar_types)
    options = options or {"num_warps": mg.NUM_WARPS, "num_stages": mg.NUM_STAGES}
    options = {**options, **COMPILE_OPTIONS}  # what every launch passes
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    compiled, log = _compile_logged(
        ASTSource(kernel, sig, constexprs=constexprs, attrs=attrs), target, options
    )
    name, shared = kernel.__name__, compiled.metadata.shared
    limit, archs = shared_limit(target.arch)
    if shared > limit:
        sys.exit(f"FAIL {name} {label}: needs {shared} B of shared memory per block, "
                 f"{archs} allow {limit} B")  # fmt: skip
    usage = ""
    if spill_free:
        regs, spills = register_usage(log, f"{name} {label}")
        known = _known_spills(target.arch).get(f"{name} {label}")
        if known is not None:
            KNOWN_SEEN.add(f"{name} {label}")
            if spills != known and not REPORT_SPILLS:
                sys.exit(f"FAIL {name} {label}: {spills} B of spill stores, KNOWN_SPILLS "
                         f"expects {known} B with Triton {triton.__version__}")  # fmt: skip
        elif spills and not REPORT_SPILLS:
            sys.exit(f"FAIL {name} {label}: {regs} registers, {spills} B of spill stores")
        if spills:
            SPILLED.append(f"{name} {label}: {regs} registers, {spills} B of spill stores")
        usage = f" registers={regs} spills={spills}"
    print(f"ok  {name:<26} {label} shared={shared}{usage}")
    return compiled


def mlp_variants(target) -> int:
    """The three MLP-guidance kernels: storage dtype × compute dtype × first layer or not ×
    a0 (training's z* = z(a0)) or not, every activation in float32 (the activation code does
    not depend on the dtype); all but float64 (the tests' precision) without register
    spills."""
    count = 0
    storage_compute = [("fp32", "fp32"), ("fp64", "fp64"), ("fp16", "fp32"), ("bf16", "fp32")]
    variants = [
        (types, act, first, a0)
        for types, first, a0 in itertools.product(storage_compute, (True, False), (True, False))
        for act in (range(4) if types == ("fp32", "fp32") else (0,))
    ]
    for (store, comp), act, first, a0 in variants:
        # pointers to the compute-type scratch buffers; everything else is in storage type
        scratch = {"dst_ptr", "delta_ptr", "pre_ptr"} | ({"out_ptr"} if not first else set())
        scratch |= set() if first else {"src_ptr"}

        def ptype(name, scratch=scratch, store=store, comp=comp):
            return comp if name in scratch else store

        label = f"{store}->{comp} act={act} {'first' if first else 'inner'} a0={a0}"
        flags = dict(ACT=act, HAS_MASK=first, HAS_A0=a0)
        gate = dict(spill_free=store != "fp64")
        compile_one(
            mg._forward_kernel,
            dict(flags, FROM_INPUT=first, HAS_BIAS=True, BLOCK_B=16,
                 BLOCK_N=mg.FWD_BLOCK_N, BLOCK_K=mg.FWD_BLOCK_K),
            ptype, {}, target, label, **gate,
        )  # fmt: skip
        for eps in (True, False):  # latent="sample" / "mean"
            compile_one(
                mg._latent_kernel,
                dict(flags, FROM_INPUT=first, HAS_BIAS=not first, HAS_EPS=eps, BLOCK_B=32,
                     BLOCK_N=mg.FWD_BLOCK_N, BLOCK_K=mg.latent_block_k(a0, eps)),
                ptype, {"weight_bits": "i64"}, target, f"{label} eps={eps}", **gate,
            )  # fmt: skip
        if not a0:  # the backward kernel has no a0 rows
            compile_one(
                mg._backward_kernel,
                dict(ACT=act, HAS_MASK=first, TO_INPUT=first, BLOCK_B=16,
                     BLOCK_K=mg.BWD_BLOCK_K, BLOCK_O=mg.BWD_BLOCK_O),
                ptype, {}, target, label, **gate,
            )  # fmt: skip
        count += 3 + (not a0)
    return count


_GUIDED_STEP_DATA = ("out_ptr", "x_ptr", "m_ptr", "g_ptr", "mp_ptr", "z_ptr")
# the [B] coefficient rows are in the compute dtype: float32 for half storage
_GUIDED_STEP_COMPUTE = {"fp32": "fp32", "fp64": "fp64", "bf16": "fp32", "fp16": "fp32"}


def guided_step_variants(target) -> int:
    """The guided step for every storage dtype (the samplers' bf16 / fp16 states included),
    with and without its optional inputs."""
    count = 0
    for dtype, present in itertools.product(_GUIDED_STEP_COMPUTE, (True, False)):
        flags = dict(HAS_X=present, HAS_G=present, HAS_P=present, HAS_Z=not present)
        compute = _GUIDED_STEP_COMPUTE[dtype]
        compile_one(
            gs._guided_step_kernel, dict(flags, BLOCK=gs._BLOCK),
            lambda name, d=dtype, c=compute: d if name in _GUIDED_STEP_DATA else c,
            {"scale": "fp32", "clamp": "fp32"}, target, f"{dtype} inputs={present}",
        )  # fmt: skip
        count += 1
    return count


# torch's launch defaults, which the transformer launchers keep (no num_stages given)
_TRITON_DEFAULT_STAGES = 3
_STORAGE_COMPUTE = [("fp32", "fp32"), ("fp64", "fp64"), ("bf16", "fp32"), ("fp16", "fp32")]
_TORCH_DTYPE = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16,
                "fp16": torch.float16}  # fmt: skip


def _typed(compute_ptrs: set, store: str, comp: str):
    return lambda name: comp if name in compute_ptrs else store


def transformer_variants(target) -> int:
    """The Transformer encoder kernels (``ate_fast.steer.transformer_triton``) in the
    configurations the launchers use at the paper's size (d_model 512, 4 heads of 128,
    ff 1024, 52 tokens; the last layer's 1..2 queries) and for a 300-token chunk, for
    float32, float64, bfloat16 and float16 storage (statistics and pre-activations in the
    compute type)."""
    count = 0
    stats = {"mean_ptr", "rstd_ptr"}
    default = {"num_warps": 4, "num_stages": _TRITON_DEFAULT_STAGES}
    for store, comp in _STORAGE_COMPUTE:
        label = f"{store}->{comp}"
        for flag, block in itertools.product((True, False), (64, 512)):
            for kernel, name in ((tt._add_norm_kernel, "HAS_RES"),
                                 (tt._norm_backward_kernel, "HAS_DY2")):  # fmt: skip
                compile_one(
                    kernel, {name: flag, "BLOCK": block, "PDL": False}, _typed(stats, store, comp),
                    {"eps": "fp32"}, target, f"{label} {name}={flag} BLOCK={block}", default,
                )  # fmt: skip
                count += 1
        for act in (tt.ACT_GELU, tt.ACT_RELU):
            for kernel in (tt._bias_act_kernel, tt._act_backward_kernel):
                compile_one(
                    kernel, {"ACT": act, "BLOCK": tt.ACT_BLOCK, "PDL": False},
                    _typed({"pre_ptr"}, store, comp),
                    {}, target, f"{label} act={act}", default,
                )  # fmt: skip
                count += 1
        # (queries, tokens, head dim): a full paper layer, its last layer, a long chunk
        for tq, t, hd in ((52, 52, 128), (2, 52, 128), (300, 300, 128), (50, 50, 16)):
            for kernel in (tt._attention_kernel, tt._attention_backward_kernel):
                constants = tt.attention_constants(
                    tq, t, hd, _TORCH_DTYPE[store],
                    backward=kernel is tt._attention_backward_kernel,
                )  # fmt: skip
                options = {"num_warps": constants.pop("num_warps"),
                           "num_stages": constants.pop("num_stages")}  # fmt: skip
                compile_one(  # float64: the tests' precision, not gated on spills
                    kernel, {**constants, "PDL": False}, _typed({"lse_ptr"}, store, comp), {},
                    target,
                    f"{label} Tq={tq} T={t} hd={hd}", options, spill_free=store != "fp64",
                )  # fmt: skip
                count += 1
        if store in ("bf16", "fp16"):  # the candidate tiles, at the paper's layer
            count += _candidate_attention_variants(store, comp, target)
    if target.arch >= 90:
        count += _transformer_pdl_variants(target)
    return count


def _transformer_pdl_variants(target) -> int:
    """The encoder's kernels launched with programmatic dependent launch, bf16 at the
    paper's size (a full layer's attention, 52 tokens, heads of 128; rows of 512): the
    attribute set, every load after the wait (:func:`_check_pdl_order`)."""
    stats = _typed({"mean_ptr", "rstd_ptr"}, "bf16", "fp32")
    pre = _typed({"pre_ptr"}, "bf16", "fp32")
    default = {"num_warps": 4, "num_stages": _TRITON_DEFAULT_STAGES}
    variants = [
        (tt._add_norm_kernel, {"HAS_RES": True, "BLOCK": 512}, stats, {"eps": "fp32"}, default),
        (tt._norm_backward_kernel, {"HAS_DY2": True, "BLOCK": 512}, stats, {}, default),
        (tt._bias_act_kernel, {"ACT": tt.ACT_GELU, "BLOCK": tt.ACT_BLOCK}, pre, {}, default),
        (tt._act_backward_kernel, {"ACT": tt.ACT_GELU, "BLOCK": tt.ACT_BLOCK}, pre, {}, default),
    ]
    for kernel in (tt._attention_kernel, tt._attention_backward_kernel):
        constants = tt.attention_constants(
            52, 52, 128, torch.bfloat16, backward=kernel is tt._attention_backward_kernel
        )
        options = {"num_warps": constants.pop("num_warps"),
                   "num_stages": constants.pop("num_stages")}  # fmt: skip
        variants.append((kernel, constants, _typed({"lse_ptr"}, "bf16", "fp32"), {}, options))
    return _pdl_variants(variants, target)


def _pdl_variants(variants: list, target) -> int:
    """Each ``(kernel, constexprs, pointer types, scalar types, launch options)`` compiled
    with ``PDL`` on and launched with the attribute, spill-free, its PTX's order checked
    (:func:`_check_pdl_order`); their count."""
    for kernel, constexprs, types, scalars, options in variants:
        compiled = compile_one(
            kernel, {**constexprs, "PDL": True}, types, scalars, target,
            f"bf16 {constexprs} PDL", {**options, **triton_pdl.launch_options(True)},
            spill_free=True,
        )  # fmt: skip
        _check_pdl_order(compiled, True, prefetches=False)
    return len(variants)


def _candidate_attention_variants(store: str, comp: str, target) -> int:
    """``transformer_triton.CANDIDATE_TILES`` (half precision; 52 tokens, heads of 128):
    each (pass, tile) they put in the tables, once, spill-free within every target's shared
    memory."""
    candidates = tt.CANDIDATE_TILES.values()
    passes = sorted({(which, tile) for tiles in candidates for which, tile in tiles.items()})
    for which, tile in passes:
        backward = which == "backward"
        kernel = tt._attention_backward_kernel if backward else tt._attention_kernel
        constants = tt.attention_constants(
            52, 52, 128, _TORCH_DTYPE[store], backward=backward, tile=tile
        )
        options = {"num_warps": constants.pop("num_warps"),
                   "num_stages": constants.pop("num_stages")}  # fmt: skip
        compile_one(
            kernel, {**constants, "PDL": False}, _typed({"lse_ptr"}, store, comp), {}, target,
            f"{store}->{comp} {which} tile {tile}", options, spill_free=True,
        )  # fmt: skip
    return len(passes)


def _compile_spill_free(*args):
    """:func:`compile_one`, also failing on register spills (the π0 expert's epilogues)."""
    return compile_one(*args, spill_free=True)


def flow_block_variants(target) -> int:
    """The flow-transformer block's epilogue kernels (``ate_fast.models.block_epilogues_triton``)
    for float32, float64, bfloat16 and float16 storage: the rotation's blocks for the small
    head's and π0's head dims (64, 256; other head dims run masked in the next power of
    two), the gated GELU with and without the stored GELU; for sm_90 also the forward's
    kernels launched with programmatic dependent launch (bf16, π0's sizes)."""
    count = 0
    options = {"num_warps": fb.NUM_WARPS, "num_stages": _TRITON_DEFAULT_STAGES}
    for store in ("fp32", "fp64", "bf16", "fp16"):
        for block_d, norm in itertools.product((64, 256), (False, True)):
            chunk = fb.NORM_CHUNK if norm else 16
            _compile_spill_free(
                fb._rotate_qkv_kernel,
                {"ROWS": fb.ROWS, "BLOCK_D": block_d, "NORM": norm, "CHUNK": chunk,
                 "PDL": False},
                lambda name, d=store: d, {"eps": "fp32"}, target,
                f"{store} BLOCK_D={block_d} NORM={norm}", options,
            )  # fmt: skip
            count += 1
        for save in (True, False):
            _compile_spill_free(
                fb._gated_gelu_kernel, {"SAVE_ACT": save, "BLOCK": fb.GELU_BLOCK, "PDL": False},
                lambda name, d=store: d, {}, target, f"{store} SAVE_ACT={save}", options,
            )  # fmt: skip
            _compile_spill_free(  # the folded MLP norm's (π0: F = 4096, width 1024)
                fb._norm_gated_gelu_kernel,
                {"SAVE_ACT": save, "BLOCK": fb.GELU_BLOCK, "CHUNK": fb.NORM_CHUNK, "PDL": False},
                lambda name, d=store: d, {"eps": "fp32"}, target, f"{store} SAVE_ACT={save}",
                options,
            )  # fmt: skip
            count += 2
        count += _flow_block_vjp_variants(target, store, options)
    if target.arch >= 90:
        count += _flow_block_pdl_variants(target, options)
    return count


def _flow_block_pdl_variants(target, options: dict) -> int:
    """The epilogues with programmatic dependent launch, bf16 at π0's sizes: the forward's
    (rotation, gated GELU, the gemm attention's softmax) and the input-VJP's (the gated
    GELU's backward, the RMSNorm VJP, the softmax backward and its gradient from kept
    probabilities, the unrotation); launched with the attribute, every load after the
    grid-dependency wait (:func:`_check_pdl_order`)."""

    def bf16(name):
        return "bf16"

    variants = [
        (fb._rotate_qkv_kernel, {"ROWS": fb.ROWS, "BLOCK_D": 256, "NORM": norm,
                                 "CHUNK": fb.NORM_CHUNK if norm else 16}, bf16, {"eps": "fp32"})
        for norm in (False, True)
    ] + [
        (fb._gated_gelu_kernel, {"SAVE_ACT": False, "BLOCK": fb.GELU_BLOCK}, bf16, {}),
        (fb._norm_gated_gelu_kernel,
         {"SAVE_ACT": False, "BLOCK": fb.GELU_BLOCK, "CHUNK": fb.NORM_CHUNK}, bf16,
         {"eps": "fp32"}),
    ] + [
        (fb._softmax_kernel, {"BLOCK": 1024, "HAS_BIAS": bias},
         lambda name: "fp32" if name == "s_ptr" else "bf16", {"scale": "fp32"})
        for bias in (False, True)
    ] + [
        (fb._gelu_gate_backward_kernel, {"BLOCK": fb.GELU_BLOCK}, bf16, {}),
        (fb._rms_norm_vjp_kernel, {"HAS_W": True, "HAS_R": True, "BLOCK": 1024}, bf16,
         {"eps": "fp32"}),
        (fb._softmax_backward_kernel, {"BLOCK": 1024}, bf16, {"scale": "fp32"}),
        (fb._softmax_grad_kernel, {"BLOCK": 1024}, bf16, {"scale": "fp32"}),
        (fb._unrotate_pack_kernel, {"ROWS": fb.ROWS, "BLOCK_D": 256}, bf16, {}),
    ]  # fmt: skip
    return _pdl_variants([(*variant, options) for variant in variants], target)


def _flow_block_vjp_variants(target, store: str, options: dict) -> int:
    """The input-VJP's epilogues in one storage dtype: the gated GELU's backward, the
    RMSNorm VJP (with / without weight and residual; the small head's and π0's widths 256,
    1024), the softmax backward (π0's 866 keys: 1024), the unrotation (head dims 64, 256);
    and the gemm attention's softmax and its gradient from the probabilities kept."""
    count = 0

    def typed(name, d=store):
        return d

    _compile_spill_free(fb._gelu_gate_backward_kernel, {"BLOCK": fb.GELU_BLOCK, "PDL": False},
                        typed, {},
                        target, store, options)  # fmt: skip
    for has_w, has_r, block in itertools.product((True, False), (True, False), (256, 1024)):
        _compile_spill_free(
            fb._rms_norm_vjp_kernel,
            {"HAS_W": has_w, "HAS_R": has_r, "BLOCK": block, "PDL": False}, typed,
            {"eps": "fp32"}, target, f"{store} HAS_W={has_w} HAS_R={has_r} BLOCK={block}",
            options,
        )  # fmt: skip
    for block in (128, 1024):
        _compile_spill_free(fb._softmax_backward_kernel, {"BLOCK": block, "PDL": False}, typed,
                            {"scale": "fp32"}, target, f"{store} BLOCK={block}",
                            options)  # fmt: skip
    for block_d in (64, 256):
        _compile_spill_free(fb._unrotate_pack_kernel,
                            {"ROWS": fb.ROWS, "BLOCK_D": block_d, "PDL": False},
                            typed, {}, target, f"{store} BLOCK_D={block_d}", options)  # fmt: skip
    # the gemm attention's softmax: float32 scores (float64 for float64 data) in, p stored
    # (and a padded prefix's additive mask, in the head's dtype)
    scores = "fp64" if store == "fp64" else "fp32"
    for block, bias in itertools.product((128, 1024), (False, True)):
        _compile_spill_free(fb._softmax_kernel, {"BLOCK": block, "HAS_BIAS": bias, "PDL": False},
                            lambda name, d=store: scores if name == "s_ptr" else d,
                            {"scale": "fp32"}, target, f"{store} BLOCK={block} HAS_BIAS={bias}",
                            options)  # fmt: skip
    for block in (128, 1024):  # its gradient from the probabilities the forward kept
        _compile_spill_free(fb._softmax_grad_kernel, {"BLOCK": block, "PDL": False}, typed,
                            {"scale": "fp32"},
                            target, f"{store} BLOCK={block}", options)  # fmt: skip
    count += 1 + 8 + 2 + 2 + 4 + 2
    return count


# (bias, residual, K a multiple of BLOCK_K): the block's GEMMs, and the general case
_SKINNY_EPILOGUES = ((False, False, True), (False, True, True), (True, True, False))
# what every launch sees (skinny_gemm.takes): pointers 16-byte aligned, n and k multiples
# of 16 — the JIT specialises on both, and only then do the loads vectorise and pipeline
# through shared memory (without, bf16 tiles of 32 columns spill registers)
_SKINNY_ALIGNED = ("x_ptr", "w_ptr", "bias_ptr", "res_ptr", "pre_ptr", "y_ptr", "out_ptr", "n",
                   "k", "k_per_split")  # fmt: skip


def _skinny_pointer(store: str, comp: str, split: bool, name: str) -> str:
    """The few-row GEMM's pointer types: split, ``y`` is the float workspace; the tiles'
    counters int32; the activation's input (``pre``) the compute dtype; the rest the
    storage dtype."""
    if name == "count_ptr":
        return "i32"
    return comp if (split and name == "y_ptr") or name == "pre_ptr" else store


def _activation_variants(dtype: torch.dtype, block_n: int, pdl_too: bool) -> list[tuple]:
    """The few-row GEMM's activation epilogues — the encoder's Linear + GELU with its bias
    (x·Wᵀ), GELU's derivative after x·W (the weight as stored), and in half precision the
    π0 step's time MLP (SiLU, the time as bias) — whole and split with the in-kernel sum,
    and (sm_90, half precision) split as a PDL launch: ``(bias, residual, even K, split,
    summed in-kernel, PDL, weight [K, N], activation)``, the derivative where the weight is
    read as stored. Not float16's: its code is bfloat16's but for the loads' type (the
    same tensor-core tiles, the epilogue in float32), and CI's compile time is short."""
    if dtype == torch.float16:
        return []
    half = dtype.itemsize == 2
    forward = [(True, False, True, False, False, False, False),
               (True, False, True, True, True, False, False)]  # fmt: skip
    if pdl_too and half:
        forward.append((True, False, True, True, True, True, False))
    variants = [(*v, ta.GELU) for v in forward] + [(*v, ta.SILU) for v in forward if half]
    if dtype != torch.float64 and sg.column_tile(block_n, dtype, weight_kn=True) == block_n:
        stored = [(False, False, True, False, False, False, True),
                  (False, False, True, True, True, False, True)]  # fmt: skip
        if pdl_too and half:
            stored.append((False, False, True, True, True, True, True))
        variants += [(*v, ta.GELU) for v in stored]
    return variants


def skinny_gemm_variants(target) -> int:
    """The few-row GEMM (``ate_fast.models.skinny_gemm_triton``) in every storage dtype and
    column tile, with and without the residual (and one bias + uneven-K variant each), at
    the launcher's stages for the tile; its K slices (the float workspace's partials, even
    K and not), the slices summed in-kernel by each tile's last program with each epilogue,
    the weight read as stored [K, N] (x·W: the encoder's input-VJP) whole and split, the
    activation epilogues (:func:`_activation_variants`), and the slices' sum kernel with
    each epilogue. For sm_90 also the programmatic dependent
    launch (bf16 / fp16, every tile, whole and split, and the sum): the weight strip's L2
    prefetches come before the grid-dependency wait and every load of x after it (the
    Orin, sm_87, has no PDL: the launcher never asks for it there)."""
    count = 0
    pdl_too = target.arch >= 90
    for (store, comp), block_n in itertools.product(_STORAGE_COMPUTE, sg.STAGES_BY_BLOCK_N):
        dtype = _TORCH_DTYPE[store]
        if sg.column_tile(block_n, dtype) != block_n:
            continue  # the launcher never uses this tile for this dtype
        c = tl.float64 if comp == "fp64" else tl.float32
        options = {"num_warps": sg.WARPS_BY_BLOCK_N[block_n],
                   "num_stages": sg.STAGES_BY_BLOCK_N[block_n]}  # fmt: skip
        # (bias, residual, even K, split, summed in-kernel, PDL, weight [K, N]), then the
        # activation epilogue (code, derivative) appended below
        whole = [(b, r, even, False, False, False, False) for b, r, even in _SKINNY_EPILOGUES]
        sliced = [
            (False, False, True, True, False, False, False),
            (False, False, False, True, False, False, False),
        ]
        sliced += [(b, r, e, True, True, False, False) for b, r, e in _SKINNY_EPILOGUES[1:]]
        if pdl_too and dtype.itemsize == 2:
            whole.append((False, True, True, False, False, True, False))
            sliced.append((False, False, True, True, False, True, False))
            sliced.append((False, True, True, True, True, True, False))
        # x·W for W [K, N] (the encoder's input-VJP): whole, and split with the residual
        # summed in-kernel (the split sum kernel is the same kernel as above)
        stored = []
        if store != "fp64":
            stored = [(False, False, True, False, False, False, True),
                      (False, True, True, True, True, False, True)]  # fmt: skip
            if pdl_too and dtype.itemsize == 2:
                stored.append((False, True, True, True, True, True, True))
        if sg.column_tile(block_n, dtype, weight_kn=True) != block_n:
            stored = []  # the launcher never uses this tile for this dtype
        variants = [(*v, ta.NONE, False) for v in [*whole, *sliced, *stored]]
        for *rest, kn, act in _activation_variants(dtype, block_n, pdl_too):
            variants.append((*rest, kn, act, kn))  # the derivative with the weight [K, N]
        for bias, residual, even, split, in_kernel, pdl, kn, act, grad in variants:
            compiled = compile_one(
                sg._skinny_gemm_kernel,
                {"HAS_BIAS": bias, "HAS_RESIDUAL": residual, "ACT": act, "ACT_GRAD": grad,
                 "EVEN_K": even, "SPLIT": split, "SUM": in_kernel, "C": c,
                 "INTERPRETED": False, "PDL": pdl, "BLOCK_M": sg.BLOCK_M, "BLOCK_N": block_n,
                 "BLOCK_K": sg.block_k(dtype), "LINE": sg.line_elements(dtype), "W_KN": kn},
                functools.partial(_skinny_pointer, store, comp, split), {}, target,
                f"{store} BLOCK_N={block_n} bias={bias} residual={residual} even_k={even} "
                f"split={split} sum={in_kernel} pdl={pdl} w_kn={kn} act={act} grad={grad}",
                {**options, **triton_pdl.launch_options(pdl)}, spill_free=store != "fp64",
                divisible=_SKINNY_ALIGNED,
            )  # fmt: skip
            _check_pdl_order(compiled, pdl, prefetches=True)
            count += 1
    for (store, comp), pdl in itertools.product(_STORAGE_COMPUTE, (False, True)):
        if pdl and not (pdl_too and _TORCH_DTYPE[store].itemsize == 2):
            continue
        # each epilogue, and the activation's (Linear + GELU; GELU's derivative)
        epilogues = [(b, r, ta.NONE, False) for b, r, _ in _SKINNY_EPILOGUES]
        if store != "fp16":  # as _activation_variants
            epilogues += [(True, False, ta.GELU, False), (False, False, ta.GELU, True)]
        for bias, residual, act, grad in epilogues:
            compiled = compile_one(
                sg._split_sum_kernel,
                {"HAS_BIAS": bias, "HAS_RESIDUAL": residual, "ACT": act, "ACT_GRAD": grad,
                 "BLOCK": sg.SUM_BLOCK, "PDL": pdl,
                 "C": tl.float64 if comp == "fp64" else tl.float32},
                lambda name, d=store, c=comp: c if name in ("ws_ptr", "pre_ptr") else d, {},
                target, f"{store} bias={bias} residual={residual} act={act} grad={grad} pdl={pdl}",
                {"num_warps": 4, "num_stages": 1, **triton_pdl.launch_options(pdl)},
                spill_free=True,
                divisible=("ws_ptr", "bias_ptr", "res_ptr", "pre_ptr", "y_ptr", "size", "n"),
            )  # fmt: skip
            _check_pdl_order(compiled, pdl, prefetches=False)
            count += 1
    return count


def _check_pdl_order(compiled, pdl: bool, prefetches: bool) -> None:
    """A PDL variant: launched with the attribute, ``griddepcontrol.wait`` in its PTX, every
    global load, store and atomic after it and (``prefetches``) L2 prefetches before it;
    any other variant: none of these (a wait without the launch attribute is harmless, the
    attribute without the wait a race)."""
    ptx = compiled.asm["ptx"]
    body = ptx[ptx.index(".entry") :]
    name = compiled.metadata.name
    if not pdl:
        if "griddepcontrol" in body or "prefetch.global.L2" in body or compiled.metadata.launch_pdl:
            sys.exit(f"FAIL {name}: grid-dependency code or launch without PDL")
        return
    if not compiled.metadata.launch_pdl or "griddepcontrol.wait" not in body:
        sys.exit(f"FAIL {name}: a PDL variant without its launch attribute or wait")
    wait = body.index("griddepcontrol.wait")
    touches = r"\bld\.global|\bcp\.async|\bst\.global|\batom\.|\bred\."
    if any(m.start() < wait for m in re.finditer(touches, body)):
        sys.exit(f"FAIL {name}: a global load, store or atomic before the grid-dependency wait")
    before = body.count("prefetch.global.L2", 0, wait)
    if prefetches and (before == 0 or body.count("prefetch.global.L2") != before):
        sys.exit(f"FAIL {name}: the weight prefetches not all before the wait")


def _tuned_split_kv_tiles() -> list[str]:
    """The split-key attention's tiles that ``ate_fast.autotune`` tries by default."""
    key = (split_kv_attention.ENV_VAR, "split_kv")
    return [value for _, value in PARAMETER_OPTIONS[key]]


def split_kv_variants(target) -> int:
    """The split-key attention (``ate_fast.models.split_kv_attention_triton``): its partial
    kernel (one slice and several) at the default tiles of every storage dtype, for π0's
    head dim (256) and the small head's (64), its combine for 2 to 32 slices, and
    split_sdpa's log-sum-exp combine (2 slices; 16 and a shorter one), and the partial
    kernel combining its block's slices in its last program; spill-free but in
    float64; in bf16 / fp16, the partial kernel at the other tiles autotune tries; for sm_90
    also the three launched with programmatic dependent launch (bf16, π0's head dim)."""
    count = _split_kv_pdl_variants(target) if target.arch >= 90 else 0
    for (store, comp), hd in itertools.product(_STORAGE_COMPUTE, (64, 256)):
        tiles = sk.default_tiles(_TORCH_DTYPE[store], hd)
        c = tl.float64 if comp == "fp64" else tl.float32
        stats = _split_kv_types(store, comp)
        options = {"num_warps": tiles.warps, "num_stages": tiles.stages}
        for single, combine in ((False, False), (True, False), (False, True)):
            compile_one(
                sk._partial_kernel,
                {"HD": hd, "BLOCK_Q": tiles.block_q, "BLOCK_K": tiles.block_k, "BLOCK_D": hd,
                 "C": c, "SINGLE": single, "COMBINE": combine, "INTERPRETED": False,
                 "PDL": False},
                stats, {"scale": "fp32"}, target,
                f"{store} hd={hd} {tiles} single={single} combine={combine}",
                options, spill_free=store != "fp64",
            )  # fmt: skip
        for tiles_text in _tuned_split_kv_tiles() if store in ("bf16", "fp16") else ():
            fields = dict(split_kv_attention._parsed_tiles(tiles_text))  # as the path parses it
            t = dataclasses.replace(tiles, **fields)
            if (t.block_q, t.block_k, t.warps, t.stages) != (
                tiles.block_q, tiles.block_k, tiles.warps, tiles.stages
            ):  # fmt: skip
                compile_one(
                    sk._partial_kernel,
                    {"HD": hd, "BLOCK_Q": t.block_q, "BLOCK_K": t.block_k, "BLOCK_D": hd,
                     "C": c, "SINGLE": t.splits == 1, "COMBINE": t.splits != 1,
                     "INTERPRETED": False, "PDL": False},
                    stats, {"scale": "fp32"}, target, f"{store} hd={hd} {t} (autotune's)",
                    {"num_warps": t.warps, "num_stages": t.stages}, spill_free=True,
                )  # fmt: skip
                count += 1
        for splits in (2, 32):
            compile_one(
                sk._combine_kernel, {"HD": hd, "SPLITS": splits, "BLOCK_D": hd, "PDL": False},
                stats, {},
                target, f"{store} hd={hd} splits<={splits}", {"num_warps": 4, "num_stages": 1},
                spill_free=store != "fp64",
            )  # fmt: skip
        for chunks, rest in ((2, False), (16, True)):  # split_sdpa's log-sum-exp combine
            compile_one(
                sk._combine_lse_kernel,
                {"HD": hd, "CHUNKS": chunks, "BLOCK_D": hd, "REST": rest, "C": c, "PDL": False},
                _typed({"l1_ptr", "l2_ptr"}, store, comp), {}, target,
                f"{store} hd={hd} chunks<={chunks} rest={rest}",
                {"num_warps": 4, "num_stages": 1}, spill_free=store != "fp64",
            )  # fmt: skip
        count += 7
    return count


def _split_kv_types(store: str, comp: str):
    """The split-key kernels' pointer types: the partials and statistics in the compute
    type, the counters int32, the rest the storage dtype."""
    typed = _typed({"o_ptr", "m_ptr", "l_ptr"}, store, comp)
    return lambda name: "i32" if name == "count_ptr" else typed(name)


def _split_kv_pdl_variants(target) -> int:
    """The split-key attention's kernels launched with programmatic dependent launch, bf16
    at π0's head dim (256) and default tiles: the partial kernel (one slice, several, and
    several combined by the last program),
    its combine and split_sdpa's; the attribute set, every load after the wait
    (:func:`_check_pdl_order`)."""
    tiles = sk.default_tiles(torch.bfloat16, 256)
    stats = _split_kv_types("bf16", "fp32")
    options = {"num_warps": tiles.warps, "num_stages": tiles.stages}
    variants = [
        (sk._partial_kernel, {"HD": 256, "BLOCK_Q": tiles.block_q, "BLOCK_K": tiles.block_k,
                              "BLOCK_D": 256, "C": tl.float32, "SINGLE": single,
                              "COMBINE": combine, "INTERPRETED": False},
         stats, {"scale": "fp32"}, options)
        for single, combine in ((False, False), (True, False), (False, True))
    ] + [
        (sk._combine_kernel, {"HD": 256, "SPLITS": 32, "BLOCK_D": 256}, stats, {},
         {"num_warps": 4, "num_stages": 1}),
        (sk._combine_lse_kernel, {"HD": 256, "CHUNKS": 16, "BLOCK_D": 256, "REST": True,
                                  "C": tl.float32},
         _typed({"l1_ptr", "l2_ptr"}, "bf16", "fp32"), {}, {"num_warps": 4, "num_stages": 1}),
    ]  # fmt: skip
    return _pdl_variants(variants, target)


def l2_prefetch_variants(target) -> int:
    """The L2 prefetch (``ate_fast.models.l2_prefetch_triton``): 32-bit words, spill-free,
    with the 16-byte alignment of a weight's storage and a word count divisible by 16 (every
    π0 weight's), as Triton's JIT specialises them — then its loads are 16 bytes wide
    (``ld.global.cg.v4.b32``, checked in the PTX)."""
    compiled = compile_one(
        lp._prefetch_kernel, {"BLOCK": lp.BLOCK}, lambda name: "i32", {}, target,
        f"BLOCK={lp.BLOCK}", {"num_warps": 4, "num_stages": 1}, spill_free=True,
        divisible=("words_ptr", "n"),
    )  # fmt: skip
    loads = set(re.findall(r"ld\.global[.\w]*", compiled.asm["ptx"]))
    if loads != {"ld.global.cg.v4.b32"}:
        sys.exit(f"FAIL _prefetch_kernel: loads {sorted(loads)}, expected ld.global.cg.v4.b32")
    return 1


# what every launch sees (fused_mlp.takes): pointers 16-byte aligned, width and hidden
# width multiples of 16
_FUSED_MLP_ALIGNED = ("x_ptr", "gain_ptr", "w_gu_ptr", "w_down_ptr", "h_ptr", "part_ptr",
                      "out_ptr", "gu_ptr", "act_ptr", "width", "mlp")  # fmt: skip
# the A/B tiles benchmarks/bench_realsize.py runs (bf16, folded norm: no gain)
FUSED_MLP_AB_TILES = ("stages=3", "block_f=64,slice=1024")


def fused_mlp_variants(target) -> int:
    """The persistent MLP (``ate_fast.models.fused_mlp_triton``) at its default tiles in
    every storage dtype, with the norm's weight and without (folded), for 50 rows (B = 1)
    and for 1 (row tiles 64 and 16), and for 20 in float32 and bf16 (32); bench_realsize's
    A/B tiles in bf16; the saving launch (RTC) in bf16 and float32; the launch on a
    capture's lent counters, which it sets back to zero (bf16 and float32, B = 1, saving
    and not); spill-free but in float64."""
    count = 0
    grid = itertools.product(_STORAGE_COMPUTE, (True, False), (50, 1))
    # (store, compute, gain, rows, tiles, save, reset)
    settings = [(st, comp, gain, rows, "", False, False) for (st, comp), gain, rows in grid]
    settings += [(st, comp, False, 20, "", False, False) for st, comp in _STORAGE_COMPUTE[::2]]
    settings += [("bf16", "fp32", False, 50, t, False, False) for t in FUSED_MLP_AB_TILES]
    # the saving launch (RTC's input-VJP): bf16 and float32 at B = 1
    settings += [("bf16", "fp32", gain, 50, "", True, False) for gain in (True, False)]
    settings.append(("fp32", "fp32", False, 50, "", True, False))
    # on a capture's lent counters
    settings += [(st, "fp32", gain, 50, "", False, True) for st in ("bf16", "fp32")
                 for gain in (True, False)]  # fmt: skip
    settings.append(("bf16", "fp32", False, 50, "", True, True))
    for store, comp, gain, rows, tiles, save, reset in settings:
        os.environ[fused_mlp.TILES_VAR] = tiles
        launch = fused_mlp.launch_tiles(_TORCH_DTYPE[store], torch.empty(rows, 16))
        c = tl.float64 if comp == "fp64" else tl.float32
        compile_one(
            fm._fused_mlp_kernel,
            {"HAS_GAIN": gain, "SAVE": save, "C": c, "INTERPRETED": False,
             "BLOCK_M": launch.block_m,
             "BLOCK_F": launch.block_f, "BLOCK_K": launch.block_k, "BLOCK_N": launch.block_n,
             "SLICE": launch.slice, "BLOCK_H": launch.block_h, "MAX_POLLS": fm.MAX_POLLS,
             "RESET": reset, "PDL": False},
            lambda name, d=store, c=comp: {"sync_ptr": "i32", "part_ptr": c}.get(name, d),
            {"eps": "fp32"}, target,
            f"{store} gain={gain} rows={rows} save={save} reset={reset} {tiles or 'default'}",
            {"num_warps": launch.warps, "num_stages": launch.stages},
            spill_free=store != "fp64", divisible=_FUSED_MLP_ALIGNED,
        )  # fmt: skip
        count += 1
    if target.arch >= 90:  # launched with programmatic dependent launch, on lent counters
        for gain in (True, False):
            os.environ[fused_mlp.TILES_VAR] = ""
            launch = fused_mlp.launch_tiles(torch.bfloat16, torch.empty(50, 16))
            compiled = compile_one(
                fm._fused_mlp_kernel,
                {"HAS_GAIN": gain, "SAVE": False, "C": tl.float32, "INTERPRETED": False,
                 "BLOCK_M": launch.block_m, "BLOCK_F": launch.block_f,
                 "BLOCK_K": launch.block_k, "BLOCK_N": launch.block_n, "SLICE": launch.slice,
                 "BLOCK_H": launch.block_h, "MAX_POLLS": fm.MAX_POLLS, "RESET": True,
                 "PDL": True},
                lambda name: {"sync_ptr": "i32", "part_ptr": "fp32"}.get(name, "bf16"),
                {"eps": "fp32"}, target, f"bf16 gain={gain} rows=50 reset=True PDL",
                {"num_warps": launch.warps, "num_stages": launch.stages,
                 **triton_pdl.launch_options(True)},
                spill_free=True, divisible=_FUSED_MLP_ALIGNED,
            )  # fmt: skip
            _check_pdl_order(compiled, True, prefetches=False)
            count += 1
    os.environ.pop(fused_mlp.TILES_VAR, None)
    return count


GROUPS = {"mlp": mlp_variants, "guided_step": guided_step_variants,
          "transformer": transformer_variants, "flow_block": flow_block_variants,
          "skinny_gemm": skinny_gemm_variants, "split_kv": split_kv_variants,
          "l2_prefetch": l2_prefetch_variants, "fused_mlp": fused_mlp_variants}  # fmt: skip


def main(arch: int, group: str = "all") -> None:
    target = GPUTarget("cuda", arch, 32)
    chosen = GROUPS.values() if group == "all" else [GROUPS[g] for g in group.split(",")]
    count = sum(variants(target) for variants in chosen)
    _, archs = shared_limit(arch)
    print(f"compiled {count} kernel variants for sm_{arch} with triton {triton.__version__}"
          f" (shared memory within {archs})")  # fmt: skip
    stale = set(_known_spills(arch)) - KNOWN_SEEN
    if group == "all" and stale and not REPORT_SPILLS:
        sys.exit(f"FAIL: KNOWN_SPILLS names variants this run did not compile: {sorted(stale)}")
    if REPORT_SPILLS:
        print(f"{len(SPILLED)} gated variants spill registers (reported, not failed)")
        for line in SPILLED:
            print(f"  spills: {line}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arch", nargs="?", type=int, default=90)
    parser.add_argument("group", nargs="?", default="all")
    parser.add_argument("--spills", choices=("fail", "report"), default="fail")
    cli = parser.parse_args()
    REPORT_SPILLS = cli.spills == "report"
    try:
        main(cli.arch, cli.group)
    finally:
        shutil.rmtree(os.environ["TRITON_CACHE_DIR"], ignore_errors=True)
