"""Tests for ssb.problems: real benchmark files, generic loaders, errors, synthetic problems."""

import dataclasses
import operator
import re

import pytest

import ssb.problems.sources as sources_mod
import ssb.problems.synthetic as synthetic_mod
from ssb.config import Config, SyntheticConfig
from ssb.grading import extract_boxed, grade
from ssb.problems import (
    BENCHMARKS,
    Problem,
    ProblemsError,
    load_eval_problems,
    load_problems,
    load_train_problems,
    resolve_data_dir,
    synthetic_problems,
    synthetic_split_of,
)

DATA = resolve_data_dir(None)
needs_data = pytest.mark.skipif(
    DATA is None or not (DATA / "gsm8k" / "test.jsonl").is_file(),
    reason="real benchmark copies (shared/data) not found beside the checkout",
)

# --------------------------------------------------------------------------- real data

COUNTS = [
    ("gsm8k", "train", 7473),
    ("gsm8k", "test", 1319),
    ("math", "test", 5000),
    ("math500", "test", 500),
    ("aime24", "test", 30),
    ("amc23", "test", 40),
    ("svamp", "test", 1000),
    ("asdiv", "test", 2215),
]


@needs_data
@pytest.mark.parametrize(("name", "split", "count"), COUNTS)
def test_real_files_load_with_right_counts(name, split, count):
    problems = load_problems(name, split, data_dir=DATA)
    assert len(problems) == count
    assert len({p.id for p in problems}) == count  # ids are unique
    for p in problems:
        assert p.question.strip() and p.answer.strip()
        assert p.source == name


