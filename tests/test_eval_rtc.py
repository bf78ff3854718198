"""``ate-fast eval rtc`` (Meta-World real-time chunking) on its smoke protocol: every run
written with the stats schema plus jumps and latency, the report, resuming; and the
training-time-RTC objective against plain flow matching. No success-rate thresholds."""

from __future__ import annotations

import json

import pytest
import torch

from ate_fast.adaptation.objectives import FlowMatching, RTCFlowMatching
from ate_fast.cli import main as cli_main
from ate_fast.eval.metaworld.realtime import RTC_METHODS
from ate_fast.eval.metaworld.realtime_runner import PROTOCOLS, run_realtime_study
from ate_fast.eval.stats import load_runs
from ate_fast.models import make_head
from ate_fast.realtime import TrainingTimeRTC


def test_rtc_objective_at_max_delay_zero_is_flow_matching_bit_for_bit():
    torch.manual_seed(0)
    policy = make_head("mlp", "small", horizon=8, action_dim=3, cond_dim=4)
    a0, noise, cond = torch.randn(5, 8, 3), torch.randn(5, 8, 3), torch.randn(5, 4)
    times = FlowMatching().draw_times(5, torch.Generator().manual_seed(1))
    plain, _ = FlowMatching().error(policy, a0, cond, noise, times, None)
    rtc, _ = RTCFlowMatching(TrainingTimeRTC(max_delay=0), 0).error(
        policy, a0, cond, noise, times, None
    )
    assert torch.equal(plain, rtc)
    # with delays the prefix is out and the sum over B·H·D is the postfix mean
    objective = RTCFlowMatching(TrainingTimeRTC(max_delay=4), 0)
    err, _ = objective.error(policy, a0, cond, noise, times, None)
    assert (err == 0).any()


def test_smoke_protocol_runs_reports_and_resumes(tmp_path):
    out, cache, lines = tmp_path / "out", tmp_path / "cache", []
    run_realtime_study("smoke", out, workers=1, cache_dir=cache, progress=False,
                       echo=lines.append)  # fmt: skip
    proto = PROTOCOLS["smoke"]
    runs = load_runs(out)  # the benchmark's schema
    assert len(runs) == len(RTC_METHODS) * len(proto.delays)
    for run in runs:
        episodes = sum(len(t["success"]) for t in run["tasks"].values())
        assert len(run["jumps"]["switch"]) == episodes == len(run["jumps"]["other"])
        assert run["latency_ms"]["mean"] > 0 and run["shift"] == f"linear/d={run['delay']}"
    by_id = {r["run_id"]: r for r in runs}
    assert by_id["flow-linear-d2-s0-rtc_training"]["train"]["trained_as"] == "rtc-trained"
    assert by_id["flow-linear-d2-s0-rtc+steer"]["train"]["trained_as"] == "steer"
    # naive and rtc use the same fine-tuned direct policy
    assert by_id["flow-linear-d0-s0-naive"]["train"] == by_id["flow-linear-d0-s0-rtc"]["train"]
    numbers = json.loads((out / "realtime.json").read_text())
    assert {j["method"] for j in numbers["jumps"]} == set(RTC_METHODS)
    text = (out / "realtime.md").read_text()
    assert "linear/d=2" in text and "rtc+steer" in text
    assert (out / "realtime.png").stat().st_size > 0
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    lines.clear()
    assert cli_main(["eval", "rtc", "--protocol", "smoke", "--out", str(out), "--cache-dir",
                     str(cache), "--workers", "1", "--no-progress"]) == 0  # fmt: skip
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing rerun


def test_point_mass_smoke_protocol(tmp_path):
    out = tmp_path / "pm"
    assert cli_main(["eval", "rtc", "--env", "point-mass", "--protocol", "smoke", "--out",
                     str(out), "--no-progress"]) == 0  # fmt: skip
    runs = load_runs(out)
    assert {r["method"] for r in runs} == {"naive", "ensemble", "rtc", "rtc_training"}
    assert len(runs) == 4 * 2
    latency = json.loads((out / "latency.json").read_text())
    assert set(latency["batch 1"]) >= {"plain/eager", "rtc/captured", "inpainting/captured"}
    text = (out / "realtime.md").read_text()
    assert "point-mass world" in text and "latency per chunk" in text
    assert "Steer" not in text.split("latency per chunk")[1]  # no Steer row on point-mass


def test_report_of_two_shifts(tmp_path):
    """The ``full`` protocol's two shifts share every delay: the report and its plot (one
    line per shift and method) must not compare cells (it crashed with "'<' not supported
    between instances of 'dict' and 'dict'" after the whole study had run)."""
    from ate_fast.eval.metaworld.realtime_runner import write_realtime_report

    (tmp_path / "runs").mkdir()
    for shift in ("linear", "warp"):
        for delay in (0, 2):
            for seed in (0, 1):
                for i, method in enumerate(RTC_METHODS):
                    run_id = f"flow-{shift}-d{delay}-s{seed}-{method}"
                    success = [(seed + i + k) % 2 for k in range(6)]
                    record = {
                        "schema": 1, "run_id": run_id, "config": "rtc-full", "method": method,
                        "policy": "flow", "shift": f"{shift}/d={delay}", "demos": 5,
                        "seed": seed, "delay": delay,
                        "tasks": {"basketball-v3": {"success": success}},
                        "success_rate": sum(success) / 6,
                        "jumps": {"switch": [0.1 + delay] * 6, "other": [0.05] * 6},
                        "latency_ms": {"mean": 1.0, "median": 1.0}, "train": {},
                        "seconds": 0.0, "machine": "x",
                    }  # fmt: skip
                    (tmp_path / "runs" / f"{run_id}.json").write_text(json.dumps(record))
    write_realtime_report(tmp_path)
    assert (tmp_path / "realtime.png").stat().st_size > 0
    text = (tmp_path / "realtime.md").read_text()
    assert "linear/d=2" in text and "warp/d=2" in text


def test_point_mass_refuses_flags_it_would_ignore(tmp_path, capsys):
    for flags in (["--workers", "4"], ["--cache-dir", str(tmp_path)]):
        code = cli_main(["eval", "rtc", "--env", "point-mass", "--protocol", "smoke",
                         "--out", str(tmp_path / "o"), *flags])  # fmt: skip
        assert code == 2
        assert f"{flags[0]} does not apply to --env point-mass" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_point_mass_resume_refuses_runs_of_other_settings(tmp_path):
    """Finished runs are skipped by name, which names no setting: a folder holding another
    protocol's (or older sizes') runs is refused, not averaged with the new ones."""
    from ate_fast.demo.realtime_study import point_mass_settings, run_point_mass_study

    runs = tmp_path / "runs"
    runs.mkdir()
    other = {**point_mass_settings("smoke"), "hidden": 7}
    (runs / "flow-point-mass-d0-s0-naive.json").write_text(json.dumps({"settings": other}))
    with pytest.raises(ValueError, match="was made with other settings"):
        run_point_mass_study("smoke", tmp_path, progress=False)
    (runs / "flow-point-mass-d0-s0-naive.json").write_text('{"settings": {"na')  # cut
    with pytest.raises(ValueError, match="is no complete run record"):
        run_point_mass_study("smoke", tmp_path, progress=False)
