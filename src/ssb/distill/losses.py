"""Distillation losses on flattened reply positions (pure functions: no trainer, no I/O).

Conventions used throughout this module:

* ``N`` rows are the positions whose next token is a reply token, flattened across a batch
  (prompt and padding positions are never passed in). ``V`` is the vocabulary size, ``H`` the
  hidden size, ``k`` the number of stored teacher top-k entries.
* At temperature ``tau`` the teacher distribution is ``p_T = softmax(z_T / tau)`` and the
  student's ``p_S = softmax(z_S / tau)``.
* All softmax / log / exp arithmetic is done in float32, whatever the input dtype (bf16 logits or
  hidden states are upcast first; float16 stored log-probs likewise). float64 inputs stay
  float64 (tests use it for exact comparisons).
* Per-row functions return a float32 tensor of shape ``(N,)`` (float64 for float64 inputs). The
  chunked driver returns SUMS over rows; dividing by the number of reply tokens in the whole
  optimizer step is the trainer's job (see :func:`normalise`).

Teacher target forms (DESIGN section 3), all compared at the same temperature ``tau``:

* ``dense``: full teacher log-probs at ``tau``, ``(N, V)``.
* ``topk``: the teacher's k most likely ids, their log-probs at ``tau``, and the log of the
  remaining ("tail") mass; both distributions are compared on k + 1 buckets.
* ``hidden``: the teacher's final (post-norm) hidden state; logits are recomputed with the frozen
  lm_head, so the comparison is exact over the full vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ssb.target_modes import STORED_MODES, TARGET_MODES

__all__ = [
    "ADVANTAGE_WEIGHTINGS",
    "DIVERGENCES",
    "MODES",
    "TARGET_KEYS",
    "KDLossOutput",
    "chunk_rows",
    "chunked_kd_loss",
    "dense_targets",
    "dense_token_divergence",
    "divergence",
    "hidden_token_divergence",
    "normalise",
    "project_logits",
    "topk_targets",
    "topk_token_divergence",
]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
ADVANTAGE_WEIGHTINGS = ("none", "gate", "weight")
MODES = STORED_MODES
# The keys of the `targets` mapping each mode expects (the same names the target store uses).
TARGET_KEYS: dict[str, tuple[str, ...]] = {m: tuple(TARGET_MODES[m].tensors) for m in MODES}

_NEG_INF = float("-inf")


# --------------------------------------------------------------------------- helpers


def _upcast(x: Tensor) -> Tensor:
    """At least float32 (bf16/fp16 -> fp32; float64 stays float64, which tests use)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_kind(kind: str, beta: float) -> None:
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; expected one of {', '.join(DIVERGENCES)}")
    if kind == "jsd" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) per row from log-probs (last dim = support), with 0 * log 0 = 0.

    Entries where p is zero (log p = -inf, or exp underflows to 0) contribute exactly 0 and get a
    zero gradient. The logs are replaced by 0 at those entries *before* the subtraction: with a
    plain ``where`` afterwards, ``-inf - -inf = nan`` would still leak NaN into the backward pass.
    Where p > 0 but q = 0 the result is +inf, which is the true value.
    """
    p = logp.exp()
    live = p > 0
    logp_safe = torch.where(live, logp, 0.0)
    logq_safe = torch.where(live, logq, 0.0)
    return (torch.where(live, p, 0.0) * (logp_safe - logq_safe)).sum(-1)


def _safe_logsumexp(x: Tensor, dim: int = -1) -> Tensor:
    """``logsumexp`` that returns -inf for all -inf slices with a zero (not NaN) gradient.

    torch's logsumexp backward is ``grad * exp(x - out)``, which is ``0 * exp(nan) = nan`` when the
    whole slice is -inf; fill such slices with zeros first and put -inf back afterwards.
    """
    dead = torch.isneginf(x).all(dim=dim, keepdim=True)
    out = torch.logsumexp(torch.where(dead, 0.0, x), dim=dim, keepdim=True)
    return torch.where(dead, _NEG_INF, out).squeeze(dim)


def _safe_logaddexp(a: Tensor, b: Tensor) -> Tensor:
    """Elementwise ``log(exp(a) + exp(b))`` with a finite gradient where both are -inf."""
    dead = torch.isneginf(a) & torch.isneginf(b)
    out = torch.logaddexp(torch.where(dead, 0.0, a), torch.where(dead, 0.0, b))
    return torch.where(dead, _NEG_INF, out)


def suppress_dense(teacher_logp: Tensor, suppress: Tensor) -> Tensor:
    """Teacher log-probs ``(N, V)`` with the ids in ``suppress`` ``(N, m)`` (-1 = none) given
    zero mass and the rest renormalised (``train.loss.target_filter``). A row whose every
    entry would vanish keeps its distribution (the label is never suppressed, so this only
    guards against underflow)."""
    rows, cols = torch.nonzero(suppress >= 0, as_tuple=True)
    if rows.numel() == 0:
        return teacher_logp
    ids = suppress[rows, cols].long()
    cut = teacher_logp.index_put((rows, ids), teacher_logp.new_tensor(_NEG_INF))
    norm = _safe_logsumexp(cut, dim=-1).unsqueeze(-1)
    return torch.where(torch.isneginf(norm), teacher_logp, cut - norm)


def suppress_topk(teacher_ids: Tensor, teacher_logp: Tensor, suppress: Tensor) -> Tensor:
    """The top-k form of :func:`suppress_dense`: suppressed ids among the stored top k get zero
    mass (the k + 1 buckets are renormalised by the divergence); one in the tail stays there,
    since the tail is stored as one bucket."""
    hit = (teacher_ids.long()[:, :, None] == suppress.long()[:, None, :]) & (suppress >= 0)[:, None]
    return teacher_logp.masked_fill(hit.any(-1), _NEG_INF)


def advantage_weights(
    student_logp: Tensor, teacher_logp_of_label: Tensor, labels: Tensor, how: str
) -> Tensor:
    """Per-row KD weights from the teacher's advantage on the reply token at the KD temperature,
    ``a = log p_T(y) - log p_S(y)`` (detached: a weight, not a target). ``gate``: 1 where
    a > 0, else 0. ``weight``: ``1 - p_S(y) / p_T(y)`` clipped to [0, 1], i.e. the share of the
    teacher's probability of the token the student lacks. ``none``: all 1."""
    if how == "none":
        return torch.ones_like(teacher_logp_of_label)
    adv = (teacher_logp_of_label - student_logp.gather(-1, labels.long()[:, None])[:, 0]).detach()
    if how == "gate":
        return (adv > 0).to(adv.dtype)
    if how == "weight":
        return (1.0 - torch.exp(-adv.clamp(min=0.0))).nan_to_num(nan=0.0)
    raise ValueError(f"unknown advantage weighting {how!r}; expected one of {ADVANTAGE_WEIGHTINGS}")


