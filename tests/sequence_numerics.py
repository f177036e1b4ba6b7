"""Run by tests/test_sequence.py under torchrun on 2 ranks: one micro-step of each tiny model in fp32, its video
tokens split over the 2 ranks (trainer/sequence.py, families/cogvideox_ulysses.py), against the same step of the
whole model on one rank. Writes the largest differences (relative to the largest value) as JSON.

    torchrun --nproc_per_node 2 tests/sequence_numerics.py OUT.json MODEL_DIR...
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer import sequence  # noqa: E402
from trainer.engine import init_distributed  # noqa: E402
from trainer.families import load_family  # noqa: E402
from trainer.loop import sample_losses  # noqa: E402
from trainer.parallel import ParallelLayout  # noqa: E402
from trainer.spec import LoraSection  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_out", "norm1.linear"]


def step(model_dir: Path, exchange) -> dict[str, torch.Tensor]:
    """Output, loss and every LoRA gradient of one micro-step (LoRA weights random, so that every one counts)."""
    family = load_family(str(model_dir))
    model = family.load(LoraSection(rank=4, target_modules=TARGETS), torch.float32, True, seed=0)
    model.train()
    if exchange is not None:
        family.split_sequence(model.transformer, exchange)
    params = model.lora_parameters()
    draws = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params.values():
            p.copy_(torch.randn(p.shape, generator=draws) * 0.2)
    cfg = model.config
    channels = cfg.out_channels
    frames = 3 if cfg.patch_size_t is None else 5  # 1.5 pads 5 latent frames to 6
    latents = torch.randn(2, channels, frames, 12, 16, generator=draws)
    prompt = torch.randn(2, cfg.max_text_seq_length, cfg.text_embed_dim, generator=draws)
    image = torch.randn(2, channels, 1, 12, 16, generator=draws) if family.image_to_video else None
    t = torch.tensor([100, 700])
    outputs = []

    def call(*args):
        outputs.append(model(*args))
        return outputs[-1]

    _, per_sample = sample_losses(call, model, family.objective(), latents, prompt, t,
                                  torch.Generator().manual_seed(2), torch.float32, image)
    loss = per_sample.mean()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in params.items()}
    if exchange is not None:  # each rank holds its part of the gradient: the group's sum is the gradient
        for g in grads.values():
            dist.all_reduce(g, group=exchange.group)
    return {"output": outputs[0].detach(), "loss": loss.detach(), **grads}


def main() -> None:
    out, model_dirs = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
    init_distributed(timedelta(minutes=5))  # as the trainer joins: deepspeed.comm over gloo on CPU
    torch.set_num_threads(1)
    layout = ParallelLayout.from_process_group(sequence=2)
    _, exchange = sequence.join(layout)
    # a sample one rank of the group could not read counts for neither (trainer/loop.py train_step)
    mine = torch.tensor([True, layout.rank == 0, True])
    report: dict = {"all_valid": exchange.all_valid(mine).tolist()}
    for model_dir in model_dirs:
        whole, split = step(model_dir, None), step(model_dir, exchange)
        worst = {}
        for name, reference in whole.items():
            scale = reference.abs().max().item()
            worst[name] = (split[name] - reference).abs().max().item() / (scale or 1.0)
        report[model_dir.name] = {"output": worst.pop("output"), "loss": worst.pop("loss"),
                                  "gradients": max(worst.values()), "gradient_count": len(worst),
                                  "gradients_nonzero": all(whole[n].abs().max() > 0 for n in worst)}
    if layout.is_main:
        out.write_text(json.dumps(report, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
