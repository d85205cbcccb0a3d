"""Where in a distilled reply the hinted teacher can leak what the hint teaches wrongly.

Rows follow the loss's convention: row ``i`` of a pair is the position that predicts token ``i``
of ``reply_ids + [end_token_id]`` (so the last row predicts the end token). Two leaks were
measured on the CPU ablation (DESIGN section 9):

* **premature stop**: mass on a stop token (the end token, EOS) at a row that is not the last:
  the hint's shown solutions end there, so the teacher expects the reply to end too;
* **the hint's wrong answer**: at the row where the reply's final answer is written, mass on the
  first token by which the wrong answer shown in the hint differs from the reply's.

Located here once, from the pair record and the tokenizer, for the teacher-signal diagnostic
(`ssb.distill.signal`) and the target filter (`train.loss.target_filter`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ssb.generate.base import first_prefix
from ssb.grading import answer_sentence_start

BOXED = "\\boxed{"


@dataclass(frozen=True)
class LeakRows:
    """One pair's leak positions (rows as in the module docstring; None where not found)."""

    num_rows: int  # reply tokens + the end token
    answer_phrase_row: int | None  # predicts the first token of the answer's sentence
    wrong_answer_row: int | None  # where the hint's wrong answer departs from the reply's
    wrong_answer_token: int | None  # ... and the token it would write there


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False)


def answer_rows(reply_ids: Sequence[int], tokenizer: Any) -> tuple[int | None, int | None]:
    """(answer_phrase_row, boxed_row): the row predicting the first token of the sentence that
    holds the last ``\\boxed{``, and the row predicting the first token after that ``\\boxed{``.
    Found with prefix decodes (O(log n) of them), so any tokenizer works."""
    text = _decode(tokenizer, reply_ids)
    at = text.rfind(BOXED)
    if at < 0:
        return None, None
    n = len(reply_ids)
    # The first prefix whose text holds the whole last "\boxed{" ends on its "{".
    boxed_row = first_prefix(
        n, lambda i: _decode(tokenizer, reply_ids[:i]).count(BOXED) >= 1 + text[:at].count(BOXED)
    )
    start = answer_sentence_start(text)
    phrase_row = None
    if start is not None:
        # The token that covers the character after the break (index start + 1) starts the
        # sentence. (Not the break's own last character: a "\n" is its own token, and its row
        # predicts the newline, not the sentence.)
        first_past = first_prefix(n, lambda i: len(_decode(tokenizer, reply_ids[:i])) > start + 1)
        phrase_row = None if first_past is None else first_past - 1
    return phrase_row, boxed_row


def wrong_answer_departure(
    reply_ids: Sequence[int], boxed_row: int, wrong_answer: str, tokenizer: Any
) -> tuple[int, int] | None:
    """(row, token): where writing ``wrong_answer`` inside the reply's last ``\\boxed{`` would
    first differ from the reply's own tokens. None when the wrong answer cannot be told apart
    there: the reply writes that very answer (a token merged across its "}", e.g. "}.", would
    otherwise look like a departure), or the tokens never differ."""
    head = list(reply_ids[:boxed_row])
    if _decode(tokenizer, reply_ids)[len(_decode(tokenizer, head)) :].startswith(
        wrong_answer + "}"
    ):
        return None
    candidate = tokenizer.encode(
        _decode(tokenizer, head) + wrong_answer + "}", add_special_tokens=False
    )
    if candidate[: len(head)] != head:
        # The tokenizer merges across the boundary: fall back to the answer alone.
        candidate = head + tokenizer.encode(wrong_answer + "}", add_special_tokens=False)
    for row in range(len(head), min(len(candidate), len(reply_ids))):
        if candidate[row] != reply_ids[row]:
            return row, int(candidate[row])
    return None


def leak_rows(pair: dict[str, Any], tokenizer: Any) -> LeakRows:
    """The leak positions of one pairs.jsonl record."""
    reply_ids = list(pair["reply_ids"])
    phrase_row, boxed_row = answer_rows(reply_ids, tokenizer)
    wrong = (pair.get("incorrect_answer") or "").strip()
    departure = None
    if boxed_row is not None and wrong and wrong != (pair.get("teacher_answer") or "").strip():
        departure = wrong_answer_departure(reply_ids, boxed_row, wrong, tokenizer)
    return LeakRows(
        num_rows=len(reply_ids) + 1,
        answer_phrase_row=phrase_row,
        wrong_answer_row=departure[0] if departure else None,
        wrong_answer_token=departure[1] if departure else None,
    )


def suppressed_tokens(
    leaks: LeakRows, stop_token_ids: Sequence[int], labels: Sequence[int]
) -> list[list[int]]:
    """Per row, the token ids the target filter removes from the teacher's distribution: every
    stop token at every row but the last, and the wrong answer's token at its row; never a row's
    own label (the reply token the teacher is asked to predict there)."""
    rows: list[list[int]] = []
    for row in range(leaks.num_rows):
        ids = list(stop_token_ids) if row < leaks.num_rows - 1 else []
        if row == leaks.wrong_answer_row and leaks.wrong_answer_token is not None:
            ids.append(leaks.wrong_answer_token)
        rows.append(sorted({t for t in ids if t != labels[row]}))
    return rows


def suppression_table(
    pairs: Sequence[dict[str, Any]], tokenizer: Any, stop_token_ids: Sequence[int]
) -> dict[str, list[list[int]]]:
    """Pair id -> :func:`suppressed_tokens` of each of its rows: what the target filter takes
    out of the teacher's targets (the stop tokens, and the pair's own end token)."""
    table = {}
    for pair in pairs:
        labels = list(pair["reply_ids"]) + [pair["end_token_id"]]
        stops = sorted({*stop_token_ids, int(pair["end_token_id"])})
        table[pair["id"]] = suppressed_tokens(leak_rows(pair, tokenizer), stops, labels)
    return table
