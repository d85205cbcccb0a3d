"""The run report: `report.md` and PNG plots under `plots/`, built only from the run's files.

Sources (each optional; a missing one drops its section, never fails the report):

- config.yaml (or the `cfg` passed in): run name, model, config highlights;
- manifest.json: per-stage status and wall time, package versions, the bootstrap funnel when its
  jsonl files are gone;
- rollouts.jsonl, bootstrap.jsonl, pairs.jsonl: the pipeline funnel (problems -> mixed -> kept);
- train_log.jsonl: training dynamics (loss and its parts, gradient norm, reply length, learning
  rate against step);
- eval/summary.json (written by `ssb.stages.evaluate`): accuracy with 95% intervals, the
  reference-harness accuracy, truncation, and the paired comparisons with base.

Plots are drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend
switch). Every file is written atomically.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import yaml

from ssb.config import Config, lookup, to_dict
from ssb.funnel import MIXED_STATUSES, REJECT_REASONS, funnel
from ssb.rundir import RunDir, atomic_write_bytes, atomic_write_text, read_jsonl

# Training-log keys, first present wins (the trainer's own names, TRL's, and aliases).
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

HIGHLIGHTS = (
    ("seed", "seed"),
    ("data.train", "training problems"),
    ("data.max_problems", "max training problems"),
    ("prompt.format", "prompt format"),
    ("generation.max_new_tokens", "max new tokens"),
    ("rollout.num_samples", "rollouts per problem (K)"),
    ("rollout.temperature", "rollout temperature"),
    ("bootstrap.teacher_context", "teacher context"),
    ("bootstrap.temperature", "teacher temperature"),
    ("bootstrap.target_pairs", "target pairs"),
    ("targets.mode", "teacher targets"),
    ("targets.topk", "top-k"),
    ("train.lora.r", "LoRA r"),
    ("train.lora.alpha", "LoRA alpha"),
    ("train.loss.divergence", "divergence"),
    ("train.loss.temperature", "distillation temperature"),
    ("train.learning_rate", "learning rate"),
    ("train.epochs", "epochs"),
    ("train.batch_size", "batch size"),
    ("eval.benchmarks", "eval benchmarks"),
    ("eval.num_samples", "eval samples per problem"),
    ("eval.scoring", "eval scoring"),
)


# --------------------------------------------------------------------------- formatting


def pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def pct_interval(interval: list[float] | tuple[float, float] | None) -> str:
    if not interval:
        return ""
    return f"[{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def pp(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f} pp"


def fmt_p(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.3g}"


def fmt_num(x: Any) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, list):
        return ", ".join(str(v) for v in x)
    return str(x)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return out


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


# --------------------------------------------------------------------------- data


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
        step = next((r[k] for k in STEP_KEYS if _is_number(r.get(k))), i + 1)
        for name, key in wanted.items():
            value = r.get(key)
            if _is_number(value):
                xs, ys = series.setdefault(name, ([], []))
                xs.append(float(step))
                ys.append(float(value))
    return series


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# --------------------------------------------------------------------------- plots


def _save(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    atomic_write_bytes(path, buf.getvalue())


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_training(series: dict[str, tuple[list[float], list[float]]], path: Path) -> bool:
    panels = []
    losses = [k for k in LOSS_KEYS if k in series]
    if losses:
        panels.append(("loss", losses))
    for name, title in (("grad_norm", "gradient norm"), ("reply_length", "mean reply length")):
        if name in series:
            panels.append((title, [name]))
    if "learning_rate" in series:
        panels.append(("learning rate", ["learning_rate"]))
    if not panels:
        return False
    ncols = min(2, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = _figure(4.6 * ncols, 3.2 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    for ax, (title, names) in zip(axes, panels):
        for name in names:
            xs, ys = series[name]
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(names) > 1:
            ax.legend(fontsize=8)
    _save(fig, path)
    return True


def plot_accuracy(summary: dict[str, Any], path: Path) -> bool:
    results = summary.get("results") or {}
    models = [m for m in results if any(r.get("accuracy") is not None for r in results[m].values())]
    benches = []
    for m in models:
        benches += [b for b in results[m] if b not in benches]
    if not models or not benches:
        return False
    fig = _figure(max(4.5, 1.6 + 1.3 * len(benches) * max(1, len(models)) / 2), 3.6)
    ax = fig.subplots()
    width = 0.8 / len(models)
    for j, m in enumerate(models):
        xs, ys, lo, hi, ref_x, ref_y = [], [], [], [], [], []
        for i, b in enumerate(benches):
            r = results[m].get(b)
            if not r or r.get("accuracy") is None:
                continue
            x = i - 0.4 + width * (j + 0.5)
            acc = 100 * r["accuracy"]
            interval = r.get("interval") or [r["accuracy"], r["accuracy"]]
            xs.append(x)
            ys.append(acc)
            lo.append(max(0.0, acc - 100 * interval[0]))
            hi.append(max(0.0, 100 * interval[1] - acc))
            if r.get("accuracy_reference") is not None:
                ref_x.append(x)
                ref_y.append(100 * r["accuracy_reference"])
        ax.bar(xs, ys, width * 0.92, yerr=[lo, hi], capsize=3, label=m)
        if ref_x:
            ax.scatter(
                ref_x,
                ref_y,
                marker="x",
                color="black",
                zorder=3,
                label="reference harness" if j == 0 else None,
            )
    ax.set_xticks(range(len(benches)), benches)
    metric = lookup(summary, "settings.metric") or "accuracy"
    scoring = lookup(summary, "settings.scoring") or ""
    ax.set_ylabel(f"{metric} (%), 95% interval")
    ax.set_title(f"accuracy by benchmark ({scoring})" if scoring else "accuracy by benchmark")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def plot_funnel(funnel: dict[str, Any], path: Path) -> bool:
    stages = [
        ("problems", funnel.get("problems")),
        ("mixed", funnel.get("mixed")),
        ("kept", funnel.get("kept")),
    ]
    stages = [(k, v) for k, v in stages if v is not None]
    if not stages:
        return False
    reasons = [(REJECT_REASONS[k], funnel["rejected"].get(k, 0)) for k in REJECT_REASONS]
    fig = _figure(9.5, 3.2)
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[1, 1.4])
    labels = [k for k, _ in stages][::-1]
    values = [v for _, v in stages][::-1]
    ax1.barh(labels, values, color=["#2a9d8f", "#e9c46a", "#264653"][-len(values) :])
    for y, v in enumerate(values):
        ax1.text(v, y, f" {v}", va="center")
    ax1.set_title("pipeline funnel")
    ax1.set_xlabel("problems")
    ax1.set_xlim(0, max(values + [1]) * 1.2)
    ax2.barh([r for r, _ in reasons][::-1], [c for _, c in reasons][::-1], color="#e76f51")
    for y, (_, c) in enumerate(reasons[::-1]):
        ax2.text(c, y, f" {c}", va="center")
    ax2.set_title("why problems were dropped")
    ax2.set_xlim(0, max([c for _, c in reasons] + [1]) * 1.2)
    _save(fig, path)
    return True


# --------------------------------------------------------------------------- the report


def _load_config(rundir: RunDir, cfg: Config | None) -> dict[str, Any]:
    if cfg is not None:
        return to_dict(cfg)
    if rundir.config_path.exists():
        try:
            data = yaml.safe_load(rundir.config_path.read_text())
        except yaml.YAMLError:
            return {}
        return data if isinstance(data, dict) else {}
    return {}


def write_report(rundir: RunDir | str | Path, cfg: Config | None = None) -> Path:
    """Write report.md and plots/*.png for the run; returns the path of report.md."""
    if not isinstance(rundir, RunDir):
        rundir = RunDir(rundir)
    config = _load_config(rundir, cfg)
    manifest = rundir.read_manifest()
    summary = _read_json(rundir.eval_summary_path)
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
    if manifest.get("config_hash"):
        lines.append(f"Config hash: `{manifest['config_hash']}`")
    lines.append("")

    if config:
        rows = [
            [label, fmt_num(lookup(config, key))] for key, label in HIGHLIGHTS if _has(config, key)
        ]
        if rows:
            lines += ["## Configuration highlights", ""]
            lines += _table(["setting", "value"], rows) + [""]

    lines += _funnel_section(funnel, made["funnel.png"])
    lines += _training_section(train_log, series, made["training.png"])
    lines += _eval_section(summary, made["accuracy.png"])
    lines += _rounds_section(rundir, summary)
    from ssb.ablation.report import ablation_section

    lines += ablation_section(rundir)
    lines += _stages_section(manifest)
    packages = manifest.get("packages") or {}
    if packages:
        lines += ["## Package versions", ""]
        lines += _table(
            ["package", "version"], [[k, v or "not installed"] for k, v in packages.items()]
        )
        lines.append("")
    plots = [n for n, ok in made.items() if ok]
    if plots:
        lines += ["## Plots", ""] + [f"- [plots/{n}](plots/{n})" for n in plots] + [""]

    atomic_write_text(rundir.report_path, "\n".join(lines).rstrip() + "\n")
    return rundir.report_path


def _has(config: dict[str, Any], dotted: str) -> bool:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _funnel_section(funnel: dict[str, Any] | None, plot: bool) -> list[str]:
    if not funnel:
        return []
    lines = ["## Pipeline funnel", "", f"Counted from `{funnel['source']}`.", ""]
    rows = []
    if funnel.get("problems") is not None:
        rows.append(["problems rolled out", fmt_num(funnel["problems"])])
    if funnel.get("decided") is not None:
        rows.append(["decided by bootstrap", fmt_num(funnel["decided"])])
    for key in (k for k in REJECT_REASONS if k not in MIXED_STATUSES):
        rows.append([f"- {REJECT_REASONS[key]}", fmt_num(funnel["rejected"].get(key, 0))])
    rows.append(["mixed (sent to the hinted teacher)", fmt_num(funnel.get("mixed"))])
    for key in (k for k in REJECT_REASONS if k in MIXED_STATUSES):
        rows.append([f"- {REJECT_REASONS[key]}", fmt_num(funnel["rejected"].get(key, 0))])
    rows.append(["kept pairs", fmt_num(funnel.get("kept"))])
    problems, decided = funnel.get("problems"), funnel.get("decided")
    if isinstance(problems, int) and isinstance(decided, int) and problems > decided:
        rows.append(["not decided (pair target reached)", fmt_num(problems - decided)])
    lines += _table(["step", "problems"], rows) + [""]
    if plot:
        lines += ["![pipeline funnel](plots/funnel.png)", ""]
    return lines


def _training_section(
    records: list[dict[str, Any]],
    series: dict[str, tuple[list[float], list[float]]],
    plot: bool,
) -> list[str]:
    if not series:
        return []
    lines = ["## Training", "", f"{len(records)} records in `train_log.jsonl`.", ""]
    rows = []
    for name in (*LOSS_KEYS, "grad_norm", "reply_length", "learning_rate"):
        if name not in series:
            continue
        xs, ys = series[name]
        rows.append(
            [
                name,
                fmt_num(len(ys)),
                fmt_num(xs[-1]),
                fmt_num(ys[0]),
                fmt_num(ys[-1]),
                fmt_num(min(ys)),
                fmt_num(max(ys)),
            ]
        )
    lines += _table(["quantity", "points", "last step", "first", "last", "min", "max"], rows)
    lines.append("")
    if plot:
        lines += ["![training dynamics](plots/training.png)", ""]
    return lines


def _eval_section(summary: dict[str, Any], plot: bool) -> list[str]:
    results = summary.get("results") or {}
    if not results:
        return []
    settings = summary.get("settings") or {}
    metric = settings.get("metric", "accuracy")
    scoring = settings.get("scoring", "")
    lines = ["## Evaluation", ""]
    desc = [f"metric {metric}", f"scoring {scoring}"]
    if settings.get("max_new_tokens") is not None:
        desc.append(f"max {settings['max_new_tokens']} new tokens")
    if settings.get("greedy") is False:
        desc.append(f"temperature {settings.get('temperature')}, top-p {settings.get('top_p')}")
    lines += ["From `eval/summary.json`: " + ", ".join(desc) + ".", ""]
    rows = []
    for model, benches in results.items():
        for bench, r in benches.items():
            rows.append(
                [
                    model,
                    bench,
                    fmt_num(r.get("n")),
                    f"{pct(r.get('accuracy'))} {pct_interval(r.get('interval'))}".strip(),
                    pct(r.get("accuracy_math_verify")),
                    pct(r.get("accuracy_reference")),
                    pct(r.get("truncation_rate")),
                    "n/a"
                    if r.get("mean_output_tokens") is None
                    else f"{r['mean_output_tokens']:.1f}",
                ]
            )
    header = [
        "model",
        "benchmark",
        "n",
        f"{metric} [95% interval]",
        "math-verify",
        "reference harness",
        "truncated",
        "mean output tokens",
    ]
    lines += _table(header, rows) + [""]
    comparisons = summary.get("comparisons") or {}
    crows = []
    for model, benches in comparisons.items():
        for bench, c in benches.items():
            label = f"{model} vs {c.get('vs', 'base')}"
            crows.append([*_paired_cells(label, bench, c), pp(lookup(c, "reference.diff"))])
    if crows:
        lines += [
            "### Paired comparison with base (same problems)",
            "",
            "Wins: problems the model scores higher on than base; p: exact McNemar test on the "
            "discordant problems (a sign test for avg@k); difference interval: paired bootstrap "
            "over problems.",
            "",
        ]
        header = [
            "comparison",
            "benchmark",
            "n",
            "wins",
            "losses",
            "ties",
            "difference [95% interval]",
            "p",
            "difference (reference harness)",
        ]
        lines += _table(header, crows) + [""]
    hrows = [
        _paired_cells(f"{h['model']} vs {h['vs']}", h["benchmark"], h)
        for h in summary.get("head_to_head") or []
    ]
    if hrows:
        lines += [
            "### Head to head (same problems)",
            "",
            "SSB's student against the GRPO baseline, and each iterated round against the one "
            "before; same statistics as above.",
            "",
        ]
        header = ["comparison", "benchmark", "n", "wins", "losses", "ties", "difference", "p"]
        lines += _table(header, hrows) + [""]
    if plot:
        lines += ["![accuracy by benchmark](plots/accuracy.png)", ""]
    return lines


def _paired_cells(label: str, bench: str, c: dict[str, Any]) -> list[str]:
    """A paired comparison's table cells: label, benchmark, n, wins, losses, ties, difference
    [95% interval], p."""
    return [
        label,
        bench,
        fmt_num(c.get("n")),
        fmt_num(c.get("wins")),
        fmt_num(c.get("losses")),
        fmt_num(c.get("ties")),
        f"{pp(c.get('diff'))} {_pp_interval(c.get('diff_interval'))}".strip(),
        fmt_p(c.get("mcnemar_p")),
    ]


def _rounds_section(rundir: RunDir, summary: dict[str, Any]) -> list[str]:
    """Iterated SSB: per round, the problems it scanned, its pair yield, its training loss and
    its student's accuracy (from the run's evaluation)."""

    rounds = []
    r = 1
    while r == 1 or rundir.round(r).path.is_dir():
        rounds.append((r, rundir.round(r)))
        r += 1
    if len(rounds) < 2:
        return []
    results = summary.get("results") or {}
    benches = sorted({b for m in results.values() for b in m})
    lines = [
        "## Iterated rounds",
        "",
        "Round r+1 samples, teaches and scores with round r's student (base + its adapter, "
        "unmerged) on training problems no earlier round saw, and continues training that "
        "adapter. Yield: pairs kept per problem scanned.",
        "",
    ]
    rows = []
    for r, sub in rounds:
        funnel = funnel_counts(sub) or {}
        scanned = sub.read_manifest().get("problems_scanned")
        kept = funnel.get("kept")
        losses = [x["loss"] for x in read_jsonl(sub.train_log_path) if _is_number(x.get("loss"))]
        row = [
            str(r),
            f"`{sub.path.name}`" if r > 1 else "`.`",
            fmt_num(scanned),
            fmt_num(funnel.get("mixed")),
            fmt_num(kept),
            pct(kept / scanned) if scanned and kept is not None else "n/a",
            f"{losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "n/a",
        ]
        model = RunDir.round_model_name(r)
        for bench in benches:
            acc = (results.get(model) or {}).get(bench, {}).get("accuracy")
            row.append(pct(acc) if acc is not None else "not evaluated")
        rows.append(row)
    header = ["round", "directory", "problems", "mixed", "pairs", "yield", "KD loss"]
    header += [f"{b} accuracy" for b in benches]
    base = [
        "base",
        "",
        "",
        "",
        "",
        "",
        "",
        *[pct((results.get("base") or {}).get(b, {}).get("accuracy")) for b in benches],
    ]
    return lines + _table(header, [base, *rows]) + [""]


def _pp_interval(interval: list[float] | None) -> str:
    if not interval:
        return ""
    return f"[{100 * interval[0]:+.1f}, {100 * interval[1]:+.1f}]"


def _stages_section(manifest: dict[str, Any]) -> list[str]:
    stages = manifest.get("stages") or {}
    if not stages:
        return []
    rows = []
    total = 0.0
    for name, info in stages.items():
        if name == "report" and isinstance(info, dict) and info.get("status") == "running":
            continue  # this very report, being written
        seconds = info.get("seconds") if isinstance(info, dict) else None
        if _is_number(seconds):
            total += seconds
        rows.append(
            [
                name,
                str(info.get("status", "")) if isinstance(info, dict) else "",
                "n/a" if not _is_number(seconds) else f"{seconds:.1f}",
                fmt_num(info.get("tokens_per_second")) if isinstance(info, dict) else "",
            ]
        )
    rows.append(["total", "", f"{total:.1f}", ""])
    lines = ["## Stages", ""]
    lines += _table(["stage", "status", "wall time (s)", "generation tokens/s"], rows) + [""]
    return lines
