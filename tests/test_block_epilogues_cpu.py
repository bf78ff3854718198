"""The flow-transformer block's C++ CPU epilogues (``ate_fast.models.block_epilogues_cpu``,
the CPU's ``native`` path) — the MLP's gated GELU and its backward, RMSNorm, the rotary
q/k/v epilogue and the two's input-VJPs: against float64, the same rounding with and
without the saved GELU, every row length the vector loop may split (and the OpenMP path),
strided and per-sample operands, the errors, and which calls take them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ate_fast import native
from ate_fast.errors import InvalidArgumentError
from ate_fast.models import FlowTransformerHead, block_epilogues, block_epilogues_cpu
from ate_fast.models.rotary import rotary_tables
from ate_fast.sampling import FlowSampler

pytestmark = pytest.mark.skipif(
    native.load("_C") is None, reason=f"needs the native CPU module: {native.reason('_C')}"
)
ENV = block_epilogues.ENV_VAR
# float32 against float64, relative to the largest |value|: the exp polynomial's ≈ 1 ulp
# and a dozen float32 operations (measured ≤ 1.1e-7 forward and backward)
BOUND = 1e-6
KERNELS = ("gated_gelu", "gelu_gate_backward", "rms_norm", "rotate_qkv", "rms_norm_vjp",
           "unrotate_pack", "softmax_backward")  # fmt: skip


def _gate_up(rows: int, width: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    gate_up = 4 * torch.randn(rows, 2 * width, generator=g)
    flat = gate_up[:, :width].reshape(-1)  # both tails and the exp clamp's edges
    extremes = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 12.0, -12.0, 50.0, -50.0, 1e4, -1e4])
    flat[: min(len(extremes), flat.numel())] = extremes[: flat.numel()]
    return gate_up


@pytest.mark.parametrize("rows,width", [(1, 1), (3, 17), (2, 700), (50, 1024), (100, 700)])
def test_gated_gelu_matches_float64(rows, width):
    """Rows of 1, 17 and 700 leave vector tails (100 × 700 elements: the threaded path
    where torch has more than one thread)."""
    gate_up = _gate_up(rows, width)
    out, act = block_epilogues_cpu.gated_gelu(gate_up, save_act=True)
    gate, up = gate_up.double().chunk(2, dim=-1)
    act64 = F.gelu(gate, approximate="tanh")
    assert out.shape == act.shape == (rows, width) and out.dtype == torch.float32
    assert (act.double() - act64).abs().max() <= BOUND * act64.abs().max()
    assert (out.double() - act64 * up).abs().max() <= BOUND * (act64 * up).abs().max()
    assert torch.equal(out, act * gate_up[:, width:])  # the product reads the GELU as stored
    plain, none = block_epilogues_cpu.gated_gelu(gate_up, save_act=False)
    assert none is None and torch.equal(plain, out)  # forward and forward_with_vjp agree
    # each row alone (the serial path) gives the same bits as the batch
    assert torch.equal(block_epilogues_cpu.gated_gelu(gate_up[-1:])[0], out[-1:])


@pytest.mark.parametrize("halves", [True, False], ids=["halves-of-gate_up", "contiguous"])
@pytest.mark.parametrize("shape", [(1, 1), (2, 3, 17), (2, 50, 700)])
def test_gelu_gate_backward_matches_float64(shape, halves):
    width = shape[-1]
    gate_up = _gate_up(int(torch.tensor(shape[:-1]).prod()), width, seed=1).reshape(
        *shape[:-1], 2 * width
    )
    gate, up = gate_up.chunk(2, dim=-1)  # views one row of 2F apart, as the forward keeps them
    if not halves:
        gate, up = gate.contiguous(), up.contiguous()
    act = block_epilogues_cpu.gated_gelu(gate_up, save_act=True)[1]
    dm = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    got = block_epilogues_cpu.gelu_gate_backward(dm, gate, up, act)
    d64, g64, u64 = dm.double(), gate.double(), up.double()
    d_gate = torch.ops.aten.gelu_backward(d64 * u64, g64, approximate="tanh")
    exact = torch.cat([d_gate, d64 * act.double()], dim=-1)
    assert got.shape == (*shape[:-1], 2 * width) and got.dtype == torch.float32
    assert (got.double() - exact).abs().max() <= BOUND * exact.abs().max()
    assert torch.equal(got[..., width:], dm * act)  # one rounding of dm·act


def test_bad_arguments_are_named():
    with pytest.raises(InvalidArgumentError, match="gate_up: expected a float32 or bfloat16 CPU"):
        block_epilogues_cpu.gated_gelu(torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(InvalidArgumentError, match=r"gate_up: expected \[.., 2F\]"):
        block_epilogues_cpu.gated_gelu(torch.randn(2, 7))
    x = torch.randn(2, 4)
    with pytest.raises(InvalidArgumentError, match=r"up: expected .* shape"):
        block_epilogues_cpu.gelu_gate_backward(x, x, torch.randn(2, 5), x)
    with pytest.raises(InvalidArgumentError, match="act: expected a float32 CPU tensor"):
        block_epilogues_cpu.gelu_gate_backward(x, x, x, x.double())
    kernel = native.load("_C").gated_gelu
    with pytest.raises(ValueError, match="unsupported dtype"):  # float64: not this kernel's
        kernel(1, 2, 4, 8, x.data_ptr(), x.data_ptr(), x.data_ptr(), 0)
    with pytest.raises(ValueError, match="required pointer is null"):
        kernel(0, 2, 4, 8, x.data_ptr(), 0, x.data_ptr(), 0)


def _head() -> FlowTransformerHead:
    torch.manual_seed(0)
    return FlowTransformerHead("small", depth=2, horizon=6, action_dim=3, width=32, mlp_dim=48,
                               num_heads=4, num_kv_heads=2, head_dim=8)  # fmt: skip


def _counted(monkeypatch) -> dict[str, int]:
    calls = dict.fromkeys(KERNELS, 0)
    for name in calls:
        original = getattr(block_epilogues_cpu, name)

        def counted(*args, _name=name, _fn=original, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(block_epilogues_cpu, name, counted)
    return calls


def _captured_and_rtc(head: FlowTransformerHead) -> tuple[torch.Tensor, torch.Tensor]:
    """A captured Euler loop's actions and an RTC-guided sample's (the hand VJP's backward)
    from :func:`_head` (in its dtype; the noise and the previous chunk float32)."""
    from ate_fast.realtime import RTCGuidance

    noise = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(2))
    cond = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    cond = cond.to(next(head.parameters()).dtype)
    prev = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(5))
    sampler = FlowSampler(head, 4)
    guidance = RTCGuidance(prev, 2, execution_horizon=3)
    with torch.no_grad():
        captured = sampler.capture(noise, cond)
        return captured(noise, cond), sampler.sample(noise, cond, guidance=guidance)


def test_captured_sampler_takes_the_kernels_and_matches_the_torch_ops(monkeypatch):
    """float32 on the CPU: a captured Euler loop and an RTC-guided sample (the hand VJP's
    backward) run the kernels by default, and give the torch ops' actions to rounding."""
    head = _head()
    calls = _counted(monkeypatch)
    monkeypatch.delenv(ENV, raising=False)
    assert block_epilogues.selected_path("cpu") == "native"
    got = _captured_and_rtc(head)
    assert all(n > 0 for n in calls.values()), calls
    monkeypatch.setenv(ENV, "torch")
    before = dict(calls)
    ref = _captured_and_rtc(head)
    assert calls == before  # forced torch: ATen's ops only
    for r, k in zip(ref, got):
        torch.testing.assert_close(k, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["float64", "autograd"])
def test_other_dtypes_and_autograd_take_the_torch_ops(monkeypatch, case):
    """The kernels take float32 and bfloat16 only and have no backward: float64 heads and a
    forward that autograd records run ATen's ops (and the weights' gradients are formed)."""
    monkeypatch.delenv(ENV, raising=False)
    calls = _counted(monkeypatch)
    head = _head()
    x, t = torch.randn(2, 6, 3), torch.tensor([0.3, 0.8])
    if case == "float64":
        head, x, t = head.double(), x.double(), t.double()
        with torch.no_grad():
            out, pullback = head.forward_with_vjp(x, t)
            pullback(torch.ones_like(out))
    else:
        head(x, t).square().sum().backward()
        assert all(p.grad is not None for p in head.parameters())
    assert calls == dict.fromkeys(KERNELS, 0)


def test_two_threads_give_the_same_bits(monkeypatch):
    """A call of ≥ 2¹⁶ elements splits its rows (tokens) over torch's thread count (one
    thread: the calling thread only); each element's arithmetic is the same either way."""
    gate_up = _gate_up(100, 700, seed=3)
    dm = torch.randn(100, 700, generator=torch.Generator().manual_seed(4))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out, act = block_epilogues_cpu.gated_gelu(gate_up, save_act=True)
            gate, up = gate_up.chunk(2, dim=-1)
            backward = block_epilogues_cpu.gelu_gate_backward(dm, gate, up, act)
            norm = block_epilogues_cpu.rms_norm(dm, dm[0], 1e-6)
            qkv = block_epilogues_cpu.rotate_qkv(*_projections(8, 1, 40, 256), 8, 1)
            norm_vjp = block_epilogues_cpu.rms_norm_vjp(dm, act, dm[0], 1e-6, residual=dm)
            cos, sin = _projections(8, 1, 40, 256)[2:]
            packed = block_epilogues_cpu.unrotate_pack(*qkv, cos, sin)
            softmax = block_epilogues_cpu.softmax_backward(gate_up, dm.repeat(1, 2), 0.125)
            results.append((out, act, backward, norm, *qkv, norm_vjp, *packed, *softmax))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)


