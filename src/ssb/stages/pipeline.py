"""`ssb run`: every stage in order, each resumed where it stopped.

Rollout, bootstrap, targets and eval skip the records they already have (cheap when a stage is
complete); train is skipped once complete. With `bootstrap.target_pairs` set and no
`data.max_problems` cap (the paper's "scan GSM8K train in order until 256 pairs are kept"),
rollout and bootstrap alternate over growing blocks of problems until enough pairs are kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ssb.config import Config
from ssb.problems import load_train_problems
from ssb.rundir import RunDir
from ssb.stages.common import log

StageFn = Callable[[Config, RunDir], dict[str, Any]]


def _run(rundir: RunDir, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    start = time.time()
    with rundir.stage(name) as summary:
        summary.update(fn())
    log.info("%s: done in %.1f s", name, time.time() - start)
    return summary


def generate_pairs(cfg: Config, rundir: RunDir, progress: bool = True) -> dict[str, Any]:
    """Rollout + bootstrap; scans problems block by block when a pair target is set."""
    from ssb.stages.bootstrap import funnel, run_bootstrap
    from ssb.stages.rollout import run_rollout

    problems = load_train_problems(cfg)
    target = cfg.bootstrap.target_pairs
    if target is None or cfg.data.max_problems is not None:
        out = {
            "rollout": _run(rundir, "rollout", lambda: run_rollout(cfg, rundir, problems, progress))
        }
        out["bootstrap"] = _run(rundir, "bootstrap", lambda: run_bootstrap(cfg, rundir, progress))
        return out
    block = max(64, target)
    scanned = 0
    out: dict[str, Any] = {}
    while scanned < len(problems):
        scanned = min(len(problems), scanned + block)
        head = problems[:scanned]
        out["rollout"] = _run(
            rundir, "rollout", lambda head=head: run_rollout(cfg, rundir, head, progress)
        )
        out["bootstrap"] = _run(rundir, "bootstrap", lambda: run_bootstrap(cfg, rundir, progress))
        kept = funnel(rundir)["kept"]
        log.info("scanned %d/%d problems, %d/%d pairs kept", scanned, len(problems), kept, target)
        if kept >= target:
            break
    return out


def run_pipeline(cfg: Config, rundir: RunDir, progress: bool = True) -> dict[str, Any]:
    from ssb.report import write_report
    from ssb.stages.evaluate import run_eval
    from ssb.stages.targets import run_targets
    from ssb.stages.train import run_train

    out = generate_pairs(cfg, rundir, progress)
    out["targets"] = _run(rundir, "targets", lambda: run_targets(cfg, rundir, progress))
    if rundir.is_complete("train") and rundir.adapter_dir.exists():
        log.info("train: already complete, adapter in %s", rundir.adapter_dir)
    else:
        out["train"] = _run(rundir, "train", lambda: run_train(cfg, rundir, progress))
    out["eval"] = _run(rundir, "eval", lambda: run_eval(cfg, rundir, progress=progress))
    out["report"] = _run(rundir, "report", lambda: {"report": str(write_report(rundir, cfg))})
    return out
