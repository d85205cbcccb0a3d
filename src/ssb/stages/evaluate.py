"""Stage 5: evaluate the base model and every trained adapter on the eval benchmarks.

Models are names mapped to adapter directories: ``base`` (no adapter), ``student``
(``adapter/``), and any ``<name>/adapter/`` in the run directory holding a PEFT adapter (e.g.
``grpo/adapter``); ``name=path`` evaluates an adapter anywhere. Every model sees the hint-free
prompt that rollouts and training use (`render_prompt_ids(tokenizer, student_messages(...))`).

Sampling: greedy pass@1 when ``eval.num_samples == 1``, else avg@k with ``eval.sampling``. ``eval.scoring = "reference"`` reproduces the paper's harness (greedy, 1,024 new
tokens, literal-substring matching, see `grading.reference_grade`). Both verdicts (math-verify
and reference) are stored for every sample whatever the scoring mode, so a report can show how
much the harness alone moves a score.

Files: ``eval/<model>-<bench>.jsonl`` (one record per problem, appended a chunk at a time, so a
resumed run skips finished problems) and ``eval/summary.json`` (rewritten atomically from all
records at the end of every call). Each record carries a fingerprint of what produced it (model,
adapter weights, prompt, sampling, scoring, seed); records from other settings are moved aside to
``eval/stale/`` rather than mixed in.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

from ssb.config import Config
from ssb.generate.base import Generator, SamplingParams
from ssb.problems import Problem, load_eval_problems
from ssb.prompts import render_prompt_ids, student_messages
from ssb.rundir import (
    RunDir,
    append_jsonl,
    atomic_write_bytes,
    atomic_write_text,
    read_jsonl,
)
from ssb.stages.common import (
    chunks,
    drop_unparseable_golds,
    generation_chunk_size,
    log,
    stable_seed,
)
from ssb.stages.engine import (
    GenerationEngine,
    GenerationStats,
    generate_chunk,
    generation_engine,
)
from ssb.stages.eval_setup import (
    bench_slug,
    eval_record,
    eval_settings,
    fingerprint,
    records_path,
    resolve_models,
)
from ssb.stages.eval_summary import write_summary
from ssb.stages.ranks import Ranks, launched_ranks, merge_parts


def _load_current(path: Path, fp: str) -> dict[str, dict[str, Any]]:
    """Records of `path` made with fingerprint `fp`, by id (first wins). Records made with other
    settings are moved to eval/stale/ so they are neither reused nor lost."""
    records = read_jsonl(path)
    current = [r for r in records if r.get("fingerprint") == fp]
    if len(current) != len(records):
        stale = path.parent / "stale" / f"{path.stem}.{time.strftime('%Y%m%dT%H%M%S')}.jsonl"
        # Copy first, then replace the original: a crash in between loses nothing.
        atomic_write_bytes(stale, path.read_bytes())
        if current:
            atomic_write_text(
                path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in current)
            )
        else:
            path.unlink()
        log.warning(
            "eval: %s had %d records made with other settings; moved to %s",
            path.name,
            len(records) - len(current),
            stale,
        )
    by_id: dict[str, dict[str, Any]] = {}
    for r in current:
        by_id.setdefault(str(r["id"]), r)
    return by_id


def run_eval(
    cfg: Config,
    rundir: RunDir,
    models: list[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate `models` (default: every available one) on cfg.eval.benchmarks, then rewrite
    eval/summary.json from all records. Returns a compact summary (for the manifest)."""

    settings = eval_settings(cfg)
    if cfg.eval.scoring == "reference" and cfg.eval.num_samples > 1:
        log.warning("eval: scoring=reference is greedy pass@1; eval.num_samples is ignored")
    slugs = [bench_slug(b) for b in cfg.eval.benchmarks]
    if len(set(slugs)) != len(slugs):
        raise ValueError(
            f"eval.benchmarks {cfg.eval.benchmarks} would share record files ({slugs}); "
            "give the files distinct names"
        )
    chosen = resolve_models(rundir, models)
    problems, bad_golds = _eval_problems(cfg)
    fingerprints = {name: fingerprint(cfg, settings, a) for name, a in chosen.items()}
    ranks = launched_ranks()
    if ranks.main:  # merge what a killed multi-process launch left; set stale records aside
        for name in chosen:
            for bench, plist in problems.items():
                path = records_path(rundir, name, bench)
                merge_parts(rundir, path, [p.id for p in plist])
                _load_current(path, fingerprints[name])
    ranks.barrier()
    chunk_size = generation_chunk_size(cfg, settings["num_samples"])
    todo = _todo(rundir, problems, fingerprints, ranks, chunk_size)
    new_records: dict[str, dict[str, int]] = {name: {b: 0 for b in problems} for name in chosen}
    stats = GenerationStats()
    # One engine serves every model that has problems left (on vLLM: the base without a LoRA
    # request, each adapter as its own); see ssb.stages.engine.
    with contextlib.ExitStack() as stack:
        if todo:
            served = {name: chosen[name] for name in todo}
            engine = stack.enter_context(generation_engine(cfg, rundir, served))
        for name, model_todo in todo.items():
            log.info("eval: %s: %d problems to evaluate", name, sum(len(c) for _, c in model_todo))
            with engine.serving(name) as generator:
                for bench, chunk in model_todo:
                    where = (name, bench, fingerprints[name])
                    records = _evaluate_chunk(
                        cfg, engine, generator, where, chunk, settings, stats, progress
                    )
                    new_records[name][bench] += append_jsonl(
                        ranks.output(rundir, records_path(rundir, name, bench)), records
                    )
    ranks.barrier()
    if ranks.main:
        for name in chosen:
            for bench, plist in problems.items():
                merge_parts(rundir, records_path(rundir, name, bench), [p.id for p in plist])
        summary = write_summary(cfg, rundir, problems, models=chosen)
    ranks.barrier()
    if not ranks.main:
        summary = json.loads(rundir.eval_summary_path.read_text())
    out: dict[str, Any] = {
        "models": list(chosen),
        "benchmarks": list(problems),
        "metric": settings["metric"],
        "scoring": settings["scoring"],
        "new_records": new_records,
        "skipped_unparseable_gold": bad_golds,
        "accuracy": {
            m: {b: r["accuracy"] for b, r in benches.items()}
            for m, benches in summary["results"].items()
        },
    }
    out.update(stats.summary())
    return out


