"""Evaluation and checkpoints: validation loss, RNG states, where a run starts (new, ``resume``,
``init_from``, each checked strictly against the checkpoint), restoring from and saving to one.

A checkpoint holds the model, optimizer, scaler, RNG states (torch's, the data sampler's, the
validation sampler's), the step, vocabulary and config, so a resumed CPU run continues bit for bit.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from tapetransformer.checkpoint import ModelConfig, check_finite, load_checkpoint, load_weights, save_checkpoint
from tapetransformer.data import CharDataset, CharVocab
from tapetransformer.reference import nll_loss
from tapetransformer.train.config import DEFAULT_MODEL, LOCAL_FIELDS, ConfigError, TrainConfig, run_settings

__all__ = ["StartPoint", "evaluate", "given_model_fields", "open_start", "restore", "resume_config", "rng_state",
           "save",
           "set_rng_state", "start_point"]

ARCHITECTURE = ("seq_len", "embed_dim", "num_heads")  # fixed by the weights
SEMANTICS = ("dropout", "causal", "design")  # a fine-tune may change these (the weights load either way)


# ---------------------------------------------------------------------------------------------
# evaluation and RNG


def eval_split(ds: CharDataset, seq_len: int) -> str:
    """The validation split, or the training split when the corpus is too short to hold out a window."""
    return "val" if len(ds.val) >= seq_len + 2 else "train"


@torch.no_grad()
def evaluate(model: torch.nn.Module, ds: CharDataset, gen: torch.Generator, *, batch_size: int, batches: int,
             amp_dtype: torch.dtype | None = None) -> float:
    """Mean validation NLL over ``batches`` random full windows of the model's ``seq_len``, on the
    model's device.

    Eval mode without a cache computes the same log-probs as training mode (prev_emb, the only
    input that differs, never reaches an output), minus dropout.
    """
    seq_len = model.seq_len
    dev = next(model.parameters()).device
    split = eval_split(ds, seq_len)
    was_training = model.training
    model.eval()
    losses = []
    for _ in range(batches):
        x, y = ds.get_batch(split, batch_size, seq_len, gen)
        ctx = torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
        with ctx:
            logp, _ = model(x.to(dev))
        losses.append(nll_loss(logp.float(), y.to(dev)).item())
    model.train(was_training)
    return sum(losses) / len(losses)


def skip_evaluation(ds: CharDataset, gen: torch.Generator, *, seq_len: int, batch_size: int, batches: int) -> None:
    """Advance the validation sampler as :func:`evaluate` would (DDP ranks other than 0), so a resumed
    run draws the same batches on every rank."""
    for _ in range(batches):
        ds.get_batch(eval_split(ds, seq_len), batch_size, seq_len, gen)


def rng_state(gen: torch.Generator, eval_gen: torch.Generator | None = None) -> dict[str, Any]:
    """torch's CPU (and CUDA) generators, the data sampler's and the validation sampler's states."""
    st: dict[str, Any] = {"torch": torch.get_rng_state(), "data": gen.get_state()}
    if eval_gen is not None:
        st["eval"] = eval_gen.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any], gen: torch.Generator, eval_gen: torch.Generator) -> None:
    torch.set_rng_state(st["torch"])
    gen.set_state(st["data"])
    if "eval" in st:
        eval_gen.set_state(st["eval"])
    if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(st["cuda"])


# ---------------------------------------------------------------------------------------------
# where a run starts


@dataclass(frozen=True)
class StartPoint:
    """The resolved start of a run: the model config and vocabulary to build, the step reached, and
    the checkpoint to continue (``resume``) or the weights to fine-tune (``init``)."""

    model: ModelConfig
    vocab: CharVocab
    step: int = 0
    resume: dict[str, Any] | None = None
    init: dict[str, Any] | None = None


def given_model_fields(model: ModelConfig | dict[str, Any] | None) -> dict[str, Any]:
    """The model fields a config asks for: all of a ModelConfig (its vocab_size only when not 0), the
    keys of a dict, none for None."""
    if model is None:
        return {}
    if isinstance(model, ModelConfig):
        d = model.to_dict()
        if not d["vocab_size"]:
            del d["vocab_size"]
        return d
    return dict(model)


