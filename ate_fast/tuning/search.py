"""Pick the fastest of the package's opt-in paths for one workload, by measurement.

The paths a GPU runs best differ by GPU, size and batch (on the H200 the Triton epilogues
won by 1.31×, the split-key attention lost by 8 %: benchmarks/README.md), so a
deployment measures them: :func:`autotune` times the caller's own call — typically a
captured sampler at the deployed shape — under each option of each :class:`Choice`
(greedy: one choice after the other, each on top of the winners so far, as Inductor's
coordinate-descent tuning goes), keeps an option only where it is faster by
``min_gain`` and its output matches the baseline's, and re-times the winners against
the baseline, alternating, before it reports them. The result's settings are applied with
:func:`~ate_fast.tuning.settings.apply_settings` and saved with :meth:`TuneResult.save`.
With a ``journal`` file the trials are kept on disk as they finish, and a search cut off
midway resumes where it stopped (:mod:`ate_fast.tuning.journal`).
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ate_fast.argument_checks import check_float, check_int
from ate_fast.errors import InvalidArgumentError
from ate_fast.tuning.journal import Journal, header_for
from ate_fast.tuning.settings import PathLike, apply_settings, device_name, save_settings
from ate_fast.tuning.switches import Choice, as_choices, default_choices

Run = Callable[[], Any]
Build = Callable[[], Run]
Timer = Callable[[Run], float]


@dataclass
class Trial:
    """One timed build: ``settings`` on top of the caller's environment; ``seconds``: the
    median call (None where it failed); ``error``: max |out − baseline| / max(max |baseline|,
    1) (0 for the baseline); ``status``: ``baseline``, ``kept``, ``slower``, ``differs``,
    ``failed``, ``skipped`` (``reason`` says why), ``pruned`` (the settings of a winner left
    out, adopted: :meth:`_Search.prune`) or ``confirm`` (the re-timing; ``reason``:
    ``baseline`` or ``tuned``); ``resumed``: taken from the journal of an earlier run, not
    re-run."""

    choice: str
    settings: dict[str, str]
    seconds: Optional[float]
    error: Optional[float]
    status: str
    reason: str = ""
    resumed: bool = False


@dataclass
class TuneResult:
    """What :func:`autotune` found: ``settings`` (empty where nothing beat the baseline),
    ``baseline_s`` / ``tuned_s`` the alternating re-timing's medians (equal where
    ``settings`` is empty), every ``trials`` entry, and the ``device`` measured on."""

    settings: dict[str, str]
    baseline_s: float
    tuned_s: float
    device: str
    trials: list[Trial] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        """``baseline_s / tuned_s``."""
        return self.baseline_s / self.tuned_s

    def applied(self):
        """``with result.applied(): ...`` — :func:`apply_settings` of :attr:`settings`."""
        return apply_settings(self.settings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "baseline_s": self.baseline_s,
            "tuned_s": self.tuned_s,
            "speedup": self.speedup,
            "trials": [asdict(t) for t in self.trials],
        }

    def save(self, path: PathLike):
        """The settings, with the device, the timings and every trial, as JSON at ``path``
        (read back by :func:`~ate_fast.tuning.settings.load_settings`)."""
        return save_settings(path, self.settings, **self.to_dict())

    def summary(self) -> str:
        """The trials as a text table, then the settings kept and the speedup."""
        lines = [f"{'choice':<32} {'settings':<52} {'ms':>9} {'error':>9}  status"]
        for t in self.trials:
            shown = ", ".join(f"{k}={v}" for k, v in t.settings.items()) or "(as given)"
            ms = "-" if t.seconds is None else f"{t.seconds * 1e3:.3f}"
            err = "-" if t.error is None else f"{t.error:.2e}"
            status = t.status + (f": {t.reason}" if t.reason else "")
            status += " (journal)" if t.resumed else ""
            lines.append(f"{t.choice:<32} {shown:<52} {ms:>9} {err:>9}  {status}")
        kept = ", ".join(f"{k}={v}" for k, v in self.settings.items()) or "none"
        lines.append(
            f"kept: {kept}; {self.baseline_s * 1e3:.3f} -> {self.tuned_s * 1e3:.3f} ms "
            f"({self.speedup:.3f}x) on {self.device}"
        )
        return "\n".join(lines)


def _first_tensor(out: Any) -> Tensor:
    """The call's output tensor (the first, for a tuple or list)."""
    while isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, Tensor):
        raise InvalidArgumentError(
            f"build: the call it returns must return a tensor (or a tuple starting with one), "
            f"got {type(out).__name__}"
        )
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(run: Run, rounds: int = 20, warmup: int = 3) -> float:
    """The median wall time of ``rounds`` calls of ``run`` after ``warmup`` calls, each
    call waited for (its output's device synchronised)."""
    out = None
    for _ in range(warmup):
        out = run()
    device = _first_tensor(out if out is not None else run()).device
    times = []
    for _ in range(rounds):
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _distance(out: Tensor, ref: Tensor) -> float:
    """max |out − ref| / max(max |ref|, 1), computed in float64; inf where ``out`` has a
    non-finite entry or another shape."""
    if out.shape != ref.shape or not bool(torch.isfinite(out).all()):
        return float("inf")
    if ref.numel() == 0:
        return 0.0
    ref64 = ref.double()
    scale = max(float(ref64.abs().max()), 1.0)
    return float((out.double() - ref64).abs().max()) / scale


