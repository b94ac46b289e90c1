"""The Char-RNN's share of the seed design's CPU training step (issue 27 item 4, the measurement).

    python benchmarks/seed_charrnn_share.py --json benchmarks/results/seed-charrnn-share-cpu.json

At the notebook's size (vocab 65, seq_len 128, embed_dim 256, 4 critics; the prophet's hidden size is
2·embed_dim = 512, 2 layers) and batch 16, fp32, on the CPU with the backend the training tool picks
there (``backend="auto"``: eager, so the prophet is ``charrnn_ref``, the reference's per-step loop):

* ``step_ms``: forward + backward of ``model.loss`` (design="seed"), the optimizer not included;
* ``charrnn_ms``: forward + backward of the prophet alone on the same shapes (``charrnn`` over a
  (B, S, D) input that requires grad, backward of its (B, S, Hd) output with a fixed gradient);
* ``share`` = charrnn_ms / step_ms.

Both are medians of ``--rounds`` calls, timed alternately in one process after one untimed call each.
The share is of the step's wall time: the two calls are timed separately, so the prophet's part of the
step is estimated by its cost alone (it shares no work with the rest of the step).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import env_info, write_results  # noqa: E402

CFG = {"vocab_size": 65, "seq_len": 128, "embed_dim": 256, "num_heads": 4}
THRESHOLD = 0.15  # issue 27 item 4: above this share the prophet gets a native or compiled sequence path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--note", default="", help="recorded in the JSON (e.g. that the machine was shared)")
    args = ap.parse_args(argv)
    if args.batch < 1 or args.rounds < 1:
        ap.error("--batch and --rounds must be >= 1")
    from tape_kernels.charrnn import charrnn
    from tapetransformer.model import TapeTransformer

    torch.manual_seed(0)
    model = TapeTransformer(**CFG, dropout=0.0, backend="auto", design="seed").train()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, CFG["vocab_size"], (args.batch, CFG["seq_len"]), generator=g)
    y = torch.randint(0, CFG["vocab_size"], (args.batch, CFG["seq_len"]), generator=g)
    weights = model._prophet_weights()
    emb = torch.randn(args.batch, CFG["seq_len"], CFG["embed_dim"], generator=g).requires_grad_()
    gout = torch.randn(args.batch, CFG["seq_len"], model.prophet.hidden_size, generator=g)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model.loss(x, y, check=False).backward()

    def rnn() -> None:
        model.zero_grad(set_to_none=True)
        emb.grad = None
        charrnn(emb, weights, None, backend=model.backend)[0].backward(gout)

    step(), rnn()  # untimed first calls
    times: dict[str, list[float]] = {"step": [], "charrnn": []}
    for _ in range(args.rounds):
        for name, fn in (("step", step), ("charrnn", rnn)):
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    step_ms, rnn_ms = statistics.median(times["step"]), statistics.median(times["charrnn"])
    share = rnn_ms / step_ms
    doc = {
        **env_info("cpu"),
        "what": "the Char-RNN's (prophet's) share of the seed design's CPU training step (forward + backward)",
        "config": {**CFG, "design": "seed", "batch": args.batch, "dtype": "float32", "backend": model.backend,
                   "prophet_hidden": model.prophet.hidden_size, "prophet_layers": model.prophet.num_layers},
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "step_ms": round(step_ms, 1),
        "charrnn_ms": round(rnn_ms, 1),
        "share": round(share, 3),
        "threshold": THRESHOLD,
        "above_threshold": share > THRESHOLD,
        "times_ms": {k: [round(t, 1) for t in v] for k, v in times.items()},
        # per round (the two calls timed back to back): how far the noise moves the share
        "round_shares": [round(r / s, 3) for s, r in zip(times["step"], times["charrnn"])],
        "note": args.note,
    }
    write_results(args.json, doc)
    print(f"step {step_ms:.0f} ms, Char-RNN {rnn_ms:.0f} ms: share {share:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
