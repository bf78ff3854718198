"""The flow-transformer block's epilogues (``ate_fast.models.block_epilogues``): the Triton
kernels against the torch ops they replace, on the CPU through the Triton interpreter (and
on a GPU where there is one), alone and inside the head's forward, input-VJP and sampler;
and where the torch ops must run instead (autograd, torch.compile)."""

from __future__ import annotations

import copy

import pytest
import torch

from ate_fast.errors import BackendUnavailableError, InvalidArgumentError
from ate_fast.models import FlowTransformerHead, block_epilogues
from ate_fast.models import flow_transformer_vjp as fv
from ate_fast.models.rotary import rotary_tables
from ate_fast.ops.backends import MIN_TRITON
from ate_fast.sampling import FlowSampler

pytest.importorskip("triton", minversion=MIN_TRITON)

ENV = block_epilogues.ENV_VAR


def _rounding(dtype: torch.dtype, roundings: int = 1) -> float:
    """The relative error of ``roundings`` roundings to ``dtype``: half an ulp each, except
    bfloat16 in Triton's interpreter, which converts by truncation (numpy has no bfloat16:
    it keeps the top 16 bits), a whole ulp."""
    bits = {torch.float64: 52, torch.float32: 23, torch.bfloat16: 7}[dtype]
    truncated = dtype == torch.bfloat16 and not torch.cuda.is_available()
    return roundings * 2.0 ** -(bits if truncated else bits + 1)


@pytest.fixture
def path(monkeypatch):
    def use(name: str) -> None:
        monkeypatch.setenv(ENV, name)

    return use


