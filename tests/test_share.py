"""`ssb export` and `ssb import-pairs` on a tiny run made by the real stages (targets, train, eval
on a tiny random model): the exported dataset loads with `datasets`, the adapter with PEFT, the
cards carry the run's numbers; export -> import-pairs gives back the same pairs.jsonl records;
the reference implementation's JSONL files import and train; bad input is refused by file, line
and field without touching what pairs.jsonl already holds; pushing without a token or hub fails
with a clear message."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from pairs_fixture import make_run

from ssb.cli import main
from ssb.problems import Problem
from ssb.prompts import render_prompt_ids, reply_format, student_messages
from ssb.report import pct, pct_interval
from ssb.rundir import RunDir, append_jsonl, read_jsonl
from ssb.share import DATASET_DIR, MODEL_DIR, PAIR_FIELDS, PARQUET_NAME, ShareError
from ssb.share.export import export_run
from ssb.share.import_pairs import run_import_pairs
from ssb.stages.base import load_base
from ssb.stages.evaluate import run_eval
from ssb.stages.targets import run_targets
from ssb.stages.train import run_train

# bootstrap.jsonl of the tiny run: 6 kept pairs (p0..p5) and one problem per rejection reason.
REJECTED = [
    ("r0", "all_correct"),
    ("r1", "all_correct"),
    ("r2", "all_wrong"),
    ("r3", "no_boxed_wrong"),
    ("r4", "teacher_wrong"),
    ("r5", "teacher_truncated"),
]
BENCH = [
    ("b1", "Tom has 3 apples and buys 4 more. How many apples?", "7"),
    ("b2", "Ann has 10 books and gives away 2. How many books?", "8"),
    ("b3", "Sam has 5 eggs and eats 1. How many eggs?", "4"),
    ("b4", "Zoe finds 6 marbles and 6 more. How many marbles?", "12"),
]
REFERENCE_SYSTEM = (
    "**Role:** You are an expert math tutor. You put your final answer within \\boxed{}."
)


def _stage(rundir, name, fn):
    """Run a stage as the CLI does: its summary recorded in the manifest."""
    with rundir.stage(name) as summary:
        summary.update(fn())
    return summary


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny chat-template run: pairs, funnel files, targets, a trained adapter, an evaluation."""
    tmp = tmp_path_factory.mktemp("share")
    bench = tmp / "mini.jsonl"
    bench.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for _, q, a in BENCH))
    overrides = [
        f"eval.benchmarks={bench}",
        "eval.max_problems=4",
        "generation.backend=hf",
        "generation.batch_size=4",
        "generation.max_new_tokens=6",
    ]
    cfg, rundir, pairs = make_run(tmp, "chatml", *overrides)
    rundir.init(cfg, "bootstrap")
    ids = [p["id"] for p in pairs] + [i for i, _ in REJECTED]
    append_jsonl(rundir.rollouts_path, [{"id": i, "samples": []} for i in ids])
    decisions = [{"id": p["id"], "status": "kept"} for p in pairs]
    append_jsonl(
        rundir.bootstrap_log_path, decisions + [{"id": i, "status": s} for i, s in REJECTED]
    )
    _stage(rundir, "targets", lambda: run_targets(cfg, rundir, progress=False))
    _stage(rundir, "train", lambda: run_train(cfg, rundir, progress=False))
    _stage(rundir, "eval", lambda: run_eval(cfg, rundir, progress=False))
    return cfg, rundir, pairs, tmp


@pytest.fixture(scope="module")
def exported(run):
    cfg, rundir, pairs, tmp = run
    out = tmp / "export"
    summary = export_run(rundir, out)
    return out, summary


def _fresh(tmp_path, cfg, name="fresh"):
    rundir = RunDir(tmp_path / name)
    rundir.init(cfg, "import-pairs")
    return rundir


def _reference_files(directory, examples, system=REFERENCE_SYSTEM):
    """The reference's two aligned files (as its logit_gen.py writes them) for `examples`."""
    directory.mkdir(parents=True, exist_ok=True)
    teacher, student = [], []
    for question, _, reply in examples:
        hinted = (
            "We have two sample responses from students for a math problem.\n---\n"
            f"{question}\n---\nWrite a robust, standalone solution."
        )
        teacher.append(
            {
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": hinted},
                    {"role": "assistant", "content": reply},
                ]
            }
        )
        student.append(
            {
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": question},
                ]
            }
        )
    paths = []
    for name, rows in (("teacher", teacher), ("student", student)):
        path = directory / f"generated_math_{name}_data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- export


