"""Random-init models of real architectures and tokenizers trained locally: no model hub.

The one owner of "a random model and its tokenizer", used by the tests, the GPU check
(``benchmarks/gpu_check.py``) and ``ssb bench`` alike (so it lives in the package, which all
three can import; the tests directory is not importable from the others):

- `train_bpe`: a byte-level BPE trained in-process on a corpus (every string round-trips through
  bytes), optionally padded with filler tokens to a model's vocabulary; `byte_tokenizer`: the
  untrained byte-level form of exactly ``vocab_size`` ids.
- `model_config`: an architecture's config at a shape given in the bench's short names
  (``vocab``, ``hidden``, ``intermediate``, ``layers``, ``heads``, ``kv_heads``); `random_model`:
  its seeded random init.
- The tests' tiny models, built from those:

    tok = build_tokenizer("chatml")            # or "gemma", "none" (a base model, no template)
    model = build_tiny_model("qwen2", tok)     # or "llama", "gemma3"
    path = save_tiny_model(tmp_path / "m", "qwen2", "chatml")   # loadable with from_pretrained

The tiny tokenizer is trained on a small built-in corpus; it is deterministic and cached per
process (each call returns a fresh tokenizer object, so tests may mutate it freely). Templates:

- "chatml": `<|endoftext|>` (eos and pad, no bos), `<|im_start|>`, `<|im_end|>`; Qwen2.5-style
  ChatML template. Like Qwen2.5, a conversation without a system message gets the default
  system message "You are a helpful assistant.".
- "gemma": `<bos>` (added by `encode`), `<eos>`, `<pad>`, `<start_of_turn>`, `<end_of_turn>`;
  Gemma-3-style template (starts with bos, system text prepended to the first user turn, the
  assistant role is called "model", contents are trimmed).
- "none": a base model: `<bos>` (added by `encode`), `<eos>`, `<pad>`, no chat template.

Tokenizers pad on the right (the `transformers` default, as real checkpoints do); code that
needs left padding must ask for it.

Tiny models: `TINY_SHAPE` (hidden 64, 2 layers, 4 heads / 2 kv heads), float32, vocab =
len(tokenizer); qwen2 and gemma3 tie the embeddings (as the real small models do), llama does
not; gemma3 alternates a sliding (window 64) and a full attention layer. The weights are random
but shaped so that outputs are peaked and context dependent (not near-uniform, and greedy
decoding does not just repeat the last token), and the output layer is nudged so that sampling
emits the end-of-turn token (`<|im_end|>`, `<end_of_turn>`, or eos for "none") with probability
about 5% per step at temperature 1; greedy decoding stops early for some prompts. Tests must not
rely on what these models say beyond shapes, ids and determinism (same arch/template/seed ->
same weights).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

TEMPLATES = ("chatml", "gemma", "none")
ARCHS = ("qwen2", "llama", "gemma3")
VOCAB_SIZE = 640  # including the 256 byte tokens and the special tokens

CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- for message in loop_messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<start_of_turn>model\\n' }}"
    "{%- endif -%}"
)

_SPECIALS = {
    "chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "gemma": ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
    "none": ["<pad>", "<eos>", "<bos>"],
}
_CONST_FRACTION = 0.1  # share of residual energy in the constant coordinate
_CONST_DIM = 0
_EMBED_GAIN = 20.0
_LAYER_GAIN = 5.0
TINY_SHAPE = {"hidden": 64, "intermediate": 128, "layers": 2, "heads": 4, "kv_heads": 2}
# The shape's short names (the bench's specs use them) -> the config fields they set.
_CONFIG_FIELDS = {
    "vocab": "vocab_size",
    "hidden": "hidden_size",
    "intermediate": "intermediate_size",
    "layers": "num_hidden_layers",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
}


def _corpus() -> list[str]:
    """A small, fixed corpus of math-flavoured text (no randomness)."""
    names = ["Tom", "Ann", "Lily", "Sam", "Maria", "John", "Ravi", "Mei", "Omar", "Zoe"]
    things = ["apples", "books", "marbles", "pencils", "cookies", "dollars", "stickers", "eggs"]
    verbs = ["has", "buys", "gives away", "finds", "sells", "eats", "loses", "gets"]
    lines = []
    for i in range(160):
        a, b = (i * 7) % 97 + 1, (i * 13) % 41 + 2
        n, t, v = names[i % len(names)], things[i % len(things)], verbs[i % len(verbs)]
        m = names[(i + 3) % len(names)]
        op, res = ("+", a + b) if i % 3 else ("-", a - b)
        lines.append(
            f"Question: {n} {v} {a} {t}. {m} has {b} more {t}. How many {t} are there?\n"
            f"Answer: {n} has {a} {t} and {m} has {b}, so {a} {op} {b} = {res}. "
            f"The answer is \\boxed{{{res}}}.\n\n"
        )
        lines.append(
            f"Let $x = {a}$ and $y = {b}$. Then $x \\times y = {a * b}$ and "
            f"$\\frac{{{a}}}{{{b}}} \\approx {a / b:.3f}$, so the final answer is \\boxed{{{a * b}}}."
        )
    lines.append("0123456789 10 100 1000 3.14 -5 1/2 50% $18 1,000 (a+b)^2 \\sqrt{2} x^2")
    lines.append("Solve the problem step by step, and put your final answer within \\boxed{}.")
    lines.append("You are an expert math tutor. First, second, third; total: sum of all parts!?")
    return lines


def train_bpe(
    corpus: Iterable[str],
    vocab_size: int,
    specials: list[str],
    min_frequency: int = 0,
    fill_to: int | None = None,
) -> Tokenizer:
    """A byte-level BPE of `vocab_size` tokens (`specials` first) trained on `corpus`.

    With `fill_to`, the vocabulary is padded with filler tokens (`<fill123>`) up to that size:
    BPE never produces them (no merge leads there), but each decodes to its own text, so every
    id a random model of that vocabulary can emit decodes (and vLLM, which refuses ids outside
    the tokenizer, accepts them)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    if fill_to is None:
        return tok
    data = json.loads(tok.to_str())
    _fill_vocab(data["model"]["vocab"], tok.get_vocab_size(), fill_to)
    return Tokenizer.from_str(json.dumps(data))


