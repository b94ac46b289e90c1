"""Helpers for tests that spawn DistributedDataParallel ranks on the CPU (gloo)."""

from __future__ import annotations

import os
import socket

import torch

from tapetransformer.train import TrainConfig, train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(rank: int, world: int, port: int, cfg: TrainConfig, out_dir: str) -> None:
    """One rank of ``torch.multiprocessing.spawn``: train ``cfg`` and save the model to rank<N>.pt."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    res = train(cfg)
    torch.save(res["model"].state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