# --------------------------------------------------------------------------- divergences


def divergence(
    student_logp: Tensor, teacher_logp: Tensor, kind: str = "forward_kl", beta: float = 0.5
) -> Tensor:
    """Per-row divergence between two distributions given as log-probs over the same support.

    Args:
        student_logp: ``(N, S)`` student log-probs ``log p_S`` (any float dtype; upcast to fp32).
        teacher_logp: ``(N, S)`` teacher log-probs ``log p_T``; may contain -inf (zero mass).
        kind: ``forward_kl`` = KL(p_T || p_S) = sum p_T (log p_T - log p_S) (the SSB paper's and the
            reference's loss; mass-covering); ``reverse_kl`` = KL(p_S || p_T) (mode-seeking);
            ``jsd`` = generalised Jensen-Shannon divergence, see below.
        beta: JSD mixing weight (TRL ``GKDTrainer`` convention). With the mixture
            ``m = beta * p_T + (1 - beta) * p_S`` (computed in log space with logaddexp),
            ``JSD_beta = beta * KL(p_T || m) + (1 - beta) * KL(p_S || m)``, which lies in
            ``[0, H(beta)]`` nats; beta = 0.5 is the symmetric JSD (at most ln 2).
            Edge semantics: the formula itself is identically 0 at beta = 0 and beta = 1, which
            would silently train nothing, so (like TRL and Liger) **beta = 0 returns forward KL and
            beta = 1 returns reverse KL**. These are the limits of ``JSD_beta / beta`` as
            beta -> 0 and ``JSD_beta / (1 - beta)`` as beta -> 1, so the value jumps at the ends:
            beta = 1e-6 gives about 1e-6 * KL(p_T || p_S), beta = 0 gives KL(p_T || p_S).

    Returns:
        ``(N,)`` float32, in nats. Zero-probability entries follow 0 * log 0 = 0 and never produce
        NaN values or gradients. A support mismatch that makes the divergence infinite (e.g.
        reverse KL where the teacher gives a token the student likes exactly zero mass) returns
        +inf, which is the true value; top-k targets avoid it through their tail bucket.
    """
    _check_kind(kind, beta)
    s = _upcast(student_logp)
    t = _upcast(teacher_logp)
    if s.shape != t.shape:
        raise ValueError(f"student and teacher log-probs differ in shape: {s.shape} vs {t.shape}")
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return _kl(t, s)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _kl(s, t)
    log_m = _safe_logaddexp(t + math.log(beta), s + math.log1p(-beta))
    return beta * _kl(t, log_m) + (1.0 - beta) * _kl(s, log_m)


