"""The kernel-launch counter (benchmarks/launches.py) and the committed counts it guards.

The counts are recomputed here at the notebook's size and batch (vocab 65, seq_len 128, embed_dim 256,
4 critics, batch 16), in a child process that sets TRITON_INTERPRET=1 before importing triton as the
script does, and must equal the committed ``benchmarks/results/launches.json`` op by op: a count that
grew or dropped fails until the file is regenerated on purpose with

    python benchmarks/launches.py --json benchmarks/results/launches.json --batch-check 2 --steady-check \\
        --with-test-config --execute-check

The script counts Triton launches without running them (seconds instead of the interpreter's ~15
minutes per notebook-size training step); that this changes no count is checked here on a small model
for the seed design, and for every key on that model by the committed ``execute_check``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.join(ROOT, "benchmarks")
COMMITTED = os.path.join(BENCH_DIR, "results", "launches.json")
sys.path.insert(0, BENCH_DIR)

import launches as L  # noqa: E402  (imported as a module it leaves TRITON_INTERPRET alone)

REGENERATE = ("python benchmarks/launches.py --json benchmarks/results/launches.json --batch-check 2 "
              "--steady-check --with-test-config --execute-check")  # fmt: skip
# Issue 27: the seed design's goals, per training step and per decode token.
SEED_TRAIN_GOAL = 300
SEED_DECODE_GOAL = 40
# A small model for the run-vs-skip check (the counts' independence of values does not depend on the size).
TINY = L.CONFIGS["tiny"]


@pytest.fixture(scope="module")
def committed() -> dict:
    with open(COMMITTED) as f:
        return json.load(f)


def test_committed_file_is_the_notebook_size_and_consistent(committed: dict) -> None:
    assert committed["config"] == L.CONFIGS["notebook"] and committed["batch"] == committed["notebook_batch"] == 16
    assert committed["execute"] is False and committed["sms"] == L.DEFAULT_SMS
    assert set(committed["decode_token"]) == set(committed["seed"]["decode_token"]) == {"fp32", "int8"}
    assert committed["train_step"] == committed["train_forward_backward"] + committed["train_optimizer_step"]
    det = committed["details"]
    for key, d in det.items():
        assert d["total"] == d["triton"] + d["aten"] + d["extension"], key
        assert d["triton"] == sum(d["by_op"]["triton"].values()) and d["aten"] == sum(d["by_op"]["aten"].values())
        assert d["host_syncs"] == 0, key  # what makes counting without running the kernels exact
    for name, want in (("fp32", committed["train_step"]), ("bf16", committed["train_step_bf16"]),
                       ("wolf", committed["train_step_wolf"]), ("seed", committed["seed"]["train_step"]),
                       ("seed_bf16", committed["seed"]["train_step_bf16"])):  # fmt: skip
        fb, st = det[f"train_{name}_forward_backward"]["total"], det[f"train_{name}_optimizer_step"]["total"]
        assert fb + st == want, name
    assert det["train_fp32_forward_backward"]["total"] == committed["train_forward_backward"]
    for s, n in committed["graph_token"].items():
        assert committed["graph_extras"][s] == n - committed["decode_token"]["fp32"], s
    # the int8 steps ran on int8 weights (dequantized in the fused kernels' epilogues), the fp32 ones not
    for design in ("reference", "seed"):
        int8, fp32 = det[f"decode_token_{design}_int8"], det[f"decode_token_{design}_fp32"]
        assert int8["int8_blocks"] > 0 == fp32["int8_blocks"], design
    # the seed design's prophet: the persistent Char-RNN kernels (one launch a layer), as CUDA runs them
    assert det["train_seed_forward_backward"]["by_op"]["triton"]["rnn_fwd_kernel"] == 2
    assert det["decode_token_seed_fp32"]["by_op"]["triton"]["rnn_decode_kernel"] == 1
    # bf16 autocast: the reference design's GEMMs are all fused kernels, which round their operands
    # themselves (no cast launches); the seed design's nn.Linear merges cast theirs, and the count has them
    assert det["train_bf16_forward_backward"]["by_op"] == det["train_fp32_forward_backward"]["by_op"]
    assert det["train_seed_bf16_forward_backward"]["by_op"]["aten"].get("_to_copy", 0) > \
        det["train_seed_forward_backward"]["by_op"]["aten"].get("_to_copy", 0)
    # shown not to depend on the batch or on being a process's first step
    for check in ("batch_check", "steady_check"):
        for design in ("fp32", "seed"):
            c = committed[check][design]
            assert c["identical_by_op"] and c["train_step"] == det[f"train_{design}_forward_backward"]["total"] + \
                det[f"train_{design}_optimizer_step"]["total"], (check, design)
    # counting without running the kernels gave every count of the test config that running them gave
    ex = committed["execute_check"]
    assert ex["identical_by_op"] and ex["config"] == "tiny" and set(ex["counts"]) == set(L.count_keys(committed))
    # the small test config has the notebook's counts
    assert L.count_keys(committed["test_config"]) == L.count_keys(committed)


def test_counts_unchanged_at_notebook_size(committed: dict, tmp_path) -> None:
    """Every count and every op behind it equals the committed file: growth and drops both fail."""
    out = tmp_path / "launches.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH_DIR, "launches.py"), "--config", "notebook", "--json", str(out)],
        capture_output=True, text=True, timeout=900, cwd=ROOT, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["config"] == committed["config"] and got["batch"] == committed["batch"]
    assert got["sms"] == committed["sms"] and got["execute"] == committed["execute"]
    # the counter sees the code path: Triton launches, ATen kernels
    det = got["details"]
    assert det["train_fp32_forward_backward"]["triton"] > 0 and det["train_fp32_forward_backward"]["aten"] > 0
    want, now = L.count_keys(committed), L.count_keys(got)
    changed = {k: (want.get(k), now.get(k)) for k in set(want) | set(now) if want.get(k) != now.get(k)}
    assert not changed, f"kernel launches changed (committed, now): {changed}. If intended, regenerate: {REGENERATE}"
    ops = {k: (committed["details"][k]["by_op"], d["by_op"]) for k, d in det.items()
           if committed["details"].get(k, {}).get("by_op") != d["by_op"]}  # fmt: skip
    assert not ops, f"the ops behind the counts changed (committed, now): {ops}. If intended: {REGENERATE}"


@pytest.mark.xfail(strict=True, reason="issue 27's goals are not met yet (see launches.json 'seed'): the 4 "
                   "critics run one after another; they need grouped kernels over all 8 blocks of a layer")
def test_seed_design_meets_the_launch_goals(committed: dict) -> None:
    seed = committed["seed"]
    assert max(seed["train_step"], seed["train_step_bf16"]) <= SEED_TRAIN_GOAL, seed
    assert max(seed["decode_token"].values()) <= SEED_DECODE_GOAL, seed


def test_reference_design_decode_meets_its_goal(committed: dict) -> None:
    assert max(committed["decode_token"].values()) <= SEED_DECODE_GOAL  # issue 16's 40, the same bound


def test_counting_without_running_the_kernels_counts_the_same() -> None:
    """The seed design's training step and decode token (Char-RNN, merges, moderator, critics), counted
    with the Triton kernels run by the interpreter and with them skipped: the same ops."""
    L.check_interpreter()
    small = {**TINY, "seq_len": 6, "embed_dim": 16}  # the same module tree; the per-step Char-RNN scales with S
    runs = {}
    for execute in (True, False):
        train = L.count_train_step(small, 2, design="seed", execute=execute)
        dec = L.count_decode_token(small, False, design="seed", execute=execute)
        runs[execute] = ({k: v["by_op"] for k, v in train.items() if k != "seconds"}, dec["by_op"])
    assert runs[True] == runs[False]
    assert runs[True][0]["forward_backward"]["triton"]["rnn_fwd_kernel"] == 2 * small["seq_len"]  # per-step layout


def test_cuda_layouts_count_the_persistent_char_rnn() -> None:
    """With the SMs of a GPU the Char-RNN counts one launch a layer (forward, backward) and one per decode
    token; the per-step layout it replaces launches once a step and layer."""
    L.check_interpreter()
    per_step = L.count_train_step(TINY, 2, design="seed", execute=False)
    persistent = L.count_train_step(TINY, 2, design="seed", execute=False, sms=L.DEFAULT_SMS)
    for kernel, want in (("rnn_fwd_kernel", 2), ("rnn_bwd_kernel", 2)):
        assert persistent["forward_backward"]["by_op"]["triton"][kernel] == want
        assert per_step["forward_backward"]["by_op"]["triton"][kernel] == want * TINY["seq_len"]
    dec = L.count_decode_token(TINY, False, design="seed", execute=False, sms=L.DEFAULT_SMS)
    assert dec["by_op"]["triton"]["rnn_decode_kernel"] == 1
    with pytest.raises(ValueError, match="cannot run under the interpreter"):
        L.count_all(TINY, 2, execute=True, sms=L.DEFAULT_SMS)


def test_multi_tensor_apply_rule() -> None:
    """ATen's multi_tensor_apply: 110/64/48/36/30 tensors per launch for 1..5 lists, 320 chunks of 65536."""
    mta = L.multi_tensor_apply_launches
    assert mta([], 1) == 0 and mta([0, 0], 2) == 0
    assert mta([10] * 110, 1) == 1 and mta([10] * 111, 1) == 2
    assert mta([10] * 64, 2) == 1 and mta([10] * 65, 2) == 2 and mta([10] * 30, 5) == 1 and mta([10] * 31, 5) == 2
    assert mta([320 * 65536], 1) == 1 and mta([320 * 65536 + 1], 1) == 2
    assert mta([65536] * 321, 1) == 3  # 110 tensors fill a launch first: 110, 110, 101


