"""Prompt rendering shared by every stage.

One function, `render_prompt_ids`, turns a list of chat messages into the token ids a model
sees, for rollouts, the hinted teacher, teacher scoring, student training and evaluation alike.
Replies are always handled as token ids and appended to these ids; nothing re-tokenises
"prompt + reply" text, so the student and the teacher see exactly the reply tokens that were
generated.

Two formats:
- chat: the tokenizer's chat template with the generation prompt (instruct models);
- fewshot: "Question: ...\\nAnswer: ..." worked examples for base models without a template
  (the embedded gemma-3-270m). A reply ends at a stop string (a blank line by default); when
  distilled it is closed with that blank-line token (`fewshot_end_token_id`), so the student
  learns to stop where the teacher does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ssb.config import PromptConfig
from ssb.grading import answer_sentence_start, extract_boxed
from ssb.problems import Problem

log = logging.getLogger("ssb")

Message = dict[str, str]

DEFAULT_TEACHER_TEMPLATE = (
    "Here is a math problem, followed by two student solutions. The first solution is correct; "
    "the second one reaches a wrong final answer.\n\n"
    "Problem:\n{question}\n\n"
    "Correct solution:\n{correct}\n\n"
    "Incorrect solution:\n{incorrect}\n\n"
    "Write one robust, standalone, step-by-step solution to the problem. Where the incorrect "
    "solution went wrong, make the right step explicit and warn about the pitfall, but do not "
    "mention the students or their solutions. Your final answer must equal the correct "
    "solution's final answer, written within \\boxed{}."
)

CORRECT_ONLY_TEACHER_TEMPLATE = (
    "Here is a math problem and a correct student solution.\n\n"
    "Problem:\n{question}\n\n"
    "Correct solution:\n{correct}\n\n"
    "Write one robust, standalone, step-by-step solution to the problem, making every step "
    "explicit and warning about the steps where it is easy to go wrong, but do not mention the "
    "student or their solution. Your final answer must equal the correct solution's final answer, "
    "written within \\boxed{}."
)

GOLD_TEACHER_TEMPLATE = (
    "Here is a math problem and its reference solution.\n\n"
    "Problem:\n{question}\n\n"
    "Reference solution:\n{gold_solution}\n\n"
    "Write one robust, standalone, step-by-step solution to the problem, making every step "
    "explicit and warning about the steps where it is easy to go wrong, but do not mention the "
    "reference solution. Your final answer must equal the reference answer, written within "
    "\\boxed{}."
)

MARKED_TEACHER_TEMPLATE = (
    "Problem:\n{question}\n\n"
    "A correct student solution:\n<<<\n{correct}\n>>>\n\n"
    "An incorrect student attempt; its final answer, {incorrect_answer}, is wrong:\n"
    "<<<\n{incorrect_steps}\n>>>\n\n"
    "Write one robust, standalone, step-by-step solution to the problem. Where the incorrect "
    "attempt went wrong, make the right step explicit and warn about the pitfall, but do not "
    "mention the students or their solutions. Your final answer must equal the correct "
    "solution's final answer, written within \\boxed{}."
)

# How the hint is laid out (`bootstrap.hint_style`), per prompt format and teacher context.
# inline (the first design): both rollouts whole, each ending "The answer is \\boxed{...}"; in the
# few-shot format on the question line. Measured on gemma-3-270m (DESIGN section 9) its teacher
# puts premature-stop mass before the answer sentence and mass on the wrong rollout's answer.
# marked: the wrong rollout cut before its answer sentence, its answer named as wrong
# (`incorrect_steps`, `incorrect_answer`), so no "\\boxed{wrong}" is ever shown; the chat form
# also sets each rollout apart in a labelled, delimited block. (A few-shot form with the rollouts
# on lines of their own under the question was tried: the 270M teacher then answered wrong or
# without a box on 100 of 111 mixed problems, against 58 of 111 inline, so the few-shot form
# keeps the question line.)
FEWSHOT_TEACHER_TEMPLATES = {
    "inline": {
        "correct_and_incorrect": (
            "{question} (Hint: a correct solution is: {correct} A common mistake is: {incorrect} "
            "Avoid that mistake.)"
        ),
        "correct_only": "{question} (Hint: a correct solution is: {correct})",
        "gold": "{question} (Hint: a reference solution is: {gold_solution})",
    },
    "marked": {
        "correct_and_incorrect": (
            "{question} (Hint: a correct solution is: {correct} A wrong attempt, whose answer "
            "{incorrect_answer} is wrong, went: {incorrect_steps} Avoid that mistake.)"
        ),
        "correct_only": "{question} (Hint: a correct solution is: {correct})",
        "gold": "{question} (Hint: a reference solution is: {gold_solution})",
    },
}
CHAT_TEACHER_TEMPLATES = {
    "inline": {
        "correct_and_incorrect": DEFAULT_TEACHER_TEMPLATE,
        "correct_only": CORRECT_ONLY_TEACHER_TEMPLATE,
        "gold": GOLD_TEACHER_TEMPLATE,
    },
    "marked": {
        "correct_and_incorrect": MARKED_TEACHER_TEMPLATE,
        "correct_only": CORRECT_ONLY_TEACHER_TEMPLATE,
        "gold": GOLD_TEACHER_TEMPLATE,
    },
}

# Worked examples for the few-shot format: one line each, final answer boxed. Written in a style
# (names, objects) the synthetic generator does not use, so they never coincide with a problem.
FEWSHOT_EXAMPLES: list[tuple[str, str]] = [
    (
        "Lena has 4 red pens and 7 blue pens. How many pens does Lena have?",
        "Lena has 4 + 7 = 11 pens. The answer is \\boxed{11}.",
    ),
    (
        "A shelf holds 15 jars. Omar takes 6 jars away. How many jars are left on the shelf?",
        "15 - 6 = 9 jars are left. The answer is \\boxed{9}.",
    ),
    (
        "Each box holds 3 lemons. How many lemons are in 5 boxes?",
        "5 boxes hold 5 * 3 = 15 lemons. The answer is \\boxed{15}.",
    ),
    (
        "Priya read 12 pages on Monday and 9 pages on Tuesday. How many pages did she read?",
        "She read 12 + 9 = 21 pages. The answer is \\boxed{21}.",
    ),
    (
        "A farmer had 18 eggs and sold 11 of them. How many eggs does the farmer have now?",
        "18 - 11 = 7 eggs are left. The answer is \\boxed{7}.",
    ),
    (
        "Kofi buys 2 bags with 8 plums in each bag and eats 3 plums. How many plums are left?",
        "He buys 2 * 8 = 16 plums and eats 3, so 16 - 3 = 13 are left. The answer is \\boxed{13}.",
    ),
    (
        "A train has 6 cars with 10 seats each. How many seats does the train have?",
        "6 * 10 = 60 seats. The answer is \\boxed{60}.",
    ),
    (
        "Mina had 20 stamps, gave 5 to a friend and then bought 4 more. How many stamps does she "
        "have?",
        "20 - 5 = 15, and 15 + 4 = 19 stamps. The answer is \\boxed{19}.",
    ),
]


def uses_chat_template(tokenizer: Any, cfg: PromptConfig) -> bool:
    if cfg.format == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt.format is 'chat' but the tokenizer has no chat template")
        return True
    if cfg.format == "fewshot":
        return False
    return bool(getattr(tokenizer, "chat_template", None))


def student_messages(problem: Problem, cfg: PromptConfig) -> list[Message]:
    """The hint-free prompt: used for rollouts, student training and evaluation."""
    messages = []
    if cfg.system_prompt:
        messages.append({"role": "system", "content": cfg.system_prompt})
    messages.append({"role": "user", "content": problem.question})
    return messages


def teacher_messages(
    problem: Problem,
    cfg: PromptConfig,
    *,
    chat: bool,
    context: str = "correct_and_incorrect",
    correct: str | None = None,
    incorrect: str | None = None,
    style: str = "inline",
) -> list[Message]:
    """The hinted prompt: the problem plus the hints chosen by `context`, laid out by `style`
    (ssb.config.HINT_STYLES; `prompt.teacher_template`, when set, replaces the built-in layout)."""
    if cfg.teacher_template is not None:
        template = cfg.teacher_template
    else:
        templates = CHAT_TEACHER_TEMPLATES if chat else FEWSHOT_TEACHER_TEMPLATES
        template = templates[style][context]
    needed = {
        "correct_and_incorrect": ("correct", "incorrect"),  # and what `style` derives from it
        "correct_only": ("correct",),
        "gold": ("gold_solution",),
    }[context]
    values = {
        "question": problem.question,
        "correct": (correct or "").strip(),
        "incorrect": (incorrect or "").strip(),
        "incorrect_steps": without_answer_sentence(incorrect or ""),
        "incorrect_answer": extract_boxed(incorrect or "") or "",
        "gold_solution": (problem.solution or "").strip(),
    }
    for name in needed:
        if not values[name]:
            raise ValueError(f"teacher context {context!r} needs a {name} for problem {problem.id}")
    text = template
    for name, value in values.items():
        text = text.replace("{" + name + "}", value)
    messages = []
    if cfg.system_prompt:
        messages.append({"role": "system", "content": cfg.system_prompt})
    messages.append({"role": "user", "content": text})
    return messages


def without_answer_sentence(text: str) -> str:
    """A rollout cut before the sentence that holds its final `\\boxed{}` answer."""
    start = answer_sentence_start(text)
    return (text if start is None else text[: start + 1]).strip()


def render_prompt_ids(tokenizer: Any, messages: list[Message], cfg: PromptConfig) -> list[int]:
    """THE prompt renderer: messages -> token ids ending where the model's reply begins."""
    if uses_chat_template(tokenizer, cfg):
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(out, "keys") and "input_ids" in out:  # transformers 5 returns a BatchEncoding
            out = out["input_ids"]
        return [int(t) for t in out]
    return list(tokenizer(fewshot_text(messages, cfg), add_special_tokens=True)["input_ids"])


