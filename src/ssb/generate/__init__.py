"""Generation backends: batched transformers (`HFGenerator`) and vLLM (`VLLMGenerator`).

Both implement the `Generator` protocol: token-id prompts in, `n` `Completion`s per prompt out
(in input order), trimmed by the rule documented in `ssb.generate.base`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

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
from ssb.generate.vllm import VLLMGenerator, select_backend

__all__ = [
    "Completion",
    "Generator",
    "HFGenerator",
    "SamplingParams",
    "VLLMGenerator",
    "make_completion",
    "make_generator",
    "select_backend",
    "stop_string_cut",
    "trim_completion",
]


def max_lora_rank(adapter_path: str | Path | None, default_rank: int) -> int:
    """vLLM's `max_lora_rank` for the adapter actually served (its adapter_config.json `r`; a
    continued round-1 adapter may differ from `train.lora.r`), rounded up to a size vLLM
    supports."""
    rank = default_rank
    config = Path(adapter_path) / "adapter_config.json" if adapter_path is not None else None
    if config is not None and config.is_file():
        rank = int(json.loads(config.read_text()).get("r", rank))
    return next((r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank), 512)


def make_generator(
    cfg: Config,
    model,
    tokenizer,
    stop_token_ids: Sequence[int],
    *,
    adapter_path: str | Path | None = None,
) -> Generator:
    """The generator `cfg.generation.backend` selects.

    hf: batched `model.generate` on `model` (a transformers model, or a PEFT model for the
    student). vllm: vLLM loads the weights itself from `ssb.models.model_location(cfg.model)`, so
    `model` may be None; a LoRA student is served from `adapter_path` (a saved PEFT adapter).
    """
    backend = select_backend(cfg.generation.backend)
    if backend == "hf":
        if model is None:
            raise ValueError("the hf generation backend needs a loaded model")
        return HFGenerator(model, tokenizer, cfg.generation.batch_size, stop_token_ids)
    if adapter_path is None and model is not None and hasattr(model, "peft_config"):
        raise ValueError(
            "the vLLM backend serves LoRA students from a saved adapter: pass adapter_path= "
            "(the run's adapter/ directory), or use generation.backend=hf"
        )
    from ssb.models import model_location

    return VLLMGenerator(
        model_location(cfg.model),
        tokenizer,
        stop_token_ids,
        dtype=cfg.model.dtype,
        revision=cfg.model.revision,
        trust_remote_code=cfg.model.trust_remote_code,
        max_model_len=cfg.model.max_context,
        adapter_path=adapter_path,
        max_lora_rank=max_lora_rank(adapter_path, cfg.train.lora.r),
        seed=cfg.seed,
        tensor_parallel_size=cfg.generation.tensor_parallel_size,
        gpu_memory_utilization=cfg.generation.gpu_memory_utilization,
    )
