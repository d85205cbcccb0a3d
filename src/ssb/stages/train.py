"""Stage 4: train the hint-free LoRA student to match the teacher on the reply tokens.

The student sees `[plain prompt || reply + end token]` (the prompt rendered by the same function
inference uses) and, at every position that predicts a reply token, is pulled towards the
teacher's distribution from `[hinted prompt || reply + end token]` at the same reply token.

`SSBTrainer` is a `transformers.Trainer`, so `accelerate launch` (DDP, DeepSpeed ZeRO-2 and
ZeRO-3, FSDP2; see `ssb.sharding`), checkpointing, resume and `report_to` backends come from
the ecosystem. What it adds:
- the loss (`ssb.distill.losses.chunked_kd_loss`) over reply positions only, chunk by chunk;
- a micro-batch's padding left out: the few-shot prefix every row shares runs once, or, where
  there is none, the rows run packed into one padding-free row (`reply_hidden`), where the
  model's attention is measured to keep packed sequences apart (`should_pack`);
- normalisation by the number of reply tokens in the whole optimizer step, across gradient
  accumulation and processes (the collator exposes the per-position targets as `shift_labels`,
  which is what Trainer counts for `num_items_in_batch`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from ssb.config import Config, LossConfig, to_dict
from ssb.distill.forward import (
    can_share_prefix,
    final_hidden_states,
    output_head,
    pack_rows,
    reply_rows,
    right_pad,
    shared_prompt_prefix,
    should_pack,
    unwrap_model,
)
from ssb.distill.hint_leaks import suppression_table
from ssb.distill.losses import KDLossOutput, chunked_kd_loss, normalise
from ssb.distill.store import TargetReader
from ssb.hardware import pick_device
from ssb.prompts import reply_format
from ssb.rundir import RESUME_FREE_KEYS, RunDir, read_jsonl
from ssb.sharding import (
    FSDP2,
    ZERO3,
    full_parameter,
    launch_sharding,
    partition_for_zero3,
    requested_sharding,
    size_zero3_as_transformers,
)
from ssb.stages.base import load_base
from ssb.stages.common import log
from ssb.stages.lora_training import (
    JsonlLogCallback,
    LoraFiles,
    LoraTraining,
    attach_reporting,
    lora_config,
    run_lora_training,
    shared_arguments,
)
from ssb.stages.targets import (
    check_prompts,
    student_sequence,
    targets_meta,
    teacher_sequence,
)
from ssb.target_modes import TARGET_MODES
from ssb.trackers import check_report_to, tracker_run_name

IGNORE = -100
# Summed by SSBTrainer between logs: kd and ce (as shares of their step's per-token means), reply
# tokens and examples.
METRIC_SUMS = ("kd", "ce", "tokens", "examples")


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
    # Supervised fine-tuning on the replies (train.loss.kd_weight 0): no teacher targets at all.
    hard_labels: bool = False
    # train.loss.target_filter: pair id -> the token ids taken out of each reply row's teacher
    # distribution (ssb.distill.hint_leaks.suppression_table); None = off.
    suppress: dict[str, list[list[int]]] | None = None

    def __call__(self, pairs: list[dict[str, Any]]) -> dict[str, Any]:
        seqs = [student_sequence(p) for p in pairs]
        full = [prompt + reply for prompt, reply in seqs]
        ids, mask = right_pad(full, self.pad_id)
        shift = torch.stack(
            [shifted_reply_labels(len(prompt), reply, ids.shape[1]) for prompt, reply in seqs]
        )
        # The unshifted view. Trainer only counts `num_items_in_batch` (from `shift_labels`)
        # when a batch has `labels`; tools that expect `labels` get the usual layout.
        labels = torch.full_like(shift, IGNORE)
        labels[:, 1:] = shift[:, :-1]
        batch: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "shift_labels": shift,
            # Leading tokens every student sequence shares (the few-shot examples or system
            # prompt): run once per batch when the trainer can (`can_share_prefix`).
            "shared_prefix": shared_prompt_prefix(full, [len(prompt) for prompt, _ in seqs]),
        }
        if self.hard_labels:
            return batch
        if self.suppress is not None:
            rows = [row for pair in pairs for row in self.suppress[pair["id"]]]
            width = max((len(row) for row in rows), default=0) or 1
            batch["suppress_ids"] = torch.tensor(
                [row + [-1] * (width - len(row)) for row in rows], dtype=torch.long
            )
        if not TARGET_MODES[self.mode].stored:  # the teacher runs in the step
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


def distillation_loss(
    model: Any,
    inputs: dict[str, Any],
    loss_config: LossConfig,
    target_mode: str,
    num_processes: int = 1,
) -> KDLossOutput:
    """The KD (+ CE) loss SUMS of one `DistillCollator` batch: the student's final hidden states
    at the reply positions against the batch's teacher targets (`target_mode`: the stored form,
    or "online": the same network with its adapter off), chunk by chunk (`chunked_kd_loss`).
    The caller normalises (`normalise`). `SSBTrainer.compute_loss` is the training caller;
    `ssb bench` times this same function. The student runs with its shared prefix once or
    packed without padding (`reply_hidden`); the loss sees the same rows either way.

    The output head under ZeRO-3 is partitioned and released after the forward:
    `output_head` gathers it with `deepspeed.zero.GatheredParameters` and copies it out, once per
    micro-batch. Under FSDP2 accelerate puts the lm_head (with the final norm, and the input
    embeddings when tied) in an FSDP unit that stays gathered from the forward to the backward,
    so `output_head` finds it whole and gathers nothing. Were it resharded (a DTensor),
    `output_head` all-gathers it once per micro-batch. Either way one whole (V, H) head exists
    per micro-batch, shared by every chunk of the loss (chunks split reply positions, and each
    needs the whole vocabulary), and it is freed with the micro-batch's graph after the
    backward; the (N, V) logits are only ever built one chunk at a time."""
    lc = loss_config
    prefix = int(inputs.get("shared_prefix", 0))
    if prefix and not can_share_prefix(model, num_processes):
        prefix = 0
    # The shared prefix saves more than packing (its tokens run once, not once per row); packing
    # saves the padding where the prefix cannot be shared.
    pack = not prefix and should_pack(model, inputs["attention_mask"], num_processes)
    # Through `model` (the DDP wrapper under `accelerate launch`), so gradients are synced.
    hidden, labels = reply_hidden(
        model, inputs["input_ids"], inputs["attention_mask"], inputs["shift_labels"], prefix, pack
    )
    head = output_head(model)
    if not uses_teacher(lc):
        targets, mode = None, TARGET_MODES[target_mode].loss_mode
    elif not TARGET_MODES[target_mode].stored:
        targets = {"hidden": online_teacher_rows(model, inputs, pack)}
        mode = TARGET_MODES[target_mode].loss_mode
    else:
        targets = {k[len("teacher_") :]: v for k, v in inputs.items() if k.startswith("teacher_")}
        mode = target_mode
    return chunked_kd_loss(
        hidden,
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
        suppress=inputs.get("suppress_ids") if targets is not None else None,
        advantage_weighting=lc.advantage_weighting if targets is not None else "none",
    )


def uses_teacher(loss_config: LossConfig) -> bool:
    """kd_weight 0 is supervised fine-tuning on the replies (hard labels, CE only): no teacher
    targets are read, stored or computed."""
    return loss_config.kd_weight != 0


def reply_hidden(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    shift_labels: torch.Tensor,
    shared_prefix: int = 0,
    pack: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The final hidden states at the reply positions of a right-padded batch, (N, H), with
    their (N,) reply tokens, in row-major order (the order of the stored teacher rows): the
    batch run as it is, with its `shared_prefix` once, or packed into one padding-free row
    (`pack_rows`; only where `should_pack` says the sequences stay apart)."""
    if pack:
        keep = attention_mask.bool()
        ids, positions = pack_rows(input_ids, attention_mask)
        hidden = final_hidden_states(model, ids, None, position_ids=positions)[0]
        shift = shift_labels[keep]
    else:
        hidden = final_hidden_states(model, input_ids, attention_mask, shared_prefix)
        # Positions before the prefix predict no reply token: the hidden states start after it.
        shift = shift_labels[:, shared_prefix:]
    reply = shift != IGNORE
    return hidden[reply], shift[reply]


