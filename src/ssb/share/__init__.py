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

from ssb import records

# The exported parquet has exactly the fields of a pairs.jsonl record (`ssb.records.PairRecord`)
# as columns, and import-pairs writes exactly these fields.
PAIR_FIELDS = records.PAIR_FIELDS
OPTIONAL_PAIR_FIELDS = records.OPTIONAL_PAIR_FIELDS

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
    from datasets import Features, List, Value  # noqa: PLC0415 -- start-up: the CLI imports ssb.share; datasets loads pyarrow

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
