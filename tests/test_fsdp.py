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
from pathlib import Path

import pytest
from pairs_fixture import make_run
from two_ranks import check_sharded_targets, check_sharded_training_resumes, torchrun_two_ranks

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
    """`ssb targets` on a sharded teacher: the ranks split the pairs and the merged store equals
    one process's (see `check_sharded_targets`)."""
    check_sharded_targets(tmp_path, launch_stage, assert_sharded)


@pytest.mark.slow  # 16-25 s on 2 quiet CPU cores, over a minute when they are shared
def test_train_under_fsdp2_killed_and_resumed_matches_one_process(tmp_path, launch_stage):
    """Killed after checkpoint-1 and resumed: the loss curve and adapter of one process's run
    (see `check_sharded_training_resumes`)."""
    check_sharded_training_resumes(tmp_path, launch_stage, assert_sharded)


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