def _tables(length: int, head_dim: int, dtype, device="cpu", batch: int = 0):
    """Rotary tables [length, hd]; ``batch`` > 0: per sample [B, 1, length, hd], sample b's
    positions shifted by −2b (a padded prefix's: real tokens counted only)."""
    inv = 10_000.0 ** (-torch.arange(head_dim // 2, dtype=torch.float32) / (head_dim // 2))
    positions = torch.arange(length, dtype=torch.float32)
    if batch:
        positions = positions - 2 * torch.arange(batch, dtype=torch.float32)[:, None, None]
    angle = positions[..., None] * inv
    return tuple(t.to(device) for t in rotary_tables(angle, dtype))


def _qkv_inputs(
    batch, horizon, prefix, heads, kv_heads, head_dim, dtype, device="cpu", per_sample=False
):  # fmt: skip
    g = torch.Generator().manual_seed(batch * 100 + prefix + heads + head_dim)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype)

    q_lin = rand(batch, horizon, heads * head_dim)
    kv_lin = rand(batch, horizon, 2 * kv_heads * head_dim)
    cond = None
    if prefix:  # keys contiguous, values a strided view (as FlowTransformerHead.prefix_cache)
        kv = rand(batch, prefix, 2 * kv_heads, head_dim).transpose(1, 2)
        keys, values = kv.chunk(2, dim=1)
        cond = (keys.contiguous(), values)
    cos, sin = _tables(prefix + horizon, head_dim, dtype, device, batch if per_sample else 0)
    return q_lin, kv_lin, cos, sin, cond


def _both(path, fn, *args, **kwargs):
    path("torch")
    ref = fn(*args, **kwargs)
    path("triton")
    return ref, fn(*args, **kwargs)


def _as64(t):
    return None if t is None else t.double()


def _ref64(q_lin, kv_lin, cos, sin, cond, heads, kv_heads):
    cond64 = None if cond is None else tuple(_as64(t) for t in cond)
    return block_epilogues.rotate_qkv(
        q_lin.double(), kv_lin.double(), cos.double(), sin.double(), cond64, heads, kv_heads
    )


# (B, H, L, heads, kv_heads, hd): GQA with one and two kv heads, a head dim that is no power
# of two, no prefix
QKV_CASES = [(2, 5, 7, 4, 1, 16), (1, 6, 3, 4, 2, 12), (2, 4, 0, 2, 1, 8)]


@pytest.mark.parametrize("tables", ["shared", "per-sample"])
@pytest.mark.parametrize("case", QKV_CASES, ids=lambda c: "B{}H{}L{}q{}kv{}hd{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rotate_qkv_matches_torch(path, monkeypatch, case, dtype, tables):
    """Shared rotary tables [L + H, hd], or per sample [B, 1, L + H, hd] (a padded prefix)."""
    batch, horizon, prefix, heads, kv_heads, head_dim = case
    inputs = _qkv_inputs(batch, horizon, prefix, heads, kv_heads, head_dim, dtype,
                         per_sample=tables == "per-sample")  # fmt: skip
    ref, got = _both(path, block_epilogues.rotate_qkv, *inputs, heads, kv_heads)
    path("torch")
    exact = _ref64(*inputs, heads, kv_heads)  # the same inputs, float64 arithmetic
    # x·c + swap(x)·s in float32 (float64): two products and a sum rounded, then one
    # rounding to the storage dtype (torch's bf16 rotation rounds to bf16 twice)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    bound = _rounding(compute, 3) + (_rounding(dtype) if dtype != compute else 0.0)
    for name, r, t, e in zip("qkv", ref, got, exact):
        assert t.shape == r.shape and t.dtype == dtype and t.is_contiguous(), name
        scale = e.abs().max()
        assert (t.double() - e).abs().max() <= bound * scale, name
        assert (t.double() - r.double()).abs().max() <= 2 * bound * scale, name
    if prefix:  # the prefix rows are copies, bit for bit
        assert torch.equal(got[1][:, :, :prefix], inputs[4][0])
        assert torch.equal(got[2][:, :, :prefix], inputs[4][1])
    assert torch.equal(got[2][:, :, prefix:], ref[2][:, :, prefix:])  # values: copies too


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("save_act", [True, False])
def test_gated_gelu_matches_torch(path, dtype, save_act):
    g = torch.Generator().manual_seed(3)
    # 3·2·(2·700) elements: programs of 1024 straddle rows; gate values far into both tails
    gate_up = (4 * torch.randn(3, 2, 1400, generator=g, dtype=torch.float64)).to(dtype)
    ref, got = _both(path, block_epilogues.gated_gelu, gate_up, save_act=save_act)
    gate, up = gate_up.double().chunk(2, dim=-1)
    act64 = torch.nn.functional.gelu(gate, approximate="tanh")
    # the GELU rounded, then the product (float32: exp's error and the GELU's few ops)
    bound = {torch.float64: 1e-14, torch.float32: 2e-6}.get(dtype) or _rounding(dtype, 2)
    assert got[0].shape == (3, 2, 700) and got[0].dtype == dtype
    assert (got[0].double() - act64 * up).abs().max() <= bound * (act64 * up).abs().max()
    assert (got[0].double() - ref[0].double()).abs().max() <= 2 * bound * (act64 * up).abs().max()
    if not save_act:
        assert got[1] is None and ref[1] is None
        return
    assert (got[1].double() - act64).abs().max() <= bound * act64.abs().max()
    # the product reads the GELU as stored (the input-VJP's act is the forward's): one
    # rounding of act·up (exact in float32 for bfloat16 factors)
    stored = got[1].double() * up
    if dtype == torch.bfloat16:  # the interpreter truncates, torch's .to() rounds
        # (subnormal GELUs, gate < −10, left out: the interpreter's bf16 subnormals are off)
        normal = got[1].double().abs() >= torch.finfo(dtype).tiny
        error = (got[0].double() - stored).abs()
        assert (error <= _rounding(dtype) * stored.abs())[normal].all()
    else:
        torch.testing.assert_close(got[0], stored.to(dtype), rtol=0, atol=0)


# -- the input-VJP's epilogues (ate_fast.models.flow_transformer_vjp) -------------------------
def _vjp_inputs(dtype):
    """Random inputs of the four VJP epilogues (B = 2, H = 5, 4 query heads / 2 kv heads of
    12, width 24, MLP 20, 7 prefix + 5 action keys), stored in ``dtype``."""
    g = torch.Generator().manual_seed(7)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    gate_up = 3 * rand(2, 5, 40)
    gate, up = gate_up.chunk(2, dim=-1)  # rows of stride 2F, as the forward keeps them
    act = torch.nn.functional.gelu(gate.double(), approximate="tanh").to(dtype)
    saved = fv.BlockSaved(None, None, None, None, None, gate, up, act)
    cos, sin = _tables(12, 12, dtype)
    return {
        "gelu": (rand(2, 5, 20), saved),
        "rms": (rand(2, 5, 24), 1 + rand(2, 5, 24), rand(2, 5, 24)),
        "softmax": (3 * rand(2, 2, 10, 12), rand(2, 2, 10, 12)),
        # dq in the queries' grouped layout [B, kv_heads, H·heads/kv_heads, hd]
        "unrotate": (rand(2, 2, 10, 12), rand(2, 2, 5, 12), rand(2, 2, 5, 12), cos, sin),
        "unrotate-per-sample": (
            rand(2, 2, 10, 12),
            rand(2, 2, 5, 12),
            rand(2, 2, 5, 12),
            *_tables(12, 12, dtype, batch=2),
        ),
    }


def _upcast(value):
    if isinstance(value, torch.Tensor):
        return value.double()
    if isinstance(value, fv.BlockSaved):
        return fv.BlockSaved(*(t.double() if isinstance(t, torch.Tensor) else t for t in value))
    return value


def _vjp_calls(norm):
    return {
        "gelu": lambda dm, saved: fv.gelu_gate_backward(dm, saved),
        "rms": lambda grad, x, res: fv.rms_norm_vjp(grad, x, norm, residual=res),
        "rms-no-residual": lambda grad, x, res: fv.rms_norm_vjp(grad, x, norm),
        "softmax": lambda s, dp: fv.softmax_backward(s, dp, 12**-0.5),
        "unrotate": fv.unrotate_pack,
        "unrotate-per-sample": fv.unrotate_pack,
    }


# (epilogue, RMSNorm with a weight): the weight matters to the RMSNorm VJP only
VJP_CASES = [("gelu", True), ("rms", True), ("rms", False), ("rms-no-residual", True),
             ("rms-no-residual", False), ("softmax", True), ("unrotate", True),
             ("unrotate-per-sample", True)]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("which,affine", VJP_CASES, ids=lambda v: str(v))
def test_vjp_epilogues_match_float64(path, dtype, which, affine):
    """Each of the input-VJP's Triton epilogues against the torch path in float64 on the
    same (rounded) inputs: float32 arithmetic, one rounding to the storage dtype."""
    norm = torch.nn.RMSNorm(24, eps=1e-6, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.copy_(1 + 0.5 * torch.randn(24, generator=torch.Generator().manual_seed(1)))
    norm = norm.to(dtype)  # the weight in the storage dtype, as in a cast head
    args = _vjp_inputs(dtype)[which if which.startswith("unrotate") else which.split("-")[0]]
    path("torch")
    exact = _vjp_calls(copy.deepcopy(norm).double())[which](*[_upcast(a) for a in args])
    path("triton")
    with torch.no_grad():
        got = _vjp_calls(norm)[which](*args)
    exact, got = (exact, got) if isinstance(got, tuple) else ((exact,), (got,))
    bound = {torch.float64: 1e-13, torch.float32: 1e-5}.get(dtype) or _rounding(dtype) + 1e-5
    for e, k in zip(exact, got):
        assert k.shape == e.shape and k.dtype == dtype
        assert (k.double() - e).abs().max() <= bound * e.abs().max()


def _head(dtype, device="cpu"):
    torch.manual_seed(0)
    head = FlowTransformerHead("small", depth=2, horizon=6, action_dim=3, width=32, mlp_dim=48,
                               num_heads=4, num_kv_heads=2, head_dim=8)  # fmt: skip
    return head.to(device, dtype)


@pytest.mark.parametrize("prefix", [None, "tokens", "cache", "padded"])
def test_head_forward_and_vjp_match_torch_path(path, prefix):
    """float64: the head's forward and hand input-VJP with the kernels equal the torch
    path's to rounding, with and without a prefix (tokens, their PrefixCache, a padded
    one: per-sample rotary tables and the softmax's masked keys)."""
    head = _head(torch.float64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    u = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    cond = None if prefix is None else torch.randn(2, 5, 32, generator=g, dtype=torch.float64)
    if prefix == "cache":
        cond = head.prefix_cache(cond)
    if prefix == "padded":
        cond = head.prefix_cache(cond, torch.tensor([[True] * 5, [True, False, True, True, False]]))

    def run():
        with torch.no_grad():
            out, pullback = head.forward_with_vjp(x, t, cond)
            return head(x, t, cond), out, pullback(u)

    ref, got = _both(path, run)
    for r, k in zip(ref, got):
        torch.testing.assert_close(k, r, rtol=1e-12, atol=1e-12)


def test_sampler_capture_with_kernels(path):
    """float32: a captured Euler loop over the head with the kernels (the CPU replay) gives
    the torch path's actions, guided by RTC through the hand VJP too."""
    from ate_fast.realtime import RTCGuidance

    head = _head(torch.float32)
    noise = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(2))
    cond = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    prev = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(5))
    guidance = RTCGuidance(prev, 2, execution_horizon=3)

    def run():
        sampler = FlowSampler(head, 4)
        with torch.no_grad():
            captured = sampler.capture(noise, cond)
            return captured(noise, cond), sampler.sample(noise, cond, guidance=guidance)

    ref, got = _both(path, run)
    for r, k in zip(ref, got):
        torch.testing.assert_close(k, r, rtol=1e-5, atol=1e-5)


def test_autograd_runs_the_torch_ops(path):
    """With the kernels selected, a forward autograd records (training) runs the torch ops:
    the kernels have no backward, so the weights' gradients must still be formed."""
    head = _head(torch.float64)
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    cond = torch.randn(2, 5, 32, dtype=torch.float64)

    def grads():
        head.zero_grad()
        head(x, t, cond).square().sum().backward()
        return [p.grad.clone() for p in head.parameters()]

    ref, got = _both(path, grads)
    assert all(g is not None for g in got)
    for r, k in zip(ref, got):
        torch.testing.assert_close(k, r, rtol=0, atol=0)


def test_torch_compile_traces_the_torch_ops(path):
    """Under torch.compile the torch ops are traced (Inductor fuses them itself; a Triton
    kernel called on fake tensors would fail): the compiled head equals the eager one."""
    head = _head(torch.float32)
    x = torch.randn(1, 6, 3)
    t = torch.tensor([0.4])
    path("triton")
    compiled = torch.compile(head, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t), head(x, t), rtol=1e-6, atol=1e-6)


def test_path_setting_is_checked(path, monkeypatch):
    q_lin, kv_lin, cos, sin, cond = _qkv_inputs(1, 4, 2, 2, 1, 8, torch.float32)
    path("fast")
    with pytest.raises(InvalidArgumentError, match="ATE_FAST_FLOW_EPILOGUES"):
        block_epilogues.rotate_qkv(q_lin, kv_lin, cos, sin, cond, 2, 1)
    path("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the CPU runs Triton only interpreted
    with pytest.raises(BackendUnavailableError, match="ATE_FAST_FLOW_EPILOGUES=triton"):
        block_epilogues.gated_gelu(torch.randn(2, 8))
    monkeypatch.delenv(ENV)
    # the CPU: the native kernels by default (Triton runs only interpreted there), the torch
    # ops where the native module is missing; forced, native raises off the CPU
    assert block_epilogues.selected_path("cpu") == "native"
    monkeypatch.setattr(block_epilogues.native, "load", lambda name: None)
    assert block_epilogues.selected_path("cpu") == "torch"
    path("native")
    with pytest.raises(BackendUnavailableError, match="ATE_FAST_FLOW_EPILOGUES=native"):
        block_epilogues.gated_gelu(torch.randn(2, 8))
    monkeypatch.undo()
    path("native")
    with pytest.raises(BackendUnavailableError, match="run on the CPU, the tensors are on meta"):
        block_epilogues.gated_gelu(torch.randn(2, 8, device="meta"))
    monkeypatch.delenv(ENV)
    # CUDA: the kernels by default (measured on an H200), where Triton runs; else torch ops,
    # without an error (only a forced path raises)
    monkeypatch.setattr(block_epilogues.backends, "availability", lambda *_: (True, ""))
    assert block_epilogues.selected_path("cuda") == "triton"
    monkeypatch.setattr(block_epilogues.backends, "availability", lambda *_: (False, "none"))
    assert block_epilogues.selected_path("cuda") == "torch"
    path("torch")
    monkeypatch.setattr(block_epilogues.backends, "availability", lambda *_: (True, ""))
    assert block_epilogues.selected_path("cuda") == "torch"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_pi0_block_on_cuda(path, dtype):
    """π0's block sizes on the GPU (8 query heads, 1 kv head of 256, MLP 4096, an
    816-token prefix; B = 2): the kernels against the torch ops, and a captured pi0-shaped
    head (2 blocks) in a CUDA graph against its torch path."""
    inputs = _qkv_inputs(2, 50, 816, 8, 1, 256, dtype, "cuda")
    ref, got = _both(path, block_epilogues.rotate_qkv, *inputs, 8, 1)
    bound = 2**-7 if dtype == torch.bfloat16 else 1e-6
    for r, k in zip(ref, got):
        assert (k.double() - r.double()).abs().max() <= bound * r.double().abs().max()
    gate_up = torch.randn(2, 50, 8192, device="cuda", dtype=dtype)
    ref, got = _both(path, block_epilogues.gated_gelu, gate_up, save_act=True)
    for r, k in zip(ref, got):
        assert (k.double() - r.double()).abs().max() <= bound * r.double().abs().max()
    torch.manual_seed(0)
    head = FlowTransformerHead("pi0-expert", depth=2).to("cuda", dtype)
    cache = head.prefix_cache(torch.randn(2, 816, 1024, device="cuda", dtype=dtype))
    noise = torch.randn(2, 50, 32, device="cuda")

    def run():
        with torch.no_grad():
            return FlowSampler(head, 10).capture(noise, cache)(noise, cache)

    ref, got = _both(path, run)
    assert (got - ref).abs().max() <= 5e-2 * ref.abs().max()
    # the input-VJP (RTC's pullback): each path is within bf16's own error of float32's
    # (1.1 % relative L2, docs/precision.md), so the two within twice that
    t = torch.full((2,), 0.7, device="cuda")
    u = torch.randn(2, 50, 32, device="cuda")

    def pull():
        with torch.no_grad():
            return head.forward_with_vjp(noise, t, cache)[1](u)

    ref, got = _both(path, pull)
    bound = 2.5e-2 if dtype == torch.bfloat16 else 1e-5
    assert (got - ref).norm() <= bound * ref.norm()
