"""vae_spec (live and from config.json), LeRobot-exact normalisation, and the errors for
unsupported versions, policies and double patching."""

from __future__ import annotations

import lerobot
import numpy as np
import pytest
import torch
from tiny_policies import make_tiny_diffusion

from ate_fast import Steer
from ate_fast.errors import (
    InvalidArgumentError,
    UnsupportedPolicyError,
    UnsupportedVersionError,
)
from ate_fast.integrations.lerobot import (
    patch_policy,
    steer_policy,
    vae_spec,
    vae_spec_from_config,
)


def test_spec_diffusion_and_smolvla(smolvla, tmp_path):
    dp = make_tiny_diffusion(horizon=16, n_obs_steps=2, n_action_steps=8)
    spec = vae_spec(dp)
    assert (spec.horizon, spec.action_dim, spec.raw_action_dim) == (16, 2, 2)
    assert spec.normalization == "MIN_MAX" and spec.executed == (1, 9)
    assert spec.mask() is None
    s = vae_spec(smolvla)
    assert (s.horizon, s.action_dim, s.raw_action_dim) == (10, 32, 6)
    assert s.normalization == "MEAN_STD" and s.executed == (0, 5)
    assert s.mask().tolist() == [1.0] * 6 + [0.0] * 26
    # a saved policy's config.json gives the same spec (no LeRobot needed to read it)
    for policy, expected in ((dp, spec), (smolvla, s)):
        folder = tmp_path / policy.name
        policy.save_pretrained(folder)
        assert vae_spec_from_config(folder) == expected
        assert vae_spec_from_config(folder / "config.json") == expected


@pytest.mark.parametrize("mode", ["MIN_MAX", "MEAN_STD"])
def test_normalizer_matches_lerobot(mode):
    from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
    from lerobot.processor.normalize_processor import NormalizerProcessorStep

    rng = np.random.default_rng(0)
    stats = {"min": [-2.0, 0.5, 3.0], "max": [1.0, 0.5, 7.0],  # dim 1 constant
             "mean": [0.1, 0.5, 4.0], "std": [0.7, 0.0, 1.5]}  # fmt: skip
    step = NormalizerProcessorStep(
        features={"action": PolicyFeature(FeatureType.ACTION, (3,))},
        norm_map={FeatureType.ACTION: NormalizationMode(mode)},
        stats={"action": {k: np.asarray(v) for k, v in stats.items()}},
    )
    actions = torch.tensor(rng.uniform(-2, 7, (5, 3)), dtype=torch.float32)
    actions[:, 1] = 0.5
    ref = step._normalize_action(actions, inverse=False)
    spec = vae_spec(make_tiny_diffusion(action_dim=3))
    spec = type(spec)(spec.policy_type, spec.horizon, 3, 3, mode, spec.executed)
    normalizer = spec.normalizer({"action": stats})
    torch.testing.assert_close(normalizer.normalize(actions), ref, rtol=1e-6, atol=1e-6)
    round_trip = normalizer.unnormalize(normalizer.normalize(actions))
    torch.testing.assert_close(round_trip, actions, rtol=1e-5, atol=1e-5)


def test_unknown_version_refused(monkeypatch):
    policy = make_tiny_diffusion()
    monkeypatch.setattr(lerobot, "__version__", "0.3.3")
    with pytest.raises(UnsupportedVersionError, match=r"LeRobot 0\.3\.3 .*0\.4\.4"):
        patch_policy(policy)
    monkeypatch.setenv("ATE_FAST_LEROBOT_ANY_VERSION", "1")
    patch_policy(policy).remove()


def test_unsupported_policies_refused(tmp_path):
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.act.configuration_act import ACTConfig
    from lerobot.policies.act.modeling_act import ACTPolicy

    config = ACTConfig(
        device="cpu", push_to_hub=False,
        input_features={"observation.environment_state": PolicyFeature(FeatureType.ENV, (4,))},
        output_features={"action": PolicyFeature(FeatureType.ACTION, (2,))},
        dim_model=16, n_heads=2, dim_feedforward=32, n_encoder_layers=1, n_decoder_layers=1,
        chunk_size=4, n_action_steps=4, use_vae=False,
    )  # fmt: skip
    act = ACTPolicy(config)
    with pytest.raises(UnsupportedPolicyError, match=r"ACTPolicy .*'act'.*diffusion, smolvla"):
        patch_policy(act)
    with pytest.raises(UnsupportedPolicyError, match="must be a LeRobot policy"):
        patch_policy(torch.nn.Linear(2, 2))
    act.save_pretrained(tmp_path / "act")
    with pytest.raises(UnsupportedPolicyError, match="'act' is not supported"):
        vae_spec_from_config(tmp_path / "act")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        vae_spec_from_config(tmp_path / "bad.json")


def test_unsupported_settings_refused():
    policy = make_tiny_diffusion()
    policy.diffusion.noise_scheduler.register_to_config(timestep_spacing="trailing")
    with pytest.raises(UnsupportedPolicyError, match="timestep_spacing='trailing'"):
        patch_policy(policy)


def test_double_patch_and_bad_arguments(smolvla):
    with patch_policy(smolvla):
        with pytest.raises(InvalidArgumentError, match="already patched"):
            patch_policy(smolvla)
    patch_policy(smolvla).remove()  # removed: patchable again
    with pytest.raises(TypeError, match=r"steer must be an ate_fast\.Steer"):
        steer_policy(smolvla, object())
    with pytest.raises(TypeError, match="capture must be a bool"):
        patch_policy(smolvla, capture="yes")
    with pytest.raises(TypeError, match="guidance must follow"):
        patch_policy(smolvla, guidance=object())
    assert "sample_actions" not in smolvla.model.__dict__
    assert Steer  # the public name the error message points to
