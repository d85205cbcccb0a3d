"""Which model holds the accelerator while a stage generates, and for how long.

Rollout, bootstrap and eval generate; targets, train and GRPO run transformers models. In one
process (`ssb run`) they follow each other, so one place decides what is loaded where:

- **transformers backend** (CPU, or a GPU without vLLM): the shared base model of `load_base`
  generates; each served model's LoRA adapter is attached for its turn and removed after it.
- **vLLM backend**: vLLM loads the weights itself. The stage never loads transformers weights
  (only the tokenizer and the model config). Before the engine starts, whatever transformers model
  an earlier stage left on the GPU is dropped and CUDA's cache is emptied, because vLLM sizes its
  KV cache from the memory free when it starts and refuses to start when less than
  `generation.gpu_memory_utilization` of the device is free. One engine serves every model of the
  stage (the base without a LoRA request, each adapter as its own LoRA request), and it is shut
  down when the stage ends, also on error, so the next stage finds the memory free. On a CPU host
  (vLLM's CPU build) the same holds for host RAM: the engine runs in processes of its own, which
  end with the stage, and its KV cache is sized from the RAM available when it starts
  (`ssb.generate.vllm.cpu_engine_args`).

Usage::

    with generation_engine(cfg, rundir, {"base": None, "student": adapter_dir}) as engine:
        with engine.serving("student") as generator:
            generator.generate(prompts, params)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssb.config import Config
from ssb.generate import (
    Generator,
    SamplingParams,
    VLLMGenerator,
    context_limit,
    make_generator,
    select_backend,
    vllm_context_limit,
)
from ssb.generate.base import Completion, require_finished
from ssb.generate.vllm import vllm_device
from ssb.models import load_model_config
from ssb.prompts import ReplyFormat
from ssb.rundir import RunDir, has_adapter
from ssb.stages.base import BaseModel, attached_adapter, load_base, release_accelerator
from ssb.stages.common import fitting_prompts
from ssb.stages.ranks import cpus_for_this_rank, gpus_for_this_rank

log = logging.getLogger("ssb")


@dataclass
class GenerationEngine:
    """What a generating stage needs: the tokenizer, the reply format, the context limit, and a
    generator for each model it serves (`serving`)."""

    cfg: Config
    tokenizer: Any
    reply: ReplyFormat
    context_limit: int | None
    adapters: dict[str, Path | None]
    base: BaseModel | None = None  # transformers backend
    vllm: VLLMGenerator | None = None  # vLLM backend

    @contextlib.contextmanager
    def serving(self, name: str) -> Iterator[Generator]:
        """A generator for the model named `name` (one of the engine's `adapters` keys)."""
        adapter = self.adapters[name]
        if self.vllm is not None:
            yield self.vllm.serving(name if adapter is not None else None)
            return
        assert self.base is not None
        with attached_adapter(self.base.model, adapter) as model:
            yield make_generator(self.cfg, model, self.tokenizer, self.reply.stop_token_ids)


@contextlib.contextmanager
def generation_engine(
    cfg: Config, rundir: RunDir | None, adapters: Mapping[str, str | Path | None]
) -> Iterator[GenerationEngine]:
    """The engine of one generating stage, serving the models in `adapters` (name -> saved PEFT
    adapter directory, or None for the base model); see the module docstring."""
    served: dict[str, Path | None] = {}
    for name, path in adapters.items():
        if path is not None and not has_adapter(path):
            raise FileNotFoundError(f"{name}: no PEFT adapter in {path}")
        served[name] = Path(path) if path is not None else None
    if select_backend(cfg.generation.backend) == "hf":
        base = load_base(cfg, rundir)
        yield GenerationEngine(
            cfg,
            base.tokenizer,
            base.reply,
            context_limit(cfg, base.model.config),
            served,
            base=base,
        )
        return
    base = load_base(cfg, rundir, weights=False)  # the engine loads the weights itself
    tokenizer, reply = base.tokenizer, base.reply
    # The engine is started for exactly the context the stage checks prompts against.
    limit = vllm_context_limit(cfg, context_limit(cfg, load_model_config(cfg.model)))
    release_accelerator("before the vLLM engine starts")
    if vllm_device() == "cpu":
        cpus_for_this_rank()
    else:
        gpus_for_this_rank(cfg.generation.tensor_parallel_size)
    lora = {name: path for name, path in served.items() if path is not None}
    log.info(
        "vLLM: starting one engine for %s (%d LoRA adapter%s)",
        ", ".join(served) or "the base model",
        len(lora),
        "" if len(lora) == 1 else "s",
    )
    vllm = make_generator(
        cfg, None, tokenizer, reply.stop_token_ids, adapters=lora, max_model_len=limit
    )
    try:
        yield GenerationEngine(cfg, tokenizer, reply, limit, served, vllm=vllm)
    finally:
        vllm.shutdown()
        release_accelerator("after the vLLM engine stopped")


@dataclass
class GenerationStats:
    """What a stage's generation cost: tokens, seconds, prompts skipped as too long."""

    tokens: int = 0
    seconds: float = 0.0
    skipped_long_prompts: int = 0

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"skipped_long_prompts": self.skipped_long_prompts}
        if self.seconds > 0:
            out["tokens_per_second"] = round(self.tokens / self.seconds, 2)
        return out


def generate_chunk(
    engine: GenerationEngine,
    generator: Generator,
    ids: list[str],
    prompts: list[list[int]],
    params: SamplingParams,
    stage: str,
    stats: GenerationStats,
    progress: bool = True,
) -> tuple[list[int], list[list[Completion]]]:
    """One chunk of a generating stage: the prompts that fit the context (the others are logged
    and counted), generated in one call with their own seeds (`params.prompt_seeds`, one per
    prompt), every sample finished (else `GenerationAborted`, and the caller writes nothing).
    Returns the positions of the prompts generated for and their completions."""
    kept = fitting_prompts(ids, prompts, params.max_new_tokens, engine.context_limit, stage)
    stats.skipped_long_prompts += len(prompts) - len(kept)
    if not kept:
        return [], []
    if params.prompt_seeds is not None:
        params = dataclasses.replace(params, prompt_seeds=[params.prompt_seeds[i] for i in kept])
    start = time.perf_counter()
    outputs = generator.generate([prompts[i] for i in kept], params, progress=progress)
    require_finished(outputs, stage)
    stats.seconds += time.perf_counter() - start
    stats.tokens += sum(len(c.token_ids) for outs in outputs for c in outs)
    return kept, outputs
