"""Step 11 of the GPU check: the onpolicy arm's step time, sampling with ssb's decode loop and,
where the backend is vllm, through one engine serving the student's current adapter."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from ssb.bench.gpu_check.steps import StepResult

ONPOLICY_STEPS = 4


def check_onpolicy(run: Path, overrides: list[str], out: Path, backend: str) -> StepResult:
    """Step 11: `ssb.ablation.onpolicy.run_onpolicy` for `ONPOLICY_STEPS` optimizer steps on the
    staged pairs, per backend. Per step: seconds and seconds spent sampling (the first step's
    sampling includes the engine start); greedy token equality is tested on CPU
    (tests/test_vllm_cpu.py)."""
    from ssb.ablation.onpolicy import run_onpolicy
    from ssb.config import load_config
    from ssb.rundir import RunDir, read_jsonl
    from ssb.stages.base import release_accelerator

    figures: dict[str, Any] = {}
    for name in ("hf", "vllm") if backend == "vllm" else ("hf",):
        rundir = RunDir(out / f"onpolicy-{name}")
        rundir.path.mkdir(parents=True)
        shutil.copy(RunDir(run).pairs_path, rundir.pairs_path)
        cfg = load_config(overrides=[*overrides, f"generation.backend={name}"])
        start = time.perf_counter()
        run_onpolicy(cfg, rundir, ONPOLICY_STEPS, progress=False)
        total = time.perf_counter() - start
        release_accelerator()
        log = [r for r in read_jsonl(rundir.train_log_path) if "loss" in r]
        sampling = [r["sampling_s"] for r in log]
        later = sorted(sampling[1:])
        figures[name] = {
            "total_s": round(total, 2),
            "sampling_s": sampling,
            "sampled_tokens": [r["sampled_tokens"] for r in log],
            # The steady step: all but the first step's extra sampling time (warm-up, engine).
            "step_s": round((total - sampling[0] + later[len(later) // 2]) / len(log), 2),
        }
    text = ", ".join(
        f"{name}: {f['step_s']:.2f} s/step (sampling {f['sampling_s'][-1]:.2f} s)"
        for name, f in figures.items()
    )
    return text, figures