@pytest.mark.parametrize("weighted", [True, False], ids=["weight", "no-weight"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (2, 50, 256), (100, 700)])
def test_rms_norm_matches_float64(shape, weighted):
    """Rows of 1, 17 and 700 leave vector tails; 100 × 700 takes the threaded path where
    torch has more than one thread; the input is a column range of a wider tensor (rows
    apart by more than their width)."""
    g = torch.Generator().manual_seed(6)
    wide = 3 * torch.randn(*shape[:-1], shape[-1] + 5, generator=g)
    x = wide[..., 2 : 2 + shape[-1]]
    weight = torch.randn(shape[-1], generator=g) if weighted else None
    out = block_epilogues_cpu.rms_norm(x, weight, 1e-6)
    ref = F.rms_norm(x.double(), (shape[-1],), None if weight is None else weight.double(), 1e-6)
    assert out.shape == x.shape and out.dtype == torch.float32 and out.is_contiguous()
    assert (out.double() - ref).abs().max() <= BOUND * ref.abs().max()
    # as the module rounds in float32 (a different summation order only)
    torch.testing.assert_close(out, F.rms_norm(x, (shape[-1],), weight, 1e-6), rtol=2e-6, atol=2e-6)


def test_rms_norm_of_zero_rows_is_zero_and_eps_counts():
    """An all-zero row stays zero (eps keeps the factor finite); a large eps shrinks."""
    x = torch.zeros(2, 8)
    x[1] = 1.0
    out = block_epilogues_cpu.rms_norm(x, None, 1.0)
    assert torch.equal(out[0], torch.zeros(8))
    torch.testing.assert_close(out[1], torch.full((8,), 2**-0.5))


