"""ate_fast.tuning: the search keeps the fastest option per choice on top of the earlier
winners, and only where it is faster by min_gain, matches the baseline and stays faster
when re-timed; failures and skips are recorded; settings are applied and restored,
saved and loaded, checked; and on a real captured sampler a kept setting changes the
kernels the capture records (the split-key attention through the Triton interpreter)."""

from __future__ import annotations

import json
import os
from unittest import mock

import pytest
import torch
from flow_head_paths import small_head

from ate_fast.errors import InvalidArgumentError
from ate_fast.models import block_epilogues, cpu_gemm, skinny_gemm, split_kv_attention
from ate_fast.sampling import FlowSampler
from ate_fast.tuning import (
    Choice,
    apply_settings,
    autotune,
    check_settings,
    default_choices,
    load_settings,
    median_seconds,
)
from ate_fast.tuning.switches import COMBINATIONS, KNOWN_VARS, SWITCHES

ATTN, MLP, EPI, GEMM = (
    "ATE_FAST_PREFIX_ATTENTION",
    "ATE_FAST_FUSED_MLP",
    "ATE_FAST_FLOW_EPILOGUES",
    "ATE_FAST_CPU_GEMM",
)
ATTENTION = Choice(ATTN, ({ATTN: "split_kv"}, {ATTN: "flex"}, {ATTN: "split_sdpa"}))
FUSED = Choice(MLP, ({MLP: "persistent"},))
EPILOGUES = Choice(EPI, ({EPI: "torch"}, {EPI: "triton"}))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """Every known variable unset, so that the caller's environment is the defaults."""
    for var in KNOWN_VARS:
        monkeypatch.delenv(var, raising=False)


class Workload:
    """A fake call whose time is ``base`` × the factor of each variable's value in force
    when it was built, and whose output is off by ``offsets`` of the values in force;
    ``fails``: values whose build raises. Records the environment of every build."""

    def __init__(self, factors=None, offsets=None, fails=(), retimed=None):
        self.factors = factors or {}
        self.offsets = offsets or {}
        self.fails = set(fails)
        self.retimed = retimed  # factor on every call after the search's (the re-timing)
        self.builds: list[dict] = []
        self.search_builds = None

    def state(self) -> set:
        return {(var, os.environ[var]) for var in KNOWN_VARS if var in os.environ}

    def build(self):
        state = self.state()
        self.builds.append(dict(state))
        failing = state & self.fails
        if failing:
            raise RuntimeError(f"cannot run {sorted(failing)}")
        out = torch.full((2, 3), 1.0 + sum(self.offsets.get(s, 0.0) for s in state))
        seconds = 1.0
        for item in state:
            seconds *= self.factors.get(item, 1.0)
        if self.search_builds is not None and len(self.builds) > self.search_builds:
            seconds *= self.retimed.get(frozenset(state), 1.0)

        def run():
            return out

        run.seconds = seconds
        return run

    @staticmethod
    def timer(run) -> float:
        return run.seconds


def tune(fake: Workload, choices, **kwargs):
    # a fake call holds no memory to collect: without the search's full gc.collect() per
    # trial (for real captures' graph pools; ~0.4 s each in the whole suite's heap)
    with mock.patch("ate_fast.tuning.search.gc.collect"):
        return autotune(fake.build, choices, timer=fake.timer, progress=False, **kwargs)


def test_keeps_the_fastest_option_of_each_choice_on_top_of_the_winners():
    w = Workload({(ATTN, "flex"): 0.7, (ATTN, "split_kv"): 0.8, (MLP, "persistent"): 0.9})
    result = tune(w, [ATTENTION, FUSED])
    assert result.settings == {ATTN: "flex", MLP: "persistent"}
    assert result.tuned_s == pytest.approx(0.63) and result.baseline_s == pytest.approx(1.0)
    assert result.speedup == pytest.approx(1 / 0.63)
    # the fused MLP was timed with the attention's winner in force
    assert {(ATTN, "flex"), (MLP, "persistent")} in [set(b.items()) for b in w.builds[:5]]
    status = {(t.choice, tuple(t.settings.values())): t.status for t in result.trials}
    assert status[(ATTN, ("flex",))] == "kept"
    assert status[(ATTN, ("split_kv",))] == "slower"  # faster than the baseline, not flex
    reasons = {tuple(t.settings.values()): t.reason for t in result.trials}
    assert reasons[("split_kv",)] == "faster than the best so far, not the fastest option"
    assert status[(ATTN, ("split_sdpa",))] == "slower"
    assert [t.reason for t in result.trials if t.status == "confirm"] == ["baseline", "tuned"] * 2
    assert os.environ.get(ATTN) is None and os.environ.get(MLP) is None  # restored