def _check_arguments(
    rounds: int, warmup: int, min_gain: float, tolerance: float, budget_s: Optional[float]
) -> None:
    check_int("rounds", rounds, 1)
    check_int("warmup", warmup, 0)
    check_float("min_gain", min_gain, 0.0)
    if not min_gain < 1.0:
        raise InvalidArgumentError(f"min_gain must be a fraction < 1, got {min_gain!r}")
    check_float("tolerance", tolerance, 0.0, above=True, allow_inf=True)
    if budget_s is not None:
        check_float("budget_s", budget_s, 0.0, above=True, allow_inf=True)


def autotune(
    build: Build,
    choices: Optional[Sequence[Choice]] = None,
    *,
    rounds: int = 20,
    warmup: int = 3,
    min_gain: float = 0.02,
    tolerance: float = 1e-2,
    timer: Optional[Timer] = None,
    guided: bool = False,
    transformer_encoder: bool = False,
    exclude: Sequence[str] = (),
    budget_s: Optional[float] = None,
    progress: bool = True,
    journal: Optional[PathLike] = None,
    workload: Optional[Mapping[str, Any]] = None,
) -> TuneResult:
    """The fastest settings for the call ``build()`` returns, by measurement.

    ``build()`` makes the call to tune — e.g. ``captured = FlowSampler(head, 10).capture(
    noise, cache); return lambda: captured(noise, cache)`` — and runs once per option with
    that option's settings in force (a capture records the kernels the settings select);
    the call must return the output tensor (e.g. actions ``[B, H, D]``), the same inputs
    every time. ``choices``: the decisions, in order (default: :func:`default_choices`
    for the output's device type, with ``guided`` / ``transformer_encoder`` saying whether
    the call has a latent guidance and a Transformer encoder, ``exclude`` its
    ``"VAR=path"`` entries not to try). Each option is timed
    (``timer(call) -> seconds``, default: the median of ``rounds`` calls after ``warmup``)
    and kept if it is the choice's fastest, at least ``min_gain`` faster than the best so
    far, and its output within ``tolerance`` of the baseline's (max |Δ| / max(max |ref|,
    1); bf16 heads at 10 steps: correct paths differ by ≤ 6·10⁻³ on the H200). An option
    that raises is recorded as failed with its message and the search goes on. With two or
    more winners each is then left out in turn and dropped where the rest are as fast
    without it (``pruned``: a winner that later ones made redundant). Finally the
    kept settings and the baseline are re-timed alternately (twice each); where the
    settings are not ``min_gain`` faster there, none are kept. ``budget_s``: once that many
    seconds have passed, the options left are recorded as ``skipped`` (the re-timing still
    runs).

    ``journal``: a file (JSON lines) the trials are appended to as they finish. Where it
    exists, the search resumes from it: the baseline is built once (untimed) and its output
    checked against the recorded one, and every recorded trial is taken as it was
    (``Trial.resumed``) instead of re-run; the re-timing always runs. ``workload``: what
    the call is (JSON-serialisable, e.g. the command line's head, shape and dtype),
    recorded in the journal; a journal recorded for another workload, device, torch or
    package version, ``rounds`` or ``warmup`` is refused. Keep the journal to make a later
    identical search instant, or delete it to measure again.

    Returns a :class:`TuneResult`. Settings are process-wide environment variables: do not
    run other work that reads them meanwhile.
    """
    _check_arguments(rounds, warmup, min_gain, tolerance, budget_s)
    started = time.monotonic()
    if not callable(build):
        raise InvalidArgumentError(f"build: expected a callable, got {type(build).__name__}")
    timer = timer or (lambda run: median_seconds(run, rounds, warmup))
    if workload is not None and not isinstance(workload, Mapping):
        raise InvalidArgumentError(f"workload: expected a mapping, got {type(workload).__name__}")

    if journal is not None and (
        not isinstance(journal, (str, os.PathLike)) or Path(journal).is_dir()
    ):
        raise InvalidArgumentError(f"journal: expected a file path, got {journal!r}")
    if choices is not None:  # checked before the first build (and journal line)
        choices = as_choices(choices)
    timed = _timed_builds(build, timer)
    header = {"rounds": rounds, "warmup": warmup, "workload": workload or {}}
    ref, baseline, record, resumed = _baseline(timed, journal, header, tolerance)
    if choices is None:
        choices = as_choices(default_choices(ref.device.type, guided, transformer_encoder, exclude))
    deadline = None if budget_s is None else started + budget_s
    search = _Search(timed, ref, baseline, tolerance, min_gain, deadline, record)
    search.trials[0].resumed = resumed
    total = sum(len(c.options) for c in choices)
    with tqdm(total=total, desc="autotune", disable=not progress, leave=False) as bar:
        for choice in choices:
            search.decide(choice, bar)
        search.prune(bar)
    return _confirm(search.current, timed, ref, search.trials, min_gain, device_name(ref.device))


