"""The ablation's report: `ablate/report.md`, `ablate/plots/training.png` (every arm's training
dynamics on one figure), and the same section inside the run's report.md (`write_run_report`).
Built only from `ablate/summary.json` and the arms' training logs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ssb.config import Config
from ssb.report import write_report
from ssb.report.data import training_series
from ssb.report.formatting import pct, pct_interval, table
from ssb.report.plots import panel_grid, save_png
from ssb.rundir import AblationDir, RunDir, atomic_write_text, read_jsonl
from ssb.stages.eval_setup import bench_slug

TRAINING_PLOT = "training.png"


def _fmt(template: str, x: float | None) -> str:
    return "n/a" if x is None else template.format(x)


def _diff(c: dict[str, Any] | None) -> str:
    if not c or c.get("diff") is None:
        return "n/a"
    lo, hi = c["diff_interval"]
    return (
        f"{100 * c['diff']:+.1f} pp [{100 * lo:+.1f}, {100 * hi:+.1f}], "
        f"{c['wins']}/{c['losses']}, p={c['mcnemar_p']:.3g}"
    )


def plot_training(ablation: AblationDir, summary: dict[str, Any]) -> Path | None:
    """One panel per arm: each seed's training loss against the optimizer step."""

    arms = [a for a, e in summary["arms"].items() if e.get("seeds")]
    if not arms:
        return None
    fig, axes = panel_grid(len(arms), 3, 4.2, 3.0)
    for ax, arm in zip(axes, arms):
        for seed in summary["arms"][arm]["seeds"]:
            arm_dir = ablation.arm_dir(arm, int(seed), ablation.run)
            series = training_series(read_jsonl(arm_dir.train_log_path)).get("loss")
            if series:
                ax.plot(*series, marker="o" if len(series[0]) < 30 else None, ms=2, label=seed)
        kind = summary["arms"][arm]["kind"]
        ax.set_title(arm if kind == arm else f"{arm} ({kind})")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        ax.legend(title="seed", fontsize=7)
    path = ablation.plots_dir / TRAINING_PLOT
    save_png(fig, path)
    return path


def _point(point: dict[str, Any] | None) -> str:
    if not point:
        return "the config's"
    names = {"learning_rate": "lr", "temperature": "tau", "ce_share": "CE share"}
    return ", ".join(f"{names.get(k, k)} {v:g}" for k, v in point.items())


def selection_lines(summary: dict[str, Any], level: str) -> list[str]:
    """The hyperparameters each arm trained with, and how they were chosen."""
    rows = []
    for arm, entry in summary["arms"].items():
        selection = entry.get("selection") or {}
        tried = "; ".join(
            f"{_point(p['point'])}: {pct(p.get('accuracy'))}" for p in selection.get("points", [])
        )
        rows.append([arm, _point(entry.get("hyperparameters")), tried or "not searched"])
    if not any(r[2] != "not searched" for r in rows):
        return []
    lines = [
        f"{level}# Hyperparameters (chosen on the validation split)",
        "",
        "Each grid point trained one seed and was evaluated greedily on the validation problems "
        "(never on the test set); the best point trained every seed.",
        "",
    ]
    return lines + table(["arm", "trained with", "validation accuracy per point"], rows) + [""]


