"""Batched generation with `transformers` (`model.generate`), for CPU and single GPUs.

- Prompts are token-id lists; batches are built here with LEFT padding (no re-tokenisation).
- Prompts are sorted by length (longest first) so each batch pads little; the `n` samples of a
  prompt are adjacent rows, so they share a batch where the batch size allows. Results come back
  in input order.
- Sampling is exactly `SamplingParams`: the model's own `generation_config` sampling defaults
  (e.g. Qwen2.5's ``repetition_penalty=1.05``, ``top_k=20``) are NOT applied, as with the vLLM
  backend. temperature 0 is greedy (and the `n` greedy samples of a prompt are generated once).
- Stops at any of `stop_token_ids` and, per row, at `stop_strings` (a stopping criterion decodes
  only the tail of each unfinished row); the batch ends when every row has stopped.
- Reproducible: torch is seeded before each batch from ``params.seed`` and the batch index, so
  the same prompts, params and batch size give the same samples.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from ssb.generate.base import Completion, SamplingParams, make_completion

_SEED_STRIDE = 1_000_003


def batch_seed(seed: int, batch_index: int) -> int:
    """The torch seed used for batch `batch_index` of a call with `SamplingParams.seed`."""
    return (seed * _SEED_STRIDE + batch_index) % (2**63 - 1)


def left_pad(
    prompts: Sequence[Sequence[int]], pad_token_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), left-padded to the longest prompt."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            input_ids[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
            attention_mask[row, width - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)


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
        # A stop string of m characters spans at most ~m tokens (byte-level tokens may carry a
        # fraction of a character); the slack keeps decode artefacts at the window's start away.
        longest = max((len(s.encode("utf-8")) for s in self.stop_strings), default=0)
        self.window = longest + 8
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


def _hf_model(model):
    """The transformers model under a PEFT wrapper (whose `generation_config` generate reads)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


@contextlib.contextmanager
def _neutral_generation_config(model):
    """Hide the model's generation_config defaults during `generate` (restored afterwards)."""
    target = _hf_model(model)
    saved = target.generation_config
    target.generation_config = GenerationConfig()
    try:
        yield
    finally:
        target.generation_config = saved


class HFGenerator:
    """Batched `model.generate` on token-id prompts (see the module docstring)."""

    def __init__(
        self,
        model,
        tokenizer,
        batch_size: int,
        stop_token_ids: Sequence[int],
        pad_token_id: int | None = None,
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
        if params.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(
                do_sample=True,
                temperature=float(params.temperature),
                top_p=float(params.top_p),
                top_k=int(params.top_k),  # 0 = off (transformers skips top-k for 0)
            )
        return GenerationConfig(**kwargs)

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, progress: bool = True
    ) -> list[list[Completion]]:
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
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
                outputs = self._generate_batch(
                    [prompts[i] for i, _ in batch], params, gen_config, batch_index
                )
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
        input_ids, attention_mask = left_pad(batch_prompts, self.pad_token_id, self.device)
        width = input_ids.shape[1]
        criteria = StoppingCriteriaList()
        if params.stop_strings:
            criteria.append(
                StopOnStrings(self.tokenizer, params.stop_strings, width, self.stop_token_ids)
            )
        torch.manual_seed(batch_seed(params.seed, batch_index))
        with torch.inference_mode(), _neutral_generation_config(self.model):
            sequences = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=gen_config,
                stopping_criteria=criteria,
            )
        generated = sequences[:, width:].tolist()
        done = criteria[0].done.tolist() if params.stop_strings else [False] * len(generated)
        completions = []
        for ids, row_done in zip(generated, done):
            completion = make_completion(
                ids, self.tokenizer, self.stop_token_ids, params.stop_strings
            )
            if completion.finish_reason == "length" and row_done:
                # Stopped by the tail check although the full decode disagrees (a decode artefact
                # at the window's edge): drop the padding transformers appended after the stop.
                while ids and ids[-1] == self.pad_token_id:
                    ids = ids[:-1]
                completion = make_completion(
                    ids, self.tokenizer, self.stop_token_ids, (), finish_reason="stop"
                )
            completions.append(completion)
        return completions
