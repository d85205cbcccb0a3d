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
   vocabulary, see `build_tokenizer`), saved with `save_pretrained`. `--size tiny` (the default
   on CPU): 2 layers, hidden 64, the tokenizer's own vocabulary, float32. Two changes to the
   random init make greedy outputs worth comparing (`build_model`).
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
   the one-GPU run's (`check_fsdp2`). On 1 GPU or CPU it is skipped, printing why.
10. bench: `ssb bench --sections gpu` on a GPU (KD step tokens/s, MFU counting recomputation
   and peak memory, transformers and vLLM generation tokens/s, ssb's decode loop against
   transformers' generate at batch 16 and 64); on CPU the same code at tiny sizes
   (`ssb.bench.gpu.gpu_runs(..., "cpu")`, the decode loop at batch 4 and 8; the vLLM figure is
   skipped there, saying why).
11. onpolicy: the onpolicy arm's step and sampling seconds (`check_onpolicy`), 4 steps on the
   staged pairs, with ssb's decode loop and, where the backend is vllm, through one engine
   serving the student's adapter (re-registered each step, asleep between steps).

What is real: the model architecture and its sizes, the tokenizer files, every stage except
bootstrap (real CLI subprocesses on the real config), the engine, adapters written by `ssb train`,
vLLM, PEFT. What is staged: a random model never answers correctly, so after the rollout one
sample of every problem is extended with the gold answer and one with a wrong answer (both
boxed; token ids and text kept consistent), and the bootstrap stage is not run: pairs.jsonl is
written the way `ssb bootstrap` writes it (its rollout selection, teacher prompt and renderer),
with the correct rollout (the model's own tokens) as the teacher's reply, because the hinted
teacher's reply would be wrong and rejected. The bootstrap stage is marked complete in the
manifest with `staged` saying so.

LoRA comparison rule: on CPU (float32) every prompt must give identical token ids for all three
models. On a GPU (bf16; vLLM's kernels sum in other orders than transformers') outputs may part
by rounding: a prompt's first divergence counts as rounding (a close call) when the token vLLM
took there is, in the reference's logits at that step, less than `CLOSE_MARGIN` (0.1) standard
deviations of those logits below the reference's own choice. A model fails when more than half
of the prompts diverge, not by rounding, within their first `EARLY_TOKENS` (8) tokens; later or
rounding divergences are reported (`unexplained`, `close_call`, `min_margin` per prompt), not
failed. lora_tokens_fp32: every divergence must be a close call at `FP32_CLOSE_MARGIN` (0.001)
stds. Either way the boosted adapter must change the reference output of at least one prompt,
or the check could not tell an applied LoRA from an ignored one.

Budget: 313 s measured on one H200 without vLLM (2026-12-04; docs/gpu.md "Checking a GPU machine");
with vLLM, four engines start (rollout, eval, lora_tokens and the bench's), a minute or two more;
about 1.5 minutes on 2 CPU cores for the tiny form.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

QWEN25_3B = {
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1e6,
    "tie_word_embeddings": True,
}
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rope_theta": 1e6,
    "tie_word_embeddings": True,
}
# Per device: problems rolled out (= pairs), samples per problem, new tokens per generation, eval
# problems, prompts and greedy tokens of the LoRA comparison.
SETTINGS = {
    "cuda": {"problems": 8, "samples": 2, "max_new_tokens": 64, "eval_problems": 8,
             "lora_prompts": 8, "lora_tokens": 32},
    "cpu": {"problems": 8, "samples": 2, "max_new_tokens": 8, "eval_problems": 8,
            "lora_prompts": 8, "lora_tokens": 16},
}  # fmt: skip
BPE_VOCAB = 1024
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Std of the (tied) embedding times sqrt(hidden): the std of the logits. At the default init
# (0.02) the logits of a small model are nearly uniform, and greedy decoding then flips on
# rounding; 6 makes the top token stand out (reported as the margin of the LoRA comparison).
LOGIT_STD = 6.0
EARLY_TOKENS = 8
# A first divergence at a step whose top-1/top-2 logit margin is below this many logit stds, to
# the reference's runner-up, counts as rounding (bf16) rather than a bug (see close_call).
CLOSE_MARGIN = 0.1
# The same in float32 on a GPU: only kernels' summation orders differ (~1e-6 relative).
FP32_CLOSE_MARGIN = 1e-3
TOP_K = 5  # reference candidates kept per step for that test
BOOST = 0.5  # the boosted LoRA's output / the adapted layer's output, roughly
TRAIN_BATCH = 2
SUBPROCESS_TIMEOUT_S = 1200  # catches a hang only (a vLLM engine that never starts, ...)


# --------------------------------------------------------------------------- bookkeeping


class Steps:
    """Runs named steps in order, times them, keeps going after a failure, and records
    ok / seconds / result / details for each."""

    def __init__(self) -> None:
        self.results: dict[str, dict[str, Any]] = {}

    def run(
        self, name: str, fn: Callable[[], tuple[str, dict[str, Any]]], needs: tuple[str, ...] = ()
    ) -> bool:
        """Run `fn` (which returns a one-line result and details) unless a step it `needs`
        failed; True when it passed."""
        missing = [n for n in needs if not self.results.get(n, {}).get("ok")]
        print(f"\n== {name}", flush=True)
        start = time.perf_counter()
        if missing:
            entry = {"ok": False, "result": f"not run: needs {', '.join(missing)}"}
        else:
            try:
                result, details = fn()
                entry = {"ok": True, "result": result, "details": details}
            except CheckFailed as exc:
                entry = {"ok": False, "result": str(exc), "details": exc.details}
            except Exception as exc:  # noqa: BLE001 - reported as a failed step
                entry = {
                    "ok": False,
                    "result": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc(),
                }
                print(entry["traceback"], file=sys.stderr)
        entry["seconds"] = round(time.perf_counter() - start, 2)
        self.results[name] = entry
        mark = "ok" if entry["ok"] else "FAILED"
        print(f"== {name}: {mark} in {entry['seconds']:.1f} s: {entry['result']}", flush=True)
        return entry["ok"]


class CheckFailed(RuntimeError):
    """A check ran and its result is wrong (details say what was seen)."""

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.details = details or {}


def run_logged(cmd: list[str], log: Path, what: str) -> subprocess.CompletedProcess:
    """Run `cmd`, write its output to `log`; a non-zero exit or a hang raises `CheckFailed`."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        log.write_text(f"$ {' '.join(cmd)}\n\ntimed out\n{exc.stderr or ''}")
        raise CheckFailed(f"{what} timed out after {SUBPROCESS_TIMEOUT_S} s (log: {log})") from None
    log.write_text(f"$ {' '.join(cmd)}\n\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}")
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-20:])
        raise CheckFailed(f"{what} exited with {done.returncode} (log: {log})", {"tail": tail})
    return done


def run_ssb(command: str, run_dir: Path, overrides: list[str], log: Path) -> str:
    """`python -m ssb <command>` in a subprocess (the CLI as users run it); its output goes to
    `log`, and its stderr (the stage's log lines) is returned."""
    cmd = [sys.executable, "-m", "ssb", command, "--run-dir", str(run_dir)]
    for item in overrides:
        cmd += ["--set", item]
    print(f"  $ ssb {command} --run-dir {run_dir} ({len(overrides)} --set); log: {log}", flush=True)
    return run_logged(cmd, log, f"ssb {command}").stderr


def stage_summary(run_dir: Path, stage: str) -> dict[str, Any]:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return manifest["stages"][stage]


# --------------------------------------------------------------------------- 1. environment


def check_environment(device: str) -> tuple[str, dict[str, Any]]:
    import torch
    import transformers

    from ssb.generate.vllm import select_backend, vllm_available
    from ssb.hardware import cpu_model
    from ssb.rundir import package_versions

    backend = "hf" if device == "cpu" else select_backend("auto")
    details = {
        "device": device,
        "backend": backend,
        "vllm_installed": vllm_available(),
        "cpu": cpu_model(),
        "packages": package_versions(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if device == "cuda":
        details["gpu"] = torch.cuda.get_device_name()
        free, total = torch.cuda.mem_get_info()
        details["gpu_memory_gib"] = {"free": free / 2**30, "total": total / 2**30}
        if backend != "vllm":
            raise CheckFailed(
                "vLLM is not installed (pip install 'ssb[vllm]'): the vLLM checks cannot run; "
                "the other steps run on transformers",
                details,
            )
    where = details.get("gpu", details["cpu"])
    return f"{device} ({where}), generation backend {backend}", details


# --------------------------------------------------------------------------- 2. model


def training_corpus() -> list[str]:
    """Text like what the model will see: the system prompt, the teacher's template, synthetic
    problems and their worked solutions."""
    from ssb.config import DEFAULT_SYSTEM_PROMPT
    from ssb.problems import synthetic_problems
    from ssb.prompts import DEFAULT_TEACHER_TEMPLATE

    lines = [DEFAULT_SYSTEM_PROMPT, DEFAULT_TEACHER_TEMPLATE]
    for split in ("train", "test"):
        for problem in synthetic_problems(split, 200):
            lines.append(f"{problem.question}\n{problem.solution}")
    return lines


def build_tokenizer(vocab_size: int | None = None) -> Any:
    """A byte-level BPE (every string encodes) trained on `training_corpus`, ChatML template.

    With `vocab_size`, the vocabulary is padded with filler tokens (`<fill123>`) up to that size:
    BPE never produces them (no merge leads there), but each decodes to its own text. This
    keeps the 3B's real vocabulary (and so the real cost of its output layer) while every id the
    model can emit decodes, and vLLM, which refuses ids outside the tokenizer, accepts them.

    Saved next to a Qwen2 config.json, transformers (5.20 and 5.24 alike) loads it back as a
    `Qwen2Tokenizer`, with Qwen2's own pre-tokenizer: the stages, vLLM and this script all load
    it from the model directory that way, so they agree on every id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    if vocab_size is not None:
        data = json.loads(tok.to_str())
        vocab = data["model"]["vocab"]
        for i in range(tok.get_vocab_size(), vocab_size):
            vocab[f"<fill{i}>"] = i
        tok = Tokenizer.from_str(json.dumps(data))
    # As Qwen2.5-Instruct: replies end with <|im_end|> (eos), padding is <|endoftext|>.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )


def build_model(model_dir: Path, size: str, device: str) -> tuple[str, dict[str, Any]]:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

    tokenizer = build_tokenizer(QWEN25_3B["vocab_size"] if size == "3b" else None)
    # The model's vocabulary is the tokenizer's (padded to 151,936 for the 3B; see
    # build_tokenizer): a random model's greedy argmax may land anywhere in it.
    shape = dict(QWEN25_3B if size == "3b" else TINY, vocab_size=len(tokenizer))
    hidden = shape["hidden_size"]
    config = Qwen2Config(
        **shape,
        # ~ 0.02 at hidden 2048 (the real init): each layer keeps the scale of its input.
        initializer_range=hidden**-0.5,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    dtype = torch.bfloat16 if size == "3b" else torch.float32  # the 3B's checkpoint is bf16
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        # Peaked logits (LOGIT_STD); and random signs on the final norm, because with tied
        # embeddings a random model otherwise repeats its last input token forever (its own
        # embedding dominates the final hidden state).
        model.get_input_embeddings().weight.normal_(0.0, LOGIT_STD / hidden**0.5)
        norm = model.model.norm.weight
        norm.copy_(torch.randint(0, 2, norm.shape, device=norm.device).to(norm.dtype) * 2 - 1)
    # No sampling defaults in generation_config.json: both backends sample as ssb says.
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()  # the stages' engines size themselves from the memory free
    disk = sum(f.stat().st_size for f in model_dir.iterdir() if f.is_file())
    details = {
        "config": shape,
        "dtype": str(dtype),
        "parameters": params,
        "tokenizer_vocab": len(tokenizer),
        "trained_bpe_vocab": sum(not t.startswith("<fill") for t in tokenizer.get_vocab()),
        "disk_bytes": disk,
    }
    count = f"{params / 1e9:.2f} B" if params >= 1e9 else f"{params / 1e6:.2f} M"
    return f"{count} parameters, {disk / 2**20:,.1f} MiB on disk", details


# --------------------------------------------------------------------------- 3-7. the stages


def check_rollout(
    run: Path, overrides: list[str], logs: Path, s: dict[str, int], backend: str
) -> tuple[str, dict[str, Any]]:
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


def stage_pairs(run: Path, model_dir: Path) -> tuple[str, dict[str, Any]]:
    """STAGED bootstrap (see the module docstring): mark one sample of every problem correct and
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


def check_targets(run: Path, overrides: list[str], logs: Path) -> tuple[str, dict[str, Any]]:
    from ssb.rundir import read_jsonl

    run_ssb("targets", run, overrides, logs / "targets.log")
    index = json.loads((run / "targets" / "index.json").read_text())
    pair_ids = {p["id"] for p in read_jsonl(run / "pairs.jsonl")}
    details = {"summary": stage_summary(run, "targets"), "mode": index.get("mode")}
    if set(index["examples"]) != pair_ids:
        raise CheckFailed("the target store does not hold exactly the pairs", details)
    return f"{len(pair_ids)} examples, mode {index.get('mode')}", details


def check_train(
    run: Path, overrides: list[str], logs: Path, s: dict[str, int]
) -> tuple[str, dict[str, Any]]:
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
) -> tuple[str, dict[str, Any]]:
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


# --------------------------------------------------------------------------- 8. LoRA tokens


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
) -> tuple[str, dict[str, Any]]:
    """Step 8 (`float32`: its float32 form on a GPU, see the module's docstring)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ssb.config import load_config
    from ssb.generate import SamplingParams
    from ssb.hardware import pick_dtype
    from ssb.problems import load_eval_problems
    from ssb.prompts import render_prompt_ids, student_messages
    from ssb.stages.common import release_accelerator
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
) -> tuple[str, dict[str, Any]]:
    if device == "cpu":
        reason = "on CPU, lora_tokens runs in float32 already"
        print(f"  skipped: {reason}", flush=True)
        return f"skipped: {reason}", {"skipped": reason}
    return check_lora_tokens(run, model_dir, out, s, device, float32=True)


# --------------------------------------------------------------------------- 9. fsdp2

FSDP_GPUS = 2


def check_fsdp2(out: Path, run: Path, overrides: list[str], logs: Path, device: str):
    """`ssb targets` and `ssb train` under `accelerate launch` with examples/accelerate_fsdp.yaml
    on 2 GPUs, in a copy of the run (its pairs; targets and training redone): every pair
    scored, and with half the per-process batch (so the same optimizer steps on the same data
    and the same seeded LoRA init) the adapter has the one-GPU adapter's keys and shapes and the
    loss curve follows the one-GPU run's. Differences are reported; bf16 sums in other orders
    on two GPUs, so only a first-step loss more than 10% off fails. Skipped, saying why, with
    fewer than 2 GPUs (the CPU form of this check is tests/test_fsdp.py)."""
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
    root = Path(__file__).resolve().parents[1]
    accelerate = Path(sys.executable).parent / "accelerate"
    sharded = out / "run_fsdp2"
    shutil.rmtree(sharded, ignore_errors=True)
    sharded.mkdir()
    for name in ("pairs.jsonl", "config.yaml", "manifest.json"):
        if (run / name).exists():
            shutil.copy(run / name, sharded / name)
    launch = [
        str(accelerate), "launch", f"--config_file={root / 'examples' / 'accelerate_fsdp.yaml'}",
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


# --------------------------------------------------------------------------- 10. bench


def check_bench(out: Path, device: str, logs: Path) -> tuple[str, dict[str, Any]]:
    bench_dir = out / "bench"
    if device == "cuda":
        cmd = [sys.executable, "-m", "ssb", "bench", "--sections", "gpu", "--out", str(bench_dir)]
        print(f"  $ ssb bench --sections gpu --out {bench_dir}; log: {logs / 'bench.log'}")
        run_logged(cmd, logs / "bench.log", "ssb bench")
        results = json.loads((bench_dir / "results.json").read_text())
        data, rows = results["sections"]["gpu"], results["rows"]
    else:
        # The same code at tiny sizes (what tests/test_bench.py runs), so CI keeps it working.
        from ssb.bench.gpu import gpu_runs
        from ssb.bench.sizes import bench_sizes

        data, rows = gpu_runs(bench_sizes(True)["gpu"], "cpu", progress=True)
        bench_dir.mkdir(parents=True, exist_ok=True)
        (bench_dir / "gpu_cpu_form.json").write_text(
            json.dumps({"sections": {"gpu": data}, "rows": rows}, indent=1, default=float)
        )
    figures = {
        "kd_tokens_per_s": {s: data.get(s, {}).get("tokens_per_s") for s in ("reference", "ours")},
        "kd_mfu": {s: data.get(s, {}).get("mfu") for s in ("reference", "ours")},
        "kd_peak_cuda_delta_mb": {
            s: data.get(s, {}).get("peak_cuda_delta_mb") for s in ("reference", "ours")
        },
        "transformers_generation_tokens_per_s": data.get("generation", {}).get(
            "batched_tokens_per_s"
        ),
        "decode_loop_tokens_per_s": data.get("generation", {}).get("loop_tokens_per_s"),
        "vllm_generation_tokens_per_s": data.get("generation_vllm", {}).get("tokens_per_s"),
        "vllm_generation": data.get("generation_vllm"),
        "rows": [{k: r[k] for k in ("what", "baseline", "ours", "value", "unit")} for r in rows],
    }
    problems = [
        f"{part}: {data.get(part, {}).get('error')}"
        for part in ("reference", "ours", "generation", "generation_vllm")
        if "error" in data.get(part, {})
    ]
    if "error" in data:
        problems.append(data["error"])
    if None in figures["kd_tokens_per_s"].values():
        problems.append("no KD step figures")
    if device == "cuda" and figures["vllm_generation_tokens_per_s"] is None:
        problems.append(f"no vLLM generation figure ({data.get('generation_vllm')})")
    if problems:
        raise CheckFailed("; ".join(problems), figures)
    kd = figures["kd_tokens_per_s"]
    text = f"KD step {kd['ours']:.0f} tok/s (reference {kd['reference']:.0f})"
    if figures["kd_mfu"]["ours"] is not None:
        text += f", MFU {figures['kd_mfu']['ours']:.1%}"
    text += (
        f"; generation {figures['transformers_generation_tokens_per_s']:.0f} tok/s (transformers)"
    )
    for batch, loops in (figures["decode_loop_tokens_per_s"] or {}).items():
        text += (
            f", ssb's decode loop at batch {batch} {loops['ssb']:.0f} vs "
            f"{loops['transformers']:.0f} (generate)"
        )
    vllm_tps = figures["vllm_generation_tokens_per_s"]
    text += f", {vllm_tps:.0f} tok/s (vLLM)" if vllm_tps else ", vLLM skipped"
    return text, figures


ONPOLICY_STEPS = 4


def check_onpolicy(run: Path, overrides: list[str], out: Path, backend: str):
    """On-policy step time: the onpolicy arm (`ssb.ablation.onpolicy.run_onpolicy`) for
    `ONPOLICY_STEPS` optimizer steps on the staged pairs, sampling with ssb's decode loop and,
    where the backend is vllm, with one engine serving the student's adapter (re-registered each
    step, asleep while the optimizer runs). Per step: seconds and seconds spent sampling (the
    first step's sampling includes the engine start); greedy token equality is tested on CPU."""
    from ssb.ablation.onpolicy import run_onpolicy
    from ssb.config import load_config
    from ssb.rundir import RunDir, read_jsonl
    from ssb.stages.common import release_accelerator

    figures: dict[str, Any] = {}
    for name in ("hf", "vllm") if backend == "vllm" else ("hf",):
        rundir = RunDir(out / f"onpolicy-{name}")
        rundir.path.mkdir(parents=True)
        shutil.copy(RunDir(run).pairs_path, rundir.pairs_path)
        cfg = load_config(overrides=[*overrides, f"generation.backend={name}"])
        start = time.perf_counter()
        run_onpolicy(cfg, rundir, ONPOLICY_STEPS, progress=False)
        total = time.perf_counter() - start
        release_accelerator()
        log = [r for r in read_jsonl(rundir.train_log_path) if "loss" in r]
        sampling = [r["sampling_s"] for r in log]
        later = sorted(sampling[1:])
        figures[name] = {
            "total_s": round(total, 2),
            "sampling_s": sampling,
            "sampled_tokens": [r["sampled_tokens"] for r in log],
            # The steady step: all but the first step's extra sampling time (warm-up, engine).
            "step_s": round((total - sampling[0] + later[len(later) // 2]) / len(log), 2),
        }
    text = ", ".join(
        f"{name}: {f['step_s']:.2f} s/step (sampling {f['sampling_s'][-1]:.2f} s)"
        for name, f in figures.items()
    )
    return text, figures


# --------------------------------------------------------------------------- main


def summary_table(steps: dict[str, dict[str, Any]], total: float) -> str:
    lines = ["| step | seconds | ok | result |", "|---|---:|---|---|"]
    for name, entry in steps.items():
        result = str(entry["result"]).replace("|", "/").replace("\n", " ")
        ok = "yes" if entry["ok"] else "**NO**"
        lines.append(f"| {name} | {entry['seconds']:.1f} | {ok} | {result} |")
    lines.append(f"| total | {total:.1f} | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
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
    args = parser.parse_args(argv)

    if args.device == "cpu":
        # The CPU form stays on the CPU, also in the children, also on a machine with a GPU.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

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
        from ssb.generate.vllm import select_backend

        backend = "hf" if device == "cpu" else select_backend("auto")
    overrides = [
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
    steps.run("model", lambda: build_model(model_dir, size, device))
    steps.run("rollout", lambda: check_rollout(run, overrides, logs, s, backend), needs=("model",))
    steps.run("bootstrap (staged)", lambda: stage_pairs(run, model_dir), needs=("rollout",))
    steps.run("targets", lambda: check_targets(run, overrides, logs), needs=("bootstrap (staged)",))
    steps.run("train", lambda: check_train(run, overrides, logs, s), needs=("targets",))
    steps.run("eval", lambda: check_eval(run, overrides, logs, s, backend), needs=("train",))
    steps.run(
        "lora_tokens", lambda: check_lora_tokens(run, model_dir, out, s, device), needs=("train",)
    )
    steps.run(
        "lora_tokens_fp32",
        lambda: check_lora_tokens_fp32(run, model_dir, out, s, device),
        needs=("train",),
    )
    steps.run("fsdp2", lambda: check_fsdp2(out, run, overrides, logs, device), needs=("train",))
    steps.run("bench", lambda: check_bench(out, device, logs))
    steps.run(
        "onpolicy",
        lambda: check_onpolicy(run, overrides, out, backend),
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
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    table = summary_table(steps.results, total)
    (out / "gpu_check.md").write_text(table + "\n")
    print(f"\n## gpu_check: {device}, {size} model, backend {backend}\n\n{table}\n")
    print(
        f"{'all checks passed' if ok else 'SOME CHECKS FAILED'}; details: {out / 'gpu_check.json'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":  # vLLM's engine may re-import this file in a spawned process
    raise SystemExit(main())
