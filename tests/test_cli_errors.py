"""Bad input through launch/train.py: one message naming the field or file, exit status 2, no traceback,
and nothing started (no run directory, no process group)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import webdataset as wds

from data_tools import shard
from helpers import META, run_python, run_train, write_spec
from trainer.shard_format import encode_sample


@pytest.fixture
def good_spec(tiny_5b, shards_5b, tmp_path) -> dict:
    return {"run": {"output_dir": str(tmp_path / "run")}, "model": {"path": str(tiny_5b)},
            "data": {"shards": str(shards_5b), "num_workers": 0}, "train": {"max_steps": 2}}


def fails_with(tmp_path: Path, spec: dict, *expected: str, overrides=(), ranks=None, env=None,
               check_no_run_dir=True) -> str:
    proc = run_train(write_spec(tmp_path / "run.yaml", spec), ranks=ranks, overrides=overrides, env=env)
    assert proc.returncode != 0
    if ranks is None:
        assert proc.returncode == 2
    err = proc.stderr
    assert "Traceback" not in err, err
    assert err.count("error:") == 1, err  # one message, from one rank
    for text in expected:
        assert err.count(text) == 1, err
    if check_no_run_dir:
        assert not (tmp_path / "run").exists()  # failed before the run started
    return err


def test_unknown_key(tmp_path, good_spec):
    fails_with(tmp_path, {**good_spec, "lora": {"rank": 4, "alpah": 8}}, "run.yaml", "lora.alpah: unknown field")


def test_wrong_type(tmp_path, good_spec):
    fails_with(tmp_path, {**good_spec, "train": {"max_steps": "ten"}}, "train.max_steps", "'ten'")


def test_wrong_type_from_the_command_line(tmp_path, good_spec):
    fails_with(tmp_path, good_spec, "train.gradient_accumulation_steps",
               overrides=("train.gradient_accumulation_steps=-1",))


def test_missing_model_directory(tmp_path, good_spec):
    missing = tmp_path / "no-model-here"
    fails_with(tmp_path, {**good_spec, "model": {"path": str(missing)}}, f"model.path: no such directory: {missing}")


def test_shards_that_match_no_file(tmp_path, good_spec):
    pattern = str(tmp_path / "train-{000000..000003}.tar")
    fails_with(tmp_path, {**good_spec, "data": {"shards": pattern}}, "data.shards:", "train-000000.tar")


def test_shards_whose_shapes_do_not_fit_the_model(tmp_path, good_spec):
    shard = tmp_path / "shards" / "wrong-000000.tar"
    shard.parent.mkdir()
    with wds.TarWriter(str(shard), encoder=False) as sink:  # packed for a real 5B: 16 channels, T5-XXL width
        sink.write(encode_sample("clip-17", torch.zeros(16, 3, 12, 16), torch.zeros(226, 4096), META))
    fails_with(tmp_path, {**good_spec, "data": {"shards": str(shard.parent)}},
               f"shard {shard}, sample 'clip-17': latents have 16 channels", "in_channels=4")


def test_shards_packed_for_another_models_vae(tmp_path, good_spec, videos, tiny_2b):
    """Same shapes, wrong scale: 2B-style latents (scaling_factor 1.15) for a 5B-style model (0.7)."""
    out = tmp_path / "packed-for-2b"
    assert shard.main(["--input", str(videos), "--model", str(tiny_2b), "--out", str(out), "--frames", "9",
                       "--height", "96", "--width", "128", "--shard-size", "3"]) == 0
    fails_with(tmp_path, {**good_spec, "data": {"shards": str(out), "num_workers": 0}},
               f"data.shards: {out} was packed with a VAE scaling_factor of 1.15258426", "model.path's VAE has 0.7")


def test_deepspeed_config_contradicting_the_spec(tmp_path, good_spec):
    config = tmp_path / "mine.json"
    config.write_text('{"zero_optimization": {"stage": 2}, "gradient_clipping": 0.3}')
    fails_with(tmp_path, {**good_spec, "deepspeed": {"config": str(config)}},
               "deepspeed.config", "gradient_clipping is 0.3", "train.max_grad_norm")


def test_an_earlier_run_is_never_overwritten(tmp_path, good_spec):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    proc = run_train(write_spec(tmp_path / "run.yaml", {**good_spec, "checkpoint": {"resume": "none"}}))
    assert proc.returncode == 2 and "already holds an earlier run (metrics.jsonl)" in proc.stderr, proc.stderr
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == "{}\n"
    # resume: auto continues from a complete checkpoint, but a finished run that kept none is not redone
    (tmp_path / "run" / "lora").mkdir()
    proc = run_train(write_spec(tmp_path / "run.yaml", good_spec))
    assert proc.returncode == 2 and "holds a finished run (lora/) without a complete checkpoint" in proc.stderr


def test_resuming_under_settings_the_checkpoint_cannot_continue_is_refused(tmp_path, good_spec):
    step = tmp_path / "run" / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    (step / "complete.json").write_text('{"optimizer_step": 4, "world_size": 1, "micro_batch_size": 2, "seed": 0, '
                                        '"zero_stage": 3, "data_fingerprint": "x"}')
    err = fails_with(tmp_path, good_spec, f"checkpoint.resume: {step} cannot continue with this spec",
                     "data.micro_batch_size is 1, the checkpoint's is 2", "is ZeRO-2, the checkpoint's is ZeRO-3",
                     check_no_run_dir=False)
    assert "seed" not in err


def test_resuming_from_an_incomplete_checkpoint_is_refused(tmp_path, good_spec):
    broken = tmp_path / "elsewhere" / "step_00000004"
    broken.mkdir(parents=True)  # what a save killed half-way leaves: files, but no complete.json
    fails_with(tmp_path, {**good_spec, "checkpoint": {"resume": str(broken)}},
               f"checkpoint.resume: {broken} is not a complete checkpoint")


@pytest.mark.slow
def test_two_ranks_under_the_launcher_say_it_once_and_fail(tmp_path, good_spec):
    fails_with(tmp_path, {**good_spec, "lora": {"target_modules": ["to_qkv"]}},
               "lora.target_modules: ['to_qkv'] match no module", ranks=2)


def test_tasks_started_without_rank_variables_are_refused(tmp_path, good_spec):
    # srun -n 2 python launch/train.py: without RANK/WORLD_SIZE every task would be a rank 0 of its own
    # (an sbatch script's shell: SLURM_NTASKS counts the allocation, but there is no srun step)
    fails_with(tmp_path, good_spec, "SLURM_NTASKS=2 but this process is not one of several ranks",
               env={"SLURM_NTASKS": "2", "SLURM_PROCID": "0"})


def test_an_srun_task_whose_first_node_does_not_resolve_is_told_to_set_master_addr(tmp_path, good_spec):
    fails_with(tmp_path, good_spec, "MASTER_ADDR: the first node of the step, 'no-such-node7'",
               env={"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "7",
                    "SLURM_JOB_NODELIST": "no-such-node[7-8]"})


def test_validation_settings_the_model_cannot_sample(tmp_path, good_spec):
    video = {"prompts": ["a cat"], "num_frames": 9, "height": 96, "width": 128}
    fails_with(tmp_path, {**good_spec, "validation": {**video, "num_frames": 8}},
               "validation.num_frames: 8 frames is off CogVideoX 1.0's frame rule 8k+1", "for example 9")
    fails_with(tmp_path, {**good_spec, "validation": {**video, "width": 120}},
               "validation.width: 120 is not a multiple of 16")
    missing = tmp_path / "held-out"
    fails_with(tmp_path, {**good_spec, "validation": {"loss": {"shards": str(missing)}}},
               f"validation.loss.shards: no such file or directory: {missing}")


def test_validation_prompts_need_the_text_encoder(tmp_path, good_spec, tiny_5b):
    import shutil

    partial = tmp_path / "transformer-only"
    for part in ("transformer", "scheduler", "vae"):
        shutil.copytree(tiny_5b / part, partial / part)
    fails_with(tmp_path, {**good_spec, "model": {"path": str(partial)}, "validation": {"prompts": ["a cat"]}},
               f"validation.prompts: sampling videos needs the model directory's VAE and text encoder, but "
               f"{partial} lacks model_index.json, text_encoder/config.json, tokenizer")


def tool_fails_with(args: list[str], *expected: str) -> None:
    proc = run_python(*args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    for text in expected:
        assert text in proc.stderr, proc.stderr


def test_sample_and_export_tools_name_the_bad_option(tmp_path, tiny_5b):
    tool_fails_with(["launch/sample.py", "--model", str(tiny_5b), "--prompt", "a cat", "--num-frames", "8",
                     "--out", str(tmp_path)], "--num-frames: 8 frames is off CogVideoX 1.0's frame rule 8k+1")
    tool_fails_with(["launch/sample.py", "--model", str(tmp_path / "none"), "--prompt", "a cat", "--out",
                     str(tmp_path)], f"--model: no such directory: {tmp_path / 'none'}")
    tool_fails_with(["launch/sample.py", "--model", str(tiny_5b), "--out", str(tmp_path)], "--prompt: no prompts")
    half = tmp_path / "run" / "checkpoints" / "step_00000004"
    half.mkdir(parents=True)  # a save that never completed
    tool_fails_with(["launch/export.py", "--checkpoint", str(half)], "--spec:")
    spec = {"model": {"path": str(tiny_5b)}, "data": {"shards": "x"}, "train": {"max_steps": 1}}
    write_spec(tmp_path / "run" / "spec.yaml", spec)
    tool_fails_with(["launch/export.py", "--checkpoint", str(half)],
                    f"--checkpoint: {half} is not a complete checkpoint (no complete.json)")
    # the command it replaced says where it went
    tool_fails_with(["-m", "trainer.export", "--checkpoint", str(half)], "python launch/export.py")


def test_recipe_settings_the_data_or_the_machine_cannot_serve(tmp_path, good_spec, tiny_5b):
    """Caption dropout over shards without the empty caption's embedding (the file named), W&B online without
    an API key, a timestep range past the schedule, and validation with an average that is not kept: refused
    before any work."""
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(good_spec["data"]["shards"], bare)
    (bare / "empty_prompt.safetensors").unlink()
    fails_with(tmp_path, {**good_spec, "data": {"shards": str(bare), "caption_dropout": 0.1}},
               f"data.caption_dropout: {bare / 'empty_prompt.safetensors'} is missing")
    home = tmp_path / "home"  # no ~/.netrc: nothing `wandb login` wrote
    home.mkdir()
    env = {"HOME": str(home), "WANDB_API_KEY": "", "NETRC": str(home / ".netrc")}
    fails_with(tmp_path, {**good_spec, "logging": {"wandb": {"project": "p"}}},
               "logging.wandb.mode is online, but W&B has no API key here: run `wandb login`", env=env)
    fails_with(tmp_path, {**good_spec, "train": {"max_steps": 2, "timestep_sampling": {"range": [0, 1000]}}},
               "train.timestep_sampling.range: [0, 1000] goes past the model's last timestep (999")
    fails_with(tmp_path, {**good_spec, "validation": {"use_ema": True}}, "validation.use_ema", "set train.ema")
