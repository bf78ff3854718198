"""ate_fast.export.to_onnx: the whole sampler as one ONNX graph, run in ONNX Runtime.

For every sampler method (unguided and guided) and the reference heads: the graph passes
``onnx.checker`` with shape inference, every node is in TensorRT's ONNX operator table
with a supported type, the batch is the symbolic ``batch`` dimension, no custom op is
left, and ONNX Runtime reproduces ``sampler.sample`` within 1e-4 (normwise relative,
float32) at batch 1 and 8 — stochastic samplers with the same generator draws. Then the
graph contract (metadata, static batch, the runner's argument checks) and bad input.
"""

from __future__ import annotations

import pytest
import torch
from test_export_cases import (
    ALL_CASES,
    CASES,
    FLOW_GUIDED_FACTOR,
    HEAD_CASES,
    LINEAR,
    PARITY_TOLERANCE,
    _guidance,
    _mlp,
    example_inputs,
    exported,
    float64_twin,
)
from torch import nn

onnx = pytest.importorskip("onnx")  # the `test` extra installs onnx, onnxruntime, onnxscript
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from ate_fast.export import (  # noqa: E402
    ExportError,
    GuidanceExportError,
    ModelTraceError,
    OnnxRuntimeSampler,
    cast_for_precision,
    read_signature,
    relative_error,
    tensorrt_problems,
    to_onnx,
)
from ate_fast.models import PrefixCache, make_head  # noqa: E402
from ate_fast.sampling import DiffusionSampler, FlowSampler  # noqa: E402


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


def _parity(name: str, directory) -> list[tuple[float, float]]:
    """(error, allowed) at batch 1 and 8: ONNX Runtime's relative error against
    ``sampler.sample``, allowed 1e-4; guided flow cases: against a float64 run, allowed
    FLOW_GUIDED_FACTOR × PyTorch float32's own error or 1e-4 (see test_export_cases)."""
    path, sampler, guidance = exported(name, directory)
    runner = OnnxRuntimeSampler(path)
    flow_guided = isinstance(sampler, FlowSampler) and guidance is not None
    twin = float64_twin(sampler, guidance) if flow_guided else None
    errors = []
    for batch in (1, 8):
        noise, cond = example_inputs(ALL_CASES[name], batch, seed=batch)
        ref = sampler.sample(noise, cond, guidance, torch.Generator().manual_seed(7))
        out = runner.sample(noise, cond, guidance, torch.Generator().manual_seed(7))
        assert out.shape == ref.shape and out.dtype == torch.float32
        assert torch.isfinite(ref).all()
        if twin is None:
            errors.append((relative_error(out, ref), PARITY_TOLERANCE))
            continue
        exact = twin[0].sample(noise.double(), cond.double(), twin[1])
        own = relative_error(ref, exact)
        errors.append((relative_error(out, exact), max(PARITY_TOLERANCE, FLOW_GUIDED_FACTOR * own)))
    return errors


def _check_graph(path) -> None:
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert tensorrt_problems(model) == []
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    noise = model.graph.input[0]
    assert noise.name == "noise"
    assert noise.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [o.name for o in model.graph.output] == ["actions"]


@pytest.mark.parametrize("name", [case.name for case in CASES])
def test_sampler_methods_parity(name, export_dir):
    errors = _parity(name, export_dir)
    assert all(err < allowed for err, allowed in errors), errors
    _check_graph(exported(name, export_dir)[0])


@pytest.mark.parametrize("name", [case.name for case in HEAD_CASES])
def test_reference_heads_parity(name, export_dir):
    errors = _parity(name, export_dir)
    assert all(err < allowed for err, allowed in errors), errors
    _check_graph(exported(name, export_dir)[0])


