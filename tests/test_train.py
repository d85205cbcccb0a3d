"""`ssb train`: the collator's alignment, the loss through SSBTrainer, normalisation across
gradient accumulation, online teacher, end-to-end runs with resume, and the refusals.

Tiny random models of real architectures (ssb.bench.random_models); pairs from tests/pairs_fixture.py
have teacher prompts longer than student prompts (by a different amount per pair) and replies of
different lengths.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from pairs_fixture import end_token, make_run, pair_record
from peft import get_peft_model

from ssb.distill.forward import final_hidden_states, output_head
from ssb.distill.losses import chunked_kd_loss
from ssb.distill.store import TargetReader, TargetStoreError
from ssb.models import checkpointing_enabled
from ssb.problems import Problem
from ssb.prompts import render_prompt_ids, student_messages
from ssb.rundir import read_jsonl
from ssb.stages.base import load_base
from ssb.stages.lora_training import last_checkpoint
from ssb.stages.targets import run_targets
from ssb.stages.train import (
    IGNORE,
    DistillCollator,
    check_head_frozen,
    lora_config,
    make_trainer,
    run_train,
)

LOG_KEYS = {"step", "epoch", "loss", "kd", "ce", "grad_norm", "learning_rate", "reply_len"}


def fresh_student(cfg, seed: int = 0):
    """A LoRA student on a freshly loaded copy of the base (the cached one stays untouched)."""
    from ssb.models import load_model_and_tokenizer

    base, _ = load_model_and_tokenizer(cfg.model)
    torch.manual_seed(seed)
    return get_peft_model(base, lora_config(cfg))


def perturb_lora(model, seed: int = 1, std: float = 0.2) -> None:
    """peft initialises lora_B to zero (student == teacher): move it so the loss is not zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def targets(cfg, rundir, mode):
    cfg.targets.mode = mode
    run_targets(cfg, rundir, progress=False)
    return TargetReader(rundir.targets_dir)


def collate(cfg, reader, pairs, mode=None):
    tok = load_base(cfg).tokenizer
    return DistillCollator(pad_id=tok.pad_token_id, mode=mode or cfg.targets.mode, reader=reader)(
        pairs
    )


def reply_of(pair):
    return pair["reply_ids"] + [pair["end_token_id"]]


# --------------------------------------------------------------------------- alignment


@pytest.mark.parametrize("template", ["chatml", "gemma", "none"])
def test_teacher_and_student_rows_hold_the_same_tokens(tmp_path, template):
    cfg, rundir, pairs = make_run(tmp_path, template)
    reader = targets(cfg, rundir, "topk")
    batch = collate(cfg, reader, pairs)
    online = collate(cfg, None, pairs, mode="online")
    shift = batch["shift_labels"]
    n_rows = 0
    for i, pair in enumerate(pairs):
        p_student, p_teacher = len(pair["student_prompt_ids"]), len(pair["teacher_prompt_ids"])
        assert p_teacher > p_student  # different prompt lengths: an off-by-one would show
        reply = reply_of(pair)
        # Student: position t is labelled with the token at t + 1, for exactly the reply tokens.
        rows = (shift[i] != IGNORE).nonzero().flatten().tolist()
        assert rows == list(range(p_student - 1, p_student - 1 + len(reply)))
        assert shift[i, rows].tolist() == reply
        assert batch["input_ids"][i, [r + 1 for r in rows]].tolist() == reply
        assert batch["labels"][i, [r + 1 for r in rows]].tolist() == reply
        assert batch["attention_mask"][i].sum() == p_student + len(reply)
        # Teacher, stored: the rows were scored on the same reply tokens.
        assert reader.get(pair["id"])[0] == reply
        # Teacher, online: its own labels select the same tokens in the hinted sequence.
        t_shift = online["teacher_shift_labels"][i]
        t_rows = (t_shift != IGNORE).nonzero().flatten().tolist()
        assert t_rows == list(range(p_teacher - 1, p_teacher - 1 + len(reply)))
        assert t_shift[t_rows].tolist() == reply
        assert online["teacher_input_ids"][i, [r + 1 for r in t_rows]].tolist() == reply
        # Teacher target rows are concatenated in the same (row-major) order as student rows.
        stored = reader.get(pair["id"])[1]["ids"]
        assert torch.equal(batch["teacher_ids"][n_rows : n_rows + len(reply)], stored)
        n_rows += len(reply)
    assert n_rows == (shift != IGNORE).sum() == batch["teacher_ids"].shape[0]


