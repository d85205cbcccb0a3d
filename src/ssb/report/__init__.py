"""The run report: `report.md` and PNG plots under `plots/`, built only from the run's files.

Sources (each optional; a missing one drops its section, never fails the report):

- config.yaml (or the `cfg` passed in): run name, model, config highlights;
- manifest.json: per-stage status and wall time, package versions, the bootstrap funnel when its
  jsonl files are gone;
- rollouts.jsonl, bootstrap.jsonl, pairs.jsonl: the pipeline funnel (problems -> mixed -> kept);
- diagnostics/teacher_signal.json (`ssb diagnose`): the hinted teacher vs the untrained student;
- train_log.jsonl: training dynamics (loss and its parts, gradient norm, reply length, learning
  rate against step);
- eval/summary.json (written by `ssb.stages.eval_summary`): accuracy with 95% intervals, the
  reference-harness accuracy, truncation, and the paired comparisons with base.

Plots are drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend
switch). Every file is written atomically.

Layout: `data` reads the run, `plots` draws, `sections` writes markdown, `formatting` formats
numbers and tables; `write_report` here puts them together.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ssb.config import Config, lookup
from ssb.report.data import funnel_counts, load_config, read_json, training_series
from ssb.report.formatting import fmt_num, pct, pct_interval, table
from ssb.report.plots import plot_accuracy, plot_funnel, plot_training
from ssb.report.sections import (
    HIGHLIGHTS,
    applies,
    config_has,
    eval_section,
    funnel_section,
    resolved_lines,
    rounds_section,
    stages_section,
    teacher_signal_section,
    training_section,
)
from ssb.rundir import RunDir, atomic_write_text, read_jsonl

__all__ = ["funnel_counts", "pct", "pct_interval", "training_series", "write_report"]


def write_report(
    rundir: RunDir | str | Path, cfg: Config | None = None, sections: Sequence[str] = ()
) -> Path:
    """Write report.md and plots/*.png for the run; returns the path of report.md.

    `sections`: markdown lines that a feature above the report adds (the ablation's), placed
    before the stage table."""
    if not isinstance(rundir, RunDir):
        rundir = RunDir(rundir)
    config = load_config(rundir, cfg)
    manifest = rundir.read_manifest()
    summary = read_json(rundir.eval_summary_path)
    funnel = funnel_counts(rundir)
    train_log = read_jsonl(rundir.train_log_path)
    series = training_series(train_log)

    plots_dir = rundir.plots_dir
    made: dict[str, bool] = {
        "training.png": plot_training(series, plots_dir / "training.png"),
        "accuracy.png": plot_accuracy(summary, plots_dir / "accuracy.png"),
        "funnel.png": bool(funnel) and plot_funnel(funnel, plots_dir / "funnel.png"),
    }
    for name, ok in made.items():  # a plot from an earlier report whose data is gone
        if not ok and (plots_dir / name).exists():
            (plots_dir / name).unlink()

    name = config.get("name") or manifest.get("name") or rundir.path.name
    lines = [f"# ssb run report: {name}", ""]
    lines.append(f"Run directory: `{rundir.path}`")
    model = lookup(config, "model.name")
    if model is not None:
        dtype = lookup(config, "model.dtype")
        lines.append(f"Model: `{model}`" + (f" (dtype {dtype})" if dtype else ""))
    if manifest.get("model") is not None:
        lines.append(f"Model record: `{json.dumps(manifest['model'], sort_keys=True)}`")
    lines += resolved_lines(manifest)
    if manifest.get("config_hash"):
        lines.append(f"Config hash: `{manifest['config_hash']}`")
    lines.append("")

    if config:
        rows = [
            [label, fmt_num(lookup(config, key))]
            for key, label in HIGHLIGHTS
            if config_has(config, key) and applies(config, key)
        ]
        if rows:
            lines += ["## Configuration highlights", ""]
            lines += table(["setting", "value"], rows) + [""]

    lines += funnel_section(funnel, made["funnel.png"])
    lines += teacher_signal_section(read_json(rundir.teacher_signal_path))
    lines += training_section(train_log, series, made["training.png"])
    lines += eval_section(summary, made["accuracy.png"])
    lines += rounds_section(rundir, summary)
    lines += sections
    lines += stages_section(manifest)
    packages = manifest.get("packages") or {}
    if packages:
        lines += ["## Package versions", ""]
        lines += table(
            ["package", "version"], [[k, v or "not installed"] for k, v in packages.items()]
        )
        lines.append("")
    plots = [n for n, ok in made.items() if ok]
    if plots:
        lines += ["## Plots", ""] + [f"- [plots/{n}](plots/{n})" for n in plots] + [""]

    atomic_write_text(rundir.report_path, "\n".join(lines).rstrip() + "\n")
    return rundir.report_path
