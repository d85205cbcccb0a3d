"""Let accelerate run its FSDP2 path on CPU processes (gloo), for the sharding tests.

accelerate 1.x enables FSDP only for GPU-like devices: `AcceleratorState.__init__` sets
`DistributedType.FSDP` inside its MULTI_GPU/MULTI_XPU/... branch, so on CPU an FSDP config
quietly becomes DDP (MULTI_CPU). Nothing in its FSDP2 code needs a GPU (fully_shard, DTensor and
torch.distributed.checkpoint run on gloo), so a launched test script calls
`allow_fsdp_on_cpu()` before anything builds an Accelerator: when accelerate has set up a
MULTI_CPU group and an FSDP plugin was configured, the state is switched to FSDP, exactly what
it is on GPUs. Everything after that (accelerate's `fsdp2_prepare_model`, the Trainer's FSDP
checkpointing, ssb's code) runs unmodified. The tests check that parameters really are
sharded, so this switch cannot silently stop working.
"""

from __future__ import annotations


def allow_fsdp_on_cpu() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init
