"""`ssb ablate`: SSB against SFT, rejection-sampling fine-tuning, on-policy self-distillation and
GRPO on the same problems and LoRA budget, with seeds (the stage is ssb.stages.ablate)."""