def test_min_gain_tolerance_and_failures_keep_the_baseline():
    w = Workload(
        factors={(ATTN, "flex"): 0.99, (ATTN, "split_kv"): 0.5, (EPI, "triton"): 0.6},
        offsets={(ATTN, "split_kv"): 0.5},
        fails={(EPI, "triton")},
    )
    result = tune(w, [ATTENTION, EPILOGUES], min_gain=0.02)
    assert result.settings == {}
    assert result.tuned_s == result.baseline_s == 1.0
    by_value = {tuple(t.settings.values()): t for t in result.trials}
    assert by_value[("flex",)].status == "slower"  # 1 % faster: under min_gain
    assert by_value[("split_kv",)].status == "differs"
    assert by_value[("split_kv",)].error == pytest.approx(0.5)
    assert by_value[("triton",)].status == "failed"
    assert "RuntimeError: cannot run" in by_value[("triton",)].reason
    assert not any(t.status == "confirm" for t in result.trials)  # nothing to re-time


def test_settings_not_faster_when_retimed_are_dropped():
    w = Workload(factors={(ATTN, "flex"): 0.8})
    w.search_builds = 1 + 3  # the baseline and the three attention options
    w.retimed = {frozenset({(ATTN, "flex")}): 1.5}  # slower than the baseline on re-timing
    result = tune(w, [ATTENTION])
    assert result.settings == {}
    assert result.baseline_s == result.tuned_s == 1.0
    flex = [t for t in result.trials if t.settings == {ATTN: "flex"} and t.status != "confirm"]
    assert flex[0].status == "slower" and "re-timed" in flex[0].reason


def test_a_winner_later_winners_made_redundant_is_pruned():
    """Greedy choices interact: the attention path wins first (0.9), the fused MLP on top of
    it (0.6) — but the fused MLP alone is as fast (0.6), so the attention's winner is left
    out; the MLP's is not (0.9 without it)."""
    times = {frozenset(): 1.0, frozenset({(ATTN, "flex")}): 0.9,
             frozenset({(ATTN, "flex"), (MLP, "persistent")}): 0.6,
             frozenset({(MLP, "persistent")}): 0.6}  # fmt: skip
    w = Workload()

    def timer(run) -> float:  # the state the call was just built in
        return times.get(frozenset(w.builds[-1].items()), 1.0)

    with mock.patch("ate_fast.tuning.search.gc.collect"):  # as tune(): nothing to collect
        result = autotune(w.build, [ATTENTION, FUSED], timer=timer, progress=False)
    assert result.settings == {MLP: "persistent"} and result.tuned_s == pytest.approx(0.6)
    by_choice = {t.choice: t for t in result.trials if t.status != "confirm"}
    assert by_choice[f"without {MLP}"].status == "slower"  # 0.9 without it: it stays
    assert by_choice[f"without {MLP}"].settings == {ATTN: "flex"}
    pruned = by_choice[f"without {ATTN}"]
    assert pruned.status == "pruned" and pruned.settings == {MLP: "persistent"}
    flex = next(t for t in result.trials if t.settings == {ATTN: "flex"} and t.choice == ATTN)
    assert flex.status == "slower" and "pruned" in flex.reason
    assert sum(t.status == "kept" for t in result.trials) == 1


def test_the_time_budget_skips_the_options_left():
    w = Workload({(ATTN, "flex"): 0.5})
    with mock.patch("ate_fast.tuning.search.time.monotonic", side_effect=[0.0] + [10.0] * 20):
        result = tune(w, [ATTENTION, FUSED], budget_s=1.0)
    assert result.settings == {}
    assert [t.status for t in result.trials[1:]] == ["skipped"] * 4
    assert len(w.builds) == 1  # only the baseline was built


def test_a_choice_resets_its_variables_to_the_callers_before_each_option(monkeypatch):
    """The caller's own value is the baseline; an option of a later choice that sets the same
    variable replaces the earlier winner's value instead of adding to it."""
    monkeypatch.setenv(ATTN, "sdpa")
    tiles = "ATE_FAST_SPLIT_KV_TILES"
    first = Choice("attention", ({ATTN: "split_kv"},))
    second = Choice("tiles", ({ATTN: "split_kv", tiles: "block_q=16"}, {ATTN: "flex"}))
    w = Workload({(ATTN, "split_kv"): 0.8, (tiles, "block_q=16"): 0.5})
    result = tune(w, [first, second])
    assert result.settings == {ATTN: "split_kv", tiles: "block_q=16"}
    assert {(ATTN, "flex")} == set(w.builds[3].items())  # not split_kv's tiles with flex
    assert not any(t.choice.startswith("without") for t in result.trials)  # one winner: tiles'
    assert os.environ[ATTN] == "sdpa" and tiles not in os.environ


def test_apply_settings_sets_unsets_and_restores(monkeypatch):
    monkeypatch.setenv(MLP, "torch")
    monkeypatch.setenv(EPI, "triton")
    with pytest.raises(KeyError):
        with apply_settings({ATTN: "flex", MLP: "persistent", EPI: None}) as applied:
            assert applied == {ATTN: "flex", MLP: "persistent"}
            assert os.environ[ATTN] == "flex" and os.environ[MLP] == "persistent"
            assert EPI not in os.environ
            raise KeyError("inside")
    assert ATTN not in os.environ and os.environ[MLP] == "torch" and os.environ[EPI] == "triton"


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"ATE_FAST_NOPE": "1"}, "'ATE_FAST_NOPE' is not one of the package's settings"),
        ({ATTN: "fast"}, r"ATE_FAST_PREFIX_ATTENTION expected one of \['sdpa'"),
        ({ATTN: 3}, "ATE_FAST_PREFIX_ATTENTION must be a string, got int"),
        ([(ATTN, "flex")], "expected a mapping of ATE_FAST_\\* variables"),
        ({"PATH": None}, "'PATH' is not one of the package's settings"),
    ],
)
def test_bad_settings_are_refused_by_name(settings, match):
    with pytest.raises(InvalidArgumentError, match=match):
        with apply_settings(settings):
            pass


