"""Issue 30's goal, checked on runs of the `train` command with its defaults: validation ≤ 2.0 nats at
step 2000 on tiny-shakespeare, and no training-loss spike above 1.5x its running median.

The runs (one per design, every flag but the corpus, the design, the output and the thread count at its
default; one thread because the machine is shared):

    tapetransformer train --threads 1 --data tinyshakespeare.txt --steps 2000 --out runs/reference.ckpt
    tapetransformer train --threads 1 --design seed --data tinyshakespeare.txt --steps 2000 --out runs/seed.ckpt

    python benchmarks/default_train_check.py --run reference=runs/reference-logs --run seed=runs/seed-logs \\
        --out benchmarks/results/default-train-shakespeare.json

reads each run's log.csv and writes the validation curve, the final validation loss, the largest ratio
of a step's training loss to the median of the 100 steps before it, and whether the goal is met.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_model  # noqa: E402

GOAL_VAL_NATS = 2.0
GOAL_SPIKE = 1.5
WINDOW = 100


def summarize(log_dir: str) -> dict:
    rows = list(csv.DictReader(open(os.path.join(log_dir, "log.csv"), encoding="utf-8")))
    steps = [int(r["step"]) for r in rows]
    if steps != list(range(1, len(steps) + 1)):
        raise ValueError(f"{log_dir}: log.csv does not hold steps 1..{len(steps)} in order")
    loss = [float(r["loss"]) for r in rows]
    worst, at = 0.0, None
    for i in range(20, len(loss)):
        ratio = loss[i] / statistics.median(loss[max(0, i - WINDOW):i])
        if ratio > worst:
            worst, at = ratio, i + 1
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss") not in (None, "")]
    final = val[-1][1] if val and val[-1][0] == steps[-1] else None
    summary = json.loads(Path(log_dir, "log.json").read_text(encoding="utf-8")) if Path(log_dir, "log.json").is_file() \
        else {}
    return {"steps": len(steps), "final_val_nats": final, "val_curve": val, "max_spike_ratio": round(worst, 4),
            "max_spike_step": at, "median_step_s": statistics.median(float(r["step_s"]) for r in rows[5:]),
            "config": summary.get("config"), "model": summary.get("model"),
            "goal_met": final is not None and final <= GOAL_VAL_NATS and worst <= GOAL_SPIKE}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", action="append", required=True, metavar="NAME=LOG_DIR")
    ap.add_argument("--out", required=True)
    ap.add_argument("--note", default="")
    a = ap.parse_args()
    import torch

    doc = {"goal": f"val <= {GOAL_VAL_NATS} nats at step 2000, no loss above {GOAL_SPIKE}x the running median of "
                   f"the previous {WINDOW} steps", "cpu": cpu_model(), "python": platform.python_version(),
           "torch": torch.__version__, "note": a.note, "runs": {}}
    for spec in a.run:
        name, log_dir = spec.split("=", 1)
        doc["runs"][name] = summarize(log_dir)
        r = doc["runs"][name]
        print(f"{name}: {r['steps']} steps, final val {r['final_val_nats']}, max spike {r['max_spike_ratio']} "
              f"(step {r['max_spike_step']}), goal {'met' if r['goal_met'] else 'NOT met'}")
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
