"""`ssb import-pairs`: start a run from published pairs instead of `ssb rollout` + `ssb bootstrap`.

Two input formats (`--format auto` tells them apart by their files):

ssb
    What `ssb export` writes: the export folder, its `dataset/` folder, or one of its parquet
    files; one row per pair with the columns of `ssb.share.PAIR_FIELDS`. `ssb_export.json` next
    to the data names the tokenizer of the stored token ids.

reference
    The reference implementation's two aligned JSON Lines files (`logit_gen.py` writes
    `generated_math_teacher_data.jsonl` and `generated_math_student_data.jsonl`): line i of
    each describes pair i, one JSON object per line, ``{"messages": [...]}``, each message
    ``{"role": ..., "content": <string>}``:

    - teacher: ``[{"role": "system"} (optional), {"role": "user"} (the hinted prompt),
      {"role": "assistant"} (the reply)]``
    - student: ``[{"role": "system"} (optional), {"role": "user"} (the question)]``

    `--from` is the folder holding both (file names containing "teacher" and "student") or the
    teacher file (the student file is its name with "teacher" replaced by "student", or
    `--student-file`). The question must appear in the hinted prompt (a check that the files
    are aligned). The reference kept a reply only if its last `\\boxed{}` answer equalled the
    gold answer, so that answer is the pair's `gold`; the rollouts shown in the hint are not
    known (null). A pair's id is `ref-` + a hash of its question and reply.

What is written, per pair, is what `ssb bootstrap` writes (exactly its fields), so `ssb targets`
and `ssb train` continue unchanged:

- the student prompt is the run's own inference prompt (`ssb.prompts.student_messages` from the
  question, the run's system prompt), rendered by `ssb.prompts.render_prompt_ids`: the student
  is trained on the prompt `ssb eval` asks it with. A reference student system prompt that
  differs from the run's `prompt.system_prompt` is reported (set it with --set to keep it);
- the teacher prompt is the imported hinted messages (system + hinted user), the context the
  reply was written in, rendered the same way with the run's tokenizer and template;
- the reply is tokenised once, with the run's tokenizer (no special tokens), and the run's end
  token is its end; an ssb export made with the same tokenizer (same vocabulary hash) keeps its
  stored `reply_ids`, the tokens the teacher actually generated.

Appends only: pairs already in pairs.jsonl (by id) are skipped, so a rerun resumes and nothing
there is lost. Bad input stops the import before anything is written, with the file, line (or
parquet row) and field named.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from ssb.config import Config
from ssb.grading import extract_boxed
from ssb.identity import model_identity, vocab_hash
from ssb.models import load_tokenizer
from ssb.problems import Problem
from ssb.prompts import render_prompt_ids, reply_format, student_messages
from ssb.records import pair_record
from ssb.rundir import RunDir, append_jsonl, read_jsonl
from ssb.share import (
    DATASET_DIR,
    EXPORT_FORMAT,
    EXPORT_FORMAT_VERSION,
    EXPORT_META_NAME,
    FORMATS,
    IMPORTS_KEY,
    OPTIONAL_PAIR_FIELDS,
    PAIR_FIELDS,
    ShareError,
)
from ssb.stages.base import check_model_identity

log = logging.getLogger("ssb")
APPEND_BATCH = 256  # pairs per fsynced append: a killed import loses at most this many


@dataclass
class SourcePair:
    """One pair as read from the input, before tokenisation."""

    where: str  # "<file> line N" / "<file> row N", for error messages
    id: str
    question: str
    gold: str
    source: str
    teacher_messages: list[dict[str, str]]
    reply: str
    reply_ids: list[int] | None = None  # the export's ids (ssb format)
    extras: dict[str, Any] = field(default_factory=dict)  # teacher_answer, rollouts shown
    student_system: str | None = None  # the reference's student system prompt


def run_import_pairs(
    cfg: Config,
    rundir: RunDir,
    source: str | Path,
    fmt: str = "auto",
    student_file: str | Path | None = None,
) -> dict[str, Any]:
    """Append the pairs at `source` to the run's pairs.jsonl; returns a summary."""

    source = Path(source)
    if fmt not in FORMATS:
        raise ShareError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if not source.exists():
        raise ShareError(f"--from {source} does not exist")
    fmt = detect_format(source) if fmt == "auto" else fmt
    if fmt == "ssb":
        rows, meta, files = read_ssb(source)
    else:
        rows, files = read_reference(source, Path(student_file) if student_file else None)
        meta = {}
    tokenizer = load_tokenizer(cfg.model)
    check_model_identity(rundir, model_identity(cfg.model, tokenizer))
    exported_vocab = (meta.get("model_identity") or {}).get("vocab_hash")
    same_tokenizer = exported_vocab is not None and exported_vocab == vocab_hash(tokenizer)
    fmt_reply = reply_format(tokenizer, cfg.prompt)
    end_token_id = fmt_reply.end_token_id

    present = {p["id"] for p in read_jsonl(rundir.pairs_path)}
    todo, seen = [], set()
    for row in rows:
        if row.id not in present and row.id not in seen:
            todo.append(row)
        seen.add(row.id)
    already = sum(1 for i in seen if i in present)
    repeated = len(rows) - len(seen)
    # Everything is tokenised and checked before the first append: bad input writes nothing.
    records = [imported_pair(row, cfg, tokenizer, end_token_id, same_tokenizer) for row in todo]
    other_system = sum(1 for r in todo if r.student_system != _system(cfg))
    if other_system:
        log.warning(
            "import-pairs: %d imported student prompts have another system prompt than the "
            "run's prompt.system_prompt; the student is trained on the run's (the one `ssb eval` "
            "uses). To keep theirs: --set prompt.system_prompt=...",
            other_system,
        )
    misfits = [] if fmt_reply.chat else fewshot_misfits(todo, cfg.prompt.stop_strings)
    for i in range(0, len(records), APPEND_BATCH):
        append_jsonl(rundir.pairs_path, records[i : i + APPEND_BATCH])
    summary: dict[str, Any] = {
        "from": str(source),
        "format": fmt,
        "files": [str(f) for f in files],
        "rows": len(rows),
        "imported": len(records),
        "already_present": already,
        "repeated_in_input": repeated,
        "reply_ids": "stored (same tokenizer)" if same_tokenizer else "tokenised from the text",
        "pairs": len(read_jsonl(rundir.pairs_path)),
    }
    if other_system:
        summary["other_student_system_prompt"] = other_system
    if misfits:
        summary["replies_unlike_fewshot_answers"] = len(misfits)
    if meta:
        summary["origin"] = {k: meta.get(k) for k in ("run_name", "model", "data", "funnel")}
    if records:  # where the pairs came from, for the cards of a later `ssb export`
        entry = {k: summary.get(k) for k in ("from", "format", "imported", "origin")}
        history = rundir.read_manifest().get(IMPORTS_KEY) or []
        rundir.update_manifest(**{IMPORTS_KEY: [*history, entry]})
    log.info(
        "import-pairs: %d new pairs from %s (%s format), %d already present",
        len(records),
        source,
        fmt,
        already,
    )
    return summary


