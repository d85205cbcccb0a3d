"""The KD training step child (forward + backward), run by ``kd_memory`` and ``gpu``.

Two variants on a random-init Qwen2-architecture model with LoRA:

- ``reference``: the BASELINE, the reference implementation's approach, rebuilt here (it is not
  ssb's code): its collator copies per-example float32 ``(R, V)`` teacher logits into a zero
  ``(B, S, V)`` float32 tensor, the model returns full logits, and the loss is
  ``kl_div(log_softmax(s/T), softmax(t/T), batchmean) * T^2`` on the reply positions.
- ``ours``: ssb's training code itself: top-k targets written by `TargetWriter` and read back by
  `ssb.stages.train.DistillCollator`, the loss from `ssb.stages.train.distillation_loss` (what
  `SSBTrainer.compute_loss` calls), normalised by the batch's reply tokens as `compute_loss` does
  when called outside Trainer's accumulation.

Each sequence is ``S`` random tokens, its second half the reply (end token included).
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

from ssb.bench.children import peak_rss_kb, prefer_oom_kill, reset_peak_rss, rss_kb
from ssb.bench.sizes import TAU

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def qwen2_config(spec: dict[str, Any], **extra: Any) -> Any:
    """A `Qwen2Config` of the shape in `spec` (vocab, hidden, intermediate, layers, heads,
    kv_heads), tied embeddings, room for twice ``spec["seq"]``; `extra` sets further fields."""
    from ssb.bench.random_models import model_config

    positions = max(4096, spec.get("seq", 0) * 2)
    return model_config("qwen2", spec, max_position_embeddings=positions, **extra)


def build_qwen2(spec: dict[str, Any], device: Any, dtype: Any) -> Any:
    """The random-init model of `spec`'s shape; with ``lora_r``, a PEFT LoRA student on all 7
    projections in training mode (activation checkpointing with ``gradient_checkpointing``)."""
    from peft import LoraConfig, get_peft_model

    from ssb.bench.random_models import random_model
    from ssb.models import enable_checkpointing

    model = random_model(
        qwen2_config(spec, use_cache=False),
        seed=spec.get("seed", 0),
        dtype=dtype,
        device=device,
        attn_implementation="sdpa",
    )
    if not spec.get("lora_r"):
        return model
    lora = LoraConfig(
        r=spec["lora_r"],
        lora_alpha=spec["lora_r"],
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    if spec.get("gradient_checkpointing"):
        enable_checkpointing(model, {"use_reentrant": False})
    model.train()
    return model


def _random_topk(gen: Any, rows: int, k: int, vocab: int) -> dict[str, Any]:
    """Top-k targets with the right shapes and a valid distribution (distinct ids per row)."""
    import torch

    step = max(1, vocab // k)
    start = torch.randint(0, vocab, (rows, 1), generator=gen)
    ids = (start + torch.arange(k) * step) % vocab
    probs = torch.rand(rows, k + 1, generator=gen) ** 4
    probs = probs / probs.sum(-1, keepdim=True)
    top, _ = probs[:, :k].sort(dim=-1, descending=True)
    return {"ids": ids, "logp": top.log(), "tail": probs[:, k].log()}


class _ReferenceStep:
    """BASELINE: the reference implementation's collator and loss (dense teacher logits, full
    student logits), rebuilt for comparison. Not ssb's code path."""

    def __init__(self, model: Any, vocab: int, device: Any, gen: Any) -> None:
        self.model, self.vocab, self.device, self.gen = model, vocab, device, gen

    def data(self, ids: Any) -> dict[str, Any]:
        return {"ids": ids}

    def collate(self, data: dict[str, Any]) -> dict[str, Any]:
        # Per-example float32 (R, V) teacher logits (loaded from npz there; random here) copied
        # into a zero (B, S, V) float32 tensor at the label rows.
        import torch

        from ssb.stages.train import IGNORE

        ids = data["ids"]
        b, s = ids.shape
        reply, prompt = s // 2, s - s // 2
        loaded = [torch.randn(reply, self.vocab, generator=self.gen) for _ in range(b)]
        labels = torch.full((b, s), IGNORE, dtype=torch.long)
        teacher = torch.zeros((b, s, self.vocab), dtype=torch.float32)
        for i in range(b):
            start = prompt - 1
            labels[i, start : start + reply] = ids[i, prompt:]
            teacher[i, start : start + reply] = loaded[i]
        del loaded
        return {
            "input_ids": ids.clone(),
            "attention_mask": torch.ones((b, s), dtype=torch.long),
            "labels": labels,
            "teacher_logits": teacher,
        }

    def step(self, batch: dict[str, Any]) -> float:
        # The reference's compute_loss + kd_loss_fn: full logits, log-softmax / softmax over the
        # whole (B, S, V) tensors, then the reply positions are selected.
        import torch
        import torch.nn.functional as F

        from ssb.stages.train import IGNORE

        batch = {key: value.to(self.device) for key, value in batch.items()}
        teacher_logits = batch.pop("teacher_logits")
        labels = batch.pop("labels")
        logits = self.model(**batch).logits
        teacher_logits = teacher_logits.to(device=logits.device, dtype=torch.float32)
        mask = labels != IGNORE
        student_logp = F.log_softmax(logits / TAU, dim=-1)
        with torch.no_grad():
            teacher_p = F.softmax(teacher_logits / TAU, dim=-1)
        v = student_logp.shape[-1]
        flat = mask.view(-1)
        loss = F.kl_div(
            student_logp.view(-1, v)[flat], teacher_p.view(-1, v)[flat], reduction="batchmean"
        ) * (TAU * TAU)
        loss.backward()
        return float(loss)


