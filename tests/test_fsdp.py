"""The KD loss under FSDP2 (`torch.distributed.fsdp.fully_shard`), two CPU processes (gloo).

With the root module resharded after the forward, the frozen lm_head the loss projects through
is a sharded DTensor; `output_head` all-gathers it. The loss must equal that of the same model
unsharded, computed in the same process. (The backward is not run sharded: FSDP2 reduce-scatters
gradients, which gloo does not implement; the head enters the loss as a detached plain tensor,
so the backward through the loss is the unsharded one.)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from limits import HANG_GUARD_S

TESTS = Path(__file__).parent

SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch, torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from tiny_models import build_tiny_model, build_tokenizer
from ssb.distill.forward import final_hidden_states, output_head
from ssb.distill.losses import chunked_kd_loss

dist.init_process_group("gloo")
rank = dist.get_rank()
tok = build_tokenizer("chatml")
torch.manual_seed(0)
ids = torch.randint(5, len(tok), (2, 12))
mask = torch.ones_like(ids)
reply = torch.zeros_like(ids, dtype=torch.bool)
reply[:, 6:11] = True
vocab = len(tok)
teacher_logp = torch.log_softmax(torch.randn(int(reply.sum()), vocab) * 2, dim=-1)


def loss_of(shard):
    base = build_tiny_model("qwen2", tok, seed=1)
    base.config.tie_word_embeddings = False  # a separate frozen lm_head, sharded on its own
    base.lm_head.weight = torch.nn.Parameter(base.lm_head.weight.detach().clone())
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    if shard:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in base.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh, reshard_after_forward=True)
    hidden = final_hidden_states(model, ids, mask)
    weight_type = type(base.lm_head.weight).__name__
    head = output_head(model)
    out = chunked_kd_loss(hidden[reply], head.weight, {"logp": teacher_logp}, mode="dense",
                          tau=2.0, chunk_size=3)
    loss = out.loss_sum / out.num_tokens
    return float(loss), weight_type, type(head.weight).__name__, head.weight.requires_grad


ref_loss, ref_type, _, _ = loss_of(shard=False)
with torch.no_grad():
    loss, weight_type, gathered_type, gathered_grad = loss_of(shard=True)
if rank == 0:
    json.dump({"ref_loss": ref_loss, "loss": loss, "weight_type": weight_type, "ref_type": ref_type,
               "gathered_type": gathered_type, "gathered_grad": gathered_grad}, open(sys.argv[2], "w"))
# Both ranks finish their collectives before either tears gloo down, and then leave without the
# interpreter's teardown: about one run in thirty, a rank aborted there in gloo's threads
# ("terminate called without an active exception") after its results were complete.
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
import os
os._exit(0)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_kd_loss_under_fsdp2_matches_unsharded(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this Python")
    script = tmp_path / "fsdp2.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [str(torchrun), "--nproc_per_node=2", f"--master_port={free_port()}", str(script)]
    proc = subprocess.run(
        [*cmd, str(TESTS), str(out)], env=env, timeout=HANG_GUARD_S, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    # The sharded run really projected through a sharded head (gathered by output_head).
    assert r["weight_type"] == "DTensor" and r["ref_type"] == "Parameter"
    assert r["gathered_type"] == "Tensor" and r["gathered_grad"] is False
    assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-5)
