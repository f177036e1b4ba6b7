"""`launch/train.py --spec run.yaml --dry-run`: what a run will cost, before any weights load or rank starts.

Reads the spec, the model directory's configs (its family sizes clips and counts the transformer) and the
shards' manifest.json (or their first sample); prints tokens, parameters, FLOPs and memory per rank under
ZeRO-2 and ZeRO-3, and with --gpu-memory which ways of training fit that GPU (trainer/fit.py).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer import fit
from trainer.costs import CostModel, ZeroSettings
from trainer.dtypes import PRECISIONS
from trainer.engine import SHIPPED_CONFIGS, assemble_config, load_base_config
from trainer.errors import UserError
from trainer.families import load_family
from trainer.families.base import ModelFamily
from trainer.parallel import ParallelLayout
from trainer.reporting.tables import console as make_console
from trainer.reporting.tables import print_table, table
from trainer.spec import RunSpec


def parse_video(text: str) -> tuple[int, int, int]:
    try:
        frames, height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--video {text!r}: expected FRAMESxHEIGHTxWIDTH, e.g. 81x768x1360") from None
    return frames, height, width


def latent_shapes(spec: RunSpec, family: ModelFamily, videos: list[str],
                  say: Callable[[str], None] = print) -> Counter[tuple[int, ...]]:
    """Latent shapes [C, F, H, W] to plan for, with their sample counts: --video sizes through the VAE's
    compression, else the shards' manifest.json buckets, else the first sample of the shards; with no shards
    yet (planning before packing), the model's native clip."""
    shapes: Counter[tuple[int, ...]] = Counter()
    if videos:
        for text in videos:
            frames, height, width = parse_video(text)
            shapes[family.latent_shape(frames, height, width, _named(f"--video {text}"))] = 1
        return shapes
    from trainer.data import resolve_shards
    from trainer.shard_format import ShardError, shard_samples

    if not packed_yet(spec.data.shards):
        native = family.native_clip()
        say(f"note: data.shards {spec.data.shards!r} is not there yet: planning for the model's native clip "
            f"{native.frames}x{native.height}x{native.width} (what data_tools/shard.py packs by default; --video "
            f"FxHxW plans for another)")
        return Counter({family.latent_shape(native.frames, native.height, native.width, str): 1})
    try:
        shards = resolve_shards(spec.data.shards)
    except UserError as exc:
        raise UserError(f"{exc}\n  (to plan for a clip size instead: --video FxHxW)") from None
    for folder in dict.fromkeys(Path(s).parent for s in shards):
        manifest = folder / "manifest.json"
        if manifest.is_file():
            for bucket in json.loads(manifest.read_text()).get("buckets", {}).values():
                shapes[tuple(bucket["latents"])] += bucket["samples"]
    for shard in shards if not shapes else []:
        try:
            sample = next(shard_samples(shard), None)
        except ShardError:
            continue
        if sample is not None:
            shapes[tuple(sample.latents.shape)] = 1
            break
    if not shapes:
        raise UserError("data.shards: no readable sample to plan for; give the clip size: --video FxHxW")
    return shapes


def packed_yet(shards: str | list[str]) -> bool:
    """Whether any entry of data.shards names something that exists (a pattern: its folder). A planner run
    before packing plans for the native clip; a typo in a path that exists still fails."""
    def exists(entry: str) -> bool:
        pattern = any(ch in entry for ch in "{*?[")
        return Path(entry.split("{")[0]).parent.exists() if pattern else Path(entry).exists()

    return any(exists(entry) for entry in ([shards] if isinstance(shards, str) else shards))


def zero_settings(spec: RunSpec, world_size: int) -> dict[int, ZeroSettings]:
    """The spec's own DeepSpeed config for its stage (first), the shipped one for the other stage."""
    config = assemble_config(spec, ParallelLayout(world_size, sequence=spec.parallel.sequence).data_size)
    ours = ZeroSettings.from_config(config, world_size)
    other = 3 if ours.stage == 2 else 2
    theirs = ZeroSettings.from_config(load_base_config(SHIPPED_CONFIGS / f"zero{other}.json"), world_size)
    return {ours.stage: ours, other: theirs}


