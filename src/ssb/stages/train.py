"""Stage 4: train the hint-free LoRA student to match the teacher on the reply tokens.

The student sees `[plain prompt || reply + end token]` (the prompt rendered by the same function
inference uses) and, at every position that predicts a reply token, is pulled towards the
teacher's distribution from `[hinted prompt || reply + end token]` at the same reply token.

`SSBTrainer` is a `transformers.Trainer`, so `accelerate launch` (DDP, FSDP, DeepSpeed),
checkpointing, resume and `report_to` backends come from the ecosystem. What it adds:
- the loss (`ssb.distill.losses.chunked_kd_loss`) over reply positions only, chunk by chunk;
- normalisation by the number of reply tokens in the whole optimizer step, across gradient
  accumulation and processes (the collator exposes the per-position targets as `shift_labels`,
  which is what Trainer counts for `num_items_in_batch`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from ssb.config import Config, LossConfig
from ssb.distill.forward import final_hidden_states, output_head, reply_rows, right_pad
from ssb.distill.losses import chunked_kd_loss
from ssb.distill.store import TargetReader
from ssb.rundir import RunDir, append_jsonl, read_jsonl
from ssb.stages.common import load_base, log
from ssb.stages.targets import check_prompts, student_sequence, teacher_sequence

IGNORE = -100


class PairDataset(torch.utils.data.Dataset):
    def __init__(self, pairs: list[dict[str, Any]]):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.pairs[i]


def shifted_reply_labels(prompt_len: int, reply: list[int], width: int) -> torch.Tensor:
    """(width,) tensor: at each position that predicts a reply token, that token; else -100."""
    labels = torch.full((width,), IGNORE, dtype=torch.long)
    labels[reply_rows(prompt_len, len(reply))] = torch.tensor(reply, dtype=torch.long)
    return labels


@dataclass
class DistillCollator:
    """Pairs -> a batch of student inputs plus the teacher targets on the reply positions.

    Teacher target rows are concatenated example by example in reply order, which is the
    order in which `shift_labels != -100` selects the student's rows (row-major)."""

    pad_id: int
    mode: str
    reader: TargetReader | None = None

    def __call__(self, pairs: list[dict[str, Any]]) -> dict[str, Any]:
        seqs = [student_sequence(p) for p in pairs]
        ids, mask = right_pad([prompt + reply for prompt, reply in seqs], self.pad_id)
        shift = torch.stack(
            [shifted_reply_labels(len(prompt), reply, ids.shape[1]) for prompt, reply in seqs]
        )
        labels = torch.full_like(shift, IGNORE)
        labels[:, 1:] = shift[:, :-1]  # unshifted view, for tools that expect `labels`
        batch: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "shift_labels": shift,
        }
        if self.mode == "online":
            tseqs = [teacher_sequence(p) for p in pairs]
            t_ids, t_mask = right_pad([prompt + reply for prompt, reply in tseqs], self.pad_id)
            batch["teacher_input_ids"] = t_ids
            batch["teacher_attention_mask"] = t_mask
            batch["teacher_shift_labels"] = torch.stack(
                [
                    shifted_reply_labels(len(prompt), reply, t_ids.shape[1])
                    for prompt, reply in tseqs
                ]
            )
            return batch
        assert self.reader is not None
        parts: dict[str, list[torch.Tensor]] = {}
        for pair, (_, reply) in zip(pairs, seqs):
            stored_reply, tensors = self.reader.get(pair["id"])
            if list(stored_reply) != reply:
                raise ValueError(
                    f"targets for example {pair['id']} were computed on other reply tokens than "
                    "pairs.jsonl holds; rebuild them with `ssb targets` in a fresh run directory"
                )
            for key, value in tensors.items():
                parts.setdefault(key, []).append(value)
        for key, values in parts.items():
            batch[f"teacher_{key}"] = torch.cat(values)
        return batch


