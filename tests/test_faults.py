"""Numerical faults, data faults and a dead rank, through launch/train.py with the real engine.

One-rank runs are plain processes (the fault handling is the same code on every rank, and they are fast);
the dead-rank tests start two real ranks.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from helpers import REPO, read_jsonl, read_metrics, rewrite_shards, run_train, train_env
from trainer.data import MicroBatches
from trainer.engine import lr_multiplier
from trainer.errors import EXIT_LOST_PEER, EXIT_NONFINITE, EXIT_USER_ERROR
from trainer.families import family_for
from trainer.process_env import free_port
from trainer.shard_index import build_index
from trainer.spec import OptimSection, load_spec

pytestmark = pytest.mark.slow
ACCUMULATION = 2


def overrides(tiny_5b, shards, run_dir, *extra: str) -> tuple[str, ...]:
    return (f"model.path={tiny_5b}", f"data.shards={shards}", f"run.output_dir={run_dir}", "data.num_workers=1",
            f"train.gradient_accumulation_steps={ACCUMULATION}", "optim.schedule=constant", "optim.warmup_steps=0",
            "checkpoint.every_minutes=null", "logging.every_steps=1", *extra)


def train(*args: str, ranks=None) -> subprocess.CompletedProcess:
    return run_train(REPO / "examples" / "tiny.yaml", ranks=ranks, overrides=args)


def scaled(members: dict, factor: float) -> dict:
    latents = st_load(members["latents.safetensors"])["latents"]
    return {**members, "latents.safetensors": st_save({"latents": (latents.float() * factor).to(latents.dtype)})}


def one_rank_order(tiny_5b, shards: Path) -> list[str]:
    """The keys a 1-rank run with micro batch 1 trains on, in order (the first two epochs)."""
    shapes = family_for(tiny_5b).sample_shapes()
    data = MicroBatches(build_index(sorted(map(str, shards.glob("*.tar"))), shapes), seed=0, micro_batch_size=1,
                        group=ACCUMULATION, rank=0, world_size=1, shapes=shapes)
    return [data[k].keys[0] for k in range(2 * data.per_epoch)]


def test_a_poisoned_sample_skips_its_step_without_touching_the_weights(tiny_5b, shards_10, tmp_path):
    order = one_rank_order(tiny_5b, shards_10)
    poisoned = order[2 * ACCUMULATION + 1]  # in optimizer step 3; finite, but its loss overflows to inf
    shards = tmp_path / "shards"
    rewrite_shards(shards_10, shards, lambda i, key, m: scaled(m, 1e30) if key == poisoned else m)
    before = train(*overrides(tiny_5b, shards, tmp_path / "two", "train.max_steps=2", "checkpoint.every_steps=0"))
    at = train(*overrides(tiny_5b, shards, tmp_path / "three", "train.max_steps=3", "checkpoint.every_steps=0"))
    assert before.returncode == 0 and at.returncode == 0, at.stderr[-3000:]
    two, three = (load_file(tmp_path / d / "lora" / "pytorch_lora_weights.safetensors") for d in ("two", "three"))
    assert all(torch.equal(two[k], three[k]) for k in two)  # step 3 changed nothing
    events = [e for e in read_jsonl(tmp_path / "three" / "events.jsonl") if e["event"] == "nonfinite"]
    assert [e["optimizer_step"] for e in events] == [3]
    assert any(s.endswith(f":{poisoned}") for s in events[0]["samples"]), events  # named by shard and key
    assert "optimizer step 3 skipped: non-finite loss on samples" in at.stderr
    metrics = read_metrics(tmp_path / "three")
    assert [m["skipped_steps"] for m in metrics] == [0, 0, 1]
    # and training goes on after it: the same run to step 6 learns with finite losses
    on = train(*overrides(tiny_5b, shards, tmp_path / "six", "train.max_steps=6", "checkpoint.every_steps=0",
                          "optim.schedule=linear", "optim.min_lr_ratio=0.5"))
    assert on.returncode == 0
    metrics = read_metrics(tmp_path / "six")
    losses = [m["loss"] for m in metrics]
    assert all(map(lambda v: v == v, losses[3:])), losses  # not NaN
    # the lr schedule follows optimizer steps, skipped ones included: it reaches its floor at max_steps
    schedule = lr_multiplier(OptimSection(lr=1e-4, schedule="linear", min_lr_ratio=0.5), max_steps=6)
    lr = load_spec(REPO / "examples" / "tiny.yaml").optim.lr
    assert [m["lr"] for m in metrics] == pytest.approx([lr * schedule(s) for s in range(6)], rel=1e-12)


def test_consecutive_non_finite_steps_stop_the_run_keeping_the_last_good_checkpoint(tiny_5b, shards_10, tmp_path):
    shards, run_dir = tmp_path / "shards", tmp_path / "run"
    rewrite_shards(shards_10, shards, lambda i, key, m: m)
    good = train(*overrides(tiny_5b, shards, run_dir, "train.max_steps=2", "checkpoint.every_steps=2"))
    assert good.returncode == 0, good.stderr[-3000:]
    rewrite_shards(shards_10, shards, lambda i, key, m: scaled(m, 1e30))  # every sample now overflows
    proc = train(*overrides(tiny_5b, shards, run_dir, "train.max_steps=10", "checkpoint.every_steps=1",
                            "train.max_consecutive_nonfinite=3"))
    assert proc.returncode == EXIT_NONFINITE, proc.stderr[-3000:]
    assert "3 optimizer steps in a row (up to step 5) had a non-finite loss" in proc.stderr
    assert f"the last complete checkpoint is {run_dir / 'checkpoints' / 'step_00000002'}" in proc.stderr
    assert "Traceback" not in proc.stderr
    complete = sorted(p.parent.name for p in (run_dir / "checkpoints").glob("step_*/complete.json"))
    assert complete == ["step_00000002"]  # no periodic save in the middle of a streak of skipped steps
    assert [m["skipped_steps"] for m in read_metrics(run_dir)][-3:] == [1, 2, 3]


def faulty_shards(src: Path, dst: Path, keys: list[list[str]]) -> dict[str, str]:
    """A copy of the ten-sample shards with one fault of each kind; returns {key: what is wrong}."""
    faults = {keys[0][1]: "missing member(s) ['prompt_embeds.safetensors']",
              keys[1][0]: "latents have 16 channels",
              keys[1][1]: "latents has dtype I32",
              keys[2][0]: "latents hold NaN or inf values",
              keys[3][0]: "the json member is not valid JSON"}

    def edit(i, key, members):
        if key == keys[0][1]:
            del members["prompt_embeds.safetensors"]
        elif key == keys[1][0]:
            members["latents.safetensors"] = st_save({"latents": torch.zeros(16, 3, 12, 16)})
        elif key == keys[1][1]:
            members["latents.safetensors"] = st_save({"latents": torch.zeros(4, 3, 12, 16, dtype=torch.int32)})
        elif key == keys[2][0]:
            members = scaled(members, float("nan"))
        elif key == keys[3][0]:
            members["json"] = b'{"caption": "cut off'
        return members

    rewrite_shards(src, dst, edit)
    last = sorted(dst.glob("*.tar"))[-1]
    data = last.read_bytes()
    last.write_bytes(data[: len(data) * 3 // 4])  # its second sample is cut off
    faults[keys[4][1]] = "is truncated in member"
    return faults


def shard_keys(shards: Path) -> list[list[str]]:
    from trainer.shard_format import raw_samples

    return [[raw["__key__"] for raw in raw_samples(str(p))] for p in sorted(shards.glob("*.tar"))]


def test_data_faults_are_skipped_and_named_or_stop_the_run(tiny_5b, shards_10, tmp_path):
    keys = shard_keys(shards_10)
    shards = tmp_path / "shards"
    faults = faulty_shards(shards_10, shards, keys)
    skip = train(*overrides(tiny_5b, shards, tmp_path / "skip", "train.max_steps=6", "checkpoint.every_steps=0"))
    assert skip.returncode == 0, skip.stderr[-3000:]
    events = [e for e in read_jsonl(tmp_path / "skip" / "events.jsonl") if e["event"] == "data_error"]
    for key, problem in faults.items():
        hits = [e for e in events if e["key"] == key]
        assert hits and all(problem in e["message"] for e in hits), (key, problem, events)
        assert all(Path(e["shard"]).name.endswith(".tar") for e in hits)
    nan_reads = sum(e["key"] == keys[2][0] for e in events)
    assert nan_reads >= 1  # 5 good samples a epoch, 12 steps' worth: the NaN sample was drawn and skipped
    assert read_metrics(tmp_path / "skip")[-1]["data_errors"] == 5 + nan_reads

    fail = train(*overrides(tiny_5b, shards, tmp_path / "fail", "train.max_steps=6", "data.on_error=fail"))
    first = keys[0][1]  # the first fault in shard order
    assert fail.returncode == EXIT_USER_ERROR, fail.stderr[-3000:]
    assert f"sample '{first}': missing member(s) ['prompt_embeds.safetensors']" in fail.stderr
    assert "Traceback" not in fail.stderr


def test_non_finite_values_under_fail_stop_every_rank_naming_shard_and_key(tiny_5b, shards_10, tmp_path):
    """Found by one rank mid-run; both ranks stop at once with one message (not a timeout on the other)."""
    keys = shard_keys(shards_10)
    shards = tmp_path / "shards"
    rewrite_shards(shards_10, shards, lambda i, key, m: scaled(m, float("nan")) if key == keys[3][1] else m)
    proc = train(*overrides(tiny_5b, shards, tmp_path / "run", "train.max_steps=20", "data.on_error=fail",
                            "run.collective_timeout_s=600"), ranks=2)
    assert proc.returncode == EXIT_USER_ERROR, proc.stderr[-3000:]
    assert proc.stderr.count(f"sample '{keys[3][1]}': latents hold NaN or inf values") == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "lost contact" not in proc.stderr
    assert not list((tmp_path / "run" / "checkpoints").glob("step_*/complete.json"))  # nothing saved after it


def test_shards_that_go_bad_after_start_up_stop_the_run(tiny_5b, shards_10, tmp_path):
    shards = tmp_path / "shards"  # every latent is NaN: the index (headers only) is fine, every read fails
    rewrite_shards(shards_10, shards, lambda i, key, m: scaled(m, float("nan")))
    proc = train(*overrides(tiny_5b, shards, tmp_path / "run", "train.max_steps=20",
                            "train.max_consecutive_nonfinite=2"))
    assert proc.returncode == EXIT_USER_ERROR, proc.stderr[-3000:]
    assert "data.shards: no sample of the last 2 optimizer steps could be read" in proc.stderr
    assert "latents hold NaN or inf values" in proc.stderr


def test_when_every_shard_is_bad_the_run_stops_with_a_message(tiny_5b, shards_10, tmp_path):
    shards = tmp_path / "shards"
    rewrite_shards(shards_10, shards, lambda i, key, m: {**m, "latents.safetensors": b"garbage" * 10})
    proc = train(*overrides(tiny_5b, shards, tmp_path / "run", "train.max_steps=2"))
    assert proc.returncode == EXIT_USER_ERROR
    assert "data.shards: no usable sample in 5 shard(s) (10 problem(s)" in proc.stderr, proc.stderr[-3000:]


def start_rank(rank: int, port: int, args: tuple[str, ...], output=subprocess.PIPE) -> subprocess.Popen:
    """One rank as its own process, as on two nodes: nothing watches the pair but the trainer itself. Its output
    goes to ``output`` (a pipe nobody reads fills up and stops the rank)."""
    env = {**train_env(), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "launch/train.py", "--spec", "examples/tiny.yaml", *[a for o in args for a in ("--set", o)]]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT, text=True)


@pytest.mark.serial
@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_dead_rank_stops_the_other_within_the_timeout(fault, tiny_5b, shards_10, tmp_path):
    bound = 20
    args = overrides(tiny_5b, shards_10, tmp_path / "run", "train.max_steps=100000", "checkpoint.every_steps=0",
                     f"run.collective_timeout_s={bound}")
    port = free_port()
    rank0, rank1 = start_rank(0, port, args), start_rank(1, port, args)
    try:
        for line in rank0.stdout:
            if line.startswith("step       3"):
                break
        rank1.send_signal(signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        since = time.monotonic()
        output = rank0.communicate(timeout=bound + 60)[0]
        waited = time.monotonic() - since
    finally:
        rank1.kill()
        rank0.kill()
    assert rank0.returncode not in (0, None), output
    assert waited < bound + 30, f"rank 0 took {waited:.0f} s to notice (bound {bound} s)"
    assert "lost contact with another rank" in output, output[-3000:]


@pytest.mark.serial
def test_the_launcher_returns_non_zero_when_a_rank_dies(tiny_5b, shards_10, tmp_path):
    import psutil

    args = overrides(tiny_5b, shards_10, tmp_path / "run", "train.max_steps=100000", "checkpoint.every_steps=0",
                     "run.collective_timeout_s=20")
    launcher = Path(sys.executable).with_name("deepspeed")
    proc = subprocess.Popen([str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py",
                             "--spec", "examples/tiny.yaml", *[a for o in args for a in ("--set", o)]],
                            cwd=REPO, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        for line in proc.stdout:
            if line.startswith("step       3"):
                break
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if "--local_rank=1" in p.cmdline() and "--local_rank=1" not in p.parent().cmdline()]
        assert len(ranks) == 1
        os.kill(ranks[0].pid, signal.SIGKILL)
        since = time.monotonic()
        proc.communicate(timeout=80)
        waited = time.monotonic() - since
    finally:
        with contextlib.suppress(ProcessLookupError):  # the ranks too, if the launcher left one behind
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode not in (0, None) and waited < 50


VALIDATION = "preparing validation (T5 encodes the prompts)"  # a start-up point of trainer/startup.py


def stop_rank_once_it_is(rank: subprocess.Popen, number: int, store, doing: str) -> None:
    """SIGSTOP ``rank`` as soon as its start-up gets to ``doing`` (trainer/watchdog.py posts it to the rendezvous
    store): a rank that is slow at exactly that point, as a node reading the model from a slow filesystem is."""
    store.wait([f"trainer/startup/{number}/{doing}"])
    rank.send_signal(signal.SIGSTOP)
    stopped_by = time.monotonic() + 10  # the kernel delivers the signal asynchronously
    while Path(f"/proc/{rank.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert time.monotonic() < stopped_by and rank.poll() is None, "the rank did not stop"
        time.sleep(0.01)
    host, _, count, done = json.loads(store.get(f"trainer/startup/{number}"))
    assert not done and count >= 1, (host, count, done)


@pytest.mark.serial
def test_start_up_has_its_own_bound_and_names_the_rank_that_outlives_it(tiny_5b, shards_10, tmp_path):
    def ranks(name: str, *settings: str) -> tuple[subprocess.Popen, subprocess.Popen, torch.distributed.Store]:
        args = overrides(tiny_5b, shards_10, tmp_path / name, "train.max_steps=2", *settings)
        port = free_port()
        logs = [(tmp_path / f"{name}-rank{r}.log").open("w") for r in range(2)]
        rank0 = start_rank(0, port, args, logs[0])
        # connected before rank 1 starts (rank 0 serves the store while it waits for it at the rendezvous): a
        # client still retrying its connection could see rank 1's start-up only once it is over
        store = torch.distributed.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=120))
        return rank0, start_rank(1, port, args, logs[1]), store

    def output(name: str, rank: int) -> str:
        return (tmp_path / f"{name}-rank{rank}.log").read_text()

    # slower at start-up than run.collective_timeout_s, within run.startup_timeout_s: trains
    rank0, rank1, store = ranks("slow", "checkpoint.every_steps=0", "run.collective_timeout_s=4",
                               "run.startup_timeout_s=90")
    try:
        stop_rank_once_it_is(rank1, 1, store, VALIDATION)
        store.wait(["trainer/startup/0/building the DeepSpeed engine"])  # rank 0 waits for rank 1 from here on
        time.sleep(12)  # not synchronisation: the slowness itself, three collective timeouts long
        resumed = time.time()
        rank1.send_signal(signal.SIGCONT)
        codes = rank0.wait(timeout=300), rank1.wait(timeout=60)
    finally:
        rank0.kill()
        rank1.kill()
    assert codes == (0, 0), output("slow", 0)[-3000:] + output("slow", 1)[-3000:]
    assert "step       2" in output("slow", 0)
    first = json.loads((tmp_path / "slow" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["optimizer_step"] == 1 and first["time"] > resumed  # rank 0 waited for rank 1 through it all

    # slower than run.startup_timeout_s: every rank stops, and rank 0's message names rank 1 and its host
    rank0, rank1, store = ranks("slower", "run.collective_timeout_s=4", "run.startup_timeout_s=15")
    try:
        stop_rank_once_it_is(rank1, 1, store, VALIDATION)
        rank0.wait(timeout=90)
        rank1.send_signal(signal.SIGCONT)  # it wakes up past its own bound, its peer gone
        rank1.wait(timeout=90)
    finally:
        rank0.kill()
        rank1.kill()
    output0 = output("slower", 0)
    assert rank0.returncode == EXIT_LOST_PEER, output0[-3000:]
    assert (f"error [rank 0 on {socket.gethostname()}]: start-up did not finish within run.startup_timeout_s=15"
            in output0), output0[-3000:]
    # stopped while T5 loads and encodes (or, a moment later, the transformer loads): no collective in either
    assert re.search(rf"the other ranks wait for the slowest: rank 1 on {socket.gethostname()} \(at: "
                     rf"({re.escape(VALIDATION)}|loading the transformer)\)", output0), output0[-3000:]
    assert rank1.returncode not in (0, None), output("slower", 1)[-3000:]
    assert "Traceback" not in output0


def test_the_watchdog_says_what_happened():
    from trainer.watchdog import Watchdog

    one = Watchdog(startup_s=1800, steady_s=300, rank=0, world_size=1)
    assert one.message(2000) == "start-up did not finish within run.startup_timeout_s=1800 (2000 s; this rank is " \
                                "at: start-up)"
    one.started_up()
    assert "lost contact" not in one.message(400) and one.message(400).startswith(
        "no progress for 400 s since the first optimizer step (run.collective_timeout_s=300): the step hangs")
    two = Watchdog(startup_s=1800, steady_s=300, rank=1, world_size=2)
    two.started_up()
    assert two.message(400).startswith("lost contact with another rank: no progress for 400 s")
    assert two.bound == 300 and Watchdog(1800, 300, 0, 2).bound == 1800  # start-up's bound until the first step
