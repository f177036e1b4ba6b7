"""The benchmarks run end to end at tiny size and print their tables (bench/ is never timed by the tests:
no speed is asserted here); and the planner's --dry-run prints the hand-checked CogVideoX-5B figures."""

from __future__ import annotations

import json
import re

import pytest

from helpers import run_python, write_spec
from test_costs import COGVIDEOX_5B

pytestmark = pytest.mark.slow


def numbers(line: str) -> list[float]:
    return [float(v.replace(",", "")) for v in re.findall(r"-?[\d,]*\.?\d+(?:e[-+]?\d+)?", line)]


def row(stdout: str, name: str) -> list[float]:
    match = re.search(rf"^\s*{re.escape(name)}\s+(.*)$", stdout, re.MULTILINE)
    assert match, stdout
    return numbers(match.group(1))


def run_bench(*args: str):
    proc = run_python(*args, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_the_data_benchmark_runs():
    out = run_bench("bench/data.py", "--quick")
    for name in ("raw read", "loader (2 threads)"):
        samples_per_s, mb_per_s = row(out, name)
        assert samples_per_s > 0 and mb_per_s > 0
    assert re.search(r"^loader/raw = \d+\.\d\d$", out, re.MULTILINE) and "16 synthetic samples" in out


def test_the_step_benchmark_runs():
    out = run_bench("bench/step.py", "--size", "tiny", "--steps", "3", "--rounds", "1")
    trainer, bare, plain = row(out, "trainer"), row(out, "bare DeepSpeed loop"), row(out, "plain torch loop")
    assert len(trainer) == len(bare) == len(plain) == 3 and min(trainer + bare + plain) > 0
    assert re.search(r"ratio trainer/bare \(medians\) = \d+\.\d{3}", out)
    assert re.search(r"ratio trainer/plain \(medians\) = \d+\.\d{3}", out) and ", fp32, " in out
    assert re.search(r"data wait \(trainer, after warm-up\) = \d+\.\d\d% of step time", out)


def test_the_memory_benchmark_runs_and_the_estimate_is_close():
    """And the memory modes: fp8 halves the block linears (the tiny model's embeddings, biases and per-row scales,
    weigh more than a real model's: 0.62x here, 0.51x for the `cpu` model, 0.503x for the real 5B), offload
    copies what it plans."""
    out = run_bench("bench/memory.py", "--size", "tiny", "--ranks", "1", "--steps", "2", "--mode", "plain",
                    "--mode", "ckpt-fp8", "--mode", "ckpt-offload")
    for stage in (2, 3):
        frozen, peak, step, estimate, _, startup, rss = row(out, f"tiny  ZeRO-{stage}  1 rank(s)  plain")
        assert frozen > 0 and rss > peak > 0 and startup > 0 and 0 < step <= peak
        assert estimate == pytest.approx(peak, rel=0.25)  # the planner, against torch's allocator
    fp8 = row(out, "tiny  ZeRO-2  1 rank(s)  ckpt-fp8")
    assert fp8[0] / row(out, "tiny  ZeRO-2  1 rank(s)  plain")[0] < 0.65
    *_, offloaded, planned = row(out, "tiny  ZeRO-2  1 rank(s)  ckpt-offload")
    assert offloaded == pytest.approx(planned, rel=0.1) and offloaded > 0


def test_the_sequence_benchmark_measures_half_the_activations_and_the_planner_follows():
    """bench/sequence.py on the `small` model (880 video tokens): with the video tokens split over 2 ranks,
    autograd keeps under 0.6x the activations; the planner's saved bytes are within 10 % of the measured ones,
    its peak within 15 % wherever the collectives' own buffers are not in it (one rank alone, and the control),
    and its all-to-all bytes are what the collectives sent."""
    out = run_bench("bench/sequence.py", "--size", "small", "--video", "33x128x192")
    for ckpt in ("off", "on"):
        rows = {n: row(out, f"checkpointing {ckpt}, {label}") for n, label in
                ((1, "parallel.sequence 1"), (2, "parallel.sequence 2"), (0, "2, control: no collectives"))}
        for n, (saved, planned_saved, peak, planned, _, sent, planned_sent) in rows.items():
            assert planned_saved == pytest.approx(saved, rel=0.1), (ckpt, n)
            assert sent == pytest.approx(planned_sent, rel=0.01) if n == 2 else sent == 0
            if n != 2:
                assert planned == pytest.approx(peak, rel=0.15), (ckpt, n)
        assert rows[2][0] / rows[1][0] < 0.6 and rows[0][2] / rows[1][2] < 0.6, ckpt


def test_the_shapes_benchmark_runs_and_the_trainers_steps_hold_one_shape():
    out = run_bench("bench/shapes.py", "--size", "tiny", "--steps", "3")
    before, after = row(out, "per micro-batch"), row(out, "per step")
    assert after[-2:] == [0, 3]  # "0 of 3" mixed steps
    assert before[0] > 0 and after[0] > 0 and "2 ranks x accumulation 2" in out


def test_the_gpu_benchmark_runs_at_tiny_size():
    out = run_bench("bench/gpu.py", "--tiny", "--steps", "1", "--shape", "5b")  # (2b: the same path, for time)
    for name in ("5b (tiny), ZeRO-2, checkpointing off", "5b (tiny), ZeRO-2, checkpointing on",
                 "5b (tiny), ZeRO-3, checkpointing on"):
        seconds, tflops, *_ = row(out, name)
        assert seconds > 0 and tflops > 0
    assert "flash attention: n/a (no GPU)" in out
    train = re.search(r"launch/train.py, model 'tiny' .* 30 steps in \d+ s with start-up: (\S+) s/step after 2, "
                      r"data wait at most (\S+)%, loss (\S+) -> (\S+) \(means", out)
    assert train, out
    assert float(train.group(1)) > 0 and float(train.group(4)) < float(train.group(3))  # the loss fell


def test_dry_run_plans_cogvideox_5b_without_weights(tmp_path):
    """A model directory of configs only (no weights at all) and no shards: --video gives the clip size, or the
    model's native clip does."""
    model = tmp_path / "CogVideoX-5b"
    for part, config in (("transformer", {"_class_name": "CogVideoXTransformer3DModel", **COGVIDEOX_5B}),
                         ("vae", {"latent_channels": 16, "block_out_channels": [128, 256, 256, 512],
                                  "temporal_compression_ratio": 4, "scaling_factor": 0.7}),
                         ("scheduler", {"num_train_timesteps": 1000})):
        (model / part).mkdir(parents=True)
        (model / part / "config.json").write_text(json.dumps(config))
    (model / "scheduler" / "scheduler_config.json").write_text("{}")
    spec = write_spec(tmp_path / "run.yaml", {
        "model": {"path": str(model), "gradient_checkpointing": True},
        "lora": {"rank": 128, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]},
        "data": {"shards": str(tmp_path / "not-packed-yet"), "micro_batch_size": 1},
        "train": {"max_steps": 10, "gradient_accumulation_steps": 2}, "deepspeed": {"config": "zero3"}})
    proc = run_python("launch/train.py", "--spec", str(spec), "--dry-run", "--ranks", "8", "--video", "49x480x720")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "5,570,283,072 frozen + 132,120,576 LoRA trainable" in out
    assert "17,550 video + 226 text tokens" in out
    assert "micro 1 x accumulation 2 x 8 data-parallel rank(s) = 16 samples per optimizer step" in out
    assert re.search(r"forward 336\.89 TFLOP \(attention 48%\)", out)
    totals = row(out, "total")  # ZeRO-2 off/on, ZeRO-3 off/on, MiB
    assert len(totals) == 4 and totals[1] < totals[0] and totals[3] < totals[1] and totals[3] < totals[2]
    frozen = row(out, "frozen weights")
    assert frozen[0] == pytest.approx(5_570_283_072 * 2 / 2**20, rel=1e-3)  # ZeRO-2: all of it, bf16
    assert frozen[2] == pytest.approx(frozen[0] / 8, rel=0.01)  # ZeRO-3: an eighth
    assert not (tmp_path / "runs").exists()

    # no --video and no shards yet: the model's native clip, which is this one
    native = run_python("launch/train.py", "--spec", str(spec), "--dry-run", "--ranks", "8")
    assert native.returncode == 0, native.stderr[-3000:]
    assert "planning for the model's native clip 49x480x720" in native.stdout
    assert row(native.stdout, "total") == totals


def test_the_conditioning_benchmark_measures_one_encode(tiny_5b_i2v):
    """bench/conditioning.py's measurement of the trainer's encoder, on the tiny model's VAE at 256x384: above
    the VAE's 240x360 tile size, so that tiling overlaps tiles (more FLOPs). The published sizes take minutes."""
    import torch

    results = {}
    for tiling in ([], ["--no-tiling"]):
        out = run_bench("bench/conditioning.py", "--vae", str(tiny_5b_i2v / "vae"), "--height", "256", "--width",
                        "384", *tiling)
        m = results[bool(tiling)] = json.loads(out.splitlines()[-1])
        assert m["params"] > 0 and m["tflop"] > 0 and m["seconds"] > 0 and m["peak_gb"] >= 0
        assert m["weights_gb"] == m["params"] * 2 / 1e9
        assert m["dtype"] == ("bfloat16" if torch.cuda.is_available() else "float32")
    assert results[False]["tflop"] > results[True]["tflop"]  # tiled (False: no --no-tiling) overlaps its tiles
