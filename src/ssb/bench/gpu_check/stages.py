"""Steps 3-7 and 9 of the GPU check: the stages through the CLI on the random model, the bootstrap
staged (see `stage_pairs`), and the same targets and training under FSDP2 on 2 GPUs."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

from ssb.bench.gpu_check.steps import CheckFailed, StepResult, run_logged, run_ssb, stage_summary

TRAIN_BATCH = 2


def check_rollout(
    run: Path, overrides: list[str], logs: Path, s: dict[str, int], backend: str
) -> StepResult:
    from ssb.rundir import read_jsonl

    stderr = run_ssb("rollout", run, overrides, logs / "rollout.log")
    records = read_jsonl(run / "rollouts.jsonl")
    engines = stderr.count("vLLM: starting one engine")
    details = {"summary": stage_summary(run, "rollout"), "vllm_engines": engines}
    if len(records) != s["problems"] or any(len(r["samples"]) != s["samples"] for r in records):
        raise CheckFailed(f"expected {s['problems']} problems x {s['samples']} samples", details)
    if (backend == "vllm") != (engines == 1):
        raise CheckFailed(f"{backend} backend, but {engines} vLLM engine starts logged", details)
    tps = details["summary"].get("tokens_per_second")
    return f"{len(records)} problems x {s['samples']} samples, {tps} tokens/s", details


def stage_pairs(run: Path, model_dir: Path) -> StepResult:
    """STAGED bootstrap (see benchmarks/gpu_check.py): mark one sample of every problem correct and
    one wrong, then write pairs.jsonl as `ssb bootstrap` would with the correct rollout as the
    teacher's reply."""
    from transformers import AutoTokenizer

    from ssb.config import load_config
    from ssb.grading import extract_boxed, grade
    from ssb.problems import Problem
    from ssb.prompts import (
        render_prompt_ids,
        reply_format,
        student_messages,
        teacher_messages,
        uses_chat_template,
    )
    from ssb.rundir import RunDir, append_jsonl, atomic_write_text, read_jsonl
    from ssb.stages.bootstrap import select_rollouts

    cfg = load_config(config_file=run / "config.yaml")
    rundir = RunDir(run)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = read_jsonl(rundir.rollouts_path)
    for record in records:
        gold = record["gold"]
        wrong = str(int(gold) + 1) if gold.lstrip("-").isdigit() else "0"
        for sample, answer in zip(record["samples"][:2], (gold, wrong)):
            suffix = tokenizer(f" The answer is \\boxed{{{answer}}}.", add_special_tokens=False)
            sample["token_ids"] = sample["token_ids"] + suffix["input_ids"]
            sample["text"] = tokenizer.decode(sample["token_ids"], skip_special_tokens=True)
            sample["answer"] = extract_boxed(sample["text"])
            sample["correct"] = bool(grade(sample["text"], gold))
        record["num_correct"] = sum(s["correct"] for s in record["samples"])
    atomic_write_text(
        rundir.rollouts_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    )
    chat = uses_chat_template(tokenizer, cfg.prompt)
    end = reply_format(tokenizer, cfg.prompt).end_token_id
    pairs, decisions = [], []
    for record in records:
        status, good, bad = select_rollouts(record, cfg.seed)
        if status != "mixed":
            raise CheckFailed(f"problem {record['id']} is {status} after staging, not mixed")
        problem = Problem(record["id"], record["question"], record["gold"], record["source"])
        s_msgs = student_messages(problem, cfg.prompt)
        t_msgs = teacher_messages(
            problem,
            cfg.prompt,
            chat=chat,
            context=cfg.bootstrap.teacher_context,
            correct=good["text"],
            incorrect=bad["text"],
        )
        pairs.append(
            {
                "id": problem.id,
                "question": problem.question,
                "gold": problem.answer,
                "source": problem.source,
                "student_messages": s_msgs,
                "teacher_messages": t_msgs,
                "student_prompt_ids": render_prompt_ids(tokenizer, s_msgs, cfg.prompt),
                "teacher_prompt_ids": render_prompt_ids(tokenizer, t_msgs, cfg.prompt),
                "reply": good["text"],
                "reply_ids": good["token_ids"],
                "end_token_id": end,
                "teacher_answer": extract_boxed(good["text"]),
                "correct_rollout": good["text"],
                "correct_answer": good["answer"],
                "incorrect_rollout": bad["text"],
                "incorrect_answer": bad["answer"],
            }
        )
        decisions.append({"id": problem.id, "status": "kept"})
    append_jsonl(rundir.pairs_path, pairs)
    append_jsonl(rundir.bootstrap_log_path, decisions)
    note = "benchmarks/gpu_check.py: pairs written from the rollouts, no teacher generation"
    rundir.record_stage("bootstrap", "complete", staged=note, kept=len(pairs))
    lengths = [len(p["reply_ids"]) for p in pairs]
    details = {
        "pairs": len(pairs),
        "reply_tokens": lengths,
        "teacher_prompt_tokens": [len(p["teacher_prompt_ids"]) for p in pairs],
    }
    return f"{len(pairs)} pairs (staged), replies of {min(lengths)}-{max(lengths)} tokens", details


