"""Distillation core: losses over flattened reply positions and the teacher target store."""

from ssb.distill.losses import (
    DIVERGENCES,
    MODES,
    TARGET_KEYS,
    KDLossOutput,
    chunked_kd_loss,
    dense_targets,
    dense_token_divergence,
    divergence,
    hidden_token_divergence,
    normalise,
    project_logits,
    topk_targets,
    topk_token_divergence,
)
from ssb.distill.store import (
    DEFAULT_DTYPES,
    TargetReader,
    TargetStoreError,
    TargetWriter,
)

__all__ = [
    "DEFAULT_DTYPES",
    "DIVERGENCES",
    "MODES",
    "TARGET_KEYS",
    "KDLossOutput",
    "TargetReader",
    "TargetStoreError",
    "TargetWriter",
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
