"""Drawing the next token exactly as transformers' `do_sample` would (temperature, top-k, top-p),
without vocabulary-sized temporaries, and stopping rows at stop strings."""

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
