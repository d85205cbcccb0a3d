"""`ssb ablate`: every arm with two seeds on a tiny model, killed after its first finished arm
and seed and resumed (finished ones are not redone), one evaluation of every model, the summary
and the report; plus the pieces (arm data, equal steps, config checks) on their own."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from kill_at import signal_at_trigger
from pairs_fixture import EXAMPLES, make_pairs

from ssb.ablation import arms as ablation_arms
from ssb.ablation.onpolicy import sampled_pair
from ssb.bench.random_models import save_tiny_model
from ssb.config import ConfigError, load_config
from ssb.generate.base import Completion
from ssb.rundir import RunDir, append_jsonl, read_jsonl

ARMS = ["ssb", "sft", "rft", "onpolicy", "grpo", "ssb.correct_only", "ssb.gold"]
SEEDS = [0, 1]


def sets(root: Path) -> list[str]:
    data = root / "data.jsonl"
    return [
        f"model.name={root / 'model'}",
        "model.dtype=float32",
        "model.device=cpu",
        "generation.backend=hf",
        f"data.train={data}",
        "data.id_field=id",
        "data.max_problems=null",
        "rollout.num_samples=3",
        "generation.batch_size=4",
        "generation.max_new_tokens=16",
        "bootstrap.attempts=3",
        f"eval.benchmarks=[{data}]",
        "eval.max_problems=null",
        "prompt.num_fewshot=1",
        "targets.batch_size=3",
        "targets.topk=16",
        "train.lora.r=4",
        "train.lora.alpha=8",
        "train.batch_size=2",
        "train.epochs=1",
        "train.save_steps=1",
        "train.learning_rate=1e-2",
        "train.loss.chunk_size=5",
        "grpo.num_generations=2",
        "grpo.max_completion_length=8",
        "grpo.learning_rate=1e-2",
        "ablate.teacher_contexts=[correct_only,gold]",
        "ablate.onpolicy_max_new_tokens=8",
    ]


def rollout_record(i: int, question: str, gold: str, reply: str, tokenizer: Any) -> dict:
    """Two correct samples with the same text up to spacing (one rft example) and a wrong one."""

    def sample(text: str, answer: str, correct: bool) -> dict:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return {"text": text, "token_ids": ids, "finish_reason": "stop", "answer": answer,
                "correct": correct}  # fmt: skip

    own = f" So it is {gold}. The answer is \\boxed{{{gold}}}."  # not the teacher's reply
    samples = [sample(own, gold, True), sample(own + "  ", gold, True)]
    samples.append(sample(" 1 + 1 = 3. The answer is \\boxed{3}.", "3", False))
    return {"id": f"p{i}", "question": question, "gold": gold, "source": "data",
            "solution": reply, "samples": samples, "num_correct": 2}  # fmt: skip


@pytest.fixture(scope="module")
def run_root(tmp_path_factory) -> Path:
    """A tiny model, six problems (with worked solutions), and a run directory that already has
    rollouts, a bootstrap decision for every problem and six pairs."""
    from ssb.stages.base import load_base

    root = tmp_path_factory.mktemp("ablate")
    save_tiny_model(root / "model", "qwen2", "chatml")
    with (root / "data.jsonl").open("w") as f:
        for i, (question, _, reply) in enumerate(EXAMPLES):
            f.write(json.dumps({"id": f"p{i}", "question": question, "answer": reply}) + "\n")
    cfg = load_config(overrides=sets(root))
    tokenizer = load_base(cfg).tokenizer
    run = RunDir(root / "run")
    append_jsonl(run.pairs_path, make_pairs(tokenizer, cfg))
    append_jsonl(
        run.rollouts_path,
        [rollout_record(i, q, g, r, tokenizer) for i, (q, g, r) in enumerate(EXAMPLES)],
    )
    append_jsonl(run.bootstrap_log_path, [{"id": f"p{i}", "status": "kept"} for i in range(6)])
    return root


def argv(root: Path) -> list[str]:
    out = ["ablate", "--run-dir", str(root / "run"), "--quiet", "--seeds", "2"]
    for s in sets(root):
        out += ["--set", s]
    return out


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_ablate_every_arm_two_seeds_killed_and_resumed(run_root, monkeypatch):
    from ssb.cli import main

    ablate = run_root / "run" / "ablate"
    first = ablate / "ssb" / "seed0"
    signal_at_trigger([sys.executable, "-m", "ssb", *argv(run_root)], first / "done.json")
    done_before = {p.parent.relative_to(ablate) for p in ablate.glob("*/seed*/done.json")}
    assert Path("ssb/seed0") in done_before and len(done_before) < len(ARMS) * len(SEEDS)
    kept = {
        "done": digest(first / "done.json"),
        "adapter": digest(first / "adapter" / "adapter_model.safetensors"),
        "log": digest(first / "train_log.jsonl"),
    }

    # A random tiny teacher is never right: count every teacher sample that stopped as correct,
    # so the teacher-context arms get pairs. Every arm's data is made before any training, so
    # the killed run already made (empty) context bootstraps: the resumed run makes them again.
    monkeypatch.setattr("ssb.stages.bootstrap.grade", lambda text, gold: True)
    for context in ("correct_only", "gold"):
        shutil.rmtree(ablate / f"ssb.{context}")
    assert main(argv(run_root)) == 0

    # The arm and seed finished before the kill was not redone.
    assert digest(first / "done.json") == kept["done"]
    assert digest(first / "adapter" / "adapter_model.safetensors") == kept["adapter"]
    assert digest(first / "train_log.jsonl") == kept["log"]

    summary = json.loads((ablate / "summary.json").read_text())
    steps = summary["steps"]
    assert steps == 3  # ceil(1 epoch x 6 pairs / batch 2), for every arm
    assert list(summary["arms"]) == ARMS
    bench = summary["benchmarks"][0]
    for arm in ARMS:
        entry = summary["arms"][arm]
        assert list(entry["seeds"]) == ["0", "1"], arm
        for seed in SEEDS:
            armdir = ablate / arm / f"seed{seed}"
            manifest = json.loads((armdir / "manifest.json").read_text())
            assert manifest["stages"]["train"]["steps"] == steps, arm
            result = entry["seeds"][str(seed)]["results"][bench]
            assert result["n"] == 6 and 0 <= result["interval"][0] <= result["interval"][1] <= 1
            assert result["vs_base"]["n"] == 6
            assert ("vs_ssb" in result) == (arm != "ssb")
            records = read_jsonl(ablate / "eval" / f"{arm}-seed{seed}-data.jsonl")
            assert sorted(r["id"] for r in records) == [f"p{i}" for i in range(6)]
        across = entry["across_seeds"][bench]
        assert across["n_seeds"] == 2 and across["min"] <= across["mean"] <= across["max"]
        assert across["pooled_vs_base"]["n"] == 6
    # Seeds differ (LoRA init, data order); the losses differ between arms.
    seed_weights = [
        digest(ablate / "ssb" / f"seed{s}" / "adapter" / "adapter_model.safetensors") for s in SEEDS
    ]
    assert seed_weights[0] != seed_weights[1]
    ssb_log = read_jsonl(first / "train_log.jsonl")
    sft_log = read_jsonl(ablate / "sft" / "seed0" / "train_log.jsonl")
    assert all(r["kd"] > 0 and r["ce"] > 0 for r in ssb_log)
    assert all(r["kd"] == 0 and r["loss"] == pytest.approx(r["ce"]) for r in sft_log)
    # rft: the distinct correct rollouts (two per problem differ only in spacing: one each).
    rft_pairs = read_jsonl(ablate / "rft" / "pairs.jsonl")
    assert sorted(p["problem_id"] for p in rft_pairs) == [f"p{i}" for i in range(6)]
    assert summary["arms"]["rft"]["data"]["examples"] == 6
    assert all(p["reply"].startswith(" So it is") for p in rft_pairs)
    rft_log = read_jsonl(ablate / "rft" / "seed0" / "train_log.jsonl")
    assert all(r["kd"] == 0 for r in rft_log) and rft_log != sft_log
    # onpolicy: the student sampled every step's replies; the teacher scored each.
    onpolicy_cost = summary["arms"]["onpolicy"]["seeds"]["0"]["cost"]
    assert onpolicy_cost["teacher_forwards"] == steps * 2 and onpolicy_cost["generated_tokens"] > 0
    assert summary["arms"]["grpo"]["seeds"]["0"]["cost"]["generated_tokens"] > 0
    # The run's own pairs (ssb, sft, onpolicy) with their context and yield (the fixture's
    # bootstrap log: 6 problems, all kept). grpo trains on problems, not pairs.
    for arm in ("ssb", "sft", "onpolicy"):
        data = summary["arms"][arm]["data"]
        assert data["teacher_context"] == "correct_and_incorrect" and data["examples"] == 6
        assert data["mixed"] == 6 and data["pair_yield"] == 1.0
    assert "pair_yield" not in summary["arms"]["grpo"]["data"]
    # Teacher contexts: their own bootstraps on the run's rollouts, with their pair yield.
    for context in ("correct_only", "gold"):
        data = summary["arms"][f"ssb.{context}"]["data"]
        assert data["teacher_context"] == context and data["mixed"] == 6
        assert 0 < data["examples"] <= 6 and data["pair_yield"] == data["examples"] / 6
        pairs = read_jsonl(ablate / f"ssb.{context}" / "pairs.jsonl")
        hint = "reference solution" if context == "gold" else "correct solution"
        assert all(hint in p["teacher_messages"][-1]["content"] for p in pairs)
    report = (ablate / "report.md").read_text()
    assert "pooled vs ssb" in report and "## Training cost" in report
    assert (ablate / "plots" / "training.png").read_bytes()[:4] == b"\x89PNG"

    # Once more: nothing trained or evaluated again.
    eval_files = {p: digest(p) for p in (ablate / "eval").glob("*.jsonl")}
    assert main(argv(run_root)) == 0
    assert {p: digest(p) for p in (ablate / "eval").glob("*.jsonl")} == eval_files
    assert digest(first / "done.json") == kept["done"]
    # The run report carries the ablation section.
    assert main(["report", "--run-dir", str(run_root / "run"), "--quiet"]) == 0
    assert "Ablation: what makes SSB work" in (run_root / "run" / "report.md").read_text()


def test_equal_steps_and_arm_list():
    cfg = load_config(overrides=["train.epochs=3", "train.batch_size=4", "ablate.seeds=3"])
    assert ablation_arms.equal_steps(cfg, 100) == 75
    assert ablation_arms.equal_steps(cfg, 101) == 78  # a short last batch is a step
    fixed = load_config(overrides=["ablate.steps=7"])
    assert ablation_arms.equal_steps(fixed, 100) == 7
    assert ablation_arms.seeds(cfg) == [0, 1, 2]
    ctx = load_config(overrides=["ablate.arms=[ssb,rft]", "ablate.teacher_contexts=[gold]"])
    assert [(a.name, a.kind, a.context) for a in ablation_arms.ablation_arms(ctx)] == [
        ("ssb", "ssb", None),
        ("rft", "rft", None),
        ("ssb.gold", "ssb", "gold"),
    ]


@pytest.mark.parametrize(
    "override,key",
    [
        ("ablate.arms=[ssb,dpo]", "ablate.arms"),
        ("ablate.arms=[]", "ablate.arms"),
        ("ablate.arms=[sft,sft]", "ablate.arms"),
        ("ablate.seeds=0", "ablate.seeds"),
        ("ablate.teacher_contexts=[correct_and_incorrect]", "ablate.teacher_contexts"),
        ("ablate.teacher_contexts=[hints]", "ablate.teacher_contexts"),
        ("ablate.steps=0", "ablate.steps"),
        ("ablate.onpolicy_sampling.temperature=0", "ablate.onpolicy_sampling"),
    ],
)
def test_ablate_config_is_checked(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(overrides=[override])


def test_arm_configs():
    cfg = load_config(overrides=["train.loss.kd_weight=1", "seed=5"])
    sft = ablation_arms.arm_config(cfg, ablation_arms.Arm("sft", "sft"), 6, None)
    assert (sft.seed, sft.train.loss.kd_weight, sft.train.loss.ce_weight) == (6, 0.0, 1.0)
    gold = ablation_arms.arm_config(cfg, ablation_arms.Arm("ssb.gold", "ssb", "gold"), 5, None)
    assert gold.bootstrap.teacher_context == "gold" and gold.train.loss.kd_weight == 1
    grpo = ablation_arms.arm_config(cfg, ablation_arms.Arm("grpo", "grpo"), 5, 40)
    assert grpo.data.max_problems == 40


def test_rft_keeps_distinct_correct_rollouts_that_stopped():
    def s(text, correct=True, finish="stop"):
        return {"text": text, "correct": correct, "finish_reason": finish}

    record = {"samples": [s("a  b"), s("a b"), s("c", False), s("d", True, "length"), s("e")]}
    assert [x["text"] for x in ablation_arms.correct_rollouts(record, None)] == ["a  b", "e"]
    assert [x["text"] for x in ablation_arms.correct_rollouts(record, 1)] == ["a  b"]


def test_sampled_reply_is_exactly_what_the_student_sampled():
    pair = {"id": "p", "reply_ids": [9, 9], "end_token_id": 2}
    stopped = sampled_pair(pair, Completion("x", [5, 6], "stop"), end_token_id=7)
    assert (stopped["reply_ids"], stopped["end_token_id"]) == ([5, 6], 7)
    cut = sampled_pair(pair, Completion("x", [5, 6, 8], "length"), end_token_id=7)
    assert (cut["reply_ids"], cut["end_token_id"]) == ([5, 6], 8)
    assert pair["reply_ids"] == [9, 9]  # the stored pair is left alone


def test_cli_arms_and_seeds_are_config_overrides():
    from ssb.cli import build_parser, resolve_config

    args = build_parser().parse_args(
        ["ablate", "--run-dir", "x", "--arms", "sft,rft", "--seeds", "3"]
    )
    cfg = resolve_config(args)
    assert cfg.ablate.arms == ["sft", "rft"] and cfg.ablate.seeds == 3


def test_hard_labels_loss_is_cross_entropy_with_no_teacher():
    import torch

    from ssb.distill.losses import chunked_kd_loss

    torch.manual_seed(0)
    hidden, head = torch.randn(7, 8, dtype=torch.float64), torch.randn(11, 8, dtype=torch.float64)
    labels = torch.randint(0, 11, (7,))
    out = chunked_kd_loss(
        hidden, head, None, labels, mode="hidden", tau=2.0, kd_weight=0.0, ce_weight=1.0,
        chunk_size=3,
    )  # fmt: skip
    ce = torch.nn.functional.cross_entropy(hidden @ head.T, labels, reduction="sum")
    torch.testing.assert_close(out.loss_sum.double(), ce)
    assert out.kd_sum == 0 and out.num_tokens == 7
    with pytest.raises(ValueError, match="only the CE term"):
        chunked_kd_loss(hidden, head, None, labels, mode="hidden", tau=2.0, kd_weight=1.0)


def test_onpolicy_samples_in_the_step_and_resumes_to_the_same_samples(run_root, tmp_path):
    """What the onpolicy arm adds to the LoRA recipe (tests/test_lora_training.py): each step's
    replies are the student's samples, counted in the log; its checkpoints carry their own
    fingerprint (the sampling settings and step count); and a resumed run samples what the
    killed one did (the sampling seeds follow the step), so a redone step has the same loss."""
    from ssb.ablation.onpolicy import FINGERPRINT_NAME, onpolicy_fingerprint, run_onpolicy
    from ssb.stages.base import load_base

    cfg = load_config(overrides=sets(run_root))
    run = RunDir(tmp_path / "arm")
    run.path.mkdir()
    shutil.copy(run_root / "run" / "pairs.jsonl", run.pairs_path)
    first = run_onpolicy(cfg, run, steps=2, progress=False)
    assert first["steps"] == 2 and first["examples"] == 6 and "resumed_from" not in first
    full_log = read_jsonl(run.train_log_path)
    assert [r["step"] for r in full_log] == [1, 2]
    assert all(r["scored_replies"] == 2 and r["sampled_tokens"] >= 2 for r in full_log)
    fingerprint = json.loads((run.checkpoints_dir / FINGERPRINT_NAME).read_text())
    assert fingerprint == json.loads(json.dumps(onpolicy_fingerprint(cfg, 2)))

    shutil.rmtree(run.checkpoints_dir / "checkpoint-2")
    shutil.rmtree(run.adapter_dir)
    second = run_onpolicy(cfg, run, steps=2, progress=False)
    assert second["resumed_from"] == "checkpoint-1"
    log = read_jsonl(run.train_log_path)
    assert [r["step"] for r in log] == [1, 2] and log[0] == full_log[0]
    assert log[1]["sampled_tokens"] == full_log[1]["sampled_tokens"]
    assert log[1]["loss"] == pytest.approx(full_log[1]["loss"], rel=1e-5)
    assert (run.adapter_dir / "adapter_model.safetensors").exists()
    assert not any("lora" in name for name, _ in load_base(cfg).model.named_modules())
    with pytest.raises(ValueError, match="max_steps"):
        run_onpolicy(cfg, run, steps=3, progress=False)


def test_run_report_carries_the_ablation_section_only_through_the_ablation_writer(tmp_path):
    """`ssb report` and `ssb run` write report.md with `write_run_report`, which adds the
    ablation's section; the plain report (below the ablation) knows nothing of it."""
    from ssb.ablation.report import write_run_report
    from ssb.report import write_report

    rundir = RunDir(tmp_path / "run")
    ablation = rundir.ablation()
    ablation.path.mkdir(parents=True)
    summary = {"equal_budget": "12 optimizer steps", "seeds": [0], "benchmarks": [], "base": {}}
    ablation.summary_path.write_text(json.dumps({**summary, "arms": {}}))
    assert "Ablation: what makes SSB work" not in write_report(rundir).read_text()
    text = write_run_report(rundir).read_text()
    assert "## Ablation: what makes SSB work" in text and "12 optimizer steps" in text
