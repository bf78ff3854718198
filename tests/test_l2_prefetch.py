"""The MLP weights' L2 prefetch (``ATE_FAST_L2_PREFETCH=mlp``,
``ate_fast.models.l2_prefetch``): its kernel reads every word (through Triton's interpreter
on the CPU), the setting, where it stands aside, and on a GPU that a captured π0 sampler
gives the same actions bit for bit with it, the prefetch running in every block."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flow_head_paths import pi0_on_cuda  # tests/ is on sys.path

from ate_fast.errors import InvalidArgumentError
from ate_fast.models import FlowTransformerHead, l2_prefetch
from ate_fast.sampling import FlowSampler


def _xors(t: torch.Tensor, block: int) -> torch.Tensor:
    """The XOR of each ``block`` of ``t``'s 32-bit words."""
    words = t.reshape(-1).view(torch.int32)
    pad = -words.numel() % block
    rows = torch.cat([words, words.new_zeros(pad)]).view(-1, block)
    return torch.from_numpy(np.bitwise_xor.reduce(rows.numpy(), axis=1))


def test_kernel_reads_every_word():
    """Two weights (bf16 of an odd number of words per block, float32): the sink holds
    each program's XOR of its words, tensor after tensor — every word was read."""
    kernels = pytest.importorskip("ate_fast.models.l2_prefetch_triton")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(70, 130, generator=g).to(torch.bfloat16)  # 4550 words: 2 programs
    b = torch.randn(33, 64, generator=g)  # 2112 words: 1 program
    sink = torch.full((kernels.sink_size([a, b]),), 7, dtype=torch.int32)
    assert sink.numel() == 3
    kernels.prefetch([a, b], sink)
    want = torch.cat([_xors(a, kernels.BLOCK), _xors(b, kernels.BLOCK)])
    assert torch.equal(sink, want)


def test_prefetches_only_what_fits_half_the_l2(monkeypatch):
    """π0's MLP weights (25 MB in bf16) fit half an H100's / H200's 50 MB L2, not a Jetson
    AGX Orin's 4 MB; an unreported size does not refuse."""
    weights = [torch.empty(8192, 1024, dtype=torch.bfloat16), torch.empty(1024, 4096,
               dtype=torch.bfloat16)]  # fmt: skip
    for l2, fits in ((50 * 2**20, True), (4 * 2**20, False), (None, True)):
        monkeypatch.setattr(l2_prefetch, "l2_bytes", lambda device, l2=l2: l2)
        assert l2_prefetch.fits_l2(weights) == fits


def test_setting_is_checked(monkeypatch):
    monkeypatch.delenv(l2_prefetch.ENV_VAR, raising=False)
    assert l2_prefetch.selected_path() == "off"
    monkeypatch.setenv(l2_prefetch.ENV_VAR, "MLP")
    assert l2_prefetch.selected_path() == "mlp"
    monkeypatch.setenv(l2_prefetch.ENV_VAR, "all")
    assert l2_prefetch.selected_path() == "all"
    monkeypatch.setenv(l2_prefetch.ENV_VAR, "every")
    with pytest.raises(InvalidArgumentError, match="ATE_FAST_L2_PREFETCH: expected one of"):
        l2_prefetch.selected_path()


def test_stands_aside_off_cuda_and_by_default(monkeypatch):
    """Nothing starts on CPU tensors (selected or not) or where unset; the head's output is
    unchanged with the setting on the CPU; a CPU weight is refused."""
    w = [torch.randn(8, 8)]
    monkeypatch.delenv(l2_prefetch.ENV_VAR, raising=False)
    assert l2_prefetch.start(w) is None
    monkeypatch.setenv(l2_prefetch.ENV_VAR, "all")
    assert l2_prefetch.start(w) is None and l2_prefetch.start(w, site="ahead") is None
    l2_prefetch.join(None)  # nothing to wait for
    assert not l2_prefetch.prefetchable(torch.randn(8, 8))  # not CUDA
    head = FlowTransformerHead("small", depth=2, horizon=6, action_dim=3, width=32, mlp_dim=48,
                               num_heads=4, num_kv_heads=1, head_dim=8)  # fmt: skip
    x, t = torch.randn(2, 6, 3), torch.tensor([0.2, 0.6])
    with torch.no_grad():
        on = head(x, t)
        monkeypatch.setenv(l2_prefetch.ENV_VAR, "off")
        assert torch.equal(head(x, t), on)


@pytest.mark.cuda
def test_captured_pi0_sampler_is_unchanged_and_prefetches(monkeypatch):
    """π0's head (2 blocks, bf16, 816-token prefix): the captured Euler loop with each
    prefetch path equals it without, bit for bit; ``mlp`` ran the kernel twice (W_gate_up,
    W_down) per block and step, ``all`` twice more per step ([W_q; W_kv] and W_o of the
    second block, during the first); refused for a strided weight."""
    torch.manual_seed(0)
    head = FlowTransformerHead("pi0-expert", depth=2).to("cuda", torch.bfloat16)
    cache = head.prefix_cache(torch.randn(1, 816, 1024, device="cuda", dtype=torch.bfloat16))
    noise = torch.randn(1, 50, 32, device="cuda")

    def run():
        with torch.no_grad():
            captured = FlowSampler(head, 10).capture(noise, cache)
            out = captured(noise, cache)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p:
                again = captured(noise, cache)
                torch.cuda.synchronize()
        assert torch.equal(again, out)
        names = [e.name for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        return out, sum("_prefetch_kernel" in n for n in names)

    monkeypatch.setenv(l2_prefetch.ENV_VAR, "off")
    want, none = run()
    monkeypatch.setenv(l2_prefetch.ENV_VAR, "mlp")
    got, launches = run()
    assert none == 0 and launches == 2 * 2 * 10
    assert torch.equal(got, want)
    monkeypatch.setenv(l2_prefetch.ENV_VAR, "all")
    got, launches = run()
    assert launches == 2 * 2 * 10 + 2 * 10
    assert torch.equal(got, want)
    strided = torch.randn(64, 64, device="cuda").t()
    assert not l2_prefetch.prefetchable(strided)


@pytest.mark.cuda
def test_pi0_pullback_is_unchanged_and_prefetches(monkeypatch):
    """π0's head (3 blocks, bf16, 816-token prefix): forward_with_vjp and its pullback (RTC's
    guidance through the head) equal them without the prefetch, bit for bit; ``mlp`` ran the
    kernel twice per block in the forward and twice per block after the first in the
    pullback (the next block's W_down and W_gate_up during this one's attention VJP)."""
    head, cache, x, t, u = pi0_on_cuda(3)

    def run():
        with (
            torch.no_grad(),
            torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof,
        ):
            out, pullback = head.forward_with_vjp(x, t, cache)
            g = pullback(u)
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        return out, g, sum("_prefetch_kernel" in n for n in names)

    monkeypatch.setenv(l2_prefetch.ENV_VAR, "off")
    want_out, want_g, none = run()
    monkeypatch.setenv(l2_prefetch.ENV_VAR, "mlp")
    run()  # warm-up: Triton compiles the kernel
    out, g, launches = run()
    assert none == 0 and launches == 2 * 3 + 2 * 2
    assert torch.equal(out, want_out) and torch.equal(g, want_g)
