"""The DeepSpeed engine: config assembled from ds_configs/*.json plus the spec, then deepspeed.initialize.

The spec owns batch size, accumulation, clipping, precision, optimizer and lr schedule; the JSON owns the
ZeRO stage and its tuning. A JSON value that contradicts the spec is an error, never a silent override.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from trainer.errors import UserError
from trainer.spec import OptimSection, RunSpec

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "ds_configs"


def ds_config_path(spec: RunSpec) -> Path:
    section = spec.deepspeed
    if section.config is None:
        return SHIPPED_CONFIGS / f"zero{section.stage or 2}.json"
    if section.config.endswith(".json") or "/" in section.config:
        return Path(section.config)
    return SHIPPED_CONFIGS / f"{section.config}.json"


def load_base_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        shipped = sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.json"))
        raise UserError(f"deepspeed.config: {path} does not exist (shipped configs: {', '.join(shipped)})") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"deepspeed.config: {path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("zero_optimization"), dict):
        raise UserError(f"deepspeed.config: {path} has no zero_optimization section")
    return config


def _spec_owned(spec: RunSpec, data_parallel: int) -> dict[str, tuple[object, str]]:
    """DeepSpeed keys the spec decides, with the value and the spec field that sets them."""
    micro, accum = spec.data.micro_batch_size, spec.train.gradient_accumulation_steps
    return {
        "train_micro_batch_size_per_gpu": (micro, "data.micro_batch_size"),
        "gradient_accumulation_steps": (accum, "train.gradient_accumulation_steps"),
        "train_batch_size": (micro * accum * data_parallel, "data.micro_batch_size x ranks x accumulation"),
        "gradient_clipping": (spec.train.max_grad_norm, "train.max_grad_norm"),
    }


def assemble_config(spec: RunSpec, data_parallel: int) -> dict:
    """The DeepSpeed config of a run with ``data_parallel`` data-parallel ranks (trainer/parallel.py)."""
    path = ds_config_path(spec)
    config = load_base_config(path)
    errors = []
    stage = config["zero_optimization"].get("stage")
    if stage not in (2, 3):
        errors.append(f"zero_optimization.stage is {stage!r}; this trainer runs ZeRO stage 2 or 3")
    elif spec.deepspeed.stage is not None and stage != spec.deepspeed.stage:
        errors.append(f"zero_optimization.stage is {stage} but deepspeed.stage is {spec.deepspeed.stage}")
    for key, (value, field) in _spec_owned(spec, data_parallel).items():
        if key in config and config[key] != "auto" and config[key] != value:
            errors.append(f"{key} is {config[key]!r} but the spec gives {value!r} ({field})")
        config[key] = value
    for section, field in (("optimizer", "optim"), ("scheduler", "optim.schedule")):
        if section in config:
            errors.append(f"has a {section!r} section; the spec's {field} owns it: remove it from the JSON")
    precision = spec.train.precision
    for name in ("bf16", "fp16"):
        enabled = config.get(name, {}).get("enabled", "auto")
        if enabled != "auto" and bool(enabled) != (precision == name):
            errors.append(f"{name}.enabled is {enabled!r} but train.precision is {precision!r}")
    if spec.parallel.sequence > 1:
        errors += _sequence_parallel_reduction(config, stage)
    if errors:
        raise UserError(f"deepspeed.config: {path} contradicts the spec:\n  " + "\n  ".join(errors))

    config["bf16"] = {**config.get("bf16", {}), "enabled": precision == "bf16"}
    config["fp16"] = {**config.get("fp16", {}), "enabled": precision == "fp16"}
    if precision == "fp16":
        config["fp16"] = {"loss_scale": 0, "initial_scale_power": 16, **config["fp16"]}  # dynamic loss scaling
    reduction = _reduction_dtypes(config, precision, path)
    config["data_types"] = {**config.get("data_types", {}), "grad_accum_dtype": reduction["grad_accum_dtype"]}
    config["communication_data_type"] = reduction["communication_data_type"]
    # with a sequence-parallel mpu DeepSpeed reduces in this one instead (fp32 unless set)
    config["seq_parallel_communication_data_type"] = reduction["communication_data_type"]
    optim = spec.optim
    config["optimizer"] = {"type": "AdamW", "params": {
        "lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay,
        "torch_adam": True,  # torch's AdamW: no JIT build of DeepSpeed's fused CPU/GPU Adam
        "adam_w_mode": True}}
    return config


def _sequence_parallel_reduction(config: dict, stage: int) -> list[str]:
    """With parallel.sequence > 1 a sequence group's ranks hold parts of one gradient: DeepSpeed must sum them
    over the whole world and divide by the data-parallel ranks only. Its ZeRO-2 reduction and ZeRO-3's
    all-reduce path (contiguous gradients in buckets) do; ZeRO-3's reduce-scatter
    (coalesced_collectives.reduce_scatter_coalesced) and a gradient predivide divide by every rank, N times too
    small a gradient (tests/test_sequence.py sees it in the gradient norm). So ZeRO-3 takes its all-reduce path
    and the settings that would leave it are refused."""
    zero, errors = config["zero_optimization"], []
    if zero.get("reduce_scatter") is True and stage == 3:
        errors.append("zero_optimization.reduce_scatter is true, but with parallel.sequence > 1 ZeRO-3 must all-"
                      "reduce the gradients (its reduce-scatter averages them over the sequence ranks too): remove "
                      "the key")
    for key, bad in (("contiguous_gradients", False), ("zero_quantized_gradients", True)):
        if stage == 3 and zero.get(key, not bad) == bad:
            errors.append(f"zero_optimization.{key} is {str(bad).lower()}, which ZeRO-3 reduces by reduce-scatter "
                          f"alone: with parallel.sequence > 1 remove the key")
    if config.get("gradient_predivide_factor", 1.0) != 1.0:
        errors.append("gradient_predivide_factor with parallel.sequence > 1: DeepSpeed then averages over the "
                      "sequence ranks too; remove the key")
    if stage == 3:
        zero["reduce_scatter"] = False
    return errors


REDUCTION_DTYPES = ("fp32", "bf16", "fp16")
# every spelling DeepSpeed's DtypeEnum accepts (it lower-cases them), to the names above
DTYPE_ALIASES = {"fp32": "fp32", "float32": "fp32", "float": "fp32", "bf16": "bf16", "bfloat16": "bf16",
                 "bfloat": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16"}


def _reduction_dtypes(config: dict, precision: str, path: Path) -> dict[str, str]:
    """The dtypes gradients are accumulated over micro-steps in (``data_types.grad_accum_dtype``) and
    all-reduced in (``communication_data_type``): fp32 unless the JSON chooses otherwise. Left to DeepSpeed,
    a bf16 run reduces its gradients in bf16 (8 bits of mantissa, rounded once more per reduction). The JSON
    may choose the compute dtype instead (half the traffic); any other half type contradicts
    train.precision and is refused, as is a name DeepSpeed does not know."""
    given = {"grad_accum_dtype": (config.get("data_types") or {}).get("grad_accum_dtype"),
             "communication_data_type": config.get("communication_data_type")}
    allowed = {"fp32", precision}
    errors = []
    for key, raw in given.items():
        value = DTYPE_ALIASES.get(raw.lower(), raw) if isinstance(raw, str) else raw
        given[key] = value
        if value is not None and value not in REDUCTION_DTYPES:
            errors.append(f"{key} is {raw!r}; DeepSpeed knows {', '.join(REDUCTION_DTYPES)} (or float32, bfloat16, "
                          f"float16)")
        elif value is not None and value not in allowed:
            errors.append(f"{key} is {value!r} but train.precision is {precision!r}: reduce in fp32 (the "
                          f"default) or in the compute dtype")
    if errors:
        raise UserError(f"deepspeed.config: {path} contradicts the spec:\n  " + "\n  ".join(errors))
    return {key: value or "fp32" for key, value in given.items()}


def lr_multiplier(optim: OptimSection, max_steps: int) -> Callable[[int], float]:
    """lr factor for the update of optimizer step ``step + 1`` (skipped steps count: trainer/loop.py moves the
    scheduler on for them): linear warmup, then the schedule."""
    warmup, floor = optim.warmup_steps, optim.min_lr_ratio

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if optim.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if optim.schedule == "cosine" else 1 - progress
        return floor + (1 - floor) * decay

    return multiplier


def init_distributed(timeout: timedelta) -> None:
    """Join the process group on the accelerator's backend (nccl on GPU, gloo on CPU). A collective that
    waits longer than ``timeout`` (a peer died or hangs) raises instead of blocking forever."""
    import deepspeed

    if torch.cuda.is_available():  # before the first collective: NCCL sends from the current device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(timeout=timeout)


def build_engine(spec: RunSpec, module: nn.Module, config: dict, mpu: object = None) -> DeepSpeedEngine:
    """``mpu``: DeepSpeed's sequence-parallel groups (trainer/sequence.py), None without a split."""
    import deepspeed

    multiplier = lr_multiplier(spec.optim, spec.train.max_steps)
    engine, *_ = deepspeed.initialize(
        model=module,
        model_parameters=[p for p in module.parameters() if p.requires_grad],
        config=config,
        mpu=mpu,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier),
    )
    return engine


def fp32_master_partitions(engine: DeepSpeedEngine) -> list[torch.Tensor]:
    """This rank's flat fp32 master partitions, one per parameter group: the tensors the optimizer updates and
    ``full_fp32_masters`` reads (ZeRO-1/2 call them single_partition_of_fp32_groups, ZeRO-3
    fp32_partitioned_groups_flat)."""
    optimizer = engine.optimizer
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        partitions = getattr(optimizer, name, None)
        if partitions:
            return list(partitions)
    raise RuntimeError(f"no fp32 master partitions in DeepSpeed's {type(optimizer).__name__}")


def full_fp32_masters(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """The full fp32 master of each parameter, on the CPU. A collective: call it on every rank, in one order.

    Reading the module's own parameters is not enough: under ZeRO-3 they are empty partitions, and under
    bf16 they are rounded copies. DeepSpeed's fp32 masters are what training continues from.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, param in params.items():
        full = safe_get_full_fp32_param(param)
        if full is None:
            raise RuntimeError(f"DeepSpeed holds no fp32 master for {name}: is the engine built?")
        state[name] = full.detach().float().cpu().clone()
    return state
