"""Model and tokenizer loading, device/dtype choice, identity, end-of-turn token."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from ssb import models
from ssb.bench.random_models import (
    ARCHS,
    TEMPLATES,
    build_tiny_model,
    build_tokenizer,
    save_tiny_model,
)
from ssb.config import ModelConfig
from ssb.generate import HFGenerator, SamplingParams
from ssb.identity import model_identity
from ssb.models import (
    ModelLoadError,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    resolve_source,
    set_seed,
)
from ssb.prompts import end_of_turn_token_id

# --------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("template", TEMPLATES)
def test_tiny_tokenizer_round_trips_and_is_deterministic(template):
    tok = build_tokenizer(template)
    assert 500 <= len(tok) <= 1000
    text = "Question: Tom has 12 apples. ünïcödé 数学 \\boxed{42}\n\n\t$1,000 (x^2)"
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    other = build_tokenizer(template)
    assert other is not tok and other.get_vocab() == tok.get_vocab()
    assert (tok.chat_template is None) == (template == "none")


def test_tiny_templates_render():
    msgs = [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "Q?"},
        {"role": "assistant", "content": "A."},
    ]
    chatml = build_tokenizer("chatml").apply_chat_template(msgs, tokenize=False)
    assert chatml == (
        "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n"
        "<|im_start|>assistant\nA.<|im_end|>\n"
    )
    gemma = build_tokenizer("gemma")
    rendered = gemma.apply_chat_template(msgs[1:2], tokenize=False, add_generation_prompt=True)
    assert rendered == "<bos><start_of_turn>user\nQ?<end_of_turn>\n<start_of_turn>model\n"
    assert gemma.apply_chat_template(msgs, tokenize=False).startswith(
        "<bos><start_of_turn>user\nSYS\n\nQ?<end_of_turn>"
    )
    ids = gemma.apply_chat_template(msgs[1:2], add_generation_prompt=True)["input_ids"]
    assert ids.count(gemma.bos_token_id) == 1  # the template's bos, not a second one


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_configs(arch):
    tok = build_tokenizer("gemma")
    model = build_tiny_model(arch, tok)
    cfg = model.config
    assert cfg.vocab_size == len(tok) and cfg.hidden_size == 64 and cfg.num_hidden_layers == 2
    assert cfg.tie_word_embeddings == (arch != "llama")
    assert model.dtype == torch.float32
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert model.generation_config.bos_token_id == tok.bos_token_id
    same = build_tiny_model(arch, tok)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters()))


# --------------------------------------------------------------------------- loading


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "qwen2-chatml": save_tiny_model(root / "qwen2-chatml", "qwen2", "chatml"),
        "gemma3-gemma": save_tiny_model(root / "gemma3-gemma", "gemma3", "gemma"),
    }


def test_load_saved_tiny_model_by_path(saved):
    cfg = ModelConfig(name=str(saved["gemma3-gemma"]), device="cpu", dtype="float32")
    model, tok = load_model_and_tokenizer(cfg)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert model.dtype == torch.float32 and model.device.type == "cpu" and not model.training
    assert len(tok) == model.config.vocab_size and tok.chat_template
    assert resolve_source(cfg).kind == "local"
    gen = HFGenerator(model, tok, 2, [end_of_turn_token_id(tok)])
    out = gen.generate([tok.encode("Tom has 3 apples")], SamplingParams(0.0, max_new_tokens=4))
    assert len(out) == 1 and len(out[0][0].token_ids) <= 4
    bf16 = load_model(cfg, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16


def test_resolve_source_kinds(tmp_path, saved):
    assert resolve_source(ModelConfig(name="embedded")).kind == "embedded"
    assert resolve_source(ModelConfig(name="Qwen/Qwen2.5-3B-Instruct")).kind == "hub"
    assert resolve_source(ModelConfig(name=str(saved["qwen2-chatml"]))).kind == "local"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))
    src = resolve_source(ModelConfig(name=str(gguf)))
    assert src.kind == "gguf" and src.path == gguf.resolve()
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_source(ModelConfig(name=str(tmp_path / "missing.gguf")))
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_source(ModelConfig(name=str(tmp_path / "missing" / "dir")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve_source(ModelConfig(name=str(tmp_path / "empty")))


def test_hub_unreachable_error_is_clear(monkeypatch):
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(models, "_hub_cached", lambda name, revision: False)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_tokenizer(ModelConfig(name="no-such-org/no-such-model"))
    message = str(info.value)
    assert "unreachable" in message and "embedded" in message and "directory" in message
    assert time.perf_counter() - start < 5


def test_hub_offline_env_is_respected(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models.hub_reachable() is False


def test_gguf_conversion_is_cached_and_atomic(tmp_path, monkeypatch):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + os.urandom(5000))
    calls = []

    def fake_convert(path, out_dir, provenance):
        calls.append(path)
        (out_dir / "config.json").write_text("{}")
        if len(calls) == 1:
            raise RuntimeError("crash in the middle of a conversion")
        (out_dir / models.CONVERSION_MARKER).write_text(
            json.dumps({"format": models.CONVERSION_FORMAT, **provenance})
        )

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    cfg = ModelConfig(name=str(gguf), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="crash"):
        models.model_location(cfg)
    # nothing half-written is left behind
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []
    first = models.model_location(cfg)
    again = models.model_location(cfg)
    assert first == again and len(calls) == 2
    assert Path(first).parent == tmp_path / "cache" / "gguf"
    gguf.write_bytes(b"GGUF" + os.urandom(5000))  # new content -> a new key
    assert models.model_location(cfg) != first and len(calls) == 3


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("SSB_CACHE_DIR", str(tmp_path / "env"))
    assert models.cache_root(ModelConfig()) == tmp_path / "env"
    assert models.cache_root(ModelConfig(cache_dir=str(tmp_path / "x"))) == tmp_path / "x"
    monkeypatch.delenv("SSB_CACHE_DIR")
    assert models.cache_root(ModelConfig()) == Path("~/.cache/ssb").expanduser()


# --------------------------------------------------------------------------- seed


def test_set_seed():
    import random

    import numpy as np

    set_seed(5)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_seed(5)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


# --------------------------------------------------------------------------- identity, end of turn


def test_model_identity(saved, tmp_path):
    chatml, gemma = build_tokenizer("chatml"), build_tokenizer("gemma")
    cfg = ModelConfig(name=str(saved["qwen2-chatml"]))
    a = model_identity(cfg, chatml)
    assert a == model_identity(cfg, build_tokenizer("chatml"))
    assert a["source"] == "local" and a["vocab_size"] == len(chatml) and a["revision"]
    b = model_identity(cfg, gemma)
    assert b["vocab_hash"] != a["vocab_hash"]
    other = ModelConfig(name=str(saved["gemma3-gemma"]))
    assert model_identity(other, chatml)["revision"] != a["revision"]
    hub = model_identity(ModelConfig(name="org/model", revision="abc123"), chatml)
    assert hub["source"] == "hub" and hub["revision"] == "abc123"
    json.dumps(a)  # stored in manifests


@pytest.mark.parametrize(
    "template,token", [("chatml", "<|im_end|>"), ("gemma", "<end_of_turn>"), ("none", "<eos>")]
)
def test_end_of_turn_token_id(template, token):
    tok = build_tokenizer(template)
    assert end_of_turn_token_id(tok) == tok.convert_tokens_to_ids(token)
    if template == "chatml":
        assert end_of_turn_token_id(tok) != tok.eos_token_id


def test_end_of_turn_token_id_llama3_style():
    tok = build_tokenizer("none")
    tok.add_special_tokens(
        {"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
    )
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
        "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    )
    assert end_of_turn_token_id(tok) == tok.convert_tokens_to_ids("<|eot_id|>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # no marker
    assert end_of_turn_token_id(tok) == tok.eos_token_id


# --------------------------------------------------------------------------- embedded


@pytest.mark.slow
def test_embedded_model_converts_once_then_loads_from_cache():
    """google/gemma-3-270m from the PyPI package: converted once (about a minute) into the ssb
    cache ($SSB_CACHE_DIR or ~/.cache/ssb), then loaded from it in seconds."""
    cfg = ModelConfig(name="embedded", device="cpu", dtype="bfloat16")
    path = Path(models.model_location(cfg))
    assert path == models.cache_root(cfg) / models.EMBEDDED_CACHE_NAME
    marker = json.loads((path / models.CONVERSION_MARKER).read_text())
    assert marker["source"] == "embedded" and marker["dtype"] == "bfloat16"
    assert not list(path.parent.glob(f".{path.name}.tmp-*"))  # no half-written cache
    stamp = (path / models.CONVERSION_MARKER).stat().st_mtime_ns
    model, tok = load_model_and_tokenizer(cfg)
    assert (path / models.CONVERSION_MARKER).stat().st_mtime_ns == stamp  # loaded from the cache
    assert model.dtype == torch.bfloat16
    assert len(tok) == 262144 and model.config.vocab_size == 262144
    assert tok.chat_template is None and end_of_turn_token_id(tok) == tok.eos_token_id
    ident = model_identity(cfg, tok)
    assert ident["source"] == "embedded" and ident["model_id"] == "google/gemma-3-270m"
    gen = HFGenerator(model, tok, 2, [tok.eos_token_id])
    prompt = tok.encode("Question: What is 2 + 3?\nAnswer:")
    out = gen.generate([prompt], SamplingParams(0.0, max_new_tokens=6), progress=False)
    assert 1 <= len(out[0][0].token_ids) <= 6 and out[0][0].text.strip()


def test_lm_head_gets_a_contiguous_input(saved):
    """transformers hands the lm_head a strided slice under logits_to_keep=1; a frozen bf16 head
    on CPU is then ~450x slower (torch 2.13), so the loader makes the input contiguous."""
    from ssb.models import contiguous_head_input

    model, tok = load_model_and_tokenizer(ModelConfig(name=str(saved["qwen2-chatml"])))
    seen: list[bool] = []
    head = model.get_output_embeddings()
    probe = head.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    ids = torch.tensor([tok.encode("Tom has 3 apples and 4 pears.")] * 2)
    try:
        with torch.inference_mode():
            with_hook = model(input_ids=ids, logits_to_keep=1).logits
            head._ssb_contiguous_hook.remove()  # the loader's hook, taken off
            head._ssb_contiguous_hook = None
            without = model(input_ids=ids, logits_to_keep=1).logits
            contiguous_head_input(model)
            contiguous_head_input(model)  # idempotent: one hook
            model(input_ids=ids, logits_to_keep=1)
    finally:
        probe.remove()
    assert seen == [True, False, True]
    torch.testing.assert_close(with_hook, without)
    assert len(head._forward_pre_hooks) == 1


def test_the_transformers_under_test_is_the_one_expected():
    """`make test-compat` runs the fast tests on the transformers that the vllm extra resolves to
    (put first on PYTHONPATH); this fails if the overlay did not take effect."""
    import transformers

    expected = os.environ.get("SSB_EXPECT_TRANSFORMERS")
    if expected is None:
        pytest.skip("SSB_EXPECT_TRANSFORMERS is set only by `make test-compat`")
    assert transformers.__version__ == expected


def test_cache_kwarg_is_one_the_model_reads():
    """Incremental decoding through `cache_kwarg` gives the full forward's logits. transformers
    5.24 takes `cache=`; 5.20.2 (vLLM's) silently ignores it in **kwargs, which would decode
    without a cache (wrong logits)."""
    tok = build_tokenizer("chatml")
    model = build_tiny_model("qwen2", tok)
    ids = torch.tensor([[5, 9, 11, 4, 7, 12]])
    with torch.no_grad():
        full = model(input_ids=ids).logits[0, -1]
        first = model(input_ids=ids[:, :-1], use_cache=True)
        cache = getattr(first, "cache", None) or first.past_key_values  # renamed in 5.24
        step = model(input_ids=ids[:, -1:], use_cache=True, **{models.cache_kwarg(model): cache})
    assert cache.get_seq_length() == ids.shape[1]
    torch.testing.assert_close(step.logits[0, -1], full, rtol=1e-4, atol=1e-5)