def test_pair_fields_are_the_bootstrap_record(run):
    _, rundir, pairs, _ = run
    assert all(tuple(p) == PAIR_FIELDS for p in read_jsonl(rundir.pairs_path))


def test_exported_dataset_loads_with_datasets(run, exported, tmp_path):
    from datasets import load_dataset

    _, rundir, pairs, _ = run
    out, summary = exported
    assert summary["pairs"] == len(pairs) == 6
    files = str(out / DATASET_DIR / "data" / "*.parquet")
    ds = load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path))
    assert ds.column_names == list(PAIR_FIELDS)
    assert [dict(row) for row in ds] == read_jsonl(rundir.pairs_path)
    # The folder itself loads too, through the `configs` of its card.
    folder = load_dataset(str(out / DATASET_DIR), split="train", cache_dir=str(tmp_path))
    assert folder["id"] == [p["id"] for p in pairs]


def test_exported_adapter_is_the_runs_and_loads_with_peft(run, exported):
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    from ssb.identity import adapter_hash
    from ssb.models import load_model

    cfg, rundir, pairs, _ = run
    out, _ = exported
    model_dir = out / MODEL_DIR
    copied = {p.name for p in rundir.adapter_dir.iterdir()} - {"README.md"}
    assert {p.name for p in model_dir.iterdir()} == copied | {"README.md"}
    for name in copied - {"adapter_config.json"}:
        assert (model_dir / name).read_bytes() == (rundir.adapter_dir / name).read_bytes()
    # The config differs only in naming the base's public identity (here, a local model).
    exported_config = json.loads((model_dir / "adapter_config.json").read_text())
    run_config = json.loads((rundir.adapter_dir / "adapter_config.json").read_text())
    assert exported_config == {**run_config, "base_model_name_or_path": cfg.model.name}
    summary = json.loads((rundir.eval_dir / "summary.json").read_text())
    assert adapter_hash(model_dir) == summary["models"]["student"]["adapter_hash"]

    model = PeftModel.from_pretrained(load_model(cfg.model), str(model_dir))
    state = get_peft_model_state_dict(model)
    saved = load_file(model_dir / "adapter_model.safetensors")
    assert saved and all(torch.equal(state[k], v) for k, v in saved.items())
    ids = torch.tensor([pairs[0]["student_prompt_ids"]])
    with torch.no_grad():
        student = model(ids).logits
        with model.disable_adapter():
            base = model(ids).logits
    assert not torch.equal(student, base)  # the trained LoRA is on


def test_cards_carry_the_runs_numbers(run, exported):
    from huggingface_hub import DatasetCard, ModelCard

    cfg, rundir, pairs, _ = run
    out, _ = exported
    card = DatasetCard.load(out / DATASET_DIR / "README.md")
    # The replies are the tiny model's output, whose licence ssb does not know.
    assert (card.data.license, card.data.license_name) == ("other", "model-output")
    assert "apache-2.0" in card.text  # synthetic problems: ssb's own generator
    assert card.data.configs[0]["data_files"][0]["path"] == "data/train-*.parquet"
    for row in (
        "| problems rolled out | 12 |",
        "| - all rollouts correct (too easy) | 2 |",
        "| - all rollouts wrong (too hard) | 1 |",
        "| - wrong rollouts without a boxed answer | 1 |",
        "| mixed (sent to the hinted teacher) | 8 |",
        "| - teacher's answer wrong | 1 |",
        "| - teacher hit the token limit | 1 |",
        "| kept pairs | 6 |",
        f"| model (rollouts and replies) | `{cfg.model.name}` |",
        f"- system prompt: `{cfg.prompt.system_prompt}`",
    ):
        assert row in card.text, row
    assert json.dumps(pairs[0]["reply"], ensure_ascii=False) in card.text  # the example pair

    card = ModelCard.load(out / MODEL_DIR / "README.md")
    assert card.data.library_name == "peft" and card.data.base_model is None  # a local base
    summary = json.loads((rundir.eval_dir / "summary.json").read_text())
    bench = cfg.eval.benchmarks[0]
    for model in ("base", "student"):
        r = summary["results"][model][bench]
        row = f"| {model} | mini | 4 | {pct(r['accuracy'])} {pct_interval(r['interval'])} |"
        assert row in card.text, row
    student = summary["results"]["student"][bench]
    assert [e.metric_value for e in card.data.eval_results] == [round(100 * student["accuracy"], 2)]
    c = summary["comparisons"]["student"][bench]
    assert (
        f"| student vs base | mini | 4 | {c['wins']} | {c['losses']} | {c['ties']} |" in card.text
    )
    steps = rundir.read_manifest()["stages"]["train"]["steps"]
    for row in (
        "| LoRA r / alpha / dropout | 4 / 8 / 0.0 |",
        "| learning rate | 0.0002 |",
        "| batch size x gradient accumulation | 2 x 1 |",
        "| teacher targets | `hidden` |",
        f"| optimizer steps | {steps} |",
        'PeftModel.from_pretrained(base, "<this folder>")',
        'LoRARequest("ssb-student", 1, adapter_path)',
        "max_lora_rank=8",
        "outputs = llm.chat(messages, params, lora_request=student)",
    ):
        assert row in card.text, row
    # The prompt shown is the text whose tokens the student was trained on.
    text = card.text.split("the text the tokenizer encodes:\n\n```\n")[1].split("\n```")[0]
    tok = load_base(cfg).tokenizer
    assert tok(text, add_special_tokens=False)["input_ids"] == pairs[0]["student_prompt_ids"]


