"""``ate-fast align stage1 | prior | stage2`` end to end on generated real-format data,
and a run killed with SIGKILL that resumes to the uninterrupted result."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from _align_fixtures import (
    synthetic_episodes,
    write_aloha,
    write_lerobot,
    write_npz,
    write_robomimic,
)
from safetensors import safe_open

from ate_fast.align import LatentPrior, load_checkpoint
from ate_fast.cli import main
from ate_fast.data import ActionChunkDataset

SMALL_TRANSFORMER = ["--latent-dim", "16", "--d-model", "16", "--heads", "2", "--ff-dim", "32"]
TRAIN = ["--batch-size", "32", "--no-progress", "--lr", "2e-3", "--layers", "3", "--device", "cpu"]
# CI is CPU-only; on CPU a resumed run is bitwise identical (GPU kernels need not be)
CPU = ["--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(argv) == 0
    return out.getvalue()


def test_three_commands_on_robomimic_aloha_lerobot_and_npz(tmp_path):
    pre = write_robomimic(tmp_path / "pre.hdf5", synthetic_episodes(12, 7, seed=1))
    aloha = write_aloha(tmp_path / "aloha", synthetic_episodes(4, 14, seed=2))
    lerobot = write_lerobot(tmp_path / "lerobot", synthetic_episodes(4, 6, seed=3))
    npz = write_npz(tmp_path / "adapt.npz", synthetic_episodes(4, 7, seed=4))
    # Stage 1 on robomimic demos (7 dims placed in a 14-dim unified space).
    s1 = tmp_path / "pre.ckpt"
    log = _run(
        [
            "align",
            "stage1",
            "--data",
            str(pre),
            "--horizon",
            "8",
            "--action-dim",
            "14",
            "--out",
            str(s1),
            "--epochs",
            "2",
            *SMALL_TRANSFORMER,
            *TRAIN,
        ]
    )
    assert "wrote" in log and "stage1 epoch 2/2" in log
    ckpt = load_checkpoint(s1)
    assert ckpt.vae.config["horizon"] == 8 and ckpt.vae.action_dim == 14
    assert ckpt.action_space.dim_index.tolist() == list(range(7))
    assert ckpt.config["chunking"] == {"horizon": 8, "stride": 1, "pad": "edge", "max_pad": None}
    # Prior: a 3-component mixture over the stage-1 latents of the same data.
    prior_path = tmp_path / "prior.pt"
    log = _run(
        [
            "align",
            "prior",
            "--vae",
            str(s1),
            "--data",
            str(pre),
            "--kind",
            "gmm",
            "--k",
            "3",
            "--out",
            str(prior_path),
            "--no-progress",
        ]
    )
    prior = LatentPrior.load(prior_path)
    assert prior.kind == "gmm" and prior.n_components == 3 and prior.latent_dim == 16
    assert prior.info["vae_checkpoint"] == str(s1)
    # Stage 2 on an ALOHA episode directory, initialised from stage 1 (its architecture).
    s2 = tmp_path / "adapt.ckpt"
    _run(
        [
            "align",
            "stage2",
            "--prior",
            str(prior_path),
            "--data",
            str(aloha),
            "--init",
            str(s1),
            "--out",
            str(s2),
            "--epochs",
            "2",
            "--batch-size",
            "32",
            "--no-progress",
            *CPU,
        ]
    )
    adapted = load_checkpoint(s2)
    assert adapted.stage == 2 and adapted.config["train"]["kl"] == "reverse"
    torch.testing.assert_close(adapted.prior.means, prior.means)
    ref = ActionChunkDataset(aloha, horizon=8)
    assert adapted.normalizer.to_dict() == ref.normalizer.to_dict()  # the adaptation stats
    # Stage 2 on a LeRobot dataset (6 dims mapped into the unified space), released-code KL.
    s2b = tmp_path / "adapt_lerobot.ckpt"
    _run(
        [
            "align",
            "stage2",
            "--prior",
            str(prior_path),
            "--data",
            str(lerobot),
            "--horizon",
            "8",
            "--action-dim",
            "14",
            "--dims",
            "0,1,2,7,8,9",
            "--arch",
            "mlp",
            "--hidden",
            "32,32",
            "--kl",
            "forward",
            "--out",
            str(s2b),
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--no-progress",
            *CPU,
        ]
    )
    lr_ckpt = load_checkpoint(s2b)
    assert lr_ckpt.vae.arch == "mlp" and lr_ckpt.vae.latent_dim == 16
    assert lr_ckpt.action_space.dim_index.tolist() == [0, 1, 2, 7, 8, 9]
    assert lr_ckpt.config["train"]["kl"] == "forward"
    # ... and on a Diffusion-Policy-style npz
    s2c = tmp_path / "adapt_npz.ckpt"
    log = _run(
        [
            "align",
            "stage2",
            "--prior",
            str(prior_path),
            "--data",
            str(npz),
            "--action-dim",
            "14",
            "--arch",
            "mlp",
            "--mask-padding",
            "--out",
            str(s2c),
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--no-progress",
            *CPU,
        ]
    )
    npz_ckpt = load_checkpoint(s2c)
    npz_vae = npz_ckpt.vae
    assert npz_ckpt.config["chunking"]["step_mask"] is True  # --mask-padding
    assert "chunks padded, padding left out of the loss" in log
    assert npz_vae.encoder.activation == "gelu"
    assert npz_vae.horizon == 8  # no --horizon: the stage-1 horizon recorded in the prior


def test_cli_errors_are_clear(tmp_path, capsys):
    # issue 15: a user error is one line on stderr naming the flag, exit code 2
    pre = write_robomimic(tmp_path / "pre.hdf5", synthetic_episodes(4, 3, length=(10, 12)))
    argv = ["align", "stage1", "--data", str(pre), "--horizon", "50", "--out", str(tmp_path / "x")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--horizon 50 is longer than every episode" in err and err.count("\n") == 1
    with pytest.raises(ValueError, match="--horizon 50 is longer than every episode"):
        main(["--debug", *argv])  # --debug: the traceback
    with pytest.raises(SystemExit):
        _run(["align", "stage2", "--prior", "p.pt", "--data", str(pre), "--out", "y", "--kl", "js"])


def _resume_step(path) -> int:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["state"])["progress"]["global_step"]


def test_sigkill_then_resume_matches_the_uninterrupted_run(tmp_path):
    data = write_npz(tmp_path / "d.npz", synthetic_episodes(10, 3, length=(30, 40), seed=5))
    common = [
        "--data",
        str(data),
        "--horizon",
        "6",
        "--arch",
        "mlp",
        "--hidden",
        "32,32",
        "--latent-dim",
        "8",
        "--epochs",
        "12",
        "--batch-size",
        "16",
        "--no-progress",
        "--lr",
        "1e-3",
        *CPU,
    ]
    _run(["align", "stage1", *common, "--out", str(tmp_path / "ref")])
    total = json.loads((tmp_path / "ref" / "config.json").read_text())["progress"]["global_step"]

    killed = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ate_fast.cli",
            "align",
            "stage1",
            *common,
            "--out",
            str(killed),
            "--save-every-steps",
            "1",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = killed / "resume.safetensors"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if state.is_file():
                try:
                    if _resume_step(state) >= 3:
                        break
                except Exception:
                    pass
            assert proc.poll() is None, "the run finished before it could be killed"
            time.sleep(0.01)
        assert proc.poll() is None
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    step_at_kill = _resume_step(state)
    assert 3 <= step_at_kill < total, (step_at_kill, total)
    _run(["align", "stage1", *common, "--out", str(killed), "--resume"])
    ref = load_checkpoint(tmp_path / "ref").vae.state_dict()
    got = load_checkpoint(killed).vae.state_dict()
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
    assert not list(killed.glob(".*.tmp"))


def test_registering_the_cli_loads_no_training_code():
    code = (
        "import sys, ate_fast.cli; ate_fast.cli.build_parser(); "
        "heavy = [m for m in sys.modules if m.startswith(('ate_fast.align.', 'ate_fast.data'))]; "
        "print(heavy); assert heavy == ['ate_fast.align.cli'], heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
