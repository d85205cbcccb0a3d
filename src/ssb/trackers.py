"""Experiment trackers (`train.report_to`): training metrics and evaluation accuracies in one run.

Training metrics reach the trackers through transformers' own integrations (the Trainer's
`report_to`): every numeric key of a training-step log, so Trainer's loss, grad_norm and
learning_rate and SSBTrainer's kd, ce and reply_len, as `train/<key>` at the optimizer step.
Two things are added here:

* `attach_trackers` points TensorBoard at `<run>/tensorboard/` (one place per run directory,
  where resumed training appends; `TENSORBOARD_LOGGING_DIR` still wins) and records which tracker
  run a training wrote to in `<run>/trackers.json` (the wandb run id and project, the MLflow run id
  and tracking URI, the Trackio project and run name, the TensorBoard directory);
* `report_eval` adds every model x benchmark accuracy of `eval/summary.json`, with its 95%
  interval and problem count, to those same runs, at the last training step, as
  `eval/<benchmark>/<model>/{accuracy,accuracy_low,accuracy_high,n}`. A tracker that is not
  installed is skipped (training would have refused it already).

Tested for real with TensorBoard (tests/test_trackers.py reads the event files back). wandb,
MLflow and Trackio get the same dictionary through the same function; what only an account or a
server can show (the wandb run resumed by id on wandb.ai, a remote MLflow tracking server) is
listed in docs/trackers.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ssb.rundir import RunDir, atomic_write_json, read_jsonl

log = logging.getLogger("ssb")

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
TRACKERS_FILE = "trackers.json"
TENSORBOARD_DIR = "tensorboard"


def tensorboard_dir(run_path: Path) -> Path:
    """Where TensorBoard event files of the training in `run_path` go."""
    return Path(run_path) / TENSORBOARD_DIR


def is_installed(tracker: str) -> bool:
    """Whether transformers can report to `tracker` here (its package imports)."""
    from transformers.integrations import integration_utils as iu

    check = {
        "tensorboard": iu.is_tensorboard_available,
        "wandb": iu.is_wandb_available,
        "mlflow": iu.is_mlflow_available,
        "trackio": iu.is_trackio_available,
    }.get(tracker)
    return bool(check and check())


def enabled_trackers(report_to: list[str] | str | None) -> list[str]:
    """Our trackers named by `report_to` ("all": those installed; "none" or empty: none)."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if "none" in names:
        return []
    if "all" in names:
        return [t for t in TRACKERS if is_installed(t)]
    return [t for t in TRACKERS if t in names]


def check_report_to(report_to: list[str] | str | None) -> None:
    """Refuse, in one line, a tracker that is named but not installed (Trainer would raise a
    RuntimeError deep in its constructor)."""
    missing = [t for t in enabled_trackers(report_to) if not is_installed(t)]
    if missing:
        hint = " ".join(missing)  # each is its PyPI name
        raise ValueError(
            f"train.report_to names {', '.join(missing)}, which is not installed here "
            f"(pip install {hint})"
        )


def tracker_run_name(cfg: Any, run_path: Path, role: str = "train") -> str:
    """A run name unique to a run directory (Trackio resumes a run by its name)."""
    digest = hashlib.sha256(str(Path(run_path).resolve()).encode()).hexdigest()[:6]
    return f"{cfg.name}-{role}-{digest}"


def attach_trackers(trainer: Any, run_path: Path) -> None:
    """Send `trainer`'s TensorBoard events to `<run_path>/tensorboard/` and record the tracker
    runs it writes to in `<run_path>/trackers.json` (see the module docstring)."""
    if not enabled_trackers(trainer.args.report_to):
        return
    from transformers.integrations import TensorBoardCallback

    tb_dir = None
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):
            # It writes to `<output_dir>/runs/<date>_<host>` (a new directory on every resume)
            # unless TENSORBOARD_LOGGING_DIR, read in its constructor, set `logging_dir`.
            if callback.logging_dir is None:
                callback.logging_dir = str(tensorboard_dir(run_path))
            tb_dir = callback.logging_dir
    trainer.add_callback(TrackerRunCallback(Path(run_path), tb_dir))


class TrackerRunCallback(TrainerCallback):
    """Writes `trackers.json` once the integrations have started their runs (they do so in their
    own on_train_begin, which runs before ours: they are added first), and ends the wandb run
    when training ends, so that a later training in the same process (an iterated round, GRPO)
    starts a run of its own instead of writing into this one."""

    def __init__(self, run_path: Path, tensorboard_logdir: str | None):
        self.run_path = run_path
        self.tensorboard_logdir = tensorboard_logdir

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if not state.is_world_process_zero:
            return

        runs: dict[str, dict[str, Any]] = {}
        for tracker in enabled_trackers(args.report_to):
            if tracker == "tensorboard":
                runs[tracker] = {"log_dir": self.tensorboard_logdir}
            elif tracker == "wandb":
                import wandb

                run = wandb.run
                if run is not None:
                    runs[tracker] = {
                        "id": run.id,
                        "project": run.project,
                        "entity": run.entity,
                        "name": run.name,
                    }
            elif tracker == "mlflow":
                import mlflow

                active = mlflow.active_run()
                if active is not None:
                    runs[tracker] = {
                        "run_id": active.info.run_id,
                        "experiment_id": active.info.experiment_id,
                        "tracking_uri": mlflow.get_tracking_uri(),
                    }
            elif tracker == "trackio":
                runs[tracker] = {"project": args.project, "name": args.run_name}
        atomic_write_json(self.run_path / TRACKERS_FILE, runs)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.is_world_process_zero and "wandb" in enabled_trackers(args.report_to):
            import wandb

            if wandb.run is not None:
                wandb.finish()