def fewshot_misfits(rows: list[SourcePair], stop_strings: list[str]) -> list[str]:
    """Warn, naming each pair, about replies a few-shot run would not generate: one holding a
    stop string (generation, and so eval, stops there, but the student would be distilled past
    it) or one without the leading space that follows "Answer:". Returns the pairs' ids."""
    misfits = []
    for row in rows:
        stops = [json.dumps(s) for s in stop_strings if s and s in row.reply]
        why = [f"contains the stop string {', '.join(stops)}"] if stops else []
        if not row.reply.startswith(" "):
            why.append('does not start with the space that follows "Answer:"')
        if why:
            misfits.append(row.id)
            log.warning(
                "import-pairs: pair %s (%s): its reply %s; the student would learn a reply the "
                "few-shot prompt never produces (edit it, or set prompt.stop_strings)",
                row.id,
                row.where,
                " and ".join(why),
            )
    return misfits


def _system(cfg: Config) -> str | None:
    return cfg.prompt.system_prompt or None


def imported_pair(
    row: SourcePair, cfg: Config, tokenizer: Any, end_token_id: int, same_tokenizer: bool
) -> dict[str, Any]:
    """The pairs.jsonl record of one imported pair (`ssb.records.pair_record`)."""

    s_msgs = student_messages(Problem(row.id, row.question, row.gold, row.source), cfg.prompt)
    try:
        teacher_ids = render_prompt_ids(tokenizer, row.teacher_messages, cfg.prompt)
    except Exception as exc:  # the template or the few-shot format refuses these messages
        raise ShareError(f"{row.where}: teacher messages cannot be rendered: {exc}") from None
    if same_tokenizer and row.reply_ids is not None:
        reply_ids = list(row.reply_ids)
        decoded = tokenizer.decode(reply_ids, skip_special_tokens=True)
        if decoded != row.reply:
            raise ShareError(
                f"{row.where}: field reply_ids does not decode to field reply (edited?); "
                "make both agree, or drop ssb_export.json to tokenise the reply text"
            )
    else:
        reply_ids = list(tokenizer(row.reply, add_special_tokens=False)["input_ids"])
    return pair_record(
        Problem(row.id, row.question, row.gold, row.source),
        s_msgs,
        row.teacher_messages,
        render_prompt_ids(tokenizer, s_msgs, cfg.prompt),
        teacher_ids,
        row.reply,
        reply_ids,
        end_token_id,
        shown={name: row.extras.get(name) for name in OPTIONAL_PAIR_FIELDS},
    )


