"""The package's CPU speed through APIs every version has, to compare two checkouts in one session.

    PYTHONPATH=<tree>:<tree>/python python benchmarks/before_after_cpu.py --label after --out after.json

Measures, at the notebook's size (vocab 65, seq_len 128, embed_dim 256, 4 critics), fp32, on the CPU:

* ``generate_fp32_ms_per_token`` / ``generate_int8_ms_per_token``: ``generate(model, prompt, 32,
  greedy=True[, int8=True])`` after a 32-token prompt, B = 1, the ``stats["ms_per_token"]`` median of
  ``--reps`` calls after a warm-up call (whatever CPU path the version's ``generate`` takes);
* ``train_step_ms``: the fused model (``backend="eager"``) ``model.loss(x, y)`` forward + backward and
  an Adam step, batch 16, median of ``--reps`` after a warm-up step.

``benchmarks/cpu_suite.sh --before REV`` runs it on REV's tree and on this one, back to back.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args(argv)
    import tapetransformer
    from tapetransformer import TapeTransformer, generate

    torch.manual_seed(0)
    model = TapeTransformer(65, seq_len=128, embed_dim=256, num_heads=4, dropout=0.0, backend="eager").eval()
    prompt = torch.randint(0, 65, (1, 32), generator=torch.Generator().manual_seed(1))
    res: dict = {"label": a.label, "package": tapetransformer.__file__, "threads": torch.get_num_threads()}
    for int8 in (False, True):
        times = []
        for i in range(a.reps + 1):
            stats: dict = {}
            generate(model, prompt, 32, greedy=True, int8=int8, stats=stats)
            if i:
                times.append(stats["ms_per_token"])
        res[f"generate_{'int8' if int8 else 'fp32'}_ms_per_token"] = statistics.median(times)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(2)
    seq = torch.randint(0, 65, (16, 129), generator=g)
    x, y = seq[:, :-1], seq[:, 1:]
    times = []
    for i in range(a.reps + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model.loss(x, y).backward()
        opt.step()
        if i:
            times.append((time.perf_counter() - t0) * 1e3)
    res["train_step_ms"] = statistics.median(times)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
