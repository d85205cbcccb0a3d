"""`ssb targets`: stored teacher targets equal a direct teacher forward, on the right rows.

Every test scores pairs whose hinted (teacher) prompt is longer than the student prompt, with real
architectures (tiny random Qwen2 / Gemma 3 / Llama) and their own chat templates.
"""

from __future__ import annotations

import json

import pytest
import torch
from pairs_fixture import end_token, make_run

from ssb.bench.random_models import build_tiny_model, build_tokenizer
from ssb.distill.forward import output_head, reply_rows
from ssb.distill.store import TargetReader, TargetStoreError
from ssb.rundir import append_jsonl, read_jsonl
from ssb.stages.base import load_base
from ssb.stages.targets import run_targets


def direct_rows(model, pair):
    """The teacher's logits for the reply tokens, from a plain `model(input_ids).logits` on the
    unpadded `[teacher prompt || reply + end]`: the logits at position t predict token t + 1, so
    reply token j (at position P + j) is predicted at position P + j - 1."""
    prompt = pair["teacher_prompt_ids"]
    reply = pair["reply_ids"] + [pair["end_token_id"]]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + reply])).logits[0].float()
    positions = [len(prompt) + j - 1 for j in range(len(reply))]
    return logits[positions], reply


def score(cfg, rundir, mode, **extra):
    cfg.targets.mode = mode
    for key, value in extra.items():
        setattr(cfg.targets, key, value)
    summary = run_targets(cfg, rundir, progress=False)
    return summary, TargetReader(rundir.targets_dir)


def test_reply_rows_definition():
    # [p0 p1 p2 | r0 r1]: r0 is predicted at position 2, r1 at position 3.
    assert reply_rows(3, 2) == slice(2, 4)


