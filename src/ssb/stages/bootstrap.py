"""Stage 2: select informative problems and let the hinted teacher write a robust solution.

For every rolled-out problem, in file order:
- keep it only if it has at least one correct and one incorrect (boxed) rollout;
- take one correct rollout and a rollout of the most common wrong answer (seeded tie-breaks);
- show the same model the hinted prompt and sample a robust solution;
- keep the solution only if its boxed answer is still correct and it ended on its own.

`bootstrap.jsonl` records the decision for every problem (kept or why not); `pairs.jsonl` holds
the kept pairs. A problem in either file is never redone, so a resumed run neither loses nor
duplicates pairs.
"""

from __future__ import annotations

import contextlib
import random
from collections import Counter
from typing import Any

from ssb.config import Config
from ssb.funnel import funnel
from ssb.generate.base import Generator, SamplingParams
from ssb.grading import answer_key, extract_boxed, grade
from ssb.problems import Problem
from ssb.prompts import (
    Message,
    render_prompt_ids,
    student_messages,
    teacher_messages,
    uses_chat_template,
)
from ssb.records import pair_record
from ssb.rundir import RunDir, append_jsonl, read_jsonl
from ssb.stages.common import chunks, generation_chunk_size, log, stable_seed
from ssb.stages.engine import (
    GenerationEngine,
    GenerationStats,
    generate_chunk,
    generation_engine,
)
from ssb.stages.ranks import launched_ranks, merge_parts


def select_rollouts(record: dict[str, Any], seed: int) -> tuple[str, dict | None, dict | None]:
    """Decide on one rollout record: ("mixed", correct_sample, wrong_sample) or (reason, None, None).

    The wrong sample is one whose answer is the most common wrong answer (answers grouped by
    `answer_key`, so "18.0" and "18" count together); ties between answers and the choice among
    equal samples use an RNG seeded by (seed, problem id), so the choice is reproducible."""
    samples = record["samples"]
    correct = [s for s in samples if s["correct"]]
    wrong = [s for s in samples if not s["correct"]]
    if not wrong:
        return "all_correct", None, None
    if not correct:
        return "all_wrong", None, None
    # A wrong rollout with no boxed answer teaches no specific pitfall (the reference drops them).
    wrong = [s for s in wrong if s["answer"] is not None]
    if not wrong:
        return "no_boxed_wrong", None, None
    rng = random.Random(stable_seed(seed, "select", record["id"]))
    counts = Counter(answer_key(s["answer"]) for s in wrong)
    top = max(counts.values())
    tied = sorted(key for key, c in counts.items() if c == top)
    chosen_key = rng.choice(tied)
    chosen_wrong = rng.choice([s for s in wrong if answer_key(s["answer"]) == chosen_key])
    chosen_correct = rng.choice(correct)
    return "mixed", chosen_correct, chosen_wrong


def _problem(record: dict[str, Any]) -> Problem:
    return Problem(
        id=record["id"],
        question=record["question"],
        answer=record["gold"],
        source=record.get("source", ""),
        solution=record.get("solution"),
    )