def check_targets(run: Path, overrides: list[str], logs: Path) -> StepResult:
    from ssb.rundir import read_jsonl

    run_ssb("targets", run, overrides, logs / "targets.log")
    index = json.loads((run / "targets" / "index.json").read_text())
    pair_ids = {p["id"] for p in read_jsonl(run / "pairs.jsonl")}
    details = {"summary": stage_summary(run, "targets"), "mode": index.get("mode")}
    if set(index["examples"]) != pair_ids:
        raise CheckFailed("the target store does not hold exactly the pairs", details)
    return f"{len(pair_ids)} examples, mode {index.get('mode')}", details


def check_train(run: Path, overrides: list[str], logs: Path, s: dict[str, int]) -> StepResult:
    from ssb.rundir import read_jsonl

    run_ssb("train", run, overrides, logs / "train.log")
    log = read_jsonl(run / "train_log.jsonl")
    losses = [r["loss"] for r in log if "loss" in r]
    steps = math.ceil(s["problems"] / TRAIN_BATCH)
    details = {"summary": stage_summary(run, "train"), "losses": losses, "steps": steps}
    if not (run / "adapter" / "adapter_config.json").exists():
        raise CheckFailed("no adapter written", details)
    if len(losses) != steps or not all(math.isfinite(x) for x in losses):
        raise CheckFailed(f"expected {steps} finite losses, got {losses}", details)
    return f"{steps} steps, loss {losses[0]:.4g} -> {losses[-1]:.4g}", details


def check_eval(
    run: Path, overrides: list[str], logs: Path, s: dict[str, int], backend: str
) -> StepResult:
    stderr = run_ssb("eval", run, overrides, logs / "eval.log")
    summary = json.loads((run / "eval" / "summary.json").read_text())
    starts = [line for line in stderr.splitlines() if "vLLM: starting one engine" in line]
    details = {
        "summary": stage_summary(run, "eval"),
        "results": {m: r["synthetic"]["n"] for m, r in summary["results"].items()},
        "vllm_engine_lines": starts,
    }
    for model in ("base", "student"):
        if summary["results"].get(model, {}).get("synthetic", {}).get("n") != s["eval_problems"]:
            raise CheckFailed(f"no {s['eval_problems']} eval records for {model}", details)
    if backend == "vllm" and not (len(starts) == 1 and "base, student" in starts[0]):
        raise CheckFailed("expected one vLLM engine serving base and student", details)
    tps = details["summary"].get("tokens_per_second")
    return f"base and student, {s['eval_problems']} problems each, {tps} tokens/s", details


FSDP_GPUS = 2


