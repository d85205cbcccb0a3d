"""`ssb ablate`'s hyperparameter search on a validation split, before the seeds train.

The split (`ablate.validation_problems`) is the next problems of the training source after the
`data.max_problems` the run may scan: never trained on, and disjoint from the test set
(`eval.benchmarks`, evaluated once, at the end). Each arm with more than one grid point
(`ssb.ablation.arms.grid_points`) trains one seed (`cfg.seed`) per point into
`ablate/select/<arm>/<point>/seed<k>/`; one greedy evaluation of every point on the split
follows (`ablate/select/eval/`), and each arm's best point (the first in grid order on a tie)
is the one its seeds train with. Every score and choice goes to `ablate/selection.json`.
Resumable like the ablation: a finished point is never retrained, evaluated records are kept.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ssb.ablation.arms import Arm, arm_config, grid_points, point_tag, train_or_reuse
from ssb.config import Config
from ssb.problems import load_train_problems
from ssb.rundir import AblationDir, RunDir, atomic_write_json, atomic_write_text
from ssb.stages.common import log
from ssb.stages.evaluate import run_eval


def validation_problems(cfg: Config) -> list[Any]:
    """The validation split: the first `ablate.validation_problems` problems of the training
    source, in file order after the first data.skip_problems + data.max_problems, that the run
    does not train on (with data.shuffle the training problems come from anywhere)."""
    data, n = cfg.data, cfg.ablate.validation_problems
    start = data.skip_problems + int(data.max_problems or 0)
    in_order = dataclasses.replace(data, shuffle=False, skip_problems=0, max_problems=None)
    pool = load_train_problems(dataclasses.replace(cfg, data=in_order))[start:]
    training = {p.id for p in load_train_problems(cfg)}
    problems = [p for p in pool if p.id not in training][:n]
    if len(problems) < n:
        raise ValueError(
            f"ablate.validation_problems={n}: {data.train} has only {len(problems)} problems "
            f"after the first {start} (data.skip_problems + data.max_problems) that the run "
            "does not train on"
        )
    return problems


def write_validation_split(cfg: Config, ablation: AblationDir) -> str:
    """ablate/validation.jsonl (id, question, answer), written once; returns its path."""
    path = ablation.validation_path
    if not path.exists():
        lines = [
            json.dumps({"id": p.id, "question": p.question, "answer": p.answer}) + "\n"
            for p in validation_problems(cfg)
        ]
        atomic_write_text(path, "".join(lines))
    return str(path)


def validation_config(cfg: Config, split_path: str) -> Config:
    """Greedy pass@1 on the validation file, with math-verify, every problem of it."""
    data = dataclasses.replace(cfg.data, question_field="question", answer_field="answer")
    data = dataclasses.replace(data, id_field="id")
    evaluation = dataclasses.replace(
        cfg.eval, benchmarks=[split_path], max_problems=None, num_samples=1, scoring="math-verify"
    )
    return dataclasses.replace(cfg, data=data, eval=evaluation)


def select_hyperparameters(
    cfg: Config,
    rundir: RunDir,
    ablation: AblationDir,
    plans: list[tuple[Arm, RunDir]],
    steps: int,
    problems_decided: int | None,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Arm name -> {"chosen": point, "points": [{point, tag, model, accuracy}]}, for the arms
    of `plans` (arm, the run directory it trains from). Arms with a single point are not
    searched: their point is chosen as is."""
    selection = ablation.selection()
    chosen: dict[str, dict[str, Any]] = {}
    models: dict[str, str] = {}
    searched: dict[str, list[dict[str, Any]]] = {}
    for arm, source in plans:
        points = grid_points(cfg, arm)
        if len(points) == 1:
            chosen[arm.name] = {"chosen": points[0], "points": []}
            continue
        searched[arm.name] = []
        for point in points:
            tag = point_tag(point)
            arm_cfg = arm_config(cfg, arm, cfg.seed, problems_decided, point)
            armdir = selection.arm_dir(f"{arm.name}/{tag}", cfg.seed, source)
            armdir.path.mkdir(parents=True, exist_ok=True)
            log.info("ablate: validation grid, %s at %s", arm.name, tag)
            train_or_reuse(arm_cfg, arm, armdir, steps, progress)
            name = f"{arm.name}.{tag}"
            models[name] = str(armdir.adapter_dir.resolve())
            searched[arm.name].append({"point": point, "tag": tag, "model": name})
    if searched:
        split = write_validation_split(cfg, ablation)
        val_cfg = validation_config(cfg, split)
        selection.path.mkdir(parents=True, exist_ok=True)
        entries = ["base", *(f"{n}={p}" for n, p in models.items())]
        with selection.stage("eval"):
            run_eval(val_cfg, selection, models=entries, progress=progress)
        results = json.loads(selection.eval_summary_path.read_text())["results"]
        bench = val_cfg.eval.benchmarks[0]
        base_acc = (results.get("base") or {}).get(bench, {}).get("accuracy")
        for arm_name, points in searched.items():
            for p in points:
                p["accuracy"] = (results.get(p["model"]) or {}).get(bench, {}).get("accuracy")
            best = max(points, key=lambda p: -1.0 if p["accuracy"] is None else p["accuracy"])
            chosen[arm_name] = {"chosen": best["point"], "points": points, "base": base_acc}
    atomic_write_json(
        ablation.selection_path,
        {
            "validation_problems": cfg.ablate.validation_problems,
            "seed": cfg.seed,
            "steps": steps,
            "arms": chosen,
        },
    )
    return chosen
