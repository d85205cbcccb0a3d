"""Data-parallel generation over the processes of a launch (`accelerate launch`, torchrun; one
node or many).

Under a launch (WORLD_SIZE > 1), rollout, bootstrap and eval split the problems over the ranks:
problem i goes to rank i mod world, so a problem stays with its rank across restarts. Each rank
generates with its own engine (vLLM on the GPUs its local rank is given, transformers on CPU)
and appends its records to a part file of its own, `parts/rank<k>/<file>`, crash-safe like the
run's file. Rank 0 then merges the parts into the run's file in problem order and deletes them.
Parts a killed launch left behind are merged first, so finished records are neither lost nor
redone. Samples are seeded by problem, so a problem's records do not depend on its rank (nor, on
vLLM, on its batch; transformers' batched numerics may move a low bit with other batch mates).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState

from ssb.hardware import local_processes
from ssb.rundir import RunDir, append_jsonl, atomic_write_text, read_jsonl

log = logging.getLogger("ssb")


@dataclass
class Ranks:
    """This process's place in the launch (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    state: Any = None  # accelerate's PartialState under a launch

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def mine(self, items: Sequence[Any]) -> list[Any]:
        """This rank's share of `items` (every world-th, from its rank)."""
        return list(items[self.rank :: self.world])

    def output(self, rundir: RunDir, final: Path) -> Path:
        """Where this rank appends the records meant for `final`."""
        return final if self.world == 1 else rundir.rank_part(final, self.rank)


def launched_ranks() -> Ranks:
    """The launch this process belongs to (WORLD_SIZE, set by accelerate launch and torchrun)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Ranks()

    # Without GPUs the ranks form a gloo (MULTI_CPU) group only when asked to.
    state = PartialState(cpu=not torch.cuda.is_available())
    return Ranks(state.process_index, state.num_processes, state)


def merge_parts(
    rundir: RunDir,
    final: Path,
    order: Sequence[str],
    limit: int | None = None,
    keep: Callable[[dict[str, Any]], bool] | None = None,
) -> int:
    """Add to `final` the records of every rank's part of it that `final` does not hold yet
    (by id), keeping `final` in `order` (problem ids) as one process writes it, then delete the
    parts; returns how many were added. `keep` filters the records, `limit` keeps only the first
    ones (in `order`). Safe to repeat after a crash: records already merged are skipped.

    Usually the new records all come after those `final` holds and are appended. After a killed
    launch they may not (a rank that died early left a gap that a later launch fills): then
    `final` is rewritten in order, atomically."""
    parts = rundir.rank_parts(final)
    if not parts:
        return 0
    existing = read_jsonl(final)
    held = {str(r["id"]) for r in existing}
    position = {str(pid): i for i, pid in enumerate(order)}

    def place(record: dict[str, Any]) -> int:
        return position.get(str(record["id"]), len(position))

    new: dict[str, dict[str, Any]] = {}
    for part in parts:
        for record in read_jsonl(part):
            key = str(record["id"])
            if key not in held and (keep is None or keep(record)):
                new.setdefault(key, record)
    records = sorted(new.values(), key=place)
    records = records if limit is None else records[:limit]
    last_held = max((place(r) for r in existing), default=-1)
    if all(place(r) > last_held for r in records):
        appended = append_jsonl(final, records)
    else:
        merged = sorted([*existing, *records], key=place)  # stable: ties keep their order
        atomic_write_text(final, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in merged))
        appended = len(records)
    for part in parts:
        part.unlink()
    if appended:
        log.info("merged %d records of %d rank parts into %s", appended, len(parts), final.name)
    return appended


def gpus_for_this_rank(tensor_parallel_size: int) -> None:
    """Under a launch, give this rank's vLLM engine its own GPUs: the `tensor_parallel_size`
    devices after those of the lower local ranks (vLLM's workers would all use the first ones)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    local = int(os.environ.get("LOCAL_RANK", "0"))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = (
        [d for d in visible.split(",") if d.strip()]
        if visible
        else [str(i) for i in range(torch.cuda.device_count())]
    )
    mine = devices[local * tensor_parallel_size : (local + 1) * tensor_parallel_size]
    if len(mine) < tensor_parallel_size:
        raise RuntimeError(
            f"local rank {local} needs {tensor_parallel_size} GPU(s) for its vLLM engine "
            f"(generation.tensor_parallel_size) but only {len(devices)} are visible on this node "
            "for all its ranks; launch fewer processes per node"
        )
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
    log.info("vLLM: local rank %d generates on GPU(s) %s", local, ",".join(mine))


def cpus_for_this_rank() -> None:
    """Under a launch, give this rank's vLLM CPU engine its own share of the cores this process
    may run on: vLLM binds its worker's threads to every allowed core (VLLM_CPU_OMP_THREADS_BIND
    "auto"), so each rank's engine would bind to the same ones. Left alone when the user set it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cpus = sorted(os.sched_getaffinity(0))
    per_rank = max(1, len(cpus) // local_processes())
    mine = cpus[local * per_rank : (local + 1) * per_rank] or [cpus[local % len(cpus)]]
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, mine))
    log.info("vLLM: local rank %d generates on CPU(s) %s", local, ",".join(map(str, mine)))