@pytest.mark.parametrize("mode", ["dense", "topk", "hidden", "online"])
def test_frozen_student_matches_teacher_on_same_prompt(tmp_path, mode):
    """With the teacher shown the student's own prompt and LoRA B = 0, student == teacher on
    every reply row: the KD loss through SSBTrainer is ~0 only if the rows line up. Shifting the
    teacher rows by one position makes it large."""
    cfg, rundir, pairs = make_run(tmp_path, "chatml", n=4, same_prompt=True)
    reader = None if mode == "online" else targets(cfg, rundir, mode)
    cfg.targets.mode = mode
    model = fresh_student(cfg)
    trainer = make_trainer(cfg, rundir, model, load_base(cfg).tokenizer, pairs, reader, False)
    batch = collate(cfg, reader, pairs)
    loss = trainer.compute_loss(model, batch).item()
    tol = 2e-3 if mode == "hidden" else 1e-5  # bf16-stored hidden states
    assert abs(loss) < tol
    if mode in ("dense", "topk", "hidden"):
        shifted = dict(batch)
        for key in [k for k in batch if k.startswith("teacher_")]:
            shifted[key] = batch[key].roll(1, dims=0)
        assert trainer.compute_loss(model, shifted).item() > 100 * tol


@pytest.mark.parametrize(
    ("template", "end_name"),
    [("chatml", "<|im_end|>"), ("gemma", "<end_of_turn>"), ("none", "\n\n")],
)
def test_end_of_turn_token_is_distilled(tmp_path, template, end_name):
    cfg, rundir, pairs = make_run(tmp_path, template, n=3)
    end = end_token(load_base(cfg).tokenizer, end_name)
    for mode in ("online", "topk"):
        reader = None if mode == "online" else targets(cfg, rundir, mode)
        batch = collate(cfg, reader, pairs, mode)
        for i, pair in enumerate(pairs):
            rows = (batch["shift_labels"][i] != IGNORE).nonzero().flatten()
            assert batch["shift_labels"][i, rows[-1]] == end
            assert batch["shift_labels"][i, rows[-2]] == pair["reply_ids"][-1]
        if mode == "topk":
            # ... and the teacher row for it is there: as many teacher rows as labels.
            assert batch["teacher_ids"].shape[0] == (batch["shift_labels"] != IGNORE).sum()


@pytest.mark.parametrize("template", ["chatml", "gemma", "none"])
def test_student_prompt_is_the_inference_prompt(tmp_path, template):
    cfg, rundir, pairs = make_run(tmp_path, template, n=3)
    tok = load_base(cfg).tokenizer
    batch = collate(cfg, None, pairs, mode="online")
    for i, pair in enumerate(pairs):
        # What rollout and evaluation render for the same problem.
        problem = Problem(pair["id"], pair["question"], pair["gold"], "test")
        inference = render_prompt_ids(tok, student_messages(problem, cfg.prompt), cfg.prompt)
        assert batch["input_ids"][i, : len(inference)].tolist() == inference
        assert batch["input_ids"][i, len(inference)] == pair["reply_ids"][0]
    if template == "chatml":
        assert tok.decode(inference).endswith("<|im_start|>assistant\n")


# --------------------------------------------------------------------------- the loss


