"""Stage 5: evaluate the base model and every trained adapter on the eval benchmarks.

Models are names mapped to adapter directories: ``base`` (no adapter), ``student``
(``adapter/``), and any ``<name>/adapter/`` in the run directory holding a PEFT adapter (e.g.
``grpo/adapter``); ``name=path`` evaluates an adapter anywhere. Every model sees the hint-free
prompt that rollouts and training use (`render_prompt_ids(tokenizer, student_messages(...))`).

Sampling: greedy pass@1 when ``eval.num_samples == 1``, else avg@k with ``eval.temperature`` /
``eval.top_p``. ``eval.scoring = "reference"`` reproduces the paper's harness (greedy, 1,024 new
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
import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any

from ssb.config import Config, to_dict
from ssb.identity import adapter_hash, has_adapter
from ssb.rundir import (
    RunDir,
    append_jsonl,
    atomic_write_bytes,
    atomic_write_json,
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
from ssb.stages.engine import GenerationStats, generate_chunk, generation_engine
from ssb.stages.ranks import launched_ranks, merge_parts
from ssb.stats import (
    bootstrap_mean_interval,
    mcnemar_exact,
    paired_bootstrap_diff,
    wilson_interval,
)

SCORINGS = ("math-verify", "reference")
# Which per-sample verdict each scoring reads.
VERDICT_KEYS = {"math-verify": "correct", "reference": "correct_reference"}
REFERENCE_MAX_NEW_TOKENS = 1024  # MOTIF / SSB harness: greedy, max_tokens=1024
BOOTSTRAP_RESAMPLES = 2000
_NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")


# --------------------------------------------------------------------------- models


def available_models(rundir: RunDir) -> dict[str, Path | None]:
    """Every model that can be evaluated in this run: name -> adapter dir (None for base).

    base; student when ``adapter/`` has an adapter; ``<name>/adapter`` for any other direct
    sub-directory with one (e.g. ``grpo``); and models named ``name=path`` in an earlier call
    (remembered in eval/summary.json) whose adapter still exists.
    """
    models: dict[str, Path | None] = {"base": None}
    models.update(
        (name, path) for name, path in rundir.trained_adapters().items() if _NAME_RE.match(name)
    )
    if rundir.eval_summary_path.exists():
        try:
            old = json.loads(rundir.eval_summary_path.read_text()).get("models", {})
        except json.JSONDecodeError:
            old = {}
        for name, info in old.items():
            adapter = (info or {}).get("adapter")
            if name not in models and adapter and has_adapter(_resolve(rundir, adapter)):
                models[name] = _resolve(rundir, adapter)
    return models


def rival_pairs(names: list[str]) -> list[tuple[str, str]]:
    """Paired comparisons besides "vs base": SSB's student against the GRPO baseline (the
    paper's claim), and each iterated round's student against the round before it."""

    pairs = []
    if "student" in names and "grpo" in names:
        pairs.append(("student", "grpo"))
    for name in names:
        match = re.fullmatch(r"round(\d+)", name)
        if match and int(match.group(1)) >= 2:
            previous = RunDir.round_model_name(int(match.group(1)) - 1)
            if previous in names:
                pairs.append((name, previous))
    return pairs


def _resolve(rundir: RunDir, path: str | Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else rundir.path / p


def _display_path(rundir: RunDir, path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return str(Path(path).resolve().relative_to(rundir.path.resolve()))
    except ValueError:
        return str(Path(path).resolve())


def resolve_models(rundir: RunDir, models: list[str] | None) -> dict[str, Path | None]:
    """The models to evaluate now: all available ones (None), or the listed names.

    An entry ``name=path`` names an adapter directory anywhere (relative paths are taken from the
    run directory)."""
    available = available_models(rundir)
    if models is None:
        return available
    chosen: dict[str, Path | None] = {}
    for entry in models:
        if "=" in entry:
            name, raw = (s.strip() for s in entry.split("=", 1))
            if not _NAME_RE.match(name) or name == "base":
                raise ValueError(f"bad model name {name!r} in {entry!r}")
            path = _resolve(rundir, raw)
            if not has_adapter(path):
                raise FileNotFoundError(f"model {name!r}: no PEFT adapter in {path}")
            chosen[name] = path
        elif entry in available:
            chosen[entry] = available[entry]
        else:
            hint = ""
            if entry == "student":
                hint = f" (no adapter in {rundir.adapter_dir}: run `ssb train` first)"
            raise ValueError(
                f"unknown model {entry!r}{hint}; available: {', '.join(available)} "
                "(or name=path/to/adapter)"
            )
    return chosen


# --------------------------------------------------------------------------- settings


def eval_settings(cfg: Config) -> dict[str, Any]:
    """The effective sampling for this config (the reference harness forces greedy, 1024)."""
    e = cfg.eval
    if e.scoring not in SCORINGS:
        raise ValueError(f"eval.scoring: {e.scoring!r} is not one of {', '.join(SCORINGS)}")
    if e.scoring == "reference":
        n, temperature, top_p = 1, 0.0, 1.0
        max_new_tokens = REFERENCE_MAX_NEW_TOKENS
    elif e.num_samples == 1:
        n, temperature, top_p = 1, 0.0, 1.0
        max_new_tokens = cfg.generation.max_new_tokens
    else:
        n, temperature, top_p = e.num_samples, e.temperature, e.top_p
        max_new_tokens = cfg.generation.max_new_tokens
    greedy = temperature == 0.0
    if greedy:
        n = 1  # n greedy samples would be n copies of one
    return {
        "scoring": e.scoring,
        "greedy": greedy,
        "num_samples": n,
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "metric": "pass@1" if n == 1 else f"avg@{n}",
    }


def fingerprint(cfg: Config, settings: dict[str, Any], adapter: Path | None) -> str:
    """What a record depends on: model, adapter weights, prompt, sampling, scoring, seed."""
    model = {k: v for k, v in to_dict(cfg.model).items() if k not in ("device", "cache_dir")}
    blob = json.dumps(
        {
            "model": model,
            "adapter": adapter_hash(adapter),
            "prompt": to_dict(cfg.prompt),
            "settings": settings,
            "seed": cfg.seed,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def bench_slug(benchmark: str) -> str:
    """A file-name-safe name for a benchmark (a jsonl path becomes its stem)."""
    if benchmark.endswith((".jsonl", ".json", ".csv")) or "/" in benchmark:
        benchmark = Path(benchmark).stem
    slug = re.sub(r"[^A-Za-z0-9_.+-]+", "_", benchmark).strip("_")
    return slug or "bench"


def records_path(rundir: RunDir, model: str, benchmark: str) -> Path:
    return rundir.eval_records_path(model, bench_slug(benchmark))


# --------------------------------------------------------------------------- scoring


def score_sample(text: str, gold: str, benchmark: str) -> dict[str, Any]:
    """Both verdicts and the extracted answer of one output."""
    from ssb.grading import extract_boxed, grade, reference_grade

    return {
        "answer": extract_boxed(text),
        "correct": bool(grade(text, gold)),
        # The harness tells AIME-style sets (gold anywhere) from others by name; a file path
        # counts by its stem ("aime25.jsonl" -> "aime25").
        "correct_reference": bool(reference_grade(text, gold, bench_slug(benchmark))),
    }


def eval_record(
    problem: Any,
    prompt_text: str,
    completions: list[Any],
    benchmark: str,
    scoring: str,
    fp: str,
) -> dict[str, Any]:
    samples = []
    for c in completions:
        verdicts = score_sample(c.text, problem.answer, benchmark)
        samples.append(
            {
                "output": c.text,
                "answer": verdicts["answer"],
                "correct": verdicts["correct"],
                "correct_reference": verdicts["correct_reference"],
                "output_tokens": len(c.token_ids),
                "finish_reason": c.finish_reason,
            }
        )
    k = max(1, len(samples))
    mv = sum(s["correct"] for s in samples) / k
    ref = sum(s["correct_reference"] for s in samples) / k
    return {
        "id": problem.id,
        "prompt": prompt_text,
        "gold": problem.answer,
        "samples": samples,
        "score": ref if scoring == "reference" else mv,
        "score_math_verify": mv,
        "score_reference": ref,
        "scoring": scoring,
        "fingerprint": fp,
    }


# --------------------------------------------------------------------------- the stage


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
    from ssb.generate.base import SamplingParams
    from ssb.problems import load_eval_problems
    from ssb.prompts import render_prompt_ids, student_messages

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
    problems = {}
    bad_golds: dict[str, int] = {}
    for bench in cfg.eval.benchmarks:
        problems[bench], skipped_ids = drop_unparseable_golds(
            load_eval_problems(cfg, bench), "eval"
        )
        bad_golds[bench] = len(skipped_ids)
    for bench, plist in problems.items():
        ids = [str(p.id) for p in plist]
        if len(set(ids)) != len(ids):
            raise ValueError(f"benchmark {bench!r} has duplicate problem ids")
    n = settings["num_samples"]
    chunk_size = generation_chunk_size(cfg, n)
    new_records: dict[str, dict[str, int]] = {name: {b: 0 for b in problems} for name in chosen}
    stats = GenerationStats()
    todo: dict[str, list[tuple[str, list[Any]]]] = {}
    fingerprints = {name: fingerprint(cfg, settings, a) for name, a in chosen.items()}
    ranks = launched_ranks()
    if ranks.main:  # merge what a killed multi-process launch left; set stale records aside
        for name in chosen:
            for bench, plist in problems.items():
                path = records_path(rundir, name, bench)
                merge_parts(rundir, path, [p.id for p in plist])
                _load_current(path, fingerprints[name])
    ranks.barrier()
    for name in chosen:
        for bench, plist in problems.items():
            done = {
                str(r["id"])
                for r in read_jsonl(records_path(rundir, name, bench))
                if r.get("fingerprint") == fingerprints[name]
            }
            for chunk in chunks(ranks.mine(plist), chunk_size):
                left = [p for p in chunk if str(p.id) not in done]
                if left:
                    todo.setdefault(name, []).append((bench, left))
    # One engine serves every model that has problems left (on vLLM: the base without a LoRA
    # request, each adapter as its own); see ssb.stages.engine.
    with contextlib.ExitStack() as stack:
        engine = None
        if todo:
            engine = stack.enter_context(
                generation_engine(cfg, rundir, {name: chosen[name] for name in todo})
            )
        for name, model_todo in todo.items():
            log.info("eval: %s: %d problems to evaluate", name, sum(len(c) for _, c in model_todo))
            with engine.serving(name) as generator:
                for bench, chunk in model_todo:
                    prompts = [
                        render_prompt_ids(
                            engine.tokenizer, student_messages(p, cfg.prompt), cfg.prompt
                        )
                        for p in chunk
                    ]
                    params = SamplingParams(
                        temperature=settings["temperature"],
                        top_p=settings["top_p"],
                        top_k=0,
                        max_new_tokens=settings["max_new_tokens"],
                        n=n,
                        stop_strings=engine.reply.stop_strings,
                        # The same seeds for every model: paired comparisons share the randomness.
                        prompt_seeds=[
                            stable_seed(cfg.seed, "eval", bench_slug(bench), p.id) for p in chunk
                        ],
                    )
                    kept, outputs = generate_chunk(
                        engine,
                        generator,
                        [str(p.id) for p in chunk],
                        prompts,
                        params,
                        f"eval {name} {bench}",
                        stats,
                        progress,
                    )
                    records = [
                        eval_record(
                            chunk[i],
                            engine.tokenizer.decode(prompts[i]),
                            outs,
                            bench,
                            settings["scoring"],
                            fingerprints[name],
                        )
                        for i, outs in zip(kept, outputs)
                    ]
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


# --------------------------------------------------------------------------- summary


def _sample_stats(records: list[dict[str, Any]], key: str, greedy: bool, seed: int) -> dict:
    """Accuracy and 95% interval of per-problem scores under one verdict key."""
    n = len(records)
    if greedy:
        successes = sum(bool(r["samples"][0][key]) for r in records if r["samples"])
        low, high = wilson_interval(successes, n)
        return {"accuracy": successes / n, "interval": [low, high], "method": "wilson"}
    scores = [_score(r, key) for r in records]
    low, high = bootstrap_mean_interval(scores, n_resamples=BOOTSTRAP_RESAMPLES, seed=seed)
    return {"accuracy": sum(scores) / n, "interval": [low, high], "method": "bootstrap"}


def _score(record: dict[str, Any], key: str) -> float:
    samples = record["samples"]
    return sum(bool(s[key]) for s in samples) / len(samples) if samples else 0.0


def benchmark_result(
    records: list[dict[str, Any]], settings: dict[str, Any], seed: int = 0
) -> dict[str, Any]:
    """Per model x benchmark numbers (see the module docstring of `write_summary`)."""
    n = len(records)
    samples = [s for r in records for s in r["samples"]]
    out: dict[str, Any] = {
        "n": n,
        "num_samples": settings["num_samples"],
        "metric": settings["metric"],
        "scoring": settings["scoring"],
    }
    if n == 0:
        out.update(
            accuracy=None,
            interval=None,
            interval_method=None,
            accuracy_math_verify=None,
            interval_math_verify=None,
            accuracy_reference=None,
            interval_reference=None,
            truncation_rate=None,
            no_answer_rate=None,
            mean_output_tokens=None,
        )
        return out
    greedy = settings["greedy"]
    mv = _sample_stats(records, "correct", greedy, seed)
    ref = _sample_stats(records, "correct_reference", greedy, seed)
    primary = ref if settings["scoring"] == "reference" else mv
    out.update(
        accuracy=primary["accuracy"],
        interval=primary["interval"],
        interval_method=primary["method"],
        accuracy_math_verify=mv["accuracy"],
        interval_math_verify=mv["interval"],
        accuracy_reference=ref["accuracy"],
        interval_reference=ref["interval"],
        truncation_rate=sum(s["finish_reason"] == "length" for s in samples) / len(samples),
        no_answer_rate=sum(s["answer"] is None for s in samples) / len(samples),
        mean_output_tokens=sum(s["output_tokens"] for s in samples) / len(samples),
    )
    return out


def paired_comparison(
    model_records: list[dict[str, Any]],
    base_records: list[dict[str, Any]],
    key: str,
    greedy: bool,
    seed: int = 0,
) -> dict[str, Any]:
    """A model vs base on the problems both answered: wins/losses/ties by per-problem score,
    exact McNemar p (for avg@k the same exact test on problems whose score differs: a sign
    test), and the mean paired difference with a problem-level paired bootstrap interval."""
    base_by_id = {str(r["id"]): r for r in base_records}
    pairs = [(r, base_by_id[str(r["id"])]) for r in model_records if str(r["id"]) in base_by_id]
    a = [_score(m, key) for m, _ in pairs]
    b = [_score(x, key) for _, x in pairs]
    wins = sum(x > y for x, y in zip(a, b))
    losses = sum(x < y for x, y in zip(a, b))
    out: dict[str, Any] = {
        "n": len(pairs),
        "wins": wins,
        "losses": losses,
        "ties": len(pairs) - wins - losses,
        "mcnemar_p": mcnemar_exact(wins, losses),
        "test": "mcnemar_exact" if greedy else "sign_test",
        "diff": None,
        "diff_interval": None,
    }
    if pairs:
        diff, low, high = paired_bootstrap_diff(a, b, n_resamples=BOOTSTRAP_RESAMPLES, seed=seed)
        out["diff"] = diff
        out["diff_interval"] = [low, high]
    return out


def write_summary(
    cfg: Config,
    rundir: RunDir,
    problems: dict[str, list[Any]],
    models: dict[str, Path | None] | None = None,
) -> dict[str, Any]:
    """Rebuild eval/summary.json from the record files, for every available model.

    Schema::

        {"settings": {scoring, greedy, num_samples, temperature, top_p, max_new_tokens, metric},
         "models": {name: {"adapter": path | null, "adapter_hash": str | null}},
         "benchmarks": {bench: {"n_problems": int, "file_slug": str}},
         "results": {model: {bench: {n, num_samples, metric, scoring,
                                     accuracy, interval: [lo, hi], interval_method,
                                     accuracy_math_verify, interval_math_verify,
                                     accuracy_reference, interval_reference,
                                     truncation_rate, no_answer_rate, mean_output_tokens,
                                     file}}},
         "comparisons": {model: {bench: {vs: "base", scoring, n, wins, losses, ties, mcnemar_p,
                                         test, diff, diff_interval,
                                         "math-verify": {...same keys...},
                                         "reference": {...same keys...}}}}}

    Only records made with the current settings (fingerprint) for problems in the current
    benchmark lists count; models without any such record are left out. `models` adds to the
    available ones (adapters named ``name=path`` in this call)."""
    settings = eval_settings(cfg)
    all_models = available_models(rundir)
    all_models.update(models or {})
    greedy = settings["greedy"]
    results: dict[str, dict[str, Any]] = {}
    kept: dict[str, dict[str, list[dict[str, Any]]]] = {}
    model_info: dict[str, Any] = {}
    for name, adapter in all_models.items():
        fp = fingerprint(cfg, settings, adapter)
        per_bench: dict[str, Any] = {}
        for bench, plist in problems.items():
            path = records_path(rundir, name, bench)
            by_id: dict[str, dict[str, Any]] = {}
            for r in read_jsonl(path):
                if r.get("fingerprint") == fp:
                    by_id.setdefault(str(r["id"]), r)
            records = [by_id[str(p.id)] for p in plist if str(p.id) in by_id]
            if not records:
                continue
            kept.setdefault(name, {})[bench] = records
            result = benchmark_result(records, settings, seed=stable_seed(cfg.seed, bench))
            result["file"] = str(path.relative_to(rundir.path))
            per_bench[bench] = result
        if per_bench:
            results[name] = per_bench
            model_info[name] = {
                "adapter": _display_path(rundir, adapter),
                "adapter_hash": adapter_hash(adapter),
            }
    comparisons: dict[str, dict[str, Any]] = {}
    for name, benches in kept.items():
        if name == "base":
            continue
        for bench, records in benches.items():
            base_records = kept.get("base", {}).get(bench)
            if not base_records:
                continue
            seed = stable_seed(cfg.seed, "paired", bench)
            both = {
                scoring: paired_comparison(records, base_records, key, greedy, seed)
                for scoring, key in VERDICT_KEYS.items()
            }
            entry = {"vs": "base", "scoring": settings["scoring"], **both[settings["scoring"]]}
            entry.update(both)
            comparisons.setdefault(name, {})[bench] = entry
    head_to_head = []
    for model, rival in rival_pairs(list(kept)):
        for bench in kept[model]:
            if bench not in kept[rival]:
                continue
            seed = stable_seed(cfg.seed, "paired", bench, model, rival)
            key = VERDICT_KEYS[settings["scoring"]]
            result = paired_comparison(kept[model][bench], kept[rival][bench], key, greedy, seed)
            head_to_head.append({"model": model, "vs": rival, "benchmark": bench, **result})
    summary = {
        "settings": settings,
        "models": model_info,
        "benchmarks": {
            bench: {"n_problems": len(plist), "file_slug": bench_slug(bench)}
            for bench, plist in problems.items()
        },
        "results": results,
        "comparisons": comparisons,
        "head_to_head": head_to_head,
    }
    atomic_write_json(rundir.eval_summary_path, summary)
    return summary
