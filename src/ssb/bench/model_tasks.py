"""The child that loads the model once and runs the model-based measurements in turn: storage's
error measurement (``approx``), ``scoring`` and ``generation``."""

from __future__ import annotations

import gc
import time
import traceback
from pathlib import Path
from typing import Any

from ssb.bench.generation import measure_generation
from ssb.bench.scoring import measure_scoring
from ssb.bench.storage import measure_approximation_error
from ssb.rundir import atomic_write_json

# Cheapest first: under the time budget the last task (generation) is the one skipped.
MODEL_TASKS = (("storage", "approx"), ("scoring", "scoring"), ("generation", "generation"))
MODEL_TASKS_SHARE = 0.5  # no model-based task starts after this share of the budget


def child_model_tasks(spec: dict[str, Any]) -> dict[str, Any]:
    """Load ``spec["model"]`` (default: the quickstart's) and run ``spec["tasks"]``; a task
    that fails is reported and the others still run."""
    import torch

    from ssb.config import load_config
    from ssb.models import load_model_and_tokenizer

    overrides = [f"model.name={spec['model']}"] if spec.get("model") else None
    cfg = load_config(preset="quickstart", overrides=overrides)
    t0 = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    model.eval()
    out: dict[str, Any] = {
        "model": cfg.model.name,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "load_s": time.perf_counter() - t0,
        "torch_threads": torch.get_num_threads(),
    }
    sizes = spec["sizes"]
    budget = spec.get("budget_s")
    for task in spec["tasks"]:
        start = time.perf_counter()
        if budget is not None and start - t0 > budget:
            out[task] = {"skipped": f"time budget: the model tasks had used {start - t0:.0f} s"}
            continue
        try:
            if task == "approx":
                result = measure_approximation_error(
                    model, tokenizer, cfg, sizes, Path(spec["tmp"])
                )
            elif task == "generation":
                result = measure_generation(model, tokenizer, cfg, sizes["gen"])
            else:
                result = measure_scoring(model, tokenizer, cfg, sizes["scoring"])
        except Exception as exc:  # noqa: BLE001 - one task failing must not hide the others
            result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        result["wall_s"] = time.perf_counter() - start
        out[task] = result
        gc.collect()
        # What is done so far survives a timeout of the whole child (see run_child).
        atomic_write_json(Path(spec["tmp"]) / "partial.json", out, default=float)
    return out
