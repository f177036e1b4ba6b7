"""The project's own sbatch scripts on a real SLURM (two simulated nodes on this machine, one task each).

Skipped, with the reason, where SLURM cannot be installed or started; .ci/run installs it and sets
REQUIRE_CLUSTER_TESTS=1, which turns a skip into a failure. Nothing here fakes srun or sbatch.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import slurm_cluster
from helpers import REPO, assert_same_run, lora, read_metrics, skip_or_fail, train_env

pytestmark = pytest.mark.slow
STEPS = 300  # enough optimizer steps (about 0.05 s each here) for a signal to arrive in the middle of training
SIGNAL_AFTER = 10


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = slurm_cluster.unavailable()
    if reason:
        skip_or_fail(reason)
    cluster = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    yield cluster
    slurm_cluster.stop(cluster)


def submit(cluster, script: str, log: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """sbatch --wait the script on 2 nodes x 1 task (no GPUs on these nodes); returns the waiting sbatch and
    the job id."""
    env = {**train_env(), **cluster.env, "TRAINER_PYTHON": sys.executable}
    cmd = ["sbatch", "--wait", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
           "--gpus-per-node=0", f"--output={log}", script, *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job_id = proc.stdout.readline().strip().split(";")[0]
    assert job_id.isdigit(), proc.communicate()[1]
    return proc, job_id


def train_args(tiny_5b, shards_10, run_dir: Path) -> list[str]:
    sets = [f"model.path={tiny_5b}", f"data.shards={shards_10}", f"run.output_dir={run_dir}",
            f"train.max_steps={STEPS}", "optim.warmup_steps=2", "logging.every_steps=1",
            "checkpoint.every_steps=100", "checkpoint.every_minutes=null", "lora.dropout=0.1"]
    return ["examples/tiny.yaml", *[a for s in sets for a in ("--set", s)]]


def finished(proc: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    proc.wait(timeout=timeout)
    text = log.read_text() if log.exists() else "(no job log)"
    assert proc.returncode == 0, f"sbatch --wait returned {proc.returncode}: {proc.stderr.read()}\n{text[-4000:]}"
    return text


@pytest.fixture(scope="module")
def uninterrupted(cluster, tiny_5b, shards_10, tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("slurm-train")
    log = root / "job.log"
    proc, job_id = submit(cluster, "launch/slurm/train.sbatch", log, *train_args(tiny_5b, shards_10, root / "run"))
    return root / "run", finished(proc, log)


def test_the_sbatch_script_trains_on_two_nodes_and_exports_the_lora(uninterrupted):
    run_dir, log = uninterrupted
    assert "on n[1-2]: 2 ranks, rendezvous 127.0.0.1:" in log
    assert "ZeRO-2, bf16, 2 rank(s)" in log
    exported = lora(run_dir)
    assert exported and all(t.isfinite().all() for t in exported.values())
    assert [m["optimizer_step"] for m in read_metrics(run_dir)] == list(range(1, STEPS + 1))
    assert "ranks exited with status 0" in log


def test_a_signalled_job_saves_requeues_resumes_and_ends_equal(cluster, uninterrupted, tiny_5b, shards_10,
                                                               tmp_path):
    """What a time limit does with `#SBATCH --signal=USR1@600`, sent now: scancel --signal=USR1 reaches every
    task; the trainer saves and exits 75, the script requeues the job, and the second allocation resumes."""
    reference, _ = uninterrupted
    run_dir, log = tmp_path / "run", tmp_path / "job.log"
    proc, job_id = submit(cluster, "launch/slurm/train.sbatch", log, *train_args(tiny_5b, shards_10, run_dir))
    metrics = run_dir / "metrics.jsonl"
    cluster.wait_for(f"optimizer step {SIGNAL_AFTER}", lambda: proc.poll() is not None or (
        metrics.exists() and len(metrics.read_text().splitlines()) >= SIGNAL_AFTER), timeout=300)
    assert proc.poll() is None, f"the job ended before it was signalled:\n{log.read_text()[-3000:]}"
    cluster.run("scancel", "--signal=USR1", job_id)

    # SLURM holds a requeued job for about two minutes (its BeginTime); release it at once.
    def requeued():
        state = cluster.job_state(job_id)["JobState"]
        assert state in ("RUNNING", "COMPLETING", "REQUEUED", "PENDING"), \
            f"job {job_id} is {state}, not requeued:\n{log.read_text()[-3000:]}"
        return state == "PENDING"

    cluster.wait_for("the requeue", requeued, timeout=120)
    cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    text = finished(proc, log)

    stopped = re.search(r"stopped by SIGUSR1 after optimizer step (\d+)", text)
    assert stopped and SIGNAL_AFTER <= int(stopped.group(1)) < STEPS, text[-3000:]
    assert f"checkpoint saved; requeueing job {job_id}" in text
    assert f"job {job_id} (restart 1)" in text
    assert f"resumed: from {run_dir}/checkpoints/step_{int(stopped.group(1)):08d}" in text
    assert cluster.job_state(job_id)["Restarts"] == "1"
    assert_same_run(run_dir, reference)


def test_the_sbatch_script_takes_a_sequence_group_and_says_when_it_spans_nodes(cluster, tiny_5b, shards_10, tmp_path):
    """parallel.sequence through the sbatch script's --set: the two srun tasks train one sample together; with
    one task a node the group spans both nodes, which the trainer warns about (its all-to-alls cross the
    network) and still trains."""
    run_dir, log = tmp_path / "run", tmp_path / "job.log"
    args = [*train_args(tiny_5b, shards_10, run_dir), "--set", "train.max_steps=6", "--set", "lora.dropout=0.0",
            "--set", "parallel.sequence=2"]
    text = finished(*[submit(cluster, "launch/slurm/train.sbatch", log, *args)[0]], log)
    assert "1 data-parallel x 2 sequence-parallel" in text
    assert "parallel.sequence 2 with 1 rank(s) on this node: a sequence group spans nodes" in text
    assert [m["optimizer_step"] for m in read_metrics(run_dir)] == list(range(1, 7))
    assert all(t.isfinite().all() for t in lora(run_dir).values()) and "ranks exited with status 0" in text


def test_the_packing_script_packs_on_two_nodes_like_one_process(cluster, tiny_5b, videos, tmp_path):
    args = ["--input", str(videos), "--model", str(tiny_5b), "--frames", "9", "--height", "96", "--width", "128",
            "--shard-size", "2", "--device", "cpu"]
    single = subprocess.run([sys.executable, "data_tools/shard.py", *args, "--out", str(tmp_path / "single")],
                            cwd=REPO, env=train_env(), capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-3000:]
    log = tmp_path / "pack.log"
    proc, _ = submit(cluster, "launch/slurm/pack.sbatch", log, *args, "--out", str(tmp_path / "slurm"))
    text = finished(proc, log)
    assert "2 packing ranks" in text
    shards = sorted(p.name for p in (tmp_path / "single").glob("*.tar"))
    assert len(shards) == 3 and shards == sorted(p.name for p in (tmp_path / "slurm").glob("*.tar"))
    for name in [*shards, "manifest.json", "rejected.jsonl", "empty_prompt.safetensors"]:
        # the same bytes, whichever rank packed a shard
        assert (tmp_path / "single" / name).read_bytes() == (tmp_path / "slurm" / name).read_bytes(), name
