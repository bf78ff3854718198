"""Score-sized matrices with 16-byte-aligned rows (``ate_fast.models.gemm_alignment``): the
buffers themselves, and every GEMM of the flow transformer's attention input-VJP reading or
writing one, on both epilogue paths — and, on a GPU, that cuBLAS then takes none of its
``…_align2`` kernels for them (what it took at π0's 866 keys on an H200)."""

from __future__ import annotations

import pytest
import torch
from flow_head_paths import pi0_on_cuda  # tests/ is on sys.path
from torch.utils._python_dispatch import TorchDispatchMode

from ate_fast.models import FlowTransformerHead, block_epilogues
from ate_fast.models.gemm_alignment import aligned_rows, padded_length, rows_aligned
from ate_fast.ops.backends import MIN_TRITON

GEMMS = ("mm", "bmm", "addmm", "baddbmm", "addmm_", "baddbmm_")
HORIZON, PREFIX = 6, 16  # N = 22 keys: no whole number of 16-byte rows in any dtype but float64


@pytest.mark.parametrize(
    "dtype,n,padded",
    [(torch.bfloat16, 866, 872), (torch.float32, 866, 868), (torch.float64, 866, 866),
     (torch.bfloat16, 816, 816), (torch.float64, 22, 22), (torch.float32, 1, 4)],
)  # fmt: skip
def test_buffers_pad_rows_to_sixteen_bytes(dtype, n, padded):
    like = torch.zeros(1, dtype=dtype)
    assert padded_length(n, like.element_size()) == padded
    t = aligned_rows((2, 3, 5, n), like)
    assert t.shape == (2, 3, 5, n) and t.dtype == dtype
    assert t.stride() == (3 * 5 * padded, 5 * padded, padded, 1)
    assert t.is_contiguous() == (padded == n)
    assert rows_aligned(t)
    rows = t.view(-1, n)  # one stride for every row: kernels read it as [R, n]
    assert rows.stride() == (padded, 1) and rows.data_ptr() == t.data_ptr()


def test_rows_aligned_tells_apart():
    assert not rows_aligned(torch.zeros(4, 866, dtype=torch.bfloat16))
    assert rows_aligned(torch.zeros(4, 872, dtype=torch.bfloat16))
    assert not rows_aligned(torch.zeros(4, 872, dtype=torch.bfloat16)[:, 1:])  # start moved
    assert not rows_aligned(torch.zeros(872, 4, dtype=torch.bfloat16).t())  # column-major


def _leading_dim_aligned(t: torch.Tensor) -> bool:
    """A GEMM operand [.., r, c] (row- or column-major): its leading dimension, its batch
    stride and its start on 16-byte boundaries."""
    size, (s0, s1) = t.element_size(), t.stride()[-2:]
    if 1 in t.shape[-2:]:  # one row or column: no second one to address, any leading dim
        s0, s1 = 16 // size, 1
    ld = s0 if s1 == 1 or t.shape[-1] == 1 else s1 if s0 == 1 or t.shape[-2] == 1 else None
    batch_ok = t.dim() < 3 or t.shape[-3] == 1 or (t.stride(-3) * size) % 16 == 0
    return ld is not None and (ld * size) % 16 == 0 and batch_ok and t.data_ptr() % 16 == 0


def _score_sized(t: torch.Tensor, length: int) -> bool:
    """``length`` keys wide, or a slice of rows of ``length`` keys (padded or not)."""
    widths = {length, padded_length(length, t.element_size())}
    return bool(widths & {*t.shape[-2:], *t.stride()[-2:]})


