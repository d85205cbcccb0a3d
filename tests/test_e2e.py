"""End to end: a reduced quickstart through every stage on the embedded gemma-3-270m, via the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    rd = RunDir(run_dir)
    manifest = json.loads(rd.manifest_path.read_text())
    for stage in ("rollout", "bootstrap", "targets", "train", "eval", "report"):
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

    report = rd.report_path.read_text()
    assert "synthetic" in report and "student" in report
    for plot in ("training", "accuracy", "funnel"):
        assert (rd.plots_dir / f"{plot}.png").read_bytes()[:8] == PNG_MAGIC

    # Running again finds everything done: nothing is regenerated or duplicated.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(read_jsonl(rd.rollouts_path)) == 24
    assert len(read_jsonl(rd.pairs_path)) == len(pairs)
    assert len(read_jsonl(rd.eval_dir / "student-synthetic.jsonl")) == 8
