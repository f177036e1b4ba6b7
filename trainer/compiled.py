"""train.compile: regional compilation of the transformer, applied from outside it.

Each repeated block is compiled with torch.compile (``module.compile()``, what diffusers'
``compile_repeated_blocks`` does for models that name their blocks): the blocks share one code object, so two
graphs serve them all (the first block's input is a strided slice of the embeddings, the others' contiguous),
with their LoRA layers, fp8 storage, gradient checkpointing (the checkpoint calls the compiled block, and its
recomputation reuses the graph) and ZeRO's hooks around it. A new clip shape compiles once more.
Compilation happens at the first step; ``compile_seconds`` says how long torch spent in it.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any

import torch
from torch import nn

from trainer.errors import UserError


def check_compiler(device: torch.device) -> None:
    """Refuse before any work where torch.compile cannot run (dynamo on this Python) or its default backend
    (inductor) cannot generate code: on a GPU it needs Triton, on a CPU a C++ compiler (the one inductor would
    call: $CXX, else g++)."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise UserError(f"train.compile: torch {torch.__version__} cannot compile on Python "
                        f"{sys.version.split()[0]} (torch.compile does not support it yet): set train.compile false")
    if device.type == "cuda":  # the package alone: asking the device here would open a CUDA context on GPU 0
        from torch.utils._triton import has_triton_package

        if not has_triton_package():
            raise UserError("train.compile: torch.compile needs Triton on a GPU and this environment has none "
                            "(pip install triton, the version torch pins), or set train.compile false")
        return
    cxx = os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++")
    if shutil.which(cxx) is None:
        raise UserError(f"train.compile: on the CPU torch.compile writes C++ and builds it with {cxx!r} ($CXX, else "
                        f"g++), which is not on PATH: install a C++ compiler or set train.compile false")


def compile_blocks(transformer: nn.Module, block_class: str, **options: Any) -> int:
    """Compile every module of class ``block_class`` in place (``options``: torch.compile's); how many there are."""
    blocks = [m for m in transformer.modules() if type(m).__name__ == block_class]
    for block in blocks:
        block.compile(**options)
    return len(blocks)


def compile_seconds() -> float:
    """Wall seconds torch has spent compiling in this process (dynamo's own account)."""
    from torch._dynamo.utils import calculate_time_spent

    return float(calculate_time_spent().get("total_wall_time", 0.0))
