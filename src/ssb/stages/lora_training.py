"""One recipe for every LoRA training on the shared base model (the SSB student `ssb train`, the
GRPO baseline `ssb grpo`, the onpolicy arm of `ssb ablate`): `run_lora_training` runs it and is
the one owner of its checkpoints (the newest complete one resumed, after its fingerprint is
checked), its training log, the adapter (saved atomically, once, whatever the sharding) and of
giving the base model back as it was. A training supplies a `LoraTraining`: how to build its
trainer, and what its summary adds; `shared_arguments` gives it the TrainingArguments fields
that every training sets the same way."""

from __future__ import annotations

import json
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from peft import LoraConfig, PeftModel
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from ssb.config import Config, flatten
from ssb.identity import write_adapter_config
from ssb.models import disable_checkpointing
from ssb.rundir import (
    ADAPTER_CONFIG,
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    honour_umask,
    read_jsonl,
)
from ssb.sharding import deepspeed_launch, is_sharded, shard_report, trainable_state_dict
from ssb.stages.base import release_accelerator
from ssb.stages.common import log
from ssb.trackers import attach_trackers, check_report_to


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


def shared_arguments(
    args_class: type,
    cfg: Config,
    section: Literal["train", "grpo"],
    *,
    output_dir: Path,
    run_name: str,
    device: torch.device,
    progress: bool = True,
    **fields: Any,
) -> Any:
    """`args_class` (TrainingArguments, or TRL's GRPOConfig, its subclass) with the fields every
    LoRA training sets the same way: the optimizer and schedule from the config `section`
    (`train` or `grpo`), checkpoints, seeds, trackers, the model's own dtype (no autocast) and
    checkpointing from `train.gradient_checkpointing`. `fields` add the training's own (batch
    size, step count, ...) and win. Field names are checked against the installed transformers:
    5.x folds `warmup_ratio` into a fractional `warmup_steps` and renames
    `gradient_checkpointing` (TRL defaults it to True) to `activation_checkpointing`."""

    schedule = getattr(cfg, section)
    check_report_to(cfg.train.report_to)
    known = args_class.__dataclass_fields__
    kwargs: dict[str, Any] = {}
    if "warmup_ratio" in known:
        kwargs["warmup_ratio"] = schedule.warmup_ratio
    else:  # the config holds it in [0, 1), which transformers reads as a ratio
        kwargs["warmup_steps"] = float(schedule.warmup_ratio)
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in known else None
    kwargs[checkpointing or "gradient_checkpointing"] = cfg.train.gradient_checkpointing
    kwargs.update(
        output_dir=str(output_dir),
        learning_rate=schedule.learning_rate,
        lr_scheduler_type=schedule.lr_scheduler,
        weight_decay=schedule.weight_decay,
        max_grad_norm=schedule.max_grad_norm,
        save_strategy="steps",
        save_steps=schedule.save_steps,
        save_total_limit=2,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=list(cfg.train.report_to) or "none",
        run_name=run_name,
        # The model's own dtype rules; no autocast (TRL turns bf16 on by default).
        bf16=False,
        fp16=False,
        remove_unused_columns=False,
        # Normalise by the tokens of all processes (see SSBTrainer.compute_loss).
        average_tokens_across_devices=True,
        # Not under DeepSpeed: on CPU processes accelerate would then run plain DDP instead.
        use_cpu=device.type == "cpu" and not deepspeed_launch(),
        dataloader_num_workers=0,
        disable_tqdm=not progress,
    )
    kwargs.update(fields)
    return args_class(**kwargs)


def attach_reporting(trainer: Any, tracker_dir: Path, progress: bool) -> None:
    """The trackers of `train.report_to` write under `tracker_dir` (see `ssb.trackers`); with
    the progress bar off, nothing is printed (Trainer would print every log dict instead)."""
    if not progress:
        trainer.remove_callback(PrinterCallback)
    attach_trackers(trainer, tracker_dir)


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


# --------------------------------------------------------------------------- the recipe


@dataclass(frozen=True)
class LoraFiles:
    """Where one LoRA training keeps its files; the fingerprint (the settings its checkpoints
    were trained with) is `fingerprint_name` in `checkpoints_dir`."""

    checkpoints_dir: Path
    log_path: Path
    adapter_dir: Path
    fingerprint_name: str

    @property
    def fingerprint_path(self) -> Path:
        return self.checkpoints_dir / self.fingerprint_name