def project_logits(
    hidden: Tensor,
    lm_head_weight: Tensor,
    lm_head_bias: Tensor | None = None,
    logit_softcap: float | None = None,
) -> Tensor:
    """Logits ``hidden @ W.T (+ b)`` upcast to float32, with optional final soft-capping.

    Args:
        hidden: ``(N, H)`` final (post-norm) hidden states.
        lm_head_weight: ``(V, H)``.
        lm_head_bias: optional ``(V,)``.
        logit_softcap: ``cap`` for ``cap * tanh(z / cap)`` (Gemma 2's ``final_logit_softcapping``);
            None = off.

    Returns:
        ``(N, V)`` float32 logits.

    The matmul runs in the weight's dtype (hidden states are cast to it) and only its output is
    upcast, exactly as the model's own lm_head computes logits. So a bf16 model's logits here are
    the logits its forward pass produces (on GPU bf16 matmuls accumulate in fp32 anyway), and no
    float32 copy of the ``(V, H)`` weight (1.2 GB for Qwen2.5-3B) is made per chunk. On a 2-core
    CPU, 128 rows x the 262k x 640 bf16 Gemma 3 head take 0.33 s this way and 2.1 s with a
    float32 copy.
    """
    logits = _upcast(F.linear(hidden.to(lm_head_weight.dtype), lm_head_weight, lm_head_bias))
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    return logits


# --------------------------------------------------------------------------- target forms


def dense_token_divergence(
    student_logits: Tensor,
    teacher_logp: Tensor,
    tau: float,
    kind: str = "forward_kl",
    beta: float = 0.5,
) -> Tensor:
    """Per-row divergence against full teacher log-probs.

    Args:
        student_logits: ``(N, V)`` raw student logits (temperature 1).
        teacher_logp: ``(N, V)`` teacher log-probs already at temperature ``tau``.
        tau: temperature applied to the student logits.

    Returns:
        ``(N,)`` float32.
    """
    s_logp = torch.log_softmax(_upcast(student_logits) / tau, dim=-1)
    return divergence(s_logp, teacher_logp, kind, beta)