def test_export_refuses_a_stale_evaluation_and_a_foreign_out_dir(run, tmp_path):
    from safetensors.torch import load_file, save_file

    _, rundir, _, _ = run
    copy = RunDir(tmp_path / "run")
    shutil.copytree(rundir.path, copy.path)
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    with pytest.raises(ShareError, match="not empty and holds no earlier ssb export"):
        export_run(copy, stray)
    assert (stray / "notes.txt").read_text() == "mine"

    weights = copy.adapter_dir / "adapter_model.safetensors"
    save_file({k: 2 * v for k, v in load_file(weights).items()}, weights)
    with pytest.raises(ShareError, match="trained again since"):
        export_run(copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    # No adapter (not trained yet): the pairs alone; an earlier export in `out` is replaced.
    shutil.rmtree(copy.adapter_dir)
    export_run(copy, stray.parent / "first")
    summary = export_run(copy, stray.parent / "first")
    assert summary["model"] is None
    assert sorted(p.name for p in (tmp_path / "first").iterdir()) == [DATASET_DIR]


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("where", ["export", "dataset", "parquet"])
def test_export_then_import_gives_the_same_pairs(run, exported, tmp_path, where):
    cfg, rundir, _, _ = run
    out, _ = exported
    source = {
        "export": out,
        "dataset": out / DATASET_DIR,
        "parquet": out / DATASET_DIR / PARQUET_NAME,
    }[where]
    fresh = _fresh(tmp_path, cfg)
    summary = run_import_pairs(cfg, fresh, source)
    assert summary["format"] == "ssb" and summary["imported"] == 6
    assert summary["reply_ids"] == "stored (same tokenizer)"
    original = read_jsonl(rundir.pairs_path)
    imported = read_jsonl(fresh.pairs_path)
    assert imported == original  # every field, every record, in order
    assert all(tuple(p) == PAIR_FIELDS for p in imported)
    # A second import changes nothing.
    before = fresh.pairs_path.read_bytes()
    again = run_import_pairs(cfg, fresh, source)
    assert again["imported"] == 0 and again["already_present"] == 6
    assert fresh.pairs_path.read_bytes() == before


def test_imported_pairs_give_the_same_targets_and_train(run, exported, tmp_path):
    from ssb.distill.store import TargetReader

    cfg, rundir, pairs, _ = run
    out, _ = exported
    fresh = _fresh(tmp_path, cfg)
    # A killed earlier import left two pairs and a torn line: they stay, byte for byte.
    kept = "".join(line + "\n" for line in rundir.pairs_path.read_text().splitlines()[:2])
    fresh.pairs_path.write_text(kept + '{"id": "p2", "quest')
    summary = run_import_pairs(cfg, fresh, out)
    assert summary["imported"] == 4 and summary["already_present"] == 2
    assert fresh.pairs_path.read_text().startswith(kept)
    assert read_jsonl(fresh.pairs_path) == read_jsonl(rundir.pairs_path)

    run_targets(cfg, fresh, progress=False)
    theirs, ours = TargetReader(rundir.targets_dir), TargetReader(fresh.targets_dir)
    for pair in pairs:
        (reply_a, a), (reply_b, b) = theirs.get(pair["id"]), ours.get(pair["id"])
        assert reply_a == reply_b and all(torch.equal(a[k], b[k]) for k in a)
    trained = run_train(cfg, fresh, progress=False)
    assert trained["steps"] == 3 and (fresh.adapter_dir / "adapter_model.safetensors").exists()


def test_import_into_another_tokenizer_renders_and_tokenises_again(run, exported, tmp_path):
    from pairs_fixture import tiny_config

    from ssb.bench.random_models import save_tiny_model

    out, _ = exported
    cfg = tiny_config(save_tiny_model(tmp_path / "gemma", "gemma3", "gemma"))
    fresh = _fresh(tmp_path, cfg)
    summary = run_import_pairs(cfg, fresh, out)
    assert summary["imported"] == 6 and summary["reply_ids"] == "tokenised from the text"
    tok = load_base(cfg).tokenizer
    end = reply_format(tok, cfg.prompt).end_token_id
    assert tok.convert_ids_to_tokens(end) == "<end_of_turn>"
    exported_rows = {r["id"]: r for r in read_jsonl(run[1].pairs_path)}
    for pair in read_jsonl(fresh.pairs_path):
        problem = Problem(pair["id"], pair["question"], pair["gold"], pair["source"])
        s_msgs = student_messages(problem, cfg.prompt)
        assert pair["student_messages"] == s_msgs
        assert pair["student_prompt_ids"] == render_prompt_ids(tok, s_msgs, cfg.prompt)
        t_msgs = exported_rows[pair["id"]]["teacher_messages"]
        assert pair["teacher_prompt_ids"] == render_prompt_ids(tok, t_msgs, cfg.prompt)
        assert pair["reply_ids"] == tok(pair["reply"], add_special_tokens=False)["input_ids"]
        assert pair["end_token_id"] == end
    run_targets(cfg, fresh, progress=False)
    assert run_train(cfg, fresh, progress=False)["steps"] == 3


# --------------------------------------------------------------------------- reference format


def test_reference_files_import_then_targets_and_train(tmp_path):
    from pairs_fixture import EXAMPLES

    cfg, _, _ = make_run(tmp_path, "chatml", name="unused")
    rundir = _fresh(tmp_path, cfg)
    folder = tmp_path / "reference"
    teacher, student = _reference_files(folder, EXAMPLES[:2])
    first = run_import_pairs(cfg, rundir, teacher)  # the teacher file: the student one is found
    assert first["format"] == "reference" and first["imported"] == 2
    kept = rundir.pairs_path.read_bytes()
    _reference_files(folder, EXAMPLES)  # the full files: resumes after the first two
    summary = run_import_pairs(cfg, rundir, folder)
    assert summary["imported"] == 4 and summary["already_present"] == 2
    assert summary["other_student_system_prompt"] == 4  # the reference's, not the run's
    assert rundir.pairs_path.read_bytes().startswith(kept)

    tok = load_base(cfg).tokenizer
    pairs = read_jsonl(rundir.pairs_path)
    assert len({p["id"] for p in pairs}) == 6
    for pair, (question, gold, reply) in zip(pairs, EXAMPLES):
        assert tuple(pair) == PAIR_FIELDS and pair["id"].startswith("ref-")
        assert (pair["question"], pair["gold"], pair["teacher_answer"]) == (question, gold, gold)
        assert pair["source"] == "reference" and pair["correct_rollout"] is None
        # The student: the run's own inference prompt, through the one renderer.
        s_msgs = student_messages(Problem(pair["id"], question, gold, "reference"), cfg.prompt)
        assert pair["student_messages"] == s_msgs
        assert pair["student_prompt_ids"] == render_prompt_ids(tok, s_msgs, cfg.prompt)
        # The teacher: the imported system + hinted user, through the run's chat template.
        assert [m["role"] for m in pair["teacher_messages"]] == ["system", "user"]
        assert pair["teacher_messages"][0]["content"] == REFERENCE_SYSTEM
        text = tok.decode(pair["teacher_prompt_ids"])
        assert text.startswith("<|im_start|>system\n" + REFERENCE_SYSTEM + "<|im_end|>")
        assert text.endswith(question + "\n---\nWrite a robust, standalone solution.<|im_end|>\n"
                             "<|im_start|>assistant\n")  # fmt: skip
        assert pair["reply"] == reply
        assert pair["reply_ids"] == tok(reply, add_special_tokens=False)["input_ids"]
        assert tok.convert_ids_to_tokens(pair["end_token_id"]) == "<|im_end|>"
    run_targets(cfg, rundir, progress=False)
    assert run_train(cfg, rundir, progress=False)["steps"] == 3
    # Exported again: the unknown rollouts are typed nulls, the problems' licence is unknown.
    from datasets import load_dataset
    from huggingface_hub import DatasetCard

    export_run(rundir, tmp_path / "export")
    files = str(tmp_path / "export" / DATASET_DIR / PARQUET_NAME)
    ds = load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "c"))
    assert ds.features["correct_rollout"].dtype == "string" and ds["correct_rollout"] == [None] * 6
    assert [dict(row) for row in ds] == pairs
    card = DatasetCard.load(tmp_path / "export" / DATASET_DIR / "README.md")
    assert card.data.license == "other" and "(reference format)" in card.text
    assert "| model (rollouts and replies) | a model the imported files do not name |" in card.text
    assert "teacher sampling" not in card.text  # this run's bootstrap made none of them


