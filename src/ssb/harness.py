"""`ssb harness-check`: score a run's evaluation outputs again with a standard harness.

The harness is EleutherAI's lm-evaluation-harness (PyPI `lm-eval`, the `harness` extra), and
its scoring is called from the installed package, never copied:

* numeric-answer benchmarks (gsm8k, svamp, asdiv, synthetic): the `gsm8k` task's
  "flexible-extract" filter (the last number in the output) and its `exact_match` metric with the
  task's settings (commas, `$`, a trailing `.` ignored), both built from the task's YAML file in
  the installed package;
* every other benchmark (math500, math, aime24, amc23, files): the `aime24` task's
  `process_results`, i.e. the last `\\boxed{}` of the output compared with the gold answer after
  the `hendrycks_math` string normalisation (`strip_string`: `\\dfrac` -> `\\frac`, `\\left`,
  degrees, `\\$`, units after `\\text{ `, `0.5` -> `\\frac{1}{2}`, ...).

lm-eval's own MATH500 tasks do not fit outputs that end in `\\boxed{}`: `minerva_math500`
looks for "Final Answer: The final answer is X. I hope it is correct." (and its module refuses to
import without antlr4-python3-runtime 4.11, while ssb's math-verify uses 4.13.2);
`hendrycks_math500` takes the text between the first and the last `$` of the output, which
suits its answer-only prompt. lighteval cannot be installed beside ssb: lighteval 0.13 pins
latex2sympy2_extended==1.0.6 and math-verify 0.9 pins 1.11.0 (pip then falls back to lighteval
0.9.2, which downgrades numpy to 1.26).

Every sample of every current record (`eval/<model>-<bench>.jsonl`, the records eval/summary.json
counts) is scored; the result, with each disagreement, goes to `eval/harness-lm-eval.json`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

HARNESSES = ("lm-eval",)
# Benchmarks with numeric answers, scored as lm-eval scores GSM8K (by the name's start, so
# "gsm8k_test.jsonl" counts too).
NUMERIC_BENCHMARKS = ("gsm8k", "svamp", "asdiv", "synthetic")
_METRIC_CONFIG_KEYS = ("metric", "aggregation", "higher_is_better", "hf_evaluate")


class HarnessUnavailable(RuntimeError):
    """The harness package is not installed (or cannot be imported)."""


def scorer_name(benchmark_slug: str) -> str:
    """Which lm-eval scoring a benchmark gets (see the module docstring)."""
    if benchmark_slug.lower().startswith(NUMERIC_BENCHMARKS):
        return "gsm8k flexible-extract + exact_match"
    return "aime24 process_results (last \\boxed{}, hendrycks_math is_equiv)"


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as exc:
        raise HarnessUnavailable(
            f"ssb harness-check needs lm-evaluation-harness ({exc}); "
            "install it with: pip install 'ssb[harness]'"
        ) from None


@functools.lru_cache(maxsize=1)
def _gsm8k_scorer() -> Callable[[str, str], tuple[str, bool]]:
    """(output, gold) -> (extracted answer, correct), as lm-eval's gsm8k task scores a response
    under its "flexible-extract" filter: the filters and the metric settings come from the
    task's YAML file in the installed package."""
    import lm_eval.tasks
    import yaml
    from lm_eval.api.registry import get_metric
    from lm_eval.filters import build_filter_ensemble

    task_file = Path(lm_eval.tasks.__file__).parent / "gsm8k" / "gsm8k.yaml"
    task = yaml.safe_load(task_file.read_text())
    spec = next(f for f in task["filter_list"] if f["name"] == "flexible-extract")
    ensemble = build_filter_ensemble(
        spec["name"],
        [(f["function"], {k: v for k, v in f.items() if k != "function"}) for f in spec["filter"]],
    )
    (metric_config,) = task["metric_list"]
    metric = get_metric(metric_config["metric"])
    metric_kwargs = {k: v for k, v in metric_config.items() if k not in _METRIC_CONFIG_KEYS}

    def score(output: str, gold: str) -> tuple[str, bool]:
        # What FilterEnsemble.apply does to one instance's responses, without an Instance.
        responses: Any = [[output]]
        for make_filter in ensemble.filters:
            responses = make_filter().apply(responses, [{}])
        (extracted,) = list(responses)
        result = metric(references=[gold], predictions=[extracted], **metric_kwargs)
        return extracted, bool(result[metric_config["metric"]])

    return score


def _boxed_score(output: str, gold: str) -> tuple[str | None, bool]:
    """lm-eval's aime24 `process_results`; the extracted answer (shown in the report) by the
    same module's `last_boxed_only_string`/`remove_boxed`."""
    from lm_eval.tasks.aime import utils

    correct = bool(utils.process_results({"answer": gold}, [output])["exact_match"])
    boxed = utils.last_boxed_only_string(output)
    try:
        extracted = utils.remove_boxed(boxed) if boxed is not None else None
    except AssertionError:  # an `\fbox{}`: process_results falls back the same way
        extracted = boxed
    return extracted, correct