def _projections(heads: int, kv_heads: int, horizon: int, hd: int, batch: int = 2, seed: int = 7):
    """``(q_lin, kv_lin, cos, sin)``: q_lin a column range of a fused q|kv projection's
    output (rows apart by more than their width), tables longer than the horizon."""
    g = torch.Generator().manual_seed(seed)
    fused = torch.randn(batch, horizon, (heads + 2 * kv_heads) * hd, generator=g)
    q_lin, kv_lin = fused.split([heads * hd, 2 * kv_heads * hd], dim=-1)
    angle = torch.rand(horizon + 9, hd // 2, generator=g) * 40
    cos, sin = rotary_tables(angle, torch.float32)
    return q_lin, kv_lin, cos, sin


def _float64_rotation(q_lin, kv_lin, cos, sin, heads, kv_heads, prefix=None):
    """The torch path's result in float64 (float64 tensors never take the kernel)."""
    as64 = [t.double() for t in (q_lin, kv_lin, cos, sin)]
    prefix = None if prefix is None else tuple(t.double() for t in prefix)
    return block_epilogues.rotate_qkv(*as64, prefix, heads, kv_heads)


@pytest.mark.parametrize("tables", ["shared", "per-sample"])
@pytest.mark.parametrize("heads,kv_heads,hd", [(4, 1, 64), (4, 2, 8), (3, 3, 2), (8, 1, 256)])
def test_rotate_qkv_matches_float64(heads, kv_heads, hd, tables):
    q_lin, kv_lin, cos, sin = _projections(heads, kv_heads, 11, hd)
    if tables == "per-sample":  # a padded prefix: each sample's own positions, [B, 1, N, hd]
        shift = torch.stack([cos, cos.roll(3, dims=0)])[:, None]
        cos, sin = shift, torch.stack([sin, sin.roll(3, dims=0)])[:, None]
    q, k, v = block_epilogues_cpu.rotate_qkv(q_lin, kv_lin, cos, sin, heads, kv_heads)
    ref = _float64_rotation(q_lin, kv_lin, cos, sin, heads, kv_heads)
    for got, want in zip((q, k, v), ref):
        assert got.shape == want.shape and got.is_contiguous()
        assert (got.double() - want).abs().max() <= BOUND * want.abs().max()
    assert torch.equal(v, kv_lin[..., kv_heads * hd :].reshape(2, 11, kv_heads, hd).transpose(1, 2))


def test_rotate_qkv_writes_behind_the_prefix_in_the_buffers():
    """With a call's buffers (a prefix's rows in front), the action rows are written behind
    them, the prefix's rows are left as they were, and the buffers themselves come back."""
    heads, kv_heads, hd, horizon, length = 4, 2, 8, 6, 5
    q_lin, kv_lin, cos, sin = _projections(heads, kv_heads, horizon, hd)
    g = torch.Generator().manual_seed(8)
    prefix = tuple(torch.randn(2, kv_heads, length, hd, generator=g) for _ in range(2))
    slot = block_epilogues.PrefixSlot()
    buffers = slot.get(prefix, horizon)
    q, k, v = block_epilogues_cpu.rotate_qkv(q_lin, kv_lin, cos, sin, heads, kv_heads, buffers)
    assert k is buffers[0] and v is buffers[1]
    assert torch.equal(k[:, :, :length], prefix[0]) and torch.equal(v[:, :, :length], prefix[1])
    ref = _float64_rotation(q_lin, kv_lin, cos, sin, heads, kv_heads, prefix)
    for got, want in zip((q, k, v), ref):
        assert (got.double() - want).abs().max() <= BOUND * want.abs().max()


def test_norm_and_rotation_arguments_are_named():
    x = torch.randn(2, 8)
    with pytest.raises(InvalidArgumentError, match=r"weight: expected \[8\]"):
        block_epilogues_cpu.rms_norm(x, torch.ones(7), 1e-6)
    with pytest.raises(InvalidArgumentError, match="x: expected a float32 or bfloat16 CPU"):
        block_epilogues_cpu.rms_norm(x.double(), None, 1e-6)
    with pytest.raises(InvalidArgumentError, match="eps: expected a number >= 0"):
        block_epilogues_cpu.rms_norm(x, None, -1.0)
    q_lin, kv_lin, cos, sin = _projections(4, 2, 6, 8)
    with pytest.raises(InvalidArgumentError, match="heads, kv_heads"):
        block_epilogues_cpu.rotate_qkv(q_lin, kv_lin, cos, sin, 4, 3)
    with pytest.raises(InvalidArgumentError, match=r"kv_lin: expected \[B, H, 32\]"):
        block_epilogues_cpu.rotate_qkv(q_lin, kv_lin[..., :16], cos, sin, 4, 2)
    with pytest.raises(InvalidArgumentError, match="cos, sin: expected"):
        block_epilogues_cpu.rotate_qkv(q_lin, kv_lin, cos[:5], sin[:5], 4, 2)
    with pytest.raises(InvalidArgumentError, match="out: expected two buffers"):
        buffers = (torch.zeros(2, 2, 9, 8), torch.zeros(2, 2, 9, 4))
        block_epilogues_cpu.rotate_qkv(q_lin, kv_lin, cos, sin, 4, 2, buffers)
    kernel = native.load("_C").rms_norm
    with pytest.raises(ValueError, match="unsupported dtype"):
        kernel(1, 2, 8, 8, x.data_ptr(), 0, x.data_ptr(), 1e-6)
    with pytest.raises(ValueError, match="required pointer is null"):
        kernel(0, 2, 8, 8, 0, 0, x.data_ptr(), 1e-6)


@pytest.mark.parametrize("weighted,residual", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (2, 50, 256), (100, 700)])
def test_rms_norm_vjp_matches_float64(shape, weighted, residual):
    """The norm's input-VJP (with the residual's gradient added, as a block's pullback
    adds it) against the torch ops' formula in float64."""
    from ate_fast.models.flow_transformer_vjp import rms_norm_input_vjp

    g = torch.Generator().manual_seed(9)
    x, grad, res = (3 * torch.randn(*shape, generator=g) for _ in range(3))
    norm = torch.nn.RMSNorm(shape[-1], eps=1e-6)
    if weighted:
        with torch.no_grad():
            norm.weight.copy_(torch.randn(shape[-1], generator=g))
    weight = norm.weight.detach() if weighted else None
    got = block_epilogues_cpu.rms_norm_vjp(grad, x, weight, 1e-6, res if residual else None)
    plain = torch.nn.RMSNorm(shape[-1], eps=1e-6, elementwise_affine=False)
    ref = rms_norm_input_vjp(grad.double(), x.double(), norm.double() if weighted else plain)
    ref = (ref + res.double() if residual else ref).detach()
    assert got.shape == x.shape and got.dtype == torch.float32
    # relative to the terms ρ·gw the result is a difference of (one row of one value: all
    # but cancelled), where float32 rounding lives, and never less than to the result
    rstd = torch.rsqrt(x.double().pow(2).mean(dim=-1, keepdim=True) + 1e-6)
    gw = grad.double() * (weight.double() if weighted else 1.0)
    scale = max(float(ref.abs().max()), float((rstd * gw).abs().max()))
    assert (got.double() - ref).abs().max() <= BOUND * scale


