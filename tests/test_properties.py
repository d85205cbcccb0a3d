"""Property tests (hypothesis): grading never raises, boxed extraction on nested strings, the
target store round trip, and the jsonl loaders on fuzzed lines. Sizes and example counts are
kept small (CI on 2 CPU cores)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ssb.distill.losses import topk_targets
from ssb.distill.store import TargetReader, TargetWriter
from ssb.grading import answer_key, extract_boxed, grade, reference_grade
from ssb.problems import ProblemsError, load_file
from ssb.rundir import RunDirError, read_jsonl

torch.set_num_threads(1)

SETTINGS = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)

# Pieces of LaTeX and arithmetic that grading code has to parse, mixed with arbitrary text.
TOKENS = [
    "\\boxed{", "\\boxed ", "\\fbox{", "{", "}", "\\{", "\\}", "\\frac{", "\\sqrt{", "\\dfrac",
    "\\left(", "\\right)", "\\pi", "\\infty", "^", "_", "$", "$$", "\\(", "\\)", "\\[", "\\]",
    "1", "2", "18", "0.5", "-3", "1e9", "10^{100}", "x", "=", "+", "-", "*", "/", ",", ".", " ",
    "\n", "\\text{", "\\%", "%", "(", ")", "[", "]", "\\\\", "\\", "####", "The answer is",
]  # fmt: skip
latexish = st.lists(st.sampled_from(TOKENS) | st.text(max_size=5), max_size=40).map("".join)
any_text = st.text(max_size=200) | latexish


@SETTINGS
@given(completion=any_text, gold=any_text)
def test_grading_never_raises(completion, gold):
    assert isinstance(grade(completion, gold), bool)
    for bench in ("aime24", "math500", "gsm8k"):
        assert isinstance(reference_grade(completion, gold, bench), bool)
    assert isinstance(answer_key(completion), str)
    boxed = extract_boxed(completion)
    assert boxed is None or isinstance(boxed, str)


# Balanced content: plain text (no braces or backslashes) and nested {...} groups.
plain = st.text(alphabet=st.characters(blacklist_characters="{}\\"), max_size=8)
balanced = st.recursive(
    plain,
    lambda inner: st.lists(inner | inner.map(lambda s: "{" + s + "}"), max_size=4).map("".join),
    max_leaves=12,
)
outside = st.text(alphabet=st.characters(blacklist_characters="{}\\"), max_size=30)


@SETTINGS
@given(before=outside, content=balanced, after=outside, earlier=balanced)
def test_extract_boxed_on_nested_strings(before, content, after, earlier):
    text = f"\\boxed{{{earlier}}} {before}\\boxed{{{content}}}{after}"
    assert extract_boxed(text) == content.strip()
    # A truncated last box gives no answer, whatever came before.
    assert extract_boxed(f"{before}\\boxed{{{earlier}}}\\boxed{{{{{content}") is None


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    mode=st.sampled_from(["topk", "dense", "hidden"]),
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=5),
    shard_size=st.integers(1, 3),
    vocab=st.integers(4, 40),
    seed=st.integers(0, 2**16),
)
def test_store_round_trip(mode, lengths, shard_size, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    k = min(4, vocab)
    written = {}
    with tempfile.TemporaryDirectory() as d:
        meta = {"tau": 1.0, "vocab_size": vocab, "topk": k}
        with TargetWriter(d, mode, meta, shard_size) as writer:
            for i, n in enumerate(lengths):
                reply = torch.randint(0, vocab, (n,), generator=g).tolist()
                if mode == "hidden":
                    tensors = {"hidden": torch.randn(n, 8, generator=g).bfloat16().float()}
                else:
                    logits = torch.randn(n, vocab, generator=g) * 3
                    if mode == "dense":
                        tensors = {"logp": torch.log_softmax(logits, -1)}
                    else:
                        ids, logp, tail = topk_targets(logits, k, 1.0)
                        tensors = {"ids": ids, "logp": logp.half().float(), "tail": tail}
                writer.add(f"e{i}", reply, tensors)
                written[f"e{i}"] = (reply, tensors)
        with TargetReader(d) as reader:
            reader.verify()
            assert reader.ids() == list(written)
            for key, (reply, tensors) in written.items():
                got_reply, got = reader.get(key)
                assert got_reply == reply
                assert set(got) == set(tensors)
                for name, value in tensors.items():
                    assert torch.equal(got[name].to(value.dtype), value), (key, name)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
row = st.fixed_dictionaries(
    {}, optional={"question": json_values, "answer": json_values, "id": json_values}
)
line = (
    row.map(json.dumps)
    | json_values.map(json.dumps)
    | st.text(max_size=40)
    | st.binary(max_size=40).map(lambda b: b.decode("latin-1"))
)


@SETTINGS
@given(lines=st.lists(line, max_size=6), id_field=st.sampled_from([None, "id"]))
def test_jsonl_loader_on_fuzzed_lines(lines, id_field):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "data.jsonl"
        path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
        try:
            problems = load_file(path, id_field=id_field)
        except ProblemsError as exc:
            assert str(path) in str(exc)
        else:
            assert problems
            for p in problems:
                assert isinstance(p.question, str) and p.question
                assert isinstance(p.answer, str) and p.answer
        # The run directory's reader: records, or an error naming the file and line.
        try:
            records = read_jsonl(path)
        except RunDirError as exc:
            assert str(path) in str(exc) and "line" in str(exc)
        else:
            assert isinstance(records, list)


@SETTINGS
@given(lines=st.lists(st.binary(max_size=30), max_size=5))
def test_run_dir_reader_on_raw_bytes(lines):
    # Valid UTF-8 only: invalid bytes are test_run_dir_reader_on_invalid_utf8 (a known gap).
    lines = [b.decode("utf-8", "ignore").encode() for b in lines]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "rollouts.jsonl"
        path.write_bytes(b"\n".join(lines))
        try:
            assert isinstance(read_jsonl(path), list)
        except RunDirError as exc:
            assert str(path) in str(exc) and "line" in str(exc)


def test_jsonl_loader_on_invalid_utf8(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"question": "1+1?", "answer": "2"}\n\xff\xfe\n')
    with pytest.raises(ProblemsError, match="line 2"):
        load_file(path)


def test_run_dir_reader_on_invalid_utf8(tmp_path):
    path = tmp_path / "rollouts.jsonl"
    path.write_bytes(b'{"id": 1}\n"\xff"\n{"id": 2}\n')
    with pytest.raises(RunDirError, match="line 2"):
        read_jsonl(path)
