"""`ssb grpo`: the GRPO baseline, trained with TRL's `GRPOTrainer` (arXiv 2402.03300).

What it shares with SSB, so the two adapters compare like for like (`ssb eval` picks up
`<rundir>/grpo/adapter/` next to the SSB student):

- the training problems: `load_train_problems(cfg)`;
- the prompts: `ssb.prompts` renders them, and TRL is handed them in the one form it turns into
  exactly our ids (checked on every batch, see `SSBGRPOTrainer._tokenize_prompts`):
  * chat format: the conversational messages (`student_messages`). TRL applies the tokenizer's
    chat template with `add_generation_prompt=True`, which is what `render_prompt_ids` does.
    Passing the rendered *text* instead would be wrong for templates that start with a BOS token
    (Gemma): TRL tokenises string prompts with `add_special_tokens=True`, giving two BOS tokens;
  * few-shot format (base models without a template): the few-shot text (`fewshot_text`), which
    TRL tokenises with `add_special_tokens=True`, as `render_prompt_ids` does;
- the LoRA budget: `cfg.train.lora` (r, alpha, dropout, target modules), via `peft_config`;
- the grader: reward = `ssb.grading.grade(text, gold)` (1.0 / 0.0) on the text `ssb eval` would
  grade for the same tokens, plus `grpo.format_reward_weight` x [the text has a `\\boxed{}`].

Where replies end (`ssb.prompts.reply_format`): at its stop token ids (chat: end-of-turn and EOS;
few-shot: EOS and the blank-line token that also closes SSB's replies), which are added to TRL's
EOS ids (TRL keeps that token in the completion and masks what follows). The few-shot format also
stops at `prompt.stop_strings`, for a blank line that is sampled inside another token. TRL's transformers generation
path passes no tokenizer to `generate()`, which `stop_strings` needs, so `SSBGRPOTrainer` passes it
for the duration of the call; afterwards each completion is cut right after the token that
completes the first stop string (tokens sampled after a finished row are padding, which TRL
would otherwise train on when pad != EOS). The kept tokens are exactly those the policy sampled,
stop string included, so the update stays on-policy and the model learns to stop the way `ssb
eval` stops it. The reward grades the text before the stop string, trimmed by the rule of
`ssb.generate.base` (the text `ssb eval` grades). TRL's `completions/clipped_ratio` counts
completions not ending in EOS, so in the few-shot format it also counts those that stopped at a
stop string; `completions/stopped_ratio` (added here) counts both ways of stopping.

Files: `<rundir>/grpo/adapter/` (saved atomically), `<rundir>/grpo/train_log.jsonl` (one record
per step: loss, reward, reward_std, rewards/<name>/mean, kl when beta > 0, entropy, lengths, ...),
`<rundir>/grpo/checkpoints/` (every `grpo.save_steps`; a re-run resumes from the newest one when the
settings match).
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers.trainer_callback import PrinterCallback

from ssb.config import Config, to_dict
from ssb.generate import select_backend
from ssb.generate.base import make_completion, stop_string_cut
from ssb.generate.vllm import shutdown_llm, vllm_device
from ssb.grading import extract_boxed, grade
from ssb.problems import load_train_problems
from ssb.prompts import fewshot_text, render_prompt_ids, student_messages, uses_chat_template
from ssb.rundir import RunDir, read_jsonl
from ssb.stages.common import load_base, log
from ssb.stages.lora_training import (
    JsonlLogCallback,
    check_resumable,
    last_checkpoint,
    lora_config,
    restore_base,
    save_adapter,
    start_log,
    write_fingerprint,
)
from ssb.trackers import attach_trackers, check_report_to, tracker_run_name

FINGERPRINT_NAME = "ssb_grpo.json"


# --------------------------------------------------------------------------- rewards


def completion_text(
    completion_ids: list[int],
    tokenizer: Any,
    stop_token_ids: list[int],
    stop_strings: list[str],
) -> str:
    """The text `ssb eval` would grade for these completion tokens (trimmed at the first stop
    token or stop string by the rule of `ssb.generate.base`)."""

    return make_completion(completion_ids, tokenizer, stop_token_ids, stop_strings).text


def correctness_reward(text: str, gold: str) -> float:
    """1.0 when the last `\\boxed{}` of `text` equals `gold` (ssb.grading.grade), else 0.0."""

    return 1.0 if grade(text, str(gold)) else 0.0


def boxed_reward(text: str) -> float:
    """1.0 when `text` has a (balanced) `\\boxed{}` answer, else 0.0."""

    return 1.0 if extract_boxed(text) is not None else 0.0


def make_reward_funcs(
    tokenizer: Any, stop_token_ids: list[int], stop_strings: list[str]
) -> list[Callable[..., list[float]]]:
    """[correctness, boxed]: TRL reward functions (TRL names their metrics after `__name__`:
    `rewards/correctness/mean`, `rewards/boxed/mean`). Both read the completion token ids and the
    dataset's `answer` column; the weights are set by `reward_weights` in the GRPOConfig."""

    def texts(completion_ids: list[list[int]]) -> list[str]:
        return [
            completion_text(ids, tokenizer, stop_token_ids, stop_strings) for ids in completion_ids
        ]

    def correctness(completion_ids: list[list[int]], answer: list[str], **_: Any) -> list[float]:
        return [
            correctness_reward(t, a) for t, a in zip(texts(completion_ids), answer, strict=True)
        ]

    def boxed(completion_ids: list[list[int]], **_: Any) -> list[float]:
        return [boxed_reward(t) for t in texts(completion_ids)]

    return [correctness, boxed]


