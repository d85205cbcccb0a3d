"""Generation backends: batched transformers (`HFGenerator`) and vLLM (`VLLMGenerator`).

Both implement the `Generator` protocol: token-id prompts in, `n` `Completion`s per prompt out
(in input order), trimmed by the rule documented in `ssb.generate.base`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ssb.config import Config
from ssb.generate.base import (
    Completion,
    Generator,
    SamplingParams,
    make_completion,
    stop_string_cut,
    trim_completion,
)
from ssb.generate.hf import HFGenerator
from ssb.generate.vllm import (
    CPU_MAX_MODEL_LEN,
    VLLMGenerator,
    cpu_engine_args,
    select_backend,
    vllm_device,
)
from ssb.hardware import dtype_name, pick_dtype
from ssb.models import load_model_config, model_location

__all__ = [
    "Completion",
    "Generator",
    "HFGenerator",
    "SamplingParams",
    "VLLMGenerator",
    "context_limit",
    "make_completion",
    "make_generator",
    "select_backend",
    "stop_string_cut",
    "vllm_context_limit",
    "trim_completion",
]


def max_lora_rank(adapter_paths: Iterable[str | Path], default_rank: int) -> int:
    """vLLM's `max_lora_rank` for the adapters actually served: the largest `r` in their
    adapter_config.json (a continued round-1 adapter may differ from `train.lora.r`, which is the
    fallback), rounded up to a size vLLM supports."""
    ranks = []
    for path in adapter_paths:
        config = Path(path) / "adapter_config.json"
        if config.is_file():
            ranks.append(int(json.loads(config.read_text()).get("r", default_rank)))
    rank = max(ranks, default=default_rank)
    return next((r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank), 512)


def context_limit(cfg: Config, model_config: Any) -> int | None:
    """The most tokens (prompt + generated) a sequence may have: `model.max_context` when set,
    else the model config's `max_position_embeddings` (None when neither is known)."""
    if cfg.model.max_context:
        return int(cfg.model.max_context)
    text_config = getattr(model_config, "get_text_config", lambda: model_config)()
    limit = getattr(text_config, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


def vllm_context_limit(cfg: Config, limit: int | None) -> int | None:
    """The longest sequence a vLLM engine of this host is started for, given the model's
    context `limit` (`context_limit`): on vLLM's CPU platform at most
    `CPU_MAX_MODEL_LEN` unless `model.max_context` asks for more; elsewhere `limit` itself."""
    if vllm_device() != "cpu" or cfg.model.max_context:
        return limit
    return min(limit or CPU_MAX_MODEL_LEN, CPU_MAX_MODEL_LEN)


def make_generator(
    cfg: Config,
    model,
    tokenizer,
    stop_token_ids: Sequence[int],
    *,
    adapters: Mapping[str, str | Path] | None = None,
    max_model_len: int | None = None,
    llm_kwargs: Mapping[str, object] | None = None,
) -> Generator:
    """The generator `cfg.generation.backend` selects.

    hf: batched generation on `model` (a transformers model, or a PEFT model with a LoRA
    attached). vllm: one engine that loads the weights itself from
    `ssb.models.model_location(cfg.model)` (`model` is not used) and serves every saved adapter in
    `adapters` (name -> PEFT adapter directory) as a LoRA; `VLLMGenerator.serving(name)` picks
    one; `max_model_len` (default `model.max_context`; the stage passes its
    `vllm_context_limit`) is the longest sequence it takes; `llm_kwargs` are more ``vllm.LLM``
    arguments (they win), e.g. a colocated engine's memory share and sleep mode.
    `ssb.stages.engine` decides which model is on the GPU when.
    """
    backend = select_backend(cfg.generation.backend)
    if backend == "hf":
        if model is None:
            raise ValueError("the hf generation backend needs a loaded model")
        if adapters:
            raise ValueError("the hf generation backend generates with the model it is given")
        return HFGenerator(model, tokenizer, cfg.generation.batch_size, stop_token_ids)

    adapters = dict(adapters or {})
    device = vllm_device() or "cuda"
    # The dtype transformers would use on this device, so both backends compute alike (vLLM's
    # own "auto" follows the checkpoint's dtype, e.g. float32, and on a CPU without native bf16
    # bf16 is emulated at 2-3x the cost of float32).
    dtype = pick_dtype(cfg.model.dtype, device)
    max_model_len = max_model_len or cfg.model.max_context
    engine_args: dict = {}
    if device == "cpu":
        model_config = load_model_config(cfg.model)
        if max_model_len is None:
            # The stage passes its limit; other callers get the model's own, capped likewise.
            max_model_len = context_limit(cfg, model_config)
        max_model_len = vllm_context_limit(cfg, max_model_len)
        assert max_model_len is not None  # a CPU engine always has a bounded context
        engine_args = cpu_engine_args(
            model_config,
            dtype,
            max_model_len=max_model_len,
            max_num_seqs=cfg.generation.batch_size,
            memory_fraction=cfg.generation.gpu_memory_utilization,
        )
    return VLLMGenerator(
        model_location(cfg.model),
        tokenizer,
        stop_token_ids,
        dtype=dtype_name(dtype),
        revision=cfg.model.revision,
        trust_remote_code=cfg.model.trust_remote_code,
        max_model_len=max_model_len,
        adapters=adapters,
        max_lora_rank=max_lora_rank(adapters.values(), cfg.train.lora.r),
        seed=cfg.seed,
        tensor_parallel_size=cfg.generation.tensor_parallel_size,
        gpu_memory_utilization=cfg.generation.gpu_memory_utilization,
        llm_kwargs={**engine_args, **(llm_kwargs or {})},
    )
