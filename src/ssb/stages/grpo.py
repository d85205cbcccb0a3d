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

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset

from ssb.config import Config, to_dict
from ssb.generate import select_backend
from ssb.generate.base import make_completion
from ssb.generate.vllm import shutdown_llm, vllm_device
from ssb.grading import extract_boxed, grade
from ssb.problems import load_train_problems
from ssb.prompts import fewshot_text, render_prompt_ids, student_messages, uses_chat_template
from ssb.rundir import RunDir, read_jsonl
from ssb.stages.base import load_base
from ssb.stages.lora_training import (
    JsonlLogCallback,
    LoraFiles,
    LoraTraining,
    attach_reporting,
    lora_config,
    run_lora_training,
    shared_arguments,
)
from ssb.trackers import tracker_run_name

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


# --------------------------------------------------------------------------- trainer


def _trainer_class() -> type:
    """`SSBGRPOTrainer`, imported on first use (importing trl takes a few seconds)."""
    from ssb.stages.grpo_trainer import SSBGRPOTrainer  # noqa: PLC0415 -- imports trl

    return SSBGRPOTrainer


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
    """TRL GRPOConfig: `shared_arguments` from `cfg.grpo`, plus GRPO's own fields and where
    it generates (`overrides` win; tests use them)."""
    from trl import GRPOConfig  # noqa: PLC0415 -- optional: trl is the grpo extra

    g = cfg.grpo
    fields: dict[str, Any] = {
        # TRL counts completions: each device's batch holds batch_size prompt groups.
        "per_device_train_batch_size": g.batch_size * g.num_generations,
        "gradient_accumulation_steps": 1,
        "num_generations": g.num_generations,
        "max_steps": g.max_steps,
        "beta": g.beta,
        "loss_type": g.loss_type,
        "temperature": g.sampling.temperature,
        "top_p": g.sampling.top_p,
        "top_k": g.sampling.top_k,
        "max_completion_length": g.max_completion_length,
        "reward_weights": [1.0, g.format_reward_weight],
        "logging_steps": 1,
        "log_completions": False,
        **generation_fields(cfg, stop_token_ids, stop_strings),
        **overrides,
    }
    return shared_arguments(
        GRPOConfig,
        cfg,
        "grpo",
        output_dir=rundir.grpo_checkpoints_dir,
        run_name=tracker_run_name(cfg, rundir.grpo_dir, role="grpo"),
        device=device,
        progress=progress,
        **fields,
    )


def generation_fields(
    cfg: Config, stop_token_ids: list[int], stop_strings: list[str]
) -> dict[str, Any]:
    """The GRPOConfig fields of where completions are sampled (a colocated vLLM engine, see
    `use_grpo_vllm`, or transformers' `generate`) and where they stop."""
    if not use_grpo_vllm(cfg):
        generation_kwargs: dict[str, Any] = {"eos_token_id": stop_token_ids}
        if stop_strings:
            generation_kwargs["stop_strings"] = list(stop_strings)
        return {"generation_kwargs": generation_kwargs}
    # TRL passes generation_kwargs to vLLM's SamplingParams there, to `generate` otherwise.
    generation_kwargs = {"stop_token_ids": list(stop_token_ids)}
    if stop_strings:
        generation_kwargs["stop"] = list(stop_strings)
    return {
        "generation_kwargs": generation_kwargs,
        "use_vllm": True,
        "vllm_mode": "colocate",
        "vllm_gpu_memory_utilization": cfg.grpo.vllm_gpu_memory_utilization,
        "vllm_tensor_parallel_size": cfg.generation.tensor_parallel_size,
        # The engine's weights and KV cache leave the GPU while the optimizer runs.
        "vllm_enable_sleep_mode": True,
    }


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
        expected_prompt_ids=[(r["prompt"], r["prompt_ids"]) for r in records],
        stop_token_ids=stop_ids,
        stop_strings=reply.stop_strings,
    )
    attach_reporting(trainer, rundir.grpo_dir, progress)
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
    if hasattr(base.model, "peft_config"):
        raise RuntimeError("the base model already carries a PEFT adapter")
    files = LoraFiles(
        checkpoints_dir=rundir.grpo_checkpoints_dir,
        log_path=rundir.grpo_log_path,
        adapter_dir=rundir.grpo_adapter_dir,
        fingerprint_name=FINGERPRINT_NAME,
    )
    training = GRPOTraining(
        name="grpo",
        files=files,
        fingerprint=grpo_fingerprint(cfg),
        cfg=cfg,
        rundir=rundir,
        tokenizer=base.tokenizer,
        reply=base.reply,
        progress=progress,
    )
    return run_lora_training(training, base.model)


@dataclass(kw_only=True)
class GRPOTraining(LoraTraining):
    """`ssb grpo` as a LoraTraining: TRL's trainer attaches the LoRA to the base model itself,
    and changes more of it, which `setup` notes and `cleanup` undoes."""

    cfg: Config
    rundir: RunDir
    tokenizer: Any
    reply: Any  # ssb.prompts.ReplyFormat
    progress: bool = True
    # Set by `setup`: the base model and what of it `cleanup` restores.
    base_model: Any = field(init=False, default=None)
    saved: dict[str, Any] = field(init=False, default_factory=dict)

    def setup(self, base_model: Any) -> None:
        # TRL writes the pad id into the model's configs, Trainer turns `use_cache` off: both
        # are put back, so later stages get the base model back unchanged.
        self.base_model = base_model
        self.saved = {
            "generation_config": copy.deepcopy(base_model.generation_config),
            "pad": base_model.config.get_text_config().pad_token_id,
            "use_cache": getattr(base_model.config, "use_cache", None),
        }

    def make_trainer(self, model: Any) -> Any:
        return make_grpo_trainer(
            self.cfg, self.rundir, model, self.tokenizer, self.reply, self.progress
        )

    def summary(self, trainer: Any, result: Any) -> dict[str, Any]:
        return grpo_summary(trainer, result, read_jsonl(self.files.log_path))

    def cleanup(self, trainer: Any | None) -> None:
        if trainer is not None:
            _stop_colocated_vllm(trainer)
        model = self.base_model
        model.generation_config = self.saved["generation_config"]
        model.config.get_text_config().pad_token_id = self.saved["pad"]
        if self.saved["use_cache"] is not None:
            model.config.use_cache = self.saved["use_cache"]


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


def grpo_summary(trainer: Any, result: Any, records: list[dict[str, Any]]) -> dict[str, Any]:
    """GRPO's summary keys: its batch, loss, prompt checks, and rewards and KL from the log."""
    g = trainer.args
    summary: dict[str, Any] = {
        "problems": len(trainer.train_dataset),
        "completions_per_step": g.per_device_train_batch_size * trainer.accelerator.num_processes,
        "num_generations": g.num_generations,
        "prompts_checked": trainer.prompts_checked,
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
