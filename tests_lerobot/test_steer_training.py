"""steer_policy: LeRobot's losses with Steer's correction — equal at scale 0, different
otherwise; training steps (LeRobot's own update_policy) move the policy, never the VAE."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_policies import diffusion_train_batch, make_tiny_diffusion, smolvla_train_batch

from ate_fast import ActionVAE, Steer
from ate_fast.errors import InvalidArgumentError
from ate_fast.integrations.lerobot import steer_policy, vae_spec


def _vae(policy, seed=0):
    spec = vae_spec(policy)
    torch.manual_seed(seed)
    return ActionVAE(spec.action_dim, spec.horizon, latent_dim=8, arch="mlp", hidden_dims=(32,))


def _loss(policy, batch, seed, **kwargs):
    torch.manual_seed(seed)
    return policy.forward(dict(batch), **kwargs)[0].detach()


@pytest.mark.parametrize("mask_padding", [False, True])
def test_diffusion_loss_equal_at_scale_zero(mask_padding):
    policy = make_tiny_diffusion(do_mask_loss_for_padding=mask_padding).train()
    batch = diffusion_train_batch(policy, batch_size=3)
    ref = _loss(policy, batch, seed=0)
    with steer_policy(policy, Steer(_vae(policy), scale=0.0)) as patch:
        same = _loss(policy, batch, seed=0)
        assert set(patch.diagnostics) == {"grad_norm", "clamp_fraction", "correction_ratio"}
    assert torch.equal(same, ref)
    with steer_policy(policy, Steer.recommended(_vae(policy), clamp=10.0)):
        steered = _loss(policy, batch, seed=0)
    assert abs(float(steered - ref)) > 1e-4 * abs(float(ref))


def test_smolvla_loss_equal_at_scale_zero(smolvla):
    smolvla.train()
    batch = smolvla_train_batch(smolvla, batch_size=2)
    spec = vae_spec(smolvla)
    ref = _loss(smolvla, batch, seed=0)
    ref_none = _loss(smolvla, batch, seed=0, reduction="none")
    with steer_policy(smolvla, Steer(_vae(smolvla), scale=0.0, mask=spec.mask())) as patch:
        same = _loss(smolvla, batch, seed=0)
        same_none = _loss(smolvla, batch, seed=0, reduction="none")
        assert float(patch.diagnostics["grad_norm"]) > 0
    assert torch.equal(same, ref) and torch.equal(same_none, ref_none)
    assert same_none.shape == (2,)  # LeRobot's per-sample reduction still applies
    steer = Steer.recommended(_vae(smolvla), clamp=10.0, mask=spec.mask())
    with steer_policy(smolvla, steer):
        steered = _loss(smolvla, batch, seed=0)
    assert abs(float(steered - ref)) > 1e-4 * abs(float(ref))


def _update_steps(policy, batch_fn, steer, steps=3):
    """``steps`` of LeRobot's own training step (lerobot-train's update_policy)."""
    from accelerate import Accelerator
    from lerobot.scripts.lerobot_train import update_policy
    from lerobot.utils.logging_utils import AverageMeter, MetricsTracker

    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-3)
    metrics = {n: AverageMeter(n) for n in ("loss", "grad_norm", "lr", "update_s")}
    tracker = MetricsTracker(2, 100, 10, metrics)
    with steer_policy(policy, steer) as patch:
        for i in range(steps):
            tracker, _ = update_policy(
                tracker, policy, batch_fn(policy, batch_size=2, seed=i), optimizer, 1.0,
                accelerator,
            )  # fmt: skip
            assert torch.isfinite(torch.tensor(tracker.loss.val))
    return patch


@pytest.mark.parametrize("kind", ["diffusion", "smolvla"])
def test_training_moves_policy_not_vae(kind, smolvla):
    if kind == "diffusion":
        policy, batch_fn = make_tiny_diffusion(), diffusion_train_batch
    else:
        policy, batch_fn = smolvla, smolvla_train_batch
    vae = _vae(policy)
    vae_before = copy.deepcopy(vae.state_dict())
    trainable = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    steer = Steer.recommended(vae, mask=vae_spec(policy).mask())
    _update_steps(policy, batch_fn, steer)
    moved = [n for n, p in policy.named_parameters() if n in trainable
             and not torch.equal(p, trainable[n])]  # fmt: skip
    assert len(moved) > len(trainable) // 2
    for name, value in vae.state_dict().items():
        assert torch.equal(value, vae_before[name]), name
    assert all(p.grad is None for p in vae.parameters())


def test_compiled_policy():
    """A torch.compile'd policy: the steer loss runs through dynamo and equals eager."""
    policy = make_tiny_diffusion().train()
    batch = diffusion_train_batch(policy, batch_size=2)
    steer = Steer.recommended(_vae(policy), clamp=10.0)
    with steer_policy(policy, steer):
        eager = _loss(policy, batch, seed=0)
    compiled = torch.compile(policy, backend="aot_eager")
    with steer_policy(compiled, steer):
        out = _loss(compiled, batch, seed=0)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-7)


