"""A small flow-transformer head and one run of everything a block's alternative path must
match (shared by the tests of ``skinny_gemm``, ``split_kv_attention``,
``flex_prefix_attention`` and ``gemm_attention``), and attention inputs shaped as a block
reads them."""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator
from typing import Callable, Optional
from unittest import mock

import torch

from ate_fast.models import FlowTransformerHead
from ate_fast.sampling import FlowSampler

F64 = torch.float64


def small_head(dtype: torch.dtype = F64) -> FlowTransformerHead:
    """Two blocks, width 32, 4 query heads on 2 key/value heads of 8 dims (seeded)."""
    torch.manual_seed(0)
    head = FlowTransformerHead("small", depth=2, horizon=6, action_dim=3, width=32, mlp_dim=48,
                               num_heads=4, num_kv_heads=2, head_dim=8)  # fmt: skip
    return head.to(dtype)


def prefix_qkv(batch, kv_heads, rows, keys, hd, dtype, device="cpu") -> tuple:
    """q [B, kv_heads, rows, hd] (contiguous); k, v [B, kv_heads, keys, hd]: strided views
    of longer buffers, as a block's prefix slot holds them (seeded by rows and keys)."""
    g = torch.Generator().manual_seed(rows + keys)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=F64).to(device, dtype)

    buf_k, buf_v = rand(batch, kv_heads, keys + 3, hd), rand(batch, kv_heads, keys + 3, hd)
    return rand(batch, kv_heads, rows, hd), buf_k[:, :, :keys], buf_v[:, :, :keys]


def forward_vjp_and_capture(head: FlowTransformerHead) -> Callable[[], tuple]:
    """``run() -> (head(x), forward_with_vjp's output, its pullback of u, a captured Euler
    loop's actions)`` on fixed float64 inputs with a prefix cache [2, 5, 32]."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 3, generator=g, dtype=F64)
    t = torch.tensor([0.3, 0.8], dtype=F64)
    u = torch.randn(2, 6, 3, generator=g, dtype=F64)
    cond = head.prefix_cache(torch.randn(2, 5, 32, generator=g, dtype=F64))

    def run() -> tuple:
        sampler = FlowSampler(head, 3)
        with torch.no_grad():
            out, pullback = head.forward_with_vjp(x, t, cond)
            captured = sampler.capture(x, cond)
            return head(x, t, cond), out, pullback(u), captured(x, cond)

    return run


def assert_path_matches(
    monkeypatch, var: str, path: str, baseline: str, module: object, function: str,
    head: FlowTransformerHead, tol: float, per_block: int = 1,
) -> None:  # fmt: skip
    """:func:`forward_vjp_and_capture` with ``$var`` = ``path`` equals it with ``baseline``
    to ``tol``, and ``module.function`` (the path's entry point) ran ``per_block`` times in
    every block of the forward and of forward_with_vjp."""
    run = forward_vjp_and_capture(head)
    monkeypatch.setenv(var, baseline)
    ref = run()
    monkeypatch.setenv(var, path)
    with mock.patch.object(module, function, wraps=getattr(module, function)) as entry:
        got = run()
    blocks = len(head.blocks)
    assert entry.call_count >= 2 * blocks * per_block  # head() and forward_with_vjp()
    for r, o in zip(ref, got):
        torch.testing.assert_close(o, r, rtol=tol, atol=tol)


def assert_compile_traces_torch_ops(module: object, function: str) -> None:
    """Under ``torch.compile`` (fullgraph, eager backend) a float32 :func:`small_head`
    traces torch's ops: ``module.function`` (a path's kernel entry) is never called on the
    trace's fake tensors (they have no data pointer to check), and the compiled head equals
    the eager one, which runs the selected path."""
    head = small_head(torch.float32)
    x, t = torch.randn(1, 6, 3), torch.tensor([0.4])
    compiled = torch.compile(head, backend="eager", fullgraph=True)
    with torch.no_grad():
        with mock.patch.object(module, function, wraps=getattr(module, function)) as entry:
            got = compiled(x, t)
        assert entry.call_count == 0
        torch.testing.assert_close(got, head(x, t), rtol=1e-5, atol=1e-5)


def pi0_on_cuda(depth: int) -> tuple:
    """``(head, cache, x, t, u)``: π0's expert with ``depth`` blocks in bf16 on the GPU
    (seeded), its cache of an 816-token prefix, a sample x [1, 50, 32], a time t [1] and a
    cotangent u like x."""
    torch.manual_seed(0)
    head = FlowTransformerHead("pi0-expert", depth=depth).to("cuda", torch.bfloat16)
    cache = head.prefix_cache(torch.randn(1, 816, 1024, device="cuda", dtype=torch.bfloat16))
    x = torch.randn(1, 50, 32, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor([0.4], device="cuda", dtype=torch.bfloat16)
    return head, cache, x, t, torch.randn_like(x)


class LaunchCounter:
    """Stands in for a Triton kernel (``mock.patch.object(module, "_kernel", counter)``),
    counting its launches (``kernel[grid](...)``) and making them."""

    def __init__(self, kernel) -> None:
        self.kernel, self.count = kernel, 0

    def __getitem__(self, grid):
        self.count += 1
        return self.kernel[grid]


def captured(fn: Callable[[], torch.Tensor], counters: Optional[torch.Tensor] = None) -> tuple:
    """``(graph, out)``: ``fn()`` run once on a side stream (its compiles and allocations)
    and then captured on that stream in a ``torch.cuda.CUDAGraph`` whose replay rewrites
    ``out``; ``counters`` (:mod:`ate_fast.ops.split_counters`) lent to both where given, as
    a captured sampler lends its own."""
    from ate_fast.ops import split_counters

    def lent():
        return contextlib.nullcontext() if counters is None else split_counters.lend(counters)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), lent():
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream), lent():
        out = fn()
    return graph, out


@contextlib.contextmanager
def interpreted_launches() -> Iterator[collections.Counter]:
    """Counts the Triton kernels launched through the interpreter by name (yielded); their
    own tensor work is hidden from an enclosing dispatch mode (an ATen op counter)."""
    import torch.utils._python_dispatch as dispatch
    from triton.runtime.interpreter import InterpretedFunction

    launches: collections.Counter = collections.Counter()
    run = InterpretedFunction.run

    def counted(self, *args, **kwargs):
        launches[self.fn.__name__] += 1
        with dispatch._disable_current_modes():  # the interpreter's own tensor work
            return run(self, *args, **kwargs)

    with mock.patch.object(InterpretedFunction, "run", counted):
        yield launches
