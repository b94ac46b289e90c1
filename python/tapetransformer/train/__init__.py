"""Training for an 8 GB card (and for a CPU, slower).

* mixed precision: bf16 autocast where the GPU supports it, else fp16 with a ``GradScaler``; the
  Student-t unembedding/NLL and the attention statistics run in fp32 inside the fused ops;
* a memory budget: :func:`plan_memory` picks micro-batch × gradient accumulation (and activation
  recomputation per TapeHead block when even one sample does not fit) from an analytic estimate
  (:func:`estimate_memory`); on CUDA the budget is also the allocator's per-process memory fraction,
  and an out-of-memory step is retried with half the micro-batch;
* ``torchrun``: DistributedDataParallel (NCCL on GPUs, gloo on CPU); every rank draws the same global
  batch and trains on its slice, so N ranks reproduce single-process training on the whole batch;
* checkpoints (atomic) with model, optimizer, scaler, RNG states, data-sampler position, vocabulary
  and config; ``resume`` continues bit for bit on CPU; ``init_from`` fine-tunes a notebook state_dict;
* tqdm progress (loss, tokens/s, peak memory), periodic validation, CSV/JSON logs and a loss-curve
  PNG written as training goes, the attention "framebuffer" frames/GIF (:mod:`tapetransformer.viz`);
  Ctrl-C stops after the current step with a checkpoint and the logs;
* speed: on CUDA the whole step is one CUDA graph (:mod:`.cudagraph`); on a CPU ``torch.compile``
  of the loss path where the run is long enough to pay the compile back (``compile="auto"``).

Modules: :mod:`.config` (TrainConfig and its checks), :mod:`.memory` (the planner), :mod:`.step`
(model, optimizer, precision, the Stepper), :mod:`.cudagraph` (the captured step),
:mod:`.checkpointing` (evaluation, where a run starts, checkpoints), :mod:`.logs` (log files) and
:mod:`.loop` (:func:`train`).
"""

from tapetransformer.train.checkpointing import StartPoint, evaluate, rng_state, set_rng_state, start_point
from tapetransformer.train.config import (
    AMP_MODES,
    BACKENDS,
    COMPILE_MODES,
    DEFAULT_MODEL,
    OPTIMIZERS,
    ConfigError,
    TrainConfig,
    validate_config,
)
from tapetransformer.train.cudagraph import GraphedStepper, graph_unsupported
from tapetransformer.train.logs import RunLog, read_history
from tapetransformer.train.loop import Run, TrainingDiverged, TrainingInterrupted, train
from tapetransformer.train.memory import (
    GIB,
    MIB,
    MemoryEstimate,
    MemoryPlan,
    calibrate_memory,
    estimate_memory,
    measure_activation_bytes,
    plan_memory,
    set_memory_budget,
)
from tapetransformer.train.step import LossNet, Stepper, build_model, enable_recompute, make_optimizer, pick_amp

__all__ = [
    "AMP_MODES",
    "BACKENDS",
    "COMPILE_MODES",
    "DEFAULT_MODEL",
    "GIB",
    "MIB",
    "OPTIMIZERS",
    "ConfigError",
    "GraphedStepper",
    "LossNet",
    "MemoryEstimate",
    "MemoryPlan",
    "Run",
    "RunLog",
    "StartPoint",
    "Stepper",
    "TrainConfig",
    "TrainingDiverged",
    "TrainingInterrupted",
    "build_model",
    "calibrate_memory",
    "enable_recompute",
    "estimate_memory",
    "evaluate",
    "graph_unsupported",
    "make_optimizer",
    "measure_activation_bytes",
    "pick_amp",
    "plan_memory",
    "read_history",
    "rng_state",
    "set_memory_budget",
    "set_rng_state",
    "start_point",
    "train",
    "validate_config",
]
