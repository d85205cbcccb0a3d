"""Section ``cpu``: the quickstart's hot paths on each CPU class, before and after.

An AVX2-only CPU (no native bf16) and a CPU with AVX512-BF16 behave very differently: there bf16
matmuls are emulated, and a bf16 LoRA backward falls into torch's scalar reference GEMM. This
section measures, in one run, on the embedded model with the quickstart's prompts:

- ``gemm``: the output layer's GEMMs (decode forward, 16 x 640 . 640 x 262,144, and the backward
  shape, 16 x 262,144 . 262,144 x 640), bf16 vs float32;
- ``generation``: rollout tokens/s with transformers' `generate` loop (before) and ssb's own
  decode loop (after, the default), in bf16 and float32;
- ``train``: one KD training step (the real collator and `SSBTrainer.compute_loss`) with every
  row's full forward (before) and the shared few-shot prefix run once (after), float32; bf16 too
  where it is native.

Each (ISA, dtype) runs in its own child process. The native ISA is this machine's; "AVX2" is
emulated on a newer CPU by limiting torch's, oneDNN's and MKL's kernels (`AVX2_ENV`), which
reproduces the emulated-bf16 slowdown (checked: a bf16 backward GEMM takes ~1 min instead of
~0.1 s) but not an older CPU's lower float32 throughput: on a real 2-core AVX2 EPYC the
quickstart's float32 rollout ran ~2.5x slower than emulated here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ssb.bench.children import run_child
from ssb.bench.generation import decode_loop_speeds
from ssb.bench.report import log, row

# Environment that makes torch (ATen), oneDNN and MKL use AVX2 kernels only.
AVX2_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}


def _timed(fn: Callable[[], Any], repeats: int = 1, warmup: bool = True) -> float:
    """Seconds per call of `fn`, over `repeats` calls after one untimed call (`warmup`)."""
    if warmup:
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _gemm(sizes: dict[str, Any]) -> dict[str, float]:
    import torch

    vocab, hidden = sizes["vocab"], sizes["hidden"]
    out: dict[str, float] = {}
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        weight = torch.randn(vocab, hidden).to(dtype)
        x = torch.randn(16, hidden).to(dtype)
        grad = torch.randn(sizes["grad_rows"], vocab).to(dtype)
        out[f"head_forward_{name}_s"] = _timed(
            lambda x=x, weight=weight: torch.nn.functional.linear(x, weight), 3
        )
        # No warm-up: emulated bf16 takes ~15 s here (the scalar reference GEMM).
        out[f"head_backward_{name}_s"] = _timed(
            lambda grad=grad, weight=weight: grad @ weight, 1, warmup=False
        )
    return out


class _MemoryReader:
    """Teacher hidden rows held in memory, read the way `TargetReader.get` is."""

    def __init__(self, rows: dict[str, tuple[list[int], Any]]) -> None:
        self.rows = rows

    def get(self, example_id: str) -> tuple[list[int], dict[str, Any]]:
        reply, hidden = self.rows[example_id]
        return reply, {"hidden": hidden}


def child_cpu(spec: dict[str, Any]) -> dict[str, Any]:
    """One (ISA, dtype) child: generation before/after and a training step before/after."""
    import torch

    from ssb.bench.pairs import make_pairs
    from ssb.config import load_config
    from ssb.generate import SamplingParams
    from ssb.hardware import hardware_info
    from ssb.problems import load_train_problems
    from ssb.prompts import render_prompt_ids, student_messages
    from ssb.rundir import RunDir
    from ssb.stages.base import load_base
    from ssb.stages.lora_training import lora_config
    from ssb.stages.targets import teacher_rows, teacher_sequence
    from ssb.stages.train import DistillCollator, make_trainer

    sizes = spec["sizes"]
    result: dict[str, Any] = {}
    if spec.get("gemm"):
        result["gemm"] = _gemm(sizes["gemm"])
    overrides = [f"model.dtype={spec['dtype']}", "model.device=cpu"]
    if spec.get("model"):
        overrides.append(f"model.name={spec['model']}")
    cfg = load_config(preset="quickstart", overrides=overrides)
    start = time.perf_counter()
    base = load_base(cfg)
    model, tok = base.model, base.tokenizer
    result["load_s"] = time.perf_counter() - start
    result["hardware"] = hardware_info(next(model.parameters()).device, model.dtype)

    # Generation: the quickstart's rollout prompts and sampling, both loops on the same prompts.
    cfg.data.max_problems = sizes["gen_problems"]
    prompts = [
        render_prompt_ids(tok, student_messages(p, cfg.prompt), cfg.prompt)
        for p in load_train_problems(cfg)
    ]
    params = SamplingParams.of(
        cfg.rollout.sampling,
        max_new_tokens=sizes["max_new_tokens"] or cfg.generation.max_new_tokens,
        n=cfg.rollout.num_samples,
        stop_strings=base.reply.stop_strings,
        seed=1,
    )
    result["generation"] = decode_loop_speeds(
        model, tok, prompts, params, cfg.generation.batch_size, base.reply.stop_token_ids
    )

    if spec.get("train"):
        from peft import get_peft_model

        pairs = make_pairs(tok, cfg, sizes["train_pairs"])
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        rows = teacher_rows(model, pairs, pad)
        reader = _MemoryReader(
            {p["id"]: (teacher_sequence(p)[1], r) for p, r in zip(pairs, rows, strict=True)}
        )
        batch = DistillCollator(pad, "hidden", reader)(pairs)
        torch.manual_seed(0)
        student = get_peft_model(model, lora_config(cfg))
        try:
            rundir = RunDir(spec["tmp"])
            trainer = make_trainer(cfg, rundir, student, tok, pairs, reader, progress=False)
            steps: dict[str, Any] = {}
            for name, prefix in (("full", 0), ("shared_prefix", batch["shared_prefix"])):
                inputs = dict(batch, shared_prefix=prefix)

                def step(inputs=inputs):
                    student.zero_grad()
                    trainer.compute_loss(student, inputs).backward()

                steps[name] = {"seconds": _timed(step, sizes["train_repeats"])}
            steps["shared_prefix_tokens"] = int(batch["shared_prefix"])
            steps["tokens"] = int(batch["attention_mask"].sum())
            result["train"] = steps
        finally:
            student.unload()
    return result


def section_cpu(
    sizes: dict[str, Any], model: str | None, progress: bool
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run the children and build the table rows (see the module docstring)."""
    from ssb.hardware import cpu_capability, cpu_has_native_bf16

    native = "AVX512-BF16" if cpu_has_native_bf16() else cpu_capability()
    isas = [(native, {})]
    if cpu_capability().startswith("AVX512"):
        isas.append(("AVX2 (emulated)", AVX2_ENV))
    data: dict[str, Any] = {"native": native, "runs": {}}
    rows: list[dict[str, Any]] = []
    for isa, env in isas:
        bf16_native = isa == "AVX512-BF16"
        for dtype in ("bfloat16", "float32"):
            spec = {
                "sizes": sizes,
                "model": model,
                "dtype": dtype,
                "gemm": dtype == "float32",  # once per ISA (it times both dtypes)
                # A bf16 backward without native bf16 takes minutes per step: not run.
                "train": dtype == "float32" or bf16_native,
            }
            log(progress, f"  cpu: {isa}, {dtype}")
            run = run_child("cpu_isa", spec, env=env)
            data["runs"][f"{isa} {dtype}"] = run
            if "error" in run:
                log(progress, f"    error: {run['error'][:200]}")
                continue
            gen = run["generation"]
            rows.append(
                row(
                    "cpu",
                    f"{isa}, {dtype}: rollout tok/s, transformers generate vs ssb's decode loop",
                    gen["transformers"]["tokens_per_s"],
                    gen["ssb"]["tokens_per_s"],
                    "ours/baseline",
                    unit="tok/s",
                )
            )
            if "train" in run:
                train = run["train"]
                rows.append(
                    row(
                        "cpu",
                        f"{isa}, {dtype}: KD train step, full rows vs shared prefix once "
                        f"({train['shared_prefix_tokens']} of {train['tokens']} tokens shared)",
                        train["full"]["seconds"],
                        train["shared_prefix"]["seconds"],
                        "baseline/ours",
                        unit="s",
                    )
                )
            if "gemm" in run:
                g = run["gemm"]
                for kind in ("forward", "backward"):
                    rows.append(
                        row(
                            "cpu",
                            f"{isa}: output-layer {kind} GEMM, bf16 vs float32 "
                            "(> 1: float32 is faster)",
                            g[f"head_{kind}_bfloat16_s"],
                            g[f"head_{kind}_float32_s"],
                            "baseline/ours",
                            unit="s",
                        )
                    )
        bf16 = data["runs"].get(f"{isa} bfloat16", {}).get("generation")
        fp32 = data["runs"].get(f"{isa} float32", {}).get("generation")
        if bf16 and fp32:
            chosen = "bfloat16" if bf16_native else "float32"
            rows.append(
                row(
                    "cpu",
                    f"{isa}: rollout tok/s, bf16 + transformers loop (shipped before) vs "
                    f"dtype=auto ({chosen}) + ssb loop (now)",
                    bf16["transformers"]["tokens_per_s"],
                    (bf16 if bf16_native else fp32)["ssb"]["tokens_per_s"],
                    "ours/baseline",
                    unit="tok/s",
                )
            )
    return data, rows
