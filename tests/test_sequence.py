"""Sequence parallelism (parallel.sequence, trainer/sequence.py): one sample's video tokens split over ranks.

The tolerance. With the split, every forward value is computed by the same operations on the same numbers
(attention sees the whole sequence in the same order; projections act per token), so the transformer's output
and the loss come out bitwise equal to the whole model's. Gradients do not: each weight's gradient is a sum
over tokens, summed per rank and then over the ranks, a different order of fp32 additions. Measured, the
largest difference is below 1e-6 of the largest gradient (fp32's epsilon is 1.2e-7); the tests allow 1e-5,
which is still four orders below what a wrong reduction gives (the prompt's gradient kept per rank instead of
summed: 5e-2). Over 30 optimizer steps, AdamW amplifies nothing at that level: the losses and gradient norms
stay within 1e-5 of the unsplit run's.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from pydantic import ValidationError

from helpers import REPO, read_metrics, run_python, run_train, train_env, zero_config
from test_i2v_e2e import first_frames
from trainer.errors import UserError
from trainer.media import read_mp4
from trainer.process_env import free_port

TOLERANCE = 1e-5
FLAVOURS = {"5b": "tiny_5b", "2b": "tiny_2b", "1.5": "tiny_15", "5b-i2v": "tiny_5b_i2v", "1.5-i2v": "tiny_15_i2v"}


def test_a_split_micro_step_equals_the_whole_models(request, tmp_path):
    """Every tiny flavour (sin-cos and RoPE positions, 1.5's padded frames patched in pairs, the I2V channels and
    ofs, 5B-I2V's learned positions), fp32, 2 ranks: output, loss and each of 30 LoRA gradients (random LoRA
    weights, so that A and B both get one) of one micro-step with its video tokens split, against the same step
    of the whole model on one rank."""
    models = [request.getfixturevalue(name) for name in FLAVOURS.values()]
    out = tmp_path / "report.json"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port())]
    proc = subprocess.run([*torchrun, "tests/sequence_numerics.py", str(out), *map(str, models)], cwd=REPO,
                          env=train_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report.pop("all_valid") == [True, False, True]  # rank 1 could not read the second sample
    assert list(report) == [m.name for m in models]
    for flavour, found in report.items():
        assert found["output"] == 0.0 and found["loss"] == 0.0, (flavour, found)
        assert found["gradient_count"] == 30 and found["gradients_nonzero"], (flavour, found)
        assert found["gradients"] <= TOLERANCE, (flavour, found)


def _run(model, shards, run_dir, ranks, sequence, *extra):
    proc = run_train(REPO / "examples" / "tiny.yaml", ranks=ranks, overrides=(
        f"model.path={model}", f"data.shards={shards}", f"run.output_dir={run_dir}", "train.max_steps=30",
        "train.precision=fp32", f"parallel.sequence={sequence}", "logging.every_steps=1", "checkpoint.every_steps=0",
        "checkpoint.every_minutes=null", *extra))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


def assert_same_curve(ours, theirs, count):
    assert len(ours) == len(theirs) == count
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine["optimizer_step"] == reference["optimizer_step"]
        assert mine["samples_seen"] == reference["samples_seen"]
        for key in ("loss", "grad_norm"):
            assert abs(mine[key] - reference[key]) <= TOLERANCE * abs(reference[key]), (key, mine, reference)


@pytest.mark.slow
def test_thirty_steps_and_validation_split_over_two_ranks_follow_the_unsplit_run(tiny_15_i2v, packed_15_i2v,
                                                                                   tmp_path):
    """CogVideoX1.5-I2V-style, ZeRO-2, fp32: 2 ranks as one sequence group against 1 rank alone (both one
    data-parallel rank: the same samples, timesteps and noise). Every step's loss and gradient norm, the
    held-out loss and the validation videos (from an image, on both ranks of the group) agree."""
    images = first_frames(packed_15_i2v, tmp_path / "images", 2)
    extra = (f"validation.images=[{images[0]},{images[1]}]", "validation.every_steps=0",
             "validation.num_inference_steps=2", f"validation.loss.shards={packed_15_i2v}",
             "validation.loss.every_steps=15", "validation.loss.timesteps=2", "data.image_dropout=0.2")
    whole, split = tmp_path / "whole", tmp_path / "split"
    _run(tiny_15_i2v, packed_15_i2v, whole, None, 1, *extra)
    err = _run(tiny_15_i2v, packed_15_i2v, split, 2, 2, *extra)
    assert "1 data-parallel x 2 sequence-parallel" in err
    assert_same_curve(read_metrics(split), read_metrics(whole), 30)
    held_out = [(m["optimizer_step"], m["val_loss"]) for m in read_metrics(split, validation=True)]
    reference = [(m["optimizer_step"], m["val_loss"]) for m in read_metrics(whole, validation=True)]
    assert [s for s, _ in held_out] == [s for s, _ in reference] == [15, 30]
    for (_, ours), (_, theirs) in zip(held_out, reference, strict=True):
        assert abs(ours - theirs) <= TOLERANCE * theirs
    videos = sorted((split / "samples" / "step_000030").glob("*.mp4"))
    assert len(videos) == 2
    frames = [read_mp4(video) for video in videos]
    for video, ours, other in zip(videos, frames, frames[::-1], strict=True):
        theirs = read_mp4(whole / "samples" / "step_000030" / video.name)
        assert ours.shape == theirs.shape == (17, 96, 128, 3) and theirs.std() > 1
        # latents within 1e-5, then the VAE, 8 bits and the lossy H.264 encoder: a pixel that crosses a rounding
        # level can flip an encoder decision, and in the frames predicted from it the flip travels on (measured:
        # 39-65 dB over whole videos, the first frame always identical or above 53 dB). The first frame, coded
        # on its own, is the latents' likeness; the whole video is nearer its twin than the other prompt's
        assert psnr(ours[:1], theirs[:1]) >= 45, (video.name, psnr(ours[:1], theirs[:1]))
        assert psnr(ours, theirs) > psnr(ours, other) + 2, (video.name, psnr(ours, theirs), psnr(ours, other))
    assert psnr(*frames) < 40


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse))


@pytest.mark.slow
def test_two_by_two_on_four_ranks_under_zero3_follows_two_data_parallel_ranks(tiny_5b, shards_10, tmp_path):
    """4 ranks as 2 data-parallel x 2 sequence-parallel, ZeRO-3 with every parameter partitioned over all four,
    against 2 data-parallel ranks unsplit: the same 30 losses and gradient norms (a gradient N times too small,
    which DeepSpeed's ZeRO-3 reduce-scatter gives, moves the norm by 2x: trainer/engine.py)."""
    config = zero_config(tmp_path, 3)
    whole, split = tmp_path / "whole", tmp_path / "split"
    extra = (f"deepspeed.config={config}", "validation.prompts=[]", "validation.loss.shards=null")
    _run(tiny_5b, shards_10, whole, 2, 1, *extra)
    err = _run(tiny_5b, shards_10, split, 4, 2, *extra)
    assert "2 data-parallel x 2 sequence-parallel" in err
    assert_same_curve(read_metrics(split), read_metrics(whole), 30)


def test_bad_layouts_are_refused_before_any_work(tiny_5b, shards_5b, tmp_path):
    """A world the groups do not divide, heads the group does not divide, a validation clip whose tokens do not
    split: each one message from launch/train.py, exit 2, no run directory."""
    base = ("--spec", "examples/tiny.yaml", "--set", f"model.path={tiny_5b}", "--set", f"data.shards={shards_5b}",
            "--set", f"run.output_dir={tmp_path / 'run'}")
    cases = [
        ("3", ["parallel.sequence=2"],
         "parallel.sequence: the world of 3 rank(s) cannot be split into sequence-parallel groups of 2"),
        ("4", ["parallel.sequence=4"],
         "parallel.sequence: 4 does not divide the 2 attention heads of CogVideoX 1.0 text-to-video"),
        ("2", ["parallel.sequence=2", "validation.height=80", "validation.width=112"],
         "parallel.sequence: 2 does not divide the 105 video tokens of the validation videos' 9x80x112 clip"),
    ]
    for world, sets, expected in cases:
        ranks = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": world}  # rank 0 of a world that never forms
        proc = subprocess.run([sys.executable, "launch/train.py", *base, *[a for s in sets for a in ("--set", s)]],
                              cwd=REPO, env={**train_env(), **ranks}, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("error:") == 1 and expected in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_lora_dropout_and_a_zero3_reduce_scatter_are_refused(tiny_5b, tmp_path):
    """LoRA dropout would mask the prompt's tokens, which every rank of a group holds, differently on each; and
    DeepSpeed's ZeRO-3 reduce-scatter averages over the sequence ranks too (trainer/engine.py), so the config
    gets its all-reduce path, and a JSON that would leave it is refused."""
    from trainer.engine import assemble_config
    from trainer.spec import RunSpec

    raw = {"model": {"path": str(tiny_5b)}, "data": {"shards": "x"}, "train": {"max_steps": 2},
           "parallel": {"sequence": 2}}
    with pytest.raises(ValidationError, match=r"lora.dropout \(0.1\) with parallel.sequence 2: the ranks of a "
                                              r"sequence group each hold the prompt's tokens"):
        RunSpec.model_validate({**raw, "lora": {"dropout": 0.1}})
    spec = RunSpec.model_validate({**raw, "deepspeed": {"stage": 3}})
    assert assemble_config(spec, 1)["zero_optimization"]["reduce_scatter"] is False
    unsplit = RunSpec.model_validate({**raw, "parallel": {"sequence": 1}, "deepspeed": {"stage": 3}})
    assert "reduce_scatter" not in assemble_config(unsplit, 2)["zero_optimization"]
    assert assemble_config(spec, 1)["seq_parallel_communication_data_type"] == "fp32"  # DeepSpeed's, with an mpu
    for zero, top, expected in (({"reduce_scatter": True}, {}, "zero_optimization.reduce_scatter is true, but with "
                                 "parallel.sequence > 1 ZeRO-3 must all-reduce the gradients"),
                                ({"contiguous_gradients": False}, {}, "zero_optimization.contiguous_gradients is "
                                 "false, which ZeRO-3 reduces by reduce-scatter alone"),
                                ({}, {"gradient_predivide_factor": 2.0}, "gradient_predivide_factor with "
                                 "parallel.sequence > 1")):
        insisting = tmp_path / "zero3.json"
        insisting.write_text(json.dumps({"zero_optimization": {"stage": 3, **zero}, **top}))
        spec = RunSpec.model_validate({**raw, "deepspeed": {"config": str(insisting)}})
        with pytest.raises(UserError, match=re.escape(expected)):
            assemble_config(spec, 1)


def test_shards_whose_tokens_do_not_split_are_named(tiny_5b, tmp_path):
    """Samples of a grid the group cannot split (3x5x7 patches: 105 tokens over 2 ranks) are refused at start-up
    (before the model loads), naming a shard and key of that shape; a grid that splits passes."""
    from data_tools.synth import write_synthetic_shards
    from trainer.families import load_family
    from trainer.sequence import check_index
    from trainer.shard_index import build_index

    family = load_family(str(tiny_5b))
    odd = write_synthetic_shards(tiny_5b, tmp_path / "odd", samples=3, samples_per_shard=3, height=80, width=112)
    index = build_index([str(p) for p in odd], family.sample_shapes(), 0, 1, gather=lambda x: [x])
    check_index(index, family, 1, "data.shards")
    with pytest.raises(UserError) as caught:
        check_index(index, family, 2, "data.shards")
    message = str(caught.value)
    assert message.startswith("parallel.sequence: 2 does not divide the 105 video tokens of data.shards: shard ")
    assert f"{odd[0]}, sample 'synth000000' (latents [4, 3, 10, 14]; 2 more sample(s) of that shape)" in message
    assert "splits over 3, 5, 7, 15 rank(s)" in message


def test_the_planner_prints_each_group_sizes_activations_and_traffic():
    """--dry-run on the published CogVideoX1.5-5B config, 16 ranks as 2 nodes x 8 with parallel.sequence 8: the
    batch counts 2 data-parallel ranks, and the sequence table gives per-rank
    activations falling with N (the prompt and the output stay whole) and the all-to-all bytes, equal to the
    cost model's; CogVideoX-5b's 17,550 tokens do not split over 4 or 8."""
    from trainer.costs import CostModel
    from trainer.families import load_family
    from trainer.spec import LoraSection

    def dry_run(model, *sets):
        proc = run_python("launch/train.py", "--spec", "examples/cogvideox1.5-5b-lora.yaml", "--dry-run", "--ranks",
                          "16", "--set", f"model.path={REPO / 'tests' / 'configs' / model}",
                          *[a for s in sets for a in ("--set", s)])
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    out = dry_run("cogvideox1.5-5b", "parallel.sequence=8")
    assert "micro 1 x accumulation 1 x 2 data-parallel rank(s) = 2 samples per optimizer step" in out
    assert "16 (--ranks N plans for another number): 2 data-parallel x 8 sequence-parallel" in out
    family = load_family(str(REPO / "tests" / "configs" / "cogvideox1.5-5b"), weights=False)
    costs, shape = CostModel(family, LoraSection(rank=128)), (16, 21, 96, 170)
    activations = {}
    for n in (1, 2, 4, 8):
        act, sent = row(out, f"{n} *" if n == 8 else str(n))[:2]
        activations[n] = act
        assert act == pytest.approx(costs.activation_bytes(shape, 2, True, n) / 2**20, abs=0.1)
        assert sent == pytest.approx(costs.exchange_bytes(shape, 2, True, n) / 2**20, abs=0.1)
    assert activations[8] < activations[4] < activations[2] < 0.51 * activations[1]
    assert activations[8] < 0.14 * activations[1]
    out = dry_run("cogvideox-5b", "parallel.sequence=2", "data.shards=nowhere")
    assert re.search(r"^\s*4\s+does not divide the 17,550 video tokens", out, re.MULTILINE)


def row(text: str, name: str) -> list[float]:
    match = re.search(rf"^\s*{re.escape(name)}\s+([\d,.]+)\s+([\d,.]+)", text, re.MULTILINE)
    assert match, text
    return [float(v.replace(",", "")) for v in match.groups()]


def test_a_group_that_spans_nodes_is_named():
    from trainer.parallel import ParallelLayout
    from trainer.sequence import spanning_nodes

    layout = ParallelLayout(4, 0, sequence=2)
    assert spanning_nodes(layout, ["a", "a", "b", "b"], 2) is None
    assert "ranks 0-1 are on 2 hosts: a sequence group spans nodes" in spanning_nodes(layout, ["a", "b", "a", "b"], 2)
    assert "2 with 1 rank(s) on this node: a sequence group spans nodes" in spanning_nodes(layout, ["a"] * 4, 1)
