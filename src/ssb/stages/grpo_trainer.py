"""`SSBGRPOTrainer`: TRL's GRPOTrainer with the guards `ssb grpo` adds (see `ssb.stages.grpo`,
which imports this module on first use: importing trl takes a few seconds)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

from trl import GRPOTrainer

from ssb.generate.base import stop_string_cut


class SSBGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer plus three guards: the prompt ids TRL renders are checked against
    `render_prompt_ids`; generation also stops at our stop token ids and stop strings; and
    completions are cut after the first stop string (see the docstring of `ssb.stages.grpo`)."""

    def __init__(
        self,
        *args: Any,
        expected_prompt_ids: list[tuple[Any, list[int]]],
        stop_token_ids: list[int],
        stop_strings: list[str],
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        # (prompt as TRL gets it, ids ssb renders) -> looked up by the prompt TRL tokenizes.
        self.expected_prompt_ids = {prompt_key(p): ids for p, ids in expected_prompt_ids}
        self.prompts_checked = 0
        self.stop_strings = list(stop_strings)
        # Masking after EOS uses `eos_token_ids` (the generation config gets the same ids
        # through `generation_kwargs`).
        extra = [t for t in stop_token_ids if t not in self.eos_token_ids]
        self.eos_token_ids = [*self.eos_token_ids, *extra]

    def _tokenize_prompts(self, prompts: list) -> Any:
        prompt_ids, *rest = super()._tokenize_prompts(prompts)
        for prompt, ids in zip(prompts, prompt_ids, strict=True):
            expected = self.expected_prompt_ids.get(prompt_key(prompt))
            if expected is None or [int(t) for t in ids] != expected:
                raise RuntimeError(
                    "GRPO: the prompt ids TRL rendered differ from ssb.prompts.render_prompt_ids "
                    f"(TRL: {list(ids)[:12]}..., ssb: {(expected or [])[:12]}...)"
                )
            self.prompts_checked += 1
        return (prompt_ids, *rest)

    def _generate_single_turn(self, prompt_ids: Any, *args: Any, **kwargs: Any) -> Any:
        with self._tokenizer_for_generate():
            completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *args, **kwargs)
        if self.stop_strings:
            completion_ids, logprobs = self._cut_at_stop_strings(completion_ids, logprobs)
        mode = "train" if self.model.training else "eval"
        stopped = [self._stopped(ids) for ids in completion_ids]
        self._metrics[mode]["completions/stopped_ratio"].append(sum(stopped) / max(len(stopped), 1))
        return completion_ids, logprobs

    @contextlib.contextmanager
    def _tokenizer_for_generate(self) -> Iterator[None]:
        """transformers' `generate` needs `tokenizer=` for `stop_strings`; TRL does not pass
        it, so the unwrapped model's `generate` gets it bound for this call only."""
        if not self.stop_strings or self.use_vllm:
            yield
            return
        model = self.accelerator.unwrap_model(self.model_wrapped)
        original = model.generate

        def generate(*a: Any, **kw: Any) -> Any:
            kw.setdefault("tokenizer", self._tokenizer)
            return original(*a, **kw)

        model.generate = generate
        try:
            yield
        finally:
            del model.generate  # the instance attribute; the class method shows again

    def _cut_at_stop_strings(self, completion_ids: list, logprobs: Any) -> tuple[list, Any]:

        out_ids, out_lp = [], [] if logprobs is not None else None
        for k, ids in enumerate(completion_ids):
            ids = [int(t) for t in ids]
            cut = stop_string_cut(ids, self._tokenizer, self.stop_strings)
            end = len(ids) if cut is None else cut + 1
            out_ids.append(ids[:end])
            if out_lp is not None:
                out_lp.append(logprobs[k][:end])
        return out_ids, out_lp

    def _stopped(self, ids: list[int]) -> bool:
        if ids and ids[-1] in self.eos_token_ids:
            return True
        if not self.stop_strings or not ids:
            return False
        text = self._tokenizer.decode(ids, skip_special_tokens=True)
        return any(s in text for s in self.stop_strings)


def prompt_key(prompt: Any) -> str:
    """A prompt (text, or chat messages) as a dictionary key."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)
