"""The bootstrap funnel: problems -> mixed -> kept, and why each problem that was not kept was
rejected. Defined once here; `ssb bootstrap` writes the decisions, the stage summary and the
report read them through `funnel`."""

from __future__ import annotations

from collections import Counter
from typing import Any

from ssb.rundir import RunDir, read_jsonl

# Every status a bootstrap decision may have besides "kept", with what it means.
REJECT_REASONS = {
    "all_correct": "all rollouts correct (too easy)",
    "all_wrong": "all rollouts wrong (too hard)",
    "no_boxed_wrong": "wrong rollouts without a boxed answer",
    "teacher_wrong": "teacher's answer wrong",
    "teacher_truncated": "teacher hit the token limit",
    "teacher_prompt_too_long": "hinted prompt too long for the context",
}
# Statuses of problems that had a correct and a wrong rollout (they reached the teacher).
MIXED_STATUSES = ("kept", "teacher_wrong", "teacher_truncated", "teacher_prompt_too_long")


def funnel(rundir: RunDir) -> dict[str, Any]:
    """problems -> decided -> mixed -> kept, with the count of every rejection reason, from
    rollouts.jsonl, bootstrap.jsonl and pairs.jsonl."""
    decisions = read_jsonl(rundir.bootstrap_log_path)
    pair_ids = [p["id"] for p in read_jsonl(rundir.pairs_path)]
    # A problem decided again (its kept pair was lost) counts once, with its latest decision.
    latest = {d["id"]: d["status"] for d in decisions}
    counts = Counter(latest.values())
    # A pair whose "kept" line was lost (killed between the two appends) still counts as kept.
    logged = {d["id"] for d in decisions}
    counts["kept"] += sum(1 for i in pair_ids if i not in logged)
    return {
        "problems": len(read_jsonl(rundir.rollouts_path)),
        "decided": sum(counts.values()),
        "mixed": sum(counts[s] for s in MIXED_STATUSES),
        "kept": len(pair_ids),
        "rejected": {reason: counts[reason] for reason in REJECT_REASONS},
    }
