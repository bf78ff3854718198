"""``ate-fast export onnx`` / ``ate-fast export tensorrt``."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from ate_fast.cli import build_parser, main
from ate_fast.export import OnnxRuntimeSampler, read_signature, relative_error

HEAD_ARGS = ["--head", "mlp", "--set", "horizon=8", "--set", "action_dim=4", "--set", "hidden=32"]


def test_export_is_registered_without_importing_onnx():
    code = (
        "import sys; from ate_fast.cli import build_parser; build_parser(); "
        "print(any(m.split('.')[0] in ('onnx', 'onnxruntime', 'tensorrt') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    args = build_parser().parse_args(["export", "tensorrt", "p.onnx", "--out", "p.plan"])
    assert (args.precision, args.min_batch, args.max_batch) == ("fp16", 1, None)  # 8 or less


def test_export_onnx_guided_from_checkpoints(tmp_path, capsys):
    """Head weights from --ckpt, guidance VAE from an align checkpoint, z* baked from an
    `align prior` file; --verify runs ONNX Runtime against PyTorch."""
    from safetensors.torch import save_file

    from ate_fast.align import ActionVAE, LatentPrior, save_checkpoint
    from ate_fast.models import make_head
    from ate_fast.sampling import DiffusionSampler, NoiseSchedule
    from ate_fast.steer import LatentGuidance

    torch.manual_seed(3)
    head = make_head("mlp", "small", horizon=8, action_dim=4, hidden=32, time_scale=1e-3)
    save_file(head.state_dict(), str(tmp_path / "head.safetensors"))
    vae = ActionVAE(4, 8, latent_dim=4, arch="mlp", hidden_dims=(16,))
    save_checkpoint(tmp_path / "vae", vae, stage=2)
    prior = LatentPrior.from_latents(torch.randn(32, 4), torch.zeros(32, 4))
    prior.save(tmp_path / "prior.safetensors")
    out = tmp_path / "policy.onnx"
    argv = [
        "export", "onnx", *HEAD_ARGS, "--set", "time_scale=0.001",
        "--ckpt", str(tmp_path / "head.safetensors"), "--method", "ddim", "--steps", "3",
        "--guidance-vae", str(tmp_path / "vae"), "--guidance-mode", "tweedie",
        "--target", str(tmp_path / "prior.safetensors"), "--out", str(out), "--verify",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "batch 1: max relative error" in printed and "batch 8" in printed
    sig = read_signature(out)
    assert sig.target_dim is None and sig.guidance["target"] == "baked"
    assert sig.guidance["mode"] == "tweedie" and sig.num_steps == 3
    # the graph holds the checkpoint's weights and the prior's mean
    head.eval()
    guidance = LatentGuidance(vae, prior.mean, 2.0, 0.1, "tweedie")
    sampler = DiffusionSampler(head, NoiseSchedule("squaredcos_cap_v2", 100), "ddim", 3)
    noise = torch.randn(2, 8, 4)
    ref = sampler.sample(noise, guidance=guidance)
    assert relative_error(OnnxRuntimeSampler(out).sample(noise), ref) < 1e-4


def test_export_onnx_errors(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "x.onnx")
    assert main(["export", "onnx", *HEAD_ARGS, "--out", out]) == 2
    assert "give --ckpt" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {"nope": torch.zeros(1)}}, bad)
    assert main(["export", "onnx", *HEAD_ARGS, "--ckpt", str(bad), "--out", out]) == 2
    assert "does not fit --head mlp" in capsys.readouterr().err
    argv = ["export", "onnx", *HEAD_ARGS, "--random-init", "--out", out, "--opset", "17"]
    assert main(argv) == 2
    assert "opset must be one of" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    (tmp_path / "x.onnx").write_bytes(b"")
    assert main(["export", "tensorrt", out, "--out", str(tmp_path / "x.plan")]) == 2
    assert "TensorRT is not available" in capsys.readouterr().err


def test_export_onnx_a_vlm_kv_cache_with_its_mask(tmp_path, capsys):
    """--cond-as kv-cache-masked: the graph takes the flow transformer's PrefixCache (per
    block keys and values, the padding mask) and --verify runs it with random masks; the
    cache forms need --cond-len."""
    out = tmp_path / "kv.onnx"
    head = ["--head", "flow-transformer", "--set", "horizon=8", "--set", "action_dim=4",
            "--set", "depth=1", "--random-init", "--steps", "2", "--out", str(out)]  # fmt: skip
    assert main(["export", "onnx", *head, "--cond-len", "6", "--cond-as", "kv-cache-masked",
                 "--verify"]) == 0  # fmt: skip
    assert "batch 8: max relative error" in capsys.readouterr().out
    sig = read_signature(out)
    assert sig.cond_names == ["cond.keys.0", "cond.values.0", "cond.mask"]
    assert sig.cond_shapes == [[1, 6, 64], [1, 6, 64], [6]]
    assert main(["export", "onnx", *head, "--cond-as", "kv-cache", "--overwrite"]) == 2
    assert "--cond-as kv-cache needs --cond-len" in capsys.readouterr().err


def test_export_out_is_not_replaced_without_overwrite(tmp_path, capsys):
    """An existing --out was replaced without a word (the align commands refuse that), and
    a directory as --out failed naming an internal staging path; both before any work."""
    out = tmp_path / "p.onnx"
    argv = ["export", "onnx", *HEAD_ARGS, "--random-init", "--steps", "2", "--out", str(out)]
    assert main(argv) == 0
    before = out.read_bytes()
    assert main(argv) == 2
    assert f"--out {out}: exists (pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main([*argv, "--overwrite"]) == 0
    assert main([*argv[:-1], str(tmp_path)]) == 2
    assert "is a directory; expected the file to write" in capsys.readouterr().err
    plan = tmp_path / "p.plan"
    plan.write_bytes(b"earlier engine")
    assert main(["export", "tensorrt", str(out), "--out", str(plan)]) == 2
    assert f"--out {plan}: exists" in capsys.readouterr().err


def test_max_batch_is_recorded_and_bounds_verify_and_tensorrt(tmp_path, capsys, monkeypatch):
    """--max-batch was neither recorded nor enforced: a graph exported for batches up to 4
    ran at 9, --verify checked batch 8, and the TensorRT build's profile went to 8."""
    from ate_fast.export import to_tensorrt

    out = tmp_path / "p.onnx"
    argv = ["export", "onnx", *HEAD_ARGS, "--random-init", "--steps", "2", "--out", str(out),
            "--max-batch", "4", "--verify"]  # fmt: skip
    assert main(argv) == 0
    assert "batch 4: max relative error" in capsys.readouterr().out
    assert read_signature(out).max_batch == 4
    runner = OnnxRuntimeSampler(out)
    runner.sample(torch.randn(4, 8, 4))
    with pytest.raises(ValueError, match="exported for batches up to max_batch = 4"):
        runner.sample(torch.randn(5, 8, 4))
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # refused before TensorRT is needed
    with pytest.raises(ValueError, match="max_batch: 8 is more than the graph's max_batch 4"):
        to_tensorrt(out, tmp_path / "p.plan", max_batch=8)
