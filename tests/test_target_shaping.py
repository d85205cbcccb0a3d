"""What SSB distils beyond the plain KD loss: the target filter (stop-token and wrong-answer mass
taken out of the teacher, the rest renormalised), KD weighted by the teacher's advantage, KD
mixed with CE, and the control that KD to a one-hot teacher is exactly supervised fine-tuning."""

from __future__ import annotations

import math

import pytest
import torch
from pairs_fixture import make_run

from ssb.distill.losses import (
    advantage_weights,
    chunked_kd_loss,
    dense_targets,
    suppress_dense,
    suppress_topk,
    topk_targets,
)
from ssb.stages.base import load_base
from ssb.stages.train import DistillCollator, distillation_loss, student_model

NEG = float("-inf")


def _problem(n=6, h=8, v=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64)
    t_logits = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, t_logits, labels


def _grads(hidden, weight, targets, labels, **kw):
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = chunked_kd_loss(h, w, targets, labels, **kw)
    out.loss_sum.backward()
    return out, h.grad, w.grad


# --------------------------------------------------------------------------- one-hot control


@pytest.mark.parametrize("chunk_size", [2, 64])
def test_kd_to_a_one_hot_teacher_is_sft_exactly(chunk_size):
    """Forward KL to a one-hot teacher at tau 1 is the cross-entropy of its token: same loss,
    same gradients as the CE-only (sft) loss."""
    hidden, weight, _, labels = _problem()
    one_hot = torch.full((len(labels), weight.shape[0]), NEG, dtype=torch.float64)
    one_hot[torch.arange(len(labels)), labels] = 0.0
    kd, kd_h, kd_w = _grads(
        hidden, weight, {"logp": one_hot}, labels, mode="dense", tau=1.0, chunk_size=chunk_size
    )
    sft, sft_h, sft_w = _grads(
        hidden,
        weight,
        None,
        labels,
        mode="dense",
        tau=1.0,
        kd_weight=0.0,
        ce_weight=1.0,
        chunk_size=chunk_size,
    )
    assert kd.loss_sum.item() == pytest.approx(sft.loss_sum.item(), rel=1e-12)
    torch.testing.assert_close(kd_h, sft_h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kd_w, sft_w, rtol=1e-12, atol=1e-12)


def test_kd_to_a_one_hot_teacher_is_sft_through_the_trainer_loss(tmp_path):
    """The same control through the trainer's own loss (`distillation_loss`) on a tiny model:
    dense one-hot targets on the reply tokens give sft's loss and LoRA gradients."""
    cfg, rundir, pairs = make_run(tmp_path, "chatml", "train.loss.temperature=1", n=3)
    tok = load_base(cfg).tokenizer
    batch = DistillCollator(pad_id=tok.pad_token_id, mode="dense", hard_labels=True)(pairs)
    shift = batch["shift_labels"]
    labels = shift[shift != -100]
    vocab = load_base(cfg).model.get_output_embeddings().weight.shape[0]
    one_hot = torch.full((len(labels), vocab), NEG)
    one_hot[torch.arange(len(labels)), labels] = 0.0
    model = student_model(cfg, load_base(cfg).model)
    try:
        with torch.no_grad():  # move lora_B off zero, so the gradients are not trivially equal
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
        results = []
        for loss_cfg, inputs in (
            (cfg.train.loss, {**batch, "teacher_logp": one_hot}),
            (
                type(cfg.train.loss)(
                    **{**vars(cfg.train.loss), "kd_weight": 0.0, "ce_weight": 1.0}
                ),
                batch,
            ),
        ):
            model.zero_grad()
            out = distillation_loss(model, inputs, loss_cfg, "dense")
            out.loss_sum.backward()
            grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
            results.append((out.loss_sum.item(), grads))
        (kd_loss, kd_grads), (ce_loss, ce_grads) = results
        assert kd_loss == pytest.approx(ce_loss, rel=1e-5)
        for a, b in zip(kd_grads, ce_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    finally:
        model.unload()


# --------------------------------------------------------------------------- target filter


def test_suppress_dense_renormalises_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], dtype=torch.float64))
    out = suppress_dense(logp, torch.tensor([[0, -1], [-1, -1]]))
    torch.testing.assert_close(out[0].exp(), torch.tensor([0.0, 0.6, 0.4], dtype=torch.float64))
    torch.testing.assert_close(out[1], logp[1])  # nothing suppressed: unchanged


