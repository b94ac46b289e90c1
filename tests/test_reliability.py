"""Issue 25 (reliability round 2): no run destroyed by a new one, no silent NaN, a resume that keeps
its run's settings, int8 weights in every eval-mode forward, one line instead of a traceback for
impossible sizes and full disks, SIGTERM, --eval-every 0, progress lines when stderr is a file,
--threads and a noise-robust --compile auto. Tiny models (seq_len 8, embed_dim 16, eager ops)."""

from __future__ import annotations

import csv
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tapetransformer import cli
from tapetransformer.checkpoint import load_checkpoint
from tapetransformer.data import CharVocab, embedded_corpus
from tapetransformer.model import TapeTransformer
from tapetransformer.train import TrainConfig, TrainingInterrupted, train
from tapetransformer.train.step import Stepper

CORPUS = "to be or not to be, that is the question. " * 20
TINY = ["--seq-len", "8", "--embed-dim", "16", "--num-heads", "1"]
TINY_MODEL = {"seq_len": 8, "embed_dim": 16, "num_heads": 1}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text(CORPUS, encoding="utf-8")
    return p


def _cfg(corpus: Path, out: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(data=str(corpus), steps=2, batch_size=2, eval_every=2, eval_batches=1, out=str(out),
                                progress=False, backend="eager", model=dict(TINY_MODEL))
    base.update(kw)
    return TrainConfig(**base)


def _args(corpus: Path, out: Path, *extra: str, steps: int = 4) -> list[str]:
    return ["train", "--data", str(corpus), "--steps", str(steps), "--batch-size", "2", "--eval-every", "2",
            "--eval-batches", "1", "--backend", "eager", "--out", str(out), *TINY, *extra]


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# 6. smaller defects


def test_sigterm_is_handled_like_ctrl_c(tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = Stepper.step
    calls = []

    def step(self: Stepper, *a: Any, **kw: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGTERM)  # the handler runs before the step returns
        return real(self, *a, **kw)

    monkeypatch.setattr(Stepper, "step", step)
    out = tmp_path / "run.ckpt"
    with pytest.raises(TrainingInterrupted) as info:
        train(_cfg(corpus, out, steps=6, eval_every=6))
    assert info.value.step == 2 and info.value.signum == signal.SIGTERM
    assert load_checkpoint(out)["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


def test_eval_every_zero_validates_at_the_end(tmp_path: Path, corpus: Path) -> None:
    res = train(_cfg(corpus, tmp_path / "run.ckpt", steps=3, eval_every=0))
    assert res["val_loss"] == res["val_loss"]  # finite, not NaN
    assert "val_loss" in res["log"][-1] and all("val_loss" not in r for r in res["log"][:-1])


def test_help_and_check_agree_on_the_embed_dim_multiple() -> None:
    help_text = " ".join(cli.build_parser()._subparsers._group_actions[0].choices["train"].format_help().split())
    assert "a multiple of 8" in help_text and "a multiple of 4" not in help_text
    TapeTransformer(11, seq_len=8, embed_dim=8, num_heads=1, backend="eager")  # the smallest the help allows


def test_readme_states_what_eval_mode_returns() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert "logp, cache = model.eval()(x)" in readme
    assert "logp, entropy, attn_weights = model(x) " not in readme
    m = TapeTransformer(11, seq_len=8, embed_dim=16, num_heads=1, backend="eager").eval()
    logp, cache = m(torch.zeros(1, 4, dtype=torch.long))
    assert logp.shape == (1, 4, 11) and type(cache).__name__ == "KVCache"


def test_generate_ctrl_c_does_not_talk_about_checkpoints(tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    gen_mod = sys.modules["tapetransformer.generate"]  # the package's ``generate`` is the function

    out = tmp_path / "run.ckpt"
    train(_cfg(corpus, out))

    def interrupted(*a: Any, **kw: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(gen_mod, "generate", interrupted)
    rc = cli.main(["generate", str(out), "--backend", "eager", "--prompt", "to"])
    err = capsys.readouterr().err
    assert rc == 130
    assert err.strip().splitlines() == ["tapetransformer generate: interrupted"], err


def test_generate_data_defaults_to_the_embedded_corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    import tapetransformer.data as data_mod

    def offline(*a: Any, **kw: Any) -> Any:
        raise AssertionError("generate tried to download shakespeare")

    monkeypatch.setattr(data_mod, "download_tiny_shakespeare", offline)
    vocab = CharVocab.from_text(embedded_corpus())
    torch.manual_seed(0)
    model = TapeTransformer(vocab.size, seq_len=8, embed_dim=16, num_heads=1, dropout=0.0, backend="eager")
    sd = tmp_path / "notebook.pth"
    torch.save(model.state_dict(), sd)  # a bare state_dict: the vocabulary comes from the corpus
    rc = cli.main(["generate", str(sd), "--backend", "eager", "--max-new-tokens", "2", "--prompt", "a"])
    assert rc == 0, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# 1. a new run never destroys an earlier one


def test_a_new_run_refuses_an_earlier_run_at_its_path(tmp_path: Path, corpus: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    out, log = tmp_path / "a.ckpt", tmp_path / "a-logs" / "log.csv"
    assert cli.main(_args(corpus, out, steps=4)) == 0
    before = (out.read_bytes(), log.read_bytes())
    capsys.readouterr()
    rc = cli.main(_args(corpus, out, "--embed-dim", "32", steps=2))
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--out" in err and "--resume" in err and "--overwrite" in err
    assert (out.read_bytes(), log.read_bytes()) == before
    # --overwrite replaces it on purpose
    assert cli.main(_args(corpus, out, "--embed-dim", "32", "--overwrite", steps=2)) == 0
    assert load_checkpoint(out)["config"]["embed_dim"] == 32 and len(_csv_rows(log)) == 2


def test_a_run_failing_at_start_up_keeps_the_earlier_logs(tmp_path: Path, corpus: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    out, log = tmp_path / "a.ckpt", tmp_path / "a-logs" / "log.csv"
    train(_cfg(corpus, out, steps=4, log_dir=str(log.parent)))
    before = log.read_bytes()

    def crash(*a: Any, **kw: Any) -> Any:
        raise RuntimeError("the first step failed")

    monkeypatch.setattr(Stepper, "step", crash)
    for kw in ({"overwrite": True}, {"resume": True, "model": None}):  # a new run replacing it, a resume
        with pytest.raises(RuntimeError, match="first step failed"):
            train(_cfg(corpus, out, steps=6, log_dir=str(log.parent), **kw))
        assert log.read_bytes() == before  # not cut to its header
    monkeypatch.undo()
    train(_cfg(corpus, out, steps=6, resume=True, model=None, log_dir=str(log.parent)))
    assert [int(r["step"]) for r in _csv_rows(log)] == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------------------------
# 2. non-finite weights and losses


def _poisoned(tmp_path: Path, corpus: Path, value: float) -> Path:
    out = tmp_path / "run.ckpt"
    if not out.exists():
        train(_cfg(corpus, out))
    ck = load_checkpoint(out)
    ck["model"]["unembedding"].view(-1)[3] = value
    bad = tmp_path / f"bad-{value}.ckpt"
    torch.save(ck, bad)
    return bad


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("mode", [["--greedy"], ["--sample-seed", "1"], ["--greedy", "--int8"]])
def test_generate_refuses_non_finite_weights(tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture,
                                             value: float, mode: list[str]) -> None:
    bad = _poisoned(tmp_path, corpus, value)
    rc = cli.main(["generate", str(bad), "--backend", "eager", "--prompt", "to", "--max-new-tokens", "3", *mode])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and "Traceback" not in err
    assert err.count("\n") == 1 and "'unembedding'" in err and "non-finite" in err, err


def test_resume_refuses_non_finite_weights(tmp_path: Path, corpus: Path) -> None:
    bad = _poisoned(tmp_path, corpus, float("nan"))
    with pytest.raises(ValueError, match=r"bad-nan\.ckpt: tensor 'unembedding' holds non-finite"):
        train(_cfg(corpus, bad, steps=4, resume=True, model=None))


def test_generate_api_raises_on_non_finite_log_probs() -> None:
    from tapetransformer.generate import generate

    torch.manual_seed(0)
    m = TapeTransformer(11, seq_len=8, embed_dim=16, num_heads=1, dropout=0.0, backend="eager").eval()
    with torch.no_grad():
        m.unembedding.view(-1)[0] = float("nan")
    for kw in ({"greedy": True}, {"seed": 0}):
        with pytest.raises(ValueError, match="not finite"):
            generate(m, torch.tensor([1, 2]), 4, **kw)


def test_a_diverging_run_stops_keeping_the_last_good_checkpoint(tmp_path: Path, corpus: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture) -> None:
    real = Stepper.step
    calls = []

    def step(self: Stepper, *a: Any, **kw: Any) -> Any:
        calls.append(1)
        loss, attn = real(self, *a, **kw)
        return (loss * float("nan") if len(calls) >= 3 else loss), attn

    monkeypatch.setattr(Stepper, "step", step)
    out = tmp_path / "run.ckpt"
    rc = cli.main(_args(corpus, out, steps=8))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("tapetransformer")]
    assert rc == 1 and "Traceback" not in err and len(lines) == 1, err
    assert "nan at step 3" in lines[0] and "step 2" in lines[0], lines[0]
    assert len(calls) == 3  # stopped there, not run to the end
    assert load_checkpoint(out)["step"] == 2
    rows = _csv_rows(tmp_path / "run-logs" / "log.csv")
    assert [r["step"] for r in rows] == ["1", "2", "3"] and rows[-1]["loss"] == "nan"


# ---------------------------------------------------------------------------------------------
# 3. --resume keeps the run's settings


def test_resume_keeps_the_runs_settings_and_prints_overrides(tmp_path: Path, corpus: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run.ckpt"
    assert cli.main(["train", "--data", str(corpus), "--steps", "2", "--batch-size", "4", "--lr", "0.01",
                     "--grad-clip", "0.5", "--eval-every", "2", "--eval-batches", "1", "--seed", "3",
                     "--backend", "eager", "--out", str(out), *TINY]) == 0
    stored = load_checkpoint(out)["extra"]["train_config"]
    assert stored["batch_size"] == 4 and stored["lr"] == 0.01 and stored["grad_clip"] == 0.5
    assert stored["data"] == str(corpus.resolve()) and stored["eval_batches"] == 1 and stored["seed"] == 3
    capsys.readouterr()
    # no --data, --batch-size, --lr ...: the run's own; the defaults' values would differ
    assert cli.main(["train", "--steps", "4", "--backend", "eager", "--out", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "resume:" not in err
    again = load_checkpoint(out)["extra"]
    assert again["train_config"] == stored and again["plan"]["micro_batch"] == 4
    # a flag given explicitly wins, and is printed, even where it equals the default
    assert cli.main(["train", "--steps", "6", "--batch-size", "8", "--backend", "eager", "--out", str(out),
                     "--resume"]) == 0
    err = capsys.readouterr().err
    assert "resume: batch_size 8 instead of the run's 4" in err
    assert load_checkpoint(out)["extra"]["train_config"]["batch_size"] == 8


def test_api_resume_takes_the_runs_settings_for_fields_left_at_their_default(tmp_path: Path, corpus: Path) -> None:
    out = tmp_path / "run.ckpt"
    train(_cfg(corpus, out, batch_size=4, eval_batches=1))
    res = train(TrainConfig(steps=4, out=str(out), resume=True, progress=False, backend="eager"))
    assert res["plan"].micro_batch == 4
    assert load_checkpoint(out)["extra"]["train_config"]["data"] == str(corpus.resolve())
    res = train(TrainConfig(steps=6, out=str(out), resume=True, progress=False, backend="eager",
                            explicit=frozenset({"batch_size"})))  # explicitly the default, 8
    assert res["plan"].micro_batch == 8


def test_stored_settings_are_every_field_but_the_local_ones() -> None:
    from dataclasses import fields

    from tapetransformer.train.config import LOCAL_FIELDS, run_settings

    names = {f.name for f in fields(TrainConfig)}
    assert LOCAL_FIELDS <= names | {"threads", "progress_every_s"}
    assert set(run_settings(TrainConfig())) == names - LOCAL_FIELDS
    assert {"data", "batch_size", "lr", "optimizer", "grad_clip", "eval_every", "eval_batches", "seed"} <= set(
        run_settings(TrainConfig()))


# ---------------------------------------------------------------------------------------------
# 5. sizes that cannot fit, a full disk


@pytest.mark.parametrize("flags,field", [(["--embed-dim", "100000"], "--embed-dim"),
                                         (["--batch-size", "100000000"], "--batch-size")])
def test_impossible_sizes_are_refused_before_allocating(tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture,
                                                        flags: list[str], field: str) -> None:
    out = tmp_path / "run.ckpt"
    rc = cli.main(_args(corpus, out, *flags))
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"tapetransformer train: error: {field}:") and "needs about" in err and "available" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt"]  # no stray log.csv


def test_memory_check_formula() -> None:
    from tapetransformer.train.memory import FIT_MARGIN, MemoryEstimate, check_fits, step_bytes

    est = MemoryEstimate(fixed=1000, per_sample=100, per_sample_recompute=10)
    assert step_bytes(est, 8, 4) == (1000, 800, 16 * 8 * 4)
    assert step_bytes(est, 8, 4, micro_batch=2, recompute=True) == (1000, 20, 16 * 8 * 4)
    need = sum(step_bytes(est, 8, 4))
    cpu = torch.device("cpu")
    assert check_fits(est, 8, 4, cpu, available=int(need / FIT_MARGIN)) is None
    assert check_fits(est, 8, 4, cpu, available=int(need / FIT_MARGIN) - 1) == step_bytes(est, 8, 4)


def test_full_disk_gets_one_line_naming_the_path(tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    import errno

    out = tmp_path / "run.ckpt"

    def full(*a: Any, **kw: Any) -> Any:  # torch.save on a full disk raises a RuntimeError, not an OSError
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0: PytorchStreamWriter "
                           "failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    rc = cli.main(_args(corpus, out, steps=2))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("tapetransformer")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert f"cannot write {out}: the write failed; is the disk full?" in lines[0]
    monkeypatch.undo()

    from tapetransformer.train import logs

    class FullFile:
        def __init__(self, f: Any) -> None:
            self.f = f

        def write(self, s: str) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self) -> None:
            pass

        def close(self) -> None:
            self.f.close()

    real_open = logs.RunLog._open

    def open_full(self: Any) -> None:
        real_open(self)
        self._files = [FullFile(f) for f in self._files]
        self._writers = [csv.DictWriter(f, fieldnames=logs.FIELDS, restval="", extrasaction="ignore")
                         for f in self._files]

    monkeypatch.setattr(logs.RunLog, "_open", open_full)
    rc = cli.main(_args(corpus, tmp_path / "b.ckpt", steps=2))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("tapetransformer")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert f"cannot write {tmp_path / 'b-logs' / 'log.csv'}: No space left on device" in lines[0]


# ---------------------------------------------------------------------------------------------
# 7. progress when stderr is not a terminal


def test_progress_to_a_file_is_a_few_plain_lines(tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(_args(corpus, tmp_path / "a.ckpt", steps=6)) == 0  # capsys: stderr is not a TTY
    err = capsys.readouterr().err
    assert "\r" not in err and "it/s" not in err
    steps = [ln for ln in err.splitlines() if ln.startswith("train: step")]
    assert steps == [s for s in steps if "loss=" in s] and len(steps) == 1 and steps[0].startswith("train: step 6/6")
    assert cli.main(_args(corpus, tmp_path / "b.ckpt", "--progress-every", "0", steps=6)) == 0
    assert len([ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("train: step")]) == 6
    assert cli.main(_args(corpus, tmp_path / "c.ckpt", "--quiet", steps=6)) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.startswith("step 6:")


# ---------------------------------------------------------------------------------------------
# 8. --threads, a noise-robust --compile auto


def test_threads_flag_sets_torch_threads(tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    real = torch.set_num_threads

    def record(n: int) -> None:
        seen.append(n)
        real(n)

    monkeypatch.setattr(torch, "set_num_threads", record)
    before = torch.get_num_threads()
    out = tmp_path / "a.ckpt"
    assert cli.main(_args(corpus, out, "--threads", "1", "--quiet", steps=2)) == 0
    assert seen == [1, before] and torch.get_num_threads() == before  # restored after the run
    seen.clear()
    try:
        assert cli.main(["generate", str(out), "--backend", "eager", "--prompt", "to", "--max-new-tokens", "2",
                         "--threads", "1", "--quiet"]) == 0
        assert seen == [1]
    finally:
        real(before)


def test_compile_auto_decides_from_the_median_of_several_steps(tmp_path: Path, corpus: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from tapetransformer.train import config, loop

    # one step slowed by another process (5 s among 10 ms steps) must not buy a 55 s compile
    assert not config.compile_pays([0.01, 0.01, 5.0, 0.01, 0.01], 100, warm=False)
    assert config.compile_pays([2.0, 2.1, 1.9, 2.0, 2.0], 200, warm=False)
    assert config.compile_pays([0.5] * 5, 100, warm=True) and not config.compile_pays([0.5] * 5, 100, warm=False)
    seen: list[tuple[list[float], int]] = []

    def record(times: list[float], remaining: int, warm: bool) -> bool:
        seen.append((list(times), remaining))
        return False

    monkeypatch.setattr(loop, "compile_pays", record)
    train(_cfg(corpus, tmp_path / "a.ckpt", steps=10, eval_every=10, compile="auto"))
    assert len(seen) == 1 and len(seen[0][0]) == config.COMPILE_AUTO_PROBE_STEPS == 5 and seen[0][1] == 4


# ---------------------------------------------------------------------------------------------
# 4. an eval-mode forward uses the int8 weights with or without autograd


def test_eval_forward_uses_int8_weights_with_and_without_no_grad() -> None:
    from tapetransformer import quantize_int8

    torch.manual_seed(0)
    m = TapeTransformer(11, seq_len=8, embed_dim=16, num_heads=1, dropout=0.0, backend="eager").eval()
    q = quantize_int8(m, act_quant=False)
    x = torch.randint(0, 11, (2, 8))
    with torch.no_grad():
        ref_q, _ = q(x)
        ref_f, _ = m(x)
    got, _ = q(x)  # autograd on
    assert torch.equal(got.detach(), ref_q)
    assert not torch.equal(ref_q, ref_f)  # the int8 weights do change the output
    # training mode with autograd trains the float weights
    q.train()
    logp, _, _ = q(x)
    with torch.no_grad():
        assert torch.allclose(logp, m.train()(x)[0])
