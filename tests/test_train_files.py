"""Nothing lost: logs written as training goes and continued by ``--resume``, Ctrl-C (SIGINT) and
SIGKILL mid-run, a crash during a save, stray temp files, the user's umask; and the CLI's defaults,
help, progress bar and warnings. Tiny models (seq_len 8, embed_dim 16, eager ops): seconds each,
the subprocess cases (SIGINT, SIGKILL) ~10 s each on a loaded CPU."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tape_kernels
import tapetransformer
from tapetransformer import cli
from tapetransformer.checkpoint import load_checkpoint
from tapetransformer.fileio import temp_path
from tapetransformer.train import TrainConfig, train

CORPUS = "to be or not to be, that is the question. " * 20
TINY = ["--seq-len", "8", "--embed-dim", "16", "--num-heads", "1"]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text(CORPUS, encoding="utf-8")
    return p


def _args(corpus: Path, out: Path, *extra: str, steps: int = 4) -> list[str]:
    return ["train", "--data", str(corpus), "--steps", str(steps), "--batch-size", "2", "--eval-every", "2",
            "--eval-batches", "1", "--backend", "eager", "--out", str(out), *TINY, *extra]


def _csv_steps(path: Path) -> list[int]:
    with open(path, newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def _strays(d: Path) -> list[str]:
    return sorted(p.name for p in d.rglob(".*") if p.is_file())


# ---------------------------------------------------------------------------------------------
# logs as training goes, and --resume continuing them


def test_resume_continues_the_same_log_and_plot(tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture) -> None:
    out, logs = tmp_path / "run.ckpt", tmp_path / "run-logs"
    assert cli.main(_args(corpus, out, steps=4)) == 0
    first = (logs / "log.csv").read_text()
    assert _csv_steps(logs / "log.csv") == [1, 2, 3, 4]
    # a run killed after its step-4 checkpoint had logged step 5: the resumed run redoes it, once
    with open(logs / "log.csv", "a") as f:
        f.write("5,9.9,1.0,1.0,\n6,9.9")  # and a row torn by the kill
    assert cli.main(_args(corpus, out, "--resume", steps=6)) == 0
    capsys.readouterr()
    assert (logs / "log.csv").read_text().startswith(first)
    with open(logs / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6] and all(float(r["loss"]) != 9.9 for r in rows)
    summary = json.loads((logs / "log.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 6
    assert [r["step"] for r in summary["log"]] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in summary["log"] if r.get("val_loss") is not None] == [2, 4, 6]
    assert (logs / "loss.png").stat().st_size > 0 and load_checkpoint(out)["step"] == 6
    assert _strays(tmp_path) == []


def test_a_crash_keeps_checkpoint_log_and_plot(tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    """A failing save (a full disk at the step-4 checkpoint): one line, the step-2 checkpoint and its
    log.json/loss.png intact, log.csv with every finished step, no temp file."""
    out, logs = tmp_path / "run.ckpt", tmp_path / "run-logs"
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", failing_save)
    rc = cli.main(_args(corpus, out, steps=6))
    err = capsys.readouterr().err
    assert rc == 2 and "No space left on device" in err and "Traceback" not in err
    assert load_checkpoint(out)["step"] == 2
    assert _csv_steps(logs / "log.csv") == [1, 2, 3, 4]
    assert json.loads((logs / "log.json").read_text())["step"] == 2
    assert (logs / "loss.png").is_file()
    assert _strays(tmp_path) == []


def test_stale_temp_files_are_removed_and_files_follow_the_umask(tmp_path: Path, corpus: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    out, logs, viz = tmp_path / "run.ckpt", tmp_path / "logs", tmp_path / "viz"
    logs.mkdir()
    viz.mkdir()
    # left behind by a SIGKILL mid-save: this version's fixed temp names and older mkstemp ones
    orphans = [temp_path(out), tmp_path / ".run.ckpt.k3j9_x2a.tmp", temp_path(logs / "log.json"),
               temp_path(logs / "loss.png"), temp_path(viz / "train.gif"), viz / ".train.gif.abcd1234.gif"]
    for p in orphans:
        p.write_bytes(b"torn")
    keep = tmp_path / ".run.ckpt.notes"  # not a temp name: left alone
    keep.write_text("mine")
    old = os.umask(0o027)
    try:
        assert cli.main(_args(corpus, out, "--log-dir", str(logs), "--log-csv", str(tmp_path / "extra.csv"),
                              "--viz", str(viz), "--viz-every", "2")) == 0
    finally:
        os.umask(old)
    capsys.readouterr()
    assert not any(p.exists() for p in orphans) and keep.read_text() == "mine"
    made = [out, logs / "log.csv", logs / "log.json", logs / "loss.png", tmp_path / "extra.csv",
            viz / "train.gif", viz / "frame_000002.png"]
    for p in made:
        assert p.stat().st_mode & 0o777 == 0o640, p  # 0o666 minus the umask, not mkstemp's 0o600
    assert _csv_steps(tmp_path / "extra.csv") == [1, 2, 3, 4]


def test_logs_disabled_and_the_returned_history(tmp_path: Path, corpus: Path) -> None:
    cfg = TrainConfig(data=str(corpus), steps=3, batch_size=2, eval_every=0, out=str(tmp_path / "m.ckpt"),
                      progress=False, backend="eager", model={"seq_len": 8, "embed_dim": 16, "num_heads": 1})
    res = train(cfg)
    assert [r["step"] for r in res["log"]] == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "m.ckpt"]
    assert cfg.model == {"seq_len": 8, "embed_dim": 16, "num_heads": 1} and cfg.device == "cpu"  # not mutated


# ---------------------------------------------------------------------------------------------
# SIGINT and SIGKILL (subprocesses)


def _env() -> dict[str, str]:
    roots = [str(Path(tapetransformer.__file__).parents[1]), str(Path(tape_kernels.__file__).parents[1])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(roots + [os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tapetransformer.cli", *args], env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_rows(proc: subprocess.Popen, csv_path: Path, rows: int, timeout: float = 240.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.communicate()}")
        if csv_path.is_file() and len(_csv_steps(csv_path)) >= rows:
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("training did not start in time")


def test_sigint_checkpoints_writes_logs_and_exits_130(tmp_path: Path, corpus: Path) -> None:
    out, logs = tmp_path / "run.ckpt", tmp_path / "run-logs"
    proc = _start(_args(corpus, out, "--eval-every", "1000", steps=100_000))
    _wait_rows(proc, logs / "log.csv", 3)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("tapetransformer train: interrupted at step ") and "--resume" in last
    step = int(last.split("interrupted at step ")[1].split()[0])
    assert load_checkpoint(out)["step"] == step >= 3
    assert _csv_steps(logs / "log.csv") == list(range(1, step + 1))
    summary = json.loads((logs / "log.json").read_text())
    assert summary["status"] == "interrupted" and summary["step"] == step
    assert (logs / "loss.png").is_file() and _strays(tmp_path) == []
    assert cli.main(_args(corpus, out, "--resume", "--eval-every", "1000", steps=step + 1)) == 0
    assert _csv_steps(logs / "log.csv") == list(range(1, step + 2))


def test_sigkill_keeps_checkpoint_log_and_plot(tmp_path: Path, corpus: Path) -> None:
    out, logs = tmp_path / "run.ckpt", tmp_path / "run-logs"
    proc = _start(_args(corpus, out, "--eval-every", "2", steps=100_000))
    _wait_rows(proc, logs / "log.csv", 5)
    proc.kill()
    proc.communicate(timeout=60)
    step = load_checkpoint(out)["step"]
    logged = _csv_steps(logs / "log.csv")
    assert step >= 4 and step % 2 == 0 and logged[:step] == list(range(1, step + 1))
    # log.json is rewritten right after each checkpoint: a kill that lands between the two writes leaves
    # it one checkpoint (2 steps) behind, never ahead; log.csv above holds every step either way.
    assert json.loads((logs / "log.json").read_text())["step"] in (step, step - 2)
    assert (logs / "loss.png").is_file()
    temp_path(out).write_bytes(b"torn")  # as a kill in the middle of a save leaves it
    assert cli.main(_args(corpus, out, "--resume", "--eval-every", "2", steps=step + 2)) == 0
    assert _csv_steps(logs / "log.csv") == list(range(1, step + 3))
    assert _strays(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# defaults, help, progress, warnings, plots


def test_train_defaults_to_causal_semantics(tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture) -> None:
    for flag, want in (([], True), (["--causal"], True), (["--reference-semantics"], False)):
        out = tmp_path / f"m{len(flag)}{want}.ckpt"
        assert cli.main(_args(corpus, out, *flag, "--log-dir", "none", steps=2)) == 0
        assert load_checkpoint(out)["config"]["causal"] is want
    assert TrainConfig().model is None  # the API's default: DEFAULT_MODEL, causal
    capsys.readouterr()


def test_generate_warns_once_about_reference_semantics(tmp_path: Path, corpus: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    ref, causal = tmp_path / "ref.ckpt", tmp_path / "causal.ckpt"
    assert cli.main(_args(corpus, ref, "--reference-semantics", "--log-dir", "none", steps=2)) == 0
    assert cli.main(_args(corpus, causal, "--log-dir", "none", steps=2)) == 0
    capsys.readouterr()
    gen = ["--backend", "eager", "--max-new-tokens", "3", "--prompt", "to"]
    assert cli.main(["generate", str(ref), *gen]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "reference semantics" in err and "not meaningful" in err
    assert cli.main(["generate", str(causal), *gen]) == 0
    assert "warning" not in capsys.readouterr().err


def test_progress_shows_val_only_after_an_evaluation(tmp_path: Path, corpus: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    base = dict(data=str(corpus), batch_size=2, eval_batches=1, backend="eager", progress=True,
                progress_every_s=0.0, model={"seq_len": 8, "embed_dim": 16, "num_heads": 1})
    train(TrainConfig(steps=3, eval_every=2, out=str(tmp_path / "a.ckpt"), **base))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("train: step")]
    assert len(lines) == 3 and "loss=" in lines[0] and "val=" not in lines[0]
    assert "val=" in lines[1] and "val=nan" not in lines[1]


@pytest.mark.parametrize("cmd", ["train", "generate", "demo"])
def test_help_has_a_line_and_a_default_for_every_flag(cmd: str) -> None:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "cmd").choices[cmd]
    fmt = sub._get_formatter()
    for action in sub._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, action.option_strings
        assert "default" in fmt._get_help_string(action), action.option_strings
    text = " ".join(sub.format_help().split())
    assert "cpu, cuda or cuda:N (default: cpu)" in text
    if cmd != "generate":
        assert "(default: {})".format({"train": 8, "demo": 16}[cmd]) in text  # --batch-size


def test_offline_download_names_the_url_and_the_way_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    import urllib.error
    import urllib.request

    from tapetransformer import data

    def offline(url, timeout=None):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setattr(data, "DEFAULT_CACHE_DIR", tmp_path / "cache")
    rc = cli.main(["train", "--data", "shakespeare", "--steps", "1", "--out", str(tmp_path / "x.ckpt"), *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert data.TINY_SHAKESPEARE_URL in err and "--data FILE" in err
    assert not (tmp_path / "x.ckpt").exists() and not any((tmp_path / "cache").glob("*"))


def test_loss_png_has_axis_titles(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    import numpy as np
    from PIL import Image

    from tapetransformer.viz import PLOT_BOTTOM, PLOT_LEFT, plot_loss_curve

    rows = [{"step": i, "loss": 3.0 / i} for i in range(1, 21)]
    labelled = np.asarray(Image.open(plot_loss_curve(rows, tmp_path / "a.png")).convert("L"))
    bare = np.asarray(Image.open(plot_loss_curve(rows, tmp_path / "b.png", xlabel="", ylabel="")).convert("L"))
    h = labelled.shape[0]
    y_title = (slice(PLOT_BOTTOM, h - PLOT_BOTTOM), slice(0, 16))  # left of the tick labels
    x_title = (slice(h - 18, h), slice(PLOT_LEFT, None))  # below the tick labels
    for region in (y_title, x_title):
        assert (labelled[region] < 128).sum() > 30 and (bare[region] < 128).sum() == 0
