"""The teacher target store: safetensors shards plus a JSON index (DESIGN section 3).

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
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import Tensor

from ssb.rundir import atomic_write_bytes
from ssb.target_modes import STORED_MODES, TARGET_MODES

__all__ = [
    "DEFAULT_DTYPES",
    "FORMAT_VERSION",
    "INDEX_NAME",
    "TargetReader",
    "TargetStoreError",
    "TargetWriter",
]

FORMAT_VERSION = 1
INDEX_NAME = "index.json"
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.safetensors$")
_REPLY_KEY = "reply_ids"  # tensor name of the reply ids inside a shard

DEFAULT_DTYPES: dict[str, dict[str, torch.dtype]] = {
    mode: {name: getattr(torch, dtype) for name, dtype in TARGET_MODES[mode].tensors.items()}
    for mode in STORED_MODES
}
_ALLOWED_DTYPES = {
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int32,
    torch.int64,
}


class TargetStoreError(RuntimeError):
    """The target store is missing, corrupt, or does not match what the caller expects."""


# --------------------------------------------------------------------------- small helpers


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or dtype not in _ALLOWED_DTYPES:
        raise TargetStoreError(f"unsupported tensor dtype {name!r} in target index")
    return dtype


def _json_normal(value: Any, what: str) -> Any:
    """Round-trip through JSON so tuples/lists and ints/floats compare as stored."""
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise TargetStoreError(f"{what} must be JSON-serialisable: {exc}") from exc


def _tensor_bytes(t: Tensor) -> memoryview:
    # Reinterpret as bytes (works for bf16, which numpy cannot represent).
    flat = t.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _checksum(reply_ids: Tensor, tensors: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256()
    h.update(_tensor_bytes(reply_ids))
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(_tensor_bytes(tensors[key]))
    return h.hexdigest()


_REBUILD = " (run `ssb targets` again to rebuild just that shard)"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _values_match(a: Any, b: Any) -> bool:
    numeric = (int, float)
    if (
        isinstance(a, numeric)
        and isinstance(b, numeric)
        and not isinstance(a, bool)
        and not isinstance(b, bool)
    ):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _read_index(directory: Path) -> dict[str, Any]:
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


# --------------------------------------------------------------------------- writer


class TargetWriter:
    """Buffer examples' teacher targets and write them as atomic safetensors shards.

    Args:
        directory: the target directory (created if missing). If it already holds an index, the
            writer resumes: ``mode``, ``meta`` and dtypes must equal the stored ones, and
            :meth:`done_ids` names the examples already stored. Shard files the index does not
            name (a crash between writing a shard and the index) and temporary files are deleted.
        mode: ``topk`` | ``dense`` | ``hidden``.
        meta: JSON-serialisable facts the targets depend on, e.g. ``tau``, ``topk``,
            ``vocab_size``, ``hidden_size``, model id/revision/hash, prompt hash. Checked for
            equality on resume, so put nothing volatile (timestamps) in it. ``topk``,
            ``vocab_size`` and ``hidden_size``, when present, are also checked against each added
            example's shapes.
        shard_size: examples per shard; :meth:`add` flushes when the buffer holds this many.
        dtypes: per-tensor storage dtype overrides (defaults: :data:`DEFAULT_DTYPES`).
        max_shard_bytes: also flush once the buffered tensors reach this many bytes (dense
            full-vocabulary targets would otherwise make huge shards).

    One writer per directory at a time (there is no lock); several processes should write to
    separate directories.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        mode: str,
        meta: Mapping[str, Any],
        shard_size: int = 256,
        *,
        dtypes: Mapping[str, torch.dtype] | None = None,
        max_shard_bytes: int = 1 << 30,
    ) -> None:
        if mode not in DEFAULT_DTYPES:
            raise TargetStoreError(
                f"unknown target mode {mode!r}; expected one of {', '.join(DEFAULT_DTYPES)}"
            )
        if shard_size <= 0:
            raise TargetStoreError(f"shard_size must be > 0, got {shard_size}")
        self.directory = Path(directory)
        self.mode = mode
        self.shard_size = shard_size
        self.max_shard_bytes = max_shard_bytes
        self.meta: dict[str, Any] = _json_normal(dict(meta), "meta")
        self.dtypes = dict(DEFAULT_DTYPES[mode])
        for key, dtype in (dtypes or {}).items():
            if key not in self.dtypes:
                raise TargetStoreError(f"mode {mode!r} has no tensor {key!r}")
            if dtype not in _ALLOWED_DTYPES:
                raise TargetStoreError(f"unsupported storage dtype {dtype} for {key!r}")
            self.dtypes[key] = dtype
        self._buffer: list[tuple[str, Tensor, dict[str, Tensor], str]] = []
        self._buffer_ids: set[str] = set()
        self._buffer_bytes = 0

        self.directory.mkdir(parents=True, exist_ok=True)
        if (self.directory / INDEX_NAME).exists():
            self._index = _read_index(self.directory)
            self._check_resume()
        else:
            self._index = {
                "format_version": FORMAT_VERSION,
                "mode": mode,
                "meta": self.meta,
                "tensors": {},  # filled from the first example: dtype and per-row shape
                "shards": {},
                "examples": {},
            }
            self._write_index()
        self._remove_strays()
        numbers = [int(_SHARD_RE.match(name).group(1)) for name in self._index["shards"]]
        self._next_shard = max(numbers, default=-1) + 1

    # ----------------------------------------------------------------- public

    def done_ids(self) -> set[str]:
        """Ids of the examples already in the index (flushed); buffered ones are not included."""
        return set(self._index["examples"])

    def __contains__(self, example_id: object) -> bool:
        return example_id in self._index["examples"] or example_id in self._buffer_ids

    def __len__(self) -> int:
        """Stored plus buffered examples."""
        return len(self._index["examples"]) + len(self._buffer)

    def add(
        self, example_id: str, reply_ids: Iterable[int] | Tensor, tensors: Mapping[str, Tensor]
    ) -> None:
        """Buffer one example.

        Args:
            example_id: unique id (refused if already stored or buffered).
            reply_ids: the L reply token ids.
            tensors: exactly the mode's tensors, each with first dim L (row i = the teacher's
                distribution for predicting reply token i): ``topk``: ``ids`` ``(L, k)`` int,
                ``logp`` ``(L, k)`` log-probs at tau, ``tail`` ``(L,)``; ``dense``: ``logp``
                ``(L, V)``; ``hidden``: ``hidden`` ``(L, H)``. Converted to the storage dtypes.
        """
        if not isinstance(example_id, str) or not example_id:
            raise TargetStoreError(f"example id must be a non-empty string, got {example_id!r}")
        if example_id in self:
            raise TargetStoreError(f"example {example_id!r} is already in {self.directory}")
        reply = torch.as_tensor(
            reply_ids.tolist() if isinstance(reply_ids, Tensor) else list(reply_ids),
            dtype=torch.int64,
        )
        length = reply.numel()
        if reply.dim() != 1 or length == 0:
            raise TargetStoreError(f"example {example_id!r}: reply_ids must be a non-empty list")
        if reply.min() < 0 or reply.max() > torch.iinfo(torch.int32).max:
            raise TargetStoreError(f"example {example_id!r}: reply id out of range")
        expected = set(self.dtypes)
        if set(tensors) != expected:
            raise TargetStoreError(
                f"example {example_id!r}: mode {self.mode!r} stores tensors {sorted(expected)}, "
                f"got {sorted(tensors)}"
            )
        stored: dict[str, Tensor] = {}
        for key in sorted(tensors):
            stored[key] = self._convert(example_id, key, tensors[key], length)
        self._check_shapes(example_id, stored)
        reply32 = reply.to(torch.int32)
        checksum = _checksum(reply32, stored)
        self._buffer.append((example_id, reply32, stored, checksum))
        self._buffer_ids.add(example_id)
        self._buffer_bytes += sum(t.numel() * t.element_size() for t in stored.values())
        if len(self._buffer) >= self.shard_size or self._buffer_bytes >= self.max_shard_bytes:
            self.flush()

    def flush(self) -> str | None:
        """Write the buffered examples as one shard, then the index; returns the shard name."""
        if not self._buffer:
            return None
        name = f"shard-{self._next_shard:05d}.safetensors"
        columns: dict[str, list[Tensor]] = {key: [] for key in self.dtypes}
        replies: list[Tensor] = []
        entries: dict[str, dict[str, Any]] = {}
        offset = 0
        for example_id, reply, stored, checksum in self._buffer:
            replies.append(reply)
            for key, t in stored.items():
                columns[key].append(t)
            entries[example_id] = {
                "shard": name,
                "offset": offset,
                "length": reply.numel(),
                "checksum": checksum,
            }
            offset += reply.numel()
        shard = {key: torch.cat(parts).contiguous() for key, parts in columns.items()}
        shard[_REPLY_KEY] = torch.cat(replies).contiguous()
        data = st_save(shard, metadata={"format": "pt", "ssb_mode": self.mode})

        atomic_write_bytes(self.directory / name, data)
        before = json.dumps(self._index)
        self._index["shards"][name] = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            "rows": offset,
            "examples": len(entries),
        }
        self._index["examples"].update(entries)
        try:
            self._write_index()
        except BaseException:
            # Keep memory in line with disk: the shard is now a stray the next writer removes.
            self._index = json.loads(before)
            raise
        self._buffer.clear()
        self._buffer_ids.clear()
        self._buffer_bytes = 0
        self._next_shard += 1
        return name

    def drop_damaged_shards(self) -> dict[str, int]:
        """Forget shards that are missing, truncated or fail their sha256, with their examples,
        so a resumed `ssb targets` rescores exactly those examples. Returns {shard: examples}."""
        dropped: dict[str, int] = {}
        for name, info in list(self._index["shards"].items()):
            path = self.directory / name
            intact = (
                path.exists()
                and path.stat().st_size == int(info["bytes"])
                and _file_sha256(path) == info["sha256"]
            )
            if intact:
                continue
            lost = [i for i, e in self._index["examples"].items() if e["shard"] == name]
            for example_id in lost:
                del self._index["examples"][example_id]
            del self._index["shards"][name]
            path.unlink(missing_ok=True)
            dropped[name] = len(lost)
        if dropped:
            self._write_index()
        return dropped

    def absorb(self, directory: str | os.PathLike[str]) -> tuple[int, int]:
        """Copy every intact example of the store in `directory` that this one lacks (bit for
        bit: same storage dtypes). A store with another mode or meta is refused; an example
        that fails its checksum is skipped (it will be rescored). Returns (copied, skipped)."""
        source = TargetReader(directory)
        try:
            if source.mode != self.mode:
                raise TargetStoreError(
                    f"{directory}: mode {source.mode!r}, but {self.directory} stores {self.mode!r}"
                )
            source.check_meta(self.meta)
            copied = skipped = 0
            for example_id in source.ids():
                if example_id in self:
                    continue
                try:
                    reply, tensors = source.get(example_id)
                except TargetStoreError:
                    skipped += 1
                    continue
                self.add(example_id, reply, tensors)
                copied += 1
        finally:
            source.close()
        return copied, skipped

    def close(self) -> None:
        """Flush what is buffered (every buffered example is complete, so this is safe)."""
        self.flush()

    def __enter__(self) -> TargetWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- internals

    def _write_index(self) -> None:
        data = json.dumps(self._index, indent=1, sort_keys=False).encode()
        atomic_write_bytes(self.directory / INDEX_NAME, data)

    def _check_resume(self) -> None:
        index = self._index
        where = self.directory / INDEX_NAME
        if index["mode"] != self.mode:
            raise TargetStoreError(
                f"{where} holds {index['mode']!r} targets, cannot resume as {self.mode!r}"
            )
        if index["meta"] != self.meta:
            keys = sorted(set(index["meta"]) | set(self.meta))
            diff = [
                f"{k}: stored {index['meta'].get(k)!r}, given {self.meta.get(k)!r}"
                for k in keys
                if index["meta"].get(k) != self.meta.get(k)
            ]
            raise TargetStoreError(
                f"{where} was written with different meta ({'; '.join(diff)}); "
                "use a fresh directory or the same settings"
            )
        for key, spec in index["tensors"].items():
            if key in self.dtypes and _dtype_from_name(spec["dtype"]) != self.dtypes[key]:
                raise TargetStoreError(
                    f"{where} stores {key!r} as {spec['dtype']}, "
                    f"cannot resume with {_dtype_name(self.dtypes[key])}"
                )

    def _remove_strays(self) -> None:
        known = set(self._index["shards"])
        for path in self.directory.iterdir():
            stray_shard = _SHARD_RE.match(path.name) and path.name not in known
            if stray_shard or path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)

    def _convert(self, example_id: str, key: str, t: Tensor, length: int) -> Tensor:
        if not isinstance(t, Tensor):
            raise TargetStoreError(f"example {example_id!r}: {key!r} is not a tensor")
        if t.dim() == 0 or t.shape[0] != length:
            raise TargetStoreError(
                f"example {example_id!r}: {key!r} has shape {tuple(t.shape)}, "
                f"expected first dim {length} (one row per reply token)"
            )
        dtype = self.dtypes[key]
        t = t.detach().to("cpu")
        if dtype.is_floating_point:
            if not t.is_floating_point():
                raise TargetStoreError(f"example {example_id!r}: {key!r} must be floating point")
            if torch.isnan(t).any() or torch.isposinf(t).any():
                raise TargetStoreError(f"example {example_id!r}: {key!r} contains NaN or +inf")
            if dtype == torch.float16:
                # Saturate finite values at float16's range instead of overflowing to -inf (a
                # stored -inf would mean "exactly zero mass").
                lo = torch.finfo(torch.float16).min
                t = t.float()
                t = torch.where(torch.isneginf(t), t, t.clamp(min=lo, max=-lo))
        else:
            if t.is_floating_point() or t.is_complex():
                raise TargetStoreError(f"example {example_id!r}: {key!r} must be integer ids")
            if t.numel() and (t.min() < 0 or t.max() > torch.iinfo(dtype).max):
                raise TargetStoreError(f"example {example_id!r}: {key!r} id out of range")
        return t.to(dtype).contiguous()

    def _check_shapes(self, example_id: str, stored: Mapping[str, Tensor]) -> None:
        specs = self._index["tensors"]
        for key, t in stored.items():
            spec = {"dtype": _dtype_name(t.dtype), "shape": list(t.shape[1:])}
            if key in specs and specs[key] != spec:
                raise TargetStoreError(
                    f"example {example_id!r}: {key!r} rows are {spec}, the store holds {specs[key]}"
                )
        meta = self.meta
        if self.mode == "topk":
            ids, logp, tail = stored["ids"], stored["logp"], stored["tail"]
            if ids.dim() != 2 or logp.shape != ids.shape or tail.dim() != 1:
                raise TargetStoreError(
                    f"example {example_id!r}: topk wants ids/logp (L, k) and tail (L,), got "
                    f"{tuple(ids.shape)}, {tuple(logp.shape)}, {tuple(tail.shape)}"
                )
            if "topk" in meta and ids.shape[1] != meta["topk"]:
                raise TargetStoreError(
                    f"example {example_id!r}: k={ids.shape[1]} but meta topk={meta['topk']}"
                )
            if "vocab_size" in meta and ids.numel() and int(ids.max()) >= meta["vocab_size"]:
                raise TargetStoreError(
                    f"example {example_id!r}: id {int(ids.max())} >= vocab_size {meta['vocab_size']}"
                )
        elif self.mode == "dense":
            logp = stored["logp"]
            if logp.dim() != 2 or ("vocab_size" in meta and logp.shape[1] != meta["vocab_size"]):
                raise TargetStoreError(
                    f"example {example_id!r}: dense logp has shape {tuple(logp.shape)}, "
                    f"expected (L, vocab_size={meta.get('vocab_size')})"
                )
        else:
            hidden = stored["hidden"]
            if hidden.dim() != 2 or (
                "hidden_size" in meta and hidden.shape[1] != meta["hidden_size"]
            ):
                raise TargetStoreError(
                    f"example {example_id!r}: hidden has shape {tuple(hidden.shape)}, "
                    f"expected (L, hidden_size={meta.get('hidden_size')})"
                )
        for key, t in stored.items():
            specs.setdefault(key, {"dtype": _dtype_name(t.dtype), "shape": list(t.shape[1:])})


