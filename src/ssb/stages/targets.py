"""Stage 3: score `[hinted teacher prompt || reply + end token]` with the frozen base model and
store the teacher's distributions on the reply positions (end token included).

The teacher prompt ids are the ones the reply was generated from (stored in pairs.jsonl by the
bootstrap stage, and checked against the shared renderer here), so the targets are computed in
exactly the context that produced the reply.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from ssb.config import Config
from ssb.distill.forward import (
    final_hidden_states,
    output_head,
    reply_rows,
    right_pad,
    shared_prompt_prefix,
)
from ssb.distill.losses import dense_targets, topk_targets
from ssb.distill.store import INDEX_NAME, TargetReader, TargetWriter
from ssb.identity import model_identity
from ssb.prompts import render_prompt_ids
from ssb.rundir import RunDir
from ssb.sharding import is_sharded, launch_sharding, shard_for_scoring, shard_report
from ssb.stages.base import load_base, policy_model, release_accelerator
from ssb.stages.common import chunks, log
from ssb.target_modes import TARGET_MODES

# Where each rank writes its share under `accelerate launch`, before rank 0 merges them.
PARTS_DIR = "parts"


def teacher_sequence(pair: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(teacher prompt ids, reply ids + end token): what the teacher scores."""
    return list(pair["teacher_prompt_ids"]), list(pair["reply_ids"]) + [pair["end_token_id"]]