@pytest.mark.parametrize("arch", ["mlp", "transformer"])
@pytest.mark.parametrize("mode", ["direct", "tweedie"])
def test_guidance_graph_is_the_guidance_gradient(mode, arch, monkeypatch):
    """The forward-op VJP the graph contains equals LatentGuidance.gradient (the fused op;
    autograd for the Transformer encoder)."""
    from ate_fast.export.guidance_graph import guidance_graph

    monkeypatch.setenv("ATE_FAST_TRANSFORMER_GUIDANCE", "autograd")
    guidance = _guidance(50, 32, mode, arch=arch)
    graph = guidance_graph(guidance, target_input=True, batch=4)
    x, x0_hat = torch.randn(4, 50, 32), torch.randn(4, 50, 32)
    dx0_dx = torch.rand(4) + 0.5
    target = guidance.target.expand(4, -1)
    expected = guidance.gradient(x, x0_hat, dx0_dx)
    got = graph(x, x0_hat, dx0_dx, target)
    assert relative_error(got, expected) < 1e-5
    assert float(expected.abs().max()) > 0 and float(got[..., -1].abs().max()) == 0.0  # masked
    assert relative_error(graph(x, x0_hat, dx0_dx, torch.zeros_like(target)), expected) > 1e-2


def test_an_older_torch_is_a_clear_error(monkeypatch, tmp_path):
    """torch 2.4 – 2.7's exporters fail on the samplers, each its own way (seen: an unknown
    ``optimize`` argument, Slice bounds TensorRT cannot parse, a graph they cannot
    decompose): below 2.8 the export says what it needs before it traces anything."""
    from ate_fast.export import onnx_export

    monkeypatch.setattr(torch, "__version__", "2.7.1+cu126")
    sampler = FlowSampler(make_head("mlp", "small").eval(), num_steps=2)
    with pytest.raises(ImportError, match=r"needs torch >= 2\.8 .*this is torch 2\.7\.1\+cu126"):
        to_onnx(sampler, tmp_path / "s.onnx", torch.randn(1, 50, 32))
    assert onnx_export.MIN_TORCH == "2.8" and not (tmp_path / "s.onnx").exists()


def test_graph_inputs_follow_the_sampler(export_dir):
    """Stochastic samplers take their draws as `step_noise`; guided ones take `target`
    unless it is baked; the graph's settings are in its metadata."""
    names = {}
    for case in ("euler", "ddpm", "ddim-eta-clip-guided", "heun-guided-tweedie-baked"):
        model = onnx.load(str(exported(case, export_dir)[0]), load_external_data=False)
        names[case] = [i.name for i in model.graph.input]
    assert names["euler"] == ["noise", "cond"]
    assert names["ddpm"] == ["noise", "cond", "step_noise"]
    assert names["ddim-eta-clip-guided"] == ["noise", "cond", "target", "step_noise"]
    assert names["heun-guided-tweedie-baked"] == ["noise", "cond"]

    path, sampler, _ = exported("ddpm", export_dir)
    sig = read_signature(path)
    assert sig.step_noise_draws == 3  # DDPM draws no noise at its last timestep (t = 0)
    assert (sig.horizon, sig.action_dim, sig.num_steps) == (50, 32, 4)
    assert sig.sampler == repr(sampler) and sig.dynamic_batch
    guided = read_signature(exported("ddim-guided-tweedie-v", export_dir)[0]).guidance
    assert guided["mode"] == "tweedie" and guided["scale"] == 2.0 and guided["masked"]
    step = onnx.load(str(path)).graph.input[2].type.tensor_type.shape.dim
    assert step[0].dim_value == 3 and step[1].dim_param == "batch"


class _TwoKeyHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 24), nn.Linear(2, 24)

    def forward(self, x, t, cond):
        return 0.5 * x + (self.a(cond["a"]) + self.b(cond["b"])).view(-1, 8, 3) * t.view(-1, 1, 1)


def test_a_cond_dict_in_any_key_order(tmp_path):
    """A dict is keyed by name: the runner takes its keys in any order, as sample() does
    (it refused {"b", "a"} for a graph exported with {"a", "b"})."""
    torch.manual_seed(0)
    sampler = FlowSampler(_TwoKeyHead().eval(), 2)
    path = to_onnx(sampler, tmp_path / "dict.onnx", torch.randn(2, 8, 3),
                   {"a": torch.randn(2, 4), "b": torch.randn(2, 2)})  # fmt: skip
    runner = OnnxRuntimeSampler(path)
    noise, cond = torch.randn(2, 8, 3), {"b": torch.randn(2, 2), "a": torch.randn(2, 4)}
    torch.testing.assert_close(runner.sample(noise, cond), sampler.sample(noise, cond),
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match=r"cond must give the graph's inputs"):
        runner.sample(noise, {"a": cond["a"], "c": cond["b"]})