def test_smolvla_compiled_and_run_before_patching(smolvla):
    """A SmolVLA compiled and run once before steer_policy: the steer loss must run, equal
    to eager (a forward hook that tapped v_t was never called: torch.compile ignores hooks
    added after it traced the module), and again after remove() and a second patch."""
    import torch._dynamo

    smolvla.train()
    batch = smolvla_train_batch(smolvla, batch_size=2)
    steer = Steer.recommended(_vae(smolvla), clamp=10.0, mask=vae_spec(smolvla).mask())
    with steer_policy(smolvla, steer):
        eager = _loss(smolvla, batch, seed=0)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(smolvla, backend="eager")
        plain = _loss(compiled, batch, seed=0)  # traced unpatched
        for _ in range(2):
            with steer_policy(compiled, steer):
                torch.testing.assert_close(_loss(compiled, batch, seed=0), eager)
        assert torch.equal(_loss(compiled, batch, seed=0), plain)  # removed: LeRobot's again
    finally:
        torch._dynamo.reset()


def test_steer_must_fit_the_policy(smolvla):
    """A Steer that does not fit was accepted: without a mask (or one open on the padded
    dims) SmolVLA's 26 padding dims got as much guidance as the robot's; a VAE of another
    horizon failed only at the first forward, with the encoder's shape error."""
    spec = vae_spec(smolvla)
    vae = _vae(smolvla)
    with pytest.raises(InvalidArgumentError, match="has no mask, but the policy pads its"):
        steer_policy(smolvla, Steer(vae))
    with pytest.raises(InvalidArgumentError, match=r"must be \[D = 32\]"):
        steer_policy(smolvla, Steer(vae, mask=torch.tensor(1.0)))  # was a bare IndexError
    open_mask = torch.ones(spec.action_dim)
    with pytest.raises(InvalidArgumentError, match="0 past the robot's dims"):
        steer_policy(smolvla, Steer(vae, mask=open_mask))
    short = ActionVAE(spec.action_dim, spec.horizon - 1, latent_dim=8, arch="mlp",
                      hidden_dims=(32,))  # fmt: skip
    with pytest.raises(InvalidArgumentError, match=rf"predicts \[B, {spec.horizon}, "):
        steer_policy(smolvla, Steer(short, mask=spec.mask()))
    assert "_ate_fast_patch" not in smolvla.model.__dict__  # nothing left patched
    narrower = spec.mask().clone()
    narrower[0] = 0.0  # guiding fewer of the robot's dims is the user's choice
    steer_policy(smolvla, Steer(vae, mask=narrower)).remove()