@pytest.mark.parametrize("fused", [False, True], ids=["dq-dkv", "fused-qkv"])
@pytest.mark.parametrize("heads,kv_heads,hd", [(4, 1, 64), (4, 2, 8), (3, 3, 2)])
def test_unrotate_pack_matches_float64_and_undoes_the_rotation(heads, kv_heads, hd, fused):
    """The gradients' layout and the inverse rotation against the torch ops in float64;
    and, being the rotation's transpose (an orthogonal map), it takes the rotated q, k, v
    back to the projections they came from."""
    from ate_fast.models import flow_transformer_vjp as vjp

    q_lin, kv_lin, cos, sin = _projections(heads, kv_heads, 7, hd)
    q, k, v = block_epilogues_cpu.rotate_qkv(q_lin, kv_lin, cos, sin, heads, kv_heads)
    got = block_epilogues_cpu.unrotate_pack(q, k, v, cos, sin, fused=fused)
    as64 = [t.double() for t in (q, k, v, cos, sin)]
    ref = (vjp.unrotate_pack_qkv(*as64),) if fused else vjp.unrotate_pack(*as64)
    for a, b in zip(got, ref):
        assert a.shape == b.shape
        assert (a.double() - b).abs().max() <= BOUND * b.abs().max()
    back = torch.cat([q_lin, kv_lin], dim=-1) if fused else (q_lin, kv_lin)
    for a, b in zip(got, back if not fused else (back,)):
        torch.testing.assert_close(a, b.contiguous(), rtol=1e-5, atol=1e-5)


