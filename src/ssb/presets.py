"""Named starting points for a run's config (`--preset NAME`): each overrides a few keys of the
defaults in `ssb.config`, with the reason for each value beside it. A config file and `--set`
override a preset in turn."""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # Embedded gemma-3-270m on synthetic one-step arithmetic, sized for 2 CPU cores.
    "quickstart": {
        "name": "quickstart",
        # dtype auto: bfloat16 only on CPUs that compute it natively, else float32.
        "model": {"name": "embedded", "dtype": "auto"},
        # 128 problems: ~30 pairs with two teacher attempts (39 of 160 measured).
        "data": {"train": "synthetic", "max_problems": 128, "synthetic": {"difficulty": 1}},
        "prompt": {"format": "fewshot", "num_fewshot": 6},
        # 32 rows per decode step: the 262k-row output layer costs about as much for 32 rows as
        # for 16 on a CPU (`ssb bench`, section cpu).
        "generation": {"batch_size": 32, "max_new_tokens": 48},
        "rollout": {"num_samples": 4, "sampling": {"temperature": 0.5}},
        # A second teacher sample when the first is wrong (~2 of 3 first samples are): 18-24
        # pairs from 160 problems with one attempt, 39 with two.
        "bootstrap": {"sampling": {"temperature": 0.4}, "attempts": 2},
        "targets": {"mode": "hidden", "batch_size": 4},
        "train": {
            "lora": {"r": 16, "alpha": 32},
            "epochs": 3,
            "batch_size": 4,
            # 2e-4 (the paper's, for a 3B model) overshoots on gemma-3-270m: the KD loss rises.
            "learning_rate": 5e-5,
            "save_steps": 20,
        },
        "eval": {"benchmarks": ["synthetic"], "max_problems": 150},
        # Measured on the quickstart: round 2 at 5e-5 fell to 20.7% (base 37.3%); at 1e-5, 35.3%.
        "round_learning_rate": 1e-5,
        # 8 steps x 8 completions (~16 min on 2 busy cores); with 4 completions at T=0.8 every
        # group was all right or all wrong (no gradient) in 8 steps.
        "grpo": {
            "num_generations": 8,
            "batch_size": 1,
            "max_steps": 8,
            "learning_rate": 1e-4,
            "sampling": {"temperature": 1.0},
            "max_completion_length": 32,
            "save_steps": 4,
        },
    },
    # `ssb ablate`'s validated study on the embedded gemma-3-270m, sized for 2 CPU cores: does an
    # SSB variant beat cross-entropy on the same pairs? 112 pairs, SSB (the reworked hint) and
    # four variants against sft and rft, each arm's learning rate (and the KD arms' temperature)
    # chosen on 200 validation problems, then 3 seeds, 300 held-out test problems evaluated once.
    # Left out to fit ~2 hours: onpolicy and grpo (measured in the first study,
    # docs/ablations.md) and the correct_only/gold contexts. Estimate there.
    "ablation-cpu": {
        "name": "ablation-cpu",
        "model": {"name": "embedded", "dtype": "auto"},
        # All 640 are rolled out at once (data.max_problems is set, so no block scan); the
        # bootstrap stops once 112 pairs are kept (~566 problems decided), and every arm draws
        # on the problems it decided (rft's rollouts, the variants' own bootstraps).
        "data": {"train": "synthetic", "max_problems": 640, "synthetic": {"difficulty": 1}},
        "prompt": {"format": "fewshot", "num_fewshot": 6},
        "generation": {"batch_size": 32, "max_new_tokens": 48},
        "rollout": {"num_samples": 4, "sampling": {"temperature": 0.5}},
        "bootstrap": {
            "sampling": {"temperature": 0.4},
            "attempts": 2,
            "target_pairs": 112,
            "hint_style": "marked",
        },
        "targets": {"mode": "hidden", "batch_size": 4},
        # One epoch over the pairs: S = ceil(pairs / 4) optimizer steps for every arm.
        "train": {
            "lora": {"r": 16, "alpha": 32},
            "epochs": 1,
            "batch_size": 4,
            "learning_rate": 5e-5,
            "save_steps": 10,
        },
        # Greedy pass@1 (eval.num_samples 1).
        "eval": {"benchmarks": ["synthetic"], "max_problems": 300},
        # For `--arms ...,grpo`: a group of 4 (GRPO's TRL generation dominates its time).
        "grpo": {
            "num_generations": 4,
            "batch_size": 1,
            "learning_rate": 1e-4,
            "sampling": {"temperature": 1.0},
            "max_completion_length": 32,
            "save_steps": 10,
        },
        "ablate": {
            "arms": ["ssb", "sft", "rft"],
            "seeds": 3,
            "variants": [
                # The first design of the hint (rollouts whole, on the question line).
                "inline: bootstrap.hint_style=inline",
                "filtered: train.loss.target_filter=true",
                # DistillKit's mix: half KD, half CE on the reply.
                "mixed: train.loss.target_filter=true; train.loss.kd_weight=0.5; "
                "train.loss.ce_weight=0.5",
                "gated: train.loss.target_filter=true; train.loss.advantage_weighting=gate",
            ],
            "validation_problems": 200,
            "lr_grid": [5e-5, 2e-4],
            "tau_grid": [1.0, 2.0],
            # For `--arms ...,onpolicy`: the rollouts' temperature (at 1.0 a 270M base rambles).
            "onpolicy_sampling": {"temperature": 0.5},
        },
    },
    # The paper's configuration (arXiv 2512.05105): Qwen2.5-3B-Instruct, GSM8K train scanned in
    # order until 256 pairs are kept.
    "paper": {
        "name": "paper",
        # A GPU preset: without a usable GPU it stops with the reason instead of crawling on CPU.
        "model": {"name": "Qwen/Qwen2.5-3B-Instruct", "dtype": "bfloat16", "device": "cuda"},
        "data": {"train": "gsm8k", "train_split": "train", "max_problems": None},
        "prompt": {"format": "chat"},
        "generation": {"batch_size": 64, "max_new_tokens": 2048},
        "rollout": {"num_samples": 4, "sampling": {"temperature": 0.8, "top_k": 50}},
        "bootstrap": {"sampling": {"temperature": 0.4, "top_k": 50}, "target_pairs": 256},
        "targets": {"mode": "hidden", "batch_size": 8},
        "train": {
            "lora": {"r": 32, "alpha": 32, "dropout": 0.0},
            "loss": {"temperature": 2.0, "tau_squared": True, "kd_weight": 1.0, "ce_weight": 0.0},
            "learning_rate": 2e-4,
            "batch_size": 4,
            "epochs": 3,
            # Also GRPO's: 8 x ~1,150-token completions per step do not fit 80 GB without it.
            "gradient_checkpointing": True,
        },
        "eval": {"benchmarks": ["math500", "aime24"], "max_problems": None},
        # MOTIF's vanilla_grpo.py (the source of the paper's GRPO row), but with SSB's LoRA
        # budget and bf16 weights instead of MOTIF's 4-bit base and r=64.
        "grpo": {
            "num_generations": 8,
            "batch_size": 1,
            "max_steps": 2000,
            "learning_rate": 5e-6,
            "lr_scheduler": "cosine",
            "warmup_ratio": 0.1,
            "weight_decay": 0.1,
            "max_grad_norm": 0.1,
            "beta": 0.0,
            "max_completion_length": 1024,
            "save_steps": 250,
        },
    },
}
