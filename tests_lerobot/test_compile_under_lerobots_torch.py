"""The reference heads compile as one graph under the torch LeRobot pins (< 2.11; the main
environment has 2.13): torch 2.10's Dynamo could not trace ``PrefixCache.length`` (a
property of a NamedTuple) and broke the flow transformer's graph there — an error under
``fullgraph=True``, a slower call under ``torch.compile(mode=...)`` — though 2.11 and 2.13
traced it. A user of ate_fast beside LeRobot compiles the head on this torch."""

from __future__ import annotations

import pytest
import torch

from ate_fast.models import FlowTransformerHead, make_head

HEADS = [("flow-transformer", "small"), ("unet1d", "small"), ("mlp", "small")]


def _inputs(head, batch: int = 2, length: int = 5):
    gen = torch.Generator().manual_seed(0)
    cfg = head.config
    x = torch.randn(batch, cfg.horizon, cfg.action_dim, generator=gen)
    t = torch.rand(batch, generator=gen)
    cond = None
    if isinstance(head, FlowTransformerHead):
        cond = torch.randn(batch, length, cfg.width, generator=gen)
    elif cfg.cond_dim:
        cond = torch.randn(batch, cfg.cond_dim, generator=gen)
    return x, t, cond


@pytest.mark.parametrize("kind, config", HEADS)
def test_head_compiles_as_one_graph(kind, config):
    torch.manual_seed(0)
    head = make_head(kind, config).eval()
    x, t, cond = _inputs(head)
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, cond), head(x, t, cond))


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_flow_transformer_on_a_prefix_cache_compiles_as_one_graph(padded):
    """The π0 way: the prefix as per-block keys and values (and openpi's padding mask)."""
    torch.manual_seed(0)
    head = make_head("flow-transformer", "small").eval()
    x, t, tokens = _inputs(head)
    mask = None
    if padded:
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool)
        mask[0, -2:] = False
    with torch.no_grad():
        cache = head.prefix_cache(tokens, mask)
        compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x, t, cache), head(x, t, cache))
