"""Hand-made pairs.jsonl records and run directories for the targets / train tests.

A pair is built the way `ssb bootstrap` builds it: prompt ids from the shared renderer
(`render_prompt_ids`), reply ids from the tokenizer without special tokens, and the end token from
`reply_format` (end-of-turn for chat templates, EOS for few-shot base models). The teacher (hinted)
prompt is always longer than the student prompt, by a different amount for every pair, so an
off-by-one between the two sides cannot cancel out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ssb import records
from ssb.bench.random_models import save_tiny_model
from ssb.config import Config, load_config
from ssb.problems import Problem
from ssb.prompts import render_prompt_ids, reply_format, student_messages
from ssb.rundir import RunDir, append_jsonl, read_jsonl

# (question, gold, reply text); replies of different lengths.
EXAMPLES = [
    ("Tom has 3 apples and buys 5 more. How many apples?", "8", " 3 + 5 = 8. The answer is \\boxed{8}."),
    ("Ann has 12 books and gives away 4. How many books are left?", "8",
     " Ann has 12 books and gives away 4, so 12 - 4 = 8 books are left. The answer is \\boxed{8}."),
    ("Sam finds 7 marbles. Zoe has 2 more. How many marbles are there?", "16",
     " Zoe has 7 + 2 = 9, so 7 + 9 = 16. The answer is \\boxed{16}."),
    ("Mei eats 2 cookies.", "2", " \\boxed{2}"),
    ("Ravi has 20 stickers and loses 6. How many stickers?", "14",
     " 20 - 6 = 14 stickers. So the final answer is \\boxed{14}."),
    ("Omar has 9 eggs and gets 9 more eggs. How many eggs does Omar have now?", "18",
     " 9 + 9 = 18 eggs. The answer is \\boxed{18}."),
]  # fmt: skip

# Per-template model architecture used by the tests.
ARCH = {"chatml": "qwen2", "gemma": "gemma3", "none": "llama"}


def hinted_messages(
    messages: list[dict[str, str]], question: str, reply: str, i: int
) -> list[dict[str, str]]:
    """A hinted teacher prompt: the student's messages with a hint of i-dependent length."""
    hint = " (Hint: a correct solution is:" + reply + " Check each step." * (i % 3 + 1) + ")"
    return [
        m if m["role"] != "user" else {"role": "user", "content": question + hint} for m in messages
    ]


def make_pairs(
    tokenizer: Any, cfg: Config, n: int | None = None, same_prompt: bool = False
) -> list[dict[str, Any]]:
    """pairs.jsonl records for `tokenizer` under `cfg.prompt` (`same_prompt`: the teacher sees the
    student's own prompt, so a frozen student matches the teacher exactly)."""
    end = reply_format(tokenizer, cfg.prompt).end_token_id
    pairs = []
    for i, (question, gold, reply) in enumerate(EXAMPLES[:n]):
        problem = Problem(f"p{i}", question, gold, "test")
        s_msgs = student_messages(problem, cfg.prompt)
        t_msgs = s_msgs if same_prompt else hinted_messages(s_msgs, question, reply, i)
        pairs.append(
            pair_record(
                tokenizer,
                cfg,
                problem,
                s_msgs,
                t_msgs,
                reply,
                end,
                incorrect=(" 1 + 1 = 3. The answer is \\boxed{3}.", "3"),
            )
        )
    return pairs


def tiny_config(model_dir: Path, *overrides: str) -> Config:
    """A config for a tiny saved model: small LoRA, small batches, no checkpoints unless asked."""
    base = [
        f"model.name={model_dir}",
        "model.dtype=float32",
        "model.device=cpu",
        "train.lora.r=4",
        "train.lora.alpha=8",
        "train.batch_size=2",
        "train.epochs=1",
        "train.save_steps=1000",
        "train.loss.chunk_size=5",
        "targets.batch_size=3",
        "targets.shard_size=4",
        "targets.topk=16",
        "prompt.num_fewshot=1",
        # `ssb targets` runs the teacher-signal diagnostic by default; its tests turn it on.
        "targets.diagnose=false",
    ]
    return load_config(overrides=base + list(overrides))


def make_run(
    tmp_path: Path,
    template: str = "chatml",
    *overrides: str,
    n: int | None = None,
    same_prompt: bool = False,
    name: str = "run",
) -> tuple[Config, RunDir, list[dict[str, Any]]]:
    """A tiny saved model (cached per tmp_path and template), a config for it and a run directory
    holding pairs.jsonl."""
    from ssb.stages.base import load_base

    model_dir = tmp_path / f"model-{template}"
    if not model_dir.exists():
        save_tiny_model(model_dir, ARCH[template], template)
    cfg = tiny_config(model_dir, *overrides)
    rundir = RunDir(tmp_path / name)
    rundir.path.mkdir(parents=True, exist_ok=True)
    tokenizer = load_base(cfg).tokenizer
    pairs = make_pairs(tokenizer, cfg, n=n, same_prompt=same_prompt)
    append_jsonl(rundir.pairs_path, pairs)
    return cfg, rundir, pairs


def end_token(tokenizer, name: str) -> int:
    """Id of an end token given by its name (a special token) or its text (a one-token string)."""
    if name in tokenizer.get_vocab():
        return tokenizer.convert_tokens_to_ids(name)
    ids = tokenizer.encode(name, add_special_tokens=False)
    assert len(ids) == 1, f"{name!r} is not a single token"
    return ids[0]


def pair_record(tokenizer, cfg, problem, s_msgs, t_msgs, reply, end, incorrect) -> dict[str, Any]:
    """One pairs.jsonl record as `ssb bootstrap` writes it (prompt ids from the shared renderer,
    reply ids without special tokens); `incorrect` = (wrong rollout text, its answer)."""
    return records.pair_record(
        problem,
        s_msgs,
        t_msgs,
        render_prompt_ids(tokenizer, s_msgs, cfg.prompt),
        render_prompt_ids(tokenizer, t_msgs, cfg.prompt),
        reply,
        tokenizer(reply, add_special_tokens=False)["input_ids"],
        end,
        shown={
            "teacher_answer": problem.answer,
            "correct_rollout": reply,
            "correct_answer": problem.answer,
            "incorrect_rollout": incorrect[0],
            "incorrect_answer": incorrect[1],
        },
    )


def make_rollouts_mixed(path: Path) -> list[dict[str, Any]]:
    """A random model is never right: rewrite rollouts.jsonl at `path` so every problem is mixed
    (sample 0 a boxed correct answer, sample 1 a boxed wrong one) and goes through bootstrap's
    teacher path. Returns the rewritten records."""
    records = read_jsonl(path)
    for r in records:
        r["samples"][0].update(text=f"\\boxed{{{r['gold']}}}", answer=r["gold"], correct=True)
        r["samples"][1].update(text="\\boxed{0}", answer="0", correct=False)
        r["num_correct"] = 1
    path.unlink()
    append_jsonl(path, records)
    return records
