"""A tuning run's trials on disk as they finish, so that an interrupted run resumes.

A search over the package's paths builds and times dozens of captures; a FlexAttention
trial alone compiles for minutes, and on a Jetson the whole search takes long enough to
be cut off (a closed terminal, an out-of-memory kill, a ``--budget-s`` too short). With a
journal, :func:`~ate_fast.tuning.search.autotune` appends each trial as it finishes and,
run again with the same journal, takes the recorded trials instead of re-running them:
only what was not finished is built and timed. The final alternating re-timing of the
winners against the baseline always runs afresh, so a resumed result is still checked in
one process.

The file is JSON lines (``ate_fast.tune-journal/1``): a header — the device, torch and
package versions, ``rounds`` / ``warmup``, the caller's description of the workload, the
baseline's time and output — then one line per trial, each flushed to disk before the
next trial starts (a killed process loses at most the trial it was running). A journal
written for another device, versions, timing rounds, workload, or a call whose output
is not the recorded baseline's, is refused by name rather than mixed in.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor

from ate_fast._version import __version__
from ate_fast.align.atomic_io import atomic_path
from ate_fast.errors import InvalidArgumentError

FORMAT = "ate_fast.tune-journal/1"
PathLike = Union[str, "os.PathLike[str]"]
#: Header fields that must match for a journal to be resumed.
MATCHED = ("device", "torch", "ate_fast", "rounds", "warmup", "workload")
#: What each trial's line holds.
TRIAL_KEYS = frozenset({"choice", "applied", "option", "seconds", "error", "failure"})


def settings_key(choice: str, applied: Mapping[str, str]) -> str:
    """A trial's identity: its choice and every variable it ran with, canonically."""
    return json.dumps([choice, dict(sorted(applied.items()))])


def encode_output(out: Tensor) -> dict[str, Any]:
    """``out`` (any float dtype) as float32 bytes in base64, with its shape: exact for
    bf16 / fp16, compact for the [B, H, D] action chunks a sampler returns."""
    data = out.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return {"shape": list(out.shape), "float32": base64.b64encode(data).decode("ascii")}


def decode_output(record: Mapping[str, Any]) -> Tensor:
    """The tensor :func:`encode_output` wrote (float32, on the CPU)."""
    data = bytearray(base64.b64decode(record["float32"]))
    return torch.frombuffer(data, dtype=torch.float32).reshape(record["shape"])


class Journal:
    """An open journal: ``header`` as recorded, ``trials`` by :func:`settings_key`."""

    def __init__(self, path: Path, header: dict[str, Any], trials: dict[str, dict]) -> None:
        self.path, self.header, self.trials = path, header, trials

    @property
    def baseline_s(self) -> float:
        return float(self.header["baseline_s"])

    @property
    def output(self) -> Tensor:
        return decode_output(self.header["output"])

    @classmethod
    def create(cls, path: PathLike, header: Mapping[str, Any], baseline_s: float,
               output: Tensor) -> Journal:  # fmt: skip
        """A new journal at ``path`` (replacing any), its header written atomically."""
        path = Path(path)
        record = {"format": FORMAT, **header, "baseline_s": baseline_s,
                  "output": encode_output(output)}  # fmt: skip
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
        return cls(path, record, {})

    @classmethod
    def read(cls, path: PathLike, header: Mapping[str, Any]) -> Journal:
        """The journal at ``path``, refused where its header differs from ``header`` in a
        :data:`MATCHED` field. A last line cut off mid-write (a killed process) is dropped."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            text = ""
        lines = text.splitlines()
        records, cut = [], not text.endswith("\n")
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number < len(lines) or number == 1:
                    raise InvalidArgumentError(
                        f"journal: {path} line {number} is not JSON: not a tuning journal, "
                        "or damaged (delete it to start again)"
                    ) from None
                cut = True
        if not records or not isinstance(records[0], dict) or records[0].get("format") != FORMAT:
            raise InvalidArgumentError(
                f"journal: {path} is not a tuning journal (expected format {FORMAT!r} on its "
                "first line)"
            )
        recorded = records[0]
        differs = [
            f"{key} {recorded.get(key)!r} (now {header.get(key)!r})"
            for key in MATCHED
            if _plain(recorded.get(key)) != _plain(header.get(key))
        ]
        if differs:
            raise InvalidArgumentError(
                f"journal: {path} was recorded for another run: "
                + "; ".join(differs)
                + ". Delete it (ate-fast tune --fresh) or name another journal"
            )
        for number, r in enumerate(records[1:], 2):
            if not isinstance(r, dict) or not TRIAL_KEYS <= r.keys():
                raise InvalidArgumentError(
                    f"journal: {path} line {number} is not a trial (expected the keys "
                    f"{sorted(TRIAL_KEYS)}): damaged (delete it to start again)"
                )
        if cut:  # appends must start on a line of their own
            with atomic_path(path) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        trials = {settings_key(r["choice"], r["applied"]): r for r in records[1:]}
        return cls(path, recorded, trials)

    def check_output(self, out: Tensor, distance, tolerance: float) -> None:
        """Refuse where this call's baseline output is not the recorded one (within
        ``tolerance`` by ``distance``): the journal was written for another call."""
        recorded = self.output
        error = distance(out.detach().to("cpu", torch.float32), recorded)
        if not error <= tolerance:
            raise InvalidArgumentError(
                f"journal: {self.path} records a baseline output of shape "
                f"{tuple(recorded.shape)} that this call's (shape {tuple(out.shape)}) differs "
                f"from by {error:.3g} (tolerance {tolerance:g}): it was written for another "
                "workload. Delete it (ate-fast tune --fresh) or name another journal"
            )

    def lookup(self, choice: str, applied: Mapping[str, str]) -> Optional[dict[str, Any]]:
        """The recorded trial of ``choice`` run with ``applied``, or None."""
        return self.trials.get(settings_key(choice, applied))

    def record(self, choice: str, applied: Mapping[str, str], option: Mapping[str, str],
               seconds: Optional[float], error: Optional[float], failure: str) -> None:  # fmt: skip
        """Append one finished trial and flush it to disk."""
        entry = {"choice": choice, "applied": dict(applied), "option": dict(option),
                 "seconds": seconds, "error": error, "failure": failure}  # fmt: skip
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.trials[settings_key(choice, applied)] = entry


def _plain(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples as lists), for comparing headers."""
    return json.loads(json.dumps(value, default=str))


def header_for(device: str, rounds: int, warmup: int, workload: Mapping[str, Any]) -> dict:
    """The fields a journal must match to be resumed (:data:`MATCHED`)."""
    return {"device": device, "torch": torch.__version__, "ate_fast": __version__,
            "rounds": rounds, "warmup": warmup, "workload": _plain(dict(workload))}  # fmt: skip
