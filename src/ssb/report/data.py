"""What the report reads from a run directory: the funnel counts, the training series, the
config; every reader tolerates a missing or damaged file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from ssb.config import Config, lookup, to_dict
from ssb.funnel import REJECT_REASONS, funnel
from ssb.rundir import RunDir, read_jsonl

STEP_KEYS = ("step", "global_step")


LENGTH_KEYS = (
    "mean_completion_length",
    "reply_len",
    "mean_reply_len",
    "reply_tokens",
    "completion_length",
    "completions/mean_length",
)


LOSS_KEYS = ("loss", "kd", "ce")


GRAD_KEYS = ("grad_norm",)


LR_KEYS = ("learning_rate",)


def read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def load_config(rundir: RunDir, cfg: Config | None) -> dict[str, Any]:
    if cfg is not None:
        return to_dict(cfg)
    if rundir.config_path.exists():
        try:
            data = yaml.safe_load(rundir.config_path.read_text())
        except yaml.YAMLError:
            return {}
        return data if isinstance(data, dict) else {}
    return {}


def funnel_counts(rundir: RunDir) -> dict[str, Any] | None:
    """problems -> decided -> mixed -> kept, with each rejection reason.

    From rollouts.jsonl / bootstrap.jsonl / pairs.jsonl when bootstrap.jsonl exists, else from
    manifest.json stages.bootstrap (the stage's own summary); None when neither exists."""
    if read_jsonl(rundir.bootstrap_log_path):
        counts = funnel(rundir)
        if not counts["problems"]:  # rollouts.jsonl removed: the rollout stage's summary
            counts["problems"] = lookup(rundir.read_manifest(), "stages.rollout.problems")
        return {"source": "bootstrap.jsonl", **counts}
    stage = lookup(rundir.read_manifest(), "stages.bootstrap")
    if isinstance(stage, dict) and "kept" in stage:
        rejected = stage.get("rejected") or {}
        return {
            "source": "manifest.json",
            "problems": stage.get("problems"),
            "decided": stage.get("decided"),
            "mixed": stage.get("mixed"),
            "kept": stage.get("kept"),
            "rejected": {reason: rejected.get(reason, 0) for reason in REJECT_REASONS},
        }
    return None


def training_series(records: list[dict[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """name -> (steps, values) for each plotted quantity present in the training log."""
    wanted = {k: k for k in (*LOSS_KEYS, *GRAD_KEYS, *LR_KEYS)}
    length_key = next((k for k in LENGTH_KEYS if any(k in r for r in records)), None)
    if length_key is not None:
        wanted["reply_length"] = length_key
    series: dict[str, tuple[list[float], list[float]]] = {}
    for i, r in enumerate(records):
        step = next((r[k] for k in STEP_KEYS if is_number(r.get(k))), i + 1)
        for name, key in wanted.items():
            value = r.get(key)
            if is_number(value):
                xs, ys = series.setdefault(name, ([], []))
                xs.append(float(step))
                ys.append(float(value))
    return series


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
