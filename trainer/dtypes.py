"""The one table of tensor dtypes: the names the spec and the tools use, torch's dtypes, safetensors' names."""

from __future__ import annotations

from typing import NamedTuple

import torch


class DType(NamedTuple):
    name: str  # as the spec (train.precision) and the tools (--dtype) write it
    torch: torch.dtype
    safetensors: str  # as a safetensors header writes it


TABLE = (
    DType("bf16", torch.bfloat16, "BF16"),
    DType("fp16", torch.float16, "F16"),
    DType("fp32", torch.float32, "F32"),
    DType("fp64", torch.float64, "F64"),
)
# compute and storage precisions a user can choose (fp64 is only ever read)
PRECISIONS = {d.name: d.torch for d in TABLE if d.name != "fp64"}
# the floating-point dtypes a shard's tensors may be stored in, by their safetensors name
SAFETENSORS_FLOATS = {d.safetensors: d.torch for d in TABLE}


def short_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"`` (the table's name; torch's own for a dtype not in it)."""
    return next((d.name for d in TABLE if d.torch == dtype), torch_name(dtype))


def torch_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (what manifest.json records)."""
    return str(dtype).removeprefix("torch.")


def from_torch_name(name: str) -> torch.dtype:
    """The inverse of ``torch_name``."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype")
    return dtype


def encoding_dtype(device: torch.device) -> torch.dtype:
    """What the encoders (VAE, T5) run in: bf16 on a GPU, fp32 on a CPU (no fast bf16 convolutions)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32
