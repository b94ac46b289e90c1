"""Count the kernels a training step and a decode step launch on the CUDA code path, on a CPU.

    python benchmarks/launches.py --json benchmarks/results/launches.json [--batch 1] [--batch-check 2]
    python benchmarks/launches.py --config test --json /tmp/l.json     # the small config tests/ recomputes

The fused model runs with ``backend="triton"`` through the Triton interpreter (``TRITON_INTERPRET=1``,
set here before triton is imported), i.e. the code path CUDA tensors take, and every launch is
counted:

* **Triton**: each kernel launch (``kernel[grid](...)``: the interpreter's ``InterpretedFunction.run``,
  or ``JITFunction.run`` should the compiled path ever run here). ATen calls the interpreter itself
  makes to move arguments are not counted.
* **ATen**: each op that reaches the dispatcher (seen by a ``TorchDispatchMode``, i.e. after
  composite ops are decomposed, as on CUDA) and would launch a device kernel: copies, fills,
  ``zeros``, GEMMs, elementwise ops, reductions. Not counted: views and metadata ops
  (``OpOverload.is_view``, ``_unsafe_view``, ``detach`` ...), allocations (``empty*``), and ops on
  tensors that live on the host on CUDA too (Adam's ``step`` counters when not capturable).
  ``_local_scalar_dense`` (``.item()``) is a device-to-host copy: counted as a host sync, not a
  kernel. Ops whose output size depends on the data (``nonzero``, indexing with a boolean mask)
  are kernels that also sync: ``host_syncs`` counts both kinds.
* **Extension**: each ``torch.ops.tape_kernels.*`` op (the int8 GEMV/GEMM) counts one launch.
* ``_foreach_*`` / ``_fused_*`` ops launch one kernel per chunk of tensors on CUDA; their count is
  ATen's ``multi_tensor_apply`` rule (at most 110/64/48/36/30 tensors for 1–5 tensor lists and 320
  blocks of 65536 elements per launch), from the tensors' sizes.

One ATen op is counted as one launch; on CUDA a few take more (``slice_backward`` = zeros + copy,
large reductions in two passes, cuBLAS split-K): the figures are a floor for those.

What is counted (at the notebook's size: vocab 65, seq_len 128, embed_dim 256, 4 critics):

* ``train_step``: the training tool's CUDA step: ``model.loss(x, y, check=False)`` forward +
  backward (the token checks run outside the CUDA graph), then gradient clipping and the fused,
  capturable ``torch.optim.Adam`` the graph holds (its state is built beforehand by a step on zero
  gradients, which leaves the weights alone), ``backend="triton"``. ``train_forward_backward`` and
  ``train_optimizer_step`` (clipping + optimizer) are its two parts; ``details`` breaks each down by
  kernel and op name.
* ``decode_token``: one call of the static decode step (the step ``generate`` captures in a CUDA
  graph; :func:`static_decode_step`) after an 8-token prefill into a cache of capacity seq_len,
  batch 1, with fp32 weights and with int8 weights (``quantize_int8_(act_quant=False)``: the
  weight-only GEMV that CUDA picks for decode), after one uncounted call.

A kernel count does not depend on the batch (the grids grow, not their number), but the
interpreter's time does (~30–70 s for one notebook-size forward + backward at batch 1 on one CPU
core), so the training step is counted once at ``--batch`` (default 1; the notebook trains at 16).
``--batch-check N`` counts it again at batch N, ``--steady-check`` again after an untimed step
(nothing built lazily by a first call is in the figure); either fails unless the counts agree op
by op, and the JSON records them. ``--with-test-config`` adds the counts of the small ``test``
config that ``tests/test_launches.py`` recomputes.

Caveat: grids chosen from the device (the decode kernel's split count reads the SM count) are
taken at the interpreter's values; at capacity 128 the decode kernel runs unsplit on any GPU, so no
combine kernel is missing.
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    # Before anything imports triton: kernels decorated with @triton.jit become interpreted functions.
    # (Imported as a module, e.g. by a test, it leaves the environment alone: check_interpreter()
    # refuses to count if the kernels were not built for the interpreter.)
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

CONFIGS: dict[str, dict[str, int]] = {
    # the notebook's model (its batch is 16; see --batch)
    "notebook": {"vocab_size": 65, "seq_len": 128, "embed_dim": 256, "num_heads": 4},
    # what tests/test_launches.py recomputes: the same module tree (4 critics), smaller tensors
    "test": {"vocab_size": 65, "seq_len": 32, "embed_dim": 64, "num_heads": 4},
}
NOTEBOOK_BATCH = 16
DECODE_PROMPT = 8  # tokens prefilled before the counted decode step (the step reads the length on the device)

# ---------------------------------------------------------------------------------------------
# What launches a kernel

# Ops that only allocate, alias or describe tensors (views are found through OpOverload.is_view).
_NO_KERNEL = frozenset(
    [
        "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted",
        "resize_", "set_", "lift_fresh", "detach", "alias", "_unsafe_view", "_reshape_alias",
        "promote_types", "result_type", "record_stream", "is_same_size", "_has_compatible_shallow_copy_type",
        "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_contiguous", "dim", "size", "stride",
        "_nested_tensor_size", "_propagate_xla_data", "_conj", "_neg_view",
        "_record_function_enter", "_record_function_enter_new", "_record_function_exit",  # profiler marks
    ]  # fmt: skip
)
_HOST_SYNC = frozenset(["_local_scalar_dense"])
# Ops that launch kernels and then wait for the device: their output size depends on the data.
_SYNCING = frozenset(["nonzero", "masked_select", "is_nonzero", "equal", "unique", "_unique2", "repeat_interleave"])


def syncs_host(func: Any, args: tuple) -> bool:
    """Whether ``func`` makes the host wait for the device: ``.item()``, data-dependent output
    shapes (``nonzero``; indexing with a boolean mask runs one inside ``index``)."""
    name = func.__name__.split(".")[0]
    if name in _HOST_SYNC or name in _SYNCING:
        return True
    if name in ("index", "index_put", "index_put_") and len(args) > 1:
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))
    return False

# ATen's multi_tensor_apply (aten/src/ATen/native/cuda/MultiTensorApply.cuh): per launch at most
# this many tensors (by the number of tensor lists, 1..5) and 320 blocks of 65536 elements.
_MTA_MAX_TENSORS = (110, 64, 48, 36, 30)
_MTA_MAX_BLOCKS = 320
_MTA_CHUNK = 65536


def multi_tensor_apply_launches(numels: list[int], depth: int) -> int:
    """Kernel launches of one ``_foreach_*`` op over tensors of these sizes with ``depth`` lists."""
    max_tensors = _MTA_MAX_TENSORS[min(max(depth, 1), 5) - 1]
    launches = tensors = blocks = 0
    for n in numels:
        if n == 0:
            continue
        tensors += 1
        chunks = -(-n // _MTA_CHUNK)
        for c in range(chunks):
            blocks += 1
            last = c == chunks - 1
            if (tensors == max_tensors and last) or blocks == _MTA_MAX_BLOCKS:
                launches += 1
                blocks = 0
                tensors = 0 if last else 1  # an unfinished tensor carries over to the next launch
    return launches + (blocks > 0)


def _foreach_launches(func: Any, args: tuple, kwargs: dict, host: set[int]) -> int:
    schema = func._schema
    lists = []
    for a, v in zip(schema.arguments, list(args) + [kwargs.get(a.name) for a in schema.arguments[len(args):]]):
        if str(a.type).startswith("List[Tensor]") and isinstance(v, (list, tuple)) and v:
            lists.append([t for t in v if isinstance(t, torch.Tensor)])
    dev_lists = [lst for lst in lists if lst and not all(id(t) in host for t in lst)]
    if not dev_lists:
        return 0
    out_of_place = not func.__name__.split(".")[0].endswith("_")
    depth = len(dev_lists) + (1 if out_of_place else 0)
    return multi_tensor_apply_launches([t.numel() for t in dev_lists[0]], depth)


def aten_launches(func: Any, args: tuple, kwargs: dict, host: set[int]) -> int:
    """Device kernels that ``func`` launches on CUDA (0 for views, allocations, host-only tensors)."""
    name = func.__name__.split(".")[0]
    if func.is_view or name in _NO_KERNEL or name in _HOST_SYNC:
        return 0
    if name.startswith(("_foreach_", "_fused_")):
        return _foreach_launches(func, args, kwargs, host)
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    if tensors and all(id(t) in host for t in tensors):
        return 0
    return 1


# ---------------------------------------------------------------------------------------------
# The counter


class Counts:
    """Launches by source and by kernel / op name."""

    def __init__(self) -> None:
        self.triton: collections.Counter[str] = collections.Counter()
        self.aten: collections.Counter[str] = collections.Counter()
        self.extension: collections.Counter[str] = collections.Counter()
        self.host_syncs = 0

    @property
    def total(self) -> int:
        return sum(self.triton.values()) + sum(self.aten.values()) + sum(self.extension.values())

    def as_dict(self) -> dict[str, Any]:
        def srt(c: collections.Counter[str]) -> dict[str, int]:
            return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))

        return {
            "total": self.total,
            "triton": sum(self.triton.values()),
            "aten": sum(self.aten.values()),
            "extension": sum(self.extension.values()),
            "host_syncs": self.host_syncs,
            "by_op": {"triton": srt(self.triton), "aten": srt(self.aten), "extension": srt(self.extension)},
        }


class _Mode(TorchDispatchMode):
    def __init__(self, counter: LaunchCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        c = self.counter
        if c.active and c.depth == 0:
            if func.namespace == "tape_kernels":
                c.counts.extension[func.__name__.split(".")[0]] += 1
            else:
                n = aten_launches(func, args, kwargs, c.host)
                if n:
                    c.counts.aten[str(func.overloadpacket.__name__)] += n
                if syncs_host(func, args) and not all(id(t) in c.host for t in args if isinstance(t, torch.Tensor)):
                    c.counts.host_syncs += 1
        return func(*args, **kwargs)


class LaunchCounter:
    """Context manager: while ``active``, counts Triton launches and device-kernel ATen ops.

    ``host`` holds ids of tensors that stay on the host on CUDA as well (ops touching only those
    launch nothing on the device)."""

    def __init__(self) -> None:
        self.counts = Counts()
        self.active = False
        self.depth = 0  # > 0 inside a Triton launch: the interpreter's own ATen calls are not kernels
        self.host: set[int] = set()
        self._restore: list[tuple[Any, str, Any]] = []

    def _wrap_run(self, cls: Any) -> None:
        orig = cls.run
        counter = self

        def run(kernel: Any, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("warmup"):
                return orig(kernel, *args, **kwargs)
            if counter.active and counter.depth == 0:
                fn = getattr(kernel, "fn", kernel)
                counter.counts.triton[getattr(fn, "__name__", type(kernel).__name__)] += 1
            counter.depth += 1
            try:
                return orig(kernel, *args, **kwargs)
            finally:
                counter.depth -= 1

        self._restore.append((cls, "run", orig))
        cls.run = run

    def __enter__(self) -> LaunchCounter:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        self._wrap_run(InterpretedFunction)
        self._wrap_run(JITFunction)
        self._mode = _Mode(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)
        for cls, attr, orig in reversed(self._restore):
            setattr(cls, attr, orig)
        self._restore.clear()

    @contextlib.contextmanager
    def counting(self) -> Iterator[Counts]:
        """Count what runs inside the block into a fresh :class:`Counts`."""
        self.counts = Counts()
        self.active = True
        try:
            yield self.counts
        finally:
            self.active = False


def check_interpreter() -> None:
    """The tape_kernels kernels must be interpreted functions: triton read TRITON_INTERPRET at import."""
    from triton.runtime.interpreter import InterpretedFunction

    from tape_kernels import layernorm

    if not isinstance(layernorm._add_ln_fwd_kernel, InterpretedFunction):
        raise RuntimeError(
            "triton was imported before TRITON_INTERPRET=1 was set: run launches.py as a script "
            "(or import it before anything imports triton)"
        )


# ---------------------------------------------------------------------------------------------
# The model internals this script uses live in common.py, one function each (the lead may rename them).

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cache_length, new_cache, quantize_int8_weights, static_decode_step  # noqa: E402


def build_model(cfg: dict[str, int], seed: int = 0) -> torch.nn.Module:
    from tapetransformer.model import TapeTransformer

    torch.manual_seed(seed)
    return TapeTransformer(**cfg, dropout=0.0, backend="triton")


# ---------------------------------------------------------------------------------------------
# The measurements


def _init_adam_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """One Adam step on zero gradients: builds its state (exp_avg, exp_avg_sq, step) without a
    forward/backward and leaves the parameters unchanged (a zero gradient gives a zero update)."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