def ablation_lines(summary: dict[str, Any], plot: str | None, level: str = "##") -> list[str]:
    """The report section (markdown lines) for an ablation summary."""

    settings = summary.get("settings") or {}
    metric = settings.get("metric", "accuracy")
    lines = [
        f"{level} Ablation: what makes SSB work",
        "",
        f"Equal budget: {summary['equal_budget']}. Seeds: {summary['seeds']}. Evaluation: "
        f"{metric}, {'greedy' if settings.get('greedy') else 'sampled'}, scoring "
        f"{settings.get('scoring')}, the same held-out problems for every model.",
        "",
    ]
    for bench in summary["benchmarks"]:
        base = summary["base"].get(bench) or {}
        lines += [
            f"{level}# {bench_slug(bench)}",
            "",
            f"Base: {pct(base.get('accuracy'))} {pct_interval(base.get('interval'))} "
            f"(n = {base.get('n')}). Across seeds: mean ± sample sd [min, max] of the seeds' "
            "accuracies; pooled: each problem's score averaged over the seeds, paired "
            "(difference [95% bootstrap], wins/losses, p of the sign test).",
            "",
        ]
        rows = []
        for arm, entry in summary["arms"].items():
            across = entry["across_seeds"].get(bench)
            per_seed = "; ".join(
                f"{seed}: {pct(s['results'][bench]['accuracy'])} "
                f"{pct_interval(s['results'][bench]['interval'])}"
                for seed, s in entry["seeds"].items()
                if bench in s["results"]
            )
            if across is None:
                rows.append([arm, entry.get("skipped") or "not evaluated", "", "", ""])
                continue
            rows.append(
                [
                    arm,
                    per_seed,
                    f"{pct(across['mean'])} ± {100 * across['std']:.1f} "
                    f"[{pct(across['min'])}, {pct(across['max'])}]",
                    _diff(across.get("pooled_vs_base")),
                    _diff(across.get("pooled_vs_ssb")),
                    _diff(across.get("pooled_vs_sft")),
                ]
            )
        header = [
            "arm",
            f"{metric} per seed [95%]",
            "across seeds",
            "pooled vs base",
            "pooled vs ssb",
            "pooled vs sft",
        ]
        lines += table(header, rows) + [""]
        rows = []
        for arm, entry in summary["arms"].items():
            for seed, s in entry["seeds"].items():
                r = s["results"].get(bench)
                if r:
                    rows.append(
                        [arm, seed] + [_diff(r.get(f"vs_{ref}")) for ref in ("base", "ssb", "sft")]
                    )
        lines += [
            "Per seed, paired (difference [95% bootstrap], wins/losses, exact McNemar p):",
            "",
        ]
        header = ["arm", "seed", "vs base", "vs ssb (same seed)", "vs sft (same seed)"]
        lines += table(header, rows) + [""]
    lines += selection_lines(summary, level)
    rows = []
    for arm, entry in summary["arms"].items():
        cost = entry.get("cost") or {}
        data = entry.get("data") or {}
        yield_ = data.get("pair_yield")
        rows.append(
            [
                arm,
                str(data.get("examples", "n/a")),
                pct(yield_) if yield_ is not None else "",
                _fmt("{:.0f}", cost.get("train_seconds_mean")),
                _fmt("{:.0f}", cost.get("generated_tokens_mean")),
                _fmt("{:.0f}", cost.get("teacher_forwards_mean")),
                (cost.get("data") or {}).get("stages", ""),
                _fmt("{:.0f}", (cost.get("data") or {}).get("seconds")),
            ]
        )
    lines += [
        f"{level}# Training cost",
        "",
        "Per seed (mean): wall time, tokens generated and teacher forward passes during training. "
        "Data: the stages that made the arm's training data (done once, shared by its seeds) "
        "and their wall time. Pair yield: pairs kept per mixed problem sent to the teacher.",
        "",
    ]
    header = [
        "arm",
        "examples",
        "pair yield",
        "train s",
        "generated tokens",
        "teacher forwards",
        "data stages",
        "data s",
    ]
    lines += table(header, rows) + [""]
    lines += teacher_signal_by_context(summary.get("teacher_signal") or {}, level)
    if plot:
        lines += [f"![training dynamics of every arm]({plot})", ""]
    return lines


def _sides(signal: dict[str, Any], key: str) -> str:
    row = signal.get(key) or {}
    return f"{_fmt('{:.3f}', row.get('teacher'))} / {_fmt('{:.3f}', row.get('student'))}"


def teacher_signal_by_context(signals: dict[str, Any], level: str) -> list[str]:
    """One row per teacher context: its diagnostic at initialisation (`ssb diagnose`)."""
    rows = []
    for arm, sig in signals.items():
        if not sig:
            rows.append([arm] + ["n/a"] * 10)
            continue

        cosine = sig.get("grad_cosine") or {}
        rows.append(
            [
                arm,
                f"{sig.get('teacher_context')}, {sig.get('hint_style', 'inline')}",
                str(sig.get("pairs")),
                _sides(sig, "p_reply"),
                _sides(sig, "entropy"),
                _fmt("{:+.4f}", (sig.get("advantage") or {}).get("mean_logp_gap")),
                f"{pct(sig.get('fixable'))} / {pct(sig.get('breakable'))}",
                _sides(sig, "stop_mass_nonfinal"),
                _sides(sig, "stop_mass_answer_phrase"),
                _sides(sig, "wrong_answer_mass"),
                _fmt("{:+.3f}", cosine.get("value")),
                {True: "yes", False: "no"}.get(sig["verdict"]["teacher_advantage"], "n/a"),
            ]
        )
    if not rows:
        return []
    header = [
        "teacher of",
        "context, hint",
        "pairs",
        "p(reply) T / S",
        "entropy T / S",
        "log-prob gap",
        "fixable / breakable",
        "stop mass T / S",
        "stop mass before the answer T / S",
        "wrong-answer mass T / S",
        "KD·CE cosine",
        "advantage",
    ]
    return [
        f"{level}# Teacher signal per teacher",
        "",
        "The hinted teacher (T) against the untrained student (S) on the reply tokens at τ=1, "
        "before training (`ssb diagnose`).",
        "",
        *table(header, rows),
        "",
    ]


def write_ablation_report(ablation: AblationDir) -> Path:
    summary = json.loads(ablation.summary_path.read_text())
    plot = plot_training(ablation, summary)
    relative = f"plots/{TRAINING_PLOT}" if plot else None
    lines = ablation_lines(summary, relative, level="#")
    atomic_write_text(ablation.report_path, "\n".join(lines).rstrip() + "\n")
    return ablation.report_path


def ablation_section(rundir: RunDir) -> list[str]:
    """The run report's section (empty when `ssb ablate` has not written a summary)."""
    ablation = rundir.ablation()
    if not ablation.summary_path.exists():
        return []
    try:
        summary = json.loads(ablation.summary_path.read_text())
    except json.JSONDecodeError:
        return []
    plot = ablation.plots_dir / TRAINING_PLOT
    relative = str(plot.relative_to(rundir.path)) if plot.exists() else None
    return ablation_lines(summary, relative)


def write_run_report(rundir: RunDir, cfg: Config | None = None) -> Path:
    """The run's report.md (`ssb report`, `ssb run`), with the ablation's section when `ssb
    ablate` has written a summary; returns its path."""
    return write_report(rundir, cfg, sections=ablation_section(rundir))
