"""Let accelerate run its DeepSpeed path on CPU processes (gloo), for the ZeRO-3 tests.

With DeepSpeed's CPU accelerator (`DS_ACCELERATOR=cpu`) and an Accelerator not created with
`cpu=True`, accelerate 1.x does set up DeepSpeed on CPU processes: `PartialState.__init__` has
`deepspeed.comm` initialise the process group (gloo) and reports `DistributedType.DEEPSPEED`. But
its backend choice (`_prepare_backend`) knows only GPU-like backends, so on CPU it finds none
and records one process, rank 0, on every rank; DeepSpeed's batch-size check and the Trainer's
data split then fail or silently train each rank on all the data. A launched test script calls
`allow_deepspeed_on_cpu()` before anything builds an Accelerator: when DeepSpeed has set up the
group and accelerate found no backend, the state records the group's backend, size and this
rank, exactly what it records on GPUs. Everything after that (accelerate's `_prepare_deepspeed`,
the Trainer's DeepSpeed checkpointing, ssb's code) runs unmodified. The tests check that
parameters really are partitioned, so this switch cannot silently stop working.
"""

from __future__ import annotations

import os


def allow_deepspeed_on_cpu() -> None:
    import torch.distributed as dist
    from accelerate.state import PartialState

    original = PartialState.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.backend is None and dist.is_initialized():
            self.backend = dist.get_backend()
            self.num_processes = dist.get_world_size()
            self.process_index = dist.get_rank()
            self.local_process_index = int(os.environ.get("LOCAL_RANK", "0"))

    PartialState.__init__ = init
