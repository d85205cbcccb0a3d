"""Parameter sharding with FSDP2 (`torch.distributed.fsdp.fully_shard`), two CPU processes (gloo).

1. The KD loss alone: with the root module resharded after the forward, the frozen lm_head the
   loss projects through is a sharded DTensor; `output_head` all-gathers it, and the loss equals
   that of the same model unsharded, computed in the same process.
2. `ssb targets` and `ssb train` end to end under `accelerate launch` with
   examples/accelerate_fsdp.yaml (the config users run on GPUs). accelerate turns FSDP into DDP on
   CPU, so the launched script first calls `fsdp_on_cpu.allow_fsdp_on_cpu()` (see there); then
   accelerate shards the model with its own FSDP2 code, and every test checks on every rank that
   the parameters are DTensors whose local pieces are smaller than the whole tensors. Sharded
   targets equal one process's; a sharded training run killed after its first checkpoint and
   resumed gives the loss curve and the adapter (same files, keys, shapes) one process gives.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from pairs_fixture import make_run, tiny_config
from two_ranks import (
    assert_same_targets,
    assert_training_matches_one_process,
    torchrun_two_ranks,
)

from ssb.stages.targets import run_targets
from ssb.stages.train import run_train

SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from rank_scripts import finish, kd_batch, kd_loss, lora_model, tokenizer
from ssb.bench.random_models import build_tiny_model
from ssb.distill.forward import output_head

dist.init_process_group("gloo")
rank = dist.get_rank()
batch = kd_batch()


def loss_of(shard):
    base = build_tiny_model("qwen2", tokenizer(), seed=1)
    base.config.tie_word_embeddings = False  # a separate frozen lm_head, sharded on its own
    base.lm_head.weight = torch.nn.Parameter(base.lm_head.weight.detach().clone())
    model = lora_model(base)
    if shard:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in base.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh, reshard_after_forward=True)
    loss = kd_loss(model, model, batch)
    # After the forward (resharded): the head's own type, and what output_head gathers from it.
    head = output_head(model)
    weight_type = type(base.lm_head.weight).__name__
    return loss, weight_type, type(head.weight).__name__, head.weight.requires_grad


ref_loss, ref_type, _, _ = loss_of(shard=False)
with torch.no_grad():
    loss, weight_type, gathered_type, gathered_grad = loss_of(shard=True)
if rank == 0:
    json.dump({"ref_loss": ref_loss, "loss": loss, "weight_type": weight_type, "ref_type": ref_type,
               "gathered_type": gathered_type, "gathered_grad": gathered_grad}, open(sys.argv[2], "w"))
finish()
"""


def test_kd_loss_under_fsdp2_matches_unsharded(tmp_path):
    script = tmp_path / "fsdp2.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out.json"
    proc = torchrun_two_ranks(script, out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    # The sharded run really projected through a sharded head (gathered by output_head).
    assert r["weight_type"] == "DTensor" and r["ref_type"] == "Parameter"
    assert r["gathered_type"] == "Tensor" and r["gathered_grad"] is False
    assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-5)


# ------------------------------------------------------------------ end to end under accelerate


def assert_sharded(run_dir: Path, stage: str) -> None:
    """Every rank held the model sharded: all parameters DTensors, each rank's pieces smaller."""
    for rank in (0, 1):
        report = json.loads((run_dir / f"summary-{stage}-rank{rank}.json").read_text())["sharding"]
        assert report["sharded_parameters"] == report["parameters"] > 0, report
        assert report["all_local_smaller"], report
        # Gathered one unit at a time: each of the 2 decoder layers, the output layer, the root.
        assert report["units"] >= 4, report
        # Two ranks: about half of every tensor each (dim 0 split, the odd row on rank 0).
        assert report["local_elements"] <= report["elements"] * 0.55, report


