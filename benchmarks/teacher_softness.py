"""How soft are a run's stored SSB targets? For each teacher context of a run (the run's own
targets, and each `ssb ablate` context under ablate/ssb.<context>/targets), over every reply
token: the teacher's mean probability of the reply's own token, how often its argmax is that
token, and its mean entropy, at KD temperatures 1 and 2.

    .venv/bin/python benchmarks/teacher_softness.py runs/ablation-cpu

Reads the target store (`ssb.distill.store.TargetReader`) and projects the stored hidden states
through the base model's output head (`ssb.distill.forward.output_head`, as the loss does); runs
with other target modes are reported as such. Prints one line per context.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ssb.config import load_config
from ssb.distill.forward import output_head
from ssb.distill.store import TargetReader
from ssb.stages.common import load_base

TEMPERATURES = (1.0, 2.0)


def teacher_log_probs(tensors: dict[str, torch.Tensor], head, tau: float) -> torch.Tensor | None:
    """(T, V) log-probabilities at temperature `tau` from a stored example with hidden-state
    targets (`targets.mode=hidden`, the default); None for the other modes."""
    if "hidden" not in tensors:
        return None
    logits = head.logits(tensors["hidden"].to(head.weight.dtype))
    return torch.log_softmax(logits / tau, dim=-1)


def softness(targets_dir: Path, head) -> dict[str, float] | None:
    reader = TargetReader(targets_dir)
    tokens, agree = 0, 0
    p_reply = dict.fromkeys(TEMPERATURES, 0.0)
    entropy = dict.fromkeys(TEMPERATURES, 0.0)
    with torch.no_grad():
        for example_id in reader.ids():
            reply, tensors = reader.get(example_id)
            reply_ids = torch.tensor(reply)[:, None]
            for tau in TEMPERATURES:
                logp = teacher_log_probs(tensors, head, tau)
                if logp is None:
                    return None
                p_reply[tau] += logp.gather(1, reply_ids).exp().sum().item()
                entropy[tau] += -(logp.exp() * logp).sum().item()
                if tau == 1.0:
                    agree += (logp.argmax(-1) == reply_ids[:, 0]).sum().item()
            tokens += len(reply)
    if not tokens:
        return None
    result = {"reply_tokens": tokens, "argmax_is_reply": agree / tokens}
    for tau in TEMPERATURES:
        result[f"p_reply_tau{tau:g}"] = p_reply[tau] / tokens
        result[f"entropy_tau{tau:g}"] = entropy[tau] / tokens
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args()
    cfg = load_config(config_file=args.run_dir / "config.yaml")
    head = output_head(load_base(cfg).model)
    contexts = {cfg.bootstrap.teacher_context: args.run_dir / "targets"}
    for path in sorted((args.run_dir / "ablate").glob("ssb.*/targets")):
        contexts[path.parent.name.removeprefix("ssb.")] = path
    for context, path in contexts.items():
        stats = softness(path, head) if path.exists() else None
        if stats is None:
            print(f"{context}: no hidden-state targets in {path}")
            continue
        print(
            f"{context}: {stats['reply_tokens']} reply tokens; teacher p(reply token) "
            f"{stats['p_reply_tau1']:.3f} at tau 1, {stats['p_reply_tau2']:.3f} at tau 2; argmax is "
            f"the reply token {stats['argmax_is_reply']:.1%}; entropy {stats['entropy_tau1']:.2f} "
            f"nats at tau 1, {stats['entropy_tau2']:.2f} at tau 2"
        )


if __name__ == "__main__":
    main()
