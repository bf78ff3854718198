"""sampler.capture(): the replayed loop gives exactly what sample() gives.

CPU: the first call is validated and recorded, later calls replay the recorded fused
steps straight into the C++ kernel; results must be bit-identical to ``sample()``,
including how the generator is consumed. CUDA (marked ``cuda``): a CUDA graph.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import weakref
from unittest import mock

import pytest
import torch
from torch import nn

from ate_fast import native
from ate_fast.sampling import CapturedSampler, DiffusionSampler, FlowSampler, NoiseSchedule
from ate_fast.sampling import capture as capture_module
from ate_fast.sampling.inputs import static_copy
from ate_fast.sampling.launch import Launch
from ate_fast.sampling.workspace import StepBuffers

B, H, D, C = 2, 12, 5, 7


class MLPHead(nn.Module):
    """A small conditional policy head: x [B, H, D], t [B], cond [B, C] -> [B, H, D]."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(D + 1 + C, 32)
        self.out = nn.Linear(32, D)

    def forward(self, x, t, cond):
        t = t.to(x.dtype).view(-1, 1, 1).expand(-1, x.shape[1], 1) / 100.0
        c = cond.to(x.dtype)[:, None, :].expand(-1, x.shape[1], -1)
        return self.out(torch.tanh(self.inp(torch.cat([x, t, c], dim=-1))))


class MLPGuidance:
    """Latent guidance through a small MLP encoder, by autograd."""

    def __init__(self, mode: str = "direct", scale: float = 1.5, clamp: float = 0.05):
        gen = torch.Generator().manual_seed(5)
        self.w = torch.randn(H * D, 6, generator=gen) / (H * D) ** 0.5
        self.target = torch.randn(6, generator=gen)
        self.scale, self.clamp, self.mode = scale, clamp, mode

    def to(self, device):
        self.w, self.target = self.w.to(device), self.target.to(device)
        return self

    def gradient(self, x, x0_hat, dx0_dx):
        u = (x if self.mode == "direct" else x0_hat).detach().requires_grad_(True)
        z = torch.tanh(u.reshape(u.shape[0], -1).float() @ self.w)
        y = -((z - self.target) ** 2).mean(dim=1)
        (g,) = torch.autograd.grad(y.sum(), u)
        if self.mode == "tweedie":
            g = g * dx0_dx.view(-1, 1, 1)
        return g.to(x.dtype)


def samplers(model):
    cos = NoiseSchedule("squaredcos_cap_v2", num_train_timesteps=100)
    lin = NoiseSchedule()
    return {
        "flow-euler": FlowSampler(model, 6),
        "flow-heun": FlowSampler(model, 4, method="heun", time_grid="diffusers", shift=2.0),
        "ddpm": DiffusionSampler(model, cos, "ddpm", 8, timestep_spacing="trailing"),
        "ddpm-clip": DiffusionSampler(model, lin, "ddpm", 5, clip_sample=True),
        "ddim-eta": DiffusionSampler(
            model, lin, "ddim", 6, eta=0.7, prediction_type="v_prediction"
        ),
        # cosine from t = N-1: the split (cancellation-safe) update path
        "ddim-split": DiffusionSampler(
            model, cos, "ddim", 5, timestep_spacing="trailing", clip_sample=True
        ),
        "dpm2": DiffusionSampler(model, lin, "dpmsolver++", 6),
        "dpm3": DiffusionSampler(model, cos, "dpmsolver++", 7, solver_order=3),
    }


NAMES = list(samplers(lambda x, t, cond: x))


