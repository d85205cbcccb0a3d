"""The report's markdown sections, each a list of lines built from data the report has read
(an empty list when its source is missing)."""

from __future__ import annotations

from typing import Any

from ssb.config import lookup
from ssb.funnel import MIXED_STATUSES, REJECT_REASONS
from ssb.report.data import (
    LOSS_KEYS,
    funnel_counts,
    is_number,
)
from ssb.report.formatting import fmt_num, fmt_p, pct, pct_interval, pp, pp_interval, table
from ssb.rundir import RunDir, read_jsonl

HIGHLIGHTS = (
    ("seed", "seed"),
    ("data.train", "training problems"),
    ("data.max_problems", "max training problems"),
    ("prompt.format", "prompt format"),
    ("generation.max_new_tokens", "max new tokens"),
    ("rollout.num_samples", "rollouts per problem (K)"),
    ("rollout.sampling.temperature", "rollout temperature"),
    ("bootstrap.teacher_context", "teacher context"),
    ("bootstrap.sampling.temperature", "teacher temperature"),
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


# Settings that mean something only when another has a given value.
_APPLIES_WHEN = {"targets.topk": ("targets.mode", "topk")}


def applies(config: dict[str, Any], dotted: str) -> bool:
    """Whether a setting is in use (top-k only for topk targets)."""
    if dotted not in _APPLIES_WHEN:
        return True
    key, value = _APPLIES_WHEN[dotted]
    return lookup(config, key) == value


def resolved_lines(manifest: dict[str, Any]) -> list[str]:
    """What "auto" settings resolved to, from the manifest: the model and the hardware."""
    lines = []
    ident = manifest.get("model_identity") or {}
    if ident:
        what = ident.get("model_id") or ident.get("path") or ident.get("name")
        extra = [f"{k} {ident[k]}" for k in ("revision", "commit", "vocab_size") if ident.get(k)]
        lines.append(f"Resolved model: `{what}`" + (f" ({', '.join(extra)})" if extra else ""))
    hw = manifest.get("hardware") or {}
    if hw:
        parts = [f"device {hw.get('device')}", f"dtype {hw.get('dtype')}"]
        if hw.get("gpu"):
            parts.append(f"GPU {hw['gpu']} x{hw.get('gpu_count', 1)}")
        parts.append(
            f"CPU {hw.get('cpu')} (torch capability {hw.get('cpu_capability')}, native bf16 "
            f"{'yes' if hw.get('native_bf16') else 'no'}), {hw.get('torch_threads')} threads"
        )
        lines.append("Hardware: " + ", ".join(parts))
    return lines


def noise_verdict(c: dict[str, Any]) -> str:
    """In words: is a paired difference within noise (its 95% interval includes 0)?"""
    interval = c.get("diff_interval")
    if not interval or any(v is None for v in interval):
        return "n/a"
    low, high = interval
    if low <= 0 <= high:
        return "within noise (interval includes 0)"
    return "higher, beyond noise" if low > 0 else "lower, beyond noise"


def config_has(config: dict[str, Any], dotted: str) -> bool:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def funnel_section(funnel: dict[str, Any] | None, plot: bool) -> list[str]:
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
    lines += table(["step", "problems"], rows) + [""]
    if plot:
        lines += ["![pipeline funnel](plots/funnel.png)", ""]
    return lines


def training_section(
    records: list[dict[str, Any]],
    series: dict[str, tuple[list[float], list[float]]],
    plot: bool,
) -> list[str]:
    if not series:
        return []
    lines = ["## Training", "", f"{len(records)} records in `train_log.jsonl`.", ""]
    rows = []
    span = 0
    for name in (*LOSS_KEYS, "grad_norm", "reply_length", "learning_rate"):
        if name not in series:
            continue
        xs, ys = series[name]
        # One logged record can be a single noisy batch: the first and last columns are means
        # over the first and last tenth of the records.
        k = max(1, len(ys) // 10)
        span = max(span, k)
        rows.append(
            [
                name,
                fmt_num(len(ys)),
                fmt_num(xs[-1]),
                fmt_num(sum(ys[:k]) / k),
                fmt_num(sum(ys[-k:]) / k),
                fmt_num(min(ys)),
                fmt_num(max(ys)),
            ]
        )
    header = ["quantity", "points", "last step", "first (mean)", "last (mean)", "min", "max"]
    lines += table(header, rows)
    lines += [
        "",
        f"first / last: the mean of the first and last tenth of the logged records ({span} "
        "here, at least 1); each record is itself the mean over its `train.logging_steps` "
        "optimizer steps. min / max: single records.",
        "",
    ]
    if plot:
        lines += ["![training dynamics](plots/training.png)", ""]
    return lines


def eval_section(summary: dict[str, Any], plot: bool) -> list[str]:
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
                    pct(r.get("no_answer_rate")),
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
        "no answer",
        "mean output tokens",
    ]
    lines += table(header, rows) + [""]
    comparisons = summary.get("comparisons") or {}
    crows = []
    for model, benches in comparisons.items():
        for bench, c in benches.items():
            label = f"{model} vs {c.get('vs', 'base')}"
            crows.append(
                [*paired_cells(label, bench, c), noise_verdict(c), pp(lookup(c, "reference.diff"))]
            )
    if crows:
        lines += [
            "### Paired comparison with base (same problems)",
            "",
            "Wins: problems the model scores higher on than base; p: exact McNemar test on the "
            "discordant problems (a sign test for avg@k); difference interval: paired bootstrap "
            "over problems; a difference whose interval includes 0 is within noise.",
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
            "in words",
            "difference (reference harness)",
        ]
        lines += table(header, crows) + [""]
    hrows = [
        paired_cells(f"{h['model']} vs {h['vs']}", h["benchmark"], h)
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
        lines += table(header, hrows) + [""]
    if plot:
        lines += ["![accuracy by benchmark](plots/accuracy.png)", ""]
    return lines


def paired_cells(label: str, bench: str, c: dict[str, Any]) -> list[str]:
    """A paired comparison's table cells: label, benchmark, n, wins, losses, ties, difference
    [95% interval], p."""
    return [
        label,
        bench,
        fmt_num(c.get("n")),
        fmt_num(c.get("wins")),
        fmt_num(c.get("losses")),
        fmt_num(c.get("ties")),
        f"{pp(c.get('diff'))} {pp_interval(c.get('diff_interval'))}".strip(),
        fmt_p(c.get("mcnemar_p")),
    ]


def rounds_section(rundir: RunDir, summary: dict[str, Any]) -> list[str]:
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
        losses = [x["loss"] for x in read_jsonl(sub.train_log_path) if is_number(x.get("loss"))]
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
    return lines + table(header, [base, *rows]) + [""]


def stages_section(manifest: dict[str, Any]) -> list[str]:
    stages = manifest.get("stages") or {}
    if not stages:
        return []
    rows = []
    total = 0.0
    for name, info in stages.items():
        if name == "report" and isinstance(info, dict) and info.get("status") == "running":
            continue  # this very report, being written
        seconds = info.get("seconds") if isinstance(info, dict) else None
        if is_number(seconds):
            total += seconds
        killed = info.get("killed_attempts", 0) if isinstance(info, dict) else 0
        rows.append(
            [
                name,
                str(info.get("status", "")) if isinstance(info, dict) else "",
                "n/a" if not is_number(seconds) else f"{seconds:.1f}",
                fmt_num(killed),
                fmt_num(info.get("tokens_per_second")) if isinstance(info, dict) else "",
            ]
        )
    rows.append(["total", "", f"{total:.1f}", "", ""])
    lines = ["## Stages", ""]
    header = ["stage", "status", "wall time (s)", "killed attempts", "generation tokens/s"]
    lines += table(header, rows)
    lines += [
        "",
        "Wall time: every attempt, a failed, interrupted or killed one and its resumption "
        "included (a killed attempt up to the last file it wrote).",
        "",
    ]
    return lines


def _num(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def teacher_signal_table(signal: dict[str, Any]) -> list[str]:
    """Teacher vs untrained student on the reply tokens (diagnostics/teacher_signal.json, from
    `ssb.distill.signal`): the rows of SIDE_STATS, leak rows with the pairs they were found in."""
    from ssb.distill.signal import SIDE_STATS  # noqa: PLC0415 -- torch, only when there is one

    rows = []
    for key, label in SIDE_STATS.items():
        row = signal.get(key) or {}
        found = row.get("pairs")
        suffix = f" ({found} pairs)" if found is not None else ""
        rows.append([label + suffix, _num(row.get("teacher")), _num(row.get("student"))])
    return table(["on the reply tokens, τ=1", "hinted teacher", "plain student"], rows)


def teacher_signal_lines(signal: dict[str, Any]) -> list[str]:
    """The advantage, fixable/breakable rates, gradient cosine and verdict in a few lines."""
    adv = signal.get("advantage") or {}
    lines = [
        f"Teacher source: {signal.get('teacher_source')}; {signal.get('pairs')} pairs, "
        f"{signal.get('reply_tokens')} reply tokens.",
        f"Teacher advantage: {_num(adv.get('mean_logp_gap'), 4)} nats/token "
        f"(teacher higher on {pct(adv.get('share_teacher_higher'))} of tokens); argmax fixable "
        f"{pct(signal.get('fixable'))}, breakable {pct(signal.get('breakable'))}.",
    ]
    cosine = signal.get("grad_cosine")
    if cosine:
        lines.append(
            f"KD-vs-CE gradient cosine at initialisation: {cosine['value']:+.3f} "
            f"({cosine['divergence']}, τ={cosine['temperature']:g}, {cosine['batches']} batches)."
        )
    lines.append(f"Verdict: {signal['verdict']['text']}.")
    return lines


def teacher_signal_section(signal: dict[str, Any] | None) -> list[str]:
    if not signal:
        return []
    lines = [
        "## Teacher signal",
        "",
        "From `diagnostics/teacher_signal.json` (`ssb diagnose`).",
        "",
    ]
    lines += teacher_signal_table(signal) + [""]
    return lines + [f"- {line}" for line in teacher_signal_lines(signal)] + [""]
