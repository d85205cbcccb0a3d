"""Drawing the next token exactly as transformers' `do_sample` would (temperature, top-k, top-p),
without vocabulary-sized temporaries, and stopping rows at stop strings.

ssb's decode loop draws with `draw`: inverse-CDF sampling in token-id order, driven by one
uniform per (row seed, step) from `step_uniforms` (Philox4x32-10, the counter-based generator of
torch's CUDA RNG, computed with integer tensor ops on the logits' device). All rows of a batch
draw in one call with no host generator and no Python loop per row, and a row's sample depends
on its seed and the step only, never on its batch, its neighbours, or where a run resumed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor, StoppingCriteria


def candidates(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, probs), each (rows, width): the tokens transformers' `do_sample` could draw with
    TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper (in that order) and their
    probabilities (0 for a padding column). Tie rule included: every token tied with the k-th
    tempered logit stays a candidate.

    The top-k runs on the raw logits and only the candidates are divided by the temperature:
    dividing by a positive number keeps the order, and a tie that the division's rounding
    creates at the k-th value is caught by the widening check below. So no vocabulary-sized
    tensor is allocated (each one costs milliseconds on CPU for a 262k vocabulary).
    """
    if temperature <= 0 or top_k <= 0:
        raise ValueError("candidates() needs temperature > 0 and top_k > 0")
    vocab = logits.shape[-1]
    k = min(int(top_k), vocab)
    # Low-precision logits often tie with the k-th; 2k candidates hold the ties in practice,
    # and a count of the ties widens the set when they do not.
    width = min(2 * k, vocab)
    raw, ids = logits.topk(width, dim=-1)  # sorted, largest first
    values = raw.float() / temperature
    kth = values[:, k - 1 : k]
    if width < vocab and bool((values[:, -1:] >= kth).any()):
        width = int((logits.float() / temperature >= kth).sum(dim=-1).max())
        raw, ids = logits.topk(width, dim=-1)
        values = raw.float() / temperature
    values = values.masked_fill(values < kth, float("-inf"))
    if top_p < 1.0:
        # TopPLogitsWarper's rule on the candidates in its order: ascending by logit, ties by
        # token id (its stable sort of the vocabulary), so tied tokens are dropped alike.
        by_id = ids.argsort(dim=-1)
        ids, values = ids.gather(1, by_id), values.gather(1, by_id)
        ascending = values.argsort(dim=-1, stable=True)
        ids, values = ids.gather(1, ascending), values.gather(1, ascending)
        cumulative = values.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[:, -1] = False
        values = values.masked_fill(remove, float("-inf"))
    return ids, values.softmax(dim=-1)


