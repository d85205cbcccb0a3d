"""`ssb diagnose`: the teacher-signal diagnostic of a run, before any training.

For every pair: the hinted teacher's distributions on the reply rows at temperature 1 (from the
stored `hidden` or `dense` targets, exactly as the loss reads them; in `topk` and `online` modes
from a forward of the frozen base over `[teacher prompt || reply + end]`, since top-k targets
lose the tail and online ones are not stored) against the untrained student's (one forward of
the base, with `model.adapter` on top when set, over `[student prompt || reply + end]`), summed
by `ssb.distill.signal.SignalSums`. Then the cosine between the KD and the CE gradient of a fresh
seeded LoRA student (`student_model`) over a few batches, through the training loss itself
(`distillation_loss`), so it measures what the first step of training would do.

Writes diagnostics/teacher_signal.json (atomically; a re-run rewrites it) and warns in one line
when the teacher carries no advantage. `ssb targets` runs it at its end (`targets.diagnose`).
"""

from __future__ import annotations

import dataclasses
import os
import random
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ssb.config import Config, LossConfig
from ssb.distill.forward import output_head
from ssb.distill.hint_leaks import leak_rows
from ssb.distill.signal import SignalSums
from ssb.distill.store import TargetReader
from ssb.rundir import RunDir, atomic_write_json
from ssb.stages.base import load_base, policy_model
from ssb.stages.common import chunks, log
from ssb.stages.lora_training import restore_base
from ssb.stages.targets import (
    SCORE_CHUNK,
    check_prompts,
    reply_hidden_rows,
    run_targets,
    student_sequence,
    teacher_sequence,
)
from ssb.stages.train import (
    IGNORE,
    DistillCollator,
    distillation_loss,
    load_targets,
    student_model,
    target_filter_table,
)
from ssb.target_modes import TARGET_MODES

# Where the teacher's distributions come from, by targets.mode.
TEACHER_SOURCES = {
    "hidden": "stored hidden targets, projected through the frozen output head",
    "dense": "stored dense targets, rescaled to temperature 1",
    "topk": "a forward of the frozen base over [teacher prompt || reply + end] (top-k targets "
    "lose the tail)",
    "online": "a forward of the frozen base over [teacher prompt || reply + end] (online "
    "targets are not stored)",
}


def stored_teacher_logp(reader: TargetReader, mode: str, head: Any) -> Any:
    """A function from one pair's stored target rows to (R, V) log-probs at temperature 1:
    hidden states through the frozen head (as the loss does), or dense log-probs stored at
    tau rescaled (tau * log softmax(z / tau) is z up to a constant)."""
    device = head.weight.device
    if mode == "hidden":
        return lambda t: torch.log_softmax(head.logits(t["hidden"].to(device)), -1)
    tau = float(reader.meta["tau"])
    return lambda t: torch.log_softmax(tau * t["logp"].to(device).float(), -1)


@torch.no_grad()
def signal_sums(
    cfg: Config,
    model: Any,
    tokenizer: Any,
    pairs: list[dict[str, Any]],
    stop_ids: list[int],
    reader: TargetReader | None,
    pad_id: int,
    progress: bool = False,
) -> SignalSums:
    """The teacher's and the student's statistics on every pair's reply rows (`model`: the
    policy model, the frozen base with `model.adapter` when set)."""
    mode = cfg.targets.mode
    head = output_head(model)
    stored = reader is not None and mode in ("hidden", "dense")
    from_store = stored_teacher_logp(reader, mode, head) if stored else None
    sums = SignalSums()
    bar = tqdm(total=len(pairs), desc="teacher signal", unit="pair", disable=not progress)
    for batch in chunks(pairs, cfg.targets.batch_size):
        student = reply_hidden_rows(model, [student_sequence(p) for p in batch], pad_id)
        teacher = (
            None
            if stored
            else reply_hidden_rows(model, [teacher_sequence(p) for p in batch], pad_id)
        )
        for i, pair in enumerate(batch):
            labels = torch.tensor(student_sequence(pair)[1])
            if stored:
                reply, tensors = reader.get(pair["id"])
                if list(reply) != labels.tolist():
                    raise ValueError(
                        f"targets for example {pair['id']} were computed on other reply tokens "
                        "than pairs.jsonl holds; rebuild them with `ssb targets`"
                    )
            leaks = leak_rows(pair, tokenizer)
            stops = [*stop_ids, int(pair["end_token_id"])]
            for start in range(0, len(labels), SCORE_CHUNK):
                rows = slice(start, start + SCORE_CHUNK)
                if stored:
                    t_logp = from_store({k: v[rows] for k, v in tensors.items()})
                else:
                    t_logp = torch.log_softmax(head.logits(teacher[i][rows]), -1)
                s_logp = torch.log_softmax(head.logits(student[i][rows]), -1)
                sums.add(t_logp, s_logp.to(t_logp.device), labels[rows], stops, leaks, start)
        bar.update(len(batch))
    bar.close()
    return sums


