"""benchmarks/experiment_designs.py (experiment v2) on its tiny config: the whole plan (sweep, seeds,
equal-time runs) cut short and resumed, the JSON it writes, the parameter counts and the controls'
sizing, the ablation, the plan's arithmetic, the Markdown, plot and samples. Seconds on a CPU; the
corpus is CPython's embedded pydoc topics."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import experiment_designs as ed  # noqa: E402

from tapetransformer.data import load_text  # noqa: E402

RUN_KEYS = {"steps", "warmup", "train_loss", "curve", "train_cpu_s", "cpu_s_per_step", "eval_cpu_s", "wall_s",
            "diverged_at", "final_val_bpc", "final_eval_cpu_s", "model", "lr", "seed", "kind"}
CFG = ed.CONFIGS["tiny"]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, str]:
    """(the JSON after 3 runs, the JSON after the resumed plan finished, the output folder)."""
    out = tmp_path_factory.mktemp("exp")
    args = ["--config", "tiny", "--data", "embedded", "--out-dir", str(out), "--work-dir", str(out / "work"), "--quiet"]
    assert ed.main(args + ["--max-runs", "3"]) == 0
    path = out / "experiment-v2-embedded.json"
    partial = json.loads(path.read_text())
    assert ed.main(args) == 0
    return partial, json.loads(path.read_text()), str(out)


def test_cut_short_is_partial_and_resumes(results: tuple[dict, dict, str]) -> None:
    partial, full, out = results
    assert partial["status"] == "partial" and len(partial["runs"]) == 3
    assert any("equal-time" in m for m in partial["missing"])
    assert full["status"] == "complete" and full["missing"] == []
    for key, run in partial["runs"].items():  # the finished runs were kept, not run again
        assert full["runs"][key] == run
    md = open(os.path.join(out, "experiment-v2-embedded.md"), encoding="utf-8").read()
    assert "Status: complete" in md


def test_plan_is_complete(results: tuple[dict, dict, str]) -> None:
    _, r, _ = results
    assert r["schema"] == ed.SCHEMA and r["corpus"] == "embedded" and r["models_planned"] == list(ed.MODELS)
    seeds = list(CFG.seeds)
    expected = set()
    for m in ed.MODELS:
        expected |= {ed.run_key(m, lr, seeds[0], "equal-step") for lr in CFG.lrs(m)}
        best = ed.best_lr(r, m)
        assert best in CFG.lrs(m)
        expected |= {ed.run_key(m, best, s, k) for s in seeds for k in ("equal-step", "equal-time")}
    assert set(r["runs"]) == expected
    for key, run in r["runs"].items():
        assert RUN_KEYS <= set(run), key
        assert ed.run_key(run["model"], run["lr"], run["seed"], run["kind"]) == key or "same_run_as" in run
        assert run["diverged_at"] is None and len(run["train_loss"]) == run["steps"]
        assert [p["step"] for p in run["curve"]] == [0] + ed.eval_steps(run["steps"], CFG.eval_points)
        cpu = [p["cpu_s"] for p in run["curve"]]
        assert cpu == sorted(cpu) and cpu[-1] == pytest.approx(run["train_cpu_s"])
        assert run["warmup"] == ed.default_warmup(run["steps"])
        if run["kind"] == "equal-step":
            assert run["steps"] == CFG.steps
    assert r["threads"] == 1 and "1 torch thread" in r["time_measure"]


def test_every_model_learned(results: tuple[dict, dict, str]) -> None:
    _, r, _ = results
    for key, run in r["runs"].items():
        curve = [p["val_bpc"] for p in run["curve"]]
        assert all(math.isfinite(v) for v in curve), key
        assert 0 < run["final_val_bpc"] < curve[0], (key, curve, run["final_val_bpc"])
    for m in ed.MODELS:  # the best rate's equal-time runs: well below the untrained ~log2(V) = 6.7 bpc
        for s in CFG.seeds:
            run = r["runs"][ed.run_key(m, ed.best_lr(r, m), s, "equal-time")]
            assert run["final_val_bpc"] < run["curve"][0]["val_bpc"] - 0.5, m


def test_equal_time_budget(results: tuple[dict, dict, str]) -> None:
    _, r, _ = results
    et = r["equal_time"]
    best = {m: ed.best_lr(r, m) for m in ed.MODELS}
    step_runs = {m: [r["runs"][ed.run_key(m, best[m], s, "equal-step")] for s in CFG.seeds] for m in ed.MODELS}
    budget = sum(x["train_cpu_s"] for x in step_runs["seed"]) / len(CFG.seeds)
    assert et["budget_cpu_s"] == pytest.approx(budget)
    for m in ed.MODELS:
        sps = sum(x["cpu_s_per_step"] for x in step_runs[m]) / len(CFG.seeds)
        assert et["s_per_step"][m] == pytest.approx(sps)
        assert et["steps"][m] == max(1, round(budget / sps))
        for s in CFG.seeds:
            assert r["runs"][ed.run_key(m, best[m], s, "equal-time")]["steps"] == et["steps"][m]
    # the budget model's equal-time run is its equal-step run (same settings), not repeated
    assert et["steps"]["seed"] == CFG.steps
    run = r["runs"][ed.run_key("seed", best["seed"], 0, "equal-time")]
    assert run["same_run_as"] == ed.run_key("seed", best["seed"], 0, "equal-step")


def test_best_lr_and_ties() -> None:
    def res(finals: dict[float, float | None]) -> dict:
        cfg = {"seeds": [0], "lrs_tape": list(finals), "lrs_gpt": [], "lrs_charrnn": []}
        runs = {ed.run_key("seed", lr, 0, "equal-step"): {"lr": lr, "final_val_bpc": f} for lr, f in finals.items()}
        return {"config": cfg, "runs": runs}

    assert ed.best_lr(res({1e-3: 3.0, 3e-3: 2.5, 1e-2: 2.9}), "seed") == 3e-3
    assert ed.best_lr(res({1e-3: 2.5, 3e-3: 2.5, 1e-2: 2.9}), "seed") == 1e-3  # a tie: the lower rate
    assert ed.best_lr(res({1e-3: 3.0, 3e-3: 2.5, 1e-2: None}), "seed") == 3e-3  # diverged: never picked
    r = res({1e-3: 3.0, 3e-3: 2.5})
    del r["runs"][ed.run_key("seed", 3e-3, 0, "equal-step")]
    assert ed.best_lr(r, "seed") is None  # the sweep is not finished


def test_parameter_counts(results: tuple[dict, dict, str]) -> None:
    _, r, _ = results
    m = {k: v["parameters"] for k, v in r["models"].items()}
    model = ed.build_tape("seed", r["vocab_size"], CFG)
    named = dict(model.named_parameters())

    def size(*prefixes: str) -> int:
        return sum(p.numel() for n, p in named.items() if n.startswith(prefixes))

    assert m["reference"]["total"] == m["seed"]["total"] == m["seed-noprophet"]["total"]
    assert m["seed"]["live"] == m["seed"]["total"] - size("embed_ln.", "norm_gate")
    assert m["seed"]["not_reaching"] == ["embed_ln", "norm_gate"]
    d = CFG.embed_dim
    assert m["seed-noprophet"]["live"] == m["seed"]["live"] - size("prophet.", "rnn_projection.") - d * d
    assert m["seed-noprophet"]["dead_columns"] == {"merge_projection.weight[:, D:]": d * d}
    live = ("holistic_embed.", "codahead.", f"residualheads.{CFG.num_critics - 1}.", "unembedding")
    assert m["reference"]["live"] == size(*live)
    for ctl in ("gpt", "charrnn"):
        assert m[ctl]["total"] == m[ctl]["live"] and not m[ctl]["not_reaching"]
        assert abs(m[ctl]["live"] - m["seed"]["live"]) <= 0.02 * m["seed"]["live"], ctl


def test_count_disagreeing_with_structure_raises() -> None:
    model = ed.build_tape("reference", 20, CFG)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 20, (2, CFG.seq_len), generator=g), torch.randint(0, 20, (2, CFG.seq_len), generator=g)
    assert ed.count_parameters("reference", model, x, y, CFG.num_critics)["live"] > 0
    with pytest.raises(RuntimeError, match="disagree"):
        ed.count_parameters("seed", model, x, y, CFG.num_critics)  # the reference's dead critic is not the seed's


@pytest.mark.parametrize("target", [120_336, 1_815_872])
def test_control_sizing_matches_its_count(target: int) -> None:
    d = ed.size_gpt(target, 65, 64, 4, 4)
    assert d % 4 == 0
    n = sum(p.numel() for p in ed.GPT(65, 64, d, 4, 4).parameters())
    assert n == ed.gpt_count(65, 64, d, 4) and abs(n - target) <= 0.02 * target
    h = ed.size_charrnn(target, 65, 2)
    n = sum(p.numel() for p in ed.CharRNN(65, h, 2).parameters())
    assert n == ed.charrnn_count(65, h, 2) and abs(n - target) <= 0.01 * target


def test_gpt_is_causal_with_gpt2_init() -> None:
    torch.manual_seed(0)
    model = ed.GPT(11, 12, 64, 8, 4)
    x = torch.randint(0, 11, (2, 12))
    x2 = x.clone()
    x2[:, 7:] = (x2[:, 7:] + 1) % 11
    a, b = model(x), model(x2)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])
    assert model.tok_emb.weight is not None and model.ln_f.weight.shape == (64,)
    resid = torch.cat([blk.mlp_proj.weight.flatten() for blk in model.blocks])
    other = torch.cat([blk.fc.weight.flatten() for blk in model.blocks])
    assert resid.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert other.std().item() == pytest.approx(0.02, rel=0.05)
    assert all(blk.qkv.bias.abs().sum() == 0 for blk in model.blocks)


def test_charrnn_is_causal() -> None:
    torch.manual_seed(0)
    model = ed.CharRNN(11, 16, 2)
    x = torch.randint(0, 11, (2, 12))
    x2 = x.clone()
    x2[:, 7:] = (x2[:, 7:] + 1) % 11
    torch.testing.assert_close(model(x)[:, :7], model(x2)[:, :7])


def test_noprophet_runs_no_rnn() -> None:
    torch.manual_seed(0)
    model = ed.build_tape("seed-noprophet", 20, CFG)
    seed = ed.build_tape("seed", 20, CFG)
    seed.load_state_dict(model.state_dict())
    x = torch.randint(0, 20, (2, CFG.seq_len))
    y = torch.randint(0, 20, (2, CFG.seq_len))
    before = model.loss(x, y)
    assert not torch.allclose(before, seed.loss(x, y))  # the prophet matters in the seed design
    with torch.no_grad():
        for p in model.prophet.parameters():
            p.add_(1.0)
        model.rnn_projection.weight.add_(1.0)
    torch.testing.assert_close(model.loss(x, y), before, rtol=0, atol=0)


def test_eval_steps() -> None:
    assert ed.eval_steps(300, 10) == list(range(30, 301, 30))
    assert ed.eval_steps(7, 10) == list(range(1, 8))
    assert ed.eval_steps(8, 2) == [4, 8]


def test_validation_windows_cover_the_split() -> None:
    ds = ed.CharDataset(load_text(None))
    x, y = ed.val_windows(ds, 64)
    assert x.shape == y.shape == ((len(ds.val) - 1) // 64, 64)
    assert torch.equal(x.reshape(-1)[1:], y.reshape(-1)[:-1])
    assert torch.equal(x[0], ds.val[:64])


def test_summary_plot_and_samples(results: tuple[dict, dict, str]) -> None:
    from PIL import Image

    _, r, out = results
    with Image.open(os.path.join(out, "experiment-v2-embedded.png")) as img:
        assert img.size == (1100, 480)
        assert len(img.convert("RGB").getcolors(1 << 20)) > 10  # drawn, not blank
    path = os.path.join(out, "experiment-v2-embedded.md")
    md = open(path, encoding="utf-8").read()
    for label in ed.LABELS.values():
        assert label in md
    for section in ("Learning-rate sweep", "equal steps vs equal CPU time", "Time to quality", "1 torch thread"):
        assert section in md
    samples = open(os.path.join(out, "experiment-v2-embedded-samples.md"), encoding="utf-8").read()
    for m in ed.MODELS:
        s = r["samples"][m]
        assert len(s["text"]) == CFG.sample_chars and s["text"] in samples and s["text"] in md
        best = min((x for x in r["runs"].values() if x["model"] == m), key=lambda x: x["final_val_bpc"])
        assert r["runs"][s["run"]]["final_val_bpc"] == best["final_val_bpc"]
    # the hand-written reading between the notes markers survives a regeneration
    with open(path, "w", encoding="utf-8") as f:
        f.write(md.replace(ed.NOTES_BEGIN, ed.NOTES_BEGIN + "\nThe seed design wins here.\n"))
    assert ed.main(["--summarize", "--data", "embedded", "--out-dir", out]) == 0
    again = open(path, encoding="utf-8").read()
    assert "The seed design wins here." in again and again.count(ed.NOTES_BEGIN) == 1


def test_time_to_quality_levels(results: tuple[dict, dict, str]) -> None:
    _, r, _ = results
    common, strict = ed.ttq_thresholds(r)
    assert strict == pytest.approx(common - 0.25)
    for m in ed.MODELS:  # every model's best run reaches the first level
        runs = [x for x in r["runs"].values() if x["model"] == m and x["kind"] == "equal-time"]
        assert any(ed.first_reach(x["curve"], common) is not None for x in runs), m
    curve = [{"cpu_s": 0.0, "val_bpc": 5.0}, {"cpu_s": 2.0, "val_bpc": 3.1}, {"cpu_s": 4.0, "val_bpc": 2.9}]
    assert ed.first_reach(curve, 3.0) == 4.0 and ed.first_reach(curve, 2.0) is None


def test_bad_arguments(results: tuple[dict, dict, str], tmp_path) -> None:
    _, r, out = results
    with pytest.raises(SystemExit) as e:
        ed.main(["--config", "tiny", "--stop-at", "soon"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        ed.main(["--config", "tiny", "--data", str(tmp_path / "missing.txt"), "--out-dir", str(tmp_path)])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:  # the results of another config are not overwritten
        ed.main(["--config", "small", "--data", "embedded", "--out-dir", out, "--max-runs", "0", "--quiet"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        ed.main(["--config", "tiny", "--data", "embedded", "--out-dir", str(tmp_path), "--models", "gpt", "--quiet"])
    assert e.value.code == 2
