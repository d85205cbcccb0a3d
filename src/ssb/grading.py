"""Answer extraction and equivalence: the one place answers are graded in ssb.

`grade(completion, gold)` takes the last `\\boxed{}` of a completion and compares it with the gold
answer using math-verify (gold parsed first, as its docs require: the comparison is asymmetric).
`reference_grade` reproduces the original paper's literal-substring harness so the two can be
compared. `answer_key` gives a canonical string used to group wrong answers.

Timeouts and threads: math-verify's own timeouts use `signal.alarm`, which only works in the main
thread of the main interpreter (and raises elsewhere). We therefore pass
`parsing_timeout=None, timeout_seconds=None` off the main thread and keep math-verify's
signal-based timeouts on the main thread only, as a backstop. What keeps every call from hanging
in threads is a set of cheap guards applied everywhere (so results do not depend on the thread a
call runs in):

* the extracted answer is capped at `MAX_ANSWER_CHARS` characters;
* deeply nested brackets and long unbraced `^` chains are refused before parsing (the ANTLR LaTeX
  parser is exponential on them: `{{{...{1}...}}}` with depth 20 takes ~100 s);
* the parsed prediction is refused if it would make sympy build astronomically large numbers
  (`9^{9^{9}}`, `100000!`), which math-verify evaluates exactly during comparison.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any

__all__ = [
    "MAX_ANSWER_CHARS",
    "answer_key",
    "extract_boxed",
    "grade",
    "grade_answer",
    "reference_grade",
]

# Longer "answers" are degenerate generations, not answers; refusing them bounds the work.
MAX_ANSWER_CHARS = 1000
# Bracket nesting beyond this is refused (real answers stay below ~5; parsing cost explodes ~15+).
MAX_NESTING = 10
# Unbraced power chains like x^x^x^x^x^x are refused (ANTLR backtracking grows fast with length).
_POW_CHAIN = re.compile(
    r"(?:\^\s*(?:\\?[A-Za-z0-9.]+|\{[^{}]*\}))(?:\s*\^\s*(?:\\?[A-Za-z0-9.]+|\{[^{}]*\})){5,}"
)
# Limits for the sympy-level guard on parsed predictions.
_MAX_EXPONENT = 10**5
_MAX_FACTORIAL = 10**4
_MAX_NODES = 2000
# Seconds for math-verify's signal-based timeouts, main thread only.
_MAIN_THREAD_TIMEOUT = 5


@lru_cache(maxsize=1)
def _math_verify() -> tuple[Any, Any, tuple[Any, ...], type[BaseException]]:
    """(parse, verify, extraction configs, TimeoutException), imported on first use.

    math-verify pulls in sympy (~1 s); importing it lazily keeps `import ssb.problems` and the
    CLI's --help fast.
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify  # noqa: PLC0415 -- start-up: math-verify loads sympy (~1 s)
    from math_verify.errors import TimeoutException  # noqa: PLC0415 -- start-up (see above)

    # Both configs: LaTeX (answers are wrapped in \boxed{} below) and plain expressions
    # ("1,000", "$18", "0.5"). boxed_match_priority=0 makes the boxed content win.
    extraction = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
    return parse, verify, extraction, TimeoutException


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once per process when timeouts are off; we guard inputs ourselves."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())


# --------------------------------------------------------------------------- extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\b")