def inputs(seed: int, device="cpu", dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(B, H, D, generator=gen, dtype=dtype)
    cond = torch.randn(B, C, generator=gen)
    return noise.to(device), cond.to(device)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", [None, "direct", "tweedie"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_capture_is_identical_to_sample(name, mode, dtype):
    model = MLPHead().to(dtype)
    sampler = samplers(model)[name]
    guidance = None if mode is None else MLPGuidance(mode)
    gen_captured = torch.Generator().manual_seed(99)
    gen_eager = torch.Generator().manual_seed(99)
    noise0, cond0 = inputs(0, dtype=dtype)
    captured = sampler.capture(noise0, cond0, guidance, gen_captured)
    assert isinstance(captured, CapturedSampler) and captured.mode == "cpu_replay"
    assert torch.equal(gen_captured.get_state(), gen_eager.get_state())  # capture draws nothing
    outputs = []
    for seed in (1, 2, 3):  # first call records, the others replay
        noise, cond = inputs(seed, dtype=dtype)
        got = captured(noise, cond)
        expected = sampler.sample(noise, cond, guidance, gen_eager)
        assert torch.equal(got, expected), (seed, (got - expected).abs().max())
        assert torch.equal(gen_captured.get_state(), gen_eager.get_state())
        outputs.append(got.clone())
    assert not torch.equal(outputs[1], outputs[2])  # inputs really flow through the replay
    assert captured(*inputs(3, dtype=dtype)) is got  # one static output buffer
    # Replays go straight to the C++ kernel when it is built (the public op otherwise).
    calls = captured._replay.calls
    assert calls and all((c is not None) == (native.load("_C") is not None) for c in calls)


def test_cpu_capture_with_global_rng_and_no_cond():
    def model(x, t, cond):
        assert cond is None
        return torch.tanh(x)

    sampler = DiffusionSampler(model, NoiseSchedule(), "ddpm", 5)
    noise, _ = inputs(4)
    captured = sampler.capture(noise)
    for _ in range(2):
        torch.manual_seed(17)
        got = captured(noise).clone()
        torch.manual_seed(17)
        assert torch.equal(got, sampler.sample(noise))


def test_capture_failure_on_first_call_can_be_retried():
    fail = {"now": True}

    def model(x, t, cond):
        if fail["now"]:
            raise RuntimeError("model not ready")
        return 0.5 * x

    sampler = FlowSampler(model, 3)
    noise, _ = inputs(6)
    captured = sampler.capture(noise)
    with pytest.raises(RuntimeError, match="model not ready"):
        captured(noise)
    fail["now"] = False
    for _ in range(2):
        assert torch.equal(captured(noise), sampler.sample(noise))


# ---------------------------------------------------------------------------------
# CUDA graphs (run on a GPU machine)
# ---------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "name", ["flow-euler", "flow-heun", "ddpm", "ddim-eta", "ddim-split", "dpm3"]
)
@pytest.mark.parametrize("mode", [None, "tweedie"])
def test_cuda_graph_capture_matches_sample(name, mode):
    device = torch.device("cuda")
    model = MLPHead().to(device)
    sampler = samplers(model)[name]
    guidance = None if mode is None else MLPGuidance(mode).to(device)
    gen_captured = torch.Generator(device).manual_seed(123)
    gen_eager = torch.Generator(device).manual_seed(123)
    noise0, cond0 = inputs(0, device)
    captured = sampler.capture(noise0, cond0, guidance, gen_captured, check_finite=False)
    assert captured.mode == "cuda_graph"
    # Warm-up and capture consumed no random numbers.
    assert torch.equal(gen_captured.get_state(), gen_eager.get_state())
    previous = None
    for seed in (1, 2, 3):
        noise, cond = inputs(seed, device)
        got = captured(noise, cond)
        expected = sampler.sample(noise, cond, guidance, gen_eager)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(gen_captured.get_state(), gen_eager.get_state())
        if previous is not None:
            assert not torch.equal(got, previous)
        previous = got.clone()

    # A replay allocates nothing.
    noise, cond = inputs(4, device)
    captured(noise, cond)
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    for _ in range(3):
        out = captured(noise, cond)
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before
    assert out is captured.output


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_outlives_the_samplers_table_cache():
    """The graph reads the step tables made before its capture; the sampler's cache of them
    evicts after 8 other (device, dtype, batch) keys, so the capture must own them (it did
    not: replays then read freed memory)."""
    device = torch.device("cuda")
    sampler = samplers(MLPHead().to(device))["flow-euler"]
    noise, cond = inputs(0, device)
    captured = sampler.capture(noise, cond, check_finite=False)
    want = sampler.sample(noise, cond)
    for batch in range(3, 12):  # more other keys than the cache holds
        other = torch.randn(batch, H, D, device=device)
        sampler.sample(other, torch.randn(batch, C, device=device))
    gc.collect()
    junk = [torch.full((64, 2), 1e3, device=device) for _ in range(2000)]  # reuse freed blocks
    torch.testing.assert_close(captured(noise, cond), want, rtol=1e-6, atol=1e-6)
    del junk