def test_encoder_on_another_device_is_named(smolvla):
    """The encoder left on another device than the policy's batch (the docs' example
    loaded the VAE on the CPU beside a GPU policy) fails with what to do."""
    smolvla.train()
    batch = smolvla_train_batch(smolvla, batch_size=2)
    vae = _vae(smolvla).to("meta")
    with steer_policy(smolvla, Steer(vae, mask=vae_spec(smolvla).mask())):
        with pytest.raises(InvalidArgumentError, match="its encoder is on meta, the policy"):
            _loss(smolvla, batch, seed=0)


@pytest.mark.parametrize("kind", ["diffusion", "smolvla"])
def test_a_patched_policy_refuses_copy_and_pickle(kind, smolvla):
    """A deep copy of a patched policy ran the original's patched methods (its gradients
    went to the original); torch.save(policy) failed on a local function."""
    import io

    policy = make_tiny_diffusion() if kind == "diffusion" else smolvla
    steer = Steer(_vae(policy), mask=vae_spec(policy).mask())
    with steer_policy(policy, steer):
        with pytest.raises(InvalidArgumentError, match="cannot be deep-copied"):
            copy.deepcopy(policy)
        with pytest.raises(InvalidArgumentError, match=r"cannot be pickled .*save_pretrained"):
            torch.save(policy, io.BytesIO())
    copy.deepcopy(policy)  # removed: copies as before
    torch.save(policy, io.BytesIO())


def test_a_ddp_wrapped_policy(tmp_path):
    """accelerate's prepare() returns DistributedDataParallel on several GPUs: steer_policy
    refused it as 'not a LeRobot policy'; it now patches the policy inside."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)  # fmt: skip
    try:
        policy = make_tiny_diffusion().train()
        batch = diffusion_train_batch(policy, batch_size=2)
        steer = Steer.recommended(_vae(policy), clamp=10.0)
        with steer_policy(policy, steer):
            plain = _loss(policy, batch, seed=0)
        ddp = torch.nn.parallel.DistributedDataParallel(policy)
        assert vae_spec(ddp) == vae_spec(policy)
        with steer_policy(ddp, steer):
            assert torch.equal(_loss(ddp.module, batch, seed=0), plain)
            torch.manual_seed(0)
            assert torch.equal(ddp(dict(batch))[0].detach(), plain)
    finally:
        dist.destroy_process_group()


def test_a_peft_wrapped_smolvla(smolvla, tmp_path):
    """``lerobot-train --peft`` wraps the policy in PEFT's PeftModel with LoRA on SmolVLA's
    default targets — ``action_out_proj``, the layer whose output Steer taps, among them.
    steer_policy sees through the wrapper and taps the LoRA layer: at initialisation
    (LoRA's B = 0) the steered loss equals the unwrapped policy's, a backward pass reaches
    the adapters only, and removing the patch restores the wrapped policy's loss."""
    smolvla.train()
    batch = smolvla_train_batch(smolvla, batch_size=2)
    spec = vae_spec(smolvla)
    steer = Steer.recommended(_vae(smolvla), clamp=10.0, mask=spec.mask())
    plain = _loss(smolvla, batch, seed=0)
    with steer_policy(smolvla, steer):
        steered = _loss(smolvla, batch, seed=0)
    smolvla.save_pretrained(tmp_path)  # PEFT fine-tunes a saved policy (LeRobot checks)
    smolvla.config.pretrained_path = str(tmp_path)
    peft_model = smolvla.wrap_with_peft()  # LeRobot's own wrapping, its default targets
    assert type(smolvla.model.action_out_proj).__module__.startswith("peft")
    assert vae_spec(peft_model) == spec
    with steer_policy(peft_model, steer):
        torch.manual_seed(0)
        loss = peft_model(dict(batch))[0]
        assert torch.equal(loss.detach(), steered)
        loss.backward()
    lora = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    assert lora and any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    assert all(p.grad is None for n, p in peft_model.named_parameters() if "lora_" not in n)
    torch.manual_seed(0)
    assert torch.equal(peft_model(dict(batch))[0].detach(), plain)
