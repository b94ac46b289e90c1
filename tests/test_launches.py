"""The kernel-launch counter (benchmarks/launches.py) and the committed counts it guards.

The counts are recomputed on the small ``test`` config (the notebook's module tree, 4 critics,
smaller tensors) in a child process, which sets TRITON_INTERPRET=1 before importing triton as the
script does, and must not exceed the committed ``benchmarks/results/launches.json``. The committed
file records that the test config's counts equal the notebook size's, so the guard stands for the
notebook figure. A count that grew on purpose: regenerate the file with

    python benchmarks/launches.py --json benchmarks/results/launches.json --batch-check 2 --steady-check \\
        --with-test-config --checks-on test
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

COUNT_KEYS = ("train_step", "train_forward_backward", "train_optimizer_step")
REGENERATE = ("python benchmarks/launches.py --json benchmarks/results/launches.json --batch-check 2 "
              "--steady-check --with-test-config --checks-on test")  # fmt: skip


@pytest.fixture(scope="module")
def committed() -> dict:
    with open(COMMITTED) as f:
        return json.load(f)


def _counts(d: dict) -> dict[str, int]:
    out = {k: d[k] for k in COUNT_KEYS}
    out.update({f"decode_token.{m}": n for m, n in d["decode_token"].items()})
    return out


def test_committed_file_is_the_notebook_size_and_consistent(committed: dict) -> None:
    assert committed["config"] == L.CONFIGS["notebook"] and committed["notebook_batch"] == 16
    assert set(committed["decode_token"]) == {"fp32", "int8"}
    assert committed["train_step"] == committed["train_forward_backward"] + committed["train_optimizer_step"]
    det = committed["details"]
    for key, d in det.items():
        assert d["total"] == d["triton"] + d["aten"] + d["extension"], key
        assert d["triton"] == sum(d["by_op"]["triton"].values()) and d["aten"] == sum(d["by_op"]["aten"].values())
    assert det["train_forward_backward"]["total"] == committed["train_forward_backward"]
    # the int8 step ran on int8 weights (dequantized in the fused kernels' epilogues), the fp32 one not
    assert det["decode_token_int8"]["int8_blocks"] > 0 == det["decode_token_fp32"]["int8_blocks"]
    # counted at batch 1, and shown not to depend on the batch or on being a process's first step (on the
    # notebook config, or on the test config whose counts equal it, checked below)
    assert {committed["batch_check"]["config"], committed["steady_check"]["config"]} <= {"notebook", "test"}
    assert committed["batch_check"]["identical_by_op"] and committed["steady_check"]["identical_by_op"]
    assert committed["batch_check"]["train_step"] == committed["train_step"]
    # the test config stands for the notebook size: the same counts
    assert _counts(committed["test_config"]) == _counts(committed), (
        "the test config no longer has the notebook size's counts: tests/test_launches.py then guards a "
        "different figure; choose a test config that matches, or guard the notebook counts directly")


def test_counts_do_not_grow(committed: dict, tmp_path) -> None:
    out = tmp_path / "launches.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH_DIR, "launches.py"), "--config", "test", "--json", str(out)],
        capture_output=True, text=True, timeout=900, cwd=ROOT, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["config"] == L.CONFIGS["test"] == committed["test_config"]["config"]
    # the counter sees the code path: Triton launches, ATen kernels and the int8 extension's ops
    det = got["details"]
    assert det["train_forward_backward"]["triton"] > 0 and det["train_forward_backward"]["aten"] > 0
    assert det["decode_token_fp32"]["triton"] > 0 and det["decode_token_int8"]["triton"] > 0
    assert det["decode_token_int8"]["int8_blocks"] > 0 == det["decode_token_fp32"]["int8_blocks"]
    want = _counts(committed["test_config"])
    now = _counts(got)
    grew = {k: (want[k], now[k]) for k in want if now[k] > want[k]}
    assert not grew, (
        f"kernel launches grew (committed, now): {grew}; by op now: "
        f"{ {k: d['by_op'] for k, d in det.items()} }. If intended, regenerate: {REGENERATE}")


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
