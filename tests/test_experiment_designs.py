"""benchmarks/experiment_designs.py on its tiny config: the JSON it writes, that every model trained,
the parameter counts (total and reaching the output), the control's size and causality, the plot
and the Markdown summary. Seconds on a CPU; the corpus is CPython's embedded pydoc topics."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import experiment_designs as ed  # noqa: E402

from tapetransformer.data import load_text  # noqa: E402

RUN_KEYS = {"seed", "train_loss", "curve", "train_wall_s", "eval_wall_s", "steps_per_s", "final_val_bpc",
            "final_eval_s", "sample"}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("exp")
    assert ed.main(["--config", "tiny", "--data", "embedded", "--out-dir", str(out), "--quiet"]) == 0
    return json.loads((out / "experiment-designs-embedded.json").read_text()), str(out)


def test_json_schema(results: tuple[dict, str]) -> None:
    r, _ = results
    cfg = ed.CONFIGS["tiny"]
    assert r["schema"] == ed.SCHEMA and r["corpus"] == "embedded" and r["seeds"] == [0]
    assert r["config"]["steps"] == cfg.steps and r["tokens_per_model"] == cfg.steps * cfg.batch_size * cfg.seq_len
    assert r["validation"]["curve_windows"] == cfg.curve_windows
    assert r["validation"]["final_windows"] == cfg.final_windows
    assert r["validation"]["windows_total"] == (r["validation"]["val_chars"] - 1) // cfg.seq_len
    assert list(r["models"]) == ["reference", "seed", "control-seed", "control-reference"]
    for e in r["models"].values():
        assert {"label", "runs", "parameters", "shape", "final_val_bpc_mean"} <= set(e)
        (run,) = e["runs"]
        assert set(run) == RUN_KEYS
        assert len(run["train_loss"]) == cfg.steps
        assert [p["step"] for p in run["curve"]] == [0, 4, 8]
        assert len(run["sample"]) == cfg.sample_chars


def test_every_model_trained(results: tuple[dict, str]) -> None:
    r, _ = results
    for name, e in r["models"].items():
        (run,) = e["runs"]
        curve = [p["val_bpc"] for p in run["curve"]]
        assert all(torch.isfinite(torch.tensor(curve))), name
        # 8 steps at lr 1e-2 take every model well below its untrained loss (~log2(V) = 6.7 bpc)
        assert curve[-1] < curve[0] - 0.5, (name, curve)
        assert run["train_loss"][-1] < run["train_loss"][0], name
        assert 0 < run["final_val_bpc"] < curve[0], name


def test_parameter_counts(results: tuple[dict, str]) -> None:
    r, _ = results
    m = r["models"]
    ref, seed = m["reference"]["parameters"], m["seed"]["parameters"]
    assert ref["total"] == seed["total"]  # one module tree, two dataflows
    cfg, vocab = ed.CONFIGS["tiny"], r["vocab_size"]
    model = ed.build_tape("seed", vocab, cfg, "eager")
    unused = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("embed_ln.", "norm_gate")))
    assert seed["reach_output"] == seed["total"] - unused
    assert seed["not_reaching"] == ["embed_ln", "norm_gate"]
    # the reference: embedding, coda, last critic, unembedding only
    live = ("holistic_embed.", "codahead.", f"residualheads.{cfg.num_critics - 1}.", "unembedding")
    assert ref["reach_output"] == sum(p.numel() for n, p in model.named_parameters() if n.startswith(live))
    assert "prophet" in ref["not_reaching"] and "residualheads.0" in ref["not_reaching"]
    for ctl, target in (("control-seed", seed), ("control-reference", ref)):
        p = m[ctl]["parameters"]
        assert p["total"] == p["reach_output"] and not p["not_reaching"]
        assert abs(p["total"] - target["reach_output"]) <= 0.02 * target["reach_output"], ctl


def test_count_disagreeing_with_structure_raises() -> None:
    cfg = ed.CONFIGS["tiny"]
    model = ed.build_tape("reference", 20, cfg, "eager")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 20, (2, cfg.seq_len), generator=g), torch.randint(0, 20, (2, cfg.seq_len), generator=g)
    assert ed.count_parameters("reference", model, x, y, cfg.num_critics)["reach_output"] > 0
    with pytest.raises(RuntimeError, match="disagree"):
        ed.count_parameters("seed", model, x, y, cfg.num_critics)  # the reference's dead critic is not the seed's


@pytest.mark.parametrize("target,d", [(67_808, 32), (1_820_736, 128), (15_000_000, 512)])
def test_control_sizing_matches_its_count(target: int, d: int) -> None:
    layers, d_ff = ed.size_control(target, 65, 64, d)
    model = ed.PlainTransformer(65, 64, d, layers, 4, d_ff)
    n = sum(p.numel() for p in model.parameters())
    assert n == ed.control_count(65, 64, d, layers, d_ff)
    assert abs(n - target) <= 0.01 * target


def test_control_is_causal() -> None:
    torch.manual_seed(0)
    model = ed.PlainTransformer(11, 12, 16, 2, 2, 32)
    x = torch.randint(0, 11, (2, 12))
    x2 = x.clone()
    x2[:, 7:] = (x2[:, 7:] + 1) % 11
    a, b = model(x), model(x2)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])
    torch.testing.assert_close(a.exp().sum(-1), torch.ones(2, 12))


def test_validation_windows_cover_the_split() -> None:
    ds = ed.CharDataset(load_text(None))
    x, y = ed.val_windows(ds, 64)
    assert x.shape == y.shape == ((len(ds.val) - 1) // 64, 64)
    assert torch.equal(x.reshape(-1)[1:], y.reshape(-1)[:-1])
    assert torch.equal(x[0], ds.val[:64])


def test_plot_and_summary(results: tuple[dict, str]) -> None:
    from PIL import Image

    _, out = results
    with Image.open(os.path.join(out, "experiment-designs-embedded.png")) as img:
        assert img.size == (760, 440)
        assert len(img.convert("RGB").getcolors(1 << 20)) > 10  # drawn, not blank
    assert ed.main(["--summarize", "--out-dir", out]) == 0
    md = open(os.path.join(out, "experiment-designs.md"), encoding="utf-8").read()
    for label in ed.LABELS.values():
        assert label in md
    assert "experiment-designs-embedded.png" in md
    # the hand-written reading between the notes markers survives a regeneration
    path = os.path.join(out, "experiment-designs.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(md.replace(ed.NOTES_BEGIN, ed.NOTES_BEGIN + "\nThe seed design wins here.\n"))
    assert ed.main(["--summarize", "--out-dir", out]) == 0
    again = open(path, encoding="utf-8").read()
    assert "The seed design wins here." in again and again.count(ed.NOTES_BEGIN) == 1


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="control_match"):
        ed.models_for("neither")
    with pytest.raises(SystemExit):
        ed.main(["--config", "tiny", "--steps", "3", "--tokens", "1000"])


def test_merge_adds_seeds(results: tuple[dict, str], tmp_path) -> None:
    r, out = results
    (tmp_path / "experiment-designs-embedded.json").write_text(json.dumps(r))
    args = ["--config", "tiny", "--out-dir", str(tmp_path), "--quiet", "--merge", "--models", "control-reference",
            "--seeds", "1"]
    assert ed.main(args) == 0
    m = json.loads((tmp_path / "experiment-designs-embedded.json").read_text())
    assert m["seeds"] == [0, 1] and list(m["models"]) == list(r["models"])
    runs = m["models"]["control-reference"]["runs"]
    assert [x["seed"] for x in runs] == [0, 1]
    assert runs[0] == r["models"]["control-reference"]["runs"][0]
    assert runs[1]["train_loss"] != runs[0]["train_loss"]  # another seed, another run
    finals = [x["final_val_bpc"] for x in runs]
    assert m["models"]["control-reference"]["final_val_bpc_mean"] == pytest.approx(sum(finals) / 2)
    assert m["models"]["seed"] == r["models"]["seed"]
    with pytest.raises(ValueError, match="another config"):
        ed.main(args[:-2] + ["--seeds", "2", "--steps", "4"])
    # --combine: the same merge from two files (runs made by separate processes)
    extra = dict(m, seeds=[1], models={"control-reference": dict(m["models"]["control-reference"], runs=runs[1:])})
    base_p, extra_p = tmp_path / "base.json", tmp_path / "extra.json"
    base_p.write_text(json.dumps(r))
    extra_p.write_text(json.dumps(extra))
    assert ed.main(["--combine", str(base_p), str(extra_p)]) == 0
    assert json.loads(base_p.read_text()) == m
    assert (tmp_path / "base.png").is_file()
    extra_p.write_text(json.dumps(dict(extra, config=dict(extra["config"], lr=0.5))))
    with pytest.raises(ValueError, match="different config"):
        ed.main(["--combine", str(base_p), str(extra_p)])
