"""Generation with vLLM (optional extra ``ssb[vllm]``; GPU only). vLLM is imported lazily.

vLLM loads the model from disk itself (a hub id or a directory; `ssb.models.model_location`
gives the converted directory for ``embedded`` and GGUF sources). One engine serves the base and
any number of saved LoRA adapters: each adapter gets its own `LoRARequest`, the base none, so a
stage that evaluates several models starts one engine (`ssb.stages.engine` owns its lifetime).

Completions follow the same trimming rule as the transformers backend
(`ssb.generate.base.trim_completion`): vLLM's own token ids may include the stop token or the
tokens of a stop string, so they are trimmed again here.
"""

from __future__ import annotations

import gc
import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ssb.generate.base import UNFINISHED, Completion, SamplingParams, make_completion

BACKENDS = ("auto", "hf", "vllm")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def select_backend(name: str) -> str:
    """Map "auto" -> "vllm" when vLLM is installed and a CUDA GPU is visible, else "hf".

    "vllm" without vLLM or without a GPU raises a clear `RuntimeError`; "hf" is always allowed.
    """
    key = (name or "auto").strip().lower()
    if key not in BACKENDS:
        raise ValueError(f"generation.backend: {name!r} is not one of {', '.join(BACKENDS)}")
    if key == "hf":
        return "hf"
    has_vllm = vllm_available()
    has_gpu = torch.cuda.is_available()
    if key == "auto":
        return "vllm" if has_vllm and has_gpu else "hf"
    if not has_vllm:
        raise RuntimeError(
            "generation.backend=vllm but vLLM is not installed; install it with "
            "`pip install 'ssb[vllm]'` (needs a CUDA GPU), or use generation.backend=hf"
        )
    if not has_gpu:
        raise RuntimeError(
            "generation.backend=vllm needs a CUDA GPU, and none is visible; use "
            "generation.backend=hf (or auto) on this machine"
        )
    return "vllm"


class VLLMGenerator:
    """`Generator` on top of ``vllm.LLM``: the base model, plus the LoRA adapters in `adapters`
    (name -> saved PEFT adapter directory), each served as its own `LoRARequest`."""

    def __init__(
        self,
        model: str | Path,
        tokenizer,
        stop_token_ids: Sequence[int],
        *,
        dtype: str = "auto",
        revision: str | None = None,
        trust_remote_code: bool = False,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        adapters: Mapping[str, str | Path] | None = None,
        max_lora_rank: int = 64,
        seed: int = 0,
        llm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        try:
            from vllm import LLM
        except ImportError as exc:
            raise RuntimeError(
                "the vLLM backend needs vLLM: `pip install 'ssb[vllm]'`, or use backend=hf"
            ) from exc
        self.tokenizer = tokenizer
        self.stop_token_ids = [int(t) for t in dict.fromkeys(stop_token_ids)]
        kwargs: dict[str, Any] = dict(
            model=str(model),
            tokenizer=str(model),
            dtype=dtype,
            revision=revision,
            trust_remote_code=trust_remote_code,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
        )
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        self.lora_requests: dict[str, Any] = {}
        if adapters:
            from vllm.lora.request import LoRARequest

            # Every adapter may be resident at once (a stage alternates between them).
            kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=len(adapters))
            self.lora_requests = {
                name: LoRARequest(name, i, str(path))
                for i, (name, path) in enumerate(adapters.items(), start=1)
            }
        kwargs.update(llm_kwargs or {})
        self.llm = LLM(**kwargs)

    def serving(self, adapter: str | None) -> _Served:
        """A `Generator` for the base (`adapter` None) or one of the served adapters."""
        if adapter is not None and adapter not in self.lora_requests:
            raise KeyError(f"the vLLM engine does not serve an adapter named {adapter!r}")
        return _Served(self, adapter)

    def shutdown(self) -> None:
        """Stop the engine and its worker processes now (not whenever the garbage collector gets
        to it), so the next engine or the next stage's model finds the GPU memory free."""
        llm, self.llm = self.llm, None
        if llm is None:
            return
        shutdown_llm(llm)

    def _sampling_params(self, params: SamplingParams, prompt_index: int):
        from vllm import SamplingParams as VSamplingParams

        greedy = params.greedy
        return VSamplingParams(
            n=params.n,
            temperature=0.0 if greedy else float(params.temperature),
            top_p=1.0 if greedy else float(params.top_p),
            top_k=-1 if greedy or params.top_k <= 0 else int(params.top_k),
            max_tokens=params.max_new_tokens,
            stop=list(params.stop_strings) or None,
            stop_token_ids=list(self.stop_token_ids),
            seed=params.prompt_seed(prompt_index),
            skip_special_tokens=True,
        )

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        progress: bool = True,
        adapter: str | None = None,
    ) -> list[list[Completion]]:
        """Completions of the base model, or of the served adapter named `adapter`."""
        if self.llm is None:
            raise RuntimeError("this vLLM engine has been shut down")
        if not prompts:
            return []
        try:
            from vllm.inputs import TokensPrompt
        except ImportError:  # older vLLM
            from vllm import TokensPrompt  # type: ignore[no-redef]

        inputs = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        sampling = [self._sampling_params(params, i) for i in range(len(prompts))]
        kwargs: dict[str, Any] = {"use_tqdm": progress}
        if adapter is not None:
            kwargs["lora_request"] = self.lora_requests[adapter]
        outputs = self.llm.generate(inputs, sampling, **kwargs)
        # vLLM also stops at the model's eos (ignore_eos=False), so trim at it as well.
        trim_ids = list(self.stop_token_ids)
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            trim_ids.append(int(self.tokenizer.eos_token_id))
        results: list[list[Completion]] = []
        for output in outputs:
            per_prompt = []
            for sample in output.outputs:
                completion = make_completion(
                    list(sample.token_ids),
                    self.tokenizer,
                    trim_ids,
                    params.stop_strings,
                    finish_reason="stop" if sample.finish_reason == "stop" else None,
                )
                if sample.finish_reason in UNFINISHED or sample.finish_reason is None:
                    # vLLM gave up on it (or never finished it): keep that, whatever the text.
                    completion.finish_reason = sample.finish_reason or "abort"
                per_prompt.append(completion)
            results.append(per_prompt)
        return results


class _Served:
    """One model of a `VLLMGenerator`: the base or one adapter."""

    def __init__(self, engine: VLLMGenerator, adapter: str | None) -> None:
        self.engine, self.adapter = engine, adapter

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, progress: bool = True
    ) -> list[list[Completion]]:
        return self.engine.generate(prompts, params, progress, adapter=self.adapter)


def shutdown_llm(llm: Any) -> None:
    """Stop a ``vllm.LLM`` and free its GPU memory now.

    vLLM 0.33 has no ``LLM.shutdown()``. Its engine client's ``shutdown()`` stops the engine-core
    process (the default, multiprocess mode) or the in-process core. Then, as vLLM's own tests do
    between engines, ``cleanup_dist_env_and_memory()`` destroys vLLM's parallel state, collects
    garbage and empties the CUDA cache; it also destroys torch.distributed's default group, so
    when a launcher (accelerate, torchrun) owns that group only vLLM's own groups are destroyed.
    """
    engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if callable(getattr(engine_core, "shutdown", None)):
        engine_core.shutdown()
    del llm, engine_core
    from vllm.distributed import parallel_state

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parallel_state.destroy_model_parallel()
        gc.collect()
        torch.cuda.empty_cache()
    else:
        parallel_state.cleanup_dist_env_and_memory()