# --------------------------------------------------------------------------- formats


def detect_format(path: Path) -> str:
    if path.is_file():
        if path.suffix == ".parquet":
            return "ssb"
        if path.suffix == ".jsonl":
            return "reference"
    elif _parquet_files(_dataset_dir(path)) or (path / EXPORT_META_NAME).is_file():
        return "ssb"
    elif list(path.glob("*teacher*.jsonl")):
        return "reference"
    raise ShareError(
        f"--from {path}: neither an ssb export (a folder from `ssb export`, its dataset/ "
        "folder or a .parquet file) nor reference files (*teacher*.jsonl + *student*.jsonl); "
        "give --format"
    )


def _dataset_dir(path: Path) -> Path:
    return path / DATASET_DIR if (path / DATASET_DIR).is_dir() else path


def _parquet_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("data/*.parquet")) or sorted(directory.glob("*.parquet"))


def read_ssb(path: Path) -> tuple[list[SourcePair], dict[str, Any], list[Path]]:
    """Rows of an ssb export (folder or parquet file) and its ssb_export.json ({} if absent)."""
    # pyarrow (a dependency of datasets) reads the files where they are; datasets'
    # load_dataset would first copy them into its cache.

    if path.is_file():
        files = [path]
        home = path.parent.parent if path.parent.name == "data" else path.parent
    else:
        home = _dataset_dir(path)
        files = _parquet_files(home)
        if not files:
            raise ShareError(f"{path}: no parquet files (looked in data/ and the folder itself)")
    meta: dict[str, Any] = {}
    meta_path = home / EXPORT_META_NAME
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise ShareError(f"{meta_path}: not valid JSON ({exc.msg})") from None
        if meta.get("format") != EXPORT_FORMAT or meta.get("version", 0) > EXPORT_FORMAT_VERSION:
            raise ShareError(
                f"{meta_path}: format {meta.get('format')!r} version {meta.get('version')!r}; "
                f"this ssb reads {EXPORT_FORMAT!r} up to version {EXPORT_FORMAT_VERSION}"
            )
    rows = []
    for file in files:
        try:
            table = pq.read_table(file)
        except Exception as exc:  # noqa: BLE001 - pyarrow's errors: not parquet, truncated...
            raise ShareError(f"{file}: cannot be read as parquet ({exc})") from None
        missing = [c for c in PAIR_FIELDS if c not in table.column_names]
        if missing:
            raise ShareError(f"{file}: no column {missing[0]!r} (an ssb export has {PAIR_FIELDS})")
        for i, raw in enumerate(table.select(list(PAIR_FIELDS)).to_pylist(), start=1):
            rows.append(_ssb_row(raw, f"{file} row {i}"))
    return rows, meta, files


def _ssb_row(raw: dict[str, Any], where: str) -> SourcePair:
    for name in PAIR_FIELDS:
        if raw[name] is None and name not in OPTIONAL_PAIR_FIELDS:
            raise ShareError(f"{where}: field {name!r} is empty")
    for name in ("id", "question", "gold", "reply"):
        _need_text(raw[name], where, name)
    messages = _messages(raw["teacher_messages"], where, "teacher_messages", reply=False)
    student = _messages(raw["student_messages"], where, "student_messages", reply=False)
    ids = raw["reply_ids"]
    if not all(isinstance(t, int) and t >= 0 for t in ids):
        raise ShareError(f"{where}: field 'reply_ids' must be non-negative token ids")
    return SourcePair(
        where=where,
        id=raw["id"],
        question=raw["question"],
        gold=raw["gold"],
        source=raw["source"] or "",
        teacher_messages=messages,
        reply=raw["reply"],
        reply_ids=ids,
        extras={name: raw[name] for name in OPTIONAL_PAIR_FIELDS},
        student_system=_system_text(student),
    )