def test_bad_arguments_name_the_argument():
    w = Workload()
    cases = [
        (dict(rounds=0), "rounds must be >= 1, got 0"),
        (dict(rounds=True), "rounds must be an int, got bool"),
        (dict(warmup=-1), "warmup must be >= 0, got -1"),
        (dict(min_gain=1.5), "min_gain must be a fraction < 1, got 1.5"),
        (dict(min_gain=-0.1), "min_gain must be >= 0.0, got -0.1"),
        (dict(tolerance=0.0), "tolerance must be > 0.0, got 0.0"),
        (dict(tolerance=float("nan")), "tolerance must be finite, got nan"),
        (dict(budget_s=0), "budget_s must be > 0.0, got 0"),
    ]
    for kwargs, match in cases:
        with pytest.raises((InvalidArgumentError, TypeError), match=match):
            tune(w, [ATTENTION], **kwargs)
    assert not w.builds  # refused before the first build
    with pytest.raises(InvalidArgumentError, match=r"choices\[1\]: expected an ate_fast.tuning"):
        tune(w, [ATTENTION, {ATTN: "flex"}])
    assert not w.builds  # the choices too
    with pytest.raises(InvalidArgumentError, match="build: expected a callable"):
        autotune("sampler", progress=False)
    with pytest.raises(InvalidArgumentError, match="build: the call it returns must return a"):
        autotune(lambda: lambda: 3.0, [ATTENTION], progress=False)
    with pytest.raises(InvalidArgumentError, match="Choice 'x': options must not be empty"):
        Choice("x", ())
    with pytest.raises(InvalidArgumentError, match="Choice 'x': an option: ATE_FAST_FUSED_MLP"):
        Choice("x", ({MLP: "fused"},))
    with pytest.raises(InvalidArgumentError, match="device_type: expected 'cpu' or 'cuda'"):
        default_choices("mps")


def _paths(choices) -> dict:
    """Each single path choice's name → its options' paths (combinations left out)."""
    return {c.name: [o[c.name] for o in c.options] for c in choices if c.name not in COMBINATIONS}


def test_default_choices_offer_every_path_but_the_one_in_force(monkeypatch):
    cuda = _paths(default_choices("cuda", tiles=False))
    assert cuda[ATTN] == ["split_kv", "flex", "split_sdpa", "gemm"]  # sdpa: the baseline's
    assert cuda[MLP] == ["persistent"]
    # the path that runs now on the device type is the baseline's: not an option
    running = block_epilogues.selected_path("cuda")
    assert cuda[EPI] == [p for p in ("torch", "triton") if p != running]
    assert "ATE_FAST_GUIDANCE_STREAM" not in cuda and "ATE_FAST_TRANSFORMER_GUIDANCE" not in cuda
    assert "ATE_FAST_MLP_GUIDANCE_UNROLL" not in cuda
    guided = [c.name for c in default_choices("cuda", guided=True, transformer_encoder=True)]
    assert guided[-2:] == ["ATE_FAST_GUIDANCE_STREAM", "ATE_FAST_TRANSFORMER_GUIDANCE"]
    # the MLP encoder's kernel: its other unroll, for an MLP-guided sampler only
    mlp = _paths(default_choices("cuda", guided=True, tiles=False))
    assert mlp["ATE_FAST_MLP_GUIDANCE_UNROLL"] == ["16"]
    assert "ATE_FAST_TRANSFORMER_GUIDANCE" not in mlp
    monkeypatch.setenv(ATTN, "FLEX")
    cuda = _paths(default_choices("cuda", tiles=False))
    assert cuda[ATTN] == ["sdpa", "split_kv", "split_sdpa", "gemm"]
    cpu = [(c.name, [o[c.name] for o in c.options]) for c in default_choices("cpu")]
    assert cpu == [(GEMM, [p for p in ("onednn", "aten") if p != cpu_gemm.selected_gemm()])]
    monkeypatch.setenv(GEMM, "aten")  # forced: auto (whatever it selects here) is an option
    cpu = [(c.name, [o[c.name] for o in c.options]) for c in default_choices("cpu")]
    assert cpu == [(GEMM, ["auto", "onednn"])]
    for switch in SWITCHES:  # every default is a path of its variable
        assert switch.default is None or switch.default in switch.paths
        for path in switch.paths:
            assert check_settings({switch.var: path}) == {switch.var: path}


