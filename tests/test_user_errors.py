"""The table of user errors: every bad input gets a clear message, never a traceback or a silent
surprise, and no file is created or damaged.

CLI cases (``tapetransformer train | generate | demo``, run in-process through ``cli.main``) assert
exit status 2, exactly one line on stderr naming the flag or file and the problem, no ``Traceback``,
and that the directory holding every input and output is byte for byte as before. API cases assert a
ValueError or TypeError whose message names the argument.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import tape_kernels
from tapetransformer import cli
from tapetransformer.checkpoint import ModelConfig, load_checkpoint, load_weights
from tapetransformer.data import CharDataset, CharVocab, load_text
from tapetransformer.generate import generate
from tapetransformer.model import TapeTransformer
from tapetransformer.train import (
    TrainConfig,
    build_model,
    make_optimizer,
    pick_amp,
    plan_memory,
    train,
)
from tapetransformer.train.memory import MemoryEstimate

HAS_CUDA = torch.cuda.is_available()
CORPUS = "to be or not to be, that is the question. " * 20
TINY = ["--seq-len", "8", "--embed-dim", "16", "--num-heads", "1"]


class Evil:
    def __reduce__(self):
        return (os.system, ("echo this-must-never-run",))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step checkpoint of a tiny causal model trained with Adam on CORPUS."""
    d = tmp_path_factory.mktemp("trained")
    corpus = d / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    train(TrainConfig(data=str(corpus), steps=2, batch_size=2, eval_every=2, eval_batches=1, out=str(d / "run.ckpt"),
                      model={"seq_len": 8, "embed_dim": 16, "num_heads": 1}, progress=False, backend="eager"))
    return d / "run.ckpt"


@pytest.fixture
def work(tmp_path: Path, trained: Path) -> dict[str, Path]:
    """A directory with a corpus, a copy of the checkpoint and files a case may name."""
    paths = {"tmp": tmp_path, "corpus": tmp_path / "corpus.txt", "ck": tmp_path / "run.ckpt",
             "file": tmp_path / "plain.txt", "dir": tmp_path / "adir", "bad": tmp_path / "bad.ckpt"}
    paths["corpus"].write_text(CORPUS, encoding="utf-8")
    shutil.copy(trained, paths["ck"])
    paths["file"].write_text("just text\n", encoding="utf-8")
    paths["dir"].mkdir()
    return paths


# ---------------------------------------------------------------------------------------------
# special inputs a case can ask for (written to {bad})


def _write_bad(kind: str, work: dict[str, Path]) -> None:
    bad = work["bad"]
    ck = load_checkpoint(work["ck"])
    if kind == "evil":
        torch.save({"format": "tapetransformer-v1", "x": Evil()}, bad)
    elif kind == "truncated":
        bad.write_bytes(work["ck"].read_bytes()[:300])
    elif kind == "missing_keys":
        ck["model"] = {k: v for i, (k, v) in enumerate(ck["model"].items()) if i % 7}
        torch.save(ck, bad)
    elif kind == "config_mismatch":
        ck["config"]["embed_dim"] = 32
        torch.save(ck, bad)
    elif kind == "bad_config":
        ck["config"]["embed_dim"] = 30
        torch.save(ck, bad)
    elif kind == "no_config":
        del ck["config"]
        torch.save(ck, bad)
    elif kind in ("nan_weights", "inf_weights"):
        ck["model"]["unembedding"].view(-1)[5] = float("nan" if kind == "nan_weights" else "inf")
        torch.save(ck, bad)
    elif kind == "latin1":
        bad.write_bytes("caf\xe9 au lait ".encode("latin-1") * 50)
    elif kind == "short":
        bad.write_text("ab", encoding="utf-8")
    elif kind == "foreign_chars":
        bad.write_text(CORPUS + "QXZ", encoding="utf-8")
    else:
        raise AssertionError(kind)


