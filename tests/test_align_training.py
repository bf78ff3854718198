"""Trainers: learning, exact resume, checkpoints, stage-2 init, and the point of stage 2."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from _align_fixtures import synthetic_episodes

from ate_fast.align import (
    ActionVAE,
    CheckpointError,
    LatentPrior,
    Stage1Config,
    Stage2Config,
    load_checkpoint,
    train_stage1,
    train_stage2,
)
from ate_fast.align.checkpoint import RESUME_FILE
from ate_fast.data import ActionChunkDataset

CPU = "cpu"  # CI is CPU-only; resume is bitwise there (GPU kernels need not be)


# Tiny models: one intra-op thread is fastest and immune to a busy CI core.
pytestmark = pytest.mark.usefixtures("one_thread")


def _quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*args, **kwargs)


def _dataset(n=12, dim=3, horizon=6, seed=0, **kw):
    return ActionChunkDataset(
        synthetic_episodes(n, dim, length=(20, 30), seed=seed), horizon=horizon, **kw
    )


def _mlp(dim=3, horizon=6, latent=4, seed=0):
    torch.manual_seed(seed)
    return ActionVAE(dim, horizon, latent, arch="mlp", hidden_dims=(32, 32))


def _tiny_transformer(dim=3, horizon=6, latent=8, seed=0, dropout=0.1):
    torch.manual_seed(seed)
    return ActionVAE(
        dim, horizon, latent, d_model=8, num_heads=2, ff_dim=16, num_layers=3, dropout=dropout
    )


def test_stage1_learns_and_writes_a_complete_checkpoint(tmp_path):
    ds = _dataset(action_dim=5, dim_index=[4, 0, 2])
    cfg = Stage1Config(
        device=CPU,
        out_dir=str(tmp_path / "pre"),
        epochs=12,
        batch_size=32,
        lr=3e-3,
        progress=False,
    )
    result = _quiet(train_stage1, _mlp(dim=5), ds, cfg)
    hist = result.history
    assert len(hist) == 12 and [h["epoch"] for h in hist] == list(range(1, 13))
    assert hist[-1]["recon"] < 0.5 * hist[0]["recon"], (hist[0]["recon"], hist[-1]["recon"])
    assert hist[-1]["val_recon_mu"] < hist[0]["val_recon_mu"]
    assert all(h["chunks_per_s"] > 0 for h in hist)
    ckpt = load_checkpoint(tmp_path / "pre")
    assert ckpt.stage == 1 and ckpt.prior is None
    assert ckpt.normalizer.to_dict() == ds.normalizer.to_dict()
    assert ckpt.action_space.dim_index.tolist() == [4, 0, 2]
    a, m = ds.gather(range(8))
    result.vae.eval()
    torch.testing.assert_close(ckpt.vae.encode(a, m), result.vae.encode(a, m), rtol=0, atol=0)
    rows = (tmp_path / "pre" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,global_step,lr,loss") and len(rows) == 13
    records = [json.loads(x) for x in (tmp_path / "pre" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["split"] == "epoch"] == list(range(1, 13))
    config = json.loads((tmp_path / "pre" / "config.json").read_text())
    assert config["train"]["beta"] == 7.5e-5 and config["vae"]["arch"] == "mlp"


def test_learning_rate_decays_per_epoch_to_the_floor():
    cfg = Stage1Config(
        device=CPU,
        epochs=5,
        batch_size=32,
        lr=1e-3,
        lr_gamma=0.5,
        lr_floor=2e-4,
        progress=False,
        val_fraction=0.0,
    )
    hist = _quiet(train_stage1, _mlp(), _dataset(), cfg).history
    assert [h["lr"] for h in hist] == pytest.approx([1e-3, 5e-4, 2.5e-4, 2e-4, 2e-4])


def test_resume_mid_epoch_is_bitwise_identical(tmp_path):
    """Stage 2 with a GMM prior (Monte-Carlo KL) and dropout: every RNG stream matters."""
    ds = _dataset()
    prior = LatentPrior(
        torch.tensor([0.5, 0.5]), torch.randn(2, 8), torch.full((2, 8), 0.5), kind="gmm"
    )

    def cfg(out, **kw):
        return Stage2Config(
            device=CPU,
            out_dir=str(tmp_path / out),
            epochs=3,
            batch_size=16,
            lr=1e-3,
            progress=False,
            save_every_minutes=None,
            log_every_steps=2,
            **kw,
        )

    full = _quiet(train_stage2, _tiny_transformer(), ds, prior, cfg("full"))
    part = _quiet(train_stage2, _tiny_transformer(), ds, prior, cfg("part", max_steps=11))
    steps_per_epoch = len(full.step_losses) // 3
    assert 11 % steps_per_epoch != 0  # the interruption is part-way through an epoch
    assert len(part.step_losses) == 11
    again = _quiet(
        train_stage2, _tiny_transformer(seed=3), ds, prior, cfg("part", max_steps=11, resume=True)
    )
    assert again.step_losses == []  # already at max_steps: nothing to do
    for a, b in zip(part.vae.parameters(), again.vae.parameters()):
        assert torch.equal(a, b)
    # a differently initialised model: everything must come from the resume state
    rest = _quiet(train_stage2, _tiny_transformer(seed=7), ds, prior, cfg("part", resume=True))
    for (name, a), (_, b) in zip(full.vae.state_dict().items(), rest.vae.state_dict().items()):
        assert torch.equal(a, b), name
    assert part.step_losses + rest.step_losses == full.step_losses
    for h_full, h_rest in zip(full.history, rest.history):
        for key in ("loss", "recon", "kl", "mmd", "val_loss", "val_prior_logp", "lr"):
            assert h_rest[key] == pytest.approx(h_full[key], rel=1e-9), key
    records = [
        json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["epoch"] for r in records if r["split"] == "epoch"] == [1, 2, 3]
    steps = [r["global_step"] for r in records if r["split"] == "step"]
    assert steps == sorted(set(steps))  # nothing logged twice


class _Jittered(torch.utils.data.Dataset):
    """Chunks with augmentation noise drawn from torch's and NumPy's global generators."""

    def __init__(self):
        self.chunks = torch.randn(48, 6, 3, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.chunks)

    def __getitem__(self, i):
        jitter = torch.randn(6, 3) + torch.from_numpy(np.random.standard_normal((6, 3)))  # noqa: NPY002
        return self.chunks[i] + 0.1 * jitter.float()


def test_resume_with_loader_workers_and_augmentation(tmp_path):
    """num_workers > 0 and a dataset that draws random numbers: an interrupted run
    (part-way through an epoch, and at an epoch's end) resumes to the uninterrupted run's
    steps, and the steps do not depend on the number of workers."""

    def run(out, workers=2, model_seed=0, **kw):
        cfg = Stage1Config(
            device=CPU, out_dir=str(tmp_path / out), epochs=2, batch_size=12, lr=1e-3,
            val_fraction=0.0, num_workers=workers, progress=False, save_every_minutes=None,
            overwrite=not kw.get("resume"), **kw,
        )  # fmt: skip
        return _quiet(train_stage1, _mlp(seed=model_seed), _Jittered(), cfg).step_losses

    full = run("full")  # 4 steps per epoch
    assert run("one_worker", workers=1) == full
    for stop in (2, 4):
        part = run(f"part{stop}", max_steps=stop)
        rest = run(f"part{stop}", model_seed=7, resume=True)
        assert part + rest == full, stop


def test_existing_checkpoint_needs_resume_or_overwrite(tmp_path):
    cfg = Stage1Config(
        device=CPU, out_dir=str(tmp_path / "x"), epochs=1, batch_size=32, progress=False
    )
    _quiet(train_stage1, _mlp(), _dataset(), cfg)
    with pytest.raises(FileExistsError, match="pass resume=True to continue it or overwrite=True"):
        _quiet(train_stage1, _mlp(), _dataset(), cfg)
    cfg.overwrite = True
    _quiet(train_stage1, _mlp(), _dataset(), cfg)


def test_corrupt_or_torn_checkpoints_are_refused(tmp_path):
    cfg = Stage1Config(
        device=CPU, out_dir=str(tmp_path / "c"), epochs=1, batch_size=32, progress=False
    )
    _quiet(train_stage1, _mlp(), _dataset(), cfg)
    weights = tmp_path / "c" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-3] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=r"does not match the hash in config\.json"):
        load_checkpoint(tmp_path / "c")
    (tmp_path / "c" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt JSON"):
        load_checkpoint(tmp_path / "c")
    with pytest.raises(CheckpointError, match="not an align checkpoint"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "c" / RESUME_FILE).write_bytes(b"garbage")
    cfg.resume = True
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        _quiet(train_stage1, _mlp(), _dataset(), cfg)


def test_stage2_starts_from_stage1_weights(tmp_path):
    ds = _dataset()
    s1 = Stage1Config(
        device=CPU, out_dir=str(tmp_path / "pre"), epochs=2, batch_size=32, progress=False
    )
    pre = _quiet(train_stage1, _mlp(), ds, s1)
    prior = LatentPrior.fit(pre.vae, ds, progress=False)
    s2 = Stage2Config(
        device=CPU,
        epochs=1,
        max_steps=1,
        batch_size=32,
        lr=1e-12,
        weight_decay=0.0,
        progress=False,
        init_from=str(tmp_path / "pre"),
    )
    adapted = _quiet(train_stage2, _mlp(seed=5), ds, prior, s2)
    for a, b in zip(pre.vae.parameters(), adapted.vae.parameters()):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match=r"init_from: .* does not match this one"):
        _quiet(train_stage2, ActionVAE(3, 6, 4, arch="mlp", hidden_dims=(16,)), ds, prior, s2)


def _adaptation_latents(kl: str, beta: float, gamma: float, epochs: int):
    """Train a stage-2 VAE with a two-mode prior; return mean log p_pre(μ) and the μ."""
    prior = LatentPrior(
        torch.tensor([0.5, 0.5]),
        torch.tensor([[-3.0, 0.0], [3.0, 0.0]]),
        torch.full((2, 2), 0.05),
        kind="gmm",
    )
    data = torch.randn(256, 4, 2, generator=torch.Generator().manual_seed(123))
    torch.manual_seed(0)
    vae = ActionVAE(2, 4, 2, arch="mlp", hidden_dims=(32, 32))
    cfg = Stage2Config(
        device=CPU,
        epochs=epochs,
        batch_size=64,
        lr=3e-3,
        lr_gamma=1.0,
        beta=beta,
        gamma=gamma,
        kl=kl,
        val_fraction=0.0,
        progress=False,
    )
    vae = _quiet(train_stage2, vae, data, prior, cfg).vae.eval()
    with torch.no_grad():
        mu, _ = vae.encode(data)
    return prior.log_prob(mu).mean().item(), mu, prior


def test_reverse_kl_puts_adaptation_latents_inside_the_prior_modes():
    """The point of stage 2: KL(q‖p_pre) is mode-seeking, KL(p_pre‖q) mass-covering.

    With the released β = 7.5e-5 the KL term is too weak to shape a short run (the MMD
    term dominates), so the KL direction is isolated here: β = 1, γ = 0, 200 steps each.
    """
    rev_logp, rev_mu, prior = _adaptation_latents("reverse", beta=1.0, gamma=0.0, epochs=50)
    fwd_logp, fwd_mu, _ = _adaptation_latents("forward", beta=1.0, gamma=0.0, epochs=50)
    between = prior.log_prob(torch.zeros(1, 2)).item()  # the midpoint: ≈ −90 nats
    mode = prior.log_prob(torch.tensor([[3.0, 0.0]])).item()  # a mode's centre: ≈ 0.5 nats
    assert rev_logp > mode - 3.0, (rev_logp, mode)  # inside a mode
    assert fwd_logp < rev_logp - 30.0, (fwd_logp, rev_logp)  # spread between the modes
    assert rev_mu[:, 0].abs().mean() > 2.5 and fwd_mu[:, 0].abs().mean() < 1.0
    assert fwd_logp > between  # forward KL covers the mass, it does not sit at the midpoint


def test_precision_choices_on_cpu():
    cfg = Stage1Config(device=CPU, epochs=1, batch_size=32, precision="fp16", progress=False)
    with pytest.raises(ValueError, match="precision: 'fp16' needs a CUDA device"):
        _quiet(train_stage1, _mlp(), _dataset(), cfg)
    cfg = Stage1Config(device=CPU, epochs=1, batch_size=32, precision="bf16", progress=False)
    hist = _quiet(train_stage1, _mlp(), _dataset(), cfg).history
    assert torch.isfinite(torch.tensor(hist[-1]["loss"]))


def test_batch_larger_than_the_data():
    with pytest.raises(ValueError, match=r"batch_size=4096 is larger than the \d+ training chunks"):
        _quiet(
            train_stage1,
            _mlp(),
            _dataset(),
            Stage1Config(device=CPU, batch_size=4096, progress=False),
        )
    with pytest.raises(ValueError, match="lr: expected a finite value > 0"):
        _quiet(train_stage1, _mlp(), _dataset(), Stage1Config(device=CPU, lr=0.0))


@pytest.mark.parametrize(
    "field", ["lr", "lr_gamma", "lr_floor", "grad_clip", "save_every_minutes", "weight_decay",
              "beta", "gamma"],
)  # fmt: skip
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_config_refuses_nan_and_inf(field, value):
    """Every comparison is False for NaN: `value <= 0` let `--beta nan` train to NaN weights."""
    with pytest.raises(ValueError, match=f"^{field}: expected a finite value"):
        Stage1Config(device=CPU, **{field: value}).validate()


def test_mask_padding_leaves_padded_steps_out_of_training(tmp_path, monkeypatch):
    """Stage 1 and 2 on ``step_mask=True`` data: each training and validation loss gets
    every batch's real steps (0 exactly on the padded ones, as the dataset marks them),
    the logged reconstruction differs from the unmasked run's, and the checkpoint and the
    resume state record the chunking."""
    from ate_fast.align import trainer

    kw = dict(n=6, horizon=8, seed=3)
    masked, plain = _dataset(step_mask=True, **kw), _dataset(**kw)
    assert masked.padded_chunks > 0
    seen = []
    for name in ("stage1_loss", "stage2_loss"):
        real = getattr(trainer, name)

        def record(out, target, *args, _real=real, **kwargs):
            seen.append((target.shape, kwargs.get("steps")))
            return _real(out, target, *args, **kwargs)

        monkeypatch.setattr(trainer, name, record)
    cfg = dict(epochs=2, batch_size=16, val_fraction=0.3, seed=0, device=CPU, progress=False)
    recon = {}
    for name, data in (("masked", masked), ("plain", plain)):
        seen.clear()
        out = str(tmp_path / name)
        res = _quiet(train_stage1, _mlp(horizon=8), data, Stage1Config(out_dir=out, **cfg))
        recon[name] = res.history[-1]["recon"]
        steps = [st for _, st in seen]
        if name == "plain":
            assert all(st is None for st in steps)
            continue
        assert len(steps) > 4 and all(st is not None for st in steps)
        for shape, st in seen:
            assert st.shape == shape[:2] and set(st.unique().tolist()) <= {0.0, 1.0}
            # a chunk's real steps come first: padding only at its end
            assert torch.equal(st, st.sort(dim=1, descending=True).values)
        assert any((st == 0).any() for st in steps)  # some batch had padding
        assert load_checkpoint(out).config["chunking"]["step_mask"] is True
    assert recon["masked"] != pytest.approx(recon["plain"], rel=1e-6)
    ckpt = load_checkpoint(tmp_path / "masked")
    prior = LatentPrior.fit(ckpt.vae, masked, kind="gaussian", batch_size=16)  # triples too
    seen.clear()
    cfg2 = dict(cfg, epochs=1)
    _quiet(train_stage2, ckpt.vae, masked, prior, Stage2Config(out_dir=None, **cfg2))
    assert seen and all(st is not None for _, st in seen)
    # resuming with the chunks cut otherwise (the padding now counted) says so
    part = dict(cfg, out_dir=str(tmp_path / "part"), epochs=3)
    _quiet(train_stage1, _mlp(horizon=8), masked, Stage1Config(max_steps=1, **part))
    with pytest.warns(UserWarning, match="resume: the run's chunks were cut as .*step_mask"):
        _quiet(train_stage1, _mlp(horizon=8), plain, Stage1Config(resume=True, **part))
