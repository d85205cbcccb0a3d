"""Parameter sharding over the processes of a launch: which kind a launch asks for (FSDP2,
DeepSpeed ZeRO-3, and the ones ssb refuses), sharding a frozen model for teacher scoring,
gathering a sharded parameter, and the LoRA weights' full state dict for saving an adapter.

Under FSDP2 (`torch.distributed.fsdp.fully_shard`, `examples/accelerate_fsdp.yaml`) every
parameter is a DTensor holding 1/world of the tensor on each rank. Under ZeRO-3
(`examples/accelerate_zero3.yaml`) every parameter stays an `nn.Parameter` whose data is empty
at rest; DeepSpeed keeps this rank's 1/world slice in `param.ds_tensor` (the whole size in
`param.ds_numel`) and gathers the whole tensor around each module's forward. Parameters smaller
than `stage3_param_persistence_threshold` (10 x hidden size, as transformers sets it) stay whole
on every rank as well. accelerate shards the model when the Trainer prepares it (`ssb train`);
`ssb targets` has no Trainer and shards the frozen model here (accelerate's own
`fsdp2_prepare_model`, or a DeepSpeed engine without an optimizer). The rest of ssb sees
sharding only through the functions below.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

FSDP2 = "fsdp2"
ZERO3 = "zero3"


def requested_sharding() -> str | None:
    """What the current `accelerate launch` config asks for: "fsdp2", "fsdp1", "zero3", or None
    (one process, DDP, ZeRO-1/2: every rank holds the whole model)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return FSDP2 if os.environ.get("FSDP_VERSION", "1") == "2" else "fsdp1"
    if deepspeed_launch():
        return ZERO3 if deepspeed_zero_stage() == 3 else None
    return None


def launch_sharding() -> str | None:
    """`requested_sharding()` for `ssb targets` and `ssb train`: "fsdp2", "zero3" or None,
    refusing with the reason what ssb does not run (FSDP1; ZeRO-3 without DeepSpeed)."""
    kind = requested_sharding()
    if kind == "fsdp1":
        raise ValueError(
            "FSDP version 1: ssb supports FSDP2 only (fully_shard, DTensor parameters); set "
            "`fsdp_version: 2` in the accelerate config (examples/accelerate_fsdp.yaml)"
        )
    if kind == ZERO3 and importlib.util.find_spec("deepspeed") is None:
        raise ImportError(
            "the launch asks for DeepSpeed ZeRO-3 but deepspeed is not installed: "
            "`pip install 'ssb[deepspeed]'` (examples/accelerate_zero3.yaml)"
        )
    return kind