def _train(*extra: str, model: bool = True) -> list[str]:
    base = ["train", "--data", "{corpus}", "--steps", "2", "--batch-size", "2", "--eval-every", "1",
            "--backend", "eager", "--out", "{tmp}/new.ckpt"]
    return base + (TINY if model else []) + list(extra)


def _resume(*extra: str) -> list[str]:
    return ["train", "--data", "{corpus}", "--steps", "4", "--batch-size", "2", "--backend", "eager",
            "--out", "{ck}", "--resume", *extra]


def _generate(*extra: str, ck: str = "{ck}") -> list[str]:
    return ["generate", ck, "--backend", "eager", "--max-new-tokens", "2", "--prompt", "to", *extra]


def _demo(*extra: str) -> list[str]:
    return ["demo", "--data", "{corpus}", "--steps", "2", "--batch-size", "2", "--backend", "eager",
            "--out", "{tmp}/demo.ckpt", "--max-new-tokens", "2", *TINY, *extra]


# (id, argv, words the one-line message must hold, special input or None)
CLI_CASES: list[tuple[str, list[str], list[str], str | None]] = [
    # train: numbers out of range
    ("steps-zero", _train("--steps", "0"), ["--steps", "must be >= 1"], None),
    ("steps-negative", _train("--steps", "-5"), ["--steps", ">= 1"], None),
    ("batch-size-zero", _train("--batch-size", "0"), ["--batch-size", ">= 1"], None),
    ("lr-negative", _train("--lr", "-1"), ["--lr", ">= 0"], None),
    ("lr-nan", _train("--lr", "nan"), ["--lr", "finite"], None),
    ("grad-clip-negative", _train("--grad-clip", "-0.5"), ["--grad-clip", ">= 0"], None),
    ("eval-every-negative", _train("--eval-every", "-1"), ["--eval-every", ">= 0"], None),
    ("eval-batches-zero", _train("--eval-batches", "0"), ["--eval-batches", ">= 1"], None),
    ("seed-negative", _train("--seed", "-1"), ["--seed"], None),
    ("seq-len-zero", _train("--seq-len", "0"), ["--seq-len", ">= 1"], None),
    ("embed-dim-not-multiple-of-8", _train("--embed-dim", "30"), ["--embed-dim", "multiple of 8"], None),
    ("embed-dim-4", _train("--embed-dim", "4"), ["--embed-dim", ">= 8", "got 4"], None),
    ("embed-dim-12", _train("--embed-dim", "12"), ["--embed-dim", "multiple of 8", "got 12"], None),
    ("num-heads-zero", _train("--num-heads", "0"), ["--num-heads", ">= 1"], None),
    ("dropout-above-one", _train("--dropout", "1.5"), ["--dropout", "< 1"], None),
    ("viz-every-zero", _train("--viz-every", "0"), ["--viz-every", ">= 1"], None),
    ("threads-zero", _train("--threads", "0"), ["--threads", ">= 1"], None),
    ("progress-every-negative", _train("--progress-every", "-1"), ["--progress-every", ">= 0"], None),
    ("viz-rows-zero", _train("--viz-rows", "0"), ["--viz-rows", ">= 1"], None),
    ("micro-batch-zero", _train("--micro-batch", "0"), ["--micro-batch", ">= 1"], None),
    ("memory-budget-zero", _train("--memory-budget-gb", "0"), ["--memory-budget-gb", "> 0"], None),
    ("memory-budget-too-small", _train("--memory-budget-gb", "0.00001"), ["--memory-budget-gb", "does not fit"],
     None),
    # train: argparse-level
    ("steps-not-a-number", _train("--steps", "ten"), ["--steps", "invalid int value"], None),
    ("optimizer-unknown", _train("--optimizer", "adamw"), ["--optimizer", "invalid choice"], None),
    ("unknown-flag", _train("--epochs", "3"), ["unrecognized arguments", "--epochs"], None),
    ("causal-and-reference", _train("--causal", "--reference-semantics"), ["--reference-semantics", "not allowed"],
     None),
    # train: devices and kernels
    ("device-unknown", _train("--device", "tpu"), ["--device", "tpu"], None),
    ("amp-fp16-on-cpu", _train("--amp", "fp16"), ["--amp", "fp16 needs a CUDA device"], None),
    # train: files
    ("data-missing", _train("--data", "{tmp}/nope.txt"), ["--data", "no corpus file", "nope.txt"], None),
    ("data-is-directory", _train("--data", "{dir}"), ["--data", "is a directory"], None),
    ("data-not-utf8", _train("--data", "{bad}"), ["corpus", "bad.ckpt", "not UTF-8"], "latin1"),
    ("data-too-short", _train("--data", "{bad}"), ["--data", "too few"], "short"),
    ("out-is-directory", _train("--out", "{dir}"), ["--out", "is a directory"], None),
    ("out-below-a-file", _train("--out", "{file}/x.ckpt"), ["--out", "plain.txt is a file"], None),
    ("log-dir-is-file", _train("--log-dir", "{file}"), ["--log-dir", "is a file"], None),
    ("log-csv-below-a-file", _train("--log-csv", "{file}/log.csv"), ["--log-csv", "is a file"], None),
    ("viz-is-file", _train("--viz", "{file}"), ["--viz", "is a file"], None),
    # train: an earlier run is never replaced by accident; sizes that cannot fit are refused before allocating
    ("out-holds-earlier-run", _train("--out", "{ck}"), ["--out", "holds an earlier run", "--resume", "--overwrite"],
     None),
    ("embed-dim-cannot-fit", _train("--embed-dim", "100000"), ["--embed-dim", "needs about", "available"], None),
    ("batch-size-cannot-fit", _train("--batch-size", "100000000"), ["--batch-size", "needs about", "available"],
     None),
    # train: --resume and --init-from are strict
    ("resume-missing-checkpoint", _train("--resume"), ["--resume", "no checkpoint", "new.ckpt"], None),
    ("resume-conflicting-seq-len", _resume("--seq-len", "16"), ["--seq-len 16", "conflicts", "seq_len=8"], None),
    ("resume-conflicting-semantics", _resume("--reference-semantics"), ["--reference-semantics", "causal"], None),
    ("resume-steps-not-beyond", _resume("--steps", "2"), ["--steps 2", "not above step 2"], None),
    ("resume-other-optimizer", _resume("--optimizer", "sgd"), ["--optimizer sgd", "adam"], None),
    ("resume-nan-weights", _resume("--out", "{bad}"), ["bad.ckpt", "'unembedding'", "non-finite"], "nan_weights"),
    ("init-from-inf-weights", _train("--init-from", "{bad}", model=False), ["bad.ckpt", "'unembedding'", "non-finite"],
     "inf_weights"),
    ("resume-with-init-from", _resume("--init-from", "{ck}"), ["--init-from", "cannot be combined"], None),
    ("resume-foreign-characters", _resume("--data", "{bad}"), ["--data", "not in the vocabulary"], "foreign_chars"),
    ("resume-truncated-checkpoint", _resume("--out", "{bad}"), ["bad.ckpt", "not a loadable checkpoint"],
     "truncated"),
    ("resume-pickled-code", _resume("--out", "{bad}"), ["bad.ckpt", "weights_only", "nothing was run"], "evil"),
    ("init-from-missing", _train("--init-from", "{tmp}/nope.pt", model=False), ["--init-from", "no checkpoint"],
     None),
    ("init-from-text-file", _train("--init-from", "{file}", model=False), ["plain.txt", "not in torch.save's format"],
     None),
    ("init-from-conflicting-embed-dim", _train("--init-from", "{ck}", "--embed-dim", "32", model=False),
     ["--embed-dim 32", "conflicts", "embed_dim=16"], None),
    ("init-from-weights-not-matching", _train("--init-from", "{bad}", model=False),
     ["bad.ckpt", "weights do not match"], "config_mismatch"),
    # generate
    ("generate-missing-checkpoint", _generate(ck="{tmp}/nope.ckpt"), ["checkpoint", "no checkpoint", "nope.ckpt"],
     None),
    ("generate-checkpoint-is-directory", _generate(ck="{dir}"), ["checkpoint", "is a directory"], None),
    ("generate-text-file", _generate(ck="{file}"), ["plain.txt", "not a loadable checkpoint"], None),
    ("generate-pickled-code", _generate(ck="{bad}"), ["bad.ckpt", "refused", "posix.system"], "evil"),
    ("generate-missing-weights", _generate(ck="{bad}"), ["bad.ckpt", "missing"], "missing_keys"),
    ("generate-config-not-matching-weights", _generate(ck="{bad}"), ["bad.ckpt", "do not match"],
     "config_mismatch"),
    ("generate-invalid-config", _generate(ck="{bad}"), ["bad.ckpt", "embed_dim", "multiple of 8"], "bad_config"),
    ("generate-no-config", _generate(ck="{bad}"), ["bad.ckpt", "'config' is missing"], "no_config"),
    ("generate-nan-weights", _generate(ck="{bad}"), ["bad.ckpt", "'unembedding'", "1 NaN"], "nan_weights"),
    ("generate-inf-weights-int8", _generate("--int8", ck="{bad}"), ["bad.ckpt", "'unembedding'", "1 Inf"],
     "inf_weights"),
    ("generate-threads-zero", _generate("--threads", "0"), ["--threads", ">= 1"], None),
    ("generate-temperature-zero", _generate("--temperature", "0"), ["--temperature", "> 0"], None),
    ("generate-temperature-inf", _generate("--temperature", "inf"), ["--temperature", "finite"], None),
    ("generate-top-k-zero", _generate("--top-k", "0"), ["--top-k", ">= 1"], None),
    ("generate-negative-tokens", _generate("--max-new-tokens", "-1"), ["--max-new-tokens", ">= 0"], None),
    ("generate-negative-seed", _generate("--sample-seed", "-3"), ["--sample-seed"], None),
    ("generate-prompt-outside-vocab", _generate("--prompt", "QQQ"), ["--prompt", "'Q'", "not in the vocabulary"],
     None),
    ("generate-cuda-graph-on-cpu", _generate("--cuda-graph"), ["--cuda-graph", "--device cuda"], None),
    ("generate-device-unknown", _generate("--device", "gpu0"), ["--device", "gpu0"], None),
    ("generate-data-missing", _generate("--data", "{tmp}/nope.txt"), ["--data", "no corpus file"], None),
    # demo: checked before its training starts
    ("demo-steps-zero", _demo("--steps", "0"), ["--steps", ">= 1"], None),
    ("demo-temperature-zero", _demo("--temperature", "0"), ["--temperature", "> 0"], None),
    ("demo-embed-dim", _demo("--embed-dim", "12"), ["--embed-dim", "multiple of 8"], None),
    ("demo-out-is-directory", _demo("--out", "{dir}"), ["--out", "is a directory"], None),
]