def reference_files(path: Path, student_file: Path | None) -> tuple[Path, Path]:
    if path.is_dir():
        teachers = sorted(path.glob("*teacher*.jsonl"))
        students = sorted(path.glob("*student*.jsonl"))
        if len(teachers) != 1 or (student_file is None and len(students) != 1):
            raise ShareError(
                f"{path}: expected one *teacher*.jsonl and one *student*.jsonl, found "
                f"{[t.name for t in teachers]} and {[s.name for s in students]}"
            )
        teacher = teachers[0]
        student = student_file or students[0]
    else:
        teacher = path
        student = student_file or path.with_name(path.name.replace("teacher", "student"))
        if student == teacher:
            raise ShareError(f"{path}: give the student file with --student-file")
    if not student.is_file():
        raise ShareError(f"student file {student} does not exist (give it with --student-file)")
    return teacher, student


def read_reference(path: Path, student_file: Path | None) -> tuple[list[SourcePair], list[Path]]:
    """Pairs from the reference's aligned teacher and student JSON Lines files."""

    teacher_file, student_file = reference_files(path, student_file)
    teachers = _jsonl_messages(teacher_file)
    students = _jsonl_messages(student_file)
    if len(teachers) != len(students):
        raise ShareError(
            f"{teacher_file} has {len(teachers)} records but {student_file} has "
            f"{len(students)}: the files must be aligned line by line"
        )
    rows = []
    for (t_line, t_msgs), (s_line, s_msgs) in zip(teachers, students):
        t_where, s_where = f"{teacher_file} line {t_line}", f"{student_file} line {s_line}"
        t_msgs = _messages(t_msgs, t_where, "messages", reply=True)
        s_msgs = _messages(s_msgs, s_where, "messages", reply=False)
        reply = t_msgs[-1]["content"]
        question = s_msgs[-1]["content"]
        hinted = t_msgs[-2]["content"]
        if question.strip() not in hinted:
            raise ShareError(
                f"{s_where}: the question is not in the hinted prompt of {t_where}: the files "
                "are not aligned"
            )
        gold = extract_boxed(reply)
        if not gold:
            raise ShareError(
                f"{t_where}: field messages[-1].content (the reply) has no \\boxed{{}} answer; "
                "the reference keeps only replies whose boxed answer is the gold answer"
            )
        digest = hashlib.sha256(f"{question}\x1f{reply}".encode()).hexdigest()[:16]
        rows.append(
            SourcePair(
                where=t_where,
                id=f"ref-{digest}",
                question=question,
                gold=gold,
                source="reference",
                teacher_messages=t_msgs[:-1],
                reply=reply,
                extras={"teacher_answer": gold},
                student_system=_system_text(s_msgs),
            )
        )
    return rows, [teacher_file, student_file]


def _jsonl_messages(path: Path) -> list[tuple[int, Any]]:
    """(line number, the "messages" value) for each non-blank line."""
    out = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ShareError(f"{path} line {lineno}: not valid JSON ({exc})") from None
            if not isinstance(record, dict) or "messages" not in record:
                raise ShareError(f"{path} line {lineno}: no field 'messages'")
            out.append((lineno, record["messages"]))
    return out


def _system_text(messages: list[dict[str, str]]) -> str | None:
    return messages[0]["content"] if messages[0]["role"] == "system" else None


def _need_text(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ShareError(f"{where}: field {name!r} must be a non-empty string")
    return value


def _messages(value: Any, where: str, name: str, *, reply: bool) -> list[dict[str, str]]:
    """Check [system (optional), user] (+ assistant when `reply`); returns plain dicts."""
    expected = ["user", "assistant"] if reply else ["user"]
    shape = "[system (optional), user" + (", assistant]" if reply else "]")
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise ShareError(f"{where}: field {name!r} must be a list of messages {shape}")
    roles = [m.get("role") for m in value]
    if roles not in (expected, ["system", *expected]):
        raise ShareError(f"{where}: field {name!r} has roles {roles}; expected {shape}")
    for i, m in enumerate(value):
        _need_text(m.get("content"), where, f"{name}[{i}].content")
    return [{"role": m["role"], "content": m["content"]} for m in value]