class _SSBStep:
    """ssb's own training path: `DistillCollator` over stored top-k targets, then
    `distillation_loss` (the function `SSBTrainer.compute_loss` calls)."""

    def __init__(self, model: Any, spec: dict[str, Any], device: Any, gen: Any) -> None:
        from ssb.config import LossConfig

        self.model, self.device, self.gen = model, device, gen
        self.vocab, self.k, self.store_root = spec["vocab"], spec["topk"], Path(spec["tmp"])
        # The paper's loss (forward KL at tau=2 with tau^2, KD only) at the bench's chunk size.
        self.loss_config = LossConfig(temperature=TAU, chunk_size=spec.get("chunk_size"))

    def data(self, ids: Any) -> dict[str, Any]:
        # pairs.jsonl-like records (prompt = first half, reply + end token = second half) and
        # their targets stored the way `ssb targets` stores them.
        from ssb.distill.store import TargetReader, TargetWriter

        b, s = ids.shape
        prompt = s - s // 2
        pairs = [
            {
                "id": f"e{i}",
                "student_prompt_ids": ids[i, :prompt].tolist(),
                "reply_ids": ids[i, prompt:-1].tolist(),
                "end_token_id": int(ids[i, -1]),
            }
            for i in range(b)
        ]
        store = self.store_root / f"targets-{b}x{s}"
        meta = {"tau": TAU, "topk": self.k, "vocab_size": self.vocab}
        with TargetWriter(store, "topk", meta) as writer:
            for i, pair in enumerate(pairs):
                tensors = _random_topk(self.gen, s - prompt, self.k, self.vocab)
                writer.add(pair["id"], ids[i, prompt:].tolist(), tensors)
        return {"pairs": pairs, "reader": TargetReader(store)}

    def collate(self, data: dict[str, Any]) -> dict[str, Any]:
        from ssb.stages.train import DistillCollator

        return DistillCollator(pad_id=0, mode="topk", reader=data["reader"])(data["pairs"])

    def step(self, batch: dict[str, Any]) -> float:
        import torch

        from ssb.distill.losses import normalise
        from ssb.stages.train import distillation_loss

        # What Trainer's _prepare_inputs does: tensors to the model's device.
        batch = {
            key: value.to(self.device) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()
        }
        out = distillation_loss(self.model, batch, self.loss_config, "topk")
        loss = normalise(out.loss_sum, out.num_tokens)
        loss.backward()
        return float(loss)


def child_kd_step(spec: dict[str, Any]) -> dict[str, Any]:
    """One KD training step (forward + backward) of ``spec["variant"]``, timed and its peak
    memory measured, ``spec["repeats"]`` times after a warm-up at a tiny size."""
    import torch

    device = torch.device(spec.get("device", "cpu"))
    cuda = device.type == "cuda"
    prefer_oom_kill()
    variant, batch_size, seq = spec["variant"], spec["batch"], spec["seq"]
    vocab = spec["vocab"]
    model = build_qwen2(spec, device, torch.bfloat16)
    gen = torch.Generator().manual_seed(spec.get("seed", 0) + 1)
    if variant == "reference":
        side: Any = _ReferenceStep(model, vocab, device, gen)
    else:
        side = _SSBStep(model, spec, device, gen)

    def make_data(b: int, s: int) -> dict[str, Any]:
        return side.data(torch.randint(0, vocab, (b, s), generator=gen))

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    # Warm-up at a tiny size: lazy initialisation and first-call costs stay out of the numbers.
    warm = make_data(1, 32)
    side.step(side.collate(warm))
    model.zero_grad(set_to_none=True)
    data = make_data(batch_size, seq)
    del warm
    gc.collect()

    runs = []
    for _ in range(spec.get("repeats", 1)):
        model.zero_grad(set_to_none=True)
        gc.collect()
        rss0 = rss_kb()
        reset_ok = reset_peak_rss()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            cuda0 = torch.cuda.memory_allocated()
        sync()
        t0 = time.perf_counter()
        batch = side.collate(data)
        t1, c1 = time.perf_counter(), time.process_time()
        loss = side.step(batch)
        sync()
        t2, c2 = time.perf_counter(), time.process_time()
        run = {
            "collate_s": t1 - t0,
            "step_s": t2 - t1,
            "step_cpu_s": c2 - c1,
            "loss": loss,
            "rss_before_mb": rss0 / 1024,
            "peak_rss_delta_mb": (peak_rss_kb() - rss0) / 1024,
            "peak_reset": reset_ok,
        }
        if cuda:
            run["peak_cuda_delta_mb"] = (torch.cuda.max_memory_allocated() - cuda0) / 2**20
        runs.append(run)
        del batch
    base = model.get_base_model()
    n_params = sum(p.numel() for p in base.parameters())
    n_embed = base.get_input_embeddings().weight.numel()
    result = {
        "variant": variant,
        "device": str(device),
        "batch": batch_size,
        "seq": seq,
        "reply_tokens": batch_size * (seq // 2),
        "vocab": vocab,
        "topk": spec["topk"] if variant == "ours" else None,
        "runs": runs,
        "step_s": min(r["step_s"] for r in runs),
        "step_cpu_s": min(r["step_cpu_s"] for r in runs),
        "collate_s": min(r["collate_s"] for r in runs),
        "peak_rss_delta_mb": max(r["peak_rss_delta_mb"] for r in runs),
        "params_non_embedding": n_params - n_embed,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "torch_threads": torch.get_num_threads(),
    }
    if cuda:
        result["peak_cuda_delta_mb"] = max(r["peak_cuda_delta_mb"] for r in runs)
        result["device_name"] = torch.cuda.get_device_name()
    return result
