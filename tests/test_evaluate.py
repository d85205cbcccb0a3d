import json
import sys
from pathlib import Path

import pytest

from ssb.config import config_from_dict
from ssb.rundir import RunDir, has_adapter, read_jsonl
from ssb.stages.eval_setup import available_models, bench_slug, eval_settings, resolve_models
from ssb.stages.eval_summary import benchmark_result, paired_comparison
from ssb.stats import mcnemar_exact, wilson_interval

sys.path.insert(0, str(Path(__file__).parent))


def _sample(correct, reference=None, tokens=5, finish="stop", answer="1"):
    return {
        "output": "x",
        "answer": answer,
        "correct": correct,
        "correct_reference": correct if reference is None else reference,
        "output_tokens": tokens,
        "finish_reason": finish,
    }


def _rec(pid, *samples):
    return {"id": pid, "samples": list(samples)}


# --------------------------------------------------------------------------- pure parts


def test_eval_settings_greedy_sampled_and_reference():
    greedy = eval_settings(config_from_dict({}))
    assert greedy["greedy"] and greedy["num_samples"] == 1 and greedy["metric"] == "pass@1"
    assert greedy["temperature"] == 0.0 and greedy["max_new_tokens"] == 512
    sampled = eval_settings(
        config_from_dict({"eval": {"num_samples": 4, "sampling": {"temperature": 0.7}}})
    )
    assert not sampled["greedy"] and sampled["num_samples"] == 4
    assert sampled["metric"] == "avg@4" and sampled["temperature"] == 0.7
    ref = eval_settings(config_from_dict({"eval": {"scoring": "reference", "num_samples": 4}}))
    assert ref["greedy"] and ref["num_samples"] == 1 and ref["max_new_tokens"] == 1024
    # Greedy with n > 1 would be n copies of one sample.
    zero = eval_settings(
        config_from_dict({"eval": {"num_samples": 4, "sampling": {"temperature": 0.0}}})
    )
    assert zero["num_samples"] == 1 and zero["metric"] == "pass@1"


def test_bench_slug():
    assert bench_slug("gsm8k") == "gsm8k"
    assert bench_slug("/data/my bench.jsonl") == "my_bench"


def test_benchmark_result_greedy_uses_wilson_and_both_verdicts():
    records = [
        _rec("a", _sample(True, reference=False)),
        _rec("b", _sample(True, tokens=9, finish="length")),
        _rec("c", _sample(False, answer=None)),
        _rec("d", _sample(False)),
    ]
    settings = eval_settings(config_from_dict({}))
    r = benchmark_result(records, settings)
    assert r["n"] == 4 and r["metric"] == "pass@1"
    assert r["accuracy"] == 0.5 and r["accuracy_math_verify"] == 0.5
    assert r["accuracy_reference"] == 0.25
    assert r["interval"] == list(wilson_interval(2, 4)) and r["interval_method"] == "wilson"
    assert r["interval_reference"] == list(wilson_interval(1, 4))
    assert r["truncation_rate"] == 0.25 and r["no_answer_rate"] == 0.25
    assert r["mean_output_tokens"] == 6.0
    ref_settings = eval_settings(config_from_dict({"eval": {"scoring": "reference"}}))
    assert benchmark_result(records, ref_settings)["accuracy"] == 0.25


def test_benchmark_result_avg_at_k_uses_bootstrap():
    records = [
        _rec("a", _sample(True), _sample(False)),
        _rec("b", _sample(True), _sample(True)),
        _rec("c", _sample(False), _sample(False)),
    ]
    settings = eval_settings(config_from_dict({"eval": {"num_samples": 2}}))
    r = benchmark_result(records, settings)
    assert r["accuracy"] == pytest.approx(0.5) and r["interval_method"] == "bootstrap"
    low, high = r["interval"]
    assert 0.0 <= low <= 0.5 <= high <= 1.0
    assert benchmark_result([], settings)["accuracy"] is None


def test_paired_comparison_counts_and_mcnemar():
    base = [_rec(i, _sample(i < 3)) for i in range(10)]  # right on 0, 1, 2
    model = [_rec(i, _sample(i in (0, 3, 4, 5, 6))) for i in range(10)] + [_rec(99, _sample(True))]
    c = paired_comparison(model, base, "correct", greedy=True)
    assert (c["n"], c["wins"], c["losses"], c["ties"]) == (10, 4, 2, 4)
    assert c["mcnemar_p"] == mcnemar_exact(4, 2) and c["test"] == "mcnemar_exact"
    assert c["diff"] == pytest.approx(0.2)
    assert c["diff_interval"][0] <= 0.2 <= c["diff_interval"][1]


