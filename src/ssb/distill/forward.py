"""Model-side helpers shared by teacher scoring and student training.

Both sides need the same two things: the final (post-norm) hidden states at the positions that
predict reply tokens, and the output head that turns them into logits. Taking hidden states from
the decoder and applying the head ourselves means full-vocabulary logits are only ever built for
a chunk of reply positions at a time, never for the whole (B, S, V) batch.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from transformers import DynamicCache

from ssb.distill.losses import project_logits
from ssb.generate.batching import MIN_SHARED_PREFIX, shared_prefix_length
from ssb.models import cache_kwarg, checkpointing_enabled
from ssb.sharding import full_parameter, is_sharded


@dataclass
class OutputHead:
    weight: torch.Tensor  # (V, H)
    bias: torch.Tensor | None
    softcap: float | None  # final logit soft-capping (Gemma 2 style), None when the model has none

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits for a (N, H) block of hidden states, computed exactly as the student
        side of the loss computes them (`project_logits`)."""
        return project_logits(hidden, self.weight, self.bias, self.softcap)


def unwrap_model(model: Any) -> Any:
    """The model inside DDP / FSDP / DeepSpeed / torch.compile wrappers (a PeftModel stays a
    PeftModel: its attribute look-ups reach the transformers model it adapts)."""

    return extract_model_from_parallel(model)


def output_head(model: Any) -> OutputHead:
    core = unwrap_model(model)
    head = core.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        # A LoRA-wrapped (or modules_to_save) lm_head is a peft layer, not a Linear: its logits
        # are not W h.
        raise ValueError(
            f"the output layer is a {type(head).__name__}, not a plain Linear; ssb computes logits "
            "from the lm_head weight, so the lm_head must not be adapted or trained (remove "
            "lm_head from train.lora.target_modules)"
        )
    config = getattr(core, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    bias = None if head.bias is None else full_parameter(head.bias)
    return OutputHead(full_parameter(head.weight), bias, softcap)


def final_hidden_states(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    shared_prefix: int = 0,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, S, H) hidden states after the final norm: what the lm_head sees.

    The call goes through `model` itself (the DDP / FSDP / DeepSpeed wrapper when training, the
    PeftModel, the causal LM), so wrapper hooks run: DDP only all-reduces gradients of a
    forward made through its own `forward`. The decoder's output is captured with a forward
    hook, and the causal LM is asked for the logits of the last position only
    (`logits_to_keep=1`), so no (B, S, V) logits tensor is built.

    `shared_prefix=n` (every row starts with the same n tokens, e.g. the few-shot examples, and
    the batch is right-padded): those n tokens run once, at batch 1, and their keys and values
    serve every row; the result is (B, S - n, H), the positions n..S-1. Exact, gradients
    included: they flow back through the shared keys and values into the one prefix pass. Only
    for a single process without activation checkpointing (see `can_share_prefix`).

    A packed row (`pack_rows`: no attention mask, `position_ids` restarting at 0 at each
    sequence) is passed on as it is; transformers keeps its sequences apart only where
    `packing_isolates` says so.
    """
    core = unwrap_model(model)
    decoder = core.get_decoder()
    captured: list[torch.Tensor] = []

    def grab(module: Any, args: Any, output: Any) -> None:
        hidden = getattr(output, "last_hidden_state", None)
        captured.append(hidden if hidden is not None else output[0])

    kwargs: dict[str, Any] = {"use_cache": False}
    if _accepts_logits_to_keep(core):
        kwargs["logits_to_keep"] = 1
    handle = decoder.register_forward_hook(grab)
    try:
        if shared_prefix:
            n, (rows, width) = shared_prefix, input_ids.shape
            cache = DynamicCache(config=core.config)
            kwargs.update(use_cache=True, **{cache_kwarg(core): cache})
            model(input_ids=input_ids[:1, :n], attention_mask=attention_mask[:1, :n], **kwargs)
            cache.batch_repeat_interleave(rows)
            positions = torch.arange(n, width, device=input_ids.device).expand(rows, -1)
            model(
                input_ids=input_ids[:, n:],
                attention_mask=attention_mask,
                position_ids=positions,
                **kwargs,
            )
        elif attention_mask is None:
            model(input_ids=input_ids, position_ids=position_ids, **kwargs)
        else:
            model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"{type(core).__name__}.forward did not run its decoder")
    return captured[-1]


def shared_prompt_prefix(sequences: list[list[int]], prompt_lengths: list[int]) -> int:
    """How many leading tokens every `[prompt || reply]` sequence shares, stopping before the
    first position that predicts a reply token (that row's output is needed); 0 when fewer than
    MIN_SHARED_PREFIX."""
    if len(sequences) < 2:
        return 0
    n = shared_prefix_length(sequences, limit=min(prompt_lengths) - 1)
    return n if n >= MIN_SHARED_PREFIX else 0


def can_share_prefix(model: Any, num_processes: int = 1) -> bool:
    """Whether `final_hidden_states(..., shared_prefix=n)` may be used: one process (under DDP a
    second forward before the backward would upset its gradient bookkeeping) and no activation
    checkpointing (transformers turns the cache off under it)."""
    core = unwrap_model(model)
    inner = core.get_base_model() if hasattr(core, "get_base_model") else core
    return num_processes == 1 and not checkpointing_enabled(inner)


# A packed row longer than this is not packed where attention takes a dense mask (sdpa, eager):
# transformers builds a (T, T) boolean mask for it (64 MiB at this length), and the masked
# attention computes all T x T scores. flash attention's variable-length kernels need neither.
MAX_MASKED_PACK = 8192


def pack_rows(
    input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A right-padded batch as one padding-free row: (ids, position_ids), each (1, T) with T
    the real tokens, sequence after sequence, so the row's positions are the batch's real
    positions in row-major order (what `tensor[attention_mask.bool()]` selects). Position ids
    restart at 0 at every sequence: transformers reads the sequence boundaries from them."""
    keep = attention_mask.bool()
    positions = attention_mask.long().cumsum(-1) - 1
    return input_ids[keep][None], positions[keep][None]


def packing_isolates(model: Any) -> bool:
    """Whether `model` keeps the sequences of a packed row apart: one probe per model (cached on
    it), two short random sequences packed against the second one alone, eval mode, no grad.
    transformers isolates them from the position ids (a block-diagonal mask for sdpa / eager /
    flex, variable-length kernels for flash attention) in the models that build their masks
    with `transformers.masking_utils`; a model or attention that does not would let the second
    sequence attend to the first, which this measures rather than assumes."""
    core = unwrap_model(model)
    known = getattr(core, "_ssb_packing_isolates", None)
    if known is not None:
        return known
    vocab = core.get_input_embeddings().num_embeddings
    device = next(core.parameters()).device
    gen = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, vocab, (1, n), generator=gen).to(device) for n in (5, 7))
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None].to(device)
    was_training = core.training
    core.eval()  # no dropout: the two forwards must differ by the packing alone
    try:
        with torch.no_grad():
            alone = final_hidden_states(core, second, torch.ones_like(second))[0].float()
            packed = final_hidden_states(
                core, torch.cat([first, second], dim=1), None, position_ids=positions
            )[0, 5:].float()
    finally:
        core.train(was_training)
    error = float((packed - alone).abs().max() / alone.abs().max().clamp(min=1e-6))
    # Kernel rounding only: float32 ~1e-6, half precision ~1e-2; a leak moves states by O(1).
    full_precision = core.get_input_embeddings().weight.dtype == torch.float32
    tolerance = 1e-4 if full_precision else 3e-2
    isolates = error < tolerance
    core._ssb_packing_isolates = isolates
    return isolates


