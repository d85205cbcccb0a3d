"""`ssb ablate`'s validated study: SSB variants as arms, hyperparameters chosen on a validation
split disjoint from the training and test problems, every arm on the problems the bootstrap
decided; plus the pieces (grid, variant parsing, the split) on their own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pairs_fixture import EXAMPLES, make_pairs
from test_ablate import rollout_record, sets

from ssb.ablation.arms import Arm, ablation_arms, arm_config, grid_points, point_tag
from ssb.ablation.selection import validation_problems
from ssb.bench.random_models import save_tiny_model
from ssb.config import ConfigError, load_config, variant_config
from ssb.problems import load_eval_problems, load_train_problems
from ssb.rundir import RunDir, append_jsonl, read_jsonl

# Held out for validation: after the 6 training problems of the data file.
VALIDATION = [("What is 2 + 5?", "7"), ("What is 9 - 4?", "5"), ("What is 3 * 3?", "9")]


def study_sets(root: Path) -> list[str]:
    test = root / "test.jsonl"
    return [
        *(s for s in sets(root) if not s.startswith(("eval.benchmarks", "data.max_problems"))),
        "data.max_problems=6",
        f"eval.benchmarks=[{test}]",
        "ablate.arms=[ssb,sft,rft]",
        "ablate.teacher_contexts=[]",
        "ablate.seeds=2",
        "ablate.validation_problems=3",
        "ablate.lr_grid=[1e-2,1e-3]",
        "bootstrap.target_pairs=5",
        'ablate.variants=["filtered: train.loss.target_filter=true", '
        '"marked: bootstrap.hint_style=marked"]',
    ]


@pytest.fixture(scope="module")
def study_root(tmp_path_factory) -> Path:
    from ssb.stages.base import load_base

    root = tmp_path_factory.mktemp("study")
    save_tiny_model(root / "model", "qwen2", "chatml")
    rows = [{"id": f"p{i}", "question": q, "answer": r} for i, (q, _, r) in enumerate(EXAMPLES)]
    rows += [{"id": f"v{i}", "question": q, "answer": a} for i, (q, a) in enumerate(VALIDATION)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # The test set: other problems again (the data file's first four, as a user's test file).
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    cfg = load_config(overrides=study_sets(root))
    tokenizer = load_base(cfg).tokenizer
    run = RunDir(root / "run")
    append_jsonl(run.pairs_path, make_pairs(tokenizer, cfg, n=5))
    rollouts = [rollout_record(i, q, g, r, tokenizer) for i, (q, g, r) in enumerate(EXAMPLES)]
    append_jsonl(run.rollouts_path, rollouts)
    # The bootstrap stopped after five problems (a pair target): p5 was rolled out, not decided.
    append_jsonl(run.bootstrap_log_path, [{"id": f"p{i}", "status": "kept"} for i in range(5)])
    return root


@pytest.mark.slow
def test_study_chooses_on_validation_and_tests_once(study_root, monkeypatch):
    from ssb.cli import main

    monkeypatch.setattr("ssb.stages.bootstrap.grade", lambda text, gold: True)
    args = ["ablate", "--run-dir", str(study_root / "run"), "--quiet"]
    for s in study_sets(study_root):
        args += ["--set", s]
    assert main(args) == 0
    ablate = study_root / "run" / "ablate"

    # The split: the problems after data.max_problems, disjoint from training and test.
    split = [r["id"] for r in read_jsonl(ablate / "validation.jsonl")]
    assert split == ["v0", "v1", "v2"]
    test_ids = {r["id"] for r in read_jsonl(study_root / "test.jsonl")}
    assert not set(split) & test_ids and not set(split) & {f"p{i}" for i in range(6)}

    selection = json.loads((ablate / "selection.json").read_text())
    arms = ["ssb", "sft", "rft", "ssb.filtered", "ssb.marked"]
    assert list(selection["arms"]) == arms
    summary = json.loads((ablate / "summary.json").read_text())
    for arm in arms:
        points = selection["arms"][arm]["points"]
        assert [p["point"]["learning_rate"] for p in points] == [1e-2, 1e-3]
        accs = [p["accuracy"] for p in points]
        assert all(0 <= a <= 1 for a in accs)
        best = points[accs.index(max(accs))]["point"]  # the first best in grid order
        assert selection["arms"][arm]["chosen"] == best
        assert summary["arms"][arm]["hyperparameters"] == best
        # Every seed trained at the chosen rate.
        for seed in (0, 1):
            done = json.loads((ablate / arm / f"seed{seed}" / "done.json").read_text())
            assert done["fingerprint"]["train"]["learning_rate"] == best["learning_rate"]
        # Validation records only in select/eval, test records only in eval.
        assert (ablate / "select" / "eval" / f"{arm}.lr0.01-validation.jsonl").exists()
        assert not list((ablate / "eval").glob(f"{arm}.lr*"))
    test_records = read_jsonl(ablate / "eval" / "ssb-seed0-test.jsonl")
    assert sorted(r["id"] for r in test_records) == sorted(test_ids)

    # The variants: the filter in the loss; the marked hint with its own bootstrap.
    done = json.loads((ablate / "ssb.filtered" / "seed0" / "done.json").read_text())
    assert done["fingerprint"]["train"]["loss"]["target_filter"] is True
    pairs = read_jsonl(ablate / "ssb.marked" / "pairs.jsonl")
    assert pairs and all("<<<" in p["teacher_messages"][-1]["content"] for p in pairs)
    assert summary["arms"]["ssb.marked"]["data"]["mixed"] == 5  # decided problems only
    # rft: only the problems the bootstrap decided (p5 was rolled out after the target).
    rft = {p["problem_id"] for p in read_jsonl(ablate / "rft" / "pairs.jsonl")}
    assert rft == {f"p{i}" for i in range(5)}
    # Compared with sft, pooled and per seed.
    bench = summary["benchmarks"][0]
    assert "pooled_vs_sft" in summary["arms"]["ssb.filtered"]["across_seeds"][bench]
    report = (ablate / "report.md").read_text()
    assert "pooled vs sft" in report and "chosen on the validation split" in report


# --------------------------------------------------------------------------- pieces


def _cfg(*extra: str):
    return load_config(
        "ablation-cpu",
        overrides=["ablate.validation_problems=50", "ablate.lr_grid=[1e-4,3e-4]", *extra],
    )


def test_grid_points_per_kind():
    cfg = _cfg("ablate.tau_grid=[1,2]", "ablate.ce_share_grid=[0,0.5]")
    ssb = grid_points(cfg, Arm("ssb", "ssb"))
    assert len(ssb) == 8 and ssb[0] == {"learning_rate": 1e-4, "temperature": 1.0, "ce_share": 0.0}
    assert grid_points(cfg, Arm("sft", "sft")) == [{"learning_rate": 1e-4}, {"learning_rate": 3e-4}]
    assert grid_points(cfg, Arm("grpo", "grpo")) == [{}]  # no grpo_lr_grid: grpo.learning_rate
    assert point_tag(ssb[-1]) == "lr0.0003_tau2_ce0.5" and point_tag({}) == "default"


def test_arm_config_applies_the_point():
    cfg = _cfg()
    out = arm_config(cfg, Arm("ssb", "ssb"), 3, 100, {"learning_rate": 1e-3, "ce_share": 0.25})
    assert out.seed == 3 and out.train.learning_rate == 1e-3
    assert (out.train.loss.kd_weight, out.train.loss.ce_weight) == (0.75, 0.25)
    sft = arm_config(cfg, Arm("sft", "sft"), 0, 100, {"learning_rate": 2e-4})
    assert (sft.train.loss.kd_weight, sft.train.loss.ce_weight, sft.train.learning_rate) == (
        0.0,
        1.0,
        2e-4,
    )
    grpo = arm_config(cfg, Arm("grpo", "grpo"), 0, 77, {"learning_rate": 5e-6})
    assert grpo.grpo.learning_rate == 5e-6 and grpo.data.max_problems == 77


def test_variants_become_arms_and_are_checked():
    cfg = _cfg(
        'ablate.variants=["clean: bootstrap.hint_style=marked; train.loss.target_filter=true"]'
    )
    arm = ablation_arms(cfg)[-1]
    assert arm.name == "ssb.clean" and arm.kind == "ssb"
    name, variant = variant_config(cfg, cfg.ablate.variants[0])
    assert variant.bootstrap.hint_style == "marked" and variant.train.loss.target_filter
    for bad, why in (
        ("nocolon", "expected 'name"),
        ("x: train.learning_rate=1", "not one of"),
        ("x: train.loss.advantage_weighting=maybe", "advantage_weighting"),
        ("ssb: train.loss.target_filter=true", "used twice"),
    ):
        with pytest.raises(ConfigError, match=why):
            _cfg(f'ablate.variants=["{bad}"]')


def test_grids_need_a_validation_split():
    with pytest.raises(ConfigError, match="validation_problems"):
        load_config("ablation-cpu", overrides=["ablate.validation_problems=0"])
    with pytest.raises(ConfigError, match="ce_share_grid"):
        _cfg("ablate.ce_share_grid=[1.0]")
    with pytest.raises(ConfigError, match="tau_grid"):
        _cfg("ablate.tau_grid=[1,2]", "targets.mode=topk")


@pytest.mark.parametrize("shuffle", [False, True])
def test_synthetic_validation_split_is_disjoint(shuffle):
    cfg = _cfg(f"data.shuffle={str(shuffle).lower()}")
    train = {p.id for p in load_train_problems(cfg)}
    val = [p.id for p in validation_problems(cfg)]
    test = {p.id for p in load_eval_problems(cfg, "synthetic")}
    assert len(val) == 50 and len(set(val)) == 50
    assert not set(val) & train and not set(val) & test
