"""The loaded base: the frozen model, its tokenizer and reply format, what it is (its identity)
and what it computes on (its hardware record), loaded once per process and recorded in the run.

`load_base` is the one entry. With a run directory it records manifest.json `model_identity`
(refusing a run made with another model or tokenizer) and `hardware`. `policy_model` puts the
run's adapter on top (`model.adapter`: the previous round's student in iterated SSB).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from ssb.config import Config, to_dict
from ssb.generate.vllm import vllm_device
from ssb.hardware import hardware_info, pick_device, pick_dtype
from ssb.identity import model_identity
from ssb.models import load_model_and_tokenizer, load_tokenizer
from ssb.prompts import ReplyFormat, reply_format
from ssb.rundir import RunDir, RunDirError, has_adapter

log = logging.getLogger("ssb")


@dataclass
class BaseModel:
    """The frozen base a stage works with, and what the run records of it."""

    model: Any  # None when a vLLM engine loads the weights itself (`weights=False`)
    tokenizer: Any
    reply: ReplyFormat
    identity: dict[str, Any]  # manifest.json `model_identity`
    hardware: dict[str, Any]  # manifest.json `hardware`: device, dtype, CPU, threads, as now


# The weights and tokenizer of each model, prompt and placement loaded in this process.
_LOADED: dict[str, tuple[Any, Any]] = {}


def _base_key(cfg: Config) -> str:
    return json.dumps(to_dict(cfg.model), sort_keys=True) + json.dumps(to_dict(cfg.prompt))


def load_base(
    cfg: Config, rundir: RunDir | None = None, to_shard: bool = False, weights: bool = True
) -> BaseModel:
    """The base model and tokenizer, loaded once per process (stages of `ssb run` share it).

    `to_shard` (an FSDP2 or ZeRO-3 launch): the weights are loaded into host memory, in the
    dtype the device computes in, and `fully_shard` or `deepspeed.zero.Init` then moves only
    this rank's shard of each parameter onto the device: a 70B model does not fit one 80 GB GPU
    whole. `weights=False` (a stage whose vLLM engine loads the weights itself): the tokenizer
    alone, and the engine's device."""

    if weights:
        device = pick_device(cfg.model.device) if to_shard else None
        key = _base_key(cfg) + (" on the host, to shard" if to_shard else "")
        if key not in _LOADED:
            release_accelerator()  # keep one model in memory at a time
            placement = (
                {"device": "cpu", "dtype": pick_dtype(cfg.model.dtype, device)} if device else {}
            )
            model, tokenizer = load_model_and_tokenizer(cfg.model, **placement)
            _LOADED[key] = (model.eval(), tokenizer)
        model, tokenizer = _LOADED[key]
        param = next(model.parameters())
        device, dtype = device or param.device, param.dtype
    else:
        loaded = _LOADED.get(_base_key(cfg))
        model, tokenizer = None, loaded[1] if loaded is not None else load_tokenizer(cfg.model)
        # The device the engine computes on: a GPU, or the host with vLLM's CPU build.
        device = torch.device(vllm_device() or "cuda")
        dtype = pick_dtype(cfg.model.dtype, device)
    base = BaseModel(
        model,
        tokenizer,
        identity=model_identity(cfg.model, tokenizer),
        reply=reply_format(tokenizer, cfg.prompt),
        hardware=hardware_info(device, dtype),
    )
    if rundir is not None:
        check_model_identity(rundir, base.identity)
        if rundir.read_manifest().get("hardware") != base.hardware:
            rundir.update_manifest(hardware=base.hardware)
    return base


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


def check_model_identity(rundir: RunDir, ident: dict[str, Any]) -> None:
    """Record the model and tokenizer a run is made with (manifest.json `model_identity`,
    `ssb.identity.model_identity`) and refuse to continue a run made with another one (unless
    `--force`): pairs, token ids and targets from one tokenizer are meaningless under another."""

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