def run_bootstrap(cfg: Config, rundir: RunDir, progress: bool = True) -> dict[str, Any]:
    """Write pairs.jsonl for every rolled-out problem not yet decided."""
    target = cfg.bootstrap.target_pairs
    rollouts = _rollouts(rundir)
    ranks = launched_ranks()
    order = [r["id"] for r in rollouts]
    if ranks.main:  # what a killed multi-process launch left behind
        _merge_rank_parts(rundir, order, target)
    ranks.barrier()
    decided, kept = _decided(rundir)
    todo = [r for r in rollouts if r["id"] not in decided]
    log.info("bootstrap: %d rolled-out problems, %d to decide", len(rollouts), len(todo))

    stats = GenerationStats()
    # Only about a third of the problems are mixed and need the teacher, so a chunk spans three
    # generation chunks' worth of problems. Teacher samples are seeded by problem id, so a
    # resumed run samples what an uninterrupted one would.
    batch_problems = 3 * generation_chunk_size(cfg, cfg.bootstrap.attempts)
    batches = [
        [r for r in batch if r["id"] not in decided] for batch in chunks(rollouts, batch_problems)
    ]
    with contextlib.ExitStack() as stack:
        teacher = None  # the engine starts (and loads the model) only if a problem needs it
        for batch in [b for b in batches if b]:
            if target is not None and kept >= target:
                break
            decisions, mixed = _select(cfg, ranks.mine(batch))
            pairs: list[dict[str, Any]] = []
            if mixed:
                teacher = teacher or _start_teacher(cfg, rundir, stack)
                pairs = _teacher_pairs(cfg, *teacher, mixed, decisions, kept, stats, progress)
            # Pairs first: a crash between the two appends leaves the id in pairs.jsonl, which
            # also counts as decided, so nothing is redone or duplicated.
            append_jsonl(ranks.output(rundir, rundir.pairs_path), pairs)
            append_jsonl(ranks.output(rundir, rundir.bootstrap_log_path), decisions)
            kept += len(pairs)
            if ranks.world > 1:  # every rank sees the same count, so all stop at one batch
                ranks.barrier()
                if ranks.main:
                    _merge_rank_parts(rundir, order, target)
                ranks.barrier()
                kept = len(read_jsonl(rundir.pairs_path))
    summary = funnel(rundir)
    summary.update(stats.summary())
    return summary


def _rollouts(rundir: RunDir) -> list[dict[str, Any]]:
    rollouts = read_jsonl(rundir.rollouts_path)
    if rollouts:
        return rollouts
    if rundir.is_complete("rollout"):
        raise ValueError(
            f"{rundir.rollouts_path} is empty: the rollout stage found no training problems "
            "(check data.train, data.max_problems and data.skip_problems)"
        )
    raise FileNotFoundError(f"no rollouts in {rundir.rollouts_path}: run `ssb rollout` first")


def _decided(rundir: RunDir) -> tuple[set[str], int]:
    """The ids already decided (a decision or a pair) and the number of pairs kept."""
    decisions = read_jsonl(rundir.bootstrap_log_path)
    pair_ids = {r["id"] for r in read_jsonl(rundir.pairs_path)}
    decided = {r["id"] for r in decisions} | pair_ids
    # A "kept" decision whose pair is gone (a torn last line of pairs.jsonl): the pair cannot
    # be rebuilt from the decision, so the problem is decided again (teacher samples are
    # seeded per problem, so it gets the same reply), never silently dropped.
    lost = sorted({r["id"] for r in decisions if r.get("status") == "kept"} - pair_ids, key=str)
    if lost:
        log.warning(
            "bootstrap: %d kept pairs are missing from %s (%s): deciding them again",
            len(lost),
            rundir.pairs_path,
            ", ".join(map(str, lost[:5])) + (", ..." if len(lost) > 5 else ""),
        )
        decided -= set(lost)
    return decided, len(pair_ids)


Mixed = tuple[dict[str, Any], dict[str, Any], dict[str, Any]]  # record, correct, wrong rollout


def _select(cfg: Config, records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Mixed]]:
    """The decisions of the problems that are not mixed, and the mixed ones for the teacher."""
    decisions, mixed = [], []
    for record in records:
        if cfg.bootstrap.teacher_context == "gold" and not record.get("solution"):
            raise ValueError(
                f"bootstrap.teacher_context=gold needs gold solutions; problem "
                f"{record['id']} ({record.get('source')}) has none"
            )
        status, good, bad = select_rollouts(record, cfg.seed)
        if status == "mixed":
            mixed.append((record, good, bad))
        else:
            decisions.append({"id": record["id"], "status": status})
    return decisions, mixed


def _start_teacher(
    cfg: Config, rundir: RunDir, stack: contextlib.ExitStack
) -> tuple[GenerationEngine, Generator]:
    """The generation engine and the hinted teacher's generator (the policy model), open until
    `stack` closes."""
    engine = stack.enter_context(generation_engine(cfg, rundir, {"policy": cfg.model.adapter}))
    return engine, stack.enter_context(engine.serving("policy"))


