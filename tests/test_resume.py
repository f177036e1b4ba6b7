"""A run interrupted anywhere ends bit-identical to one that never was (real DeepSpeed ranks, real signals).

Every run here is examples/tiny.yaml on 2 ranks under the deepspeed launcher: 8 optimizer steps, a checkpoint
every 4, each step logged. The uninterrupted run of each ZeRO stage is the reference; interrupted runs are
SIGKILLed at a random point after step 4's checkpoint, stopped by SIGTERM at a step that is not a checkpoint
step, or killed inside a checkpoint save, and then rerun with the same command.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from helpers import (
    REPO,
    assert_equal_lora,
    assert_same_run,
    lora,
    lora_file,
    read_metrics,
    run_train,
    train_env,
    wandb_history,
    wandb_records,
    zero_config,
)
from trainer.errors import EXIT_PREEMPTED
from trainer.process_env import free_port

pytestmark = pytest.mark.slow
STEPS, EVERY = 8, 4


def overrides(tiny_5b, shards, run_dir: Path, config: Path, *extra: str) -> tuple[str, ...]:
    return (f"model.path={tiny_5b}", f"data.shards={shards}", f"run.output_dir={run_dir}",
            f"deepspeed.config={config}", f"train.max_steps={STEPS}", f"checkpoint.every_steps={EVERY}",
            "checkpoint.every_minutes=null", "logging.every_steps=1", "logging.sample_keys=true",
            "optim.warmup_steps=2", "lora.dropout=0.1",  # dropout: the global CPU generator matters
            f"validation.loss.shards={shards}", "validation.loss.every_steps=1", "validation.loss.timesteps=2",
            *RECIPE, *extra)


# The recipe knobs resume must carry bit for bit: caption dropout (per sample and epoch), the LoRA's moving
# average (checkpointed whole, validated with), logit-normal timesteps restricted to a range, stratified.
RECIPE = ("data.caption_dropout=0.25", "train.ema=0.8", "validation.use_ema=true",
          "train.timestep_sampling={distribution: logit_normal, mean: 0.3, std: 1.2, range: [20, 980], "
          "stratified: true}")


def launch(args: tuple[str, ...], ranks: int = 2, script: str = "launch/train.py") -> subprocess.Popen:
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher), "--num_gpus", str(ranks), "--master_port", str(free_port()), script,
           "--spec", "examples/tiny.yaml", *[a for o in args for a in ("--set", o)]]
    return subprocess.Popen(cmd, cwd=REPO, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def rank_processes(proc: subprocess.Popen) -> list[psutil.Process]:
    """The trainer processes under the deepspeed launcher (runner -> launch.py -> one per rank): what SLURM
    signals, since it signals every process of a task (the loader reads in threads of these processes)."""
    return [p for p in psutil.Process(proc.pid).children(recursive=True)
            if any(a.startswith("--local_rank") for a in p.cmdline())]


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def reference(request, tiny_5b, shards_10, tmp_path_factory):
    """The uninterrupted run of one ZeRO stage."""
    root = tmp_path_factory.mktemp(f"zero{request.param}")
    config = zero_config(root, request.param)
    run_dir = root / "reference"
    proc = run_train(REPO / "examples" / "tiny.yaml", ranks=2, overrides=overrides(tiny_5b, shards_10, run_dir, config))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return request.param, config, run_dir


def sigkill_after_step_4s_checkpoint(args: tuple[str, ...], run_dir: Path) -> None:
    """Start the run and SIGKILL it at a random point after step 4's checkpoint; rerun it to the end."""
    more = random.Random(os.getpid()).randrange(0, 3)  # steps to let pass after step 4's checkpoint
    proc, seen, countdown = launch(args), [], None
    for line in proc.stdout:
        seen.append(line)
        if "checkpoint: saved" in line and "step_00000004" in line:
            countdown = more
        elif countdown is not None and line.startswith("step "):
            countdown -= 1
        if countdown is not None and countdown < 0 or countdown == 0 and more == 0:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank, no chance to clean up
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    assert not (run_dir / "lora").exists()
    resumed = run_train(REPO / "examples" / "tiny.yaml", ranks=2, overrides=args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed: from" in resumed.stderr and "step_00000004" in resumed.stderr


def test_sigkill_at_a_random_point_after_a_checkpoint_then_resume(reference, tiny_5b, shards_10, tmp_path):
    stage, config, ref_dir = reference
    if stage == 3:  # for the suite's time: ZeRO-3 is killed and resumed bitwise in the sequence-parallel test
        pytest.skip("one stage is enough here; test_sequence_parallel_sigkill_then_resume_is_bitwise runs ZeRO-3")
    run_dir, args = tmp_path / "run", overrides(tiny_5b, shards_10, tmp_path / "run", config)
    sigkill_after_step_4s_checkpoint(args, run_dir)
    assert_same_run(run_dir, ref_dir)


def test_image_to_video_sigkill_then_resume_is_bitwise(tiny_15_i2v, packed_15_i2v, tmp_path):
    """Image-to-video draws each step's image noise, posterior sample and dropout from (seed, data rank, step),
    and its held-out loss from fixed seeds: a killed and rerun run ends equal to the uninterrupted one (ZeRO-2,
    image dropout 0.5 so that the dropout draws matter, the held-out loss every step)."""
    config, extra = zero_config(tmp_path, 2), ("data.image_dropout=0.5", "validation.prompts=[]")
    ref_dir = killed_and_rerun_ends_equal(tiny_15_i2v, packed_15_i2v, tmp_path, config, extra,
                                          "CogVideoX 1.5 image-to-video")
    # and the held-out loss, which encodes images too, leaves no trace: the same run without it ends equal
    quiet = tmp_path / "without-validation"
    proc = run_train(REPO / "examples" / "tiny.yaml", ranks=2, overrides=(
        *overrides(tiny_15_i2v, packed_15_i2v, quiet, config, *extra), "validation.loss.shards=null"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not read_metrics(quiet, validation=True)
    assert_same_run(quiet, ref_dir)


def test_sequence_parallel_sigkill_then_resume_is_bitwise(tiny_5b, shards_10, tmp_path):
    """Two ranks as one sequence group (parallel.sequence 2, ZeRO-3): the group shares its data position,
    timesteps and noise (the data-parallel rank's), DeepSpeed saves and loads the partitions over both ranks, and the
    killed and rerun run ends equal to the uninterrupted one, held-out losses included (no LoRA dropout: it is
    refused with sequence parallelism)."""
    config, extra = zero_config(tmp_path, 3), ("parallel.sequence=2", "lora.dropout=0.0", "validation.prompts=[]")
    killed_and_rerun_ends_equal(tiny_5b, shards_10, tmp_path, config, extra, "1 data-parallel x 2 sequence-parallel")


def killed_and_rerun_ends_equal(model, shards, tmp_path, config, extra, says: str) -> Path:
    """The uninterrupted run (which prints ``says``), and the same run SIGKILLed after step 4's checkpoint and
    rerun: the same LoRA, losses and held-out losses. Returns the uninterrupted run's directory."""
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    proc = run_train(REPO / "examples" / "tiny.yaml", ranks=2, overrides=overrides(model, shards, ref_dir, config,
                                                                                    *extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert says in proc.stderr
    sigkill_after_step_4s_checkpoint(overrides(model, shards, run_dir, config, *extra), run_dir)
    assert_same_run(run_dir, ref_dir)
    ours, theirs = read_metrics(run_dir, validation=True), read_metrics(ref_dir, validation=True)
    assert [m["val_loss"] for m in ours] == [m["val_loss"] for m in theirs] and len(theirs) == STEPS
    return ref_dir


def test_sigterm_saves_at_the_step_it_arrives_and_the_rerun_finishes_equal(reference, tiny_5b, shards_10, tmp_path):
    stage, config, ref_dir = reference
    run_dir = tmp_path / "run"
    args = overrides(tiny_5b, shards_10, run_dir, config, "logging.wandb={project: resume, mode: offline}")
    proc, seen = launch(args), []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step       5"):  # SLURM signals every process of the job step; so do we
            for rank in rank_processes(proc):
                rank.send_signal(signal.SIGTERM)
            break
    seen += proc.stdout.readlines()
    proc.wait()
    output = "".join(seen)
    assert proc.returncode == EXIT_PREEMPTED, output
    saved = [p for p in (run_dir / "checkpoints").glob("step_*") if (p / "complete.json").is_file()]
    stopped_at = max(int(p.name.removeprefix("step_")) for p in saved)
    assert 5 <= stopped_at < STEPS and stopped_at % EVERY, output  # a step no schedule would have saved
    assert f"stopped by SIGTERM after optimizer step {stopped_at}" in output
    marker = json.loads((run_dir / "checkpoints" / f"step_{stopped_at:08d}" / "complete.json").read_text())
    assert marker["optimizer_step"] == stopped_at and marker["samples_seen"] == stopped_at * 4
    resumed = run_train(REPO / "examples" / "tiny.yaml", ranks=2, overrides=args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(run_dir, ref_dir)
    # every step is a validation step: the stopped step's validation, skipped to save at once, is done by the
    # resumed run before it goes on; each step's held-out loss is logged once and equals the reference's
    validation = [(m["optimizer_step"], m["val_loss"]) for m in read_metrics(run_dir, validation=True)]
    assert validation == [(m["optimizer_step"], m["val_loss"]) for m in read_metrics(ref_dir, validation=True)]
    assert [step for step, _ in validation] == list(range(1, STEPS + 1))
    assert_wandb_continued(run_dir, stopped_at)
    # validation.use_ema: the end's videos were made with the average, and the LoRA saved beside them is it
    assert_equal_lora(lora_file(run_dir / "samples" / f"step_{STEPS:06d}" / "lora"), lora_file(run_dir / "lora_ema"))


def assert_wandb_continued(run_dir: Path, stopped_at: int) -> None:
    """logging.wandb offline: the stopped run and its rerun wrote one W&B run (two offline files of one id),
    the second from the step after the checkpoint; its scalars are metrics.jsonl's, the resolved spec is its
    config, and the validation videos went in as videos."""
    run_id = json.loads((run_dir / "wandb.json").read_text())["id"]
    files = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2, list((run_dir / "wandb").iterdir())
    first, second = (wandb_history(f) for f in files)
    train = {m["optimizer_step"]: m for m in read_metrics(run_dir)}
    for rows, steps in ((first, range(1, stopped_at + 1)), (second, range(stopped_at + 1, STEPS + 1))):
        losses = {r["optimizer_step"]: r["train/loss"] for r in rows if "train/loss" in r}
        assert losses == {s: train[s]["loss"] for s in steps}
        fractions = [r["train/caption_dropout_fraction"] for r in rows if "train/loss" in r]
        assert fractions == [train[s]["caption_dropout_fraction"] for s in steps]
    held_out = {r["optimizer_step"]: r["validation/loss"] for r in first + second if "validation/loss" in r}
    assert held_out == {m["optimizer_step"]: m["val_loss"] for m in read_metrics(run_dir, validation=True)}
    videos = {k.removesuffix("/path"): v for r in second for k, v in r.items()
              if k.endswith("/path") and r[k.replace("/path", "/_type")] == "video-file"}
    assert sorted(videos) == ["validation/000-a-red-ball-moving-left", "validation/001-a-blue-square-moving-up"]
    assert all((files[1].parent / "files" / path).stat().st_size > 0 for path in videos.values())  # the mp4s
    run = [r.run for r in wandb_records(files[0]) if r.WhichOneof("record_type") == "run"][0]
    spec = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert spec["run"]["output_dir"] == str(run_dir) and spec["train"]["ema"] == 0.8
    assert run.display_name == spec["run"]["name"] == "quickstart" and run.project == "resume"


def test_killed_inside_a_checkpoint_save_resumes_from_the_one_before(reference, tiny_5b, shards_10, tmp_path):
    """Rank 1 dies after DeepSpeed wrote step 8's files and before the marker: step 8 must be ignored."""
    stage, config, ref_dir = reference
    if stage == 3:
        pytest.skip("one stage is enough for the save path; ZeRO-3's files are covered by the other tests")
    run_dir, args = tmp_path / "run", overrides(tiny_5b, shards_10, tmp_path / "run", config)
    crash = launch(args, script="tests/crash_in_save.py")
    output = crash.communicate()[0]
    assert crash.returncode != 0, output
    step8 = run_dir / "checkpoints" / "step_00000008"
    assert any(step8.glob("*.pt")) and not (step8 / "complete.json").exists(), output
    assert (run_dir / "checkpoints" / "step_00000004" / "complete.json").is_file()
    resumed = run_train(REPO / "examples" / "tiny.yaml", ranks=2, overrides=args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed: from" in resumed.stderr and "step_00000004" in resumed.stderr
    assert_same_run(run_dir, ref_dir)
    complete = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert complete == ["step_00000004", "step_00000008"]
    assert (run_dir / "checkpoints" / "step_00000008" / "complete.json").is_file()


def sample_log(run_dir: Path) -> dict[int, list[dict]]:
    """Every micro-step the run trained, by optimizer step, from all ranks' sample logs."""
    steps: dict[int, list[dict]] = {}
    for path in sorted((run_dir / "sample_keys").glob("rank_*.jsonl")):
        for record in map(json.loads, path.read_text().splitlines()):
            steps.setdefault(record["optimizer_step"], []).append(record)
    return steps


def test_a_two_rank_checkpoint_resumes_on_one_rank_and_back(tiny_5b, shards_10, tmp_path):
    """2 ranks x 2 micro-steps, then 1 rank x 4, then 2 ranks x 2 again: 4 samples per optimizer step all along.
    The global micro-batch sequence goes on where samples seen says, across both switches."""
    from trainer.data import MicroBatches, load_empty_prompts
    from trainer.families import family_for
    from trainer.shard_index import build_index

    run_dir, config = tmp_path / "run", zero_config(tmp_path, 2)

    def leg(ranks: int, accumulation: int, steps: int) -> subprocess.CompletedProcess:
        args = overrides(tiny_5b, shards_10, run_dir, config, f"train.max_steps={steps}", "optim.schedule=constant",
                         f"train.gradient_accumulation_steps={accumulation}")
        return run_train(REPO / "examples" / "tiny.yaml", ranks=ranks, overrides=args)

    first = leg(2, 2, 4)
    assert first.returncode == 0, first.stderr[-3000:]
    exported, average = lora(run_dir), lora_file(run_dir / "lora_ema")
    same = leg(1, 4, 4)  # resume at the end on 1 rank: the universal checkpoint holds exactly the saved weights
    assert same.returncode == 0 and "universal checkpoint" in same.stderr, same.stderr[-3000:]
    assert all(torch.equal(exported[k], lora(run_dir)[k]) for k in exported)
    # and the moving average (whole in the checkpoint, partitioned again for 1 rank) exactly the saved one
    assert all(torch.equal(average[k], lora_file(run_dir / "lora_ema")[k]) for k in average)
    assert not all(torch.equal(average[k], exported[k]) for k in average)
    assert (run_dir / "checkpoints" / "universal" / "step_00000004" / "complete.json").is_file()
    for ranks, accumulation, steps in ((1, 4, 7), (2, 2, 9)):
        proc = leg(ranks, accumulation, steps)
        assert proc.returncode == 0, proc.stderr[-3000:]

    shapes = family_for(tiny_5b).sample_shapes()
    shards = sorted(map(str, shards_10.glob("*.tar")))
    empty = load_empty_prompts(shards, shapes.prompt_shape)
    data = MicroBatches(build_index(shards, shapes), seed=0, micro_batch_size=1, group=4, rank=0, world_size=1,
                        shapes=shapes, caption_dropout=0.25, empty_prompts=empty)
    log = sample_log(run_dir)
    assert sorted(log) == list(range(1, 10))
    for step, records in log.items():
        assert len(records) == 4  # micro-steps of all ranks
        ranks = {r["rank"] for r in records}
        assert ranks == ({0} if 5 <= step <= 7 else {0, 1}), (step, ranks)
        expected = range((step - 1) * 4, step * 4)  # global micro-batches of this optimizer step
        got = sorted(r["position"][0] * data.per_epoch + r["position"][1] for r in records)
        assert got == list(expected), (step, got)
        for record in records:
            g = record["position"][0] * data.per_epoch + record["position"][1]
            assert [s.split(":")[1] for s in record["samples"]] == data[g].keys
    metrics = read_metrics(run_dir)
    assert [m["samples_seen"] for m in metrics] == [4 * s for s in range(1, 10)]
    # each step's logged fraction of empty captions is the one the (seed, sample, epoch) draws give, on any ranks
    assert [m["caption_dropout_fraction"] for m in metrics] == [
        sum(data[g].captions_dropped for g in range((s - 1) * 4, s * 4)) / 4 for s in range(1, 10)]
    assert 0 < sum(m["caption_dropout_fraction"] for m in metrics) < 9
    # the lr scheduler went through both universal loads: no second warmup (2 steps to 1e-2, then constant)
    assert [m["lr"] for m in metrics] == pytest.approx([5e-3] + [1e-2] * 8)
    assert all(m["loss"] == m["loss"] for m in metrics)  # finite after each switch


def test_a_sequence_parallel_checkpoint_resumes_on_another_number_of_ranks(tiny_5b, shards_10, tmp_path):
    """2 ranks as one sequence group, then 1 rank, then the group again (one data-parallel rank throughout, so
    the same samples, timesteps and noise): DeepSpeed's universal conversion and loading go through the sequence
    groups' checkpoints (they once recorded a tensor-parallel degree of 2 over one model file, which the
    conversion refused), and every step's loss is the uninterrupted 1-rank run's within the split's 1e-5."""
    run_dir, ref_dir, config = tmp_path / "run", tmp_path / "reference", zero_config(tmp_path, 2)

    def leg(out: Path, ranks: int, steps: int) -> subprocess.CompletedProcess:
        args = overrides(tiny_5b, shards_10, out, config, f"train.max_steps={steps}", "train.precision=fp32",
                         f"parallel.sequence={ranks}", "lora.dropout=0.0", "validation.prompts=[]",
                         "validation.loss.shards=null", "checkpoint.every_steps=2", "optim.schedule=constant")
        proc = run_train(REPO / "examples" / "tiny.yaml", ranks=ranks, overrides=args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    for ranks, steps in ((2, 4), (1, 6), (2, 8)):
        proc = leg(run_dir, ranks, steps)
        assert steps == 4 or "(another number of ranks: universal checkpoint)" in proc.stderr
    leg(ref_dir, 1, 8)
    ours, theirs = read_metrics(run_dir), read_metrics(ref_dir)
    assert [m["optimizer_step"] for m in ours] == list(range(1, 9))
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine["samples_seen"] == reference["samples_seen"]
        assert mine["loss"] == pytest.approx(reference["loss"], rel=1e-5)


def test_time_based_checkpoints(tiny_5b, shards_10, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(REPO / "examples" / "tiny.yaml", overrides=(
        f"model.path={tiny_5b}", f"data.shards={shards_10}", f"run.output_dir={run_dir}", "train.max_steps=3",
        "optim.warmup_steps=1", "checkpoint.every_steps=0", "checkpoint.every_minutes=0.0001",
        "checkpoint.keep_last=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = [e["optimizer_step"] for e in map(json.loads, (run_dir / "events.jsonl").read_text().splitlines())
             if e["event"] == "checkpoint"]
    assert saved == [1, 2, 3]  # every step takes longer than 6 ms
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000003"]