def test_counter_classifies_ops() -> None:
    """Views, allocations and ``.item()`` launch no kernel; fills, copies, GEMMs, elementwise ops and
    reductions launch one each; ``_foreach`` ops by the multi_tensor_apply rule; host tensors none."""
    x = torch.randn(4, 6)
    w = torch.randn(6, 3)
    steps = [torch.tensor(1.0), torch.tensor(2.0)]
    with L.LaunchCounter() as lc, lc.counting() as c:
        lc.host = {id(t) for t in steps}
        v = x.view(6, 4).t().unsqueeze(0)[0]  # views
        e = torch.empty(5)  # allocation
        z = torch.zeros(3)  # fill
        y = (x @ w).relu()  # mm, relu
        s = y.sum()  # reduction
        v.clone()  # copy
        float(s)  # .item(): a host sync, not a kernel
        x[x > 0]  # gt, and an index by a boolean mask: a kernel whose output size the host must wait for
        torch._foreach_add_([x, w], 1.0)  # one multi_tensor_apply launch
        torch._foreach_add_(steps, 1)  # Adam's host-side step counters
    assert e.shape == (5,) and z.shape == (3,)
    assert dict(c.aten) == {"zeros": 1, "mm": 1, "relu": 1, "sum": 1, "clone": 1, "gt": 1, "index": 1,
                            "_foreach_add_": 1}  # fmt: skip
    assert c.host_syncs == 2 and c.total == 8 and not c.triton and not c.extension
