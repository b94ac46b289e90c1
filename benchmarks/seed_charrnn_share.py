"""The Char-RNN's share of the seed design's CPU training step (issue 27 item 4), before and after
the native sequence recurrence, in one run.

    python benchmarks/seed_charrnn_share.py --threads 1 --json benchmarks/results/seed-charrnn-share-cpu.json

At the notebook's size (vocab 65, seq_len 128, embed_dim 256, 4 critics; the prophet's hidden size is
2·embed_dim = 512, 2 layers) and batch 16, fp32, on the CPU without the Triton interpreter. Two paths,
timed alternately in one process:

* ``eager``: ``backend="eager"`` everywhere: the prophet is ``charrnn_ref``, the reference's per-step
  loop (what the training tool ran before the native recurrence);
* ``native``: ``backend="auto"``, what the training tool runs now: the same eager ops for the rest of the
  model, and the prophet through ``CharRNNFunction`` with the extension's ``charrnn_forward`` /
  ``charrnn_backward`` (one call per layer; the input projections and weight gradients as GEMMs).

Per path: ``step_ms``, forward + backward of ``model.loss`` (design="seed"; the optimizer not included);
``charrnn_ms``, forward + backward of the prophet alone on the same shapes (``charrnn`` over a (B, S, D)
input that requires grad, backward of its (B, S, Hd) output with a fixed gradient); ``share`` =
charrnn_ms / step_ms. Medians of ``--rounds`` calls after one untimed call each. The prophet shares no
work with the rest of the step, so its part of the step is estimated by its cost alone.
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
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--note", default="", help="recorded in the JSON (e.g. that the machine was shared)")
    args = ap.parse_args(argv)
    if args.batch < 1 or args.rounds < 1:
        ap.error("--batch and --rounds must be >= 1")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        ap.error("unset TRITON_INTERPRET: this measures the CPU user's paths, not the interpreter")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from tape_kernels.charrnn import charrnn, native_runnable
    from tapetransformer.model import TapeTransformer

    torch.manual_seed(0)
    model = TapeTransformer(**CFG, dropout=0.0, backend="auto", design="seed").train()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, CFG["vocab_size"], (args.batch, CFG["seq_len"]), generator=g)
    y = torch.randint(0, CFG["vocab_size"], (args.batch, CFG["seq_len"]), generator=g)
    weights = model._prophet_weights()
    emb = torch.randn(args.batch, CFG["seq_len"], CFG["embed_dim"], generator=g).requires_grad_()
    gout = torch.randn(args.batch, CFG["seq_len"], model.prophet.hidden_size, generator=g)
    if not native_runnable(emb, weights):
        raise SystemExit("the native recurrence cannot run here (tape_kernels._C not built?)")

    def step(backend: str) -> None:
        model.backend = backend
        model.zero_grad(set_to_none=True)
        model.loss(x, y, check=False).backward()

    def rnn(backend: str) -> None:
        emb.grad = None
        charrnn(emb, weights, None, backend=backend)[0].backward(gout)

    calls = {f"{what}_{path}": (fn, backend) for path, backend in (("eager", "eager"), ("native", "auto"))
             for what, fn in (("step", step), ("charrnn", rnn))}
    for fn, backend in calls.values():  # untimed first calls
        fn(backend)
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(args.rounds):
        for name, (fn, backend) in calls.items():
            t0 = time.perf_counter()
            fn(backend)
            times[name].append((time.perf_counter() - t0) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    paths = {}
    for path in ("eager", "native"):
        share = med[f"charrnn_{path}"] / med[f"step_{path}"]
        paths[path] = {"step_ms": round(med[f"step_{path}"], 1), "charrnn_ms": round(med[f"charrnn_{path}"], 1),
                       "share": round(share, 3), "above_threshold": share > THRESHOLD}
    doc = {
        **env_info("cpu"),
        "what": "the Char-RNN's (prophet's) share of the seed design's CPU training step (forward + backward), "
                "with the eager per-step loop and with the native sequence recurrence",
        "config": {**CFG, "design": "seed", "batch": args.batch, "dtype": "float32",
                   "prophet_hidden": model.prophet.hidden_size, "prophet_layers": model.prophet.num_layers},
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "threshold": THRESHOLD,
        "paths": paths,
        "charrnn_speedup": round(med["charrnn_eager"] / med["charrnn_native"], 2),
        "step_speedup": round(med["step_eager"] / med["step_native"], 2),
        "times_ms": {k: [round(t, 1) for t in v] for k, v in times.items()},
        "note": args.note,
    }
    write_results(args.json, doc)
    for path, r in paths.items():
        print(f"{path}: step {r['step_ms']:.0f} ms, Char-RNN {r['charrnn_ms']:.0f} ms: share {r['share']:.1%}")
    print(f"Char-RNN {doc['charrnn_speedup']}x, step {doc['step_speedup']}x (native over eager)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
