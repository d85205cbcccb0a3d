"""The teacher-signal diagnostic: what the hinted teacher's distribution could teach the
plain-prompt student on the reply tokens, measured before any training (DESIGN section 9).

SSB can only transfer the teacher's distribution. If the teacher gives its own reply no more
probability than the untrained student does, KD has nothing to distil but what the hint adds,
and the CPU ablation showed what that is: premature-stop mass and mass on the hint's wrong answer.

Pure computation on log-probabilities at temperature 1 (no model, no I/O): `SignalSums` adds up,
chunk of rows by chunk of rows, per-token statistics of the teacher and the student on one pair's
rows (row ``i`` predicts token ``i`` of ``reply_ids + [end_token_id]``, as the loss counts them;
leak rows from `ssb.distill.hint_leaks`), and `SignalSums.summary` turns the sums over every token
of a run into means and a verdict. The stage `ssb.stages.diagnose` feeds it from the stored
targets (or a teacher forward) and one forward of the student.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from ssb.distill.hint_leaks import LeakRows

# Keys of the summary's {"teacher": ..., "student": ...} rows, in report order, with a label.
SIDE_STATS: dict[str, str] = {
    "p_reply": "p(reply token)",
    "logp_reply": "log p(reply token), nats",
    "argmax_accuracy": "argmax = reply token",
    "entropy": "entropy, nats",
    "stop_mass_nonfinal": "stop-token mass, non-final rows",
    "stop_mass_answer_phrase": "stop-token mass before the answer phrase",
    "wrong_answer_mass": "mass on the hint's wrong answer",
}


def _plogp(logp: Tensor) -> Tensor:
    """p log p per entry with 0 log 0 = 0 (a -inf log-prob would give 0 * -inf = nan)."""
    p = logp.exp()
    return torch.where(p > 0, p * logp, 0.0)


@dataclass
class SignalSums:
    """Sums over reply tokens (and counts of the pairs where a leak row was found); `add` one
    chunk of a pair's rows at a time, `summary` for the means."""

    pairs: int = 0
    tokens: int = 0
    teacher_p: float = 0.0
    student_p: float = 0.0
    teacher_logp: float = 0.0
    student_logp: float = 0.0
    teacher_argmax: float = 0.0
    student_argmax: float = 0.0
    teacher_entropy: float = 0.0
    student_entropy: float = 0.0
    teacher_higher: float = 0.0  # tokens with p_T(y) > p_S(y)
    fixable: float = 0.0  # teacher argmax right, student's wrong
    breakable: float = 0.0  # the reverse
    nonfinal_rows: int = 0
    teacher_stop_nonfinal: float = 0.0
    student_stop_nonfinal: float = 0.0
    phrase_pairs: int = 0
    teacher_stop_phrase: float = 0.0
    student_stop_phrase: float = 0.0
    wrong_pairs: int = 0
    teacher_wrong: float = 0.0
    student_wrong: float = 0.0

    def add(
        self,
        teacher_logp: Tensor,
        student_logp: Tensor,
        labels: Tensor,
        stop_token_ids: Sequence[int],
        leaks: LeakRows,
        first_row: int = 0,
    ) -> None:
        """Add rows ``first_row .. first_row + n - 1`` of one pair.

        Args:
            teacher_logp, student_logp: ``(n, V)`` log-probs at temperature 1.
            labels: ``(n,)`` the reply tokens those rows predict (the end token last).
            stop_token_ids: the run's stop tokens and the pair's end token. A row's stop mass
                leaves out its own label (a stop token the reply really writes there is right).
            leaks: the pair's leak rows; ``leaks.num_rows`` is the pair's row count.
            first_row: the chunk's first row within the pair (a pair is counted at row 0).
        """
        t, s = teacher_logp.float(), student_logp.float()
        n = labels.shape[0]
        if t.shape != s.shape or t.shape[0] != n:
            raise ValueError(f"teacher {tuple(t.shape)}, student {tuple(s.shape)}, labels {n}")
        if first_row + n > leaks.num_rows:
            raise ValueError(
                f"rows {first_row}..{first_row + n} exceed the pair's {leaks.num_rows}"
            )
        y = labels.long().to(t.device)[:, None]
        t_y, s_y = t.gather(1, y)[:, 0], s.gather(1, y)[:, 0]
        t_hit, s_hit = t.argmax(-1) == y[:, 0], s.argmax(-1) == y[:, 0]
        self.pairs += int(first_row == 0)
        self.tokens += n
        self.teacher_p += t_y.exp().sum().item()
        self.student_p += s_y.exp().sum().item()
        self.teacher_logp += t_y.sum().item()
        self.student_logp += s_y.sum().item()
        self.teacher_argmax += t_hit.sum().item()
        self.student_argmax += s_hit.sum().item()
        self.teacher_entropy += -_plogp(t).sum().item()
        self.student_entropy += -_plogp(s).sum().item()
        self.teacher_higher += (t_y > s_y).sum().item()
        self.fixable += (t_hit & ~s_hit).sum().item()
        self.breakable += (~t_hit & s_hit).sum().item()

        stops = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=t.device)
        own = stops[None, :] == y  # (n, k): the row's own label among the stop tokens
        t_stop = torch.where(own, 0.0, t[:, stops].exp()).sum(-1)
        s_stop = torch.where(own, 0.0, s[:, stops].exp()).sum(-1)
        rows = torch.arange(first_row, first_row + n, device=t.device)
        nonfinal = rows < leaks.num_rows - 1
        self.nonfinal_rows += int(nonfinal.sum())
        self.teacher_stop_nonfinal += t_stop[nonfinal].sum().item()
        self.student_stop_nonfinal += s_stop[nonfinal].sum().item()
        phrase = leaks.answer_phrase_row
        if phrase is not None and first_row <= phrase < first_row + n:
            self.phrase_pairs += 1
            self.teacher_stop_phrase += t_stop[phrase - first_row].item()
            self.student_stop_phrase += s_stop[phrase - first_row].item()
        row, token = leaks.wrong_answer_row, leaks.wrong_answer_token
        if row is not None and token is not None and first_row <= row < first_row + n:
            self.wrong_pairs += 1
            self.teacher_wrong += t[row - first_row, token].exp().item()
            self.student_wrong += s[row - first_row, token].exp().item()

    def merge(self, other: SignalSums) -> SignalSums:
        """Sums of both (e.g. two parts of a run scored apart)."""
        return SignalSums(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        )

    def summary(self) -> dict[str, Any]:
        """Means over the run's tokens (leak rows: over the pairs where they were found), the
        teacher's advantage and the verdict (None where nothing was counted)."""

        def mean(total: float, count: int) -> float | None:
            return total / count if count else None

        def sides(teacher: float, student: float, count: int) -> dict[str, float | None]:
            return {"teacher": mean(teacher, count), "student": mean(student, count)}

        n = self.tokens
        out: dict[str, Any] = {
            "pairs": self.pairs,
            "reply_tokens": n,
            "p_reply": sides(self.teacher_p, self.student_p, n),
            "logp_reply": sides(self.teacher_logp, self.student_logp, n),
            "argmax_accuracy": sides(self.teacher_argmax, self.student_argmax, n),
            "entropy": sides(self.teacher_entropy, self.student_entropy, n),
            "advantage": {
                "mean_logp_gap": mean(self.teacher_logp - self.student_logp, n),
                "share_teacher_higher": mean(self.teacher_higher, n),
            },
            "fixable": mean(self.fixable, n),
            "breakable": mean(self.breakable, n),
            "stop_mass_nonfinal": {
                **sides(self.teacher_stop_nonfinal, self.student_stop_nonfinal, self.nonfinal_rows),
                "rows": self.nonfinal_rows,
            },
            "stop_mass_answer_phrase": {
                **sides(self.teacher_stop_phrase, self.student_stop_phrase, self.phrase_pairs),
                "pairs": self.phrase_pairs,
            },
            "wrong_answer_mass": {
                **sides(self.teacher_wrong, self.student_wrong, self.wrong_pairs),
                "pairs": self.wrong_pairs,
            },
        }
        out["verdict"] = verdict(out)
        return out


