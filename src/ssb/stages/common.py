"""What several stages share: the loaded base model (once per process) and seeding."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from ssb.config import Config, to_dict
from ssb.generate import select_backend
from ssb.generate.vllm import vllm_device
from ssb.grading import gold_is_parseable
from ssb.hardware import hardware_info, pick_device, pick_dtype
from ssb.identity import has_adapter, model_identity
from ssb.models import load_model_and_tokenizer, load_tokenizer
from ssb.prompts import ReplyFormat, reply_format
from ssb.rundir import RunDir, RunDirError

log = logging.getLogger("ssb")


@dataclass
class BaseModel:
    model: Any
    tokenizer: Any
    reply: ReplyFormat


_LOADED: dict[str, BaseModel] = {}


def _base_key(cfg: Config) -> str:
    return json.dumps(to_dict(cfg.model), sort_keys=True) + json.dumps(to_dict(cfg.prompt))


def load_base(cfg: Config, rundir: RunDir | None = None, to_shard: bool = False) -> BaseModel:
    """Load the frozen base model and tokenizer once per process (stages of `ssb run` share it).

    `to_shard` (an FSDP2 or ZeRO-3 launch): the weights are loaded into host memory, in the
    dtype the device computes in, and `fully_shard` or `deepspeed.zero.Init` then moves only
    this rank's shard of each parameter onto the device: a 70B model does not fit one 80 GB GPU
    whole."""

    key = _base_key(cfg) + (" on the host, to shard" if to_shard else "")
    device = pick_device(cfg.model.device) if to_shard else None
    if key not in _LOADED:
        release_accelerator()  # keep one model in memory at a time
        placement = (
            {"device": "cpu", "dtype": pick_dtype(cfg.model.dtype, device)} if device else {}
        )
        model, tokenizer = load_model_and_tokenizer(cfg.model, **placement)
        model.eval()
        _LOADED[key] = BaseModel(model, tokenizer, reply_format(tokenizer, cfg.prompt))
    base = _LOADED[key]
    if rundir is not None:
        check_model_identity(rundir, cfg, base.tokenizer)
        param = next(base.model.parameters())
        record_hardware(rundir, device or param.device, param.dtype)
    return base


def load_base_tokenizer(cfg: Config, rundir: RunDir | None = None) -> tuple[Any, ReplyFormat]:
    """The base model's tokenizer and reply format without its weights (a stage whose vLLM engine
    loads the weights itself)."""

    loaded = _LOADED.get(_base_key(cfg))
    tokenizer = loaded.tokenizer if loaded is not None else load_tokenizer(cfg.model)
    if rundir is not None:
        check_model_identity(rundir, cfg, tokenizer)
        # The device the engine computes on: a GPU, or the host with vLLM's CPU build.
        device = torch.device(vllm_device() or "cuda")
        record_hardware(rundir, device, pick_dtype(cfg.model.dtype, device))
    return tokenizer, reply_format(tokenizer, cfg.prompt)


def release_accelerator(why: str = "") -> None:
    """Drop the shared base model and give CUDA's cached blocks back to the device: a vLLM engine
    sizes itself from the memory free when it starts, and a new model should not sit next to
    the old one."""
    _LOADED.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        log.info(
            "GPU memory %s: %.1f of %.1f GiB free", why or "released", free / 2**30, total / 2**30
        )


def record_hardware(rundir: RunDir, device: torch.device, dtype: torch.dtype) -> None:
    """manifest.json `hardware`: the device, dtype, CPU (torch's ISA level, native bf16) and
    threads the run's model computes with, as resolved here (the latest stage's)."""

    info = hardware_info(device, dtype)
    if rundir.read_manifest().get("hardware") != info:
        rundir.update_manifest(hardware=info)


@contextlib.contextmanager
def attached_adapter(model: Any, adapter: Path | None) -> Iterator[Any]:
    """Yield `model` with the adapter at `adapter` on top (eval mode), or `model` itself.

    The LoRA layers are injected into `model` in place and removed again on exit (also on
    error), so the shared base model object is left exactly as it was."""
    if adapter is None:
        yield model
        return

    if hasattr(model, "peft_config"):
        raise RuntimeError("the base model already carries a PEFT adapter; cannot attach another")
    wrapped = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    wrapped.eval()
    try:
        yield wrapped
    finally:
        wrapped.unload()
        model.eval()


@contextlib.contextmanager
def policy_model(cfg: Config, base: BaseModel) -> Iterator[Any]:
    """The model a run samples from and scores with: the base, with `cfg.model.adapter` on top
    (frozen, unmerged) when one is set (the previous round's student in iterated SSB)."""
    adapter = cfg.model.adapter
    if adapter is not None:
        if not has_adapter(adapter):
            raise FileNotFoundError(f"model.adapter: no PEFT adapter in {adapter}")
        log.info("model: base + adapter %s (frozen)", adapter)
    with attached_adapter(base.model, Path(adapter) if adapter else None) as model:
        yield model


def check_model_identity(rundir: RunDir, cfg: Config, tokenizer: Any) -> None:
    """Record the model and tokenizer a run is made with (manifest.json `model_identity`) and
    refuse to continue a run made with another one (unless `--force`): pairs, token ids and
    targets from one tokenizer are meaningless under another."""

    ident = model_identity(cfg.model, tokenizer)
    recorded = rundir.read_manifest().get("model_identity")
    if recorded is not None and recorded != ident and not rundir.force:
        diffs = [
            f"{k}: run has {recorded.get(k)!r}, now {ident.get(k)!r}"
            for k in sorted(set(recorded) | set(ident))
            if recorded.get(k) != ident.get(k)
        ]
        raise RunDirError(
            f"{rundir.path} was made with another model or tokenizer ({'; '.join(diffs)}); "
            "use a new --run-dir, or --force"
        )
    if recorded != ident:
        rundir.update_manifest(model_identity=ident)


def stable_seed(*parts: Any) -> int:
    """A seed derived from values (run seed, problem id, ...), stable across processes and runs
    (Python's hash() is salted per process)."""
    blob = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") & 0x7FFFFFFF


def generation_chunk_size(cfg: Config, samples_per_problem: int) -> int:
    """Problems per generate call (and per crash-safe append) in rollout, bootstrap and eval.

    transformers: four batches of `generation.batch_size` rows, so a kill loses little. vLLM
    schedules its own batches and runs fastest on one large call: thousands of sequences.
    Samples are seeded per problem, so the chunk size never changes what is sampled."""

    if select_backend(cfg.generation.backend) == "vllm":
        return max(1, 4096 // samples_per_problem)
    return max(1, cfg.generation.batch_size // samples_per_problem) * 4


def chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def context_limit(cfg: Config, model_config: Any) -> int | None:
    """The most tokens (prompt + generated) a sequence may have: `model.max_context` when set,
    else the model config's `max_position_embeddings` (None when neither is known)."""
    if cfg.model.max_context:
        return int(cfg.model.max_context)
    text_config = getattr(model_config, "get_text_config", lambda: model_config)()
    limit = getattr(text_config, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


def fits_context(prompt_ids: list[int], max_new_tokens: int, limit: int | None) -> bool:
    """True when the prompt plus `max_new_tokens` generated tokens fit in `limit` tokens."""
    return limit is None or len(prompt_ids) + max_new_tokens <= limit


def fitting_prompts(
    ids: list[str], prompts: list[list[int]], max_new_tokens: int, limit: int | None, stage: str
) -> list[int]:
    """Positions of the prompts that leave room for `max_new_tokens` within `limit` (a model fed
    past its context gives garbage, vLLM refuses it); each skipped problem is logged by id."""
    kept = []
    for i, (pid, prompt) in enumerate(zip(ids, prompts)):
        if fits_context(prompt, max_new_tokens, limit):
            kept.append(i)
        else:
            log.warning(
                "%s: skipping problem %s: prompt of %d tokens + %d new tokens exceeds the "
                "context of %s tokens (model.max_context)",
                stage,
                pid,
                len(prompt),
                max_new_tokens,
                limit,
            )
    return kept


def drop_unparseable_golds(problems: list[Any], stage: str) -> tuple[list[Any], list[str]]:
    """Skip problems whose gold answer math-verify cannot parse (they could only be graded by
    string equality); each is logged. Returns the kept problems and the skipped ids."""

    kept, skipped = [], []
    for problem in problems:
        (kept if gold_is_parseable(problem.answer) else skipped).append(problem)
    for problem in skipped:
        log.warning(
            "%s: skipping problem %s: math-verify cannot parse its gold answer %r",
            stage,
            problem.id,
            problem.answer,
        )
    return kept, [p.id for p in skipped]