# --------------------------------------------------------------------------- reader


class TargetReader:
    """Read a target directory written by :class:`TargetWriter`.

    Shards are memory-mapped (``safetensors.safe_open``) and only the requested rows are read.
    Each shard's size and sha256 are verified the first time it is opened, and each example's
    checksum on every :meth:`get`; any failure raises :class:`TargetStoreError` naming the shard
    and the example. Shard files the index does not name are ignored.

    Picklable (for DataLoader workers): open handles are dropped and reopened lazily; shards
    already verified are not hashed again.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._index = _read_index(self.directory)
        self._handles: dict[str, Any] = {}
        self._verified: set[str] = set()
        self._order = list(self._index["examples"])

    # ----------------------------------------------------------------- metadata

    @property
    def mode(self) -> str:
        return self._index["mode"]

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self._index["meta"])

    @property
    def tensor_specs(self) -> dict[str, dict[str, Any]]:
        """Per tensor: storage ``dtype`` name and per-row ``shape``."""
        return json.loads(json.dumps(self._index["tensors"]))

    def ids(self) -> list[str]:
        """Example ids in the order they were written."""
        return list(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, example_id: object) -> bool:
        return example_id in self._index["examples"]

    def length(self, example_id: str) -> int:
        """Reply length of one example, from the index (no shard access)."""
        return int(self._entry(example_id)["length"])

    def num_tokens(self) -> int:
        return sum(int(e["length"]) for e in self._index["examples"].values())

    def bytes_per_token(self) -> float:
        """Total shard bytes / total stored reply tokens (includes ids and headers)."""
        tokens = self.num_tokens()
        total = sum(int(s["bytes"]) for s in self._index["shards"].values())
        return total / tokens if tokens else 0.0

    def check_meta(self, expected: Mapping[str, Any]) -> None:
        """Raise :class:`TargetStoreError` unless the store matches ``expected``.

        ``expected`` maps meta keys (and optionally ``mode``) to the values the caller needs, e.g.
        ``{"mode": "topk", "tau": 2.0, "vocab_size": 151936}``; numbers compare with a relative
        tolerance of 1e-9, other values by equality after a JSON round trip. Keys the caller does
        not name are not checked (hidden-state targets do not depend on tau, for instance).
        """
        problems = []
        for key, value in _json_normal(dict(expected), "expected meta").items():
            if key == "mode":
                stored: Any = self.mode
            elif key not in self._index["meta"]:
                problems.append(f"{key}: not recorded in the store, expected {value!r}")
                continue
            else:
                stored = self._index["meta"][key]
            if not _values_match(stored, value):
                problems.append(f"{key}: store has {stored!r}, expected {value!r}")
        if problems:
            raise TargetStoreError(
                f"target store {self.directory} does not match this run ({'; '.join(problems)}); "
                "re-score the targets or change the config"
            )

    # ----------------------------------------------------------------- data

    def get(self, example_id: str) -> tuple[list[int], dict[str, Tensor]]:
        """``(reply_ids, tensors)`` of one example, tensors in their storage dtypes.

        Shapes: first dim = reply length L; ``topk``: ``ids`` ``(L, k)`` int32, ``logp``
        ``(L, k)`` float16, ``tail`` ``(L,)`` float32; ``dense``: ``logp`` ``(L, V)``;
        ``hidden``: ``hidden`` ``(L, H)`` (see :data:`DEFAULT_DTYPES` and ``tensor_specs``).
        """
        entry = self._entry(example_id)
        shard = entry["shard"]
        handle = self._open(shard, example_id)
        start, stop = int(entry["offset"]), int(entry["offset"]) + int(entry["length"])
        try:
            reply = handle.get_slice(_REPLY_KEY)[start:stop]
            tensors = {key: handle.get_slice(key)[start:stop] for key in self._index["tensors"]}
        except Exception as exc:  # safetensors raises its own error types
            raise TargetStoreError(
                f"shard {shard} (example {example_id!r}) cannot be read: {exc}"
            ) from exc
        if reply.numel() != stop - start or any(
            t.shape[0] != stop - start for t in tensors.values()
        ):
            raise TargetStoreError(
                f"shard {shard} has fewer rows than the index says for example {example_id!r}"
            )
        if _checksum(reply, tensors) != entry["checksum"]:
            raise TargetStoreError(f"checksum mismatch for example {example_id!r} in shard {shard}")
        return reply.tolist(), tensors

    def verify(self) -> None:
        """Check every shard's sha256 and every example's checksum (raises on the first error)."""
        for example_id in self._order:
            self.get(example_id)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> TargetReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    # ----------------------------------------------------------------- internals

    def _entry(self, example_id: str) -> dict[str, Any]:
        try:
            return self._index["examples"][example_id]
        except KeyError:
            raise KeyError(f"example {example_id!r} is not in {self.directory}") from None

    def _open(self, shard: str, example_id: str) -> Any:
        if shard in self._handles:
            return self._handles[shard]
        info = self._index["shards"].get(shard)
        if info is None:
            raise TargetStoreError(
                f"index names shard {shard} for example {example_id!r} but lists no such shard"
            )
        path = self.directory / shard
        if not path.is_file():
            raise TargetStoreError(
                f"shard {shard} (needed by example {example_id!r}) is missing{_REBUILD}"
            )
        if shard not in self._verified:
            size = path.stat().st_size
            if size != info["bytes"]:
                raise TargetStoreError(
                    f"shard {shard} (example {example_id!r}) is corrupt: "
                    f"{size} bytes, index says {info['bytes']}{_REBUILD}"
                )
            if _file_sha256(path) != info["sha256"]:
                raise TargetStoreError(
                    f"shard {shard} (example {example_id!r}) is corrupt: sha256 mismatch{_REBUILD}"
                )
            self._verified.add(shard)
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:
            raise TargetStoreError(
                f"shard {shard} (example {example_id!r}) is corrupt: {exc}"
            ) from exc
        self._handles[shard] = handle
        return handle
