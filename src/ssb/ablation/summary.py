"""`ablate/summary.json`: per arm, accuracy per seed and across seeds, paired comparisons with
base and with the ssb arm, training cost. Built only from the ablation's files (its eval records
and summary, each arm's done.json), never by re-running anything.

Statistics (ssb.stats, through ssb.stages.evaluate.paired_comparison):
- per seed: accuracy with its 95% interval (Wilson for greedy pass@1), and paired with base and
  with the ssb arm of the same seed: wins, losses, exact McNemar p (a sign test for avg@k), mean
  difference with a paired bootstrap interval over problems;
- across seeds: mean, sample standard deviation, min and max of the seeds' accuracies; and the
  same paired comparison on each problem's score averaged over the seeds (the fraction of the
  seeds' samples that are right; the test is then a sign test on the problems whose average
  differs, the interval a paired bootstrap over problems).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from ssb.ablation.arms import ablation_arms, arm_base_config, has_own_data
from ssb.config import Config
from ssb.rundir import AblationDir, atomic_write_json
from ssb.stages.common import stable_seed
from ssb.stages.eval_setup import (
    VERDICT_KEYS,
    eval_settings,
    fingerprint,
    records_made_with,
    records_path,
)
from ssb.stages.eval_summary import paired_comparison

REFERENCES = ("ssb", "sft")
EQUAL_BUDGET = (
    "every arm: a fresh LoRA adapter with train.lora's rank, alpha and modules, {steps} optimizer "
    "steps; ssb, sft, rft and onpolicy at train.batch_size examples per step and "
    "train.learning_rate; grpo at grpo.batch_size prompts x grpo.num_generations completions per "
    "step and grpo.learning_rate (or the rates chosen on the validation split, see each arm's "
    "hyperparameters); seed k = LoRA initialisation and data order"
)


def current_records(
    cfg: Config, ablation: AblationDir, model: str, adapter: Path | None, bench: str
) -> list[dict[str, Any]]:
    """A model's eval records on one benchmark made with the current settings (first per id)."""
    fp = fingerprint(cfg, eval_settings(cfg), adapter)
    return list(records_made_with(records_path(ablation, model, bench), fp).values())