def _timed_builds(build: Build, timer: Timer):
    """``timed(settings, timing=True) -> (output, seconds or None)``: ``build()`` under
    ``settings``, run once for its output, then timed (the call dropped afterwards)."""

    def timed(settings: Mapping[str, Optional[str]], timing: bool = True):
        with apply_settings(settings):
            run = build()
            if not callable(run):
                raise InvalidArgumentError(
                    f"build: must return the call to time, got {type(run).__name__}"
                )
            out = _first_tensor(run()).detach().clone()
            seconds = timer(run) if timing else None
        del run
        gc.collect()
        if out.is_cuda:  # the dropped capture's graph pool back to the GPU: dozens of
            torch.cuda.empty_cache()  # captures in one search would otherwise pile up
        return out, seconds

    return timed


def _baseline(timed, journal: Optional[PathLike], header: Mapping[str, Any], tolerance: float):
    """``(output, seconds, journal or None, resumed)`` of the caller's own settings: timed
    and recorded in a new journal, or — where ``journal`` exists — built once untimed, its
    output checked against the recorded one and the recorded time taken."""
    if journal is not None and Path(journal).exists():
        ref, _ = timed({}, timing=False)
        record = Journal.read(journal, header_for(device_name(ref.device), **header))
        record.check_output(ref, _distance, tolerance)
        return ref, record.baseline_s, record, True
    ref, baseline = timed({})
    if journal is None:
        return ref, baseline, None, False
    full = header_for(device_name(ref.device), **header)
    return ref, baseline, Journal.create(journal, full, baseline, ref), False


