"""Count the kernels a training step and a decode token launch on the CUDA code path, on a CPU.

    python benchmarks/launches.py --json benchmarks/results/launches.json --batch-check 2 --steady-check \\
        --with-test-config --execute-check
    python benchmarks/launches.py --config test --json /tmp/l.json     # the small config

The fused model runs with ``backend="triton"`` under the Triton interpreter (``TRITON_INTERPRET=1``,
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

Counted, not run: by default the Triton kernels are counted but not executed (``LaunchCounter(
execute=False)``). Nothing the model launches depends on values (``host_syncs`` is 0 everywhere), so the
counts are those of a run; ``--execute-check`` counts every key of the ``tiny`` config both ways and
fails unless they agree op by op (recorded as ``execute_check``). That makes the notebook's size and batch
(16) cost seconds instead of the interpreter's ~15 minutes per training step, and it lets the layouts
CUDA picks from the device be counted although the interpreter cannot run them: with ``--sms N``
(default 132, an H100) the Char-RNN runs its persistent grid-synchronised kernels (one launch per layer
per sequence, one per decode token) where the grid fits on N SMs (:func:`cuda_layouts`).

What is counted (at the notebook's size: vocab 65, seq_len 128, embed_dim 256, 4 critics; training at
the notebook's batch 16):

* ``train_step``: the training tool's step as ``GraphedStepper`` captures it: ``Stepper.accumulate``
  (``model.loss(x, y, check=False)`` forward + backward, the batch checks outside the graph, the loss
  summed on the device) and ``apply_gradients`` (clipping at 1.0, the fused capturable Adam; its state
  is built beforehand by a step on zero gradients); fp32, reference design. ``train_forward_backward``
  and ``train_optimizer_step`` are its two parts.
* ``train_step_bf16``: the same under bf16 autocast (CUDA's default), its casts included; counted under
  CPU autocast (see ``METHOD_NOTES``).
* ``train_step_wolf``: the same with ``FusedWolf``.
* ``decode_token``: one call of the static decode step (what ``generate`` captures in a CUDA graph;
  :func:`static_decode_step`) after an 8-token prefill into a cache of capacity seq_len, batch 1, fp32
  weights and int8 weights (``quantize_int8_(act_quant=False)``: the weight-only GEMV that CUDA picks
  for decode), after one uncounted call.
* ``graph_token``: everything one replay of ``generate``'s decode graph runs
  (``_GraphedDecodeStep._step``: the decode step, the greedy or sampled draw into the static token
  buffer, ``pos.add_``), fp32; ``graph_extras`` = ``graph_token`` − ``decode_token.fp32``.
* ``seed``: ``train_step``, ``train_step_bf16`` and ``decode_token`` (fp32, int8) of ``design="seed"``
  (prophet = Char-RNN, merges, moderator), counted the same way.

A kernel count does not depend on the batch from batch 2 on (the grids grow, not their number; at
batch 1 some views are contiguous by accident and skip a copy). ``--batch-check N`` counts the
training steps again at batch N, ``--steady-check`` again after an untimed step (nothing built lazily
by a first call is in the figure); either fails unless the counts agree op by op. ``--with-test-config``
adds the counts of the small ``test`` config, which equal the notebook's.

Caveat: grids chosen from the device (the decode kernel's split count reads the SM count) are taken at
the interpreter's values; at capacity 128 the decode kernel runs unsplit on any GPU, so no combine
kernel is missing.
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
    # --execute-check: every key counted with the kernels run by the interpreter, and skipped
    "tiny": {"vocab_size": 13, "seq_len": 16, "embed_dim": 32, "num_heads": 2},
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

    def __init__(self, execute: bool = True) -> None:
        self.counts = Counts()
        self.active = False
        self.depth = 0  # > 0 inside a Triton launch: the interpreter's own ATen calls are not kernels
        self.host: set[int] = set()
        # False: Triton launches are counted but not run (their outputs keep whatever torch.empty
        # left there). The ops that run and their order do not depend on values (no host reads: the
        # counter checks host_syncs == 0), so the counts are the same; tests/test_launches.py checks
        # that on the test config. It makes notebook-size counts take seconds instead of the
        # interpreter's ~15 minutes per training step, and lets the persistent (grid-synchronised)
        # kernels CUDA picks be counted without running them (see cuda_layouts).
        self.execute = execute
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
            if not counter.execute:
                return None
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

GRAD_CLIP = 1.0  # TrainConfig.grad_clip's default
DEFAULT_SMS = 132  # an H100's SMs: where a launcher picks its layout from the device (see cuda_layouts)


def build_model(cfg: dict[str, int], seed: int = 0, design: str = "reference") -> torch.nn.Module:
    from tapetransformer.model import TapeTransformer

    torch.manual_seed(seed)
    return TapeTransformer(**cfg, dropout=0.0, backend="triton", design=design)


@contextlib.contextmanager
def cuda_layouts(sms: int | None) -> Iterator[None]:
    """Launchers that pick a kernel layout from the device pick as on a CUDA device with ``sms`` SMs
    (None: leave them alone). Today that is the Char-RNN: its persistent, grid-synchronised kernels
    (one launch per layer for the whole sequence, one per decode token) where the grid fits on the
    SMs, instead of the per-step launches the interpreter runs. The interpreter cannot run those
    kernels (its programs run one after another, so a grid barrier waits forever): count with
    ``LaunchCounter(execute=False)``."""
    if sms is None:
        yield
        return
    from tape_kernels import charrnn as cr

    orig = cr._layout

    def layout(hd: int, device: torch.device, persistent: bool | None) -> tuple[int, int, bool]:
        if persistent is not False and os.environ.get("TAPE_KERNELS_CHARRNN_PERSISTENT", "1") != "0":
            for bh, bk in cr._PERSISTENT_CONFIGS:
                if -(-hd // bh) <= sms:
                    return bh, bk, True
        return orig(hd, device, False)

    cr._layout = layout
    try:
        yield
    finally:
        cr._layout = orig


# ---------------------------------------------------------------------------------------------
# The measurements


def _init_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """One optimizer step on zero gradients: builds its state (Adam's exp_avg, exp_avg_sq, step;
    Wolf's) without a forward/backward, so that nothing created lazily by a first step is counted.
    (The parameters' values do not change any count.)"""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _stepper(model: torch.nn.Module, optimizer: str, amp: torch.dtype | None, batch: int) -> Any:
    """The training tool's step (what ``GraphedStepper`` captures: ``accumulate`` + ``apply_gradients``),
    with the batch checks outside and the capturable optimizer."""
    from tapetransformer.train import make_optimizer
    from tapetransformer.train.memory import MemoryPlan
    from tapetransformer.train.step import Stepper

    opt = make_optimizer(optimizer, model.parameters(), 1e-3, capturable=True)
    plan = MemoryPlan(micro_batch=batch, accum_steps=1, recompute=False, budget_bytes=None, estimated_peak_bytes=0)
    st = Stepper(model, opt, plan, device="cpu", amp_dtype=amp, scaler=None, grad_clip=GRAD_CLIP)
    st.loss_net.check = False
    return st


def count_train_step(cfg: dict[str, int], batch: int, steady: bool = False, *, design: str = "reference",
                     optimizer: str = "adam", amp: torch.dtype | None = None, execute: bool = True,
                     sms: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Launches of the training tool's step as the CUDA graph holds it (``Stepper.accumulate``: forward +
    backward of the loss under autocast when ``amp``, the loss accumulated on the device; then
    ``apply_gradients``: clipping and the optimizer).

    ``amp`` (bf16, the default on CUDA): counted under CPU autocast, whose casts for the ops here equal
    CUDA's (GEMMs cast fp32 operands to the low dtype; the fp32-list ops take fp32 inputs, no cast),
    see ``method_notes`` in the JSON. ``steady=True`` runs one more untimed step first and counts the
    second (nothing built lazily on a first call is counted)."""
    model = build_model(cfg, design=design).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg["vocab_size"], (batch, cfg["seq_len"]), generator=g)
    y = torch.randint(0, cfg["vocab_size"], (batch, cfg["seq_len"]), generator=g)
    st = _stepper(model, optimizer, amp, batch)
    t0 = time.perf_counter()
    with cuda_layouts(sms), LaunchCounter(execute) as lc:
        _init_optimizer_state(model, st.opt)
        if steady:
            st.accumulate(x, y)
            st.opt.zero_grad(set_to_none=True)
        with lc.counting() as fb:
            st.accumulate(x, y)
        with lc.counting() as opt:
            st.apply_gradients()
    return {"forward_backward": fb.as_dict(), "optimizer_step": opt.as_dict(),
            "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip


def _decode_setup(cfg: dict[str, int], int8: bool, design: str) -> tuple[Any, Any, torch.Tensor, torch.Tensor]:
    model = build_model(cfg, design=design).eval()
    if int8:
        # The weight-only GEMV: what CUDA's resolve_act_quant picks for decode (M <= 16 rows); on CPU
        # act_quant=None would pick W8A8, a different op.
        quantize_int8_weights(model, act_quant=False)
    prompt_len = min(DECODE_PROMPT, cfg["seq_len"] // 2)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg["vocab_size"], (1, prompt_len), generator=g)
    model.prepare_decode()  # what generate() does before the graph: the prophet's packed weights
    cache = new_cache(model, 1, cfg["seq_len"], "cpu")
    logp, cache = model(prompt, past_kv=cache)
    tok = logp[:, -1:].argmax(-1)
    pos = torch.full((1,), cache_length(cache), dtype=torch.long)
    return model, cache, tok, pos


def count_decode_token(cfg: dict[str, int], int8: bool, *, design: str = "reference", execute: bool = True,
                       sms: int | None = None) -> dict[str, Any]:  # fmt: skip
    """One call of the static decode step (what ``generate`` captures) after an 8-token prefill into a
    cache of capacity seq_len, batch 1, after one uncounted call."""
    t0 = time.perf_counter()
    with torch.no_grad(), cuda_layouts(sms), LaunchCounter(execute) as lc:
        model, cache, tok, pos = _decode_setup(cfg, int8, design)
        static_decode_step(model, tok, pos, cache)  # not counted: first call (int8 caches and checks)
        with lc.counting() as c:
            static_decode_step(model, tok, pos, cache)
    out = c.as_dict()
    # which weights the counted step read: the fused decode kernels dequantize int8 in their epilogue,
    # so the int8 count has no extension op and only this says it ran on int8 weights
    out["int8_blocks"] = sum(bool(blk.int8) for blk in model.fused_blocks())
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


GRAPH_SAMPLING = {"greedy": ("greedy",), "sample": ("sample", None), "sample_top_k": ("sample", 5)}


def count_graph_token(cfg: dict[str, int], sampling: str, *, execute: bool = True,
                      sms: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Everything one replay of ``generate``'s CUDA graph runs (``_GraphedDecodeStep._step``: the decode
    step, the draw into the static token buffer, ``pos.add_``), fp32 weights, reference design."""
    from types import SimpleNamespace

    from tape_kernels import sampling as ks
    from tapetransformer.generate import _GraphedDecodeStep

    with torch.no_grad(), cuda_layouts(sms), LaunchCounter(execute) as lc:
        model, cache, tok, pos = _decode_setup(cfg, False, "reference")
        # the graph's static buffers, as _GraphedDecodeStep.__init__ makes them
        bufs = SimpleNamespace(tok=tok.clone(), pos=pos.clone(), cache=cache, sampling=GRAPH_SAMPLING[sampling],
                               inv_temp=torch.ones(1), rng_state=ks.new_state(0, torch.device("cpu")))  # fmt: skip
        _GraphedDecodeStep._step(bufs, model, model.backend)  # not counted: first call
        bufs.pos.copy_(pos)  # the inputs again (a skipped draw kernel leaves no valid id in tok)
        bufs.tok.copy_(tok)
        with lc.counting() as c:
            _GraphedDecodeStep._step(bufs, model, model.backend)
    return c.as_dict()


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a[k]["by_op"] == b[k]["by_op"] and a[k]["host_syncs"] == b[k]["host_syncs"]
               for k in ("forward_backward", "optimizer_step"))  # fmt: skip


def _total(train: dict[str, Any]) -> int:
    return train["forward_backward"]["total"] + train["optimizer_step"]["total"]


def count_all(cfg: dict[str, int], batch: int, batch_check: int | None = None, steady_check: bool = False,
              execute: bool = False, sms: int | None = DEFAULT_SMS,
              log: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    """Every count for one model config; the optional checks recount the training step (at another
    batch; or a second step after an untimed one) and raise unless the counts agree op by op.

    ``execute=False`` (the default): Triton launches counted, not run (see ``LaunchCounter``);
    ``sms``: layouts picked as on a GPU with that many SMs (needs ``execute=False``; None: the
    interpreter's layouts)."""
    check_interpreter()
    if execute and sms is not None:
        raise ValueError("the persistent layouts cannot run under the interpreter: count them with execute=False")
    torch.set_num_threads(1)  # the interpreter's numpy work gains nothing from threads; the counts do not depend on it
    kw = {"execute": execute, "sms": sms}
    seconds: dict[str, float] = {}
    train: dict[str, dict[str, Any]] = {}
    for key, design, optimizer, amp in (("fp32", "reference", "adam", None),
                                        ("bf16", "reference", "adam", torch.bfloat16),
                                        ("wolf", "reference", "wolf", None),
                                        ("seed", "seed", "adam", None),
                                        ("seed_bf16", "seed", "adam", torch.bfloat16)):  # fmt: skip
        log(f"train step {key} at batch {batch} ...")
        train[key] = count_train_step(cfg, batch, design=design, optimizer=optimizer, amp=amp, **kw)
        seconds[f"train_{key}"] = train[key].pop("seconds")
        log(f"  {train[key]['forward_backward']['total']} + {train[key]['optimizer_step']['total']} launches")
    dec: dict[str, dict[str, Any]] = {}
    for design in ("reference", "seed"):
        for mode in ("fp32", "int8"):
            log(f"decode step, {design} {mode} ...")
            d = dec[f"{design}_{mode}"] = count_decode_token(cfg, mode == "int8", design=design, **kw)
            seconds[f"decode_{design}_{mode}"] = d.pop("seconds")
            log(f"  {d['total']} launches")
    graph = {}
    for sampling in GRAPH_SAMPLING:
        graph[sampling] = count_graph_token(cfg, sampling, **kw)
    t = train["fp32"]
    res: dict[str, Any] = {
        "train_step": _total(t),
        "decode_token": {m: dec[f"reference_{m}"]["total"] for m in ("fp32", "int8")},
        "train_forward_backward": t["forward_backward"]["total"],
        "train_optimizer_step": t["optimizer_step"]["total"],
        "train_step_bf16": _total(train["bf16"]),
        "train_step_wolf": _total(train["wolf"]),
        "graph_token": {s: g["total"] for s, g in graph.items()},
        "graph_extras": {s: g["total"] - dec["reference_fp32"]["total"] for s, g in graph.items()},
        "seed": {"train_step": _total(train["seed"]), "train_step_bf16": _total(train["seed_bf16"]),
                 "decode_token": {m: dec[f"seed_{m}"]["total"] for m in ("fp32", "int8")}},
        "config": dict(cfg),
        "batch": batch,
    }  # fmt: skip
    checks = []
    if batch_check is not None and batch_check != batch:
        checks.append(("batch_check", f"train steps at batch {batch_check}", batch_check, False))
    if steady_check:
        checks.append(("steady_check", f"train steps at batch {batch}, counted after an untimed one", batch, True))
    for key, what, b, steady in checks:
        log(f"{what} ...")
        res[key] = {"what": what}
        for tk, design, optimizer, amp in (("fp32", "reference", "adam", None), ("seed", "seed", "adam", None)):
            other = count_train_step(cfg, b, steady=steady, design=design, optimizer=optimizer, amp=amp, **kw)
            seconds[f"{key}_{tk}"] = other.pop("seconds")
            res[key][tk] = {"train_step": _total(other), "identical_by_op": _same(train[tk], other)}
            log(f"  {tk}: {_total(other)} launches, identical by op: {res[key][tk]['identical_by_op']}")
            if not res[key][tk]["identical_by_op"]:
                raise RuntimeError(f"{key}: the {tk} training step's launches differ: {res[key]}")
    res["details"] = {
        **{f"train_{k}_{part}": v[part] for k, v in train.items() for part in ("forward_backward", "optimizer_step")},
        **{f"decode_token_{k}": v for k, v in dec.items()},
        **{f"graph_token_{k}": v for k, v in graph.items()},
    }
    res["execute"] = execute
    res["sms"] = sms
    res["seconds"] = seconds
    return res


def count_keys(res: dict[str, Any]) -> dict[str, int]:
    """Every count of a result, flat: what tests/test_launches.py compares."""
    out: dict[str, int] = {}

    def walk(prefix: str, d: dict[str, Any]) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            else:
                out[f"{prefix}{k}"] = v

    walk("", {k: res[k] for k in COUNT_KEYS})
    return out


COUNT_KEYS = ("train_step", "decode_token", "train_forward_backward", "train_optimizer_step", "train_step_bf16",
              "train_step_wolf", "graph_token", "graph_extras", "seed")  # fmt: skip


EXECUTE_CHECK_BATCH = 2  # the smallest batch whose counts do not depend on it (see count_all)


def execute_check(cfg: dict[str, int], log: Callable[[str], None] = print) -> dict[str, Any]:
    """Count-only equals executed: every count of ``cfg`` with the Triton kernels run by the interpreter
    and with them skipped, both with the interpreter's layouts (per-step Char-RNN launches)."""
    t0 = time.perf_counter()
    b = EXECUTE_CHECK_BATCH
    log("execute check: counting with the kernels run ...")
    ran = count_all(cfg, b, execute=True, sms=None, log=log)
    log("execute check: counting with the kernels skipped ...")
    skipped = count_all(cfg, b, execute=False, sms=None, log=log)
    same = ran["details"] == skipped["details"]
    if not same:
        diff = {k: (ran["details"][k]["by_op"], skipped["details"][k]["by_op"])
                for k in ran["details"] if ran["details"][k] != skipped["details"][k]}  # fmt: skip
        raise RuntimeError(f"counting without running the kernels changed the counts: {diff}")
    return {"what": "every count with the Triton kernels run vs skipped (interpreter layouts)", "batch": b,
            "counts": count_keys(ran), "identical_by_op": same, "seconds": round(time.perf_counter() - t0, 1)}


def _versions() -> dict[str, Any]:
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__}


METHOD = ("CUDA code path (backend='triton') counted on CPU under TRITON_INTERPRET=1: Triton launches, ATen ops "
          "that launch a device kernel (no views/allocations), tape_kernels extension ops; Triton kernels counted "
          "but not run (execute=False; execute_check shows the counts equal those with the kernels run), layouts "
          "picked as on a GPU with `sms` SMs (the Char-RNN's persistent kernels); see benchmarks/launches.py")
METHOD_NOTES = [
    "train_step*: Stepper.accumulate + apply_gradients as GraphedStepper captures them (grad_clip 1.0, "
    "Adam(capturable, fused) or FusedWolf), batch checks outside the graph",
    "train_step_bf16: torch.autocast on the CPU (bf16) stands for CUDA's: both cast the GEMMs' fp32 operands to "
    "bf16 and leave fp32 inputs of fp32-list ops alone; branches on device.type == 'cuda' (LayerNorm outputs "
    "fp32 under CUDA autocast) take their CPU side",
    "graph_token: one replay of generate()'s decode graph (decode step + draw + token copy + pos.add_), fp32, "
    "reference design; graph_extras = graph_token - decode_token.fp32",
    "seed: design='seed' (prophet = Char-RNN, merges, moderator), same methods",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="output path")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="notebook")
    ap.add_argument("--batch", type=int, default=NOTEBOOK_BATCH,
                    help=f"batch of the counted training steps (default {NOTEBOOK_BATCH}, the notebook's)")
    ap.add_argument("--batch-check", type=int, default=None,
                    help="count the training steps again at this batch and fail unless both agree")
    ap.add_argument("--steady-check", action="store_true",
                    help="count the training steps again after an untimed one and fail unless both agree")
    ap.add_argument("--with-test-config", action="store_true",
                    help="also count the 'test' config into the JSON (its counts must equal the notebook's)")
    ap.add_argument("--execute-check", action="store_true",
                    help="on the 'tiny' config, count with the kernels run and skipped; fail unless equal")
    ap.add_argument("--execute", action="store_true",
                    help="run the Triton kernels (slow; with the interpreter's layouts, --sms is ignored)")
    ap.add_argument("--sms", type=int, default=DEFAULT_SMS, help=f"SMs of the GPU counted for (default {DEFAULT_SMS})")
    args = ap.parse_args(argv)
    if args.batch < 1 or (args.batch_check is not None and args.batch_check < 1) or args.sms < 1:
        ap.error("batch sizes and --sms must be >= 1")
    cfg = CONFIGS[args.config]
    t0 = time.perf_counter()
    sms = None if args.execute else args.sms
    res = count_all(cfg, args.batch, args.batch_check, args.steady_check, execute=args.execute, sms=sms)
    res["config_name"] = args.config
    if args.config == "notebook":
        res["notebook_batch"] = NOTEBOOK_BATCH
    if args.with_test_config and args.config != "test":
        print("test config ...")
        t = count_all(CONFIGS["test"], args.batch, execute=args.execute, sms=sms)
        res["test_config"] = {**{k: t[k] for k in COUNT_KEYS}, "config": t["config"], "batch": t["batch"]}
    if args.execute_check:
        res["execute_check"] = {**execute_check(CONFIGS["tiny"]), "config": "tiny"}
    res.update(_versions())
    res["method"] = METHOD
    res["method_notes"] = METHOD_NOTES
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
        f.write("\n")
    print(f"{json.dumps(count_keys(res))}; {time.perf_counter() - t0:.0f} s; wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
