#!/usr/bin/env bash
# The embedded default, end to end: set up .venv, write a tiny random-weight CogVideoX (5B-style, 3D RoPE)
# and eight synthetic mp4 videos with captions, pack them into training shards with data_tools/shard.py
# (the model's own VAE and T5) and two more as held-out shards, train a LoRA with DeepSpeed on 2 ranks (CPU
# when there is no GPU; one rank per GPU otherwise) with validation videos and loss, and export it as a
# diffusers LoRA file. Extra arguments go to launch/train.py:
#   bash launch/quickstart.sh --set train.max_steps=20
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash launch/setup_env.sh
VENV="${VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
OUT=runs/quickstart  # examples/tiny.yaml points here
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  RANKS="${RANKS:-$(nvidia-smi -L | wc -l)}"
else
  RANKS="${RANKS:-2}"
fi
rm -rf "$OUT"  # the quickstart owns this folder: start clean every time
"$PY" data_tools/tiny_model.py --out "$OUT/model" --flavour 5b
"$PY" data_tools/synth_videos.py --out "$OUT/videos" --count 8  # 12 frames, 120x160, 8 fps
"$PY" data_tools/shard.py --input "$OUT/videos" --model "$OUT/model" --out "$OUT/shards" \
  --shard-size 1  # clips of the model's native size (this tiny model: 9x96x128 at 8 fps)
"$PY" data_tools/inspect_shards.py "$OUT/shards"
"$PY" data_tools/synth_videos.py --out "$OUT/heldout_videos" --count 2 --first 8  # two videos training never sees
"$PY" data_tools/shard.py --input "$OUT/heldout_videos" --model "$OUT/model" --out "$OUT/heldout" \
  --shard-size 2
"$VENV/bin/deepspeed" --num_gpus "$RANKS" launch/train.py --spec examples/tiny.yaml \
  --set validation.loss.shards="$OUT/heldout" "$@"

cat <<DONE

quickstart finished ($RANKS ranks):
  model directory   $OUT/model            (tiny, random weights, loads with CogVideoXPipeline.from_pretrained)
  videos            $OUT/videos           (mp4 + prompts.txt + videos.txt, the CogVideo finetune layout)
  training shards   $OUT/shards           (manifest.json, rejected.jsonl, shard-*.tar)
  held-out shards   $OUT/heldout          (the validation loss's)
  run directory     $OUT/run              (spec.yaml, metrics.jsonl, tensorboard/, checkpoints/)
  validation videos $OUT/run/samples/step_*/  (an mp4 per prompt, and the LoRA that made them)
  LoRA              $OUT/run/lora/pytorch_lora_weights.safetensors
  sample again      $PY launch/sample.py --spec $OUT/run/spec.yaml --lora $OUT/run/lora --out $OUT/videos_out
  export a step     $PY launch/export.py --checkpoint $OUT/run/checkpoints/step_00000050
  TensorBoard       $VENV/bin/tensorboard --logdir $OUT/run/tensorboard
  use it            pipe = CogVideoXPipeline.from_pretrained("$OUT/model"); pipe.load_lora_weights("$OUT/run/lora")
DONE
