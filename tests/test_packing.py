"""Padding-free packing of a training micro-batch (`ssb.distill.forward.pack_rows`): the same
loss and LoRA gradients as the padded batch, over an optimizer step of two micro-batches
normalised by the step's reply tokens, with stored and online teacher targets lined up and the
end token distilled; and packing is refused where attention would let packed sequences see each
other (a leak that the equality itself would catch).

Tiny random models of real architectures, float32 (ssb.bench.random_models, tests/pairs_fixture.py).
"""

from __future__ import annotations

import pytest
import torch
from pairs_fixture import make_run
from peft import get_peft_model

from ssb.distill.forward import pack_rows, packing_isolates, should_pack
from ssb.distill.store import TargetReader
from ssb.stages.base import load_base
from ssb.stages.targets import run_targets
from ssb.stages.train import (
    IGNORE,
    DistillCollator,
    lora_config,
    make_trainer,
    online_teacher_rows,
    reply_hidden,
)


def student(cfg):
    """A LoRA student on a fresh copy of the base with lora_B moved off zero (a non-zero loss)."""
    from ssb.models import load_model_and_tokenizer

    base, _ = load_model_and_tokenizer(cfg.model)
    torch.manual_seed(0)
    model = get_peft_model(base, lora_config(cfg))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def collate(cfg, pairs, reader):
    tok = load_base(cfg).tokenizer
    batch = DistillCollator(pad_id=tok.pad_token_id, mode=cfg.targets.mode, reader=reader)(pairs)
    batch["shared_prefix"] = 0  # the plain padded layout is the reference
    return batch


def test_pack_rows_keeps_row_major_order():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [1, 2, 3, 4]])
    mask = (torch.arange(4) < torch.tensor([[3], [2], [4]])).long()
    packed, positions = pack_rows(ids, mask)
    assert packed.tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4]]
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]


@pytest.mark.parametrize("mode", ["topk", "online"])
@pytest.mark.parametrize("template", ["chatml", "gemma", "none"])
def test_packing_equals_padding_over_an_optimizer_step(tmp_path, monkeypatch, template, mode):
    cfg, rundir, pairs = make_run(tmp_path, template, n=4)
    cfg.targets.mode = mode
    reader = None
    if mode != "online":
        run_targets(cfg, rundir, progress=False)
        reader = TargetReader(rundir.targets_dir)
    model = student(cfg)
    assert packing_isolates(model)
    trainer = make_trainer(cfg, rundir, model, load_base(cfg).tokenizer, pairs, reader, False)
    micro = [collate(cfg, pairs[:2], reader), collate(cfg, pairs[2:], reader)]
    for batch in micro:
        assert not batch["attention_mask"].all()  # padding to save, or packing is not used
        assert should_pack(model, batch["attention_mask"])
    step_tokens = sum(int((b["shift_labels"] != IGNORE).sum()) for b in micro)

    def one_step(pack: bool):
        """One optimizer step's loss and gradients: two micro-batches, each normalised by the
        step's reply tokens (as Trainer passes `num_items_in_batch`)."""
        monkeypatch.setattr("ssb.stages.train.should_pack", lambda *a, **k: pack)
        model.zero_grad()
        loss = 0.0
        for batch in micro:
            out = trainer.compute_loss(model, batch, num_items_in_batch=step_tokens)
            out.backward()
            loss += float(out.detach())
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss, grads

    loss_pad, grads_pad = one_step(False)
    loss_packed, grads_packed = one_step(True)
    assert loss_pad > 1e-3
    assert loss_packed == pytest.approx(loss_pad, rel=1e-5)
    for name, g in grads_pad.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(grads_packed[name], g, rtol=1e-3, atol=1e-6, msg=name)

    # The rows line up: the packed rows hold every pair's reply, end token included, in the
    # order of the stored teacher rows; the online teacher's packed rows equal its padded ones.
    batch = micro[0]
    args = (model, batch["input_ids"], batch["attention_mask"], batch["shift_labels"])
    with torch.no_grad():
        rows_pad, labels_pad = reply_hidden(*args)
        rows_packed, labels_packed = reply_hidden(*args, pack=True)
    replies = [p["reply_ids"] + [p["end_token_id"]] for p in pairs[:2]]
    assert labels_packed.tolist() == labels_pad.tolist() == sum(replies, [])
    torch.testing.assert_close(rows_packed, rows_pad, rtol=1e-4, atol=1e-5)
    if mode == "online":
        assert not batch["teacher_attention_mask"].all()
        torch.testing.assert_close(
            online_teacher_rows(model, batch, pack=True),
            online_teacher_rows(model, batch, pack=False),
            rtol=1e-4,
            atol=1e-5,
        )


def test_attention_that_leaks_across_packed_sequences_is_not_packed(tmp_path, monkeypatch):
    """With transformers' packed-sequence detection disabled, a packed row is one causal
    sequence: the probe sees the leak and packing stays off, and forcing it would change the
    reply rows (so the equality test above would fail on such a model)."""
    cfg, rundir, pairs = make_run(tmp_path, "chatml", n=2)
    cfg.targets.mode = "online"
    model = student(cfg)
    batch = collate(cfg, pairs, None)
    args = (model, batch["input_ids"], batch["attention_mask"], batch["shift_labels"])
    with torch.no_grad():
        rows_pad, _ = reply_hidden(*args)
    monkeypatch.setattr(
        "transformers.masking_utils.find_packed_sequence_indices", lambda position_ids: None
    )
    assert not packing_isolates(model)
    assert not should_pack(model, batch["attention_mask"])
    with torch.no_grad():
        rows_leaked, _ = reply_hidden(*args, pack=True)
    assert (rows_leaked - rows_pad).abs().max() > 100 * 1e-5
