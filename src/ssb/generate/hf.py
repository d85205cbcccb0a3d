"""Batched generation with `transformers` models, for CPU and single GPUs.

- Prompts are token-id lists; batches are built here with LEFT padding (no re-tokenisation).
- Prompts are sorted by length (longest first) so each batch pads little; the `n` samples of a
  prompt are adjacent rows, so they share a batch where the batch size allows. Results come back
  in input order.
- Sampling is exactly `SamplingParams`: the model's own `generation_config` sampling defaults
  (e.g. Qwen2.5's ``repetition_penalty=1.05``, ``top_k=20``) are NOT applied, as with the vLLM
  backend. temperature 0 is greedy (and the `n` greedy samples of a prompt are generated once).
- Stops at any of `stop_token_ids` and, per row, at `stop_strings` (only the tail of each
  running row is decoded to check).
- Reproducible: in the default loop each row draws with one uniform per step from a
  counter-based generator keyed by its prompt's seed (`SamplingParams.prompt_seed`, per problem
  in the stages) and its sample index (`ssb.generate.sampling.step_uniforms`), so batch size,
  batch order, chunking and resuming never change a sample (the transformers loop seeds torch
  once per batch).

`loop="ssb"` (the default) runs ssb's own decode loop; `loop="transformers"` calls
`model.generate` (the reference the tests compare against: token-identical greedy outputs, the
same sampling distribution). What makes the default fast on a CPU (all exact; `ssb bench`,
sections generation and cpu, measures it):

- **Shared prefix, prefilled once.** The rows of a batch usually share a long prefix (the
  few-shot examples, a system prompt, or the whole prompt for the `n` samples of one problem).
  It is run through the model once, its KV cache is copied to every row, and each row's rest is
  placed after it with the padding *between* prefix and rest (masked out; position ids skip it).
  Models with a sliding-window layer use this only while the whole sequence fits in the window,
  because padding inside the window would push real tokens out of it.
- **No vocabulary-sized temporaries.** `candidates` takes the top-k of the raw logits and tempers
  only those; greedy is an argmax. transformers copies the logits, divides all 262k of them by
  the temperature and builds a score row per step (~100 ms per step at 16 rows on an AVX2 CPU).
- **A KV cache that grows in place** (`GrowingLayer`) instead of being concatenated every step.
- **Rows leave the batch as soon as they stop**, so the steps after the short rows finish cost
  only what the long rows need.

And on a GPU, where each wait for the device stalls the kernel queue: no host work per row or
per step. All rows sample in one call (no host generator per row); generated tokens stay on the
device and the host reads them every `ACCELERATOR_CHECK_EVERY` steps to retire stopped rows;
without padding no attention mask is passed (transformers checks a mask on the host each step).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import (
    Cache,
    DynamicCache,
    GenerationConfig,
    LogitsProcessorList,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ssb.generate.base import Completion, SamplingParams, make_completion
from ssb.generate.batching import (
    MIN_SHARED_PREFIX,
    batch_seed,
    growing_cache,
    pad_after_prefix,
    shared_prefix_length,
    sliding_window,
    transformers_model,
)
from ssb.generate.sampling import (
    CandidateSampler,
    StopOnStrings,
    candidates,
    draw,
    step_uniforms,
    tail_window,
)
from ssb.models import cache_kwarg


@contextlib.contextmanager
def _neutral_generation_config(model):
    """Hide the model's generation_config defaults during `generate` (restored afterwards)."""
    target = transformers_model(model)
    saved = target.generation_config
    target.generation_config = GenerationConfig()
    try:
        yield
    finally:
        target.generation_config = saved


LOOPS = ("ssb", "transformers")
# On a GPU the decode loop reads the new tokens every this many steps: each read waits for the
# device to finish, and a row that stopped since the last read costs at most this many wasted
# row-steps (a CPU reads every step: reading costs nothing there, a wasted row-step does).
ACCELERATOR_CHECK_EVERY = 8