@torch.no_grad()
def online_teacher_rows(model: Any, inputs: dict[str, Any], pack: bool = False) -> torch.Tensor:
    """Online targets: the teacher is the same network with the LoRA adapter switched off
    (`pack`: its hinted sequences packed too, when the student's are). Called on the unwrapped
    PeftModel: a no-grad forward needs no DDP gradient hooks."""
    unwrapped = unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()  # the frozen base scores without dropout, as `ssb targets` does
    mask = inputs["teacher_attention_mask"]
    try:
        with unwrapped.disable_adapter():
            hidden, _ = reply_hidden(
                unwrapped,
                inputs["teacher_input_ids"],
                mask,
                inputs["teacher_shift_labels"],
                pack=pack and not bool(mask.all()),
            )
    finally:
        unwrapped.train(was_training)
    return hidden.detach()


class SSBTrainer(Trainer):
    """A Trainer whose loss is the chunked KD loss on the reply positions."""

    # compute_loss divides by the step's reply-token count when Trainer passes it, and then the
    # loss needs no extra 1/GA scaling; set per call in compute_loss.
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, loss_config: LossConfig, target_mode: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.loss_config = loss_config
        self.target_mode = target_mode
        # Make Trainer count reply tokens for every optimizer step (`num_items_in_batch`) from
        # the collator's `shift_labels`, across gradient accumulation and processes.
        self.model_accepts_loss_kwargs = True
        # Our own metrics since the last log, on this process (see `log`).
        self._metric_sums = dict.fromkeys(METRIC_SUMS, 0.0)
        self._step_grad_norms: list[Any] = []

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        out = distillation_loss(
            model, inputs, self.loss_config, self.target_mode, self.accelerator.num_processes
        )
        # Read by Trainer.training_step right after this call.
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        if num_items_in_batch is None:
            # Not counted by Trainer (a direct call): this batch's own mean (which training_step
            # would divide by the accumulation steps).
            loss = normalise(out.loss_sum, out.num_tokens)
        else:
            # `num_items_in_batch` = reply tokens in the whole optimizer step (all accumulation
            # micro-batches; summed over processes when average_tokens_across_devices, which
            # run_train always sets). DDP averages gradients over processes, so each process
            # scales by their number to end with sum(all tokens' losses) / count(all tokens).
            world = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
            loss = normalise(out.loss_sum, num_items_in_batch, world_size=world)
        # kd and ce are logged as `loss` is: each optimizer step's per-token mean, averaged over
        # the steps of the logging interval. This micro-batch's share of its step's mean is its
        # sum over the step's reply tokens (all micro-batches and processes, as for the loss).
        step_tokens = out.num_tokens if num_items_in_batch is None else num_items_in_batch
        if torch.is_tensor(step_tokens):  # one count (repeated per GPU under DataParallel)
            step_tokens = step_tokens.flatten()[0]
        step_tokens = max(float(step_tokens), 1.0)
        sums = self._metric_sums
        sums["kd"] += float(out.kd_sum) / step_tokens
        sums["ce"] += float(out.ce_sum) / step_tokens
        sums["tokens"] += float(out.num_tokens)
        sums["examples"] += float(inputs["shift_labels"].shape[0])
        return (loss, None) if return_outputs else loss

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        """Trainer calls this once per optimizer step with the step's pre-clip norm (the same on
        every process: gradients are synced by then). Kept to log the interval's mean, where
        Trainer logs only the last step's."""
        norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        # Under FSDP2 the norm of the sharded gradients comes back as a DTensor (replicated,
        # already reduced over the ranks); logged as a plain tensor.
        norm = full_parameter(norm) if torch.is_tensor(norm) else norm
        if norm is not None:
            self._step_grad_norms.append(norm.detach() if torch.is_tensor(norm) else norm)
        return norm

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add kd, ce and reply_len to a training-step log, and make grad_norm the interval's
        mean; every process gets here (Trainer gathers the loss), so the sums are reduced."""
        if "loss" in logs:
            sums = torch.tensor([self._metric_sums[k] for k in METRIC_SUMS], dtype=torch.float64)
            if self.accelerator.num_processes > 1:
                sums = self.accelerator.reduce(sums.to(self.args.device), reduction="sum").cpu()
            total = dict(zip(METRIC_SUMS, sums.tolist()))
            steps = len(self._step_grad_norms)
            if total["tokens"] > 0 and steps > 0:
                logs["kd"] = total["kd"] / steps
                logs["ce"] = total["ce"] / steps
                logs["reply_len"] = total["tokens"] / max(total["examples"], 1.0)
                logs["grad_norm"] = sum(float(n) for n in self._step_grad_norms) / steps
            self._metric_sums = dict.fromkeys(METRIC_SUMS, 0.0)
            self._step_grad_norms = []
        super().log(logs, start_time)


class LogLastStepCallback(TrainerCallback):
    """Log the last optimizer step even when it ends a partial logging interval (Trainer logs
    only every `logging_steps`, so those steps would be missing from train_log.jsonl and the
    trackers)."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
        if state.global_step >= state.max_steps and args.logging_strategy != "no":
            control.should_log = True
        return control


