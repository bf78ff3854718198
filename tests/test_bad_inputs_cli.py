# ruff: noqa: E501  (the tables read best one case per line)
"""Bad inputs to every command and loader (issue 15): wrong file, wrong kind, tampered
metadata, missing fields, wrong format → a named error (library) or one line on stderr
and exit code 2 (``ate-fast``), with the message fragment that says what went wrong."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from _align_fixtures import synthetic_episodes, write_npz

from ate_fast.align import (
    KIND_STAGE1,
    KIND_STAGE2,
    ActionVAE,
    CheckpointError,
    CheckpointIntegrityError,
    CheckpointKindError,
    LatentPrior,
    load_checkpoint,
    save_checkpoint,
)
from ate_fast.align.atomic_io import atomic_save_safetensors
from ate_fast.cli import main
from ate_fast.cli_errors import flag_names
from ate_fast.data import Normalizer, UnknownFileFormatError, read_episodes, sniff_format


def _vae() -> ActionVAE:
    torch.manual_seed(0)
    return ActionVAE(3, 4, latent_dim=2, arch="mlp", hidden_dims=(8,))


def _normalizer() -> Normalizer:
    return Normalizer.fit(np.random.default_rng(0).normal(size=(50, 3)))


def _edit_config(ckpt: Path, edit) -> Path:
    path = ckpt / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    return ckpt


def _as_version_1(config: dict) -> None:
    """What ``save_checkpoint`` wrote before checkpoints recorded kind and hash."""
    for key in ("kind", "package_version", "metadata_sha256"):
        config.pop(key)
    config["version"] = 1


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Every kind of file the table below feeds to the commands and loaders."""
    root = tmp_path_factory.mktemp("bad_inputs")
    vae, norm = _vae(), _normalizer()
    prior = LatentPrior.from_latents(torch.randn(16, 2), torch.zeros(16, 2))
    prior.info.update(horizon=4, vae=vae.config)
    f = {
        "stage1": save_checkpoint(root / "s1", vae, stage=1, normalizer=norm),
        "stage2": save_checkpoint(root / "s2", vae, stage=2, normalizer=norm, prior=prior),
        "prior": root / "prior.safetensors",
        "prior_pt": root / "prior.pt",
        "torch": root / "state.pt",
        "junk": root / "junk.bin",
        "data": write_npz(root / "d.npz", synthetic_episodes(3, 3, length=(20, 24))),
        "data4": write_npz(root / "d4.npz", synthetic_episodes(3, 4, length=(20, 24))),
    }
    prior.save(f["prior"])
    f["prior5"] = root / "prior5.safetensors"  # a prior over another latent size
    LatentPrior.from_latents(torch.randn(16, 5), torch.zeros(16, 5)).save(f["prior5"])
    torch.save({"means": prior.means}, f["prior_pt"])  # a torch file named like a prior
    torch.save({"w": torch.zeros(2)}, f["torch"])
    f["junk"].write_bytes(b"\x00junk" * 10)
    f["tampered"] = _edit_config(
        save_checkpoint(root / "tampered", vae, stage=1, normalizer=norm),
        lambda c: c["normalizer"]["stats"]["mean"].__setitem__(0, 123.0),
    )
    f["no_files"] = _edit_config(
        save_checkpoint(root / "no_files", vae, stage=1), lambda c: c.pop("files")
    )
    f["no_weights"] = _edit_config(
        save_checkpoint(root / "no_weights", vae, stage=1), lambda c: c["files"].pop("weights")
    )
    f["newer"] = _edit_config(
        save_checkpoint(root / "newer", vae, stage=1), lambda c: c.update(version=99)
    )
    f["legacy"] = _edit_config(
        save_checkpoint(root / "legacy", vae, stage=2, normalizer=norm), _as_version_1
    )
    f["torch_as_npz"] = root / "actions.npz"
    torch.save(torch.zeros(10, 3), f["torch_as_npz"])
    return f


