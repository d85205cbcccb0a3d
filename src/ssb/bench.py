"""Performance benchmarks: ssb's design choices measured side by side with the reference approach.

`run_bench(out_dir)` writes ``out_dir/results.json`` (every measured number) and
``out_dir/results.md`` (a table of RATIOS). Both sides of a ratio are measured in the same
``run_bench`` call, one after the other on the same machine, so a ratio means something even where
absolute times do not (a shared 2-core CPU is noisy).

Sections (``sections=`` picks a subset):

- ``storage``: bytes per reply token of real target shards written with `TargetWriter` (dense
  float32 = what the reference stores, top-k k=16/64/256, hidden) at Qwen2.5-3B's and the embedded
  gemma-3-270m's vocabulary and hidden sizes (random tensors of the right shapes); then, on the
  embedded model scoring real few-shot pairs, the error top-k and hidden targets make against exact
  full-vocabulary targets: the KD loss (forward KL, tau=2, tau^2) and its gradient with respect to
  the student's hidden states. The teacher is the base model on the hinted prompt, the student the
  base model on the plain prompt (SSB's state at step 0: two genuinely different distributions).
- ``kd_memory``: one training step (forward + backward) of the reference approach (the collator
  builds a dense ``(B, S, V)`` float32 teacher tensor, the model returns full logits, the loss is
  ``kl_div(log_softmax(s/T), softmax(t/T), batchmean) * T^2`` on the reply positions) against ours
  (top-k k=64 targets on reply positions only, `chunked_kd_loss` from final hidden states) on a
  random-init Qwen2-architecture model with the real 151,936-token vocabulary but 2 layers of
  hidden size 256, LoRA r=32 on all 7 projections, B=4, S=1024 and 2048, replies = second half.
  Every variant runs in a fresh subprocess; peak RSS is the process's high-water mark (reset just
  before the measured step) minus its RSS at that moment. A reference step whose estimated peak
  does not fit in the memory available is not run; its peak is then extrapolated (linearly in S)
  from a length that fitted, and the row says so.
- ``generation``: one sample at a time (the reference) vs `HFGenerator` batches of 16, on the
  embedded model with the quickstart's prompts and sampling settings; useful (kept) tokens per
  second. A decode-bound variant (short prompt, fixed 16 new tokens) shows where batching pays.
- ``scoring``: teacher scoring (the targets stage's `score_batch`, top-k) one example at a time vs
  length-sorted right-padded batches; scored tokens per second.
- ``cpu``: the quickstart's hot paths on this CPU and on AVX2 (emulated when this CPU has
  AVX-512): bf16 vs float32 output-layer GEMMs, rollout tokens/s with transformers' `generate`
  loop vs ssb's decode loop, and a KD step with and without the shared prefix (`ssb.bench_cpu`).
- ``stages``: per-stage wall time and share of the total from a run directory's manifest.json
  (``stage_times_from=``).
- ``gpu``: when CUDA is available, the KD step (tokens/s, MFU) of the reference approach vs ours
  on a random-init Qwen2.5-3B-shaped model with LoRA r=32, and generation tokens/s: transformers
  at batch 1 and batch N, and vLLM (`VLLMGenerator`, as the stages use it) on the same N prompts
  (skipped, saying why, without vLLM). UNTESTED: no GPU was available when it was written;
  ``benchmarks/gpu_check.sh`` runs it.

Model-based work (``storage``'s error measurement, ``generation``, ``scoring``) runs in one child
process that loads the model once; each ``kd_memory`` / ``gpu`` variant runs in its own child
process, so memory numbers never include another variant's allocations. Timed rows also give the
ratio of process CPU times in their note (other processes' load disturbs it less than wall time).
The full run keeps to a wall-clock budget (`FULL_TIME_BUDGET_S`); what no longer fits is skipped
and reported as skipped.
"""

from __future__ import annotations

import dataclasses
import gc
import io
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ssb.bench_cpu import child_cpu, section_cpu

__all__ = ["SECTIONS", "run_bench"]

SECTIONS = ("storage", "kd_memory", "generation", "scoring", "cpu", "stages", "gpu")

QWEN25_3B = {
    "vocab": 151936,
    "hidden": 2048,
    "intermediate": 11008,
    "layers": 36,
    "heads": 16,
    "kv_heads": 2,
}
GEMMA3_270M = {"vocab": 262144, "hidden": 640}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IGNORE = -100
TAU = 2.0
CHILD_TIMEOUT_S = 600
# The full bench must stay under 15 minutes on a shared 2-core machine: kd_memory runs that no
# longer fit in this budget are skipped (and reported as skipped).
FULL_TIME_BUDGET_S = 840.0
MODEL_TASKS_SHARE = 0.5  # no model-based task starts after this share of the budget
# A reference KD step is only run when its estimated peak fits in this fraction of the memory
# available (the machine is shared); otherwise the number is extrapolated and marked so.
MEMORY_HEADROOM = 0.8
# Bytes per (B * S * V) element of a reference step's peak RSS (dense float32 teacher, its
# softmax, bf16 logits and log-softmax, the masked copies and the kl_div terms): 21.2 measured at
# B=4, S=512, V=151,936 on CPU. Used only for the go / no-go check above, never reported.
REF_BYTES_PER_ELEMENT = 21.5

# Peak dense bf16 tensor-core FLOP/s by device name (first match wins), for MFU.
# Dense bf16 tensor-core peak per GPU. Keys are matched as whole words against
# torch.cuda.get_device_name(), most specific first ("H100 NVL" before "H100"; "GH200" is not
# "H200"; "A10G" is not "A10").
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


