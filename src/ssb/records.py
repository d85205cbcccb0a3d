"""The records the stages write, each shape defined once: a rollout (`rollouts.jsonl`), a
bootstrap decision (`bootstrap.jsonl`), a pair (`pairs.jsonl`). They stay plain dicts on disk
and in memory (JSON lines); these types name their fields for readers and type checkers."""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict

from ssb.problems import Problem


class RolloutSample(TypedDict):
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" (unfinished samples are never written)
    answer: str | None  # the last \boxed{} answer
    correct: bool


class RolloutRecord(TypedDict):
    id: str
    question: str
    gold: str
    source: str
    solution: str | None
    samples: list[RolloutSample]
    num_correct: int


class Decision(TypedDict):
    id: str
    status: str  # "kept" or a reason of ssb.funnel.REJECT_REASONS
    teacher_answers: NotRequired[list[str | None]]  # the rejected teacher samples' answers


class PairRecord(TypedDict):
    id: str
    question: str
    gold: str
    source: str
    student_messages: list[dict[str, str]]
    teacher_messages: list[dict[str, str]]
    student_prompt_ids: list[int]  # ssb.prompts.render_prompt_ids of the student messages
    teacher_prompt_ids: list[int]  # ... of the teacher's (hinted) messages
    reply: str
    reply_ids: list[int]  # the teacher's reply, without the end token
    end_token_id: int  # appended to the reply for training (end-of-turn or EOS)
    # What the hinted teacher was shown and answered (None for pairs imported from elsewhere).
    teacher_answer: str | None
    correct_rollout: str | None
    correct_answer: str | None
    incorrect_rollout: str | None
    incorrect_answer: str | None


PAIR_FIELDS: tuple[str, ...] = tuple(PairRecord.__annotations__)
OPTIONAL_PAIR_FIELDS = PAIR_FIELDS[PAIR_FIELDS.index("teacher_answer") :]


def pair_record(
    problem: Problem,
    student_messages: list[dict[str, str]],
    teacher_messages: list[dict[str, str]],
    student_prompt_ids: list[int],
    teacher_prompt_ids: list[int],
    reply: str,
    reply_ids: list[int],
    end_token_id: int,
    shown: dict[str, Any] | None = None,
) -> PairRecord:
    """A pairs.jsonl record; `shown`: the OPTIONAL_PAIR_FIELDS known (teacher answer, rollouts)."""
    shown = shown or {}
    unknown = set(shown) - set(OPTIONAL_PAIR_FIELDS)
    if unknown:
        raise KeyError(f"not a field of a pair: {sorted(unknown)}")
    return PairRecord(
        id=problem.id,
        question=problem.question,
        gold=problem.answer,
        source=problem.source,
        student_messages=student_messages,
        teacher_messages=teacher_messages,
        student_prompt_ids=[int(t) for t in student_prompt_ids],
        teacher_prompt_ids=[int(t) for t in teacher_prompt_ids],
        reply=reply,
        reply_ids=[int(t) for t in reply_ids],
        end_token_id=int(end_token_id),
        **{name: shown.get(name) for name in OPTIONAL_PAIR_FIELDS},
    )
