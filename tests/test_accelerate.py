"""Training under `accelerate launch` with two CPU processes (DDP, gloo backend).

One optimizer step over 4 pairs of different reply lengths, split over two processes (batch 2
each), must move the LoRA weights exactly as one process with batch 4 does: the loss is
normalised by the reply tokens of the whole step across processes, and gradients are all-reduced
(they are only if the forward goes through the DDP wrapper). Then `run_train` itself runs under
DDP with the online teacher: the adapter is saved once and each step is logged once.

accelerate's `--cpu` launcher starts a single process; `--multi_gpu` starts one process per rank
through torchrun, and the Trainer's `use_cpu` (set by run_train on CPU) makes them a MULTI_CPU
(gloo) group.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from limits import HANG_GUARD_S
from pairs_fixture import make_run
from safetensors.torch import load_file
from two_ranks import TESTS, assert_same_targets, free_port

from ssb.distill.store import TargetReader
from ssb.rundir import RunDir, read_jsonl
from ssb.stages.targets import PARTS_DIR, run_targets, score_into, targets_meta

SCRIPT = r"""
import json, sys
from pathlib import Path

sys.path.insert(0, sys.argv[1])
import torch
from peft import get_peft_model
from safetensors.torch import save_file

from pairs_fixture import tiny_config
from ssb.distill.store import TargetReader
from ssb.models import load_model_and_tokenizer
from ssb.rundir import RunDir, read_jsonl
from ssb.stages.lora_training import lora_config
from ssb.stages.train import make_trainer, run_train


def sgd_step(model_dir, run_path, out_path, batch_size):
    cfg = tiny_config(model_dir, "targets.mode=dense", f"train.batch_size={batch_size}")
    rundir = RunDir(run_path)
    pairs = read_jsonl(rundir.pairs_path)
    base, tok = load_model_and_tokenizer(cfg.model)
    torch.manual_seed(0)
    model = get_peft_model(base, lora_config(cfg))
    trainer = make_trainer(
        cfg, rundir, model, tok, pairs, TargetReader(rundir.targets_dir), False,
        optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0,
        max_steps=1, save_strategy="no",
    )
    trainer.train()
    if trainer.is_world_process_zero():
        weights = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(weights, out_path)
        logged = trainer.state.log_history[0]
        Path(out_path + ".json").write_text(json.dumps({
            "log": {k: logged[k] for k in ("loss", "kd", "ce", "reply_len", "grad_norm")},
            "world": trainer.accelerator.num_processes,
            "distributed_type": str(trainer.accelerator.distributed_type),
        }))


if __name__ == "__main__":
    model_dir, run_path, out_path, batch_size = sys.argv[2:6]
    sgd_step(model_dir, run_path, out_path, int(batch_size))
    if len(sys.argv) > 6:  # then the whole training stage (online teacher), 1 pair per rank
        cfg = tiny_config(model_dir, "targets.mode=online", "train.batch_size=1")
        summary = run_train(cfg, RunDir(sys.argv[6]), progress=False)
        Path(sys.argv[6], f"summary-{summary['steps']}.json").write_text(json.dumps(summary))