def test_vjp_kernel_arguments_are_named():
    x = torch.randn(2, 8)
    with pytest.raises(InvalidArgumentError, match=r"grad: expected x's shape"):
        block_epilogues_cpu.rms_norm_vjp(torch.randn(2, 7), x, None, 1e-6)
    with pytest.raises(InvalidArgumentError, match=r"residual: expected x's shape"):
        block_epilogues_cpu.rms_norm_vjp(x, x, None, 1e-6, torch.randn(8))
    q_lin, kv_lin, cos, sin = _projections(4, 2, 6, 8)
    q, k, v = block_epilogues_cpu.rotate_qkv(q_lin, kv_lin, cos, sin, 4, 2)
    with pytest.raises(InvalidArgumentError, match="dq, dk, dv: expected"):
        block_epilogues_cpu.unrotate_pack(q, k, v[:, :1], cos, sin)
    with pytest.raises(InvalidArgumentError, match=r"dq: expected \[2, 2, 6·g, 8\]"):
        block_epilogues_cpu.unrotate_pack(q[:, :, :5], k, v, cos, sin)


def _softmax_reference(scores: torch.Tensor, dp: torch.Tensor, scale: float):
    """float64 ``(p, ds)`` of attention's softmax backward."""
    p = torch.softmax(scores.double() * scale, dim=-1)
    dp = dp.double()
    return p, p * (dp - (dp * p).sum(dim=-1, keepdim=True)) * scale