_MASK32 = 0xFFFFFFFF
# Philox4x32's multipliers and Weyl key increments (Salmon et al., SC 2011; Random123).
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def _mulhilo32(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product of 32-bit values `a` (an int64 tensor) and the
    32-bit constant `m`. The constant is split into 16-bit halves so no intermediate reaches
    2**63: torch leaves signed int64 overflow to the hardware."""
    low = a * (m & 0xFFFF)  # < 2**48
    high = a * (m >> 16)  # < 2**48
    mid = low + ((high & 0xFFFF) << 16)  # < 2**49
    return (high >> 16) + (mid >> 32), mid & _MASK32


def philox4x32(
    counter: Sequence[torch.Tensor], key: Sequence[torch.Tensor], rounds: int = 10
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-`rounds` on int64 tensors holding 32-bit words (broadcast together): four
    counter words and two key words in, four random words out (Random123's known answers are in
    the tests)."""
    c0, c1, c2, c3 = (torch.as_tensor(c) for c in counter)
    k0, k1 = (torch.as_tensor(k) for k in key)
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + _PHILOX_W[0]) & _MASK32, (k1 + _PHILOX_W[1]) & _MASK32
        hi0, lo0 = _mulhilo32(c0, _PHILOX_M[0])
        hi1, lo1 = _mulhilo32(c2, _PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def step_uniforms(
    seeds: Sequence[int], steps: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(rows, steps) float64 uniforms in (0, 1), one per (row, decode step): Philox4x32-10 keyed
    by the row's 64-bit seed, counting steps. Computed on `device` in one go per batch, so the
    decode loop only indexes it; 53 bits per value (from two words, as Random123's u01)."""
    # The seeds' two 32-bit halves, split on the host (a 64-bit seed does not fit an int64).
    low = torch.tensor([int(s) % 2**64 & _MASK32 for s in seeds], dtype=torch.long)
    high = torch.tensor([int(s) % 2**64 >> 32 for s in seeds], dtype=torch.long)
    key = (low.to(device)[:, None], high.to(device)[:, None])
    step = torch.arange(steps, dtype=torch.long, device=device)[None, :]
    zero = torch.zeros_like(step)
    w0, w1, _, _ = philox4x32((step, zero, zero, zero), key)
    bits = (w0 >> 5) * 2**26 + (w1 >> 6)  # 53 random bits, < 2**53: exact in float64
    return (bits.double() + 0.5) / 2**53


def draw(
    probs: torch.Tensor, uniforms: torch.Tensor, ids: torch.Tensor | None = None
) -> torch.Tensor:
    """One token per row by inverse-CDF sampling: the first token, in token-id order, at which
    the row's cumulative probability exceeds `uniforms` (rows,) times the row's total.

    `probs` (rows, width) are over the whole vocabulary (`ids` None: column = token id) or over
    candidate `ids` (rows, width), which are put in token-id order first, so a candidate set and
    the whole vocabulary give the same token for the same uniform (zero-probability tokens add
    nothing to the running sum and are never drawn). The sums run in float64."""
    if ids is not None:
        order = ids.argsort(dim=-1)
        ids, probs = ids.gather(1, order), probs.gather(1, order)
    cdf = probs.double().cumsum(dim=-1)
    target = (uniforms.double() * cdf[:, -1]).unsqueeze(-1)
    # right=True: the first column whose running sum is > target, so a column with zero mass
    # (equal running sum to its left neighbour) is never picked; the clamp only guards rounding.
    pick = torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[-1] - 1)
    return pick[:, 0] if ids is None else ids.gather(1, pick)[:, 0]


class CandidateSampler(LogitsProcessor):
    """For transformers' `generate` loop: draws the next token with `candidates` and returns a
    one-hot score row (0 for the drawn token, -inf elsewhere) for greedy decoding to pick. The
    distribution is exactly transformers' `do_sample`; only the draw differs: it is over the
    candidates, not the whole vocabulary."""

    def __init__(self, temperature: float, top_k: int, top_p: float = 1.0) -> None:
        if temperature <= 0 or top_k <= 0:
            raise ValueError("CandidateSampler needs temperature > 0 and top_k > 0")
        self.temperature = float(temperature)
        self.top_k = int(top_k)
        self.top_p = float(top_p)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        ids, probs = candidates(scores, self.temperature, self.top_k, self.top_p)
        chosen = ids.gather(1, torch.multinomial(probs, num_samples=1))
        one_hot = torch.full_like(scores, float("-inf"))
        return one_hot.scatter_(1, chosen, 0.0)


def tail_window(stop_strings: Sequence[str]) -> int:
    """How many trailing tokens to decode to see whether a stop string just appeared: a stop
    string of m bytes spans at most m tokens (byte-level tokens may carry a fraction of a
    character); the slack keeps decode artefacts at the window's start away."""
    return max((len(s.encode("utf-8")) for s in stop_strings), default=0) + 8


class StopOnStrings(StoppingCriteria):
    """Marks a row done once the decoded tail of its generated tokens contains a stop string
    (or a stop token appears); only unfinished rows are decoded, and only their last few tokens.
    """

    def __init__(
        self,
        tokenizer,
        stop_strings: Sequence[str],
        prompt_width: int,
        stop_token_ids: Sequence[int] = (),
    ) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = list(stop_strings)
        self.prompt_width = prompt_width
        self.window = tail_window(self.stop_strings)
        self.stop_token_ids = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long)
        self.done: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        batch = input_ids.shape[0]
        if self.done is None or self.done.shape[0] != batch:
            self.done = torch.zeros(batch, dtype=torch.bool)
        generated = input_ids[:, self.prompt_width :].cpu()
        if len(self.stop_token_ids) and generated.shape[1]:
            self.done |= torch.isin(generated, self.stop_token_ids).any(dim=1)
        if self.stop_strings and generated.shape[1]:
            rows = (~self.done).nonzero(as_tuple=True)[0].tolist()
            if rows:
                tails = generated[rows, -self.window :].tolist()
                texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
                for row, text in zip(rows, texts):
                    if any(s in text for s in self.stop_strings):
                        self.done[row] = True
        return self.done.clone().to(input_ids.device)