def should_pack(model: Any, attention_mask: torch.Tensor, num_processes: int = 1) -> bool:
    """Whether to run a right-padded micro-batch as one packed row (`pack_rows`): it has padding
    to save, the model is not sharded (FSDP2 / ZeRO-3 gather parameters in every forward; the
    probe would be a collective), the packed row fits `MAX_MASKED_PACK` where attention takes a
    dense mask, and `packing_isolates` holds."""
    if num_processes > 1 and is_sharded(model):
        return False
    if bool(attention_mask.all()):
        return False
    core = unwrap_model(model)
    attention = str(getattr(core.config, "_attn_implementation", ""))
    if not attention.startswith("flash_attention") and int(attention_mask.sum()) > MAX_MASKED_PACK:
        return False
    return packing_isolates(model)


def _accepts_logits_to_keep(core: Any) -> bool:
    # A PeftModel forwards **kwargs; look at the transformers model underneath.
    inner = core.get_base_model() if hasattr(core, "get_base_model") else core
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def reply_rows(prompt_len: int, reply_len: int) -> slice:
    """Positions whose next-token prediction is a reply token.

    In `[prompt (P tokens) || reply (R tokens, end token included)]`, position t predicts token
    t + 1, so the R reply tokens are predicted at positions P - 1 ... P + R - 2."""
    return slice(prompt_len - 1, prompt_len - 1 + reply_len)


def right_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask. Right padding keeps every real token's position
    unchanged, so the reply rows of each sequence are the same as unpadded."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids, mask