def load_targets(cfg: Config, rundir: RunDir, model: Any, tokenizer: Any) -> TargetReader | None:
    mode = cfg.targets.mode
    if not TARGET_MODES[mode].stored:
        return None

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
    if head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad):
        raise ValueError(
            f"targets.mode={mode}: the lm_head is trainable, so teacher logits recomputed through "
            "it would drift; keep lm_head out of the trainable modules"
        )


def training_arguments(
    cfg: Config, rundir: RunDir, device: torch.device, progress: bool = True, **overrides: Any
) -> TrainingArguments:
    """TrainingArguments of `ssb train` (and of the onpolicy arm): `shared_arguments` from
    `cfg.train` plus the batch, epochs and logging of `cfg.train`. `overrides` win (tests use
    them, e.g. `optim="sgd"`; `ssb ablate` sets `max_steps`)."""
    tc = cfg.train
    fields = {
        "per_device_train_batch_size": tc.batch_size,
        "gradient_accumulation_steps": tc.grad_accum,
        "num_train_epochs": tc.epochs,
        "logging_steps": tc.logging_steps,
        **overrides,
    }
    return shared_arguments(
        TrainingArguments,
        cfg,
        "train",
        output_dir=rundir.checkpoints_dir,
        run_name=tracker_run_name(cfg, rundir.path),
        device=device,
        progress=progress,
        **fields,
    )


