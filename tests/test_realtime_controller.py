"""The real-time controller (ate_fast.realtime.controller) on a toy environment: which
chunk's which action runs at every step, for every delay and strategy; the ensemble's
weights; the jump metric; the sampler-backed strategies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ate_fast
from ate_fast.errors import InvalidArgumentError
from ate_fast.models import make_head
from ate_fast.realtime.controller import (
    STRATEGIES,
    RealTimeController,
    SamplerChunks,
    action_jumps,
    align_plan,
    ensemble_weights,
    run_controller,
)
from ate_fast.realtime.latency import strategy_latency

B, H, D = 2, 8, 1


class LabelledChunks:
    """Chunk n's action i is 100·n + i (both episodes); records the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, object, int]] = []

    def __call__(self, obs, prev, delay):
        n = len(self.calls)
        self.calls.append((int(obs), None if prev is None else prev.clone(), delay))
        return (100.0 * n + torch.arange(H, dtype=torch.float64)).reshape(1, H, 1).repeat(B, 1, D)


def toy_run(strategy: str, s: int, d: int, steps: int = 30):
    chunks = LabelledChunks()
    ctrl = RealTimeController(chunks, horizon=H, execution_horizon=s, delay=d, strategy=strategy)
    clock = {"k": 0}

    def step(action):  # the toy environment: its observation is the step counter
        clock["k"] += 1
        return clock["k"]

    trace = run_controller(ctrl, 0, step, steps)
    return chunks, trace