"""


def two_process_launch(accelerate: str) -> list[str]:
    """`accelerate launch` for two processes on this machine (gloo when there is no GPU)."""
    return [
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes=2",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        f"--main_process_port={free_port()}",
    ]


def test_ddp_two_cpu_processes_match_one(tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("the accelerate CLI is not installed")
    cfg, rundir, pairs = make_run(tmp_path, "chatml", "targets.mode=dense", n=4)
    assert len({len(p["reply_ids"]) for p in pairs}) == 4  # every split changes token counts
    run_targets(cfg, rundir, progress=False)
    stage_dir = tmp_path / "stage"
    shutil.copytree(rundir.path, stage_dir)
    script = tmp_path / "ddp_step.py"
    script.write_text(SCRIPT)
    model_dir = str(cfg.model.name)

    single = str(tmp_path / "single.safetensors")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, str(script), str(TESTS), model_dir, str(rundir.path), single, "4"]
    subprocess.run(cmd, check=True, env=env, timeout=HANG_GUARD_S)

    ddp = str(tmp_path / "ddp.safetensors")
    launch = two_process_launch(accelerate)
    args = [str(script), str(TESTS), model_dir, str(rundir.path), ddp, "2", str(stage_dir)]
    proc = subprocess.run(
        launch + args, env=env, timeout=HANG_GUARD_S, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    info = json.loads(Path(ddp + ".json").read_text())
    assert info["world"] == 2 and info["distributed_type"].endswith("MULTI_CPU")
    one, two = load_file(single), load_file(ddp)
    assert one.keys() == two.keys()
    init_b = torch.zeros(())  # lora_B starts at zero, so its value after one step is the step
    moved = torch.cat([one[k].flatten() for k in one if "lora_B" in k])
    assert moved.abs().max() > init_b + 1e-4
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-7)
    # What is logged (and sent to the trackers) is the step's, not one process's: the loss and
    # kd/ce per reply token of both processes, reply_len over both, the synced gradient's norm.
    single_log = json.loads(Path(single + ".json").read_text())["log"]
    for key, value in single_log.items():
        assert info["log"][key] == pytest.approx(value, rel=1e-5), key
    assert single_log["loss"] == pytest.approx(single_log["kd"], rel=1e-5)  # ce_weight = 0

    # run_train under DDP, online teacher: 4 pairs, 1 per process and step -> 2 steps, each
    # logged once, with the token statistics of both processes.
    summary = json.loads((stage_dir / "summary-2.json").read_text())
    assert summary["steps"] == 2
    log = read_jsonl(stage_dir / "train_log.jsonl")
    assert [r["step"] for r in log] == [1, 2]
    lengths = sorted(len(p["reply_ids"]) + 1 for p in pairs)
    assert sum(r["reply_len"] for r in log) * 2 == pytest.approx(sum(lengths))
    assert (stage_dir / "adapter" / "adapter_model.safetensors").exists()


TARGETS_SCRIPT = r"""
import json, logging, sys
from pathlib import Path

logging.basicConfig(level=logging.INFO)

sys.path.insert(0, sys.argv[1])
from pairs_fixture import tiny_config
from ssb.rundir import RunDir
from ssb.stages.targets import run_targets

cfg = tiny_config(sys.argv[2], f"targets.mode={sys.argv[4]}")
summary = run_targets(cfg, RunDir(sys.argv[3]), progress=False)
Path(sys.argv[3], "summary.json").write_text(json.dumps(summary))
"""


@pytest.mark.parametrize("mode", ["hidden", "topk"])
def test_targets_two_cpu_processes_match_one(tmp_path, mode):
    """`ssb targets` under accelerate launch: the two ranks split the pairs, and the merged store
    holds every pair once, with the targets one process computes."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("the accelerate CLI is not installed")
    cfg, rundir, pairs = make_run(tmp_path, "chatml", f"targets.mode={mode}", n=5)
    multi = tmp_path / "multi"
    multi.mkdir()
    shutil.copy(rundir.pairs_path, multi / "pairs.jsonl")
    run_targets(cfg, rundir, progress=False)

    script = tmp_path / "targets.py"
    script.write_text(TARGETS_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    launch = two_process_launch(accelerate)
    args = [str(script), str(TESTS), str(cfg.model.name), str(multi), mode]
    proc = subprocess.run(
        launch + args, env=env, timeout=HANG_GUARD_S, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "rank 0/2 scores 3 of 5 pairs" in proc.stderr  # both ranks did a share
    assert "rank 1/2 scores 2 of 5 pairs" in proc.stderr

    summary = json.loads((multi / "summary.json").read_text())
    assert summary["examples"] == 5 and summary["scored"] == 5
    assert not (multi / "targets" / PARTS_DIR).exists()  # merged and cleaned up
    # Different batch mates (padding) may move a low bit of a bf16/fp16 value.
    ids = [p["id"] for p in pairs]
    assert_same_targets(rundir.targets_dir, multi / "targets", ids, rtol=2e-2, atol=2e-2)


def test_parts_left_by_a_killed_run_are_merged_not_rescored(tmp_path):
    """A rank's part store that a kill left behind is merged on the next run; only the rest is
    scored."""
    from ssb.stages.base import load_base

    cfg, rundir, pairs = make_run(tmp_path, "chatml", "targets.mode=hidden", n=5)
    base = load_base(cfg)
    meta = targets_meta(cfg, base.model, base.tokenizer)
    part = rundir.targets_dir / PARTS_DIR / "rank1"
    assert score_into(part, base.model, pairs[:2], 0, cfg.targets, meta, progress=False) == 2
    summary = run_targets(cfg, RunDir(rundir.path), progress=False)
    assert summary["examples"] == 5 and summary["scored"] == 3
    assert not (rundir.targets_dir / PARTS_DIR).exists()
    TargetReader(rundir.targets_dir).verify()
