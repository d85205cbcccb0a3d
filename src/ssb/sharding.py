"""Parameter sharding over the processes of a launch: which kind a launch asks for (FSDP2, and
the ones ssb refuses), sharding a frozen model for teacher scoring, gathering a sharded parameter,
and the LoRA weights' full state dict for saving an adapter.

Under FSDP2 (`torch.distributed.fsdp.fully_shard`, `examples/accelerate_fsdp.yaml`) every
parameter is a DTensor holding 1/world of the tensor on each rank. accelerate shards the model
when the Trainer prepares it (`ssb train`); `ssb targets` has no Trainer and shards the frozen
model here the same way (accelerate's own `fsdp2_prepare_model`). The rest of ssb sees sharding
only through the functions below.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

FSDP2 = "fsdp2"


def requested_sharding() -> str | None:
    """What the current `accelerate launch` config asks for: "fsdp2", "fsdp1", "zero3", or None
    (one process, DDP, ZeRO-1/2: every rank holds the whole model)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return FSDP2 if os.environ.get("FSDP_VERSION", "1") == "2" else "fsdp1"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "zero3" if deepspeed_zero_stage() == 3 else None
    return None


def launch_sharding() -> str | None:
    """`requested_sharding()` for `ssb targets` and `ssb train`: "fsdp2" or None, refusing with
    the reason what ssb does not run."""
    kind = requested_sharding()
    if kind == "fsdp1":
        raise ValueError(
            "FSDP version 1: ssb supports FSDP2 only (fully_shard, DTensor parameters); set "
            "`fsdp_version: 2` in the accelerate config (examples/accelerate_fsdp.yaml)"
        )
    if kind == "zero3":
        raise NotImplementedError(
            "DeepSpeed ZeRO-3 is not supported yet: ssb's chunked KD loss projects through "
            "the frozen lm_head outside the model's forward, and ZeRO-3 partitions it; the "
            "gather (deepspeed.zero.GatheredParameters), the adapter's gather for saving and a "
            "ZeRO-3 teacher for `ssb targets` are not written or tested. Use FSDP2 to shard "
            "parameters (examples/accelerate_fsdp.yaml), or "
            "ZeRO-2 when the model fits one GPU (examples/accelerate_zero2.yaml)"
        )
    return kind


def deepspeed_zero_stage() -> int | None:
    """The ZeRO stage of a DeepSpeed launch: from accelerate's config (`zero_stage`), or from the
    DeepSpeed JSON config file it names."""
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage:
        return int(stage)
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if config_file and Path(config_file).is_file():
        stage = json.loads(Path(config_file).read_text()).get("zero_optimization", {}).get("stage")
        return None if stage in (None, "auto") else int(stage)
    return None


def is_sharded(model: Any) -> bool:
    """Whether any parameter of `model` is a DTensor (sharded by FSDP2)."""

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_parameter(param: torch.Tensor) -> torch.Tensor:
    """`param` itself, or, when FSDP2 holds it sharded (a DTensor, e.g. the root module's lm_head
    once the forward has resharded it), the whole tensor all-gathered and detached. The lm_head is
    frozen, so the loss needs its value, not a gradient for it. The gather is a collective: every
    rank calls this the same number of times (once per loss or per scored batch)."""

    if isinstance(param, DTensor):
        return param.full_tensor().detach()
    return param


def shard_report(model: Any) -> dict[str, Any]:
    """How `model`'s parameters are held on this rank at rest: counts and elements, whole and
    local (a sharded run reports it, and the tests check that sharding really happened). Every
    FSDP unit is resharded first: accelerate keeps the output-layer unit gathered from a forward
    to its backward, and a no-grad forward has no backward."""

    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for unit in units:
        unit.reshard()
    params = list(model.parameters())
    dtensors = [p for p in params if isinstance(p, DTensor)]
    return {
        # FSDP units, each gathered whole only while it computes: one per decoder layer, the
        # output layer's, the root's.
        "units": len(units),
        "parameters": len(params),
        "sharded_parameters": len(dtensors),
        "elements": sum(p.numel() for p in params),
        "local_elements": sum(
            p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params
        ),
        # Every sharded parameter's local piece is smaller than the whole tensor (dim 0 split).
        "all_local_smaller": all(p.to_local().numel() < p.numel() for p in dtensors),
    }


def trainable_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The trainable parameters (the LoRA weights) as whole tensors on rank 0's CPU, under their
    usual names; an empty dict on the other ranks. A collective: every rank calls it. Frozen
    parameters are not gathered (`ignore_frozen_params`), so rank 0 never holds the base model."""

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)


def shard_for_scoring(model: Any) -> Any:
    """`model` sharded with FSDP2 in place, exactly as accelerate shards a model it prepares for
    training (one unit per decoder layer, the output layer and final norm as one unit, then the
    root), for a no-grad teacher forward. Every rank must then run the same number of forwards."""

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if not accelerator.is_fsdp2:
        raise RuntimeError(
            f"the launch asks for FSDP2 but accelerate runs {accelerator.distributed_type}"
        )
    return fsdp2_prepare_model(accelerator, model)
