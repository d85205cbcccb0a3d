"""`ssb ablate`: the same problems through SSB, SFT, rejection-sampling fine-tuning, on-policy
self-distillation and GRPO (ssb.ablation.arms defines each), each with `ablate.seeds` seeds, then
every model in one evaluation pass, then `ablate/summary.json` and the report.

1. The run's data: rollouts and pairs (made here by `ssb run`'s stages when missing, which also
   resume), and the teacher targets when an ssb arm needs them.
2. Each arm's data (a teacher context's bootstrap and targets; rft's correct rollouts), then each
   seed's training into `ablate/<arm>/seed<k>/`. A finished arm and seed has a done.json (written
   atomically after its adapter) and is never redone; a killed one resumes from its checkpoints.
3. One evaluation of base and every adapter (one engine serving them all) into `ablate/eval/`,
   resumed per record like `ssb eval`.
4. `ablate/summary.json`, `ablate/report.md`, `ablate/plots/training.png`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ssb.ablation.arms import (
    Arm,
    ablation_arms,
    arm_config,
    equal_steps,
    needs_stored_targets,
    prepare_arm_data,
    seeds,
    train_or_reuse,
)
from ssb.ablation.report import write_ablation_report
from ssb.ablation.selection import select_hyperparameters
from ssb.ablation.summary import build_summary
from ssb.config import Config
from ssb.funnel import funnel
from ssb.rundir import AblationDir, RunDir, read_jsonl
from ssb.stages.common import log
from ssb.stages.diagnose import run_targets_and_diagnose
from ssb.stages.evaluate import run_eval
from ssb.stages.pipeline import generate_pairs, run_and_record

# The run's stages whose output each kind of arm trains from (its data cost).
DATA_STAGES = {
    "ssb": ("rollout", "bootstrap", "targets"),
    "sft": ("rollout", "bootstrap"),
    "rft": ("rollout",),
    "onpolicy": ("rollout", "bootstrap"),
    "grpo": (),
}


def prepare_run(cfg: Config, rundir: RunDir, arms: list[Arm], progress: bool = True) -> None:
    """Rollouts and pairs, and the teacher targets when the plain ssb arm trains on them."""

    generate_pairs(cfg, rundir, progress)
    if any(a.kind == "ssb" and a.context is None for a in arms) and needs_stored_targets(cfg):
        run_and_record(rundir, "targets", lambda: run_targets_and_diagnose(cfg, rundir, progress))


def data_cost(rundir: RunDir, ablation: AblationDir, arm: Arm, examples: int) -> dict[str, Any]:
    """The stages that made an arm's data and their wall time (shared by its seeds)."""
    stages = list(DATA_STAGES[arm.kind])
    seconds = 0.0
    for stage in stages:
        source = rundir
        if arm.context is not None and stage in ("bootstrap", "targets"):
            source = ablation.arm_data(arm.name)
        seconds += float(source.stage_status(stage).get("seconds") or 0.0)
    out: dict[str, Any] = {"stages": " + ".join(stages) or "none", "seconds": round(seconds, 1)}
    if arm.kind == "ssb":
        out["teacher_forwards"] = examples  # the targets stage: one per pair
    return out


def run_ablate(cfg: Config, rundir: RunDir, progress: bool = True) -> dict[str, Any]:

    arms = ablation_arms(cfg)
    ablation = rundir.ablation()
    ablation.path.mkdir(parents=True, exist_ok=True)
    prepare_run(cfg, rundir, arms, progress)
    pairs = read_jsonl(rundir.pairs_path)
    if not pairs:
        raise ValueError(f"no pairs in {rundir.pairs_path}: bootstrap kept none to train on")
    steps = equal_steps(cfg, len(pairs))
    # The problems every arm draws on: those the bootstrap decided (it stops at a pair target).
    decided = funnel(rundir)["decided"] or None
    log.info(
        "ablate: %d arms x %d seeds, %d optimizer steps each", len(arms), cfg.ablate.seeds, steps
    )
    collected: dict[str, dict[str, Any]] = {}
    costs: dict[str, Any] = {}
    models: dict[str, Path] = {}
    trained = 0
    plans: list[tuple[Arm, RunDir]] = []
    for arm in arms:
        source, data = prepare_arm_data(cfg, rundir, ablation, arm, progress)
        collected[arm.name] = {
            "kind": arm.kind,
            "context": arm.context,
            "variant": arm.variant,
            "data": data,
            "seeds": {},
        }
        costs[arm.name] = data_cost(rundir, ablation, arm, data["examples"])
        if not data["examples"]:
            collected[arm.name]["skipped"] = "no training examples"
            log.warning("ablate: %s has no training examples; not trained", arm.name)
            continue
        plans.append((arm, source))
    # Hyperparameters per arm, chosen on the validation split (never on the test set).
    chosen = select_hyperparameters(cfg, rundir, ablation, plans, steps, decided, progress)
    for arm, source in plans:
        entry = collected[arm.name]
        entry["hyperparameters"] = chosen[arm.name]["chosen"]
        entry["selection"] = chosen[arm.name]
        for seed in seeds(cfg):
            arm_cfg = arm_config(cfg, arm, seed, decided, chosen[arm.name]["chosen"])
            armdir = ablation.arm_dir(arm.name, seed, source)
            log.info("ablate: %s, seed %d (%d steps)", arm.name, seed, steps)
            done, now = train_or_reuse(arm_cfg, arm, armdir, steps, progress)
            trained += int(now)
            name = ablation.model_name(arm.name, seed)
            models[name] = armdir.adapter_dir.resolve()
            entry["seeds"][str(seed)] = {
                "model": name,
                "adapter": str(armdir.adapter_dir.resolve()),
                "cost": done["cost"],
            }
    entries = ["base", *(f"{name}={path}" for name, path in models.items())]
    with ablation.stage("eval") as evaluated:  # its wall time, summed over attempts
        evaluated.update(run_eval(cfg, ablation, models=entries, progress=progress))
    summary = build_summary(cfg, ablation, collected, steps, costs)
    report = write_ablation_report(ablation)
    return {
        "arms": list(collected),
        "seeds": seeds(cfg),
        "steps": steps,
        "trained_now": trained,
        "models_evaluated": len(models) + 1,
        "eval_new_records": sum(sum(b.values()) for b in evaluated["new_records"].values()),
        "accuracy": {
            arm: {b: round(e["across_seeds"][b]["mean"], 4) for b in e["across_seeds"]}
            for arm, e in summary["arms"].items()
        },
        "summary": str(ablation.summary_path),
        "report": str(report),
    }
