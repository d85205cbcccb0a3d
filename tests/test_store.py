"""Tests for ssb.distill.store: round trips, resume, crash leftovers, corruption, meta checks."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from ssb.distill.losses import topk_targets
from ssb.distill.store import INDEX_NAME, TargetReader, TargetStoreError, TargetWriter

torch.set_num_threads(1)

V, H, K, TAU = 97, 24, 8, 2.0


def _example(mode: str, length: int, seed: int, vocab: int = V, k: int = K):
    g = torch.Generator().manual_seed(seed)
    reply = torch.randint(0, vocab, (length,), generator=g).tolist()
    if mode == "hidden":
        return reply, {"hidden": torch.randn(length, H, generator=g)}
    logits = torch.randn(length, vocab, generator=g) * 3
    if mode == "dense":
        return reply, {"logp": torch.log_softmax(logits / TAU, -1)}
    ids, logp, tail = topk_targets(logits, k, TAU)
    return reply, {"ids": ids, "logp": logp, "tail": tail}


def _meta(mode: str) -> dict:
    meta = {"tau": TAU, "vocab_size": V, "model": "tiny", "revision": None}
    if mode == "topk":
        meta["topk"] = K
    if mode == "hidden":
        meta["hidden_size"] = H
    return meta


def _write(directory, mode, n, shard_size=3, start=0, **kw):
    written = {}
    with TargetWriter(directory, mode, _meta(mode), shard_size, **kw) as writer:
        for i in range(start, start + n):
            reply, tensors = _example(mode, 3 + i % 5, seed=i)
            writer.add(f"ex{i}", reply, tensors)
            written[f"ex{i}"] = (reply, tensors)
    return written


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("mode", ["topk", "dense", "hidden"])
def test_round_trip(tmp_path, mode):
    written = _write(tmp_path, mode, n=7, shard_size=3)
    reader = TargetReader(tmp_path)
    assert reader.mode == mode and reader.meta == _meta(mode)
    assert reader.ids() == [f"ex{i}" for i in range(7)]
    assert len(reader) == 7
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == [
        "shard-00000.safetensors",
        "shard-00001.safetensors",
        "shard-00002.safetensors",
    ]
    for example_id, (reply, tensors) in written.items():
        got_reply, got = reader.get(example_id)
        assert got_reply == reply
        assert reader.length(example_id) == len(reply)
        assert set(got) == set(tensors)
        for key, value in tensors.items():
            assert got[key].shape == value.shape
        if mode == "topk":
            assert got["ids"].dtype == torch.int32 and got["logp"].dtype == torch.float16
            assert got["tail"].dtype == torch.float32
            assert torch.equal(got["ids"].long(), tensors["ids"])
            torch.testing.assert_close(got["tail"], tensors["tail"])
            # float16: relative error <= 2^-11 of the log-prob.
            err = (got["logp"].float() - tensors["logp"]).abs()
            assert (err <= tensors["logp"].abs() * 2**-11 + 1e-7).all()
        elif mode == "dense":
            assert got["logp"].dtype == torch.float32
            assert torch.equal(got["logp"], tensors["logp"])
        else:
            assert got["hidden"].dtype == torch.bfloat16
            assert torch.equal(got["hidden"], tensors["hidden"].bfloat16())
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["format_version"] == 1 and index["mode"] == mode
    assert set(index["shards"]) == {p.name for p in tmp_path.glob("shard-*")}
    assert reader.num_tokens() == sum(len(r) for r, _ in written.values())
    reader.verify()


def test_topk_neg_inf_tail_and_saturation(tmp_path):
    reply, tensors = _example("topk", 4, seed=0, k=V)  # k == V: tail is -inf
    tensors["logp"][0, -1] = -1e6  # below float16's range: saturates, does not become -inf
    meta = {**_meta("topk"), "topk": V}
    with TargetWriter(tmp_path, "topk", meta, 10) as writer:
        writer.add("a", reply, tensors)
    _, got = TargetReader(tmp_path).get("a")
    assert torch.isneginf(got["tail"]).all()
    assert got["logp"][0, -1].item() == torch.finfo(torch.float16).min


def test_hidden_dtype_override(tmp_path):
    reply, tensors = _example("hidden", 5, seed=1)
    with TargetWriter(
        tmp_path, "hidden", _meta("hidden"), 4, dtypes={"hidden": torch.float32}
    ) as w:
        w.add("a", reply, tensors)
    reader = TargetReader(tmp_path)
    assert reader.tensor_specs["hidden"] == {"dtype": "float32", "shape": [H]}
    assert torch.equal(reader.get("a")[1]["hidden"], tensors["hidden"])


# --------------------------------------------------------------------------- resume and crashes


def test_resume(tmp_path):
    _write(tmp_path, "topk", n=4, shard_size=3)  # shards: 3 examples + 1 example
    writer = TargetWriter(tmp_path, "topk", _meta("topk"), 3)
    assert writer.done_ids() == {"ex0", "ex1", "ex2", "ex3"}
    with pytest.raises(TargetStoreError, match="already"):
        writer.add("ex1", *_example("topk", 3, seed=1))
    for i in range(4, 9):
        writer.add(f"ex{i}", *_example("topk", 3 + i % 5, seed=i))
    with pytest.raises(TargetStoreError, match="already"):
        writer.add("ex8", *_example("topk", 3, seed=8))  # buffered, not yet flushed
    writer.close()
    reader = TargetReader(tmp_path)
    assert reader.ids() == [f"ex{i}" for i in range(9)]
    for i in range(9):
        reply, tensors = _example("topk", 3 + i % 5, seed=i)
        got_reply, got = reader.get(f"ex{i}")
        assert got_reply == reply and torch.equal(got["ids"].long(), tensors["ids"])
    assert len(list(tmp_path.glob("shard-*"))) == 4


def test_resume_refuses_different_meta_or_mode(tmp_path):
    _write(tmp_path, "topk", n=2)
    with pytest.raises(TargetStoreError, match="tau"):
        TargetWriter(tmp_path, "topk", {**_meta("topk"), "tau": 1.0}, 3)
    with pytest.raises(TargetStoreError, match="mode|topk"):
        TargetWriter(tmp_path, "dense", _meta("topk"), 3)
    with pytest.raises(TargetStoreError, match="logp"):
        TargetWriter(tmp_path, "topk", _meta("topk"), 3, dtypes={"logp": torch.bfloat16})


def test_shard_not_in_index_is_ignored_and_removed(tmp_path):
    _write(tmp_path, "topk", n=3, shard_size=3)
    # Simulate a crash after a shard was written but before the index was: copy a shard under the
    # next name, and leave a temporary file behind.
    stray = tmp_path / "shard-00001.safetensors"
    stray.write_bytes((tmp_path / "shard-00000.safetensors").read_bytes())
    (tmp_path / "index.json.tmp").write_text("{")
    reader = TargetReader(tmp_path)
    assert reader.ids() == ["ex0", "ex1", "ex2"]
    reader.verify()
    writer = TargetWriter(tmp_path, "topk", _meta("topk"), 3)
    assert not stray.exists() and not (tmp_path / "index.json.tmp").exists()
    writer.add("ex3", *_example("topk", 4, seed=3))
    assert writer.flush() == "shard-00001.safetensors"
    reader = TargetReader(tmp_path)
    assert reader.ids() == ["ex0", "ex1", "ex2", "ex3"]
    reader.verify()


def test_corrupt_shard_names_shard(tmp_path):
    _write(tmp_path, "topk", n=6, shard_size=3)
    path = tmp_path / "shard-00001.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # a byte in the tensor data
    path.write_bytes(bytes(data))
    reader = TargetReader(tmp_path)
    reader.get("ex0")  # the other shard is fine
    with pytest.raises(TargetStoreError, match=r"shard-00001\.safetensors.*ex4"):
        reader.get("ex4")


def test_truncated_shard_is_reported(tmp_path):
    _write(tmp_path, "dense", n=2, shard_size=5)
    path = tmp_path / "shard-00000.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(TargetStoreError, match="shard-00000"):
        TargetReader(tmp_path).get("ex1")


def test_missing_shard_names_shard(tmp_path):
    _write(tmp_path, "hidden", n=4, shard_size=2)
    (tmp_path / "shard-00001.safetensors").unlink()
    reader = TargetReader(tmp_path)
    reader.get("ex1")
    with pytest.raises(TargetStoreError, match=r"shard-00001\.safetensors.*missing"):
        reader.get("ex2")
    with pytest.raises(TargetStoreError, match="shard-00001"):
        reader.verify()


def test_checksum_mismatch_in_index(tmp_path):
    _write(tmp_path, "topk", n=2, shard_size=5)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    # Point ex1 at ex0's rows: every shard is intact, only the example checksum can notice.
    index["examples"]["ex1"]["offset"] = 0
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    reader = TargetReader(tmp_path)
    reader.get("ex0")
    with pytest.raises(TargetStoreError, match=r"checksum.*ex1.*shard-00000"):
        reader.get("ex1")


def test_missing_index(tmp_path):
    with pytest.raises(TargetStoreError, match="index.json"):
        TargetReader(tmp_path)


# --------------------------------------------------------------------------- meta and validation


def test_check_meta(tmp_path):
    _write(tmp_path, "topk", n=1)
    reader = TargetReader(tmp_path)
    reader.check_meta({"mode": "topk", "tau": 2.0, "vocab_size": V, "topk": K})
    reader.check_meta({"tau": 2.0 + 1e-12})
    with pytest.raises(TargetStoreError, match="tau"):
        reader.check_meta({"tau": 1.0})
    with pytest.raises(TargetStoreError, match="vocab_size"):
        reader.check_meta({"vocab_size": V + 1})
    with pytest.raises(TargetStoreError, match="mode"):
        reader.check_meta({"mode": "hidden"})
    with pytest.raises(TargetStoreError, match="not recorded"):
        reader.check_meta({"prompt_hash": "abc"})


def test_add_validation(tmp_path):
    writer = TargetWriter(tmp_path, "topk", _meta("topk"), 3)
    reply, tensors = _example("topk", 4, seed=0)
    with pytest.raises(TargetStoreError, match="first dim"):
        writer.add("a", reply[:3], tensors)
    with pytest.raises(TargetStoreError, match="tensors"):
        writer.add("a", reply, {"ids": tensors["ids"], "logp": tensors["logp"]})
    with pytest.raises(TargetStoreError, match="k="):
        writer.add("a", *_example("topk", 4, seed=0, k=K + 1))
    bad = dict(tensors, logp=tensors["logp"].clone())
    bad["logp"][0, 0] = float("nan")
    with pytest.raises(TargetStoreError, match="NaN"):
        writer.add("a", reply, bad)
    with pytest.raises(TargetStoreError, match="non-empty"):
        writer.add("a", [], {k: v[:0] for k, v in tensors.items()})
    writer.add("a", reply, tensors)  # the failed attempts left nothing behind
    writer.close()
    assert TargetReader(tmp_path).ids() == ["a"]


def test_reader_is_picklable(tmp_path):
    _write(tmp_path, "hidden", n=3, shard_size=2)
    reader = TargetReader(tmp_path)
    first = reader.get("ex2")[1]["hidden"]
    clone = pickle.loads(pickle.dumps(reader))
    assert torch.equal(clone.get("ex2")[1]["hidden"], first)


# --------------------------------------------------------------------------- size


def test_topk_bytes_per_token_at_qwen_vocab(tmp_path):
    vocab, k = 151936, 64
    meta = {"tau": TAU, "vocab_size": vocab, "topk": k}
    g = torch.Generator().manual_seed(0)
    with TargetWriter(tmp_path, "topk", meta, 4) as writer:
        for i in range(8):
            length = 50
            logits = torch.randn(length, vocab, generator=g)
            ids, logp, tail = topk_targets(logits, k, TAU)
            reply = torch.randint(0, vocab, (length,), generator=g).tolist()
            writer.add(f"ex{i}", reply, {"ids": ids, "logp": logp, "tail": tail})
    reader = TargetReader(tmp_path)
    dense_fp32 = vocab * 4
    assert reader.bytes_per_token() <= dense_fp32 / 1000
    # 64 x (int32 id + float16 log-prob) + float32 tail + int32 reply id, plus shard headers.
    assert 6 * k + 8 <= reader.bytes_per_token() < 6 * k + 8 + 10
