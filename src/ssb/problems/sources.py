"""Loading problems: benchmark copies (local or hub), jsonl/csv files and hub datasets with a
field mapping, and the dispatch from a config's source names (see `ssb.problems`)."""

from __future__ import annotations

import csv
import json
import os
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ssb.config import BENCHMARKS, SyntheticConfig, parse_hf_source, source_name
from ssb.grading import extract_boxed
from ssb.problems.record import Problem, ProblemsError, format_number
from ssb.problems.synthetic import synthetic_problems

if TYPE_CHECKING:
    from ssb.config import Config

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
    path = _locate_benchmark(name, split, data_dir)
    if path is None:
        return _load_benchmark_from_hub(name, split, limit)
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


def _locate_benchmark(
    name: str, split: str, data_dir: str | os.PathLike[str] | None
) -> Path | None:
    """The local copy of a benchmark split, or None for its hub copy; an error when neither
    exists (checked without reading anything)."""
    root = resolve_data_dir(data_dir)
    if root is None:
        if name not in HUB_DATASETS:
            raise ProblemsError(
                f"no local data directory found for {name!r} and it has no Hugging Face hub "
                f"copy ssb knows of: set data.data_dir (or SSB_DATA_DIR) to a directory holding "
                f"{name}/{split}.jsonl"
            )
        return None
    path = root / name / f"{split}.jsonl"
    if not path.is_file():
        hint = ", ".join(DEFAULT_SPLITS[name])
        if split not in DEFAULT_SPLITS[name]:
            raise ProblemsError(f"{name} has no split {split!r} (splits: {hint})")
        raise ProblemsError(
            f"{path} does not exist: expected a local copy of {name} "
            f"(<data_dir>/{name}/<split>.jsonl; splits: {hint}) under data dir {root}"
        )
    return path


def _load_benchmark_from_hub(name: str, split: str, limit: int | None) -> list[Problem]:
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
        import datasets  # noqa: PLC0415 -- start-up: datasets (pyarrow, pandas) loads only for hf: sources
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
        dataset_id, config = parse_hf_source(source)
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
    name = check_source_name(source)
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


def check_source_name(source: str) -> str:
    """`ssb.config.source_name`, with its error as a ProblemsError."""
    try:
        return source_name(source)
    except ValueError as exc:
        raise ProblemsError(str(exc)) from None


def check_source(
    source: str, split: str | None = None, data_dir: str | os.PathLike[str] | None = None
) -> None:
    """Refuse, without reading it, a source `load_problems` could not find: a file that does not
    exist, a benchmark with neither a local nor a hub copy. A hub dataset is looked up when
    loaded (no network here)."""
    name = check_source_name(source)
    if name.startswith("hf:") or name == "synthetic":
        return
    if name.lower().endswith((".jsonl", ".csv")):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ProblemsError(f"{path} does not exist")
        return
    _locate_benchmark(name, _normalise_split(name, split), data_dir)


def check_train_source(cfg: Config) -> None:
    """`check_source` for the training problems `load_train_problems` reads."""
    check_source(cfg.data.train, cfg.data.train_split, cfg.data.data_dir)


def check_eval_source(cfg: Config, benchmark: str) -> None:
    """`check_source` for one benchmark as `load_eval_problems` reads it."""
    name = benchmark.strip().lower()
    split = _default_split(name) if name in BENCHMARKS else None
    check_source(benchmark, split, cfg.data.data_dir)


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
