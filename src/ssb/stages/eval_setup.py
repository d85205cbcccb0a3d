"""What an evaluation is made of: which models (base and every trained adapter), the effective
sampling and the fingerprint a record carries, where records go, and how one output is scored
(both verdicts, whatever the scoring mode). `ssb.stages.evaluate` runs it; `eval_summary` sums
it up."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from ssb.config import Config, to_dict
from ssb.grading import extract_boxed, grade, reference_grade
from ssb.identity import adapter_hash
from ssb.rundir import RunDir, has_adapter, read_jsonl

# Which per-sample verdict each scoring reads.
VERDICT_KEYS = {"math-verify": "correct", "reference": "correct_reference"}

REFERENCE_MAX_NEW_TOKENS = 1024  # MOTIF / SSB harness: greedy, max_tokens=1024

BOOTSTRAP_RESAMPLES = 2000

MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")


def available_models(rundir: RunDir) -> dict[str, Path | None]:
    """Every model that can be evaluated in this run: name -> adapter dir (None for base).

    base; student when ``adapter/`` has an adapter; ``<name>/adapter`` for any other direct
    sub-directory with one (e.g. ``grpo``); and models named ``name=path`` in an earlier call
    (remembered in eval/summary.json) whose adapter still exists.
    """
    models: dict[str, Path | None] = {"base": None}
    models.update(
        (name, path)
        for name, path in rundir.trained_adapters().items()
        if MODEL_NAME_RE.match(name)
    )
    if rundir.eval_summary_path.exists():
        try:
            old = json.loads(rundir.eval_summary_path.read_text()).get("models", {})
        except json.JSONDecodeError:
            old = {}
        for name, info in old.items():
            adapter = (info or {}).get("adapter")
            if name not in models and adapter and has_adapter(resolve_run_path(rundir, adapter)):
                models[name] = resolve_run_path(rundir, adapter)
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


def resolve_run_path(rundir: RunDir, path: str | Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else rundir.path / p


def display_path(rundir: RunDir, path: Path | None) -> str | None:
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
            if not MODEL_NAME_RE.match(name) or name == "base":
                raise ValueError(f"bad model name {name!r} in {entry!r}")
            path = resolve_run_path(rundir, raw)
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


def eval_settings(cfg: Config) -> dict[str, Any]:
    """The effective sampling for this config (the reference harness forces greedy, 1024)."""
    e = cfg.eval
    if e.scoring == "reference":
        n, temperature, top_p, top_k = 1, 0.0, 1.0, 0
        max_new_tokens = REFERENCE_MAX_NEW_TOKENS
    elif e.num_samples == 1:
        n, temperature, top_p, top_k = 1, 0.0, 1.0, 0
        max_new_tokens = cfg.generation.max_new_tokens
    else:
        s = e.sampling
        n, temperature, top_p, top_k = e.num_samples, s.temperature, s.top_p, s.top_k
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
        "top_k": top_k,
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


def records_made_with(path: Path, fp: str) -> dict[str, dict[str, Any]]:
    """The records of `path` made with fingerprint `fp` (the current settings), by id; the first
    record of an id wins (a resumed chunk may have appended one twice)."""
    by_id: dict[str, dict[str, Any]] = {}
    for record in read_jsonl(path):
        if record.get("fingerprint") == fp:
            by_id.setdefault(str(record["id"]), record)
    return by_id


def score_sample(text: str, gold: str, benchmark: str) -> dict[str, Any]:
    """Both verdicts and the extracted answer of one output."""

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
