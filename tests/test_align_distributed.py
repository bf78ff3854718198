"""torchrun: 2 CPU processes (gloo) follow the single-process loss curve.

The two runs see the same global batches (rank r takes every 2nd index of the same
permutation); they differ only in the reparameterisation/MMD noise, which is drawn per
rank, so the curves agree to noise level, not bitwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from ate_fast.align.distributed_sampler import ResumableDistributedSampler

WORKER = Path(__file__).with_name("_align_ddp_worker.py")


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def _load(prefix: Path, rank: int) -> dict:
    return json.loads(Path(f"{prefix}.rank{rank}").read_text())


def test_two_ranks_see_exactly_the_single_process_batches():
    n, batch = 101, 16
    single = ResumableDistributedSampler(range(n), num_replicas=1, rank=0, seed=3)
    ranks = [ResumableDistributedSampler(range(n), num_replicas=2, rank=r, seed=3) for r in (0, 1)]
    for epoch in (0, 1):
        for s in (single, *ranks):
            s.set_epoch(epoch)
        one, r0, r1 = list(single), list(ranks[0]), list(ranks[1])
        for step in range(n // batch):
            half = slice(step * batch // 2, (step + 1) * batch // 2)
            assert sorted(r0[half] + r1[half]) == sorted(one[step * batch : (step + 1) * batch])
    ranks[1].set_epoch(1, skip=5)  # resume part-way: the same tail
    assert list(ranks[1]) == r1[5:]


def test_torchrun_two_cpu_processes_match_single_process(tmp_path):
    single = tmp_path / "single.json"
    subprocess.run(
        [sys.executable, str(WORKER), "--out", str(tmp_path / "one"), "--json", str(single)],
        check=True,
        env=_env(),
        timeout=240,
    )
    multi = tmp_path / "multi.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--standalone",
            str(WORKER),
            "--out",
            str(tmp_path / "two"),
            "--json",
            str(multi),
        ],
        env=_env(),
        timeout=240,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, r0, r1 = _load(single, 0), _load(multi, 0), _load(multi, 1)
    assert one["world_size"] == 1 and r0["world_size"] == r1["world_size"] == 2
    # DDP keeps the replicas identical; the logged (all-reduced) losses agree on every rank
    assert r0["fingerprint"] == r1["fingerprint"]
    assert r0["step_losses"] == r1["step_losses"]
    # the same number of optimiser steps on the same global batches
    assert len(r0["step_losses"]) == len(one["step_losses"]) == 4 * (len(one["step_losses"]) // 4)
    curve_one = np.array([h["loss"] for h in one["history"]])
    curve_two = np.array([h["loss"] for h in r0["history"]])
    np.testing.assert_allclose(curve_two, curve_one, rtol=0.15)
    assert curve_one[-1] < 0.6 * curve_one[0] and curve_two[-1] < 0.6 * curve_two[0]
    val_one, val_two = one["history"][-1]["val_loss"], r0["history"][-1]["val_loss"]
    assert abs(val_two - val_one) < 0.15 * val_one
    # only rank 0 logs: every record appears once
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    epochs = [json.loads(x)["epoch"] for x in lines if json.loads(x)["split"] == "epoch"]
    assert epochs == [1, 2, 3, 4]
