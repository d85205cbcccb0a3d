"""Stage 1: sample K hint-free answers per training problem and grade them.

Writes `rollouts.jsonl`, one record per problem. Problems are processed in fixed chunks (by
position in the problem list) and each chunk is appended in one write, so a resumed run skips
finished problems. Each problem's samples are seeded by its id, so an interrupted and resumed
run reproduces the uninterrupted one, whatever the chunk or batch a problem lands in.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from typing import Any

from ssb.config import Config
from ssb.generate.base import SamplingParams
from ssb.grading import extract_boxed, grade
from ssb.problems import Problem, load_train_problems
from ssb.prompts import render_prompt_ids, student_messages
from ssb.records import RolloutRecord
from ssb.rundir import RunDir, append_jsonl, read_jsonl
from ssb.stages.common import (
    chunks,
    drop_unparseable_golds,
    generation_chunk_size,
    log,
    stable_seed,
)
from ssb.stages.engine import GenerationStats, generate_chunk, generation_engine
from ssb.stages.ranks import launched_ranks, merge_parts


def rollout_record(problem: Problem, completions: list[Any]) -> RolloutRecord:
    samples = []
    for c in completions:
        samples.append(
            {
                "text": c.text,
                "token_ids": c.token_ids,
                "finish_reason": c.finish_reason,
                "answer": extract_boxed(c.text),
                "correct": grade(c.text, problem.answer),
            }
        )
    return {
        "id": problem.id,
        "question": problem.question,
        "gold": problem.answer,
        "source": problem.source,
        "solution": problem.solution,
        "samples": samples,
        "num_correct": sum(s["correct"] for s in samples),
    }


def run_rollout(
    cfg: Config,
    rundir: RunDir,
    problems: list[Problem] | None = None,
    progress: bool = True,
    on_chunk: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Sample cfg.rollout.num_samples answers for each problem not yet in rollouts.jsonl."""
    if problems is None:
        problems = load_train_problems(cfg)
    problems, bad_golds = drop_unparseable_golds(problems, "rollout")
    ranks = launched_ranks()
    if ranks.main:  # what a killed multi-process launch left behind
        merge_parts(rundir, rundir.rollouts_path, [p.id for p in problems])
    ranks.barrier()
    done = {r["id"] for r in read_jsonl(rundir.rollouts_path)}
    k = cfg.rollout.num_samples
    chunk_size = generation_chunk_size(cfg, k)
    todo_chunks = [
        [p for p in chunk if p.id not in done] for chunk in chunks(ranks.mine(problems), chunk_size)
    ]
    todo_chunks = [c for c in todo_chunks if c]
    num_todo = sum(len(c) for c in todo_chunks)
    log.info(
        "rollout: %d problems, %d already done, %d to sample%s",
        len(problems),
        len(done),
        num_todo,
        f" on rank {ranks.rank}/{ranks.world}" if ranks.world > 1 else "",
    )
    out_path = ranks.output(rundir, rundir.rollouts_path)
    written = 0
    stats = GenerationStats()
    if todo_chunks:
        with (
            generation_engine(cfg, rundir, {"policy": cfg.model.adapter}) as engine,
            engine.serving("policy") as generator,
        ):
            params = SamplingParams.of(
                cfg.rollout.sampling,
                max_new_tokens=cfg.generation.max_new_tokens,
                n=k,
                stop_strings=engine.reply.stop_strings,
            )
            for chunk in todo_chunks:
                prompts = [
                    render_prompt_ids(engine.tokenizer, student_messages(p, cfg.prompt), cfg.prompt)
                    for p in chunk
                ]
                seeds = [stable_seed(cfg.seed, "rollout", p.id) for p in chunk]
                kept, outputs = generate_chunk(
                    engine,
                    generator,
                    [p.id for p in chunk],
                    prompts,
                    dataclasses.replace(params, prompt_seeds=seeds),
                    "rollout",
                    stats,
                    progress,
                )
                if not kept:
                    continue
                records = [rollout_record(chunk[i], outs) for i, outs in zip(kept, outputs)]
                written += append_jsonl(out_path, records)
                if on_chunk is not None:
                    on_chunk(written, num_todo)
    ranks.barrier()
    if ranks.main:
        merge_parts(rundir, rundir.rollouts_path, [p.id for p in problems])
    ranks.barrier()
    summary = summarize_rollouts(rundir)
    summary.update(stats.summary(), skipped_unparseable_gold=len(bad_golds))
    return summary


def summarize_rollouts(rundir: RunDir) -> dict[str, Any]:
    records = read_jsonl(rundir.rollouts_path)
    samples = [s for r in records for s in r["samples"]]
    n = len(records)
    return {
        "problems": n,
        "samples": len(samples),
        "sample_accuracy": (sum(s["correct"] for s in samples) / len(samples)) if samples else 0.0,
        "all_correct": sum(r["num_correct"] == len(r["samples"]) for r in records),
        "all_wrong": sum(r["num_correct"] == 0 for r in records),
        "mixed": sum(0 < r["num_correct"] < len(r["samples"]) for r in records),
        "truncated_samples": sum(s["finish_reason"] == "length" for s in samples),
        # stop / length (aborted samples are never written: `require_finished`)
        "finish_reasons": dict(sorted(Counter(s["finish_reason"] for s in samples).items())),
        "generated_tokens": sum(len(s["token_ids"]) for s in samples),
    }