# --------------------------------------------------------------------------- prompts


def prompt_records(cfg: Config, tokenizer: Any) -> list[dict[str, Any]]:
    """One record per training problem: `prompt` in the form TRL is given (messages for chat
    models, the few-shot text otherwise), `prompt_ids` from `render_prompt_ids`, and the gold
    `answer`."""

    chat = uses_chat_template(tokenizer, cfg.prompt)
    records = []
    for problem in load_train_problems(cfg):
        messages = student_messages(problem, cfg.prompt)
        records.append(
            {
                "prompt": messages if chat else fewshot_text(messages, cfg.prompt),
                "prompt_ids": render_prompt_ids(tokenizer, messages, cfg.prompt),
                "answer": str(problem.answer),
                "problem_id": str(problem.id),
            }
        )
    if not records:
        raise ValueError("no training problems: check data.train / data.max_problems")
    return records


def prompt_key(prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


# --------------------------------------------------------------------------- trainer


def _trainer_class() -> type:
    """`SSBGRPOTrainer`, defined on first use (importing trl takes a few seconds)."""
    global _SSBGRPOTrainer
    if _SSBGRPOTrainer is not None:
        return _SSBGRPOTrainer
    from trl import GRPOTrainer  # noqa: PLC0415 -- optional: trl is the grpo extra

    class SSBGRPOTrainer(GRPOTrainer):
        """TRL's GRPOTrainer plus three guards: the prompt ids TRL renders are checked against
        `render_prompt_ids`; generation also stops at our stop token ids and stop strings; and
        completions are cut after the first stop string (see the module docstring)."""

        def __init__(
            self,
            *args: Any,
            expected_prompt_ids: dict[str, list[int]],
            stop_token_ids: list[int],
            stop_strings: list[str],
            **kwargs: Any,
        ):
            super().__init__(*args, **kwargs)
            self.expected_prompt_ids = expected_prompt_ids
            self.prompts_checked = 0
            self.stop_strings = list(stop_strings)
            # Masking after EOS uses `eos_token_ids` (the generation config gets the same ids
            # through `generation_kwargs`).
            extra = [t for t in stop_token_ids if t not in self.eos_token_ids]
            self.eos_token_ids = [*self.eos_token_ids, *extra]

        def _tokenize_prompts(self, prompts: list) -> Any:
            prompt_ids, *rest = super()._tokenize_prompts(prompts)
            for prompt, ids in zip(prompts, prompt_ids, strict=True):
                expected = self.expected_prompt_ids.get(prompt_key(prompt))
                if expected is None or [int(t) for t in ids] != expected:
                    raise RuntimeError(
                        "GRPO: the prompt ids TRL rendered differ from ssb.prompts.render_prompt_ids "
                        f"(TRL: {list(ids)[:12]}..., ssb: {(expected or [])[:12]}...)"
                    )
                self.prompts_checked += 1
            return (prompt_ids, *rest)

        def _generate_single_turn(self, prompt_ids: Any, *args: Any, **kwargs: Any) -> Any:
            with self._tokenizer_for_generate():
                completion_ids, logprobs = super()._generate_single_turn(
                    prompt_ids, *args, **kwargs
                )
            if self.stop_strings:
                completion_ids, logprobs = self._cut_at_stop_strings(completion_ids, logprobs)
            mode = "train" if self.model.training else "eval"
            stopped = [self._stopped(ids) for ids in completion_ids]
            self._metrics[mode]["completions/stopped_ratio"].append(
                sum(stopped) / max(len(stopped), 1)
            )
            return completion_ids, logprobs

        @contextlib.contextmanager
        def _tokenizer_for_generate(self) -> Iterator[None]:
            """transformers' `generate` needs `tokenizer=` for `stop_strings`; TRL does not pass
            it, so the unwrapped model's `generate` gets it bound for this call only."""
            if not self.stop_strings or self.use_vllm:
                yield
                return
            model = self.accelerator.unwrap_model(self.model_wrapped)
            original = model.generate

            def generate(*a: Any, **kw: Any) -> Any:
                kw.setdefault("tokenizer", self._tokenizer)
                return original(*a, **kw)

            model.generate = generate
            try:
                yield
            finally:
                del model.generate  # the instance attribute; the class method shows again

        def _cut_at_stop_strings(self, completion_ids: list, logprobs: Any) -> tuple[list, Any]:

            out_ids, out_lp = [], [] if logprobs is not None else None
            for k, ids in enumerate(completion_ids):
                ids = [int(t) for t in ids]
                cut = stop_string_cut(ids, self._tokenizer, self.stop_strings)
                end = len(ids) if cut is None else cut + 1
                out_ids.append(ids[:end])
                if out_lp is not None:
                    out_lp.append(logprobs[k][:end])
            return out_ids, out_lp

        def _stopped(self, ids: list[int]) -> bool:
            if ids and ids[-1] in self.eos_token_ids:
                return True
            if not self.stop_strings or not ids:
                return False
            text = self._tokenizer.decode(ids, skip_special_tokens=True)
            return any(s in text for s in self.stop_strings)

    _SSBGRPOTrainer = SSBGRPOTrainer
    return SSBGRPOTrainer


_SSBGRPOTrainer: type | None = None


def use_grpo_vllm(cfg: Config) -> bool:
    """GRPO generates with a colocated vLLM engine when generation.backend resolves to vllm on a
    GPU. On a CPU host (vLLM's CPU build) it generates with transformers: TRL's colocated mode
    relies on vLLM's sleep mode, which vLLM's CPU platform does not have (it would keep the
    engine's memory while the optimizer runs), and it is untested there."""

    return select_backend(cfg.generation.backend) == "vllm" and vllm_device() == "cuda"


def grpo_arguments(
    cfg: Config,
    rundir: RunDir,
    device: torch.device,
    stop_token_ids: list[int],
    stop_strings: list[str],
    progress: bool = True,
    **overrides: Any,
) -> Any:
    """TRL GRPOConfig from `cfg.grpo` (`overrides` win; tests use them)."""
    from trl import GRPOConfig  # noqa: PLC0415 -- optional: trl is the grpo extra

    check_report_to(cfg.train.report_to)
    g = cfg.grpo
    fields = GRPOConfig.__dataclass_fields__
    kwargs: dict[str, Any] = {}
    if "warmup_ratio" in fields:
        kwargs["warmup_ratio"] = g.warmup_ratio
    else:  # transformers 5: a float in [0, 1) is a ratio
        kwargs["warmup_steps"] = float(g.warmup_ratio)
    # transformers 5 renames gradient_checkpointing (TRL defaults it to True) to
    # activation_checkpointing; either way it follows train.gradient_checkpointing, as in SSB.
    ckpt = "activation_checkpointing" if "activation_checkpointing" in fields else None
    kwargs[ckpt or "gradient_checkpointing"] = cfg.train.gradient_checkpointing
    if use_grpo_vllm(cfg):
        # TRL passes generation_kwargs to vLLM's SamplingParams there, to `generate` otherwise.
        generation_kwargs: dict[str, Any] = {"stop_token_ids": list(stop_token_ids)}
        if stop_strings:
            generation_kwargs["stop"] = list(stop_strings)
        kwargs.update(
            use_vllm=True,
            vllm_mode="colocate",
            vllm_gpu_memory_utilization=g.vllm_gpu_memory_utilization,
            vllm_tensor_parallel_size=cfg.generation.tensor_parallel_size,
            # The engine's weights and KV cache leave the GPU while the optimizer runs.
            vllm_enable_sleep_mode=True,
        )
    else:
        generation_kwargs = {"eos_token_id": stop_token_ids}
        if stop_strings:
            generation_kwargs["stop_strings"] = list(stop_strings)
    kwargs.update(
        output_dir=str(rundir.grpo_checkpoints_dir),
        # TRL counts completions: each device's batch holds batch_size prompt groups.
        per_device_train_batch_size=g.batch_size * g.num_generations,
        gradient_accumulation_steps=1,
        num_generations=g.num_generations,
        max_steps=g.max_steps,
        learning_rate=g.learning_rate,
        lr_scheduler_type=g.lr_scheduler,
        weight_decay=g.weight_decay,
        max_grad_norm=g.max_grad_norm,
        beta=g.beta,
        loss_type=g.loss_type,
        temperature=g.sampling.temperature,
        top_p=g.sampling.top_p,
        top_k=g.sampling.top_k,
        max_completion_length=g.max_completion_length,
        reward_weights=[1.0, g.format_reward_weight],
        generation_kwargs=generation_kwargs,
        # The model's own dtype rules (as in `ssb train`); no autocast.
        bf16=False,
        fp16=False,
        logging_steps=1,
        save_strategy="steps",
        save_steps=g.save_steps,
        save_total_limit=2,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=list(cfg.train.report_to) or "none",
        run_name=tracker_run_name(cfg, rundir.grpo_dir, role="grpo"),
        use_cpu=device.type == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=not progress,
        log_completions=False,
    )
    kwargs.update(overrides)
    return GRPOConfig(**kwargs)


def unique_token_ids(*id_lists: Any) -> list[int]:
    """The ids of `id_lists` (ints, lists of ints or None), each once, in order."""
    out: list[int] = []
    for ids in id_lists:
        if ids is None:
            continue
        for t in [ids] if isinstance(ids, int) else ids:
            if t is not None and int(t) not in out:
                out.append(int(t))
    return out


def make_grpo_trainer(
    cfg: Config,
    rundir: RunDir,
    model: Any,
    tokenizer: Any,
    reply: Any,
    progress: bool = True,
    **overrides: Any,
) -> Any:
    """An SSBGRPOTrainer on the (non-PEFT) base `model`; TRL wraps it with the LoRA config."""

    records = prompt_records(cfg, tokenizer)
    stop_ids = unique_token_ids(
        tokenizer.eos_token_id, model.generation_config.eos_token_id, reply.stop_token_ids
    )
    device = next(model.parameters()).device
    args = grpo_arguments(cfg, rundir, device, stop_ids, reply.stop_strings, progress, **overrides)
    dataset = Dataset.from_list(
        [
            {"prompt": r["prompt"], "answer": r["answer"], "problem_id": r["problem_id"]}
            for r in records
        ]
    )
    trainer = _trainer_class()(
        model=model,
        reward_funcs=make_reward_funcs(tokenizer, stop_ids, reply.stop_strings),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(cfg),
        callbacks=[JsonlLogCallback(rundir.grpo_log_path)],
        expected_prompt_ids={prompt_key(r["prompt"]): r["prompt_ids"] for r in records},
        stop_token_ids=stop_ids,
        stop_strings=reply.stop_strings,
    )
    if not progress:
        trainer.remove_callback(PrinterCallback)
    attach_trackers(trainer, rundir.grpo_dir)
    return trainer


# --------------------------------------------------------------------------- resume


def grpo_fingerprint(cfg: Config) -> dict[str, Any]:
    """What GRPO checkpoints depend on (save_steps and max_steps may change between runs)."""
    # How often it saves, how long it runs and how much memory its engine takes change nothing
    # of what a step learns.
    ignored = ("save_steps", "max_steps", "vllm_gpu_memory_utilization")
    grpo = {k: v for k, v in to_dict(cfg.grpo).items() if k not in ignored}
    return json.loads(
        json.dumps(
            {
                "grpo": grpo,
                "lora": to_dict(cfg.train.lora),
                "gradient_checkpointing": cfg.train.gradient_checkpointing,
                "model": to_dict(cfg.model),
                "prompt": to_dict(cfg.prompt),
                "data": to_dict(cfg.data),
                "seed": cfg.seed,
            }
        )
    )


# --------------------------------------------------------------------------- stage


def run_grpo(cfg: Config, rundir: RunDir, progress: bool = True) -> dict[str, Any]:
    """Train the GRPO baseline LoRA; returns a summary for the manifest."""
    base = load_base(cfg, rundir)
    model, tokenizer = base.model, base.tokenizer
    if hasattr(model, "peft_config"):
        raise RuntimeError("the base model already carries a PEFT adapter")
    checkpoint = last_checkpoint(rundir.grpo_checkpoints_dir)
    fingerprint_path = rundir.grpo_checkpoints_dir / FINGERPRINT_NAME
    check_resumable(fingerprint_path, grpo_fingerprint(cfg), checkpoint)
    log_path = rundir.grpo_log_path

    # TRL writes the pad id into the model's configs, Trainer turns `use_cache` off, and TRL wraps
    # the model in LoRA layers in place; all of it is undone below, so later stages get the base
    # model back unchanged.
    saved_generation_config = copy.deepcopy(model.generation_config)
    saved_pad = model.config.get_text_config().pad_token_id
    saved_use_cache = getattr(model.config, "use_cache", None)  # Trainer sets it to False
    was_training = model.training
    hooks_before = set(model.get_input_embeddings()._forward_hooks)
    trainer = None
    try:
        trainer = make_grpo_trainer(cfg, rundir, model, tokenizer, base.reply, progress)
        if trainer.is_world_process_zero():
            if checkpoint is not None:
                log.info("grpo: resuming from %s", checkpoint)
            start_log(log_path, checkpoint)
            write_fingerprint(fingerprint_path, grpo_fingerprint(cfg))
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        save_adapter(trainer.model, rundir.grpo_adapter_dir, trainer.is_world_process_zero())
        trainer.accelerator.wait_for_everyone()
        summary = _summary(trainer, result, read_jsonl(log_path), rundir.grpo_adapter_dir)
        if checkpoint is not None:
            summary["resumed_from"] = checkpoint.name
        return summary
    finally:
        if trainer is not None:
            _stop_colocated_vllm(trainer)
        if trainer is not None and hasattr(trainer.model, "peft_config"):
            restore_base(trainer.model, was_training, hooks_before)
        model.generation_config = saved_generation_config
        model.config.get_text_config().pad_token_id = saved_pad
        if saved_use_cache is not None:
            model.config.use_cache = saved_use_cache
        model.train(was_training)


def _stop_colocated_vllm(trainer: Any) -> None:
    """Free the GPU memory of TRL's colocated vLLM engine when GRPO ends, so the next stage's
    engine can start. TRL runs it inside this process (vLLM's external_launcher), where stopping
    it also destroys the process group vLLM set up; with several processes that group is the
    launcher's, so there the engine is left asleep (weights and KV cache already freed)."""
    generation = getattr(trainer, "vllm_generation", None)
    llm = getattr(generation, "llm", None)
    if llm is None or trainer.accelerator.num_processes > 1:
        return

    generation.llm = None
    shutdown_llm(llm)


def _summary(trainer: Any, result: Any, records: list[dict[str, Any]], adapter: Path) -> dict:
    g = trainer.args
    summary: dict[str, Any] = {
        "steps": trainer.state.global_step,
        "problems": len(trainer.train_dataset),
        "completions_per_step": g.per_device_train_batch_size * trainer.accelerator.num_processes,
        "num_generations": g.num_generations,
        "train_loss": round(float(result.training_loss), 6),
        "prompts_checked": trainer.prompts_checked,
        "adapter": str(adapter),
    }
    rewards = [r["reward"] for r in records if isinstance(r.get("reward"), (int, float))]
    if rewards:
        summary["first_reward"], summary["last_reward"] = rewards[0], rewards[-1]
        summary["mean_reward"] = round(sum(rewards) / len(rewards), 6)
    correct = [r.get("rewards/correctness/mean") for r in records]
    correct = [c for c in correct if isinstance(c, (int, float))]
    if correct:
        summary["mean_correct"] = round(sum(correct) / len(correct), 6)
    kls = [r["kl"] for r in records if isinstance(r.get("kl"), (int, float))]
    if kls:
        summary["last_kl"] = kls[-1]
    return summary
