"""What several stages share: seeds, chunks of problems, prompts that fit the context, golds
that can be graded. (The loaded base model has its own module, `ssb.stages.base`.)"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from ssb.config import Config
from ssb.generate import select_backend
from ssb.grading import gold_is_parseable

log = logging.getLogger("ssb")


def stable_seed(*parts: Any) -> int:
    """A seed derived from values (run seed, problem id, ...), stable across processes and runs
    (Python's hash() is salted per process)."""
    blob = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") & 0x7FFFFFFF


def generation_chunk_size(cfg: Config, samples_per_problem: int) -> int:
    """Problems per generate call (and per crash-safe append) in rollout, bootstrap and eval.

    transformers: four batches of `generation.batch_size` rows, so a kill loses little. vLLM
    schedules its own batches and runs fastest on one large call: thousands of sequences.
    Samples are seeded per problem, so the chunk size never changes what is sampled."""

    if select_backend(cfg.generation.backend) == "vllm":
        return max(1, 4096 // samples_per_problem)
    return max(1, cfg.generation.batch_size // samples_per_problem) * 4


def chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def fits_context(prompt_ids: list[int], max_new_tokens: int, limit: int | None) -> bool:
    """True when the prompt plus `max_new_tokens` generated tokens fit in `limit` tokens."""
    return limit is None or len(prompt_ids) + max_new_tokens <= limit


def fitting_prompts(
    ids: list[str], prompts: list[list[int]], max_new_tokens: int, limit: int | None, stage: str
) -> list[int]:
    """Positions of the prompts that leave room for `max_new_tokens` within `limit` (a model fed
    past its context gives garbage, vLLM refuses it); each skipped problem is logged by id."""
    kept = []
    for i, (pid, prompt) in enumerate(zip(ids, prompts)):
        if fits_context(prompt, max_new_tokens, limit):
            kept.append(i)
        else:
            log.warning(
                "%s: skipping problem %s: prompt of %d tokens + %d new tokens exceeds the "
                "context of %s tokens (model.max_context)",
                stage,
                pid,
                len(prompt),
                max_new_tokens,
                limit,
            )
    return kept


def drop_unparseable_golds(problems: list[Any], stage: str) -> tuple[list[Any], list[str]]:
    """Skip problems whose gold answer math-verify cannot parse (they could only be graded by
    string equality); each is logged. Returns the kept problems and the skipped ids."""

    kept, skipped = [], []
    for problem in problems:
        (kept if gold_is_parseable(problem.answer) else skipped).append(problem)
    for problem in skipped:
        log.warning(
            "%s: skipping problem %s: math-verify cannot parse its gold answer %r",
            stage,
            problem.id,
            problem.answer,
        )
    return kept, [p.id for p in skipped]
