"""The batch layout of ssb's transformers decode loop: per-row seeds, left padding, a shared prefix
prefilled once, and a KV cache that grows in place (see `ssb.generate.hf` for why each helps)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import Cache
from transformers.cache_utils import DynamicLayer

_SEED_STRIDE = 1_000_003
# Shorter shared prefixes are not worth a separate forward pass.
MIN_SHARED_PREFIX = 16


def batch_seed(seed: int, batch_index: int) -> int:
    """The torch seed used for batch `batch_index` of a call with `SamplingParams.seed`."""
    return (seed * _SEED_STRIDE + batch_index) % (2**63 - 1)


def left_pad(
    prompts: Sequence[Sequence[int]], pad_token_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), left-padded to the longest prompt."""
    return pad_after_prefix(prompts, 0, pad_token_id, device)


def shared_prefix_length(prompts: Sequence[Sequence[int]], limit: int | None = None) -> int:
    """Length of the longest common prefix of `prompts`, at most `limit`, and leaving every
    prompt at least one token after it (generation needs one uncached input token per row)."""
    limit = min(len(p) for p in prompts) - 1 if limit is None else limit
    first = prompts[0]
    n = 0
    while n < limit and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


def pad_after_prefix(
    prompts: Sequence[Sequence[int]],
    prefix_len: int,
    pad_token_id: int,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) laid out as [shared prefix][padding][rest of the prompt]
    (with `prefix_len` 0: plain left padding).

    The prefix sits in the same columns in every row, so one KV cache serves all rows; the
    padding is masked, and transformers derives position ids from the mask (cumsum), so every
    real token gets the same position as in an unpadded prompt.
    """
    rests = [p[prefix_len:] for p in prompts]
    width = max(len(r) for r in rests)
    input_ids = torch.full((len(prompts), prefix_len + width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    prefix = torch.as_tensor(list(prompts[0][:prefix_len]), dtype=torch.long)
    input_ids[:, :prefix_len] = prefix
    attention_mask[:, :prefix_len] = 1
    for row, rest in enumerate(rests):
        input_ids[row, prefix_len + width - len(rest) :] = torch.as_tensor(list(rest))
        attention_mask[row, prefix_len + width - len(rest) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def sliding_window(model) -> int | None:
    """The smallest attention window among the model's layers, or None if every layer sees the
    whole sequence."""
    config = transformers_model(model).config
    config = getattr(config, "get_text_config", lambda: config)()
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    if layer_types is None and getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


def transformers_model(model):
    """The transformers model under a PEFT wrapper (whose `generation_config` generate reads)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class GrowingLayer(DynamicLayer):
    """A full-attention KV-cache layer with a preallocated buffer: a decode step writes its one
    new column in place, where transformers' `DynamicLayer` concatenates (copies) the whole
    cache every step, ~20% of a CPU decode step for gemma-3-270m at 16 rows. The keys and values
    it returns are views of the buffer's first columns."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def _view(self) -> None:
        k, v = self._buffers
        self.keys, self.values = k[:, :, : self.length], v[:, :, : self.length]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if self._buffers is None or end > self._buffers[0].shape[-2]:
            capacity = max(end, self.capacity)
            grown = []
            for old, new in zip(self._buffers or (None, None), (key_states, value_states)):
                shape = (*new.shape[:2], capacity, new.shape[-1])
                buffer = new.new_empty(shape)
                if old is not None:
                    buffer[:, :, : self.length] = old[:, :, : self.length]
                grown.append(buffer)
            self._buffers = (grown[0], grown[1])
        self._buffers[0][:, :, self.length : end] = key_states
        self._buffers[1][:, :, self.length : end] = value_states
        self.length = end
        self._view()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.length:
            k, v = self._buffers
            self._buffers = (k.repeat_interleave(repeats, 0), v.repeat_interleave(repeats, 0))
            self._view()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.length:
            k, v = self._buffers
            self._buffers = (k[indices], v[indices])
            self._view()


def growing_cache(model, capacity: int) -> Cache:
    """A cache of `GrowingLayer`s for every layer of `model`: only for sequences shorter than
    any sliding window (there a sliding layer sees everything, like a full one)."""
    config = transformers_model(model).config
    config = getattr(config, "get_text_config", lambda: config)()
    return Cache(layers=[GrowingLayer(capacity) for _ in range(config.num_hidden_layers)])
