"""What the bench reports: table rows (two measured numbers and the ratio between them),
``results.md``, the machine it ran on, and its progress lines."""

from __future__ import annotations

import math
import os
import platform
import sys
from datetime import datetime, timezone
from typing import Any


def log(progress: bool, message: str) -> None:
    """One progress line on stderr (when `progress`)."""
    if progress:
        print(f"[bench] {message}", file=sys.stderr, flush=True)


def finite(x: Any) -> bool:
    """A real, finite number (not a bool, None or NaN)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def row(
    section: str,
    what: str,
    baseline: float | None,
    ours: float | None,
    formula: str,
    *,
    unit: str = "",
    goal: tuple[str, float] | None = None,
    value: float | None = None,
    note: str = "",
) -> dict[str, Any]:
    """One table row. `formula` says how `value` follows from the two measured numbers:
    ``baseline/ours``, ``ours/baseline``, ``relerr`` (|ours - baseline| / |baseline|), ``share``
    (ours / baseline), or ``direct`` (`value` measured itself, e.g. a cosine similarity)."""
    if formula != "direct":
        value = None
        if finite(baseline) and finite(ours):
            if formula == "baseline/ours" and ours != 0:
                value = baseline / ours
            elif formula in ("ours/baseline", "share") and baseline != 0:
                value = ours / baseline
            elif formula == "relerr" and baseline != 0:
                value = abs(ours - baseline) / abs(baseline)
    met = None
    if goal is not None and finite(value):
        op, target = goal
        met = {">=": value >= target, "<": value < target, ">": value > target}[op]
    return {
        "section": section,
        "what": what,
        "baseline": baseline,
        "ours": ours,
        "unit": unit,
        "formula": formula,
        "value": value,
        "goal": f"{goal[0]} {goal[1]:g}" if goal else None,
        "met": met,
        "note": note,
    }


def cpu_note(numerator: float | None, denominator: float | None) -> str:
    """The same ratio from process CPU time (user + system, all threads), which other
    processes' load disturbs less than wall time."""
    if not (finite(numerator) and finite(denominator)) or not denominator:
        return ""
    return f"CPU-time ratio {numerator / denominator:.2f}x"


def _fmt(x: Any, unit: str = "") -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        if x == 0:
            text = "0"
        elif abs(x) >= 1000:
            text = f"{x:,.0f}"
        elif abs(x) >= 1:
            text = f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
        else:
            text = f"{x:.3g}"
    else:
        text = str(x)
    return f"{text} {unit}".strip()


def _fmt_value(r: dict[str, Any]) -> str:
    value = r["value"]
    if value is None:
        return "-"
    if r["formula"] == "relerr":
        return f"{value:.3%}"
    if r["formula"] == "share":
        return f"{value:.1%}"
    if r["formula"] == "direct":
        return f"{value:.6f}"
    return f"{value:,.1f}x" if value >= 100 else f"{value:.2f}x"


def markdown(results: dict[str, Any]) -> str:
    """results.md: the machine, the table of rows, then what was skipped or failed and why."""
    meta = results["meta"]
    lines = [
        "# ssb benchmark results",
        "",
        f"- {meta['date']}, {meta['machine']} ({meta['hardware']['cpu']}, torch ISA "
        f"{meta['hardware']['cpu_capability']}, native bf16: "
        f"{'yes' if meta['hardware']['native_bf16'] else 'no'}, "
        f"{meta['hardware']['torch_threads']} threads), torch {meta['torch']}, "
        f"transformers {meta['transformers']}; quick={meta['quick']}; "
        f"wall time {meta['wall_s']:.0f} s",
        "- Each row compares two numbers measured side by side in this run; absolute times on a "
        "shared CPU mean little, the ratio is the result.",
        "",
        "| section | measurement | baseline | ours | ratio | goal | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        cells = [
            r["section"],
            r["what"] + (f" ({r['note']})" if r["note"] else ""),
            _fmt(r["baseline"], r["unit"]),
            _fmt(r["ours"], r["unit"]),
            _fmt_value(r),
            r["goal"] or "",
            _fmt(r["met"]) if r["met"] is not None else "",
        ]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    lines.append("")
    for name, section in results["sections"].items():
        if isinstance(section, dict) and ("skipped" in section or "error" in section):
            lines.append(f"- `{name}`: {section.get('skipped') or section.get('error')}")
    approx = results["sections"].get("storage", {}).get("approx", {})
    if "skipped" in approx or "error" in approx:
        lines.append(
            f"- `storage` real-pair error measurement: {approx.get('skipped') or approx['error']}"
        )
    if approx.get("forms"):
        masses = ", ".join(
            f"top-{name[4:]} {form['mean_tail_mass']:.1%}"
            for name, form in approx["forms"].items()
            if "mean_tail_mass" in form
        )
        lines.append(
            f"- `storage` real pairs: teacher = {approx['teacher']}, student = {approx['student']}"
            f"; mean teacher mass outside the top k at tau={approx['tau']:g}: {masses}."
        )
        diag = approx.get("tau1_diagnostic", {}).get("mean_tail_mass", {})
        if diag:
            masses = ", ".join(f"top-{name[4:]} {m:.1%}" for name, m in diag.items())
            lines.append(f"  At tau=1: {masses}.")
    kd = results["sections"].get("kd_memory")
    if isinstance(kd, dict) and "model" in kd:
        lines.append(f"- `kd_memory` model: {kd['model']}; batch {kd['batch']}, {kd['reply']}.")
        for seq, entry in kd.get("runs", {}).items():
            for side in ("reference", "ours"):
                info = entry.get(side, {})
                if "skipped" in info or "error" in info:
                    lines.append(f"  - S={seq} {side}: {info.get('skipped') or info.get('error')}")
    gpu = results["sections"].get("gpu")
    if isinstance(gpu, dict) and gpu.get("vllm_untested_on_gpu"):
        lines.append("- `gpu`: the vLLM generation figure has never been measured on a GPU.")
        vgen = gpu.get("generation_vllm", {})
        if "skipped" in vgen or "error" in vgen:
            lines.append(f"  - vLLM generation: {vgen.get('skipped') or vgen.get('error')}")
    return "\n".join(lines) + "\n"


def machine_meta(quick: bool) -> dict[str, Any]:
    """The date, machine, versions and hardware (`ssb.hardware.hardware_info`) of this run."""
    import torch
    import transformers

    from ssb.hardware import hardware_info

    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.system()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "hardware": hardware_info(),
        "quick": quick,
    }