def _conflict_error(f: str, given: Any, saved: ModelConfig, source: Path, hint: str) -> ConfigError:
    if f == "design":
        return ConfigError("model.design", f"{{name}} {given} conflicts with {source}, which has design "
                                           f"{saved.design}; {hint}")
    if f == "causal":
        sem = {True: "causal", False: "reference"}
        return ConfigError("model.causal", f"{{name}}: the run asks for {sem[bool(given)]} semantics but {source} "
                                           f"has {sem[saved.causal]} semantics; {hint}")
    return ConfigError(f"model.{f}", f"{{name}} {given!r} conflicts with {source}, which has {f}="
                                     f"{getattr(saved, f)!r}; {hint}")


def resume_config(cfg: TrainConfig) -> tuple[TrainConfig, list[str]]:
    """For ``resume``: ``cfg`` with the run's stored training settings (config.run_settings) in place of
    those not given (``cfg.explicit``, see TrainConfig), and one note per given setting that differs from
    the run's. A checkpoint from before settings were stored restores its optimizer only. Other configs
    come back unchanged."""
    if not cfg.resume:
        return cfg, []
    extra = load_checkpoint(cfg.out)["extra"]
    stored = dict(extra.get("train_config") or {})
    if not stored and extra.get("optimizer_name") is not None:
        stored = {"optimizer": extra["optimizer_name"]}
    default = TrainConfig()
    names = {f.name for f in fields(TrainConfig)}
    given = cfg.explicit if cfg.explicit is not None else {n for n in names if getattr(cfg, n) != getattr(default, n)}
    current = run_settings(cfg)  # a corpus path as stored (absolute)
    updates: dict[str, Any] = {}
    notes = []
    for name, saved in stored.items():
        if name not in names or name in LOCAL_FIELDS:  # a setting this version does not have
            continue
        if name not in given:
            updates[name] = saved
        elif current[name] != saved:
            notes.append(f"{name} {getattr(cfg, name)!r} instead of the run's {saved!r}")
    return replace(cfg, **updates), notes


def open_start(cfg: TrainConfig) -> dict[str, Any] | None:
    """Load the checkpoint a run starts from (``resume``: ``cfg.out``; ``init_from``) and run the
    checks that need no corpus: the model fields ``cfg.model`` gives against it, the optimizer and,
    for ``resume``, that ``cfg.steps`` lies beyond its step. None for a new run."""
    if not (cfg.resume or cfg.init_from):
        return None
    path = Path(cfg.out if cfg.resume else cfg.init_from)
    if cfg.resume and not path.is_file():
        raise ConfigError("resume", f"{{name}}: there is no checkpoint at {path} to continue")
    ck = load_checkpoint(path)
    saved = ModelConfig.from_dict(ck["config"])
    given = given_model_fields(cfg.model)
    if cfg.resume:
        for f, v in given.items():
            if v != getattr(saved, f):
                raise _conflict_error(f, v, saved, path, "a resumed run keeps its model (leave it out to take the "
                                                         "checkpoint's)")
        trained_with = ck["extra"].get("optimizer_name")
        if trained_with is not None and trained_with != cfg.optimizer:
            raise ConfigError("optimizer", f"{{name}} {cfg.optimizer} differs from {trained_with}, which {path} was "
                                           f"trained with and whose state it holds; resume with {trained_with}")
        if cfg.steps <= ck["step"]:
            raise ConfigError("steps", f"{{name}} {cfg.steps} is not above step {ck['step']}, which {path} has "
                                       "already reached; give a larger target to continue it")
    else:
        for f, v in given.items():
            if f in ARCHITECTURE + ("vocab_size",) and v != getattr(saved, f):
                raise _conflict_error(f, v, saved, path, "fine-tuning keeps the architecture (leave it out to take "
                                                         "the checkpoint's)")
    return ck


