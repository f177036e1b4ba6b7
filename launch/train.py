#!/usr/bin/env python
"""Fine-tune a CogVideoX LoRA from a run spec.

    deepspeed --num_gpus N launch/train.py --spec run.yaml [--set section.key=value ...]
    torchrun --nproc_per_node N launch/train.py --spec run.yaml
    srun --ntasks-per-node N python launch/train.py --spec run.yaml     (launch/slurm/train.sbatch)
    python launch/train.py --spec run.yaml          (one process)
    python launch/train.py --spec run.yaml --dry-run [--ranks 8] [--video 49x480x720] [--gpu-memory 24]

A mistake in the spec or the data ends with one message naming the field, file or sample, and exit status 2.
SIGTERM or SIGUSR1 finish the optimizer step, save a checkpoint and exit with 75; the same command resumes.
Exit statuses: trainer/errors.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from trainer.errors import EXIT_LOST_PEER, EXIT_USER_ERROR, UserError  # noqa: E402
from trainer.faults import Stopped, ignore_stop_signals  # noqa: E402
from trainer.process_env import ensure_process_env, env_rank  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", required=True, type=Path, help="run spec YAML (see examples/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one spec field, typed by the schema; repeatable")
    parser.add_argument("--dry-run", action="store_true",
                        help="print tokens, parameters, FLOPs and memory per rank from the configs, and exit")
    parser.add_argument("--ranks", type=int, default=None, help="with --dry-run: plan for this many ranks "
                        "(default: WORLD_SIZE, else 1)")
    parser.add_argument("--video", action="append", default=[], metavar="FxHxW",
                        help="with --dry-run: plan for clips of this size instead of the shards' (repeatable)")
    parser.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                        help="with --dry-run: which ways of training fit a GPU of this many GiB, cheapest first")
    # The deepspeed launcher appends --local_rank; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def lost_peer(exc: RuntimeError) -> bool:
    """A failed collective (gloo or NCCL) rather than a bug: torch raises DistError subclasses for most, but
    gloo's transport errors arrive as plain RuntimeErrors."""
    import torch.distributed as dist

    text = str(exc)
    return dist.is_initialized() and (isinstance(exc, dist.DistError) or any(
        marker in text for marker in ("Connection closed by peer", "Timed out waiting", "Connection reset by peer",
                                      "NCCL communicator was aborted", "Watchdog caught collective operation timeout")))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch.distributed as dist

    try:
        from trainer.spec import load_spec

        if args.dry_run:  # no process group, no weights
            from trainer.planner import dry_run
            from trainer.process_env import env_world_size

            dry_run(load_spec(args.spec, args.overrides), args.ranks or env_world_size(), args.video, args.gpu_memory)
            return 0
        ensure_process_env()
        from trainer.loop import train

        train(load_spec(args.spec, args.overrides))
    except UserError as exc:
        # Before training starts every rank fails the same way: let rank 0 say it once.
        if dist.is_initialized() and not exc.on_every_rank:
            print(f"error [rank {env_rank()}]: {exc}", file=sys.stderr)
        elif env_rank() == 0:
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Stopped as exc:
        ignore_stop_signals()  # the checkpoint is saved: keep the exit status whatever arrives now
        if env_rank() == 0:
            print(exc, file=sys.stderr)
        # Leave at once: every rank passed the save's last barrier and the logs are closed. A slow teardown
        # could outlast the KillWait after which SLURM SIGKILLs the ranks, and a killed rank means no requeue.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exc.exit_code)
    except RuntimeError as exc:
        if not lost_peer(exc):
            raise
        # A collective failed: a peer died, or hung past run.collective_timeout_s. Tearing down the process
        # group could wait on that peer again, so leave now; the last complete checkpoint is intact.
        print(f"error [rank {env_rank()}]: lost contact with another rank ({str(exc).splitlines()[0][:300]}); "
              f"stopping. Rerun the same command to resume from the last complete checkpoint.", file=sys.stderr)
        sys.stderr.flush()
        os._exit(EXIT_LOST_PEER)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
