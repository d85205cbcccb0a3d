"""The prompt renderer: one function for every stage, token-identical across stages."""

from __future__ import annotations

import json
import re

import pytest
from pairs_fixture import make_rollouts_mixed

from ssb.bench.random_models import build_tokenizer, save_tiny_model
from ssb.config import PromptConfig, load_config
from ssb.problems import Problem
from ssb.prompts import (
    FEWSHOT_EXAMPLES,
    render_prompt_ids,
    reply_format,
    student_messages,
    teacher_messages,
    uses_chat_template,
)
from ssb.rundir import RunDir, read_jsonl

PROBLEM = Problem(
    id="p1", question="Tom has 3 apples and buys 5 more. How many?", answer="8", source="t"
)


def test_chat_template_prompt_ends_with_the_generation_prompt():
    tok = build_tokenizer("chatml")
    cfg = PromptConfig()
    ids = render_prompt_ids(tok, student_messages(PROBLEM, cfg), cfg)
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\n" + cfg.system_prompt)
    assert text.endswith("<|im_start|>assistant\n")
    assert PROBLEM.question in text


def test_gemma_prompt_has_one_bos_and_the_model_turn():
    tok = build_tokenizer("gemma")
    cfg = PromptConfig()
    ids = render_prompt_ids(tok, student_messages(PROBLEM, cfg), cfg)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert tok.decode(ids).endswith("<start_of_turn>model\n")


def test_fewshot_prompt_for_a_base_model():
    tok = build_tokenizer("none")
    cfg = PromptConfig(num_fewshot=3)
    assert not uses_chat_template(tok, cfg)
    ids = render_prompt_ids(tok, student_messages(PROBLEM, cfg), cfg)
    text = tok.decode(ids, skip_special_tokens=True)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert text.endswith(f"Question: {PROBLEM.question}\nAnswer:")
    assert text.count("Question:") == 4
    assert FEWSHOT_EXAMPLES[2][1] in text and FEWSHOT_EXAMPLES[3][1] not in text
    fmt = reply_format(tok, cfg)
    # A few-shot answer ends with the blank line the worked examples end with.
    assert fmt.end_token_id == tok.encode("\n\n", add_special_tokens=False)[0]
    assert fmt.end_token_id in fmt.stop_token_ids and tok.eos_token_id in fmt.stop_token_ids
    assert fmt.stop_strings == cfg.stop_strings
    multi = PromptConfig(stop_strings=["\nQuestion:"])  # not one token: falls back to EOS
    assert reply_format(tok, multi).end_token_id == tok.eos_token_id


def test_forcing_chat_without_a_template_is_an_error():
    with pytest.raises(ValueError, match="no chat template"):
        uses_chat_template(build_tokenizer("none"), PromptConfig(format="chat"))


def test_teacher_prompt_holds_the_hints_and_braces_survive():
    cfg = PromptConfig()
    msgs = teacher_messages(
        PROBLEM, cfg, chat=True, correct="3 + 5 = \\boxed{8}", incorrect="3 - 5 = \\boxed{-2}"
    )
    user = msgs[-1]["content"]
    assert PROBLEM.question in user and "\\boxed{8}" in user and "\\boxed{-2}" in user
    assert "\\boxed{}" in user  # the instruction's literal braces are not eaten by formatting
    only = teacher_messages(PROBLEM, cfg, chat=True, context="correct_only", correct="x \\boxed{8}")
    assert "Incorrect" not in only[-1]["content"]
    with pytest.raises(ValueError, match="gold_solution"):
        teacher_messages(PROBLEM, cfg, chat=True, context="gold")


class RecordingGenerator:
    """Wraps the real generator and records the prompt ids each stage sends it."""

    def __init__(self, inner, log):
        self.inner, self.log = inner, log

    def generate(self, prompts, params, progress=True):
        self.log.extend(prompts)
        return self.inner.generate(prompts, params, progress=progress)