# --- library loaders ---------------------------------------------------------------------
LOADER_CASES = [
    # (loader, file, error, message fragment)
    ("stage1", "stage2", CheckpointKindError, "expected a stage-1 VAE ('vae-stage1') checkpoint, got a stage-2 VAE"),
    ("stage2", "stage1", CheckpointKindError, "expected a stage-2 VAE ('vae-stage2') checkpoint, got a stage-1 VAE"),
    ("any", "tampered", CheckpointIntegrityError, "metadata hash mismatch: expected"),
    ("any", "no_files", CheckpointError, "missing field 'files' (the checkpoint's files and their SHA-256"),
    ("any", "no_weights", CheckpointError, "missing field 'files.weights' ({'file': ..., 'sha256': ...}); found None"),
    ("any", "newer", CheckpointError, "checkpoint version 99 is newer"),
    ("any", "prior", CheckpointError, "expected an align checkpoint directory (with config.json), but it is a safetensors file"),
    ("any", "junk", CheckpointError, "but it is a file of unknown format"),
    ("prior", "stage1", CheckpointError, "expected a LatentPrior file (safetensors, from `ate-fast align prior`), but it is a directory"),
    ("prior", "prior_pt", CheckpointError, "but it is a torch.save file"),
    ("prior", "junk", CheckpointError, "but it is a file of unknown format"),
    ("prior", "weights", CheckpointKindError, "got the weights of an align VAE checkpoint"),
    ("data", "torch_as_npz", UnknownFileFormatError, "expected a NumPy .npz archive or"),
]  # fmt: skip


def _load(loader: str, path: Path):
    if loader == "prior":
        return LatentPrior.load(path)
    if loader == "data":
        return read_episodes(path)
    kind = {"stage1": KIND_STAGE1, "stage2": KIND_STAGE2, "any": None}[loader]
    return load_checkpoint(path, kind=kind)


@pytest.mark.parametrize(("loader", "name", "error", "fragment"), LOADER_CASES)
def test_loaders_refuse_with_a_named_error(files, loader, name, error, fragment):
    path = files["stage1"] / "model.safetensors" if name == "weights" else files[name]
    with pytest.raises(error) as info:
        _load(loader, path)
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)  # what the loaders raised before


