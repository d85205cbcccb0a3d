"""`ssb ablate`: SSB against SFT, rejection-sampling fine-tuning, on-policy self-distillation and
GRPO on the same problems and LoRA budget, with seeds (the command is ssb.ablation.ablate).

The feature stands above the pipeline stages: it runs them, and they never import it."""
