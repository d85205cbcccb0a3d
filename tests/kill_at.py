"""Killing a CLI subprocess at a chosen point: the crash-and-resume tests' one helper."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from limits import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[1]


def single_thread_env() -> dict[str, str]:
    """The environment of a killed-and-resumed subprocess: one thread, this checkout's sources."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="0")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    return env


def signal_at_trigger(
    cmd: list[str], trigger: Path, delay: float = 0.0, sig: signal.Signals = signal.SIGKILL
) -> tuple[int, str]:
    """Run `cmd` until `trigger` exists, wait `delay` seconds more, send it `sig`; returns its
    exit status and stderr. Fails if it exits before `trigger` appears, and, for SIGKILL, if it
    finished before the signal (then the test crashed nothing)."""
    what = " ".join(cmd[2:4])  # [python, -m, ssb, stage, ...] -> "ssb stage"
    proc = subprocess.Popen(
        cmd, env=single_thread_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while not trigger.exists():
            if proc.poll() is not None:
                raise AssertionError(
                    f"{what} exited ({proc.returncode}) before {trigger.name} appeared: "
                    + proc.stderr.read().decode()[-3000:]
                )
            assert time.monotonic() < deadline, f"{trigger} never appeared"
            time.sleep(0.005)
        time.sleep(delay)
        proc.send_signal(sig)
        proc.wait(timeout=HANG_GUARD_S)
        stderr = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL, (
            f"{what} finished before it was killed (rc={proc.returncode}); the test did not "
            "crash it"
        )
    return proc.returncode, stderr
