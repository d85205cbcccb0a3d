"""`ssb run`: every stage in order, each resumed where it stopped.

Rollout, bootstrap, targets and eval skip the records they already have (cheap when a stage is
complete); train is skipped once complete. With `bootstrap.target_pairs` set and no
`data.max_problems` cap (the paper's "scan GSM8K train in order until 256 pairs are kept"),
rollout and bootstrap alternate over growing blocks of problems until enough pairs are kept.

Iterated SSB (`rounds: N`): round 1 is the run directory itself; round r >= 2 lives in
`<run>/round<r>/`, a run directory of its own (so each stage of it can also be run by hand) whose
config puts round r-1's adapter on the base (`model.adapter`: frozen and unmerged for rollouts,
the hinted teacher and its targets; trained further by the student, so the LoRA budget stays the
same) and skips the problems earlier rounds scanned (`data.skip_problems`). One evaluation at the
end compares base, every round's student and, with `grpo.enabled`, the GRPO baseline.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ssb.config import Config
from ssb.funnel import funnel
from ssb.problems import load_train_problems
from ssb.report import write_report
from ssb.rundir import RunDir
from ssb.stages.bootstrap import run_bootstrap
from ssb.stages.common import log
from ssb.stages.diagnose import run_targets_and_diagnose
from ssb.stages.evaluate import run_eval
from ssb.stages.grpo import run_grpo
from ssb.stages.rollout import run_rollout
from ssb.stages.train import run_train
from ssb.trackers import check_report_to, report_eval


def run_and_record(rundir: RunDir, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one stage `fn` as `name` in the manifest (status, wall time, its summary)."""
    start = time.time()
    with rundir.stage(name) as summary:
        summary.update(fn())
    log.info("%s: done in %.1f s", name, time.time() - start)
    return summary


def generate_pairs(cfg: Config, rundir: RunDir, progress: bool = True) -> dict[str, Any]:
    """Rollout + bootstrap; scans problems block by block when a pair target is set. Records
    how many training problems were scanned (`problems_scanned` in the manifest)."""

    problems = load_train_problems(cfg)
    if not problems:
        raise ValueError(
            f"{cfg.data.train}: no training problems left after skipping the first "
            f"{cfg.data.skip_problems} (data.skip_problems; iterated rounds use fresh problems)"
        )
    target = cfg.bootstrap.target_pairs
    if target is None or cfg.data.max_problems is not None:
        out = {
            "rollout": run_and_record(
                rundir, "rollout", lambda: run_rollout(cfg, rundir, problems, progress)
            )
        }
        out["bootstrap"] = run_and_record(
            rundir, "bootstrap", lambda: run_bootstrap(cfg, rundir, progress)
        )
        rundir.update_manifest(problems_scanned=len(problems))
        return out
    block = max(64, target)
    scanned = 0
    out: dict[str, Any] = {}
    while scanned < len(problems):
        scanned = min(len(problems), scanned + block)
        head = problems[:scanned]
        out["rollout"] = run_and_record(
            rundir, "rollout", lambda head=head: run_rollout(cfg, rundir, head, progress)
        )
        out["bootstrap"] = run_and_record(
            rundir, "bootstrap", lambda: run_bootstrap(cfg, rundir, progress)
        )
        kept = funnel(rundir)["kept"]
        log.info("scanned %d/%d problems, %d/%d pairs kept", scanned, len(problems), kept, target)
        if kept >= target:
            break
    rundir.update_manifest(problems_scanned=scanned)
    return out


def round_config(cfg: Config, rundir: RunDir, round_index: int) -> Config:
    """Round r's config: round r-1's adapter on the base, and the training problems after those
    rounds 1 .. r-1 scanned. Needs those rounds finished."""
    if round_index == 1:
        return cfg
    skip = cfg.data.skip_problems
    for earlier in range(1, round_index):
        scanned = rundir.round(earlier).read_manifest().get("problems_scanned")
        if scanned is None:
            raise ValueError(f"round {earlier} has not finished generating pairs")
        skip += int(scanned)
    previous = rundir.round(round_index - 1)
    lr = cfg.train.learning_rate if cfg.round_learning_rate is None else cfg.round_learning_rate
    return dataclasses.replace(
        cfg,
        name=f"{cfg.name}-round{round_index}",
        rounds=1,
        model=dataclasses.replace(cfg.model, adapter=str(previous.adapter_dir.resolve())),
        data=dataclasses.replace(cfg.data, skip_problems=skip),
        train=dataclasses.replace(cfg.train, learning_rate=lr),
        grpo=dataclasses.replace(cfg.grpo, enabled=False),
    )


def train_round(cfg: Config, rundir: RunDir, progress: bool = True) -> dict[str, Any]:
    """Pairs, teacher targets and the trained student of one round (each step resumable)."""

    out = generate_pairs(cfg, rundir, progress)
    if cfg.model.adapter is not None and funnel(rundir)["kept"] == 0:
        # A later round with nothing to learn from (round 1 fails in train, saying so).
        return {**out, "stopped": "no pairs kept"}
    out["targets"] = run_and_record(
        rundir, "targets", lambda: run_targets_and_diagnose(cfg, rundir, progress)
    )
    if rundir.is_complete("train") and rundir.adapter_dir.exists():
        log.info("train: already complete, adapter in %s", rundir.adapter_dir)
    else:
        out["train"] = run_and_record(rundir, "train", lambda: run_train(cfg, rundir, progress))
    return out


def run_eval_stage(cfg: Config, rundir: RunDir, progress: bool = True) -> dict[str, Any]:
    """`ssb eval`: every model on every benchmark, then the accuracies to the trackers that
    `train.report_to` names, in the run training wrote to (ssb.trackers.report_eval)."""

    summary = run_eval(cfg, rundir, progress=progress)
    trackers = report_eval(cfg, rundir.path)
    if trackers:
        summary["trackers"] = trackers
    return summary


def run_pipeline(
    cfg: Config,
    rundir: RunDir,
    progress: bool = True,
    report_writer: Callable[[RunDir, Config], Path] = write_report,
) -> dict[str, Any]:
    """Every stage of `ssb run`, then the report; `report_writer` writes report.md (the command
    passes one that adds the ablation's section, a feature above the stages)."""

    check_report_to(cfg.train.report_to)  # now, not after hours of rollouts
    out = train_round(cfg, rundir, progress)
    for r in range(2, cfg.rounds + 1):
        sub = rundir.round(r)
        sub_cfg = round_config(cfg, rundir, r)
        log.info(
            "round %d/%d in %s (model: base + %s)", r, cfg.rounds, sub.path, sub_cfg.model.adapter
        )
        sub.init(sub_cfg, "run")
        out[f"round{r}"] = train_round(sub_cfg, sub, progress)
        if out[f"round{r}"].get("stopped"):
            log.warning("round %d kept no pairs: stopping after round %d", r, r - 1)
            break
    if cfg.grpo.enabled:
        if rundir.is_complete("grpo"):
            log.info("grpo: already complete")
        else:
            out["grpo"] = run_and_record(rundir, "grpo", lambda: run_grpo(cfg, rundir, progress))
    out["eval"] = run_and_record(rundir, "eval", lambda: run_eval_stage(cfg, rundir, progress))
    out["report"] = run_and_record(
        rundir, "report", lambda: {"report": str(report_writer(rundir, cfg))}
    )
    return out
