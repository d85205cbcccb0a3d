"""GPU check: ssb's GPU paths end to end on a random-init Qwen2.5-3B, with no model hub.

    bash benchmarks/gpu_check.sh                          # the GPU when there is one, else CPU
    bash benchmarks/gpu_check.sh --device cpu --out /tmp/gc

Each step is timed and printed; everything measured goes to OUT/gpu_check.json and a summary
table is printed at the end. The exit code is 1 when any check failed.

1. environment: the device, the generation backend (`generation.backend=auto`: vLLM on a GPU,
   transformers on CPU), package versions. On a GPU, vLLM missing is a failed check (the
   other steps still run, on transformers).
2. model: a random-init `Qwen2ForCausalLM` with Qwen2.5-3B's config (151,936-token vocabulary,
   hidden 2048, 36 layers, 16/2 heads, tied embeddings, bf16) and a byte-level BPE tokenizer
   trained here on a small corpus (ChatML template; padded with filler tokens to the model's
   vocabulary), saved with `save_pretrained`. `--size tiny` (the default
   on CPU): 2 layers, hidden 64, the tokenizer's own vocabulary, float32. Two changes to the
   random init make greedy outputs worth comparing (`ssb.bench.gpu_check.setup.build_model`).
3. rollout: `ssb rollout` on 8 synthetic problems x 2 samples.
4. bootstrap (STAGED, see below): pairs.jsonl written from the rollouts.
5. targets: `ssb targets` (the frozen teacher's hidden states on the reply tokens).
6. train: `ssb train`, 4 optimizer steps of LoRA distillation.
7. eval: `ssb eval` once; the base and the student through ONE generation engine (on vLLM: the
   base without a LoRA request, the student as a LoRA request; the log must show one engine).
8. lora_tokens: greedy outputs through the stages' engine (`ssb.stages.engine.generation_engine`:
   vLLM serving LoRA adapters on a GPU, ssb's own transformers decode loop on CPU) compared token
   for token with transformers + PEFT (`PeftModel.from_pretrained`, `generate(do_sample=False)`,
   one prompt at a time), on the first 8 synthetic eval prompts rendered as eval renders them.
   Three models: the base, the trained student (`RUN/adapter`), and "boosted": the student's
   adapter files with every lora_B replaced by seeded random values about half as large, in
   effect, as the base layer they adapt. Four training steps move lora_B little from zero, so
   the student alone may change few outputs, too few to show that a LoRA is applied at all.
   lora_tokens_fp32 (GPU only): the same comparison with both sides in float32 on the GPU,
   through ssb's transformers decode loop (vLLM's LoRA kernels take only half precision). In
   bf16 a random model's top logits often tie exactly (an H200 run found ties at the first
   divergence of 7 of 8 prompts), so the bf16 step alone cannot tell a rounding flip from a
   small bug; in float32 nothing but a near-exact tie may part the two.
9. fsdp2: with 2 or more GPUs, `ssb targets` and `ssb train` again under `accelerate launch` with
   examples/accelerate_fsdp.yaml on 2 GPUs (parameters sharded), in a copy of the run: every
   pair scored, the adapter with the one-GPU adapter's keys and shapes, the loss curve next to
   the one-GPU run's. On 1 GPU or CPU it is skipped, printing why.
10. bench: `ssb bench --sections gpu` on a GPU (KD step tokens/s, MFU counting recomputation
   and peak memory, transformers and vLLM generation tokens/s, ssb's decode loop against
   transformers' generate at batch 16 and 64); on CPU the same code at tiny sizes
   (`ssb.bench.gpu.gpu_runs(..., "cpu")`, the decode loop at batch 4 and 8; the vLLM figure is
   skipped there, saying why).
11. onpolicy: the onpolicy arm's step and sampling seconds, 4 steps on the staged pairs, with
   ssb's decode loop and, where the backend is vllm, through one engine serving the student's
   adapter (re-registered each step, asleep between steps).

What is real: the model architecture and its sizes, the tokenizer files, every stage except
bootstrap (real CLI subprocesses on the real config), the engine, adapters written by `ssb train`,
vLLM, PEFT. What is staged: a random model never answers correctly, so after the rollout one
sample of every problem is extended with the gold answer and one with a wrong answer (both
boxed; token ids and text kept consistent), and the bootstrap stage is not run: pairs.jsonl is
written the way `ssb bootstrap` writes it (its rollout selection, teacher prompt and renderer),
with the correct rollout (the model's own tokens) as the teacher's reply, because the hinted
teacher's reply would be wrong and rejected. The bootstrap stage is marked complete in the
manifest with `staged` saying so.

The LoRA comparison's rule is in `ssb.bench.gpu_check.lora` (what counts as rounding).

Budget: 313 s measured on one H200 without vLLM (2026-12-04; docs/gpu.md "Checking a GPU machine");
with vLLM, four engines start (rollout, eval, lora_tokens and the bench's), a minute or two more;
about 1.5 minutes on 2 CPU cores for the tiny form.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from ssb.bench.gpu_check.bench import check_bench
from ssb.bench.gpu_check.lora import check_lora_tokens, check_lora_tokens_fp32
from ssb.bench.gpu_check.onpolicy import check_onpolicy
from ssb.bench.gpu_check.setup import build_model, check_environment
from ssb.bench.gpu_check.stages import (
    TRAIN_BATCH,
    check_eval,
    check_fsdp2,
    check_rollout,
    check_targets,
    check_train,
    stage_pairs,
)
from ssb.bench.gpu_check.steps import Steps, summary_table
from ssb.rundir import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
# Per device: problems rolled out (= pairs), samples per problem, new tokens per generation, eval
# problems, prompts and greedy tokens of the LoRA comparison.
SETTINGS = {
    "cuda": {"problems": 8, "samples": 2, "max_new_tokens": 64, "eval_problems": 8,
             "lora_prompts": 8, "lora_tokens": 32},
    "cpu": {"problems": 8, "samples": 2, "max_new_tokens": 8, "eval_problems": 8,
            "lora_prompts": 8, "lora_tokens": 16},
}  # fmt: skip


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: cuda when a GPU is usable, else cpu (the CPU form: transformers, float32)",
    )
    parser.add_argument(
        "--size", choices=("3b", "tiny"), default=None, help="3b on cuda, tiny on cpu"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/gpu_check"),
        help="output directory, replaced on each run (default: runs/gpu_check)",
    )
    return parser, parser.parse_args(argv)


def stage_overrides(model_dir: Path, device: str, s: dict[str, int]) -> list[str]:
    """The `--set` items every stage runs with: the random model, the check's sizes."""
    return [
        f"model.name={model_dir}",
        f"model.device={device}",
        # float32 on CPU: the LoRA comparison must be exact there.
        f"model.dtype={'float32' if device == 'cpu' else 'auto'}",
        "data.train=synthetic",
        f"data.max_problems={s['problems']}",
        "prompt.format=chat",
        f"generation.backend={'hf' if device == 'cpu' else 'auto'}",
        f"generation.max_new_tokens={s['max_new_tokens']}",
        f"rollout.num_samples={s['samples']}",
        "train.epochs=1",
        f"train.batch_size={TRAIN_BATCH}",
        "train.save_steps=1000",
        "eval.benchmarks=synthetic",
        f"eval.max_problems={s['eval_problems']}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    if args.device == "cpu":
        # The CPU form stays on the CPU, also in the children, also on a machine with a GPU.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from ssb.generate.vllm import select_backend
    from ssb.hardware import cuda_unusable_reason

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and cuda_unusable_reason() is not None:
        parser.error(f"--device cuda: {cuda_unusable_reason()}")
    size = args.size or ("3b" if device == "cuda" else "tiny")
    s = SETTINGS[device]
    out = args.out.resolve()
    if out.exists():
        # A fresh run each time (the stages would resume an old one), but never delete a
        # directory this script did not make.
        if any(out.iterdir()) and not (out / "gpu_check.json").exists():
            parser.error(f"--out {out} exists and holds something else than a gpu_check run")
        shutil.rmtree(out)
    logs = out / "logs"
    logs.mkdir(parents=True)
    model_dir, run = out / "model", out / "run"
    start = time.perf_counter()
    print(f"gpu_check: device {device}, model size {size}, output in {out}", flush=True)

    steps = Steps()
    steps.run("environment", lambda: check_environment(device))
    backend = steps.results["environment"].get("details", {}).get("backend")
    if backend is None:  # the environment step failed before saying; resolve it again
        backend = "hf" if device == "cpu" else select_backend("auto")
    sets = stage_overrides(model_dir, device, s)
    fsdp_config = ROOT / "examples" / "accelerate_fsdp.yaml"

    # The steps, one row each of the summary table, in order. A step is a function returning
    # (one-line result, details) and raising CheckFailed when what it checks is wrong; `needs`
    # names the steps it cannot run without. A new row: one `steps.run` line here, its function
    # in ssb/bench/gpu_check/, and its name in tests/test_gpu_check.py's STEPS.
    steps.run("model", lambda: build_model(model_dir, size, device))
    steps.run("rollout", lambda: check_rollout(run, sets, logs, s, backend), needs=("model",))
    steps.run("bootstrap (staged)", lambda: stage_pairs(run, model_dir), needs=("rollout",))
    steps.run("targets", lambda: check_targets(run, sets, logs), needs=("bootstrap (staged)",))
    steps.run("train", lambda: check_train(run, sets, logs, s), needs=("targets",))
    steps.run("eval", lambda: check_eval(run, sets, logs, s, backend), needs=("train",))
    steps.run(
        "lora_tokens", lambda: check_lora_tokens(run, model_dir, out, s, device), needs=("train",)
    )
    steps.run(
        "lora_tokens_fp32",
        lambda: check_lora_tokens_fp32(run, model_dir, out, s, device),
        needs=("train",),
    )
    steps.run(
        "fsdp2",
        lambda: check_fsdp2(out, run, sets, logs, device, fsdp_config),
        needs=("train",),
    )
    steps.run("bench", lambda: check_bench(out, device, logs))
    steps.run(
        "onpolicy",
        lambda: check_onpolicy(run, sets, out, backend),
        needs=("bootstrap (staged)",),
    )

    total = time.perf_counter() - start
    ok = all(entry["ok"] for entry in steps.results.values())
    results = {
        "ok": ok,
        "device": device,
        "size": size,
        "backend": backend,
        "total_s": round(total, 2),
        "steps": steps.results,
    }
    atomic_write_json(out / "gpu_check.json", results, default=str)
    table = summary_table(steps.results, total)
    atomic_write_text(out / "gpu_check.md", table + "\n")
    print(f"\n## gpu_check: {device}, {size} model, backend {backend}\n\n{table}\n")
    print(
        f"{'all checks passed' if ok else 'SOME CHECKS FAILED'}; details: {out / 'gpu_check.json'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":  # vLLM's engine may re-import this file in a spawned process
    raise SystemExit(main())
