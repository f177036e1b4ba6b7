"""The process's environment: its rank variables from whatever launcher started it, its device, its threads.

Nothing here needs a process group; trainer/parallel.py owns the ranks once it exists, the engine module owns
deepspeed itself."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import torch

from trainer.errors import UserError

SLURM_PORT_BASE = 20000  # srun tasks meet on 20000 + job id mod 10000 unless MASTER_PORT says otherwise


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_process_env() -> None:
    """Set torch's rank variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) for whatever
    started this process. The deepspeed launcher and torchrun set them all; an ``srun`` task gets them from
    SLURM's; a plain ``python launch/train.py`` is a world of one. Without them DeepSpeed would try MPI
    discovery (and need mpi4py)."""
    os.environ.update(rank_env(os.environ, torch.cuda.device_count()))


def rank_env(env: Mapping[str, str], visible_gpus: int = 0) -> dict[str, str]:
    """The rank variables to add to ``env`` (nothing when a launcher already set them)."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return {}
    if srun_task(env):
        return slurm_rank_env(env, visible_gpus)
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if env.get(name, "1").isdigit() and int(env.get(name, "1")) > 1:
            # Every task would become its own rank 0 writing into the same run directory: refuse.
            raise UserError(f"{name}={env[name]} but this process is not one of several ranks: start one task "
                            f"per GPU with srun (launch/slurm/train.sbatch does), or use the deepspeed launcher or "
                            f"torchrun")
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"),
            "MASTER_PORT": env.get("MASTER_PORT") or str(free_port())}


def srun_task(env: Mapping[str, str]) -> tuple[int, int] | None:
    """(rank, world size) of a task of an srun step; None elsewhere, the sbatch script's shell included (it has
    SLURM_PROCID=0 and the allocation's SLURM_NTASKS, but no step)."""
    world = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
    if "SLURM_STEP_ID" not in env or "SLURM_PROCID" not in env or not world:
        return None
    return int(env["SLURM_PROCID"]), int(world)


def slurm_rank_env(env: Mapping[str, str], visible_gpus: int) -> dict[str, str]:
    """One srun task per GPU: SLURM_PROCID is the rank, SLURM_LOCALID the local rank, the step's task count
    the world size. The rendezvous is the step's first node, on a port every task derives from the job id
    (no communication needed); MASTER_ADDR and MASTER_PORT in the environment win.

    LOCAL_RANK picks the GPU (DeepSpeed sets the device from it too). Where SLURM binds each task to its own
    GPU (--gpus-per-task=1, --gpu-bind=single:1) a task sees fewer GPUs than the node has: it takes its
    local rank modulo what it sees, which is its own one."""
    task = srun_task(env)
    if task is None:
        raise ValueError("not an srun task")
    rank, world = task
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise UserError("an srun task without SLURM_JOB_NODELIST: cannot find the first node; set MASTER_ADDR and "
                        "MASTER_PORT yourself")
    local = int(env.get("SLURM_LOCALID", "0"))
    if 0 < visible_gpus <= local:
        local %= visible_gpus
    out = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local)}
    per_node = expand_tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", ""))
    node = int(env.get("SLURM_NODEID", "0"))
    if node < len(per_node):
        out["LOCAL_WORLD_SIZE"] = str(per_node[node])
    addr = env.get("MASTER_ADDR") or first_host(nodelist)
    try:
        socket.getaddrinfo(addr, None)
    except OSError:
        raise UserError(f"MASTER_ADDR: the first node of the step, {addr!r} (from {nodelist}), does not resolve "
                        f"here; export MASTER_ADDR with its address (launch/slurm/train.sbatch asks scontrol for "
                        f"the node's NodeAddr)") from None
    out["MASTER_ADDR"] = addr
    out["MASTER_PORT"] = env.get("MASTER_PORT") or str(SLURM_PORT_BASE + int(env.get("SLURM_JOB_ID", "0")) % 10000)
    return out


def first_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist: ``gpu[007-010,12],cpu1`` -> ``gpu007``, ``r[1-2]-n[05-06]`` -> ``r1-n05``."""
    host, depth = "", 0
    for char in nodelist:
        if char == "," and depth == 0:
            break
        depth += (char == "[") - (char == "]")
        host += char
    while "[" in host:
        head, rest = host.split("[", 1)
        ranges, tail = rest.split("]", 1)
        host = head + ranges.split(",")[0].split("-")[0] + tail
    return host


def expand_tasks_per_node(value: str) -> list[int]:
    """SLURM's compressed tasks-per-node list: ``2(x3),1`` -> ``[2, 2, 2, 1]``."""
    counts = []
    for part in filter(None, value.split(",")):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    return counts


def env_rank() -> int:
    """This process's rank before the process group exists (0 for a plain single process)."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


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


def default_device() -> torch.device:
    """This process's GPU (set from LOCAL_RANK before the process group), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
