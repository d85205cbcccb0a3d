"""End to end: a reduced quickstart through every stage on the embedded gemma-3-270m, via the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from limits import HANG_GUARD_S

from ssb.rundir import RunDir, read_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_reduced_quickstart_end_to_end(tmp_path):
    run_dir = tmp_path / "quickstart"
    cmd = [
        sys.executable,
        "-m",
        "ssb",
        "run",
        "--preset",
        "quickstart",
        "--run-dir",
        str(run_dir),
        "--quiet",
        # Few problems, chosen so that some are mixed and pairs are kept (seeded, reproducible).
        "--set",
        "data.max_problems=24",
        "--set",
        "eval.max_problems=8",
        "--set",
        "train.epochs=1",
        # A second SSB round (on the next 24 problems) and a short GRPO baseline.
        "--set",
        "rounds=2",
        "--set",
        "grpo.enabled=true",
        "--set",
        "grpo.max_steps=2",
        "--set",
        "grpo.num_generations=4",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stderr[-3000:]
    rd = RunDir(run_dir)
    manifest = json.loads(rd.manifest_path.read_text())
    for stage in ("rollout", "bootstrap", "targets", "train", "grpo", "eval", "report"):
        assert manifest["stages"][stage]["status"] == "complete", stage
    assert manifest["packages"]["torch"] and manifest["config_hash"]
    assert rd.config_path.exists()

    rollouts = read_jsonl(rd.rollouts_path)
    assert len(rollouts) == 24 and all(len(r["samples"]) == 4 for r in rollouts)
    pairs = read_jsonl(rd.pairs_path)
    assert pairs, "no pairs kept: the reduced quickstart must exercise training"
    decided = read_jsonl(rd.bootstrap_log_path)
    assert len(decided) == 24 and sum(d["status"] == "kept" for d in decided) == len(pairs)

    index = json.loads((rd.targets_dir / "index.json").read_text())
    assert index["mode"] == "hidden" and set(index["examples"]) == {p["id"] for p in pairs}
    assert (rd.adapter_dir / "adapter_config.json").exists()
    log = read_jsonl(rd.train_log_path)
    assert log and all({"loss", "kd", "grad_norm", "learning_rate"} <= set(r) for r in log)

    summary = json.loads((rd.eval_dir / "summary.json").read_text())
    for model in ("base", "student"):
        result = summary["results"][model]["synthetic"]
        assert result["n"] == 8
        lo, hi = result["interval"]
        assert 0.0 <= lo <= result["accuracy"] <= hi <= 1.0
    assert "student" in summary["comparisons"]

    # Round 2: fresh problems, sampled and taught by round 1's student, whose adapter it trains.
    r2 = RunDir(run_dir / "round2")
    r2_cfg = yaml.safe_load(r2.config_path.read_text())
    assert r2_cfg["model"]["adapter"] == str(rd.adapter_dir.resolve())
    assert r2_cfg["data"]["skip_problems"] == 24
    r2_rollouts = read_jsonl(r2.rollouts_path)
    assert len(r2_rollouts) == 24
    assert not {r["id"] for r in r2_rollouts} & {r["id"] for r in rollouts}
    assert json.loads(r2.manifest_path.read_text())["model_identity"]["adapter_hash"]
    assert read_jsonl(r2.pairs_path), "round 2 kept no pairs: pick other seeds/problems"
    assert (r2.adapter_dir / "adapter_config.json").exists()
    # base, both rounds' students and GRPO, evaluated on the same problems, compared head to head
    assert {"base", "student", "round2", "grpo"} <= set(summary["results"])
    pairs_compared = {(h["model"], h["vs"]) for h in summary["head_to_head"]}
    assert pairs_compared == {("student", "grpo"), ("round2", "student")}
    assert (rd.path / "grpo" / "adapter" / "adapter_config.json").exists()

    report = rd.report_path.read_text()
    assert "synthetic" in report and "student" in report
    assert "## Iterated rounds" in report and "### Head to head" in report
    for plot in ("training", "accuracy", "funnel"):
        assert (rd.plots_dir / f"{plot}.png").read_bytes()[:8] == PNG_MAGIC

    # Running again finds everything done: nothing is regenerated or duplicated.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(read_jsonl(rd.rollouts_path)) == 24
    assert len(read_jsonl(rd.pairs_path)) == len(pairs)
    assert len(read_jsonl(rd.eval_dir / "student-synthetic.jsonl")) == 8
    assert len(read_jsonl(r2.rollouts_path)) == 24
    assert len(read_jsonl(rd.eval_dir / "round2-synthetic.jsonl")) == 8