def check_fsdp2(
    out: Path, run: Path, overrides: list[str], logs: Path, device: str, accelerate_config: Path
) -> StepResult:
    """`ssb targets` and `ssb train` under `accelerate launch` with `accelerate_config`
    (examples/accelerate_fsdp.yaml) on 2 GPUs, in a copy of the run (its pairs; targets and
    training redone): every pair scored, and with half the per-process batch (so the same
    optimizer steps on the same data and the same seeded LoRA init) the adapter has the one-GPU
    adapter's keys and shapes and the loss curve follows the one-GPU run's. Differences are
    reported; bf16 sums in other orders on two GPUs, so only a first-step loss more than 10% off
    fails. Skipped, saying why, with fewer than 2 GPUs (the CPU form of this check is
    tests/test_fsdp.py)."""
    import torch
    from safetensors.torch import load_file

    from ssb.rundir import read_jsonl

    gpus = torch.cuda.device_count() if device == "cuda" else 0
    if gpus < FSDP_GPUS:
        reason = (
            "CPU form: accelerate runs FSDP on GPUs only (tests/test_fsdp.py runs FSDP2 on 2 CPU "
            "processes)"
            if device == "cpu"
            else f"{gpus} GPU visible, FSDP2 needs {FSDP_GPUS}"
        )
        print(f"  skipped: {reason}", flush=True)
        return f"skipped: {reason}", {"skipped": reason}
    accelerate = Path(sys.executable).parent / "accelerate"
    sharded = out / "run_fsdp2"
    shutil.rmtree(sharded, ignore_errors=True)
    sharded.mkdir()
    for name in ("pairs.jsonl", "config.yaml", "manifest.json"):
        if (run / name).exists():
            shutil.copy(run / name, sharded / name)
    launch = [
        str(accelerate), "launch", f"--config_file={accelerate_config}",
        f"--num_processes={FSDP_GPUS}", "--num_machines=1",
        f"--gpu_ids={','.join(str(i) for i in range(FSDP_GPUS))}", "-m", "ssb",
    ]  # fmt: skip
    # model.device=auto: each process on the GPU of its local rank ("cuda" is GPU 0 for all).
    sets = [x for item in [*overrides, "model.device=auto"] for x in ("--set", item)]
    half = ["--set", f"train.batch_size={TRAIN_BATCH // FSDP_GPUS}"]
    for stage, extra in (("targets", []), ("train", half)):
        cmd = [*launch, stage, "--run-dir", str(sharded), *sets, *extra]
        print(f"  $ accelerate launch (FSDP2, {FSDP_GPUS} GPUs) ssb {stage}", flush=True)
        run_logged(cmd, logs / f"fsdp2_{stage}.log", f"FSDP2 ssb {stage}")

    index = json.loads((sharded / "targets" / "index.json").read_text())
    one_log = [r["loss"] for r in read_jsonl(run / "train_log.jsonl") if "loss" in r]
    two_log = [r["loss"] for r in read_jsonl(sharded / "train_log.jsonl") if "loss" in r]
    one = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    two_path = sharded / "adapter" / "adapter_model.safetensors"
    two = load_file(str(two_path)) if two_path.exists() else {}
    details = {
        "gpus": FSDP_GPUS,
        "targets": len(index["examples"]),
        "losses_one_gpu": one_log,
        "losses_fsdp2": two_log,
        "adapter_max_abs_diff": max(
            (float((two[k].float() - one[k].float()).abs().max()) for k in one if k in two),
            default=None,
        ),
    }
    if set(index["examples"]) != {p["id"] for p in read_jsonl(run / "pairs.jsonl")}:
        raise CheckFailed("the sharded target store does not hold exactly the pairs", details)
    if {k: v.shape for k, v in two.items()} != {k: v.shape for k, v in one.items()}:
        raise CheckFailed("the FSDP2 adapter's keys or shapes differ from one GPU's", details)
    if len(two_log) != len(one_log) or not all(math.isfinite(x) for x in two_log):
        raise CheckFailed(f"expected {len(one_log)} finite losses, got {two_log}", details)
    if abs(two_log[0] - one_log[0]) > 0.1 * abs(one_log[0]):
        raise CheckFailed("first-step loss differs from one GPU's by more than 10%", details)
    return (
        f"{FSDP_GPUS} GPUs: {len(index['examples'])} targets, loss {two_log[0]:.4g} -> "
        f"{two_log[-1]:.4g} (one GPU {one_log[0]:.4g} -> {one_log[-1]:.4g}), adapter max |diff| "
        f"{details['adapter_max_abs_diff']:.3g}"
    ), details
