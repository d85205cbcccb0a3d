"""The generation interface shared by the backends, and the completion-trimming rule.

Every backend takes prompts as token-id lists (rendered once by `ssb.prompts`, never re-tokenised
here) and returns, per prompt and in input order, `n` `Completion`s whose `token_ids`:

- exclude the stop token (eos / end-of-turn) and everything after it;
- are cut *before* a stop string: with `i` the first token index such that
  ``decode(ids[:i + 1])`` contains a stop string, the completion keeps ``ids[:i]``. A token that
  straddles the stop string (e.g. a token ``"5\\n"`` when the stop string is ``"\\n\\n"`` and the
  text is ``"...5\\n\\n"``) is dropped together with it, so the kept text may lose a few characters
  before the stop string, but the kept ids always decode to text without the stop string.
  Conversely, when the stop string spans several tokens, the kept text may end with its first
  part (e.g. ``"15.\\n"`` for the stop string ``"\\n\\n"`` when each newline is its own token);
- `finish_reason` is "stop" when a stop token or stop string ended the completion, "length" when
  it ran into `max_new_tokens`, and "abort" or "error" when the engine gave up on it (vLLM's own
  reasons, kept as they are). Such a sample is unfinished: stages never grade or store it
  (`require_finished` stops the chunk before anything is written, so a rerun retries it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ssb.config import SamplingConfig, setting


@dataclass
class SamplingParams(SamplingConfig):
    """One generation call's settings: a config section's sampling (temperature, top_p, top_k,
    documented and checked by `SamplingConfig`) with the call's own count, length, stops and
    seeds."""

    max_new_tokens: int = setting(512, "Longest completion, in tokens.", bounds="> 0")
    n: int = setting(1, "Completions per prompt.", bounds="> 0")
    stop_strings: list[str] = setting(help="Completions stop before any of these.", factory=list)
    seed: int = setting(0, "Seed of the prompts' samples when `prompt_seeds` is None.")
    prompt_seeds: list[int] | None = setting(
        None,
        "One seed per prompt (e.g. derived from the problem id), so a prompt's samples do not "
        "depend on which call, batch, chunk or rank it lands in. None: derived from `seed` and "
        "the prompt's index in the call.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self._require(all(self.stop_strings), "stop_strings", "an empty stop string")

    @classmethod
    def of(cls, sampling: SamplingConfig, **call: Any) -> SamplingParams:
        """A config section's `sampling` (temperature, top_p, top_k) with the call's own n,
        max_new_tokens, stops and seeds."""
        trio = {f.name: getattr(sampling, f.name) for f in dataclasses.fields(SamplingConfig)}
        return cls(**trio, **call)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def prompt_seed(self, prompt_index: int) -> int:
        """The sampling seed of prompt `prompt_index` of a call (every backend uses it)."""
        if self.prompt_seeds is not None:
            return int(self.prompt_seeds[prompt_index]) % (2**31 - 1)
        return (self.seed * 1_000_003 + prompt_index) % (2**31 - 1)


# Finish reasons of a sample the engine did not finish (vLLM's names).
UNFINISHED = ("abort", "error")


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "abort" | "error"


class GenerationAborted(RuntimeError):
    """The engine aborted some samples; nothing of the chunk they belong to was written."""


def require_finished(outputs: Sequence[Sequence[Completion]], what: str) -> None:
    """Raise `GenerationAborted` if any completion of a call is unfinished (see `UNFINISHED`), so
    an aborted sample is never graded as if the model had finished it."""
    reasons = [c.finish_reason for per_prompt in outputs for c in per_prompt]
    bad = [r for r in reasons if r in UNFINISHED]
    if bad:
        raise GenerationAborted(
            f"{what}: the generation engine returned {len(bad)} of {len(reasons)} samples "
            f"unfinished ({', '.join(sorted(set(bad)))}); nothing of this chunk was written, "
            "run the stage again to retry it"
        )


@runtime_checkable
class Generator(Protocol):
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, progress: bool = True
    ) -> list[list[Completion]]:
        """One list of `params.n` completions per prompt, in input order."""
        ...


def first_stop_token(token_ids: Sequence[int], stop_token_ids: Sequence[int]) -> int | None:
    """Index of the first stop token in `token_ids`, or None."""
    stops = set(stop_token_ids)
    for i, tid in enumerate(token_ids):
        if tid in stops:
            return i
    return None


def stop_string_cut(token_ids: Sequence[int], tokenizer, stop_strings: Sequence[str]) -> int | None:
    """The smallest `i` such that ``decode(ids[:i + 1])`` contains a stop string, or None.

    One decode of the whole sequence tells whether any stop string occurs; if one does, a binary
    search over prefix lengths (prefix decodes only grow) finds the first token that completes
    it, with O(log n) decodes.
    """
    if not stop_strings or not token_ids:
        return None

    def contains(k: int) -> bool:  # does decode(ids[:k]) contain a stop string?
        text = tokenizer.decode(list(token_ids[:k]), skip_special_tokens=True)
        return any(s in text for s in stop_strings)

    first = first_prefix(len(token_ids), contains, start=1)
    return None if first is None else first - 1


def first_prefix(n: int, holds: Callable[[int], bool], start: int = 0) -> int | None:
    """The smallest k in [start, n] with holds(k), for a property monotone in k (a binary search
    of O(log n) calls); None when holds(n) is false."""
    if not holds(n):
        return None
    lo, hi = start, n
    while lo < hi:
        mid = (lo + hi) // 2
        if holds(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def trim_completion(
    token_ids: Sequence[int],
    tokenizer,
    stop_token_ids: Sequence[int],
    stop_strings: Sequence[str] = (),
) -> tuple[list[int], str]:
    """Apply the trimming rule of this module: (kept ids, finish_reason)."""
    ids = [int(t) for t in token_ids]
    reason = "length"
    j = first_stop_token(ids, stop_token_ids)
    if j is not None:
        ids, reason = ids[:j], "stop"
    i = stop_string_cut(ids, tokenizer, stop_strings)
    if i is not None:
        ids, reason = ids[:i], "stop"
    return ids, reason


def make_completion(
    token_ids: Sequence[int],
    tokenizer,
    stop_token_ids: Sequence[int],
    stop_strings: Sequence[str] = (),
    finish_reason: str | None = None,
) -> Completion:
    """Trim `token_ids` and decode them; `finish_reason` overrides "length" when given (a backend
    that knows the sequence ended for another reason)."""
    ids, reason = trim_completion(token_ids, tokenizer, stop_token_ids, stop_strings)
    if reason == "length" and finish_reason is not None:
        reason = finish_reason
    return Completion(
        text=tokenizer.decode(ids, skip_special_tokens=True), token_ids=ids, finish_reason=reason
    )