def _eval_problems(cfg: Config) -> tuple[dict[str, list[Problem]], dict[str, int]]:
    """Each benchmark's problems whose gold answer can be graded, and how many were not."""
    problems, bad_golds = {}, {}
    for bench in cfg.eval.benchmarks:
        problems[bench], skipped_ids = drop_unparseable_golds(
            load_eval_problems(cfg, bench), "eval"
        )
        bad_golds[bench] = len(skipped_ids)
    for bench, plist in problems.items():
        ids = [str(p.id) for p in plist]
        if len(set(ids)) != len(ids):
            raise ValueError(f"benchmark {bench!r} has duplicate problem ids")
    return problems, bad_golds


def _todo(
    rundir: RunDir,
    problems: dict[str, list[Problem]],
    fingerprints: dict[str, str],
    ranks: Ranks,
    chunk_size: int,
) -> dict[str, list[tuple[str, list[Problem]]]]:
    """Per model, the chunks (benchmark, problems) of this rank's problems without a record."""
    todo: dict[str, list[tuple[str, list[Problem]]]] = {}
    for name, fp in fingerprints.items():
        for bench, plist in problems.items():
            done = {
                str(r["id"])
                for r in read_jsonl(records_path(rundir, name, bench))
                if r.get("fingerprint") == fp
            }
            for chunk in chunks(ranks.mine(plist), chunk_size):
                left = [p for p in chunk if str(p.id) not in done]
                if left:
                    todo.setdefault(name, []).append((bench, left))
    return todo


def _evaluate_chunk(
    cfg: Config,
    engine: GenerationEngine,
    generator: Generator,
    where: tuple[str, str, str],
    chunk: list[Problem],
    settings: dict[str, Any],
    stats: GenerationStats,
    progress: bool,
) -> list[dict[str, Any]]:
    """One chunk of one benchmark through one model (`where`: model name, benchmark, the
    records' fingerprint): its eval records."""
    name, bench, fp = where
    prompts = [
        render_prompt_ids(engine.tokenizer, student_messages(p, cfg.prompt), cfg.prompt)
        for p in chunk
    ]
    params = SamplingParams(
        temperature=settings["temperature"],
        top_p=settings["top_p"],
        top_k=settings["top_k"],
        max_new_tokens=settings["max_new_tokens"],
        n=settings["num_samples"],
        stop_strings=engine.reply.stop_strings,
        # The same seeds for every model: paired comparisons share the randomness.
        prompt_seeds=[stable_seed(cfg.seed, "eval", bench_slug(bench), p.id) for p in chunk],
    )
    ids = [str(p.id) for p in chunk]
    kept, outputs = generate_chunk(
        engine, generator, ids, prompts, params, f"eval {name} {bench}", stats, progress
    )
    return [
        eval_record(
            chunk[i],
            engine.tokenizer.decode(prompts[i]),
            outs,
            bench,
            settings["scoring"],
            fp,
        )
        for i, outs in zip(kept, outputs)
    ]