def dry_run(spec: RunSpec, world_size: int, videos: list[str], gpu_memory: float | None = None) -> None:
    family = load_family(spec.model.path, weights=False)
    costs = CostModel(family, spec.lora)
    shapes = latent_shapes(spec, family, videos)
    micro, accumulation = spec.data.micro_batch_size, spec.train.gradient_accumulation_steps
    dtype_bytes = PRECISIONS[spec.train.precision].itemsize
    checkpointing = spec.model.gradient_checkpointing
    layout = ParallelLayout(world_size, sequence=spec.parallel.sequence)  # refuses a world it cannot split
    sequence = layout.sequence
    console = make_console()
    console.rule("resolved spec")
    console.print(spec.to_yaml(), markup=False, highlight=False)
    rows = [("model", f"{family.model_dir} (config only: {family.describe()})"),
            ("parameters", f"{costs.params_frozen:,} frozen + {costs.params_lora:,} LoRA trainable "
                           f"({100 * costs.params_lora / costs.params_frozen:.2f}%; rank {spec.lora.rank} on "
                           f"{', '.join(spec.lora.target_modules)})"),
            ("batch", f"micro {micro} x accumulation {accumulation} x {layout.data_size} data-parallel rank(s) = "
                      f"{micro * accumulation * layout.data_size} samples per optimizer step"),
            ("ranks", f"{world_size} (--ranks N plans for another number)"
                      + (f": {layout.data_size} data-parallel x {sequence} sequence-parallel" if sequence > 1 else ""))]
    print_table(console, "run", rows)

    largest = max(shapes, key=costs.video_tokens)
    flops_rows = []
    for shape, samples in sorted(shapes.items(), key=lambda kv: -kv[1]):
        flops = costs.flops(shape)
        tokens = costs.video_tokens(shape)
        flops_rows.append((f"latents {'x'.join(map(str, shape))}",
                           f"{tokens:,} video + {costs.text_len} text tokens; {samples} sample(s)",
                           f"forward {_flop(flops.forward)} (attention {flops.attention_share:.0%}); "
                           f"training {_flop(flops.train)} (LoRA: no frozen weight gradients), "
                           f"{_flop(flops.train_checkpointed)} with gradient checkpointing"
                           f"{' (on)' if checkpointing else ' (off)'}"))
    print_table(console, "per sample", [(a, f"{b}\n{c}") for a, b, c in flops_rows])

    console.print(f"[bold]memory per rank[/bold], MiB, for {micro} sample(s) of latents "
                  f"{'x'.join(map(str, largest))} at {spec.train.precision} (the largest shape)")
    settings = zero_settings(spec, world_size)
    fp8 = 1 if spec.model.weights_dtype == "fp8" else None  # the spec's memory modes, where they apply
    estimates = {(stage, ckpt): costs.memory(largest, micro, zero, dtype_bytes, ckpt, sequence,
                                             storage_bytes=fp8 if stage == 2 else None,
                                             offload=ckpt and spec.model.activation_offload)
                 for stage, zero in settings.items() for ckpt in (False, True)}
    columns = [(stage, ckpt) for stage in (2, 3) for ckpt in (False, True)]
    memory = table(header=[""] + [f"ZeRO-{stage}\ncheckpointing {'on' if ckpt else 'off'}"
                                  + (" *" if stage == next(iter(settings)) and ckpt == checkpointing else "")
                                  for stage, ckpt in columns])  # * the spec's own
    for part in dict.fromkeys(k for est in estimates.values() for k in est.parts):
        memory.add_row(part, *[_mib(estimates[col].parts.get(part)) for col in columns])
    memory.add_row("total", *[_mib(estimates[col].total) for col in columns], style="bold")
    for part in dict.fromkeys(k for est in estimates.values() for k in est.host):
        memory.add_row(f"{part} (host)", *[_mib(estimates[col].host.get(part)) for col in columns])
    console.print(memory)
    console.print("* this spec. Not counted: the framework's own buffers and the allocator's slack (on a GPU, "
                  "CUDA context and caching: leave 10-20%).")
    modes = [*(["fp8 frozen block linears (ZeRO-2 columns)"] if fp8 else []),
             *(["activation offload (checkpointing columns)"] if spec.model.activation_offload else [])]
    if modes:
        console.print(f"with this spec's {' and '.join(modes)}")
    print_sequence_table(console, costs, family, largest, micro, dtype_bytes, checkpointing, sequence)
    if gpu_memory is not None:
        print_fit_table(console, costs, largest, micro, settings, dtype_bytes, world_size, gpu_memory)
    if family.image_to_video:
        encoder = family.image_encoder_parameters()
        console.print(f"image-to-video, also not counted: the conditioning VAE encoder on every rank, {encoder:,} "
                      f"parameters ({_mib(2 * encoder)} MiB in bf16), and its tiled encode of one frame per sample "
                      f"(bench/conditioning.py measures it; README \"Image-to-video\").")


