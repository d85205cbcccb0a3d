"""Section ``generation``: one sample at a time (the reference) vs `HFGenerator` batches, on the
model with the quickstart's prompts and sampling settings; useful (kept) tokens per second. Also
the rollout stage's work before and after ssb's decode loop, a frozen bf16 head's prefill with
and without `ssb.models.contiguous_head_input`, and a decode-bound variant (short prompt, fixed
new tokens) that shows where batching pays. Measured in the model child."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

from ssb.bench.report import cpu_note, row


def _remove_contiguous_head_input(model: Any) -> None:
    """Take off the hook `ssb.models.contiguous_head_input` puts on the lm_head (its handle is
    kept on the head), so the head gets transformers' strided input again."""
    head = model.get_output_embeddings()
    handle = getattr(head, "_ssb_contiguous_hook", None)
    if handle is not None:
        handle.remove()
        head._ssb_contiguous_hook = None


def _count_kept(results: list[list[Any]]) -> int:
    return sum(len(c.token_ids) for per_prompt in results for c in per_prompt)


def decode_loop_speeds(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    params: Any,
    batch_size: int,
    stop_token_ids: Sequence[int],
) -> dict[str, dict[str, float]]:
    """ssb's decode loop against transformers' generate, both through `HFGenerator`, on the same
    prompts, batch and sampling: seconds, kept tokens and tokens/s per loop (the `cpu` and `gpu`
    sections' comparison)."""
    import torch

    from ssb.generate import HFGenerator

    cuda = next(model.parameters()).device.type == "cuda"
    speeds = {}
    for loop in ("transformers", "ssb"):
        generator = HFGenerator(model, tokenizer, batch_size, stop_token_ids, loop=loop)
        if cuda:  # time the kernels, not their launch
            torch.cuda.synchronize()
        start = time.perf_counter()
        outputs = generator.generate(prompts, params, progress=False)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        tokens = _count_kept(outputs)
        speeds[loop] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}
    return speeds


