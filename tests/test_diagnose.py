"""The teacher-signal diagnostic (ssb.distill.signal, ssb.stages.diagnose, `ssb diagnose`) and
the leak locator it reads (ssb.distill.hint_leaks)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from pairs_fixture import make_run

from ssb.bench.random_models import build_tokenizer
from ssb.cli import main
from ssb.config import dump_yaml
from ssb.distill.hint_leaks import (
    LeakRows,
    answer_rows,
    leak_rows,
    suppressed_tokens,
    wrong_answer_departure,
)
from ssb.distill.signal import SignalSums, verdict
from ssb.distill.store import TargetReader, TargetWriter
from ssb.rundir import read_jsonl
from ssb.stages.base import load_base
from ssb.stages.diagnose import (
    gradient_cosine,
    kd_ce_cosine,
    run_diagnose,
    run_targets_and_diagnose,
    signal_sums,
)
from ssb.stages.targets import run_targets, student_sequence, targets_meta, teacher_sequence
from ssb.stages.train import DistillCollator, student_model

# --------------------------------------------------------------------------- signal.py by hand

# 3 rows over a 5-token vocabulary; stop tokens 3 and 4; labels 0, 3, 4 (row 1's label is a stop
# token, row 2 is the final row, predicting the end token 4).
TEACHER = [
    [0.5, 0.2, 0.1, 0.1, 0.1],
    [0.1, 0.1, 0.4, 0.3, 0.1],
    [0.2, 0.2, 0.2, 0.1, 0.3],
]
STUDENT = [
    [0.3, 0.4, 0.1, 0.1, 0.1],
    [0.1, 0.1, 0.1, 0.6, 0.1],
    [0.1, 0.1, 0.1, 0.1, 0.6],
]
LABELS = [0, 3, 4]
STOPS = [3, 4]
LEAKS = LeakRows(num_rows=3, answer_phrase_row=0, wrong_answer_row=1, wrong_answer_token=2)


def _logp(table):
    return torch.tensor(table, dtype=torch.float64).log()


def _hand():
    """Every statistic of the constructed pair, computed with plain Python."""
    n = len(LABELS)
    pt = [TEACHER[i][y] for i, y in enumerate(LABELS)]
    ps = [STUDENT[i][y] for i, y in enumerate(LABELS)]

    def argmax(row):
        return max(range(len(row)), key=row.__getitem__)

    t_hit = [argmax(TEACHER[i]) == y for i, y in enumerate(LABELS)]
    s_hit = [argmax(STUDENT[i]) == y for i, y in enumerate(LABELS)]

    def entropy(row):
        return -sum(p * math.log(p) for p in row)

    def stop(row, label):  # the row's own label is not a premature stop
        return sum(row[t] for t in STOPS if t != label)

    return {
        "p_reply": (sum(pt) / n, sum(ps) / n),
        "logp_reply": (sum(map(math.log, pt)) / n, sum(map(math.log, ps)) / n),
        "argmax_accuracy": (sum(t_hit) / n, sum(s_hit) / n),
        "entropy": (sum(map(entropy, TEACHER)) / n, sum(map(entropy, STUDENT)) / n),
        "gap": sum(math.log(a) - math.log(b) for a, b in zip(pt, ps)) / n,
        "higher": sum(a > b for a, b in zip(pt, ps)) / n,
        "fixable": sum(t and not s for t, s in zip(t_hit, s_hit)) / n,
        "breakable": sum(s and not t for t, s in zip(t_hit, s_hit)) / n,
        # rows 0 and 1 only (row 2 is final); row 1's label 3 is left out of its stop mass
        "stop_nonfinal": (
            (stop(TEACHER[0], 0) + stop(TEACHER[1], 3)) / 2,
            (stop(STUDENT[0], 0) + stop(STUDENT[1], 3)) / 2,
        ),
        "stop_phrase": (stop(TEACHER[0], 0), stop(STUDENT[0], 0)),
        "wrong": (TEACHER[1][2], STUDENT[1][2]),
    }


@pytest.mark.parametrize("split", [None, 1, 2])
def test_signal_sums_match_a_hand_computation(split):
    """Each metric of SignalSums on a pair whose distributions are given; the same whether the
    rows come in one chunk or two."""
    sums = SignalSums()
    t, s, y = _logp(TEACHER), _logp(STUDENT), torch.tensor(LABELS)
    cuts = [0, 3] if split is None else [0, split, 3]
    for a, b in zip(cuts, cuts[1:]):
        sums.add(t[a:b], s[a:b], y[a:b], STOPS, LEAKS, first_row=a)
    out, hand = sums.summary(), _hand()
    assert (out["pairs"], out["reply_tokens"]) == (1, 3)
    for key in ("p_reply", "logp_reply", "argmax_accuracy", "entropy"):
        assert (out[key]["teacher"], out[key]["student"]) == pytest.approx(hand[key]), key
    assert out["advantage"]["mean_logp_gap"] == pytest.approx(hand["gap"])
    assert out["advantage"]["share_teacher_higher"] == pytest.approx(hand["higher"])
    assert (out["fixable"], out["breakable"]) == pytest.approx((hand["fixable"], hand["breakable"]))
    assert out["fixable"] == pytest.approx(1 / 3) == out["breakable"]  # rows 0 and 1
    nonfinal = out["stop_mass_nonfinal"]
    assert nonfinal["rows"] == 2
    assert (nonfinal["teacher"], nonfinal["student"]) == pytest.approx(hand["stop_nonfinal"])
    phrase, wrong = out["stop_mass_answer_phrase"], out["wrong_answer_mass"]
    assert (phrase["teacher"], phrase["student"], phrase["pairs"]) == pytest.approx(
        (*hand["stop_phrase"], 1)
    )
    assert (wrong["teacher"], wrong["student"], wrong["pairs"]) == pytest.approx(
        (*hand["wrong"], 1)
    )
    assert out["verdict"]["teacher_advantage"] is False


def test_signal_sums_skip_leaks_not_located_and_handle_zero_mass():
    """A pair without answer or wrong-answer rows counts no leak pair; a teacher with exactly
    zero mass on some tokens (-inf log-probs) has a finite entropy."""
    t = torch.tensor([[0.0, -math.inf], [-math.inf, 0.0]])
    s = torch.tensor([[math.log(0.5)] * 2] * 2)
    sums = SignalSums()
    sums.add(t, s, torch.tensor([0, 1]), [1], LeakRows(2, None, None, None))
    out = sums.summary()
    assert out["entropy"]["teacher"] == 0.0
    assert out["entropy"]["student"] == pytest.approx(math.log(2))
    assert out["stop_mass_answer_phrase"] == {"teacher": None, "student": None, "pairs": 0}
    assert out["wrong_answer_mass"]["pairs"] == 0
    assert (
        out["stop_mass_nonfinal"]["teacher"] == 0.0 and out["stop_mass_nonfinal"]["student"] == 0.5
    )
    assert out["verdict"]["teacher_advantage"] is True


def test_verdict_names_the_failed_condition():
    def summary(gap, fix, brk):
        return {"advantage": {"mean_logp_gap": gap}, "fixable": fix, "breakable": brk}

    assert verdict(summary(0.1, 0.05, 0.01))["teacher_advantage"] is True
    worse = verdict(summary(-0.01, 0.05, 0.01))
    assert worse["teacher_advantage"] is False and "<= 0" in worse["text"]
    assert "fixable" not in worse["text"]
    tie = verdict(summary(0.2, 0.01, 0.01))
    assert tie["teacher_advantage"] is False and "fixable <= breakable" in tie["text"]
    assert "<= 0" not in tie["text"]
    assert verdict(summary(None, None, None))["teacher_advantage"] is None


# --------------------------------------------------------------------------- on tiny models


def _sums(cfg, rundir, reader):
    base = load_base(cfg)
    pad = base.tokenizer.pad_token_id
    pairs = read_jsonl(rundir.pairs_path)
    stops = list(base.reply.stop_token_ids)
    return signal_sums(cfg, base.model, base.tokenizer, pairs, stops, reader, pad).summary()


NUMBERS = ("p_reply", "logp_reply", "entropy", "stop_mass_nonfinal", "wrong_answer_mass")


@pytest.mark.parametrize("mode", ["hidden", "dense"])
def test_stored_targets_give_the_teacher_forward(tmp_path, mode):
    """Teacher statistics from the store (hidden states through the head; dense log-probs stored
    at tau 2, rescaled) equal those of a live teacher forward (the topk/online route), within
    bf16 rounding for hidden states; and the teacher differs from the student (the hinted
    prompt is really used)."""
    cfg, rundir, _ = make_run(tmp_path, "chatml", f"targets.mode={mode}", n=4)
    run_targets(cfg, rundir, progress=False)
    stored = _sums(cfg, rundir, TargetReader(rundir.targets_dir))
    live = _sums(cfg, rundir, None)
    rel = 2e-2 if mode == "hidden" else 1e-4
    for key in NUMBERS:
        assert stored[key]["teacher"] == pytest.approx(live[key]["teacher"], rel=rel, abs=1e-4)
        assert stored[key]["student"] == live[key]["student"]
    assert stored["wrong_answer_mass"]["pairs"] > 0
    assert stored["p_reply"]["teacher"] != pytest.approx(stored["p_reply"]["student"], rel=1e-3)


def test_student_and_teacher_rows_are_the_models_own(tmp_path):
    """p(reply token) of both sides equals a direct HF forward over the full sequence, read at
    position t for token t + 1: no row is shifted."""
    cfg, rundir, pairs = make_run(tmp_path, "gemma", "targets.mode=online", n=3)
    out = _sums(cfg, rundir, None)
    model = load_base(cfg).model
    totals = {"teacher": 0.0, "student": 0.0}
    tokens = 0
    for pair in pairs:
        for side, seq in (("teacher", teacher_sequence), ("student", student_sequence)):
            prompt, reply = seq(pair)
            ids = torch.tensor([prompt + reply])
            with torch.no_grad():
                logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
            rows = logp[len(prompt) - 1 : len(prompt) - 1 + len(reply)]
            totals[side] += rows.gather(1, torch.tensor(reply)[:, None]).exp().sum().item()
        tokens += len(pair["reply_ids"]) + 1
    assert out["reply_tokens"] == tokens
    for side in totals:
        assert out["p_reply"][side] == pytest.approx(totals[side] / tokens, rel=1e-4)


def _one_hot_store(cfg, rundir, shift: int) -> TargetReader:
    """Replace the dense store by one-hot teacher log-probs on each row's reply token (`shift`
    rows later: a misaligned teacher)."""
    base = load_base(cfg)
    meta = targets_meta(cfg, base.model, base.tokenizer)
    vocab = meta["vocab_size"]
    directory = rundir.path / f"onehot{shift}"
    with TargetWriter(directory, mode="dense", meta=meta, shard_size=8) as writer:
        for pair in read_jsonl(rundir.pairs_path):
            reply = student_sequence(pair)[1]
            ids = torch.tensor(reply).roll(-shift)
            logp = torch.full((len(reply), vocab), -math.inf)
            logp[torch.arange(len(reply)), ids] = 0.0
            writer.add(pair["id"], reply, {"logp": logp})
    return TargetReader(directory)


def test_gradient_cosine_is_one_when_kd_is_ce(tmp_path):
    """Forward KL to a one-hot teacher at tau 1 is CE, so their gradients are parallel: cosine
    +1. The same teacher one row off gives a clearly smaller cosine, so a KD term that ignored
    the teacher (both terms CE) or read misaligned rows would fail the first assertion or the
    second. The base comes back without LoRA layers."""
    cfg, rundir, _ = make_run(
        tmp_path, "chatml", "targets.mode=dense", "train.loss.temperature=1", n=4
    )
    base = load_base(cfg)
    pad = base.tokenizer.pad_token_id
    pairs = read_jsonl(rundir.pairs_path)
    aligned = gradient_cosine(cfg, base.model, pairs, _one_hot_store(cfg, rundir, 0), pad)
    assert aligned["value"] == pytest.approx(1.0, abs=1e-5)
    assert aligned["batches"] == 2 and aligned["pairs"] == 4
    off = gradient_cosine(cfg, base.model, pairs, _one_hot_store(cfg, rundir, 1), pad)
    assert off["value"] < 0.9
    assert not hasattr(base.model, "peft_config")
    assert not any("lora" in name for name, _ in base.model.named_modules())


def test_gradient_cosine_runs_the_loss_with_its_target_filter(tmp_path):
    """With train.loss.target_filter the cosine is measured on the filtered teacher (what
    training distils): the collator carries the suppressed ids, aligned with the reply rows, so
    a one-hot teacher on the labels (never suppressed) still gives +1."""
    cfg, rundir, _ = make_run(
        tmp_path,
        "chatml",
        "targets.mode=dense",
        "train.loss.temperature=1",
        "train.loss.target_filter=true",
        n=4,
    )
    base = load_base(cfg)
    pairs = read_jsonl(rundir.pairs_path)
    reader = _one_hot_store(cfg, rundir, 0)
    out = gradient_cosine(
        cfg, base.model, pairs, reader, base.tokenizer.pad_token_id, base.tokenizer
    )
    assert out["target_filter"] is True and out["value"] == pytest.approx(1.0, abs=1e-5)


def test_kd_ce_cosine_uses_the_loss_settings(tmp_path):
    """At tau 2 against the same one-hot teacher the KD gradient is no longer CE's."""
    cfg, rundir, _ = make_run(tmp_path, "chatml", "targets.mode=dense", n=2)
    base = load_base(cfg)
    reader = _one_hot_store(cfg, rundir, 0)

    collator = DistillCollator(pad_id=base.tokenizer.pad_token_id, mode="dense", reader=reader)
    batches = [collator(read_jsonl(rundir.pairs_path))]
    model = student_model(cfg, base.model)
    try:
        model.eval()
        cosine = kd_ce_cosine(model, batches, cfg.train.loss, "dense")
    finally:
        model.unload()
    assert 0.0 < cosine < 0.999


