"""The `onpolicy` arm of `ssb ablate`: on-policy self-distillation with SSB's hint as the
privileged context (the shape of TRL's SDFT with `teacher_model_kind="base"` and of OPSD's
`--fixed_teacher`).

Each optimizer step, for each of its `train.batch_size` pairs:
1. the student (base + the LoRA being trained, eval mode, no gradient) samples one reply to the
   plain prompt, with `ablate.onpolicy_sampling`, with the project's batched generator and its
   stop rules; a reply that stopped is closed with the end token, as every distilled reply is;
2. the frozen base (the same network with the adapter switched off) scores
   `[hinted prompt || that reply]`: SSB's online teacher (`targets.mode=online`);
3. the loss is `train.loss` (divergence, temperature, weights) over the student's reply tokens,
   through the same collator, loss and trainer as `ssb train` (`DistillCollator`,
   `distillation_loss`, `SSBTrainer`).

Each step is normalised by its own reply tokens (the batch is made inside the step, so
transformers cannot count a step's tokens in advance); with `train.grad_accum` 1 that is the same
per-token mean `ssb train` uses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ssb.config import Config, to_dict
from ssb.distill.forward import unwrap_model
from ssb.generate import SamplingParams, make_generator
from ssb.rundir import RunDir
from ssb.stages.base import load_base
from ssb.stages.common import stable_seed
from ssb.stages.lora_training import (
    JsonlLogCallback,
    LoraTraining,
    attach_reporting,
    run_lora_training,
)
from ssb.stages.targets import check_prompts
from ssb.stages.train import (
    DistillCollator,
    LogLastStepCallback,
    PairDataset,
    SSBTrainer,
    check_head_frozen,
    student_files,
    student_model,
    train_fingerprint,
    training_arguments,
)

FINGERPRINT_NAME = "ssb_onpolicy.json"


def sampled_pair(pair: dict[str, Any], completion: Any, end_token_id: int) -> dict[str, Any]:
    """`pair` with the student's own sample as its reply: exactly the sampled tokens, the end
    token standing for whichever stop ended it; a sample cut at the token limit keeps its last
    token in the end token's place (no end token the student did not sample)."""
    ids = [int(t) for t in completion.token_ids]
    if completion.finish_reason == "stop" or not ids:
        reply, end = ids, end_token_id
    else:
        reply, end = ids[:-1], ids[-1]
    return {**pair, "reply_ids": reply, "end_token_id": end}


@dataclass
class ReplySampler:
    """Samples the student's replies inside a training step and makes the step's batch."""

    cfg: Config
    tokenizer: Any
    reply: Any  # ssb.prompts.ReplyFormat
    collator: DistillCollator
    sampling: Any  # ssb.config.SamplingConfig
    max_new_tokens: int
    sampled_tokens: int = 0  # since the last log
    scored_replies: int = 0

    def __call__(self, model: Any, pairs: list[dict[str, Any]], step: int) -> dict[str, Any]:

        student = unwrap_model(model)
        was_training = student.training
        student.eval()  # sample without dropout, as the trained student will run
        hf = dataclasses.replace(self.cfg.generation, backend="hf")
        generator = make_generator(
            dataclasses.replace(self.cfg, generation=hf),
            student,
            self.tokenizer,
            self.reply.stop_token_ids,
        )
        params = SamplingParams.of(
            self.sampling,
            max_new_tokens=self.max_new_tokens,
            stop_strings=self.reply.stop_strings,
            # Seeded by step and problem: a resumed run samples what an uninterrupted one would.
            prompt_seeds=[stable_seed(self.cfg.seed, "onpolicy", step, p["id"]) for p in pairs],
        )
        try:
            with torch.no_grad():
                outputs = generator.generate(
                    [p["student_prompt_ids"] for p in pairs], params, progress=False
                )
        finally:
            student.train(was_training)
        sampled = [
            sampled_pair(p, outs[0], self.reply.end_token_id) for p, outs in zip(pairs, outputs)
        ]
        self.sampled_tokens += sum(len(p["reply_ids"]) + 1 for p in sampled)
        self.scored_replies += len(sampled)
        return self.collator(sampled)


