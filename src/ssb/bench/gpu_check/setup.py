"""Steps 1-2 of the GPU check: the environment, and the random-init model with its tokenizer."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from ssb.bench.gpu_check.steps import CheckFailed, StepResult
from ssb.bench.sizes import QWEN25_3B

BPE_VOCAB = 1024
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Std of the (tied) embedding times sqrt(hidden): the std of the logits. At the default init
# (0.02) the logits of a small model are nearly uniform, and greedy decoding then flips on
# rounding; 6 makes the top token stand out (reported as the margin of the LoRA comparison).
LOGIT_STD = 6.0
# The real Qwen2.5-3B checkpoint's context and RoPE base (the tiny model keeps the RoPE base).
CONTEXT = {"3b": 32768, "tiny": 2048}
ROPE_THETA = 1e6


def check_environment(device: str) -> StepResult:
    """Step 1: the device, the generation backend, package versions; on a GPU, vLLM missing
    fails (the other steps still run, on transformers)."""
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
    """A byte-level BPE (every string encodes) trained on `training_corpus`, ChatML template
    (the stages always send a system message, so it renders as Qwen2.5's own). With
    `vocab_size`, padded with filler tokens to that size (see `train_bpe`): the 3B keeps its
    real vocabulary, and so the real cost of its output layer.

    Saved next to a Qwen2 config.json, transformers (5.20 and 5.24 alike) loads it back as a
    `Qwen2Tokenizer`, with Qwen2's own pre-tokenizer: the stages, vLLM and this check all load
    it from the model directory that way, so they agree on every id."""
    from transformers import PreTrainedTokenizerFast

    from ssb.bench.random_models import CHATML_TEMPLATE, train_bpe

    tok = train_bpe(training_corpus(), BPE_VOCAB, SPECIALS, fill_to=vocab_size)
    # As Qwen2.5-Instruct: replies end with <|im_end|> (eos), padding is <|endoftext|>.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=CONTEXT["3b"],
    )


def build_model(model_dir: Path, size: str, device: str) -> StepResult:
    """Step 2: the random-init Qwen2 of `size` ("3b": Qwen2.5-3B's shape in bf16; "tiny") and
    its tokenizer, saved to `model_dir`; its weights shaped so that greedy outputs are worth
    comparing."""
    import torch
    from transformers import GenerationConfig

    from ssb.bench.random_models import TINY_SHAPE, model_config, random_model

    tokenizer = build_tokenizer(QWEN25_3B["vocab"] if size == "3b" else None)
    # The model's vocabulary is the tokenizer's (padded to 151,936 for the 3B; see
    # build_tokenizer): a random model's greedy argmax may land anywhere in it.
    shape = dict(QWEN25_3B if size == "3b" else TINY_SHAPE, vocab=len(tokenizer))
    hidden = shape["hidden"]
    config = model_config(
        "qwen2",
        shape,
        max_position_embeddings=CONTEXT[size],
        rope_theta=ROPE_THETA,
        # ~ 0.02 at hidden 2048 (the real init): each layer keeps the scale of its input.
        initializer_range=hidden**-0.5,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    dtype = torch.bfloat16 if size == "3b" else torch.float32  # the 3B's checkpoint is bf16
    model = random_model(config, seed=0, dtype=dtype, device=device)
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
        "config": dict(shape, max_position_embeddings=CONTEXT[size], rope_theta=ROPE_THETA),
        "dtype": str(dtype),
        "parameters": params,
        "tokenizer_vocab": len(tokenizer),
        "trained_bpe_vocab": sum(not t.startswith("<fill") for t in tokenizer.get_vocab()),
        "disk_bytes": disk,
    }
    count = f"{params / 1e9:.2f} B" if params >= 1e9 else f"{params / 1e6:.2f} M"
    return f"{count} parameters, {disk / 2**20:,.1f} MiB on disk", details
