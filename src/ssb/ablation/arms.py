"""The arms of `ssb ablate`: what each trains on, with which loss, under which budget.

Every arm trains a fresh LoRA adapter (`train.lora`: the same rank, alpha and modules) on the
same frozen base, through the project's own training code, for the same number of optimizer
steps S, and is evaluated on the same held-out problems:

| arm | training data (all from the run's training problems) | loss per reply token |
|---|---|---|
| `ssb` | pairs.jsonl: plain prompt + the hinted teacher's correct reply | `train.loss` (KD to the stored teacher targets) |
| `ssb.<context>` | the same, from a bootstrap whose teacher saw `<context>` | the same |
| `sft` | the same pairs | CE on the reply tokens (kd_weight 0, ce_weight 1) |
| `rft` | the base's own correct rollouts (rollouts.jsonl), distinct texts per problem | CE |
| `onpolicy` | the pairs' prompts; each step the student samples a reply to the plain prompt and the frozen base, given SSB's hinted prompt, scores it | `train.loss`'s divergence on the student's tokens |
| `grpo` | the rolled-out problems (`ssb grpo`, TRL) | GRPO, reward 1/0 by ssb.grading |

Equal budget: S = `ablate.steps`, else the ssb arm's own step count, ceil(train.epochs x pairs /
train.batch_size) (per gradient-accumulation group, as transformers counts it). ssb, sft, rft and
onpolicy take S steps of `train.batch_size` examples at `train.learning_rate`; grpo takes S steps
of `grpo.batch_size` prompts x `grpo.num_generations` completions at `grpo.learning_rate` (a
group is what GRPO needs; its rate is the one tuned for it). Seeds: seed k trains with
`cfg.seed + k` (LoRA initialisation and data order).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from ssb.ablation.onpolicy import run_onpolicy
from ssb.config import Config, to_dict, variant_config
from ssb.funnel import funnel
from ssb.models import set_seed
from ssb.problems import Problem
from ssb.prompts import render_prompt_ids, student_messages
from ssb.records import pair_record
from ssb.rundir import (
    AblationDir,
    ArmDir,
    DataDir,
    RunDir,
    atomic_write_json,
    atomic_write_text,
    has_adapter,
    read_jsonl,
)
from ssb.stages.base import load_base
from ssb.stages.bootstrap import run_bootstrap
from ssb.stages.diagnose import run_diagnose, run_targets_and_diagnose
from ssb.stages.grpo import run_grpo
from ssb.stages.train import run_train
from ssb.target_modes import TARGET_MODES

KINDS = ("ssb", "sft", "rft", "onpolicy", "grpo")
# Which kinds train on the (main or a context's) pairs.jsonl, and which need teacher targets.
PAIR_KINDS = ("ssb", "sft", "onpolicy")


@dataclass(frozen=True)
class Arm:
    """One arm: `kind` says how it trains; `context` the teacher context of an ssb.<context> arm;
    `variant` the `ablate.variants` entry of an ssb.<name> arm."""

    name: str
    kind: str
    context: str | None = None
    variant: str | None = None


def ablation_arms(cfg: Config) -> list[Arm]:
    """The arms `cfg.ablate` asks for, in report order: the named ones, then ssb.<context>, then
    ssb.<variant>."""
    arms = [Arm(name, name) for name in cfg.ablate.arms]
    arms += [Arm(f"ssb.{c}", "ssb", c) for c in cfg.ablate.teacher_contexts]
    arms += [Arm(f"ssb.{variant_config(cfg, v)[0]}", "ssb", variant=v) for v in cfg.ablate.variants]
    return arms


def arm_base_config(cfg: Config, arm: Arm) -> Config:
    """The config an arm starts from: the run's, with its teacher context or variant applied."""
    if arm.context is not None:
        return context_config(cfg, arm.context)
    if arm.variant is not None:
        return variant_config(cfg, arm.variant)[1]
    return cfg


