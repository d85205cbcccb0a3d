"""Section ``gpu``: when CUDA is available, the KD step (tokens/s, MFU) of the reference approach
vs ours (`ssb.bench.kd_step`) on a random-init Qwen2.5-3B-shaped model with LoRA r=32, and
generation tokens/s: transformers at batch 1 and batch N, and vLLM (`VLLMGenerator`, as the
stages use it) on the same N prompts (skipped, saying why, without vLLM).

``benchmarks/gpu_check.sh`` runs it on a GPU (the KD step and transformers generation ran on an
H200 on 2026-12-04, figures in docs/gpu.md; the vLLM part has not run on a GPU yet), and its CPU
form (the same code at tiny sizes, ``gpu_runs(..., "cpu")``) runs in the tests.
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Any

from ssb.bench.children import run_child
from ssb.bench.generation import decode_loop_speeds
from ssb.bench.kd_step import build_qwen2, qwen2_config
from ssb.bench.report import log, row
from ssb.bench.sizes import QWEN25_3B

# Dense bf16 tensor-core peak FLOP/s per GPU, for MFU. Keys are matched as whole words against
# torch.cuda.get_device_name(), most specific first ("H100 NVL" before "H100"; "GH200" is not
# "H200"; "A10G" is not "A10"); the first match wins.
PEAK_BF16_FLOPS = [
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H200 NVL", 835e12),
    ("GH200", 989e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("L4", 121e12),
    ("4090", 165e12),
]


def child_generate(spec: dict[str, Any]) -> dict[str, Any]:
    """Generation tokens/s of a random-init Qwen2.5-3B-shaped model: transformers' generate at
    batch 1 vs batch N, fixed-length sampled continuations of 256-token prompts; then ssb's
    decode loop vs transformers' generate through `HFGenerator` at each batch of
    ``spec["loop_batches"]``. The tests run it on
    CPU at tiny sizes (``spec["device"] = "cpu"``)."""
    import torch

    from ssb.bench.random_models import byte_tokenizer
    from ssb.generate import SamplingParams

    device = torch.device(spec.get("device", "cuda"))
    cuda = device.type == "cuda"
    model = build_qwen2(dict(spec, lora_r=0), device, torch.bfloat16)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    prompt_len = spec.get("prompt_len", 256)
    prompts = torch.randint(1, spec["vocab"], (spec["gen_prompts"], prompt_len), generator=gen).to(
        device
    )
    new = spec["gen_tokens"]

    def run(rows: Any) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=rows,
                attention_mask=torch.ones_like(rows),
                do_sample=True,
                temperature=0.8,
                top_k=50,
                max_new_tokens=new,
                min_new_tokens=new,  # eos (id 0) is suppressed: every row makes `new` tokens
                eos_token_id=0,
                pad_token_id=0,
                use_cache=True,
            )
        if cuda:
            torch.cuda.synchronize()
        if out.shape[1] != rows.shape[1] + new:
            raise RuntimeError(f"expected {new} new tokens, got {out.shape[1] - rows.shape[1]}")
        return time.perf_counter() - start

    run(prompts[:1, : min(16, prompt_len)])  # warm-up
    seq_prompts = max(1, spec["gen_prompts"] // 4)
    seq_s = sum(run(prompts[i : i + 1]) for i in range(seq_prompts))
    bat_s = run(prompts)

    # ssb's own decode loop (the stages', onpolicy's and eval's without vLLM) against
    # transformers' generate at each batch of `loop_batches`, on the same prompts and sampling.
    params = SamplingParams(0.8, top_k=50, max_new_tokens=new, seed=0)
    tokenizer = byte_tokenizer(spec["vocab"])
    loops: dict[str, dict[str, float]] = {}
    for batch in spec.get("loop_batches", [spec["gen_prompts"]]):
        rows = torch.randint(1, spec["vocab"], (batch, prompt_len), generator=gen).tolist()
        speeds = decode_loop_speeds(model, tokenizer, rows, params, batch, [0])
        loops[str(batch)] = {loop: speed["tokens_per_s"] for loop, speed in speeds.items()}
    return {
        "device_name": torch.cuda.get_device_name() if cuda else str(device),
        "sequential_tokens_per_s": seq_prompts * new / seq_s,
        "batched_tokens_per_s": spec["gen_prompts"] * new / bat_s,
        # per batch size: tokens/s of ssb's loop and of transformers' generate
        "loop_tokens_per_s": loops,
        "batch": spec["gen_prompts"],
        "new_tokens": new,
    }


def _config_only_model_dir(spec: dict[str, Any], path: Path) -> Path:
    """A model directory with `build_qwen2`'s config and `byte_tokenizer`, but no weights:
    vLLM's ``load_format="dummy"`` fills them with random values (nothing to write or read)."""
    from ssb.bench.random_models import byte_tokenizer

    config = qwen2_config(spec, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    config.architectures = ["Qwen2ForCausalLM"]  # what vLLM picks its model class by
    config.save_pretrained(path)
    byte_tokenizer(spec["vocab"]).save_pretrained(path)
    return path


def child_generate_vllm(spec: dict[str, Any]) -> dict[str, Any]:
    """vLLM's generation tokens/s (`ssb.generate.VLLMGenerator`, as the stages drive it) on the
    Qwen2.5-3B shape with vLLM's dummy (random) weights, on the prompts of `child_generate`'s
    batched run (same seed, count and length), sampled like it. ssb's `SamplingParams` have no
    minimum length, so tokens/s counts the tokens actually generated (a row that samples the
    end token stops early; ``finish_reasons`` says how many did). Returns ``skipped`` without
    vLLM or CUDA; the model directory is written first either way, so the CPU form runs that."""
    import torch

    from ssb.generate import SamplingParams
    from ssb.generate.vllm import vllm_available

    model_dir = _config_only_model_dir(spec, Path(spec["tmp"]) / "model")
    if not vllm_available():
        return {"skipped": "vLLM is not installed (pip install 'ssb[vllm]')"}
    if not torch.cuda.is_available():
        return {"skipped": "vLLM generation needs a CUDA device"}
    from transformers import AutoTokenizer

    from ssb.generate import VLLMGenerator

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    gen = torch.Generator().manual_seed(0)
    prompt_len, new = spec.get("prompt_len", 256), spec["gen_tokens"]
    prompts = torch.randint(1, spec["vocab"], (spec["gen_prompts"], prompt_len), generator=gen)
    prompts = prompts.tolist()
    start = time.perf_counter()
    engine = VLLMGenerator(
        model_dir,
        tokenizer,
        [tokenizer.eos_token_id],
        dtype="bfloat16",
        max_model_len=prompt_len + new,
        seed=0,
        llm_kwargs={"load_format": "dummy"},
    )
    start_s = time.perf_counter() - start
    try:
        params = SamplingParams(temperature=0.8, top_k=50, max_new_tokens=new, seed=0)
        engine.generate(
            [prompts[0][:16]], dataclasses.replace(params, max_new_tokens=4), progress=False
        )
        start = time.perf_counter()
        outputs = engine.generate(prompts, params, progress=False)
        wall = time.perf_counter() - start
    finally:
        engine.shutdown()
    tokens = sum(len(c.token_ids) for per_prompt in outputs for c in per_prompt)
    reasons: dict[str, int] = {}
    for per_prompt in outputs:
        for c in per_prompt:
            reasons[c.finish_reason] = reasons.get(c.finish_reason, 0) + 1
    return {
        "device_name": torch.cuda.get_device_name(),
        "tokens_per_s": tokens / wall,
        "tokens": tokens,
        "max_tokens": spec["gen_prompts"] * new,
        "finish_reasons": reasons,
        "wall_s": wall,
        "engine_start_s": start_s,
        "batch": spec["gen_prompts"],
        "new_tokens": new,
    }


def peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU named `device_name` (None for one not in the table)."""
    for key, flops in PEAK_BF16_FLOPS:
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", device_name):
            return flops
    return None


def section_gpu(sizes: dict[str, Any], progress: bool) -> tuple[dict[str, Any], list[dict]]:
    """Runs only when CUDA is available (see the module docstring)."""
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device on this machine"}, []
    return gpu_runs(sizes["gpu"], "cuda", progress)


def gpu_runs(g: dict[str, Any], device: str, progress: bool) -> tuple[dict[str, Any], list[dict]]:
    """The section's measurements on `device` at the sizes `g` (``bench_sizes(...)["gpu"]``):
    both KD step variants and both generation figures, each in its own child, and the rows."""
    shape = g.get("shape", QWEN25_3B)
    spec = dict(
        shape,
        layers=g["layers"],
        batch=g["batch"],
        seq=g["seq"],
        lora_r=32,
        topk=64,
        repeats=2,
        device=device,
        gradient_checkpointing=True,  # the reference trains with (unsloth) checkpointing too
    )
    # The KD step and transformers generation ran on an H200 (docs/gpu.md); the vLLM part never has.
    data: dict[str, Any] = {
        "vllm_untested_on_gpu": True,
        "model": "random-init, Qwen2 architecture",
    }
    data.update(spec)
    g_spec = dict(
        shape,
        layers=g["layers"],
        lora_r=0,
        device=device,
        gen_prompts=g["gen_prompts"],
        gen_tokens=g["gen_tokens"],
        prompt_len=g.get("prompt_len", 256),
        loop_batches=g.get("loop_batches", [g["gen_prompts"]]),
    )
    rows: list[dict] = []
    # The measurements, one after the other, each in its own child: each stores its figures in
    # `data` and appends its rows. A new row goes in as one more function like these (its child
    # task in `ssb.bench.children.CHILD_TASKS`), called here; the GPU check reads the figures
    # it reports from `data` in `ssb.bench.gpu_check.bench`.
    _kd_step_rows(spec, device, data, rows, progress)
    _generation_rows(g_spec, data, rows, progress)
    _vllm_generation_rows(g_spec, data, rows, progress)
    return data, rows


def _kd_step_rows(
    spec: dict[str, Any], device: str, data: dict[str, Any], rows: list[dict], progress: bool
) -> None:
    """Both KD step variants: tokens/s, MFU (with a known GPU peak) and peak memory."""
    for variant in ("reference", "ours"):
        log(progress, f"gpu: KD step, {variant}")
        data[variant] = run_child("kd_step", dict(spec, variant=variant))
    ref, ours = data["reference"], data["ours"]
    if "step_s" in ref and "step_s" in ours:
        name = ours.get("device_name", device)
        data["device_name"] = name
        tokens = spec["batch"] * spec["seq"]
        # FLOPs the hardware executes in a LoRA step with a frozen base, per token: forward 2P,
        # the forward again under activation checkpointing (recomputation) 2P, input-gradient
        # backward 2P (LoRA weight gradients and attention scores ignored), with P = non-embedding
        # parameters + the V x H output layer. So "MFU" here counts recomputation (an HFU).
        params = ours["params_non_embedding"] + spec["vocab"] * spec["hidden"]
        passes = 6 if spec["gradient_checkpointing"] else 4
        flops = passes * params * tokens
        data["flops_per_token"] = f"{passes}P (P = {params:.3g})"
        peak = peak_flops(name) if device == "cuda" else None
        for side in (ref, ours):
            side["tokens_per_s"] = tokens / side["step_s"]
            side["mfu"] = flops / side["step_s"] / peak if peak else None
        rows.append(
            row(
                "gpu",
                f"KD step tokens/s ({name}), ours / reference",
                ref["tokens_per_s"],
                ours["tokens_per_s"],
                "ours/baseline",
                unit="tok/s",
                goal=(">=", 1.0),
            )
        )
        if peak:
            rows.append(
                row(
                    "gpu", "KD step MFU, ours / reference", ref["mfu"], ours["mfu"], "ours/baseline"
                )
            )
        key = "peak_cuda_delta_mb" if device == "cuda" else "peak_rss_delta_mb"
        rows.append(
            row(
                "gpu",
                f"KD step {key.replace('_', ' ')}, reference / ours",
                ref[key],
                ours[key],
                "baseline/ours",
                unit="MiB",
                goal=(">=", 10.0),
            )
        )


def _generation_rows(
    g_spec: dict[str, Any], data: dict[str, Any], rows: list[dict], progress: bool
) -> None:
    """transformers' generate at batch N against batch 1, and ssb's decode loop against it."""
    log(progress, "gpu: generation")
    gen = run_child("gpu_generate", g_spec)
    data["generation"] = gen
    if "batched_tokens_per_s" in gen:
        rows.append(
            row(
                "gpu",
                f"generation tokens/s, batch {gen['batch']} / batch 1",
                gen["sequential_tokens_per_s"],
                gen["batched_tokens_per_s"],
                "ours/baseline",
                unit="tok/s",
                goal=(">=", 4.0),
            )
        )
        for batch, loops in gen["loop_tokens_per_s"].items():
            rows.append(
                row(
                    "gpu",
                    f"decode loop tokens/s, ssb / transformers generate, batch {batch}",
                    loops["transformers"],
                    loops["ssb"],
                    "ours/baseline",
                    unit="tok/s",
                    goal=(">=", 2.0),
                    note=f"ssb's loop: {loops['ssb']:.0f} tok/s",
                )
            )


def _vllm_generation_rows(
    g_spec: dict[str, Any], data: dict[str, Any], rows: list[dict], progress: bool
) -> None:
    """vLLM against transformers at batch N (skipped, saying why, without vLLM or CUDA)."""
    gen = data["generation"]
    log(progress, "gpu: generation, vLLM")
    vgen = run_child("gpu_generate_vllm", g_spec)
    data["generation_vllm"] = vgen
    if "tokens_per_s" in vgen and "batched_tokens_per_s" in gen:
        rows.append(
            row(
                "gpu",
                f"generation tokens/s, vLLM / transformers batch {gen['batch']}",
                gen["batched_tokens_per_s"],
                vgen["tokens_per_s"],
                "ours/baseline",
                unit="tok/s",
                goal=(">=", 1.0),
            )
        )