def test_graph_capture_owns_its_tables(monkeypatch):
    """The same on the CPU: the CUDA calls of ``_capture_graph`` replaced by no-ops, the
    tables the captured loop reads must stay alive after the cache evicted them."""
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: mock.MagicMock())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: mock.MagicMock())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", mock.MagicMock)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, **kw: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(capture_module, "_RngSnapshot", mock.MagicMock())
    sampler = samplers(MLPHead())["flow-euler"]
    noise, cond = inputs(0, torch.device("cpu"))
    captured = CapturedSampler.__new__(CapturedSampler)
    captured.sampler, captured.guidance, captured.inpainting = sampler, None, None
    captured.generator, captured.device, captured.finite = None, noise.device, None
    captured.static_cond, captured.ws = static_copy(cond), StepBuffers(noise)
    captured.static_noise = noise.clone()
    captured._capture_graph(Launch(1.0, math.inf))
    tables = sampler._tables[(noise.device, noise.dtype, B)]
    alive = [weakref.ref(t) for t in tables.time_blocks.values()]
    del tables
    with torch.no_grad():
        for batch in range(3, 12):
            sampler.sample(torch.randn(batch, H, D), torch.randn(batch, C))
    gc.collect()
    assert (noise.device, noise.dtype, B) not in sampler._tables  # evicted from the cache
    assert alive and all(ref() is not None for ref in alive)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_capture_refuses_cpu_generator():
    device = torch.device("cuda")
    sampler = samplers(MLPHead().to(device))["ddpm"]
    noise, cond = inputs(0, device)
    with pytest.raises(ValueError, match="generator must be a CUDA generator"):
        sampler.capture(noise, cond, generator=torch.Generator())
    # sample() accepts it: a CPU generator draws on the CPU, as in diffusers.
    sampler.sample(noise, cond, generator=torch.Generator().manual_seed(0))
    captured = sampler.capture(noise, cond)  # global RNG; inputs checked for NaN by default
    bad = noise.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="noise contains NaN"):
        captured(bad, cond)
    assert torch.isfinite(captured(noise, cond)).all()


@pytest.mark.parametrize("name", ["flow-euler", "ddim-eta", "dpm2"])
def test_cpu_capture_with_a_model_returning_its_input(name):
    """A model output aliasing the sample buffer must not confuse the recorded launches."""
    sampler = samplers(lambda x, t, cond: x)[name]
    captured = sampler.capture(*inputs(0))
    for seed in (1, 2, 3):
        noise, cond = inputs(seed)
        torch.manual_seed(seed)
        got = captured(noise, cond).clone()
        torch.manual_seed(seed)
        assert torch.equal(got, sampler.sample(noise, cond))