def has_own_data(cfg: Config, arm: Arm) -> bool:
    """Whether an ssb arm's teacher is prompted otherwise than the run's (a teacher context, or
    a variant of the bootstrap settings), so it needs a bootstrap and targets of its own."""
    return arm.kind == "ssb" and arm_base_config(cfg, arm).bootstrap != cfg.bootstrap


# --------------------------------------------------------------------------- hyperparameters

# The axes of `ssb ablate`'s validation grid, in the order a grid point's tag names them.
GRID_AXES = ("learning_rate", "temperature", "ce_share")


def grid_points(cfg: Config, arm: Arm) -> list[dict[str, float]]:
    """The hyperparameter points an arm is tried with on the validation split (`ablate.*_grid`);
    one empty point when it has no grid. KD temperature and CE share apply to the KD arms."""
    a = cfg.ablate
    axes: dict[str, list[float]] = {
        "learning_rate": list(a.grpo_lr_grid if arm.kind == "grpo" else a.lr_grid)
    }
    if arm.kind == "ssb":
        axes["temperature"] = list(a.tau_grid)
        axes["ce_share"] = list(a.ce_share_grid)
    points: list[dict[str, float]] = [{}]
    for axis in GRID_AXES:
        values = axes.get(axis) or []
        if values:
            points = [{**p, axis: v} for p in points for v in values]
    return points


def point_tag(point: dict[str, float]) -> str:
    """A grid point as a folder and model-name part, e.g. "lr5e-05_tau2_ce0.5"."""
    short = {"learning_rate": "lr", "temperature": "tau", "ce_share": "ce"}
    return "_".join(f"{short[k]}{point[k]:g}" for k in GRID_AXES if k in point) or "default"


def with_point(cfg: Config, arm: Arm, point: dict[str, float]) -> Config:
    """`cfg` trained at a grid point: its learning rate (GRPO's for grpo), KD temperature and CE
    share a (loss = (1 - a) KD + a CE)."""
    if not point:
        return cfg
    if arm.kind == "grpo":
        grpo = dataclasses.replace(cfg.grpo, learning_rate=point["learning_rate"])
        return dataclasses.replace(cfg, grpo=grpo)
    train = cfg.train
    if "learning_rate" in point:
        train = dataclasses.replace(train, learning_rate=point["learning_rate"])
    loss = train.loss
    if "temperature" in point:
        loss = dataclasses.replace(loss, temperature=point["temperature"])
    if "ce_share" in point:
        share = point["ce_share"]
        loss = dataclasses.replace(loss, kd_weight=1.0 - share, ce_weight=share)
    return dataclasses.replace(cfg, train=dataclasses.replace(train, loss=loss))


def seeds(cfg: Config) -> list[int]:
    return [cfg.seed + k for k in range(cfg.ablate.seeds)]


