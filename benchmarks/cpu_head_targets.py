"""Issue 18's unguided CPU targets per reference head: ``sample()`` and ``capture()`` against
the eager loop a user writes, rows interleaved round by round, one torch thread
(``--threads``).

    python benchmarks/cpu_head_targets.py [--heads mlp-small unet1d-dp …] [--rounds 5]
                                          [--aten-conv] [--gemms aten onednn] [--compile]
                                          [--fuse-qkv] [--dtype bfloat16] [--json OUT.json]

``bench_heads``' set-up: each head at its config's (H, D), B = 1, float32, on its native
sampler (flow heads: flow Euler 10; U-Nets: DDIM 10), the U-Nets' conditioning a fixed
random [1, cond_dim]; the eager row is ``bench_heads``' ``eager`` loop (the head called every
step, the update in tensor ops). Each round calls every row once, in turn (reversed every
other round), so load from other processes falls on all of them alike; a ratio of two rows
is the median over rounds of their times' ratio in the round (on a VM whose speed drifts by
±15 % over seconds, the fastest rounds of two rows can fall in different stretches). Prints
a markdown table: eager per call (its fastest round), ``sample()`` and ``capture()`` as
eager / row (> 1: ate_fast faster). ``--aten-conv`` runs the U-Nets' convolutions on ATen's path
everywhere (``ate_fast.models.chunk_conv`` off: the state before it). ``--gemms aten
onednn`` runs every row under each ``ATE_FAST_CPU_GEMM`` choice (``ate_fast.models.cpu_gemm``),
interleaved in the same rounds; the last column is the first choice's eager time over
this row's (> 1: this GEMM's eager loop faster). ``--compile`` adds ``bench_heads``'
``compile`` row (the eager loop with the head ``torch.compile(mode="reduce-overhead")``d,
compiled before the rounds) and the column ``capture()`` vs it. ``--fuse-qkv`` adds, for
the flow transformers, ``capture()`` of the same head with ``fuse_qkv = True`` (each
block's q and kv projected by one GEMM through ``[W_q; W_kv]`` concatenated once per call:
a GPU call's default, off on the CPU) and the column ``capture()`` / it (> 1: the fused
call faster). ``--unpacked`` adds ``capture()`` with ``ATE_FAST_CPU_WEIGHT_PACKS=off`` (each
call's oneDNN weights not packed once: :mod:`ate_fast.ops.weight_packs`) and the column
it / ``capture()`` (> 1: packing faster). ``--dtype bfloat16`` casts every head's weights
and conditioning (the noise, the sampler state and its update stay float32).
``--torch-epilogues`` adds, for the flow transformers, the eager loop and ``capture()``
with ``ATE_FAST_FLOW_EPILOGUES=torch`` (ATen's ops for the block's gated GELU, RMSNorms and
rotary epilogue instead of the CPU's native kernels, which the other rows run) and the
column "eager, ``capture()``: torch / native" (> 1: the native kernels faster).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_heads

from ate_fast.models import FlowTransformerHead, block_epilogues, chunk_conv, cpu_gemm
from ate_fast.ops import weight_packs

NATIVE_SAMPLER = {"unet1d": "ddim-10"}  # every other head: flow Euler 10


def rows(
    head_id: str, compiled: bool = False, fused: bool = False, unpacked: bool = False,
    torch_epilogues: bool = False, dtype: torch.dtype = torch.float32,
) -> dict[str, Callable[[], torch.Tensor]]:  # fmt: skip
    """The rows of one head, each a call with fixed noise (and cond); ``compiled``: also
    the eager loop with the head ``torch.compile``d (``bench_heads``' ``compile`` row);
    ``fused``: also ``capture()`` with a flow transformer's ``fuse_qkv = True``;
    ``unpacked``: also ``capture()`` with the call's weights not packed;
    ``torch_epilogues``: also the eager loop and ``capture()`` of a flow transformer with
    ATen's epilogue ops (the other rows pinned to the native kernels); ``dtype``: the
    head's weights and its conditioning (noise and the update stay float32)."""
    head = bench_heads._head("cpu", head_id)
    if dtype != torch.float32:
        head = copy.deepcopy(head).to(dtype)
    sampler = NATIVE_SAMPLER.get(bench_heads.HEADS[head_id][0], "flow-euler-10")
    horizon, action_dim = bench_heads._shape(head_id)
    noise = torch.randn(1, horizon, action_dim, generator=torch.Generator().manual_seed(1))
    cond = bench_heads._cond("cpu", head_id)
    cond = None if cond is None else cond.to(dtype)
    loop = bench_heads._user_loop(head, sampler, 1.0, None, "cpu", cond=cond)
    ate = bench_heads._ate_sampler(head_id, sampler, head)
    captured = ate.capture(noise, cond, check_finite=False)
    impls = {
        "eager": lambda: loop(noise),
        "sample": lambda: ate.sample(noise, cond),
        "capture": lambda: captured(noise, cond),
    }
    if fused and isinstance(head, FlowTransformerHead):
        fused_head = copy.copy(head)  # the same modules and weights, its own setting
        fused_head.fuse_qkv = True
        fused_call = bench_heads._ate_sampler(head_id, sampler, fused_head).capture(
            noise, cond, check_finite=False
        )
        impls["capture_fused"] = lambda: fused_call(noise, cond)
    if unpacked:
        impls["capture_unpacked"] = under_env(weight_packs.ENV_VAR, "off", impls["capture"])
        impls["capture"] = under_env(weight_packs.ENV_VAR, "on", impls["capture"])
    if torch_epilogues and isinstance(head, FlowTransformerHead):
        var = block_epilogues.ENV_VAR
        for row in ("eager", "capture"):
            impls[f"{row}_torch_epilogues"] = under_env(var, "torch", impls[row])
            impls[row] = under_env(var, "native", impls[row])
    if compiled:
        if dtype != torch.float32:
            raise SystemExit("--compile: float32 only (bench_heads' compiled head)")
        model = bench_heads._compiled_head("cpu", head_id)
        compiled_loop = bench_heads._user_loop(model, sampler, 1.0, None, "cpu", cond=cond)
        impls["compile"] = lambda: compiled_loop(noise)
    return impls


def timed_rounds(
    impls: dict[str, Callable[[], torch.Tensor]], rounds: int
) -> dict[str, list[float]]:
    """Each row's time in each of ``rounds`` rounds, seconds (after one warm call); every
    round calls each row once, in reverse order every other round."""
    for fn in impls.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in impls}
    for r in range(rounds):
        for name, fn in list(impls.items())[:: 1 if r % 2 == 0 else -1]:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def paired(slow: list[float], fast: list[float]) -> float:
    """The median over rounds of ``slow / fast`` (> 1: ``fast``'s row faster): a shared
    slow stretch of the machine falls on both rows of a round."""
    return statistics.median(a / b for a, b in zip(slow, fast))