def make_trainer(
    cfg: Config,
    rundir: RunDir,
    model: Any,
    tokenizer: Any,
    pairs: list[dict[str, Any]],
    reader: TargetReader | None,
    progress: bool = True,
    **overrides: Any,
) -> SSBTrainer:
    """An SSBTrainer for a PEFT `model` (the LoRA student on the frozen base)."""
    check_head_frozen(model, cfg.targets.mode)
    device = next(model.parameters()).device
    if requested_sharding() is not None:
        # Loaded on the host to be sharded (`load_base`): the Trainer computes on the device.
        device = pick_device(cfg.model.device)
    collator = DistillCollator(
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        mode=cfg.targets.mode,
        reader=reader,
        hard_labels=not uses_teacher(cfg.train.loss),
        suppress=target_filter_table(cfg, pairs, tokenizer),
    )
    trainer = SSBTrainer(
        model=model,
        args=training_arguments(cfg, rundir, device, progress, **overrides),
        train_dataset=PairDataset(pairs),
        data_collator=collator,
        loss_config=cfg.train.loss,
        target_mode=cfg.targets.mode,
        callbacks=[JsonlLogCallback(rundir.train_log_path), LogLastStepCallback()],
    )
    attach_reporting(trainer, rundir.path, progress)
    return trainer


