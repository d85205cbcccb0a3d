"""Work run in a fresh Python process, so one measurement never carries another's allocations.

The parent writes a spec to a JSON file and runs ``child_main(task, spec, result)`` in a new
interpreter (`run_child`); the child writes its result dict, or an error, as JSON. Children also
measure their own memory: the RSS high-water mark, reset just before the measured step.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from ssb.rundir import atomic_write_json

CHILD_TIMEOUT_S = 600
# Task name -> "module:function" taking the spec dict and returning the result dict. Imported
# in the child only, so this module imports no section (and no section imports each other).
CHILD_TASKS = {
    "kd_step": "ssb.bench.kd_step:child_kd_step",
    "model_tasks": "ssb.bench.model_tasks:child_model_tasks",
    "gpu_generate": "ssb.bench.gpu:child_generate",
    "gpu_generate_vllm": "ssb.bench.gpu:child_generate_vllm",
    "cpu_isa": "ssb.bench.cpu:child_cpu",
    "vllm_cpu": "ssb.bench.vllm_cpu:child_vllm_cpu",
}
# The `ssb` package this module belongs to, first on the children's path: they run the same
# sources as the parent (a checkout's, not an installed copy).
_SRC_DIR = str(Path(__file__).resolve().parents[2])


def run_child(
    task: str,
    spec: dict[str, Any],
    timeout: int = CHILD_TIMEOUT_S,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run `task` (a key of `CHILD_TASKS`) in a fresh Python process (with `env` added to its
    environment) and return the dict it writes (or an error). ``spec["tmp"]`` is a scratch
    directory the child may use; on a timeout, what it left in ``tmp/partial.json`` is kept."""
    with tempfile.TemporaryDirectory(prefix="ssb-bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(dict(spec, tmp=tmp)))
        child_env = dict(os.environ, **(env or {}))
        path = child_env.get("PYTHONPATH")
        child_env["PYTHONPATH"] = _SRC_DIR + os.pathsep + path if path else _SRC_DIR
        child_env.setdefault("TOKENIZERS_PARALLELISM", "false")
        cmd = [
            sys.executable,
            "-c",
            "import sys; from ssb.bench.children import child_main; child_main(sys.argv[1:])",
            task,
            str(spec_path),
            str(out_path),
        ]
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout, env=child_env
            )
        except subprocess.TimeoutExpired:
            partial = Path(tmp) / "partial.json"
            result = json.loads(partial.read_text()) if partial.is_file() else {}
            result["error"] = f"{task}: timed out after {timeout} s"
            return result
        wall = time.perf_counter() - start
        if out_path.is_file():
            result = json.loads(out_path.read_text())
            result.setdefault("child_wall_s", wall)
            return result
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-15:])
        why = "killed (out of memory?)" if proc.returncode in (-9, 137) else "failed"
        return {"error": f"{task}: child {why}, exit code {proc.returncode}: {tail}"}


def child_main(argv: list[str]) -> None:
    """The child's entry point: ``[task, spec.json, result.json]``."""
    task, spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text())
    try:
        module, name = CHILD_TASKS[task].split(":")
        result = getattr(importlib.import_module(module), name)(spec)
    except Exception as exc:  # noqa: BLE001 - reported to the parent as data
        result = {
            "error": f"{task}: {type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
        }
    # numpy scalars are written as floats
    atomic_write_json(Path(out_path), result, default=float)


class Budget:
    """Wall-clock budget of one run_bench call (None = unlimited)."""

    def __init__(self, seconds: float | None) -> None:
        self.deadline = None if seconds is None else time.perf_counter() + seconds

    def remaining(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.perf_counter()

    def timeout(self) -> int:
        """A child's timeout: what is left, at least 30 s, at most `CHILD_TIMEOUT_S`."""
        return int(max(30.0, min(CHILD_TIMEOUT_S, self.remaining())))


# --------------------------------------------------------------------------- memory, in a child


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux >= 4.0); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_kb() -> int:
    """This process's RSS high-water mark (`VmHWM`; `ru_maxrss` where there is none)."""
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # macOS reports bytes


def rss_kb() -> int:
    """This process's resident set size now."""
    rss = _status_kb("VmRSS")
    return rss if rss is not None else peak_rss_kb()


def prefer_oom_kill() -> None:
    """Make this process the kernel's first choice if memory runs out: on a shared machine a
    too-large benchmark step should die, not somebody else's process."""
    try:
        with open("/proc/self/oom_score_adj", "w") as fh:
            fh.write("1000")
    except OSError:
        pass
