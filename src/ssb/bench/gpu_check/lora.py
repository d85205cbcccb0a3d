"""Step 8 of the GPU check: greedy outputs through the stages' engine against transformers + PEFT.

Rule: on CPU (float32) every prompt must give identical token ids for all three models (base,
student, boosted). On a GPU (bf16; vLLM's kernels sum in other orders than transformers') outputs
may part by rounding: a prompt's first divergence counts as rounding (a close call) when the token
vLLM took there is, in the reference's logits at that step, less than `CLOSE_MARGIN` (0.1)
standard deviations of those logits below the reference's own choice. A model fails when more
than half of the prompts diverge, not by rounding, within their first `EARLY_TOKENS` (8) tokens;
later or rounding divergences are reported (`unexplained`, `close_call`, `min_margin` per
prompt), not failed. lora_tokens_fp32: every divergence must be a close call at
`FP32_CLOSE_MARGIN` (0.001) stds. Either way the boosted adapter must change the reference output
of at least one prompt, or the check could not tell an applied LoRA from an ignored one.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from ssb.bench.gpu_check.steps import CheckFailed, StepResult

EARLY_TOKENS = 8
# A first divergence at a step whose top-1/top-2 logit margin is below this many logit stds, to
# the reference's runner-up, counts as rounding (bf16) rather than a bug (see close_call).
CLOSE_MARGIN = 0.1
# The same in float32 on a GPU: only kernels' summation orders differ (~1e-6 relative).
FP32_CLOSE_MARGIN = 1e-3
TOP_K = 5  # reference candidates kept per step for that test
BOOST = 0.5  # the boosted LoRA's output / the adapted layer's output, roughly


def boost_adapter(src: Path, dst: Path, init_std: float) -> Path:
    """A copy of the adapter at `src` whose lora_B are seeded random values sized so that each
    LoRA's output is about BOOST times the adapted layer's (everything vLLM and PEFT read
    besides those values, config, names, shapes, rank, alpha, is the trained adapter's)."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst, dirs_exist_ok=True)
    conf = json.loads((src / "adapter_config.json").read_text())
    scale = conf["lora_alpha"] / conf["r"]
    weights = load_file(str(src / "adapter_model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    for key in sorted(weights):
        if "lora_B" not in key:
            continue
        a_std = weights[key.replace("lora_B", "lora_A")].float().std().item()
        # layer output ~ init_std*sqrt(in)*|x|; LoRA output ~ scale*std_B*sqrt(r)*a_std*sqrt(in)*|x|
        std = BOOST * init_std / (scale * conf["r"] ** 0.5 * a_std)
        value = torch.randn(weights[key].shape, generator=gen) * std
        weights[key] = value.to(weights[key].dtype)
    save_file(weights, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    return dst


def reference_greedy(
    model: Any, prompt: list[int], n: int, stops: list[int], pad: int
) -> tuple[list[int], list[dict[str, list]]]:
    """transformers' own greedy `generate` on one prompt (no padding). Returns the new ids cut
    before the first stop token, and for every step up to that stop the ids of the TOP_K highest
    logits with each one's distance below the highest, in units of the step's logit std (what a
    rounding flip could pick instead, and how close it was)."""
    import torch
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=n,
        eos_token_id=stops,
        pad_token_id=pad,
        return_dict_in_generate=True,
        output_scores=True,
    )
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config
        )
    new = out.sequences[0, len(prompt) :].tolist()
    cut = next((i for i, t in enumerate(new) if t in stops), len(new))
    logits = torch.stack(out.scores)[: cut + 1, 0].float()
    top = logits.topk(TOP_K, dim=-1)
    gaps = (top.values[:, :1] - top.values) / logits.std(dim=-1, keepdim=True)
    steps = [
        {"top": ids, "gap": [round(x, 5) for x in gap]}
        for ids, gap in zip(top.indices.tolist(), gaps.tolist())
    ]
    return new[:cut], steps


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """The first position where two id lists differ (a shorter list differs where it ends);
    None when they are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def close_call(
    ours: list[int],
    steps: list[dict[str, list]],
    at: int,
    stops: list[int],
    margin: float = CLOSE_MARGIN,
) -> bool:
    """Whether the first divergence, at step `at`, looks like rounding: the token ours took (a
    stop token when ours ended there) is, in the reference, less than `margin` logit stds
    below the reference's own choice."""
    if at >= len(steps):
        return False
    step = steps[at]
    taken = {ours[at]} if at < len(ours) else set(stops)
    return any(t in taken and g < margin for t, g in zip(step["top"][1:], step["gap"][1:]))


def check_lora_tokens(
    run: Path, model_dir: Path, out: Path, s: dict[str, int], device: str, float32: bool = False
) -> StepResult:
    """Step 8 (`float32`: its float32 form on a GPU, see the module's docstring)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ssb.config import load_config
    from ssb.generate import SamplingParams
    from ssb.hardware import pick_dtype
    from ssb.problems import load_eval_problems
    from ssb.prompts import render_prompt_ids, student_messages
    from ssb.stages.base import release_accelerator
    from ssb.stages.engine import generation_engine

    cfg = load_config(config_file=run / "config.yaml")
    if float32:
        cfg = dataclasses.replace(
            cfg,
            model=dataclasses.replace(cfg.model, dtype="float32"),
            generation=dataclasses.replace(cfg.generation, backend="hf"),
        )
    init_std = json.loads((model_dir / "config.json").read_text())["initializer_range"]
    boosted = boost_adapter(run / "adapter", out / "lora_check" / "boosted", init_std)
    served = {"base": None, "student": run / "adapter", "boosted": boosted}
    problems = load_eval_problems(cfg, "synthetic")[: s["lora_prompts"]]
    n = s["lora_tokens"]

    # (a) the stages' engine: one vLLM engine serving both adapters as LoRA requests, or the
    # transformers base with each adapter attached in turn (ssb's own decode loop, batched).
    ours: dict[str, list[list[int]]] = {}
    with generation_engine(cfg, None, served) as engine:
        prompts = [
            render_prompt_ids(engine.tokenizer, student_messages(p, cfg.prompt), cfg.prompt)
            for p in problems
        ]
        stops = list(engine.reply.stop_token_ids)
        pad = engine.tokenizer.pad_token_id
        params = SamplingParams(0.0, max_new_tokens=n, stop_strings=engine.reply.stop_strings)
        for name in served:
            with engine.serving(name) as generator:
                outputs = generator.generate(prompts, params, progress=False)
            ours[name] = [per_prompt[0].token_ids for per_prompt in outputs]
        engine_kind = "vllm" if engine.vllm is not None else "hf"
    release_accelerator("before the transformers + PEFT reference")

    # (b) transformers + PEFT, loaded here without ssb's loader, one prompt at a time.
    device_t = torch.device(cfg.model.device)
    dtype = pick_dtype(cfg.model.dtype, device_t)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, device_map={"": str(device_t)}
    ).eval()
    ref: dict[str, list[list[int]]] = {}
    ref_steps: dict[str, list[list[dict[str, list]]]] = {}
    for name, adapter in served.items():
        m = model if adapter is None else PeftModel.from_pretrained(model, str(adapter)).eval()
        runs = [reference_greedy(m, p, n, stops, pad) for p in prompts]
        ref[name], ref_steps[name] = [r[0] for r in runs], [r[1] for r in runs]
        if adapter is not None:
            model = m.unload()
    del model
    release_accelerator("after the reference")

    report: dict[str, Any] = {"engine": engine_kind, "dtype": str(dtype), "prompts": len(prompts)}
    report["new_tokens"] = n
    report["models"] = {}
    failures = []
    margin = FP32_CLOSE_MARGIN if float32 else CLOSE_MARGIN
    for name in served:
        div = [first_divergence(a, b) for a, b in zip(ours[name], ref[name])]
        close = [
            d is not None and close_call(o, st, d, stops, margin)
            for d, o, st in zip(div, ours[name], ref_steps[name])
        ]
        unexplained = [d is not None and not c for d, c in zip(div, close)]
        early = sum(u and d < EARLY_TOKENS for u, d in zip(unexplained, div))
        identical = sum(d is None for d in div)
        report["models"][name] = {
            "identical": identical,
            "first_divergence": div,
            "close_call": close,
            "unexplained": sum(unexplained),
            "unexplained_early": early,
            "min_margin": [min(st["gap"][1] for st in steps) for steps in ref_steps[name]],
            "ours": ours[name],
            "reference": ref[name],
        }
        if device == "cpu" and identical != len(prompts):
            failures.append(f"{name}: {len(prompts) - identical} prompts differ (float32)")
        if float32 and sum(unexplained):
            failures.append(f"{name}: {sum(unexplained)} prompts differ in float32, not by a tie")
        if device != "cpu" and not float32 and early > len(prompts) / 2:
            failures.append(
                f"{name}: {early} prompts differ within {EARLY_TOKENS} tokens, not by rounding"
            )
    changed = {
        name: sum(a != b for a, b in zip(ref[name], ref["base"])) for name in ("student", "boosted")
    }
    report["changed_vs_base"] = changed
    if changed["boosted"] == 0:
        failures.append("the boosted LoRA changes no reference output: the check sees nothing")
    summary = ", ".join(
        f"{name} {r['identical']}/{len(prompts)} identical"
        + (f" ({r['unexplained']} not by rounding)" if r["unexplained"] else "")
        for name, r in report["models"].items()
    )
    summary += f"; {engine_kind} vs transformers+PEFT, {n} tokens; boosted changes "
    summary += f"{changed['boosted']}/{len(prompts)} base outputs"
    if failures:
        raise CheckFailed("; ".join(failures) + f"; {summary}", report)
    return summary, report


def check_lora_tokens_fp32(
    run: Path, model_dir: Path, out: Path, s: dict[str, int], device: str
) -> StepResult:
    if device == "cpu":
        reason = "on CPU, lora_tokens runs in float32 already"
        print(f"  skipped: {reason}", flush=True)
        return f"skipped: {reason}", {"skipped": reason}
    return check_lora_tokens(run, model_dir, out, s, device, float32=True)
