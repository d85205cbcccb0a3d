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
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from limits import HANG_GUARD_S
from pairs_fixture import make_run, tiny_config
from safetensors.torch import load_file

from ssb.distill.store import TargetReader
from ssb.rundir import RunDir, read_jsonl
from ssb.stages.targets import run_targets
from ssb.stages.train import run_train

TESTS = Path(__file__).parent

SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch, torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from tiny_models import build_tiny_model, build_tokenizer
from ssb.distill.forward import final_hidden_states, output_head
from ssb.distill.losses import chunked_kd_loss

dist.init_process_group("gloo")
rank = dist.get_rank()
tok = build_tokenizer("chatml")
torch.manual_seed(0)
ids = torch.randint(5, len(tok), (2, 12))
mask = torch.ones_like(ids)
reply = torch.zeros_like(ids, dtype=torch.bool)
reply[:, 6:11] = True
vocab = len(tok)
teacher_logp = torch.log_softmax(torch.randn(int(reply.sum()), vocab) * 2, dim=-1)


def loss_of(shard):
    base = build_tiny_model("qwen2", tok, seed=1)
    base.config.tie_word_embeddings = False  # a separate frozen lm_head, sharded on its own
    base.lm_head.weight = torch.nn.Parameter(base.lm_head.weight.detach().clone())
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    if shard:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in base.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh, reshard_after_forward=True)
    hidden = final_hidden_states(model, ids, mask)
    weight_type = type(base.lm_head.weight).__name__
    head = output_head(model)
    out = chunked_kd_loss(hidden[reply], head.weight, {"logp": teacher_logp}, mode="dense",
                          tau=2.0, chunk_size=3)
    loss = out.loss_sum / out.num_tokens
    return float(loss), weight_type, type(head.weight).__name__, head.weight.requires_grad


ref_loss, ref_type, _, _ = loss_of(shard=False)
with torch.no_grad():
    loss, weight_type, gathered_type, gathered_grad = loss_of(shard=True)
if rank == 0:
    json.dump({"ref_loss": ref_loss, "loss": loss, "weight_type": weight_type, "ref_type": ref_type,
               "gathered_type": gathered_type, "gathered_grad": gathered_grad}, open(sys.argv[2], "w"))
# Both ranks finish their collectives before either tears gloo down, and then leave without the
# interpreter's teardown: about one run in thirty, a rank aborted there in gloo's threads
# ("terminate called without an active exception") after its results were complete.
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
import os
os._exit(0)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_kd_loss_under_fsdp2_matches_unsharded(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this Python")
    script = tmp_path / "fsdp2.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [str(torchrun), "--nproc_per_node=2", f"--master_port={free_port()}", str(script)]
    proc = subprocess.run(
        [*cmd, str(TESTS), str(out)], env=env, timeout=HANG_GUARD_S, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    # The sharded run really projected through a sharded head (gathered by output_head).
    assert r["weight_type"] == "DTensor" and r["ref_type"] == "Parameter"
    assert r["gathered_type"] == "Tensor" and r["gathered_grad"] is False
    assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-5)


# ------------------------------------------------------------------ end to end under accelerate

EXAMPLES = TESTS.parent / "examples"

STAGE_SCRIPT = r"""
import json, logging, os, sys
from pathlib import Path

logging.basicConfig(level=logging.INFO)
sys.path.insert(0, sys.argv[1])
from fsdp_on_cpu import allow_fsdp_on_cpu

allow_fsdp_on_cpu()
if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
    from deepspeed_on_cpu import allow_deepspeed_on_cpu

    allow_deepspeed_on_cpu()
import torch.distributed as dist
from transformers import TrainerCallback

from pairs_fixture import tiny_config
from ssb.rundir import RunDir

stage, model_dir, run = sys.argv[2:5]
cfg = tiny_config(model_dir, *json.loads(sys.argv[5]))
rank = int(os.environ["RANK"])


class DieAfterCheckpoint(TrainerCallback):
    # Rank 0 dies once checkpoint-<KILL_AFTER_CHECKPOINT> is written; rank 1 then fails in its
    # next collective and the launch ends.
    def on_save(self, args, state, control, **kw):
        if rank == 0 and str(state.global_step) == os.environ.get("KILL_AFTER_CHECKPOINT"):
            os._exit(9)


if stage == "targets":
    from ssb.stages.targets import run_targets

    summary = run_targets(cfg, RunDir(run), progress=False)
else:
    from ssb.stages.train import run_train

    summary = run_train(cfg, RunDir(run), progress=False, callbacks=[DieAfterCheckpoint()])
Path(run, f"summary-{stage}-rank{rank}.json").write_text(json.dumps(summary))
# As above: both ranks done with their collectives, then out without the interpreter teardown.
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""


def example_launch(accelerate: str, config: str) -> list[str]:
    """`accelerate launch` with an example config, two processes on this machine."""
    return [
        accelerate,
        "launch",
        f"--config_file={EXAMPLES / config}",
        "--num_processes=2",
        "--num_machines=1",
        "--dynamo_backend=no",
        f"--main_process_port={free_port()}",
    ]


@pytest.fixture
def launch_stage(tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("the accelerate CLI is not installed")
    script = tmp_path / "stage.py"
    script.write_text(STAGE_SCRIPT)

    def run(stage, model_dir, run_dir, overrides, config="accelerate_fsdp.yaml", **env):
        args = [str(script), str(TESTS), stage, str(model_dir), str(run_dir), json.dumps(overrides)]
        full_env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **env)
        return subprocess.run(
            example_launch(accelerate, config) + args,
            env=full_env,
            timeout=HANG_GUARD_S,
            capture_output=True,
            text=True,
        )

    return run


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
    one, two = TargetReader(rundir.targets_dir), TargetReader(sharded / "targets")
    assert sorted(one.ids()) == sorted(two.ids()) == sorted(p["id"] for p in pairs)
    two.verify()
    for example_id in one.ids():
        reply_a, a = one.get(example_id)
        reply_b, b = two.get(example_id)
        assert reply_a == reply_b
        # float32 log-probs; only the batch mates (padding) and the summation order differ.
        torch.testing.assert_close(b["logp"], a["logp"], rtol=1e-4, atol=1e-5)


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


def assert_training_matches_one_process(rundir: RunDir, sharded: Path) -> None:
    """A sharded training run (FSDP2 or ZeRO-3) in `sharded` against one process's in `rundir`:
    the loss curve, and the adapter's files, config and float32 weights."""
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