def test_the_triton_block_is_tried_as_one_choice_before_the_paths():
    """On CUDA the first choice sets the few-row GEMM and PDL at once, then also the
    split-key attention, then also the persistent MLP: paths a greedy search would drop one
    by one; an excluded path drops the options that need it (the Orin: PDL, all); none on
    the CPU."""
    first = default_choices("cuda")[0]
    assert first.name == "Triton block with PDL" and len(first.options) == 3
    gemm = {"ATE_FAST_SKINNY_GEMM": "triton", "ATE_FAST_TRITON_PDL": "on"}
    block = {ATTN: "split_kv", **gemm}
    assert first.options == (gemm, block, {**block, MLP: "persistent"})
    assert all(check_settings(o) == o for o in first.options)
    two = default_choices("cuda", exclude=(f"{MLP}=persistent",))[0]
    assert two.name == first.name and two.options == (gemm, block)
    orin = default_choices("cuda", exclude=("ATE_FAST_TRITON_PDL=on",))
    assert first.name not in [c.name for c in orin]
    assert first.name not in [c.name for c in default_choices("cpu")]


def test_save_and_load_round_trip(tmp_path):
    w = Workload({(ATTN, "flex"): 0.5})
    result = tune(w, [ATTENTION])
    path = result.save(tmp_path / "tuned.json")
    document = json.loads(path.read_text())
    assert document["format"] == "ate_fast.settings/1"
    assert document["settings"] == {ATTN: "flex"} and document["device"] == "cpu"
    assert document["speedup"] == pytest.approx(2.0)
    assert len(document["trials"]) == len(result.trials)
    assert load_settings(path) == {ATTN: "flex"}
    with apply_settings(load_settings(path, device=torch.device("cpu"))):
        assert os.environ[ATTN] == "flex"
    assert "kept: ATE_FAST_PREFIX_ATTENTION=flex" in result.summary()

    document["device"] = "NVIDIA H200"
    path.write_text(json.dumps(document))
    with pytest.warns(UserWarning, match="tuned on NVIDIA H200, this is cpu"):
        load_settings(path, device=torch.device("cpu"))
    document["settings"] = {ATTN: "fastest"}
    path.write_text(json.dumps(document))
    with pytest.raises(InvalidArgumentError, match=r"tuned\.json: settings: ATE_FAST_PREFIX"):
        load_settings(path)
    path.write_text(json.dumps({"format": "other/2", "settings": {}}))
    with pytest.raises(InvalidArgumentError, match=r"expected format 'ate_fast\.settings/1'"):
        load_settings(path)
    path.write_text("{not json")
    with pytest.raises(InvalidArgumentError, match="not a JSON settings file"):
        load_settings(path)
    with pytest.raises(FileNotFoundError, match="settings file not found"):
        load_settings(tmp_path / "missing.json")