def test_targets_under_fsdp2_match_one_process(tmp_path, launch_stage):
    """`ssb targets` on a sharded teacher: the ranks split the pairs (rank 1 runs an idle batch:
    forwards are collectives, so both ranks run as many) and the merged store equals one
    process's."""
    # Batches of 2: rank 0 scores 3 pairs in 2 batches, rank 1 2 pairs in 1 and then 1 idle.
    overrides = ["targets.mode=dense", "targets.batch_size=2"]
    cfg, rundir, pairs = make_run(tmp_path, "chatml", *overrides, n=5)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(rundir.pairs_path, sharded / "pairs.jsonl")
    run_targets(cfg, rundir, progress=False)

    proc = launch_stage("targets", cfg.model.name, sharded, overrides)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "rank 0/2 scores 3 of 5 pairs" in proc.stderr
    assert "rank 1/2 scores 2 of 5 pairs" in proc.stderr
    assert "1 idle batches, so every rank runs 2 forwards" in proc.stderr
    assert_sharded(sharded, "targets")
    # float32 log-probs; only the batch mates (padding) and the summation order differ.
    ids = [p["id"] for p in pairs]
    assert_same_targets(rundir.targets_dir, sharded / "targets", ids, rtol=1e-4, atol=1e-5)


# The default gradient clipping (max_grad_norm 1.0) is active: the first steps' norms exceed it.
# Activation checkpointing on, as in the paper preset.
TRAIN = ["targets.mode=hidden", "train.save_steps=1", "train.gradient_checkpointing=true"]


@pytest.mark.slow  # 16-25 s on 2 quiet CPU cores, over a minute when they are shared
def test_train_under_fsdp2_killed_and_resumed_matches_one_process(tmp_path, launch_stage):
    """6 pairs, 3 optimizer steps of 2 pairs (one process, batch 2; two ranks, batch 1 each).
    The sharded run is killed after checkpoint-1 and resumed from it; its loss curve and saved
    adapter equal one process's uninterrupted run."""
    cfg, rundir, pairs = make_run(tmp_path, "chatml", *TRAIN, n=6)
    run_targets(cfg, rundir, progress=False)
    sharded = tmp_path / "sharded"
    shutil.copytree(rundir.path, sharded)
    one = run_train(
        tiny_config(cfg.model.name, *TRAIN, "train.batch_size=2"), rundir, progress=False
    )
    assert one["steps"] == 3

    overrides = [*TRAIN, "train.batch_size=1"]
    killed = launch_stage("train", cfg.model.name, sharded, overrides, KILL_AFTER_CHECKPOINT="1")
    assert killed.returncode != 0
    assert (sharded / "checkpoints" / "checkpoint-1" / "trainer_state.json").exists()
    assert not (sharded / "adapter").exists()
    proc = launch_stage("train", cfg.model.name, sharded, overrides)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((sharded / "summary-train-rank0.json").read_text())
    assert summary["resumed_from"] == "checkpoint-1" and summary["steps"] == 3
    assert_sharded(sharded, "train")

    assert_training_matches_one_process(rundir, sharded)


DEEPSPEED_MISSING = importlib.util.find_spec("deepspeed") is None


@pytest.mark.parametrize(
    "env, message",
    [
        pytest.param(
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
            "deepspeed is not installed",
            marks=pytest.mark.skipif(not DEEPSPEED_MISSING, reason="deepspeed is installed"),
        ),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FSDP2 only"),
    ],
)
def test_unsupported_sharding_is_refused_before_loading(tmp_path, monkeypatch, env, message):
    """FSDP1, and ZeRO-3 without deepspeed installed, stop `ssb targets` and `ssb train` with
    the reason, before a model is loaded; ZeRO-2 and FSDP2 do not."""
    from ssb.sharding import launch_sharding

    cfg, rundir, _ = make_run(tmp_path, "chatml", "targets.mode=hidden", n=2)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for stage in (run_targets, run_train):
        with pytest.raises((ImportError, ValueError), match=message):
            stage(cfg, rundir, progress=False)
    assert not (rundir.targets_dir / "index.json").exists()
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert launch_sharding() in (None, "fsdp2")