def under_env(var: str, value: str, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``fn`` with ``$var`` set to ``value`` (the settings are read at every call or GEMM,
    so set per call), restored afterwards: a row that does not pin the variable runs with
    the environment's value, not the last row's."""

    def call() -> torch.Tensor:
        before = os.environ.get(var)
        os.environ[var] = value
        try:
            return fn()
        finally:
            if before is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = before

    return call


def under_gemm(choice: str, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``fn`` with ``ATE_FAST_CPU_GEMM=choice``."""
    return under_env(cpu_gemm.ENV_VAR, choice, fn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", nargs="+", default=list(bench_heads.HEADS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--aten-conv", action="store_true", help="U-Net convolutions on ATen")
    parser.add_argument(
        "--gemms", nargs="+", choices=cpu_gemm.CHOICES, help="every row under each GEMM choice"
    )
    parser.add_argument(
        "--compile", action="store_true", help="also the eager loop with the head compiled"
    )
    parser.add_argument(
        "--fuse-qkv", action="store_true", help="also capture() with one q|kv GEMM per block"
    )
    parser.add_argument(
        "--unpacked", action="store_true", help="also capture() with the call's weights unpacked"
    )
    parser.add_argument(
        "--torch-epilogues", action="store_true",
        help="also the eager loop and capture() with ATen's epilogue ops (flow transformers)",
    )  # fmt: skip
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32",
        help="the heads' weights and conditioning (the sampler state stays float32)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the times and ratios here")
    args = parser.parse_args()
    unknown = sorted(set(args.heads) - set(bench_heads.HEADS))
    if unknown:
        parser.error(f"--heads: unknown {unknown}; expected some of {list(bench_heads.HEADS)}")
    if args.aten_conv:
        chunk_conv.ROWS_BELOW = 0  # no output length is below 0: every layer takes ATen's path
    torch.set_num_threads(args.threads)
    gemms = args.gemms or [os.environ.get(cpu_gemm.ENV_VAR, "") or "auto"]
    cpu = f"{platform.machine()} {cpu_gemm.cpu_vendor() or 'unknown vendor'}"
    cpu += f" (ATen CPU capability {torch.backends.cpu.get_cpu_capability()})"
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {cpu}, {args.dtype} heads, "
        f"{args.rounds} rounds"
        " (eager: its fastest; ratios: median over rounds)"
    )
    extra = " `capture()` vs `torch.compile` |" if args.compile else ""
    extra += " `capture()` / with one q/kv GEMM |" if args.fuse_qkv else ""
    extra += " `capture()` unpacked / packed |" if args.unpacked else ""
    extra += " eager, `capture()`: torch / native epilogues |" if args.torch_epilogues else ""
    print(f"| head | GEMM | eager per call | `sample()` | `capture()` | eager, {gemms[0]} / this |"
          + extra)  # fmt: skip
    columns = args.compile + args.fuse_qkv + args.unpacked + args.torch_epilogues
    print("|---|---|---|---|---|---|" + "---|" * columns)
    label = {}
    for g in gemms:  # what each choice selects on this machine
        os.environ[cpu_gemm.ENV_VAR] = g
        label[g] = g if g == cpu_gemm.selected_gemm() else f"{g} ({cpu_gemm.selected_gemm()})"
    results = {}
    for head_id in args.heads:
        base = rows(
            head_id, args.compile, args.fuse_qkv, args.unpacked, args.torch_epilogues,
            getattr(torch, args.dtype),
        )  # fmt: skip
        impls = {(g, row): under_gemm(g, fn) for g in gemms for row, fn in base.items()}
        rounds = timed_rounds(impls, args.rounds)
        for g in gemms:
            each = {row: rounds[(g, row)] for row in base}
            mine = {row: min(t) for row, t in each.items()}
            ratio = {row: paired(each["eager"], each[row]) for row in ("sample", "capture")}
            if args.compile:
                ratio["capture_vs_compile"] = paired(each["compile"], each["capture"])
            if "capture_fused" in mine:
                ratio["capture_over_fused"] = paired(each["capture"], each["capture_fused"])
            if "capture_unpacked" in mine:
                ratio["unpacked_over_packed"] = paired(each["capture_unpacked"], each["capture"])
            if "capture_torch_epilogues" in mine:
                for row in ("eager", "capture"):
                    ratio[f"{row}_torch_over_native"] = paired(
                        each[f"{row}_torch_epilogues"], each[row]
                    )
            fused = ratio.get("capture_over_fused")
            native = (
                f" {ratio['eager_torch_over_native']:.3f}×, "
                f"{ratio['capture_torch_over_native']:.3f}× |"
                if "eager_torch_over_native" in ratio
                else " – |"
            )
            versus = paired(rounds[(gemms[0], "eager")], each["eager"])
            results[f"{head_id} {g}"] = {"seconds": mine, "eager_over": ratio, "gemm": label[g]}
            print(
                f"| `{head_id}` | {label[g]} | {mine['eager'] * 1e3:.2f} ms "
                f"| {ratio['sample']:.2f}× | {ratio['capture']:.2f}× | {versus:.2f}× |"
                + (f" {ratio['capture_vs_compile']:.2f}× |" if args.compile else "")
                + ((" –" if fused is None else f" {fused:.2f}×") + " |" if args.fuse_qkv else "")
                + (f" {ratio['unpacked_over_packed']:.2f}× |" if args.unpacked else "")
                + (native if args.torch_epilogues else ""),
                flush=True,
            )
    if args.json:
        meta = {"torch": torch.__version__, "cpu": cpu, "aten_conv": args.aten_conv,
                "threads": args.threads, "dtype": args.dtype}  # fmt: skip
        args.json.write_text(json.dumps({"meta": meta, "heads": results}, indent=1))


if __name__ == "__main__":
    main()