def steps_per_epoch(examples: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps in one epoch, as transformers' Trainer counts them."""
    return max(math.ceil(examples / batch_size) // grad_accum, 1)


def equal_steps(cfg: Config, num_pairs: int) -> int:
    """S, every arm's number of optimizer steps (see the module docstring)."""
    if cfg.ablate.steps is not None:
        return cfg.ablate.steps
    t = cfg.train
    return max(1, math.ceil(t.epochs * steps_per_epoch(num_pairs, t.batch_size, t.grad_accum)))


# --------------------------------------------------------------------------- data


def context_config(cfg: Config, context: str) -> Config:
    return dataclasses.replace(
        cfg, bootstrap=dataclasses.replace(cfg.bootstrap, teacher_context=context)
    )


def prepare_arm_data(
    cfg: Config, rundir: RunDir, ablation: AblationDir, arm: Arm, progress: bool = True
) -> tuple[RunDir, dict[str, Any]]:
    """The run directory an arm trains from (the run, or its own DataDir) and what its data is.
    ssb.<context>: bootstrap and targets with that teacher context on the run's rollouts (each
    resumed where it stopped); rft: its pairs of correct rollouts. Both written once."""
    if arm.kind == "rft":
        data = ablation.arm_data(arm.name)
        if not data.pairs_path.exists():
            write_rft_pairs(cfg, rundir, data)
        pairs = read_jsonl(data.pairs_path)
        problems = len({p["problem_id"] for p in pairs})
        return data, {"examples": len(pairs), "problems": problems}
    if not has_own_data(cfg, arm):
        if arm.kind == "grpo":  # trains on the rolled-out problems, not on pairs
            return rundir, {"examples": len(read_jsonl(rundir.pairs_path))}
        return rundir, pair_yield(funnel(rundir), cfg.bootstrap.teacher_context)

    data = ablation.arm_data(arm.name)
    data.path.mkdir(parents=True, exist_ok=True)
    ctx_cfg = arm_base_config(cfg, arm)
    # The same problems as the run's pairs: the rollouts of the problems its bootstrap decided,
    # every one of them sent to this teacher (no pair target of its own).
    ctx_cfg = dataclasses.replace(
        ctx_cfg, bootstrap=dataclasses.replace(ctx_cfg.bootstrap, target_pairs=None)
    )
    if not data.own_rollouts_path.exists():
        decided = decided_ids(rundir)
        rollouts = [r for r in read_jsonl(rundir.rollouts_path) if r["id"] in decided]
        atomic_write_text(
            data.own_rollouts_path,
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rollouts),
        )
    if not data.is_complete("bootstrap"):
        with data.stage("bootstrap") as summary:
            summary.update(run_bootstrap(ctx_cfg, data, progress))
    counts = funnel(data)
    info = pair_yield(counts, ctx_cfg.bootstrap.teacher_context)
    if counts["kept"] and needs_stored_targets(cfg) and not data.is_complete("targets"):
        with data.stage("targets") as summary:
            summary.update(run_targets_and_diagnose(ctx_cfg, data, progress))
    if counts["kept"] and cfg.targets.diagnose and not data.teacher_signal_path.exists():
        run_diagnose(ctx_cfg, data, progress)  # online targets, or targets made before it existed
    return data, info


def pair_yield(counts: dict[str, Any], context: str) -> dict[str, Any]:
    """An arm's pairs (from a bootstrap `funnel`) and their yield per mixed problem."""
    return {
        "examples": counts["kept"],
        "teacher_context": context,
        "mixed": counts["mixed"],
        "pair_yield": counts["kept"] / counts["mixed"] if counts["mixed"] else None,
    }


def needs_stored_targets(cfg: Config) -> bool:

    return TARGET_MODES[cfg.targets.mode].stored


def correct_rollouts(record: dict[str, Any], limit: int | None) -> list[dict[str, Any]]:
    """The distinct correct samples of one rollout record that ended by themselves, in order:
    rejection-sampling fine-tuning's data (distinct by whitespace-normalised text)."""
    seen: set[str] = set()
    kept = []
    for sample in record["samples"]:
        key = " ".join(sample["text"].split())
        if sample["correct"] and sample["finish_reason"] == "stop" and key not in seen:
            seen.add(key)
            kept.append(sample)
    return kept[:limit] if limit is not None else kept


def decided_ids(rundir: RunDir) -> set[str]:
    """The problems the run's bootstrap decided (kept or rejected)."""
    ids = {d["id"] for d in read_jsonl(rundir.bootstrap_log_path)}
    return ids | {p["id"] for p in read_jsonl(rundir.pairs_path)}


def write_rft_pairs(cfg: Config, rundir: RunDir, data: DataDir) -> int:
    """The rft arm's training examples as pairs.jsonl records (plain prompt for both roles, the
    rollout's own tokens as the reply, closed with the end token as every distilled reply is),
    written atomically to `data.pairs_path`. Returns how many."""

    rollouts = read_jsonl(rundir.rollouts_path)
    if not rollouts:
        raise FileNotFoundError(f"no rollouts in {rundir.rollouts_path}: run `ssb rollout` first")
    # Only the problems the bootstrap decided (it stops at a pair target): the problem set the
    # pair arms draw on. A run without a bootstrap keeps every rollout.
    decided = decided_ids(rundir)
    if decided:
        rollouts = [r for r in rollouts if r["id"] in decided]
    base = load_base(cfg, rundir)
    lines = []
    for record in rollouts:
        samples = correct_rollouts(record, cfg.ablate.rft_max_per_problem)
        if not samples:
            continue
        problem = Problem(
            record["id"], record["question"], record["gold"], record.get("source", "")
        )
        messages = student_messages(problem, cfg.prompt)
        prompt_ids = render_prompt_ids(base.tokenizer, messages, cfg.prompt)
        for j, sample in enumerate(samples):
            one = dataclasses.replace(problem, id=f"{problem.id}#rft{j}")
            pair = dict(
                pair_record(
                    one,
                    messages,
                    messages,
                    prompt_ids,
                    prompt_ids,
                    sample["text"],
                    sample["token_ids"],
                    base.reply.end_token_id,
                )
            )
            pair["problem_id"] = problem.id
            lines.append(json.dumps(pair, ensure_ascii=False) + "\n")
    if not lines:
        raise ValueError(f"rft: no correct rollout in {rundir.rollouts_path} to train on")
    atomic_write_text(data.pairs_path, "".join(lines))
    return len(lines)


# --------------------------------------------------------------------------- training


def arm_config(
    cfg: Config,
    arm: Arm,
    seed: int,
    problems_decided: int | None,
    point: dict[str, float] | None = None,
) -> Config:
    """The config one arm and seed trains with, at a hyperparameter `point` (`grid_points`)."""
    out = dataclasses.replace(arm_base_config(cfg, arm), seed=seed)
    if arm.kind in ("sft", "rft"):
        loss = dataclasses.replace(cfg.train.loss, kd_weight=0.0, ce_weight=1.0)
        out = dataclasses.replace(out, train=dataclasses.replace(cfg.train, loss=loss))
    if arm.kind == "grpo" and problems_decided is not None:
        # The problems the bootstrap decided (a pair target stops it before the end of the
        # rollouts): the problem set every arm draws on.
        data = dataclasses.replace(cfg.data, max_problems=problems_decided)
        out = dataclasses.replace(out, data=data)
    return with_point(out, arm, point or {})


def arm_fingerprint(arm_cfg: Config, arm: Arm, steps: int) -> dict[str, Any]:
    """What a finished arm and seed was trained with (its done.json must match to be reused)."""
    train = {
        k: v
        for k, v in to_dict(arm_cfg.train).items()
        if k not in ("logging_steps", "save_steps", "report_to", "epochs")
    }
    out: dict[str, Any] = {
        "arm": arm.name,
        "kind": arm.kind,
        "seed": arm_cfg.seed,
        "steps": steps,
        "model": to_dict(arm_cfg.model),
        "prompt": to_dict(arm_cfg.prompt),
    }
    if arm.kind == "grpo":
        out["grpo"] = {k: v for k, v in to_dict(arm_cfg.grpo).items() if k != "save_steps"}
        out["lora"] = train["lora"]
    else:
        out["train"] = train
    if arm.kind == "ssb":
        out["targets_mode"] = arm_cfg.targets.mode
        out["teacher_context"] = arm_cfg.bootstrap.teacher_context
        if arm_cfg.bootstrap.hint_style != "inline":  # runs made before the styles: unchanged
            out["hint_style"] = arm_cfg.bootstrap.hint_style
    if arm.kind == "rft":
        out["rft_max_per_problem"] = arm_cfg.ablate.rft_max_per_problem
    if arm.kind == "onpolicy":
        a = arm_cfg.ablate
        out["onpolicy"] = {
            "sampling": to_dict(a.onpolicy_sampling),
            "max_new_tokens": a.onpolicy_max_new_tokens,
        }
    return json.loads(json.dumps(out))


def train_arm(
    arm_cfg: Config, arm: Arm, armdir: ArmDir, steps: int, progress: bool = True
) -> dict[str, Any]:
    """Train one arm and seed into `armdir` (resuming its checkpoints), recorded as the stage
    "train" of the arm's manifest (wall time summed over attempts). Returns its summary."""

    armdir.path.mkdir(parents=True, exist_ok=True)
    set_seed(arm_cfg.seed)  # the LoRA initialisation
    with armdir.stage("train") as summary:
        if arm.kind == "grpo":
            g = dataclasses.replace(arm_cfg.grpo, max_steps=steps)
            summary.update(run_grpo(dataclasses.replace(arm_cfg, grpo=g), armdir, progress))
        elif arm.kind == "onpolicy":
            summary.update(run_onpolicy(arm_cfg, armdir, steps, progress))
        else:
            summary.update(run_train(arm_cfg, armdir, progress, max_steps=steps))
    return armdir.stage_status("train")


def finished(armdir: ArmDir, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The done.json of a finished arm and seed, None when it still has to train. One trained
    with other settings is an error naming them (its folder must go before it is retrained)."""
    if not armdir.done_path.exists():
        return None
    done = json.loads(armdir.done_path.read_text())
    old = done.get("fingerprint")
    if old != fingerprint:
        changed = sorted(
            k for k in set(old or {}) | set(fingerprint) if (old or {}).get(k) != fingerprint.get(k)
        )
        raise ValueError(
            f"{armdir.path} was trained with other settings ({', '.join(changed)}); delete that "
            "folder to retrain it, or restore the config"
        )
    if not has_adapter(armdir.adapter_dir):
        raise FileNotFoundError(
            f"{armdir.done_path} says finished but {armdir.adapter_dir} has no adapter"
        )
    return done


def train_or_reuse(
    arm_cfg: Config, arm: Arm, armdir: ArmDir, steps: int, progress: bool = True
) -> tuple[dict[str, Any], bool]:
    """(done.json, trained now): train one arm and seed unless `armdir` already finished with
    the same settings; done.json is written atomically after the adapter."""
    fingerprint = arm_fingerprint(arm_cfg, arm, steps)
    done = finished(armdir, fingerprint)
    if done is not None:
        return done, False
    train_arm(arm_cfg, arm, armdir, steps, progress)
    done = {"fingerprint": fingerprint, "cost": training_cost(arm_cfg, arm, armdir)}
    atomic_write_json(armdir.done_path, done)
    return done, True


def training_cost(arm_cfg: Config, arm: Arm, armdir: ArmDir) -> dict[str, Any]:
    """What one arm and seed's training cost, from its manifest and training log: wall time
    (summed over a killed attempt and its resumption), optimizer steps, tokens the training
    itself generated, and teacher forward passes made during training (the ssb arms' teacher
    ran once, before training, in the targets stage: see the arm's data cost)."""
    status = armdir.stage_status("train")
    log = read_jsonl(armdir.grpo_log_path)
    generated = 0.0
    teacher_forwards = 0
    if arm.kind == "onpolicy":
        generated = sum(r.get("sampled_tokens", 0) for r in log)
        teacher_forwards = int(sum(r.get("scored_replies", 0) for r in log))
    elif arm.kind == "grpo":
        per_step = arm_cfg.grpo.batch_size * arm_cfg.grpo.num_generations
        generated = sum(r.get("completions/mean_length", 0) * per_step for r in log)
    return {
        "train_seconds": status.get("seconds"),
        "steps": status.get("steps"),
        "generated_tokens": int(round(generated)),
        "teacher_forwards": teacher_forwards,
    }