def test_filtered_kd_equals_kd_against_the_hand_filtered_teacher():
    hidden, weight, t_logits, labels = _problem()
    tau = 2.0
    suppress = torch.full((len(labels), 2), -1)
    suppress[0, 0] = (labels[0] + 1) % weight.shape[0]
    suppress[3, :] = torch.tensor([(labels[3] + 2) % 16, (labels[3] + 5) % 16])
    filtered = dense_targets(t_logits, tau).clone()
    for row in range(len(labels)):
        for tid in suppress[row].tolist():
            if tid >= 0:
                filtered[row, tid] = NEG
    filtered = filtered - torch.logsumexp(filtered, -1, keepdim=True)
    ref, ref_h, _ = _grads(hidden, weight, {"logp": filtered}, labels, mode="dense", tau=tau)
    for mode, targets in (
        ("dense", {"logp": dense_targets(t_logits, tau)}),
        ("topk", dict(zip(("ids", "logp", "tail"), topk_targets(t_logits, 16, tau)))),
    ):
        got, got_h, _ = _grads(
            hidden, weight, targets, labels, mode=mode, tau=tau, suppress=suppress
        )
        assert got.loss_sum.item() == pytest.approx(ref.loss_sum.item(), rel=1e-6), mode
        torch.testing.assert_close(got_h, ref_h, rtol=1e-6, atol=1e-9)
    plain, _, _ = _grads(
        hidden, weight, {"logp": dense_targets(t_logits, tau)}, labels, mode="dense", tau=tau
    )
    assert plain.loss_sum.item() != pytest.approx(ref.loss_sum.item(), rel=1e-3)


def test_suppress_topk_leaves_the_tail():
    ids = torch.tensor([[3, 1]])
    logp = torch.log(torch.tensor([[0.5, 0.3]]))
    out = suppress_topk(ids, logp, torch.tensor([[1, 7]]))  # 7 is in the tail: stays there
    assert out[0, 0] == logp[0, 0] and out[0, 1] == NEG


# --------------------------------------------------------------------------- advantage weights


def test_advantage_weights_by_hand():
    s_logp = torch.log(torch.tensor([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]]))
    labels = torch.tensor([0, 0, 1])
    t_label = torch.log(torch.tensor([0.4, 0.3, 0.5]))
    gate = advantage_weights(s_logp, t_label, labels, "gate")
    weight = advantage_weights(s_logp, t_label, labels, "weight")
    assert gate.tolist() == [1.0, 0.0, 0.0]
    # 1 - p_S/p_T: 1 - 0.2/0.4 = 0.5; teacher worse or equal: 0.
    torch.testing.assert_close(weight, torch.tensor([0.5, 0.0, 0.0]), atol=1e-6, rtol=0)
    assert advantage_weights(s_logp, t_label, labels, "none").tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("how", ["gate", "weight"])
def test_weighted_kd_is_the_weighted_sum_of_per_row_kd(how):
    hidden, weight, t_logits, labels = _problem(n=8)
    tau = 2.0
    targets = {"logp": dense_targets(t_logits, tau)}
    rows = [
        chunked_kd_loss(
            hidden[i : i + 1],
            weight,
            {"logp": targets["logp"][i : i + 1]},
            labels[i : i + 1],
            mode="dense",
            tau=tau,
        ).kd_sum.item()
        for i in range(len(labels))
    ]
    s_logp = torch.log_softmax(hidden @ weight.T / tau, -1)
    t_label = targets["logp"].gather(-1, labels[:, None])[:, 0]
    w = advantage_weights(s_logp, t_label, labels, how)
    assert 0 < w.sum() < len(labels)  # some rows in, some out: the test can tell
    got = chunked_kd_loss(
        hidden, weight, targets, labels, mode="dense", tau=tau, advantage_weighting=how
    )
    assert got.kd_sum.item() == pytest.approx(sum(wi * r for wi, r in zip(w.tolist(), rows)))


def test_kd_mixed_with_ce_is_the_weighted_sum():
    hidden, weight, t_logits, labels = _problem()
    targets = {"logp": dense_targets(t_logits, 2.0)}
    mixed = chunked_kd_loss(
        hidden, weight, targets, labels, mode="dense", tau=2.0, kd_weight=0.5, ce_weight=0.5
    )
    assert mixed.loss_sum.item() == pytest.approx(
        0.5 * mixed.kd_sum.item() + 0.5 * mixed.ce_sum.item()
    )
    assert not math.isclose(mixed.kd_sum.item(), mixed.ce_sum.item())


# --------------------------------------------------------------------------- collator


def test_collator_suppress_rows_follow_the_reply_rows(tmp_path):
    cfg, rundir, pairs = make_run(tmp_path, "chatml", n=2)
    tok = load_base(cfg).tokenizer
    table = {
        p["id"]: [[7] if i == 1 else [] for i in range(len(p["reply_ids"]) + 1)] for p in pairs
    }
    batch = DistillCollator(
        pad_id=tok.pad_token_id,
        mode="dense",
        hard_labels=False,
        suppress=table,
        reader=_FakeReader(pairs),
    )(pairs)
    sup = batch["suppress_ids"]
    rows = int((batch["shift_labels"] != -100).sum())
    assert sup.shape == (rows, 1)
    first = len(pairs[0]["reply_ids"]) + 1
    assert sup[1, 0] == 7 and sup[first + 1, 0] == 7
    assert int((sup >= 0).sum()) == 2


class _FakeReader:
    """Stored targets for the collator: a dense row per reply token (values irrelevant here)."""

    def __init__(self, pairs):
        self.pairs = {p["id"]: p for p in pairs}

    def get(self, pair_id):
        reply = self.pairs[pair_id]["reply_ids"] + [self.pairs[pair_id]["end_token_id"]]
        return reply, {"logp": torch.zeros(len(reply), 4)}
