"""The one recipe of every LoRA training (`ssb.stages.lora_training.run_lora_training`), run on a
training of its own (plain next-token loss on fixed token rows through transformers' Trainer): a
killed run resumes its newest checkpoint without duplicate log steps, a checkpoint of other
settings is refused, only the main process writes the log head, the fingerprint and the adapter
(and every process waits for it), and the base model is given back as it was, also when building
the trainer fails. The callers (train, grpo, onpolicy) are tested for what they add.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from typing import Any

import pytest
import torch
from peft import get_peft_model
from transformers import Trainer, TrainingArguments
from trl import GRPOConfig

from ssb.bench.random_models import build_tiny_model, build_tokenizer
from ssb.config import load_config
from ssb.rundir import read_jsonl
from ssb.stages.lora_training import (
    JsonlLogCallback,
    LoraFiles,
    LoraTraining,
    attach_reporting,
    lora_config,
    run_lora_training,
    shared_arguments,
)

CPU = torch.device("cpu")


def config(*extra: str):
    return load_config(
        overrides=[
            "train.lora.r=4",
            "train.lora.alpha=8",
            "train.learning_rate=1e-2",
            "train.save_steps=1",
            *extra,
        ]
    )


class TokenRows(torch.utils.data.Dataset):
    """Six fixed rows of token ids, each its own next-token target."""

    def __init__(self, vocab: int):
        gen = torch.Generator().manual_seed(0)
        self.rows = torch.randint(0, vocab, (6, 12), generator=gen)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


@dataclasses.dataclass(kw_only=True)
class PlainTraining(LoraTraining):
    """A fourth training: what a caller of the recipe writes."""

    cfg: Any
    steps: int = 3
    main_process: bool = True  # False: this process plays a rank other than 0
    fail: bool = False  # building the trainer fails
    trained: bool = False  # trainer.train returned
    waits: list[bool] = dataclasses.field(default_factory=list)  # `trained` at each wait

    def attach(self, base_model: Any) -> Any:
        torch.manual_seed(0)
        return get_peft_model(base_model, lora_config(self.cfg))

    def make_trainer(self, model: Any) -> Trainer:
        if self.fail:
            raise RuntimeError("no trainer")
        args = shared_arguments(
            TrainingArguments,
            self.cfg,
            "train",
            output_dir=self.files.checkpoints_dir,
            run_name="plain",
            device=CPU,
            progress=False,
            per_device_train_batch_size=2,
            max_steps=self.steps,
            logging_steps=1,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=TokenRows(model.config.vocab_size),
            callbacks=[JsonlLogCallback(self.files.log_path)],
        )
        attach_reporting(trainer, self.files.checkpoints_dir.parent, progress=False)
        if not self.main_process:  # also what Trainer tells the callbacks (the log's)
            trainer.is_world_process_zero = lambda: False
        train, wait = trainer.train, trainer.accelerator.wait_for_everyone

        def training(*args: Any, **kwargs: Any) -> Any:
            result = train(*args, **kwargs)
            self.trained = True
            return result

        def waiting() -> None:
            self.waits.append(self.trained)
            wait()

        trainer.train, trainer.accelerator.wait_for_everyone = training, waiting
        return trainer

    def summary(self, trainer: Trainer, result: Any) -> dict[str, Any]:
        return {"checked": True}


@pytest.fixture
def base():
    model = build_tiny_model("qwen2", build_tokenizer("chatml"))
    model.eval()
    return model


def plain(tmp_path, cfg, **kw) -> PlainTraining:
    files = LoraFiles(
        checkpoints_dir=tmp_path / "checkpoints",
        log_path=tmp_path / "train_log.jsonl",
        adapter_dir=tmp_path / "adapter",
        fingerprint_name="plain.json",
    )
    fingerprint = {"learning_rate": cfg.train.learning_rate}
    return PlainTraining(name="plain", files=files, fingerprint=fingerprint, cfg=cfg, **kw)


def assert_given_back(model, before: dict[str, torch.Tensor]) -> None:
    assert not any("lora" in name for name, _ in model.named_modules())
    assert not hasattr(model, "peft_config") and not model.training
    assert not model.get_input_embeddings()._forward_hooks
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_refusal_and_the_base_given_back(tmp_path, base):
    cfg = config()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    first = run_lora_training(plain(tmp_path, cfg), base)
    assert first["steps"] == 3 and "resumed_from" not in first
    assert first["adapter"] == str(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((tmp_path / "checkpoints" / "plain.json").read_text()) == {
        "learning_rate": 1e-2
    }
    assert_given_back(base, before)
    full_log = read_jsonl(tmp_path / "train_log.jsonl")
    assert [r["step"] for r in full_log] == [1, 2, 3]

    # Killed after step 3 was logged, before its checkpoint and the adapter were written.
    shutil.rmtree(tmp_path / "checkpoints" / "checkpoint-3")
    shutil.rmtree(tmp_path / "adapter")
    second = run_lora_training(plain(tmp_path, cfg), base)
    assert second["resumed_from"] == "checkpoint-2" and second["steps"] == 3
    log = read_jsonl(tmp_path / "train_log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3] and log[:2] == full_log[:2]
    assert log[2]["loss"] == pytest.approx(full_log[2]["loss"], rel=1e-5)  # redone alike
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert_given_back(base, before)
    # The training's own keys, and the loss over every step, the ones before the resume too
    # (Trainer's `training_loss` covers only the one step this process ran).
    assert second["checked"] and second["train_loss"] == pytest.approx(
        sum(r["loss"] for r in log) / 3, rel=1e-5
    )

    # Other settings than the checkpoints': refused before anything is attached or written.
    with pytest.raises(ValueError, match="learning_rate"):
        run_lora_training(plain(tmp_path, config("train.learning_rate=1e-3")), base)
    assert read_jsonl(tmp_path / "train_log.jsonl") == log
    assert_given_back(base, before)


def test_a_failed_build_gives_the_base_back(tmp_path, base):
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(RuntimeError, match="no trainer"):
        run_lora_training(plain(tmp_path, config(), fail=True), base)
    assert_given_back(base, before)
    assert not (tmp_path / "checkpoints" / "plain.json").exists()


@pytest.mark.parametrize("main_process", [True, False])
def test_only_the_main_process_writes_and_every_process_waits(tmp_path, base, main_process):
    """Another rank trains and reaches the adapter save (a collective under FSDP2) and the wait,
    but leaves the log (here an earlier attempt's step, which rank 0 drops), the fingerprint and
    the adapter to rank 0."""
    (tmp_path / "train_log.jsonl").write_text(json.dumps({"step": 7, "loss": 1.0}) + "\n")
    training = plain(tmp_path, config("train.save_steps=100"), main_process=main_process)
    summary = run_lora_training(training, base)
    assert summary["steps"] == 3
    steps = [r["step"] for r in read_jsonl(tmp_path / "train_log.jsonl")]
    assert steps == ([1, 2, 3] if main_process else [7])
    assert (tmp_path / "checkpoints" / "plain.json").exists() == main_process
    assert (tmp_path / "adapter").exists() == main_process
    assert training.waits[-1]  # after training, before the summary


def test_train_and_grpo_arguments_share_one_builder(tmp_path):
    """The fields both set come from the config section each names; TRL's own defaults
    (checkpointing and bf16 on) give way to the project's."""
    cfg = config("grpo.learning_rate=3e-6", "grpo.warmup_ratio=0.25", "grpo.save_steps=7")
    common = {"output_dir": tmp_path, "run_name": "r", "device": CPU, "progress": False}
    train = shared_arguments(TrainingArguments, cfg, "train", **common)
    grpo = shared_arguments(GRPOConfig, cfg, "grpo", **common, logging_steps=1)
    assert (train.learning_rate, grpo.learning_rate) == (1e-2, 3e-6)
    assert (train.save_steps, grpo.save_steps) == (1, 7)
    assert grpo.get_warmup_steps(8) == 2 and train.get_warmup_steps(8) == 0
    assert grpo.logging_steps == 1  # a field of its own wins
    for args in (train, grpo):
        assert not args.gradient_checkpointing and not args.bf16 and not args.fp16
        assert args.seed == args.data_seed == cfg.seed and args.save_total_limit == 2
        assert args.output_dir == str(tmp_path) and args.use_cpu
    # A warmup ratio of 1 (transformers 5 would read it as one step) never reaches the builder.
    with pytest.raises(ValueError, match="warmup_ratio: must be in \\[0, 1\\)"):
        dataclasses.replace(cfg.grpo, warmup_ratio=1.0)
