"""Section ``scoring``: teacher scoring (the targets stage's `score_batch`, top-k) one example at a
time vs length-sorted right-padded batches; scored tokens per second. Measured in the model
child."""

from __future__ import annotations

import time
from typing import Any

from ssb.bench.pairs import make_pairs
from ssb.bench.report import cpu_note, row


def measure_scoring(model: Any, tokenizer: Any, cfg: Any, sizes: dict[str, Any]) -> dict[str, Any]:
    """The targets stage's scoring path one example at a time vs length-sorted batches."""
    from ssb.distill.forward import output_head
    from ssb.stages.common import chunks
    from ssb.stages.targets import score_batch, teacher_sequence

    pairs = make_pairs(tokenizer, cfg, sizes["pairs"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    vocab = int(output_head(model).weight.shape[0])
    k = min(cfg.targets.topk, vocab)
    meta = {"tau": cfg.train.loss.temperature, "topk": k}
    batch_size = cfg.targets.batch_size
    ordered = sorted(pairs, key=lambda p: sum(map(len, teacher_sequence(p))))
    tokens = sum(sum(map(len, teacher_sequence(p))) for p in pairs)
    score_batch(model, pairs[:1], pad_id, "topk", meta)  # warm-up

    def one_at_a_time() -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        for pair in pairs:
            score_batch(model, [pair], pad_id, "topk", meta)
        return time.perf_counter() - wall, time.process_time() - cpu

    def batched() -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        for batch in chunks(ordered, batch_size):
            score_batch(model, batch, pad_id, "topk", meta)
        return time.perf_counter() - wall, time.process_time() - cpu

    # A B B A A B ...: slow drifts of the shared machine's load hit both sides alike, and the
    # fastest round of each side (other processes only ever slow a round down) is reported.
    seq_runs, bat_runs = [], []
    for r in range(sizes["rounds"]):
        if r % 2 == 0:
            seq_runs.append(one_at_a_time())
            bat_runs.append(batched())
        else:
            bat_runs.append(batched())
            seq_runs.append(one_at_a_time())
    padded = sum(
        len(batch) * max(sum(map(len, teacher_sequence(p))) for p in batch)
        for batch in chunks(ordered, batch_size)
    )

    def side(runs: list[tuple[float, float]]) -> dict[str, Any]:
        wall = min(w for w, _ in runs)
        return {
            "wall_s": wall,
            "tokens_per_s": tokens / wall,
            "rounds_wall_s": [w for w, _ in runs],
            "cpu_s": min(c for _, c in runs),
        }

    return {
        "pairs": len(pairs),
        "tokens": tokens,
        "batch_size": batch_size,
        "rounds": sizes["rounds"],
        "padding_fraction": 1 - tokens / padded,
        "sequential": side(seq_runs),
        "batched": side(bat_runs),
        "mode": f"topk k={k}",
    }


def section_scoring(sc: dict[str, Any]) -> tuple[dict[str, Any], list[dict]]:
    """The rows of the model child's scoring measurement `sc`."""
    rows = []
    if "batched" in sc:
        rows.append(
            row(
                "scoring",
                f"teacher scoring: batch {sc['batch_size']} (length-sorted) / one at a time",
                sc["sequential"]["tokens_per_s"],
                sc["batched"]["tokens_per_s"],
                "ours/baseline",
                unit="tok/s",
                note=f"fastest of {sc['rounds']} alternating rounds each; "
                + cpu_note(sc["sequential"]["cpu_s"], sc["batched"]["cpu_s"]),
            )
        )
    return sc, rows
