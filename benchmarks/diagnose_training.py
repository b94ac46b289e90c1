"""Instrumented training runs: why the old default (Adam at a constant 3e-3) stalls at the unigram loss.

Each run trains the `train` command's default model (causal, dim 64, 2 critics, seq 64, batch 8) with
the training tool's step (Adam, gradient clipping at 1.0) and records, every step:

- the loss, the gradient norm before clipping, per module group the gradient norm and Adam's update
  size (the parameter change of the step);
- the final hidden state h that the Student-t unembedding reads: its norm, and its *spread*, the RMS
  distance of each position's h from the batch mean of h (0: every position emits the same vector, so
  the model can only predict the unigram);
- the spread after every TapeHead layer's combine (coda layers, then the critic's), and the spread of
  the layer's left block output (a LayerNorm output) going into it;
- the Student-t geometry: mean |U_v|, the mean distance² to the nearest column, the logit range per row
  (df is the constant e: nothing to learn there);
- the LayerNorm parameters of the last block (mean |weight|, |bias|).

    python benchmarks/diagnose_training.py --data tinyshakespeare.txt --out benchmarks/results/training-diagnosis.json

writes the JSON and a PNG beside it. The runs: the old default (3e-3 constant), the same peak with the
new default schedule (warm-up + cosine), and 1e-3 constant.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tapetransformer.blocks import FusedTapeHead
from tapetransformer.data import CharDataset, load_text
from tapetransformer.model import ModelConfig
from tapetransformer.train.schedule import LRSchedule, default_warmup
from tapetransformer.train.step import build_model

RUNS = {  # name: (peak lr, schedule, warm-up or None for the default)
    "constant 3e-3 (old default)": (3e-3, "constant", 0),
    "warm-up + cosine, peak 3e-3": (3e-3, "cosine", None),
    "constant 1e-3": (1e-3, "constant", 0),
}


def spread(t: torch.Tensor) -> float:
    """RMS distance of each row of ``t`` (…, D) from the rows' mean."""
    v = t.detach().reshape(-1, t.shape[-1]).double()
    return float((v - v.mean(0)).pow(2).sum(-1).mean().sqrt())


def groups_of(model: torch.nn.Module) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """Parameters by module: the embedding, the unembedding, each TapeHead's attention / LayerNorms / MLP."""
    out: dict[str, list[tuple[str, torch.nn.Parameter]]] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        if parts[0] in ("codahead", "residualheads"):
            head = "coda" if parts[0] == "codahead" else f"critic{parts[1]}"
            kind = next((k for k in ("cached_attn", "ln_attn", "mlp", "ln_mlp") if k in parts), "other")
            g = f"{head}.{kind}"
        else:
            g = parts[0]
        out.setdefault(g, []).append((name, p))
    return out