def _fill_vocab(vocab: dict[str, int], start: int, size: int) -> None:
    for i in range(start, size):
        vocab[f"<fill{i}>"] = i


def byte_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """An untrained byte-level tokenizer of exactly `vocab_size` ids for a random model: id 0 is
    ``<|endoftext|>`` (eos and pad), then the 256 byte symbols (every string encodes, one token
    per byte), then filler tokens (see `train_bpe`)."""
    vocab = {"<|endoftext|>": 0}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    _fill_vocab(vocab, len(vocab), vocab_size)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


@functools.cache
def _tokenizer_json(template: str) -> str:
    specials = _SPECIALS[template]
    tok = train_bpe(_corpus(), VOCAB_SIZE, specials, min_frequency=2)
    if "<bos>" in specials:
        bos = tok.token_to_id("<bos>")
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok.to_str()


def build_tokenizer(template: str = "chatml") -> PreTrainedTokenizerFast:
    """A fresh small byte-level BPE tokenizer (see the module docstring for the templates)."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r} (choose from {', '.join(TEMPLATES)})")
    tok = Tokenizer.from_str(_tokenizer_json(template))
    if template == "chatml":
        kwargs = dict(
            eos_token="<|endoftext|>",
            pad_token="<|endoftext|>",
            additional_special_tokens=["<|im_start|>", "<|im_end|>"],
            chat_template=CHATML_TEMPLATE,
        )
    elif template == "gemma":
        kwargs = dict(
            bos_token="<bos>",
            eos_token="<eos>",
            pad_token="<pad>",
            additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
            chat_template=GEMMA_TEMPLATE,
        )
    else:
        kwargs = dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
        **kwargs,
    )


def end_of_turn_token(tokenizer: PreTrainedTokenizerFast) -> int:
    """The id the tiny model is nudged to emit (by vocabulary, independent of ssb)."""
    vocab = tokenizer.get_vocab()
    for name in ("<|im_end|>", "<end_of_turn>"):
        if name in vocab:
            return vocab[name]
    return tokenizer.eos_token_id


def model_config(arch: str, shape: dict[str, Any], **fields: Any) -> PreTrainedConfig:
    """`arch`'s config ("qwen2", "llama", "gemma3") with `shape`'s sizes (short names, see
    `_CONFIG_FIELDS`; other keys are ignored) and `fields` set as given. qwen2 and gemma3 tie
    the embeddings, llama does not; gemma3 alternates sliding (window 64) and full attention."""
    kw: dict[str, Any] = {
        field: shape[key] for key, field in _CONFIG_FIELDS.items() if key in shape
    }
    if arch == "qwen2":
        kw.update(tie_word_embeddings=True)
        kw.update(fields)
        return Qwen2Config(**kw)
    head_dim = shape["hidden"] // shape["heads"]
    if arch == "llama":
        kw.update(tie_word_embeddings=False, head_dim=head_dim)
        kw.update(fields)
        return LlamaConfig(**kw)
    if arch == "gemma3":
        kw.update(
            head_dim=head_dim,
            query_pre_attn_scalar=head_dim,
            tie_word_embeddings=True,
            sliding_window=64,
            layer_types=[
                ("sliding_attention", "full_attention")[i % 2] for i in range(shape["layers"])
            ],
        )
        kw.update(fields)
        return Gemma3TextConfig(**kw)
    raise ValueError(f"unknown arch {arch!r} (choose from {', '.join(ARCHS)})")


def random_model(
    config: PreTrainedConfig,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    **kwargs: Any,
) -> PreTrainedModel:
    """The seeded random init of `config` (default initialisation), built on `device`;
    `kwargs` go to `from_config` (e.g. ``attn_implementation``)."""
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)


def _tiny_config(arch: str, tokenizer: PreTrainedTokenizerFast, overrides: dict[str, Any]):
    bos = tokenizer.bos_token_id
    return model_config(
        arch,
        dict(TINY_SHAPE, vocab=len(tokenizer)),
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=bos if bos is not None else tokenizer.eos_token_id,
        **overrides,
    )


def _shape_weights(model: PreTrainedModel, seed: int) -> None:
    """Make a random model's output less uniform and less self-repeating.

    At the default init (std 0.02) the next-token distribution is nearly uniform, and with tied
    embeddings greedy decoding repeats the last token (the final hidden state is close to the
    current token's own embedding). Larger embedding / layer weights and random signs on the final
    norm's weight give peaked, context-dependent outputs.
    """
    gen = torch.Generator().manual_seed(seed + 7)
    inner = model.get_decoder()
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(_EMBED_GAIN)
        out = model.get_output_embeddings().weight
        if out.data_ptr() != model.get_input_embeddings().weight.data_ptr():
            out.mul_(_EMBED_GAIN)
        for param in inner.layers.parameters():
            if param.dim() == 2:
                param.mul_(_LAYER_GAIN)
        signs = torch.randint(0, 2, inner.norm.weight.shape, generator=gen).float() * 2 - 1
        signs[_CONST_DIM] = 1.0
        if "gemma" in model.config.model_type:  # Gemma norms scale by (1 + weight)
            signs = signs - 1.0
        inner.norm.weight.copy_(signs)


def _nudge_end_of_turn(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, eot: int, target: float = 0.05
) -> None:
    """Make sampling (temperature 1) emit `eot` with probability ~`target` per step.

    Coordinate 0 of the residual stream is made a constant: every input embedding gets the same
    value there and no layer writes to it (row 0 of each `o_proj` / `down_proj` is zeroed; the
    norms are per-position scalings, so a zero stays zero). The final normalised hidden state then
    has a positive component along coordinate 0 at every position, and the output row of `eot` is
    raised along it by an amount found by bisection on sample contexts. For tied embeddings the
    constant adds the same amount to every other logit, which softmax ignores.
    """
    k = _CONST_DIM
    inner = model.get_decoder()
    with torch.no_grad():
        for layer in inner.layers:
            layer.self_attn.o_proj.weight[k, :] = 0
            layer.mlp.down_proj.weight[k, :] = 0
            for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
                if lin.bias is not None:
                    lin.bias[k] = 0
            attn, mlp = layer.self_attn, layer.mlp
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                lin.weight[:, k] = 0  # and no layer reads it
    texts = [line[:80] for line in _corpus()[::37]][:8]
    batch = [tokenizer.encode(t)[:24] for t in texts]
    width = min(len(b) for b in batch)
    contexts = torch.tensor([b[:width] for b in batch])
    contexts[contexts == eot] = tokenizer.pad_token_id
    emb = model.get_input_embeddings()
    scale = float(getattr(emb, "embed_scale", 1.0))
    out = model.get_output_embeddings().weight
    captured = {}

    def grab(name):
        def hook(module, args):
            captured[name] = args[0].detach().float()

        return hook

    handles = [
        inner.norm.register_forward_pre_hook(grab("resid")),
        model.get_output_embeddings().register_forward_pre_hook(grab("h")),
    ]
    try:
        with torch.no_grad():
            for _ in range(3):  # the constant carries _CONST_FRACTION of the residual energy
                model(input_ids=contexts)
                other = captured["resid"].pow(2).sum(-1) - captured["resid"][..., k].pow(2)
                emb.weight[:, k] = (other.mean() * _CONST_FRACTION).sqrt() / scale
            if out.data_ptr() != emb.weight.data_ptr():
                out[:, k] = 0  # untied: the constant coordinate feeds only the eot logit
            base = out[eot, k].item()
            model(input_ids=contexts)
            h = captured["h"]
            raw = h @ out.float().T  # logits before any soft-capping
            cap = getattr(model.config, "final_logit_softcapping", None)

            def p_eot(delta: float) -> float:
                z = raw.clone()
                z[..., eot] += h[..., k] * delta
                if cap:
                    z = cap * torch.tanh(z / cap)
                return z.softmax(-1)[..., eot].mean().item()

            lo, hi = 0.0, 1.0
            while p_eot(hi) < target and hi < 1e4:
                lo, hi = hi, hi * 2
            for _ in range(30):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if p_eot(mid) < target else (lo, mid)
            out[eot, k] = base + (lo + hi) / 2
    finally:
        for handle in handles:
            handle.remove()


def build_tiny_model(
    arch: str, tokenizer: PreTrainedTokenizerFast, seed: int = 0, **overrides
) -> PreTrainedModel:
    """A random-init float32 model of a real architecture at `TINY_SHAPE`, its weights shaped
    as the module docstring says; `overrides` change its config."""
    config = _tiny_config(arch, tokenizer, overrides)
    model = random_model(config, seed=seed)
    model.eval()
    _shape_weights(model, seed)
    _nudge_end_of_turn(model, tokenizer, end_of_turn_token(tokenizer))
    gc = model.generation_config
    gc.eos_token_id = config.eos_token_id
    gc.pad_token_id = config.pad_token_id
    gc.bos_token_id = config.bos_token_id
    return model


def save_tiny_model(
    path: str | Path, arch: str = "qwen2", template: str = "chatml", seed: int = 0, **overrides
) -> Path:
    """Save a tiny model + tokenizer to `path` (loadable with `from_pretrained(path)`);
    `overrides` change its config (e.g. the head size a kernel needs)."""
    path = Path(path)
    tokenizer = build_tokenizer(template)
    model = build_tiny_model(arch, tokenizer, seed=seed, **overrides)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def vocab_hash(tokenizer: PreTrainedTokenizerFast) -> str:
    """Stable hash of a vocabulary (for determinism checks)."""
    blob = json.dumps(sorted(tokenizer.get_vocab().items())).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
