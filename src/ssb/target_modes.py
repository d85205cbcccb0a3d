"""The teacher-target modes, described once: what each stores, in which dtypes, and what it
requires. The config's choices, the target store's tensors and dtypes, the loss's expected keys
and the stages' branches all read this table. (No torch import: the CLI reads it at start-up.)"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TargetMode:
    name: str
    description: str
    # Tensors stored per reply token, name -> storage dtype (torch's name); empty: nothing stored.
    tensors: dict[str, str] = field(default_factory=dict)
    # The loss reads the targets in this mode (online: hidden states of a live teacher forward).
    loss_mode: str = ""

    @property
    def stored(self) -> bool:
        return bool(self.tensors)


TARGET_MODES: dict[str, TargetMode] = {
    mode.name: mode
    for mode in (
        TargetMode(
            "hidden",
            "the teacher's final hidden states (bf16, 2*H bytes per token); logits recomputed "
            "exactly through the frozen lm_head",
            {"hidden": "bfloat16"},
            loss_mode="hidden",
        ),
        TargetMode(
            "topk",
            "the teacher's top-k ids and log-probs plus the tail mass (~6*k bytes per token); "
            "approximate at high temperature",
            {"ids": "int32", "logp": "float16", "tail": "float32"},
            loss_mode="topk",
        ),
        TargetMode(
            "dense",
            "full float32 log-probs (4*V bytes per token: tests, small vocabularies)",
            {"logp": "float32"},
            loss_mode="dense",
        ),
        TargetMode(
            "online",
            "nothing stored: the frozen teacher (the student with its adapter off) runs in every "
            "training step",
            loss_mode="hidden",
        ),
    )
}
STORED_MODES = tuple(name for name, mode in TARGET_MODES.items() if mode.stored)
