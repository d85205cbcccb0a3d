"""Parameter partitioning with DeepSpeed ZeRO-3, two CPU processes (gloo).

1. The gathers alone: `partition_for_zero3` leaves every parameter of a LoRA model an empty
   DeepSpeed parameter holding a slice; `full_parameter` gives the whole frozen lm_head back and
   `trainable_state_dict` the whole LoRA weights on rank 0, equal to the model's before it was
   partitioned, and the KD loss through the gathered head equals the unpartitioned one.
2. `ssb targets` and `ssb train` end to end under `accelerate launch` with
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
import os
from pathlib import Path

import pytest
from two_ranks import check_sharded_targets, check_sharded_training_resumes, torchrun_two_ranks

DEEPSPEED_MISSING = importlib.util.find_spec("deepspeed") is None
pytestmark = pytest.mark.skipif(
    DEEPSPEED_MISSING and not os.environ.get("SSB_EXPECT_DEEPSPEED"),
    reason="deepspeed is not installed (pip install 'ssb[deepspeed]'; `make test-zero3` does)",
)


def test_deepspeed_is_importable_where_the_zero3_pass_expects_it():
    """`make test-zero3` puts deepspeed on the path: if that failed, fail here rather than let
    every ZeRO-3 test below skip."""
    assert not DEEPSPEED_MISSING


ZERO3 = {"config": "accelerate_zero3.yaml", "DS_ACCELERATOR": "cpu"}

SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch, torch.distributed as dist

from rank_scripts import finish, kd_batch, kd_loss, lora_model, tokenizer
from ssb.bench.random_models import build_tiny_model
from ssb.sharding import (
    full_parameter, partition_for_zero3, shard_report, trainable_state_dict, zero3_for_scoring
)

batch = kd_batch()
base = build_tiny_model("llama", tokenizer(), seed=1)  # llama: a separate (untied) lm_head
model = lora_model(base)

ref_loss = kd_loss(model, model, batch)
ref_head = base.lm_head.weight.detach().clone()
ref_lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

partition_for_zero3(model)  # initialises the process group (gloo) too
rank = dist.get_rank()
report = shard_report(model)
head = full_parameter(base.lm_head.weight)
lora = trainable_state_dict(model)
engine = zero3_for_scoring(model)  # DeepSpeed's hooks gather each module around its forward
with torch.no_grad():
    loss = kd_loss(engine, model, batch)
    # The model itself carries DeepSpeed's hooks: called directly, as the online teacher is.
    direct = kd_loss(model, model, batch)
result = {
    "report": report,
    "head_equal": bool(torch.equal(head, ref_head)),
    "head_empty_after": base.lm_head.weight.numel() == 0,
    "lora_keys": sorted(lora),
    "lora_equal": all(torch.equal(lora[n], ref_lora[n]) for n in lora),
    "ref_keys": sorted(ref_lora),
    "ref_loss": ref_loss,
    "loss": loss,
    "direct": direct,
}
json.dump(result, open(f"{sys.argv[2]}.rank{rank}", "w"))
finish()
"""


def test_gathers_under_zero3_give_the_whole_tensors(tmp_path):
    """The head and LoRA gathers, and the KD loss through the gathered head, on a model
    partitioned by ZeRO-3 over two ranks; fails if the model is not actually partitioned."""
    script = tmp_path / "zero3.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out.json"
    proc = torchrun_two_ranks(
        script,
        out,
        DS_ACCELERATOR="cpu",
        # What `accelerate launch --config_file examples/accelerate_zero3.yaml` exports.
        ACCELERATE_USE_DEEPSPEED="true",
        ACCELERATE_DEEPSPEED_ZERO_STAGE="3",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        r = json.loads(Path(f"{out}.rank{rank}").read_text())
        report = r["report"]
        # Partitioned, nothing persistent yet (that is the engine's decision): every parameter
        # empty at rest, holding half of its elements (rounded up) as its slice.
        assert report["sharded_parameters"] == report["parameters"] > 0, report
        assert report["persistent_parameters"] == 0 and report["all_local_smaller"], report
        assert report["local_elements"] <= report["elements"] * 0.51, report
        assert r["head_equal"] and r["head_empty_after"]
        # The whole LoRA weights on rank 0 only, under the model's own names.
        assert r["lora_keys"] == (r["ref_keys"] if rank == 0 else [])
        assert r["lora_equal"]
        assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-5)
        assert r["direct"] == pytest.approx(r["ref_loss"], rel=1e-5)


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


def test_targets_under_zero3_match_one_process(tmp_path, launch_stage):
    """`ssb targets` on a partitioned teacher: the ranks split the pairs and the merged store
    equals one process's (see `check_sharded_targets`)."""
    check_sharded_targets(tmp_path, launch_stage, assert_partitioned, **ZERO3)


def assert_deepspeed_checkpoint(checkpoint: Path) -> None:
    assert list(checkpoint.glob("global_step*")), "not a DeepSpeed checkpoint"


@pytest.mark.slow  # 32 s on 2 quiet CPU cores, 53 s when they are shared
def test_train_under_zero3_killed_and_resumed_matches_one_process(tmp_path, launch_stage):
    """Killed after checkpoint-1 (DeepSpeed's own checkpoint) and resumed: the loss curve and
    adapter of one process's run (see `check_sharded_training_resumes`)."""
    check_sharded_training_resumes(
        tmp_path, launch_stage, assert_partitioned, assert_deepspeed_checkpoint, **ZERO3
    )
