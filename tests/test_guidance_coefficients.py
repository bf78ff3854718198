"""The public guidance coefficients (ATE_METHOD.md, Stage 3) called directly: the table's
values in float64, ``c`` finite at the divergent ends in every floating dtype (a half type
cannot hold 1/DENOMINATOR_FLOOR: computed in float32), and bad input named."""

from __future__ import annotations

import pytest
import torch

from ate_fast.errors import ArgumentTypeError, InvalidArgumentError
from ate_fast.guidance import diffusion_guidance_coefficient, flow_guidance_coefficient


def test_the_table_in_float64():
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(flow_guidance_coefficient(t, "openpi"), -t / (1 - t))
    torch.testing.assert_close(flow_guidance_coefficient(t, "paper"), (1 - t) / t)
    ab = torch.tensor([0.2, 0.7], dtype=torch.float64)
    torch.testing.assert_close(diffusion_guidance_coefficient(ab, "epsilon"), -(1 - ab).sqrt())
    torch.testing.assert_close(diffusion_guidance_coefficient(ab, "sample"), (1 - ab) / ab.sqrt())
    torch.testing.assert_close(
        diffusion_guidance_coefficient(ab, "v_prediction"), -((1 - ab) / ab).sqrt()
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_finite_at_the_divergent_ends(dtype):
    ends = [
        flow_guidance_coefficient(torch.tensor([1.0, 0.9999], dtype=dtype), "openpi"),
        flow_guidance_coefficient(torch.tensor([0.0], dtype=dtype), "paper"),
        diffusion_guidance_coefficient(torch.tensor([0.0], dtype=dtype), "sample"),
        diffusion_guidance_coefficient(torch.tensor([0.0], dtype=dtype), "v_prediction"),
    ]
    for c in ends:  # float16 overflowed to ±inf here, and c·0 was NaN
        assert c.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert torch.isfinite(c).all() and torch.isfinite(c * 0).all()


def test_bad_input_is_named():
    with pytest.raises(ArgumentTypeError, match=r"t must be a floating torch\.Tensor"):
        flow_guidance_coefficient(0.5)
    with pytest.raises(ArgumentTypeError, match=r"alpha_bar must be a floating torch\.Tensor"):
        diffusion_guidance_coefficient(torch.tensor([1]), "epsilon")
    with pytest.raises(InvalidArgumentError, match="convention must be one of"):
        flow_guidance_coefficient(torch.tensor([0.5]), "diffusers")
    with pytest.raises(InvalidArgumentError, match="prediction_type must be one of"):
        diffusion_guidance_coefficient(torch.tensor([0.5]), "flow")
