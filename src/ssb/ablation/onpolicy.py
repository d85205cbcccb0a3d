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

With `generation.backend` resolving to vllm (auto: on a GPU with vLLM installed; vllm: also
vLLM's CPU build) and one process, the sampling (1.) runs on a vLLM engine in the training
process (`ServedStudent`) that serves the student's current LoRA: before each step samples, the
adapter is saved to a scratch directory and registered under a fresh LoRA id. Same prompts, seeds
and stop rules as the transformers path, so greedy replies are the same tokens.

Each step is normalised by its own reply tokens (the batch is made inside the step, so
transformers cannot count a step's tokens in advance); with `train.grad_accum` 1 that is the same
per-token mean `ssb train` uses.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ssb.config import Config, to_dict
from ssb.distill.forward import unwrap_model
from ssb.generate import (
    Completion,
    SamplingParams,
    VLLMGenerator,
    context_limit,
    make_generator,
    select_backend,
    vllm_context_limit,
)
from ssb.generate.vllm import vllm_device
from ssb.rundir import RunDir
from ssb.stages.base import load_base
from ssb.stages.common import log, stable_seed
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


def onpolicy_backend(cfg: Config) -> str:
    """Where the onpolicy arm samples: "vllm" when `generation.backend` resolves to vllm (the
    rule of every generating stage) in one process; else "hf", ssb's decode loop on the training
    model. Several processes sample with transformers: each rank's engine would need the whole
    adapter, which FSDP and ZeRO-3 shard."""
    backend = select_backend(cfg.generation.backend)
    if backend == "vllm" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        log.info("onpolicy: several processes sample with transformers, not vLLM")
        return "hf"
    return backend


STUDENT = "student"  # the served adapter's name
SERVED_ADAPTERS = "onpolicy-served-adapters"


@dataclass
class ServedStudent:
    """A vLLM engine in the training process that serves the student's current LoRA weights.

    Started at the first sampling step (after a resumed checkpoint is loaded), stopped by
    `close`. Each optimizer step the adapter is saved to a scratch directory and re-registered
    (`VLLMGenerator.replace_adapter`), rather than merged into the engine's base weights as TRL
    does: that works with vLLM's engine in processes of its own (its CPU build always runs it so)
    and moves r-rank matrices, not the model. On a GPU the engine sleeps (level 1: base weights to
    host memory, KV cache freed) while the optimizer runs, and takes `grpo.vllm_gpu_memory_
    utilization` of the GPU beside the training model; vLLM's CPU build has no sleep mode."""

    cfg: Config
    tokenizer: Any
    stop_token_ids: list[int]
    # Where the served adapters are written: the run's checkpoints directory, so a killed run's
    # are replaced when it resumes (None: a temporary directory).
    scratch_parent: Path | None = None
    engine: VLLMGenerator | None = None
    scratch: Path | None = None
    served_dir: Path | None = None
    served_step: int | None = None  # the optimizer step whose weights the engine serves
    sleeps: bool = False  # on a GPU: sleep while the optimizer runs
    asleep: bool = False
    saves: int = 0

    def generate(
        self, student: Any, step: int, prompts: list[list[int]], params: SamplingParams
    ) -> list[list[Completion]]:
        """The student's completions of `prompts` with its weights at optimizer step `step`."""
        if self.engine is None:
            self._start(student)
        if self.asleep:  # awake before the adapter changes: removing one writes to its slot
            self.engine.llm.wake_up()
            self.asleep = False
        if step != self.served_step:  # grad_accum > 1: a step's micro-batches share weights
            if self.served_step is not None:
                old = self.served_dir
                self.engine.replace_adapter(STUDENT, self._save(student))
                shutil.rmtree(old, ignore_errors=True)  # its id is removed: never loaded again
            self.served_step = step
        outputs = self.engine.serving(STUDENT).generate(prompts, params, progress=False)
        if self.sleeps:
            self.engine.llm.sleep(level=1)
            self.asleep = True
        return outputs

    def _save(self, student: Any) -> Path:
        assert self.scratch is not None
        self.saves += 1
        self.served_dir = self.scratch / f"adapter-{self.saves}"
        student.save_pretrained(str(self.served_dir))
        return self.served_dir

    def _start(self, student: Any) -> None:
        if self.scratch_parent is None:
            self.scratch = Path(tempfile.mkdtemp(prefix="ssb-onpolicy-"))
        else:
            self.scratch = self.scratch_parent / SERVED_ADAPTERS
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch.mkdir(parents=True)
        cfg = self.cfg
        limit = vllm_context_limit(cfg, context_limit(cfg, student.config))
        self.sleeps = vllm_device() == "cuda"
        extra: dict[str, Any] = {}
        if self.sleeps:
            share = cfg.grpo.vllm_gpu_memory_utilization
            extra = {"gpu_memory_utilization": share, "enable_sleep_mode": True}
            torch.cuda.empty_cache()  # vLLM sizes itself from the memory free when it starts
        log.info("onpolicy: starting a vLLM engine that serves the student's current adapter")
        engine = make_generator(
            cfg,
            None,
            self.tokenizer,
            self.stop_token_ids,
            adapters={STUDENT: self._save(student)},
            max_model_len=limit,
            llm_kwargs=extra,
        )
        assert isinstance(engine, VLLMGenerator)
        self.engine = engine

    def close(self) -> None:
        """Stop the engine and remove the scratch adapters."""
        engine, self.engine = self.engine, None
        try:
            if engine is not None:
                engine.shutdown()
        finally:
            if self.scratch is not None:
                shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = self.served_dir = self.served_step = None
            self.asleep = False


@dataclass
class ReplySampler:
    """Samples the student's replies inside a training step and makes the step's batch: with
    ssb's decode loop on the training model, or with `served` (a vLLM engine) when set."""

    cfg: Config
    tokenizer: Any
    reply: Any  # ssb.prompts.ReplyFormat
    collator: DistillCollator
    sampling: Any  # ssb.config.SamplingConfig
    max_new_tokens: int
    served: ServedStudent | None = None
    sampled_tokens: int = 0  # since the last log
    scored_replies: int = 0
    sampling_s: float = 0.0  # with a vLLM engine's start and adapter updates

    def params(self, pairs: list[dict[str, Any]], step: int) -> SamplingParams:
        """How step `step` samples `pairs`, on either backend."""
        return SamplingParams.of(
            self.sampling,
            max_new_tokens=self.max_new_tokens,
            stop_strings=self.reply.stop_strings,
            # Seeded by step and problem: a resumed run samples what an uninterrupted one would.
            prompt_seeds=[stable_seed(self.cfg.seed, "onpolicy", step, p["id"]) for p in pairs],
        )

    def __call__(self, model: Any, pairs: list[dict[str, Any]], step: int) -> dict[str, Any]:

        start = time.perf_counter()
        student = unwrap_model(model)
        prompts = [p["student_prompt_ids"] for p in pairs]
        params = self.params(pairs, step)
        was_training = student.training
        student.eval()  # sample without dropout, as the trained student will run
        try:
            with torch.no_grad():
                if self.served is not None:
                    outputs = self.served.generate(student, step, prompts, params)
                else:
                    hf = dataclasses.replace(self.cfg.generation, backend="hf")
                    generator = make_generator(
                        dataclasses.replace(self.cfg, generation=hf),
                        student,
                        self.tokenizer,
                        self.reply.stop_token_ids,
                    )
                    outputs = generator.generate(prompts, params, progress=False)
        finally:
            student.train(was_training)
        self.sampling_s += time.perf_counter() - start
        sampled = [
            sampled_pair(p, outs[0], self.reply.end_token_id) for p, outs in zip(pairs, outputs)
        ]
        self.sampled_tokens += sum(len(p["reply_ids"]) + 1 for p in sampled)
        self.scored_replies += len(sampled)
        return self.collator(sampled)

    def close(self) -> None:
        if self.served is not None:
            self.served.close()


def reply_sampler(
    cfg: Config,
    tokenizer: Any,
    reply: Any,
    collator: DistillCollator,
    scratch_parent: Path | None = None,
) -> ReplySampler:
    """The onpolicy arm's sampler, on the backend `onpolicy_backend` picks (`scratch_parent`:
    see `ServedStudent`)."""
    served = None
    if onpolicy_backend(cfg) == "vllm":
        served = ServedStudent(cfg, tokenizer, list(reply.stop_token_ids), scratch_parent)
    return ReplySampler(
        cfg,
        tokenizer,
        reply,
        collator,
        cfg.ablate.onpolicy_sampling,
        cfg.ablate.onpolicy_max_new_tokens or cfg.generation.max_new_tokens,
        served,
    )


class OnPolicyTrainer(SSBTrainer):
    """SSBTrainer whose batches are sampled by the student inside the step."""

    def __init__(self, *args: Any, sampler: ReplySampler, **kwargs: Any):
        super().__init__(*args, target_mode="online", **kwargs)
        self.sampler = sampler

    def train(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().train(*args, **kwargs)
        finally:
            self.sampler.close()  # a vLLM engine's processes and memory end with the training

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
            logs["sampling_s"] = round(self.sampler.sampling_s, 3)
            self.sampler.sampled_tokens = self.sampler.scored_replies = 0
            self.sampler.sampling_s = 0.0
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
        collator = DistillCollator(pad, mode="online")
        sampler = reply_sampler(
            cfg, self.tokenizer, self.reply, collator, self.rundir.checkpoints_dir
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
        return {"examples": len(self.pairs)}
