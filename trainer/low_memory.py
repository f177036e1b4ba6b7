"""Memory modes, applied to a family's transformer from outside it: lower-precision storage of the frozen weights
(model.weights_dtype) and the offload of the activations gradient checkpointing keeps (model.activation_offload).

Storage: every frozen linear of the repeated blocks keeps its weight in the storage dtype (fp8: each output row
scaled by its largest magnitude into e4m3's range, the scales in fp32) and upcasts it to the compute dtype in
its forward, as an ordinary intermediate tensor: the forward frees it after the layer, and autograd keeps it
for the backward only where it keeps activations (with gradient checkpointing, the one block being recomputed;
without, every layer's; trainer/costs.py counts both). Biases, the LoRA layers, the norms, the embeddings and the
output projection stay as loaded. Two library ways were measured first and rejected: diffusers' layerwise
casting swaps the parameters' storage around each forward and its backward kept every block's upcast weights
alive (a peak above bf16's); a torch parametrization keeps the memory right but gives each layer its own class,
so torch.compile recompiled every block (and gave up after 8). Neither scales fp8, which flushes small weights
to zero. ZeRO-3 is refused: it partitions every parameter and gathers it in its own dtype.

Offload: torch's saved-tensor hooks around the forward pass. With non-reentrant checkpointing (diffusers'
default) what autograd saves outside the checkpointed blocks is each block's inputs (and the embeddings' and
output projection's): those are copied to host memory as they are saved and copied back when the backward pass
recomputes the block. On a GPU the host buffers are pinned and the copy out runs on a side stream, beside the
compute; on the CPU accelerator the copies are plain host copies (the same bookkeeping, no memory saved).
Parameters are never copied, and a tensor several blocks share (the rotary tables, the timestep embedding) once.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.errors import UserError

FP8 = "float8_e4m3fn"  # torch's name: 4 exponent bits, 3 mantissa bits, finite (what fp8 storage means here)


def storage_dtype(weights_dtype: str | None, compute: torch.dtype) -> torch.dtype | None:
    """The dtype model.weights_dtype stores the frozen block linears in; None where that is the compute dtype
    (nothing to do)."""
    if weights_dtype is None:
        return None
    dtype = getattr(torch, FP8) if weights_dtype == "fp8" else torch.bfloat16
    return None if dtype == compute else dtype


def check_weights(weights_dtype: str | None, compute: torch.dtype, stage: int, torch_module: Any = torch) -> None:
    """Refuse what cannot work before any weights load: fp8 on a torch without float8 dtypes, bf16 storage in an
    fp16 run, and a storage dtype other than the compute dtype under ZeRO-3."""
    if weights_dtype == "fp8" and not isinstance(getattr(torch_module, FP8, None), torch.dtype):
        raise UserError(f"model.weights_dtype: fp8 needs torch's float8 dtypes (torch.{FP8}, torch >= 2.1), and "
                        f"this torch {torch_module.__version__} has none: install a newer torch (launch/"
                        f"setup_env.sh) or leave model.weights_dtype null")
    if weights_dtype == "bf16" and compute == torch.float16:
        raise UserError("model.weights_dtype bf16 with train.precision fp16: DeepSpeed casts every bf16 parameter "
                        "of an fp16 run to fp16; use fp8 to store the weights smaller, or leave it null")
    if stage == 3 and storage_dtype(weights_dtype, compute) is not None:
        raise UserError(f"model.weights_dtype {weights_dtype} with ZeRO-3: ZeRO-3 partitions every frozen weight "
                        f"and gathers it for each layer itself, which the stored dtype would have to go through, and "
                        f"that is not supported here. Use ZeRO-2 (deepspeed.stage 2: the stored weights shrink on "
                        f"every rank), or ZeRO-3 with model.weights_dtype null (it divides the weights over the ranks)")


class StoredLinear(nn.Linear):
    """A frozen nn.Linear whose weight is stored narrower (fp8: each output row scaled into e4m3's range, the
    scale kept in fp32) and upcast to the compute dtype in each forward, as an ordinary intermediate tensor. One
    class for every such layer, so that torch.compile's graph of one block serves the others."""

    compute_dtype: torch.dtype
    weight_scale: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(self.compute_dtype)
        if self.weight_scale is not None:
            weight = weight * self.weight_scale.to(self.compute_dtype)
        return F.linear(x, weight, self.bias)