class _Recorder(TorchDispatchMode):
    """Every GEMM's tensors (inputs, ``out=`` and result), and every copy, of the ops
    run inside."""

    def __init__(self) -> None:
        super().__init__()
        self.gemms: list[list[torch.Tensor]] = []
        self.copies: list[tuple[str, list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        out = func(*args, **kwargs)
        if name in GEMMS:
            self.gemms.append([*tensors, out])
        elif name in ("clone", "copy_", "contiguous"):
            self.copies.append((name, [tuple(t.shape) for t in tensors]))
        return out


@pytest.mark.parametrize("epilogues", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attention_vjp_gemms_read_and_write_aligned_rows(monkeypatch, epilogues, dtype):
    """The input-VJP of a head with N = 22 keys: its five score-sized GEMMs per block
    (dp, scores, dq, dk, dv) all on 16-byte-aligned rows, none of their operands copied,
    and the gradient the autograd one."""
    if epilogues == "triton":
        pytest.importorskip("triton", minversion=MIN_TRITON)
    monkeypatch.setenv(block_epilogues.ENV_VAR, epilogues)
    torch.manual_seed(0)
    depth, length = 2, PREFIX + HORIZON
    head = FlowTransformerHead("small", depth=depth, horizon=HORIZON, action_dim=3, width=32,
                               mlp_dim=48, num_heads=4, num_kv_heads=1, head_dim=8)  # fmt: skip
    head = head.to(dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, HORIZON, 3, generator=gen).to(dtype)
    t = torch.tensor([0.3, 0.7]).to(dtype)
    cond = torch.randn(2, PREFIX, 32, generator=gen).to(dtype)
    u = torch.randn(x.shape, generator=gen).to(dtype)
    with torch.no_grad():
        _, pullback = head.forward_with_vjp(x, t, cond)
        recorder = _Recorder()
        with recorder:
            g = pullback(u)
    scored = [ts for ts in recorder.gemms if any(_score_sized(t, length) for t in ts)]
    assert len(scored) == 5 * depth
    for tensors in scored:
        shapes = [(tuple(t.shape), t.stride()) for t in tensors]
        assert all(_leading_dim_aligned(t) for t in tensors), shapes
    # no score-sized copy (Triton's interpreter copies whole storages back after a launch)
    copied = [(name, shapes) for name, shapes in recorder.copies
              if any(length in shape for shape in shapes)]  # fmt: skip
    assert not copied, copied

    leaf = x.double().requires_grad_(True)
    ref = head.double()
    with torch.enable_grad():
        (want,) = torch.autograd.grad(ref(leaf, t.double(), cond.double()), leaf, u.double())
    bound = 3e-2 if dtype == torch.bfloat16 else 1e-5
    assert (g.double() - want).abs().max() <= bound * want.abs().max()


def test_softmax_kernel_reads_aligned_rows_in_place():
    """The Triton softmax backward takes score-sized rows of one stride as they are (no
    copy to contiguous) and writes aligned rows; other layouts are copied first."""
    bet = pytest.importorskip("ate_fast.models.block_epilogues_triton")
    padded = aligned_rows((2, 1, 24, 22), torch.zeros(1))
    rows = bet._as_rows(padded)
    assert rows.data_ptr() == padded.data_ptr() and rows.stride() == (24, 1)
    strided = torch.zeros(2, 22, 24).transpose(1, 2)  # column-major rows: copied
    assert bet._as_rows(strided).is_contiguous()


def test_padded_prompt_mask_is_added_in_place():
    """A padded prefix's mask is added into the aligned scores (no second score-sized
    tensor), with torch's result dtype kept: equal to the out-of-place sum."""
    from ate_fast.models.flow_transformer_vjp import score_products

    gen = torch.Generator().manual_seed(2)
    q, dog = (torch.randn(2, 1, 12, 8, generator=gen) for _ in range(2))
    k, v = (torch.randn(2, 1, 22, 8, generator=gen) for _ in range(2))
    bias = torch.zeros(2, 1, 1, 22)
    bias[1, ..., :3] = float("-inf")
    with torch.no_grad():
        dp, scores = score_products(dog, q, k, v, bias)
    assert rows_aligned(dp) and rows_aligned(scores) and not scores.is_contiguous()
    torch.testing.assert_close(scores, q @ k.transpose(-1, -2) + bias, rtol=0, atol=1e-6)
    torch.testing.assert_close(dp, dog @ v.transpose(-1, -2), rtol=0, atol=1e-6)
    wide = bias.double()  # a float64 mask promotes: out of place, as torch would
    with torch.no_grad():
        assert score_products(dog, q, k, v, wide)[1].dtype == torch.float64
    with torch.enable_grad():  # autograd records: plain products
        dp, scores = score_products(dog.requires_grad_(True), q, k, v, bias)
    assert scores.is_contiguous() and dp.is_contiguous() and dp.requires_grad


@pytest.mark.cuda
def test_pi0_attention_vjp_takes_no_unaligned_gemm_kernel():
    """π0's block (8 query heads on one key/value head of 256, 816 prefix tokens + 50:
    866 keys) in bf16 on the GPU: the pullback's kernels include no cuBLAS / CUTLASS kernel
    for fewer than 16 bytes per load (``…_align1``, ``…_align2``, ``…_align4``: what an
    H200 ran five times per block before, ≈ 7 µs each)."""
    head, cache, x, t, u = pi0_on_cuda(1)
    with torch.no_grad():
        _, pullback = head.forward_with_vjp(x, t, cache)
        pullback(u)  # warm-up: cuBLAS's heuristics, Triton's compiles
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            pullback(u)
            torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert names, "the profiler recorded no kernel"
    unaligned = sorted({n for n in names if any(f"_align{a}" in n for a in (1, 2, 4))})
    assert not unaligned, unaligned


def test_autocast_keeps_the_plain_products():
    """Under autocast an ``out=`` product would run in the buffer's dtype, not autocast's:
    the plain products run there (autocast's bf16), as before."""
    from ate_fast.models.flow_transformer_vjp import score_products

    gen = torch.Generator().manual_seed(3)
    q, dog = (torch.randn(1, 1, 8, 8, generator=gen) for _ in range(2))
    k, v = (torch.randn(1, 1, 22, 8, generator=gen) for _ in range(2))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        dp, scores = score_products(dog, q, k, v)
    assert dp.dtype == scores.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("latent", ["mean", "sample"])
def test_encoder_vjp_gemms_read_and_write_aligned_rows(monkeypatch, dtype, latent):
    """The hand-written VJP through the paper's Transformer encoder (the ``vjp`` path: B ≥
    2 on CUDA past the half-precision batch limit, and the CPU) at T = H + 2 = 7 tokens, 14
    bytes per bf16 row as the paper's 52 tokens give 104: every GEMM that reads or writes
    a score-sized matrix [B, heads, Tq, T] (q·kᵀ, p·v, do·vᵀ, ds·k, dsᵀ·q, pᵀ·do per layer)
    does so on 16-byte-aligned rows, and the gradient is bitwise the one of the plain
    products (the buffers switched off)."""
    from ate_fast.align import ActionVAE
    from ate_fast.steer import transformer_vjp

    torch.manual_seed(0)
    horizon, layers = 5, 3
    # no other size equal to T = 7 or its padded 8 (a GEMM of it would count as score-sized)
    vae = ActionVAE(3, horizon, latent_dim=12, arch="transformer", d_model=64, num_heads=4,
                    ff_dim=40, num_layers=layers).to(dtype)  # fmt: skip
    vae.eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, horizon, 3, generator=gen).to(dtype)
    target = torch.randn(3, 12, generator=gen).to(dtype)
    eps = torch.randn(3, 12, generator=gen).to(dtype) if latent == "sample" else None

    def grad() -> torch.Tensor:
        with torch.no_grad():
            return transformer_vjp.transformer_latent_gradient(vae.encoder, x, target, eps=eps)

    recorder = _Recorder()
    with recorder:
        got = grad()
    tokens = horizon + 2
    scored = [ts for ts in recorder.gemms if any(_score_sized(t, tokens) for t in ts)]
    assert len(scored) == 6 * layers  # the last layer's on its 1 or 2 query rows
    for tensors in scored:  # float32's 28-byte rows are padded too
        shapes = [(tuple(t.shape), t.stride()) for t in tensors]
        assert all(_leading_dim_aligned(t) for t in tensors), shapes
    monkeypatch.setattr(transformer_vjp, "_score_buffer", lambda like, shape=None: None)
    plain = grad()
    assert got.abs().max() > 0 and torch.equal(got, plain)


@pytest.mark.cuda
def test_paper_encoder_vjp_takes_no_unaligned_gemm_kernel():
    """The paper's Transformer encoder (9 layers, d_model 512, H = 50: 52 tokens) in bf16
    at B = 16 (the torch VJP's batches) on the GPU: its gradient's kernels include no
    cuBLAS / CUTLASS kernel for fewer than 16 bytes per load (104-byte rows before)."""
    from ate_fast.align import ActionVAE
    from ate_fast.steer.transformer_vjp import transformer_latent_gradient

    torch.manual_seed(0)
    vae = ActionVAE(32, 50, latent_dim=128, arch="transformer").to("cuda", torch.bfloat16)
    vae.eval()
    x = torch.randn(16, 50, 32, device="cuda", dtype=torch.bfloat16)
    target = torch.randn(16, 128, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        transformer_latent_gradient(vae.encoder, x, target)  # warm-up: cuBLAS's heuristics
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            g = transformer_latent_gradient(vae.encoder, x, target)
            torch.cuda.synchronize()
    assert torch.isfinite(g).all() and g.abs().max() > 0
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert names, "the profiler recorded no kernel"
    unaligned = sorted({n for n in names if any(f"_align{a}" in n for a in (1, 2, 4))})
    assert not unaligned, unaligned