def target_filter_table(
    cfg: Config, pairs: list[dict[str, Any]], tokenizer: Any
) -> dict[str, list[list[int]]] | None:
    """What `train.loss.target_filter` takes out of each pair's teacher rows (None when off or
    when no teacher is distilled)."""
    if not (cfg.train.loss.target_filter and uses_teacher(cfg.train.loss)):
        return None
    stops = reply_format(tokenizer, cfg.prompt).stop_token_ids
    return suppression_table(pairs, tokenizer, stops)


def student_model(cfg: Config, base_model: Any) -> Any:
    """The trainable LoRA student on `base_model`: a fresh adapter from `train.lora`, or, with
    `model.adapter` set (iterated SSB), that adapter made trainable so training continues it."""

    if cfg.model.adapter is None:
        # The new adapter's initial weights depend on the seed alone, not on what this process
        # ran before, and are the same on every rank: FSDP2 shards each rank's own copy where
        # it stands (there is no broadcast from rank 0 as under DDP).
        cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(cfg.seed)
            return get_peft_model(base_model, lora_config(cfg))
    model = PeftModel.from_pretrained(base_model, cfg.model.adapter, is_trainable=True)
    lora = model.peft_config["default"]
    ours = cfg.train.lora
    if (lora.r, lora.lora_alpha) != (ours.r, ours.alpha) or set(lora.target_modules) != set(
        ours.target_modules
    ):
        log.warning(
            "train: continuing the adapter in %s with its own LoRA settings (r=%s, alpha=%s, "
            "modules=%s), not train.lora's",
            cfg.model.adapter,
            lora.r,
            lora.lora_alpha,
            sorted(lora.target_modules),
        )
    return model


