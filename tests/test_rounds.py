"""Iterated SSB: fresh problems per round, the previous round's adapter as the model, the
adapter trained further, and the report's per-round table."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from pairs_fixture import make_run, tiny_config

from ssb.config import ConfigError, load_config
from ssb.problems import load_train_problems
from ssb.report import write_report
from ssb.rundir import RunDir, append_jsonl, atomic_write_json
from ssb.stages.base import load_base, policy_model
from ssb.stages.eval_setup import rival_pairs
from ssb.stages.pipeline import round_config
from ssb.stages.train import student_model


def test_skip_problems_gives_the_next_block():
    every = load_train_problems(load_config(overrides=["data.max_problems=20"]))
    block = load_train_problems(
        load_config(overrides=["data.max_problems=6", "data.skip_problems=9"])
    )
    assert [p.id for p in block] == [p.id for p in every[9:15]]


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["rounds=2", "targets.mode=online"], "rounds"),
        (["model.adapter=/x", "targets.mode=online"], "model.adapter"),
        (["rounds=2", "data.max_problems=null"], "rounds"),
        (["rounds=0"], "rounds"),
        (["data.skip_problems=-1"], "data.skip_problems"),
        (["round_learning_rate=0"], "round_learning_rate"),
    ],
)
def test_round_settings_are_validated(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(overrides=overrides)


def test_round_config_skips_what_earlier_rounds_scanned(tmp_path):
    cfg = load_config(overrides=["rounds=3", "data.max_problems=7", "data.skip_problems=2"])
    rundir = RunDir(tmp_path / "run")
    rundir.update_manifest(problems_scanned=7)
    with pytest.raises(ValueError, match="round 2 has not finished"):
        round_config(cfg, rundir, 3)
    rundir.round(2).update_manifest(problems_scanned=5)
    third = round_config(cfg, rundir, 3)
    assert third.data.skip_problems == 2 + 7 + 5
    assert third.model.adapter == str((tmp_path / "run" / "round2" / "adapter").resolve())
    assert third.rounds == 1 and third.name.endswith("-round3")
    assert third.train.learning_rate == cfg.train.learning_rate  # round_learning_rate unset
    slower = load_config(overrides=["rounds=3", "data.max_problems=7", "round_learning_rate=1e-5"])
    assert round_config(slower, rundir, 2).train.learning_rate == 1e-5
    assert round_config(slower, rundir, 1).train.learning_rate == slower.train.learning_rate
    assert round_config(cfg, rundir, 1) is cfg
    assert rundir.round(1) is rundir
    assert [RunDir.round_model_name(r) for r in (1, 2, 3)] == ["student", "round2", "round3"]


def test_rival_pairs():
    names = ["base", "student", "grpo", "round2", "round3", "round5"]
    assert rival_pairs(names) == [
        ("student", "grpo"),
        ("round2", "student"),
        ("round3", "round2"),
    ]  # round5 has no round4 to compare with
    assert rival_pairs(["base", "student"]) == []


def _saved_adapter(cfg, base_model, path):
    """A LoRA adapter with non-zero B (so it changes the model), saved to `path`."""
    from peft import get_peft_model

    from ssb.stages.lora_training import lora_config, restore_base

    model = get_peft_model(base_model, lora_config(cfg))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(str(path))
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    restore_base(model)
    return saved


def test_previous_round_adapter_is_the_model_and_is_trained_further(tmp_path):
    cfg, rundir, pairs = make_run(tmp_path, "chatml", n=2)
    base = load_base(cfg)
    ids = torch.tensor([pairs[0]["student_prompt_ids"]])
    before = base.model(input_ids=ids).logits.detach()
    saved = _saved_adapter(cfg, base.model, tmp_path / "prev")
    cfg2 = tiny_config(cfg.model.name, f"model.adapter={tmp_path / 'prev'}")

    # Sampling and scoring: base + the adapter, frozen; the base comes back unchanged.
    with policy_model(cfg2, base) as model:
        with_adapter = model(input_ids=ids).logits.detach()
        assert not any(p.requires_grad for p in model.parameters())
    assert (with_adapter - before).abs().max() > 1e-3
    torch.testing.assert_close(base.model(input_ids=ids).logits.detach(), before)
    assert not hasattr(base.model, "peft_config")

    # Training: the same adapter, trainable, starting from its saved values.
    student = student_model(cfg2, base.model)
    try:
        trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}
        assert trainable and set(trainable) == set(saved)
        for name, p in trainable.items():
            torch.testing.assert_close(p.detach(), saved[name])
        torch.testing.assert_close(student(input_ids=ids).logits.detach(), with_adapter)
    finally:
        from ssb.stages.lora_training import restore_base

        restore_base(student)
    # A missing adapter is a clear error.
    cfg3 = tiny_config(cfg.model.name, f"model.adapter={tmp_path / 'nope'}")
    with pytest.raises(FileNotFoundError, match="model.adapter"):
        with policy_model(cfg3, base):
            pass


def test_model_identity_records_the_adapter(tmp_path):
    from ssb.identity import model_identity

    cfg, _, _ = make_run(tmp_path, "chatml", n=1)
    base = load_base(cfg)
    _saved_adapter(cfg, base.model, tmp_path / "prev")
    cfg2 = tiny_config(cfg.model.name, f"model.adapter={tmp_path / 'prev'}")
    ident = model_identity(cfg2.model, base.tokenizer)
    assert ident["adapter_hash"] and ident["adapter"] == str(tmp_path / "prev")
    assert "adapter_hash" not in model_identity(cfg.model, base.tokenizer)


def test_report_shows_each_round(tmp_path):
    rundir = RunDir(tmp_path / "run")
    rounds = {1: (40, 6), 2: (40, 9)}
    for r, (scanned, kept) in rounds.items():
        sub = rundir.round(r)
        sub.update_manifest(problems_scanned=scanned)
        append_jsonl(sub.pairs_path, [{"id": f"r{r}p{i}"} for i in range(kept)])
        decisions = [{"id": f"r{r}p{i}", "status": "kept"} for i in range(kept)]
        decisions += [{"id": f"r{r}x{i}", "status": "all_wrong"} for i in range(scanned - kept)]
        append_jsonl(sub.bootstrap_log_path, decisions)
        append_jsonl(sub.train_log_path, [{"step": 1, "loss": 0.5 / r}, {"step": 2, "loss": 0.2}])
    acc = {"base": 0.30, "student": 0.35, "round2": 0.41}
    result = {m: {"synthetic": {"n": 100, "accuracy": a}} for m, a in acc.items()}
    head = {"model": "round2", "vs": "student", "benchmark": "synthetic", "n": 100, "wins": 9}
    head.update(losses=3, ties=88, mcnemar_p=0.146, diff=0.06, diff_interval=[-0.01, 0.13])
    summary = {"settings": {"metric": "pass@1"}, "results": result, "head_to_head": [head]}
    atomic_write_json(rundir.eval_dir / "summary.json", copy.deepcopy(summary))
    text = write_report(rundir).read_text()
    assert "## Iterated rounds" in text
    assert "| 1 | `.` | 40 | 6 | 6 | 15.0% | 0.500 -> 0.200 | 35.0% |" in text
    assert "| 2 | `round2` | 40 | 9 | 9 | 22.5% | 0.250 -> 0.200 | 41.0% |" in text
    assert "| base |" in text and "30.0%" in text
    assert "| round2 vs student | synthetic | 100 | 9 | 3 | 88 | +6.0 pp" in text
    json.loads((rundir.eval_dir / "summary.json").read_text())  # untouched
