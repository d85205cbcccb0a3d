"""eval/summary.json: accuracy with 95% intervals per model and benchmark, and paired comparisons
(with base, and between rival models), rebuilt from the record files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ssb.config import Config
from ssb.identity import adapter_hash
from ssb.rundir import (
    RunDir,
    atomic_write_json,
)
from ssb.stages.common import (
    stable_seed,
)
from ssb.stages.eval_setup import (
    BOOTSTRAP_RESAMPLES,
    VERDICT_KEYS,
    available_models,
    bench_slug,
    display_path,
    eval_settings,
    fingerprint,
    records_made_with,
    records_path,
    rival_pairs,
)
from ssb.stats import (
    bootstrap_mean_interval,
    mcnemar_exact,
    paired_bootstrap_diff,
    wilson_interval,
)


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

        {"settings": {scoring, greedy, num_samples, temperature, top_p, top_k, max_new_tokens,
                      metric},
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
    results: dict[str, dict[str, Any]] = {}
    kept: Kept = {}
    model_info: dict[str, Any] = {}
    for name, adapter in all_models.items():
        fp = fingerprint(cfg, settings, adapter)
        per_bench: dict[str, Any] = {}
        for bench, plist in problems.items():
            path = records_path(rundir, name, bench)
            by_id = records_made_with(path, fp)
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
                "adapter": display_path(rundir, adapter),
                "adapter_hash": adapter_hash(adapter),
            }
    summary = {
        "settings": settings,
        "models": model_info,
        "benchmarks": {
            bench: {"n_problems": len(plist), "file_slug": bench_slug(bench)}
            for bench, plist in problems.items()
        },
        "results": results,
        "comparisons": _comparisons_with_base(cfg, settings, kept),
        "head_to_head": _head_to_head(cfg, settings, kept),
    }
    atomic_write_json(rundir.eval_summary_path, summary)
    return summary


Kept = dict[str, dict[str, list[dict[str, Any]]]]  # model -> benchmark -> records that count


def _comparisons_with_base(
    cfg: Config, settings: dict[str, Any], kept: Kept
) -> dict[str, dict[str, Any]]:
    """Each model against base on every benchmark both have, under both verdicts."""
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
                scoring: paired_comparison(records, base_records, key, settings["greedy"], seed)
                for scoring, key in VERDICT_KEYS.items()
            }
            entry = {"vs": "base", "scoring": settings["scoring"], **both[settings["scoring"]]}
            entry.update(both)
            comparisons.setdefault(name, {})[bench] = entry
    return comparisons


def _head_to_head(cfg: Config, settings: dict[str, Any], kept: Kept) -> list[dict[str, Any]]:
    """Student against GRPO and each round against the one before (`rival_pairs`)."""
    head_to_head = []
    for model, rival in rival_pairs(list(kept)):
        for bench in kept[model]:
            if bench not in kept[rival]:
                continue
            seed = stable_seed(cfg.seed, "paired", bench, model, rival)
            key = VERDICT_KEYS[settings["scoring"]]
            result = paired_comparison(
                kept[model][bench], kept[rival][bench], key, settings["greedy"], seed
            )
            head_to_head.append({"model": model, "vs": rival, "benchmark": bench, **result})
    return head_to_head