def count_train_step(cfg: dict[str, int], batch: int, steady: bool = False) -> dict[str, Any]:
    """Launches of the training tool's CUDA step: ``model.loss`` forward + backward (token checks
    outside, as the captured step runs it), then gradient clipping and the optimizer (the fused,
    capturable Adam the CUDA-graph step uses).

    The forward + backward counted is the first of the process (the interpreter's time is the
    cost here); ``steady=True`` runs one more untimed first and counts the second, to show the
    two agree (nothing built lazily on a first call is counted)."""
    from tapetransformer.train import make_optimizer

    model = build_model(cfg).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg["vocab_size"], (batch, cfg["seq_len"]), generator=g)
    y = torch.randint(0, cfg["vocab_size"], (batch, cfg["seq_len"]), generator=g)
    opt = make_optimizer("adam", model.parameters(), 1e-3, capturable=True)
    params = [p for p in model.parameters() if p.requires_grad]
    t0 = time.perf_counter()
    with LaunchCounter() as lc:
        _init_adam_state(model, opt)
        if steady:
            model.loss(x, y, check=False).backward()
            opt.zero_grad(set_to_none=True)
        with lc.counting() as fb:
            model.loss(x, y, check=False).backward()
        with lc.counting() as st:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
    return {"forward_backward": fb.as_dict(), "optimizer_step": st.as_dict(),
            "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip


def count_decode_token(cfg: dict[str, int], int8: bool) -> dict[str, Any]:
    model = build_model(cfg).eval()
    if int8:
        # The weight-only GEMV: what CUDA's resolve_act_quant picks for decode (M <= 16 rows); on CPU
        # act_quant=None would pick W8A8, a different op.
        quantize_int8_weights(model, act_quant=False)
    prompt_len = min(DECODE_PROMPT, cfg["seq_len"] // 2)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg["vocab_size"], (1, prompt_len), generator=g)
    t0 = time.perf_counter()
    with torch.no_grad(), LaunchCounter() as lc:
        cache = new_cache(model, 1, cfg["seq_len"], "cpu")
        logp, cache = model(prompt, past_kv=cache)
        tok = logp[:, -1:].argmax(-1)
        pos = torch.full((1,), cache_length(cache), dtype=torch.long)
        static_decode_step(model, tok, pos, cache)  # not counted: first call (int8 caches and checks)
        with lc.counting() as c:
            static_decode_step(model, tok, pos, cache)
    out = c.as_dict()
    # which weights the counted step read: the fused decode kernels dequantize int8 in their epilogue,
    # so the int8 count has no extension op and only this says it ran on int8 weights
    out["int8_blocks"] = sum(bool(blk.int8) for blk in model.fused_blocks())
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a[k]["by_op"] == b[k]["by_op"] and a[k]["host_syncs"] == b[k]["host_syncs"]
               for k in ("forward_backward", "optimizer_step"))  # fmt: skip


def count_all(cfg: dict[str, int], batch: int, batch_check: int | None = None, steady_check: bool = False,
              log: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    """Every count for one model config; the optional checks recount the training step (at another
    batch; or a second step after an untimed one) and raise unless the counts agree op by op."""
    check_interpreter()
    torch.set_num_threads(1)  # the interpreter's numpy work gains nothing from threads; the counts do not depend on it
    log(f"train step at batch {batch} ...")
    train = count_train_step(cfg, batch)
    log(f"  {train['forward_backward']['total']} + {train['optimizer_step']['total']} launches ({train['seconds']} s)")
    dec = {}
    for mode in ("fp32", "int8"):
        log(f"decode step, {mode} ...")
        dec[mode] = count_decode_token(cfg, mode == "int8")
        log(f"  {dec[mode]['total']} launches ({dec[mode]['seconds']} s)")
    res: dict[str, Any] = {
        "train_step": train["forward_backward"]["total"] + train["optimizer_step"]["total"],
        "decode_token": {m: d["total"] for m, d in dec.items()},
        "train_forward_backward": train["forward_backward"]["total"],
        "train_optimizer_step": train["optimizer_step"]["total"],
        "config": dict(cfg),
        "batch": batch,
    }
    seconds = {"train": train["seconds"], "decode_fp32": dec["fp32"].pop("seconds"),
               "decode_int8": dec["int8"].pop("seconds")}  # fmt: skip
    checks = []
    if batch_check is not None and batch_check != batch:
        checks.append(("batch_check", f"train step at batch {batch_check}", batch_check, False))
    if steady_check:
        checks.append(("steady_check", f"train step at batch {batch}, counted after an untimed one", batch, True))
    for key, what, b, steady in checks:
        log(f"{what} ...")
        other = count_train_step(cfg, b, steady=steady)
        seconds[key] = other["seconds"]
        res[key] = {
            "what": what,
            "train_step": other["forward_backward"]["total"] + other["optimizer_step"]["total"],
            "identical_by_op": _same(train, other),
        }
        log(f"  {res[key]['train_step']} launches, identical by op: {res[key]['identical_by_op']}")
        if not res[key]["identical_by_op"]:
            raise RuntimeError(f"{key}: the training step's launches differ: {res[key]}")
    res["details"] = {
        "train_forward_backward": train["forward_backward"],
        "train_optimizer_step": train["optimizer_step"],
        "decode_token_fp32": dec["fp32"],
        "decode_token_int8": dec["int8"],
    }
    res["seconds"] = seconds
    return res


def _versions() -> dict[str, Any]:
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="output path")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="notebook")
    ap.add_argument("--batch", type=int, default=1, help="batch of the counted training step (default 1)")
    ap.add_argument("--batch-check", type=int, default=None,
                    help="count the training step again at this batch and fail unless both agree")
    ap.add_argument("--steady-check", action="store_true",
                    help="count the training step again after an untimed one and fail unless both agree")
    ap.add_argument("--with-test-config", action="store_true",
                    help="also count the 'test' config (what tests/test_launches.py recomputes) into the JSON")
    ap.add_argument("--checks-on", choices=("config", "test"), default="config",
                    help="run --batch-check/--steady-check on --config, or on the 'test' config (with "
                         "--with-test-config: its counts equal the notebook's, and the interpreter "
                         "needs ~15 minutes per notebook-size training step on 2 cores)")
    args = ap.parse_args(argv)
    if args.batch < 1 or (args.batch_check is not None and args.batch_check < 1):
        ap.error("batch sizes must be >= 1")
    cfg = CONFIGS[args.config]
    t0 = time.perf_counter()
    on_test = args.checks_on == "test" and args.with_test_config and args.config != "test"
    if on_test:
        res = count_all(cfg, args.batch)
    else:
        res = count_all(cfg, args.batch, args.batch_check, args.steady_check)
        for key in ("batch_check", "steady_check"):
            if key in res:
                res[key]["config"] = args.config
    res["config_name"] = args.config
    if args.config == "notebook":
        res["notebook_batch"] = NOTEBOOK_BATCH
    if args.with_test_config and args.config != "test":
        print("test config ...")
        t = count_all(CONFIGS["test"], 1, args.batch_check if on_test else None, args.steady_check and on_test)
        res["test_config"] = {k: t[k] for k in ("train_step", "decode_token", "train_forward_backward",
                                                "train_optimizer_step", "config", "batch")}  # fmt: skip
        for key in ("batch_check", "steady_check"):
            if on_test and key in t:
                res[key] = {**t[key], "config": "test"}
                res["seconds"][f"test_{key}"] = t["seconds"][key]
    res.update(_versions())
    res["method"] = ("CUDA code path (backend='triton') counted on CPU under TRITON_INTERPRET=1: Triton launches, "
                     "ATen ops that launch a device kernel (no views/allocations), tape_kernels extension ops; "
                     "see benchmarks/launches.py")  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
        f.write("\n")
    print(f"train_step {res['train_step']} (forward+backward {res['train_forward_backward']}, "
          f"Adam {res['train_optimizer_step']}), decode_token {res['decode_token']}; "
          f"{time.perf_counter() - t0:.0f} s; wrote {args.json}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