@dataclass(kw_only=True)
class LoraTraining(ABC):
    """What one LoRA training supplies to `run_lora_training`: how to build its trainer, what
    its summary adds, and, where it changes more of the base model than the LoRA layers, how to
    set up and undo that. `fingerprint`: what its checkpoints depend on (a resume under other
    settings is refused); `callbacks`: extra TrainerCallbacks (a notebook's, a test's)."""

    name: str  # in log lines: "train", "grpo", ...
    files: LoraFiles
    fingerprint: dict[str, Any]
    callbacks: list[TrainerCallback] = field(default_factory=list)

    def attach(self, base_model: Any) -> Any:
        """The model the trainer is built on: by default the base itself, which the trainer
        wraps in LoRA layers (TRL's `peft_config`); override to attach them here."""
        return base_model

    def setup(self, base_model: Any) -> None:  # noqa: B027 -- optional: most change nothing else
        """Before the LoRA is attached: note what `cleanup` must restore."""

    @abstractmethod
    def make_trainer(self, model: Any) -> Any:
        """A transformers Trainer on `model` that appends its logged steps to `files.log_path`
        and saves its checkpoints in `files.checkpoints_dir`."""

    @abstractmethod
    def summary(self, trainer: Any, result: Any) -> dict[str, Any]:
        """The training's own summary keys (the recipe adds steps, train_loss over every logged
        step, adapter and resumed_from)."""

    def cleanup(self, trainer: Any | None) -> None:  # noqa: B027 -- optional, as setup
        """After training, finished or failed (`trainer` None when it was never built), before
        the base model is given back."""


def run_lora_training(training: LoraTraining, base_model: Any) -> dict[str, Any]:
    """Run `training` on the shared `base_model`: resume its newest complete checkpoint (refused
    when its fingerprint differs), train, save the adapter, and give the base model back as it
    was whatever happens. Every process of a launch runs it; only the main one writes the log
    head, the fingerprint and the adapter. Returns the summary for the manifest."""
    files = training.files
    checkpoint = last_checkpoint(files.checkpoints_dir)
    check_resumable(files.fingerprint_path, training.fingerprint, checkpoint)
    was_training = base_model.training
    hooks_before = set(base_model.get_input_embeddings()._forward_hooks)
    training.setup(base_model)
    model = training.attach(base_model)
    trainer = None
    try:
        trainer = training.make_trainer(model)
        for callback in training.callbacks:
            trainer.add_callback(callback)
        if trainer.is_world_process_zero():
            if checkpoint is not None:
                log.info("%s: resuming from %s", training.name, checkpoint)
            start_log(files.log_path, checkpoint)
            write_fingerprint(files.fingerprint_path, training.fingerprint)
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        save_adapter(
            trained_model(model, trainer), files.adapter_dir, trainer.is_world_process_zero()
        )
        trainer.accelerator.wait_for_everyone()
        summary = {
            "steps": trainer.state.global_step,
            # Over every step, the ones before a resume included (Trainer's covers its own).
            "train_loss": round(logged_mean_loss(files.log_path) or result.training_loss, 6),
            **training.summary(trainer, result),
        }
        summary["adapter"] = str(files.adapter_dir)
        if is_sharded(model):
            summary["sharding"] = shard_report(model)  # this rank's share of the parameters
        if checkpoint is not None:
            summary["resumed_from"] = checkpoint.name
        return summary
    finally:
        training.cleanup(trainer)
        if is_sharded(model):
            # fully_shard / ZeRO-3 changed the shared base in place (DTensor or partitioned
            # parameters, FSDP module classes, DeepSpeed hooks); it cannot be given back as it
            # was, so later stages load it afresh.
            release_accelerator("after sharded training")
        else:
            peft_model = trained_model(model, trainer)
            if peft_model is not None:
                restore_base(peft_model, was_training, hooks_before)
            base_model.train(was_training)


def trained_model(model: Any, trainer: Any | None) -> Any | None:
    """The PEFT model holding the trained LoRA: `model` when it was attached before the trainer
    was built, else the one the trainer made (None when it made none). (Not `peft_config`:
    peft sets it on the wrapped base model too.)"""
    if isinstance(model, PeftModel):
        return model
    made = getattr(trainer, "model", None)
    return made if isinstance(made, PeftModel) else None
