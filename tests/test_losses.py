"""Tests for ssb.distill.losses: exact values, chunking, target forms, edge cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssb.distill.losses import (
    CHUNK_LOGITS_BYTES,
    chunk_rows,
    chunked_kd_loss,
    dense_targets,
    dense_token_divergence,
    divergence,
    hidden_token_divergence,
    normalise,
    topk_targets,
    topk_token_divergence,
)

torch.set_num_threads(1)

KINDS = ["forward_kl", "reverse_kl", "jsd"]


# --------------------------------------------------------------------------- helpers


def _softmax(xs: list[float], tau: float) -> list[float]:
    top = max(xs)
    e = [math.exp((x - top) / tau) for x in xs]
    z = sum(e)
    return [v / z for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def _jsd(p_t: list[float], p_s: list[float], beta: float) -> float:
    m = [beta * a + (1 - beta) * b for a, b in zip(p_t, p_s)]
    return beta * _kl(p_t, m) + (1 - beta) * _kl(p_s, m)


def _problem(n=10, h=12, v=64, seed=0, scale=3.0):
    """Student hidden/lm_head (leaf tensors) and teacher logits with some structure."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) / math.sqrt(h) * scale
    teacher_hidden = hidden + 0.5 * torch.randn(n, h, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, teacher_hidden, labels


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def _targets(mode, teacher_logits, tau, k=None, teacher_hidden=None):
    if mode == "dense":
        return {"logp": dense_targets(teacher_logits, tau)}
    if mode == "topk":
        ids, logp, tail = topk_targets(teacher_logits, k or teacher_logits.shape[-1], tau)
        return {"ids": ids, "logp": logp, "tail": tail}
    return {"hidden": teacher_hidden}


def _loss_and_grads(hidden, weight, targets, labels=None, **kw):
    h, w = _leaves(hidden, weight)
    out = chunked_kd_loss(h, w, targets, labels, **kw)
    out.loss_sum.backward()
    return out, h.grad, w.grad


# --------------------------------------------------------------------------- exact values

S_LOGITS = [[1.0, 2.0, 0.0, -1.0], [0.5, 0.5, 3.0, -2.0]]
T_LOGITS = [[2.0, 0.0, 1.0, -1.0], [1.0, 0.0, 2.0, 0.0]]


@pytest.mark.parametrize(
    "kind,beta,literal",
    [
        ("forward_kl", 0.5, 1.279675529020203),
        ("reverse_kl", 0.5, 1.332489693146581),
        ("jsd", 0.5, 0.3165861516118042),
        ("jsd", 0.3, 0.26508045276538283),
    ],
)
def test_hand_computed_two_positions(kind, beta, literal):
    tau = 2.0
    expected = 0.0
    for s, t in zip(S_LOGITS, T_LOGITS):
        p_s, p_t = _softmax(s, tau), _softmax(t, tau)
        if kind == "forward_kl":
            expected += _kl(p_t, p_s)
        elif kind == "reverse_kl":
            expected += _kl(p_s, p_t)
        else:
            expected += _jsd(p_t, p_s, beta)
    expected *= tau**2
    assert expected == pytest.approx(literal, rel=1e-12)

    # Identity lm_head: the student's logits are its "hidden states".
    hidden = torch.tensor(S_LOGITS, dtype=torch.float64)
    eye = torch.eye(4, dtype=torch.float64)
    teacher_logp = dense_targets(torch.tensor(T_LOGITS, dtype=torch.float64), tau)
    out = chunked_kd_loss(
        hidden, eye, {"logp": teacher_logp}, mode="dense", tau=tau, kind=kind, beta=beta
    )
    assert out.loss_sum.item() == pytest.approx(expected, rel=1e-12)
    assert out.kd_sum.item() == pytest.approx(expected, rel=1e-12)
    assert out.num_tokens == 2
    # Same without the tau^2 factor.
    out1 = chunked_kd_loss(
        hidden,
        eye,
        {"logp": teacher_logp},
        mode="dense",
        tau=tau,
        kind=kind,
        beta=beta,
        tau_squared=False,
    )
    assert out1.loss_sum.item() == pytest.approx(expected / tau**2, rel=1e-12)
    # float32 inputs: same value to float32 precision.
    out32 = chunked_kd_loss(
        hidden.float(),
        eye.float(),
        {"logp": teacher_logp.float()},
        mode="dense",
        tau=tau,
        kind=kind,
        beta=beta,
    )
    assert out32.loss_sum.dtype == torch.float32
    assert out32.loss_sum.item() == pytest.approx(expected, rel=1e-5)


def test_forward_kl_matches_reference_kl_div():
    hidden, weight, teacher_hidden, _ = _problem(n=9, v=300)
    tau = 2.0
    t_logits = teacher_hidden @ weight.T
    s_logits = hidden @ weight.T
    ref = (
        F.kl_div(
            torch.log_softmax(s_logits / tau, -1),
            torch.softmax(t_logits / tau, -1),
            reduction="sum",
        )
        * tau**2
    )
    out = chunked_kd_loss(
        hidden, weight, {"logp": dense_targets(t_logits, tau)}, mode="dense", tau=tau, chunk_size=4
    )
    torch.testing.assert_close(out.loss_sum, ref, rtol=1e-5, atol=1e-6)


def test_jsd_edges_and_bounds():
    g = torch.Generator().manual_seed(1)
    s = torch.log_softmax(torch.randn(5, 40, generator=g, dtype=torch.float64), -1)
    t = torch.log_softmax(torch.randn(5, 40, generator=g, dtype=torch.float64), -1)
    fwd = divergence(s, t, "forward_kl")
    rev = divergence(s, t, "reverse_kl")
    assert fwd.dtype == torch.float64  # float64 is kept, only lower precisions are upcast
    torch.testing.assert_close(divergence(s, t, "jsd", beta=0.0), fwd)
    torch.testing.assert_close(divergence(s, t, "jsd", beta=1.0), rev)
    # Near the ends JSD_beta / beta -> forward KL; JSD_beta / (1 - beta) -> reverse KL.
    eps = 1e-6
    torch.testing.assert_close(divergence(s, t, "jsd", beta=eps) / eps, fwd, rtol=1e-3, atol=0)
    torch.testing.assert_close(divergence(s, t, "jsd", beta=1 - eps) / eps, rev, rtol=1e-3, atol=0)
    sym = divergence(s, t, "jsd", beta=0.5)
    assert (sym >= 0).all() and (sym <= math.log(2) + 1e-6).all()
    torch.testing.assert_close(sym, divergence(t, s, "jsd", beta=0.5))
    assert torch.all(divergence(s, s, "jsd", beta=0.3).abs() < 1e-6)
    with pytest.raises(ValueError):
        divergence(s, t, "jsd", beta=1.5)
    with pytest.raises(ValueError):
        divergence(s, t, "tvd")


# --------------------------------------------------------------------------- chunking


@pytest.mark.parametrize("mode", ["dense", "topk", "hidden"])
@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_unchunked(mode, kind):
    hidden, weight, teacher_hidden, labels = _problem(n=10, v=64)
    tau = 1.5
    targets = _targets(mode, teacher_hidden @ weight.T, tau, k=8, teacher_hidden=teacher_hidden)
    kw = dict(mode=mode, tau=tau, kind=kind, beta=0.3, ce_weight=0.25)
    ref, ref_gh, ref_gw = _loss_and_grads(hidden, weight, targets, labels, chunk_size=10, **kw)
    assert ref.loss_sum.item() > 0
    for chunk in (1, 3, 4, 7, 1000):
        out, gh, gw = _loss_and_grads(hidden, weight, targets, labels, chunk_size=chunk, **kw)
        torch.testing.assert_close(out.loss_sum, ref.loss_sum, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.kd_sum, ref.kd_sum, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.ce_sum, ref.ce_sum, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gh, ref_gh, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(gw, ref_gw, rtol=1e-4, atol=1e-6)


def test_chunked_matches_direct_autograd():
    """The checkpointed driver gives the gradients of the plain per-row formula."""
    hidden, weight, teacher_hidden, labels = _problem(n=7, v=50)
    tau = 2.0
    t_logp = dense_targets(teacher_hidden @ weight.T, tau)
    h, w = _leaves(hidden, weight)
    direct = dense_token_divergence(h @ w.T, t_logp, tau).sum() * tau**2 + 0.5 * F.cross_entropy(
        h @ w.T, labels, reduction="sum"
    )
    direct.backward()
    out, gh, gw = _loss_and_grads(
        hidden, weight, {"logp": t_logp}, labels, mode="dense", tau=tau, ce_weight=0.5, chunk_size=3
    )
    torch.testing.assert_close(out.loss_sum, direct.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh, h.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, w.grad, rtol=1e-4, atol=1e-6)


def test_full_vocab_chunks_never_save_logits():
    """At V=151936 nothing of shape (rows, V) is kept for backward outside a chunk."""
    vocab, n, h_size = 151936, 6, 8
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h_size, generator=g, requires_grad=True)
    weight = (torch.randn(vocab, h_size, generator=g) * 0.5).requires_grad_(True)
    ids, logp, tail = topk_targets(torch.randn(n, h_size, generator=g) @ weight.detach().T, 64, 2.0)
    targets = {"ids": ids, "logp": logp, "tail": tail}
    saved: list[tuple[int, ...]] = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = chunked_kd_loss(hidden, weight, targets, mode="topk", tau=2.0, chunk_size=4)
    assert not [s for s in saved if len(s) >= 2 and s[-1] == vocab], saved
    out.loss_sum.backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
    # Unchunked reference value.
    s_logits = hidden.detach() @ weight.detach().T
    ref = topk_token_divergence(s_logits, ids, logp, tail, 2.0).sum() * 4
    torch.testing.assert_close(out.loss_sum.detach(), ref, rtol=1e-5, atol=1e-5)


def _saved_vocab_wide(vocab: int, **kw) -> int:
    """How many (rows, V) tensors one unchunked loss call keeps for its backward."""
    hidden, weight, teacher_hidden, labels = _problem(n=6, h=8, v=vocab)
    h, w = _leaves(hidden, weight)
    saved: list[tuple[int, ...]] = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    targets = _targets("hidden", None, 2.0, teacher_hidden=teacher_hidden)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = chunked_kd_loss(h, w, targets, labels, mode="hidden", tau=2.0, chunk_size=64, **kw)
    out.loss_sum.backward()
    return sum(1 for shape in saved if len(shape) == 2 and shape[-1] == vocab)


def test_a_term_of_weight_zero_keeps_nothing_for_backward():
    """CE at weight 0 (SSB's default: reported only) and KD at weight 0 (sft) build no graph: their
    vocabulary-wide backward would be multiplied by 0 yet held at the loss's peak."""
    vocab = 96
    kd_only = _saved_vocab_wide(vocab)  # labels given, ce_weight 0
    both = _saved_vocab_wide(vocab, ce_weight=1.0)
    ce_only = _saved_vocab_wide(vocab, kd_weight=0.0, ce_weight=1.0)
    assert 0 < kd_only < both and 0 < ce_only < both


def test_weight_zero_terms_are_still_reported():
    hidden, weight, teacher_hidden, labels = _problem()
    targets = _targets("hidden", None, 2.0, teacher_hidden=teacher_hidden)
    h, w = _leaves(hidden, weight)
    kd_only = chunked_kd_loss(h, w, targets, labels, mode="hidden", tau=2.0, chunk_size=3)
    ce_only = chunked_kd_loss(
        h, w, targets, labels, mode="hidden", tau=2.0, kd_weight=0.0, ce_weight=1.0, chunk_size=3
    )
    s_logits = hidden @ weight.T
    torch.testing.assert_close(kd_only.ce_sum, F.cross_entropy(s_logits, labels, reduction="sum"))
    torch.testing.assert_close(ce_only.kd_sum, kd_only.kd_sum)
    torch.testing.assert_close(ce_only.loss_sum.detach(), ce_only.ce_sum)


def test_chunk_rows_from_the_vocabulary():
    assert chunk_rows(151936) == 96  # Qwen2.5
    assert chunk_rows(262144) == 64  # Gemma 3
    assert chunk_rows(10**9) == 16  # never fewer
    assert chunk_rows(262144, 7) == 7  # an explicit size wins
    # A small step is one chunk (no recomputation); a large one is chunked.
    assert chunk_rows(262144, None, 192) == 192  # a CPU quickstart batch
    assert chunk_rows(151936, None, 2048) == 96
    for vocab in (4096, 151936, 262144):
        rows = chunk_rows(vocab)
        assert rows % 16 == 0 and rows * vocab * 4 <= CHUNK_LOGITS_BYTES


# --------------------------------------------------------------------------- target forms


@pytest.mark.parametrize("kind", KINDS)
def test_topk_with_k_equal_v_equals_dense(kind):
    hidden, weight, teacher_hidden, _ = _problem(n=6, v=40)
    tau = 2.0
    t_logits = teacher_hidden @ weight.T
    kw = dict(tau=tau, kind=kind, beta=0.4, chunk_size=4)
    dense, dgh, dgw = _loss_and_grads(
        hidden, weight, _targets("dense", t_logits, tau), **kw, mode="dense"
    )
    topk_t = _targets("topk", t_logits, tau, k=40)
    assert torch.isneginf(topk_t["tail"]).all()
    topk, tgh, tgw = _loss_and_grads(hidden, weight, topk_t, **kw, mode="topk")
    torch.testing.assert_close(topk.loss_sum, dense.loss_sum, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tgh, dgh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(tgw, dgw, rtol=1e-4, atol=1e-6)


def test_topk_small_k_approximates_dense_and_tail_matters():
    g = torch.Generator().manual_seed(3)
    n, v, tau = 8, 300, 1.0
    # Peaked teacher: a few large logits; student a perturbed copy.
    t_logits = torch.randn(n, v, generator=g)
    t_logits[:, :5] += 8.0
    s_logits = t_logits + 0.7 * torch.randn(n, v, generator=g)
    dense = dense_token_divergence(s_logits, dense_targets(t_logits, tau), tau).sum()
    ids, logp, tail = topk_targets(t_logits, 32, tau)
    approx = topk_token_divergence(s_logits, ids, logp, tail, tau).sum()
    assert abs(approx - dense) / dense < 0.1
    assert approx <= dense + 1e-6  # bucketing never increases KL (data processing inequality)
    # Dropping the tail bucket (renormalised top-k only) gives a different value.
    no_tail = topk_token_divergence(
        s_logits, ids, logp, torch.full_like(tail, -math.inf), tau
    ).sum()
    assert abs(no_tail - approx) / approx > 0.05
    # The stored tail really is the remaining mass.
    total = torch.logsumexp(torch.cat([logp, tail[:, None]], -1), -1)
    torch.testing.assert_close(total, torch.zeros(n), atol=1e-5, rtol=0)


def test_topk_targets_shapes_and_order():
    t_logits = torch.randn(3, 20)
    ids, logp, tail = topk_targets(t_logits, 5, 2.0)
    assert ids.shape == (3, 5) and logp.shape == (3, 5) and tail.shape == (3,)
    assert (logp[:, :-1] >= logp[:, 1:]).all()
    torch.testing.assert_close(logp, dense_targets(t_logits, 2.0).gather(-1, ids))
    with pytest.raises(ValueError):
        topk_targets(t_logits, 21, 2.0)


def test_topk_float16_stored_logp_is_close():
    """Log-probs rounded to float16 (the store's dtype) barely move the loss."""
    hidden, weight, teacher_hidden, _ = _problem(n=8, v=200)
    ids, logp, tail = topk_targets(teacher_hidden @ weight.T, 16, 2.0)
    s_logits = hidden @ weight.T
    exact = topk_token_divergence(s_logits, ids, logp, tail, 2.0)
    rounded = topk_token_divergence(s_logits, ids.int(), logp.half(), tail, 2.0)
    torch.testing.assert_close(rounded, exact, rtol=1e-2, atol=2e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_hidden_equals_dense(kind):
    hidden, weight, teacher_hidden, _ = _problem(n=9, v=70)
    tau = 2.0
    kw = dict(tau=tau, kind=kind, beta=0.5, chunk_size=4)
    dense, dgh, dgw = _loss_and_grads(
        hidden, weight, _targets("dense", teacher_hidden @ weight.T, tau), mode="dense", **kw
    )
    hid, hgh, hgw = _loss_and_grads(hidden, weight, {"hidden": teacher_hidden}, mode="hidden", **kw)
    torch.testing.assert_close(hid.loss_sum, dense.loss_sum, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hgh, dgh, rtol=1e-4, atol=1e-6)
    # The teacher side uses a detached lm_head: only the student path reaches the weight.
    torch.testing.assert_close(hgw, dgw, rtol=1e-4, atol=1e-6)


def test_softcap_path():
    hidden, weight, teacher_hidden, labels = _problem(n=6, v=50, scale=30.0)
    tau, cap = 2.0, 5.0
    t_logits = cap * torch.tanh((teacher_hidden @ weight.T) / cap)
    kw = dict(tau=tau, chunk_size=4, logit_softcap=cap, ce_weight=1.0)
    dense, dgh, _ = _loss_and_grads(
        hidden, weight, {"logp": dense_targets(t_logits, tau)}, labels, mode="dense", **kw
    )
    hid, hgh, _ = _loss_and_grads(
        hidden, weight, {"hidden": teacher_hidden}, labels, mode="hidden", **kw
    )
    torch.testing.assert_close(hid.loss_sum, dense.loss_sum, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hgh, dgh, rtol=1e-4, atol=1e-6)
    # Student soft-capping is applied too: compare against the explicit formula.
    s_logits = cap * torch.tanh((hidden @ weight.T) / cap)
    ref = dense_token_divergence(s_logits, dense_targets(t_logits, tau), tau).sum() * tau**2
    ref = ref + F.cross_entropy(s_logits, labels, reduction="sum")
    torch.testing.assert_close(dense.loss_sum, ref, rtol=1e-5, atol=1e-5)
    # And it changes the value compared with no cap.
    nocap = chunked_kd_loss(
        hidden, weight, {"hidden": teacher_hidden}, labels, mode="hidden", tau=tau, ce_weight=1.0
    )
    assert abs(nocap.loss_sum.item() - hid.loss_sum.item()) > 1e-2


def test_hidden_token_divergence_direct():
    hidden, weight, teacher_hidden, _ = _problem(n=4, v=30)
    s_logits = hidden @ weight.T
    a = hidden_token_divergence(s_logits, teacher_hidden, weight, 1.3, "reverse_kl")
    b = dense_token_divergence(
        s_logits, dense_targets(teacher_hidden @ weight.T, 1.3), 1.3, "reverse_kl"
    )
    torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- CE, clipping


def test_ce_only_equals_cross_entropy():
    hidden, weight, teacher_hidden, labels = _problem(n=11, v=90)
    targets = {"hidden": teacher_hidden}
    out, gh, _ = _loss_and_grads(
        hidden,
        weight,
        targets,
        labels,
        mode="hidden",
        tau=2.0,
        kd_weight=0.0,
        ce_weight=1.0,
        chunk_size=4,
    )
    h = hidden.clone().requires_grad_(True)
    ref = F.cross_entropy(h @ weight.T, labels, reduction="sum")
    ref.backward()
    torch.testing.assert_close(out.loss_sum, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.ce_sum, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh, h.grad, rtol=1e-4, atol=1e-6)
    assert out.kd_sum > 0  # still reported for logging
    with pytest.raises(ValueError, match="labels"):
        chunked_kd_loss(hidden, weight, targets, mode="hidden", tau=2.0, ce_weight=1.0)


def test_clip_caps_per_token_values():
    hidden, weight, teacher_hidden, _ = _problem(n=12, v=60, scale=6.0)
    targets = {"hidden": teacher_hidden}
    s_logits = hidden @ weight.T
    per_row = hidden_token_divergence(s_logits, teacher_hidden, weight, 2.0) * 4
    clip = float(per_row.median())
    out, gh, _ = _loss_and_grads(
        hidden, weight, targets, mode="hidden", tau=2.0, clip=clip, chunk_size=5
    )
    torch.testing.assert_close(out.loss_sum, per_row.clamp(max=clip).sum(), rtol=1e-5, atol=1e-6)
    clipped = per_row > clip
    assert clipped.any() and (~clipped).any()
    assert (gh[clipped] == 0).all()
    assert (gh[~clipped].abs().sum(-1) > 0).all()


# --------------------------------------------------------------------------- robustness


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_gradients_finite_with_neg_inf_teacher_entries(kind):
    hidden, weight, teacher_hidden, _ = _problem(n=5, v=30)
    t_logp = dense_targets(teacher_hidden @ weight.T, 2.0)
    t_logp[:, ::3] = -math.inf  # zero-mass tokens
    t_logp = t_logp - torch.logsumexp(t_logp, -1, keepdim=True)
    out, gh, gw = _loss_and_grads(
        hidden, weight, {"logp": t_logp}, mode="dense", tau=2.0, kind=kind, beta=0.5
    )
    assert torch.isfinite(out.loss_sum) and torch.isfinite(gh).all() and torch.isfinite(gw).all()
    # Python check of the value with zero entries skipped (0 log 0 = 0).
    s_logp = torch.log_softmax(hidden @ weight.T / 2.0, -1)
    ref = 0.0
    for i in range(5):
        p_t = [math.exp(x) for x in t_logp[i].tolist()]
        p_s = [math.exp(x) for x in s_logp[i].tolist()]
        ref += _kl(p_t, p_s) if kind == "forward_kl" else _jsd(p_t, p_s, 0.5)
    assert out.loss_sum.item() == pytest.approx(ref * 4, rel=1e-4)
    # Reverse KL to a teacher with zero-mass tokens the student likes is truly infinite, not NaN.
    rev = chunked_kd_loss(
        hidden, weight, {"logp": t_logp}, mode="dense", tau=2.0, kind="reverse_kl"
    )
    assert torch.isposinf(rev.loss_sum)


@pytest.mark.parametrize("kind", KINDS)
def test_topk_neg_inf_tail_gradients_finite(kind):
    hidden, weight, teacher_hidden, _ = _problem(n=5, v=16)
    targets = _targets("topk", teacher_hidden @ weight.T, 2.0, k=16)
    out, gh, gw = _loss_and_grads(hidden, weight, targets, mode="topk", tau=2.0, kind=kind)
    assert torch.isfinite(out.loss_sum) and torch.isfinite(gh).all() and torch.isfinite(gw).all()


@pytest.mark.parametrize("mode", ["dense", "topk", "hidden"])
def test_bf16_inputs(mode):
    hidden, weight, teacher_hidden, labels = _problem(n=8, v=64)
    tau = 2.0
    targets32 = _targets(mode, teacher_hidden @ weight.T, tau, k=16, teacher_hidden=teacher_hidden)
    ref = chunked_kd_loss(hidden, weight, targets32, labels, mode=mode, tau=tau, ce_weight=0.5)
    targets16 = {
        k: (v.bfloat16() if v.is_floating_point() and k != "tail" else v)
        for k, v in targets32.items()
    }
    h, w = _leaves(hidden.bfloat16(), weight.bfloat16())
    out = chunked_kd_loss(h, w, targets16, labels, mode=mode, tau=tau, ce_weight=0.5, chunk_size=3)
    assert out.loss_sum.dtype == torch.float32
    out.loss_sum.backward()
    assert h.grad.dtype == torch.bfloat16 and torch.isfinite(h.grad.float()).all()
    assert torch.isfinite(w.grad.float()).all()
    assert out.loss_sum.item() == pytest.approx(ref.loss_sum.item(), rel=0.05)


def test_empty_batch_is_zero_and_differentiable():
    h = torch.zeros(0, 4, requires_grad=True)
    w = torch.randn(10, 4, requires_grad=True)
    out = chunked_kd_loss(h, w, {"logp": torch.zeros(0, 10)}, mode="dense", tau=1.0)
    out.loss_sum.backward()
    assert out.loss_sum.item() == 0 and out.num_tokens == 0
    assert (w.grad == 0).all()


def test_bad_arguments():
    hidden, weight, teacher_hidden, _ = _problem(n=4, v=20)
    with pytest.raises(ValueError, match="mode"):
        chunked_kd_loss(hidden, weight, {}, mode="online", tau=1.0)
    with pytest.raises(ValueError, match="missing"):
        chunked_kd_loss(hidden, weight, {"ids": torch.zeros(4, 2)}, mode="topk", tau=1.0)
    with pytest.raises(ValueError, match="rows"):
        chunked_kd_loss(hidden, weight, {"hidden": teacher_hidden[:3]}, mode="hidden", tau=1.0)


# --------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("split", [(7,), (3, 4), (1, 6), (2, 2, 3)])
def test_normalisation_independent_of_split(split):
    hidden, weight, teacher_hidden, labels = _problem(n=7, v=40)
    kw = dict(mode="hidden", tau=2.0, ce_weight=0.3, chunk_size=2)
    full = chunked_kd_loss(hidden, weight, {"hidden": teacher_hidden}, labels, **kw)
    full_mean = full.loss_sum / 7
    h, w = _leaves(hidden, weight)
    total, start = torch.zeros(()), 0
    for size in split:
        rows = slice(start, start + size)
        part = chunked_kd_loss(h[rows], w, {"hidden": teacher_hidden[rows]}, labels[rows], **kw)
        step = normalise(part.loss_sum, 7)
        step.backward()
        total = total + step.detach()
        start += size
    torch.testing.assert_close(total, full_mean.detach(), rtol=1e-5, atol=1e-6)
    # Gradients accumulated over micro-batches equal the full-batch mean's gradients.
    h2, w2 = _leaves(hidden, weight)
    (chunked_kd_loss(h2, w2, {"hidden": teacher_hidden}, labels, **kw).loss_sum / 7).backward()
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-4, atol=1e-7)


def test_normalise_world_size_and_tensor_count():
    loss = torch.tensor(12.0)
    assert normalise(loss, 4).item() == 3.0
    assert normalise(loss, torch.tensor(4), world_size=2).item() == 6.0
    assert normalise(loss, 0).item() == 12.0  # an empty step does not divide by zero