def run(name: str, peak: float, kind: str, warmup: int | None, *, ds: CharDataset, steps: int, design: str,
        seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    mcfg = ModelConfig(vocab_size=ds.vocab.size, seq_len=64, embed_dim=64, num_heads=2, causal=True, design=design)
    model = build_model(mcfg, "eager")
    model.train()
    sched = LRSchedule(peak, steps, default_warmup(steps) if warmup is None else warmup, 0.1, kind)
    opt = torch.optim.Adam(model.parameters(), lr=peak)
    gen = torch.Generator().manual_seed(seed)
    groups = groups_of(model)
    layers: list[tuple[float, float]] = []
    original = FusedTapeHead.combine

    def combine(self: FusedTapeHead, hl: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        out = original(self, hl, hr)
        layers.append((spread(hl), spread(out)))
        return out

    rows = []
    FusedTapeHead.combine = combine
    try:
        for step in range(1, steps + 1):
            lr = sched.rate(step)
            for g in opt.param_groups:
                g["lr"] = lr
            x, y = ds.get_batch("train", 8, mcfg.seq_len, gen)
            layers.clear()
            if design == "seed":
                h, _ = model._seed_train(x, stats=False)
            else:
                e = model.holistic_embed(x)
                coda, _, _, _ = model.codahead(e, None, None, stats=False)
                h, _, _, _ = model.residualheads[-1](e, coda, None, stats=False)
            U = model.unembedding
            d2 = (h.pow(2).sum(-1, keepdim=True) - 2 * h @ U + U.pow(2).sum(0)).clamp_min(1e-12)
            logits = -0.5 * (math.e + mcfg.embed_dim) * torch.log1p(d2 / math.e)
            loss = -logits.log_softmax(-1).gather(-1, y[..., None]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            before = {n: p.detach().clone() for ps in groups.values() for n, p in ps}
            grad = {g: math.sqrt(sum(float(p.grad.double().pow(2).sum()) for _, p in ps if p.grad is not None))
                    for g, ps in groups.items()}
            total = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
            opt.step()
            update = {g: math.sqrt(sum(float((p.detach() - before[n]).double().pow(2).sum()) for n, p in ps))
                      for g, ps in groups.items()}
            last = model.residualheads[-1].blocks_left[-1].ln_mlp
            with torch.no_grad():
                rows.append({
                    "step": step, "lr": lr, "loss": float(loss), "grad_norm": total, "h_spread": spread(h),
                    "h_norm": float(h.detach().norm(dim=-1).mean()), "U_norm": float(U.detach().norm(dim=0).mean()),
                    "d2_nearest": float(d2.detach().min(-1).values.mean()),
                    "logit_range": float((logits.max(-1).values - logits.min(-1).values).mean()),
                    "layer_spread": [round(o, 6) for _, o in layers],
                    "layer_in_spread": [round(i, 6) for i, _ in layers],
                    "last_ln": {"weight_abs": float(last.weight.abs().mean()), "bias_norm": float(last.bias.norm())},
                    "grad": grad, "update": update,
                })
            if step == 1 or step % 50 == 0:
                r = rows[-1]
                print(f"  [{name}] step {step}: loss {r['loss']:.3f}, h spread {r['h_spread']:.4f}, "
                      f"grad {r['grad_norm']:.3g}", file=sys.stderr, flush=True)
    finally:
        FusedTapeHead.combine = original
    return {"name": name, "peak_lr": peak, "schedule": kind, "warmup": sched.warmup, "rows": rows}


def plot(result: dict[str, Any], path: str) -> None:
    """Loss, the final hidden state's spread (log), and the spread after each layer at step 10."""
    from common import line_panels

    at = 9
    line_panels([
        {"title": "training loss (nats)", "xlabel": "step", "ylabel": "nats",
         "series": [(r["name"], [(w["step"], w["loss"]) for w in r["rows"]]) for r in result["runs"]],
         "hline": ("unigram entropy", result["unigram_nats"])},
        {"title": "spread of h across positions (log)", "xlabel": "step", "ylabel": "RMS distance", "log": True,
         "series": [(r["name"], [(w["step"], w["h_spread"]) for w in r["rows"]]) for r in result["runs"]]},
        {"title": f"spread after each TapeHead layer, step {at + 1} (log)", "xlabel": "layer (coda 1-2, critic 3-6)",
         "ylabel": "RMS distance", "log": True,
         "series": [(r["name"], list(enumerate(r["rows"][at]["layer_spread"], 1))) for r in result["runs"]]},
    ], path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="embedded")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--design", default="reference", choices=("reference", "seed"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/training-diagnosis.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ds = CharDataset(load_text(a.data))
    counts = torch.bincount(ds.train, minlength=ds.vocab.size).double()
    pr = counts / counts.sum()
    unigram = float(-(pr[pr > 0] * pr[pr > 0].log()).sum())
    t0 = time.time()
    runs = [run(n, *spec, ds=ds, steps=a.steps, design=a.design, seed=a.seed) for n, spec in RUNS.items()]
    result = {"data": os.path.basename(str(a.data)), "design": a.design, "steps": a.steps, "seed": a.seed,
              "unigram_nats": unigram, "torch": torch.__version__, "wall_s": round(time.time() - t0, 1),
              "runs": runs}
    with open(a.out, "w") as f:
        json.dump(result, f)
    plot(result, os.path.splitext(a.out)[0] + ".png")
    for r in runs:
        rs = r["rows"]
        print(f"{r['name']}: loss {rs[0]['loss']:.3f} -> {rs[-1]['loss']:.3f}; "
              f"h spread step 1 {rs[0]['h_spread']:.3f}, "
              f"step 2 {rs[1]['h_spread']:.3f}, step 20 {rs[min(19, len(rs) - 1)]['h_spread']:.4f}, "
              f"last {rs[-1]['h_spread']:.3f}")


if __name__ == "__main__":
    main()