def test_the_packages_latent_guidance_plugs_in():
    """ate_fast.steer.LatentGuidance follows the protocol; capture() replays it exactly."""
    from ate_fast.sampling import Guidance
    from ate_fast.steer import LatentGuidance

    torch.manual_seed(3)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(H * D, 16), nn.Tanh(), nn.Linear(16, 4))
    model = MLPHead()
    for mode in ("direct", "tweedie"):
        guidance = LatentGuidance(encoder, torch.randn(4), scale=2.0, clamp=0.1, mode=mode)
        assert isinstance(guidance, Guidance)
        for name in ("flow-heun", "dpm2"):
            sampler = samplers(model)[name]
            captured = sampler.capture(*inputs(0), guidance=guidance)
            for seed in (1, 2):
                noise, cond = inputs(seed)
                guided = sampler.sample(noise, cond, guidance)
                assert torch.equal(captured(noise, cond), guided)
            assert not torch.allclose(guided, sampler.sample(noise, cond))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_capture_of_a_compiled_head(device):
    """``torch.compile(model)`` (default mode) as the sampler's model: compiled during the
    capture's warm-up, then replayed (a CUDA graph on the GPU) with the same output as the
    uncompiled head, for a flow and a multistep diffusion sampler, over several calls."""
    model = MLPHead().to(device)
    compiled = torch.compile(model)
    model64 = copy.deepcopy(model).double()
    for name in ("flow-euler", "dpm2"):
        plain, fast = samplers(model)[name], samplers(compiled)[name]
        noise0, cond0 = inputs(0, device)
        captured = fast.capture(noise0, cond0, check_finite=False)
        for seed in (1, 2):
            noise, cond = inputs(seed, device)
            expected = plain.sample(noise, cond)
            got = captured(noise, cond)
            # Inductor's kernels round differently from eager's (fused, reassociated): both
            # against a float64 run, the compiled one within 4× eager's own error. An
            # element-wise rtol fails where dpm2's outputs span 1..580 (the H200: 1.6e-5 on one
            # element of 120), a lost term or step misses by O(1).
            truth = samplers(model64)[name].sample(noise.double(), cond.double())
            eager_err = float((expected.double() - truth).abs().max())
            got_err = float((got.double() - truth).abs().max())
            assert got_err <= 4 * eager_err + 1e-7 * float(truth.abs().max()), (name, seed)


def test_conditioning_copied_in_one_call_checked_first():
    """A call's conditioning goes into the captured buffers in one ``_foreach_copy_``
    after every leaf was checked (a bad leaf copies nothing), and a buffer passed back as
    itself — a cache written into ``static_cond`` in place — is not copied."""
    head = MLPHead()
    noise = torch.randn(B, H, D)
    cond = {"c": torch.randn(B, C), "spare": torch.randn(3), "bad": torch.randn(2)}

    def model(x, t, c):
        return head(x, t, c["c"])

    captured = FlowSampler(model, 4).capture(noise, cond)
    fresh = {key: torch.randn_like(value) for key, value in cond.items()}
    with mock.patch.object(torch, "_foreach_copy_", wraps=torch._foreach_copy_) as copies:
        got = captured(noise, fresh).clone()
    assert copies.call_count == 1 and len(copies.call_args.args[0]) == 3
    want = FlowSampler(model, 4).sample(noise, fresh)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the buffers themselves, one rewritten in place: only the others would be copied
    static = captured.static_cond
    static["c"].copy_(cond["c"])
    mixed = {"c": static["c"], "spare": fresh["spare"], "bad": static["bad"]}
    with mock.patch.object(torch, "_foreach_copy_", wraps=torch._foreach_copy_) as copies:
        got = captured(noise, mixed).clone()
    assert len(copies.call_args.args[0]) == 1  # "spare" only
    torch.testing.assert_close(got, FlowSampler(model, 4).sample(noise, cond), rtol=0, atol=0)
    before = {key: value.clone() for key, value in static.items()}
    wrong = {"c": torch.randn(B, C), "spare": torch.randn(3), "bad": torch.randn(5)}
    with pytest.raises(ValueError, match=r"cond\['bad'\] must match the captured example"):
        captured(noise, wrong)
    assert all(torch.equal(static[key], before[key]) for key in static)  # nothing copied