def _corrupt(lines, i, value):
    lines[i] = value if isinstance(value, str) else json.dumps(value)


def _roles(*roles):
    return {"messages": [{"role": r, "content": "x \\boxed{1}"} for r in roles]}


BAD_REFERENCE = {
    "not json": ("teacher", 1, "{not json", r"teacher_data\.jsonl line 2: not valid JSON"),
    "no messages": ("student", 2, {"msgs": []}, r"student_data\.jsonl line 3: no field 'messages'"),
    "no reply": (
        "teacher",
        0,
        _roles("system", "user"),
        r"teacher_data\.jsonl line 1: field 'messages' has roles \['system', 'user'\]",
    ),
    "not text": (
        "teacher",
        3,
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},
        r"teacher_data\.jsonl line 4: field 'messages\[0\]\.content' must be a non-empty string",
    ),
    "no boxed answer": (
        "teacher",
        1,
        None,  # the reply without its box, set below
        r"teacher_data\.jsonl line 2: field messages\[-1\]\.content \(the reply\) has no",
    ),
    "misaligned": ("student", 0, None, r"student_data\.jsonl line 1: the question is not in"),
    "missing line": ("student", 5, "", r"has 6 records but .*student_data\.jsonl has 5"),
}


@pytest.mark.parametrize("case", sorted(BAD_REFERENCE))
def test_bad_reference_input_names_file_line_field_and_writes_nothing(tmp_path, case, capsys):
    from pairs_fixture import EXAMPLES

    cfg, _, _ = make_run(tmp_path, "chatml", name="unused")
    rundir = _fresh(tmp_path, cfg)
    rundir.pairs_path.write_text('{"id": "earlier"}\n')
    teacher, student = _reference_files(tmp_path / "ref", EXAMPLES)
    side, index, value, message = BAD_REFERENCE[case]
    path = teacher if side == "teacher" else student
    lines = path.read_text().splitlines()
    if case == "no boxed answer":
        record = json.loads(lines[index])
        record["messages"][-1]["content"] = "no box here"
        value = record
    if case == "misaligned":
        lines[0], lines[1] = lines[1], lines[0]
    else:
        _corrupt(lines, index, value)
    path.write_text("".join(line + "\n" for line in lines if line))
    with pytest.raises(ShareError, match=message):
        run_import_pairs(cfg, rundir, tmp_path / "ref")
    assert rundir.pairs_path.read_text() == '{"id": "earlier"}\n'
    # Through the CLI: one line naming the same place, exit status 2.
    argv = ["import-pairs", "--run-dir", str(rundir.path), "--from", str(tmp_path / "ref")]
    assert main([*argv, "--quiet"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("ssb: error: ") and path.name in last


def test_bad_ssb_export_names_file_row_field(exported, run, tmp_path):
    import pyarrow.parquet as pq

    cfg, _, _, _ = run
    out, _ = exported
    rundir = _fresh(tmp_path, cfg)
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    parquet = bad / DATASET_DIR / PARQUET_NAME
    table = pq.read_table(parquet)
    rows = table.to_pylist()
    rows[1]["reply"] += " Edited."
    pq.write_table(table.from_pylist(rows, schema=table.schema), parquet)
    with pytest.raises(ShareError, match=r"row 2: field reply_ids does not decode to field reply"):
        run_import_pairs(cfg, rundir, bad)
    rows[1]["reply"], rows[0]["gold"] = table.to_pylist()[1]["reply"], None
    pq.write_table(table.from_pylist(rows, schema=table.schema), parquet)
    with pytest.raises(ShareError, match=r"train-00000-of-00001\.parquet row 1: field 'gold'"):
        run_import_pairs(cfg, rundir, bad)
    pq.write_table(table.drop_columns(["reply_ids"]), parquet)
    with pytest.raises(ShareError, match="no column 'reply_ids'"):
        run_import_pairs(cfg, rundir, bad)
    assert not rundir.pairs_path.exists()


# --------------------------------------------------------------------------- the hub and the CLI


def _no_hub_credentials(monkeypatch, tmp_path):
    from huggingface_hub import constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


def test_push_without_a_token_fails_before_anything(run, tmp_path, monkeypatch, capsys):
    _, rundir, _, _ = run
    _no_hub_credentials(monkeypatch, tmp_path)
    # An endpoint that would fail differently, were it contacted.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(ShareError, match="needs a Hugging Face token .* HF_TOKEN"):
        export_run(rundir, tmp_path / "out", push_to_hub="someone/ssb-student")
    assert not (tmp_path / "out").exists()
    argv = ["export", "--run-dir", str(rundir.path), "--out", str(tmp_path / "out")]
    assert main([*argv, "--push-to-hub", "someone/ssb-student", "--quiet"]) == 2
    assert "ssb: error: --push-to-hub needs a Hugging Face token" in capsys.readouterr().err


def test_push_to_an_unreachable_hub_keeps_the_export(run, tmp_path, monkeypatch):
    _, rundir, _, _ = run
    _no_hub_credentials(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(ShareError, match=r"http://127\.0\.0\.1:9 is not reachable; the export is"):
        export_run(rundir, tmp_path / "out", push_to_hub="someone/ssb-student")
    assert (tmp_path / "out" / DATASET_DIR / PARQUET_NAME).is_file()
    assert (tmp_path / "out" / MODEL_DIR / "adapter_model.safetensors").is_file()
    # The cards name the repos the upload would have gone to.
    card = (tmp_path / "out" / MODEL_DIR / "README.md").read_text()
    assert 'snapshot_download("someone/ssb-student")' in card
    assert "datasets:\n- someone/ssb-student-pairs" in card


def test_cli_import_then_export_names_the_origin(run, exported, tmp_path, capsys):
    from huggingface_hub import DatasetCard

    _, rundir, _, _ = run
    out, _ = exported
    fresh = tmp_path / "cli"
    argv = ["import-pairs", "--run-dir", str(fresh), "--config", str(rundir.config_path)]
    assert main([*argv, "--from", str(out), "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["stage"] == "import-pairs" and printed["imported"] == 6
    manifest = RunDir(fresh).read_manifest()
    assert manifest["stages"]["import-pairs"]["status"] == "complete"
    [entry] = manifest["imported_pairs"]
    assert entry["imported"] == 6 and entry["origin"]["data"]["train"] == "synthetic"
    assert main(["export", "--run-dir", str(fresh), "--out", str(tmp_path / "again")]) == 0
    card = DatasetCard.load(tmp_path / "again" / DATASET_DIR / "README.md")
    assert card.data.license == "other" and "apache-2.0" in card.text  # problems: synthetic
    assert f"| imported with `ssb import-pairs` | `{out}` |" in card.text
    assert "Not known: the pairs were imported" in card.text
    assert f"| model (rollouts and replies) | `{run[0].model.name}` |" in card.text
    assert not (tmp_path / "again" / MODEL_DIR).exists()  # not trained


def test_commands_are_in_ssb_help():
    from ssb.cli import build_parser

    text = build_parser().format_help()
    assert "import-pairs" in text and "export" in text


LOAD_EXPORTED = """
import sys, torch
from peft import AutoPeftModelForCausalLM
model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1])
ids = torch.tensor([[int(t) for t in sys.argv[2].split(",")]])
with torch.no_grad():
    print(",".join(f"{v:.6e}" for v in model(ids).logits[0, -1, :8].tolist()))
"""


def test_exported_adapter_loads_elsewhere_by_its_bases_public_id(run, tmp_path):
    """An embedded-model run's adapter names the conversion cache (a path on the exporting
    machine); the export names google/gemma-3-270m instead, so on another machine, with that
    path gone, `AutoPeftModelForCausalLM` resolves the base as a user would: from the hub (here
    offline, from a hub cache where the tiny model stands in for google/gemma-3-270m)."""
    import subprocess
    import sys

    from peft import PeftModel

    from ssb.models import EMBEDDED_MODEL_ID, load_model

    cfg, rundir, pairs, _ = run
    # The same run, recorded as made with the embedded model; its adapter points at the "cache".
    cache = tmp_path / "home" / ".cache" / "ssb" / "embedded-gemma-3-270m"
    shutil.copytree(cfg.model.name, cache)
    emb = RunDir(tmp_path / "embedded-run")
    shutil.copytree(rundir.path, emb.path)
    manifest = emb.read_manifest()
    manifest["model_identity"] = {**manifest["model_identity"], "source": "embedded"}
    emb.manifest_path.write_text(json.dumps(manifest))
    adapter_config = emb.adapter_dir / "adapter_config.json"
    config = json.loads(adapter_config.read_text())
    adapter_config.write_text(json.dumps({**config, "base_model_name_or_path": str(cache)}))
    out = tmp_path / "export"
    export_run(emb, out)
    from huggingface_hub import DatasetCard

    card = DatasetCard.load(out / DATASET_DIR / "README.md")
    assert card.data.license == "gemma"  # Gemma wrote the replies: its terms, not the problems'
    exported = json.loads((out / MODEL_DIR / "adapter_config.json").read_text())
    assert exported["base_model_name_or_path"] == EMBEDDED_MODEL_ID
    assert exported["revision"] is None  # the GGUF names no hub commit

    # Another machine: the export moved elsewhere, the exporting user's cache gone.
    elsewhere = tmp_path / "elsewhere" / "model"
    shutil.copytree(out / MODEL_DIR, elsewhere)
    repo = tmp_path / "hub" / f"models--{EMBEDDED_MODEL_ID.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(cache, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    shutil.rmtree(cache)
    ids = pairs[0]["student_prompt_ids"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HOME=str(tmp_path / "u"))
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_EXPORTED, str(elsewhere), ",".join(map(str, ids))],
        cwd=tmp_path / "elsewhere",
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.tensor([float(v) for v in proc.stdout.split(",")])
    student = PeftModel.from_pretrained(load_model(cfg.model), str(rundir.adapter_dir))
    with torch.no_grad():
        want = student(torch.tensor([ids])).logits[0, -1, :8]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _reorder_safetensors_metadata(path):
    """The same safetensors file with its __metadata__ keys in reverse order (what another
    process may write for the same tensors: safetensors keeps metadata in a hash map)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"] = dict(reversed(list(header["__metadata__"].items())))
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n
    path.write_bytes(raw[:8] + text + raw[8 + n :])


def test_adapter_hash_is_of_content_and_configs_are_written_sorted(run, tmp_path):
    """Bit-identical weights give one adapter_hash whatever order PEFT wrote target_modules in
    and safetensors its metadata, and wherever the base was loaded from; a changed weight does
    not. ssb writes adapter_config.json with sorted module lists."""
    from safetensors.torch import load_file, save_file

    from ssb.identity import adapter_hash

    _, rundir, _, _ = run
    config = json.loads((rundir.adapter_dir / "adapter_config.json").read_text())
    assert len(config["target_modules"]) >= 3
    assert config["target_modules"] == sorted(config["target_modules"])
    weights = load_file(rundir.adapter_dir / "adapter_model.safetensors")
    a, b, c = (tmp_path / n for n in "abc")
    for d in (a, b, c):
        d.mkdir()
    save_file(weights, a / "adapter_model.safetensors", metadata={"format": "pt", "by": "x"})
    shutil.copyfile(a / "adapter_model.safetensors", b / "adapter_model.safetensors")
    _reorder_safetensors_metadata(b / "adapter_model.safetensors")
    assert (a / "adapter_model.safetensors").read_bytes() != (
        b / "adapter_model.safetensors"
    ).read_bytes()
    (a / "adapter_config.json").write_text(json.dumps(config))
    shuffled = {
        **config,
        "target_modules": list(reversed(config["target_modules"])),
        "base_model_name_or_path": "/home/someone/.cache/ssb/x",
    }
    (b / "adapter_config.json").write_text(json.dumps(shuffled))
    assert adapter_hash(a) == adapter_hash(b)
    changed = dict(weights)
    key = sorted(changed)[0]
    changed[key] = changed[key].clone()
    changed[key].view(-1)[0] += 1
    save_file(changed, c / "adapter_model.safetensors", metadata={"format": "pt", "by": "x"})
    (c / "adapter_config.json").write_text(json.dumps(config))
    assert adapter_hash(c) != adapter_hash(a)


def test_every_file_of_a_run_has_the_mode_a_plain_open_gives(run):
    """config, manifest, targets, adapter weights, eval summary: none private to its writer."""
    import stat

    from ssb.rundir import current_umask

    _, rundir, _, _ = run
    want = 0o666 & ~current_umask()
    modes = {
        str(p.relative_to(rundir.path)): oct(stat.S_IMODE(p.stat().st_mode))
        for p in rundir.path.rglob("*")
        # checkpoints/ is the Trainer's own (safetensors writes 0600), read only by a resume
        if p.is_file() and "checkpoints" not in p.parts
    }
    assert {"config.yaml", "manifest.json", "eval/summary.json"} <= modes.keys()
    assert {k: v for k, v in modes.items() if v != oct(want)} == {}


def test_import_into_a_fewshot_run_names_replies_it_would_not_generate(tmp_path, caplog):
    """A few-shot run stops generating at prompt.stop_strings and answers after "Answer: ":
    an imported reply holding a stop string, or with no leading space, is named."""
    from pairs_fixture import EXAMPLES

    cfg, _, _ = make_run(tmp_path, "none", "prompt.format=fewshot", name="unused")
    rundir = _fresh(tmp_path, cfg)
    examples = [
        EXAMPLES[0],
        (EXAMPLES[1][0], EXAMPLES[1][1], EXAMPLES[1][2].replace(", so", ".\n\nSo")),
        (EXAMPLES[2][0], EXAMPLES[2][1], EXAMPLES[2][2].lstrip()),
    ]
    teacher, _ = _reference_files(tmp_path / "reference", examples)
    with caplog.at_level("WARNING", logger="ssb"):
        summary = run_import_pairs(cfg, rundir, teacher)
    assert summary["imported"] == 3 and summary["replies_unlike_fewshot_answers"] == 2
    ids = [p["id"] for p in read_jsonl(rundir.pairs_path)]
    warned = [r.getMessage() for r in caplog.records if "import-pairs: pair" in r.getMessage()]
    assert len(warned) == 2
    assert ids[1] in warned[0] and 'stop string "\\n\\n"' in warned[0]
    assert ids[2] in warned[1] and "leading" not in warned[1] and "space" in warned[1]


def test_the_cards_import_command_renders_the_runs_prompts():
    """The dataset card's `ssb import-pairs` command names the preset whose prompt settings the
    run used, and sets any prompt setting that differs, in a form --set reads back exactly."""
    import shlex
    from types import SimpleNamespace

    from ssb.config import load_config
    from ssb.share.cards import import_command

    facts = SimpleNamespace(cfg=load_config(preset="quickstart"), base_model="google/gemma-3-270m")
    command = import_command(facts, "you/pairs")
    assert "--preset quickstart" in command and "--set prompt." not in command
    changed = ["prompt.stop_strings=[Q]", "prompt.system_prompt=Be brief."]
    facts.cfg = load_config(overrides=["prompt.num_fewshot=3", *changed])
    argv = shlex.split(import_command(facts, "you/pairs"))
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    preset = argv[argv.index("--preset") + 1] if "--preset" in argv else None
    again = load_config(preset=preset, overrides=sets)
    assert again.prompt == facts.cfg.prompt and again.model.name == "google/gemma-3-270m"
    facts.cfg.prompt.stop_strings = ["\n\n", "\nQuestion:"]
    facts.cfg.prompt.format = "fewshot"
    argv = shlex.split(import_command(facts, "you/pairs"))
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    preset = argv[argv.index("--preset") + 1] if "--preset" in argv else None
    assert load_config(preset=preset, overrides=sets).prompt == facts.cfg.prompt


def test_export_on_a_full_disk_is_one_short_line(run, tmp_path, capsys, monkeypatch):
    """copytree gathers every file's failure into one shutil.Error; the CLI says the first,
    naming it, and how many more, not the whole list's repr."""
    import errno

    _, rundir, _, _ = run

    def enospc(src, dst, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    monkeypatch.setattr(shutil, "copyfile", enospc)
    rc = main(["export", "--run-dir", str(rundir.path), "--out", str(tmp_path / "x"), "--quiet"])
    monkeypatch.undo()
    assert rc == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("ssb: error: copying ") and "No space left on device" in line
    assert "more files failed" in line and len(line) < 400
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