def topk_token_divergence(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logp: Tensor,
    teacher_tail_logp: Tensor,
    tau: float,
    kind: str = "forward_kl",
    beta: float = 0.5,
) -> Tensor:
    """Per-row divergence on k + 1 buckets: the teacher's top-k ids plus one tail bucket.

    Args:
        student_logits: ``(N, V)`` raw student logits (temperature 1).
        teacher_ids: ``(N, k)`` integer token ids (int32 or int64); distinct within a row.
        teacher_logp: ``(N, k)`` teacher log-probs of those ids, already at temperature ``tau``
            (the store records ``tau``; they are not rescaled here).
        teacher_tail_logp: ``(N,)`` log of the teacher's remaining mass at ``tau`` (-inf when
            k == V, or to drop the tail).
        tau: temperature applied to the student logits.

    Returns:
        ``(N,)`` float32.

    The student's tail log-mass is the logsumexp of its log-probs over the ids not in the row's
    top-k (those ids masked with -inf via scatter), not ``log(1 - sum)``, which cancels
    catastrophically when the top-k holds almost all the mass. The teacher's k + 1 buckets are
    renormalised to sum to one, which only removes the rounding drift of low-precision stored
    log-probs (float16: a few 1e-4 relative), so the divergence stays >= 0.
    """
    if teacher_ids.shape != teacher_logp.shape:
        raise ValueError(f"teacher ids {teacher_ids.shape} and logp {teacher_logp.shape} differ")
    s_logp = torch.log_softmax(_upcast(student_logits) / tau, dim=-1)
    ids = teacher_ids.long()
    s_top = s_logp.gather(-1, ids)
    s_tail = _safe_logsumexp(s_logp.scatter(-1, ids, _NEG_INF), dim=-1)
    s_buckets = torch.cat([s_top, s_tail.unsqueeze(-1)], dim=-1)
    t_buckets = torch.cat([_upcast(teacher_logp), _upcast(teacher_tail_logp).unsqueeze(-1)], dim=-1)
    t_buckets = t_buckets - _safe_logsumexp(t_buckets, dim=-1).unsqueeze(-1)
    return divergence(s_buckets, t_buckets, kind, beta)


def hidden_token_divergence(
    student_logits: Tensor,
    teacher_hidden: Tensor,
    lm_head_weight: Tensor,
    tau: float,
    kind: str = "forward_kl",
    beta: float = 0.5,
    logit_softcap: float | None = None,
    lm_head_bias: Tensor | None = None,
) -> Tensor:
    """Per-row divergence against teacher logits recomputed from its final hidden states.

    Args:
        student_logits: ``(N, V)`` raw student logits (temperature 1; already soft-capped if the
            model soft-caps).
        teacher_hidden: ``(N, H)`` teacher final (post-norm) hidden states (bf16 when stored).
        lm_head_weight: ``(V, H)`` the frozen, non-adapted lm_head (tied embedding for Qwen2.5 /
            Gemma 3). Detached here: the teacher is a fixed target.
        tau: temperature applied to both teacher and student logits.
        logit_softcap: the model's final logit soft-cap, applied to the teacher logits.

    Returns:
        ``(N,)`` float32.
    """
    bias = lm_head_bias.detach() if lm_head_bias is not None else None
    t_logits = project_logits(teacher_hidden.detach(), lm_head_weight.detach(), bias, logit_softcap)
    t_logp = torch.log_softmax(t_logits / tau, dim=-1)
    return dense_token_divergence(student_logits, t_logp, tau, kind, beta)


# --------------------------------------------------------------------------- target builders


@torch.no_grad()
def dense_targets(teacher_logits: Tensor, tau: float) -> Tensor:
    """Teacher log-probs at temperature ``tau``: ``(N, V)`` logits -> ``(N, V)`` float32."""
    return torch.log_softmax(_upcast(teacher_logits) / tau, dim=-1)


