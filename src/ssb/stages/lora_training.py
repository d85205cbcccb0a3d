"""What the SSB student (`ssb train`) and the GRPO baseline (`ssb grpo`) share as LoRA trainings on
the shared base model: the LoRA config, the training log, checkpoints and their resume check,
saving the adapter, and giving the base model back as it was. train.py and grpo.py keep only
what differs (the loss and its data; TRL's trainer and rewards)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from peft import LoraConfig
from transformers import TrainerCallback

from ssb.config import Config, flatten
from ssb.identity import ADAPTER_CONFIG, write_adapter_config
from ssb.models import disable_checkpointing
from ssb.rundir import (
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    honour_umask,
    read_jsonl,
)
from ssb.sharding import is_sharded, trainable_state_dict


def lora_config(cfg: Config) -> Any:
    """PEFT's LoraConfig from `train.lora` (the one LoRA budget of SSB and GRPO)."""

    lc = cfg.train.lora
    return LoraConfig(
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=list(lc.target_modules),
        task_type="CAUSAL_LM",
    )


class JsonlLogCallback(TrainerCallback):
    """Append each logged training step to a train_log.jsonl (main process only)."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any):
        if state.is_world_process_zero and logs and "loss" in logs:
            record = {"step": state.global_step, "epoch": state.epoch}
            record.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
            append_jsonl(self.path, [record])


# --------------------------------------------------------------------------- checkpoints


def checkpoint_step(path: str | Path) -> int:
    return int(str(path).rsplit("-", 1)[-1])


def last_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest complete `checkpoint-<step>` (by step number, not by name: "checkpoint-10"
    sorts before "checkpoint-9"); a checkpoint without its trainer state is incomplete."""
    found = [
        path
        for path in checkpoints_dir.glob("checkpoint-*")
        if path.is_dir()
        and path.name.split("-")[-1].isdigit()
        and (path / "trainer_state.json").exists()
    ]
    return max(found, key=checkpoint_step, default=None)


def write_fingerprint(path: Path, fingerprint: dict[str, Any]) -> None:
    """Record what the checkpoints next to `path` were trained with."""
    atomic_write_json(path, fingerprint)


def check_resumable(path: Path, fingerprint: dict[str, Any], checkpoint: Path | None) -> None:
    """Refuse to resume a checkpoint written under other settings than `fingerprint` (the
    settings its optimizer state and step count depend on), naming what changed."""
    if checkpoint is None or not path.exists():
        return
    old = flatten(json.loads(path.read_text()))
    new = flatten(json.loads(json.dumps(fingerprint)))
    if old != new:
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        raise ValueError(
            f"{path.parent} holds checkpoints of a run with different settings "
            f"({', '.join(changed)}); delete that directory to train from scratch, or restore "
            "the config to resume"
        )


def start_log(log_path: Path, checkpoint: Path | None) -> None:
    """Before training: when resuming, drop the steps logged after the checkpoint (they will be
    redone); when starting afresh, drop an earlier attempt's log."""
    if checkpoint is None:
        log_path.unlink(missing_ok=True)
        return
    step = checkpoint_step(checkpoint)
    kept = [r for r in read_jsonl(log_path) if r.get("step", 0) <= step]
    atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in kept))


def logged_mean_loss(log_path: Path) -> float | None:
    """The mean training loss over every optimizer step in the log, each record weighted by the
    steps it averages. Unlike Trainer's `training_loss`, which covers only the steps its own
    process ran, this includes the steps before a resume."""
    records = sorted(
        (
            r
            for r in read_jsonl(log_path)
            if isinstance(r.get("loss"), (int, float)) and "step" in r
        ),
        key=lambda r: r["step"],
    )
    total, previous = 0.0, 0
    for record in records:
        total += record["loss"] * (record["step"] - previous)
        previous = record["step"]
    return total / previous if previous else None


# --------------------------------------------------------------------------- adapter and base


def save_adapter_atomically(
    model: Any, target: Path, state_dict: dict[str, Any] | None = None
) -> None:
    """`save_pretrained` into a temporary sibling, then swap it in with renames: a crash leaves
    the old adapter or the new one, never half of one. `state_dict`: the weights to write instead
    of the model's own (whole tensors gathered from sharded ones, see `save_adapter`)."""
    tmp = target.parent / ".adapter.tmp"
    old = target.parent / ".adapter.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if state_dict is None:
        model.save_pretrained(str(tmp))
    else:
        model.save_pretrained(str(tmp), state_dict=state_dict)
    # The same adapter is the same bytes (PEFT writes target_modules in set order).
    write_adapter_config(tmp, json.loads((tmp / ADAPTER_CONFIG).read_text()))
    honour_umask(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def save_adapter(model: Any, target: Path, is_main_process: bool) -> None:
    """Write the trained adapter of the PEFT `model` to `target` once (by the main process), in
    the same files whether the LoRA weights are whole on every rank (one process, DDP, ZeRO-2)
    or sharded by FSDP2. Every rank must call it: under FSDP2 the LoRA weights are first gathered
    into whole tensors on rank 0 (a collective; the frozen base is not gathered)."""

    state_dict = trainable_state_dict(model) if is_sharded(model) else None
    if is_main_process:
        save_adapter_atomically(model, target, state_dict)


def restore_base(
    peft_model: Any, was_training: bool = False, hooks_before: set[int] | None = None
) -> Any:
    """Give the shared base model (cached by `load_base` for later stages) back as it was and
    return it: LoRA layers removed (not merged), no hooks left on its input embeddings (peft,
    Trainer and TRL add an input-requires-grad hook around checkpointing), checkpointing off, the
    original train/eval mode. `hooks_before`: the embeddings' forward-hook ids before the adapter
    was attached (all others are removed); without it, those hooks are found by name."""
    base = peft_model.unload()
    hooks = base.get_input_embeddings()._forward_hooks
    for key, hook in list(hooks.items()):
        added = (
            key not in hooks_before
            if hooks_before is not None
            else getattr(hook, "__name__", "").startswith("make_inputs_require_grad")
        )
        if added:
            del hooks[key]
    # The handles of those hooks: with their hooks gone, later enable/disable calls start clean.
    for name in ("_require_grads_hook", "_require_grads_hooks"):
        handle = base.__dict__.get(name)
        if handle is not None and getattr(handle, "id", None) not in hooks:
            delattr(base, name)
    disable_checkpointing(base)
    base.train(was_training)
    return base
