"""Stage-1 training run used by test_align_distributed.py, alone or under torchrun.

Writes ``<json>.rank<r>``: the step losses, the epoch history and a fingerprint of the
final weights seen by this rank.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
from pathlib import Path

import torch
from _align_fixtures import synthetic_episodes  # the script's directory is on sys.path

from ate_fast.align import ActionVAE, Stage1Config, train_stage1
from ate_fast.data import ActionChunkDataset

CPU = "cpu"  # the gloo CPU process group under test, also on a machine with GPUs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = ActionChunkDataset(
        synthetic_episodes(16, 3, length=(30, 40), seed=0), horizon=8, action_dim=4
    )
    torch.manual_seed(0)
    vae = ActionVAE(4, 8, 8, d_model=16, num_heads=2, ff_dim=32, num_layers=3)
    cfg = Stage1Config(
        device=CPU,
        out_dir=args.out,
        epochs=4,
        batch_size=32,
        lr=2e-3,
        progress=False,
        log_every_steps=5,
    )
    with contextlib.redirect_stdout(io.StringIO()):
        result = train_stage1(vae, data, cfg)
    rank = int(os.environ.get("RANK", "0"))
    fingerprint = [float(p.detach().double().sum()) for p in result.vae.parameters()]
    payload = {
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "step_losses": result.step_losses,
        "history": result.history,
        "fingerprint": fingerprint,
    }
    Path(f"{args.json}.rank{rank}").write_text(json.dumps(payload))


if __name__ == "__main__":
    main()
