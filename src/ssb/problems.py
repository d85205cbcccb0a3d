"""Problems: the record every stage passes around, loaders, and a synthetic arithmetic generator.

Sources (`load_problems(source, ...)`):

* a benchmark name from `BENCHMARKS`, read from `<data_dir>/<name>/<split>.jsonl` (the formats of
  the real copies in `shared/data`, see its README) or, with no local copy, from the Hugging Face
  hub for the few that have a canonical hub id;
* a `.jsonl` / `.csv` path with a field mapping;
* `hf:<dataset id>[:<config>]` with a split and a field mapping;
* `synthetic`: generated one- to three-step arithmetic word problems.

Gold answers are kept as strings in the form graders expect ("18", "025", "\\frac{1}{2}");
`ssb.grading` does all equivalence checking.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ssb.config import SyntheticConfig
from ssb.grading import extract_boxed

if TYPE_CHECKING:
    from ssb.config import Config

__all__ = [
    "BENCHMARKS",
    "DEFAULT_SPLITS",
    "HUB_DATASETS",
    "Problem",
    "ProblemsError",
    "load_eval_problems",
    "load_file",
    "load_hf",
    "load_problems",
    "load_train_problems",
    "resolve_data_dir",
    "synthetic_problems",
]


class ProblemsError(ValueError):
    """A data source is missing, malformed or empty; the message says which and where."""


@dataclass
class Problem:
    id: str
    question: str
    answer: str
    source: str
    solution: str | None = None
    metadata: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "question": self.question,
            "answer": self.answer,
            "source": self.source,
            "solution": self.solution,
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Problem:
        missing = [k for k in ("id", "question", "answer", "source") if k not in data]
        if missing:
            raise ProblemsError(f"problem record is missing field {missing[0]!r}")
        return cls(
            id=str(data["id"]),
            question=str(data["question"]),
            answer=str(data["answer"]),
            source=str(data["source"]),
            solution=data.get("solution"),
            metadata=dict(data.get("metadata") or {}),
        )


BENCHMARKS = ("gsm8k", "math", "math500", "aime24", "amc23", "svamp", "asdiv", "synthetic")

# Splits each benchmark ships with; the first listed "test" (else the first) is the default.
DEFAULT_SPLITS: dict[str, tuple[str, ...]] = {
    "gsm8k": ("train", "test"),
    "math": ("test",),
    "math500": ("test",),
    "aime24": ("test",),
    "amc23": ("test",),
    "svamp": ("test",),
    "asdiv": ("test",),
    "synthetic": ("train", "test", "fewshot"),
}

# Hub copies used when no local data directory is found: name -> (dataset id, config, split map).
# HuggingFaceH4/aime_2024 only has a "train" split holding the 30 test problems.
HUB_DATASETS: dict[str, tuple[str, str | None, dict[str, str]]] = {
    "gsm8k": ("openai/gsm8k", "main", {}),
    "math500": ("HuggingFaceH4/MATH-500", None, {}),
    "aime24": ("HuggingFaceH4/aime_2024", None, {"test": "train"}),
}

# Few-shot exemplars need few problems; this many are generated unless a limit says otherwise.
_DEFAULT_FEWSHOT = 16


# --------------------------------------------------------------------------- small helpers


def format_number(value: Any) -> str:
    """A JSON number as a gold answer string: 27.0 -> "27", 0.5 -> "0.5", -1.0 -> "-1"."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value) and value == int(value):
            return str(int(value))
        return repr(value)
    return str(value).strip()


def _field(row: dict[str, Any], name: str, where: str) -> Any:
    """row[name], or a ProblemsError naming the file, line and field."""
    if not isinstance(row, dict):
        raise ProblemsError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if name not in row or row[name] is None:
        fields = ", ".join(sorted(map(str, row))) or "none"
        raise ProblemsError(f"{where}: missing field {name!r} (fields present: {fields})")
    return row[name]