def _fake_adapter(path):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    (path / "adapter_model.safetensors").write_bytes(b"0")
    return path


def test_model_discovery(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.path.mkdir()
    assert available_models(rd) == {"base": None}
    _fake_adapter(rd.adapter_dir)
    _fake_adapter(rd.path / "grpo" / "adapter")
    (rd.path / "half" / "adapter").mkdir(parents=True)  # no weights: not an adapter
    assert not has_adapter(rd.path / "half" / "adapter")
    assert available_models(rd) == {
        "base": None,
        "student": rd.adapter_dir,
        "grpo": rd.path / "grpo" / "adapter",
    }
    elsewhere = _fake_adapter(tmp_path / "other")
    chosen = resolve_models(rd, ["student", f"other={elsewhere}"])
    assert chosen == {"student": rd.adapter_dir, "other": elsewhere}
    with pytest.raises(ValueError, match="available: base, student, grpo"):
        resolve_models(rd, ["nope"])
    with pytest.raises(FileNotFoundError):
        resolve_models(rd, [f"x={tmp_path / 'missing'}"])


def test_scoring_helpers_harness_difference():
    from ssb.stages.eval_setup import score_sample

    out = "Half of it: $\\frac12$, so the answer is \\boxed{\\frac12}."
    verdicts = score_sample(out, "\\frac{1}{2}", "math500")
    assert verdicts["answer"] == "\\frac12"
    assert verdicts["correct"] is True
    assert verdicts["correct_reference"] is False
    exact = score_sample("so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", "math500")
    assert exact["correct"] and exact["correct_reference"]
    # The reference harness counts a bare gold substring for AIME (also a file named aime*).
    loose = "I think it is 42 or so, \\boxed{41}"
    assert score_sample(loose, "42", "aime24")["correct_reference"] is True
    assert score_sample(loose, "42", "/data/aime25.jsonl")["correct_reference"] is True
    assert score_sample(loose, "42", "math500")["correct_reference"] is False
    assert score_sample(loose, "42", "aime24")["correct"] is False


# --------------------------------------------------------------------------- the stage


QUESTIONS = [
    ("q1", "Tom has 3 apples and buys 4 more. How many apples?", "7"),
    ("q2", "Ann has 10 books and gives away 2. How many books?", "8"),
    ("q3", "Sam has 5 eggs and eats 1. How many eggs?", "4"),
    ("q4", "Zoe finds 6 marbles and 6 more. How many marbles?", "12"),
]


@pytest.fixture(scope="module")
def tiny_adapter(tiny_base_dir, tmp_path_factory):
    """A random LoRA on the tiny model (B non-zero, so the student's outputs differ)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32)
    torch.manual_seed(1)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        ),
    )
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    peft_model.save_pretrained(path)
    return path


def _bench_file(tmp_path, rows=QUESTIONS):
    path = tmp_path / "mini.jsonl"
    path.write_text(
        "".join(json.dumps({"id": i, "question": q, "answer": a}) + "\n" for i, q, a in rows)
    )
    return path


def _cfg(tiny_base_dir, bench, **eval_overrides):
    return config_from_dict(
        {
            "model": {"name": str(tiny_base_dir), "dtype": "float32", "device": "cpu"},
            "data": {"id_field": "id"},
            "prompt": {"format": "fewshot", "num_fewshot": 1},
            "generation": {"backend": "hf", "batch_size": 4, "max_new_tokens": 6},
            "eval": {"benchmarks": [str(bench)], "max_problems": None, **eval_overrides},
        }
    )


def test_run_eval_writes_records_and_resumes(tmp_path, tiny_base_dir):
    from ssb.stages.eval_setup import records_path
    from ssb.stages.evaluate import run_eval

    bench = _bench_file(tmp_path)
    rd = RunDir(tmp_path / "run")
    cfg = _cfg(tiny_base_dir, bench)
    out = run_eval(cfg, rd, progress=False)
    assert out["models"] == ["base"] and out["new_records"] == {"base": {str(bench): 4}}
    path = records_path(rd, "base", str(bench))
    assert path.name == "base-mini.jsonl"
    records = read_jsonl(path)
    assert [r["id"] for r in records] == ["q1", "q2", "q3", "q4"]
    for r in records:
        assert r["gold"] and "Answer:" in r["prompt"]
        assert len(r["samples"]) == 1
        s = r["samples"][0]
        assert set(s) == {
            "output",
            "answer",
            "correct",
            "correct_reference",
            "output_tokens",
            "finish_reason",
        }
        assert 0 <= s["output_tokens"] <= 6 and s["finish_reason"] in ("stop", "length")
        assert r["score"] == float(s["correct"])
    summary = json.loads((rd.eval_dir / "summary.json").read_text())
    res = summary["results"]["base"][str(bench)]
    assert res["n"] == 4 and res["metric"] == "pass@1" and res["interval_method"] == "wilson"
    assert res["accuracy"] == sum(r["score"] for r in records) / 4
    assert summary["comparisons"] == {}

    # Resume: a killed run left only two records (and a torn line); nothing is duplicated.
    path.write_text("".join(json.dumps(r) + "\n" for r in records[:2]) + '{"id": "q3", "pro')
    out = run_eval(cfg, rd, progress=False)
    assert out["new_records"]["base"][str(bench)] == 2
    again = read_jsonl(path)
    assert [r["id"] for r in again] == ["q1", "q2", "q3", "q4"]
    assert again == records  # greedy and seeded: the resumed run reproduces the first
    out = run_eval(cfg, rd, progress=False)
    assert out["new_records"]["base"][str(bench)] == 0
    assert len(read_jsonl(path)) == 4


def test_run_eval_student_paired_and_base_left_plain(tmp_path, tiny_base_dir, tiny_adapter):
    import shutil

    import torch

    from ssb.stages.base import load_base
    from ssb.stages.eval_setup import records_path
    from ssb.stages.evaluate import run_eval

    bench = _bench_file(tmp_path)
    rd = RunDir(tmp_path / "run")
    shutil.copytree(tiny_adapter, rd.adapter_dir)
    cfg = _cfg(tiny_base_dir, bench, num_samples=2, sampling={"temperature": 1.0, "top_p": 1.0})
    base = load_base(cfg)
    probe = torch.tensor([base.tokenizer.encode("Question: 1 + 1")])
    with torch.no_grad():
        before = base.model(probe).logits
    out = run_eval(cfg, rd, progress=False)
    assert out["models"] == ["base", "student"]
    base_recs = read_jsonl(records_path(rd, "base", str(bench)))
    student_recs = read_jsonl(records_path(rd, "student", str(bench)))
    assert len(base_recs) == len(student_recs) == 4
    assert all(len(r["samples"]) == 2 for r in base_recs + student_recs)
    outputs = lambda recs: [s["output"] for r in recs for s in r["samples"]]  # noqa: E731
    assert outputs(base_recs) != outputs(student_recs)

    summary = json.loads((rd.eval_dir / "summary.json").read_text())
    assert summary["settings"]["metric"] == "avg@2"
    assert summary["models"]["student"]["adapter"] == "adapter"
    for name in ("base", "student"):
        r = summary["results"][name][str(bench)]
        assert r["n"] == 4 and r["interval_method"] == "bootstrap"
        assert r["interval"][0] <= r["accuracy"] <= r["interval"][1]
    c = summary["comparisons"]["student"][str(bench)]
    assert c["vs"] == "base" and c["n"] == 4
    assert c["wins"] + c["losses"] + c["ties"] == 4
    assert c["test"] == "sign_test" and 0.0 <= c["mcnemar_p"] <= 1.0
    assert c["diff"] == pytest.approx(
        summary["results"]["student"][str(bench)]["accuracy"]
        - summary["results"]["base"][str(bench)]["accuracy"]
    )
    assert set(c["reference"]) >= {"wins", "losses", "ties", "mcnemar_p", "diff"}

    # The shared base model carries no adapter afterwards.
    assert not hasattr(base.model, "peft_config")
    assert not any("lora" in n for n, _ in base.model.named_modules())
    with torch.no_grad():
        assert torch.equal(base.model(probe).logits, before)

    # Only the student, with a new adapter: stale student records are set aside, base is kept.
    import safetensors.torch as st

    weights = st.load_file(rd.adapter_dir / "adapter_model.safetensors")
    st.save_file(
        {k: v * 2 for k, v in weights.items()}, rd.adapter_dir / "adapter_model.safetensors"
    )
    out = run_eval(cfg, rd, models=["student"], progress=False)
    assert out["new_records"] == {"student": {str(bench): 4}}
    assert len(read_jsonl(records_path(rd, "student", str(bench)))) == 4
    assert len(list((rd.eval_dir / "stale").glob("student-mini.*.jsonl"))) == 1
    summary = json.loads((rd.eval_dir / "summary.json").read_text())
    assert set(summary["results"]) == {"base", "student"}
    assert str(bench) in summary["comparisons"]["student"]