def student_sequence(pair: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(student prompt ids, reply ids + end token): what the student is trained on."""
    return list(pair["student_prompt_ids"]), list(pair["reply_ids"]) + [pair["end_token_id"]]


def check_prompts(pairs: list[dict[str, Any]], tokenizer: Any, cfg: Config) -> None:
    """Refuse pairs whose stored prompt ids differ from what the shared renderer makes now (a
    changed tokenizer, template or prompt config would silently misalign teacher and student)."""
    for pair in pairs:
        for role in ("teacher", "student"):
            rendered = render_prompt_ids(tokenizer, pair[f"{role}_messages"], cfg.prompt)
            if rendered != pair[f"{role}_prompt_ids"]:
                raise ValueError(
                    f"pairs.jsonl example {pair['id']}: the stored {role} prompt ids differ from "
                    "the prompt rendered with the current tokenizer and prompt config; re-run "
                    "`ssb bootstrap` in a new run directory"
                )


def targets_meta(cfg: Config, model: Any, tokenizer: Any) -> dict[str, Any]:

    head = output_head(model)
    return {
        # Hidden states do not depend on the temperature; top-k/dense log-probs are stored at it.
        "tau": cfg.train.loss.temperature if cfg.targets.mode != "hidden" else None,
        "topk": cfg.targets.topk if cfg.targets.mode == "topk" else None,
        "vocab_size": int(head.weight.shape[0]),
        "hidden_size": int(head.weight.shape[1]),
        "model": model_identity(cfg.model, tokenizer),
    }


@torch.inference_mode()
def teacher_rows(model: Any, batch: list[dict[str, Any]], pad_id: int) -> list[torch.Tensor]:
    """Final hidden states (R, H) on the reply positions of each pair, one forward per batch."""
    return reply_hidden_rows(model, [teacher_sequence(p) for p in batch], pad_id)


@torch.inference_mode()
def reply_hidden_rows(
    model: Any, seqs: list[tuple[list[int], list[int]]], pad_id: int
) -> list[torch.Tensor]:
    """Final hidden states (R, H) on the reply rows of each `(prompt ids, reply ids + end)`
    sequence, one forward for all (the teacher's here; the student's in `ssb diagnose`)."""
    full = [prompt + reply for prompt, reply in seqs]
    ids, mask = right_pad(full, pad_id)
    device = next(model.parameters()).device
    # The teacher prompts' shared few-shot prefix runs once per batch (exact; no gradients here,
    # so this also holds under a multi-process launch). Not on a sharded model: every forward
    # is a sequence of collectives, so every rank must run one forward per batch.
    sharded = is_sharded(model)
    n = 0 if sharded else shared_prompt_prefix(full, [len(prompt) for prompt, _ in seqs])
    hidden = final_hidden_states(model, ids.to(device), mask.to(device), shared_prefix=n)
    # The hidden states start at position n: as if each prompt were n tokens shorter.
    return [
        hidden[i, reply_rows(len(prompt) - n, len(reply))] for i, (prompt, reply) in enumerate(seqs)
    ]


# Reply rows whose full-vocabulary logits are built at once (dense/top-k): 256 x 262k float32
# logits are 268 MB.
SCORE_CHUNK = 256


@torch.inference_mode()
def score_batch(
    model: Any, batch: list[dict[str, Any]], pad_id: int, mode: str, meta: dict[str, Any]
) -> list[dict[str, torch.Tensor]]:
    """The tensors `TargetWriter.add` stores for each pair of `batch` (rows = reply tokens, the
    end token included)."""
    head = output_head(model)
    out = []
    for rows in teacher_rows(model, batch, pad_id):
        if mode == "hidden":
            out.append({"hidden": rows.to(torch.bfloat16).cpu()})
            continue
        parts: dict[str, list[torch.Tensor]] = {}
        for start in range(0, rows.shape[0], SCORE_CHUNK):
            logits = head.logits(rows[start : start + SCORE_CHUNK])
            if mode == "dense":
                chunk = {"logp": dense_targets(logits, meta["tau"])}
            else:
                ids, logp, tail = topk_targets(logits, meta["topk"], meta["tau"])
                chunk = {"ids": ids, "logp": logp, "tail": tail}
            for key, value in chunk.items():
                parts.setdefault(key, []).append(value.cpu())
        out.append({key: torch.cat(values) for key, values in parts.items()})
    return out


def run_targets(cfg: Config, rundir: RunDir, progress: bool = True) -> dict[str, Any]:
    """Score every pair not yet stored with the frozen teacher and store its targets.

    Under `accelerate launch` (WORLD_SIZE > 1) the ranks split the missing pairs; each writes a
    store of its own (`targets/parts/rank<k>/`, resumable like the main one) and rank 0 merges
    them into `targets/`, bit for bit. Parts left by a killed run are merged first.
    """
    tcfg = cfg.targets
    pairs = rundir.read_pairs()
    mode = TARGET_MODES[tcfg.mode]
    if not mode.stored:  # the teacher runs inside each training step (adapter disabled)
        summary = {
            "mode": mode.name,
            "examples": len(pairs),
            "scored": 0,
            "bytes_per_reply_token": 0.0,
        }
        return summary

    sharding = launch_sharding()  # refuses what ssb does not run (FSDP1)
    base = load_base(cfg, rundir, to_shard=sharding is not None)
    check_prompts(pairs, base.tokenizer, cfg)
    pad_id = base.tokenizer.pad_token_id if base.tokenizer.pad_token_id is not None else 0
    with policy_model(cfg, base) as model:
        meta = targets_meta(cfg, model, base.tokenizer)
        if sharding is not None:
            # Sharded in place: the shared base cannot be used unsharded again in this process.
            model = shard_for_scoring(model)
            release_accelerator("targets: the base is sharded")

        def score(directory: Path, todo: list[dict[str, Any]], **lockstep: Any) -> int:
            return score_into(directory, model, todo, pad_id, tcfg, meta, progress, **lockstep)

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            scored = _score_distributed(rundir, pairs, tcfg, meta, score, is_sharded(model))
        else:
            merge_target_parts(rundir.targets_dir, tcfg, meta)  # left by a killed multi-process run
            scored = score(rundir.targets_dir, pairs)
        sharded = shard_report(model) if is_sharded(model) else None
    reader = TargetReader(rundir.targets_dir)
    summary = {
        "mode": tcfg.mode,
        "examples": len(reader.ids()),
        "scored": scored,
        "bytes_per_reply_token": round(reader.bytes_per_token(), 1),
    }
    if sharded is not None:
        summary["sharding"] = sharded  # this rank's share of the parameters
    return summary


def teacher_length(pair: dict[str, Any]) -> int:
    """Tokens the teacher reads for a pair (hinted prompt + reply)."""
    return len(pair["teacher_prompt_ids"]) + len(pair["reply_ids"])


def score_into(
    directory: Path,
    model: Any,
    pairs: list[dict[str, Any]],
    pad_id: int,
    tcfg: Any,
    meta: dict[str, Any],
    progress: bool = True,
    batches: int | None = None,
    filler: dict[str, Any] | None = None,
) -> int:
    """Score the pairs the store in `directory` does not hold yet; returns how many it scored.

    The writer flushes every `shard_size` examples, and on the way out (an error or Ctrl-C
    included: every buffered example is complete), so a resumed run redoes only the batch that
    was being scored.

    `batches` (a sharded model, whose forwards are collectives): run exactly that many batches,
    scoring `filler` and discarding it once this rank's own pairs are done, so that every rank
    runs as many forwards as the rank with the most pairs."""
    with TargetWriter(directory, mode=tcfg.mode, meta=meta, shard_size=tcfg.shard_size) as writer:
        for shard, lost in writer.drop_damaged_shards().items():
            log.warning(
                "targets: shard %s is missing or corrupt; rescoring %d examples", shard, lost
            )
        done = writer.done_ids()
        todo = [p for p in pairs if p["id"] not in done]
        log.info("targets (%s): %d pairs, %d already stored", tcfg.mode, len(pairs), len(done))
        # Length-sorted batches waste little compute on padding. They are cut from every pair,
        # stored or not, and a batch with a pair missing is scored whole: a resumed run then
        # runs exactly the forwards of an uninterrupted one (a batch's shared prefix and padding
        # change how its kernels round), so its targets are bit-identical.
        ordered = sorted(pairs, key=teacher_length)
        own = [b for b in chunks(ordered, tcfg.batch_size) if any(p["id"] not in done for p in b)]
        if batches is not None and len(own) > batches:
            raise RuntimeError(f"{len(own)} batches to score, more than the {batches} agreed")
        bar = tqdm(total=len(todo), desc="teacher targets", unit="ex", disable=not progress)
        for batch in own:
            for pair, tensors in zip(batch, score_batch(model, batch, pad_id, tcfg.mode, meta)):
                if pair["id"] not in done:
                    writer.add(pair["id"], teacher_sequence(pair)[1], tensors)
                    bar.update(1)
        bar.close()
    idle = max((batches or 0) - len(own), 0)
    if idle:
        assert filler is not None
        log.info("targets: %d idle batches, so every rank runs %d forwards", idle, batches)
    for _ in range(idle):
        score_batch(model, [filler], pad_id, tcfg.mode, meta)  # the other ranks' collectives
    return len(todo)


def merge_target_parts(targets_dir: Path, tcfg: Any, meta: dict[str, Any]) -> int:
    """Move every rank's part store into the main one (then delete the parts); returns the
    number of examples copied. Safe to repeat after a crash: copied examples are skipped."""
    parts = targets_dir / PARTS_DIR
    if not parts.is_dir():
        return 0
    copied = 0
    with TargetWriter(targets_dir, mode=tcfg.mode, meta=meta, shard_size=tcfg.shard_size) as main:
        main.drop_damaged_shards()
        for part in sorted(parts.iterdir()):
            if not (part / INDEX_NAME).exists():
                continue
            n, bad = main.absorb(part)
            copied += n
            if bad:
                log.warning("targets: %d damaged examples in %s will be rescored", bad, part)
    shutil.rmtree(parts)
    return copied


def _score_distributed(
    rundir: RunDir,
    pairs: list[dict[str, Any]],
    tcfg: Any,
    meta: dict[str, Any],
    score: Callable[..., int],
    sharded: bool = False,
) -> int:

    # Without GPUs the ranks form a gloo (MULTI_CPU) group only when asked to.
    state = PartialState(cpu=not torch.cuda.is_available())
    rank, world = state.process_index, state.num_processes
    if state.is_main_process:
        merge_target_parts(rundir.targets_dir, tcfg, meta)  # parts a killed run left behind
    state.wait_for_everyone()
    stored = (rundir.targets_dir / INDEX_NAME).exists()
    done = set(TargetReader(rundir.targets_dir).ids()) if stored else set()
    todo = [p for p in pairs if p["id"] not in done]
    # Strided over the length order, so every rank gets a similar mix of lengths.
    todo.sort(key=teacher_length)
    mine = todo[rank::world]
    log.info("targets: rank %d/%d scores %d of %d pairs", rank, world, len(mine), len(todo))
    lockstep: dict[str, Any] = {}
    if sharded and todo:
        # Rank 0 holds the largest share (the parts were merged away above, so each rank scores
        # its whole share); the others run idle batches up to its count.
        most = len(todo[0::world])
        lockstep = {"batches": -(-most // tcfg.batch_size), "filler": todo[0]}
    score(rundir.targets_dir / PARTS_DIR / f"rank{rank}", mine, **lockstep)
    state.wait_for_everyone()
    if state.is_main_process:
        merge_target_parts(rundir.targets_dir, tcfg, meta)
    state.wait_for_everyone()
    return len(todo)