def test_settings_command_prints_them_for_a_shell_and_a_service(tmp_path, capsys):
    """``ate-fast settings FILE``: ``export`` lines a POSIX shell evaluates back to the
    file's settings (a value with spaces and quotes survives), or ``VAR=value`` lines
    (``--format env``), with what they were measured on as comments; the device check."""
    import shlex
    import subprocess

    from ate_fast.cli import main
    from ate_fast.tuning.settings import save_settings

    tiles = "ATE_FAST_SPLIT_KV_TILES"
    settings = {ATTN: "split_kv", tiles: "block_q=32, block_k='32'"}
    path = save_settings(tmp_path / "tuned.json", settings, device="NVIDIA H200")
    assert main(["settings", str(path)]) == 0
    shell = capsys.readouterr().out
    assert "# device: NVIDIA H200" in shell and f"export {ATTN}=split_kv" in shell
    script = shell + "".join(f'printf "%s\\n" "${var}"\n' for var in settings)
    echoed = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True)
    assert echoed.stdout.splitlines() == list(settings.values())
    assert main(["settings", str(path), "--format", "env"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if not x.startswith("#")]
    assert lines == [f"{var}={value}" for var, value in settings.items()]
    with pytest.warns(UserWarning, match="tuned on NVIDIA H200, this is cpu"):
        assert main(["settings", str(path), "--device", "cpu"]) == 0
    assert shlex.split(shell.splitlines()[-1])[1] == f"{tiles}={settings[tiles]}"


def _captured_sampler_build(head, calls: list):
    """``build()`` of a captured flow Euler loop (3 steps) with a prefix cache, recording
    how many times the split-key attention ran while it was captured and first called."""
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(2, 6, 3, generator=g, dtype=torch.float32)
    with torch.no_grad():
        cond = head.prefix_cache(torch.randn(2, 5, 32, generator=g, dtype=torch.float32))

    def build():
        before = _split_kv_launches()
        with torch.no_grad():
            captured = FlowSampler(head, 3).capture(noise, cond)
            captured(noise, cond)
        calls.append(_split_kv_launches() - before)
        return lambda: captured(noise, cond)

    return build


def _split_kv_launches() -> int:
    from ate_fast.models import split_kv_attention_triton

    return getattr(split_kv_attention_triton, "_tuning_test_launches", 0)


def test_a_kept_setting_changes_what_the_capture_records(monkeypatch):
    """A real captured sampler: with the split-key attention made the winner (the timer
    favours it; on the CPU the interpreter is slow) the tuned capture runs its kernels, the
    baseline's does not, and both outputs agree to float32 rounding."""
    from ate_fast.models import split_kv_attention_triton

    original = split_kv_attention_triton.split_kv_attention

    def counted(*args, **kwargs):
        split_kv_attention_triton._tuning_test_launches = _split_kv_launches() + 1
        return original(*args, **kwargs)

    monkeypatch.setattr(split_kv_attention_triton, "split_kv_attention", counted)
    head = small_head(torch.float32)
    calls: list = []
    build = _captured_sampler_build(head, calls)

    def timer(run) -> float:  # split_kv "wins" where the last build launched it
        run()
        return 0.5 if calls[-1] else 1.0

    choice = Choice(ATTN, ({ATTN: "split_kv"},))
    result = autotune(build, [choice], timer=timer, tolerance=1e-5, progress=False)
    assert result.settings == {ATTN: "split_kv"}
    assert calls[0] == 0 and calls[1] == 2 * 3  # 2 blocks × 3 steps, recorded in the capture
    kept = result.trials[1]
    assert kept.status == "kept" and kept.error < 1e-5
    assert [c > 0 for c in calls[2:]] == [False, True, False, True]  # the re-timing: A B A B


def test_median_seconds_times_a_real_call():
    x = torch.randn(64, 64)
    calls = []

    def run():
        calls.append(1)
        return x @ x

    seconds = median_seconds(run, rounds=5, warmup=2)
    assert 0.0 < seconds < 1.0
    assert len(calls) == 7


def test_the_command_tunes_a_transformer_guided_sampler(tmp_path, capsys):
    """``ate-fast tune`` on the CPU: a flow transformer guided through a Transformer-encoder
    align checkpoint; the encoder's gradient paths are choices (but the one ``--exclude``
    names), every option's output matches the baseline's, and the file it writes loads."""
    from ate_fast.align import ActionVAE, save_checkpoint
    from ate_fast.cli import main

    torch.manual_seed(0)
    vae = ActionVAE(3, 6, latent_dim=4, arch="transformer", d_model=16, num_heads=2,
                    num_layers=3)  # fmt: skip
    save_checkpoint(tmp_path / "vae", vae, stage=2)
    out = tmp_path / "tuned.json"
    argv = [
        "tune", "--head", "flow-transformer", "--random-init", "--set", "horizon=6",
        "--set", "action_dim=3", "--set", "depth=2", "--steps", "3", "--device", "cpu",
        "--batch", "2", "--cond-len", "5", "--cond-as", "kv-cache", "--guidance-vae",
        str(tmp_path / "vae"), "--rounds", "2", "--warmup", "1", "--no-progress",
        "--exclude", "ATE_FAST_TRANSFORMER_GUIDANCE=autograd", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "kept:" in printed and f"wrote {out}" in printed
    document = json.loads(out.read_text())
    tried = {(t["choice"], tuple(t["settings"].values())) for t in document["trials"]}
    assert ("ATE_FAST_TRANSFORMER_GUIDANCE", ("autograd",)) not in tried  # --exclude
    assert ("ATE_FAST_TRANSFORMER_GUIDANCE", ("vjp",)) in tried
    other = "onednn" if cpu_gemm.selected_gemm() == "aten" else "aten"  # auto's is the baseline
    assert ("ATE_FAST_CPU_GEMM", (other,)) in tried
    for trial in document["trials"]:
        assert trial["status"] in ("baseline", "kept", "slower", "pruned", "confirm"), trial
        assert trial["error"] < 1e-4 and trial["seconds"] > 0
    assert load_settings(out) == document["settings"]


def test_default_choices_exclude_paths_by_name(monkeypatch):
    cuda = default_choices("cuda", exclude=(f"{ATTN}=flex", f"{MLP}=persistent"))
    names = {c.name: [o.get(c.name) for o in c.options] for c in cuda}
    assert names[ATTN] == ["split_kv", "split_sdpa", "gemm"] and MLP not in names  # none left
    skinny = "ATE_FAST_SKINNY_GEMM=triton tiles"
    assert [n for n in names if "tiles" in n] == [f"{ATTN}=split_kv tiles", skinny]  # no MLP's
    without = default_choices("cuda", exclude=("ATE_FAST_SKINNY_GEMM=triton",))
    assert skinny not in [c.name for c in without]
    tiles = "ATE_FAST_FUSED_MLP_TILES"
    monkeypatch.setenv(MLP, "persistent")  # in force: its tiles still tried, after it
    cuda = [c.name for c in default_choices("cuda")]
    assert cuda[cuda.index(MLP) + 1] == f"{MLP}=persistent tiles"
    assert cuda[cuda.index(ATTN) + 1] == f"{ATTN}=split_kv tiles"
    choices = {c.name: c for c in default_choices("cuda") if c.name.endswith("tiles")}
    choice = choices[f"{MLP}=persistent tiles"]
    assert [o[tiles] for o in choice.options] == ["stages=3", "block_f=64,slice=1024"]
    assert all(o[MLP] == "persistent" for o in choice.options)
    for option in choices[f"{ATTN}=split_kv tiles"].options:  # each parses as the path's
        assert option[ATTN] == "split_kv"
        monkeypatch.setenv("ATE_FAST_SPLIT_KV_TILES", option["ATE_FAST_SPLIT_KV_TILES"])
        assert split_kv_attention.tiles_from_env()
    excluded = (f"{ATTN}=split_kv", f"{MLP}=persistent", "ATE_FAST_SKINNY_GEMM=triton")
    assert not any("tiles" in c.name for c in default_choices("cuda", exclude=excluded))
    options = choices[skinny].options  # other column tiles, the separate sum; with the path
    assert all(o["ATE_FAST_SKINNY_GEMM"] == "triton" for o in options) and len(options) == 3
    for option in options[:2]:  # each parses, and is not the default (the path's own option)
        monkeypatch.setenv(skinny_gemm.BLOCK_N_VAR, option[skinny_gemm.BLOCK_N_VAR])
        assert skinny_gemm.block_n() != skinny_gemm.DEFAULT_BLOCK_N
    assert options[2]["ATE_FAST_SPLIT_REDUCE"] == "kernel"  # the default: in-kernel, captured
    # programmatic dependent launch: its own choice, after the paths (on CUDA only)
    names = [c.name for c in default_choices("cuda")]
    assert names.index("ATE_FAST_TRITON_PDL") > names.index("ATE_FAST_SKINNY_GEMM")
    assert "ATE_FAST_TRITON_PDL" not in [c.name for c in default_choices("cpu")]
    assert not any("tiles" in c.name for c in default_choices("cuda", tiles=False))
    for bad in ("flex", f"{ATTN}=fastest", "ATE_FAST_NOPE=x"):
        with pytest.raises(InvalidArgumentError, match="exclude: expected 'VAR=path'"):
            default_choices("cuda", exclude=(bad,))
    with pytest.raises(InvalidArgumentError, match="exclude: expected a sequence"):
        default_choices("cuda", exclude=f"{ATTN}=flex")


@pytest.mark.cuda
def test_every_default_cuda_path_runs_and_matches_in_a_capture():
    """π0's expert (2 blocks, bf16) in a captured flow Euler loop on the GPU, tuned over the
    default CUDA choices (FlexAttention left to its own tests: its compile): every path
    builds, runs inside the CUDA graph and matches the defaults' output (no trial failed
    or differs), and the settings kept give that output again."""
    from ate_fast.models import FlowTransformerHead

    torch.manual_seed(0)
    head = FlowTransformerHead("pi0-expert", depth=2).to("cuda", torch.bfloat16)
    head.eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        tokens = torch.randn(1, 816, 1024, generator=gen).to("cuda", torch.bfloat16)
        cache = head.prefix_cache(tokens)
    noise = torch.randn(1, 50, 32, generator=gen).to("cuda")

    def build():
        with torch.no_grad():
            captured = FlowSampler(head, 3).capture(noise, cache, check_finite=False)
        return lambda: captured(noise, cache)

    import gc

    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    build()()  # one capture: what it reserves
    gc.collect()
    one = torch.cuda.memory_reserved() - before
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    result = autotune(build, rounds=5, warmup=2, exclude=(f"{ATTN}=flex",), progress=False)
    # each trial's capture (its graph's private memory pool) was given back, not kept: a
    # search of ~15 trials leaves about one capture's memory reserved, not one per trial
    assert torch.cuda.memory_reserved() - before <= 2 * one + (16 << 20), (one, before)
    bad = [t for t in result.trials if t.status in ("failed", "differs")]
    assert not bad, result.summary()
    tried = {t.choice for t in result.trials}
    assert {ATTN, MLP, EPI, "ATE_FAST_L2_PREFETCH", "ATE_FAST_SKINNY_GEMM"} <= tried
    assert all(t.error <= 1e-2 for t in result.trials)


class Interrupting(Workload):
    """A :class:`Workload` whose build raises KeyboardInterrupt (a killed or Ctrl-C'd search)
    the first time ``stop_at`` is in force."""

    def __init__(self, stop_at, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stop_at, self.stopped = stop_at, False

    def build(self):
        if not self.stopped and self.stop_at in self.state():
            self.stopped = True
            raise KeyboardInterrupt
        return super().build()


FACTORS = {(ATTN, "flex"): 0.7, (ATTN, "split_kv"): 0.8, (MLP, "persistent"): 0.9}


def test_an_interrupted_search_resumes_from_its_journal(tmp_path):
    """Cut off at the fused MLP's trial, the search has every finished trial on disk; run
    again with the journal it builds the baseline once (untimed) and only the options left,
    takes the rest as recorded, and ends where an uninterrupted search ends."""
    journal = tmp_path / "tune.journal"
    whole = tune(Workload(FACTORS), [ATTENTION, FUSED])
    w = Interrupting((MLP, "persistent"), FACTORS)
    with pytest.raises(KeyboardInterrupt):
        tune(w, [ATTENTION, FUSED], journal=journal, workload={"head": "small"})
    assert os.environ.get(ATTN) is None  # restored on the way out
    lines = journal.read_text().splitlines()
    assert len(lines) == 1 + 3  # the header and the three attention trials, flushed
    assert [json.loads(line)["option"] for line in lines[1:]] == [
        dict(o) for o in ATTENTION.options
    ]

    again = Workload(FACTORS)
    result = tune(again, [ATTENTION, FUSED], journal=journal, workload={"head": "small"})
    assert result.settings == whole.settings == {ATTN: "flex", MLP: "persistent"}
    assert result.tuned_s == pytest.approx(whole.tuned_s)
    searched = [set(b.items()) for b in again.builds[:2]]
    assert searched == [set(), {(ATTN, "flex"), (MLP, "persistent")}]  # baseline, the MLP only
    assert len(again.builds) == 2 + 2 + 4  # each winner left out, the re-timing: afresh
    searched = [t.resumed for t in result.trials if t.status != "confirm"]
    assert searched == [True] * 4 + [False] * 3
    assert [t.status for t in result.trials] == [t.status for t in whole.trials]
    assert "(journal)" in result.summary()
    assert len(journal.read_text().splitlines()) == 1 + 4 + 2  # the MLP's and the prune's


def test_a_resumed_search_takes_failures_and_reclassifies_errors(tmp_path):
    """A failed trial is not rebuilt; a recorded output error is judged by this run's
    tolerance; a recorded trial is taken even after the time budget has run out."""
    journal = tmp_path / "tune.journal"
    w = Workload(FACTORS, offsets={(ATTN, "flex"): 0.05}, fails={(ATTN, "split_kv")})
    first = tune(w, [ATTENTION], journal=journal)
    status = {t.settings.get(ATTN): t.status for t in first.trials}
    assert status["flex"] == "differs" and status["split_kv"] == "failed"
    again = Workload(FACTORS, offsets={(ATTN, "flex"): 0.05}, fails={(ATTN, "split_kv")})
    with mock.patch("ate_fast.tuning.search.time.monotonic", side_effect=[0.0] + [10.0] * 20):
        result = tune(again, [ATTENTION, FUSED], journal=journal, tolerance=0.1, budget_s=1.0)
    searched = [t for t in result.trials if t.status != "confirm"]
    status = {t.settings.get(ATTN, t.settings.get(MLP)): t.status for t in searched}
    assert status["flex"] == "kept"  # 0.05 is within 0.1
    assert status["split_kv"] == "failed" and status["persistent"] == "skipped"
    failed = next(t for t in result.trials if t.status == "failed")
    assert failed.resumed and "RuntimeError: cannot run" in failed.reason
    assert [set(b.items()) for b in again.builds][:1] == [set()]  # no attention option built


def test_a_journal_of_another_run_is_refused_by_name(tmp_path):
    journal = tmp_path / "tune.journal"
    tune(Workload(FACTORS), [ATTENTION], journal=journal, workload={"batch": 1})
    cases = [
        (dict(workload={"batch": 8}), r"workload \{'batch': 1\} \(now \{'batch': 8\}\)"),
        (dict(workload={"batch": 1}, rounds=5), "rounds 20 \\(now 5\\)"),
    ]
    for kwargs, match in cases:
        with pytest.raises(InvalidArgumentError, match=match):
            tune(Workload(FACTORS), [ATTENTION], journal=journal, **kwargs)
    other = Workload(FACTORS, offsets={})
    other.build = lambda: lambda: torch.zeros(2, 3)  # another call's output
    with pytest.raises(InvalidArgumentError, match="records a baseline output of shape \\(2, 3\\)"):
        tune(other, [ATTENTION], journal=journal, workload={"batch": 1})
    for text, match in (("not json\n", "line 1 is not JSON"), ('{"format": "x"}\n', "format")):
        bad = tmp_path / "bad.journal"
        bad.write_text(text)
        with pytest.raises(InvalidArgumentError, match=match):
            tune(Workload(FACTORS), [ATTENTION], journal=bad)
    good = journal.read_text().splitlines()
    bad.write_text("\n".join([good[0], '{"choice": "x"}', ""]))
    with pytest.raises(InvalidArgumentError, match="line 2 is not a trial"):
        tune(Workload(FACTORS), [ATTENTION], journal=bad, workload={"batch": 1})
    bad.write_bytes(b"\x89PNG\r\n\x1a\n\x00")
    with pytest.raises(InvalidArgumentError, match="is not a tuning journal"):
        tune(Workload(FACTORS), [ATTENTION], journal=bad)
    with pytest.raises(InvalidArgumentError, match="journal: expected a file path"):
        tune(Workload(FACTORS), [ATTENTION], journal=tmp_path)
    with pytest.raises(InvalidArgumentError, match="workload: expected a mapping"):
        tune(Workload(FACTORS), [ATTENTION], workload=[1])


def test_a_line_cut_off_mid_write_is_dropped_and_appends_stay_whole(tmp_path):
    journal = tmp_path / "tune.journal"
    with pytest.raises(KeyboardInterrupt):
        tune(Interrupting((MLP, "persistent"), FACTORS), [ATTENTION, FUSED], journal=journal)
    with journal.open("a") as f:
        f.write('{"choice": "ATE_FAST_FUSED_MLP", "appl')  # the process died here
    result = tune(Workload(FACTORS), [ATTENTION, FUSED], journal=journal)
    assert result.settings == {ATTN: "flex", MLP: "persistent"}
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    assert [r.get("option") for r in records[1:]] == [
        *map(dict, ATTENTION.options),
        {MLP: "persistent"},
        {ATTN: "flex"},  # without the MLP's winner
        {MLP: "persistent"},  # without the attention's
    ]


def test_a_bf16_output_is_recorded_exactly():
    from ate_fast.tuning.journal import decode_output, encode_output

    out = torch.randn(2, 50, 32).to(torch.bfloat16)
    back = decode_output(json.loads(json.dumps(encode_output(out))))
    assert back.dtype == torch.float32 and torch.equal(back, out.float())


def test_the_command_resumes_an_interrupted_tune_and_removes_its_journal(tmp_path, capsys):
    """``ate-fast tune`` cut off after its search, before the re-timing (Ctrl-C: exit 130, the
    journal kept and named); the same command resumes from it, then writes OUT and removes
    the journal; ``--fresh`` measures everything again."""
    from ate_fast.cli import main
    from ate_fast.tuning import search

    out = tmp_path / "tuned.json"
    argv = [
        "tune", "--head", "flow-transformer", "--random-init", "--set", "horizon=6",
        "--set", "action_dim=3", "--set", "depth=1", "--steps", "2", "--device", "cpu",
        "--cond-len", "5", "--cond-as", "kv-cache", "--rounds", "2", "--warmup", "1",
        "--no-progress", "--out", str(out),
    ]  # fmt: skip
    with mock.patch.object(search, "_confirm", side_effect=KeyboardInterrupt):
        assert main(argv) == 130
    journal = tmp_path / "tuned.json.journal"
    assert f"{journal}: the same command resumes" in capsys.readouterr().err
    assert not out.exists() and len(journal.read_text().splitlines()) == 2
    assert main(argv) == 0
    assert f"resuming from {journal}" in capsys.readouterr().err
    trials = json.loads(out.read_text())["trials"]
    assert [t["resumed"] for t in trials[:2]] == [True, True] and not journal.exists()
    assert main([*argv, "--overwrite", "--fresh"]) == 0
    assert not any(t["resumed"] for t in json.loads(out.read_text())["trials"])
    for settings in ({}, {GEMM: "aten"}):  # a search that kept nothing, one that kept a path

        def result(current, timed, ref, trials, min_gain, device, settings=settings):
            return search.TuneResult(settings, 2.0, 2.0 if not settings else 1.0, device, trials)

        capsys.readouterr()
        with mock.patch.object(search, "_confirm", result):
            assert main([*argv, "--overwrite"]) == 0
        printed = capsys.readouterr().out  # how to deploy what it kept
        assert (f"ate_fast.load_settings({str(out)!r})" in printed) == bool(settings)
        assert (f"ate-fast settings {out}" in printed) == bool(settings)


def test_the_command_tunes_a_real_time_chunking_sampler(tmp_path, capsys):
    """``ate-fast tune --rtc-horizon``: the captured sampler is RTC-guided (a VJP through the
    head per step) toward a previous chunk of the problem's shape, every trial matches the
    baseline; the RTC flags are checked by name."""
    from ate_fast import realtime
    from ate_fast.cli import main

    out = tmp_path / "rtc.json"
    base = [
        "tune", "--head", "flow-transformer", "--random-init", "--set", "horizon=6",
        "--set", "action_dim=3", "--set", "depth=1", "--steps", "2", "--device", "cpu",
        "--batch", "2", "--cond-len", "5", "--cond-as", "kv-cache", "--rounds", "2",
        "--warmup", "1", "--no-progress", "--out", str(out),
    ]  # fmt: skip
    made = []

    class Recorded(realtime.RTCGuidance):
        def __init__(self, prev, delay, **kwargs):
            made.append((tuple(prev.shape), delay, kwargs))
            super().__init__(prev, delay, **kwargs)

    with mock.patch.object(realtime, "RTCGuidance", Recorded):
        assert main([*base, "--rtc-horizon", "3", "--rtc-delay", "1"]) == 0
    assert made == [((2, 6, 3), 1, {"execution_horizon": 3, "max_guidance_weight": 5.0})]
    for trial in json.loads(out.read_text())["trials"]:
        assert trial["error"] < 1e-4, trial
    capsys.readouterr()
    for extra, message in (
        (["--rtc-delay", "2"], "--rtc-delay: needs --rtc-horizon"),
        (["--rtc-horizon", "9"], "--rtc-horizon must be in [1, H − 1] = [1, 5]"),
        (["--rtc-horizon", "3", "--rtc-delay", "4"], "--rtc-delay"),
    ):
        assert main([*base, "--overwrite", *extra]) == 2
        assert message in capsys.readouterr().err