@pytest.mark.parametrize("layout", ["contiguous", "aligned-rows", "strided-inputs"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (1, 1, 200, 50), (2, 1, 40, 866)])
def test_softmax_backward_matches_float64(shape, layout):
    """p = softmax(scores·scale) and ds = p ⊙ (dp − Σ dp ⊙ p)·scale in one pass per row,
    against float64; masked keys (−inf) get probability exactly 0; outputs into rows of
    any stride (the 16-byte-aligned buffers the VJP's GEMMs read), inputs from any."""
    from ate_fast.models.gemm_alignment import aligned_rows

    g = torch.Generator().manual_seed(7)
    n = shape[-1]
    wide = 6 * torch.randn(*shape[:-1], n + 5, generator=g)
    scores = wide[..., 2 : 2 + n] if layout == "strided-inputs" else wide[..., :n].contiguous()
    dp = torch.randn(*shape, generator=g)
    if n > 2:  # the first rows' last keys masked, as a padded prefix's bias makes them
        scores[..., :3, -2:] = float("-inf")
    outs = {}
    if layout == "aligned-rows":
        outs = {"p_out": aligned_rows(shape, scores), "ds_out": aligned_rows(shape, scores)}
    p, ds = block_epilogues_cpu.softmax_backward(scores, dp, 0.125, **outs)
    want_p, want_ds = _softmax_reference(scores, dp, 0.125)
    for got, want in ((p, want_p), (ds, want_ds)):
        assert (got.double() - want).abs().max() <= BOUND * want.abs().max()
    if n > 2:
        assert torch.all(p[..., :3, -2:] == 0) and torch.all(ds[..., :3, -2:] == 0)
    if outs:
        assert p.data_ptr() == outs["p_out"].data_ptr() and ds is outs["ds_out"]
    # from the probabilities the forward kept: the same ds, p only read
    kept = p.clone()
    again = block_epilogues_cpu.softmax_grad(p, dp, 0.125)
    assert torch.equal(p, kept)
    assert (again.double() - want_ds).abs().max() <= BOUND * want_ds.abs().max()


def test_the_vjp_softmax_takes_the_kernel_on_the_native_path(monkeypatch):
    """flow_transformer_vjp.softmax_backward / softmax_grad: the kernel on the CPU's native
    path (into aligned rows), ATen's ops where forced to torch; the same values to
    rounding."""
    from ate_fast.models import flow_transformer_vjp as vjp
    from ate_fast.models.gemm_alignment import rows_aligned

    calls = _counted(monkeypatch)
    scores, dp = torch.randn(1, 1, 200, 50), torch.randn(1, 1, 200, 50)
    monkeypatch.delenv(ENV, raising=False)
    with torch.no_grad():
        p, ds = vjp.softmax_backward(scores, dp, 0.125)
        ds_kept = vjp.softmax_grad(p, dp, 0.125)
    assert calls["softmax_backward"] == 1 and rows_aligned(p) and rows_aligned(ds)
    monkeypatch.setenv(ENV, "torch")
    with torch.no_grad():
        ref_p, ref_ds = vjp.softmax_backward(scores, dp, 0.125)
    assert calls["softmax_backward"] == 1
    torch.testing.assert_close(p, ref_p, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ds, ref_ds, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ds_kept, ref_ds, rtol=1e-6, atol=1e-7)


def test_softmax_arguments_are_named():
    scores, dp = torch.randn(4, 10), torch.randn(4, 10)
    with pytest.raises(InvalidArgumentError, match=r"scores: expected shape \(4, 10\)"):
        block_epilogues_cpu.softmax_backward(scores[:, :9], dp, 0.5)
    with pytest.raises(InvalidArgumentError, match="dp: expected a float32 or bfloat16 CPU"):
        block_epilogues_cpu.softmax_backward(scores, dp.double(), 0.5)
    with pytest.raises(InvalidArgumentError, match="scale: expected a finite number"):
        block_epilogues_cpu.softmax_backward(scores, dp, float("nan"))
    with pytest.raises(InvalidArgumentError, match="ds_out: expected rows one stride apart"):
        block_epilogues_cpu.softmax_backward(scores, dp, 0.5, ds_out=torch.empty(10, 4).t())
    with pytest.raises(InvalidArgumentError, match=r"p: expected shape \(4, 10\)"):
        block_epilogues_cpu.softmax_grad(torch.rand(4, 9), dp, 0.5)


# -- bfloat16: every kernel (rows widened to float32, each output rounded once) -------------
BF16 = torch.bfloat16
# one rounding to bfloat16 (8 significant bits): at most 2⁻⁸ of the value's magnitude
BF16_ROUNDING = 2.0**-8


def _rounded_once(got: torch.Tensor, want: torch.Tensor) -> None:
    """``got`` (bf16) is ``want`` (float64, from the same bf16 inputs) rounded once: within
    one bf16 rounding of each value, plus the float32 arithmetic's error."""
    assert got.dtype == BF16 and got.shape == want.shape
    err = (got.double() - want).abs()
    assert (err <= BF16_ROUNDING * want.abs() + BOUND * want.abs().max()).all(), err.max()


