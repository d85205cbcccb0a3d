"""The teacher target store: safetensors shards plus a JSON index (DESIGN section 3).

`format` describes the layout on disk and holds what the two sides share; `TargetWriter` appends
examples crash-safely; `TargetReader` reads them back, verifying every shard and example.
"""

from ssb.distill.store.format import DEFAULT_DTYPES, FORMAT_VERSION, INDEX_NAME, TargetStoreError
from ssb.distill.store.reader import TargetReader
from ssb.distill.store.writer import TargetWriter

__all__ = [
    "DEFAULT_DTYPES",
    "FORMAT_VERSION",
    "INDEX_NAME",
    "TargetReader",
    "TargetStoreError",
    "TargetWriter",
]