class SSBTrainer(Trainer):
    """A Trainer whose loss is the chunked KD loss on the reply positions."""

    # compute_loss already divides by the step's reply-token count: no extra 1/GA scaling.
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, loss_config: LossConfig, target_mode: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.loss_config = loss_config
        self.target_mode = target_mode
        # Make Trainer count reply tokens for every optimizer step (`num_items_in_batch`) from
        # the collator's `shift_labels`, across gradient accumulation and processes.
        self.model_accepts_loss_kwargs = True
        self._metric_sums = {"kd": 0.0, "ce": 0.0, "tokens": 0.0, "examples": 0.0}

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        lc = self.loss_config
        shift = inputs["shift_labels"]
        reply_mask = shift != IGNORE
        hidden = final_hidden_states(model, inputs["input_ids"], inputs["attention_mask"])
        student_rows = hidden[reply_mask]
        labels = shift[reply_mask]
        head = output_head(model)
        if self.target_mode == "online":
            targets, mode = {"hidden": self._online_teacher_rows(model, inputs)}, "hidden"
        else:
            prefix = "teacher_"
            targets = {k[len(prefix) :]: v for k, v in inputs.items() if k.startswith(prefix)}
            mode = self.target_mode
        out = chunked_kd_loss(
            student_rows,
            head.weight,
            targets,
            labels,
            mode=mode,
            tau=lc.temperature,
            kind=lc.divergence,
            beta=lc.jsd_beta,
            tau_squared=lc.tau_squared,
            kd_weight=lc.kd_weight,
            ce_weight=lc.ce_weight,
            chunk_size=lc.chunk_size,
            clip=lc.clip,
            logit_softcap=head.softcap,
            lm_head_bias=head.bias,
        )
        denominator = num_items_in_batch if num_items_in_batch is not None else out.num_tokens
        loss = out.loss_sum / denominator
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # num_items_in_batch counts every process's tokens and DDP averages gradients over
            # processes, so scale back up to get sum(all tokens) / count(all tokens).
            loss = loss * self.accelerator.num_processes
        sums = self._metric_sums
        sums["kd"] += float(out.kd_sum)
        sums["ce"] += float(out.ce_sum)
        sums["tokens"] += float(out.num_tokens)
        sums["examples"] += float(shift.shape[0])
        return (loss, None) if return_outputs else loss

    @torch.no_grad()
    def _online_teacher_rows(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        """The teacher is the same network with the LoRA adapter switched off."""
        unwrapped = self.accelerator.unwrap_model(model)
        with unwrapped.disable_adapter():
            hidden = final_hidden_states(
                unwrapped, inputs["teacher_input_ids"], inputs["teacher_attention_mask"]
            )
        return hidden[inputs["teacher_shift_labels"] != IGNORE].detach()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        sums = self._metric_sums
        if "loss" in logs and sums["tokens"] > 0:
            logs["kd"] = sums["kd"] / sums["tokens"]
            logs["ce"] = sums["ce"] / sums["tokens"]
            logs["reply_len"] = sums["tokens"] / max(sums["examples"], 1.0)
            self._metric_sums = {k: 0.0 for k in sums}
        super().log(logs, start_time)


class JsonlLogCallback(TrainerCallback):
    """Append each logged training step to train_log.jsonl (main process only)."""

    def __init__(self, path: Any):
        self.path = path

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any):
        if state.is_world_process_zero and logs and "loss" in logs:
            record = {"step": state.global_step, "epoch": state.epoch}
            record.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
            append_jsonl(self.path, [record])


def load_targets(cfg: Config, rundir: RunDir, model: Any, tokenizer: Any) -> TargetReader | None:
    mode = cfg.targets.mode
    if mode == "online":
        return None
    from ssb.stages.targets import targets_meta

    if not (rundir.targets_dir / "index.json").exists():
        raise FileNotFoundError(f"no targets in {rundir.targets_dir}: run `ssb targets` first")
    reader = TargetReader(rundir.targets_dir)
    expected = targets_meta(cfg, model, tokenizer)
    if reader.mode != mode:
        raise ValueError(
            f"{rundir.targets_dir} holds '{reader.mode}' targets but targets.mode is '{mode}'"
        )
    keys = ["vocab_size", "hidden_size", "model"] + (["tau"] if mode != "hidden" else [])
    reader.check_meta({k: expected[k] for k in keys})
    return reader


def check_head_frozen(model: Any, mode: str) -> None:
    """Stored targets are scored through the base lm_head; hidden/online targets are turned into
    logits with the student's lm_head. Both are only valid while the lm_head is frozen."""
    head = output_head(model)  # raises if the lm_head is LoRA-wrapped
    if head.weight.requires_grad:
        raise ValueError(
            f"targets.mode={mode}: the lm_head is trainable, so teacher logits recomputed through "
            "it would drift; keep lm_head out of the trainable modules"
        )