def fewshot_text(messages: list[Message], cfg: PromptConfig) -> str:
    system = "\n".join(m["content"] for m in messages if m["role"] == "system")
    users = [m["content"] for m in messages if m["role"] == "user"]
    if len(users) != 1 or any(m["role"] not in ("system", "user") for m in messages):
        raise ValueError("the few-shot format takes one user message (and optional system text)")
    parts = [system + "\n\n"] if system else []
    for question, answer in FEWSHOT_EXAMPLES[: cfg.num_fewshot]:
        parts.append(f"Question: {question}\nAnswer: {answer}\n\n")
    parts.append(f"Question: {users[0]}\nAnswer:")
    return "".join(parts)


@dataclass
class ReplyFormat:
    """How replies end for this model and prompt format."""

    chat: bool
    end_token_id: int  # appended to every distilled reply (end-of-turn, or EOS for few-shot)
    stop_token_ids: list[int]  # generation stops at any of these
    stop_strings: list[str]  # and at any of these (few-shot only)


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    for idx, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            ids.add(int(idx))
    return ids


def end_of_turn_token_id(tokenizer) -> int:
    """The token that ends an assistant reply.

    With a chat template: render user "Hi" + assistant "XYZ" and take the first special token
    after the reply (``<|im_end|>``, ``<end_of_turn>``, ``<|eot_id|>``, ``</s>``, ...). Without a
    template (or when the template puts no special token there): ``tokenizer.eos_token_id``.
    """
    marker = "XYZ"
    if getattr(tokenizer, "chat_template", None):
        messages = [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": marker},
        ]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - a template may reject this conversation
            log.warning("chat template could not render a test conversation: %s", exc)
            text = None
        if isinstance(text, str) and marker in text:
            suffix = text[text.rindex(marker) + len(marker) :]
            ids = tokenizer.encode(suffix, add_special_tokens=False)
            special = _special_ids(tokenizer)
            for tid in ids:
                if tid in special:
                    return int(tid)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither a chat template end-of-turn token nor eos")
    return int(tokenizer.eos_token_id)