class OnPolicyTrainer(SSBTrainer):
    """SSBTrainer whose batches are sampled by the student inside the step."""

    def __init__(self, *args: Any, sampler: ReplySampler, **kwargs: Any):
        super().__init__(*args, target_mode="online", **kwargs)
        self.sampler = sampler

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        batch = self._prepare_inputs(self.sampler(model, inputs["pairs"], self.state.global_step))
        return super().compute_loss(model, batch, return_outputs, None)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # one process: what this interval's steps sampled and scored
            logs["sampled_tokens"] = float(self.sampler.sampled_tokens)
            logs["scored_replies"] = float(self.sampler.scored_replies)
            self.sampler.sampled_tokens = self.sampler.scored_replies = 0
        super().log(logs, start_time)


def _pass_pairs(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"pairs": pairs}


def onpolicy_fingerprint(cfg: Config, steps: int) -> dict[str, Any]:
    a = cfg.ablate
    return {
        **train_fingerprint(cfg),
        "onpolicy": {
            "sampling": to_dict(a.onpolicy_sampling),
            "max_new_tokens": a.onpolicy_max_new_tokens,
        },
        "max_steps": steps,
    }


def run_onpolicy(cfg: Config, rundir: RunDir, steps: int, progress: bool = True) -> dict[str, Any]:
    """Train the onpolicy arm on `rundir`'s pairs (their prompts: plain and hinted) for `steps`
    optimizer steps into `rundir.adapter_dir`, resuming its checkpoints."""
    if cfg.train.loss.kd_weight == 0:
        raise ValueError("onpolicy: train.loss.kd_weight is 0, so the teacher would teach nothing")
    pairs = rundir.read_pairs()
    base = load_base(cfg, rundir)
    check_prompts(pairs, base.tokenizer, cfg)
    training = OnPolicyTraining(
        name="onpolicy",
        files=student_files(rundir, FINGERPRINT_NAME),
        fingerprint=onpolicy_fingerprint(cfg, steps),
        cfg=cfg,
        rundir=rundir,
        tokenizer=base.tokenizer,
        reply=base.reply,
        pairs=pairs,
        steps=steps,
        progress=progress,
    )
    return run_lora_training(training, base.model)


@dataclass(kw_only=True)
class OnPolicyTraining(LoraTraining):
    """The onpolicy arm as a LoraTraining: the LoRA student trained by OnPolicyTrainer."""

    cfg: Config
    rundir: RunDir
    tokenizer: Any
    reply: Any  # ssb.prompts.ReplyFormat
    pairs: list[dict[str, Any]]
    steps: int
    progress: bool = True

    def attach(self, base_model: Any) -> Any:
        return student_model(self.cfg, base_model)

    def make_trainer(self, model: Any) -> OnPolicyTrainer:
        cfg = self.cfg
        check_head_frozen(model, "online")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        sampler = ReplySampler(
            cfg,
            self.tokenizer,
            self.reply,
            DistillCollator(pad_id=pad, mode="online"),
            cfg.ablate.onpolicy_sampling,
            cfg.ablate.onpolicy_max_new_tokens or cfg.generation.max_new_tokens,
        )
        device = next(model.parameters()).device
        trainer = OnPolicyTrainer(
            model=model,
            args=training_arguments(cfg, self.rundir, device, self.progress, max_steps=self.steps),
            train_dataset=PairDataset(self.pairs),
            data_collator=_pass_pairs,
            loss_config=cfg.train.loss,
            sampler=sampler,
            callbacks=[JsonlLogCallback(self.files.log_path), LogLastStepCallback()],
        )
        attach_reporting(trainer, self.rundir.path, self.progress)
        return trainer

    def summary(self, trainer: OnPolicyTrainer, result: Any) -> dict[str, Any]:
        return {
            "examples": len(self.pairs),
            "train_loss": round(float(result.training_loss), 6),
        }