def store_frozen_weights(transformer: nn.Module, block_prefix: str, storage: torch.dtype,
                         compute: torch.dtype) -> int:
    """Store the frozen linears' weights of the blocks under ``block_prefix`` ("transformer_blocks.") in
    ``storage`` (biases stay as loaded), read in ``compute``; how many linears."""
    count = 0
    for name, module in transformer.named_modules():
        if type(module) is not nn.Linear or not name.startswith(block_prefix) or module.weight.requires_grad:
            continue  # (peft's lora_A and lora_B are trainable)
        weight = module.weight.data
        scale = None
        if storage.itemsize == 1:  # without a scale, small weights (std 0.02) fall to e4m3's subnormals and zero
            scale = weight.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / torch.finfo(storage).max
            weight = weight.float() / scale
        module.weight.data = weight.to(storage)
        module.register_buffer("weight_scale", scale, persistent=False)
        setattr(module, "compute_dtype", compute)  # noqa: B010 (mypy types a module attribute as Tensor | Module)
        module.__class__ = StoredLinear
        count += 1
    return count


def check_stored(transformer: nn.Module, storage: torch.dtype) -> None:
    """After the engine is built: the stored weights are still in ``storage`` (a DeepSpeed that casts every
    floating-point parameter to the compute dtype would undo it silently; 0.19 leaves float8 alone)."""
    import deepspeed

    changed = {m.weight.dtype for m in transformer.modules() if isinstance(m, StoredLinear)} - {storage}
    if changed:
        raise UserError(f"model.weights_dtype: DeepSpeed {deepspeed.__version__} cast the stored frozen weights to "
                        f"{', '.join(map(str, changed))}; this needs a DeepSpeed that leaves {storage} parameters "
                        f"as they are (launch/constraints.txt pins one)")


def stored_bytes(module: nn.Module) -> int:
    """Bytes of the frozen parameters as they are stored."""
    return sum(p.numel() * p.element_size() for p in module.parameters() if not p.requires_grad)


def check_pinned_memory(device: torch.device) -> None:
    """activation_offload on a GPU copies into pinned host memory: refuse, before any work, a machine where it
    cannot be had (a container's locked-memory limit, a driver that refuses)."""
    if device.type == "cpu":
        return  # the CPU accelerator's activations are host memory already: plain copies
    try:
        torch.empty(1 << 20, dtype=torch.uint8, pin_memory=True)
    except RuntimeError as exc:
        raise UserError(f"model.activation_offload: this machine gives no pinned host memory ({exc}); offloaded "
                        f"activations need it to copy beside the compute. Raise the locked-memory limit (ulimit -l) "
                        f"or set model.activation_offload false") from None


class ActivationOffload:
    """Saved-tensor hooks that keep what autograd saves outside the checkpointed blocks in host memory.

    ``with offload():`` around a forward pass; the backward pass after it brings each tensor back as it is
    needed. ``offloaded_bytes``: what the last forward pass moved (bench/memory.py and the tests read it)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.offloaded_bytes = 0
        self._seen: dict[int, tuple] = {}

    @contextmanager
    def __call__(self) -> Iterator[None]:
        self.offloaded_bytes, self._seen = 0, {}
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
        finally:
            self._seen = {}  # the packed tensors live in the graph now, not here

    def _pack(self, tensor: torch.Tensor) -> Any:
        if isinstance(tensor, nn.Parameter) or isinstance(tensor._base, nn.Parameter):  # (F.linear saves weight.t())
            return tensor
        if tensor.device != self.device or tensor.layout != torch.strided:
            return tensor
        seen = self._seen.get(id(tensor))  # the same tensor saved again by the next block: one host copy
        if seen is not None and seen[0]() is tensor and seen[1] == tensor._version:
            return seen[2]
        host = torch.empty_like(tensor, device="cpu", pin_memory=self.cuda)
        event = None
        if self.stream is not None:  # copy out beside the compute; the tensor's memory waits for the copy
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                host.copy_(tensor, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
            tensor.record_stream(self.stream)
        else:
            host.copy_(tensor)
        self.offloaded_bytes += host.numel() * host.element_size()
        packed = (host, event)
        self._seen[id(tensor)] = (weakref.ref(tensor), tensor._version, packed)  # a weak reference: the tensor
        return packed  # is freed as it would be (and its id may then be another's)

    def _unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        host, event = packed
        if event is not None:  # the copy back queues behind the copy out
            torch.cuda.current_stream(self.device).wait_event(event)
        return host.to(self.device, non_blocking=self.cuda)
