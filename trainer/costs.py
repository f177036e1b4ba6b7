"""What a run costs, from the model config alone (no weights, no process group): tokens, parameters, FLOPs and
memory per rank. `launch/train.py --dry-run` prints them; the loop logs TFLOP/s and MFU from the same FLOPs.

FLOPs count multiply-adds as 2 and cover the matmuls (every nn.Linear, the patch embedding and attention's
QK^T and PV); norms and elementwise ops are left out, as usual. Training with LoRA needs no weight gradients
for the frozen layers: the backward pass of a frozen linear is one matmul (the input gradient), and none where
its input needs no gradient (the embeddings; the first block's q/k/v). Gradient checkpointing recomputes each
block's forward pass. Model FLOPs (what MFU divides by) leave the recomputation out.

The activation estimate counts the tensors autograd keeps for backward, in the units the family's structure
gives (for CogVideoXBlock, checked against diffusers' own by tests/test_costs.py: per block and token, 8
hidden-wide tensors and one FF-wide (GELU's input) in the compute dtype, fp32 LayerNorm statistics), plus, for
each LoRA target, its input (the attention inputs share one) and its rank-wide LoRA-A output; with LoRA
dropout, the dropped input and the mask instead of the input.

The model itself comes from its family (trainer/families/): a weightless skeleton with the real peft adapter
for the parameters and linears, and its TransformerStructure for where tokens flow.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from trainer.dtypes import PRECISIONS
from trainer.families.base import TransformerStructure
from trainer.low_memory import FP8, store_frozen_weights
from trainer.spec import LoraSection

if TYPE_CHECKING:
    from trainer.families.base import ModelFamily


@dataclass(frozen=True)
class LinearLayer:
    name: str  # the target's name in the bare transformer ("transformer_blocks.3.attn1.to_q")
    flops_per_token: int  # 2 * fan_in * fan_out (a conv patch embedding: per output position)
    tokens: str  # "joint" (text + video), "video", "text" or "sample"
    lora_rank: int = 0
    fan_in: int = 0
    fan_out: int = 0


@dataclass(frozen=True)
class Flops:
    """Per sample."""

    forward: float
    attention_forward: float  # QK^T and PV alone
    train: float  # forward + backward with LoRA (model FLOPs: what MFU counts)
    train_checkpointed: float  # plus each block's recomputed forward (what the device executes)

    @property
    def attention_share(self) -> float:
        return self.attention_forward / self.forward


@dataclass(frozen=True)
class ZeroSettings:
    """What the DeepSpeed config says about memory (ds_configs/*.json plus the spec)."""

    stage: int
    world_size: int
    reduce_bucket_size: int = 500_000_000
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    prefetch_bucket_size: int = 50_000_000
    persistence_threshold: int = 100_000
    max_live_parameters: int = 1_000_000_000  # ZeRO-3: gathered parameters the coordinator lets live at once
    communication_bytes: int = 4  # per element of a gradient reduction (communication_data_type; fp32 default)
    offload_optimizer: bool = False
    offload_param: bool = False

    @classmethod
    def from_config(cls, config: dict, world_size: int) -> ZeroSettings:
        zero = config["zero_optimization"]

        def offloaded(key):
            return (zero.get(key) or {}).get("device", "none") not in ("none", None)

        return cls(stage=zero["stage"], world_size=world_size,
                   reduce_bucket_size=int(zero.get("reduce_bucket_size", 500_000_000)),
                   overlap_comm=bool(zero.get("overlap_comm", zero["stage"] == 3)),
                   contiguous_gradients=bool(zero.get("contiguous_gradients", True)),
                   prefetch_bucket_size=int(zero.get("stage3_prefetch_bucket_size", 50_000_000)),
                   persistence_threshold=int(zero.get("stage3_param_persistence_threshold", 100_000)),
                   max_live_parameters=int(zero.get("stage3_max_live_parameters", 1_000_000_000)),
                   communication_bytes=PRECISIONS[config.get("communication_data_type", "fp32")].itemsize,
                   offload_optimizer=offloaded("offload_optimizer"), offload_param=offloaded("offload_param"))


@dataclass
class MemoryEstimate:
    """Bytes per rank on the training device (host memory where ZeRO offloads), by what holds them."""

    parts: dict[str, float] = field(default_factory=dict)
    host: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.parts.values())


class CostModel:
    """Costs of one transformer config with one LoRA, counted on a weightless (meta) skeleton of it."""

    def __init__(self, family: ModelFamily, lora: LoraSection):
        skeleton = family.transformer_from_config("meta", lora)
        self.structure = structure = family.structure()
        self.params_lora = sum(p.numel() for p in skeleton.parameters() if p.requires_grad)
        self.params_frozen = sum(p.numel() for p in skeleton.parameters()) - self.params_lora
        self.heads, self.head_dim = structure.heads, structure.head_dim
        self.hidden = self.heads * self.head_dim
        self.layers, self.text_len = structure.layers, structure.text_tokens
        self.lora_dropout = lora.dropout
        self.linears = _linears(skeleton, structure)
        first_ff = structure.after_attention[0]
        self.ff_inner = next(m.fan_out for m in self.linears if m.name.endswith(first_ff))
        blocks = [m for m in skeleton.modules() if type(m).__name__ == structure.block_class]
        self.block_params = max(sum(p.numel() for p in b.parameters() if not p.requires_grad) for b in blocks)
        self._frozen_sizes = [p.numel() for p in skeleton.parameters() if not p.requires_grad]
        # model.weights_dtype: what the trainer's casting stores in fp8, counted by applying it (dtypes only: meta)
        store_frozen_weights(skeleton, structure.block_prefix, getattr(torch, FP8), torch.bfloat16)
        cast = [p for p in skeleton.parameters() if p.element_size() == 1]
        self.params_cast = sum(p.numel() for p in cast)
        self.fp8_scales = sum(b.numel() for name, b in skeleton.named_buffers() if name.endswith(".weight_scale"))
        self.block_cast = max(sum(p.numel() for p in b.parameters() if p.element_size() == 1) for b in blocks)
        self._flops: dict[tuple[int, ...], Flops] = {}

    def video_tokens(self, latent_shape: tuple[int, ...]) -> int:
        """Latents [C, F, H, W] -> transformer tokens."""
        return self.structure.video_tokens(tuple(latent_shape))

    def _tokens(self, kind: str, video: int) -> int:
        return {"joint": video + self.text_len, "video": video, "text": self.text_len, "sample": 1}[kind]

    def flops(self, latent_shape: tuple[int, ...]) -> Flops:
        """Per sample of latents [C, F, H, W]; computed once per shape (the loop asks every micro-step)."""
        latent_shape = tuple(latent_shape)
        if latent_shape not in self._flops:
            self._flops[latent_shape] = self._count(latent_shape)
        return self._flops[latent_shape]

    def _count(self, latent_shape: tuple[int, ...]) -> Flops:
        video = self.video_tokens(latent_shape)
        seq = video + self.text_len
        attention = 4 * seq * seq * self.hidden  # QK^T and PV, per block
        forward = backward = recompute = 0.0
        for block, layers in self._by_block().items():
            block_forward = 0.0
            for layer, needs_grad in _input_needs_grad(layers, self.structure, upstream=bool(block)):
                tokens = self._tokens(layer.tokens, video)
                frozen = layer.flops_per_token * tokens
                lora = 2 * tokens * layer.lora_rank * (layer.fan_in + layer.fan_out)
                block_forward += frozen + lora
                lora_b_input = 2 * tokens * layer.lora_rank * layer.fan_out  # LoRA B's input always needs one
                # a frozen layer: the input gradient only; LoRA: weight gradients, and input ones where needed
                backward += (frozen + 2 * lora) if needs_grad else lora + lora_b_input
                if layer.name.endswith(self.structure.attention_output):  # attention sits just before it
                    block_forward += attention
                    backward += 2 * attention if needs_grad else 0
            forward += block_forward
            recompute += block_forward if block is not None else 0
        return Flops(forward, attention * self.layers, forward + backward, forward + backward + recompute)

    def _by_block(self) -> dict[int | None, list[LinearLayer]]:
        groups: dict[int | None, list[LinearLayer]] = {}
        prefix = self.structure.block_prefix
        for layer in self.linears:
            block = int(layer.name.removeprefix(prefix).split(".")[0]) if layer.name.startswith(prefix) else None
            groups.setdefault(block, []).append(layer)
        return groups

    def _local_tokens(self, latent_shape: tuple[int, ...], sequence: int) -> int:
        """Tokens a rank holds through a block: its 1/N of the video tokens and the whole prompt."""
        return self.video_tokens(latent_shape) // sequence + self.text_len

    def block_activation_bytes(self, latent_shape: tuple[int, ...], dtype_bytes: int, sequence: int = 1) -> float:
        """Bytes autograd keeps for one block's backward pass, for one sample, on one rank of a sequence group
        of ``sequence`` (1: no split)."""
        st = self.structure
        seq = self._local_tokens(latent_shape, sequence)
        block = seq * (dtype_bytes * (st.saved_hidden_wide * self.hidden + st.saved_ff_wide * self.ff_inner)
                       + st.saved_stats_bytes)
        inputs: dict[str, int] = {}
        first = f"{st.block_prefix}0."
        for layer in self.linears:
            if layer.lora_rank and layer.name.startswith(first):
                slot = layer.name.removeprefix(first)
                block += seq * dtype_bytes * layer.lora_rank
                if self.lora_dropout:  # LoRA A keeps its dropped input instead, and dropout its mask (at most
                    block += seq * layer.fan_in * 2 * dtype_bytes  # as wide as the input: CPU; CUDA: bool)
                else:  # the attention inputs read one tensor
                    inputs["attention" if slot in st.attention_inputs else slot] = layer.fan_in
        return block + seq * dtype_bytes * sum(inputs.values())

    def saved_activation_bytes(self, latent_shape: tuple[int, ...], dtype_bytes: int, checkpointing: bool,
                               sequence: int = 1) -> float:
        """Bytes kept from the forward pass to the backward pass, for one sample; with gradient checkpointing
        only each block's input."""
        seq = self._local_tokens(latent_shape, sequence)
        stream = seq * self.hidden * dtype_bytes  # the hidden states between blocks
        if checkpointing:  # each block's input, plus the embeddings and the final norm's input
            return (self.layers + 2) * stream
        video = self.video_tokens(latent_shape) // sequence
        rope = video * self.head_dim * 2 * 4 if self.structure.rope else 0  # fp32 cos, sin
        return stream + rope + self.layers * self.block_activation_bytes(latent_shape, dtype_bytes, sequence)

    def activation_bytes(self, latent_shape: tuple[int, ...], dtype_bytes: int, checkpointing: bool,
                         sequence: int = 1) -> float:
        """At the start of the backward pass, for one sample: what the forward pass kept, and with
        checkpointing the one block being recomputed."""
        recomputed = self.block_activation_bytes(latent_shape, dtype_bytes, sequence) if checkpointing else 0
        return (self.saved_activation_bytes(latent_shape, dtype_bytes, checkpointing, sequence) + recomputed
                + self.backward_buffer_bytes(latent_shape, dtype_bytes, sequence))

    def backward_buffer_bytes(self, latent_shape: tuple[int, ...], dtype_bytes: int, sequence: int = 1) -> float:
        """The gradients in flight at the backward pass's peak, for one sample: the feed-forward's (one
        FF-wide tensor) and two hidden-wide ones of the block being differentiated (bench/sequence.py: within
        5 % of the measured peak above the saved activations, with checkpointing and without)."""
        return self._local_tokens(latent_shape, sequence) * dtype_bytes * (self.ff_inner + 2 * self.hidden)

    def exchange_bytes(self, latent_shape: tuple[int, ...], dtype_bytes: int, checkpointing: bool,
                       sequence: int) -> float:
        """Bytes one rank of a sequence group sends in one micro-step (forward, recomputation, backward):
        per block, q, k and v to the head split and the output back (all-to-alls: (N-1)/N of the rank's
        video tokens each way), the prompt's output gathered over heads; once, the output gathered."""
        if sequence == 1:
            return 0.0
        n, video = sequence, self.video_tokens(latent_shape)
        local_video = video // n * self.hidden * dtype_bytes  # one hidden-wide tensor of the rank's video tokens
        text_heads = self.text_len * self.hidden // n * dtype_bytes
        to_heads, back = 3 * local_video * (n - 1) / n, local_video * (n - 1) / n
        prompt = text_heads * (n - 1)  # all-gather forward; its backward all-to-alls the gradient: the same bytes
        forward = to_heads + back + prompt
        backward = to_heads + back + prompt  # each all-to-all's gradient goes back the way it came
        output = next(m.fan_out for m in self.linears if m.name == self.structure.trained_stream[0])
        out = output * video // n * dtype_bytes * (n - 1)  # the output projection's, gathered: forward only
        return self.layers * (forward * (2 if checkpointing else 1) + backward) + out

    def memory(self, latent_shape: tuple[int, ...], micro_batch: int, zero: ZeroSettings, dtype_bytes: int,
               checkpointing: bool, sequence: int = 1, storage_bytes: int | None = None,
               offload: bool = False) -> MemoryEstimate:
        """``storage_bytes``: model.weights_dtype's bytes per element of the blocks' frozen linears (ZeRO-2; None:
        as computed); ``offload``: model.activation_offload (with checkpointing)."""
        world, lora = zero.world_size, self.params_lora
        est = MemoryEstimate()
        device, host = est.parts, est.host
        if zero.stage == 3:  # parameters over the persistence threshold are partitioned; small ones kept whole
            small = sum(n for n in self._frozen_sizes if n <= zero.persistence_threshold)
            partition = (self.params_frozen - small) * dtype_bytes / world
            if zero.offload_param:
                host["frozen weights"], device["frozen weights"] = partition, small * dtype_bytes
            else:
                device["frozen weights"] = partition + small * dtype_bytes
            # each layer gathers its full weights when it runs, with the next bucket prefetched; what stays
            # gathered beyond that (parameters used again soon, the backward's first blocks) is bounded by
            # stage3_max_live_parameters, and all of it by the model itself
            live = max(self.block_params + zero.prefetch_bucket_size, zero.max_live_parameters)
            device["frozen weights gathered to compute"] = min(live, self.params_frozen) * dtype_bytes
            device["LoRA weights"] = lora * dtype_bytes / world
        elif storage_bytes is not None:  # model.weights_dtype
            device["frozen weights"] = (self.params_frozen - self.params_cast) * dtype_bytes + \
                self.params_cast * storage_bytes + (4 * self.fp8_scales if storage_bytes == 1 else 0)  # fp32
            # scales per output row; the upcast copies live while the backward needs them: one block's with
            # checkpointing, all without
            upcast = self.block_cast if checkpointing else self.params_cast
            device["frozen weights upcast to compute"] = upcast * dtype_bytes
            device["LoRA weights"] = lora * dtype_bytes
        else:
            device["frozen weights"] = self.params_frozen * dtype_bytes
            device["frozen weights gathered to compute"] = 0.0
            device["LoRA weights"] = lora * dtype_bytes
        states = host if zero.offload_optimizer else device
        states["LoRA fp32 master weights"] = 4 * lora / world
        states["Adam moments"] = 8 * lora / world
        states["fp32 gradients"] = 4 * lora / world if zero.stage == 3 else 4 * lora
        # gradients are copied into flat buffers of reduce_bucket_size elements, allocated whole however small
        # the model (ZeRO-2: two with overlap_comm, to reduce one while filling the other)
        if zero.stage == 3:  # one flat buffer, in the communication dtype (measured: fp32 doubles it)
            device["gradient reduce buckets"] = zero.reduce_bucket_size * zero.communication_bytes
        elif zero.contiguous_gradients:
            buffers = 2 if zero.overlap_comm else 1
            device["gradient reduce buckets"] = zero.reduce_bucket_size * dtype_bytes * buffers
        else:
            device["gradient reduce buckets"] = min(zero.reduce_bucket_size, lora) * dtype_bytes
        act = self.activation_bytes(latent_shape, dtype_bytes, checkpointing, sequence)
        if offload:  # what checkpointing keeps waits on the host; the block being recomputed gets its input back
            kept = self.saved_activation_bytes(latent_shape, dtype_bytes, True, sequence)
            video = self.video_tokens(latent_shape) // sequence * self.hidden * dtype_bytes * micro_batch
            text = self.text_len * self.hidden * dtype_bytes * micro_batch
            # torch's pinned-memory cache hands out blocks of a power of two bytes: each block's video and
            # prompt streams, for every block and the two outside them
            host["offloaded activations (pinned)"] = (self.layers + 2) * (_pow2(video) + _pow2(text))
            act += (video + text) / micro_batch - kept
        device["activations"] = micro_batch * act
        return est

    def moved_bytes(self, latent_shape: tuple[int, ...], micro_batch: int, zero: ZeroSettings, dtype_bytes: int,
                    checkpointing: bool, sequence: int = 1, offload: bool = False) -> float:
        """Bytes one rank receives or copies in a micro-step beyond the LoRA gradients' reduction: ZeRO-3's gathers
        of the frozen weights (forward, the recomputation, backward), the offload's copies out and back, the
        sequence group's all-to-alls. What the planner ranks the ways to fit a GPU by, after recomputation."""
        moved = 0.0
        if zero.stage == 3:
            passes = 3 if checkpointing else 2
            moved += passes * self.params_frozen * dtype_bytes * (zero.world_size - 1) / zero.world_size
        if offload:
            moved += 2 * micro_batch * self.saved_activation_bytes(latent_shape, dtype_bytes, True, sequence)
        return moved + micro_batch * self.exchange_bytes(latent_shape, dtype_bytes, checkpointing, sequence)


def _pow2(nbytes: float) -> int:
    return 1 << (int(math.ceil(nbytes)) - 1).bit_length() if nbytes >= 1 else 0


def _linears(skeleton: nn.Module, structure: TransformerStructure) -> list[LinearLayer]:
    """Every matmul layer of a LoRA-adapted skeleton: frozen base layers carry their LoRA's rank."""
    layers: dict[str, dict] = {}
    for name, module in skeleton.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d)):
            continue
        if ".lora_A." in name or ".lora_B." in name:
            target = name.split(".lora_")[0]
            if ".lora_A." in name:
                layers.setdefault(target, {})["rank"] = module.out_features
            continue
        target = name.removesuffix(".base_layer")
        if isinstance(module, nn.Linear):
            fan_in, fan_out = module.in_features, module.out_features
        else:  # the patch embedding: one output position per video token
            fan_in, fan_out = module.in_channels * math.prod(module.kernel_size), module.out_channels
        layers.setdefault(target, {}).update(per_token=2 * fan_in * fan_out, fan_in=fan_in, fan_out=fan_out)
    return [LinearLayer(name, v["per_token"], _token_kind(name, structure), v.get("rank", 0), v["fan_in"], v["fan_out"])
            for name, v in layers.items()]


def _slot(name: str, prefix: str) -> str:
    """A linear's name within its block ("transformer_blocks.3.attn1.to_q" -> "attn1.to_q"); outside the blocks,
    its name."""
    return name.removeprefix(prefix).split(".", 1)[1] if name.startswith(prefix) else name


def _token_kind(name: str, structure: TransformerStructure) -> str:
    if name.startswith(structure.block_prefix):
        return "sample" if _slot(name, structure.block_prefix) in structure.per_sample else "joint"
    return structure.outside.get(name, "sample")


def _input_needs_grad(layers: list[LinearLayer], structure: TransformerStructure,
                      upstream: bool) -> Iterator[tuple[LinearLayer, bool]]:
    """(layer, whether its input needs a gradient) in execution order: an input needs one when a LoRA weight
    lies upstream of it. ``upstream``: the block's input already does (every block after the first)."""
    by_slot = {_slot(layer.name, structure.block_prefix): layer for layer in layers}
    lora = {slot: by_slot[slot].lora_rank > 0 for slot in by_slot}
    needs = dict.fromkeys(structure.attention_inputs, upstream)
    out = structure.attention_output
    needs[out] = upstream or any(lora.get(s, False) for s in structure.attention_inputs)
    previous = out
    for slot in structure.after_attention:  # a chain: each reads the one before
        needs[slot] = needs[previous] or lora.get(previous, False)
        previous = slot
    for slot, layer in by_slot.items():
        if slot in needs:
            yield layer, needs[slot]
        else:  # conditioning and embeddings take no gradient; the output reads the trained stream
            yield layer, slot in structure.trained_stream


# Dense bf16 tensor-core peaks in TFLOP/s, by a piece of torch.cuda.get_device_name(); the first match wins.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("H800", 989.4), ("GH200", 989.4),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1), ("L4", 121.0),
)


def device_peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak from PEAK_BF16_TFLOPS; None for a CPU or an unlisted GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for part, peak in PEAK_BF16_TFLOPS if part in name), None)