def harness_verdict(output: str, gold: str, benchmark_slug: str) -> tuple[str | None, bool]:
    """(answer lm-eval extracts, whether lm-eval counts it correct) for one output."""
    _require_lm_eval()
    if benchmark_slug.lower().startswith(NUMERIC_BENCHMARKS):
        return _gsm8k_scorer()(output, str(gold))
    return _boxed_score(output, str(gold))


# --------------------------------------------------------------------------- a run directory


def current_records(cfg: Any, run_path: Path) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """{model: {benchmark: records}}: the records eval/summary.json counts (made with the run's
    current settings, matched by fingerprint as `ssb eval` matches them), first per id."""
    from ssb.rundir import RunDir
    from ssb.stages.eval_setup import (
        available_models,
        eval_settings,
        fingerprint,
        records_made_with,
        records_path,
    )

    rundir = RunDir(run_path)
    path = rundir.eval_summary_path
    if not path.exists():
        raise FileNotFoundError(f"no {path}: run `ssb eval` first")
    summary = json.loads(path.read_text())
    models = available_models(rundir)
    settings = eval_settings(cfg)
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for model, benches in summary.get("results", {}).items():
        if model not in models:
            continue
        fp = fingerprint(cfg, settings, models[model])
        for bench in benches:
            by_id = records_made_with(records_path(rundir, model, bench), fp)
            if by_id:
                out.setdefault(model, {})[bench] = list(by_id.values())
    return out


def check_records(records: list[dict[str, Any]], benchmark: str) -> dict[str, Any]:
    """Both verdicts for every sample of `records`: ours (math-verify, as stored by `ssb eval`)
    and lm-eval's; counts and the samples on which they differ."""
    from ssb.stages.eval_setup import bench_slug

    slug = bench_slug(benchmark)
    counts = {"samples": 0, "agree": 0, "ours_correct": 0, "harness_correct": 0}
    disagreements = []
    for record in records:
        for index, sample in enumerate(record["samples"]):
            extracted, theirs = harness_verdict(sample["output"], record["gold"], slug)
            ours = bool(sample["correct"])
            counts["samples"] += 1
            counts["ours_correct"] += ours
            counts["harness_correct"] += theirs
            if ours == theirs:
                counts["agree"] += 1
            else:
                disagreements.append(
                    {
                        "id": record["id"],
                        "sample": index,
                        "gold": record["gold"],
                        "ours": ours,
                        "our_answer": sample.get("answer"),
                        "harness": theirs,
                        "harness_answer": extracted,
                        "output_tail": sample["output"][-200:],
                    }
                )
    n = max(counts["samples"], 1)
    return {
        "scorer": scorer_name(slug),
        **counts,
        "accuracy_ours": counts["ours_correct"] / n,
        "accuracy_harness": counts["harness_correct"] / n,
        "disagreements": disagreements,
    }


def harness_check(cfg: Any, run_path: Path, harness: str = "lm-eval") -> dict[str, Any]:
    """Score every current evaluation record of `run_path` with `harness` and write
    `eval/harness-<harness>.json`: {"harness", "version", "results": {model: {bench: ...}}}."""
    from importlib.metadata import version

    from ssb.rundir import atomic_write_json

    if harness not in HARNESSES:
        raise ValueError(f"harness {harness!r} is not one of {', '.join(HARNESSES)}")
    _require_lm_eval()
    results = {
        model: {bench: check_records(records, bench) for bench, records in benches.items()}
        for model, benches in current_records(cfg, run_path).items()
    }
    if not results:
        raise ValueError(
            f"{run_path}: no evaluation records made with the current settings; run `ssb eval`"
        )
    out = {"harness": harness, "version": version("lm-eval"), "results": results}
    atomic_write_json(Path(run_path) / "eval" / f"harness-{harness}.json", out)
    return out


def format_check(result: dict[str, Any], max_shown: int = 10) -> str:
    """A markdown table per model x benchmark, then the first disagreements."""
    lines = [
        f"Harness cross-check: ssb (math-verify) vs {result['harness']} {result['version']}",
        "",
        "| model | benchmark | samples | agree | ssb | harness | harness scoring |",
        "|---|---|---|---|---|---|---|",
    ]
    shown: list[str] = []
    for model, benches in result["results"].items():
        for bench, r in benches.items():
            lines.append(
                f"| {model} | {bench} | {r['samples']} | {r['agree']} | "
                f"{r['accuracy_ours']:.1%} | {r['accuracy_harness']:.1%} | {r['scorer']} |"
            )
            for d in r["disagreements"]:
                shown.append(
                    f"- {model} {bench} {d['id']}: gold {d['gold']!r}; ssb "
                    f"{'right' if d['ours'] else 'wrong'} ({d['our_answer']!r}), harness "
                    f"{'right' if d['harness'] else 'wrong'} ({d['harness_answer']!r})"
                )
    if shown:
        lines += ["", f"Disagreements ({len(shown)}):"] + shown[:max_shown]
        if len(shown) > max_shown:
            lines.append(f"- ... {len(shown) - max_shown} more in eval/harness-*.json")
    return "\n".join(lines) + "\n"