def print_sequence_table(console: Any, costs: CostModel, family: ModelFamily, shape: tuple[int, ...], micro: int,
                         dtype_bytes: int, checkpointing: bool, chosen: int) -> None:
    """Activations per rank and what each rank sends, for sequence groups of 1, 2, 4, 8 and the spec's own
    (parallel.sequence; trainer/sequence.py), where the heads and the video tokens split."""
    tokens, heads = costs.video_tokens(shape), costs.heads
    rows = []
    for n in sorted({1, 2, 4, 8, chosen}):
        fits = [why for why, ok in ((f"{heads} heads", heads % n == 0), (f"{tokens:,} video tokens", tokens % n == 0))
                if not ok]
        if fits:
            rows.append((f"{n}{' *' if n == chosen else ''}", "", "", f"does not divide the {' or '.join(fits)}"))
            continue
        act = micro * costs.activation_bytes(shape, dtype_bytes, checkpointing, n)
        sent = micro * costs.exchange_bytes(shape, dtype_bytes, checkpointing, n)
        rows.append((f"{n}{' *' if n == chosen else ''}", _mib(act), _mib(sent),
                     f"{tokens // n:,} video + {costs.text_len} text tokens a rank"))
    print_table(console, f"sequence parallelism (parallel.sequence): per rank, {micro} sample(s) of latents "
                         f"{'x'.join(map(str, shape))}, checkpointing {'on' if checkpointing else 'off'}",
                rows, header=["ranks per sample", "activations MiB", "all-to-all MiB sent a micro-step", ""])
    console.print("* this spec. The all-to-alls run inside each sequence group: keep a group within a node "
                  "(README \"Sequence parallelism\"); the gradients' reduction crosses nodes as without it.")


def print_fit_table(console: Any, costs: CostModel, shape: tuple[int, ...], micro: int,
                    settings: dict[int, ZeroSettings], dtype_bytes: int, world_size: int, gpu_memory: float) -> None:
    """Every way of training this spec on ``world_size`` ranks, cheapest first, and whether it fits a GPU of
    ``gpu_memory`` GiB (trainer/fit.py)."""
    if gpu_memory <= 0:
        raise UserError(f"--gpu-memory {gpu_memory:g}: give the GPU's memory in GiB, e.g. 24, 40 or 80")
    found = fit.ways(costs, shape, micro, settings, dtype_bytes, world_size)
    fitting = [w for w in found if fit.fits(w, gpu_memory * 2**30)]
    others = sorted((w for w in found if w not in fitting), key=lambda w: w.device_bytes)
    rows = [("yes" if w in fitting else "no", w.describe(), f"{w.device_bytes / 2**30:,.1f}",
             f"{w.host_bytes / 2**30:,.1f}" if w.host_bytes else "", f"{100 * w.recompute:.0f}%" if w.recompute else "",
             f"{w.moved_bytes / 2**30:,.1f}" if w.moved_bytes else "") for w in fitting + others]
    print_table(console, f"what fits {gpu_memory:g} GiB on {world_size} rank(s): {micro} sample(s) of latents "
                         f"{'x'.join(map(str, shape))}; those that fit, cheapest first", rows,
                header=["fits", "way", "GiB per rank", "host GiB", "recompute", "moved GiB a micro-step"])
    console.print(f"fits: the estimate is at most {fit.HEADROOM:.0%} of the GPU. Cheapest: the least "
                  f"recomputation, then the fewest bytes moved beyond the gradients' reduction (ZeRO-3's gathers, the "
                  f"offload's copies, the all-to-alls), then without fp8, then ZeRO-2 before ZeRO-3.")
    if fitting:
        console.print(f"the cheapest that fits: --set {' --set '.join(fitting[0].spec_fields().split(', '))}")
    else:
        console.print(f"nothing fits {gpu_memory:g} GiB: more ranks (--ranks: ZeRO-3 and sequence groups shrink "
                      f"with them), a smaller clip (--video), or a lower lora.rank")


def _named(label: str) -> Callable[[str], str]:
    """Every option of a --video size is that size."""
    return lambda name: label


def _mib(value: float | None) -> str:
    return "" if value is None else f"{value / 2**20:,.1f}"


def _flop(value: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if value >= scale:
            return f"{value / scale:,.2f} {unit}"
    return f"{value:,.0f} FLOP"
