"""TargetWriter: buffer teacher targets and write them as atomic safetensors shards plus
`index.json` (the layout is described in `ssb.distill.store.format`)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import Tensor

from ssb.distill.store.format import (
    ALLOWED_DTYPES,
    DEFAULT_DTYPES,
    FORMAT_VERSION,
    INDEX_NAME,
    REPLY_KEY,
    SHARD_RE,
    TargetStoreError,
    dtype_from_name,
    dtype_name,
    example_checksum,
    file_sha256,
    json_normal,
    read_index,
)
from ssb.distill.store.reader import TargetReader
from ssb.rundir import atomic_write_bytes


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
        self.meta: dict[str, Any] = json_normal(dict(meta), "meta")
        self.dtypes = dict(DEFAULT_DTYPES[mode])
        for key, dtype in (dtypes or {}).items():
            if key not in self.dtypes:
                raise TargetStoreError(f"mode {mode!r} has no tensor {key!r}")
            if dtype not in ALLOWED_DTYPES:
                raise TargetStoreError(f"unsupported storage dtype {dtype} for {key!r}")
            self.dtypes[key] = dtype
        self._buffer: list[tuple[str, Tensor, dict[str, Tensor], str]] = []
        self._buffer_ids: set[str] = set()
        self._buffer_bytes = 0

        self.directory.mkdir(parents=True, exist_ok=True)
        if (self.directory / INDEX_NAME).exists():
            self._index = read_index(self.directory)
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
        numbers = [int(SHARD_RE.match(name).group(1)) for name in self._index["shards"]]
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
        checksum = example_checksum(reply32, stored)
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
        shard[REPLY_KEY] = torch.cat(replies).contiguous()
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
                and file_sha256(path) == info["sha256"]
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
            if key in self.dtypes and dtype_from_name(spec["dtype"]) != self.dtypes[key]:
                raise TargetStoreError(
                    f"{where} stores {key!r} as {spec['dtype']}, "
                    f"cannot resume with {dtype_name(self.dtypes[key])}"
                )

    def _remove_strays(self) -> None:
        known = set(self._index["shards"])
        for path in self.directory.iterdir():
            stray_shard = SHARD_RE.match(path.name) and path.name not in known
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
            spec = {"dtype": dtype_name(t.dtype), "shape": list(t.shape[1:])}
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
            specs.setdefault(key, {"dtype": dtype_name(t.dtype), "shape": list(t.shape[1:])})
