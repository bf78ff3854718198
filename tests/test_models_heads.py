"""Reference policy heads: shapes, parameter counts, conditioning, compile, CUDA graphs."""

from __future__ import annotations

import pytest
import torch

from ate_fast.errors import MissingConditionError
from ate_fast.models import (
    FLOW_TRANSFORMER_CONFIGS,
    MLP_HEAD_CONFIGS,
    UNET_CONFIGS,
    ConditionalUnet1D,
    FlowTransformerHead,
    MLPHead,
    count_parameters,
    make_head,
)

SMALL = [("flow-transformer", "small"), ("unet1d", "small"), ("mlp", "small"), ("mlp", "flat")]


def inputs(head, batch=3, length=5, dtype=torch.float32, device="cpu"):
    cfg = head.config
    x = torch.randn(batch, cfg.horizon, cfg.action_dim, dtype=dtype, device=device)
    t = torch.rand(batch, dtype=dtype, device=device)
    if isinstance(head, FlowTransformerHead):
        cond = torch.randn(batch, length, cfg.width, dtype=dtype, device=device)
    elif cfg.cond_dim:
        cond = torch.randn(batch, cfg.cond_dim, dtype=dtype, device=device)
    else:
        cond = None
    return x, t, cond


# ----------------------------------------------------------------------------------
# parameter counts, by formulas written from the architecture descriptions
# ----------------------------------------------------------------------------------
def transformer_count(c):
    linear = lambda i, o, bias=True: i * o + (o if bias else 0)  # noqa: E731
    block = (
        2 * c.width  # two RMSNorm weights
        + linear(c.width, c.num_heads * c.head_dim, False)
        + linear(c.width, 2 * c.num_kv_heads * c.head_dim, False)
        + linear(c.num_heads * c.head_dim, c.width, False)
        + linear(c.width, 2 * c.mlp_dim, False)
        + linear(c.mlp_dim, c.width, False)
    )
    return (
        linear(c.action_dim, c.width)
        + linear(2 * c.width, c.width)
        + linear(c.width, c.width)
        + c.depth * block
        + c.width
        + linear(c.width, c.action_dim)
    )


def unet_count(c):
    conv = lambda i, o, k: i * o * k + o  # noqa: E731
    conv_block = lambda i, o: conv(i, o, c.kernel_size) + 2 * o  # conv + GroupNorm  # noqa: E731
    film_dim = c.time_embed_dim + c.cond_dim

    def res(i, o):
        return (
            conv_block(i, o)
            + conv_block(o, o)
            + film_dim * 2 * o
            + 2 * o
            + (conv(i, o, 1) if i != o else 0)
        )

    e = c.time_embed_dim
    total = e * 4 * e + 4 * e + 4 * e * e + e
    dims = (c.action_dim, *c.down_dims)
    for level, (i, o) in enumerate(zip(dims[:-1], dims[1:])):
        total += res(i, o) + res(o, o) + (conv(o, o, 3) if level < len(c.down_dims) - 1 else 0)
    total += 2 * res(dims[-1], dims[-1])
    for i, o in zip(dims[1:-1], dims[2:]):
        total += res(2 * o, i) + res(i, i) + conv(i, i, 4)
    return total + conv_block(dims[1], dims[1]) + conv(dims[1], c.action_dim, 1)


def mlp_count(c):
    width = c.horizon * c.action_dim if c.flatten else c.action_dim
    total = width * c.hidden + c.hidden + (c.time_dim + c.cond_dim) * c.hidden
    total += 0 if c.flatten else c.horizon * c.hidden
    total += (c.depth - 1) * (c.hidden * c.hidden + c.hidden)
    return total + c.hidden * width + width


@pytest.mark.parametrize(
    "name, configs, formula",
    [
        ("flow-transformer", FLOW_TRANSFORMER_CONFIGS, transformer_count),
        ("unet1d", UNET_CONFIGS, unet_count),
        ("mlp", MLP_HEAD_CONFIGS, mlp_count),
    ],
)
def test_parameter_counts_match_the_architecture(name, configs, formula):
    for config in configs:
        with torch.device("meta"):  # nothing is allocated, even for 300M parameters
            head = make_head(name, config)
        assert all(p.is_meta for p in head.parameters())
        assert count_parameters(head) == formula(head.config), (name, config)


def test_pi0_expert_size():
    with torch.device("meta"):
        head = make_head("flow-transformer", "pi0-expert")
    c = head.config
    assert (c.width, c.depth, c.mlp_dim, c.num_heads, c.horizon, c.action_dim) == (
        1024, 18, 4096, 8, 50, 32
    )  # fmt: skip
    assert 2.8e8 < count_parameters(head) < 3.3e8  # "about 300M"