@needs_data
def test_real_spot_checks():
    gsm = load_problems("gsm8k", "test", data_dir=DATA)
    assert gsm[0].answer == "18"
    assert gsm[0].question.startswith("Janet")
    assert "<<" not in gsm[0].solution and "####" not in gsm[0].solution
    assert "16 - 3 - 4 = 9" in gsm[0].solution
    assert all("," not in p.answer for p in gsm)  # "#### 1,600" -> "1600"
    assert "1600" in {p.answer for p in gsm}

    aime = load_problems("aime24", data_dir=DATA)
    answers = {p.id: p.answer for p in aime}
    assert "025" in answers.values()  # zero padding kept as given
    assert answers["aime24-60"] == "204"

    amc = load_problems("amc23", data_dir=DATA)
    assert amc[0].answer == "27" and amc[0].metadata["raw_answer"] == 27.0
    assert "-1" in {p.answer for p in amc}

    m500 = load_problems("math500", data_dir=DATA)
    assert m500[0].id == "test/precalculus/807.json"
    assert m500[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert m500[0].metadata["level"] == 2 and m500[0].metadata["subject"] == "Precalculus"

    math = load_problems("math", data_dir=DATA)
    assert math[0].id == "math-0" and math[0].answer == "2"
    assert math[0].metadata == {"level": 3, "subject": "Algebra", "split": "test"}

    svamp = load_problems("svamp", data_dir=DATA)
    assert svamp[0].answer == "145"
    assert svamp[0].question.startswith("There are 87 oranges")
    assert svamp[0].question.endswith("How big is each group of bananas?")

    asdiv = load_problems("asdiv", data_dir=DATA)
    assert asdiv[0].answer == "9" and asdiv[0].metadata["raw_answer"] == "9 (apples)"
    assert asdiv[0].question == (
        "Seven red apples and two green apples are in the basket. "
        "How many apples are in the basket?"
    )
    assert "Mrs. Hilt" in {p.answer for p in asdiv}  # non-numeric answers kept


@needs_data
@pytest.mark.parametrize("name", ["gsm8k", "math500", "aime24", "amc23"])
def test_every_gold_self_grades(name):
    # Consistency: the grader must accept each benchmark's own gold written in a box.
    problems = load_problems(name, "test", data_dir=DATA)
    failed = [(p.id, p.answer) for p in problems if not grade(f"\\boxed{{{p.answer}}}", p.answer)]
    assert failed == []


@needs_data
def test_gsm8k_solutions_are_clean():
    # Calculator annotations and the "####" line are removed; the gold still appears in the
    # worked solution almost always (a few end on another quantity, e.g. a total).
    problems = load_problems("gsm8k", "test", data_dir=DATA)
    hits = 0
    for p in problems:
        assert p.solution and "<<" not in p.solution and ">>" not in p.solution
        assert "####" not in p.solution
        numbers = re.findall(r"\d+(?:\.\d+)?", p.solution.replace(",", ""))
        hits += any(float(x) == float(p.answer) for x in numbers)
    assert hits >= 0.99 * len(problems)


@needs_data
def test_limit_keeps_file_order():
    first = load_problems("gsm8k", "test", data_dir=DATA, limit=5)
    assert [p.id for p in first] == [f"gsm8k-test-{i}" for i in range(1, 6)]


@needs_data
def test_resolve_data_dir_finds_shared_data(monkeypatch, tmp_path):
    monkeypatch.delenv("SSB_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # still found by walking up from the package file
    assert resolve_data_dir(None) == DATA
    assert resolve_data_dir(str(tmp_path)) == tmp_path
    monkeypatch.setenv("SSB_DATA_DIR", str(tmp_path / "x"))
    assert resolve_data_dir(None) == tmp_path / "x"


@needs_data
def test_load_train_and_eval_problems_from_config():
    cfg = Config()
    cfg.data.train = "gsm8k"
    cfg.data.data_dir = str(DATA)
    cfg.data.max_problems = 10
    train = load_train_problems(cfg)
    assert [p.id for p in train] == [f"gsm8k-train-{i}" for i in range(1, 11)]

    cfg.data.shuffle = True
    shuffled = load_train_problems(cfg)
    assert len(shuffled) == 10 and [p.id for p in shuffled] != [p.id for p in train]
    assert [p.id for p in load_train_problems(cfg)] == [p.id for p in shuffled]  # seeded

    cfg.eval.max_problems = 7
    evals = load_eval_problems(cfg, "math500")
    assert len(evals) == 7 and evals[0].id == "test/precalculus/807.json"
    assert len(load_eval_problems(cfg, "gsm8k")) == 7
    assert load_eval_problems(cfg, "gsm8k")[0].metadata["split"] == "test"
    cfg.eval.max_problems = None
    assert len(load_eval_problems(cfg, "aime24")) == 30


# --------------------------------------------------------------------------- generic files


def test_generic_jsonl_mapping(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(
        '{"q": "What is 2+2?", "a": 4, "extra": "x"}\n'
        "\n"
        '{"q": "Half of 1?", "a": "\\\\frac{1}{2}"}\n'
        '{"q": "Solve.", "a": "So $\\\\boxed{7}$."}\n'
    )
    problems = load_problems(str(path), question_field="q", answer_field="a")
    assert [p.id for p in problems] == ["mine-1", "mine-3", "mine-4"]
    assert [p.answer for p in problems] == ["4", "\\frac{1}{2}", "7"]
    assert problems[0].metadata == {"extra": "x"}
    assert problems[2].solution == "So $\\boxed{7}$."  # a boxed solution yields its answer
    assert problems[0].source == str(path)


def test_generic_jsonl_id_field(tmp_path):
    path = tmp_path / "ids.jsonl"
    path.write_text('{"uid": "p1", "question": "Q1", "answer": "1"}\n')
    (p,) = load_problems(str(path), id_field="uid")
    assert p.id == "p1"
    path.write_text(
        '{"uid": "p1", "question": "Q1", "answer": "1"}\n'
        '{"uid": "p1", "question": "Q2", "answer": "2"}\n'
    )
    with pytest.raises(ProblemsError, match="line 2: duplicate id 'p1'"):
        load_problems(str(path), id_field="uid")


def test_generic_csv_mapping(tmp_path):
    path = tmp_path / "sheet.csv"
    path.write_text('Problem,Gold,Key\n"How many, exactly?",12,k1\nWhat is 3*3?,9,k2\n')
    problems = load_problems(str(path), question_field="Problem", answer_field="Gold")
    assert [(p.id, p.question, p.answer) for p in problems] == [
        ("sheet-2", "How many, exactly?", "12"),
        ("sheet-3", "What is 3*3?", "9"),
    ]
    assert problems[0].metadata == {"Key": "k1"}
    keyed = load_problems(str(path), question_field="Problem", answer_field="Gold", id_field="Key")
    assert [p.id for p in keyed] == ["k1", "k2"]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "a", "answer": "1"}\n{"question": "b", "answer": \n')
    with pytest.raises(ProblemsError, match=r"bad\.jsonl line 2: invalid JSON"):
        load_problems(str(path))


def test_non_object_line_is_an_error(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('["question", "answer"]\n')
    with pytest.raises(ProblemsError, match=r"list\.jsonl line 1: expected a JSON object"):
        load_problems(str(path))


def test_missing_field_names_the_field(tmp_path):
    path = tmp_path / "miss.jsonl"
    path.write_text('{"question": "a", "answer": "1"}\n{"question": "b"}\n')
    with pytest.raises(ProblemsError, match=r"miss\.jsonl line 2: missing field 'answer'"):
        load_problems(str(path))
    with pytest.raises(ProblemsError, match=r"line 1: missing field 'prompt'"):
        load_problems(str(path), question_field="prompt")


def test_benchmark_file_missing_field_names_file_and_line(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text(
        '{"question": "q", "answer": "1 + 1 = 2\\n#### 2"}\n{"question": "q2"}\n'
    )
    with pytest.raises(ProblemsError, match=r"gsm8k/test\.jsonl line 2: missing field 'answer'"):
        load_problems("gsm8k", "test", data_dir=tmp_path)


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(ProblemsError, match="empty"):
        load_problems(str(path))
    csv_path = tmp_path / "empty.csv"
    csv_path.write_text("question,answer\n")
    with pytest.raises(ProblemsError, match="empty"):
        load_problems(str(csv_path))


def test_missing_file_and_unknown_sources(tmp_path):
    with pytest.raises(ProblemsError, match="does not exist"):
        load_problems(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ProblemsError) as info:
        load_problems("gsm9k")
    for name in BENCHMARKS:
        assert name in str(info.value)
    with pytest.raises(ProblemsError, match="no split 'validation'"):
        load_problems("math500", "validation", data_dir=tmp_path)
    with pytest.raises(ProblemsError, match="does not exist"):
        load_problems("math500", "test", data_dir=tmp_path)


def test_hf_unreachable_gives_a_clear_error(monkeypatch):
    # Offline mode makes `datasets` fail fast instead of trying the network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(ProblemsError, match=r"could not load hf:nobody/no-such-dataset"):
        load_problems("hf:nobody/no-such-dataset", "test")
    # A benchmark with no local data directory falls back to its hub copy...
    monkeypatch.setattr(sources_mod, "resolve_data_dir", lambda data_dir: None)
    with pytest.raises(ProblemsError, match=r"could not load hf:openai/gsm8k.*data_dir"):
        load_problems("gsm8k", "test")
    # ...and one without a hub copy says a local copy is needed.
    with pytest.raises(ProblemsError, match="amc23/test.jsonl"):
        load_problems("amc23", "test")


def test_hf_rows_are_converted(monkeypatch):
    # The real load_hf code path with `datasets.load_dataset` stubbed (no network in tests).
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        if path == "openai/gsm8k":
            return [{"question": "Q?", "answer": "2 * 3 = <<2*3=6>>6\n#### 1,006"}]
        if path == "HuggingFaceH4/aime_2024":
            return [{"id": 60, "problem": "P?", "answer": "025", "url": "u"}]
        return [{"prompt": "What is 1+1?", "target": 2.0}, {"prompt": "3-1?", "target": "2"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    (gsm,) = load_problems("hf:openai/gsm8k", "test")
    assert (gsm.id, gsm.answer, gsm.solution, gsm.source) == (
        "gsm8k-test-1",
        "1006",
        "2 * 3 = 6",
        "gsm8k",
    )
    assert calls[-1] == ("openai/gsm8k", "main", "test")
    (aime,) = load_problems("hf:HuggingFaceH4/aime_2024")
    assert (aime.id, aime.answer) == ("aime24-60", "025")
    assert calls[-1] == ("HuggingFaceH4/aime_2024", None, "train")  # its only split
    rows = load_problems(
        "hf:me/mine:cfg", "validation", question_field="prompt", answer_field="target", limit=1
    )
    assert [(p.id, p.question, p.answer) for p in rows] == [
        ("hf:me/mine:cfg-validation-1", "What is 1+1?", "2")
    ]
    assert calls[-1] == ("me/mine", "cfg", "validation")
    monkeypatch.setattr(sources_mod, "resolve_data_dir", lambda data_dir: None)
    assert load_problems("aime24")[0].id == "aime24-60"  # no local copy: the hub


def test_problem_dict_roundtrip():
    p = Problem("a", "q?", "3", "synthetic", "1 + 2 = 3", {"k": 1})
    assert Problem.from_dict(p.to_dict()) == p
    assert Problem.from_dict({"id": 1, "question": "q", "answer": 2, "source": "s"}).answer == "2"
    with pytest.raises(ProblemsError, match="'answer'"):
        Problem.from_dict({"id": "a", "question": "q", "source": "s"})


# --------------------------------------------------------------------------- synthetic

_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_EQUATION = re.compile(r"(\d+) ([+\-*]) (\d+) = (\d+)")


def _check_arithmetic(p: Problem, limit: int, steps: int) -> None:
    """Recompute every step from the one-line solution and the metadata (no eval)."""
    assert "\n" not in p.solution and "\n" not in p.question
    equations = _EQUATION.findall(p.solution)
    assert len(equations) == steps == len(p.metadata["steps"])
    for (a, op, b, result), meta in zip(equations, p.metadata["steps"], strict=True):
        a, b, result = int(a), int(b), int(result)
        assert _OPS[op](a, b) == result
        assert [op, a, b, result] == meta
        assert 0 <= min(a, b, result) and max(a, b, result) <= limit
        # Every operand is stated in the question (multipliers 2..5 may be words: "twice").
        assert str(b) in p.question or synthetic_mod._MULTIPLE_WORDS.get(b, "?") in p.question
    # Steps chain: each step starts from the previous result (the first may be a product).
    for prev, nxt in zip(p.metadata["steps"], p.metadata["steps"][1:]):
        assert nxt[1] == prev[3]
    assert p.answer == equations[-1][3]
    assert int(p.answer) >= 0
    assert extract_boxed(p.solution) == p.answer
    assert p.solution.endswith(f"The answer is \\boxed{{{p.answer}}}.")


@pytest.mark.parametrize(("difficulty", "steps", "limit"), [(1, 1, 20), (2, 2, 100), (3, 3, 1000)])
def test_synthetic_difficulty_and_arithmetic(difficulty, steps, limit):
    problems = synthetic_problems("train", 300, difficulty=difficulty, seed=1)
    assert len(problems) == 300
    for p in problems:
        _check_arithmetic(p, limit, steps)
        assert p.metadata["difficulty"] == difficulty and p.source == "synthetic"
    # Several templates, items and all three operations are used.
    assert len({p.metadata["template"] for p in problems}) >= 3
    ops = {s[0] for p in problems for s in p.metadata["steps"]}
    assert ops == {"+", "-", "*"}


def test_synthetic_is_deterministic():
    a = synthetic_problems("test", 50, difficulty=2, seed=3)
    b = synthetic_problems("test", 50, difficulty=2, seed=3)
    c = synthetic_problems("test", 50, difficulty=2, seed=4)
    assert [p.to_dict() for p in a] == [p.to_dict() for p in b]
    assert [p.question for p in a] != [p.question for p in c]
    # A shorter request is a prefix of a longer one.
    assert [p.id for p in synthetic_problems("test", 10, 2, 3)] == [p.id for p in a[:10]]


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_synthetic_splits_are_disjoint(difficulty):
    questions = {}
    for split, n in (("train", 2000), ("test", 500), ("fewshot", 40)):
        for seed in (0, 1):  # disjoint whatever seed generated them
            ps = synthetic_problems(split, n, difficulty=difficulty, seed=seed)
            qs = [p.question for p in ps]
            assert len(set(qs)) == n  # no duplicates within a split
            assert all(synthetic_split_of(q) == split for q in qs)
            questions.setdefault(split, set()).update(qs)
    assert not questions["train"] & questions["test"]
    assert not questions["train"] & questions["fewshot"]
    assert not questions["test"] & questions["fewshot"]


def test_synthetic_raises_when_impossible(monkeypatch):
    # A template that only ever produces one question cannot fill a large split.
    def one_story(rng, n_steps, limit):
        step = ("+", 1, 1, 2)
        return synthetic_mod._Story("Q?", "1 + 1 = 2. \\boxed{2}", 2, [step], "one")

    monkeypatch.setattr(synthetic_mod, "_TEMPLATES", (one_story,))
    with pytest.raises(ProblemsError, match="could only generate"):
        synthetic_problems("train", 5, difficulty=1, seed=0)


def test_synthetic_bad_arguments():
    with pytest.raises(ProblemsError, match="no split 'dev'"):
        synthetic_problems("dev", 3)
    with pytest.raises(ProblemsError, match="difficulty"):
        synthetic_problems("train", 3, difficulty=4)


def test_synthetic_through_load_problems_and_config():
    syn = SyntheticConfig(difficulty=2, seed=5, num_train=40, num_eval=12)
    assert len(load_problems("synthetic", "train", synthetic=syn)) == 40
    assert len(load_problems("synthetic", "test", synthetic=syn)) == 12
    assert len(load_problems("synthetic", "eval", synthetic=syn)) == 12
    assert len(load_problems("synthetic", "fewshot", synthetic=syn, limit=4)) == 4

    cfg = Config()
    cfg.data = dataclasses.replace(cfg.data, train="synthetic", max_problems=None, synthetic=syn)
    cfg.eval.max_problems = 5
    train = load_train_problems(cfg)
    assert len(train) == 40 and all(p.metadata["split"] == "train" for p in train)
    cfg.data.max_problems = 8
    assert [p.id for p in load_train_problems(cfg)] == [p.id for p in train[:8]]
    evals = load_eval_problems(cfg, "synthetic")
    assert len(evals) == 5 and all(p.metadata["split"] == "test" for p in evals)
    cfg.eval.max_problems = None
    assert len(load_eval_problems(cfg, "synthetic")) == 12
    assert not {p.question for p in train} & {
        p.question for p in load_eval_problems(cfg, "synthetic")
    }