@pytest.mark.parametrize("template,arch", [("chatml", "qwen2"), ("none", "llama")])
def test_rollout_training_and_eval_prompts_are_token_identical(
    tmp_path, monkeypatch, template, arch
):
    """The same problem must reach the model as the same tokens in rollouts, training and eval."""
    import ssb.stages.engine as gen_mod  # where stages get their generators
    from ssb.stages.bootstrap import run_bootstrap
    from ssb.stages.evaluate import run_eval
    from ssb.stages.rollout import run_rollout
    from ssb.stages.train import DistillCollator

    model_dir = save_tiny_model(tmp_path / "model", arch, template)
    data = tmp_path / "problems.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "question": f"Ann has {a} pens and gets {b} more. How many pens?",
                    "answer": str(a + b),
                }
            )
            + "\n"
            for a, b in [(2, 3), (4, 4), (7, 1)]
        )
    )
    cfg = load_config(
        overrides=[
            f"model.name={model_dir}",
            "model.dtype=float32",
            f"data.train={data}",
            f"eval.benchmarks={data}",
            "rollout.num_samples=2",
            "generation.max_new_tokens=6",
        ]
    )
    rundir = RunDir(tmp_path / "run")
    rundir.init(cfg, "rollout")
    seen: dict[str, list[list[int]]] = {"rollout": [], "bootstrap": [], "eval": []}
    real = gen_mod.make_generator

    def recording(stage):
        return lambda *a, **k: RecordingGenerator(real(*a, **k), seen[stage])

    monkeypatch.setattr(gen_mod, "make_generator", recording("rollout"))
    run_rollout(cfg, rundir, progress=False)

    # Every problem made "mixed", so it goes through the bootstrap code path.
    records = make_rollouts_mixed(rundir.rollouts_path)

    # The teacher's reply content does not matter here, only that bootstrap keeps it: make every
    # generated reply end on its own with the gold answer.
    class CorrectTeacher(RecordingGenerator):
        def generate(self, prompts, params, progress=True):
            outs = super().generate(prompts, params, progress)
            for prompt_outs, record in zip(outs, self.order):
                for c in prompt_outs:
                    c.text, c.finish_reason = f" so \\boxed{{{record['gold']}}}", "stop"
            return outs

    def teacher_factory(*a, **k):
        g = CorrectTeacher(real(*a, **k), seen["bootstrap"])
        g.order = records
        return g

    monkeypatch.setattr(gen_mod, "make_generator", teacher_factory)
    run_bootstrap(cfg, rundir, progress=False)
    pairs = read_jsonl(rundir.pairs_path)
    assert len(pairs) == 3

    monkeypatch.setattr(gen_mod, "make_generator", recording("eval"))
    run_eval(cfg, rundir, progress=False)

    from ssb.stages.base import load_base

    tokenizer = load_base(cfg).tokenizer
    batch = DistillCollator(pad_id=tokenizer.pad_token_id or 0, mode="online")(pairs)
    for i, pair in enumerate(pairs):
        rollout_prompt = seen["rollout"][i]
        eval_prompt = seen["eval"][i]
        train_prompt = batch["input_ids"][i, : len(rollout_prompt)].tolist()
        assert rollout_prompt == eval_prompt == train_prompt == pair["student_prompt_ids"]
        assert seen["bootstrap"][i] == pair["teacher_prompt_ids"]
        # The student's first reply position predicts the first reply token.
        assert batch["shift_labels"][i, len(rollout_prompt) - 1].item() == pair["reply_ids"][0]


@pytest.mark.parametrize("chat", [True, False])
def test_marked_hint_never_shows_the_wrong_boxed_answer(chat):
    """hint_style=marked: the wrong rollout is cut before its answer sentence and its answer is
    named as wrong; the correct rollout is shown whole. inline shows both whole."""
    cfg = PromptConfig()
    good = " 4 + 4 = 8 apples. The answer is \\boxed{8}."
    bad = " 4 * 4 = 16 apples. The answer is \\boxed{16}."
    marked = teacher_messages(PROBLEM, cfg, chat=chat, correct=good, incorrect=bad, style="marked")[
        -1
    ]["content"]
    assert "\\boxed{16}" not in marked and re.search(r"16,? is wrong", marked)
    assert "4 * 4 = 16 apples." in marked and "\\boxed{8}" in marked
    inline = teacher_messages(PROBLEM, cfg, chat=chat, correct=good, incorrect=bad)[-1]["content"]
    assert "\\boxed{16}" in inline