def _sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "storage_shapes": [("tiny-a", 4096, 64), ("tiny-b", 8192, 32)],
            "storage_examples": 2,
            "storage_reply": 8,
            "topks": [16, 64, 256],
            "approx_pairs": 3,
            "npz_examples": 1,
            "kd": {
                "vocab": 4096,
                "hidden": 64,
                "intermediate": 128,
                "layers": 1,
                "heads": 4,
                "kv_heads": 2,
                "batch": 2,
                "seqs": [64],
                "lora_r": 8,
                "topk": 64,
                "repeats": 1,
            },
            "gen": {
                "seq_prompts": 2,
                "batch_prompts": 4,
                "batch_size": 4,
                "max_new_tokens": 8,
                "rollout_prompts": 2,
                "rollout_rounds": 1,
            },
            "scoring": {"pairs": 4, "rounds": 1},
            "cpu": {
                "gemm": {"vocab": 4096, "hidden": 64, "grad_rows": 8},
                "gen_problems": 2,
                "max_new_tokens": 4,
                "train_pairs": 2,
                "train_repeats": 1,
            },
            "gpu": {
                "shape": {
                    "vocab": 4096,
                    "hidden": 64,
                    "intermediate": 128,
                    "heads": 4,
                    "kv_heads": 2,
                },
                "layers": 2,
                "batch": 2,
                "seq": 64,
                "gen_prompts": 4,
                "gen_tokens": 4,
                "prompt_len": 16,
            },
        }
    return {
        "storage_shapes": [
            ("Qwen2.5-3B", QWEN25_3B["vocab"], QWEN25_3B["hidden"]),
            ("gemma-3-270m", GEMMA3_270M["vocab"], GEMMA3_270M["hidden"]),
        ],
        "storage_examples": 2,
        "storage_reply": 64,
        "topks": [16, 64, 256],
        "approx_pairs": 8,
        "npz_examples": 2,
        "kd": {
            "vocab": QWEN25_3B["vocab"],
            "hidden": 256,
            "intermediate": 1024,
            "layers": 2,
            "heads": 4,
            "kv_heads": 2,
            "batch": 4,
            "seqs": [1024, 2048],
            "lora_r": 32,
            "topk": 64,
            "repeats": 2,  # at the first length; 1 at longer ones
        },
        "gen": {
            "seq_prompts": 3,
            "batch_prompts": 16,
            "batch_size": 16,
            "max_new_tokens": None,  # the quickstart's (48)
            "decode_tokens": 16,
            "rollout_prompts": 8,  # x the quickstart's 4 samples = 2 batches of 16
            "rollout_rounds": 2,
        },
        "scoring": {"pairs": 4, "rounds": 3},
        "cpu": {
            "gemm": {
                "vocab": GEMMA3_270M["vocab"],
                "hidden": GEMMA3_270M["hidden"],
                "grad_rows": 16,
            },
            "gen_problems": 8,  # x the quickstart's 4 samples
            "max_new_tokens": None,  # the quickstart's (48)
            "train_pairs": 4,  # one quickstart batch
            "train_repeats": 2,
        },
        "gpu": {
            "layers": QWEN25_3B["layers"],
            "batch": 4,
            "seq": 1024,
            "gen_prompts": 16,
            "gen_tokens": 128,
        },
    }


# --------------------------------------------------------------------------- small helpers


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"[bench] {message}", file=sys.stderr, flush=True)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _row(
    section: str,
    what: str,
    baseline: float | None,
    ours: float | None,
    formula: str,
    *,
    unit: str = "",
    goal: tuple[str, float] | None = None,
    value: float | None = None,
    note: str = "",
) -> dict[str, Any]:
    """One table row. `formula` says how `value` follows from the two measured numbers:
    ``baseline/ours``, ``ours/baseline``, ``relerr`` (|ours - baseline| / |baseline|), ``share``
    (ours / baseline), or ``direct`` (`value` measured itself, e.g. a cosine similarity)."""
    if formula != "direct":
        value = None
        if _finite(baseline) and _finite(ours):
            if formula == "baseline/ours" and ours != 0:
                value = baseline / ours
            elif formula in ("ours/baseline", "share") and baseline != 0:
                value = ours / baseline
            elif formula == "relerr" and baseline != 0:
                value = abs(ours - baseline) / abs(baseline)
    met = None
    if goal is not None and _finite(value):
        op, target = goal
        met = {">=": value >= target, "<": value < target, ">": value > target}[op]
    return {
        "section": section,
        "what": what,
        "baseline": baseline,
        "ours": ours,
        "unit": unit,
        "formula": formula,
        "value": value,
        "goal": f"{goal[0]} {goal[1]:g}" if goal else None,
        "met": met,
        "note": note,
    }


def _mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux >= 4.0); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss_kb() -> int:
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # macOS reports bytes


def _rss_kb() -> int:
    rss = _status_kb("VmRSS")
    return rss if rss is not None else _peak_rss_kb()


def _prefer_oom_kill() -> None:
    """Make this process the kernel's first choice if memory runs out: on a shared machine a
    too-large benchmark step should die, not somebody else's process."""
    try:
        with open("/proc/self/oom_score_adj", "w") as fh:
            fh.write("1000")
    except OSError:
        pass


# --------------------------------------------------------------------------- child processes


