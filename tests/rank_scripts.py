"""What the scripts that the two-rank tests launch run in each process (each script puts this
folder on its path first): the KD tests' batch, a LoRA model whose lora_B is not zero, the chunked
KD loss through the model's (gathered) output head, and a clean exit."""

from __future__ import annotations

import functools
import os
import sys

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model

from ssb.bench.random_models import build_tokenizer
from ssb.distill.forward import final_hidden_states, output_head
from ssb.distill.losses import chunked_kd_loss


@functools.cache
def tokenizer():
    return build_tokenizer("chatml")


def kd_batch() -> dict[str, torch.Tensor]:
    """Two rows of 12 random tokens, replies at positions 6-10, dense teacher log-probs."""
    torch.manual_seed(0)
    ids = torch.randint(5, len(tokenizer()), (2, 12))
    reply = torch.zeros_like(ids, dtype=torch.bool)
    reply[:, 6:11] = True
    teacher = torch.randn(int(reply.sum()), len(tokenizer())) * 2
    return {
        "ids": ids,
        "mask": torch.ones_like(ids),
        "reply": reply,
        "teacher_logp": torch.log_softmax(teacher, dim=-1),
    }


def lora_model(base: torch.nn.Module) -> torch.nn.Module:
    """r=4 LoRA on q/v with seeded non-zero lora_B, so the adapter changes the loss."""
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return model


def kd_loss(
    runner: torch.nn.Module, model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> float:
    """Mean dense KD loss (tau 2, chunks of 3 tokens) of `runner`'s forward (the model itself or
    an engine wrapping it) through `model`'s output head, as the train stage computes it."""
    hidden = final_hidden_states(runner, batch["ids"], batch["mask"])
    head = output_head(model)
    out = chunked_kd_loss(
        hidden[batch["reply"]],
        head.weight,
        {"logp": batch["teacher_logp"]},
        mode="dense",
        tau=2.0,
        chunk_size=3,
    )
    return float(out.loss_sum / out.num_tokens)


def finish() -> None:
    """Both ranks finish their collectives before either tears gloo down, and then leave without
    the interpreter's teardown: about one run in thirty, a rank aborted there in gloo's threads
    ("terminate called without an active exception") after its results were complete."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