@pytest.mark.parametrize("save_act", [True, False], ids=["act", "no-act"])
@pytest.mark.parametrize("rows,width", [(1, 1), (3, 17), (2, 700), (50, 1024)])
def test_bf16_gated_gelu_is_the_float32_kernel_rounded_once(rows, width, save_act):
    """A bf16 row goes through the float32 kernel in chunks of 256 widened values (700: a
    partial last chunk): the same bits as the float32 kernel on the widened input, rounded
    once, and so within one bf16 rounding of float64 (ATen rounds gelu(gate) first)."""
    gate_up = _gate_up(rows, width).to(BF16)
    out, act = block_epilogues_cpu.gated_gelu(gate_up, save_act=save_act)
    out32, act32 = block_epilogues_cpu.gated_gelu(gate_up.float(), save_act=True)
    assert torch.equal(out, out32.to(BF16))
    assert act is None if not save_act else torch.equal(act, act32.to(BF16))
    gate, up = gate_up.double().chunk(2, dim=-1)
    _rounded_once(out, F.gelu(gate, approximate="tanh") * up)


@pytest.mark.parametrize("weighted", [True, False], ids=["weight", "no-weight"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (2, 50, 256), (4, 700)])
def test_bf16_rms_norm_matches_float64(shape, weighted):
    g = torch.Generator().manual_seed(11)
    x = (3 * torch.randn(shape, generator=g)).to(BF16)
    weight = torch.randn(shape[-1], generator=g).to(BF16) if weighted else None
    out = block_epilogues_cpu.rms_norm(x, weight, 1e-6)
    w64 = None if weight is None else weight.double()
    _rounded_once(out, F.rms_norm(x.double(), (shape[-1],), w64, 1e-6))


@pytest.mark.parametrize("heads,kv_heads,hd", [(4, 1, 64), (4, 2, 8), (8, 1, 256), (2, 1, 300)])
def test_bf16_rotate_qkv_is_the_float32_kernel_rounded_once(heads, kv_heads, hd):
    """hd = 300: the pairs (i, 150 + i) in two chunks of at most 128."""
    q_lin, kv_lin, cos, sin = (t.to(BF16) for t in _projections(heads, kv_heads, 11, hd))
    got = block_epilogues_cpu.rotate_qkv(q_lin, kv_lin, cos, sin, heads, kv_heads)
    wide = block_epilogues_cpu.rotate_qkv(
        q_lin.float(), kv_lin.float(), cos.float(), sin.float(), heads, kv_heads
    )
    ref = _float64_rotation(q_lin, kv_lin, cos, sin, heads, kv_heads)
    for one, f32, want in zip(got, wide, ref):
        assert one.is_contiguous() and torch.equal(one, f32.to(BF16))
        _rounded_once(one, want)


def test_bf16_arguments_are_one_dtype():
    x = torch.randn(2, 8, dtype=BF16)
    with pytest.raises(InvalidArgumentError, match="weight: expected a bfloat16 CPU tensor"):
        block_epilogues_cpu.rms_norm(x, torch.ones(8), 1e-6)
    q_lin, kv_lin, cos, sin = (t.to(BF16) for t in _projections(4, 2, 6, 8))
    with pytest.raises(InvalidArgumentError, match="cos: expected a bfloat16 CPU tensor"):
        block_epilogues_cpu.rotate_qkv(q_lin, kv_lin, cos.float(), sin, 4, 2)
    with pytest.raises(InvalidArgumentError, match="gate_up: expected a float32 or bfloat16"):
        block_epilogues_cpu.gated_gelu(torch.randn(2, 8, dtype=torch.float16))
    with pytest.raises(InvalidArgumentError, match="act: expected a bfloat16 CPU tensor"):
        block_epilogues_cpu.gelu_gate_backward(x, x, x, x.float())
    with pytest.raises(InvalidArgumentError, match="p: expected a bfloat16 CPU tensor"):
        block_epilogues_cpu.softmax_grad(x.float(), x, 0.5)
    # the path: every tensor in one dtype the kernels take, else ATen's ops
    assert block_epilogues.kernel_path(x) == "native"
    assert block_epilogues.kernel_path(x, x.float()) == "torch"
    assert block_epilogues.kernel_path(x.half()) == "torch"


def test_bf16_head_takes_the_kernels_and_matches_the_torch_ops(monkeypatch):
    """A bf16 head on the CPU: a captured Euler loop and an RTC-guided sample (the hand
    VJP's backward) run every kernel by default and give the torch path's actions within
    bf16's rounding."""
    head = _head().to(BF16)
    calls = _counted(monkeypatch)
    monkeypatch.delenv(ENV, raising=False)
    got = _captured_and_rtc(head)
    assert all(n > 0 for n in calls.values()), calls
    monkeypatch.setenv(ENV, "torch")
    ref = _captured_and_rtc(head)
    for r, k in zip(ref, got):
        assert k.dtype == torch.float32
        assert float((k - r).norm() / r.norm()) <= 1e-2  # test_mixed_precision_heads' SAMPLED


