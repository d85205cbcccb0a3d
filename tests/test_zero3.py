"""Parameter partitioning with DeepSpeed ZeRO-3, two CPU processes (gloo).

`ssb targets` and `ssb train` end to end under `accelerate launch` with
examples/accelerate_zero3.yaml (the config users run on GPUs), DeepSpeed on its CPU accelerator
(`DS_ACCELERATOR=cpu`). accelerate records one process on CPU under DeepSpeed, so the launched
script first calls `deepspeed_on_cpu.allow_deepspeed_on_cpu()` (see there). Every test checks on
every rank that DeepSpeed really partitioned the model: each parameter holds a slice
(`ds_tensor`) smaller than its whole size (`ds_numel`), and no data outside a forward unless it
is small enough to persist. Partitioned targets equal one process's; a partitioned training run
killed after its first checkpoint and resumed gives the loss curve and the adapter (same files,
keys, shapes) one process gives.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from pairs_fixture import make_run, tiny_config
from safetensors.torch import load_file
from test_fsdp import launch_stage  # noqa: F401 -- the fixture, shared with the FSDP2 tests

from ssb.distill.store import TargetReader
from ssb.rundir import read_jsonl
from ssb.stages.targets import run_targets
from ssb.stages.train import run_train

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (pip install 'ssb[deepspeed]')",
)

ZERO3 = {"config": "accelerate_zero3.yaml", "DS_ACCELERATOR": "cpu"}


def assert_partitioned(run_dir: Path, stage: str) -> None:
    """Every rank held the model partitioned by ZeRO-3: every parameter a DeepSpeed one, every
    slice smaller than the whole, about half of all elements held at rest."""
    for rank in (0, 1):
        report = json.loads((run_dir / f"summary-{stage}-rank{rank}.json").read_text())["sharding"]
        assert report["kind"] == "zero3", report
        assert report["sharded_parameters"] == report["parameters"] > 0, report
        # Only the small ones (norms, LoRA matrices: <= 10 x hidden elements) persist whole.
        assert report["persistent_parameters"] < report["parameters"], report
        assert report["all_local_smaller"], report
        assert report["local_elements"] <= report["elements"] * 0.55, report


def test_targets_under_zero3_match_one_process(tmp_path, launch_stage):  # noqa: F811
    """`ssb targets` on a partitioned teacher: the ranks split the pairs (rank 1 runs an idle
    batch: forwards gather parameters, so both ranks run as many) and the merged store equals one
    process's."""
    overrides = ["targets.mode=dense", "targets.batch_size=2"]
    cfg, rundir, pairs = make_run(tmp_path, "chatml", *overrides, n=5)
    sharded = tmp_path / "zero3"
    sharded.mkdir()
    shutil.copy(rundir.pairs_path, sharded / "pairs.jsonl")
    run_targets(cfg, rundir, progress=False)

    proc = launch_stage("targets", cfg.model.name, sharded, overrides, **ZERO3)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "rank 0/2 scores 3 of 5 pairs" in proc.stderr
    assert "rank 1/2 scores 2 of 5 pairs" in proc.stderr
    assert "1 idle batches, so every rank runs 2 forwards" in proc.stderr
    assert_partitioned(sharded, "targets")
    one, two = TargetReader(rundir.targets_dir), TargetReader(sharded / "targets")
    assert sorted(one.ids()) == sorted(two.ids()) == sorted(p["id"] for p in pairs)
    two.verify()
    for example_id in one.ids():
        reply_a, a = one.get(example_id)
        reply_b, b = two.get(example_id)
        assert reply_a == reply_b
        # float32 log-probs; only the batch mates (padding) and the summation order differ.
        torch.testing.assert_close(b["logp"], a["logp"], rtol=1e-4, atol=1e-5)


# As in test_fsdp: clipping active, activation checkpointing on.
TRAIN = ["targets.mode=hidden", "train.save_steps=1", "train.gradient_checkpointing=true"]


@pytest.mark.slow
def test_train_under_zero3_killed_and_resumed_matches_one_process(tmp_path, launch_stage):  # noqa: F811
    """6 pairs, 3 optimizer steps of 2 pairs (one process, batch 2; two ranks, batch 1 each).
    The partitioned run is killed after checkpoint-1 and resumed from it (DeepSpeed's own
    checkpoint); its loss curve and saved adapter equal one process's uninterrupted run."""
    cfg, rundir, pairs = make_run(tmp_path, "chatml", *TRAIN, n=6)
    run_targets(cfg, rundir, progress=False)
    sharded = tmp_path / "zero3"
    shutil.copytree(rundir.path, sharded)
    one = run_train(
        tiny_config(cfg.model.name, *TRAIN, "train.batch_size=2"), rundir, progress=False
    )
    assert one["steps"] == 3

    overrides = [*TRAIN, "train.batch_size=1"]
    killed = launch_stage(
        "train", cfg.model.name, sharded, overrides, KILL_AFTER_CHECKPOINT="1", **ZERO3
    )
    assert killed.returncode != 0
    checkpoint = sharded / "checkpoints" / "checkpoint-1"
    assert (checkpoint / "trainer_state.json").exists()
    assert list(checkpoint.glob("global_step*")), "not a DeepSpeed checkpoint"
    assert not (sharded / "adapter").exists()
    proc = launch_stage("train", cfg.model.name, sharded, overrides, **ZERO3)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((sharded / "summary-train-rank0.json").read_text())
    assert summary["resumed_from"] == "checkpoint-1" and summary["steps"] == 3
    assert_partitioned(sharded, "train")

    # The loss curve: each step logged once, equal to one process's.
    log_one, log_two = read_jsonl(rundir.train_log_path), read_jsonl(sharded / "train_log.jsonl")
    assert [r["step"] for r in log_two] == [r["step"] for r in log_one] == [1, 2, 3]
    for a, b in zip(log_one, log_two):
        for key in ("loss", "kd", "grad_norm", "reply_len"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)

    # The adapter: the same files, keys, shapes and dtypes as one process writes, and the same
    # values (float32 LoRA weights; summation order differs between one and two ranks).
    a_dir, b_dir = rundir.adapter_dir, sharded / "adapter"
    assert sorted(p.name for p in b_dir.iterdir()) == sorted(p.name for p in a_dir.iterdir())
    config_a = json.loads((a_dir / "adapter_config.json").read_text())
    config_b = json.loads((b_dir / "adapter_config.json").read_text())
    # peft writes target_modules from a set: its order varies with the interpreter's hash seed.
    assert set(config_a.pop("target_modules")) == set(config_b.pop("target_modules"))
    assert config_a == config_b
    a = load_file(a_dir / "adapter_model.safetensors")
    b = load_file(b_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    b_moved = torch.cat([t.flatten() for k, t in b.items() if "lora_B" in k])
    assert b_moved.abs().max() > 1e-5  # trained (lora_B starts at zero)
    for key in a:
        assert b[key].shape == a[key].shape and b[key].dtype == a[key].dtype == torch.float32
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