def _text(row: dict[str, Any], name: str, where: str) -> str:
    value = _field(row, name, where)
    if isinstance(value, (dict, list)):
        raise ProblemsError(f"{where}: field {name!r} must be text, got {type(value).__name__}")
    text = format_number(value) if isinstance(value, (int, float)) else str(value)
    if not text.strip():
        raise ProblemsError(f"{where}: field {name!r} is empty")
    return text


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each non-blank line; malformed lines raise with file and line."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise ProblemsError(f"{path} does not exist") from None
    except OSError as exc:
        raise ProblemsError(f"cannot read {path}: {exc}") from None
    with handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ProblemsError(f"{path} line {lineno}: not valid UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ProblemsError(f"{path} line {lineno}: invalid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise ProblemsError(
                    f"{path} line {lineno}: expected a JSON object, got {type(record).__name__}"
                )
            yield lineno, record


def _iter_csv(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        handle = path.open(encoding="utf-8", newline="")
    except FileNotFoundError:
        raise ProblemsError(f"{path} does not exist") from None
    except OSError as exc:
        raise ProblemsError(f"cannot read {path}: {exc}") from None
    with handle:
        reader = csv.DictReader(handle)
        rows = iter(reader)
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except UnicodeDecodeError:
                raise ProblemsError(f"{path} line {reader.line_num + 1}: not valid UTF-8") from None
            # line_num is the physical line the row ended on (header is line 1).
            if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                continue
            yield reader.line_num, {k: v for k, v in row.items() if k is not None}


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 0:
        raise ProblemsError(f"limit must be >= 0, got {limit}")


def _nonempty(problems: list[Problem], what: str) -> list[Problem]:
    if not problems:
        raise ProblemsError(f"{what}: no problems found (the dataset is empty)")
    return problems


# --------------------------------------------------------------------------- benchmark rows

# Each converter maps one raw record to a Problem; `where` names file and line for errors.
Converter = Callable[[dict[str, Any], str, str], Problem]

_CALC_ANNOTATION = re.compile(r"<<[^<>]*>>")


def _gsm8k(row: dict[str, Any], pid: str, where: str) -> Problem:
    raw = _text(row, "answer", where)
    if "####" not in raw:
        raise ProblemsError(f"{where}: field 'answer' has no '#### <answer>' line")
    worked, final = raw.rsplit("####", 1)
    answer = final.strip().replace(",", "")
    if not answer:
        raise ProblemsError(f"{where}: field 'answer' has an empty '####' answer")
    solution = _CALC_ANNOTATION.sub("", worked).strip() or None
    return Problem(pid, _text(row, "question", where), answer, "gsm8k", solution)


def _math500(row: dict[str, Any], pid: str, where: str) -> Problem:
    meta = {k: row[k] for k in ("level", "subject") if k in row}
    uid = row.get("unique_id")
    return Problem(
        str(uid) if uid else pid,
        _text(row, "problem", where),
        _text(row, "answer", where).strip(),
        "math500",
        row.get("solution"),
        meta,
    )


def _math(row: dict[str, Any], pid: str, where: str) -> Problem:
    solution = _text(row, "solution", where)
    answer = extract_boxed(solution)
    if not answer:
        raise ProblemsError(f"{where}: field 'solution' has no complete \\boxed{{}} answer")
    meta: dict[str, Any] = {}
    level = row.get("level")
    if level is not None:
        m = re.search(r"\d+", str(level))
        meta["level"] = int(m.group(0)) if m else str(level)
    if "type" in row:
        meta["subject"] = row["type"]
    idx = row.get("idx")
    return Problem(
        f"math-{idx}" if idx is not None else pid,
        _text(row, "problem", where),
        answer,
        "math",
        solution,
        meta,
    )


def _aime24(row: dict[str, Any], pid: str, where: str) -> Problem:
    # Answers stay as given ("025"): math-verify treats 025 and 25 as equal, and the reference
    # harness does a substring match on the string as written.
    question = row.get("problem") or _text(row, "question", where)
    meta = {k: row[k] for k in ("url", "year") if k in row}
    pid = f"aime24-{row['id']}" if row.get("id") is not None else pid
    answer = _text(row, "answer", where).strip()
    return Problem(pid, str(question), answer, "aime24", row.get("solution"), meta)


def _amc23(row: dict[str, Any], pid: str, where: str) -> Problem:
    question = row.get("problem") or _text(row, "question", where)
    raw = _field(row, "answer", where)
    meta = {"raw_answer": raw}
    if "url" in row:
        meta["url"] = row["url"]
    pid = f"amc23-{row['id']}" if row.get("id") is not None else pid
    return Problem(pid, str(question), _float_answer(raw, where), "amc23", None, meta)


def _float_answer(raw: Any, where: str) -> str:
    """JSON float golds (27.0) become "27"; strings holding floats likewise."""
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return format_number(raw)
    text = str(raw).strip()
    try:
        return format_number(float(text))
    except ValueError:
        if not text:
            raise ProblemsError(f"{where}: field 'answer' is empty") from None
        return text


def _svamp(row: dict[str, Any], pid: str, where: str) -> Problem:
    body = _text(row, "Body", where).strip()
    question = _text(row, "Question", where).strip()
    meta = {k: row[k] for k in ("Equation", "Type", "ID", "idx") if k in row}
    pid = f"svamp-{row['ID']}" if row.get("ID") else pid
    answer = _float_answer(_field(row, "Answer", where), where)
    return Problem(pid, f"{body} {question}", answer, "svamp", None, meta)


_UNIT_SUFFIX = re.compile(r"^(?P<value>.*?\S)\s*\((?P<unit>[^()]*)\)\s*$")


def _asdiv(row: dict[str, Any], pid: str, where: str) -> Problem:
    body = _text(row, "body", where).strip()
    question = _text(row, "question", where).strip()
    raw = _text(row, "answer", where).strip()
    # "9 (apples)" -> "9"; non-numeric answers ("Mrs. Hilt", "3:30 p.m.") are kept as given.
    m = _UNIT_SUFFIX.match(raw)
    answer = m.group("value").strip() if m else raw
    meta: dict[str, Any] = {"raw_answer": raw}
    meta.update({k: row[k] for k in ("solution_type", "formula", "idx") if k in row})
    pid = f"asdiv-{row['idx']}" if row.get("idx") is not None else pid
    return Problem(pid, f"{body} {question}", answer, "asdiv", None, meta)


_CONVERTERS: dict[str, Converter] = {
    "gsm8k": _gsm8k,
    "math": _math,
    "math500": _math500,
    "aime24": _aime24,
    "amc23": _amc23,
    "svamp": _svamp,
    "asdiv": _asdiv,
}


# --------------------------------------------------------------------------- data directory


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path | None:
    """Where local benchmark copies live.

    An explicit value wins, then the environment variable SSB_DATA_DIR, then the first
    `shared/data` directory found walking up from the current directory and from this file (a
    checkout at /work/main finds /work/shared/data). None means "use the Hugging Face hub".
    """
    if data_dir:
        return Path(data_dir).expanduser()
    env = os.environ.get("SSB_DATA_DIR")
    if env:
        return Path(env).expanduser()
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for parent in (start, *start.parents):
            candidate = parent / "shared" / "data"
            if candidate.is_dir():
                return candidate
    return None


def _default_split(name: str) -> str:
    splits = DEFAULT_SPLITS[name]
    return "test" if "test" in splits else splits[0]


def _normalise_split(name: str, split: str | None) -> str:
    if split is None:
        return _default_split(name)
    if name == "synthetic" and split == "eval":
        return "test"  # the evaluation split of synthetic problems is called "test"
    return split


def _load_benchmark(
    name: str,
    split: str,
    data_dir: str | os.PathLike[str] | None,
    limit: int | None,
) -> list[Problem]:
    root = resolve_data_dir(data_dir)
    if root is None:
        return _load_benchmark_from_hub(name, split, limit)
    path = root / name / f"{split}.jsonl"
    if not path.is_file():
        hint = ", ".join(DEFAULT_SPLITS[name])
        if split not in DEFAULT_SPLITS[name]:
            raise ProblemsError(f"{name} has no split {split!r} (splits: {hint})")
        raise ProblemsError(
            f"{path} does not exist: expected a local copy of {name} "
            f"(<data_dir>/{name}/<split>.jsonl; splits: {hint}) under data dir {root}"
        )
    convert = _CONVERTERS[name]
    problems: list[Problem] = []
    for lineno, row in _iter_jsonl(path):
        if limit is not None and len(problems) >= limit:
            break
        problem = convert(row, f"{name}-{split}-{lineno}", f"{path} line {lineno}")
        problem.metadata.setdefault("split", split)
        problems.append(problem)
    if limit == 0:
        return problems
    return _nonempty(problems, str(path))


def _load_benchmark_from_hub(name: str, split: str, limit: int | None) -> list[Problem]:
    if name not in HUB_DATASETS:
        raise ProblemsError(
            f"no local data directory found for {name!r} and it has no Hugging Face hub copy "
            f"ssb knows of: set data.data_dir (or SSB_DATA_DIR) to a directory holding "
            f"{name}/{split}.jsonl"
        )
    dataset_id, config, split_map = HUB_DATASETS[name]
    return load_hf(
        dataset_id,
        split_map.get(split, split),
        config=config,
        limit=limit,
        converter=_CONVERTERS[name],
        source=name,
    )


# --------------------------------------------------------------------------- generic sources


def _generic_row(
    row: dict[str, Any],
    pid: str,
    where: str,
    source: str,
    question_field: str,
    answer_field: str,
    id_field: str | None,
) -> Problem:
    question = _text(row, question_field, where)
    answer = _text(row, answer_field, where).strip()
    solution = None
    if "\\boxed" in answer or "\\fbox" in answer:
        # A worked solution mapped as the answer (MATH-style files): its last box is the gold.
        boxed = extract_boxed(answer)
        if not boxed:
            raise ProblemsError(f"{where}: field {answer_field!r} has an unbalanced \\boxed{{}}")
        solution, answer = answer, boxed
    if id_field is not None:
        pid = _text(row, id_field, where).strip()
    mapped = {question_field, answer_field, *([id_field] if id_field else [])}
    meta = {
        k: v
        for k, v in row.items()
        if k not in mapped and isinstance(v, (str, int, float, bool)) and v is not None
    }
    return Problem(pid, question, answer, source, solution, meta)


def load_file(
    path: str | os.PathLike[str],
    *,
    question_field: str = "question",
    answer_field: str = "answer",
    id_field: str | None = None,
    limit: int | None = None,
) -> list[Problem]:
    """Problems from a .jsonl or .csv file with a field mapping; ids default to <stem>-<line>."""
    _check_limit(limit)
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise ProblemsError(f"{p}: unsupported file type {suffix!r} (use .jsonl or .csv)")
    if not p.is_file():
        raise ProblemsError(f"{p} does not exist")
    rows = _iter_jsonl(p) if suffix == ".jsonl" else _iter_csv(p)
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    for lineno, row in rows:
        if limit is not None and len(problems) >= limit:
            break
        where = f"{p} line {lineno}"
        problem = _generic_row(
            row, f"{p.stem}-{lineno}", where, str(p), question_field, answer_field, id_field
        )
        if problem.id in seen:
            raise ProblemsError(
                f"{where}: duplicate id {problem.id!r} (first seen on line {seen[problem.id]})"
            )
        seen[problem.id] = lineno
        problems.append(problem)
    if limit == 0:
        return problems
    return _nonempty(problems, str(p))


def load_hf(
    dataset_id: str,
    split: str,
    *,
    config: str | None = None,
    question_field: str = "question",
    answer_field: str = "answer",
    id_field: str | None = None,
    limit: int | None = None,
    converter: Converter | None = None,
    source: str | None = None,
) -> list[Problem]:
    """Problems from a Hugging Face dataset via `datasets.load_dataset` (network or local cache)."""
    _check_limit(limit)
    label = f"hf:{dataset_id}" + (f":{config}" if config else "")
    try:
        import datasets
    except ImportError as exc:  # a core dependency, but say so plainly if it is missing
        raise ProblemsError(f"loading {label} needs the `datasets` package ({exc})") from None
    try:
        ds = datasets.load_dataset(dataset_id, config, split=split)
    except Exception as exc:  # hub errors come in many types (offline, 404, auth, bad split)
        raise ProblemsError(
            f"could not load {label} split {split!r} from the Hugging Face hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): "
            f"set data.data_dir to a local copy"
        ) from exc
    problems: list[Problem] = []
    for index, row in enumerate(ds):
        if limit is not None and len(problems) >= limit:
            break
        # 1-based row numbers, so a hub copy of a benchmark gets the ids of its local copy.
        pid = f"{source or dataset_id}-{split}-{index + 1}"
        where = f"{label} split {split!r} row {index + 1}"
        if converter is not None:
            problem = converter(dict(row), pid, where)
        else:
            problem = _generic_row(
                dict(row), pid, where, source or label, question_field, answer_field, id_field
            )
        problem.metadata.setdefault("split", split)
        problems.append(problem)
    if limit == 0:
        return problems
    return _nonempty(problems, f"{label} split {split!r}")


def _parse_hf_source(source: str) -> tuple[str, str | None]:
    """ "hf:openai/gsm8k:main" -> ("openai/gsm8k", "main")."""
    spec = source[len("hf:") :].strip()
    if not spec:
        raise ProblemsError("hf: source needs a dataset id, e.g. hf:openai/gsm8k")
    dataset_id, _, config = spec.partition(":")
    return dataset_id, (config or None)


# --------------------------------------------------------------------------- dispatch


def load_problems(
    source: str,
    split: str | None = None,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    question_field: str = "question",
    answer_field: str = "answer",
    id_field: str | None = None,
    synthetic: SyntheticConfig | None = None,
    limit: int | None = None,
) -> list[Problem]:
    """Load problems from a benchmark name, a .jsonl/.csv path, `hf:<id>[:<config>]` or synthetic.

    `split` defaults to "test" (benchmarks, hub datasets and synthetic alike). `limit` keeps
    the first N problems in file order. For synthetic problems the count is `limit`, else
    `synthetic.num_train` (train) / `num_eval` (test) / 16 (fewshot).
    """
    _check_limit(limit)
    source = str(source).strip()
    if source.startswith("hf:"):
        dataset_id, config = _parse_hf_source(source)
        converter = None
        name = None
        split = split or "test"
        known = {hub_id: bench for bench, (hub_id, _, _) in HUB_DATASETS.items()}
        if dataset_id in known:
            # A hub copy of a known benchmark: parse it like the local copy ("#### 18" etc.).
            name = known[dataset_id]
            _, default_config, split_map = HUB_DATASETS[name]
            converter = _CONVERTERS[name]
            config = config or default_config
            split = split_map.get(split, split)
        return load_hf(
            dataset_id,
            split,
            config=config,
            question_field=question_field,
            answer_field=answer_field,
            id_field=id_field,
            limit=limit,
            converter=converter,
            source=name or source,
        )
    if source.lower().endswith((".jsonl", ".csv")):
        return load_file(
            source,
            question_field=question_field,
            answer_field=answer_field,
            id_field=id_field,
            limit=limit,
        )
    name = source.lower()
    if name not in BENCHMARKS:
        raise ProblemsError(
            f"unknown problem source {source!r}: use one of {', '.join(BENCHMARKS)}, "
            f"a .jsonl/.csv path, or hf:<dataset id>"
        )
    split = _normalise_split(name, split)
    if name == "synthetic":
        syn = synthetic or SyntheticConfig()
        if limit is not None:
            n = limit
        elif split == "train":
            n = syn.num_train
        elif split == "test":
            n = syn.num_eval
        else:
            n = _DEFAULT_FEWSHOT
        return synthetic_problems(split, n, difficulty=syn.difficulty, seed=syn.seed)
    return _load_benchmark(name, split, data_dir, limit)


def load_train_problems(cfg: Config) -> list[Problem]:
    """Training problems per cfg.data: train split, optional seeded shuffle, then the
    `max_problems` that follow the first `skip_problems`."""
    data = cfg.data
    skip = data.skip_problems
    limit = None if data.max_problems is None else skip + data.max_problems
    is_synthetic = data.train.strip().lower() == "synthetic"
    if is_synthetic and _normalise_split("synthetic", data.train_split) == "train":
        # The synthetic training set has num_train problems; max_problems can only lower that.
        n = data.synthetic.num_train
        limit = n if limit is None else min(limit, n)
    problems = load_problems(
        data.train,
        data.train_split,
        data_dir=data.data_dir,
        question_field=data.question_field,
        answer_field=data.answer_field,
        id_field=data.id_field,
        synthetic=data.synthetic,
        # Without shuffling, "the first N in file order" can be read directly.
        limit=None if data.shuffle and not is_synthetic else limit,
    )
    if data.shuffle:
        random.Random(cfg.seed).shuffle(problems)
        if limit is not None:
            problems = problems[:limit]
    return problems[skip:]


def load_eval_problems(cfg: Config, benchmark: str) -> list[Problem]:
    """Evaluation problems of one benchmark: its test split, first cfg.eval.max_problems."""
    data = cfg.data
    limit = cfg.eval.max_problems
    name = benchmark.strip().lower()
    split: str | None = None
    if name == "synthetic":
        split = "test"
        n = data.synthetic.num_eval
        limit = n if limit is None else min(limit, n)
    elif name in BENCHMARKS:
        split = _default_split(name)
    return load_problems(
        benchmark,
        split,
        data_dir=data.data_dir,
        question_field=data.question_field,
        answer_field=data.answer_field,
        id_field=data.id_field,
        synthetic=data.synthetic,
        limit=limit,
    )


# --------------------------------------------------------------------------- synthetic

# Per difficulty: number of steps and the largest number that may appear anywhere
# (operands, intermediate results and the answer).
_SYNTH_LEVELS = {1: (1, 20), 2: (2, 100), 3: (3, 1000)}
_SYNTH_SPLITS = ("train", "test", "fewshot")

_NAMES = (
    ("Tom", "he"),
    ("Anna", "she"),
    ("Ben", "he"),
    ("Maria", "she"),
    ("Leo", "he"),
    ("Sara", "she"),
    ("Omar", "he"),
    ("Mei", "she"),
    ("Jack", "he"),
    ("Priya", "she"),
    ("Lucas", "he"),
    ("Emma", "she"),
)
_ITEMS = (
    "apples",
    "coins",
    "marbles",
    "stickers",
    "pencils",
    "cookies",
    "shells",
    "stamps",
    "cards",
    "books",
    "beads",
    "toy cars",
)
_CONTAINERS = ("bags", "boxes", "jars", "baskets", "packs")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MULTIPLE_WORDS = {2: "twice", 3: "three times", 4: "four times", 5: "five times"}


def synthetic_split_of(question: str) -> str:
    """The split a synthetic question belongs to, decided by a hash of its text alone.

    Independent of seed and difficulty, so train, test and fewshot problems can never share a
    question, whatever settings generated them. 70% train, 25% test, 5% fewshot.
    """
    bucket = int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:8], "big") % 20
    if bucket == 0:
        return "fewshot"
    if bucket <= 5:
        return "test"
    return "train"