def _write_config(cfg, path):
    path.write_text(dump_yaml(cfg))
    return str(path)


def test_diagnose_command_writes_the_file(tmp_path, capsys):
    cfg, rundir, _ = make_run(tmp_path, "chatml", "targets.mode=hidden", n=4)
    run_targets(cfg, rundir, progress=False)
    assert not rundir.teacher_signal_path.exists()  # tiny_config: targets.diagnose off
    config = _write_config(cfg, tmp_path / "cfg.yaml")
    assert main(["diagnose", "--run-dir", str(rundir.path), "--config", config, "--quiet"]) == 0
    result = json.loads(rundir.teacher_signal_path.read_text())
    assert result["teacher_source"].startswith("stored hidden targets")
    assert result["pairs"] == 4 and result["reply_tokens"] > 0
    for key in ("p_reply", "entropy", "advantage", "fixable", "breakable", "stop_mass_nonfinal"):
        assert key in result
    assert result["grad_cosine"]["batches"] == 2
    assert -1.0 <= result["grad_cosine"]["value"] <= 1.0
    assert result["verdict"]["text"]
    printed = json.loads(capsys.readouterr().out)
    assert printed["stage"] == "diagnose" and printed["path"].endswith("teacher_signal.json")
    # Re-running rewrites it (no error, same numbers).
    again = run_diagnose(cfg, rundir, progress=False)
    assert again["teacher_p_reply"] == result["p_reply"]["teacher"]
    # The report, the model card and the ablation report show it.
    from ssb.ablation.report import teacher_signal_by_context
    from ssb.report import write_report
    from ssb.share.cards import model_card
    from ssb.share.facts import read_run_facts

    report = write_report(rundir, cfg).read_text()
    assert "## Teacher signal" in report and result["verdict"]["text"] in report
    card = str(model_card(read_run_facts(rundir), None, None, 4))
    assert "## Teacher signal" in card and "gradient cosine" in card
    lines = teacher_signal_by_context({"ssb": result, "ssb.gold": None}, "##")
    assert lines[0] == "### Teacher signal per teacher" and len(lines) == 9  # 2 rows
    assert lines[6].startswith("| ssb | correct_and_incorrect, inline |")


