"""The target store's on-disk format and the helpers its writer and reader share (DESIGN section 3).

Layout of a target directory::

    targets/
      index.json               the only source of truth for what is stored
      shard-00000.safetensors  rows of many examples, concatenated
      shard-00001.safetensors
      ...

A shard holds, for each tensor name of the mode, one tensor whose first dimension is the total
number of reply tokens of its examples (``rows``), plus ``reply_ids`` ``(rows,)`` int32; example
``e`` occupies rows ``offset : offset + length``. Keeping the reply ids in the shard rather than
in ``index.json`` keeps the index O(examples) (it is rewritten at every flush) and puts the ids
under the shard's sha256.

``index.json``::

    {"format_version": 1, "mode": "topk",
     "meta": {... whatever the writer was given: tau, topk, vocab_size, model identity ...},
     "tensors": {"ids": {"dtype": "int32", "shape": [64]}, ...},   # per-row shape
     "shards": {"shard-00000.safetensors": {"sha256": ..., "bytes": ..., "rows": ...,
                                            "examples": ...}},
     "examples": {"<id>": {"shard": ..., "offset": ..., "length": ..., "checksum": ...}}}

``checksum`` is the sha256 of the example's reply ids (int32 little-endian bytes) followed by,
for each tensor name in sorted order, the name and the tensor's bytes.

Crash safety: a shard is written to a temporary file, fsynced and renamed into place, and only
then is ``index.json`` replaced the same way. A crash between the two leaves a shard that the
index does not name; readers ignore it and the next writer deletes it. Re-running a stage
therefore loses at most the examples that were buffered but not flushed.

Stored dtypes (bytes per reply token, excluding the 4-byte reply id):

* ``topk``: ``ids`` int32 (vocabularies exceed 65,535: Qwen 151,936, Gemma 3 262,144),
  ``logp`` float16, ``tail`` float32 -> ``6k + 4`` bytes (k=64: 388 B). float16 rather than
  bf16 for log-probs: they lie in [-65504, 0] where float16 has 3 more mantissa bits (relative
  error 2^-11 vs 2^-8): at log p = -5 the stored value is within 0.0025 (prob. within 0.25 %),
  bf16 would be within 0.02 (2 %). The tail stays float32: it is one number per token and it is
  the bucket whose mass is hardest to recover.
* ``dense``: ``logp`` float32, ``4V`` bytes (exact; tests, small vocabularies, reference runs).
* ``hidden``: ``hidden`` bf16, ``2H`` bytes (bf16 is the model's own activation dtype for bf16
  models, so the teacher logits are recomputed exactly; pass ``dtypes={"hidden":
  torch.float32}`` for a float32 model where bit-exactness matters more than bytes).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ssb.target_modes import STORED_MODES, TARGET_MODES

FORMAT_VERSION = 1
INDEX_NAME = "index.json"
SHARD_RE = re.compile(r"^shard-(\d{5,})\.safetensors$")
REPLY_KEY = "reply_ids"  # tensor name of the reply ids inside a shard

DEFAULT_DTYPES: dict[str, dict[str, torch.dtype]] = {
    mode: {name: getattr(torch, dtype) for name, dtype in TARGET_MODES[mode].tensors.items()}
    for mode in STORED_MODES
}
ALLOWED_DTYPES = {
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int32,
    torch.int64,
}


class TargetStoreError(RuntimeError):
    """The target store is missing, corrupt, or does not match what the caller expects."""


# --------------------------------------------------------------------------- small helpers


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or dtype not in ALLOWED_DTYPES:
        raise TargetStoreError(f"unsupported tensor dtype {name!r} in target index")
    return dtype


def json_normal(value: Any, what: str) -> Any:
    """Round-trip through JSON so tuples/lists and ints/floats compare as stored."""
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise TargetStoreError(f"{what} must be JSON-serialisable: {exc}") from exc


def tensor_bytes(t: Tensor) -> memoryview:
    # Reinterpret as bytes (works for bf16, which numpy cannot represent).
    flat = t.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def example_checksum(reply_ids: Tensor, tensors: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256()
    h.update(tensor_bytes(reply_ids))
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensor_bytes(tensors[key]))
    return h.hexdigest()


REBUILD_HINT = " (run `ssb targets` again to rebuild just that shard)"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def values_match(a: Any, b: Any) -> bool:
    numeric = (int, float)
    if (
        isinstance(a, numeric)
        and isinstance(b, numeric)
        and not isinstance(a, bool)
        and not isinstance(b, bool)
    ):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def read_index(directory: Path) -> dict[str, Any]:
    path = directory / INDEX_NAME
    if not path.is_file():
        raise TargetStoreError(f"no target store at {directory} ({INDEX_NAME} not found)")
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TargetStoreError(f"cannot read {path}: {exc}") from exc
    if not isinstance(index, dict) or index.get("format_version") != FORMAT_VERSION:
        raise TargetStoreError(
            f"{path}: format_version {index.get('format_version') if isinstance(index, dict) else None!r}"
            f" is not supported (expected {FORMAT_VERSION})"
        )
    for key in ("mode", "meta", "tensors", "shards", "examples"):
        if key not in index:
            raise TargetStoreError(f"{path}: missing key {key!r}")
    if index["mode"] not in DEFAULT_DTYPES:
        raise TargetStoreError(f"{path}: unknown mode {index['mode']!r}")
    return index