@torch.no_grad()
def topk_targets(teacher_logits: Tensor, k: int, tau: float) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k teacher targets at temperature ``tau`` from one chunk of teacher logits.

    Args:
        teacher_logits: ``(N, V)`` raw teacher logits (temperature 1, as the model outputs them).
        k: entries kept per row, 1 <= k <= V.
        tau: temperature.

    Returns:
        ``ids`` ``(N, k)`` int64 (sorted by decreasing probability), ``logp`` ``(N, k)`` float32
        log-probs of those ids at ``tau``, ``tail`` ``(N,)`` float32 log of the remaining mass
        (logsumexp of the other V - k log-probs; -inf when k == V).
    """
    vocab = teacher_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"top-k k={k} must be in [1, vocab size {vocab}]")
    logp = torch.log_softmax(_upcast(teacher_logits) / tau, dim=-1)
    top_logp, ids = logp.topk(k, dim=-1)
    tail = torch.logsumexp(logp.scatter(-1, ids, _NEG_INF), dim=-1)
    return ids, top_logp, tail


# --------------------------------------------------------------------------- chunked driver

# The float32 logits of one chunk take at most this much memory. A chunk's forward and backward
# hold a few vocabulary-wide tensors of that size at once: the loss's share of a step's peak.
CHUNK_LOGITS_BYTES = 64 * 2**20
# Rows whose float32 logits fit in this much are one chunk: more than one chunk runs each under
# activation checkpointing, which computes the logits (and hidden targets' teacher logits) twice,
# a cost a small step (a CPU quickstart batch) should not pay for the memory it would save.
ONE_PASS_LOGITS_BYTES = 256 * 2**20


def chunk_rows(vocab_size: int, chunk_size: int | None = None, rows: int | None = None) -> int:
    """Rows per chunk of vocabulary-sized work: ``chunk_size`` when given; all ``rows`` when their
    float32 logits fit in :data:`ONE_PASS_LOGITS_BYTES`; else as many as keep one chunk's within
    :data:`CHUNK_LOGITS_BYTES` (a multiple of 16, at least 16: 96 rows for Qwen2.5's
    151,936-entry vocabulary, 64 for Gemma 3's 262,144)."""
    if chunk_size is not None:
        return chunk_size
    if rows is not None and 0 < rows * vocab_size * 4 <= ONE_PASS_LOGITS_BYTES:
        return rows
    return max(16, CHUNK_LOGITS_BYTES // (4 * vocab_size) // 16 * 16)


@dataclass
class KDLossOutput:
    """Sums over the rows of one call (a micro-batch), not means.

    Attributes:
        loss_sum: scalar, differentiable: sum over rows of ``kd_weight * KD + ce_weight * CE``.
        kd_sum: scalar, detached: sum of per-row KD (after the tau^2 factor and clipping).
        ce_sum: scalar, detached: sum of per-row CE at temperature 1 (0 when no labels given).
        num_tokens: rows in this call (the reply tokens it covers).
    """

    loss_sum: Tensor
    kd_sum: Tensor
    ce_sum: Tensor
    num_tokens: int


def normalise(loss_sum: Tensor, num_items_in_step: int | Tensor, world_size: int = 1) -> Tensor:
    """Turn a micro-batch loss SUM into its share of the optimizer step's per-token mean.

    ``num_items_in_step`` is the number of reply tokens in the whole optimizer step: all
    gradient-accumulation micro-batches on all processes (HF Trainer passes it to
    ``compute_loss`` as ``num_items_in_batch``, already summed across processes when
    ``average_tokens_across_devices`` is on). Summing the returned values over the step's
    micro-batches gives exactly ``total loss / total tokens`` however rows are split.

    ``world_size``: DDP/FSDP *average* gradients over processes, so each process must multiply by
    the number of processes to end with a sum-over-all-tokens / global-count gradient (HF
    Trainer's own ``compute_loss`` does this; a subclass overriding ``compute_loss`` must pass
    ``world_size=accelerator.num_processes``). Leave 1 on a single process.
    """
    count = num_items_in_step
    if isinstance(count, Tensor):
        count = count.to(loss_sum.device).clamp(min=1)
    else:
        count = max(int(count), 1)
    return loss_sum * world_size / count


def _validate(
    student_hidden: Tensor,
    lm_head_weight: Tensor,
    targets: Mapping[str, Tensor] | None,
    labels: Tensor | None,
    mode: str,
    tau: float,
    kind: str,
    beta: float,
    kd_weight: float,
    ce_weight: float,
    chunk_size: int | None,
    suppress: Tensor | None = None,
    advantage_weighting: str = "none",
) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown target mode {mode!r}; expected one of {', '.join(MODES)}")
    _check_kind(kind, beta)
    if tau <= 0:
        raise ValueError(f"temperature must be > 0, got {tau}")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    if student_hidden.dim() != 2 or lm_head_weight.dim() != 2:
        raise ValueError("student_hidden must be (N, H) and lm_head_weight (V, H)")
    if student_hidden.shape[1] != lm_head_weight.shape[1]:
        raise ValueError(
            f"hidden size mismatch: student_hidden {tuple(student_hidden.shape)}, "
            f"lm_head_weight {tuple(lm_head_weight.shape)}"
        )
    if targets is None:
        if kd_weight != 0 or labels is None:
            raise ValueError("no teacher targets: only the CE term (kd_weight 0, labels) can train")
        targets = {}
        mode_keys: tuple[str, ...] = ()
    else:
        mode_keys = TARGET_KEYS[mode]
    missing = [key for key in mode_keys if key not in targets]
    if missing:
        raise ValueError(f"mode {mode!r} needs targets {TARGET_KEYS[mode]}, missing {missing}")
    n = student_hidden.shape[0]
    for key in mode_keys:
        if targets[key].shape[0] != n:
            raise ValueError(f"targets[{key!r}] has {targets[key].shape[0]} rows, expected {n}")
    if labels is not None and labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    if suppress is not None and (suppress.dim() != 2 or suppress.shape[0] != n):
        raise ValueError(f"suppress must have shape ({n}, m), got {tuple(suppress.shape)}")
    if advantage_weighting not in ADVANTAGE_WEIGHTINGS:
        raise ValueError(
            f"unknown advantage weighting {advantage_weighting!r}; "
            f"expected one of {', '.join(ADVANTAGE_WEIGHTINGS)}"
        )
    if advantage_weighting != "none" and labels is None:
        raise ValueError("advantage weighting needs labels (the reply tokens)")
    if ce_weight != 0 and labels is None:
        raise ValueError("ce_weight != 0 needs labels")


def chunked_kd_loss(
    student_hidden: Tensor,
    lm_head_weight: Tensor,
    targets: Mapping[str, Tensor] | None,
    labels: Tensor | None = None,
    *,
    mode: str,
    tau: float,
    kind: str = "forward_kl",
    beta: float = 0.5,
    tau_squared: bool = True,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    chunk_size: int | None = None,
    clip: float | None = None,
    logit_softcap: float | None = None,
    lm_head_bias: Tensor | None = None,
    suppress: Tensor | None = None,
    advantage_weighting: str = "none",
) -> KDLossOutput:
    """KD (+ CE) loss over reply rows, computing vocabulary-sized work one chunk at a time.

    Args:
        student_hidden: ``(N, H)`` student final (post-norm) hidden states at the positions that
            predict reply tokens.
        lm_head_weight: ``(V, H)`` output projection; ``lm_head_bias`` optional ``(V,)``.
        targets: by ``mode`` (:data:`TARGET_KEYS`), first dim N, same names as the target store:
            ``dense``: ``logp`` ``(N, V)`` at ``tau``; ``topk``: ``ids`` ``(N, k)`` int,
            ``logp`` ``(N, k)`` at ``tau``, ``tail`` ``(N,)`` at ``tau``; ``hidden``: ``hidden``
            ``(N, H)`` teacher final hidden states. None: no teacher at all (supervised
            fine-tuning on hard labels): needs ``kd_weight == 0`` and ``labels``; KD is 0.
        labels: ``(N,)`` reply token ids, for CE at temperature 1. Required when ``ce_weight != 0``;
            when given with ``ce_weight == 0`` CE is still computed for logging (``ce_sum``).
        mode, tau, kind, beta: target form, temperature, divergence (see :func:`divergence`).
        tau_squared: multiply KD by tau^2 (Hinton et al.; keeps gradient scale comparable across
            temperatures; the paper and the reference do).
        kd_weight, ce_weight: per-row loss = ``kd_weight * KD + ce_weight * CE``.
        chunk_size: rows per chunk; peak memory is O(chunk_size x V), never O(N x V). None:
            :func:`chunk_rows` for this vocabulary and N.
        clip: if set, per-token clamp (max) of KD after the tau^2 factor, in the spirit of the
            OPSD / verl ``loss_max_clamp`` clipping: a few tokens with huge divergence (stylistic
            tokens, hint leakage) cannot dominate the step. Clipped tokens get zero KD gradient.
            Note OPSD clips per vocabulary entry; this clips each token's total.
        logit_softcap: the model's final logit soft-cap (applied to student and, in hidden mode,
            teacher logits).
        suppress: ``(N, m)`` token ids (-1 = none) removed from each row's teacher distribution
            before the divergence, the rest renormalised (:func:`suppress_dense`,
            :func:`suppress_topk`; ``train.loss.target_filter``).
        advantage_weighting: ``none`` | ``gate`` | ``weight``: each row's KD multiplied by
            :func:`advantage_weights` (needs ``labels``).

    Returns:
        :class:`KDLossOutput` with SUMS over the N rows. Divide by the step's reply-token count
        with :func:`normalise`.

    With more than one chunk, each runs under ``torch.utils.checkpoint`` (non-reentrant): the
    forward keeps no chunk's logits, and the backward recomputes one chunk's logits at a time, so
    the backward too holds O(chunk_size x V).
    """
    _validate(
        student_hidden,
        lm_head_weight,
        targets,
        labels,
        mode,
        tau,
        kind,
        beta,
        kd_weight,
        ce_weight,
        chunk_size,
        suppress,
        advantage_weighting,
    )
    keys = TARGET_KEYS[mode] if targets is not None else ()
    n = student_hidden.shape[0]
    chunk_size = chunk_rows(lm_head_weight.shape[0], chunk_size, n)
    scale = tau * tau if tau_squared else 1.0

    plain = suppress is None and advantage_weighting == "none"

    def shaped_kd(
        logits: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        lab: Tensor | None,
        sup: Tensor | None,
        tgt: tuple[Tensor, ...],
    ) -> Tensor:
        """KD against the filtered teacher, weighted by the teacher's advantage."""
        s_logp = torch.log_softmax(logits / tau, dim=-1)
        if mode == "topk":
            ids, t_top, t_tail = tgt[0].long(), _upcast(tgt[1]), _upcast(tgt[2])
            if sup is not None:
                t_top = suppress_topk(ids, t_top, sup)
            s_b = torch.cat(
                [
                    s_logp.gather(-1, ids),
                    _safe_logsumexp(s_logp.scatter(-1, ids, _NEG_INF))[:, None],
                ],
                dim=-1,
            )
            t_b = torch.cat([t_top, t_tail[:, None]], dim=-1)
            t_b = t_b - _safe_logsumexp(t_b, dim=-1).unsqueeze(-1)
            kd = divergence(s_b, t_b, kind, beta)
            # A label outside the top k is read from the tail bucket (an upper bound).
            at = ids == lab.long()[:, None] if lab is not None else None
            t_label = (
                torch.where(
                    at.any(-1), t_b[:, :-1].masked_fill(~at, _NEG_INF).logsumexp(-1), t_b[:, -1]
                )
                if at is not None
                else None
            )
        else:
            if mode == "dense":
                t_logp = _upcast(tgt[0])
            else:
                t_logits = project_logits(
                    tgt[0].detach(),
                    weight.detach(),
                    bias.detach() if bias is not None else None,
                    logit_softcap,
                )
                t_logp = torch.log_softmax(t_logits / tau, dim=-1)
            if sup is not None:
                t_logp = suppress_dense(t_logp, sup)
            kd = divergence(s_logp, t_logp, kind, beta)
            t_label = t_logp.gather(-1, lab.long()[:, None])[:, 0] if lab is not None else None
        if advantage_weighting != "none":
            kd = kd * advantage_weights(s_logp, t_label, lab, advantage_weighting)
        return kd

    def chunk_fn(
        h: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        lab: Tensor | None,
        sup: Tensor | None,
        *tgt: Tensor,
    ) -> Tensor:
        logits = project_logits(h, weight, bias, logit_softcap)
        # A term of weight 0 is only reported: no graph for it, so its backward (a vocabulary-
        # wide gradient per row, multiplied by 0) is neither computed nor held at the peak.
        grad = torch.is_grad_enabled()
        with torch.set_grad_enabled(grad and kd_weight != 0):
            if not tgt and targets is None:  # hard labels only: no teacher
                kd = logits.new_zeros(logits.shape[0])
            elif not plain:
                kd = shaped_kd(logits, weight, bias, lab, sup, tgt)
            elif mode == "dense":
                kd = dense_token_divergence(logits, tgt[0], tau, kind, beta)
            elif mode == "topk":
                kd = topk_token_divergence(logits, tgt[0], tgt[1], tgt[2], tau, kind, beta)
            else:
                kd = hidden_token_divergence(
                    logits, tgt[0], weight, tau, kind, beta, logit_softcap, bias
                )
            kd = kd * scale
            if clip is not None:
                kd = kd.clamp(max=clip)
        with torch.set_grad_enabled(grad and ce_weight != 0):
            if lab is not None:
                ce = F.cross_entropy(logits, lab.long(), reduction="none")
            else:
                ce = torch.zeros_like(kd)
        # Skip zero-weighted terms rather than multiplying: 0 * inf would be NaN.
        loss = torch.zeros_like(kd)
        if kd_weight != 0:
            loss = loss + kd_weight * kd
        if ce_weight != 0:
            loss = loss + ce_weight * ce
        return torch.stack([loss.sum(), kd.sum(), ce.sum()])

    # One chunk needs no checkpoint: its backward holds that chunk's work either way, and
    # recomputing it (the teacher's and the student's logits over the whole vocabulary) would
    # double the cost of a quickstart step's loss.
    use_checkpoint = (
        n > chunk_size
        and torch.is_grad_enabled()
        and (
            student_hidden.requires_grad
            or lm_head_weight.requires_grad
            or (lm_head_bias is not None and lm_head_bias.requires_grad)
        )
    )
    totals = student_hidden.new_zeros(3, dtype=torch.float32)
    if n == 0:
        # Keep the graph connected so backward() and DDP see every parameter.
        totals = totals + student_hidden.sum().float() * 0.0 + lm_head_weight.sum().float() * 0.0
    for start in range(0, n, chunk_size):
        rows = slice(start, min(start + chunk_size, n))
        args = (
            student_hidden[rows],
            lm_head_weight,
            lm_head_bias,
            labels[rows] if labels is not None else None,
            suppress[rows] if suppress is not None else None,
            *(targets[key][rows] for key in keys),
        )
        if use_checkpoint:
            # No randomness inside a chunk, so skip stashing RNG states.
            out = checkpoint(chunk_fn, *args, use_reentrant=False, preserve_rng_state=False)
        else:
            out = chunk_fn(*args)
        totals = totals + out
    return KDLossOutput(
        loss_sum=totals[0],
        kd_sum=totals[1].detach(),
        ce_sum=totals[2].detach(),
        num_tokens=n,
    )
