"""Sharing a run: `ssb export` (pairs as a dataset, the adapter, their cards, optionally pushed to
the Hugging Face Hub) and `ssb import-pairs` (start a run from published pairs).

Neither is a pipeline stage: export only reads a run directory; import-pairs writes the
`pairs.jsonl` that `ssb bootstrap` would have written, so `ssb targets` and `ssb train` continue
unchanged.

The exported dataset (`<out>/dataset/`)::

    README.md                              dataset card (YAML front matter + text)
    data/train-00000-of-00001.parquet      one row per pair, the columns of PAIR_FIELDS
    ssb_export.json                        what the token ids were made with (EXPORT_META_NAME)
"""

from __future__ import annotations

from typing import Any

# The fields of a pairs.jsonl record, in the order `ssb.stages.bootstrap` writes them; the
# exported parquet has exactly these columns and import-pairs writes exactly these fields.
PAIR_FIELDS: tuple[str, ...] = (
    "id",
    "question",
    "gold",
    "source",
    "student_messages",
    "teacher_messages",
    "student_prompt_ids",
    "teacher_prompt_ids",
    "reply",
    "reply_ids",
    "end_token_id",
    "teacher_answer",
    "correct_rollout",
    "correct_answer",
    "incorrect_rollout",
    "incorrect_answer",
)
# Fields that may be null: what a pair imported from the reference format does not know.
OPTIONAL_PAIR_FIELDS = frozenset(
    {"teacher_answer", "correct_rollout", "correct_answer", "incorrect_rollout", "incorrect_answer"}
)

# What `ssb import-pairs --format` reads (auto: told apart by the files).
FORMATS = ("auto", "ssb", "reference")

# The manifest's record of `ssb import-pairs` (not a pipeline stage, recorded like one), and
# its list of every import (where from, how many, the origin an ssb export names).
IMPORT_STAGE = "import-pairs"
IMPORTS_KEY = "imported_pairs"

EXPORT_FORMAT = "ssb-pairs"
EXPORT_FORMAT_VERSION = 1
EXPORT_META_NAME = "ssb_export.json"
DATASET_DIR = "dataset"
MODEL_DIR = "model"
PARQUET_NAME = "data/train-00000-of-00001.parquet"


class ShareError(ValueError):
    """An export or import cannot be done as asked; the message says what and where."""


def pair_features() -> Any:
    """The `datasets.Features` of an exported pair (explicit, so a column that is null in every
    row still gets its type, and ids are stored as int32)."""
    from datasets import Features, List, Value

    text = Value("string")
    ids = List(Value("int32"))
    messages = List({"role": text, "content": text})
    types = {
        "student_messages": messages,
        "teacher_messages": messages,
        "student_prompt_ids": ids,
        "teacher_prompt_ids": ids,
        "reply_ids": ids,
        "end_token_id": Value("int32"),
    }
    return Features({name: types.get(name, text) for name in PAIR_FIELDS})
