"""Built-in synthetic arithmetic word problems: one to three steps, three difficulty levels, a
fixed train / test / fewshot split by question hash (so no question appears in two splits)."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from ssb.problems.record import Problem, ProblemsError

# Per difficulty: number of steps and the largest number that may appear anywhere
# (operands, intermediate results and the answer).
_SYNTH_LEVELS = {1: (1, 20), 2: (2, 100), 3: (3, 1000)}
_SYNTH_SPLITS = ("train", "test", "fewshot")

_NAMES = (
    ("Tom", "he"),
    ("Anna", "she"),
    ("Ben", "he"),
    ("Maria", "she"),
    ("Leo", "he"),
    ("Sara", "she"),
    ("Omar", "he"),
    ("Mei", "she"),
    ("Jack", "he"),
    ("Priya", "she"),
    ("Lucas", "he"),
    ("Emma", "she"),
)
_ITEMS = (
    "apples",
    "coins",
    "marbles",
    "stickers",
    "pencils",
    "cookies",
    "shells",
    "stamps",
    "cards",
    "books",
    "beads",
    "toy cars",
)
_CONTAINERS = ("bags", "boxes", "jars", "baskets", "packs")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MULTIPLE_WORDS = {2: "twice", 3: "three times", 4: "four times", 5: "five times"}


def synthetic_split_of(question: str) -> str:
    """The split a synthetic question belongs to, decided by a hash of its text alone.

    Independent of seed and difficulty, so train, test and fewshot problems can never share a
    question, whatever settings generated them. 70% train, 25% test, 5% fewshot.
    """
    bucket = int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:8], "big") % 20
    if bucket == 0:
        return "fewshot"
    if bucket <= 5:
        return "test"
    return "train"


@dataclass
class _Story:
    question: str
    solution: str
    answer: int
    steps: list[tuple[str, int, int, int]]  # (op, left, right, result)
    template: str


def _pick(rng: random.Random, lo: int, hi: int) -> int:
    return rng.randint(lo, hi) if hi >= lo else lo


def _arithmetic_step(
    rng: random.Random, x: int, limit: int, ops: tuple[str, ...]
) -> tuple[str, int] | None:
    """A random feasible operation on x keeping everything within [0, limit]."""
    feasible = []
    if "+" in ops and x < limit:
        feasible.append("+")
    if "-" in ops and x >= 1:
        feasible.append("-")
    if "*" in ops and 2 * x <= limit and x >= 1:
        feasible.append("*")
    if not feasible:
        return None
    op = rng.choice(feasible)
    if op == "+":
        return op, _pick(rng, 1, limit - x)
    if op == "-":
        return op, _pick(rng, 1, x)
    return op, _pick(rng, 2, min(limit // x, 10))


def _apply(op: str, a: int, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    return a * b


def _story_have(rng: random.Random, n_steps: int, limit: int) -> _Story | None:
    """One person's collection changes step by step (buy, give away, multiply)."""
    name, he = rng.choice(_NAMES)
    friend = rng.choice([n for n, _ in _NAMES if n != name])
    item = rng.choice(_ITEMS)
    He = he.capitalize()
    steps: list[tuple[str, int, int, int]] = []
    q_parts: list[str] = []
    s_parts: list[str] = []
    # Start: a plain amount, or (when multiplication fits) groups of items.
    if rng.random() < 0.3 and limit >= 4:
        groups = _pick(rng, 2, min(limit // 2, 10))
        each = _pick(rng, 2, limit // groups)
        box = rng.choice(_CONTAINERS)
        x = groups * each
        steps.append(("*", groups, each, x))
        q_parts.append(f"{name} has {groups} {box} with {each} {item} in each.")
        s_parts.append(
            f"{name} has {groups} {box} with {each} {item} in each, so {he} has {groups} * {each} = {x} {item}."
        )
        remaining = n_steps - 1
    else:
        x = _pick(rng, 1, limit)
        q_parts.append(f"{name} has {x} {item}.")
        s_parts.append(f"{name} starts with {x} {item}.")
        remaining = n_steps
    for i in range(remaining):
        step = _arithmetic_step(rng, x, limit, ("+", "-", "*"))
        if step is None:
            return None
        op, b = step
        y = _apply(op, x, b)
        then = i > 0 or bool(steps)
        if op == "+":
            phrase = rng.choice(
                [f"buys {b} more", f"finds {b} more", f"gets {b} more from {friend}"]
            )
        elif op == "-":
            phrase = rng.choice([f"gives {b} to {friend}", f"loses {b}", f"gives away {b}"])
        else:
            phrase = f"ends up with {_MULTIPLE_WORDS.get(b, f'{b} times')} as many {item} as before"
        q_parts.append(f"Then {he} {phrase}." if then else f"{He} {phrase}.")
        s_parts.append(f"{He} {phrase}, so {he} has {x} {op} {b} = {y} {item}.")
        steps.append((op, x, b, y))
        x = y
    q_parts.append(f"How many {item} does {name} have now?")
    s_parts.append(f"The answer is \\boxed{{{x}}}.")
    return _Story(" ".join(q_parts), " ".join(s_parts), x, steps, "have")


def _story_compare(rng: random.Random, n_steps: int, limit: int) -> _Story | None:
    """A chain of people, each with more / fewer / a multiple of the previous one's items."""
    people = rng.sample(_NAMES, n_steps + 1)
    item = rng.choice(_ITEMS)
    x = _pick(rng, 1, limit)
    first = people[0][0]
    q_parts = [f"{first} has {x} {item}."]
    s_parts = [f"{first} has {x} {item}."]
    steps: list[tuple[str, int, int, int]] = []
    prev = first
    for person, _ in people[1:]:
        step = _arithmetic_step(rng, x, limit, ("+", "-", "*"))
        if step is None:
            return None
        op, b = step
        y = _apply(op, x, b)
        if op == "+":
            rel = f"{b} more {item} than {prev}"
        elif op == "-":
            rel = f"{b} fewer {item} than {prev}"
        else:
            rel = f"{_MULTIPLE_WORDS.get(b, f'{b} times')} as many {item} as {prev}"
        q_parts.append(f"{person} has {rel}.")
        s_parts.append(f"{person} has {rel}, so {person} has {x} {op} {b} = {y} {item}.")
        steps.append((op, x, b, y))
        prev, x = person, y
    q_parts.append(f"How many {item} does {prev} have?")
    s_parts.append(f"The answer is \\boxed{{{x}}}.")
    return _Story(" ".join(q_parts), " ".join(s_parts), x, steps, "compare")


def _story_pages(rng: random.Random, n_steps: int, limit: int) -> _Story | None:
    """Reading a book over several days: pages read in total, or pages left to read."""
    name, he = rng.choice(_NAMES)
    start_day = rng.randrange(len(_DAYS) - n_steps)
    days = _DAYS[start_day : start_day + n_steps + 1]
    steps: list[tuple[str, int, int, int]] = []
    if rng.random() < 0.5:
        # Pages left: a book of x pages, each day some are read.
        x = _pick(rng, n_steps + 1, limit)
        q_parts = [f"{name}'s book has {x} pages."]
        s_parts = [f"The book has {x} pages."]
        for day in days[:n_steps]:
            if x < 1:
                return None
            b = _pick(rng, 1, x)
            y = x - b
            q_parts.append(f"On {day}, {name} reads {b} pages.")
            s_parts.append(f"After {day}, {x} - {b} = {y} pages are left.")
            steps.append(("-", x, b, y))
            x = y
        q_parts.append("How many pages are left to read?")
    else:
        # Pages read in total over the days.
        x = _pick(rng, 1, max(1, limit // (n_steps + 1)))
        q_parts = [f"{name} reads {x} pages on {days[0]}."]
        s_parts = [f"On {days[0]}, {he} reads {x} pages."]
        for day in days[1:]:
            if x >= limit:
                return None
            b = _pick(rng, 1, limit - x)
            y = x + b
            q_parts.append(f"On {day}, {he} reads {b} pages.")
            s_parts.append(f"By the end of {day}, {he} has read {x} + {b} = {y} pages.")
            steps.append(("+", x, b, y))
            x = y
        q_parts.append(f"How many pages does {name} read in total?")
    s_parts.append(f"The answer is \\boxed{{{x}}}.")
    return _Story(" ".join(q_parts), " ".join(s_parts), x, steps, "pages")


_TEMPLATES = (_story_have, _story_have, _story_compare, _story_pages)


def synthetic_problems(split: str, n: int, difficulty: int = 1, seed: int = 0) -> list[Problem]:
    """n arithmetic word problems of a split ("train", "test", "fewshot"), deterministic by seed.

    difficulty 1: one step, numbers <= 20; 2: two steps, <= 100; 3: three steps, <= 1000.
    Answers are non-negative integers; `solution` is one line ending in "\\boxed{N}".
    Splits are disjoint by question text (see `synthetic_split_of`).
    """
    split = "test" if split == "eval" else split
    if split not in _SYNTH_SPLITS:
        raise ProblemsError(
            f"synthetic has no split {split!r} (splits: {', '.join(_SYNTH_SPLITS)})"
        )
    if difficulty not in _SYNTH_LEVELS:
        raise ProblemsError(f"synthetic difficulty must be 1, 2 or 3, got {difficulty}")
    if n < 0:
        raise ProblemsError(f"number of synthetic problems must be >= 0, got {n}")
    n_steps, limit = _SYNTH_LEVELS[difficulty]
    # The RNG stream depends on (seed, difficulty, split); a string seed is hashed with SHA-512
    # by `random`, so it is stable across processes and PYTHONHASHSEED values.
    rng = random.Random(f"ssb-synthetic:{seed}:{difficulty}:{split}")
    problems: list[Problem] = []
    seen: set[str] = set()
    max_tries = 200 * n + 10_000
    tries = 0
    while len(problems) < n:
        tries += 1
        if tries > max_tries:
            raise ProblemsError(
                f"could only generate {len(problems)} of {n} distinct synthetic {split} problems "
                f"at difficulty {difficulty}; ask for fewer"
            )
        story = rng.choice(_TEMPLATES)(rng, n_steps, limit)
        if story is None or len(story.steps) != n_steps:
            continue
        if story.question in seen or synthetic_split_of(story.question) != split:
            continue
        seen.add(story.question)
        digest = hashlib.sha256(story.question.encode("utf-8")).hexdigest()[:12]
        problems.append(
            Problem(
                id=f"synthetic-d{difficulty}-{digest}",
                question=story.question,
                answer=str(story.answer),
                source="synthetic",
                solution=story.solution,
                metadata={
                    "split": split,
                    "difficulty": difficulty,
                    "template": story.template,
                    "steps": [list(s) for s in story.steps],
                },
            )
        )
    return problems