class _Search:
    """The greedy search's state: the settings kept so far, the best time, every trial."""

    def __init__(self, timed, ref: Tensor, baseline: float, tolerance: float, min_gain: float,
                 deadline: Optional[float], journal: Optional[Journal]) -> None:  # fmt: skip
        self.timed, self.ref, self.tolerance = timed, ref, tolerance
        self.min_gain, self.deadline, self.journal = min_gain, deadline, journal
        self.best = baseline
        self.current: dict[str, str] = {}
        self.trials = [Trial("baseline", {}, baseline, 0.0, "baseline")]
        # each choice whose winner is in force: its kept trial and option, in order
        self.kept: dict[str, tuple[Trial, dict[str, str]]] = {}

    def decide(self, choice: Choice, bar: Any) -> None:
        """Each option of ``choice`` on top of the settings kept so far (the choice's own
        variables back to the caller's values first); of those ``min_gain`` faster than
        the best so far, the fastest is kept."""
        others = {k: v for k, v in self.current.items() if k not in choice.variables}
        timed: list[tuple[Trial, dict[str, str]]] = []
        for option in choice.options:
            settings = {**others, **option}
            trial = self.attempt(choice.name, dict(option), settings)
            if trial.status == "timed":
                trial.status = "slower"
                timed.append((trial, settings))
            self.trials.append(trial)
            bar.update(1)
        threshold = self.best * (1.0 - self.min_gain)
        faster = [(t, s) for t, s in timed if t.seconds <= threshold]
        if faster:
            winner, settings = min(faster, key=lambda pair: pair[0].seconds)
            winner.status = "kept"
            for trial, _ in faster:
                if trial is not winner:
                    trial.reason = "faster than the best so far, not the fastest option"
            self.best, self.current = winner.seconds, settings
            for name, (_, option) in list(self.kept.items()):  # replaced (e.g. by its tiles)
                if set(option) & set(winner.settings):
                    del self.kept[name]
            self.kept[choice.name] = (winner, dict(winner.settings))

    def prune(self, bar: Any) -> None:
        """With two or more winners, each left out in turn (latest first; its variables back
        at the caller's values, the other winners in force): where the call is then within
        ``min_gain`` of the best, it is dropped — greedy choices interact, and a winner that
        later ones made redundant is one more path to deploy for nothing. (A single winner
        is checked against the baseline by the re-timing.)"""
        if len(self.kept) < 2:
            return
        for name, (kept, option) in reversed(list(self.kept.items())):
            without = {k: v for k, v in self.current.items() if k not in option}
            bar.total += 1
            trial = self.attempt(f"without {name}", dict(without), without)
            bar.update(1)
            self.trials.append(trial)
            if trial.status != "timed":
                continue  # it failed or differs without this winner: the winner stays
            if self.best <= trial.seconds * (1.0 - self.min_gain):
                trial.status = "slower"
                continue
            trial.status, trial.reason = "pruned", f"{name}'s winner not needed on top of the rest"
            kept.status, kept.reason = "slower", "redundant on top of the later winners: pruned"
            self.best, self.current = trial.seconds, without
            del self.kept[name]

    def attempt(self, name: str, option: dict[str, str], settings: dict[str, str]) -> Trial:
        """The trial of ``settings`` (``option`` on top of the rest): taken from the journal
        where an earlier run finished it, skipped past the time budget, else run."""
        recorded = None if self.journal is None else self.journal.lookup(name, settings)
        if recorded is not None:  # finished by an earlier run: taken as it was
            trial = self.classify(name, option, recorded["seconds"], recorded["error"],
                                  recorded["failure"])  # fmt: skip
            trial.resumed = True
            return trial
        if self.deadline is not None and time.monotonic() > self.deadline:
            return Trial(name, option, None, None, "skipped", "time budget")
        return self.trial(name, option, settings)

    def trial(self, name: str, option: dict[str, str], settings: dict[str, str]) -> Trial:
        """One option built, run, checked against the baseline's output and timed (and
        recorded in the journal)."""
        seconds = error = None
        failure = ""
        try:
            out, seconds = self.timed(settings)
            error = _distance(out, self.ref)
        except Exception as exc:  # a path that cannot run here is a result, not the end
            failure = f"{type(exc).__name__}: {exc}"
        if self.journal is not None:
            self.journal.record(name, settings, option, seconds, error, failure)
        return self.classify(name, option, seconds, error, failure)

    def classify(self, name: str, option: dict[str, str], seconds: Optional[float],
                 error: Optional[float], failure: str) -> Trial:  # fmt: skip
        """The trial's status from its time, its distance to the baseline and its failure."""
        if failure:
            return Trial(name, option, None, None, "failed", failure)
        if not error <= self.tolerance:
            reason = f"max |Δ| {error:.3g} of max |baseline| > tolerance {self.tolerance:g}"
            return Trial(name, option, seconds, error, "differs", reason)
        return Trial(name, option, seconds, error, "timed")


def _demote(trials: list[Trial], reason: str) -> None:
    """Every kept trial marked slower, for ``reason``."""
    for trial in trials:
        if trial.status == "kept":
            trial.status, trial.reason = "slower", reason


def _confirm(current, timed, ref, trials, min_gain, device) -> TuneResult:
    """The kept settings and the baseline re-timed alternately (A B A B): the result — no
    settings where the medians are not ``min_gain`` apart."""
    if not current:
        baseline = trials[0].seconds
        return TuneResult({}, baseline, baseline, device, trials)
    runs: dict[str, list[float]] = {"baseline": [], "tuned": []}
    for _ in range(2):
        for which, settings in (("baseline", {}), ("tuned", current)):
            out, seconds = timed(settings)
            runs[which].append(seconds)
            error = _distance(out, ref)
            trials.append(Trial("confirm", dict(settings), seconds, error, "confirm", which))
    baseline, tuned = (statistics.median(runs[k]) for k in ("baseline", "tuned"))
    if not tuned <= baseline * (1.0 - min_gain):
        _demote(trials, "not faster when re-timed against the baseline")
        return TuneResult({}, baseline, baseline, device, trials)
    return TuneResult(dict(current), baseline, tuned, device, trials)
