"""Training metrics to ``metrics.jsonl`` (every record) and ``metrics.csv`` (one row per epoch).

On resume the files are cut back to what the resumed state had already logged, so a run
that was killed and resumed leaves the same log as one that was not.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Optional

from ate_fast.align.atomic_io import atomic_write_text

EPOCH_COLUMNS = (
    "epoch",
    "global_step",
    "lr",
    "loss",
    "recon",
    "kl",
    "mmd",
    "prior_logp",
    "val_loss",
    "val_recon",
    "val_recon_mu",
    "val_kl",
    "val_mmd",
    "val_prior_logp",
    "chunks_per_s",
    "epoch_time_s",
)
JSONL_FILE = "metrics.jsonl"
CSV_FILE = "metrics.csv"


class MetricsLogger:
    """Appends records; disabled (no files) when ``out_dir`` is ``None`` (non-zero ranks).

    ``resume``: ``(completed_epochs, global_step)`` of the state being resumed; earlier
    records are kept, later ones (logged after that state was saved) are dropped.
    """

    def __init__(self, out_dir: Optional[Path], resume: Optional[tuple[int, int]] = None) -> None:
        self.out_dir = out_dir
        if out_dir is None:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = out_dir / JSONL_FILE
        self.csv = out_dir / CSV_FILE
        kept: list[dict[str, Any]] = []
        if resume is not None and self.jsonl.is_file():
            epochs, step = resume
            for line in self.jsonl.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by the kill
                if rec.get("split") == "epoch" and rec.get("epoch", 0) <= epochs:
                    kept.append(rec)
                elif rec.get("split") == "step" and rec.get("global_step", 0) <= step:
                    kept.append(rec)
        atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in kept))
        rows = [r for r in kept if r.get("split") == "epoch"]
        atomic_write_text(self.csv, "")
        with open(self.csv, "a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=EPOCH_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def log(self, record: dict[str, Any]) -> None:
        if self.out_dir is None:
            return
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if record.get("split") == "epoch":
            with open(self.csv, "a", newline="", encoding="utf-8") as f:
                csv.DictWriter(f, fieldnames=EPOCH_COLUMNS, extrasaction="ignore").writerow(record)
