"""Step 10 of the GPU check: `ssb bench --sections gpu` on a GPU, its CPU form at tiny sizes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ssb.bench.gpu_check.steps import CheckFailed, StepResult, run_logged
from ssb.rundir import atomic_write_json


def check_bench(out: Path, device: str, logs: Path) -> StepResult:
    """Step 10: the bench's GPU section; its figures and rows are the step's details."""
    bench_dir = out / "bench"
    if device == "cuda":
        cmd = [sys.executable, "-m", "ssb", "bench", "--sections", "gpu", "--out", str(bench_dir)]
        print(f"  $ ssb bench --sections gpu --out {bench_dir}; log: {logs / 'bench.log'}")
        run_logged(cmd, logs / "bench.log", "ssb bench")
        results = json.loads((bench_dir / "results.json").read_text())
        data, rows = results["sections"]["gpu"], results["rows"]
    else:
        # The same code at tiny sizes (what tests/test_bench.py runs), so CI keeps it working.
        from ssb.bench.gpu import gpu_runs
        from ssb.bench.sizes import bench_sizes

        data, rows = gpu_runs(bench_sizes(True)["gpu"], "cpu", progress=True)
        bench_dir.mkdir(parents=True, exist_ok=True)
        result = {"sections": {"gpu": data}, "rows": rows}
        atomic_write_json(bench_dir / "gpu_cpu_form.json", result, default=float)
    # What the step reports from the section's `data` (`ssb.bench.gpu.gpu_runs`, which says where
    # a new row of the section goes); the rows themselves come whole.
    figures = {
        "kd_tokens_per_s": {s: data.get(s, {}).get("tokens_per_s") for s in ("reference", "ours")},
        "kd_mfu": {s: data.get(s, {}).get("mfu") for s in ("reference", "ours")},
        "kd_peak_cuda_delta_mb": {
            s: data.get(s, {}).get("peak_cuda_delta_mb") for s in ("reference", "ours")
        },
        "transformers_generation_tokens_per_s": data.get("generation", {}).get(
            "batched_tokens_per_s"
        ),
        "decode_loop_tokens_per_s": data.get("generation", {}).get("loop_tokens_per_s"),
        "vllm_generation_tokens_per_s": data.get("generation_vllm", {}).get("tokens_per_s"),
        "vllm_generation": data.get("generation_vllm"),
        "rows": [{k: r[k] for k in ("what", "baseline", "ours", "value", "unit")} for r in rows],
    }
    problems = [
        f"{part}: {data.get(part, {}).get('error')}"
        for part in ("reference", "ours", "generation", "generation_vllm")
        if "error" in data.get(part, {})
    ]
    if "error" in data:
        problems.append(data["error"])
    if None in figures["kd_tokens_per_s"].values():
        problems.append("no KD step figures")
    if device == "cuda" and figures["vllm_generation_tokens_per_s"] is None:
        problems.append(f"no vLLM generation figure ({data.get('generation_vllm')})")
    if problems:
        raise CheckFailed("; ".join(problems), figures)
    kd = figures["kd_tokens_per_s"]
    text = f"KD step {kd['ours']:.0f} tok/s (reference {kd['reference']:.0f})"
    if figures["kd_mfu"]["ours"] is not None:
        text += f", MFU {figures['kd_mfu']['ours']:.1%}"
    text += (
        f"; generation {figures['transformers_generation_tokens_per_s']:.0f} tok/s (transformers)"
    )
    for batch, loops in (figures["decode_loop_tokens_per_s"] or {}).items():
        text += (
            f", ssb's decode loop at batch {batch} {loops['ssb']:.0f} vs "
            f"{loops['transformers']:.0f} (generate)"
        )
    vllm_tps = figures["vllm_generation_tokens_per_s"]
    text += f", {vllm_tps:.0f} tok/s (vLLM)" if vllm_tps else ", vLLM skipped"
    return text, figures