def reply_format(tokenizer: Any, cfg: PromptConfig) -> ReplyFormat:

    chat = uses_chat_template(tokenizer, cfg)
    eos = tokenizer.eos_token_id
    if chat:
        end = end_of_turn_token_id(tokenizer)
        stops = sorted({end} | ({eos} if eos is not None else set()))
        return ReplyFormat(chat=True, end_token_id=end, stop_token_ids=stops, stop_strings=[])
    if eos is None:
        raise ValueError("the tokenizer has neither a chat template nor an EOS token")
    end = fewshot_end_token_id(tokenizer, cfg)
    return ReplyFormat(
        chat=False,
        end_token_id=end,
        stop_token_ids=sorted({eos, end}),
        stop_strings=list(cfg.stop_strings),
    )


def fewshot_end_token_id(tokenizer: Any, cfg: PromptConfig) -> int:
    """The token that ends a few-shot answer: the first stop string when it is one token.

    A base model ends an answer the way its worked examples do, with a blank line; it almost
    never emits EOS there (gemma-3-270m puts ~80% on "\n\n" and ~3% on EOS after an answer). A
    distilled end token only teaches stopping if the teacher actually predicts it, so the reply
    is closed with the blank-line token, which generation also stops at. EOS is the fallback when
    the stop string is not a single token."""
    if cfg.stop_strings:
        ids = tokenizer.encode(cfg.stop_strings[0], add_special_tokens=False)
        if len(ids) == 1:
            return int(ids[0])
    return int(tokenizer.eos_token_id)