def start_point(cfg: TrainConfig, text: str, ck: dict[str, Any] | None = None) -> StartPoint:
    """Resolve the run's start from ``cfg``, the corpus and the checkpoint :func:`open_start` loaded
    (loaded here when not given), strictly:

    * ``resume``: ``cfg.out`` must exist; the model fields ``cfg.model`` gives must match it; its step
      must be below ``cfg.steps``; the corpus must fit its vocabulary;
    * ``init_from``: the architecture comes from the checkpoint (given fields must match), dropout
      and semantics from ``cfg.model`` where given, else from the checkpoint;
    * else a new model: :data:`DEFAULT_MODEL` updated by ``cfg.model``, the vocabulary from the corpus.
    """
    if ck is None:
        ck = open_start(cfg)
    given = given_model_fields(cfg.model)
    if ck is None:
        vocab = CharVocab.from_text(text)
        merged = {**DEFAULT_MODEL.to_dict(), **given}
        if merged["vocab_size"] not in (0, vocab.size):
            raise ConfigError("model.vocab_size", f"{{name}} is {merged['vocab_size']} but the corpus has "
                                                  f"{vocab.size} distinct characters (0: take it from the corpus)")
        return StartPoint(model=ModelConfig.from_dict({**merged, "vocab_size": vocab.size}), vocab=vocab)
    path = Path(cfg.out if cfg.resume else cfg.init_from)
    saved = ModelConfig.from_dict(ck["config"])
    vocab = CharVocab(ck["vocab"]) if ck["vocab"] else CharVocab.from_text(text)  # bare state_dict: the corpus's
    if ck["vocab"]:
        missing = set(text) - set(vocab.chars)
        if missing:
            example = "".join(sorted(missing)[:5])
            raise ConfigError("data", f"{{name}}: the corpus has {len(missing)} character(s) not in the vocabulary "
                                      f"of {path} (e.g. {example!r}); train on the corpus it was made from")
    if vocab.size != saved.vocab_size:
        raise ConfigError("data", f"{{name}}: the corpus has {vocab.size} distinct characters but {path} expects "
                                  f"{saved.vocab_size}; train on the corpus it was made from")
    if cfg.resume:
        return StartPoint(model=saved, vocab=vocab, step=int(ck["step"]), resume=ck)
    mcfg = ModelConfig.from_dict({**saved.to_dict(), **{f: v for f, v in given.items() if f in SEMANTICS}})
    return StartPoint(model=mcfg, vocab=vocab, init=ck)


# ---------------------------------------------------------------------------------------------
# restore and save


def restore(ck: dict[str, Any], source: str | Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler | None, gen: torch.Generator, eval_gen: torch.Generator) -> None:
    """Load a resumed checkpoint's model, optimizer, scaler and RNG states."""
    load_weights(model, ck["model"], source)
    check_finite(ck["model"], source)
    if ck["optimizer"] is not None:
        try:
            opt.load_state_dict(ck["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            name = ck["extra"].get("optimizer_name", "unknown")
            raise ValueError(f"{source}: its optimizer state does not fit this optimizer ({e}); resume with the "
                             f"optimizer it was trained with ({name})") from None
    if scaler is not None and ck["extra"].get("scaler"):
        scaler.load_state_dict(ck["extra"]["scaler"])
    if ck["rng"]:
        set_rng_state(ck["rng"], gen, eval_gen)


def save(cfg: TrainConfig, *, model: torch.nn.Module, mcfg: ModelConfig, vocab: CharVocab,
         opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, step: int, gen: torch.Generator,
         eval_gen: torch.Generator, val_loss: float, plan: Any, world: int) -> Path:
    """Write the run's checkpoint to ``cfg.out`` (atomically)."""
    extra = {"optimizer_name": cfg.optimizer, "train_config": run_settings(cfg), "val_loss": val_loss,
             "plan": asdict(plan),
             "scaler": scaler.state_dict() if scaler is not None else None, "world_size": world, "amp": cfg.amp}
    return save_checkpoint(cfg.out, model=model, config=mcfg, vocab=vocab.chars, optimizer=opt, step=step,
                           rng=rng_state(gen, eval_gen), extra=extra)
