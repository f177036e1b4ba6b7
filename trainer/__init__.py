"""DeepSpeed LoRA fine-tuning of CogVideoX text-to-video transformers."""