if not HAS_CUDA:
    CLI_CASES += [
        ("train-device-cuda", _train("--device", "cuda"), ["--device cuda", "this machine has no CUDA device"], None),
        ("generate-device-cuda", _generate("--device", "cuda"), ["--device cuda", "this machine has no CUDA device"],
         None),
        ("demo-device-cuda", _demo("--device", "cuda:1"), ["--device cuda:1", "no CUDA device"], None),
    ]


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("argv,needles,special", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_user_error(argv: list[str], needles: list[str], special: str | None, work: dict[str, Path],
                        capsys: pytest.CaptureFixture) -> None:
    if special is not None:
        _write_bad(special, work)
    args = [a.format(**{k: str(v) for k, v in work.items()}) for a in argv]
    before = _tree(work["tmp"])
    rc = cli.main(args)
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in out + err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("tapetransformer"), lines[0]
    for word in needles:
        assert word in lines[0], (word, lines[0])
    assert "weights_only=False" not in err
    assert _tree(work["tmp"]) == before  # nothing created, changed or removed


def test_backend_triton_without_a_gpu_is_refused(work: dict[str, Path], capsys: pytest.CaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Without CUDA and without the interpreter, Triton cannot run: both commands say so up front."""
    if HAS_CUDA:
        pytest.skip("Triton runs here")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    before = _tree(work["tmp"])
    for argv in (_train("--backend", "triton"), _generate("--backend", "triton")):
        args = [a.format(**{k: str(v) for k, v in work.items()}) for a in argv]
        rc = cli.main(args)
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
        assert "--backend triton" in err and "CUDA device" in err
    assert _tree(work["tmp"]) == before


def test_cli_cases_are_at_least_40_and_distinct() -> None:
    assert len(CLI_CASES) >= 40
    assert len({c[0] for c in CLI_CASES}) == len(CLI_CASES)
    assert len({tuple(c[1]) + (c[3] or "",) for c in CLI_CASES}) == len(CLI_CASES)


# ---------------------------------------------------------------------------------------------
# the Python API


def _cfg(work: dict[str, Path], **kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(data=str(work["corpus"]), steps=2, batch_size=2, eval_every=1, eval_batches=1,
                                out=str(work["tmp"] / "api.ckpt"), progress=False, backend="eager",
                                model={"seq_len": 8, "embed_dim": 16, "num_heads": 1})
    base.update(kw)
    return TrainConfig(**base)


def _tiny_model() -> TapeTransformer:
    torch.manual_seed(0)
    return TapeTransformer(11, seq_len=8, embed_dim=16, num_heads=1, dropout=0.0, backend="eager")


def _ids(*shape: int) -> torch.Tensor:
    return torch.randint(0, 11, shape)


def _api_cases() -> list[tuple[str, Callable[[dict[str, Path]], Any], type, str]]:
    est = MemoryEstimate(fixed=1, per_sample=1, per_sample_recompute=1)
    ln_w, ln_b = torch.ones(16), torch.zeros(16)
    return [
        # train(TrainConfig)
        ("train-steps", lambda w: train(_cfg(w, steps=0)), ValueError, r"steps must be >= 1"),
        ("train-batch-size-type", lambda w: train(_cfg(w, batch_size="8")), TypeError, r"batch_size must be an int"),
        ("train-lr-inf", lambda w: train(_cfg(w, lr=float("inf"))), ValueError, r"lr must be a finite"),
        ("train-optimizer", lambda w: train(_cfg(w, optimizer="adamw")), ValueError, r"optimizer must be one of"),
        ("train-out-dir", lambda w: train(_cfg(w, out=str(w["dir"]))), ValueError, r"out .*is a directory"),
        ("train-embed-dim", lambda w: train(_cfg(w, model=ModelConfig(vocab_size=0, embed_dim=30))), ValueError,
         r"model\.embed_dim must be a multiple of 8"),
        ("train-model-field", lambda w: train(_cfg(w, model={"layers": 3})), ValueError,
         r"model has unknown field\(s\) 'layers'"),
        ("train-dropout", lambda w: train(_cfg(w, model={"dropout": 1.0})), ValueError, r"model\.dropout"),
        ("train-resume-missing", lambda w: train(_cfg(w, resume=True)), ValueError, r"resume: .*no checkpoint"),
        ("train-data-missing", lambda w: train(_cfg(w, data=str(w["tmp"] / "nope.txt"))), ValueError,
         r"data: no corpus file"),
        ("train-not-a-config", lambda w: train({"steps": 3}), TypeError, r"TrainConfig"),
        ("train-amp-fp16-cpu", lambda w: train(_cfg(w, amp="fp16")), ValueError, r"amp fp16 needs a CUDA"),
        ("train-resume-and-init", lambda w: train(_cfg(w, resume=True, out=str(w["ck"]), init_from=str(w["ck"]))),
         ValueError, r"init_from cannot be combined with resume"),
        ("train-resume-steps", lambda w: train(_cfg(w, resume=True, out=str(w["ck"]), model=None)), ValueError,
         r"steps 2 is not above step 2"),
        ("train-resume-conflict", lambda w: train(_cfg(w, resume=True, out=str(w["ck"]), steps=5,
                                                       model={"seq_len": 16})), ValueError,
         r"model\.seq_len 16 conflicts"),
        ("train-device", lambda w: train(_cfg(w, device="cuda:7" if HAS_CUDA else "cuda")), ValueError,
         r"device cuda.*CUDA device"),
        # training helpers
        ("build-model-vocab", lambda w: build_model(ModelConfig(vocab_size=0)), ValueError, r"vocab_size must be"),
        ("plan-memory-batch", lambda w: plan_memory(0, est, None), ValueError, r"batch_size must be >= 1"),
        ("pick-amp", lambda w: pick_amp("fp8", "cpu"), ValueError, r"amp must be one of"),
        ("make-optimizer", lambda w: make_optimizer("lion", [nn.Parameter(torch.ones(1))], 0.1), ValueError,
         r"optimizer must be one of"),
        # the model and generate()
        ("model-backend", lambda w: TapeTransformer(11, seq_len=8, embed_dim=16, num_heads=1, backend="cuda"),
         ValueError, r"backend must be one of"),
        ("model-vocab-zero", lambda w: TapeTransformer(0, seq_len=8, embed_dim=16), ValueError, r"vocab_size"),
        ("model-seq-len-zero", lambda w: TapeTransformer(11, seq_len=0, embed_dim=16), ValueError, r"seq_len"),
        ("model-dropout-one", lambda w: TapeTransformer(11, seq_len=8, embed_dim=16, dropout=1.0), ValueError,
         r"dropout"),
        ("model-critics-disagree", lambda w: TapeTransformer(11, seq_len=8, embed_dim=16, num_heads=2, num_critics=3),
         ValueError, r"num_critics"),
        ("model-design", lambda w: TapeTransformer(11, seq_len=8, embed_dim=16, design="moderated"), ValueError,
         r"design"),
        ("model-loss-targets", lambda w: _tiny_model().loss(_ids(2, 8), _ids(2, 7)), ValueError, r"targets"),
        ("model-loss-target-range", lambda w: _tiny_model().loss(_ids(2, 8), _ids(2, 8) + 11), ValueError,
         r"targets id \d+ out of range"),
        ("model-too-long", lambda w: _tiny_model().eval()(_ids(1, 9)), ValueError, r"seq_len"),
        ("model-cache-in-train-mode", lambda w: _tiny_model().train()(_ids(1, 4), past_kv=object()), ValueError,
         r"past_kv"),
        ("generate-prompt-float", lambda w: generate(_tiny_model(), torch.zeros(3), 2), ValueError, r"prompt"),
        ("generate-prompt-empty", lambda w: generate(_tiny_model(), torch.zeros(1, 0, dtype=torch.long), 2),
         ValueError, r"prompt"),
        ("generate-max-new-tokens", lambda w: generate(_tiny_model(), _ids(3), -1), ValueError, r"max_new_tokens"),
        ("generate-temperature", lambda w: generate(_tiny_model(), _ids(3), 2, temperature=0.0), ValueError,
         r"temperature"),
        ("generate-top-k", lambda w: generate(_tiny_model(), _ids(3), 2, top_k=0), ValueError, r"top_k"),
        ("generate-cuda-graph-cpu", lambda w: generate(_tiny_model(), _ids(3), 2, cuda_graph=True), ValueError,
         r"cuda_graph"),
        # every tape_kernels op
        ("int8-linear-x", lambda w: tape_kernels.int8_linear(torch.ones(2, 4, dtype=torch.long),
                                                             torch.zeros(3, 4, dtype=torch.int8), torch.ones(3)),
         ValueError, r"x has dtype"),
        ("quantize-weight-w", lambda w: tape_kernels.quantize_weight(torch.ones(4)), ValueError, r"w must have 2 dims"),
        ("int8-linear-from-float", lambda w: tape_kernels.Int8Linear.from_float(nn.Conv1d(2, 2, 1)), ValueError,
         r"nn\.Linear"),
        ("critic-attention-x", lambda w: tape_kernels.critic_attention(
            torch.ones(4, 16), torch.ones(48, 16), None, torch.ones(16, 16), None, 4), ValueError, r"\bx\b"),
        ("critic-attention-decode-q", lambda w: tape_kernels.critic_attention_decode(
            torch.ones(1, 2, 4), torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4)), ValueError, r"q_new"),
        ("add-layer-norm-residual", lambda w: tape_kernels.add_layer_norm(torch.ones(2, 16), torch.ones(2, 8), ln_w,
                                                                          ln_b), ValueError, r"residual"),
        ("activation-x", lambda w: tape_kernels.reference_activation(torch.ones(3, dtype=torch.long)), ValueError,
         r"\bx\b"),
        ("combine-hr", lambda w: tape_kernels.tapehead_combine(torch.ones(2, 3, 4), torch.ones(2, 3, 5), 0),
         ValueError, r"\bhr\b|\bhl\b"),
        ("unembedding-matrix", lambda w: tape_kernels.student_t_unembedding(torch.ones(2, 8), torch.ones(6, 5)),
         ValueError, r"unembedding"),
        ("nll-targets", lambda w: tape_kernels.student_t_nll(torch.ones(2, 8), torch.ones(8, 5),
                                                             torch.tensor([0, 9])), ValueError, r"targets"),
        ("charrnn-weights", lambda w: tape_kernels.charrnn_step(torch.ones(2, 4), []), ValueError,
         r"weights must be a non-empty list"),
        # checkpoints and data
        ("load-directory", lambda w: load_checkpoint(w["dir"]), ValueError, r"adir is a directory"),
        ("load-text-file", lambda w: load_checkpoint(w["file"]), ValueError, r"plain\.txt is not a loadable"),
        ("load-pickled-code", lambda w: (_write_bad("evil", w), load_checkpoint(w["bad"])), ValueError,
         r"bad\.ckpt .*weights_only\) loader refused it"),
        ("load-no-config", lambda w: (_write_bad("no_config", w), load_checkpoint(w["bad"])), ValueError,
         r"bad\.ckpt: the checkpoint's 'config' is missing"),
        ("load-weights-missing", lambda w: load_weights(_tiny_model(), {}, "sd.pt"), ValueError,
         r"sd\.pt: its weights do not match .* missing"),
        ("dataset-val-fraction", lambda w: CharDataset("abcdef", val_fraction=1.5), ValueError, r"val_fraction"),
        ("load-text-latin1", lambda w: (_write_bad("latin1", w), load_text(w["bad"])), ValueError,
         r"corpus .*bad\.ckpt is not UTF-8"),
        ("vocab-duplicates", lambda w: CharVocab("aa"), ValueError, r"distinct"),
    ]


API_CASES = _api_cases()


@pytest.mark.parametrize("call,exc,pattern", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_user_error(call: Callable[[dict[str, Path]], Any], exc: type, pattern: str,
                        work: dict[str, Path]) -> None:
    with pytest.raises(exc, match=pattern) as info:
        call(work)
    assert "weights_only=False" not in str(info.value)
    assert not (work["tmp"] / "api.ckpt").exists()


def test_api_cases_are_at_least_40() -> None:
    assert len(API_CASES) >= 40 and len({c[0] for c in API_CASES}) == len(API_CASES)