# --------------------------------------------------------------------------- evaluation


def eval_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """`eval/<benchmark>/<model>/{accuracy,accuracy_low,accuracy_high,n}` from eval/summary.json
    (the headline scoring's accuracy and 95% interval; benchmarks by their file-name slug)."""
    metrics: dict[str, float] = {}
    slugs = {b: info.get("file_slug", b) for b, info in summary.get("benchmarks", {}).items()}
    for model, benches in summary.get("results", {}).items():
        for bench, result in benches.items():
            if result.get("accuracy") is None:
                continue
            key = f"eval/{slugs.get(bench, bench)}/{model}"
            low, high = result["interval"]
            metrics[f"{key}/accuracy"] = float(result["accuracy"])
            metrics[f"{key}/accuracy_low"] = float(low)
            metrics[f"{key}/accuracy_high"] = float(high)
            metrics[f"{key}/n"] = float(result["n"])
    return metrics


def last_train_step(run_path: Path) -> int:
    """The last logged optimizer step of the training in `run_path` (0 without one): evaluation
    points sit at the end of the training curves."""

    steps = [int(r.get("step", 0)) for r in read_jsonl(Path(run_path) / "train_log.jsonl")]
    return max(steps, default=0)


def report_eval(cfg: Any, run_path: Path) -> list[str]:
    """Log the accuracies of `<run_path>/eval/summary.json` to every tracker `train.report_to`
    names that is installed, into the run that training wrote to (trackers.json; a new run
    where there is none). Returns the trackers it logged to."""
    run_path = Path(run_path)
    trackers = enabled_trackers(cfg.train.report_to)
    summary_file = RunDir(run_path).eval_summary_path
    if not trackers or not summary_file.exists():
        return []
    metrics = eval_metrics(json.loads(summary_file.read_text()))
    if not metrics:
        return []
    recorded_file = run_path / TRACKERS_FILE
    recorded = json.loads(recorded_file.read_text()) if recorded_file.exists() else {}
    step = last_train_step(run_path)
    logged = []
    for tracker in trackers:
        if not is_installed(tracker):
            log.info("eval: %s is not installed; accuracies not sent to it", tracker)
            continue
        _EVAL_LOGGERS[tracker](metrics, step, recorded.get(tracker) or {}, cfg, run_path)
        logged.append(tracker)
    if logged:
        log.info("eval: %d accuracies sent to %s", len(metrics), ", ".join(logged))
    return logged


def _log_tensorboard(
    metrics: dict[str, float], step: int, run: dict[str, Any], cfg: Any, run_path: Path
) -> None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # transformers also reports to TensorBoard through tensorboardX
        from tensorboardX import SummaryWriter

    writer = SummaryWriter(log_dir=run.get("log_dir") or str(tensorboard_dir(run_path)))
    try:
        for key, value in metrics.items():
            writer.add_scalar(key, value, step)
    finally:
        writer.close()


def _log_wandb(
    metrics: dict[str, float], step: int, run: dict[str, Any], cfg: Any, run_path: Path
) -> None:
    import wandb

    active = wandb.init(
        id=run.get("id"),
        project=run.get("project") or os.environ.get("WANDB_PROJECT", "huggingface"),
        entity=run.get("entity") or None,
        name=run.get("name") or tracker_run_name(cfg, run_path),
        resume="allow",
    )
    try:
        # The Trainer's runs plot every key against train/global_step (define_metric).
        active.log({"train/global_step": step, **metrics})
        active.summary.update(metrics)
    finally:
        active.finish()


def _log_mlflow(
    metrics: dict[str, float], step: int, run: dict[str, Any], cfg: Any, run_path: Path
) -> None:
    import mlflow

    if run.get("tracking_uri"):
        mlflow.set_tracking_uri(run["tracking_uri"])
    run_id = run.get("run_id")
    name = None if run_id else tracker_run_name(cfg, run_path)
    with mlflow.start_run(run_id=run_id, run_name=name):
        mlflow.log_metrics(metrics, step=step)


def _log_trackio(
    metrics: dict[str, float], step: int, run: dict[str, Any], cfg: Any, run_path: Path
) -> None:
    import trackio

    trackio.init(
        project=run.get("project") or "huggingface",
        name=run.get("name") or tracker_run_name(cfg, run_path),
        resume="allow",
    )
    try:
        trackio.log(metrics, step=step)
    finally:
        trackio.finish()


_EVAL_LOGGERS: dict[str, Callable[..., None]] = {
    "tensorboard": _log_tensorboard,
    "wandb": _log_wandb,
    "mlflow": _log_mlflow,
    "trackio": _log_trackio,
}