@pytest.mark.parametrize("template", ["chatml", "gemma"])
def test_dense_targets_equal_direct_forward(tmp_path, template):
    cfg, rundir, pairs = make_run(tmp_path, template)
    assert cfg.targets.batch_size > 1  # padded batches are scored
    summary, reader = score(cfg, rundir, "dense")
    assert summary["examples"] == len(pairs)
    tau = cfg.train.loss.temperature
    assert reader.meta["tau"] == tau
    model = load_base(cfg).model
    for pair in pairs:
        rows, reply = direct_rows(model, pair)
        stored_reply, tensors = reader.get(pair["id"])
        assert stored_reply == reply
        expected = torch.log_softmax(rows / tau, dim=-1)
        torch.testing.assert_close(tensors["logp"], expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("template", ["chatml", "gemma"])
def test_topk_targets_equal_direct_forward(tmp_path, template):
    cfg, rundir, pairs = make_run(tmp_path, template)
    k = cfg.targets.topk
    _, reader = score(cfg, rundir, "topk")
    tau = cfg.train.loss.temperature
    model = load_base(cfg).model
    for pair in pairs:
        rows, reply = direct_rows(model, pair)
        stored_reply, tensors = reader.get(pair["id"])
        assert stored_reply == reply
        logp = torch.log_softmax(rows / tau, dim=-1)
        ids = tensors["ids"].long()
        assert ids.shape == (len(reply), k)
        # The stored ids are the k most likely tokens of the direct forward (by value, so that
        # numerically tied neighbours may swap places), sorted by decreasing probability.
        top_values = logp.topk(k, dim=-1).values
        torch.testing.assert_close(logp.gather(-1, ids), top_values, atol=1e-5, rtol=0)
        # Their log-probs (float16 storage: relative error <= 2^-11) and the tail mass.
        torch.testing.assert_close(
            tensors["logp"].float(), logp.gather(-1, ids), atol=1e-3, rtol=1e-3
        )
        tail = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), dim=-1)
        torch.testing.assert_close(tensors["tail"], tail, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("template", ["chatml", "gemma"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hidden_targets_reproduce_direct_logits(tmp_path, template, dtype):
    cfg, rundir, pairs = make_run(tmp_path, template, f"model.dtype={dtype}")
    _, reader = score(cfg, rundir, "hidden")
    assert reader.meta["tau"] is None  # hidden states do not depend on the temperature
    model = load_base(cfg).model
    assert next(model.parameters()).dtype == getattr(torch, dtype)
    head = output_head(model)
    for pair in pairs:
        rows, reply = direct_rows(model, pair)
        stored_reply, tensors = reader.get(pair["id"])
        assert stored_reply == reply
        assert tensors["hidden"].dtype == torch.bfloat16
        logits = head.logits(tensors["hidden"])
        # bf16 tolerance: the stored hidden state is rounded to 8 mantissa bits (and a bf16
        # model's padded batch differs from the unpadded forward by bf16 rounding).
        scale = rows.abs().max().item()
        torch.testing.assert_close(logits, rows, atol=0.02 * scale, rtol=0)
        assert (logits.argmax(-1) == rows.argmax(-1)).float().mean() > 0.9


def test_softcapped_logits_are_stored_capped(tmp_path):
    """Gemma-2-style final logit soft-capping is part of the teacher's distribution."""
    from pairs_fixture import make_pairs, tiny_config

    from ssb.rundir import RunDir

    tok = build_tokenizer("gemma")
    model = build_tiny_model("gemma3", tok, final_logit_softcapping=3.0)
    model_dir = tmp_path / "capped"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    cfg = tiny_config(model_dir)
    rundir = RunDir(tmp_path / "run")
    pairs = make_pairs(load_base(cfg).tokenizer, cfg, n=3)
    append_jsonl(rundir.pairs_path, pairs)
    _, reader = score(cfg, rundir, "dense")
    base = load_base(cfg).model
    assert output_head(base).softcap == 3.0
    for pair in pairs:
        rows, _ = direct_rows(base, pair)
        assert rows.abs().max() <= 3.0  # the model's own logits are capped
        _, tensors = reader.get(pair["id"])
        expected = torch.log_softmax(rows / cfg.train.loss.temperature, dim=-1)
        torch.testing.assert_close(tensors["logp"], expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("template", "end_name"),
    [("chatml", "<|im_end|>"), ("gemma", "<end_of_turn>"), ("none", "\n\n")],
)
def test_end_token_is_scored(tmp_path, template, end_name):
    cfg, rundir, pairs = make_run(tmp_path, template, n=2)
    end = end_token(load_base(cfg).tokenizer, end_name)
    _, reader = score(cfg, rundir, "topk")
    for pair in pairs:
        assert pair["end_token_id"] == end
        stored_reply, tensors = reader.get(pair["id"])
        assert stored_reply == pair["reply_ids"] + [end]
        assert tensors["ids"].shape[0] == len(pair["reply_ids"]) + 1


def test_resume_skips_stored_examples(tmp_path):
    cfg, rundir, pairs = make_run(tmp_path, "chatml", n=3)
    first, reader = score(cfg, rundir, "topk")
    assert first["scored"] == 3
    before = json.loads((rundir.targets_dir / "index.json").read_text())["examples"]
    # Three more pairs arrive (a resumed bootstrap); only they are scored.
    from pairs_fixture import make_pairs

    more = make_pairs(load_base(cfg).tokenizer, cfg)[3:]
    append_jsonl(rundir.pairs_path, more)
    second, reader = score(cfg, rundir, "topk")
    assert second["scored"] == 3 and second["examples"] == 6
    after = json.loads((rundir.targets_dir / "index.json").read_text())["examples"]
    assert {k: after[k] for k in before} == before  # stored examples untouched
    third, _ = score(cfg, rundir, "topk")
    assert third["scored"] == 0


def test_mismatched_tau_or_mode_refused(tmp_path):
    cfg, rundir, _ = make_run(tmp_path, "chatml", n=2)
    score(cfg, rundir, "topk")
    cfg.train.loss.temperature = 1.0
    with pytest.raises(TargetStoreError, match="meta"):
        score(cfg, rundir, "topk")
    cfg.train.loss.temperature = 2.0
    with pytest.raises(TargetStoreError, match="cannot resume as 'dense'"):
        score(cfg, rundir, "dense")


def test_changed_prompt_refused(tmp_path):
    """Prompt ids that the current renderer would not produce (another template, tokenizer or
    prompt config) would score the reply in the wrong context."""
    cfg, rundir, pairs = make_run(tmp_path, "chatml", n=2)
    pairs[1]["teacher_prompt_ids"] = pairs[1]["teacher_prompt_ids"][1:]
    rundir.pairs_path.unlink()
    append_jsonl(rundir.pairs_path, pairs)
    with pytest.raises(ValueError, match="teacher prompt ids differ"):
        score(cfg, rundir, "topk")


def test_online_mode_stores_nothing(tmp_path):
    cfg, rundir, pairs = make_run(tmp_path, "chatml", n=2)
    cfg.targets.mode = "online"
    summary = run_targets(cfg, rundir, progress=False)
    assert summary["examples"] == len(read_jsonl(rundir.pairs_path)) == len(pairs)
    assert summary["bytes_per_reply_token"] == 0
    assert not rundir.targets_dir.exists()


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_a_damaged_shard_is_reported_then_rebuilt_alone(tmp_path, damage):
    cfg, rundir, pairs = make_run(tmp_path, "chatml", n=3)
    # One example per forward pass, so the rescored example sees exactly the same computation.
    score(cfg, rundir, "topk", shard_size=1, batch_size=1)
    index = json.loads((rundir.targets_dir / "index.json").read_text())
    victim = sorted(index["shards"])[1]
    owner = next(i for i, e in index["examples"].items() if e["shard"] == victim)
    reader = TargetReader(rundir.targets_dir)
    before = {}
    for example_id in index["examples"]:  # copies: the reader's tensors are memory-mapped
        reply, tensors = reader.get(example_id)
        before[example_id] = (list(reply), {k: v.clone() for k, v in tensors.items()})
    del reader
    path = rundir.targets_dir / victim
    if damage == "flip":
        data = bytearray(path.read_bytes())
        data[-5] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        path.unlink()
    with pytest.raises(TargetStoreError, match=victim + r".*ssb targets"):
        TargetReader(rundir.targets_dir).get(owner)

    summary, reader = score(cfg, rundir, "topk", shard_size=1, batch_size=1)
    assert summary["scored"] == 1  # only the damaged shard's example is scored again
    reader.verify()
    for example_id, (reply, tensors) in before.items():
        again_reply, again = reader.get(example_id)
        assert again_reply == reply
        for key in tensors:
            torch.testing.assert_close(again[key], tensors[key])
