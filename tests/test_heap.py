"""``tapetransformer.train.heap``: glibc's malloc thresholds for CPU training, applied by ``train`` on a
CPU run unless ``keep_heap=False`` (``--no-keep-heap``)."""

from __future__ import annotations

import ctypes.util
import subprocess
import sys
from pathlib import Path

import pytest

from tapetransformer import cli
from tapetransformer.checkpoint import ModelConfig
from tapetransformer.train import TrainConfig, train
from tapetransformer.train import heap as heap_mod
from tapetransformer.train import loop as loop_mod

GLIBC = sys.platform.startswith("linux") and heap_mod._glibc() is not None


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_thresholds_are_set_once_in_a_fresh_process() -> None:
    code = ("from tapetransformer.train import heap; a = heap.keep_freed_memory(); b = heap.keep_freed_memory(); "
            "print(a, b, heap._applied)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "True"]


def test_nothing_happens_off_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap_mod, "_applied", None)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert heap_mod._glibc() is None and heap_mod.keep_freed_memory() is False
    monkeypatch.setattr(heap_mod, "_applied", None)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert heap_mod.keep_freed_memory() is False


@pytest.mark.parametrize("keep", [True, False])
def test_train_applies_it_on_cpu_unless_told_not_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep: bool
) -> None:
    calls: list[bool] = []
    monkeypatch.setattr(loop_mod, "keep_freed_memory", lambda: calls.append(True) or True)
    corpus = tmp_path / "c.txt"
    corpus.write_text("to be or not to be, that is the question. " * 20, encoding="utf-8")
    model = ModelConfig(vocab_size=0, seq_len=8, embed_dim=16, num_heads=1, dropout=0.0)
    res = train(TrainConfig(data=str(corpus), steps=1, batch_size=2, eval_every=0, eval_batches=1, model=model,
                            out=str(tmp_path / "m.ckpt"), progress=False, backend="eager", keep_heap=keep))  # fmt: skip
    assert res["step"] == 1
    assert calls == ([True] if keep else [])


def test_keep_heap_must_be_a_bool_and_the_flag_turns_it_off(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="keep_heap must be a bool"):
        train(TrainConfig(data="embedded", steps=1, out=str(tmp_path / "m.ckpt"), keep_heap="no"))
    parser = cli.build_parser()
    assert cli._train_config(parser.parse_args(["train", "--no-keep-heap"])).keep_heap is False
    assert cli._train_config(parser.parse_args(["train"])).keep_heap is True