def verdict(summary: dict[str, Any]) -> dict[str, Any]:
    """Whether the teacher carries an advantage over the untrained student on its own reply:
    a positive mean log-prob gap AND more fixable than breakable tokens. `text` says which
    condition failed, with the numbers."""
    gap = summary["advantage"]["mean_logp_gap"]
    fix, brk = summary["fixable"], summary["breakable"]
    if gap is None:
        return {"teacher_advantage": None, "text": "no reply tokens to measure"}
    failed = []
    if gap <= 0:
        failed.append(
            f"it gives its own reply tokens {gap:+.4f} nats/token of log-prob against the "
            "plain-prompt student (<= 0)"
        )
    if fix <= brk:
        failed.append(
            f"its argmax is right where the student's is wrong on {fix:.1%} of reply tokens "
            f"and wrong where the student's is right on {brk:.1%} (fixable <= breakable)"
        )
    if failed:
        text = "the hinted teacher carries no advantage over the student: " + "; and ".join(failed)
        return {"teacher_advantage": False, "text": text}
    text = (
        f"the hinted teacher carries an advantage: {gap:+.4f} nats/token of log-prob over the "
        f"student on its reply; argmax fixable {fix:.1%} > breakable {brk:.1%}"
    )
    return {"teacher_advantage": True, "text": text}