def test_gradients_reach_only_lora(tmp_path):
    cfg, rundir, pairs = make_run(tmp_path, "gemma", n=3)
    reader = targets(cfg, rundir, "dense")
    model = fresh_student(cfg)
    trainer = make_trainer(cfg, rundir, model, load_base(cfg).tokenizer, pairs, reader, False)
    loss = trainer.compute_loss(model, collate(cfg, reader, pairs))
    loss.backward()
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    assert with_grad and all("lora_" in n for n in with_grad)
    assert any("lora_B" in n and p.grad.abs().sum() > 0 for n, p in model.named_parameters())
    assert set(with_grad) == {n for n, p in model.named_parameters() if p.requires_grad}
    head = model.get_output_embeddings().weight
    assert head.grad is None and not head.requires_grad
    assert model.get_input_embeddings().weight.grad is None


def test_lora_params_are_float32_on_a_bf16_base(tmp_path):
    cfg, rundir, pairs = make_run(tmp_path, "chatml", "model.dtype=bfloat16", n=2)
    model = fresh_student(cfg)
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trainable == {torch.float32} and frozen == {torch.bfloat16}
    reader = targets(cfg, rundir, "topk")
    trainer = make_trainer(cfg, rundir, model, load_base(cfg).tokenizer, pairs, reader, False)
    perturb_lora(model)
    loss = trainer.compute_loss(model, collate(cfg, reader, pairs))
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and loss > 0
    loss.backward()


@pytest.mark.parametrize("template", ["chatml", "gemma"])
def test_online_equals_stored_targets(tmp_path, template):
    cfg, rundir, pairs = make_run(tmp_path, template, n=4)
    tok = load_base(cfg).tokenizer
    model = fresh_student(cfg)
    perturb_lora(model)
    losses = {}
    for mode in ("online", "dense", "hidden"):
        reader = None if mode == "online" else targets(cfg, rundir, mode)
        cfg.targets.mode = mode
        trainer = make_trainer(cfg, rundir, model, tok, pairs, reader, False)
        model.train()
        losses[mode] = trainer.compute_loss(model, collate(cfg, reader, pairs)).item()
        shutil.rmtree(rundir.targets_dir, ignore_errors=True)
    # Not zero: the online teacher is the adapter-disabled base, not the student itself.
    assert losses["online"] > 1e-2
    assert losses["online"] == pytest.approx(losses["dense"], rel=1e-4)
    assert losses["online"] == pytest.approx(losses["hidden"], rel=2e-2)  # bf16 hidden
    # The adapter is back on after the online teacher's forward, and the model in train mode.
    assert model.training
    ids = torch.tensor([pairs[0]["student_prompt_ids"]])
    with torch.no_grad():
        on = final_hidden_states(model, ids, torch.ones_like(ids))
        with model.disable_adapter():
            off = final_hidden_states(model, ids, torch.ones_like(ids))
    assert (on - off).abs().max() > 1e-3


# --------------------------------------------------------------------------- shared prefix


@pytest.mark.parametrize("template", ["chatml", "gemma", "none"])
def test_shared_prefix_forward_is_exact_with_gradients(tmp_path, template):
    """The student's shared prefix (system prompt / few-shot examples) run once per batch gives
    the same reply-row hidden states, KD loss and LoRA gradients as the full forward per row."""
    cfg, rundir, pairs = make_run(tmp_path, template)
    reader = targets(cfg, rundir, "dense")
    batch = collate(cfg, reader, pairs[:4])
    prefix = batch["shared_prefix"]
    assert prefix >= 16, "the fixture's prompts share their start; the test needs that"
    assert prefix < min(len(p["student_prompt_ids"]) for p in pairs[:4])
    model = fresh_student(cfg)
    perturb_lora(model)
    lc = cfg.train.loss

    def loss_and_grads(shared):
        model.zero_grad()
        shift = batch["shift_labels"][:, shared:]
        mask = shift != IGNORE
        hidden = final_hidden_states(
            model, batch["input_ids"], batch["attention_mask"], shared_prefix=shared
        )
        out = chunked_kd_loss(
            hidden[mask],
            output_head(model).weight,
            {"logp": batch["teacher_logp"]},
            shift[mask],
            mode="dense",
            tau=lc.temperature,
            chunk_size=lc.chunk_size,
        )
        (out.loss_sum / out.num_tokens).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return hidden[mask].detach(), float(out.loss_sum.detach() / out.num_tokens), grads

    rows_full, loss_full, grads_full = loss_and_grads(0)
    rows_shared, loss_shared, grads_shared = loss_and_grads(prefix)
    assert torch.allclose(rows_shared, rows_full, atol=1e-5, rtol=1e-4)
    assert loss_shared == pytest.approx(loss_full, rel=1e-5)
    for name, g in grads_full.items():
        assert g.abs().max() > 0, name  # every LoRA weight gets a gradient, so this compares
        assert torch.allclose(grads_shared[name], g, atol=1e-6, rtol=1e-3), name


