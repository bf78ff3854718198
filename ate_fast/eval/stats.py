"""Success statistics of simulator evaluation runs: per-cell means with hierarchical
bootstrap intervals, and paired differences between methods.

A *run* is one finished evaluation, stored as ``<out>/runs/<run_id>.json``::

    {"schema": 1, "run_id": str, "config": "quick" | "full" | "smoke", "method": str,
     "policy": "flow" | "diffusion", "shift": str, "demos": int, "seed": int,
     "tasks": {task: {"success": [0/1 per episode]}}, "success_rate": float,
     "train": {...}, "seconds": float, "machine": str}

A *cell* is ``(policy, shift, demos, method)``; it holds one run per seed. A *group* is
``(policy, shift, demos)``: runs of a group with the same seed share demonstrations and
evaluation layouts, so episode ``k`` of task ``T`` is paired across methods.

Success rates
    A run's rate is the mean over its tasks of the per-task success rates (every task
    weighs the same whatever its episode count; the stored ``success_rate`` is the pooled
    mean over episodes and is not used). A cell's rate is the mean over its seeds.

Bootstrap
    Percentile intervals from a two-level resample: seeds with replacement, then, within
    each resampled seed, that seed's episodes with replacement, task by task (tasks are
    fixed, not resampled). Outcomes are 0/1, so resampling ``n`` episodes of which ``k``
    succeeded is exactly a ``Binomial(n, k / n)`` draw of the success count, and resampling
    ``n`` *pairs* of episodes is exactly a multinomial draw over the pair kinds
    ``(1, 0)``, ``(0, 1)`` and ``(equal)``. The code draws those counts directly: the same
    distribution as drawing episode indices, at ``O(n_boot · seeds · tasks)`` cost and
    memory instead of ``O(n_boot · seeds · tasks · episodes)``.

    With a single seed the seed level is a no-op and the interval reflects episode noise
    only; the results say so (``"seeds": 1``, ``"ci_source": "episodes"``).

Determinism
    Every cell (and every difference) draws from its own generator, seeded by ``seed`` and
    a hash of the cell's key, so its interval depends on ``seed`` and on its own runs only,
    not on which other runs were loaded or their order.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
from numpy.typing import NDArray

from ate_fast.argument_checks import check_float, check_int
from ate_fast.errors import InvalidArgumentError

SCHEMA = 1

# key -> accepted types (bool is rejected separately where an int or float is meant)
RUN_KEYS: dict[str, tuple[type, ...]] = {
    "schema": (int,),
    "run_id": (str,),
    "config": (str,),
    "method": (str,),
    "policy": (str,),
    "shift": (str,),
    "demos": (int,),
    "seed": (int,),
    "tasks": (dict,),
    "success_rate": (int, float),
    "train": (dict,),
    "seconds": (int, float),
    "machine": (str,),
}

# at most this many binomial draws per bootstrap chunk (bounds the memory of one call)
_CHUNK_DRAWS = 1_000_000

GroupKey = tuple[str, str, int]  # (policy, shift, demos)
CellKey = tuple[str, str, int, str]  # (policy, shift, demos, method)


class CellSummary(TypedDict):
    """One cell of :func:`cell_summary` (rates are fractions in [0, 1])."""

    policy: str
    shift: str
    demos: int
    method: str
    config: str
    seeds: int  # number of seeds S
    seed_values: list[int]  # (S,) the seeds, ascending
    run_ids: list[str]  # (S,) aligned with seed_values
    per_seed: list[float]  # (S,) each seed's success rate (mean over tasks)
    mean: float  # mean of per_seed
    ci: list[float]  # [low, high] percentile bootstrap interval of the mean
    level: float
    ci_source: str  # "seeds+episodes" (S > 1) or "episodes" (S == 1)
    n_boot: int
    tasks: int  # number of tasks T
    episodes: int  # total episodes over all seeds and tasks
    per_task: dict[str, float]  # task -> mean over seeds of the task's success rate


class PairedDifference(TypedDict):
    """One group of :func:`paired_difference` (differences are method − baseline, as
    fractions in [-1, 1])."""

    policy: str
    shift: str
    demos: int
    method: str
    baseline: str
    config: str
    paired: bool  # episodes resampled jointly (True) or independently (False)
    seeds: int  # number of common seeds S
    seed_values: list[int]  # (S,) seeds present for both methods, ascending
    dropped_seeds: dict[str, list[int]]  # {"method": [...], "baseline": [...]} unpaired
    per_seed: list[float]  # (S,) per-seed differences of success rates
    method_mean: float  # method's rate on the common seeds
    baseline_mean: float  # baseline's rate on the common seeds
    mean: float  # mean of per_seed == method_mean - baseline_mean
    ci: list[float]  # [low, high] percentile bootstrap interval of mean
    level: float
    significant: bool  # the interval excludes 0
    ci_source: str  # "seeds+episodes" (S > 1) or "episodes" (S == 1)
    n_boot: int
    per_task: dict[str, float]  # task -> mean over common seeds of the task's difference


class PooledDifference(TypedDict):
    """:func:`pooled_difference`: ``method − baseline`` averaged over groups."""

    method: str
    baseline: str
    groups: list[GroupKey]  # (G,) the (policy, shift, demos) groups averaged, sorted
    per_group: list[float]  # (G,) each group's paired difference
    mean: float  # mean of per_group (every group weighs the same)
    ci: list[float]  # [low, high] percentile interval of the mean of group replicates
    level: float
    significant: bool  # the interval excludes 0
    n_boot: int


# ----------------------------------------------------------------------------- loading


def validate_run(run: Any, source: str = "<run>") -> dict[str, Any]:
    """Check one run dict against the schema; return it unchanged.

    Raises ``ValueError`` naming ``source`` (a file name for :func:`load_runs`) and the
    offending key.
    """
    if not isinstance(run, dict):
        raise ValueError(f"{source}: a run must be a JSON object, got {type(run).__name__}")
    for key, types in RUN_KEYS.items():
        if key not in run:
            raise ValueError(f"{source}: missing key {key!r}")
        value = run[key]
        if isinstance(value, bool) or not isinstance(value, types):
            names = " or ".join(t.__name__ for t in types)
            raise ValueError(f"{source}: key {key!r} must be {names}, got {value!r}")
    if run["schema"] != SCHEMA:
        raise ValueError(f"{source}: key 'schema' is {run['schema']!r}, expected {SCHEMA}")
    tasks = run["tasks"]
    if not tasks:
        raise ValueError(f"{source}: key 'tasks' is empty")
    for task, result in tasks.items():
        where = f"{source}: key 'tasks'[{task!r}]"
        if not isinstance(result, dict) or "success" not in result:
            raise ValueError(f"{where}: missing key 'success'")
        success = result["success"]
        if not isinstance(success, list) or not success:
            raise ValueError(f"{where}['success'] must be a non-empty list of 0/1")
        if any(s not in (0, 1) for s in success):  # 0/1, 0.0/1.0 or booleans
            raise ValueError(f"{where}['success'] must hold only 0/1 (or booleans)")
    return run


def load_runs(out_dir: str | Path) -> list[dict[str, Any]]:
    """Read and validate every ``out_dir/runs/*.json``, in file-name order.

    Raises ``FileNotFoundError`` when ``out_dir/runs`` is missing and ``ValueError``
    (naming the file and the key) on unreadable JSON, a schema mismatch, or a ``run_id``
    that differs from the file name.
    """
    runs_dir = Path(out_dir) / "runs"
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"no runs directory: {runs_dir}")
    runs = []
    for path in sorted(runs_dir.glob("*.json")):
        try:
            run = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        validate_run(run, str(path))
        if run["run_id"] != path.stem:
            raise ValueError(
                f"{path}: key 'run_id' is {run['run_id']!r} but the file is {path.name!r}"
            )
        runs.append(run)
    return runs


# ----------------------------------------------------------------------------- grouping


def group_key(run: dict[str, Any]) -> GroupKey:
    """``(policy, shift, demos)`` of a run."""
    return (run["policy"], run["shift"], int(run["demos"]))


def cell_key(run: dict[str, Any]) -> CellKey:
    """``(policy, shift, demos, method)`` of a run."""
    return (*group_key(run), run["method"])


def _cells(runs: Iterable[dict[str, Any]]) -> dict[CellKey, dict[int, dict[str, Any]]]:
    """Validated runs by cell, then by seed; rejects duplicate seeds and mixed configs."""
    cells: dict[CellKey, dict[int, dict[str, Any]]] = {}
    for i, run in enumerate(runs):
        validate_run(run, f"run {run.get('run_id', i)!r}" if isinstance(run, dict) else "run")
        by_seed = cells.setdefault(cell_key(run), {})
        seed = int(run["seed"])
        if seed in by_seed:
            raise ValueError(
                f"cell {cell_key(run)}: seed {seed} appears twice "
                f"(runs {by_seed[seed]['run_id']!r} and {run['run_id']!r})"
            )
        by_seed[seed] = run
    for key, by_seed in cells.items():
        configs = sorted({r["config"] for r in by_seed.values()})
        if len(configs) > 1:
            raise ValueError(
                f"cell {key}: runs of several configs {configs}; evaluate one config at a time"
            )
    return dict(sorted(cells.items()))


def _task_names(key: object, runs: Sequence[dict[str, Any]]) -> list[str]:
    """The common task names of ``runs`` (sorted); error if the sets differ."""
    names = sorted(runs[0]["tasks"])
    for run in runs[1:]:
        if sorted(run["tasks"]) != names:
            raise ValueError(
                f"{key}: runs {runs[0]['run_id']!r} and {run['run_id']!r} "
                "evaluated different task sets"
            )
    return names


def _counts(
    runs: Sequence[dict[str, Any]], tasks: Sequence[str]
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """``(successes, episodes)``, both ``(S, T)`` int64, for runs × tasks."""
    k = np.array(
        [[int(sum(run["tasks"][t]["success"])) for t in tasks] for run in runs], dtype=np.int64
    )
    n = np.array([[len(run["tasks"][t]["success"]) for t in tasks] for run in runs], dtype=np.int64)
    return k, n


def _rng(seed: int, key: str) -> np.random.Generator:
    """A generator that depends on ``seed`` and on ``key`` only."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(key.encode())]))


def _chunks(n_boot: int, per_replicate: int) -> Iterable[int]:
    """Chunk sizes summing to ``n_boot``, each chunk at most ``_CHUNK_DRAWS`` draws."""
    size = max(1, _CHUNK_DRAWS // max(1, per_replicate))
    done = 0
    while done < n_boot:
        step = min(size, n_boot - done)
        yield step
        done += step


def _interval(boot: NDArray[np.float64], level: float) -> list[float]:
    """Percentile interval ``[low, high]`` of bootstrap replicates ``(B,)``."""
    alpha = 1.0 - level
    low, high = np.quantile(boot, [alpha / 2.0, 1.0 - alpha / 2.0])
    return [float(low), float(high)]


def _check_args(n_boot: int, level: float, seed: int) -> None:
    check_int("n_boot", n_boot, 1)
    check_int("seed", seed, 0)  # 1.5 or True were taken as 1
    if not 0.0 < check_float("level", level) < 1.0:
        raise InvalidArgumentError(f"level must be in (0, 1), got {level}")


# ----------------------------------------------------------------------------- bootstrap


def bootstrap_rate(
    successes: NDArray[np.int64],
    episodes: NDArray[np.int64],
    n_boot: int,
    rng: np.random.Generator,
) -> NDArray[np.float64]:
    """Hierarchical bootstrap replicates of the mean success rate.

    ``successes``, ``episodes``: ``(S, T)`` counts per seed and task (``episodes >= 1``).
    Each replicate resamples ``S`` seeds with replacement, then each resampled seed's
    episodes with replacement per task (a ``Binomial(n, k / n)`` success count), and
    returns the mean over seeds of the mean over tasks of the rates. Returns ``(n_boot,)``.
    """
    n_seeds, n_tasks = episodes.shape
    p = successes / episodes
    out = np.empty(n_boot, dtype=np.float64)
    start = 0
    for b in _chunks(n_boot, n_seeds * n_tasks):
        idx = rng.integers(0, n_seeds, size=(b, n_seeds))  # (b, S)
        n = episodes[idx]  # (b, S, T)
        draws = rng.binomial(n, p[idx])  # (b, S, T)
        out[start : start + b] = (draws / n).mean(axis=(1, 2))
        start += b
    return out


def bootstrap_difference(
    successes_a: NDArray[np.int64],
    successes_b: NDArray[np.int64],
    episodes: NDArray[np.int64],
    n_boot: int,
    rng: np.random.Generator,
    *,
    only_a: NDArray[np.int64] | None = None,
    only_b: NDArray[np.int64] | None = None,
    paired: bool = True,
) -> NDArray[np.float64]:
    """Hierarchical bootstrap replicates of the mean difference of rates ``a − b``.

    ``successes_a``, ``successes_b``, ``episodes``: ``(S, T)`` counts on common seeds
    (the two methods ran ``episodes[s, t]`` paired episodes). ``only_a``/``only_b``:
    ``(S, T)`` counts of the pairs where only ``a`` / only ``b`` succeeded (needed when
    ``paired``). Seeds are resampled jointly for the two methods. ``paired=True``
    resamples episode *indices* jointly: the counts of ``(1, 0)`` and ``(0, 1)`` pairs are
    one multinomial draw (drawn as a binomial and a conditional binomial).
    ``paired=False`` resamples each method's episodes independently (for comparison).
    Returns ``(n_boot,)``.
    """
    n_seeds, n_tasks = episodes.shape
    if paired:
        if only_a is None or only_b is None:
            raise ValueError("paired resampling needs only_a and only_b")
        p10 = only_a / episodes
        p01 = only_b / episodes
        # P(only b | not only a); 0 where every pair is "only a"
        rest = 1.0 - p10
        q01 = np.clip(np.divide(p01, rest, out=np.zeros_like(p01), where=rest > 0), 0.0, 1.0)
    else:
        pa = successes_a / episodes
        pb = successes_b / episodes
    out = np.empty(n_boot, dtype=np.float64)
    start = 0
    for b in _chunks(n_boot, 2 * n_seeds * n_tasks):
        idx = rng.integers(0, n_seeds, size=(b, n_seeds))  # (b, S)
        n = episodes[idx]  # (b, S, T)
        if paired:
            x10 = rng.binomial(n, p10[idx])
            x01 = rng.binomial(n - x10, q01[idx])
            diff = x10 - x01
        else:
            diff = rng.binomial(n, pa[idx]) - rng.binomial(n, pb[idx])
        out[start : start + b] = (diff / n).mean(axis=(1, 2))
        start += b
    return out


# ----------------------------------------------------------------------------- summaries


def cell_summary(
    runs: Iterable[dict[str, Any]],
    *,
    n_boot: int = 10000,
    seed: int = 0,
    level: float = 0.95,
) -> list[CellSummary]:
    """Success of every cell ``(policy, shift, demos, method)``, sorted by that key.

    Per cell: the per-seed rates (mean over tasks of per-task rates), their mean, the
    per-task means over seeds, and a percentile bootstrap interval at ``level`` from
    ``n_boot`` hierarchical replicates (seeds, then episodes per task; see the module
    docstring). All seeds of a cell must have evaluated the same tasks; episode counts
    may differ between seeds. Deterministic for a given ``seed``.
    """
    _check_args(n_boot, level, seed)
    out: list[CellSummary] = []
    for key, by_seed in _cells(runs).items():
        seeds = sorted(by_seed)
        cell_runs = [by_seed[s] for s in seeds]
        tasks = _task_names(key, cell_runs)
        k, n = _counts(cell_runs, tasks)  # (S, T)
        rates = k / n  # (S, T)
        per_seed = rates.mean(axis=1)  # (S,)
        boot = bootstrap_rate(k, n, n_boot, _rng(seed, "cell|" + "|".join(map(str, key))))
        policy, shift, demos, method = key
        out.append(
            CellSummary(
                policy=policy,
                shift=shift,
                demos=demos,
                method=method,
                config=cell_runs[0]["config"],
                seeds=len(seeds),
                seed_values=seeds,
                run_ids=[r["run_id"] for r in cell_runs],
                per_seed=[float(v) for v in per_seed],
                mean=float(per_seed.mean()),
                ci=_interval(boot, level),
                level=level,
                ci_source="seeds+episodes" if len(seeds) > 1 else "episodes",
                n_boot=n_boot,
                tasks=len(tasks),
                episodes=int(n.sum()),
                per_task={t: float(v) for t, v in zip(tasks, rates.mean(axis=0))},
            )
        )
    return out


def paired_difference(
    runs: Iterable[dict[str, Any]],
    method: str,
    baseline: str = "direct",
    *,
    n_boot: int = 10000,
    seed: int = 0,
    level: float = 0.95,
    paired: bool = True,
) -> list[PairedDifference]:
    """Difference ``method − baseline`` of success rates in every group
    ``(policy, shift, demos)`` where both methods ran on at least one common seed,
    sorted by group.

    Only seeds present for both methods are used (the others are listed in
    ``dropped_seeds``). For each common seed the two runs must have evaluated the same
    tasks with the same number of episodes per task (episode ``k`` of a task is the same
    layout for both). The interval resamples seeds, then episode indices jointly for the
    two methods (``paired=False``: independently per method, to show what pairing buys).
    ``significant``: the interval excludes 0. Deterministic for a given ``seed``.
    """
    return [d for d, _ in _group_differences(runs, method, baseline, n_boot, seed, level, paired)]


def _group_differences(
    runs: Iterable[dict[str, Any]],
    method: str,
    baseline: str,
    n_boot: int,
    seed: int,
    level: float,
    paired: bool,
) -> list[tuple[PairedDifference, NDArray[np.float64]]]:
    """:func:`paired_difference`'s groups, each with its ``(n_boot,)`` replicates."""
    _check_args(n_boot, level, seed)
    if method == baseline:
        raise ValueError(f"method and baseline are both {method!r}")
    cells = _cells(runs)
    out: list[tuple[PairedDifference, NDArray[np.float64]]] = []
    groups = sorted({key[:3] for key in cells})
    for group in groups:
        runs_m = cells.get((*group, method))
        runs_b = cells.get((*group, baseline))
        if runs_m is None or runs_b is None:
            continue
        if set(runs_m) & set(runs_b):
            out.append(
                _group_difference(
                    group, method, baseline, runs_m, runs_b, n_boot, seed, level, paired
                )
            )
    return out


def _paired_counts(
    where: str, seeds: Sequence[int], pairs: Sequence[tuple[dict, dict]], tasks: Sequence[str]
) -> tuple[NDArray[np.int64], ...]:
    """``(k_m, k_b, n, only_m, only_b)``, each ``(S, T)`` int64, of the ``(method run,
    baseline run)`` pair of every seed: successes of each, episodes (which must agree), and
    the episodes where only the method / only the baseline succeeded."""
    k_m, n_m = _counts([a for a, _ in pairs], tasks)
    k_b, n_b = _counts([b for _, b in pairs], tasks)
    if not np.array_equal(n_m, n_b):
        s, t = np.argwhere(n_m != n_b)[0]
        raise ValueError(
            f"{where}: seed {seeds[s]} task {tasks[t]!r} has {n_m[s, t]} vs "
            f"{n_b[s, t]} episodes; paired runs must share the evaluation layouts"
        )
    only_m = np.zeros_like(k_m)
    only_b = np.zeros_like(k_b)
    for i, (a, b) in enumerate(pairs):
        for j, t in enumerate(tasks):
            sa = np.asarray(a["tasks"][t]["success"], dtype=np.int64)
            sb = np.asarray(b["tasks"][t]["success"], dtype=np.int64)
            only_m[i, j] = int(np.sum(sa > sb))
            only_b[i, j] = int(np.sum(sb > sa))
    return k_m, k_b, n_m, only_m, only_b


def _group_difference(
    group: GroupKey,
    method: str,
    baseline: str,
    runs_m: dict[int, dict[str, Any]],
    runs_b: dict[int, dict[str, Any]],
    n_boot: int,
    seed: int,
    level: float,
    paired: bool,
) -> tuple[PairedDifference, NDArray[np.float64]]:
    """``method − baseline`` in one group from its runs by seed (at least one seed in
    common), with the ``(n_boot,)`` bootstrap replicates."""
    seeds = sorted(set(runs_m) & set(runs_b))
    where = f"group {group}, {method!r} vs {baseline!r}"
    config_m = runs_m[seeds[0]]["config"]
    config_b = runs_b[seeds[0]]["config"]
    if config_m != config_b:
        raise ValueError(f"{where}: configs differ ({config_m!r} vs {config_b!r})")
    pairs = [(runs_m[s], runs_b[s]) for s in seeds]
    tasks = _task_names(where, [r for pair in pairs for r in pair])
    k_m, k_b, n, only_m, only_b = _paired_counts(where, seeds, pairs, tasks)
    rates_m = k_m / n  # (S, T)
    rates_b = k_b / n
    task_diff = (k_m - k_b) / n  # (S, T), exactly 0 for identical runs
    per_seed = task_diff.mean(axis=1)  # (S,)
    boot = bootstrap_difference(
        k_m,
        k_b,
        n,
        n_boot,
        _rng(seed, "diff|" + "|".join(map(str, (*group, method, baseline)))),
        only_a=only_m,
        only_b=only_b,
        paired=paired,
    )
    ci = _interval(boot, level)
    policy, shift, demos = group
    difference = PairedDifference(
        policy=policy,
        shift=shift,
        demos=demos,
        method=method,
        baseline=baseline,
        config=config_m,
        paired=paired,
        seeds=len(seeds),
        seed_values=seeds,
        dropped_seeds={
            "method": sorted(set(runs_m) - set(seeds)),
            "baseline": sorted(set(runs_b) - set(seeds)),
        },
        per_seed=[float(v) for v in per_seed],
        method_mean=float(rates_m.mean(axis=1).mean()),
        baseline_mean=float(rates_b.mean(axis=1).mean()),
        mean=float(per_seed.mean()),
        ci=ci,
        level=level,
        significant=bool(ci[0] > 0.0 or ci[1] < 0.0),
        ci_source="seeds+episodes" if len(seeds) > 1 else "episodes",
        n_boot=n_boot,
        per_task={t: float(v) for t, v in zip(tasks, task_diff.mean(axis=0))},
    )
    return difference, boot


def pooled_difference(
    runs: Iterable[dict[str, Any]],
    method: str,
    baseline: str = "direct",
    *,
    groups: Iterable[GroupKey] | None = None,
    n_boot: int = 10000,
    seed: int = 0,
    level: float = 0.95,
) -> PooledDifference | None:
    """``method − baseline`` averaged over groups ``(policy, shift, demos)``, each weighing
    the same: "does it help across settings?" rather than in one.

    Every group is bootstrapped as in :func:`paired_difference` (same replicates, same
    seeds), independently of the others (they are separate experiments), and the
    interval is that of the mean of the groups' replicates. Groups that share a seed's
    demonstrations or evaluation layouts are not fully independent: a strong shared seed
    effect makes this interval narrower than it should be (on this project's Meta-World
    results, resampling seeds jointly across groups moved it by at most 0.5 points).
    ``groups`` restricts the average (default: every group where both methods ran); a group
    listed there where they did not both run raises. None when no group qualifies.
    """
    return differences_and_pooled(
        runs, method, baseline, groups=groups, n_boot=n_boot, seed=seed, level=level
    )[1]


def differences_and_pooled(
    runs: Iterable[dict[str, Any]],
    method: str,
    baseline: str = "direct",
    *,
    groups: Iterable[GroupKey] | None = None,
    n_boot: int = 10000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[list[PairedDifference], PooledDifference | None]:
    """:func:`paired_difference` and :func:`pooled_difference` from one bootstrap of
    each group (what a report needs; the replicates are drawn once)."""
    per_group = _group_differences(runs, method, baseline, n_boot, seed, level, True)
    found = {(d["policy"], d["shift"], d["demos"]): (d, boot) for d, boot in per_group}
    diffs = [d for d, _ in per_group]
    # tuples: groups read back from summary.json come as lists
    keys = sorted(found) if groups is None else sorted({tuple(g) for g in groups})
    missing = [g for g in keys if g not in found]
    if missing:
        raise ValueError(
            f"groups: {method!r} and {baseline!r} did not both run in {missing}; "
            f"they did in {sorted(found)}"
        )
    if not keys:
        return diffs, None
    boot = np.mean([found[g][1] for g in keys], axis=0)  # (n_boot,)
    ci = _interval(boot, level)
    means = [found[g][0]["mean"] for g in keys]
    pooled = PooledDifference(
        method=method,
        baseline=baseline,
        groups=keys,
        per_group=means,
        mean=float(np.mean(means)),
        ci=ci,
        level=level,
        significant=bool(ci[0] > 0.0 or ci[1] < 0.0),
        n_boot=n_boot,
    )
    return diffs, pooled


def methods_of(runs: Iterable[dict[str, Any]]) -> list[str]:
    """The distinct methods of ``runs``, sorted."""
    return sorted({run["method"] for run in runs})


def order_methods(methods: Iterable[str], method_order: Sequence[str] | None = None) -> list[str]:
    """``methods`` in the order of ``method_order``; methods not listed there follow,
    alphabetically. Entries of ``method_order`` absent from ``methods`` are skipped."""
    methods = set(methods)
    order = list(dict.fromkeys(m for m in (method_order or ()) if m in methods))
    return order + sorted(methods - set(order))