def row_seed(params: SamplingParams, prompt_index: int, sample_index: int) -> int:
    """The seed of one sampled row: the prompt's seed (`SamplingParams.prompt_seed`) and the
    sample's index, never the batch it lands in, so batch size and order do not change samples."""
    return batch_seed(params.prompt_seed(prompt_index), sample_index)


class HFGenerator:
    """Batched generation with transformers models on token-id prompts (see the module
    docstring). `loop="ssb"` (default) runs its own decode loop; `loop="transformers"` calls
    `model.generate` (the reference the tests and `ssb bench` compare against)."""

    def __init__(
        self,
        model,
        tokenizer,
        batch_size: int,
        stop_token_ids: Sequence[int],
        pad_token_id: int | None = None,
        share_prefix: bool = True,
        sample_from_candidates: bool | None = None,
        loop: str = "ssb",
        check_every: int | None = None,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.stop_token_ids = [int(t) for t in dict.fromkeys(stop_token_ids)]
        if not self.stop_token_ids:
            raise ValueError("stop_token_ids must name at least one token (eos / end-of-turn)")
        if pad_token_id is None:
            pad_token_id = tokenizer.pad_token_id
        if pad_token_id is None:
            pad_token_id = tokenizer.eos_token_id
        if pad_token_id is None:
            pad_token_id = self.stop_token_ids[0]
        self.pad_token_id = int(pad_token_id)
        self.share_prefix = share_prefix
        # Top-k candidates first (`candidates`): no vocabulary-sized temporaries, which cost
        # milliseconds each on a CPU; but its tie check waits on the device every step, while a
        # GPU runs transformers' full-vocabulary warpers in microseconds. Default: by device.
        if sample_from_candidates is None:
            sample_from_candidates = self.device.type == "cpu"
        self.sample_from_candidates = sample_from_candidates
        if loop not in LOOPS:
            raise ValueError(f"loop must be one of {', '.join(LOOPS)}, got {loop!r}")
        self.loop = loop
        if check_every is None:
            check_every = 1 if self.device.type == "cpu" else ACCELERATOR_CHECK_EVERY
        if check_every <= 0:
            raise ValueError(f"check_every must be > 0, got {check_every}")
        # Decode steps between two reads of the new tokens by the host (see `_decode_batch`).
        self.check_every = check_every
        self.window = sliding_window(model)
        self._cache_kwarg = cache_kwarg(model)
        # The last shared prefix and its KV cache (batch 1): consecutive batches usually share it.
        self._prefix_memo: tuple[tuple[int, ...], DynamicCache] | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _generation_config(self, params: SamplingParams) -> GenerationConfig:
        kwargs = dict(
            max_new_tokens=params.max_new_tokens,
            min_new_tokens=0,
            num_beams=1,
            num_return_sequences=1,
            eos_token_id=list(self.stop_token_ids),
            pad_token_id=self.pad_token_id,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            return_dict_in_generate=False,
            output_scores=False,
            use_cache=True,
        )
        if params.greedy or self._candidate_sampler(params) is not None:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(
                do_sample=True,
                temperature=float(params.temperature),
                top_p=float(params.top_p),
                top_k=int(params.top_k),  # 0 = off (transformers skips top-k for 0)
            )
        return GenerationConfig(**kwargs)

    def _candidate_sampler(self, params: SamplingParams) -> CandidateSampler | None:
        if params.greedy or params.top_k <= 0 or not self.sample_from_candidates:
            return None
        return CandidateSampler(params.temperature, params.top_k, params.top_p)

    def _prefix_len(self, prompts: list[list[int]], max_new_tokens: int) -> int:
        """How many leading tokens the batch shares and will prefill once (0: none)."""
        if not self.share_prefix or len(prompts) < 2:
            return 0
        n = shared_prefix_length(prompts)
        if n < MIN_SHARED_PREFIX:
            return 0
        if self.window is not None:
            # The padding between prefix and rest takes columns of the attention window.
            longest = n + max(len(p) - n for p in prompts) + max_new_tokens
            if longest >= self.window:
                return 0
        return n

    def _fill_prefix(self, cache: Cache, prefix: list[int], rows: int) -> None:
        """Put the KV of `prefix` (computed once, memoised) into every row of an empty cache."""
        memo = self._prefix_memo_cache(prefix)
        for layer, source in zip(cache.layers, memo.layers):
            layer.update(
                source.keys.expand(rows, -1, -1, -1), source.values.expand(rows, -1, -1, -1)
            )

    def _prefix_cache(self, prefix: list[int], rows: int) -> DynamicCache:
        """A KV cache holding `prefix` for `rows` rows (for transformers' `generate`)."""
        cache = copy.deepcopy(self._prefix_memo_cache(prefix))
        cache.batch_repeat_interleave(rows)
        return cache

    def _prefix_memo_cache(self, prefix: list[int]) -> DynamicCache:
        """The KV cache of `prefix` at batch 1, computed once per distinct prefix (consecutive
        batches usually share it). Not to be modified."""
        key = tuple(prefix)
        if self._prefix_memo is None or self._prefix_memo[0] != key:
            cache = DynamicCache(config=transformers_model(self.model).config)
            ids = torch.tensor([prefix], dtype=torch.long, device=self.device)
            with torch.inference_mode():
                self.model(
                    input_ids=ids, use_cache=True, logits_to_keep=1, **{self._cache_kwarg: cache}
                )
            self._prefix_memo = (key, cache)
        return self._prefix_memo[1]

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, progress: bool = True
    ) -> list[list[Completion]]:
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if params.prompt_seeds is not None and len(params.prompt_seeds) != len(prompts):
            raise ValueError(f"{len(params.prompt_seeds)} prompt_seeds for {len(prompts)} prompts")
        # Greedy samples are identical: generate each prompt once and copy.
        samples = 1 if params.greedy else params.n
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # stable
        rows = [(i, s) for i in order for s in range(samples)]
        results: list[list[Completion | None]] = [[None] * samples for _ in prompts]
        remaining = [samples] * len(prompts)
        gen_config = self._generation_config(params)
        bar = tqdm(total=len(prompts), unit="prompt", desc="generate", disable=not progress)
        try:
            for batch_index, start in enumerate(range(0, len(rows), self.batch_size)):
                batch = rows[start : start + self.batch_size]
                batch_prompts = [prompts[i] for i, _ in batch]
                if self.loop == "ssb":
                    seeds = [row_seed(params, i, s) for i, s in batch]
                    outputs = self._decode_batch(batch_prompts, params, seeds)
                else:
                    outputs = self._generate_batch(batch_prompts, params, gen_config, batch_index)
                finished = 0
                for (i, s), completion in zip(batch, outputs):
                    results[i][s] = completion
                    remaining[i] -= 1
                    finished += remaining[i] == 0
                bar.update(finished)
        finally:
            bar.close()
        out: list[list[Completion]] = []
        for per_prompt in results:
            done = [c for c in per_prompt if c is not None]
            if params.greedy and params.n > 1:
                done = [
                    Completion(c.text, list(c.token_ids), c.finish_reason) for c in done * params.n
                ]
            out.append(done)
        return out

    def _generate_batch(
        self,
        batch_prompts: list[list[int]],
        params: SamplingParams,
        gen_config: GenerationConfig,
        batch_index: int,
    ) -> list[Completion]:
        shared = self._prefix_len(batch_prompts, params.max_new_tokens)
        input_ids, attention_mask = pad_after_prefix(
            batch_prompts, shared, self.pad_token_id, self.device
        )
        extra = {}
        if shared:
            extra[self._cache_kwarg] = self._prefix_cache(batch_prompts[0][:shared], len(input_ids))
        width = input_ids.shape[1]
        criteria = StoppingCriteriaList()
        if params.stop_strings:
            criteria.append(
                StopOnStrings(self.tokenizer, params.stop_strings, width, self.stop_token_ids)
            )
        sampler = self._candidate_sampler(params)
        processors = LogitsProcessorList([sampler] if sampler is not None else [])
        torch.manual_seed(batch_seed(params.seed, batch_index))
        with torch.inference_mode(), _neutral_generation_config(self.model):
            sequences = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=gen_config,
                stopping_criteria=criteria,
                logits_processor=processors,
                **extra,
            )
        generated = sequences[:, width:].tolist()
        done = criteria[0].done.tolist() if params.stop_strings else [False] * len(generated)
        completions = []
        for ids, row_done in zip(generated, done):
            if row_done:  # drop the padding transformers appended after the row stopped
                while ids and ids[-1] == self.pad_token_id:
                    ids = ids[:-1]
            completions.append(self._completion(ids, row_done, params))
        return completions

    def _completion(
        self, ids: list[int], stopped_by_string: bool, params: SamplingParams
    ) -> Completion:
        """The trimmed completion of one row's generated ids."""
        completion = make_completion(ids, self.tokenizer, self.stop_token_ids, params.stop_strings)
        if completion.finish_reason == "length" and stopped_by_string:
            # The tail check saw a stop string that the full decode does not (a decode artefact
            # at the window's edge): the row did stop.
            completion = make_completion(
                ids, self.tokenizer, self.stop_token_ids, (), finish_reason="stop"
            )
        return completion

    def _forward(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        """Logits of the last position of each row; the cache is extended in place."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kwarg: cache},
        )
        return out.logits[:, -1, :]

    def _next_tokens(
        self, logits: torch.Tensor, params: SamplingParams, uniforms: torch.Tensor | None
    ) -> torch.Tensor:
        """One token per row, on the logits' device: argmax when greedy, else a `draw` from
        transformers' `do_sample` distribution with each row's uniform for this step.

        The distribution comes from `candidates` or, without `sample_from_candidates`, from
        transformers' own warpers over the whole vocabulary; both give the same token for the
        same uniform (up to float rounding at a boundary)."""
        if params.greedy:
            return logits.argmax(dim=-1)
        if params.top_k > 0 and self.sample_from_candidates:
            ids, probs = candidates(logits, params.temperature, params.top_k, params.top_p)
            return draw(probs, uniforms, ids)
        scores = TemperatureLogitsWarper(params.temperature)(None, logits.float())
        if params.top_k > 0:
            scores = TopKLogitsWarper(params.top_k)(None, scores)
        if params.top_p < 1.0:
            scores = TopPLogitsWarper(params.top_p)(None, scores)
        return draw(scores.softmax(dim=-1), uniforms)

    def _decode_batch(
        self, batch_prompts: list[list[int]], params: SamplingParams, seeds: list[int]
    ) -> list[Completion]:
        """Prefill (the shared prefix once), then decode one token per running row per step.

        The steps run on the device without waiting for it: tokens go into a device buffer,
        sampling noise is a per-(row seed, step) table made once (`step_uniforms`), and the host
        reads the new tokens only every `check_every` steps (every step on a CPU, where reading
        costs nothing), to find the rows that stopped (stop token or stop string, checked at the
        step they happened) and drop them from the batch, so the steps after the short rows
        finish cost only what the long rows need. A row's tokens depend on its seed only.
        """
        shared = self._prefix_len(batch_prompts, params.max_new_tokens)
        input_ids, attention_mask = pad_after_prefix(
            batch_prompts, shared, self.pad_token_id, self.device
        )
        longest = input_ids.shape[1] + params.max_new_tokens
        if self.window is None or longest < self.window:
            cache = growing_cache(self.model, longest)
        else:  # transformers' cache keeps a sliding layer to its window
            cache = DynamicCache(config=transformers_model(self.model).config)
        if shared:
            self._fill_prefix(cache, batch_prompts[0][:shared], len(input_ids))
        # Positions as transformers' generate derives them from the mask (padding: 1).
        position_ids = attention_mask.cumsum(-1) - 1
        position_ids = position_ids.masked_fill(attention_mask == 0, 1)
        # Without padding the decode steps pass no mask: transformers then skips building one
        # (and its check of the mask, which waits on the device every step).
        padded = bool((attention_mask == 0).any())
        rows, steps = len(batch_prompts), params.max_new_tokens
        uniforms = None if params.greedy else step_uniforms(seeds, steps, self.device)
        out = torch.full((rows, steps), self.pad_token_id, dtype=torch.long, device=self.device)
        alive = list(range(rows))  # batch rows still decoding, in cache order
        order = torch.arange(rows, device=self.device)  # the same, on the device
        lengths = [steps] * rows  # tokens each row keeps (set when it stops)
        stopped_by_string = [False] * rows
        seen = 0  # steps whose tokens the host has checked
        stop_ids = set(self.stop_token_ids)
        window = tail_window(params.stop_strings)
        with torch.inference_mode():
            logits = self._forward(
                input_ids[:, shared:], attention_mask, position_ids[:, shared:], cache
            )
            next_positions = position_ids[:, -1:] + 1
            for step in range(steps):
                noise = None if uniforms is None else uniforms[order, step]
                tokens = self._next_tokens(logits, params, noise)
                out[order, step] = tokens
                last = step == steps - 1
                if last or step + 1 - seen >= self.check_every:
                    done = self._stopped_rows(out, alive, seen, step + 1, stop_ids, window, params)
                    for j, (stop_step, by_string) in done.items():
                        lengths[alive[j]] = stop_step + 1
                        stopped_by_string[alive[j]] = by_string
                    seen = step + 1
                    if last or len(done) == len(alive):
                        break
                    if done:
                        keep = [j for j in range(len(alive)) if j not in done]
                        alive = [alive[j] for j in keep]
                        index = torch.tensor(keep, device=self.device)
                        cache.batch_select_indices(index)
                        order, tokens = order[index], tokens[index]
                        attention_mask = attention_mask[index]
                        next_positions = next_positions[index]
                if padded:
                    ones = attention_mask.new_ones((len(alive), 1))
                    attention_mask = torch.cat([attention_mask, ones], dim=1)
                logits = self._forward(
                    tokens[:, None], attention_mask if padded else None, next_positions, cache
                )
                next_positions = next_positions + 1
        generated = out.tolist()
        return [
            self._completion(ids[:length], by_string, params)
            for ids, length, by_string in zip(generated, lengths, stopped_by_string)
        ]

    def _stopped_rows(
        self,
        out: torch.Tensor,
        alive: list[int],
        start: int,
        end: int,
        stop_ids: set[int],
        window: int,
        params: SamplingParams,
    ) -> dict[int, tuple[int, bool]]:
        """The running rows (by position in `alive`) that stopped at a step in [start, end):
        {position: (step, by stop string)}, the step being the first of a stop token or of a
        decoded tail (the `window` last tokens) holding a stop string, as a check after every
        step would find. One read of the new tokens; a row's tail is decoded at each new step
        only when one decode over all of them shows a stop string."""
        rows = out[alive, max(0, start - window + 1) : end].tolist()
        offset = max(0, start - window + 1)
        done: dict[int, tuple[int, bool]] = {}
        for j, ids in enumerate(rows):
            new = ids[start - offset :]
            first_token = next((i for i, t in enumerate(new) if t in stop_ids), None)
            last = len(new) if first_token is None else first_token  # steps to check for strings
            if params.stop_strings and last > 0:
                text = self.tokenizer.decode(ids[: start - offset + last], skip_special_tokens=True)
                if any(s in text for s in params.stop_strings):
                    for i in range(last):
                        end_i = start - offset + i + 1
                        tail = self.tokenizer.decode(
                            ids[max(0, end_i - window) : end_i], skip_special_tokens=True
                        )
                        if any(s in tail for s in params.stop_strings):
                            done[j] = (start + i, True)
                            break
            if j not in done and first_token is not None:
                done[j] = (start + first_token, False)
        return done