def run_train(
    cfg: Config,
    rundir: RunDir,
    progress: bool = True,
    callbacks: list[TrainerCallback] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train the student and save `adapter/`; resumes from the newest complete checkpoint.
    `callbacks`: extra TrainerCallbacks (a notebook's, a test's). `overrides` go to
    TrainingArguments (`ssb ablate` sets `max_steps`, the one step count of all its arms). Under
    an FSDP2 or ZeRO-3 launch (`examples/accelerate_fsdp.yaml`, `examples/accelerate_zero3.yaml`)
    the base and the LoRA weights are sharded over the processes; the adapter is still written
    once, in the same files."""
    check_report_to(cfg.train.report_to)  # before any model is loaded
    sharding = launch_sharding()  # refuses what ssb does not run (FSDP1)
    pairs = rundir.read_pairs()
    base = load_base(cfg, rundir, to_shard=sharding is not None)
    check_prompts(pairs, base.tokenizer, cfg)
    training = StudentTraining(
        name="train",
        files=student_files(rundir, FINGERPRINT_NAME),
        fingerprint={**train_fingerprint(cfg), **({"overrides": overrides} if overrides else {})},
        callbacks=list(callbacks or []),
        cfg=cfg,
        rundir=rundir,
        tokenizer=base.tokenizer,
        pairs=pairs,
        reader=student_targets(cfg, rundir, base.model, base.tokenizer, pairs),
        sharding=sharding,
        progress=progress,
        overrides=overrides,
    )
    return run_lora_training(training, base.model)


def student_targets(
    cfg: Config, rundir: RunDir, model: Any, tokenizer: Any, pairs: list[dict[str, Any]]
) -> TargetReader | None:
    """The stored teacher targets of every pair (None when none are distilled or the teacher
    runs in the step)."""
    if not uses_teacher(cfg.train.loss):
        return None
    reader = load_targets(cfg, rundir, model, tokenizer)
    if reader is not None:
        stored = set(reader.ids())
        missing = [p["id"] for p in pairs if p["id"] not in stored]
        if missing:
            raise ValueError(
                f"{len(missing)} pairs have no stored targets (first: {missing[0]}); "
                "run `ssb targets` to finish them"
            )
    return reader


def student_files(rundir: RunDir, fingerprint_name: str) -> LoraFiles:
    """Where a student trained on `rundir`'s pairs (ssb train, an ablation arm) keeps its files."""
    return LoraFiles(
        checkpoints_dir=rundir.checkpoints_dir,
        log_path=rundir.train_log_path,
        adapter_dir=rundir.adapter_dir,
        fingerprint_name=fingerprint_name,
    )


@dataclass(kw_only=True)
class StudentTraining(LoraTraining):
    """`ssb train` as a LoraTraining: the LoRA student distilled by SSBTrainer, sharded when the
    launch asks for FSDP2 or ZeRO-3."""

    cfg: Config
    rundir: RunDir
    tokenizer: Any
    pairs: list[dict[str, Any]]
    reader: TargetReader | None
    sharding: str | None
    progress: bool = True
    overrides: dict[str, Any] = field(default_factory=dict)

    def attach(self, base_model: Any) -> Any:
        return student_model(self.cfg, base_model)

    def make_trainer(self, model: Any) -> SSBTrainer:
        if self.sharding == ZERO3:
            # Partitioned now, one parameter at a time, rather than moved whole onto the device
            # when the Trainer starts DeepSpeed.
            partition_for_zero3(model)
        # Activation checkpointing (Trainer turns it on) is non-reentrant in transformers 5, so
        # the frozen embeddings' outputs need not require grad.
        trainer = make_trainer(
            self.cfg,
            self.rundir,
            model,
            self.tokenizer,
            self.pairs,
            self.reader,
            self.progress,
            **self.overrides,
        )
        check_launch_sharding(trainer, self.sharding)
        size_zero3_as_transformers(trainer.accelerator)
        return trainer

    def summary(self, trainer: SSBTrainer, result: Any) -> dict[str, Any]:
        log_path = self.files.log_path
        summary = {
            "examples": len(self.pairs),
        }
        losses = [r["loss"] for r in read_jsonl(log_path) if "loss" in r]
        if losses:
            summary["first_loss"], summary["last_loss"] = losses[0], losses[-1]
        return summary


def check_launch_sharding(trainer: SSBTrainer, sharding: str | None) -> None:
    """Refuse to train unsharded when the launch asked for FSDP2 or ZeRO-3 and accelerate did
    not set it up."""
    if sharding == FSDP2 and not trainer.accelerator.is_fsdp2:
        raise RuntimeError(
            f"the launch asks for FSDP2 but accelerate runs "
            f"{trainer.accelerator.distributed_type} (accelerate 1.x runs FSDP on GPUs "
            "only; on CPU it would silently train unsharded under DDP)"
        )
    if sharding == ZERO3 and trainer.accelerator.state.deepspeed_plugin is None:
        raise RuntimeError(
            f"the launch asks for DeepSpeed ZeRO-3 but accelerate runs "
            f"{trainer.accelerator.distributed_type} (unpartitioned)"
        )


# What a checkpoint's optimizer state and step count depend on; logging, saving and the number
# of epochs may change between a run and its resumption.
_RESUME_FREE = tuple(k.removeprefix("train.") for k in RESUME_FREE_KEYS if k.startswith("train."))
FINGERPRINT_NAME = "ssb_train.json"


def train_fingerprint(cfg: Config) -> dict[str, Any]:

    train = {k: v for k, v in to_dict(cfg.train).items() if k not in _RESUME_FREE}
    return {
        "train": train,
        "targets_mode": cfg.targets.mode,
        "model": to_dict(cfg.model),
        "seed": cfg.seed,
    }
