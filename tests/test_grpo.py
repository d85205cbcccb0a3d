"""`ssb grpo`: the GRPO baseline through TRL's GRPOTrainer.

The rewards (ssb.grading, the format bonus, the eval-equivalent trimming) are unit-tested directly.
End-to-end runs on tiny random models (ssb.bench.random_models), chat (ChatML) and few-shot (no
template), check that the prompts TRL tokenised equal `render_prompt_ids`, that completions stop
at the stop strings, that only LoRA weights train, and that the saved adapter loads with peft.
A random model never answers correctly, so the end-to-end tests swap in a reward that varies
(otherwise every advantage, hence every gradient, is zero).
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from safetensors.torch import load_file
from trl import GRPOTrainer

from ssb.config import ConfigError, load_config
from ssb.models import checkpointing_enabled
from ssb.problems import load_train_problems
from ssb.prompts import render_prompt_ids, reply_format, student_messages
from ssb.rundir import RunDir, read_jsonl
from ssb.stages import grpo
from ssb.stages.base import load_base
from ssb.stages.eval_setup import available_models
from ssb.stages.lora_training import last_checkpoint


def make_cfg(model_path, *extra):
    return load_config(
        overrides=[
            f"model.name={model_path}",
            "model.device=cpu",
            "model.dtype=float32",
            "data.max_problems=4",
            "prompt.num_fewshot=1",
            "train.lora.r=4",
            "train.lora.alpha=8",
            "grpo.num_generations=2",
            "grpo.batch_size=2",
            "grpo.max_steps=2",
            "grpo.max_completion_length=12",
            "grpo.learning_rate=1e-2",
            "grpo.sampling.temperature=1.0",
            *extra,
        ]
    )


# --------------------------------------------------------------------------- rewards


def test_rewards_grade_with_ssb_grading():
    assert grpo.correctness_reward("so 3 + 4 = 7. The answer is \\boxed{7}.", "7") == 1.0
    assert grpo.correctness_reward("The answer is \\boxed{7.0}", "7") == 1.0  # math-verify
    assert grpo.correctness_reward("The answer is \\boxed{8}.", "7") == 0.0
    assert grpo.correctness_reward("The answer is 7.", "7") == 0.0  # no box, no credit
    assert grpo.correctness_reward("\\boxed{1} then \\boxed{7}", "7") == 1.0  # the last box
    assert grpo.boxed_reward("The answer is \\boxed{8}.") == 1.0
    assert grpo.boxed_reward("The answer is 8.") == 0.0
    assert grpo.boxed_reward("The answer is \\boxed{8.") == 0.0  # unbalanced


def test_reward_funcs_grade_the_text_eval_grades(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir("qwen2", "none"))
    correct, boxed = grpo.make_reward_funcs(tok, [tok.eos_token_id], ["\n\n"])
    assert (correct.__name__, boxed.__name__) == ("correctness", "boxed")
    texts = [
        " 3 + 4 = 7. The answer is \\boxed{7}.\n\nQuestion: x\nAnswer: \\boxed{9}",
        " The answer is \\boxed{9}.\n\nQuestion: x\nAnswer: \\boxed{7}",  # 7 after the stop
        " The answer is 7.",
    ]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    ids.append(tok(" \\boxed{7}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id, 65])
    kw = {"prompts": ["p"] * 4, "completions": ["c"] * 4, "trainer_state": None}
    assert correct(completion_ids=ids, answer=["7"] * 4, **kw) == [1.0, 0.0, 0.0, 1.0]
    assert boxed(completion_ids=ids, **kw) == [1.0, 1.0, 0.0, 1.0]


def test_grpo_config_checks():
    for bad in (
        "grpo.num_generations=1",
        "grpo.max_steps=0",
        "grpo.sampling.temperature=0",
        "grpo.beta=-0.1",
        "grpo.format_reward_weight=-1",
        "grpo.warmup_ratio=1",
        "grpo.vllm_gpu_memory_utilization=1",
    ):
        with pytest.raises(ConfigError, match=re.escape(bad.split("=")[0])):
            load_config(overrides=[bad])
    paper = load_config(preset="paper").grpo
    assert (paper.learning_rate, paper.num_generations, paper.beta) == (5e-6, 8, 0.0)
    assert (paper.max_steps, paper.max_completion_length) == (2000, 1024)


def test_grpo_generates_with_a_colocated_vllm_engine_when_vllm_is_the_backend(
    tiny_model_dir, tmp_path, monkeypatch
):
    """On a GPU with vLLM: TRL's colocated engine (asleep while the optimizer runs), with the
    stop ids and strings under the names vLLM's SamplingParams takes (TRL hands them over as
    they are), and checkpointing on in the paper preset. The engine itself runs only on a GPU."""
    import torch

    from ssb.rundir import RunDir

    cfg = make_cfg(tiny_model_dir("qwen2", "chatml"), "grpo.vllm_gpu_memory_utilization=0.25")
    rundir = RunDir(tmp_path / "run")
    cpu = torch.device("cpu")
    plain = grpo.grpo_arguments(cfg, rundir, cpu, [7, 9], ["\n\n"], progress=False)
    assert not plain.use_vllm
    assert plain.generation_kwargs == {"eos_token_id": [7, 9], "stop_strings": ["\n\n"]}

    monkeypatch.setattr("ssb.stages.grpo.select_backend", lambda name: "vllm")
    # vLLM's CPU build: GRPO keeps generating with transformers (no sleep mode on that platform).
    monkeypatch.setattr("ssb.stages.grpo.vllm_device", lambda: "cpu")
    assert not grpo.grpo_arguments(cfg, rundir, cpu, [7, 9], ["\n\n"], progress=False).use_vllm
    monkeypatch.setattr("ssb.stages.grpo.vllm_device", lambda: "cuda")
    args = grpo.grpo_arguments(cfg, rundir, cpu, [7, 9], ["\n\n"], progress=False)
    assert args.use_vllm and args.vllm_mode == "colocate" and args.vllm_enable_sleep_mode
    assert args.vllm_gpu_memory_utilization == 0.25
    assert args.generation_kwargs == {"stop_token_ids": [7, 9], "stop": ["\n\n"]}
    assert load_config(preset="paper").train.gradient_checkpointing
    with pytest.raises(ConfigError, match="grpo.vllm_gpu_memory_utilization"):
        make_cfg(tiny_model_dir("qwen2", "none"), "grpo.vllm_gpu_memory_utilization=1.5")


# --------------------------------------------------------------------------- end to end


def run_and_capture(cfg, rundir, monkeypatch):
    """run_grpo with a varying reward, recording the prompt ids TRL rendered (TRL's own method)
    and the completions our trainer handed on."""
    seen_prompts, completions = [], []
    trl_tokenize = GRPOTrainer._tokenize_prompts

    def capture(self, prompts):
        out = trl_tokenize(self, prompts)
        seen_prompts.extend([list(map(int, ids)) for ids in out[0]])
        return out

    cls = grpo._trainer_class()
    ours_generate = cls._generate_single_turn

    def capture_generate(self, *args, **kwargs):
        ids, logprobs = ours_generate(self, *args, **kwargs)
        completions.extend(ids)
        return ids, logprobs

    monkeypatch.setattr(GRPOTrainer, "_tokenize_prompts", capture)
    monkeypatch.setattr(cls, "_generate_single_turn", capture_generate)
    alternate = itertools.cycle([0.0, 1.0])  # each group of 2 gets one of each
    monkeypatch.setattr(grpo, "correctness_reward", lambda text, gold: next(alternate))
    summary = grpo.run_grpo(cfg, rundir, progress=False)
    return summary, seen_prompts, completions


@pytest.mark.parametrize("template", ["chatml", "none"])
def test_run_grpo_end_to_end(tiny_model_dir, tmp_path, monkeypatch, template):
    if template == "chatml":  # KL to the reference, and checkpointing (TRL adds input hooks)
        extra = ["grpo.beta=0.1", "train.gradient_checkpointing=true"]
    else:
        extra = ["grpo.max_steps=1", "grpo.save_steps=1"]
    if template == "none":  # a stop string the random model hits often
        extra.append("prompt.stop_strings=[' ']")
    cfg = make_cfg(tiny_model_dir("qwen2", template), *extra)
    rundir = RunDir(tmp_path / "run")
    base = load_base(cfg)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}

    summary, seen, completions = run_and_capture(cfg, rundir, monkeypatch)

    # The prompts TRL tokenised are our renderer's, token for token.
    tok = base.tokenizer
    expected = {
        tuple(render_prompt_ids(tok, student_messages(p, cfg.prompt), cfg.prompt))
        for p in load_train_problems(cfg)
    }
    steps = cfg.grpo.max_steps
    assert len(seen) == steps * cfg.grpo.batch_size * cfg.grpo.num_generations
    assert {tuple(s) for s in seen} <= expected
    assert summary["prompts_checked"] == len(seen)
    assert summary["steps"] == steps

    # Completions end at the first stop (token or string) and carry nothing after it.
    reply = reply_format(tok, cfg.prompt)
    assert completions
    for ids in completions:
        assert tok.pad_token_id not in ids or tok.pad_token_id in reply.stop_token_ids
        stops = [i for i, t in enumerate(ids) if t in reply.stop_token_ids]
        assert stops in ([], [len(ids) - 1])
        for s in reply.stop_strings:
            assert s not in tok.decode(ids[:-1], skip_special_tokens=True)
    if template == "none":
        assert any(" " in tok.decode(ids, skip_special_tokens=True) for ids in completions)

    # One log record per step, with the reward (and KL when beta > 0).
    log = read_jsonl(rundir.grpo_log_path)
    assert [r["step"] for r in log] == list(range(1, steps + 1))
    for r in log:
        assert {"loss", "reward", "reward_std", "rewards/correctness/mean"} <= set(r)
        assert ("kl" in r) == (cfg.grpo.beta > 0)

    # The shared base model is back as it was: no LoRA layers, same weights, eval mode.
    assert not hasattr(base.model, "peft_config")
    assert not base.model.training
    assert not base.model.get_input_embeddings()._forward_hooks
    assert not checkpointing_enabled(base.model)
    after = base.model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)

    # The adapter holds LoRA weights only, trained away from peft's zero init, and loads.
    adapter = rundir.grpo_adapter_dir
    weights = load_file(adapter / "adapter_model.safetensors")
    assert weights and all("lora_" in k for k in weights)
    assert any(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)
    assert available_models(rundir)["grpo"] == adapter
    from peft import PeftModel

    from ssb.models import load_model_and_tokenizer

    fresh, _ = load_model_and_tokenizer(cfg.model)
    peft_model = PeftModel.from_pretrained(fresh, str(adapter))
    assert peft_model.peft_config["default"].r == cfg.train.lora.r
    assert sorted(peft_model.peft_config["default"].target_modules) == sorted(
        cfg.train.lora.target_modules
    )

    if template == "none":  # a checkpoint of other settings is not resumed
        assert last_checkpoint(rundir.grpo_checkpoints_dir).name == "checkpoint-1"
        changed = make_cfg(tiny_model_dir("qwen2", template), *extra, "grpo.learning_rate=1e-3")
        with pytest.raises(ValueError, match="learning_rate"):
            grpo.run_grpo(changed, rundir, progress=False)
