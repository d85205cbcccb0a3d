"""Model shapes and the sizes of every section, full or ``quick`` (tiny: checks the plumbing)."""

from __future__ import annotations

from typing import Any

QWEN25_3B = {
    "vocab": 151936,
    "hidden": 2048,
    "intermediate": 11008,
    "layers": 36,
    "heads": 16,
    "kv_heads": 2,
}
GEMMA3_270M = {"vocab": 262144, "hidden": 640}
TAU = 2.0  # the KD temperature of the paper and of the quickstart


def bench_sizes(quick: bool) -> dict[str, Any]:
    """Per section: the shapes and counts it measures at."""
    if quick:
        return {
            "storage_shapes": [("tiny-a", 4096, 64), ("tiny-b", 8192, 32)],
            "storage_examples": 2,
            "storage_reply": 8,
            "topks": [16, 64, 256],
            "approx_pairs": 3,
            "npz_examples": 1,
            "kd": {
                "vocab": 4096,
                "hidden": 64,
                "intermediate": 128,
                "layers": 1,
                "heads": 4,
                "kv_heads": 2,
                "batch": 2,
                "seqs": [64],
                "lora_r": 8,
                "topk": 64,
                "repeats": 1,
            },
            "gen": {
                "seq_prompts": 2,
                "batch_prompts": 4,
                "batch_size": 4,
                "max_new_tokens": 8,
                "rollout_prompts": 2,
                "rollout_rounds": 1,
            },
            "scoring": {"pairs": 4, "rounds": 1},
            "cpu": {
                "gemm": {"vocab": 4096, "hidden": 64, "grad_rows": 8},
                "gen_problems": 2,
                "max_new_tokens": 4,
                "train_pairs": 2,
                "train_repeats": 1,
            },
            "vllm_cpu": {"problems": 2, "max_new_tokens": 4, "native_only": True},
            "gpu": {
                "shape": {
                    "vocab": 4096,
                    "hidden": 64,
                    "intermediate": 128,
                    "heads": 4,
                    "kv_heads": 2,
                },
                "layers": 2,
                "batch": 2,
                "seq": 64,
                "gen_prompts": 4,
                "gen_tokens": 4,
                "prompt_len": 16,
                "loop_batches": [4, 8],
            },
        }
    return {
        "storage_shapes": [
            ("Qwen2.5-3B", QWEN25_3B["vocab"], QWEN25_3B["hidden"]),
            ("gemma-3-270m", GEMMA3_270M["vocab"], GEMMA3_270M["hidden"]),
        ],
        "storage_examples": 2,
        "storage_reply": 64,
        "topks": [16, 64, 256],
        "approx_pairs": 8,
        "npz_examples": 2,
        "kd": {
            "vocab": QWEN25_3B["vocab"],
            "hidden": 256,
            "intermediate": 1024,
            "layers": 2,
            "heads": 4,
            "kv_heads": 2,
            "batch": 4,
            "seqs": [1024, 2048],
            "lora_r": 32,
            "topk": 64,
            "repeats": 2,  # at the first length; 1 at longer ones
        },
        "gen": {
            "seq_prompts": 3,
            "batch_prompts": 16,
            "batch_size": 16,
            "max_new_tokens": None,  # the quickstart's (48)
            "decode_tokens": 16,
            "rollout_prompts": 8,  # x the quickstart's 4 samples = 2 batches of 16
            "rollout_rounds": 2,
        },
        "scoring": {"pairs": 4, "rounds": 3},
        "cpu": {
            "gemm": {
                "vocab": GEMMA3_270M["vocab"],
                "hidden": GEMMA3_270M["hidden"],
                "grad_rows": 16,
            },
            "gen_problems": 8,  # x the quickstart's 4 samples
            "max_new_tokens": None,  # the quickstart's (48)
            "train_pairs": 4,  # one quickstart batch
            "train_repeats": 2,
        },
        # x the quickstart's 4 samples: 64 rows, two batches of the quickstart's 32
        "vllm_cpu": {"problems": 16, "max_new_tokens": None},
        "gpu": {
            "layers": QWEN25_3B["layers"],
            "batch": 4,
            "seq": 1024,
            "gen_prompts": 16,
            "gen_tokens": 128,
            # ssb's decode loop against transformers' generate at these batch sizes
            "loop_batches": [16, 64],
        },
    }
