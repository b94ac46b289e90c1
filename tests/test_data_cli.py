"""Data, checkpoints, training loop and CLI of the model package (tiny sizes: these run eagerly on CPU)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tapetransformer import cli
from tapetransformer.checkpoint import ModelConfig, atomic_save, load_checkpoint, save_checkpoint
from tapetransformer.data import CharDataset, CharVocab, download_tiny_shakespeare, embedded_corpus, load_text
from tapetransformer.reference import ReferenceTapeTransformer
from tapetransformer.sampling import pick_next, sample_reference
from tapetransformer.train import TrainConfig, train

TINY = ModelConfig(vocab_size=0, seq_len=8, embed_dim=16, num_heads=1)


def test_embedded_corpus_is_large_english_and_deterministic() -> None:
    text = embedded_corpus()
    assert len(text) > 400_000
    assert text == embedded_corpus()
    assert "the" in text and "lambda" in text


def test_vocab_round_trip_and_errors() -> None:
    v = CharVocab.from_text("hello world")
    assert v.chars == " dehlorw"
    assert v.decode(v.encode("world")) == "world"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        v.encode("hello!")
    with pytest.raises(ValueError, match="out of range"):
        v.decode([0, v.size])
    with pytest.raises(ValueError, match="distinct"):
        CharVocab("aa")


def test_dataset_split_and_batches() -> None:
    ds = CharDataset("abcdefghij" * 100, val_fraction=0.1)
    assert len(ds.train) == 900 and len(ds.val) == 100
    g = torch.Generator().manual_seed(0)
    x, y = ds.get_batch("train", 4, 16, g)
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ValueError, match="split"):
        ds.get_batch("test", 1, 4)
    with pytest.raises(ValueError, match="at least"):
        ds.get_batch("val", 1, 200)


def test_download_helper_offline_with_local_file(tmp_path: Path) -> None:
    src = tmp_path / "src.txt"
    src.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n", encoding="utf-8")
    cache = tmp_path / "cache"
    path = download_tiny_shakespeare(cache, url=src.as_uri())
    assert path.read_text(encoding="utf-8") == src.read_text(encoding="utf-8")
    # cached: a second call does not touch the URL
    assert download_tiny_shakespeare(cache, url="file:///nonexistent/never-read") == path
    assert not [p for p in cache.iterdir() if p.name.startswith(".download-")]


def test_download_failure_leaves_no_partial_file(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        download_tiny_shakespeare(tmp_path, url=(tmp_path / "missing.txt").as_uri())
    assert list(tmp_path.iterdir()) == []


def test_load_text_from_file_and_errors(tmp_path: Path) -> None:
    p = tmp_path / "c.txt"
    p.write_text("some text", encoding="utf-8")
    assert load_text(str(p)) == "some text"
    with pytest.raises(FileNotFoundError):
        load_text(str(tmp_path / "nope.txt"))


def tiny_model(vocab: int = 11) -> ReferenceTapeTransformer:
    torch.manual_seed(0)
    return ReferenceTapeTransformer(vocab, seq_len=8, embed_dim=16, num_heads=1, dropout=0.0)


def test_checkpoint_round_trip_is_weights_only(tmp_path: Path) -> None:
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters())
    cfg = ModelConfig(vocab_size=11, seq_len=8, embed_dim=16, num_heads=1)
    path = save_checkpoint(tmp_path / "m.ckpt", model=model, config=cfg, vocab="abcdefghijk", optimizer=opt, step=7)
    ck = load_checkpoint(path)
    assert ck["step"] == 7 and ck["vocab"] == "abcdefghijk" and ck["config"]["embed_dim"] == 16
    again = tiny_model()
    again.load_state_dict(ck["model"], strict=True)
    assert list(tmp_path.iterdir()) == [path]  # no temp files left


def test_checkpoint_refuses_pickled_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo should-never-run",))

    path = tmp_path / "evil.ckpt"
    torch.save({"format": "tapetransformer-v1", "x": Evil()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        load_checkpoint(path)


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path: Path) -> None:
    path = tmp_path / "a.pt"
    atomic_save({"v": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom mid-write")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"v": torch.zeros(2), "bad": Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]


def test_bare_notebook_state_dict_loads_with_inferred_config(tmp_path: Path, golden: dict) -> None:
    path = tmp_path / "model_dict.pth"
    torch.save(golden["state_dict"], path)
    ck = load_checkpoint(path)
    assert ck["config"] == {"vocab_size": 37, "seq_len": 16, "embed_dim": 32, "num_heads": 2, "dropout": 0.0,
                            "design": "reference",
                            "causal": False}
    model = ReferenceTapeTransformer(37, seq_len=16, embed_dim=32, num_heads=2).double()
    model.load_state_dict(ck["model"], strict=True)


def test_pick_next() -> None:
    logp = torch.log_softmax(torch.tensor([[0.0, 5.0, 1.0, -2.0]]), dim=-1)
    assert pick_next(logp, greedy=True).tolist() == [1]
    g = torch.Generator().manual_seed(0)
    draws = {pick_next(logp, top_k=1, generator=g).item() for _ in range(20)}
    assert draws == {1}
    draws = {pick_next(logp, top_k=2, temperature=5.0, generator=g).item() for _ in range(200)}
    assert draws == {1, 2}
    with pytest.raises(ValueError, match="temperature"):
        pick_next(logp, temperature=0.0)


def test_sample_reference_greedy_matches_manual_cached_loop() -> None:
    model = tiny_model().eval()
    prompt = torch.tensor([[1, 2, 3]])
    toks, _ = sample_reference(model, prompt, 4, greedy=True)
    with torch.no_grad():
        logp, cache = model(prompt)
        seq = prompt
        for _ in range(4):
            nxt = logp[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            logp, cache = model(nxt, past_kv=cache)
    assert torch.equal(toks, seq)


def tiny_train_cfg(tmp_path: Path, corpus: Path, steps: int, resume: bool = False, **kw) -> TrainConfig:
    return TrainConfig(data=str(corpus), steps=steps, batch_size=2, lr=1e-2, eval_every=2, eval_batches=1,
                       out=str(tmp_path / "run.ckpt"), resume=resume, seed=3, model=ModelConfig(**TINY.to_dict()),
                       progress=False, backend="eager", **kw)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text(("to be or not to be, that is the question. " * 20), encoding="utf-8")
    return p


def test_train_resume_is_bit_for_bit(tmp_path: Path, corpus: Path) -> None:
    # a constant rate: a cosine schedule's horizon is the target step count, which this resume extends
    kw = dict(lr_schedule="constant", warmup_steps=0)
    full = train(tiny_train_cfg(tmp_path / "a", corpus, steps=4, **kw))
    train(tiny_train_cfg(tmp_path / "b", corpus, steps=2, **kw))
    resumed = train(tiny_train_cfg(tmp_path / "b", corpus, steps=4, resume=True, **kw))
    for (k, a), b in zip(full["model"].state_dict().items(), resumed["model"].state_dict().values()):
        assert torch.equal(a, b), k
    assert full["train_loss"] == resumed["train_loss"]


def test_cli_train_generate_and_errors(tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture) -> None:
    ck = tmp_path / "cli.ckpt"
    rc = cli.main(["train", "--data", str(corpus), "--steps", "2", "--batch-size", "2", "--eval-every", "2",
                   "--seq-len", "8", "--embed-dim", "16", "--num-heads", "1", "--out", str(ck), "--backend", "eager"])
    assert rc == 0 and ck.is_file()
    assert "train loss" in capsys.readouterr().out
    rc = cli.main(["generate", str(ck), "--prompt", "to be", "--max-new-tokens", "5", "--sample-seed", "1",
                   "--backend", "eager"])
    out = capsys.readouterr()
    assert rc == 0 and out.out.startswith("to be") and len(out.out.rstrip("\n")) == len("to be") + 5
    assert "ms/token" in out.err
    rc = cli.main(["generate", str(ck), "--prompt", "to", "--max-new-tokens", "3", "--int8", "--greedy",
                   "--backend", "eager"])
    out = capsys.readouterr()
    assert rc == 0 and "int8" in out.err and len(out.out.rstrip("\n")) == 5
    rc = cli.main(["generate", str(ck), "--prompt", "to", "--max-new-tokens", "2", "--cuda-graph"])
    assert rc == 2 and "--cuda-graph: needs --device cuda" in capsys.readouterr().err
    rc = cli.main(["generate", str(ck), "--prompt", "QQQ", "--max-new-tokens", "2", "--backend", "eager"])
    assert rc == 2 and "not in the vocabulary" in capsys.readouterr().err
    rc = cli.main(["generate", str(tmp_path / "none.ckpt")])
    assert rc == 2 and "no checkpoint" in capsys.readouterr().err


def test_cli_demo_trains_then_samples(tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture) -> None:
    rc = cli.main(["demo", "--data", str(corpus), "--steps", "2", "--eval-every", "2", "--seq-len", "8",
                   "--embed-dim", "16", "--batch-size", "2", "--max-new-tokens", "4", "--out", str(tmp_path / "d.ckpt"),
                   "--backend", "eager", "--log-dir", "none", "--prompt", "to "])
    out = capsys.readouterr().out
    assert rc == 0
    assert "causal semantics" in out and "val loss" in out
    assert out.rstrip("\n").splitlines()[-1].startswith("to ")
