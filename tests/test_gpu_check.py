"""benchmarks/gpu_check.sh in its CPU form, the part of the GPU check that runs without a GPU:
every step passes (the stages through the CLI, the bench's GPU code at tiny sizes), and in
float32 ssb's own decode loop with a LoRA attached gives exactly the token ids of transformers +
PEFT `generate`. What only a GPU shows (vLLM serving the LoRA, the 3B's figures) is not tested
here. Slow: about 1.5 minutes on 2 CPU cores (mostly the stages' and the bench children's
start-up)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from limits import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]
STEPS = [
    "environment",
    "model",
    "rollout",
    "bootstrap (staged)",
    "targets",
    "train",
    "eval",
    "lora_tokens",
    "lora_tokens_fp32",
    "fsdp2",
    "bench",
    "onpolicy",
]


@pytest.mark.slow
def test_gpu_check_cpu_form(tmp_path):
    out = tmp_path / "gc"
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        # The interpreter running the tests, whatever its venv.
        env=dict(os.environ, PYTHON=sys.executable),
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    results = json.loads((out / "gpu_check.json").read_text())
    assert results["ok"] is True
    assert (results["device"], results["size"], results["backend"]) == ("cpu", "tiny", "hf")
    assert list(results["steps"]) == STEPS
    for name, step in results["steps"].items():
        assert step["ok"] is True, (name, step["result"], step.get("traceback"))

    # Eval served both models; the staged pairs were trained on.
    steps = results["steps"]
    assert steps["eval"]["details"]["results"] == {"base": 8, "student": 8}
    assert steps["bootstrap (staged)"]["details"]["pairs"] == 8
    assert len(steps["train"]["details"]["losses"]) == 4

    # Token for token: every prompt identical for the base, the trained student and the boosted
    # adapter, and the boosted adapter does change the output (the check can see a LoRA).
    lora = steps["lora_tokens"]["details"]
    assert lora["engine"] == "hf" and lora["dtype"] == "torch.float32"
    assert lora["prompts"] == 8
    for name in ("base", "student", "boosted"):
        model = lora["models"][name]
        assert model["identical"] == lora["prompts"], (name, model["first_divergence"])
        assert model["ours"] == model["reference"]
        assert any(model["ours"]), name  # not identical by being empty
    assert lora["changed_vs_base"]["boosted"] > 0

    # The float32 form of the comparison is the CPU form itself: skipped, saying why.
    assert "float32 already" in steps["lora_tokens_fp32"]["details"]["skipped"]

    # FSDP2 needs 2 GPUs: skipped on CPU, saying why.
    assert "GPUs only" in steps["fsdp2"]["details"]["skipped"]

    # The bench's GPU section ran its CPU form; vLLM's figure is skipped, saying why.
    bench = steps["bench"]["details"]
    assert all(v > 0 for v in bench["kd_tokens_per_s"].values())
    assert bench["transformers_generation_tokens_per_s"] > 0
    # The decode-loop rows at each batch of the CPU form's sizes, both loops measured.
    assert list(bench["decode_loop_tokens_per_s"]) == ["4", "8"]
    assert all(v > 0 for s in bench["decode_loop_tokens_per_s"].values() for v in s.values())
    assert sum("decode loop tokens/s" in r["what"] for r in bench["rows"]) == 2
    assert "skipped" in bench["vllm_generation"]
    assert (out / "gpu_check.md").read_text().startswith("| step |")

    # The onpolicy arm's steps, timed, on the decode loop only (vLLM: GPU or vLLM's CPU build).
    onpolicy = steps["onpolicy"]["details"]
    assert list(onpolicy) == ["hf"]
    assert len(onpolicy["hf"]["sampling_s"]) == 4 and onpolicy["hf"]["step_s"] > 0