def _run_child(
    task: str,
    spec: dict[str, Any],
    timeout: int = CHILD_TIMEOUT_S,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run `task` in a fresh Python process (with `env` added to its environment) and return the
    dict it writes (or an error)."""
    with tempfile.TemporaryDirectory(prefix="ssb-bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(dict(spec, tmp=tmp)))
        extra_env = env or {}
        env = dict(os.environ, **extra_env)
        src = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = (
            src + os.pathsep + env.get("PYTHONPATH", "") if env.get("PYTHONPATH") else src
        )
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        cmd = [
            sys.executable,
            "-c",
            "import sys; from ssb.bench import _child_main; _child_main(sys.argv[1:])",
            task,
            str(spec_path),
            str(out_path),
        ]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            partial = Path(tmp) / "partial.json"
            result = json.loads(partial.read_text()) if partial.is_file() else {}
            result["error"] = f"{task}: timed out after {timeout} s"
            return result
        wall = time.perf_counter() - start
        if out_path.is_file():
            result = json.loads(out_path.read_text())
            result.setdefault("child_wall_s", wall)
            return result
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-15:])
        why = "killed (out of memory?)" if proc.returncode in (-9, 137) else "failed"
        return {"error": f"{task}: child {why}, exit code {proc.returncode}: {tail}"}


def _child_main(argv: list[str]) -> None:
    task, spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text())
    tasks: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
        "kd_step": _child_kd_step,
        "model_tasks": _child_model_tasks,
        "gpu_generate": _child_gpu_generate,
        "gpu_generate_vllm": _child_gpu_generate_vllm,
        "cpu_isa": child_cpu,
    }
    try:
        result = tasks[task](spec)
    except Exception as exc:  # noqa: BLE001 - reported to the parent as data
        result = {
            "error": f"{task}: {type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
        }
    tmp = Path(out_path).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, default=float))
    os.replace(tmp, out_path)


# --------------------------------------------------------------------------- storage (synthetic)


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


# --------------------------------------------------------------------------- model child


def _wrong_solution(problem: Any) -> str:
    """The gold solution with its final answer changed: a plausible incorrect hint."""
    try:
        wrong = str(int(problem.answer) + 1)
    except ValueError:
        wrong = problem.answer + "0"
    return re.sub(rf"(?<!\d){re.escape(problem.answer)}(?!\d)", wrong, problem.solution or "")


def _make_pairs(tokenizer: Any, cfg: Any, n: int) -> list[dict[str, Any]]:
    """pairs.jsonl-like records built from synthetic problems: the reply is the gold one-line
    solution (plus the end token when scored), prompts come from the shared renderer."""
    from ssb.problems import synthetic_problems
    from ssb.prompts import render_prompt_ids, reply_format, student_messages, teacher_messages

    rf = reply_format(tokenizer, cfg.prompt)
    synth = cfg.data.synthetic
    problems = synthetic_problems("train", n, difficulty=synth.difficulty, seed=synth.seed)
    pairs = []
    for p in problems:
        s_msgs = student_messages(p, cfg.prompt)
        t_msgs = teacher_messages(
            p, cfg.prompt, chat=rf.chat, correct=p.solution, incorrect=_wrong_solution(p)
        )
        reply = p.solution if rf.chat else " " + p.solution  # few-shot: "Answer: <solution>"
        pairs.append(
            {
                "id": p.id,
                "student_prompt_ids": render_prompt_ids(tokenizer, s_msgs, cfg.prompt),
                "teacher_prompt_ids": render_prompt_ids(tokenizer, t_msgs, cfg.prompt),
                "reply_ids": tokenizer(reply, add_special_tokens=False)["input_ids"],
                "end_token_id": rf.end_token_id,
            }
        )
    return pairs


def _child_model_tasks(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from ssb.config import load_config
    from ssb.models import load_model_and_tokenizer

    overrides = [f"model.name={spec['model']}"] if spec.get("model") else None
    cfg = load_config(preset="quickstart", overrides=overrides)
    t0 = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    model.eval()
    out: dict[str, Any] = {
        "model": cfg.model.name,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "load_s": time.perf_counter() - t0,
        "torch_threads": torch.get_num_threads(),
    }
    sizes = spec["sizes"]
    budget = spec.get("budget_s")
    for task in spec["tasks"]:
        start = time.perf_counter()
        if budget is not None and start - t0 > budget:
            out[task] = {"skipped": f"time budget: the model tasks had used {start - t0:.0f} s"}
            continue
        try:
            if task == "approx":
                result = _approx(model, tokenizer, cfg, sizes, Path(spec["tmp"]))
            elif task == "generation":
                result = _generation(model, tokenizer, cfg, sizes["gen"])
            else:
                result = _scoring(model, tokenizer, cfg, sizes["scoring"])
        except Exception as exc:  # noqa: BLE001 - one task failing must not hide the others
            result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        result["wall_s"] = time.perf_counter() - start
        out[task] = result
        gc.collect()
        # What is done so far survives a timeout of the whole child (see _run_child).
        partial = Path(spec["tmp"]) / "partial.json"
        partial.with_suffix(".tmp").write_text(json.dumps(out, default=float))
        os.replace(partial.with_suffix(".tmp"), partial)
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


def _approx(model: Any, tokenizer: Any, cfg: Any, sizes: dict[str, Any], tmp: Path) -> dict:
    """KD loss and gradient from top-k / hidden targets against exact full-vocabulary targets."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from ssb.distill.forward import output_head
    from ssb.distill.losses import chunked_kd_loss, dense_targets, topk_targets
    from ssb.distill.store import TargetReader, TargetWriter
    from ssb.stages.common import chunks
    from ssb.stages.targets import teacher_sequence

    pairs = _make_pairs(tokenizer, cfg, sizes["approx_pairs"])
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


def _count_kept(results: list[list[Any]]) -> int:
    return sum(len(c.token_ids) for per_prompt in results for c in per_prompt)


def _generation(model: Any, tokenizer: Any, cfg: Any, sizes: dict[str, Any]) -> dict[str, Any]:
    """Sequential (batch 1) vs batched generation, same prompts and sampling settings."""
    import torch

    from ssb.generate import HFGenerator, SamplingParams
    from ssb.generate.hf import left_pad
    from ssb.problems import synthetic_problems
    from ssb.prompts import render_prompt_ids, reply_format, student_messages

    rf = reply_format(tokenizer, cfg.prompt)
    n_batch, n_seq = sizes["batch_prompts"], sizes["seq_prompts"]
    problems = synthetic_problems("test", n_batch, difficulty=cfg.data.synthetic.difficulty)
    prompts = [
        render_prompt_ids(tokenizer, student_messages(p, cfg.prompt), cfg.prompt) for p in problems
    ]
    max_new = sizes["max_new_tokens"] or cfg.generation.max_new_tokens
    params = SamplingParams(
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        top_k=cfg.rollout.top_k,
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
    from ssb.models import contiguous_head_input, remove_contiguous_head_input

    ids, mask = left_pad(prompts[:4], many.pad_token_id)
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    prefill: dict[str, float] = {}
    try:
        for label in ("strided", "contiguous"):
            if label == "strided":
                remove_contiguous_head_input(model)
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


def _scoring(model: Any, tokenizer: Any, cfg: Any, sizes: dict[str, Any]) -> dict[str, Any]:
    """The targets stage's scoring path one example at a time vs length-sorted batches."""
    from ssb.distill.forward import output_head
    from ssb.stages.common import chunks
    from ssb.stages.targets import score_batch, teacher_sequence

    pairs = _make_pairs(tokenizer, cfg, sizes["pairs"])
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


# --------------------------------------------------------------------------- KD step child


def _build_qwen2(spec: dict[str, Any], device: Any, dtype: Any) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=spec["vocab"],
        hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"],
        max_position_embeddings=max(4096, spec.get("seq", 0) * 2),
        tie_word_embeddings=True,
        use_cache=False,
    )
    torch.manual_seed(spec.get("seed", 0))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    if not spec.get("lora_r"):
        return model
    lora = LoraConfig(
        r=spec["lora_r"],
        lora_alpha=spec["lora_r"],
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    if spec.get("gradient_checkpointing"):
        # transformers 5.24 renames gradient_checkpointing_enable (removed in v6).
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable({"use_reentrant": False})
    model.train()
    return model


def _random_topk(gen: Any, rows: int, k: int, vocab: int) -> dict[str, Any]:
    """Top-k targets with the right shapes and a valid distribution (distinct ids per row)."""
    import torch

    step = max(1, vocab // k)
    start = torch.randint(0, vocab, (rows, 1), generator=gen)
    ids = (start + torch.arange(k) * step) % vocab
    probs = torch.rand(rows, k + 1, generator=gen) ** 4
    probs = probs / probs.sum(-1, keepdim=True)
    top, _ = probs[:, :k].sort(dim=-1, descending=True)
    return {"ids": ids, "logp": top.log(), "tail": probs[:, k].log()}


def _child_kd_step(spec: dict[str, Any]) -> dict[str, Any]:
    """One KD training step (forward + backward) of the reference approach or ours."""
    import torch
    import torch.nn.functional as F

    from ssb.distill.forward import final_hidden_states, output_head
    from ssb.distill.losses import chunked_kd_loss, normalise
    from ssb.distill.store import TargetReader, TargetWriter

    device = torch.device(spec.get("device", "cpu"))
    cuda = device.type == "cuda"
    dtype = torch.bfloat16
    _prefer_oom_kill()
    variant, batch_size, seq = spec["variant"], spec["batch"], spec["seq"]
    vocab, k, tau = spec["vocab"], spec["topk"], TAU
    model = _build_qwen2(spec, device, dtype)
    gen = torch.Generator().manual_seed(spec.get("seed", 0) + 1)

    def make_data(b: int, s: int) -> dict[str, Any]:
        reply = s // 2
        prompt = s - reply
        ids = torch.randint(0, vocab, (b, s), generator=gen)
        data = {"b": b, "s": s, "reply": reply, "prompt": prompt, "ids": ids}
        if variant == "ours":
            # Stored the way `ssb targets` stores them; read back by the collator below.
            store = Path(spec["tmp"]) / f"targets-{b}x{s}"
            meta = {"tau": tau, "topk": k, "vocab_size": vocab}
            with TargetWriter(store, "topk", meta) as writer:
                for i in range(b):
                    tensors = _random_topk(gen, reply, k, vocab)
                    writer.add(f"e{i}", ids[i, prompt:].tolist(), tensors)
            data["reader"] = TargetReader(store)
        return data

    def collate_reference(data: dict[str, Any]) -> dict[str, Any]:
        # Mirrors the reference collator: per-example float32 (R, V) teacher logits (loaded from
        # npz there; random here) copied into a zero (B, S, V) float32 tensor at the label rows.
        b, s, reply, prompt = data["b"], data["s"], data["reply"], data["prompt"]
        loaded = [torch.randn(reply, vocab, generator=gen) for _ in range(b)]
        labels = torch.full((b, s), IGNORE, dtype=torch.long)
        teacher = torch.zeros((b, s, vocab), dtype=torch.float32)
        for i in range(b):
            start = prompt - 1
            labels[i, start : start + reply] = data["ids"][i, prompt:]
            teacher[i, start : start + reply] = loaded[i]
        del loaded
        return {
            "input_ids": data["ids"].clone(),
            "attention_mask": torch.ones((b, s), dtype=torch.long),
            "labels": labels,
            "teacher_logits": teacher,
        }

    def collate_ours(data: dict[str, Any]) -> dict[str, Any]:
        # Mirrors ssb's DistillCollator: shifted reply labels, stored top-k rows concatenated.
        b, s, reply, prompt = data["b"], data["s"], data["reply"], data["prompt"]
        shift = torch.full((b, s), IGNORE, dtype=torch.long)
        parts: dict[str, list[Any]] = {}
        for i in range(b):
            stored_reply, tensors = data["reader"].get(f"e{i}")
            shift[i, prompt - 1 : prompt - 1 + reply] = torch.tensor(stored_reply)
            for key, value in tensors.items():
                parts.setdefault(key, []).append(value)
        batch = {
            "input_ids": data["ids"].clone(),
            "attention_mask": torch.ones((b, s), dtype=torch.long),
            "shift_labels": shift,
        }
        batch.update({f"teacher_{key}": torch.cat(v) for key, v in parts.items()})
        return batch

    def step_reference(batch: dict[str, Any]) -> float:
        # Mirrors the reference's compute_loss + kd_loss_fn: full logits, log-softmax / softmax
        # over the whole (B, S, V) tensors, then the reply positions are selected.
        batch = {key: value.to(device) for key, value in batch.items()}
        teacher_logits = batch.pop("teacher_logits")
        labels = batch.pop("labels")
        logits = model(**batch).logits
        teacher_logits = teacher_logits.to(device=logits.device, dtype=torch.float32)
        mask = labels != IGNORE
        student_logp = F.log_softmax(logits / tau, dim=-1)
        with torch.no_grad():
            teacher_p = F.softmax(teacher_logits / tau, dim=-1)
        v = student_logp.shape[-1]
        flat = mask.view(-1)
        loss = F.kl_div(
            student_logp.view(-1, v)[flat], teacher_p.view(-1, v)[flat], reduction="batchmean"
        ) * (tau * tau)
        loss.backward()
        return float(loss)

    def step_ours(batch: dict[str, Any]) -> float:
        # Mirrors SSBTrainer.compute_loss.
        batch = {key: value.to(device) for key, value in batch.items()}
        hidden = final_hidden_states(model, batch["input_ids"], batch["attention_mask"])
        reply_mask = batch["shift_labels"] != IGNORE
        head = output_head(model)
        targets = {
            key[len("teacher_") :]: batch[key] for key in batch if key.startswith("teacher_")
        }
        res = chunked_kd_loss(
            hidden[reply_mask],
            head.weight,
            targets,
            batch["shift_labels"][reply_mask],
            mode="topk",
            tau=tau,
            chunk_size=spec.get("chunk_size", 256),
            logit_softcap=head.softcap,
            lm_head_bias=head.bias,
        )
        loss = normalise(res.loss_sum, res.num_tokens)
        loss.backward()
        return float(loss)

    collate = collate_reference if variant == "reference" else collate_ours
    step = step_reference if variant == "reference" else step_ours

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    # Warm-up at a tiny size: lazy initialisation and first-call costs stay out of the numbers.
    warm = make_data(1, 32)
    step(collate(warm))
    model.zero_grad(set_to_none=True)
    data = make_data(batch_size, seq)
    del warm
    gc.collect()

    runs = []
    for _ in range(spec.get("repeats", 1)):
        model.zero_grad(set_to_none=True)
        gc.collect()
        rss0 = _rss_kb()
        reset_ok = _reset_peak_rss()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            cuda0 = torch.cuda.memory_allocated()
        sync()
        t0 = time.perf_counter()
        batch = collate(data)
        t1, c1 = time.perf_counter(), time.process_time()
        loss = step(batch)
        sync()
        t2, c2 = time.perf_counter(), time.process_time()
        run = {
            "collate_s": t1 - t0,
            "step_s": t2 - t1,
            "step_cpu_s": c2 - c1,
            "loss": loss,
            "rss_before_mb": rss0 / 1024,
            "peak_rss_delta_mb": (_peak_rss_kb() - rss0) / 1024,
            "peak_reset": reset_ok,
        }
        if cuda:
            run["peak_cuda_delta_mb"] = (torch.cuda.max_memory_allocated() - cuda0) / 2**20
        runs.append(run)
        del batch
    base = model.get_base_model()
    n_params = sum(p.numel() for p in base.parameters())
    n_embed = base.get_input_embeddings().weight.numel()
    result = {
        "variant": variant,
        "device": str(device),
        "batch": batch_size,
        "seq": seq,
        "reply_tokens": batch_size * (seq // 2),
        "vocab": vocab,
        "topk": k if variant == "ours" else None,
        "runs": runs,
        "step_s": min(r["step_s"] for r in runs),
        "step_cpu_s": min(r["step_cpu_s"] for r in runs),
        "collate_s": min(r["collate_s"] for r in runs),
        "peak_rss_delta_mb": max(r["peak_rss_delta_mb"] for r in runs),
        "params_non_embedding": n_params - n_embed,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "torch_threads": torch.get_num_threads(),
    }
    if cuda:
        result["peak_cuda_delta_mb"] = max(r["peak_cuda_delta_mb"] for r in runs)
        result["device_name"] = torch.cuda.get_device_name()
    return result


# --------------------------------------------------------------------------- GPU (untested)


def _child_gpu_generate(spec: dict[str, Any]) -> dict[str, Any]:
    """Generation tokens/s of a random-init Qwen2.5-3B-shaped model, batch 1 vs batch N,
    fixed-length sampled continuations of 256-token prompts. Written for CUDA without access to
    a GPU; the tests run it on CPU at tiny sizes (``spec["device"] = "cpu"``)."""
    import torch

    device = torch.device(spec.get("device", "cuda"))
    cuda = device.type == "cuda"
    model = _build_qwen2(dict(spec, lora_r=0), device, torch.bfloat16)
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
    return {
        "device_name": torch.cuda.get_device_name() if cuda else str(device),
        "sequential_tokens_per_s": seq_prompts * new / seq_s,
        "batched_tokens_per_s": spec["gen_prompts"] * new / bat_s,
        "batch": spec["gen_prompts"],
        "new_tokens": new,
    }


def _byte_tokenizer(vocab_size: int) -> Any:
    """A byte-level tokenizer of exactly `vocab_size` ids for a random model: id 0 is
    ``<|endoftext|>`` (eos and pad), then the 256 byte symbols (every string encodes, one token
    per byte), then filler tokens that nothing encodes to but that decode to their own text, so
    every id the model can emit is in the vocabulary (vLLM refuses prompt ids outside it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    for i in range(len(vocab), vocab_size):
        vocab[f"<fill{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def _config_only_model_dir(spec: dict[str, Any], path: Path) -> Path:
    """A model directory with `_build_qwen2`'s config and `_byte_tokenizer`, but no weights:
    vLLM's ``load_format="dummy"`` fills them with random values (nothing to write or read)."""
    from transformers import Qwen2Config

    config = Qwen2Config(
        vocab_size=spec["vocab"],
        hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"],
        max_position_embeddings=max(4096, spec.get("seq", 0) * 2),
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    config.architectures = ["Qwen2ForCausalLM"]  # what vLLM picks its model class by
    config.save_pretrained(path)
    _byte_tokenizer(spec["vocab"]).save_pretrained(path)
    return path


def _child_gpu_generate_vllm(spec: dict[str, Any]) -> dict[str, Any]:
    """vLLM's generation tokens/s (`ssb.generate.VLLMGenerator`, as the stages drive it) on the
    Qwen2.5-3B shape with vLLM's dummy (random) weights, on the prompts of `_child_gpu_generate`'s
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


def _peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU named `device_name` (None for one not in the table)."""
    for key, flops in PEAK_BF16_FLOPS:
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", device_name):
            return flops
    return None


def _section_gpu(sizes: dict[str, Any], progress: bool) -> tuple[dict[str, Any], list[dict]]:
    """Runs only when CUDA is available. Written without access to a GPU: only its CPU form (the
    same code at tiny sizes, `_gpu_runs(..., device="cpu")`) has been run."""
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device on this machine"}, []
    return _gpu_runs(sizes["gpu"], "cuda", progress)


def _gpu_runs(g: dict[str, Any], device: str, progress: bool) -> tuple[dict[str, Any], list[dict]]:
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
    data: dict[str, Any] = {"untested_on_gpu": True, "model": "random-init, Qwen2 architecture"}
    data.update(spec)
    rows = []
    for variant in ("reference", "ours"):
        _log(progress, f"gpu: KD step, {variant}")
        data[variant] = _run_child("kd_step", dict(spec, variant=variant))
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
        peak = _peak_flops(name) if device == "cuda" else None
        for side in (ref, ours):
            side["tokens_per_s"] = tokens / side["step_s"]
            side["mfu"] = flops / side["step_s"] / peak if peak else None
        rows.append(
            _row(
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
                _row(
                    "gpu", "KD step MFU, ours / reference", ref["mfu"], ours["mfu"], "ours/baseline"
                )
            )
        key = "peak_cuda_delta_mb" if device == "cuda" else "peak_rss_delta_mb"
        rows.append(
            _row(
                "gpu",
                f"KD step {key.replace('_', ' ')}, reference / ours",
                ref[key],
                ours[key],
                "baseline/ours",
                unit="MiB",
                goal=(">=", 10.0),
            )
        )
    _log(progress, "gpu: generation")
    g_spec = dict(
        shape,
        layers=g["layers"],
        lora_r=0,
        device=device,
        gen_prompts=g["gen_prompts"],
        gen_tokens=g["gen_tokens"],
        prompt_len=g.get("prompt_len", 256),
    )
    gen = _run_child("gpu_generate", g_spec)
    data["generation"] = gen
    if "batched_tokens_per_s" in gen:
        rows.append(
            _row(
                "gpu",
                f"generation tokens/s, batch {gen['batch']} / batch 1",
                gen["sequential_tokens_per_s"],
                gen["batched_tokens_per_s"],
                "ours/baseline",
                unit="tok/s",
                goal=(">=", 4.0),
            )
        )
    _log(progress, "gpu: generation, vLLM")
    vgen = _run_child("gpu_generate_vllm", g_spec)
    data["generation_vllm"] = vgen
    if "tokens_per_s" in vgen and "batched_tokens_per_s" in gen:
        rows.append(
            _row(
                "gpu",
                f"generation tokens/s, vLLM / transformers batch {gen['batch']}",
                gen["batched_tokens_per_s"],
                vgen["tokens_per_s"],
                "ours/baseline",
                unit="tok/s",
                goal=(">=", 1.0),
            )
        )
    return data, rows


# --------------------------------------------------------------------------- sections


def _section_storage(
    sizes: dict[str, Any], approx: dict[str, Any] | None, work: Path
) -> tuple[dict[str, Any], list[dict]]:
    data: dict[str, Any] = {"synthetic": _storage_synthetic(sizes, work)}
    rows = []
    for label, entry in data["synthetic"].items():
        dense = entry["dense_fp32"]["bytes_per_token"]
        for k in sizes["topks"]:
            goal = (">=", 1000.0) if k == 64 else None
            rows.append(
                _row(
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
            _row(
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
                    _row(
                        "storage",
                        f"KD loss relative error, {label} vs exact ({where})",
                        exact,
                        form["loss"],
                        "relerr",
                        goal=goal,
                    )
                )
                rows.append(
                    _row(
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
                    _row(
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
                    _row(
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


def _cpu_note(numerator: float | None, denominator: float | None) -> str:
    """The same ratio from process CPU time (user + system, all threads), which other
    processes' load disturbs less than wall time."""
    if not (_finite(numerator) and _finite(denominator)) or not denominator:
        return ""
    return f"CPU-time ratio {numerator / denominator:.2f}x"


def _section_generation(gen: dict[str, Any]) -> tuple[dict[str, Any], list[dict]]:
    rows = []
    if "batched" in gen:
        b = gen["settings"]["batch_size"]
        rows.append(
            _row(
                "generation",
                f"quickstart sampling: batch {b} (ours) / one at a time (plain generate), kept tok/s",
                gen["sequential"]["tokens_per_s"],
                gen["batched"]["tokens_per_s"],
                "ours/baseline",
                unit="tok/s",
                goal=(">=", 4.0),
                note=_cpu_note(
                    gen["batched"]["tokens_per_cpu_s"], gen["sequential"]["tokens_per_cpu_s"]
                ),
            )
        )
    if "rollout" in gen:
        r = gen["rollout"]
        rows.append(
            _row(
                "generation",
                f"rollout stage ({r['samples_per_prompt']} samples/prompt, batch "
                f"{gen['settings']['batch_size']}): after / before (kept tokens/s)",
                r["before"]["tokens_per_s"],
                r["after"]["tokens_per_s"],
                "ours/baseline",
                unit="tok/s",
                note=f"after: shared prefix + top-k candidate sampling; fastest of "
                f"{r['rounds']} alternating rounds; "
                + _cpu_note(r["after"]["tokens_per_cpu_s"], r["before"]["tokens_per_cpu_s"]),
            )
        )
    if "frozen_head_prefill" in gen:
        f = gen["frozen_head_prefill"]
        rows.append(
            _row(
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
            _row(
                "generation",
                f"decode-bound (short prompt, fixed length): batch {b} / one at a time",
                gen["decode_sequential"]["tokens_per_s"],
                gen["decode_batched"]["tokens_per_s"],
                "ours/baseline",
                unit="tok/s",
                note="diagnostic: where batching pays; "
                + _cpu_note(
                    gen["decode_batched"]["tokens_per_cpu_s"],
                    gen["decode_sequential"]["tokens_per_cpu_s"],
                ),
            )
        )
    return gen, rows


def _section_scoring(sc: dict[str, Any]) -> tuple[dict[str, Any], list[dict]]:
    rows = []
    if "batched" in sc:
        rows.append(
            _row(
                "scoring",
                f"teacher scoring: batch {sc['batch_size']} (length-sorted) / one at a time",
                sc["sequential"]["tokens_per_s"],
                sc["batched"]["tokens_per_s"],
                "ours/baseline",
                unit="tok/s",
                note=f"fastest of {sc['rounds']} alternating rounds each; "
                + _cpu_note(sc["sequential"]["cpu_s"], sc["batched"]["cpu_s"]),
            )
        )
    return sc, rows


class _Budget:
    """Wall-clock budget of one run_bench call (None = unlimited)."""

    def __init__(self, seconds: float | None) -> None:
        self.deadline = None if seconds is None else time.perf_counter() + seconds

    def remaining(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.perf_counter()

    def timeout(self) -> int:
        return int(max(30.0, min(CHILD_TIMEOUT_S, self.remaining())))


def _ref_fits(batch: int, seq: int, vocab: int) -> tuple[bool, str]:
    need = batch * seq * vocab * REF_BYTES_PER_ELEMENT
    avail = _mem_available_bytes()
    if avail is None or need <= MEMORY_HEADROOM * avail:
        return True, ""
    return False, (
        f"estimated peak {need / 2**30:.1f} GiB exceeds {MEMORY_HEADROOM:.0%} of the "
        f"{avail / 2**30:.1f} GiB available on this shared machine"
    )


def _section_kd_memory(
    sizes: dict[str, Any], progress: bool, budget: _Budget
) -> tuple[dict[str, Any], list[dict]]:
    kd = sizes["kd"]
    batch = kd["batch"]
    data: dict[str, Any] = {
        "model": (
            f"random-init Qwen2 architecture: vocab {kd['vocab']:,} (tied), {kd['layers']} "
            f"layers, hidden {kd['hidden']}, intermediate {kd['intermediate']}, "
            f"{kd['heads']} heads / {kd['kv_heads']} KV heads, bf16, LoRA r={kd['lora_r']} "
            "on all 7 projections"
        ),
        "batch": batch,
        "reply": "second half of each sequence",
        "runs": {},
    }
    rows: list[dict] = []
    ref_measured: dict[int, dict[str, Any]] = {}  # seq -> reference result
    # variant -> (seq, seconds outside the measured steps, seconds per step) of its last run
    costs: dict[str, tuple[int, float, float]] = {}

    def run(variant: str, seq: int, repeats: int) -> dict[str, Any]:
        if budget.remaining() < 45:
            return {"skipped": "time budget used up"}
        if variant in costs:  # the step's time scales with B * S (the V-sized work dominates)
            last_seq, overhead, per_step = costs[variant]
            estimate = 1.2 * (overhead + repeats * per_step * seq / last_seq)
            if estimate > budget.remaining():
                return {
                    "skipped": f"time budget: ~{estimate:.0f} s needed, "
                    f"{max(0.0, budget.remaining()):.0f} s left"
                }
        _log(progress, f"kd_memory: {variant}, B={batch} S={seq}")
        spec = {key: value for key, value in kd.items() if key != "seqs"}
        spec.update(seq=seq, variant=variant, repeats=repeats)
        result = _run_child("kd_step", spec, budget.timeout())
        if "runs" in result:
            steps = sum(r["collate_s"] + r["step_s"] for r in result["runs"])
            per_step = steps / len(result["runs"])
            costs[variant] = (seq, result["child_wall_s"] - steps, per_step)
        return result

    plan = list(kd["seqs"])
    if not _ref_fits(batch, plan[0], kd["vocab"])[0]:
        # Not even the shortest length fits: add the longest one that does, so both variants are
        # still measured side by side and longer lengths can be scaled from it.
        smaller = plan[0] // 2
        while smaller >= 32 and not _ref_fits(batch, smaller, kd["vocab"])[0]:
            smaller //= 2
        if smaller >= 32:
            plan.insert(0, smaller)
            data["added_length"] = f"S={smaller}: the configured lengths do not fit in memory"
    for seq in plan:
        # Timed repeats only at the first length (where step times are compared); longer runs
        # are there for their memory.
        repeats = kd["repeats"] if seq == plan[0] else 1
        entry: dict[str, Any] = {}
        fits, why = _ref_fits(batch, seq, kd["vocab"])
        if fits:
            entry["reference"] = run("reference", seq, repeats)
            if "step_s" in entry["reference"]:
                ref_measured[seq] = entry["reference"]
        else:
            entry["reference"] = {"skipped": f"not run: {why}"}
            if ref_measured:
                base_seq = max(ref_measured)
                base = ref_measured[base_seq]["peak_rss_delta_mb"]
                entry["reference"]["extrapolated_peak_rss_delta_mb"] = base * seq / base_seq
                entry["reference"]["extrapolated_from_seq"] = base_seq
        entry["ours"] = run("ours", seq, repeats)
        data["runs"][str(seq)] = entry
        ref, ours = entry["reference"], entry["ours"]
        if "step_s" not in ours:
            continue
        where = f"B={batch} S={seq}"
        if "step_s" in ref:
            rows.append(
                _row(
                    "kd_memory",
                    f"{where}: peak RSS delta, reference / ours",
                    ref["peak_rss_delta_mb"],
                    ours["peak_rss_delta_mb"],
                    "baseline/ours",
                    unit="MiB",
                    goal=(">=", 10.0),
                )
            )
            rows.append(
                _row(
                    "kd_memory",
                    f"{where}: step time (forward + backward), reference / ours",
                    ref["step_s"],
                    ours["step_s"],
                    "baseline/ours",
                    unit="s",
                    goal=(">=", 1.0),
                    note=_cpu_note(ref["step_cpu_s"], ours["step_cpu_s"]),
                )
            )
            rows.append(
                _row(
                    "kd_memory",
                    f"{where}: collate + forward + backward, reference / ours",
                    ref["collate_s"] + ref["step_s"],
                    ours["collate_s"] + ours["step_s"],
                    "baseline/ours",
                    unit="s",
                )
            )
        elif "extrapolated_peak_rss_delta_mb" in ref:
            base_seq = ref["extrapolated_from_seq"]
            rows.append(
                _row(
                    "kd_memory",
                    f"{where}: peak RSS delta, reference (EXTRAPOLATED linearly from S={base_seq}; "
                    "not run) / ours (measured)",
                    ref["extrapolated_peak_rss_delta_mb"],
                    ours["peak_rss_delta_mb"],
                    "baseline/ours",
                    unit="MiB",
                    goal=(">=", 10.0),
                    note=ref["skipped"],
                )
            )
    return data, rows


def _section_stages(run_dir: Path | None) -> tuple[dict[str, Any], list[dict]]:
    if run_dir is None:
        return {"skipped": "no run directory given (stage_times_from=None)"}, []
    manifest_path = Path(run_dir) / "manifest.json"
    if not manifest_path.exists():
        return {"skipped": f"{manifest_path} does not exist (run `make demo` first)"}, []
    manifest = json.loads(manifest_path.read_text())
    stages = {
        name: float(info["seconds"])
        for name, info in manifest.get("stages", {}).items()
        if isinstance(info, dict) and _finite(info.get("seconds"))
    }
    total = sum(stages.values())
    data = {"run_dir": str(run_dir), "seconds": stages, "total_s": total}
    rows = [
        _row("stages", f"stage '{name}': share of total wall time", total, secs, "share", unit="s")
        for name, secs in stages.items()
    ]
    return data, rows


# --------------------------------------------------------------------------- report


def _fmt(x: Any, unit: str = "") -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        if x == 0:
            text = "0"
        elif abs(x) >= 1000:
            text = f"{x:,.0f}"
        elif abs(x) >= 1:
            text = f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
        else:
            text = f"{x:.3g}"
    else:
        text = str(x)
    return f"{text} {unit}".strip()


def _fmt_value(row: dict[str, Any]) -> str:
    value = row["value"]
    if value is None:
        return "-"
    if row["formula"] == "relerr":
        return f"{value:.3%}"
    if row["formula"] == "share":
        return f"{value:.1%}"
    if row["formula"] == "direct":
        return f"{value:.6f}"
    return f"{value:,.1f}x" if value >= 100 else f"{value:.2f}x"


def _markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        "# ssb benchmark results",
        "",
        f"- {meta['date']}, {meta['machine']} ({meta['hardware']['cpu']}, torch ISA "
        f"{meta['hardware']['cpu_capability']}, native bf16: "
        f"{'yes' if meta['hardware']['native_bf16'] else 'no'}, "
        f"{meta['hardware']['torch_threads']} threads), torch {meta['torch']}, "
        f"transformers {meta['transformers']}; quick={meta['quick']}; "
        f"wall time {meta['wall_s']:.0f} s",
        "- Each row compares two numbers measured side by side in this run; absolute times on a "
        "shared CPU mean little, the ratio is the result.",
        "",
        "| section | measurement | baseline | ours | ratio | goal | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        cells = [
            row["section"],
            row["what"] + (f" ({row['note']})" if row["note"] else ""),
            _fmt(row["baseline"], row["unit"]),
            _fmt(row["ours"], row["unit"]),
            _fmt_value(row),
            row["goal"] or "",
            _fmt(row["met"]) if row["met"] is not None else "",
        ]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    lines.append("")
    for name, section in results["sections"].items():
        if isinstance(section, dict) and ("skipped" in section or "error" in section):
            lines.append(f"- `{name}`: {section.get('skipped') or section.get('error')}")
    approx = results["sections"].get("storage", {}).get("approx", {})
    if "skipped" in approx or "error" in approx:
        lines.append(
            f"- `storage` real-pair error measurement: {approx.get('skipped') or approx['error']}"
        )
    if approx.get("forms"):
        masses = ", ".join(
            f"top-{name[4:]} {form['mean_tail_mass']:.1%}"
            for name, form in approx["forms"].items()
            if "mean_tail_mass" in form
        )
        lines.append(
            f"- `storage` real pairs: teacher = {approx['teacher']}, student = {approx['student']}"
            f"; mean teacher mass outside the top k at tau={approx['tau']:g}: {masses}."
        )
        diag = approx.get("tau1_diagnostic", {}).get("mean_tail_mass", {})
        if diag:
            masses = ", ".join(f"top-{name[4:]} {m:.1%}" for name, m in diag.items())
            lines.append(f"  At tau=1: {masses}.")
    kd = results["sections"].get("kd_memory")
    if isinstance(kd, dict) and "model" in kd:
        lines.append(f"- `kd_memory` model: {kd['model']}; batch {kd['batch']}, {kd['reply']}.")
        for seq, entry in kd.get("runs", {}).items():
            for side in ("reference", "ours"):
                info = entry.get(side, {})
                if "skipped" in info or "error" in info:
                    lines.append(f"  - S={seq} {side}: {info.get('skipped') or info.get('error')}")
    gpu = results["sections"].get("gpu")
    if isinstance(gpu, dict) and gpu.get("untested_on_gpu"):
        lines.append("- `gpu`: written without GPU access; only its CPU form was ever run.")
        vgen = gpu.get("generation_vllm", {})
        if "skipped" in vgen or "error" in vgen:
            lines.append(f"  - vLLM generation: {vgen.get('skipped') or vgen.get('error')}")
    return "\n".join(lines) + "\n"


def _meta(quick: bool) -> dict[str, Any]:
    import torch
    import transformers

    from ssb.hardware import hardware_info

    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.system()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "hardware": hardware_info(),
        "quick": quick,
    }


# --------------------------------------------------------------------------- entry point


def run_bench(
    out_dir: Path,
    quick: bool = False,
    sections: list[str] | None = None,
    progress: bool = True,
    *,
    stage_times_from: Path | None = None,
    model: str | None = None,
    time_budget_s: float | None = None,
) -> dict[str, Any]:
    """Run the benchmark sections and write ``out_dir/results.json`` and ``results.md``.

    Args:
        out_dir: created if missing.
        quick: tiny sizes (seconds, for tests); the numbers then say nothing about performance.
        sections: a subset of :data:`SECTIONS` (default: all).
        progress: one line per step on stderr.
        stage_times_from: a run directory whose manifest.json stage timings feed ``stages``.
        model: ``model.name`` for the model-based sections (default: the quickstart's embedded
            gemma-3-270m); tests pass a tiny local model.
        time_budget_s: wall-clock budget; a ``kd_memory`` run whose estimated time no longer fits
            is skipped and says so (default: :data:`FULL_TIME_BUDGET_S` for the full bench,
            unlimited for ``quick``).

    Returns:
        The dict written to results.json: ``meta``, ``sections`` (every measured number, by
        section) and ``rows`` (the table: each row's ``value`` follows from its ``baseline`` and
        ``ours`` by its ``formula``; ``met`` says whether the ``goal`` holds).
    """
    start = time.perf_counter()
    chosen = list(SECTIONS) if sections is None else list(sections)
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown bench sections {unknown}; choose from {', '.join(SECTIONS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = _sizes(quick)
    if time_budget_s is None and not quick:
        time_budget_s = FULL_TIME_BUDGET_S
    budget = _Budget(time_budget_s)
    results: dict[str, Any] = {"meta": _meta(quick), "sections": {}, "rows": []}
    results["meta"]["time_budget_s"] = time_budget_s

    # Cheapest first: under the time budget the last task (generation) is the one skipped.
    model_tasks = [
        task
        for section, task in (
            ("storage", "approx"),
            ("scoring", "scoring"),
            ("generation", "generation"),
        )
        if section in chosen
    ]
    model_out: dict[str, Any] = {}
    if model_tasks:
        _log(progress, f"model tasks ({', '.join(model_tasks)}) in a child process")
        spec = {
            "model": model,
            "tasks": model_tasks,
            "sizes": sizes,
            # Start no model task after half the budget: kd_memory needs the rest.
            "budget_s": None if time_budget_s is None else MODEL_TASKS_SHARE * time_budget_s,
        }
        timeout = int(max(60.0, min(900.0, budget.remaining())))
        model_out = _run_child("model_tasks", spec, timeout=timeout)
        for task in model_tasks:
            if task not in model_out:
                model_out[task] = {"error": model_out.get("error", "no result")}
            what = model_out[task].get("skipped") or f"{model_out[task].get('wall_s', 0):.0f} s"
            _log(progress, f"  {task}: {what}")
        results["model_child"] = {
            key: model_out.get(key) for key in ("model", "dtype", "load_s", "torch_threads")
        }

    with tempfile.TemporaryDirectory(prefix="ssb-bench-") as tmp:
        for name in chosen:
            t0 = time.perf_counter()
            _log(progress, f"section {name}")
            try:
                if name == "storage":
                    data, rows = _section_storage(sizes, model_out.get("approx"), Path(tmp))
                elif name == "kd_memory":
                    data, rows = _section_kd_memory(sizes, progress, budget)
                elif name == "generation":
                    data, rows = _section_generation(model_out["generation"])
                elif name == "scoring":
                    data, rows = _section_scoring(model_out["scoring"])
                elif name == "cpu":
                    data, rows = section_cpu(sizes["cpu"], model, progress, _run_child)
                elif name == "stages":
                    data, rows = _section_stages(stage_times_from)
                else:
                    data, rows = _section_gpu(sizes, progress)
            except Exception as exc:  # noqa: BLE001 - a failed section is reported, not fatal
                data = {
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc(),
                }
                rows = []
            data = dict(data)
            data["section_wall_s"] = time.perf_counter() - t0
            results["sections"][name] = data
            results["rows"].extend(rows)
    results["meta"]["wall_s"] = time.perf_counter() - start
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    (out_dir / "results.md").write_text(_markdown(results))
    _log(progress, f"done in {results['meta']['wall_s']:.0f} s: {out_dir / 'results.md'}")
    return results


if __name__ == "__main__":  # pragma: no cover - the CLI wires `ssb bench`; this is a fallback
    import argparse

    parser = argparse.ArgumentParser(description="ssb performance benchmarks")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sections", nargs="*", choices=SECTIONS)
    parser.add_argument("--stage-times-from", type=Path)
    parser.add_argument("--model")
    args = parser.parse_args()
    run_bench(
        args.out_dir,
        quick=args.quick,
        sections=args.sections,
        stage_times_from=args.stage_times_from,
        model=args.model,
    )
