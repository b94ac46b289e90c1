"""Training logs written as training goes, so a killed run keeps its history:

* ``log.csv`` (and ``TrainConfig.log_csv``): one row per step, appended and flushed as the step ends
  (a non-finite value is written ``nan``/``inf``; a cell is blank only where the step has no value,
  e.g. ``val_loss`` between validations);
* ``log.json``: the run's summary and every row so far, rewritten atomically at every checkpoint
  (JSON has no NaN: a non-finite value is the string ``"nan"``/``"inf"``/``"-inf"``);
* ``loss.png``: the loss curve of the whole run, redrawn with ``log.json``.

A resumed run reads the rows up to its checkpoint's step back from the CSV, drops later ones (steps
a killed run did after its last checkpoint, which the resumed run redoes) and appends to it, so its
``log.json`` and ``loss.png`` cover the whole run.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from tapetransformer.fileio import atomic_write, remove_stale_temp, write_error

__all__ = ["FIELDS", "RunLog", "read_history"]

FIELDS = ("step", "loss", "tokens_per_s", "step_s", "peak_mem_mb", "val_loss")


def _cell(v: Any) -> Any:
    """A CSV cell: NaN and Inf are written as nan / inf (a diverged loss must show, not vanish)."""
    return "" if v is None else v


def _csv_text(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, restval="", extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _cell(v) for k, v in r.items()})
    return buf.getvalue()


def read_history(path: str | Path, up_to_step: int) -> list[dict[str, Any]]:
    """The rows of a log CSV with step <= ``up_to_step``; a row torn by a kill mid-write is skipped."""
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for raw in csv.DictReader(f):
                try:
                    row: dict[str, Any] = {"step": int(raw["step"]), "loss": float(raw["loss"]),
                                           "tokens_per_s": float(raw["tokens_per_s"]),
                                           "peak_mem_mb": float(raw["peak_mem_mb"] or "nan")}
                    if raw.get("step_s"):
                        row["step_s"] = float(raw["step_s"])
                    if raw.get("val_loss"):
                        row["val_loss"] = float(raw["val_loss"])
                except (KeyError, TypeError, ValueError):
                    continue
                if row["step"] <= up_to_step:
                    rows.append(row)
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
    return rows


class RunLog:
    """The step rows of a run and the files they go to (none when no paths are given)."""

    def __init__(self, csv_paths: Sequence[str | Path], log_dir: str | Path | None, *, summary: dict[str, Any],
                 resume_step: int | None = None) -> None:
        self.csv_paths = [Path(p) for p in csv_paths]
        self.dir = Path(log_dir) if log_dir is not None else None
        self.summary = summary
        self.rows: list[dict[str, Any]] = []
        if resume_step is not None:
            existing = [p for p in self.csv_paths if p.is_file()]
            self.rows = read_history(existing[0], resume_step) if existing else []
        self._files: list[Any] = []
        self._writers: list[csv.DictWriter] = []
        self._opened = False
        self._plot_skipped = False

    def _open(self) -> None:
        """Rewrite the CSVs to the rows kept so far and open them for appending: done at the first step's
        row, so a run that fails before its first step leaves an earlier run's logs as they were."""
        text = _csv_text(self.rows)
        for p in self.csv_paths:
            remove_stale_temp(p)
            atomic_write(p, lambda f: f.write(text.encode("utf-8")))
        if self.dir is not None:
            for name in ("log.json", "loss.png"):
                remove_stale_temp(self.dir / name)
        self._files = [open(p, "a", newline="", encoding="utf-8") for p in self.csv_paths]  # noqa: SIM115
        self._writers = [csv.DictWriter(f, fieldnames=FIELDS, restval="", extrasaction="ignore", lineterminator="\n")
                         for f in self._files]
        self._opened = True

    def append(self, row: dict[str, Any]) -> None:
        """Record a step's row and append it to every CSV (flushed: a SIGKILL after this keeps it)."""
        if not self._opened:
            self._open()
        self.rows.append(row)
        cells = {k: _cell(v) for k, v in row.items()}
        for p, w, f in zip(self.csv_paths, self._writers, self._files):
            try:
                w.writerow(cells)
                f.flush()
            except OSError as e:  # a full disk: name the file (a flush's error carries no name)
                raise write_error(p, e) from None

    def snapshot(self, status: str) -> None:
        """Rewrite ``log.json`` and ``loss.png`` (atomically) from every row so far."""
        if self.dir is None or not self._opened:
            return
        step = self.rows[-1]["step"] if self.rows else 0
        doc = {"status": status, "step": step, **self.summary,
               "log": [{k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
                       for r in self.rows]}
        text = json.dumps(doc, indent=1)
        atomic_write(self.dir / "log.json", lambda f: f.write(text.encode("utf-8")))
        try:
            from tapetransformer.viz import plot_loss_curve
        except ImportError:  # Pillow is the optional "viz" extra
            if not self._plot_skipped:
                tqdm.write("loss.png skipped: it is drawn with Pillow (pip install pillow)", file=sys.stderr)
                self._plot_skipped = True
            return
        plot_loss_curve(self.rows, self.dir / "loss.png")

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []
