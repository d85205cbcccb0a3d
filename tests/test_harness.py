"""`ssb harness-check`: lm-evaluation-harness's own scoring against ssb's math-verify, on real
GSM8K / MATH500 / AIME24 problems (read from shared/data, see its README for provenance) with
hand-written model outputs that hit the known edge cases: `$18`, `70,000`, `64.00`, a trailing
`.`, units, `0.5` for `\\frac{1}{2}`, several boxes, text after the box, no box, a truncated box,
zero-padded AIME answers. Every disagreement is listed with its cause."""

from __future__ import annotations

import importlib.util
import json

import pytest

from ssb.problems import load_problems, resolve_data_dir

DATA = resolve_data_dir(None)
needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="lm-evaluation-harness is not installed (the dev and harness extras have it)",
)
needs_data = pytest.mark.skipif(
    DATA is None or not (DATA / "math500" / "test.jsonl").exists(),
    reason="real benchmark copies (shared/data) not found beside the checkout",
)

# (benchmark, problem id, gold as the data file gives it, model output,
#  ssb's verdict, lm-eval's verdict, why they differ)
CASES = [
    ("gsm8k", "gsm8k-test-1", "18",
     "She sells 16 - 3 - 4 = 9 eggs at $2 each, so she makes 9 * 2 = $18 a day.\n"
     "The answer is \\boxed{\\$18}.", True, True, None),
    ("gsm8k", "gsm8k-test-2", "3",
     "Blue: 2 bolts. White: half of that, 1 bolt. Total 2 + 1 = 3.\n\\boxed{3 \\text{ bolts}}",
     True, True, None),
    ("gsm8k", "gsm8k-test-3", "70000",
     "Value: 80,000 * 2.5 = 200,000. Cost: 80,000 + 50,000 = 130,000. "
     "Profit: 200,000 - 130,000 = \\boxed{70,000}.", True, True, None),
    ("gsm8k", "gsm8k-test-4", "540",
     "3 sprints 3 times a week is 9 sprints; 9 * 60 = 540 meters.\n\\boxed{540}\n\n"
     "So James runs 540 meters in 7 days.", True, False,
     "flexible-extract takes the last number of the whole output (7), not the boxed answer"),
    ("gsm8k", "gsm8k-test-5", "20",
     "Total feed: 20 chickens * 3 cups = 60 cups. 60 - 15 - 25 = 20 cups.\nFinal answer: 20.",
     False, True,
     "no \\boxed{}: ssb grades only a boxed answer (its prompts ask for one), lm-eval reads the "
     "last number"),
    ("gsm8k", "gsm8k-test-6", "64",
     "8 glasses at $5 and 8 at $3: 8 * 5 + 8 * 3 = 40 + 24 = 64.\nThe answer is \\boxed{64.00}",
     True, False, "exact_match compares strings: 64.00 is not 64"),
    ("gsm8k", "gsm8k-test-7", "260",
     "Seattle has 20, so Charleston has \\boxed{80} and Toulouse \\boxed{160}. "
     "Together: 20 + 80 + 160 = \\boxed{260}", True, True, None),
    ("gsm8k", "gsm8k-test-8", "160",
     "She downloads 200 GB at 2 GB/minute: 100 minutes, plus 20 minutes of restart: "
     "\\boxed{120} minutes.", False, False, None),
    ("math500", "test/counting_and_probability/282.json", "\\frac{1}{2}",
     "Of the 36 outcomes, 18 are favourable, so the probability is 18/36 = \\boxed{0.5}.",
     True, True, None),
    ("math500", "test/precalculus/927.json", "90^\\circ",
     "The direction vectors are orthogonal, so the angle is \\boxed{90}.", True, True, None),
    ("math500", "test/prealgebra/1655.json", "\\dfrac{17}{50}",
     "There are 50 even numbers, of which 16 are multiples of 6, so 34 of 100: \\boxed{0.34}.",
     True, False, "hendrycks is_equiv compares strings: 0.34 is not \\frac{17}{50}"),
    ("math500", "test/algebra/2626.json", "\\$32,\\!348",
     "After 5 years, 24000 * 1.01^{30} \\approx 32348, so \\boxed{\\$32,348}.",
     True, True, None),
    ("math500", "test/geometry/473.json", "864 \\mbox{ inches}^2",
     "A cube of 1 cubic foot has 12-inch sides, so its area is 6 * 144 = "
     "\\boxed{864 \\text{ square inches}}.", True, False,
     "strip_string drops units only after `\\text{ `; the gold's `\\mbox{ inches}^2` stays"),
    ("math500", "test/intermediate_algebra/1388.json", "1,-2",
     "So f(n) = n for n = 1 and n = -2: \\boxed{-2, 1}", True, False,
     "the same two integers in another order: equal as sets, not as strings"),
    ("math500", "test/algebra/1349.json", "\\text{Evelyn}",
     "Evelyn covers the most distance per unit time, so the answer is \\boxed{\\text{Evelyn}}.",
     True, True, None),
    ("math500", "test/intermediate_algebra/515.json", "\\frac43",
     "The ratio of leading coefficients is \\boxed{\\dfrac{4}{3}}.", True, True, None),
    ("math500", "test/algebra/101.json", "x \\in [-2,7]",
     "x^2 - 5x - 14 \\le 0 gives (x-7)(x+2) \\le 0, so \\boxed{[-2,7]}.", True, False,
     "strip_string removes a `k =` prefix but not `x \\in`"),
    ("math500", "test/prealgebra/1044.json", "5.4 \\text{ cents}",
     "The average is 27/5 = \\boxed{5.4} cents.", True, True, None),
    ("math500", "test/algebra/2584.json", "\\frac{14}{3}",
     "Solving gives x = \\boxed{\\frac{14}{", False, False, None),  # cut off mid-answer
    ("aime24", "aime24-67", "025",
     "From x log y = 10 and 4y log x = 10 we get xy = 25, so \\boxed{25}.", True, False,
     "this copy of AIME 2024 zero-pads the answer; lm-eval compares strings (its own AIME "
     "dataset stores 25)"),
    ("aime24", "aime24-75", "073",
     "By inclusion-exclusion, 73 residents own all four: \\boxed{073}.", True, True, None),
]  # fmt: skip
AGREEMENT = (13, 21)


