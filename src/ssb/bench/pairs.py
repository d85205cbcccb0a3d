"""pairs.jsonl-like records for the model-based measurements, built from synthetic problems."""

from __future__ import annotations

import re
from typing import Any


def wrong_solution(problem: Any) -> str:
    """The gold solution with its final answer changed: a plausible incorrect hint."""
    try:
        wrong = str(int(problem.answer) + 1)
    except ValueError:
        wrong = problem.answer + "0"
    return re.sub(rf"(?<!\d){re.escape(problem.answer)}(?!\d)", wrong, problem.solution or "")


def make_pairs(tokenizer: Any, cfg: Any, n: int) -> list[dict[str, Any]]:
    """`n` records shaped like pairs.jsonl's: the reply is the gold one-line solution (plus the
    end token when scored), prompts come from the shared renderer, the teacher is hinted with
    the gold solution and a wrong one."""
    from ssb.problems import synthetic_problems
    from ssb.prompts import render_prompt_ids, reply_format, student_messages, teacher_messages

    rf = reply_format(tokenizer, cfg.prompt)
    synth = cfg.data.synthetic
    problems = synthetic_problems("train", n, difficulty=synth.difficulty, seed=synth.seed)
    pairs = []
    for p in problems:
        s_msgs = student_messages(p, cfg.prompt)
        t_msgs = teacher_messages(
            p, cfg.prompt, chat=rf.chat, correct=p.solution, incorrect=wrong_solution(p)
        )
        reply = p.solution if rf.chat else " " + p.solution  # few-shot: "Answer: <solution>"
        pairs.append(
            {
                "id": p.id,
                "student_prompt_ids": render_prompt_ids(tokenizer, s_msgs, cfg.prompt),
                "teacher_prompt_ids": render_prompt_ids(tokenizer, t_msgs, cfg.prompt),
                "reply_ids": tokenizer(reply, add_special_tokens=False)["input_ids"],
                "end_token_id": rf.end_token_id,
            }
        )
    return pairs