def test_re_export_to_the_same_path_with_external_weights(tmp_path, monkeypatch):
    """ONNX appends external data to an existing file: each re-export of a > 1 GiB policy
    to the same path added a copy of its weights to `<name>.data`. (The threshold is
    lowered so a small head takes that path.)"""
    import ate_fast.export.onnx_export as onnx_export

    monkeypatch.setattr(onnx_export, "_EXTERNAL_DATA_BYTES", 1024)
    torch.manual_seed(0)
    sampler = FlowSampler(make_head("mlp", "small", horizon=16, action_dim=4).eval(), 2)
    path, data = tmp_path / "policy.onnx", tmp_path / "policy.onnx.data"
    sizes = []
    for _ in range(3):
        to_onnx(sampler, path, torch.randn(2, 16, 4))
        sizes.append(data.stat().st_size)
    assert sizes[0] == sizes[1] == sizes[2]
    noise = torch.randn(2, 16, 4)
    want = sampler.sample(noise)
    torch.testing.assert_close(OnnxRuntimeSampler(path).sample(noise), want, rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(onnx_export, "_EXTERNAL_DATA_BYTES", 1 << 30)
    to_onnx(sampler, path, torch.randn(2, 16, 4))  # weights inline now: no stale .data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy.onnx"]
    torch.testing.assert_close(OnnxRuntimeSampler(path).sample(noise), want, rtol=1e-4, atol=1e-5)


def test_a_baked_target_is_checked_against_the_guidance(tmp_path):
    """target_input=False bakes z*: a LatentGuidance with another target was accepted and
    sampled toward the baked one (its scale, clamp and mode were already checked)."""
    from ate_fast.align import ActionVAE
    from ate_fast.steer import LatentGuidance

    torch.manual_seed(0)
    head = make_head("mlp", "small", horizon=16, action_dim=4, cond_dim=6).eval()
    sampler = FlowSampler(head, 2)
    vae = ActionVAE(4, 16, latent_dim=8, arch="mlp", hidden_dims=(32,))
    target = torch.randn(8)
    guidance = LatentGuidance(vae, target, scale=2.0, clamp=0.5, mode="direct")
    path = to_onnx(sampler, tmp_path / "baked.onnx", torch.randn(2, 16, 4), torch.randn(2, 6),
                   guidance, target_input=False)  # fmt: skip
    assert read_signature(path).guidance["baked_target"]["values"] == target.tolist()
    runner = OnnxRuntimeSampler(path)
    noise, cond = torch.randn(2, 16, 4), torch.randn(2, 6)
    same = LatentGuidance(vae, target.clone(), scale=2.0, clamp=0.5, mode="direct")
    want = sampler.sample(noise, cond, guidance=same)
    torch.testing.assert_close(runner.sample(noise, cond, guidance=same), want,
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    other = LatentGuidance(vae, target + 1.0, scale=2.0, clamp=0.5, mode="direct")
    with pytest.raises(ValueError, match="is not the target baked into the graph"):
        runner.sample(noise, cond, guidance=other)


def test_a_vlm_kv_cache_and_its_padding_mask_as_graph_inputs(tmp_path):
    """A flow transformer conditioned on a PrefixCache (a VLM's KV cache) exports with the
    cache as inputs ``cond.keys.<i>``, ``cond.values.<i>`` [B, kv_heads, L, hd] per block
    and ``cond.mask`` bool [B, L]: ONNX Runtime reproduces ``sample()`` for other caches,
    masks and batches; fp16 casting keeps the mask a bool input; a cond of tokens where the
    graph takes a cache is refused naming the inputs."""
    torch.manual_seed(0)
    head = make_head("flow-transformer", "small", horizon=16, action_dim=4, depth=2).eval()
    sampler = FlowSampler(head, 2)
    gen = torch.Generator().manual_seed(1)

    def inputs(batch: int) -> tuple[torch.Tensor, PrefixCache, torch.Tensor]:
        tokens = torch.randn(batch, 12, 256, generator=gen)
        real = torch.randint(1, 13, (batch, 1), generator=gen)
        with torch.no_grad():
            cache = head.prefix_cache(tokens, torch.arange(12) < real)
        return torch.randn(batch, 16, 4, generator=gen), cache, tokens

    noise, cache, tokens = inputs(2)
    path = to_onnx(sampler, tmp_path / "kv.onnx", noise, cache)
    model = onnx.load(str(path))
    names = [i.name for i in model.graph.input]
    assert names == ["noise", "cond.keys.0", "cond.keys.1", "cond.values.0", "cond.values.1",
                     "cond.mask"]  # fmt: skip
    assert model.graph.input[-1].type.tensor_type.elem_type == onnx.TensorProto.BOOL
    assert tensorrt_problems(model) == []
    runner = OnnxRuntimeSampler(path)
    assert runner.signature.cond_kind == "prefix_cache"
    for batch in (1, 3):
        noise, cache, _ = inputs(batch)
        ref = sampler.sample(noise, cache)
        assert relative_error(runner.sample(noise, cache), ref) <= PARITY_TOLERANCE
    cast = cast_for_precision(model, "fp16")
    assert [i.type.tensor_type.elem_type for i in cast.graph.input][-1] == onnx.TensorProto.BOOL
    with pytest.raises(ValueError, match=r"cond must give the graph's inputs \['cond.keys.0'"):
        runner.sample(noise, tokens[:batch])
    with pytest.raises(ValueError, match=r"got \['cond.keys.0', .*'cond.values.1'\]"):
        runner.sample(noise, cache._replace(mask=None))


def test_dynamic_batch_and_explicit_noise(export_dir):
    """Any batch runs; explicit step noise is the sampler's draws; a [d_z] target
    broadcasts; the guidance's target can be passed as `target`."""
    path, sampler, guidance = exported("ddim-eta-clip-guided", export_dir)
    runner = OnnxRuntimeSampler(path)
    noise, cond = example_inputs(ALL_CASES["ddim-eta-clip-guided"], 3)
    gen = torch.Generator().manual_seed(1)
    draws = torch.stack([torch.randn(noise.shape, generator=gen) for _ in range(3)])
    ref = sampler.sample(noise, cond, guidance, torch.Generator().manual_seed(1))
    out = runner.sample(noise, cond, target=guidance.target, step_noise=draws)
    assert relative_error(out, ref) < PARITY_TOLERANCE
    other = runner.sample(noise, cond, target=torch.zeros(16), step_noise=draws)
    assert relative_error(other, ref) > 1e-3  # the target input is used


def test_time_embedding_table_is_torchs_in_the_graph(tmp_path):
    """The flow transformer (π0's periods, time_scale 1) under a 100-step DDIM: the
    sinusoidal table was folded in the graph from float32 copies of the periods, up to 2 ulp
    from PyTorch's, which at timesteps up to 99 put ONNX Runtime 1.8e-4 from PyTorch (its
    own float64 run: 1.5e-7). Now the graph holds PyTorch's table."""
    from ate_fast.models.time_embedding import _frequencies
    from ate_fast.sampling import NoiseSchedule

    torch.manual_seed(0)
    head = make_head("flow-transformer", "small", horizon=16, action_dim=6).eval()
    sampler = DiffusionSampler(head, NoiseSchedule("squaredcos_cap_v2", 100), "ddim", 2)
    gen = torch.Generator().manual_seed(0)
    noise, cond = torch.randn(1, 16, 6, generator=gen), torch.randn(1, 4, 256, generator=gen)
    path = to_onnx(sampler, tmp_path / "ft-ddim.onnx", noise, cond)
    width = head.config.width
    table = _frequencies(width // 2, head.config.min_period, head.config.max_period, noise)
    folded = [
        onnx.numpy_helper.to_array(i).reshape(-1)
        for i in onnx.load(str(path)).graph.initializer
        if i.data_type == onnx.TensorProto.FLOAT and tuple(i.dims) in ((1, width // 2),)
    ]
    assert any((torch.from_numpy(f.copy()) == table).all() for f in folded)
    noise, cond = torch.randn(4, 16, 6, generator=gen), torch.randn(4, 4, 256, generator=gen)
    out = OnnxRuntimeSampler(path).sample(noise, cond)
    assert relative_error(out, sampler.sample(noise, cond)) < 2e-6


def test_static_batch_graph_at_opset_20(tmp_path):
    sampler = FlowSampler(_mlp(), 2)
    noise, cond = torch.randn(3, 50, 32), torch.randn(3, 8)
    path = to_onnx(sampler, tmp_path / "static.onnx", noise, cond, dynamic_batch=False, opset=20)
    model = onnx.load(str(path))
    assert [o.version for o in model.opset_import if o.domain == ""] == [20]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3
    assert tensorrt_problems(model) == []
    runner = OnnxRuntimeSampler(path)
    assert relative_error(runner.sample(noise, cond), sampler.sample(noise, cond)) < 1e-5
    with pytest.raises(ValueError, match="exported for batch 3"):
        runner.sample(noise[:1], cond[:1])


def test_runner_argument_errors(export_dir):
    path, _, guidance = exported("euler-guided", export_dir)
    runner = OnnxRuntimeSampler(path)
    noise, cond = example_inputs(ALL_CASES["euler-guided"], 2)
    with pytest.raises(ValueError, match="pass target"):
        runner.sample(noise, cond)
    with pytest.raises(ValueError, match=r"noise must have shape \[B, 50, 32\]"):
        runner.sample(noise[:, :10], cond, guidance)
    with pytest.raises(ValueError, match="cond must give the graph's inputs"):
        runner.sample(noise, None, guidance)
    with pytest.raises(ValueError, match=r"cond must have shape \[B, 8\]"):
        runner.sample(noise, cond[:, :3], guidance)
    with pytest.raises(ValueError, match=r"target must be \[d_z\] = \[16\]"):
        runner.sample(noise, cond, target=torch.zeros(5))
    changed = _guidance(50, 32, "direct")
    changed.scale = 3.0
    with pytest.raises(ValueError, match=r"guidance\.scale is 3\.0"):
        runner.sample(noise, cond, changed)
    with pytest.raises(ValueError, match="step_noise was given"):
        runner.sample(noise, cond, guidance, step_noise=torch.zeros(1, *noise.shape))


def test_runner_providers_and_mask_dtype(export_dir, tmp_path):
    """A providers string was split into characters; a provider this onnxruntime lacks ran
    the graph on the CPU with a log line only; an int cond.mask gave ONNX Runtime's bare
    'expected tensor(bool)' (TensorRT's runner cast it)."""
    path, _, _ = exported("euler-guided", export_dir)
    with pytest.raises(TypeError, match="providers must be a sequence of provider names"):
        OnnxRuntimeSampler(path, providers="CPUExecutionProvider")
    with pytest.raises(ValueError, match=r"providers: \['NoSuchExecutionProvider'\] not in"):
        OnnxRuntimeSampler(path, providers=["NoSuchExecutionProvider", "CPUExecutionProvider"])
    OnnxRuntimeSampler(path, providers=[("CPUExecutionProvider", {})])  # ORT's options form
    torch.manual_seed(0)
    head = make_head("flow-transformer", "small", horizon=8, action_dim=4, depth=1).eval()
    with torch.no_grad():
        cache = head.prefix_cache(torch.randn(2, 5, 256), torch.ones(2, 5, dtype=torch.bool))
    sampler = FlowSampler(head, 2)
    kv = to_onnx(sampler, tmp_path / "kv.onnx", torch.randn(2, 8, 4), cache)
    with pytest.raises(ValueError, match=r"cond.mask must be a bool tensor \[B, L\]"):
        OnnxRuntimeSampler(kv).sample(torch.randn(2, 8, 4), cache._replace(mask=cache.mask.long()))


def test_runner_feeds_skip_the_finite_checks_on_request(export_dir):
    """TensorRTSampler(check_finite=False) passes finite=False: the NaN/inf checks (a host
    sync per input tensor on a GPU) are skipped, the structural ones kept."""
    from ate_fast.errors import NonFiniteError
    from ate_fast.export.onnxruntime_runner import runner_feeds

    path, _, guidance = exported("euler-guided", export_dir)
    signature = read_signature(path)
    noise, cond = example_inputs(ALL_CASES["euler-guided"], 2)
    noise[0, 0, 0] = float("nan")
    kwargs = dict(target=None, step_noise=None, prev_chunk=None, delay=None)
    with pytest.raises(NonFiniteError, match="noise contains NaN"):
        runner_feeds(signature, noise, cond, guidance, None, **kwargs)
    feeds = runner_feeds(signature, noise, cond, guidance, None, **kwargs, finite=False)
    assert feeds["noise"] is noise
    with pytest.raises(ValueError, match=r"noise must have shape \[B, 50, 32\]"):
        runner_feeds(signature, noise[:, :3], cond, guidance, None, **kwargs, finite=False)


def test_export_leaves_the_global_rng_alone(tmp_path):
    """The example step noise of a stochastic sampler's export came from torch's global RNG,
    so exporting changed the caller's later draws."""
    from ate_fast.sampling import NoiseSchedule

    sampler = DiffusionSampler(_mlp(), NoiseSchedule("squaredcos_cap_v2", 100), "ddpm", 2)
    state = torch.get_rng_state()
    to_onnx(sampler, tmp_path / "ddpm.onnx", torch.zeros(1, 50, 32), torch.zeros(1, 8))
    assert read_signature(tmp_path / "ddpm.onnx").step_noise_draws > 0
    assert torch.equal(torch.get_rng_state(), state)


class UsesGuidedStep(nn.Module):
    """A model function that calls ate_fast's custom op itself."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, t, cond=None):
        from ate_fast import guided_step

        return guided_step(x, torch.tanh(self.lin(x)), a=0.5, b=t.to(x.dtype))


def test_custom_ops_in_the_model_are_decomposed(tmp_path):
    sampler = FlowSampler(UsesGuidedStep().eval(), 2)
    noise = torch.randn(2, 6, 4)
    path = to_onnx(sampler, tmp_path / "op.onnx", noise)
    model = onnx.load(str(path))
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    out = OnnxRuntimeSampler(path).sample(noise)
    assert relative_error(out, sampler.sample(noise)) < 1e-5


# -- bad input ------------------------------------------------------------------------
def _numpy_model(x, t, cond):
    import numpy as np

    return torch.from_numpy(np.tanh(x.numpy()))


def _branching_model(x, t, cond):
    return x * 2 if bool(x.sum() > 0) else x


@pytest.mark.parametrize("model_fn", [_numpy_model, _branching_model], ids=["numpy", "branch"])
def test_untraceable_model_fn_names_what_to_change(model_fn, tmp_path):
    sampler = FlowSampler(model_fn, 2)
    with pytest.raises(ModelTraceError, match="model_fn could not be traced") as info:
        to_onnx(sampler, tmp_path / "bad.onnx", torch.randn(1, 6, 4))
    assert "nn.Module whose forward(x [B,H,D], t [B], cond)" in str(info.value)
    assert not (tmp_path / "bad.onnx").exists()


def test_batch_specialising_model(tmp_path):
    def fixed_batch(x, t, cond):
        return torch.tanh(x.reshape(2, -1)).reshape(x.shape)

    sampler = FlowSampler(fixed_batch, 2)
    noise = torch.randn(2, 6, 4)
    with pytest.raises(ExportError, match="export with dynamic_batch=False"):
        to_onnx(sampler, tmp_path / "b.onnx", noise)
    path = to_onnx(sampler, tmp_path / "b.onnx", noise, dynamic_batch=False)
    assert relative_error(OnnxRuntimeSampler(path).sample(noise), sampler.sample(noise)) < 1e-6


def test_bad_arguments(tmp_path):
    sampler = FlowSampler(_mlp(), 2)
    noise, cond = torch.randn(1, 50, 32), torch.randn(1, 8)
    out = tmp_path / "x.onnx"
    for opset in (17, 21):
        with pytest.raises(ValueError, match="opset must be one of"):
            to_onnx(sampler, out, noise, cond, opset=opset)
    with pytest.raises(TypeError, match="example_noise must be float32"):
        to_onnx(sampler, out, noise.double(), cond)
    with pytest.raises(TypeError, match="sampler must be an ate_fast sampler"):
        to_onnx(object(), out, noise, cond)
    with pytest.raises(TypeError, match=r"example_cond\['a'\] must be a Tensor"):
        to_onnx(sampler, out, noise, {"a": 1})
    with pytest.raises(ValueError, match="must have the batch dimension of example_noise"):
        to_onnx(sampler, out, noise, torch.randn(2, 8))
    with pytest.raises(ValueError, match="noise contains NaN"):
        to_onnx(sampler, out, torch.full((1, 50, 32), float("nan")), cond)
    trained = FlowSampler(_mlp().train(), 2)
    with pytest.raises(ValueError, match=r"training mode: call \.eval\(\)"):
        to_onnx(trained, out, noise, cond)
    # named before torch.export, whose error blamed the model
    with pytest.raises(ValueError, match="example_noise has batch 4 but max_batch is 3"):
        to_onnx(sampler, out, torch.randn(4, 50, 32), torch.randn(4, 8), max_batch=3)
    from ate_fast.align import ActionVAE
    from ate_fast.steer import LatentGuidance

    vae = ActionVAE(32, 50, latent_dim=8, arch="mlp", hidden_dims=(16,))
    per_sample = LatentGuidance(vae, torch.randn(2, 8))
    with pytest.raises(GuidanceExportError, match="a batch of 2 latents: baked, it fixes"):
        to_onnx(sampler, out, torch.randn(2, 50, 32), torch.randn(2, 8), per_sample,
                target_input=False)  # fmt: skip
    assert not out.exists()


def test_examples_of_the_wrong_shape_name_the_sizes_not_tracing(tmp_path):
    """A head built for D = 32 exported with D = 7 noise: an argument error naming both
    shapes (one eager call before tracing), not a tracing failure."""
    sampler = FlowSampler(_mlp(), 2)
    cond = torch.randn(1, 8)
    with pytest.raises(ValueError, match=r"noise \[1, 50, 7\].*\[B, 50, 32\]") as info:
        to_onnx(sampler, tmp_path / "x.onnx", torch.randn(1, 50, 7), cond)
    assert not isinstance(info.value, ModelTraceError)
    assert "traced" not in str(info.value)

    def wrong_output(x, t, cond):
        return x[:, :-1]

    with pytest.raises(ValueError, match=r"shape \[1, 6, 4\].*got \[1, 5, 4\]"):
        to_onnx(FlowSampler(wrong_output, 2), tmp_path / "y.onnx", torch.randn(1, 6, 4))
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "y.onnx").exists()


def test_unexportable_guidance(tmp_path):
    from ate_fast.align import ActionVAE
    from ate_fast.steer import LatentGuidance

    sampler = FlowSampler(_mlp(), 2)
    noise, cond = torch.randn(1, 50, 32), torch.randn(1, 8)
    vae = ActionVAE(32, 50, latent_dim=8, arch="transformer", d_model=16, num_layers=1)
    vae.encoder.blocks.middle_block.norm_first = True  # pre-norm: not what the VJP writes
    with pytest.raises(GuidanceExportError, match=r"TransformerEncoder.*post-norm"):
        to_onnx(sampler, tmp_path / "g.onnx", noise, cond, LatentGuidance(vae, torch.zeros(8)))

    class Custom:
        scale, clamp, mode = 1.0, 1.0, "direct"

        def gradient(self, x, x0_hat, dx0_dx):
            return torch.zeros_like(x)

    with pytest.raises(GuidanceExportError, match="ONNX has no autograd"):
        to_onnx(sampler, tmp_path / "g.onnx", noise, cond, Custom())
    tweedie = _guidance(50, 32, "tweedie")
    x0_model = DiffusionSampler(_mlp(1e-3), LINEAR, "ddim", 2, prediction_type="sample")
    with pytest.raises(ValueError, match="tweedie"):
        to_onnx(x0_model, tmp_path / "g.onnx", noise, cond, tweedie)


def test_tensorrt_problems_reports_what_the_parser_rejects():
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [
        helper.make_node("Det", ["x"], ["d"]),
        helper.make_node("Cast", ["x"], ["xd"], to=TensorProto.DOUBLE),
        helper.make_node("Add", ["xd", "xd"], ["x2"]),
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Unsqueeze", ["x", "axes"], ["y"]),
    ]
    axes = helper.make_tensor_value_info("axes", TensorProto.INT64, [1])
    graph = helper.make_graph(nodes, "g", [x, axes], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    problems = "\n".join(tensorrt_problems(model))
    assert "opset 21 is outside" in problems
    assert "Det node" in problems and "not supported" in problems
    assert "Add node" in problems and "DOUBLE" in problems
    assert "Unsqueeze node" in problems and "build-time constant" in problems
    assert "Shape node" not in problems and "Cast node" not in problems