def deepspeed_launch() -> bool:
    """Whether `accelerate launch` runs DeepSpeed (any ZeRO stage). The Trainer must then not be
    told `use_cpu` on a machine without GPUs: accelerate would build a plain gloo (MULTI_CPU)
    group and train without DeepSpeed."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


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


def is_zero3_parameter(param: torch.Tensor) -> bool:
    """Whether DeepSpeed ZeRO-3 holds `param` partitioned (it then carries a `ds_id`)."""
    return hasattr(param, "ds_id")


def is_sharded(model: Any) -> bool:
    """Whether any parameter of `model` is a DTensor (sharded by FSDP2) or partitioned by
    ZeRO-3."""

    return any(isinstance(p, DTensor) or is_zero3_parameter(p) for p in model.parameters())


def full_parameter(param: torch.Tensor) -> torch.Tensor:
    """`param` itself, or, when it is sharded, the whole tensor gathered and detached: a DTensor
    (FSDP2, e.g. the root module's lm_head once the forward has resharded it) all-gathered, or a
    ZeRO-3 parameter gathered with DeepSpeed's own `GatheredParameters` and copied out before
    DeepSpeed frees its gathered data again (the copy lives as long as the caller's micro-batch
    graph, then goes). The lm_head is frozen, so the loss needs its value, not a gradient for it.
    The gather is a collective: every rank calls this the same number of times (once per loss or
    per scored batch)."""

    if isinstance(param, DTensor):
        return param.full_tensor().detach()
    if is_zero3_parameter(param):
        import deepspeed  # noqa: PLC0415 -- optional; only a ZeRO-3 launch has such parameters

        with deepspeed.zero.GatheredParameters([param]):
            return param.detach().clone()
    return param


def shard_report(model: Any) -> dict[str, Any]:
    """How `model`'s parameters are held on this rank at rest: counts and elements, whole and
    local (a sharded run reports it, and the tests check that sharding really happened). Every
    FSDP unit is resharded first: accelerate keeps the output-layer unit gathered from a forward
    to its backward, and a no-grad forward has no backward."""

    if any(is_zero3_parameter(p) for p in model.parameters()):
        return _zero3_report(model)
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


def _zero3_report(model: Any) -> dict[str, Any]:
    """`shard_report` under ZeRO-3: what each parameter holds at rest on this rank is its slice
    (`ds_tensor`) plus, for a persistent (small) parameter, its whole data."""
    params = list(model.parameters())
    persistent = [p for p in params if getattr(p, "ds_persist", False)]
    partitioned = [p for p in params if not getattr(p, "ds_persist", False)]
    return {
        "kind": ZERO3,
        "parameters": len(params),
        "sharded_parameters": sum(is_zero3_parameter(p) for p in params),
        # Kept whole on every rank (numel <= stage3_param_persistence_threshold): norms, biases,
        # small LoRA matrices.
        "persistent_parameters": len(persistent),
        "elements": sum(p.ds_numel for p in params),
        "local_elements": sum(p.ds_tensor.numel() + p.data.numel() for p in params),
        # Every other parameter holds only its slice: no data outside the forward that uses it.
        "all_local_smaller": all(
            p.data.numel() == 0 and p.ds_tensor.numel() < p.ds_numel for p in partitioned
        ),
    }


def trainable_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The trainable parameters (the LoRA weights) as whole tensors on rank 0's CPU, under their
    usual names; an empty dict on the other ranks. A collective: every rank calls it. Frozen
    parameters are not gathered (`ignore_frozen_params`; under ZeRO-3 only the trainable ones
    are passed to `GatheredParameters`), so rank 0 never holds the base model."""

    if any(is_zero3_parameter(p) for p in model.parameters()):
        import deepspeed  # noqa: PLC0415 -- optional; only a ZeRO-3 launch has such parameters

        trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
        with deepspeed.zero.GatheredParameters(list(trainable.values())):
            if torch.distributed.get_rank() != 0:
                return {}
            return {name: p.detach().to("cpu", copy=True) for name, p in trainable.items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)


def shard_for_scoring(model: Any) -> Any:
    """`model` sharded for a no-grad teacher forward, in place: with FSDP2 exactly as accelerate
    shards a model it prepares for training (one unit per decoder layer, the output layer and
    final norm as one unit, then the root); under ZeRO-3 by a DeepSpeed engine without an
    optimizer (`zero3_for_scoring`). Every rank must then run the same number of forwards."""

    if requested_sharding() == ZERO3:
        return zero3_for_scoring(model)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if not accelerator.is_fsdp2:
        raise RuntimeError(
            f"the launch asks for FSDP2 but accelerate runs {accelerator.distributed_type}"
        )
    return fsdp2_prepare_model(accelerator, model)


def zero3_sizes(hidden: int) -> dict[str, int]:
    """The ZeRO-3 sizes transformers' Trainer derives from the hidden size for "auto" (its
    `HfTrainerDeepSpeedConfig`), so `ssb targets` partitions the teacher as `ssb train` does the
    student. The persistence threshold decides what is partitioned at all: parameters up to
    10 x hidden elements (norms, biases, LoRA matrices of small rank) stay whole on every rank;
    DeepSpeed's own default (1e5 elements) would keep every tensor of a small model whole."""
    return {
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }


def size_zero3_as_transformers(accelerator: Any) -> None:
    """Under a ZeRO-3 launch, mark the sizes of `zero3_sizes` that the launch's config leaves out
    as "auto", so the Trainer fills them from the model when it starts DeepSpeed (an accelerate
    YAML config cannot set them, and DeepSpeed's defaults would differ from `ssb targets`'s).
    Call after the Trainer is built and before it trains."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        return
    zero = plugin.deepspeed_config["zero_optimization"]
    for key in zero3_sizes(1):
        zero.setdefault(key, "auto")


def _zero3_config(model: Any) -> dict[str, Any]:
    """A DeepSpeed config for partitioning `model` outside the Trainer: the launch's ZeRO
    settings (accelerate's DeepSpeed plugin reads them from its config) with the sizes the
    Trainer would fill in (`zero3_sizes`); the batch size is DeepSpeed's bookkeeping only."""
    zero = dict(DeepSpeedPlugin().deepspeed_config["zero_optimization"])
    # The optimizer's offload is the Trainer's business; saving is ssb's (`save_adapter`).
    for key in ("offload_optimizer", "stage3_gather_16bit_weights_on_model_save"):
        zero.pop(key, None)
    hidden = int(model.config.get_text_config().hidden_size)
    for key, value in zero3_sizes(hidden).items():
        if zero.get(key, "auto") == "auto":
            zero[key] = value
    dtype = next(model.parameters()).dtype
    return {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 2**62,
    }


def partition_for_zero3(model: Any) -> None:
    """Partition `model`'s parameters in place with `deepspeed.zero.Init(module=...)`: one
    parameter at a time is moved to this rank's device, broadcast from rank 0 and cut to this
    rank's slice. ssb loads the base whole into host memory (`load_base(to_shard=True)`); left
    whole, DeepSpeed's engine would first move the whole model onto the device
    (`module.to(device)`, skipped only for a model already partitioned), which a base larger
    than one GPU does not survive. A collective: every rank calls it."""
    import deepspeed  # noqa: PLC0415 -- optional; only a ZeRO-3 launch gets here

    dtype = next(model.parameters()).dtype
    config = _zero3_config(model)
    # mem_efficient_linear would replace torch.nn.functional.linear for the whole process.
    deepspeed.zero.Init(
        module=model, config_dict_or_path=config, dtype=dtype, mem_efficient_linear=False
    )


def zero3_for_scoring(model: Any) -> Any:
    """A DeepSpeed ZeRO-3 engine around the frozen `model` (no optimizer: DeepSpeed's ZeRO
    inference), its parameters partitioned in place first (`partition_for_zero3`). The engine's
    forward is the model's, with DeepSpeed gathering each module's parameters around it."""
    import deepspeed  # noqa: PLC0415 -- optional; only a ZeRO-3 launch gets here

    config = _zero3_config(model)
    partition_for_zero3(model)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine
