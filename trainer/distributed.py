"""Process environment and small collectives. The engine module owns deepspeed itself."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from trainer.errors import UserError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_process_env() -> None:
    """A plain ``python launch/train.py`` is a world of one. Without these variables DeepSpeed would try
    MPI discovery (and need mpi4py); launchers (deepspeed, torchrun) set them all themselves."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(name, "1").isdigit() and int(os.environ.get(name, "1")) > 1:
            # Every task would become its own rank 0 writing into the same run directory: refuse.
            raise UserError(f"{name}={os.environ[name]} but RANK/WORLD_SIZE are not set: start the ranks with "
                            f"the deepspeed launcher or torchrun (one task per node), or set the rank variables")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def env_rank() -> int:
    """This process's rank before the process group exists (0 for a plain single process)."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_world_size() -> int:
    """Processes on this machine: torchrun says LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def share_cpu_threads() -> None:
    """On a CPU run, give each local rank its share of the cores unless OMP_NUM_THREADS says otherwise.

    torch defaults every process to all cores; N ranks on one machine then oversubscribe it and the
    collectives' spin-waits make steps tens of times slower and erratic (measured: 2 ranks on 2 cores).
    """
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size()))


def sum_across_ranks(values: list) -> torch.Tensor:
    """All-reduce sum of a few numbers (device tensors or Python numbers) as one float64 vector on the CPU.
    A sync point: call it on log steps only."""
    device = next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))
    vector = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    dist.all_reduce(vector, op=dist.ReduceOp.SUM)
    return vector.cpu()