def test_delay_zero_naive_executes_each_chunks_first_s_actions():
    s = 3
    chunks, trace = toy_run("naive", s, 0)
    executed = trace.stacked_actions()[:, 0, 0]
    expected = [100 * (k // s) + k % s for k in range(30)]
    assert executed.tolist() == expected
    assert [c[0] for c in chunks.calls] == list(range(0, 30, s))  # obs at the request


@pytest.mark.parametrize("strategy", ["naive", "rtc", "rtc_training"])
@pytest.mark.parametrize(
    "s,d", [(4, 0), (4, 1), (4, 2), (4, 4), (3, 3), (5, 2), (1, 0), (1, 1), (8, 0)]
)
def test_the_right_chunk_at_the_right_time(strategy, s, d):
    chunks, trace = toy_run(strategy, s, d)
    executed = trace.stacked_actions()[:, 0, 0]
    for k, a in enumerate(executed):
        n = 0 if k < s + d else (k - d) // s  # the last chunk available at step k
        assert a == 100 * n + (k - n * s), (k, a)
    # chunk n was requested at step n·s, from that step's observation, with delay d
    assert [c[0] for c in chunks.calls] == list(range(0, 30, s))
    assert [c[2] for c in chunks.calls] == [0] + [d] * (len(chunks.calls) - 1)
    switches = [k for k, sw in enumerate(trace.switches) if sw]
    assert switches == [n * s + d for n in range(1, len(chunks.calls)) if n * s + d < 30]
    # the prefix handed over: the previous plan from the request step on; its first d
    # actions are exactly what was executed while the new chunk was computed
    for n, (_, prev, _) in enumerate(chunks.calls[1:], start=1):
        k0 = n * s
        for i in range(min(d, 30 - k0)):
            assert prev[0, i, 0] == executed[k0 + i]
        first = 100 * (n - 1) + min(s, H - 1)  # index s of the previous chunk (or its last)
        assert prev[0, 0, 0] == first


def test_ensemble_weights_sum_to_one_and_favour_the_oldest():
    for count in (1, 2, 5):
        w = ensemble_weights(count)
        assert abs(w.sum() - 1.0) < 1e-15
        assert np.all(np.diff(w) < 0)  # the oldest prediction weighs the most
    assert ensemble_weights(3, 0.0).tolist() == [1 / 3, 1 / 3, 1 / 3]
    # a negative decay favours the newest; far from 0 the weights stay finite (one-hot)
    assert np.all(np.diff(ensemble_weights(4, -0.5)) > 0)
    assert ensemble_weights(3, -1e4).tolist() == [0.0, 0.0, 1.0]
    assert ensemble_weights(3, 1e4).tolist() == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("decay", [float("nan"), float("inf"), -float("inf")])
def test_ensemble_decay_must_be_finite(decay):
    """NaN or ±inf made every ensembled action NaN without a word."""
    with pytest.raises(InvalidArgumentError, match="ensemble_decay must be finite"):
        ensemble_weights(3, decay)
    with pytest.raises(InvalidArgumentError, match="ensemble_decay must be finite"):
        RealTimeController(LabelledChunks(), horizon=H, execution_horizon=4, delay=0,
                           strategy="ensemble", ensemble_decay=decay)  # fmt: skip
    with pytest.raises(TypeError, match="ensemble_decay must be a float, got str"):
        ensemble_weights(3, "0.01")


def test_ensemble_averages_every_available_chunk_covering_the_step():
    s, d = 2, 1
    _, trace = toy_run("ensemble", s, d, steps=12)
    executed = trace.stacked_actions()[:, 0, 0]
    for k, a in enumerate(executed):
        available = [0] + [n for n in range(1, 10) if n * s + d <= k]
        covering = [n for n in available if k - n * s < H]
        w = ensemble_weights(len(covering))
        want = sum(wj * (100 * n + k - n * s) for wj, n in zip(w, covering))
        assert abs(a - want) < 1e-9, (k, a, want)


def test_action_jumps():
    actions = np.zeros((5, 1, 2))
    actions[2:, 0, 0] = 3.0  # a jump of 3 at step 2
    actions[4, 0, 1] = 1.0  # a jump of 1 at step 4
    out = action_jumps(actions, np.array([False, False, True, False, False]))
    assert out == {"switch": 3.0, "other": 1.0 / 3, "switch_count": 1, "other_count": 3}
    valid = np.ones((5, 1), bool)
    valid[4] = False
    out = action_jumps(actions, np.array([False, False, True, False, False]), valid)
    assert out["other"] == 0.0 and out["other_count"] == 2
    with pytest.raises(InvalidArgumentError, match="switches"):
        action_jumps(actions, np.zeros(4, bool))


def test_align_plan():
    chunk = torch.arange(H, dtype=torch.float64).reshape(1, H, 1)
    assert align_plan(chunk, 3)[0, :, 0].tolist() == [3, 4, 5, 6, 7, 7, 7, 7]
    assert align_plan(chunk, 0) is chunk


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sampler_strategies_run_and_keep_the_committed_prefix(strategy):
    torch.manual_seed(0)
    policy = make_head("mlp", "small", horizon=H, action_dim=3, cond_dim=2).eval()
    sampler = ate_fast.FlowSampler(policy, num_steps=3)
    gen = torch.Generator().manual_seed(0)
    s, d = 4, 2
    fn = SamplerChunks(
        sampler, lambda: torch.randn(B, H, 3, generator=gen), strategy=strategy,
        execution_horizon=s, max_delay=d,
    )  # fmt: skip
    made = []

    def recording(obs, prev, delay):
        made.append((prev, fn(obs, prev, delay)))
        return made[-1][1]

    ctrl = RealTimeController(recording, horizon=H, execution_horizon=s, delay=d,
                              strategy=strategy)  # fmt: skip
    trace = run_controller(ctrl, torch.zeros(B, 2), lambda a: torch.randn(B, 2), 16)
    assert len(trace.latencies) == 4 and all(t > 0 for t in trace.latencies)
    if strategy == "rtc_training":
        for prev, chunk in made[1:]:
            assert torch.equal(chunk[:, :d], prev[:, :d])
    if strategy == "rtc":
        for prev, chunk in made[1:]:
            assert (chunk[:, :d] - prev[:, :d]).abs().max() < 0.5


def test_errors():
    with pytest.raises(InvalidArgumentError, match="delay"):
        RealTimeController(LabelledChunks(), horizon=H, execution_horizon=4, delay=5)
    with pytest.raises(InvalidArgumentError, match="delay"):
        RealTimeController(LabelledChunks(), horizon=H, execution_horizon=2, delay=3)
    with pytest.raises(InvalidArgumentError, match="strategy"):
        RealTimeController(LabelledChunks(), horizon=H, execution_horizon=4, delay=0,
                           strategy="fancy")  # fmt: skip
    ctrl = RealTimeController(lambda o, p, d: torch.zeros(1, 3, 1), horizon=H,
                              execution_horizon=4, delay=0)  # fmt: skip
    with pytest.raises(InvalidArgumentError, match="policy must return"):
        ctrl.act(0)


def test_a_controller_must_agree_with_its_sampler_chunks():
    """SamplerChunks' s places the RTC mask: a controller with another s was accepted, and
    the mask then weighted steps of prev that hold only padding."""
    sampler = ate_fast.FlowSampler(make_head("mlp", "small", horizon=H, action_dim=3), 2)
    noise = lambda: torch.zeros(B, H, 3)  # noqa: E731
    rtc = SamplerChunks(sampler, noise, strategy="rtc", execution_horizon=1, max_delay=1)
    with pytest.raises(InvalidArgumentError, match=r"controller's s = 4 differs .* s = 1"):
        RealTimeController(rtc, horizon=H, execution_horizon=4, delay=1, strategy="rtc")
    with pytest.raises(InvalidArgumentError, match="strategy: the controller's 'naive'"):
        RealTimeController(rtc, horizon=H, execution_horizon=1, delay=1)
    trained = SamplerChunks(
        sampler, noise, strategy="rtc_training", execution_horizon=4, max_delay=1
    )
    with pytest.raises(InvalidArgumentError, match=r"d = 2 exceeds .* max_delay = 1"):
        RealTimeController(trained, horizon=H, execution_horizon=4, delay=2,
                           strategy="rtc_training")  # fmt: skip
    RealTimeController(rtc, horizon=H, execution_horizon=1, delay=1, strategy="rtc")


def test_strategy_latency_measures_every_variant():
    torch.manual_seed(0)
    policy = make_head("mlp", "small", horizon=H, action_dim=3, cond_dim=2).eval()
    sampler = ate_fast.FlowSampler(policy, num_steps=3)
    out = strategy_latency(sampler, torch.randn(1, H, 3), torch.randn(1, 2),
                           execution_horizon=4, delay=2, repeats=3)  # fmt: skip
    assert set(out) == {f"{v}/{m}" for v in ("plain", "rtc", "inpainting")
                        for m in ("eager", "captured")}  # fmt: skip
    assert all(row["median_ms"] > 0 for row in out.values())