def measure_generation(
    model: Any, tokenizer: Any, cfg: Any, sizes: dict[str, Any]
) -> dict[str, Any]:
    """Sequential (batch 1) vs batched generation, same prompts and sampling settings."""
    import torch

    from ssb.generate import HFGenerator, SamplingParams
    from ssb.generate.batching import left_pad
    from ssb.problems import synthetic_problems
    from ssb.prompts import render_prompt_ids, reply_format, student_messages

    rf = reply_format(tokenizer, cfg.prompt)
    n_batch, n_seq = sizes["batch_prompts"], sizes["seq_prompts"]
    problems = synthetic_problems("test", n_batch, difficulty=cfg.data.synthetic.difficulty)
    prompts = [
        render_prompt_ids(tokenizer, student_messages(p, cfg.prompt), cfg.prompt) for p in problems
    ]
    max_new = sizes["max_new_tokens"] or cfg.generation.max_new_tokens
    params = SamplingParams.of(
        cfg.rollout.sampling,
        max_new_tokens=max_new,
        stop_strings=list(rf.stop_strings),
        seed=cfg.seed,
    )
    # The reference: plain transformers generate, one sample at a time. Ours: batched, shared
    # prefix prefilled once, top-k candidate sampling (see ssb.generate.hf).
    one = HFGenerator(
        model,
        tokenizer,
        1,
        rf.stop_token_ids,
        share_prefix=False,
        sample_from_candidates=False,
        loop="transformers",
    )
    many = HFGenerator(model, tokenizer, sizes["batch_size"], rf.stop_token_ids)
    plain = HFGenerator(
        model,
        tokenizer,
        sizes["batch_size"],
        rf.stop_token_ids,
        share_prefix=False,
        sample_from_candidates=False,
        loop="transformers",
    )
    one.generate(prompts[:1], SamplingParams(temperature=0.5, max_new_tokens=2), progress=False)

    def timed(gen: HFGenerator, ps: list[list[int]], p: SamplingParams) -> dict[str, Any]:
        start, cpu = time.perf_counter(), time.process_time()
        res = gen.generate(ps, p, progress=False)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        kept = _count_kept(res)
        return {
            "prompts": len(ps),
            "wall_s": wall,
            "cpu_s": cpu,
            "kept_tokens": kept,
            "prompt_tokens": sum(len(x) for x in ps),
            "tokens_per_s": kept / wall,
            "tokens_per_cpu_s": kept / cpu if cpu > 0 else None,
            "stopped": sum(c.finish_reason == "stop" for r in res for c in r),
        }

    out: dict[str, Any] = {
        "settings": {
            "temperature": params.temperature,
            "top_k": params.top_k,
            "max_new_tokens": max_new,
            "stop_strings": params.stop_strings,
            "num_fewshot": cfg.prompt.num_fewshot,
            "batch_size": sizes["batch_size"],
        },
        "sequential": timed(one, prompts[:n_seq], params),
        "batched": timed(many, prompts, params),
    }
    # The rollout stage's work (the quickstart's largest stage): K samples per prompt, batched,
    # before (plain transformers sampling, every row prefilled) and after (shared prefix +
    # candidate sampling); alternating rounds, the fastest of each side counts.
    k = cfg.rollout.num_samples
    rollout = dataclasses.replace(params, n=k)
    rollout_prompts = prompts[: sizes["rollout_prompts"]]
    rounds: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    for _ in range(sizes["rollout_rounds"]):
        rounds["before"].append(timed(plain, rollout_prompts, rollout))
        rounds["after"].append(timed(many, rollout_prompts, rollout))
    out["rollout"] = {
        side: max(runs, key=lambda r: r["tokens_per_s"]) for side, runs in rounds.items()
    }
    out["rollout"]["samples_per_prompt"] = k
    out["rollout"]["rounds"] = sizes["rollout_rounds"]
    # A frozen bf16 head fed a strided slice (ssb.models.contiguous_head_input): one prefill of
    # 4 quickstart prompts through the frozen model, as transformers passes the head's input
    # and made contiguous.
    from ssb.models import contiguous_head_input

    ids, mask = left_pad(prompts[:4], many.pad_token_id)
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    prefill: dict[str, float] = {}
    try:
        for label in ("strided", "contiguous"):
            if label == "strided":
                _remove_contiguous_head_input(model)
            else:
                contiguous_head_input(model)
            with torch.inference_mode():
                start = time.perf_counter()
                model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
                prefill[label] = time.perf_counter() - start
    finally:
        contiguous_head_input(model)
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    out["frozen_head_prefill"] = {
        "rows": 4,
        "prompt_tokens": int(mask.sum()),
        "strided_s": prefill["strided"],
        "contiguous_s": prefill["contiguous"],
    }
    # Decode-bound variant: a one-line prompt, no stop strings, exactly max_new tokens per row.
    short = [tokenizer(f"Question: {p.question}\nAnswer:")["input_ids"] for p in problems]
    decode_new = sizes.get("decode_tokens") or max_new
    fixed = SamplingParams(
        temperature=params.temperature, top_k=params.top_k, max_new_tokens=decode_new, seed=cfg.seed
    )
    stop_ids = list(rf.stop_token_ids)
    # Never stop early: no stop token can end a row (an id outside the vocabulary).
    never = HFGenerator(model, tokenizer, 1, [model.config.vocab_size + 7])
    never_many = HFGenerator(model, tokenizer, sizes["batch_size"], [model.config.vocab_size + 7])
    out["decode_sequential"] = timed(never, short[: max(1, n_seq // 2)], fixed)
    out["decode_batched"] = timed(never_many, short, fixed)
    out["decode_note"] = f"stop ids {stop_ids} disabled; rows run to {decode_new} tokens"
    return out


def section_generation(gen: dict[str, Any]) -> tuple[dict[str, Any], list[dict]]:
    """The rows of the model child's generation measurement `gen`."""
    rows = []
    if "batched" in gen:
        b = gen["settings"]["batch_size"]
        rows.append(
            row(
                "generation",
                f"quickstart sampling: batch {b} (ours) / one at a time (plain generate), kept tok/s",
                gen["sequential"]["tokens_per_s"],
                gen["batched"]["tokens_per_s"],
                "ours/baseline",
                unit="tok/s",
                goal=(">=", 4.0),
                note=cpu_note(
                    gen["batched"]["tokens_per_cpu_s"], gen["sequential"]["tokens_per_cpu_s"]
                ),
            )
        )
    if "rollout" in gen:
        r = gen["rollout"]
        rows.append(
            row(
                "generation",
                f"rollout stage ({r['samples_per_prompt']} samples/prompt, batch "
                f"{gen['settings']['batch_size']}): after / before (kept tokens/s)",
                r["before"]["tokens_per_s"],
                r["after"]["tokens_per_s"],
                "ours/baseline",
                unit="tok/s",
                note=f"after: shared prefix + top-k candidate sampling; fastest of "
                f"{r['rounds']} alternating rounds; "
                + cpu_note(r["after"]["tokens_per_cpu_s"], r["before"]["tokens_per_cpu_s"]),
            )
        )
    if "frozen_head_prefill" in gen:
        f = gen["frozen_head_prefill"]
        rows.append(
            row(
                "generation",
                f"prefill of {f['rows']} prompts, frozen bf16 model: contiguous lm_head input / "
                "strided (as transformers passes it), seconds",
                f["strided_s"],
                f["contiguous_s"],
                "baseline/ours",
                unit="s",
                note="a torch CPU slow path; every LoRA forward hits it without the fix",
            )
        )
    if "batched" in gen:
        rows.append(
            row(
                "generation",
                f"decode-bound (short prompt, fixed length): batch {b} / one at a time",
                gen["decode_sequential"]["tokens_per_s"],
                gen["decode_batched"]["tokens_per_s"],
                "ours/baseline",
                unit="tok/s",
                note="diagnostic: where batching pays; "
                + cpu_note(
                    gen["decode_batched"]["tokens_per_cpu_s"],
                    gen["decode_sequential"]["tokens_per_cpu_s"],
                ),
            )
        )
    return gen, rows