def test_dp_config_uses_diffusion_policy_down_dims():
    with torch.device("meta"):
        head = make_head("unet1d", "dp")
    assert head.config.down_dims == (256, 512, 1024)


# ----------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name, config", SMALL)
def test_shapes_and_dependence_on_every_input(name, config):
    head = make_head(name, config)
    x, t, cond = inputs(head)
    out = head(x, t, cond)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    assert not torch.allclose(head(x, t + 0.3, cond), out)  # depends on t
    assert not torch.allclose(head(x * 1.5, t, cond), out)  # depends on x
    if cond is not None:
        assert not torch.allclose(head(x, t, cond + 1.0), out)  # depends on cond
    # samples are independent: the first sample's output ignores the others
    torch.testing.assert_close(
        head(x[:1], t[:1], None if cond is None else cond[:1]), out[:1], rtol=1e-5, atol=1e-5
    )


def test_transformer_cond_length_is_free_and_optional():
    head = make_head("flow-transformer", "small")
    x, t, cond = inputs(head, length=9)
    assert head(x, t, cond).shape == x.shape
    assert head(x, t, cond[:, :2]).shape == x.shape
    assert head(x, t, None).shape == x.shape


def test_missing_vector_cond_raises():
    """A head built with cond_dim needs its cond (issue 15: None used to mean zeros)."""
    for head in (make_head("unet1d", "small"), make_head("mlp", "small", cond_dim=6)):
        x, t, cond = inputs(head)
        assert head(x, t, cond).shape == x.shape
        with pytest.raises(MissingConditionError, match="cond is None but this head was built"):
            head(x, t, None)
        with pytest.raises(ValueError):  # still a ValueError for existing handlers
            head(x, t, None)


def test_pi0_expert_structure_runs_at_reduced_depth():
    head = make_head("flow-transformer", "pi0-expert", depth=1)
    x, t, cond = inputs(head, batch=1, length=3)
    assert head(x, t, cond).shape == (1, 50, 32)


def test_unet_with_integer_timesteps_and_dp_structure():
    head = ConditionalUnet1D("small", down_dims=(16, 32, 64, 128), horizon=32, action_dim=7)
    x = torch.randn(2, 32, 7)
    out = head(x, torch.tensor([0, 999]), torch.randn(2, 32))
    assert out.shape == x.shape


def test_float64_heads():
    for name, config in SMALL:
        head = make_head(name, config).double()
        x, t, cond = inputs(head, dtype=torch.float64)
        assert head(x, t, cond).dtype == torch.float64


@pytest.mark.parametrize("name, config", SMALL)
def test_compiles_without_graph_breaks(name, config):
    head = make_head(name, config).eval()
    x, t, cond = inputs(head)
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, cond), head(x, t, cond))


# ----------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------
def test_bad_inputs_name_the_argument():
    head = make_head("flow-transformer", "small")
    x, t, cond = inputs(head)
    with pytest.raises(ValueError, match=r"x must have shape \[B, H, D\] = \[B, 50, 32\]"):
        head(x[:, :, :5], t, cond)
    with pytest.raises(ValueError, match=r"t must have shape \[B\] = \[3\]"):
        head(x, t[:, None], cond)
    with pytest.raises(ValueError, match=r"cond must have shape \[3, L, 256\]"):
        head(x, t, cond[..., :8])
    with pytest.raises(ValueError, match="cond must have x's dtype"):
        head(x, t, cond.double())
    mlp = MLPHead("small")
    with pytest.raises(ValueError, match="configured without conditioning"):
        mlp(*inputs(mlp)[:2], torch.randn(3, 4))
    unet = ConditionalUnet1D("small")
    x, t, cond = inputs(unet)
    with pytest.raises(ValueError, match=r"cond must have shape \[3, 32\]"):
        unet(x, t, cond[:, :3])


def test_bad_names_and_configs():
    with pytest.raises(ValueError, match="name must be one of"):
        make_head("resnet", "small")
    with pytest.raises(ValueError, match="config for 'unet1d' must be one of"):
        make_head("unet1d", "pi0-expert")
    with pytest.raises(ValueError, match="horizon"):
        make_head("unet1d", "dp", horizon=10)
    with pytest.raises(ValueError, match="num_kv_heads"):
        make_head("flow-transformer", "small", num_heads=3, num_kv_heads=2)


# ----------------------------------------------------------------------------------
# CUDA graphs (GPU only)
# ----------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("name, config", SMALL)
def test_heads_replay_in_a_cuda_graph(name, config):
    head = make_head(name, config).cuda().eval()
    x, t, cond = inputs(head, device="cuda")
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                head(x, t, cond)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = head(x, t, cond)
        x.copy_(torch.randn_like(x))
        t.copy_(torch.rand_like(t))
        graph.replay()
        torch.testing.assert_close(out, head(x, t, cond), rtol=1e-4, atol=1e-4)