def pooled(seed_records: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One record per problem answered under every seed, holding all the seeds' samples (its
    score is the fraction of them that are right)."""
    by_seed = [{str(r["id"]): r for r in records} for records in seed_records]
    common = [i for i in by_seed[0] if all(i in s for s in by_seed[1:])] if by_seed else []
    return [{"id": i, "samples": [x for s in by_seed for x in s[i]["samples"]]} for i in common]


def spread(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n_seeds": len(values),
    }


def build_summary(
    cfg: Config,
    ablation: AblationDir,
    arms: dict[str, dict[str, Any]],
    steps: int,
    data_cost: dict[str, Any],
) -> dict[str, Any]:
    """summary.json from the ablation's eval files; `arms`: name -> {kind, context, data,
    seeds: {seed: {model, adapter, cost}}} as `run_ablate` collected them."""
    eval_summary = json.loads(ablation.eval_summary_path.read_text())
    settings = eval_summary["settings"]
    greedy = settings["greedy"]
    key = VERDICT_KEYS[settings["scoring"]]
    benches = list(eval_summary["benchmarks"])
    results = eval_summary.get("results") or {}
    base = {b: current_records(cfg, ablation, "base", None, b) for b in benches}

    def records_of(arm: str) -> dict[str, dict[str, list[dict[str, Any]]]]:
        out: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for seed, info in arms[arm]["seeds"].items():
            adapter = Path(info["adapter"])
            out[seed] = {
                b: current_records(cfg, ablation, info["model"], adapter, b) for b in benches
            }
        return out

    records = {arm: records_of(arm) for arm in arms}
    # Every arm is compared with these two, paired: SSB as the paper runs it, and cross-entropy
    # on the same replies (the rival an SSB variant has to beat).
    references = [r for r in REFERENCES if r in arms and arms[r]["seeds"]]
    out_arms: dict[str, Any] = {}
    for arm, info in arms.items():
        entry: dict[str, Any] = {
            k: info.get(k)
            for k in (
                "kind",
                "context",
                "variant",
                "data",
                "skipped",
                "hyperparameters",
                "selection",
            )
        }
        entry["seeds"] = {}
        entry["across_seeds"] = {}
        for seed, seed_info in info["seeds"].items():
            per_bench = {}
            for bench in benches:
                mine = records[arm][seed][bench]
                result = (results.get(seed_info["model"]) or {}).get(bench)
                if not mine or not result:
                    continue
                one = {k: result.get(k) for k in ("n", "accuracy", "interval", "interval_method")}
                s = stable_seed(cfg.seed, "ablate", bench, arm, seed)
                one["vs_base"] = paired_comparison(mine, base[bench], key, greedy, s)
                for ref in references:
                    if arm != ref and seed in records[ref]:
                        theirs = records[ref][seed][bench]
                        one[f"vs_{ref}"] = paired_comparison(mine, theirs, key, greedy, s)
                per_bench[bench] = one
            entry["seeds"][seed] = {
                "model": seed_info["model"],
                "cost": seed_info.get("cost"),
                "results": per_bench,
            }
        for bench in benches:
            accs = [
                s["results"][bench]["accuracy"]
                for s in entry["seeds"].values()
                if bench in s["results"]
            ]
            if not accs:
                continue
            across = spread(accs)
            mine = pooled([records[arm][seed][bench] for seed in info["seeds"]])
            s = stable_seed(cfg.seed, "ablate-pooled", bench, arm)
            across["pooled_vs_base"] = paired_comparison(mine, base[bench], key, False, s)
            for ref in references:
                if arm != ref:
                    theirs = pooled([records[ref][sd][bench] for sd in records[ref]])
                    across[f"pooled_vs_{ref}"] = paired_comparison(mine, theirs, key, False, s)
            entry["across_seeds"][bench] = across
        costs = [s["cost"] for s in entry["seeds"].values() if s.get("cost")]
        if costs:
            entry["cost"] = {
                "train_seconds_mean": statistics.fmean(c.get("train_seconds") or 0 for c in costs),
                "generated_tokens_mean": statistics.fmean(c["generated_tokens"] for c in costs),
                "teacher_forwards_mean": statistics.fmean(c["teacher_forwards"] for c in costs),
                "data": data_cost.get(arm),
            }
        out_arms[arm] = entry
    summary = {
        "steps": steps,
        "seeds": sorted({int(s) for a in arms.values() for s in a["seeds"]}),
        "equal_budget": EQUAL_BUDGET.format(steps=steps),
        "settings": settings,
        "benchmarks": benches,
        "base": {
            b: {
                k: (results.get("base") or {}).get(b, {}).get(k)
                for k in ("n", "accuracy", "interval")
            }
            for b in benches
        },
        "arms": out_arms,
        "teacher_signal": teacher_signals(cfg, ablation),
    }
    atomic_write_json(ablation.summary_path, summary)
    return summary


def teacher_signals(cfg: Config, ablation: AblationDir) -> dict[str, Any]:
    """Per teacher (the run's, then each ssb arm's with a bootstrap of its own: a teacher context
    or a variant of the hint), its teacher-signal diagnostic (`ssb diagnose`, written when its
    targets were made), keyed by arm, with the context and hint style it was prompted with;
    None where none was written."""
    teachers = {"ssb": (cfg, ablation.run.teacher_signal_path)}
    for arm in ablation_arms(cfg):
        if has_own_data(cfg, arm):
            path = ablation.arm_data(arm.name).teacher_signal_path
            teachers[arm.name] = (arm_base_config(cfg, arm), path)
    out: dict[str, Any] = {}
    for name, (arm_cfg, path) in teachers.items():
        signal = json.loads(path.read_text()) if path.exists() else None
        if signal is not None:
            signal["hint_style"] = arm_cfg.bootstrap.hint_style
        out[name] = signal
    return out