def kd_ce_cosine(
    model: Any, batches: list[dict[str, Any]], loss_config: LossConfig, target_mode: str
) -> float:
    """Cosine between the gradients w.r.t. the trainable (LoRA) parameters of the KD term alone
    and the CE term alone (train.loss's divergence, tau and tau^2; weights 1/0 and 0/1), each
    the per-token mean over all `batches` as one optimizer step would take it. Computed through
    `distillation_loss`, so targets, rows and temperature are exactly training's. In eval mode:
    LoRA dropout would give the two terms different masks."""
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    tokens = sum(int((b["shift_labels"] != IGNORE).sum()) for b in batches)
    grads = []
    for kd, ce in ((1.0, 0.0), (0.0, 1.0)):
        lc = dataclasses.replace(loss_config, kd_weight=kd, ce_weight=ce)
        model.zero_grad(set_to_none=True)
        for batch in batches:
            inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            out = distillation_loss(model, inputs, lc, target_mode)
            (out.loss_sum / max(tokens, 1)).backward()
        grads.append(
            torch.cat(
                [
                    (p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float()
                    for p in params
                ]
            )
        )
    model.zero_grad(set_to_none=True)
    return float(F.cosine_similarity(grads[0], grads[1], dim=0))


def gradient_cosine(
    cfg: Config,
    base_model: Any,
    pairs: list[dict[str, Any]],
    reader: TargetReader | None,
    pad_id: int,
    tokenizer: Any = None,
) -> dict[str, Any] | None:
    """`kd_ce_cosine` of a fresh seeded student on `targets.diagnose_batches` batches of
    `train.batch_size` pairs (a seeded sample), with the loss as training will run it
    (`train.loss`: its target filter and advantage weighting included); the shared base is
    restored afterwards."""
    n = cfg.targets.diagnose_batches
    if n == 0 or not pairs:
        return None
    lc = cfg.train.loss
    picked = random.Random(cfg.seed).sample(pairs, min(len(pairs), n * cfg.train.batch_size))
    suppress = target_filter_table(cfg, picked, tokenizer) if tokenizer is not None else None
    collator = DistillCollator(
        pad_id=pad_id, mode=cfg.targets.mode, reader=reader, suppress=suppress
    )
    batches = [collator(b) for b in chunks(picked, cfg.train.batch_size)]
    was_training = base_model.training
    hooks_before = set(base_model.get_input_embeddings()._forward_hooks)
    model = student_model(cfg, base_model)
    try:
        model.eval()
        value = kd_ce_cosine(model, batches, lc, cfg.targets.mode)
    finally:
        restore_base(model, was_training=was_training, hooks_before=hooks_before)
    return {
        "value": value,
        "batches": len(batches),
        "pairs": len(picked),
        "divergence": lc.divergence,
        "temperature": lc.temperature,
        "tau_squared": lc.tau_squared,
        "target_filter": suppress is not None,
        "advantage_weighting": lc.advantage_weighting,
    }


def brief(result: dict[str, Any], path: str) -> dict[str, Any]:
    """The few numbers a stage summary (and the manifest) keeps; the file has the rest."""
    cosine = result.get("grad_cosine")
    return {
        "path": path,
        "teacher_p_reply": result["p_reply"]["teacher"],
        "student_p_reply": result["p_reply"]["student"],
        "mean_logp_gap": result["advantage"]["mean_logp_gap"],
        "fixable": result["fixable"],
        "breakable": result["breakable"],
        "grad_cosine": cosine["value"] if cosine else None,
        "teacher_advantage": result["verdict"]["teacher_advantage"],
    }


def run_diagnose(cfg: Config, rundir: RunDir, progress: bool = True) -> dict[str, Any]:
    """Measure the run's teacher signal, write `rundir.teacher_signal_path` and return a brief
    summary (see the module docstring). Reads pairs.jsonl and, in hidden/dense/topk modes, the
    target store; changes neither."""
    pairs = rundir.read_pairs()
    mode = cfg.targets.mode
    base = load_base(cfg, rundir)
    tokenizer = base.tokenizer
    check_prompts(pairs, tokenizer, cfg)
    reader = load_targets(cfg, rundir, base.model, tokenizer) if TARGET_MODES[mode].stored else None
    if reader is not None:
        missing = [p["id"] for p in pairs if p["id"] not in reader]
        if missing:
            raise ValueError(
                f"{len(missing)} pairs have no stored targets (first: {missing[0]}); "
                "run `ssb targets` to finish them"
            )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stop_ids = list(base.reply.stop_token_ids)
    with policy_model(cfg, base) as model:
        sums = signal_sums(cfg, model, tokenizer, pairs, stop_ids, reader, pad_id, progress)
    result: dict[str, Any] = {
        "teacher_context": cfg.bootstrap.teacher_context,
        "target_mode": mode,
        "teacher_source": TEACHER_SOURCES[mode],
        "student": "the base" + (f" + adapter {cfg.model.adapter}" if cfg.model.adapter else ""),
        "temperature": 1.0,
        "stop_token_ids": sorted(set(stop_ids)),
        **sums.summary(),
    }
    result["grad_cosine"] = gradient_cosine(cfg, base.model, pairs, reader, pad_id, base.tokenizer)
    atomic_write_json(rundir.teacher_signal_path, result)
    if result["verdict"]["teacher_advantage"] is False:
        log.warning("diagnose: %s", result["verdict"]["text"])
    else:
        log.info("diagnose: %s", result["verdict"]["text"])
    return brief(result, str(rundir.teacher_signal_path))


def run_targets_and_diagnose(cfg: Config, rundir: RunDir, progress: bool = True) -> dict[str, Any]:
    """The `targets` stage as `ssb targets`, `ssb run` and an ablation's teacher contexts run it:
    the teacher's targets, then the teacher-signal diagnostic when `targets.diagnose` is on. One
    process only: under a multi-process launch the base may be sharded, and the diagnostic is
    cheap enough to run alone."""
    summary = run_targets(cfg, rundir, progress)
    if not cfg.targets.diagnose:
        return summary
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        log.info("targets: run `ssb diagnose` in one process for the teacher-signal diagnostic")
        return summary
    return {**summary, "diagnostic": run_diagnose(cfg, rundir, progress)}