@dataclass
class _Story:
    question: str
    solution: str
    answer: int
    steps: list[tuple[str, int, int, int]]  # (op, left, right, result)
    template: str


def _pick(rng: random.Random, lo: int, hi: int) -> int:
    return rng.randint(lo, hi) if hi >= lo else lo


def _arithmetic_step(
    rng: random.Random, x: int, limit: int, ops: tuple[str, ...]
) -> tuple[str, int] | None:
    """A random feasible operation on x keeping everything within [0, limit]."""
    feasible = []
    if "+" in ops and x < limit:
        feasible.append("+")
    if "-" in ops and x >= 1:
        feasible.append("-")
    if "*" in ops and 2 * x <= limit and x >= 1:
        feasible.append("*")
    if not feasible:
        return None
    op = rng.choice(feasible)
    if op == "+":
        return op, _pick(rng, 1, limit - x)
    if op == "-":
        return op, _pick(rng, 1, x)
    return op, _pick(rng, 2, min(limit // x, 10))


def _apply(op: str, a: int, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    return a * b


def _story_have(rng: random.Random, n_steps: int, limit: int) -> _Story | None:
    """One person's collection changes step by step (buy, give away, multiply)."""
    name, he = rng.choice(_NAMES)
    friend = rng.choice([n for n, _ in _NAMES if n != name])
    item = rng.choice(_ITEMS)
    He = he.capitalize()
    steps: list[tuple[str, int, int, int]] = []
    q_parts: list[str] = []
    s_parts: list[str] = []
    # Start: a plain amount, or (when multiplication fits) groups of items.
    if rng.random() < 0.3 and limit >= 4:
        groups = _pick(rng, 2, min(limit // 2, 10))
        each = _pick(rng, 2, limit // groups)
        box = rng.choice(_CONTAINERS)
        x = groups * each
        steps.append(("*", groups, each, x))
        q_parts.append(f"{name} has {groups} {box} with {each} {item} in each.")
        s_parts.append(
            f"{name} has {groups} {box} with {each} {item} in each, so {he} has {groups} * {each} = {x} {item}."
        )
        remaining = n_steps - 1
    else:
        x = _pick(rng, 1, limit)
        q_parts.append(f"{name} has {x} {item}.")
        s_parts.append(f"{name} starts with {x} {item}.")
        remaining = n_steps
    for i in range(remaining):
        step = _arithmetic_step(rng, x, limit, ("+", "-", "*"))
        if step is None:
            return None
        op, b = step
        y = _apply(op, x, b)
        then = i > 0 or bool(steps)
        if op == "+":
            phrase = rng.choice(
                [f"buys {b} more", f"finds {b} more", f"gets {b} more from {friend}"]
            )
        elif op == "-":
            phrase = rng.choice([f"gives {b} to {friend}", f"loses {b}", f"gives away {b}"])
        else:
            phrase = f"ends up with {_MULTIPLE_WORDS.get(b, f'{b} times')} as many {item} as before"
        q_parts.append(f"Then {he} {phrase}." if then else f"{He} {phrase}.")
        s_parts.append(f"{He} {phrase}, so {he} has {x} {op} {b} = {y} {item}.")
        steps.append((op, x, b, y))
        x = y
    q_parts.append(f"How many {item} does {name} have now?")
    s_parts.append(f"The answer is \\boxed{{{x}}}.")
    return _Story(" ".join(q_parts), " ".join(s_parts), x, steps, "have")


def _story_compare(rng: random.Random, n_steps: int, limit: int) -> _Story | None:
    """A chain of people, each with more / fewer / a multiple of the previous one's items."""
    people = rng.sample(_NAMES, n_steps + 1)
    item = rng.choice(_ITEMS)
    x = _pick(rng, 1, limit)
    first = people[0][0]
    q_parts = [f"{first} has {x} {item}."]
    s_parts = [f"{first} has {x} {item}."]
    steps: list[tuple[str, int, int, int]] = []
    prev = first
    for person, _ in people[1:]:
        step = _arithmetic_step(rng, x, limit, ("+", "-", "*"))
        if step is None:
            return None
        op, b = step
        y = _apply(op, x, b)
        if op == "+":
            rel = f"{b} more {item} than {prev}"
        elif op == "-":
            rel = f"{b} fewer {item} than {prev}"
        else:
            rel = f"{_MULTIPLE_WORDS.get(b, f'{b} times')} as many {item} as {prev}"
        q_parts.append(f"{person} has {rel}.")
        s_parts.append(f"{person} has {rel}, so {person} has {x} {op} {b} = {y} {item}.")
        steps.append((op, x, b, y))
        prev, x = person, y
    q_parts.append(f"How many {item} does {prev} have?")
    s_parts.append(f"The answer is \\boxed{{{x}}}.")
    return _Story(" ".join(q_parts), " ".join(s_parts), x, steps, "compare")


def _story_pages(rng: random.Random, n_steps: int, limit: int) -> _Story | None:
    """Reading a book over several days: pages read in total, or pages left to read."""
    name, he = rng.choice(_NAMES)
    start_day = rng.randrange(len(_DAYS) - n_steps)
    days = _DAYS[start_day : start_day + n_steps + 1]
    steps: list[tuple[str, int, int, int]] = []
    if rng.random() < 0.5:
        # Pages left: a book of x pages, each day some are read.
        x = _pick(rng, n_steps + 1, limit)
        q_parts = [f"{name}'s book has {x} pages."]
        s_parts = [f"The book has {x} pages."]
        for day in days[:n_steps]:
            if x < 1:
                return None
            b = _pick(rng, 1, x)
            y = x - b
            q_parts.append(f"On {day}, {name} reads {b} pages.")
            s_parts.append(f"After {day}, {x} - {b} = {y} pages are left.")
            steps.append(("-", x, b, y))
            x = y
        q_parts.append("How many pages are left to read?")
    else:
        # Pages read in total over the days.
        x = _pick(rng, 1, max(1, limit // (n_steps + 1)))
        q_parts = [f"{name} reads {x} pages on {days[0]}."]
        s_parts = [f"On {days[0]}, {he} reads {x} pages."]
        for day in days[1:]:
            if x >= limit:
                return None
            b = _pick(rng, 1, limit - x)
            y = x + b
            q_parts.append(f"On {day}, {he} reads {b} pages.")
            s_parts.append(f"By the end of {day}, {he} has read {x} + {b} = {y} pages.")
            steps.append(("+", x, b, y))
            x = y
        q_parts.append(f"How many pages does {name} read in total?")
    s_parts.append(f"The answer is \\boxed{{{x}}}.")
    return _Story(" ".join(q_parts), " ".join(s_parts), x, steps, "pages")


_TEMPLATES = (_story_have, _story_have, _story_compare, _story_pages)


def synthetic_problems(split: str, n: int, difficulty: int = 1, seed: int = 0) -> list[Problem]:
    """n arithmetic word problems of a split ("train", "test", "fewshot"), deterministic by seed.

    difficulty 1: one step, numbers <= 20; 2: two steps, <= 100; 3: three steps, <= 1000.
    Answers are non-negative integers; `solution` is one line ending in "\\boxed{N}".
    Splits are disjoint by question text (see `synthetic_split_of`).
    """
    split = "test" if split == "eval" else split
    if split not in _SYNTH_SPLITS:
        raise ProblemsError(
            f"synthetic has no split {split!r} (splits: {', '.join(_SYNTH_SPLITS)})"
        )
    if difficulty not in _SYNTH_LEVELS:
        raise ProblemsError(f"synthetic difficulty must be 1, 2 or 3, got {difficulty}")
    if n < 0:
        raise ProblemsError(f"number of synthetic problems must be >= 0, got {n}")
    n_steps, limit = _SYNTH_LEVELS[difficulty]
    # The RNG stream depends on (seed, difficulty, split); a string seed is hashed with SHA-512
    # by `random`, so it is stable across processes and PYTHONHASHSEED values.
    rng = random.Random(f"ssb-synthetic:{seed}:{difficulty}:{split}")
    problems: list[Problem] = []
    seen: set[str] = set()
    max_tries = 200 * n + 10_000
    tries = 0
    while len(problems) < n:
        tries += 1
        if tries > max_tries:
            raise ProblemsError(
                f"could only generate {len(problems)} of {n} distinct synthetic {split} problems "
                f"at difficulty {difficulty}; ask for fewer"
            )
        story = rng.choice(_TEMPLATES)(rng, n_steps, limit)
        if story is None or len(story.steps) != n_steps:
            continue
        if story.question in seen or synthetic_split_of(story.question) != split:
            continue
        seen.add(story.question)
        digest = hashlib.sha256(story.question.encode("utf-8")).hexdigest()[:12]
        problems.append(
            Problem(
                id=f"synthetic-d{difficulty}-{digest}",
                question=story.question,
                answer=str(story.answer),
                source="synthetic",
                solution=story.solution,
                metadata={
                    "split": split,
                    "difficulty": difficulty,
                    "template": story.template,
                    "steps": [list(s) for s in story.steps],
                },
            )
        )
    return problems