def test_teacher_rows_with_the_shared_prefix_equal_one_pair_at_a_time(tmp_path):
    """`ssb targets` scores a batch with its shared prefix run once: each pair's rows equal a
    forward of that pair alone."""
    from ssb.stages.targets import teacher_rows

    cfg, rundir, pairs = make_run(tmp_path, "none")
    model = load_base(cfg).model
    pad = load_base(cfg).tokenizer.pad_token_id
    together = teacher_rows(model, pairs, pad)
    for pair, rows in zip(pairs, together):
        alone = teacher_rows(model, [pair], pad)[0]
        assert rows.shape == alone.shape == (len(reply_of(pair)), alone.shape[1])
        assert torch.allclose(rows, alone, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- normalisation


def hand_step(cfg, pairs, reader, lr):
    """One SGD step on sum(token losses) / total tokens over all pairs, computed by hand."""
    model = fresh_student(cfg)
    batch = collate(cfg, reader, pairs)
    mask = batch["shift_labels"] != IGNORE
    hidden = final_hidden_states(model, batch["input_ids"], batch["attention_mask"])
    lc = cfg.train.loss
    out = chunked_kd_loss(
        hidden[mask],
        output_head(model).weight,
        {"logp": batch["teacher_logp"]},
        batch["shift_labels"][mask],
        mode="dense",
        tau=lc.temperature,
        kind=lc.divergence,
        tau_squared=lc.tau_squared,
        kd_weight=lc.kd_weight,
        ce_weight=lc.ce_weight,
        chunk_size=lc.chunk_size,
    )
    (out.loss_sum / out.num_tokens).backward()
    return {n: (p - lr * p.grad).detach() for n, p in model.named_parameters() if p.requires_grad}


def per_microbatch_mean_step(cfg, pairs, reader, lr):
    """The bug the trainer must not have: each micro-batch's own mean, averaged over the step."""
    model = fresh_student(cfg)
    lc = cfg.train.loss
    for pair in pairs:
        batch = collate(cfg, reader, [pair])
        mask = batch["shift_labels"] != IGNORE
        hidden = final_hidden_states(model, batch["input_ids"], batch["attention_mask"])
        out = chunked_kd_loss(
            hidden[mask],
            output_head(model).weight,
            {"logp": batch["teacher_logp"]},
            mode="dense",
            tau=lc.temperature,
            chunk_size=lc.chunk_size,
        )
        (out.loss_sum / out.num_tokens / len(pairs)).backward()
    return {n: (p - lr * p.grad).detach() for n, p in model.named_parameters() if p.requires_grad}


def trainer_step(cfg, rundir, pairs, reader, lr, batch_size, grad_accum):
    cfg = copy.deepcopy(cfg)
    cfg.train.batch_size, cfg.train.grad_accum = batch_size, grad_accum
    model = fresh_student(cfg)
    trainer = make_trainer(
        cfg,
        rundir,
        model,
        load_base(cfg).tokenizer,
        pairs,
        reader,
        False,
        optim="sgd",
        learning_rate=lr,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        max_steps=1,
        save_strategy="no",
    )
    trainer.train()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return weights, trainer.state.log_history[0]["loss"]


def test_loss_normalisation_is_independent_of_the_micro_batch_split(tmp_path):
    cfg, rundir, pairs = make_run(tmp_path, "chatml", n=4)
    lengths = [len(reply_of(p)) for p in pairs]
    assert len(set(lengths)) == 4  # different reply lengths
    reader = targets(cfg, rundir, "dense")
    lr = 1.0
    init = {n: p.detach() for n, p in fresh_student(cfg).named_parameters() if p.requires_grad}
    expected = hand_step(cfg, pairs, reader, lr)
    wrong = per_microbatch_mean_step(cfg, pairs, reader, lr)

    def delta(weights):
        return torch.cat([(weights[n] - init[n]).flatten() for n in sorted(init)])

    d_expected, d_wrong = delta(expected), delta(wrong)
    assert d_expected.abs().max() > 1e-4
    # The test can tell the two normalisations apart.
    assert (d_wrong - d_expected).norm() > 0.05 * d_expected.norm()
    logged = {}
    for batch_size, grad_accum in [(4, 1), (2, 2), (1, 4)]:
        weights, logged[batch_size] = trainer_step(
            cfg, rundir, pairs, reader, lr, batch_size, grad_accum
        )
        torch.testing.assert_close(delta(weights), d_expected, rtol=1e-4, atol=1e-7)
    # The logged loss is the step's per-token mean, whatever the split.
    assert logged[1] == pytest.approx(logged[4], rel=1e-5)
    assert logged[2] == pytest.approx(logged[4], rel=1e-5)


# --------------------------------------------------------------------------- end to end


def base_logits(cfg, pair):
    model = load_base(cfg).model
    with torch.no_grad():
        return model(torch.tensor([pair["student_prompt_ids"]])).logits


@pytest.mark.parametrize("mode", ["topk", "dense", "hidden", "online"])
def test_targets_then_train_end_to_end(tmp_path, mode):
    cfg, rundir, pairs = make_run(tmp_path, "chatml", f"targets.mode={mode}")
    before = base_logits(cfg, pairs[0])
    run_targets(cfg, rundir, progress=False)
    summary = run_train(cfg, rundir, progress=False)
    steps = len(pairs) // cfg.train.batch_size
    assert summary["steps"] == steps
    assert (rundir.adapter_dir / "adapter_config.json").exists()
    assert (rundir.adapter_dir / "adapter_model.safetensors").exists()
    assert not (rundir.path / ".adapter.tmp").exists()
    records = read_jsonl(rundir.train_log_path)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for record in records:
        assert LOG_KEYS <= set(record)
        assert record["loss"] == pytest.approx(record["kd"], rel=1e-5)  # ce_weight = 0
        assert record["reply_len"] > 1
    # The shared base model is given back as it was: no LoRA layers, eval mode, same outputs.
    base = load_base(cfg).model
    assert not any("lora" in name for name, _ in base.named_modules())
    assert not base.training
    torch.testing.assert_close(base_logits(cfg, pairs[0]), before)


def test_logged_metrics_are_averaged_over_the_logging_interval(tmp_path):
    """With logging_steps=2, each logged value is what logging every step gives, averaged over
    the interval as Trainer averages `loss`: loss, kd, ce and grad_norm are the mean of the
    steps' values (Trainer alone would log the last step's grad_norm), reply_len the mean over
    the interval's examples, learning_rate the last step's; so loss = kd + ce_weight * ce in
    every record. The last step, a partial interval, is logged too."""
    from ssb.models import set_seed

    logs = {}
    for every in (1, 2):
        cfg, rundir, _ = make_run(
            tmp_path,
            "chatml",
            f"train.logging_steps={every}",
            "train.loss.ce_weight=0.5",
            "targets.mode=hidden",
            name=f"every{every}",
        )
        run_targets(cfg, rundir, progress=False)
        set_seed(0)  # the same LoRA initialisation in both runs
        run_train(cfg, rundir, progress=False)
        logs[every] = {r["step"]: r for r in read_jsonl(rundir.train_log_path)}
    per_step, interval = logs[1], logs[2]
    assert sorted(per_step) == [1, 2, 3] and sorted(interval) == [2, 3]
    assert len({per_step[s]["reply_len"] for s in (1, 2)}) == 2  # the steps differ
    for key in ("loss", "kd", "ce", "grad_norm", "reply_len"):
        mean = (per_step[1][key] + per_step[2][key]) / 2  # both steps hold 2 examples
        assert interval[2][key] == pytest.approx(mean, rel=1e-5), key
        assert per_step[1][key] != pytest.approx(per_step[2][key], rel=1e-3), key
        assert interval[3][key] == pytest.approx(per_step[3][key], rel=1e-5), key
    assert interval[2]["learning_rate"] == per_step[2]["learning_rate"]
    for record in [*per_step.values(), *interval.values()]:
        assert record["loss"] == pytest.approx(record["kd"] + 0.5 * record["ce"], rel=1e-5)


def test_resume_from_checkpoint_without_duplicate_log_steps(tmp_path):
    cfg, rundir, pairs = make_run(tmp_path, "chatml", "train.save_steps=1")
    run_targets(cfg, rundir, progress=False)
    first = run_train(cfg, rundir, progress=False)
    assert first["steps"] == 3 and "resumed_from" not in first
    full_log = read_jsonl(rundir.train_log_path)
    assert last_checkpoint(rundir.checkpoints_dir).name == "checkpoint-3"
    # A kill after step 3 was logged, before its checkpoint and the adapter were written.
    shutil.rmtree(rundir.checkpoints_dir / "checkpoint-3")
    shutil.rmtree(rundir.adapter_dir)
    second = run_train(cfg, rundir, progress=False)
    assert second["resumed_from"] == "checkpoint-2" and second["steps"] == 3
    log = read_jsonl(rundir.train_log_path)
    assert [r["step"] for r in log] == [1, 2, 3]
    # Step 3 is redone from the same state (weights, optimizer, data order) to the same loss.
    assert log[2]["loss"] == pytest.approx(full_log[2]["loss"], rel=1e-5)
    assert log[:2] == full_log[:2]
    assert (rundir.adapter_dir / "adapter_model.safetensors").exists()
    # A changed training config does not resume these checkpoints.
    cfg.train.learning_rate = 1e-3
    with pytest.raises(ValueError, match="train.learning_rate"):
        run_train(cfg, rundir, progress=False)


def test_checkpointing_and_warmup_options(tmp_path):
    """train.gradient_checkpointing and train.warmup_ratio reach the Trainer (transformers 5
    has no `warmup_ratio` field: a float warmup_steps < 1 is the ratio); checkpointing does not
    change the result, and leaves no hook or checkpointing behind on the shared base."""
    from ssb.stages.train import training_arguments

    cfg, rundir, _ = make_run(tmp_path, "gemma", "train.warmup_ratio=0.5", "targets.mode=hidden")
    args = training_arguments(cfg, rundir, torch.device("cpu"))
    assert args.get_warmup_steps(10) == 5
    run_targets(cfg, rundir, progress=False)
    plain = run_train(cfg, rundir, progress=False)
    shutil.rmtree(rundir.checkpoints_dir)
    cfg.train.gradient_checkpointing = True
    checkpointed = run_train(cfg, rundir, progress=False)
    assert checkpointed["first_loss"] == pytest.approx(plain["first_loss"], rel=1e-5)
    assert checkpointed["last_loss"] == pytest.approx(plain["last_loss"], rel=1e-3)
    lr = [r["learning_rate"] for r in read_jsonl(rundir.train_log_path)]
    assert lr[0] < lr[1]  # warming up
    base = load_base(cfg).model
    assert not base.get_input_embeddings()._forward_hooks
    assert not checkpointing_enabled(base) and not base.training


def test_fresh_start_drops_an_old_log(tmp_path):
    cfg, rundir, _ = make_run(tmp_path, "chatml", n=2)
    run_targets(cfg, rundir, progress=False)
    rundir.train_log_path.write_text(json.dumps({"step": 7, "loss": 1.0}) + "\n")
    run_train(cfg, rundir, progress=False)
    assert [r["step"] for r in read_jsonl(rundir.train_log_path)] == [1]


def test_refusals(tmp_path):
    cfg, rundir, pairs = make_run(tmp_path, "chatml", n=2)
    cfg.targets.mode = "topk"  # stored at the loss temperature, so a changed tau must be refused
    run_targets(cfg, rundir, progress=False)  # topk at tau 2
    # LoRA on the lm_head: refused by the config (tests/test_targets.py).
    # A trainable lm_head.
    model = fresh_student(cfg)
    model.get_output_embeddings().weight.requires_grad_(True)
    with pytest.raises(ValueError, match="trainable"):
        check_head_frozen(model, "hidden")
    # Targets stored at another temperature, or in another mode.
    other = copy.deepcopy(cfg)
    other.train.loss.temperature = 1.0
    with pytest.raises(TargetStoreError, match="tau"):
        run_train(other, rundir, progress=False)
    other = copy.deepcopy(cfg)
    other.targets.mode = "dense"
    with pytest.raises(ValueError, match="holds 'topk' targets"):
        run_train(other, rundir, progress=False)
    # Pairs without stored targets.
    from pairs_fixture import make_pairs

    from ssb.rundir import append_jsonl

    append_jsonl(rundir.pairs_path, make_pairs(load_base(cfg).tokenizer, cfg)[2:3])
    with pytest.raises(ValueError, match="no stored targets"):
        run_train(cfg, rundir, progress=False)
    assert not rundir.adapter_dir.exists()
    # The shared base is intact after the failures.
    assert not any("lora" in name for name, _ in load_base(cfg).model.named_modules())


# --------------------------------------------------------------------------- embedded model

EMBEDDED_PAIRS = [
    ("Tom has 3 apples and buys 5 more. How many apples does Tom have?", "8", "3 + 5 = 8", "9"),
    ("A box holds 9 pens. Ann adds 4 pens. How many pens are in the box?", "13", "9 + 4 = 13", "12"),
    ("Sam has 12 stamps and gives away 5. How many stamps are left?", "7", "12 - 5 = 7", "17"),
    ("There are 6 birds on a tree and 7 more land. How many birds are there?", "13", "6 + 7 = 13", "1"),
    ("Mia had 15 grapes and ate 8. How many grapes are left?", "7", "15 - 8 = 7", "23"),
    ("A bag has 2 red balls and 9 blue balls. How many balls are in the bag?", "11", "2 + 9 = 11", "7"),
]  # fmt: skip


def embedded_pairs(tokenizer, cfg):
    """Few-shot pairs for the embedded base model, built like `ssb bootstrap` builds them."""
    from ssb.prompts import reply_format, teacher_messages

    end = reply_format(tokenizer, cfg.prompt).end_token_id
    pairs = []
    for i, (question, gold, work, wrong) in enumerate(EMBEDDED_PAIRS):
        problem = Problem(id=f"e{i}", question=question, answer=gold, source="test")
        reply = f" {work}. The answer is \\boxed{{{gold}}}."
        incorrect = f"{work.rsplit('=', 1)[0]}= {wrong}. The answer is \\boxed{{{wrong}}}."
        s_msgs = student_messages(problem, cfg.prompt)
        t_msgs = teacher_messages(
            problem, cfg.prompt, chat=False, correct=reply.strip(), incorrect=incorrect
        )
        pairs.append(
            pair_record(tokenizer, cfg, problem, s_msgs, t_msgs, reply, end, (incorrect, wrong))
        )
    return pairs


def kd_per_token(model, cfg, pairs, reader):
    """sum(token KD) / reply tokens over `pairs` with the loss function itself (no trainer)."""
    lc = cfg.train.loss
    total, tokens = 0.0, 0
    with torch.no_grad():
        for pair in pairs:
            batch = collate(cfg, reader, [pair])
            mask = batch["shift_labels"] != IGNORE
            hidden = final_hidden_states(model, batch["input_ids"], batch["attention_mask"])
            head = output_head(model)
            out = chunked_kd_loss(
                hidden[mask],
                head.weight,
                {k[len("teacher_") :]: v for k, v in batch.items() if k.startswith("teacher_")},
                mode=cfg.targets.mode,
                tau=lc.temperature,
                kind=lc.divergence,
                tau_squared=lc.tau_squared,
                chunk_size=lc.chunk_size,
                logit_softcap=head.softcap,
            )
            total += float(out.kd_sum)
            tokens += out.num_tokens
    return total / tokens


@pytest.mark.slow
def test_embedded_model_targets_and_one_epoch(tmp_path):
    """The embedded gemma-3-270m in the dtype a run picks on this CPU (bf16 where native, else
    float32): few-shot pairs -> top-k targets -> one epoch of LoRA training; the KD loss on the
    pairs goes down. Also measures the bytes per reply token of each stored target form."""
    import time

    from peft import PeftModel

    from ssb.config import load_config
    from ssb.rundir import RunDir, append_jsonl

    cfg = load_config(
        overrides=[
            "model.name=embedded",
            "model.dtype=auto",
            "model.device=cpu",
            "prompt.format=fewshot",
            "prompt.num_fewshot=4",
            "targets.mode=topk",
            "train.batch_size=2",
            "train.epochs=1",
            "train.learning_rate=5e-5",
            "train.lora.r=16",
            "train.lora.alpha=32",
        ]
    )
    from ssb.hardware import pick_dtype

    base = load_base(cfg)
    # Emulated bf16 (no native bf16) would take minutes per LoRA step in torch's scalar GEMM.
    assert next(base.model.parameters()).dtype == pick_dtype("auto", "cpu")
    pairs = embedded_pairs(base.tokenizer, cfg)
    blank_line = base.tokenizer.encode("\n\n", add_special_tokens=False)
    assert len(blank_line) == 1
    assert all(p["end_token_id"] == blank_line[0] for p in pairs)
    report = {}
    for mode in ("topk", "hidden", "dense"):
        rundir = RunDir(tmp_path / mode)
        append_jsonl(rundir.pairs_path, pairs)
        cfg.targets.mode = mode
        start = time.perf_counter()
        summary = run_targets(cfg, rundir, progress=False)
        report[f"{mode}_bytes_per_token"] = summary["bytes_per_reply_token"]
        report[f"{mode}_seconds"] = round(time.perf_counter() - start, 1)
    hidden_size = base.model.config.hidden_size
    vocab = output_head(base.model).weight.shape[0]
    k = cfg.targets.topk
    # Stored bytes per reply token: the tensors, the int32 reply id, and the shard header.
    assert 6 * k + 8 <= report["topk_bytes_per_token"] < 6 * k + 8 + 64
    assert 2 * hidden_size + 4 <= report["hidden_bytes_per_token"] < 2 * hidden_size + 4 + 64
    assert 4 * vocab + 4 <= report["dense_bytes_per_token"] < 4 * vocab + 4 + 64

    cfg.targets.mode = "topk"
    rundir = RunDir(tmp_path / "topk")
    reader = TargetReader(rundir.targets_dir)
    before = kd_per_token(base.model, cfg, pairs, reader)
    start = time.perf_counter()
    summary = run_train(cfg, rundir, progress=False)
    report["train_seconds"] = round(time.perf_counter() - start, 1)
    assert summary["steps"] == len(pairs) // cfg.train.batch_size
    student = PeftModel.from_pretrained(base.model, str(rundir.adapter_dir))
    try:
        after = kd_per_token(student, cfg, pairs, reader)
    finally:
        student.unload()
    report.update(kd_before=round(before, 5), kd_after=round(after, 5))
    report["train_log"] = [
        {k: round(r[k], 5) for k in ("loss", "kd", "ce", "grad_norm")}
        for r in read_jsonl(rundir.train_log_path)
    ]
    print("EMBEDDED", json.dumps(report))
    assert after < before
