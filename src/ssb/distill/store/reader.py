"""TargetReader: memory-mapped, checksum-verified reads of a target directory (the layout is
described in `ssb.distill.store.format`)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import Tensor

from ssb.distill.store.format import (
    REBUILD_HINT,
    REPLY_KEY,
    TargetStoreError,
    example_checksum,
    file_sha256,
    json_normal,
    read_index,
    values_match,
)


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
        self._index = read_index(self.directory)
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
        for key, value in json_normal(dict(expected), "expected meta").items():
            if key == "mode":
                stored: Any = self.mode
            elif key not in self._index["meta"]:
                problems.append(f"{key}: not recorded in the store, expected {value!r}")
                continue
            else:
                stored = self._index["meta"][key]
            if not values_match(stored, value):
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
            reply = handle.get_slice(REPLY_KEY)[start:stop]
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
        if example_checksum(reply, tensors) != entry["checksum"]:
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
                f"shard {shard} (needed by example {example_id!r}) is missing{REBUILD_HINT}"
            )
        if shard not in self._verified:
            size = path.stat().st_size
            if size != info["bytes"]:
                raise TargetStoreError(
                    f"shard {shard} (example {example_id!r}) is corrupt: "
                    f"{size} bytes, index says {info['bytes']}{REBUILD_HINT}"
                )
            if file_sha256(path) != info["sha256"]:
                raise TargetStoreError(
                    f"shard {shard} (example {example_id!r}) is corrupt: sha256 mismatch{REBUILD_HINT}"
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
