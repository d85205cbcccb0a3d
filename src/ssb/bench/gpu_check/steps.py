"""The GPU check's bookkeeping: named steps run in order and timed, the CLI run as users run it,
the summary table."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

SUBPROCESS_TIMEOUT_S = 1200  # catches a hang only (a vLLM engine that never starts, ...)

# A step: a function returning a one-line result and its details (they go to gpu_check.json),
# raising `CheckFailed` when what it checks is wrong.
StepResult = tuple[str, dict[str, Any]]


class Steps:
    """Runs named steps in order, times them, keeps going after a failure, and records
    ok / seconds / result / details for each."""

    def __init__(self) -> None:
        self.results: dict[str, dict[str, Any]] = {}

    def run(self, name: str, fn: Callable[[], StepResult], needs: tuple[str, ...] = ()) -> bool:
        """Run `fn` (which returns a one-line result and details) unless a step it `needs`
        failed; True when it passed."""
        missing = [n for n in needs if not self.results.get(n, {}).get("ok")]
        print(f"\n== {name}", flush=True)
        start = time.perf_counter()
        if missing:
            entry = {"ok": False, "result": f"not run: needs {', '.join(missing)}"}
        else:
            try:
                result, details = fn()
                entry = {"ok": True, "result": result, "details": details}
            except CheckFailed as exc:
                entry = {"ok": False, "result": str(exc), "details": exc.details}
            except Exception as exc:  # noqa: BLE001 - reported as a failed step
                entry = {
                    "ok": False,
                    "result": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc(),
                }
                print(entry["traceback"], file=sys.stderr)
        entry["seconds"] = round(time.perf_counter() - start, 2)
        self.results[name] = entry
        mark = "ok" if entry["ok"] else "FAILED"
        print(f"== {name}: {mark} in {entry['seconds']:.1f} s: {entry['result']}", flush=True)
        return entry["ok"]


class CheckFailed(RuntimeError):
    """A check ran and its result is wrong (details say what was seen)."""

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.details = details or {}


def run_logged(cmd: list[str], log: Path, what: str) -> subprocess.CompletedProcess:
    """Run `cmd`, write its output to `log`; a non-zero exit or a hang raises `CheckFailed`."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        log.write_text(f"$ {' '.join(cmd)}\n\ntimed out\n{exc.stderr or ''}")
        raise CheckFailed(f"{what} timed out after {SUBPROCESS_TIMEOUT_S} s (log: {log})") from None
    log.write_text(f"$ {' '.join(cmd)}\n\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}")
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-20:])
        raise CheckFailed(f"{what} exited with {done.returncode} (log: {log})", {"tail": tail})
    return done


def run_ssb(command: str, run_dir: Path, overrides: list[str], log: Path) -> str:
    """`python -m ssb <command>` in a subprocess (the CLI as users run it); its output goes to
    `log`, and its stderr (the stage's log lines) is returned."""
    cmd = [sys.executable, "-m", "ssb", command, "--run-dir", str(run_dir)]
    for item in overrides:
        cmd += ["--set", item]
    print(f"  $ ssb {command} --run-dir {run_dir} ({len(overrides)} --set); log: {log}", flush=True)
    return run_logged(cmd, log, f"ssb {command}").stderr


def stage_summary(run_dir: Path, stage: str) -> dict[str, Any]:
    """What the run's manifest says about `stage`."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return manifest["stages"][stage]


def summary_table(steps: dict[str, dict[str, Any]], total: float) -> str:
    """gpu_check.md: one row per step, then the total."""
    lines = ["| step | seconds | ok | result |", "|---|---:|---|---|"]
    for name, entry in steps.items():
        result = str(entry["result"]).replace("|", "/").replace("\n", " ")
        ok = "yes" if entry["ok"] else "**NO**"
        lines.append(f"| {name} | {entry['seconds']:.1f} | {ok} | {result} |")
    lines.append(f"| total | {total:.1f} | | |")
    return "\n".join(lines)