def test_bf16_vjp_kernels_are_the_float32_kernels_rounded_once():
    """The GELU's backward, the rotation's undoing and the softmax backward (both modes) in
    bf16: the float32 kernels' bits on the widened inputs, rounded once — widths past one
    256-value chunk (700) and a head dim of 300 (pairs in two chunks)."""
    g = torch.Generator().manual_seed(12)
    dm, gate, up, act = (torch.randn(3, 700, generator=g).to(BF16) for _ in range(4))
    got = block_epilogues_cpu.gelu_gate_backward(dm, gate, up, act)
    wide = block_epilogues_cpu.gelu_gate_backward(dm.float(), gate.float(), up.float(), act.float())
    assert got.dtype == BF16 and torch.equal(got, wide.to(BF16))
    for heads, kv_heads, hd, fused in ((4, 2, 8, False), (2, 1, 300, True)):
        q_lin, kv_lin, cos, sin = (t.to(BF16) for t in _projections(heads, kv_heads, 5, hd))
        q, k, v = block_epilogues_cpu.rotate_qkv(q_lin, kv_lin, cos, sin, heads, kv_heads)
        got = block_epilogues_cpu.unrotate_pack(q, k, v, cos, sin, fused=fused)
        wide = block_epilogues_cpu.unrotate_pack(*(t.float() for t in (q, k, v, cos, sin)),
                                                 fused=fused)  # fmt: skip
        for a, b in zip(got, wide):
            assert a.dtype == BF16 and torch.equal(a, b.to(BF16))
    scores = (6 * torch.randn(2, 1, 40, 866, generator=g)).to(BF16)
    scores[..., :3, -2:] = float("-inf")
    dp = torch.randn(2, 1, 40, 866, generator=g).to(BF16)
    p, ds = block_epilogues_cpu.softmax_backward(scores, dp, 0.125)
    p32, ds32 = block_epilogues_cpu.softmax_backward(scores.float(), dp.float(), 0.125)
    assert torch.equal(p, p32.to(BF16)) and torch.equal(ds, ds32.to(BF16))
    assert torch.all(p[..., :3, -2:] == 0)
    kept = p.clone()
    again = block_epilogues_cpu.softmax_grad(p, dp, 0.125)
    assert torch.equal(p, kept)
    assert torch.equal(
        again, block_epilogues_cpu.softmax_grad(p.float(), dp.float(), 0.125).to(BF16)
    )
    p64, dp64 = p.double(), dp.double()
    _rounded_once(again, p64 * (dp64 - (dp64 * p64).sum(dim=-1, keepdim=True)) * 0.125)


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("weighted", [True, False], ids=["weight", "no-weight"])
def test_bf16_rms_norm_vjp_matches_float64(weighted, residual):
    """The norm's input-VJP in bf16 (rows of 700: three chunks, the sums over all of them
    first) within one bf16 rounding of float64 — of the result, and of the terms ρ·gw it is a
    difference of (as the float32 test bounds it)."""
    from ate_fast.models.flow_transformer_vjp import rms_norm_input_vjp

    g = torch.Generator().manual_seed(13)
    x, grad, res = ((3 * torch.randn(4, 700, generator=g)).to(BF16) for _ in range(3))
    weight = torch.randn(700, generator=g).to(BF16) if weighted else None
    got = block_epilogues_cpu.rms_norm_vjp(grad, x, weight, 1e-6, res if residual else None)
    norm = torch.nn.RMSNorm(700, eps=1e-6, elementwise_affine=weighted).double()
    if weighted:
        with torch.no_grad():
            norm.weight.copy_(weight.double())
    ref = rms_norm_input_vjp(grad.double(), x.double(), norm)
    ref = (ref + res.double() if residual else ref).detach()
    assert got.dtype == BF16 and got.shape == x.shape
    rstd = torch.rsqrt(x.double().pow(2).mean(dim=-1, keepdim=True) + 1e-6)
    terms = (rstd * grad.double() * (weight.double() if weighted else 1.0)).abs()
    err = (got.double() - ref).abs()
    assert (err <= BF16_ROUNDING * ref.abs() + BOUND * terms.max() * 4).all(), err.max()