def test_an_edited_file_or_prior_is_refused(tmp_path, files):
    torch.manual_seed(5)
    other = ActionVAE(3, 4, latent_dim=2, arch="mlp", hidden_dims=(8,))
    ckpt = save_checkpoint(tmp_path / "c", other, stage=1)
    (ckpt / "model.safetensors").write_bytes((files["stage1"] / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointIntegrityError, match="content does not match the hash"):
        load_checkpoint(ckpt)  # same shapes, other weights: the file hash catches it
    _edit_config(files["stage1"], lambda c: None)  # rewritten, same content: still valid
    load_checkpoint(files["stage1"], kind=KIND_STAGE1)
    prior = LatentPrior.from_latents(torch.randn(8, 2), torch.zeros(8, 2))
    path = tmp_path / "p.safetensors"
    prior.save(path)
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    meta["info"] = json.dumps({"n_latents": 8, "horizon": 99})
    save_file(load_file(str(path)), str(path), metadata=meta)
    with pytest.raises(CheckpointIntegrityError, match="content hash mismatch"):
        LatentPrior.load(path)


def test_checkpoints_record_kind_version_and_hash(files):
    config = json.loads((files["stage2"] / "config.json").read_text())
    assert config["kind"] == KIND_STAGE2 and config["version"] == 2
    assert config["package_version"] == __import__("ate_fast").__version__
    assert len(config["metadata_sha256"]) == 64
    assert load_checkpoint(files["stage2"]).kind == KIND_STAGE2
    from safetensors import safe_open

    with safe_open(str(files["prior"]), framework="pt") as f:
        meta = f.metadata()
    assert meta["checkpoint_kind"] == "latent-prior" and len(meta["content_sha256"]) == 64


def test_version_1_checkpoints_and_priors_still_load(files, tmp_path):
    """Written before kinds and hashes: the kind is inferred from the recorded stage."""
    with pytest.warns(UserWarning, match=r"loaded as 'vae-stage2' \(from its stage\)"):
        ckpt = load_checkpoint(files["legacy"], kind=KIND_STAGE2)
    assert ckpt.kind == KIND_STAGE2 and ckpt.normalizer is not None
    with pytest.warns(UserWarning), pytest.raises(CheckpointKindError, match="got a stage-2"):
        load_checkpoint(files["legacy"], kind=KIND_STAGE1)
    prior = LatentPrior.from_latents(torch.randn(8, 2), torch.zeros(8, 2))
    old_meta = {"format": "ate_fast.latent_prior", "version": "1", "kind": prior.kind, "info": "{}"}
    tensors = {"weights": prior.weights, "means": prior.means, "variances": prior.variances}
    atomic_save_safetensors(tensors, tmp_path / "old.safetensors", old_meta)
    torch.testing.assert_close(LatentPrior.load(tmp_path / "old.safetensors").means, prior.means)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_get_the_permissions_open_would_give(tmp_path, umask):
    old = os.umask(umask)
    try:
        ckpt = save_checkpoint(tmp_path / "c", _vae(), stage=1)
        LatentPrior.standard_normal(2).save(tmp_path / "p.safetensors")
    finally:
        os.umask(old)
    for path in [*ckpt.iterdir(), tmp_path / "p.safetensors"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_files_are_told_by_content(files, tmp_path):
    assert sniff_format(files["prior"]) == "safetensors"
    assert sniff_format(files["prior_pt"]) == "torch"
    assert sniff_format(files["torch_as_npz"]) == "torch"
    assert sniff_format(files["data"]) == "npz"
    with open(tmp_path / "a.bin", "wb") as f:
        np.save(f, np.zeros(3))
    assert sniff_format(tmp_path / "a.bin") == "npy"
    assert sniff_format(files["stage1"]) == "directory"
    assert sniff_format(files["junk"]) == "unknown"
    # a safetensors header of 640 bytes begins with 80 02, as a pickle stream does
    header = b'{"__metadata__":{"a":"b"}}'.ljust(640)
    (tmp_path / "s.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    assert sniff_format(tmp_path / "s.safetensors") == "safetensors"
    torch.save(torch.zeros(2), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert sniff_format(tmp_path / "legacy.pt") == "torch"


def test_a_flat_npz_warns_that_it_is_one_episode(tmp_path):
    np.savez(tmp_path / "flat.npz", actions=np.zeros((30, 2)))
    with pytest.warns(
        UserWarning, match=r"flat\.npz:actions: the array .* read as ONE episode .*'episode_ends'"
    ):
        assert len(read_episodes(tmp_path / "flat.npz")) == 1
    np.savez(tmp_path / "ends.npz", actions=np.zeros((30, 2)), episode_ends=np.array([10, 30]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(read_episodes(tmp_path / "ends.npz")) == 2


# --- the command line --------------------------------------------------------------------
STAGE2 = ["--epochs", "1", "--batch-size", "4", "--no-progress", "--device", "cpu"]
CLI_CASES = [
    # (argv with {placeholders}, message fragment)
    ("align prior --vae {stage2} --data {data} --out {out}", "expected a stage-1 VAE ('vae-stage1') checkpoint, got a stage-2 VAE"),
    ("align prior --vae {prior} --data {data} --out {out}", "expected an align checkpoint directory"),
    ("align prior --vae {tampered} --data {data} --out {out}", "metadata hash mismatch"),
    ("align prior --vae {no_files} --data {data} --out {out}", "missing field 'files'"),
    ("align prior --vae {tmp}/nowhere --data {data} --out {out}", "not an align checkpoint (no such directory)"),
    ("align stage2 --prior {stage1} --data {data} --out {out}", "expected a LatentPrior file"),
    ("align stage2 --prior {prior_pt} --data {data} --out {out}", "but it is a torch.save file"),
    ("align stage2 --prior {weights} --data {data} --out {out}", "got the weights of an align VAE checkpoint"),
    ("align stage2 --prior {prior} --init {stage2} --data {data} --out {out}", "expected a stage-1 VAE ('vae-stage1') checkpoint"),
    ("align stage2 --prior {prior} --init {stage1} --arch transformer --data {data} --out {out}", "--arch transformer contradicts --init"),
    ("align stage2 --prior {prior} --init {stage1} --hidden 16 --data {data} --out {out}", "--hidden [16] contradicts --init"),
    ("align stage2 --prior {prior} --d-model 8 --data {data} --out {out}", "--d-model applies to --arch transformer, but stage 2 trains a mlp VAE (from the prior's stage-1 VAE)"),
    ("align stage2 --prior {prior} --data {data4} --out {out}", "the data has more action dims than the stage-1 VAE's unified action dim 3 (from the prior's stage-1 VAE): pass --action-dim"),
    ("align stage2 --prior {prior} --latent-dim 5 --data {data} --out {out}", "--latent-dim 5 differs from the prior's 2"),
    ("align stage1 --data {torch_as_npz} --horizon 4 --out {out}", "expected a NumPy .npz archive"),
    ("align stage1 --data {data} --horizon 4 --epochs 0 --out {out}", "--epochs: expected >= 1, got 0"),
    ("align stage1 --data {data} --horizon 4 --beta nan --out {out}", "--beta: expected a finite value >= 0, got nan"),
    ("align stage1 --data {data} --horizon 40 --out {out}", "--horizon 40 is longer than every episode"),
    ("align stage1 --data {data} --horizon 4 --batch-size 4 --out {stage1}", "pass --resume to continue it or --overwrite to start over"),
    ("export onnx --head mlp --out {out}.onnx", "give --ckpt (the head's weights) or --random-init"),
    ("export onnx --head mlp --random-init --method euler --clip-sample --out {out}.onnx", "--clip-sample applies to --method ddpm / ddim, not euler"),
    ("export onnx --head mlp --random-init --method euler --eta 0.5 --out {out}.onnx", "--eta applies to --method ddim, not euler"),
    ("export onnx --head mlp --random-init --method ddim --solver-order 3 --out {out}.onnx", "--solver-order applies to --method dpmsolver++, not ddim"),
    ("export onnx --head mlp --random-init --method ddim --shift 3 --out {out}.onnx", "--shift applies to --method euler / heun, not ddim"),
    ("export onnx --head mlp --random-init --guidance-scale 5 --out {out}.onnx", "--guidance-scale needs --guidance-vae"),
    ("export onnx --head mlp --random-init --out {out}.onnx --ckpt {junk}", "--ckpt and --random-init exclude each other"),
    ("export onnx --head mlp --ckpt {junk} --out {out}.onnx", "--ckpt {junk}: expected a safetensors file or a torch.save file, but it is a file of unknown format"),
    ("export onnx --head mlp --ckpt {data} --out {out}.onnx", "but it is a NumPy .npz archive"),
    ("export onnx --head mlp --random-init --guidance-vae {prior} --out {out}.onnx", "--guidance-vae: {prior}: expected an align checkpoint directory"),
    ("export onnx --head mlp --random-init --guidance-vae {stage2} --target {junk} --out {out}.onnx", "--target {junk}: expected a safetensors file or a torch.save file or a NumPy .npy array"),
    ("export onnx --head mlp --random-init --guidance-vae {stage2} --target {weights} --out {out}.onnx", "got the weights of an align VAE checkpoint"),
    ("export onnx --head mlp --random-init --guidance-vae {stage2} --target {prior5} --out {out}.onnx", "--target {prior5}: expected a latent [d_z] = [2] for --guidance-vae"),
    ("align stage1 --data {data} --horizon 4 --arch transformer --d-model 16 --heads 3 --out {out}", "--heads: --d-model = 16 must be divisible by --heads = 3"),
    ("align stage1 --data {data} --horizon 4 --arch transformer --dropout 2 --out {out}", "--dropout: expected a probability in [0, 1), got 2.0"),
    ("align stage1 --data {data} --horizon 4 --arch mlp --d-model 7 --out {out}", "--d-model applies to --arch transformer, not --arch mlp"),
    ("align stage1 --data {data} --horizon 4 --hidden 64 --out {out}", "--hidden applies to --arch mlp, not --arch transformer"),
    ("align stage1 --data {data} --format npy --horizon 4 --out {out}", "an .npz archive, not an .npy array (use --format npz)"),
    ("align prior --vae {stage1} --data {data} --out {prior}", "exists (pass --overwrite to replace it)"),
    ("align prior --vae {stage1} --data {data} --out {stage1} --overwrite", "--out {stage1}: is a directory; expected the file to write"),
    ("align stage2 --prior {prior} --horizon 8 --data {data} --out {out}", "--horizon 8 differs from the prior's stage-1 horizon 4"),
    ("eval metaworld --workers 0", "--workers: expected >= 1, got 0"),
    ("demo --quick --device cuda:99", "--device cuda:99"),
    ("tune --head mlp --out {out}.json", "give --ckpt (the head's weights) or --random-init"),
    ("tune --head mlp --random-init --device cuda:99 --out {out}.json", "--device cuda:99"),
    ("tune --head mlp --random-init --device cpu --batch 0 --out {out}.json", "--batch must be >= 1, got 0"),
    ("tune --head mlp --random-init --device cpu --rounds 0 --out {out}.json", "--rounds must be >= 1, got 0"),
    ("tune --head mlp --random-init --device cpu --min-gain 2 --out {out}.json", "--min-gain must be a fraction < 1, got 2.0"),
    ("tune --head mlp --random-init --device cpu --out {prior}", "exists (pass --overwrite to replace it)"),
    ("tune --head mlp --random-init --device cpu --exclude flex --out {out}.json", "--exclude: expected 'VAR=path'"),
    ("settings {out}.missing.json", "settings file not found"),
    ("settings {prior}", "not a JSON settings file"),
]  # fmt: skip


def _argv(template: str, files: dict[str, Path], tmp_path: Path) -> list[str]:
    names = {k: str(v) for k, v in files.items()}
    names.update(weights=str(files["stage1"] / "model.safetensors"), tmp=str(tmp_path))
    names["out"] = str(tmp_path / "out")
    return [word.format(**names) for word in template.split()]


@pytest.mark.parametrize(("template", "fragment"), CLI_CASES)
def test_cli_user_errors_are_one_line_and_exit_2(files, tmp_path, capsys, template, fragment):
    if template.startswith("export"):
        pytest.importorskip("onnx")
    argv = _argv(template, files, tmp_path)
    if template.startswith("align stage2"):
        argv += STAGE2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ate-fast "), err
    assert fragment.format(**{k: str(v) for k, v in files.items()}) in err, err
    assert "Traceback" not in err and "=True" not in err


def test_debug_shows_the_traceback(files, tmp_path):
    argv = _argv("align prior --vae {stage2} --data {data} --out {out}", files, tmp_path)
    with pytest.raises(CheckpointKindError, match="expected a stage-1 VAE"):
        main(["--debug", *argv])


@pytest.mark.parametrize(
    "argv",
    [["info", "--bogus"], ["align", "stage1"], ["nope"],
     ["align", "stage1", "--data", "x.npz", "--horizon", "4", "--out", "o", "--device", "bogus"],
     ["demo", "--device", "gpu"]],
)  # fmt: skip
def test_argparse_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and "error:" in capsys.readouterr().err


def test_a_user_error_from_the_installed_command(files, tmp_path):
    """The real process: exit status 2, one line on stderr, no traceback."""
    argv = _argv("align prior --vae {stage2} --data {data} --out {out}", files, tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "ate_fast.cli", *argv], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("ate-fast align prior: error: ")


def test_flag_names_rewrites_python_argument_names():
    flags = {"resume": "--resume", "out_dir": "--out", "lr_gamma": "--lr-gamma", "gamma": "--gamma"}
    text = "out_dir: x exists; pass resume=True. lr_gamma: bad, gamma=2, gamma: 1, not_gamma=3"
    assert flag_names(text, flags) == (
        "--out: x exists; pass --resume. --lr-gamma: bad, --gamma 2, --gamma: 1, not_gamma=3"
    )
    # a name with an underscore is a Python identifier wherever it stands; a plain word
    # ("gamma", "resume") only where it is followed by '=' or ':'
    assert flag_names("lower out_dir or gamma (resume)", flags) == "lower --out or gamma (resume)"
    # and where an argument check names it ("gamma must be > 0")
    assert flag_names("gamma must be > 0, got -1", flags) == "--gamma must be > 0, got -1"


# --- stage 2 follows stage 1 -------------------------------------------------------------
def _cli(argv: list[str], capsys) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out


def test_stage2_follows_the_stage1_architecture(tmp_path, capsys):
    data = write_npz(tmp_path / "d.npz", synthetic_episodes(6, 3, length=(20, 24), seed=2))
    common = ["--data", str(data), "--no-progress", "--device", "cpu"]
    train = ["--epochs", "1", "--batch-size", "8", *common]
    _cli(["align", "stage1", "--horizon", "4", "--arch", "mlp", "--hidden", "16,8", "--action-dim", "5",
          "--activation", "silu", "--latent-dim", "3", "--out", str(tmp_path / "s1"), *train],
         capsys)  # fmt: skip
    prior = tmp_path / "prior.safetensors"
    _cli(["align", "prior", "--vae", str(tmp_path / "s1"), "--out", str(prior), *common], capsys)
    out = _cli(["align", "stage2", "--prior", str(prior), "--out", str(tmp_path / "s2"), *train],
               capsys)  # fmt: skip
    vae = load_checkpoint(tmp_path / "s2", kind=KIND_STAGE2).vae
    assert vae.config == {**load_checkpoint(tmp_path / "s1").vae.config}
    assert "stage 2 VAE: mlp (from the prior's stage-1 VAE), horizon 4, action dim 5" in out
    assert "hidden_dims=[16, 8]" in out and "1 epochs" in out
    # an explicit, compatible choice is followed (only horizon and d_z are shared)
    out = _cli(["align", "stage2", "--prior", str(prior), "--arch", "transformer", "--d-model",
                "8", "--heads", "2", "--ff-dim", "8", "--layers", "1",
                "--out", str(tmp_path / "s2t"), *train], capsys)  # fmt: skip
    vae = load_checkpoint(tmp_path / "s2t").vae
    assert vae.arch == "transformer" and vae.latent_dim == 3 and vae.horizon == 4
    assert vae.action_dim == 5  # the stage-1 unified action space
    assert "stage 2 VAE: transformer (from --arch)" in out
    # a prior file written before it recorded the VAE: the checkpoint it names is read
    old = LatentPrior.load(prior)
    old.info.pop("vae")
    old.save(tmp_path / "old_prior.safetensors")
    out = _cli(["align", "stage2", "--prior", str(tmp_path / "old_prior.safetensors"),
                "--out", str(tmp_path / "s2o"), *train], capsys)  # fmt: skip
    assert load_checkpoint(tmp_path / "s2o").vae.config == vae_config_of(tmp_path / "s1")
    assert f"stage 2 VAE: mlp (from {tmp_path / 's1'})" in out


def vae_config_of(path: Path) -> dict:
    return load_checkpoint(path).vae.config


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    """Ctrl-C printed a ~110-line traceback, as if the command had crashed."""
    from ate_fast.cli_errors import EXIT_INTERRUPTED, run_handler

    def interrupted(args):
        raise KeyboardInterrupt

    assert run_handler(interrupted, None, "ate-fast demo") == EXIT_INTERRUPTED == 130
    assert capsys.readouterr().err.strip() == "ate-fast demo: interrupted"
    with pytest.raises(KeyboardInterrupt):  # --debug: the traceback
        run_handler(interrupted, None, "ate-fast demo", debug=True)