def problems_of(benchmark: str) -> dict[str, object]:
    return {p.id: p for p in load_problems(benchmark, "test", data_dir=DATA)}


@pytest.fixture(scope="module")
def problems():
    return {bench: problems_of(bench) for bench in ("gsm8k", "math500", "aime24")}


@needs_lm_eval
@needs_data
def test_verdicts_of_both_harnesses_on_real_problems(problems):
    from ssb.harness import harness_verdict
    from ssb.stages.eval_setup import score_sample

    agree = 0
    for bench, pid, gold, output, ours, theirs, why in CASES:
        problem = problems[bench][pid]
        assert problem.answer == gold, pid  # the data file holds this gold
        assert score_sample(output, problem.answer, bench)["correct"] is ours, pid
        assert harness_verdict(output, problem.answer, bench)[1] is theirs, pid
        assert (ours == theirs) == (why is None), pid  # each disagreement is explained
        agree += ours == theirs
    assert (agree, len(CASES)) == AGREEMENT


@needs_lm_eval
def test_harness_extracts_what_its_task_would():
    from ssb.harness import harness_verdict

    # gsm8k flexible-extract: the last number, `$` and `,` kept until exact_match drops them.
    assert harness_verdict("so \\boxed{\\$1,000}.", "1000", "gsm8k") == ("$1,000", True)
    assert harness_verdict("no number at all", "3", "gsm8k") == ("[invalid]", False)
    # aime24 process_results: the last box; without one, the text between the first and last $.
    assert harness_verdict("\\boxed{1} then \\boxed{\\frac12}", "\\frac{1}{2}", "math500") == (
        "\\frac12",
        True,
    )
    assert harness_verdict("the answer is $7$", "7", "amc23") == (None, True)


@needs_lm_eval
@needs_data
def test_harness_check_command(problems, tmp_path, capsys):
    from ssb.cli import main
    from ssb.config import load_config
    from ssb.generate.base import Completion
    from ssb.rundir import RunDir, append_jsonl
    from ssb.stages.eval_setup import eval_record, eval_settings, fingerprint, records_path
    from ssb.stages.eval_summary import write_summary

    cfg = load_config(overrides=[f"data.data_dir={DATA}", "eval.benchmarks=gsm8k,math500,aime24"])
    rundir = RunDir(tmp_path / "run")
    rundir.init(cfg, "eval")
    settings = eval_settings(cfg)
    fp = fingerprint(cfg, settings, None)
    used: dict[str, list] = {}
    for bench, pid, _, output, *_ in CASES:
        problem = problems[bench][pid]
        used.setdefault(bench, []).append(problem)
        completion = Completion(output, list(range(len(output.split()))), "stop")
        record = eval_record(problem, "prompt", [completion], bench, settings["scoring"], fp)
        append_jsonl(records_path(rundir, "base", bench), [record])
    # A record made with other settings is not counted, as `ssb eval` would not count it.
    stale = eval_record(
        problems["gsm8k"]["gsm8k-test-9"],
        "prompt",
        [Completion("\\boxed{0}", [1], "stop")],
        "gsm8k",
        "math-verify",
        "another-fingerprint",
    )
    append_jsonl(records_path(rundir, "base", "gsm8k"), [stale])
    write_summary(cfg, rundir, used)

    assert main(["harness-check", "--run-dir", str(rundir.path), "--quiet"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((rundir.eval_dir / "harness-lm-eval.json").read_text())
    assert result["harness"] == "lm-eval" and result["version"]
    expected_counts = {}
    for bench, pid, _, _, ours, theirs, _ in CASES:
        c = expected_counts.setdefault(bench, {"samples": 0, "agree": 0, "ids": []})
        c["samples"] += 1
        c["agree"] += ours == theirs
        if ours != theirs:
            c["ids"].append(pid)
    for bench, expected in expected_counts.items():
        got = result["results"]["base"][bench]
        assert got["samples"] == expected["samples"] and got["agree"] == expected["agree"]
        assert [d["id"] for d in got["disagreements"]] == expected["ids"]
        assert f"| base | {bench} | {expected['samples']} | {expected['agree']} |" in printed
    assert "Disagreements (8):" in printed


def test_harness_check_refuses_without_lm_eval(tmp_path, monkeypatch, capsys):
    import sys

    from ssb.cli import main
    from ssb.config import load_config
    from ssb.rundir import RunDir

    RunDir(tmp_path / "run").init(load_config(), "eval")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail
    assert main(["harness-check", "--run-dir", str(tmp_path / "run"), "--quiet"]) == 2
    assert "pip install 'ssb[harness]'" in capsys.readouterr().err
