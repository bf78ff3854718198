"""The block's attention on torch's compiled FlexAttention
(``ATE_FAST_PREFIX_ATTENTION=flex``, ``ate_fast.models.flex_prefix_attention``): the rows
regrouped as query heads of one key/value head against SDPA (float32, bf16), with several
key/value heads (the grouping must keep each row on its own head), inside the head and its
captured sampler, and where SDPA runs instead. On the CPU through Inductor's C++ backend.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from flow_head_paths import assert_path_matches, prefix_qkv, small_head  # tests/ is on sys.path

from ate_fast.errors import BackendUnavailableError
from ate_fast.models import flex_prefix_attention as flex
from ate_fast.models import split_kv_attention

if flex.unavailable_reason() is not None:  # pragma: no cover - torch < 2.5 only
    pytest.skip(flex.unavailable_reason(), allow_module_level=True)

ENV = split_kv_attention.ENV_VAR


@pytest.fixture
def selected(monkeypatch):
    monkeypatch.setenv(ENV, "flex")
    return monkeypatch


def test_query_heads():
    assert flex.query_heads(400) == 8  # π0: its own 8 heads of 50 rows
    assert flex.query_heads(50) == 1
    assert flex.query_heads(130) == 5  # 26 rows each
    assert flex.query_heads(131) == 131  # a prime: one row each


@pytest.mark.parametrize(
    ("batch", "kv_heads", "rows", "keys", "hd"), [(1, 1, 400, 90, 32), (2, 2, 130, 40, 16)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_sdpa(dtype, batch, kv_heads, rows, keys, hd):
    q, k, v = prefix_qkv(batch, kv_heads, rows, keys, hd, dtype)
    got = flex.flex_prefix_attention(q, k, v)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert got.shape == q.shape and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_where_sdpa_runs_instead(selected):
    q, k, v = prefix_qkv(1, 1, 8, 20, 16, torch.float32)
    takes = split_kv_attention.takes
    assert takes(q, k, v, None, "flex") and not takes(q, k, v, None)  # not split_kv's
    assert not takes(q, k, v, torch.zeros(1, 1, 8, 20), "flex")  # a mask
    assert not takes(q.double(), k.double(), v.double(), None, "flex")  # no float64 kernel
    q2, k2, v2 = prefix_qkv(2, 1, 8, 20, 16, torch.float32)
    strided = torch.cat([q2, q2], dim=1)[:, :1]  # unit last stride, not contiguous
    assert takes(q2, k2, v2, None, "flex") and not takes(strided, k2, v2, None, "flex")
    with torch.enable_grad():
        assert not takes(q.requires_grad_(True), k, v, None, "flex")


def test_a_torch_without_flex_attention_is_named(selected, monkeypatch):
    monkeypatch.setattr(flex, "flex_attention", None)
    q, k, v = prefix_qkv(1, 1, 8, 20, 16, torch.float32)
    with pytest.raises(BackendUnavailableError, match="ATE_FAST_PREFIX_ATTENTION=flex: torch"):
        split_kv_attention.prefix_attention(q, k, v)


def test_head_and_captured_sampler_match_sdpa(selected):
    """float32: the head's forward and input-VJP with a prefix cache, and a captured Euler
    loop, equal SDPA's to float32 rounding; FlexAttention ran in every block."""
    assert_path_matches(selected, ENV, "flex", "sdpa", flex, "flex_prefix_attention",
                        small_head(torch.float32), 1e-5)  # fmt: skip


@pytest.mark.cuda
def test_pi0_step_on_cuda():
    """π0's block at B = 1 and 2 in bf16: 400 rows against 866 keys of 256 dims."""
    for batch in (1, 2):
        q, k, v = prefix_qkv(batch, 1, 400, 866, 256, torch.bfloat16, "cuda")
        got = flex.flex_prefix_attention(q, k, v)
        want = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)