def run_train(cfg: Config, rundir: RunDir, progress: bool = True) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    tc = cfg.train
    pairs = read_jsonl(rundir.pairs_path)
    if not pairs:
        raise FileNotFoundError(f"no pairs in {rundir.pairs_path}: run `ssb bootstrap` first")
    base = load_base(cfg)
    tokenizer = base.tokenizer
    check_prompts(pairs, tokenizer, cfg)
    reader = load_targets(cfg, rundir, base.model, tokenizer)
    if reader is not None:
        missing = [p["id"] for p in pairs if p["id"] not in set(reader.ids())]
        if missing:
            raise ValueError(
                f"{len(missing)} pairs have no stored targets (first: {missing[0]}); "
                "run `ssb targets` to finish them"
            )

    lora = LoraConfig(
        r=tc.lora.r,
        lora_alpha=tc.lora.alpha,
        lora_dropout=tc.lora.dropout,
        target_modules=list(tc.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base.model, lora)
    try:
        check_head_frozen(model, cfg.targets.mode)
        if tc.gradient_checkpointing:
            model.enable_input_require_grads()
        device = next(base.model.parameters()).device
        args = TrainingArguments(
            output_dir=str(rundir.checkpoints_dir),
            per_device_train_batch_size=tc.batch_size,
            gradient_accumulation_steps=tc.grad_accum,
            num_train_epochs=tc.epochs,
            learning_rate=tc.learning_rate,
            lr_scheduler_type=tc.lr_scheduler,
            warmup_ratio=tc.warmup_ratio,
            weight_decay=tc.weight_decay,
            max_grad_norm=tc.max_grad_norm,
            logging_steps=tc.logging_steps,
            save_steps=tc.save_steps,
            save_total_limit=2,
            seed=cfg.seed,
            data_seed=cfg.seed,
            report_to=list(tc.report_to) or "none",
            remove_unused_columns=False,
            gradient_checkpointing=tc.gradient_checkpointing,
            use_cpu=device.type == "cpu",
            dataloader_num_workers=0,
            disable_tqdm=not progress,
        )
        collator = DistillCollator(
            pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
            mode=cfg.targets.mode,
            reader=reader,
        )
        trainer = SSBTrainer(
            model=model,
            args=args,
            train_dataset=PairDataset(pairs),
            data_collator=collator,
            loss_config=tc.loss,
            target_mode=cfg.targets.mode,
            callbacks=[JsonlLogCallback(rundir.train_log_path)],
        )
        checkpoints = sorted(rundir.checkpoints_dir.glob("checkpoint-*"))
        resume = bool(checkpoints)
        if resume:
            log.info("train: resuming from %s", checkpoints[-1])
            _drop_log_after(rundir, _checkpoint_step(checkpoints[-1]))
        elif rundir.train_log_path.exists():
            rundir.train_log_path.unlink()  # a fresh start: no steps from an earlier attempt
        result = trainer.train(resume_from_checkpoint=True if resume else None)
        if trainer.is_world_process_zero():
            _save_adapter_atomically(model, rundir)
        summary = {
            "steps": trainer.state.global_step,
            "examples": len(pairs),
            "train_loss": round(float(result.training_loss), 6),
            "adapter": str(rundir.adapter_dir),
        }
        losses = [r["loss"] for r in read_jsonl(rundir.train_log_path) if "loss" in r]
        if losses:
            summary["first_loss"], summary["last_loss"] = losses[0], losses[-1]
        return summary
    finally:
        # Give the shared base model back without the LoRA layers (not merged).
        model.unload()


def _checkpoint_step(path: Any) -> int:
    return int(str(path).rsplit("-", 1)[-1])


def _drop_log_after(rundir: RunDir, step: int) -> None:
    """Steps logged after the checkpoint we resume from will be redone: drop them."""
    from ssb.rundir import atomic_write_text

    kept = [r for r in read_jsonl(rundir.train_log_path) if r.get("step", 0) <= step]
    atomic_write_text(rundir.train_log_path, "".join(json.dumps(r) + "\n" for r in kept))


def _save_adapter_atomically(model: Any, rundir: RunDir) -> None:
    tmp = rundir.path / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    old = rundir.path / ".adapter.old"
    shutil.rmtree(old, ignore_errors=True)
    if rundir.adapter_dir.exists():
        rundir.adapter_dir.rename(old)
    tmp.rename(rundir.adapter_dir)
    shutil.rmtree(old, ignore_errors=True)