def _balanced_group(text: str, start: int) -> int | None:
    """Index just past the `}` closing the `{` at `start`, or None if unbalanced.

    Escaped braces (`\\{`, `\\}`) are content, not grouping, so `\\boxed{\\{1,2\\}}` works.
    """
    depth = 0
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped character (\{ \} \\ ...)
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\boxed {...}` / `\\fbox{...}` in `text`.

    Nested braces are handled. Returns None if there is no box, or if the last box is unbalanced
    (a truncated generation has not given its answer, even if an earlier box exists).
    The brace-less form `\\boxed 5` (seen in some model outputs) yields "5".
    """
    if not text:
        return None
    matches = list(_BOX_RE.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    i = m.end()
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        end = _balanced_group(text, i)
        if end is None:
            return None
        return text[i + 1 : end - 1].strip()
    if m.end() < len(text) and text[m.end()] == " ":
        # "\boxed 5": the token up to whitespace or a closing math delimiter.
        token = re.match(r"[^\s$]+", text[i:])
        return token.group(0) if token else None
    return None


# Text that ends the sentence before the one holding the final answer ("... left. The answer
# is \\boxed{9}.").
SENTENCE_BREAKS = (". ", ".\n", "\n", ": ", "! ", "? ")


def answer_sentence_start(text: str) -> int | None:
    """Where the sentence that holds the last `\\boxed` starts: the index of the last character
    of the break before it (e.g. the space of ". "; -1 when the box is in the first sentence),
    so the sentence is `text[start + 1:]`; None without a box. The hinted prompt cuts a wrong
    rollout there, and `ssb.distill.hint_leaks` finds the row where a reply starts its answer."""
    matches = list(_BOX_RE.finditer(text or ""))
    if not matches:
        return None
    at = matches[-1].start()
    ends = [text.rfind(b, 0, at) + len(b) - 1 for b in SENTENCE_BREAKS if text.rfind(b, 0, at) >= 0]
    return max(ends, default=-1)


# --------------------------------------------------------------------------- guards


def _nesting_depth(s: str) -> int:
    depth = best = 0
    for ch in s:
        if ch in "{([":
            depth += 1
            best = max(best, depth)
        elif ch in "})]":
            depth = max(depth - 1, 0)
    return best


def _text_is_safe(s: str) -> bool:
    """Cheap checks on the raw answer before any parsing."""
    return (
        len(s) <= MAX_ANSWER_CHARS
        and _nesting_depth(s) <= MAX_NESTING
        and _POW_CHAIN.search(s) is None
    )


def _plain_number(expr: Any) -> float | None:
    """abs value of an atomic sympy number (Integer/Rational/Float), else None; never evaluates."""
    import sympy  # noqa: PLC0415 -- start-up: sympy comes with math-verify, on first use

    if isinstance(expr, (sympy.Integer, sympy.Rational, sympy.Float)):
        try:
            return abs(float(expr))
        except (OverflowError, TypeError, ValueError):
            return float("inf")
    return None


def _expr_is_safe(value: Any) -> bool:
    """Refuse parsed values whose exact evaluation would build astronomically large numbers."""
    import sympy  # noqa: PLC0415 -- start-up: sympy comes with math-verify, on first use

    if not isinstance(value, sympy.Basic):
        return True
    nodes = 0
    for node in sympy.preorder_traversal(value):
        nodes += 1
        if nodes > _MAX_NODES:
            return False
        if isinstance(node, sympy.Pow):
            base, exp = node.args
            if not (base.is_number and exp.is_number):
                continue
            size = _plain_number(exp)
            if size is None:
                # A compound numeric exponent (9^{9^9}, 2^{10!}): only harmless if tiny in form.
                if exp.has(sympy.Pow, sympy.factorial, sympy.gamma):
                    return False
                continue
            b = _plain_number(base)
            if size > _MAX_EXPONENT and (b is None or b not in (0.0, 1.0)):
                return False
        elif isinstance(node, (sympy.factorial, sympy.factorial2, sympy.gamma)):
            size = _plain_number(node.args[0])
            if size is None or size > _MAX_FACTORIAL:
                if node.args[0].is_number:
                    return False
    return True


# --------------------------------------------------------------------------- math-verify


def _timeouts() -> int | None:
    """math-verify's signal.alarm timeouts only work in the main thread of the main interpreter."""
    if os.name == "posix" and threading.current_thread() is threading.main_thread():
        return _MAIN_THREAD_TIMEOUT
    return None


def _strip_dollars(s: str) -> str:
    # Unescaped `$` inside an answer is a currency sign or a stray delimiter; either way it would
    # confuse the LaTeX environment detection. `\$` is kept (math-verify strips it itself).
    return re.sub(r"(?<!\\)\$", "", s).strip()


def _wrap(answer: str) -> str:
    """Put an answer inside `\\boxed{}` so the LaTeX extractor takes it whole."""
    answer = _strip_dollars(answer)
    if "\\boxed" in answer or "\\fbox" in answer:
        return answer
    return "\\boxed{" + answer + "}"


def _parse(answer: str, timeout: int | None) -> list[Any]:
    parse, _, extraction, _ = _math_verify()
    return parse(
        _wrap(answer),
        extraction_config=extraction,
        parsing_timeout=timeout,  # type: ignore[arg-type]  # None disables signal use
    )


@lru_cache(maxsize=4096)
def _parse_gold(gold: str, timeout: int | None) -> tuple[Any, ...]:
    # Golds repeat across K rollouts and teacher attempts; parsing is the slow part.
    return tuple(_parse(gold, timeout))


def gold_is_parseable(gold: str) -> bool:
    """Whether math-verify can turn `gold` into something to compare with; problems whose gold
    it cannot parse are skipped (and counted) rather than graded by string fallback."""
    gold = str(gold or "").strip()
    if not gold or not _text_is_safe(gold):
        return False
    _, _, _, timeout_exception = _math_verify()
    try:
        return bool(_parse_gold(gold, _timeouts()))
    except (Exception, timeout_exception):
        return False


def grade_answer(pred_answer: str, gold: str) -> bool:
    """True iff an already-extracted answer equals `gold` (math-verify, gold parsed first)."""
    if pred_answer is None or gold is None:
        return False
    pred_answer = str(pred_answer).strip()
    gold = str(gold).strip()
    if not pred_answer or not gold or not _text_is_safe(pred_answer):
        return False
    timeout = _timeouts()
    _, verify, _, timeout_exception = _math_verify()
    try:
        gold_parsed = list(_parse_gold(gold, timeout)) if _text_is_safe(gold) else []
        if not gold_parsed:
            # Unparseable gold: fall back to exact match of the canonical keys.
            return answer_key(pred_answer) == answer_key(gold) != ""
        pred_parsed = _parse(pred_answer, timeout)
        if not pred_parsed or not all(_expr_is_safe(p) for p in pred_parsed):
            return False
        if verify(gold_parsed, pred_parsed, timeout_seconds=timeout):  # type: ignore[arg-type]
            return True
    # A grader must answer False, never crash a run. TimeoutException derives from BaseException;
    # math-verify catches it itself, this is for an alarm firing between its handlers.
    except (Exception, timeout_exception):
        return False
    # Safety net for free-text answers math-verify cannot turn into comparable objects: equal
    # canonical strings (answer_key) count as equal. No real gold needs it today.
    return answer_key(pred_answer) == answer_key(gold) != ""


def grade(completion: str, gold: str) -> bool:
    """True iff the last `\\boxed{}` answer in `completion` equals `gold`; no box -> False."""
    try:
        pred = extract_boxed(completion)
    except Exception:
        return False
    if pred is None:
        return False
    return grade_answer(pred, gold)


# --------------------------------------------------------------------------- grouping key

_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_NUMBER = re.compile(r"(?<![\d.])(\d+)(?:\.(\d+))?(?![\d.])")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")


def _canonical_number(m: re.Match[str]) -> str:
    try:
        value = Decimal(m.group(0))
    except InvalidOperation:
        return m.group(0)
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def answer_key(answer: str | None) -> str:
    """Canonical string for grouping answers ("most common wrong answer").

    A string normalisation, not an equivalence test: "18.50", "$18.5" and "18.5" share a key;
    "\\frac{1}{2}" and "0.5" do not.
    """
    if answer is None:
        return ""
    s = str(answer)
    s = s.replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\ ", "")
    s = re.sub(r"\\left\b|\\right\b", "", s)
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\[dt]frac\b", r"\\frac", s)
    s = _TEXT_CMD.sub(r"\1", s)
    s = re.sub(r"\^\{?\\circ\}?", "", s)
    s = re.sub(r"\s+", "", s)
    s = _THOUSANDS.sub("", s)
    s = _NUMBER.sub(_canonical_number, s)
    if re.fullmatch(r"-0", s):
        s = "0"
    return s


# --------------------------------------------------------------------------- reference harness


def reference_grade(completion: str, gold: str, benchmark: str) -> bool:
    """The original paper's harness (MOTIF/SSB eval), reproduced for comparison.

    AIME-style benchmarks: correct iff the gold string occurs anywhere in the completion.
    Others: correct iff the literal string `\\boxed{<gold>}` occurs in the completion
    (no normalisation at all: `\\frac12` vs `\\frac{1}{2}` is wrong).
    """
    gold = str(gold)
    if benchmark.lower().startswith("aime"):
        return gold in completion
    return "\\boxed{" + gold + "}" in completion
