"""What the two-process tests (DDP, FSDP2, ZeRO-3 on CPU processes over gloo) share on the
pytest side: launching scripts on two ranks, launching a stage under `accelerate launch` with an
example config, and comparing a two-process run's targets and training with one process's
(`check_sharded_targets`, `check_sharded_training_resumes`: the FSDP2 and ZeRO-3 runs alike).
What the launched scripts share in each process is in `rank_scripts.py`."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from limits import HANG_GUARD_S
from safetensors.torch import load_file

from ssb.distill.store import TargetReader
from ssb.rundir import RunDir, read_jsonl

TESTS = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_two_ranks(script: Path, out: Path, **env: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=2 script TESTS out`; skips the test without torchrun."""
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this Python")
    full_env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **env)
    cmd = [str(torchrun), "--nproc_per_node=2", f"--master_port={free_port()}", str(script)]
    return subprocess.run(
        [*cmd, str(TESTS), str(out)],
        env=full_env,
        timeout=HANG_GUARD_S,
        capture_output=True,
        text=True,
    )


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
from transformers import TrainerCallback

from pairs_fixture import tiny_config
from rank_scripts import finish
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
finish()
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
    """`launch_stage(stage, model_dir, run_dir, overrides, config=..., **env)`: `ssb targets` or
    `ssb train` on two CPU processes under `accelerate launch` with an example config (FSDP2 by
    default); `KILL_AFTER_CHECKPOINT=N` in env kills rank 0 once checkpoint-N is written."""
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


def assert_same_targets(
    one_dir: Path, two_dir: Path, ids: list[str], rtol: float, atol: float
) -> None:
    """The target store a two-process run merged in `two_dir` holds exactly the pairs `ids`, each
    once, verified, with the replies and (within rtol/atol) the floating tensors one process
    wrote in `one_dir`."""
    one, two = TargetReader(one_dir), TargetReader(two_dir)
    assert sorted(one.ids()) == sorted(two.ids()) == sorted(ids)
    two.verify()
    for example_id in one.ids():
        reply_a, a = one.get(example_id)
        reply_b, b = two.get(example_id)
        assert reply_a == reply_b
        assert a.keys() == b.keys()
        for key in a:
            if a[key].is_floating_point():
                torch.testing.assert_close(b[key].float(), a[key].float(), rtol=rtol, atol=atol)
            elif key != "ids":  # top-k ids may swap where batch mates move a low bit
                assert torch.equal(b[key], a[key]), (example_id, key)


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


# The sharded training run's settings (FSDP2 and ZeRO-3 alike): the default gradient clipping
# (max_grad_norm 1.0) is active, the first steps' norms exceed it; activation checkpointing on,
# as in the paper preset.
SHARDED_TRAIN = ["targets.mode=hidden", "train.save_steps=1", "train.gradient_checkpointing=true"]


def check_sharded_targets(
    tmp_path: Path, launch_stage, assert_sharded: Callable[[Path, str], None], **launch: str
) -> None:
    """`ssb targets` on a teacher sharded over two ranks (`launch`: `launch_stage`'s config and
    env): the ranks split the pairs (rank 1 runs an idle batch: forwards are collectives, so both
    ranks run as many), `assert_sharded` holds on every rank, and the merged store equals one
    process's."""
    # Here, not at the top: conftest imports this module for every test, these load the stages.
    from pairs_fixture import make_run

    from ssb.stages.targets import run_targets

    # Batches of 2: rank 0 scores 3 pairs in 2 batches, rank 1 2 pairs in 1 and then 1 idle.
    overrides = ["targets.mode=dense", "targets.batch_size=2"]
    cfg, rundir, pairs = make_run(tmp_path, "chatml", *overrides, n=5)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(rundir.pairs_path, sharded / "pairs.jsonl")
    run_targets(cfg, rundir, progress=False)

    proc = launch_stage("targets", cfg.model.name, sharded, overrides, **launch)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "rank 0/2 scores 3 of 5 pairs" in proc.stderr
    assert "rank 1/2 scores 2 of 5 pairs" in proc.stderr
    assert "1 idle batches, so every rank runs 2 forwards" in proc.stderr
    assert_sharded(sharded, "targets")
    # float32 log-probs; only the batch mates (padding) and the summation order differ.
    ids = [p["id"] for p in pairs]
    assert_same_targets(rundir.targets_dir, sharded / "targets", ids, rtol=1e-4, atol=1e-5)


def check_sharded_training_resumes(
    tmp_path: Path,
    launch_stage,
    assert_sharded: Callable[[Path, str], None],
    check_checkpoint: Callable[[Path], None] = lambda checkpoint: None,
    **launch: str,
) -> None:
    """6 pairs, 3 optimizer steps of 2 pairs (one process, batch 2; two ranks, batch 1 each).
    The sharded run is killed after checkpoint-1 (`check_checkpoint` looks at it) and resumed
    from it; `assert_sharded` holds on every rank, and its loss curve and saved adapter equal one
    process's uninterrupted run."""
    from pairs_fixture import make_run, tiny_config

    from ssb.stages.targets import run_targets
    from ssb.stages.train import run_train

    cfg, rundir, _ = make_run(tmp_path, "chatml", *SHARDED_TRAIN, n=6)
    run_targets(cfg, rundir, progress=False)
    sharded = tmp_path / "sharded"
    shutil.copytree(rundir.path, sharded)
    one = run_train(
        tiny_config(cfg.model.name, *SHARDED_TRAIN, "train.batch_size=2"), rundir, progress=False
    )
    assert one["steps"] == 3

    overrides = [*SHARDED_TRAIN, "train.batch_size=1"]
    killed = launch_stage(
        "train", cfg.model.name, sharded, overrides, KILL_AFTER_CHECKPOINT="1", **launch
    )
    assert killed.returncode != 0
    checkpoint = sharded / "checkpoints" / "checkpoint-1"
    assert (checkpoint / "trainer_state.json").exists()
    check_checkpoint(checkpoint)
    assert not (sharded / "adapter").exists()
    proc = launch_stage("train", cfg.model.name, sharded, overrides, **launch)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((sharded / "summary-train-rank0.json").read_text())
    assert summary["resumed_from"] == "checkpoint-1" and summary["steps"] == 3
    assert_sharded(sharded, "train")

    assert_training_matches_one_process(rundir, sharded)
