"""Command line: ``tapetransformer train | generate | demo``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from tapetransformer.checkpoint import ModelConfig, load_checkpoint
from tapetransformer.data import CharVocab, load_text
from tapetransformer.generate import generate
from tapetransformer.model import TapeTransformer
from tapetransformer.train import AMP_MODES, OPTIMIZERS, TrainConfig, build_model, train


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (a small CPU-friendly reference model by default)")
    g.add_argument("--seq-len", type=int, default=64)
    g.add_argument("--embed-dim", type=int, default=64)
    g.add_argument("--num-heads", type=int, default=2, help="residual TapeHeads ('critics')")
    g.add_argument("--dropout", type=float, default=0.0)
    g.add_argument("--causal", action="store_true",
                   help="repaired semantics: causal attention, absolute positions in cached decode")


def _add_train_args(p: argparse.ArgumentParser, steps: int) -> None:
    p.add_argument("--data", default=None,
                   help="text file, 'shakespeare' (downloaded once, cached) or 'embedded' (default: pydoc topics)")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam",
                   help="wolf: the notebook's optimizer as one multi-tensor step; wolf-eager: its reference loop")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--out", default="runs/tapetransformer.ckpt", help="checkpoint path (written atomically)")
    p.add_argument("--resume", action="store_true", help="continue from --out if it exists")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", choices=("auto", "triton", "eager"), default="auto",
                   help="auto: Triton kernels on CUDA, eager PyTorch on CPU")
    p.add_argument("--log-csv", default=None)
    p.add_argument("--log-dir", default="auto",
                   help="write log.csv, log.json and loss.png (Pillow) there at the end; 'auto' (default): "
                        "<out without suffix>-logs next to the checkpoint; 'none': no logs")
    g = p.add_argument_group("precision and memory")
    g.add_argument("--amp", choices=AMP_MODES, default="auto",
                   help="auto: bf16 autocast on CUDA where supported, else fp16 + GradScaler; fp32 on CPU")
    g.add_argument("--memory-budget-gb", type=float, default=None,
                   help="per-process memory budget: sets the CUDA memory fraction and picks micro-batch x "
                        "gradient accumulation (and activation recomputation if needed)")
    g.add_argument("--micro-batch", type=int, default=None, help="force the micro-batch size (accumulate the rest)")
    g.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=None,
                   help="force activation recomputation per TapeHead block on/off (default: the planner)")
    p.add_argument("--init-from", default=None,
                   help="fine-tune from a checkpoint or a bare notebook state_dict (config taken from it)")
    g = p.add_argument_group("attention visualization (needs Pillow)")
    g.add_argument("--viz", default=None, metavar="DIR", help="write attention frames (PNG) and train.gif to DIR")
    g.add_argument("--viz-every", type=int, default=50)
    g.add_argument("--viz-rows", type=int, default=4, help="batch rows drawn per frame")
    _add_model_args(p)


def _add_sample_args(p: argparse.ArgumentParser, prompt: str) -> None:
    p.add_argument("--prompt", default=prompt)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--sample-seed", type=int, default=None)
    p.add_argument("--int8", action="store_true", help="int8 weights for generation (tape_kernels._C)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="capture the decode step in a CUDA graph (default: on for CUDA)")


def _log_dir(a: argparse.Namespace) -> str | None:
    if a.log_dir == "none":
        return None
    if a.log_dir == "auto":
        out = Path(a.out)
        return str(out.parent / f"{out.stem}-logs")
    return a.log_dir


def _train_config(a: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        data=a.data, steps=a.steps, batch_size=a.batch_size, lr=a.lr, optimizer=a.optimizer, grad_clip=a.grad_clip,
        eval_every=a.eval_every, out=a.out, resume=a.resume, seed=a.seed, device=a.device, backend=a.backend,
        log_csv=a.log_csv, log_dir=_log_dir(a), amp=a.amp, memory_budget_gb=a.memory_budget_gb,
        micro_batch=a.micro_batch, recompute=a.recompute, init_from=a.init_from, viz=a.viz, viz_every=a.viz_every,
        viz_rows=a.viz_rows,
        model=ModelConfig(vocab_size=0, seq_len=a.seq_len, embed_dim=a.embed_dim, num_heads=a.num_heads,
                          dropout=a.dropout, causal=a.causal),
    )


def _generate(model: TapeTransformer, vocab: CharVocab, a: argparse.Namespace, device: str) -> str:
    prompt = a.prompt or vocab.chars[0]
    ids = torch.tensor(vocab.encode(prompt), dtype=torch.long, device=device)
    sys.stdout.write(prompt)
    sys.stdout.flush()

    def stream(tok: torch.Tensor) -> None:
        sys.stdout.write(vocab.decode(tok[:1]))
        sys.stdout.flush()

    stats: dict = {}
    tokens = generate(model, ids, a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, greedy=a.greedy,
                      int8=a.int8, seed=a.sample_seed, cuda_graph=a.cuda_graph, on_token=stream, stats=stats)
    sys.stdout.write("\n")
    mode = "int8" if a.int8 else str(model.unembedding.dtype).replace("torch.", "")
    graph = f", CUDA graph (capture {stats['capture_ms']:.1f} ms)" if stats.get("cuda_graph") else ""
    print(f"[{a.max_new_tokens} tokens, {stats.get('ms_per_token', 0.0):.2f} ms/token, prefill "
          f"{stats.get('prefill_ms', 0.0):.1f} ms, {mode}{graph}, backend {model.backend} on {device}]",
          file=sys.stderr)
    return vocab.decode(tokens[0])


def cmd_train(a: argparse.Namespace) -> int:
    res = train(_train_config(a))
    if int(os.environ.get("RANK", "0")) == 0:
        peak = res["peak_mem_mb"]
        mem = f"; peak memory of the last step {peak:,.0f} MiB" if a.device.startswith("cuda") else ""
        val = "n/a" if res["val_loss"] != res["val_loss"] else f"{res['val_loss']:.4f}"
        print(f"step {res['step']}: train loss {res['train_loss']:.4f}, val loss {val}; "
              f"checkpoint {res['checkpoint']}{mem}")
    return 0


def load_model(
    path: str, device: str, data: str | None = None, backend: str = "auto"
) -> tuple[TapeTransformer, CharVocab]:
    ckpt = load_checkpoint(path, map_location=device)
    cfg = ModelConfig.from_dict(ckpt["config"])
    if ckpt["vocab"]:
        vocab = CharVocab(ckpt["vocab"])
    else:  # a bare notebook state_dict: the vocabulary comes from the corpus it was trained on
        vocab = CharVocab.from_text(load_text(data if data else "shakespeare"))
    if vocab.size != cfg.vocab_size:
        raise ValueError(f"vocabulary has {vocab.size} characters but the model expects {cfg.vocab_size}")
    model = build_model(cfg, backend)
    model.load_state_dict(ckpt["model"], strict=True)
    return model.to(device).eval(), vocab


def cmd_generate(a: argparse.Namespace) -> int:
    model, vocab = load_model(a.checkpoint, a.device, a.data, a.backend)
    _generate(model, vocab, a, a.device)
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    sem = "causal" if a.causal else "reference"
    print(f"demo: training a small TapeTransformer ({sem} semantics, backend {a.backend}) for {a.steps} steps "
          f"on the {'embedded pydoc' if a.data in (None, 'embedded') else a.data} corpus (CPU-friendly size)")
    res = train(_train_config(a))
    print(f"trained in {time.perf_counter() - t0:.0f}s: train loss {res['train_loss']:.3f}, "
          f"val loss {res['val_loss']:.3f} (uniform over {res['vocab'].size} chars would be "
          f"{torch.log(torch.tensor(float(res['vocab'].size))):.3f})")
    if a.causal:
        print("sample (causal semantics):")
    else:
        print("sample (reference semantics: positions restart every call, so expect noise-like text):")
    _generate(res["model"], res["vocab"], a, a.device)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tapetransformer", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("train", help="train a model and write checkpoints")
    _add_train_args(p, steps=200)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", default=None, help="corpus for the vocabulary of a bare notebook state_dict")
    p.add_argument("--backend", choices=("auto", "triton", "eager"), default="auto")
    _add_sample_args(p, prompt="")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("demo", help="train briefly on the embedded corpus, then generate")
    _add_train_args(p, steps=600)
    _add_sample_args(p, prompt="The ")
    p.add_argument("--reference-semantics", dest="causal", action="store_false",
                   help="train the reference's semantics instead of the causal ones (its samples are noise)")
    # Smaller than `train`'s defaults: about a minute on 2 CPU cores. The demo uses the repaired causal
    # semantics by default because the reference's cached generation cannot produce text.
    p.set_defaults(func=cmd_demo, out="runs/demo.ckpt", eval_every=200, seq_len=32, embed_dim=32, num_heads=1,
                   batch_size=16, causal=True)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"tapetransformer: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
