"""Section ``storage``: bytes per reply token of each target form, and the error each makes.

First, real target shards written with `TargetWriter` (dense float32 = what the reference
stores, top-k k=16/64/256, hidden) holding random tensors of Qwen2.5-3B's and gemma-3-270m's
vocabulary and hidden sizes. Then, in the model child, on the model scoring real few-shot pairs,
the error top-k and hidden targets make against exact full-vocabulary targets: the KD loss
(forward KL, tau=2, tau^2) and its gradient with respect to the student's hidden states. The
teacher is the base model on the hinted prompt, the student the base model on the plain prompt
(SSB's state at step 0: two genuinely different distributions).
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

from ssb.bench.pairs import make_pairs
from ssb.bench.report import row
from ssb.bench.sizes import TAU


def _store_bytes(directory: Path, mode: str, meta: dict[str, Any], examples: list) -> dict:
    from ssb.distill.store import TargetReader, TargetWriter

    with TargetWriter(directory, mode=mode, meta=meta) as writer:
        for example_id, reply, tensors in examples:
            writer.add(example_id, reply, tensors)
    reader = TargetReader(directory)
    index_bytes = (directory / "index.json").stat().st_size
    return {
        "bytes_per_token": reader.bytes_per_token(),
        "tokens": reader.num_tokens(),
        "index_bytes_per_example": index_bytes / len(examples),
    }


def _storage_synthetic(sizes: dict[str, Any], work: Path) -> dict[str, Any]:
    """Bytes per reply token of real shards holding random tensors of the right shapes."""
    import torch

    from ssb.distill.losses import dense_targets, topk_targets

    out: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(0)
    n_ex, length = sizes["storage_examples"], sizes["storage_reply"]
    for label, vocab, hidden in sizes["storage_shapes"]:
        logits = [torch.randn(length, vocab, generator=gen) * 3 for _ in range(n_ex)]
        replies = [torch.randint(0, vocab, (length,), generator=gen).tolist() for _ in range(n_ex)]
        entry: dict[str, Any] = {"vocab": vocab, "hidden": hidden, "tokens": n_ex * length}
        base = {"tau": TAU, "vocab_size": vocab}
        dense = [
            (f"e{i}", replies[i], {"logp": dense_targets(z, TAU)}) for i, z in enumerate(logits)
        ]
        entry["dense_fp32"] = _store_bytes(work / f"{label}-dense", "dense", base, dense)
        del dense
        for k in sizes["topks"]:
            rows = []
            for i, z in enumerate(logits):
                ids, logp, tail = topk_targets(z, k, TAU)
                rows.append((f"e{i}", replies[i], {"ids": ids, "logp": logp, "tail": tail}))
            meta = dict(base, topk=k)
            entry[f"topk{k}"] = _store_bytes(work / f"{label}-topk{k}", "topk", meta, rows)
        hid = [
            (f"e{i}", replies[i], {"hidden": torch.randn(length, hidden, generator=gen)})
            for i in range(n_ex)
        ]
        meta = {"hidden_size": hidden, "vocab_size": vocab}
        entry["hidden_bf16"] = _store_bytes(work / f"{label}-hidden", "hidden", meta, hid)
        entry["dense_fp32_raw_bytes_per_token"] = 4 * vocab  # the reference's float32 array
        out[label] = entry
    return out


def _reply_hidden(model: Any, pairs: list[dict], pad_id: int, role: str) -> list[Any]:
    """Final hidden states on the reply positions of each pair, for the teacher (the targets
    stage's own `teacher_rows`) or the student (same code on the student sequence)."""
    import torch

    from ssb.distill.forward import final_hidden_states, reply_rows, right_pad
    from ssb.stages.targets import student_sequence, teacher_rows

    if role == "teacher":
        return teacher_rows(model, pairs, pad_id)
    seqs = [student_sequence(p) for p in pairs]
    ids, mask = right_pad([prompt + reply for prompt, reply in seqs], pad_id)
    with torch.inference_mode():
        hidden = final_hidden_states(model, ids, mask)
    return [hidden[i, reply_rows(len(p), len(r))] for i, (p, r) in enumerate(seqs)]


def measure_approximation_error(
    model: Any, tokenizer: Any, cfg: Any, sizes: dict[str, Any], tmp: Path
) -> dict:
    """KD loss and gradient from top-k / hidden targets against exact full-vocabulary targets
    (run in the model child; shards written under `tmp`)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from ssb.distill.forward import output_head
    from ssb.distill.losses import chunked_kd_loss, dense_targets, topk_targets
    from ssb.distill.store import TargetReader, TargetWriter
    from ssb.stages.common import chunks
    from ssb.stages.targets import teacher_sequence

    pairs = make_pairs(tokenizer, cfg, sizes["approx_pairs"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    teacher, student = [], []
    t_forward = time.perf_counter()
    for batch in chunks(pairs, cfg.targets.batch_size):
        teacher += _reply_hidden(model, batch, pad_id, "teacher")
        student += _reply_hidden(model, batch, pad_id, "student")
    lengths = [t.shape[0] for t in teacher]
    head = output_head(model)
    weight = head.weight.detach()
    bias = head.bias.detach() if head.bias is not None else None
    t_rows = torch.cat(teacher)
    s_rows = torch.cat(student).float()
    with torch.no_grad():
        t_logits = torch.cat([head.logits(t_rows[i : i + 256]) for i in range(0, len(t_rows), 256)])
    vocab = t_logits.shape[1]
    tau = cfg.train.loss.temperature
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    replies = [teacher_sequence(p)[1] for p in pairs]

    def loss_and_grad(targets: dict[str, Any], mode: str) -> tuple[float, Any]:
        leaf = s_rows.detach().clone().requires_grad_(True)
        res = chunked_kd_loss(
            leaf,
            weight,
            targets,
            mode=mode,
            tau=tau,
            kind="forward_kl",
            tau_squared=True,
            chunk_size=cfg.train.loss.chunk_size,
            logit_softcap=head.softcap,
            lm_head_bias=bias,
        )
        loss = res.loss_sum / res.num_tokens
        (grad,) = torch.autograd.grad(loss, leaf)
        return float(loss), grad

    def loss_only(targets: dict[str, Any], mode: str, temperature: float) -> float:
        with torch.no_grad():
            res = chunked_kd_loss(
                s_rows,
                weight,
                targets,
                mode=mode,
                tau=temperature,
                chunk_size=cfg.train.loss.chunk_size,
                logit_softcap=head.softcap,
                lm_head_bias=bias,
            )
        return float(res.loss_sum / res.num_tokens)

    start = time.perf_counter()
    exact_loss, exact_grad = loss_and_grad({"logp": dense_targets(t_logits, tau)}, "dense")
    timings = {"forward_s": start - t_forward, "exact_loss_and_grad_s": time.perf_counter() - start}
    out: dict[str, Any] = {
        "pairs": len(pairs),
        "reply_tokens": int(sum(lengths)),
        "vocab": vocab,
        "tau": tau,
        "teacher": "base model, hinted prompt",
        "student": "base model, plain prompt (SSB at step 0)",
        "exact_loss": exact_loss,
        "forms": {},
        "timings": timings,
    }

    def compare(name: str, loss: float, grad: Any, extra: dict[str, Any]) -> None:
        cos = F.cosine_similarity(grad.flatten().double(), exact_grad.flatten().double(), dim=0)
        out["forms"][name] = dict(
            extra,
            loss=loss,
            rel_loss_error=abs(loss - exact_loss) / abs(exact_loss) if exact_loss else None,
            grad_cosine=float(cos),
            grad_rel_norm_error=float(
                (grad - exact_grad).norm() / exact_grad.norm().clamp_min(1e-30)
            ),
        )

    for k in sizes["topks"]:
        if k > vocab:
            continue
        directory = tmp / f"approx-topk{k}"
        with TargetWriter(
            directory, "topk", {"tau": tau, "topk": k, "vocab_size": vocab}
        ) as writer:
            for i, pair in enumerate(pairs):
                ids, logp, tail = topk_targets(t_logits[offsets[i] : offsets[i + 1]], k, tau)
                writer.add(pair["id"], replies[i], {"ids": ids, "logp": logp, "tail": tail})
        reader = TargetReader(directory)
        got = [reader.get(p["id"])[1] for p in pairs]
        targets = {key: torch.cat([g[key] for g in got]) for key in ("ids", "logp", "tail")}
        start = time.perf_counter()
        loss, grad = loss_and_grad(targets, "topk")
        timings[f"topk{k}_loss_and_grad_s"] = time.perf_counter() - start
        compare(
            f"topk{k}",
            loss,
            grad,
            {
                "bytes_per_token": reader.bytes_per_token(),
                "mean_tail_mass": float(targets["tail"].float().exp().mean()),
            },
        )
    # Diagnostic: how much of the error is the temperature. At tau = 1 the teacher's mass outside
    # its top k is far smaller than at tau = 2 (which flattens a 10^5-token distribution).
    start = time.perf_counter()
    diag: dict[str, Any] = {"tau": 1.0, "mean_tail_mass": {}}
    for k in sizes["topks"]:
        if k <= vocab:
            diag["mean_tail_mass"][f"topk{k}"] = float(
                topk_targets(t_logits, k, 1.0)[2].exp().mean()
            )
    k = sizes["topks"][1] if len(sizes["topks"]) > 1 else sizes["topks"][0]
    if k <= vocab:
        exact1 = loss_only({"logp": dense_targets(t_logits, 1.0)}, "dense", 1.0)
        ids, logp, tail = topk_targets(t_logits, k, 1.0)
        approx1 = loss_only(
            {"ids": ids, "logp": logp.half(), "tail": tail}, "topk", 1.0
        )  # float16 log-probs, as stored
        diag.update(
            k=k,
            exact_loss=exact1,
            topk_loss=approx1,
            rel_loss_error=abs(approx1 - exact1) / abs(exact1) if exact1 else None,
        )
    out["tau1_diagnostic"] = diag
    timings["tau1_diagnostic_s"] = time.perf_counter() - start
    directory = tmp / "approx-hidden"
    with TargetWriter(directory, "hidden", {"hidden_size": int(t_rows.shape[1])}) as writer:
        for i, pair in enumerate(pairs):
            writer.add(pair["id"], replies[i], {"hidden": t_rows[offsets[i] : offsets[i + 1]]})
    reader = TargetReader(directory)
    hidden = torch.cat([reader.get(p["id"])[1]["hidden"] for p in pairs])
    loss, grad = loss_and_grad({"hidden": hidden}, "hidden")
    compare("hidden", loss, grad, {"bytes_per_token": reader.bytes_per_token()})

    # What the reference actually writes: np.savez_compressed of float32 logits per example.
    n_npz = min(sizes["npz_examples"], len(pairs))
    npz_bytes, npz_tokens = 0, 0
    for i in range(n_npz):
        buf = io.BytesIO()
        logits = t_logits[offsets[i] : offsets[i + 1]].numpy().astype(np.float32)
        np.savez_compressed(buf, logits=logits, reply_ids=np.asarray(replies[i], dtype=np.int32))
        npz_bytes += buf.getbuffer().nbytes
        npz_tokens += logits.shape[0]
    out["reference_npz_bytes_per_token"] = npz_bytes / npz_tokens if npz_tokens else None
    out["reference_npz_examples"] = n_npz
    return out


def section_storage(
    sizes: dict[str, Any], approx: dict[str, Any] | None, work: Path
) -> tuple[dict[str, Any], list[dict]]:
    """The synthetic shards' sizes (written under `work`) and the rows of those and of the model
    child's error measurement (`approx`, None when it was not run)."""
    data: dict[str, Any] = {"synthetic": _storage_synthetic(sizes, work)}
    rows = []
    for label, entry in data["synthetic"].items():
        dense = entry["dense_fp32"]["bytes_per_token"]
        for k in sizes["topks"]:
            goal = (">=", 1000.0) if k == 64 else None
            rows.append(
                row(
                    "storage",
                    f"{label} (V={entry['vocab']:,}): dense fp32 / top-{k} bytes per token",
                    dense,
                    entry[f"topk{k}"]["bytes_per_token"],
                    "baseline/ours",
                    unit="B/token",
                    goal=goal,
                )
            )
        rows.append(
            row(
                "storage",
                f"{label} (H={entry['hidden']:,}): dense fp32 / hidden bf16 bytes per token",
                dense,
                entry["hidden_bf16"]["bytes_per_token"],
                "baseline/ours",
                unit="B/token",
            )
        )
    if approx is not None:
        data["approx"] = approx
        if "forms" in approx:
            exact = approx["exact_loss"]
            where = f"{approx['pairs']} real pairs, {approx['reply_tokens']} tokens"
            for name, form in approx["forms"].items():
                label = f"top-{name[4:]}" if name.startswith("topk") else "hidden bf16"
                goal = ("<", 0.01) if name == "topk64" else None
                rows.append(
                    row(
                        "storage",
                        f"KD loss relative error, {label} vs exact ({where})",
                        exact,
                        form["loss"],
                        "relerr",
                        goal=goal,
                    )
                )
                rows.append(
                    row(
                        "storage",
                        f"gradient cosine (student hidden states), {label} vs exact",
                        None,
                        None,
                        "direct",
                        value=form["grad_cosine"],
                    )
                )
            diag = approx.get("tau1_diagnostic", {})
            if "rel_loss_error" in diag:
                rows.append(
                    row(
                        "storage",
                        f"KD loss relative error, top-{diag['k']} vs exact at tau=1",
                        diag["exact_loss"],
                        diag["topk_loss"],
                        "relerr",
                        note="diagnostic: the tau=2 error is the flattened tail",
                    )
                )
            npz = approx.get("reference_npz_bytes_per_token")
            if npz and "topk64" in approx["forms"]:
                rows.append(
                    row(
                        "storage",
                        "real logits: reference npz (compressed fp32) / our top-64 bytes per token",
                        npz,
                        approx["forms"]["topk64"]["bytes_per_token"],
                        "baseline/ours",
                        unit="B/token",
                        goal=(">=", 1000.0),
                    )
                )
    return data, rows