def test_diagnose_without_targets_is_a_one_line_error(tmp_path, capsys):
    cfg, rundir, _ = make_run(tmp_path, "chatml", "targets.mode=hidden", n=2)
    config = _write_config(cfg, tmp_path / "cfg.yaml")
    capsys.readouterr()  # what saving the tiny model printed
    assert main(["diagnose", "--run-dir", str(rundir.path), "--config", config, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ssb: error:") and "ssb targets" in err and "\n" not in err


@pytest.mark.parametrize("mode", ["hidden", "online"])
def test_targets_writes_the_diagnostic_when_asked(tmp_path, mode):
    cfg, rundir, _ = make_run(
        tmp_path, "chatml", f"targets.mode={mode}", "targets.diagnose=true",
        "targets.diagnose_batches=1", n=3,
    )  # fmt: skip
    config = _write_config(cfg, tmp_path / "cfg.yaml")
    assert main(["targets", "--run-dir", str(rundir.path), "--config", config, "--quiet"]) == 0
    result = json.loads(rundir.teacher_signal_path.read_text())
    assert result["target_mode"] == mode
    assert ("forward" in result["teacher_source"]) == (mode == "online")
    assert result["grad_cosine"]["batches"] == 1
    manifest = rundir.read_manifest()
    assert manifest["stages"]["targets"]["diagnostic"]["path"].endswith("teacher_signal.json")


def test_targets_skips_the_diagnostic_when_off(tmp_path):
    cfg, rundir, _ = make_run(tmp_path, "chatml", "targets.diagnose=false", n=2)
    summary = run_targets_and_diagnose(cfg, rundir, progress=False)
    assert "diagnostic" not in summary and not rundir.teacher_signal_path.exists()


def test_diagnose_batches_must_not_be_negative():
    from ssb.config import ConfigError, load_config

    assert load_config(overrides=["targets.diagnose_batches=0"]).targets.diagnose_batches == 0
    with pytest.raises(ConfigError, match="targets.diagnose_batches"):
        load_config(overrides=["targets.diagnose_batches=-1"])


# --------------------------------------------------------------------------- hint_leaks.py


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("chatml")


def _decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize(
    ("reply", "first_word", "break_char"),
    [
        (" So 12 - 4 = 8 books. The answer is \\boxed{8}.", "The", "."),
        (" 3 + 5 = 8.\nThe answer is \\boxed{8}.", "The", "\n"),
        (" First \\boxed{2}, then: the total is \\boxed{18}.", "the", ":"),
    ],
)
def test_answer_rows_point_at_the_answer_sentence_and_the_boxed_value(
    tok, reply, first_word, break_char
):
    """Row i predicts token i: the phrase row's token starts the answer's sentence (the text
    before it ends at the break), and the boxed row follows the last "\\boxed{"."""
    ids = tok.encode(reply, add_special_tokens=False)
    phrase, boxed = answer_rows(ids, tok)
    before, at = _decode(tok, ids[:phrase]), _decode(tok, ids[phrase : phrase + 1])
    assert at.strip() and first_word.startswith(at.strip()), (before, at)
    assert before.rstrip(" ").endswith(break_char)
    assert _decode(tok, ids[:boxed]).endswith("\\boxed{")
    assert _decode(tok, ids[:boxed]).count("\\boxed{") == reply.count("\\boxed{")


def test_answer_rows_without_a_boxed_answer(tok):
    assert answer_rows(tok.encode(" no answer here.", add_special_tokens=False), tok) == (
        None,
        None,
    )
    ids = tok.encode(" \\boxed{2}", add_special_tokens=False)
    phrase, boxed = answer_rows(ids, tok)
    # The box is in the first sentence: the answer phrase starts at the reply's first row.
    assert phrase == 0 and _decode(tok, ids[:boxed]).endswith("\\boxed{")


@pytest.mark.parametrize(("right", "wrong"), [("8", "3"), ("18", "13"), ("14", "140")])
def test_wrong_answer_departure_is_where_the_wrong_answer_differs(tok, right, wrong):
    reply = f" So the answer is \\boxed{{{right}}}."
    ids = tok.encode(reply, add_special_tokens=False)
    _, boxed = answer_rows(ids, tok)
    row, token = wrong_answer_departure(ids, boxed, wrong, tok)
    assert boxed <= row < len(ids) and token != ids[row]
    # Writing `token` at `row` after the reply's own tokens heads towards the wrong answer.
    text = _decode(tok, ids[:row] + [token])
    assert text[len(_decode(tok, ids[:boxed])) :] in wrong + "}"


def test_wrong_answer_departure_none_for_a_prefix_answer(tok):
    ids = tok.encode(" The answer is \\boxed{18}.", add_special_tokens=False)
    _, boxed = answer_rows(ids, tok)
    # The reply's own answer: no departure, although "}." is one token here and "}" another.
    assert wrong_answer_departure(ids, boxed, "18", tok) is None
    row, token = wrong_answer_departure(ids, boxed, "1", tok)  # a prefix answer still departs
    assert row >= boxed and _decode(tok, [token]) != _decode(tok, ids[row : row + 1])


def test_leak_rows_of_a_pair_and_suppressed_tokens(tmp_path):
    cfg, _, pairs = make_run(tmp_path, "chatml", n=3)
    tok = load_base(cfg).tokenizer
    for pair in pairs:
        leaks = leak_rows(pair, tok)
        assert leaks.num_rows == len(pair["reply_ids"]) + 1
        assert leaks.wrong_answer_row is not None  # fixture: the wrong answer is 3
        labels = student_sequence(pair)[1]
        stops = [pair["end_token_id"], tok.eos_token_id]
        rows = suppressed_tokens(leaks, stops, labels)
        assert len(rows) == leaks.num_rows and rows[-1] == []  # the last row may stop
        for i, ids in enumerate(rows[:-1]):
            assert set(stops) - {labels[i]} <= set(ids) and labels[i] not in ids
        assert leaks.wrong_answer_token in rows[leaks.wrong_answer_row]
    same = dict(pairs[0], incorrect_answer=pairs[0]["teacher_answer"])
    assert leak_rows(same, tok).wrong_answer_row is None
