"""train.ema: an exponential moving average of the LoRA's fp32 master weights.

    ema_0 = m_0 (the masters at the start),   ema_k = decay * ema_(k-1) + (1 - decay) * m_k

after each applied optimizer step k (a skipped, non-finite step changes neither). The average lives beside
DeepSpeed's own fp32 master partitions, one flat tensor per parameter group and rank, so under ZeRO-3 (and
ZeRO-2, whose masters are partitioned too) each rank holds the average of exactly the elements it updates:
no gather per step, and its memory is the masters' (a ZeRO-3 rank holds 1/N of it).

Everything that needs the average as whole tensors (the lora_ema/ export, a checkpoint, validation with
validation.use_ema) swaps it into the master partitions for a moment (``swapped``): DeepSpeed's own gather of
its masters then reads the average, and the swap back restores the masters bit for bit. A checkpoint holds
the whole average (``ema.safetensors``, peft names, fp32), so that a resume on another number of ranks or
another ZeRO layout reads it too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from trainer.engine import fp32_master_partitions, full_fp32_masters
from trainer.errors import UserError
from trainer.files import atomic_write
from trainer.parallel import rank_in

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

EMA_FILE = "ema.safetensors"  # in a checkpoint's folder, written before its completion marker


class LoraEma:
    def __init__(self, engine: DeepSpeedEngine, params: dict[str, nn.Parameter], decay: float):
        self.masters = fp32_master_partitions(engine)
        self.params, self.decay = params, decay
        self.shadow = [m.detach().clone() for m in self.masters]
        self.restarted = False  # resumed from a checkpoint that held no average: it starts at the resumed masters

    def update(self) -> None:
        """After an applied optimizer step, on every rank (no communication)."""
        for shadow, master in zip(self.shadow, self.masters, strict=True):
            shadow.lerp_(master, 1.0 - self.decay)  # shadow + (1 - decay) * (master - shadow)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside, DeepSpeed's master partitions hold the average (and the average the masters): the masters'
        readers (``full_fp32_masters``, the export) read the average. No optimizer step may run inside."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def _swap(self) -> None:
        with torch.no_grad():
            for shadow, master in zip(self.shadow, self.masters, strict=True):
                held = master.clone()  # one group at a time
                master.copy_(shadow)
                shadow.copy_(held)

    def full(self) -> dict[str, torch.Tensor]:
        """The whole average per LoRA parameter, fp32 on the CPU. A collective."""
        with self.swapped():
            return full_fp32_masters(self.params)

    def set_full(self, tensors: dict[str, torch.Tensor]) -> None:
        """Make the average ``tensors`` (whole, per LoRA parameter): each rank keeps its partition's share. Local."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

        device = self.masters[0].device
        with self.swapped(), torch.no_grad():
            for name, param in self.params.items():
                value = tensors[name].to(device, torch.float32).flatten()
                if not hasattr(param, "ds_id"):  # ZeRO-1/2: DeepSpeed cuts the rank's fragment out itself
                    safe_set_full_fp32_param(param, value.view(param.shape))
                    continue
                # ZeRO-3: DeepSpeed's set_full_hp_param reads a whole partition past the end of a tensor that
                # does not divide by the ranks (the last partition is padded); cut the share here
                share = param.ds_tensor.numel()  # type: ignore[attr-defined]  # ZeRO-3 sets it
                start = share * rank_in(getattr(param, "ds_process_group", None))
                local = torch.zeros(share, dtype=torch.float32, device=device)
                count = max(0, min(share, value.numel() - start))
                local[:count] = value[start:start + count]
                safe_set_local_fp32_param(param, local)

    def save(self, folder: Path, is_main: bool) -> None:
        """Into a checkpoint's folder (a collective; rank 0 writes)."""
        tensors = self.full()
        if is_main:
            atomic_write(folder / EMA_FILE, save({name: t.contiguous() for name, t in tensors.items()}))

    def load(self, folder: Path) -> bool:
        """From a checkpoint's folder, on every rank; False (the average left as it is) where it holds none."""
        path = folder / EMA_FILE
        if not path.is_file():
            return False
        try:
            tensors = load_file(str(path))
        except (OSError, SafetensorError) as exc:
            raise UserError(f"train.ema: {path} cannot be read ({exc}); resume from another checkpoint "
                            f"(checkpoint.resume)") from None
        wrong = [n for n, p in self.params.items() if tuple(tensors.get(n, torch.empty(0)).shape) != _shape(p)]
        if wrong:
            raise UserError(f"train.ema: {path} does not hold this LoRA's average ({len(wrong)} tensor(s) missing "
                            f"or of another shape, e.g. {wrong[0]}): was lora.rank or lora.target_modules changed?")
        self.set_full(tensors)
        return True

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Inside, the model computes with the average: its LoRA parameters (the compute copies, in the compute
        dtype) and the fp32 masters hold it; both are restored bit for bit afterwards. A collective on entry and
        exit (under ZeRO-3 the parameters are gathered and partitioned again)."""
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        average = self.full()
        params = list(self.params.values())
        with GatheredParameters(params, modifier_rank=0), torch.no_grad():  # ZeRO-2: no gather, already whole
            kept = [p.data.clone() for p in params]
            for name, p in self.params.items():
                p.data.copy_(average[name].to(p.device, p.dtype))
        with self.swapped():
            yield
        # not on an exception: it ends the run, and this is a collective the other ranks may never join
        with GatheredParameters(params, modifier_rank=0), torch.no_grad():
            for p, original in zip(params, kept, strict=True):
                p.data.copy_(original)


def _shape(param: nn.Parameter) -> tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3 leaves an empty partition in .shape