def _teacher_messages(
    cfg: Config, engine: GenerationEngine, mixed: list[Mixed]
) -> list[list[Message]]:
    """The hinted prompt of each mixed problem: its correct and wrong rollout shown."""
    chat = uses_chat_template(engine.tokenizer, cfg.prompt)
    return [
        teacher_messages(
            _problem(r),
            cfg.prompt,
            chat=chat,
            context=cfg.bootstrap.teacher_context,
            correct=good["text"],
            incorrect=bad["text"],
            style=cfg.bootstrap.hint_style,
        )
        for r, good, bad in mixed
    ]


def _teacher_pairs(
    cfg: Config,
    engine: GenerationEngine,
    generator: Generator,
    mixed: list[Mixed],
    decisions: list[dict[str, Any]],
    kept: int,
    stats: GenerationStats,
    progress: bool,
) -> list[dict[str, Any]]:
    """The hinted teacher's replies to the mixed problems: the pairs kept, in order (up to
    `bootstrap.target_pairs` with the `kept` so far); each decision is added to `decisions`."""
    bcfg = cfg.bootstrap
    t_msgs = _teacher_messages(cfg, engine, mixed)
    prompts = [render_prompt_ids(engine.tokenizer, m, cfg.prompt) for m in t_msgs]
    params = SamplingParams.of(
        bcfg.sampling,
        max_new_tokens=cfg.generation.max_new_tokens,
        n=bcfg.attempts,
        stop_strings=engine.reply.stop_strings,
        prompt_seeds=[stable_seed(cfg.seed, "bootstrap", r["id"]) for r, _, _ in mixed],
    )
    ids = [r["id"] for r, _, _ in mixed]
    kept_at, outputs = generate_chunk(
        engine, generator, ids, prompts, params, "bootstrap", stats, progress
    )
    for i in sorted(set(range(len(mixed))) - set(kept_at)):
        decisions.append({"id": ids[i], "status": "teacher_prompt_too_long"})
    pairs: list[dict[str, Any]] = []
    for i, outs in zip(kept_at, outputs):
        record, good, bad = mixed[i]
        problem = _problem(record)
        # The first attempt that ended by itself with a still-correct answer.
        reply = next(
            (c for c in outs if c.finish_reason == "stop" and grade(c.text, problem.answer)),
            None,
        )
        if reply is None:
            truncated = all(c.finish_reason == "length" for c in outs)
            decisions.append(
                {
                    "id": record["id"],
                    "status": "teacher_truncated" if truncated else "teacher_wrong",
                    "teacher_answers": [extract_boxed(c.text) for c in outs],
                }
            )
            continue
        if bcfg.target_pairs is not None and kept + len(pairs) >= bcfg.target_pairs:
            break  # undecided: a later run with a larger target picks it up
        s_msgs = student_messages(problem, cfg.prompt)
        pairs.append(
            pair_record(
                problem,
                s_msgs,
                t_msgs[i],
                render_prompt_ids(engine.tokenizer, s_msgs, cfg.prompt),
                prompts[i],
                reply.text,
                reply.token_ids,
                engine.reply.end_token_id,
                shown={
                    "teacher_answer": extract_boxed(reply.text),
                    "correct_rollout": good["text"],
                    "correct_answer": good["answer"],
                    "incorrect_rollout": bad["text"],
                    "incorrect_answer": bad["answer"],
                },
            )
        )
        decisions.append({"id": problem.id, "status": "kept"})
    return pairs


def _merge_rank_parts(rundir: RunDir, order: list[str], target_pairs: int | None) -> None:
    """Merge the ranks' pairs and decisions (`ssb.stages.ranks`). With `target_pairs`, only the
    first pairs in rollout order up to the target are kept, as one process would keep them; the
    others (and their "kept" decisions) are dropped, so those problems stay undecided."""
    limit = None
    if target_pairs is not None:
        limit = max(0, target_pairs - len(read_jsonl(rundir.pairs_path)))
    merge_parts(rundir, rundir.pairs_path, order, limit=limit)
    pair_ids = {p["id"] for p in read_jsonl(rundir.pairs_path)}
    merge_parts(
        rundir,
        rundir.bootstrap_log_path,
        order,
        keep=lambda d: d["status"] != "kept" or d["id"] in pair_ids,
    )
