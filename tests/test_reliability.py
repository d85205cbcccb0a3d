"""Reliability: integrity checks, input validation through the CLI, long prompts, nothing from
data or model output is executed, and resource errors (unwritable run directory, full disk)."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from pairs_fixture import make_pairs

from ssb import rundir as rundir_mod
from ssb.bench.random_models import save_tiny_model
from ssb.cli import main
from ssb.config import ConfigError, load_config
from ssb.rundir import RunDir, RunDirError, append_jsonl, atomic_write_text, read_jsonl

TINY_SETS = [
    "model.dtype=float32",
    "model.device=cpu",
    "generation.backend=hf",
    "generation.batch_size=2",
    "generation.max_new_tokens=4",
    "rollout.num_samples=1",
    "prompt.num_fewshot=1",
    "targets.batch_size=2",
    "targets.shard_size=2",
    "targets.topk=8",
    "train.lora.r=2",
    "train.lora.alpha=4",
    "train.batch_size=2",
    "train.epochs=1",
    "train.save_steps=1000",
    "train.loss.chunk_size=5",
    "eval.max_problems=null",
    "data.max_problems=null",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("rel") / "model", "qwen2", "chatml")


def cli(capsys, stage: str, run_dir: Path, *sets: str) -> tuple[int, str]:
    """Run `ssb <stage>` in-process; (exit code, the stderr lines that start with 'ssb')."""
    args = [stage, "--run-dir", str(run_dir), "--quiet"]
    for s in sets:
        args += ["--set", s]
    capsys.readouterr()
    try:
        rc = main(args)
    except SystemExit as exc:  # argparse
        rc = int(exc.code)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("ssb")]
    assert len(lines) == 1, err
    assert ": error: " in lines[0]
    return lines[0]


def _fresh_models():
    from ssb.stages import base

    base._LOADED.clear()


# --------------------------------------------------------------------------- integrity


def _targets_run(tmp_path: Path, model: Path) -> tuple[Path, list[str]]:
    from ssb.stages.base import load_base

    sets = [f"model.name={model}", *TINY_SETS]
    run = tmp_path / "run"
    cfg = load_config(overrides=sets)
    append_jsonl(run / "pairs.jsonl", make_pairs(load_base(cfg).tokenizer, cfg, n=4))
    assert main(["targets", "--run-dir", str(run), "--quiet", *_sets(sets)]) == 0
    return run, sets


def _sets(sets: list[str]) -> list[str]:
    return [x for s in sets for x in ("--set", s)]


def test_train_names_a_corrupt_shard(tmp_path, model_dir, capsys):
    run, sets = _targets_run(tmp_path, model_dir)
    shard = run / "targets" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # a byte of tensor data: the header still parses
    shard.write_bytes(bytes(data))
    rc, err = cli(capsys, "train", run, *sets)
    assert rc == 2
    assert "shard-00001.safetensors" in error_line(err)
    assert not (run / "adapter").exists()


def test_train_refuses_targets_of_another_tokenizer(tmp_path, model_dir, capsys):
    """Same model.name path, but the tokenizer saved there was replaced after `ssb targets`."""
    model = shutil.copytree(model_dir, tmp_path / "model")
    run, sets = _targets_run(tmp_path, model)
    # Swap the ids of the two last merged tokens: same size, different vocabulary.
    tok_path = model / "tokenizer.json"
    tok = json.loads(tok_path.read_text())
    vocab = tok["model"]["vocab"]
    (a, ia), (b, ib) = sorted(vocab.items(), key=lambda kv: kv[1])[-2:]
    vocab[a], vocab[b] = ib, ia
    tok_path.write_text(json.dumps(tok))
    _fresh_models()
    try:
        # The run's manifest recorded the tokenizer: refused before anything is computed ...
        rc, err = cli(capsys, "train", run, *sets)
        assert rc == 2
        line = error_line(err)
        assert "another model or tokenizer" in line and "vocab_hash" in line, line
        # ... and with --force the target store's own record still refuses mismatched targets.
        _fresh_models()
        forced = ["train", "--run-dir", str(run), "--quiet", "--force"]
        capsys.readouterr()
        rc = main(forced + [x for s in sets for x in ("--set", s)])
        err = capsys.readouterr().err
    finally:
        _fresh_models()
    assert rc == 2
    line = error_line(err)
    assert "does not match" in line and "vocab_hash" in line, line
    assert not (run / "adapter").exists()


def test_rundir_refuses_a_different_model(tmp_path, model_dir, capsys):
    run = tmp_path / "run"
    RunDir(run).init(load_config(overrides=[f"model.name={model_dir}"]), "rollout")
    RunDir(run).record_stage("rollout", "complete")
    rc, err = cli(capsys, "bootstrap", run, "model.name=/elsewhere")
    assert rc == 2
    assert "model.name (used by finished stage 'rollout')" in error_line(err)  # the key


# --------------------------------------------------------------------------- input validation


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?", "answer"\n', ["line 2"]),
        ('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?"}\n', ["line 2", "'answer'"]),
        ('{"question": "", "answer": "2"}\n', ["line 1", "'question'", "empty"]),
        ('["not", "an", "object"]\n', ["line 1", "JSON object"]),
        ("", ["empty"]),
        ("\n\n", ["empty"]),
        ('{"question": "1+1?", "answer": "\\\\boxed{2"}\n', ["line 1", "unbalanced"]),
    ],
    ids=["bad-json", "missing-field", "empty-field", "not-object", "empty", "blank", "boxed"],
)
def test_bad_data_file_is_one_line_error(tmp_path, capsys, content, expected):
    data = _write(tmp_path / "data.jsonl", content)
    rc, err = cli(capsys, "rollout", tmp_path / "run", f"data.train={data}")
    assert rc == 2
    line = error_line(err)
    assert str(data) in line
    for word in expected:
        assert word in line, line


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        (["data.train=nosuchbench"], "unknown problem source 'nosuchbench'"),
        (["data.train=/no/such/file.jsonl"], "/no/such/file.jsonl does not exist"),
        (["data.train=data.txt"], "unknown problem source 'data.txt'"),
        (["foo.bar=1"], "unknown config key foo"),
        (["rollout.num_samples=zero"], "rollout.num_samples"),
        (["generation.backend=tpu"], "generation.backend"),
    ],
)
def test_bad_settings_are_one_line_errors(tmp_path, capsys, sets, expected):
    rc, err = cli(capsys, "rollout", tmp_path / "run", *sets)
    assert rc == 2
    assert expected in error_line(err)


def test_unknown_benchmark_in_eval(tmp_path, model_dir, capsys):
    rc, err = cli(
        capsys, "eval", tmp_path / "run", f"model.name={model_dir}", "eval.benchmarks=[nope]"
    )
    assert rc == 2
    assert "nope" in error_line(err)


def test_unknown_preset_is_a_usage_error(tmp_path, capsys):
    # argparse rejects it (exit 2, its usage line plus "ssb rollout: error: ...").
    with pytest.raises(SystemExit) as exc:
        main(["rollout", "--run-dir", str(tmp_path / "run"), "--preset", "nope"])
    assert exc.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_missing_model_is_one_line_error(tmp_path, capsys):
    data = _write(tmp_path / "d.jsonl", '{"question": "1+1?", "answer": "2"}\n')
    rc, err = cli(capsys, "rollout", tmp_path / "run", f"data.train={data}",
                  f"model.name={tmp_path / 'no-model'}")  # fmt: skip
    assert rc == 2
    assert "no-model" in error_line(err)


def test_stage_without_inputs_is_one_line_error(tmp_path, capsys):
    for stage in ("bootstrap", "targets", "train"):
        rc, err = cli(capsys, stage, tmp_path / stage)
        assert rc == 2
        assert "run `ssb" in error_line(err)


# --------------------------------------------------------------------------- long prompts


def test_prompts_longer_than_the_context_are_skipped(tmp_path, model_dir, capsys):
    long_q = "How many apples are there " + "and apples " * 80 + "?"
    data = tmp_path / "d.jsonl"
    with data.open("w") as f:
        for i, q in enumerate(["1+1?", long_q, "2+2?"]):
            f.write(json.dumps({"id": f"q{i}", "question": q, "answer": "2"}) + "\n")
    sets = [f"model.name={model_dir}", *TINY_SETS, f"data.train={data}",
            f"eval.benchmarks=[{data}]", "model.max_context=128", "data.id_field=id"]  # fmt: skip
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["rollout", "--run-dir", str(run), "--quiet", *_sets(sets)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["skipped_long_prompts"] == 1
    assert [r["id"] for r in read_jsonl(run / "rollouts.jsonl")] == ["q0", "q2"]
    assert main(["eval", "--run-dir", str(run), "--quiet", *_sets(sets)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["skipped_long_prompts"] == 1
    assert [r["id"] for r in read_jsonl(run / "eval" / "base-d.jsonl")] == ["q0", "q2"]


def test_fits_context():
    from ssb.stages.common import fits_context

    assert fits_context([1] * 10, 5, None)
    assert fits_context([1] * 10, 5, 15)
    assert not fits_context([1] * 10, 6, 15)


# --------------------------------------------------------------------------- nothing is executed

PAYLOADS = [
    "__import__('os').system('touch {m}')",
    "exec(\"open('{m}', 'w').write('x')\")",
    "eval(\"__import__('os').system('touch {m}')\")",
    "__import__('subprocess').run(['touch', '{m}'])",
    "(lambda: __import__('os').system('touch {m}'))()",
    "Symbol('x').__class__.__init__.__globals__['os'].system('touch {m}')",
]


def test_model_output_and_data_are_never_executed(tmp_path):
    from ssb.grading import answer_key, extract_boxed, grade, reference_grade
    from ssb.problems import load_file

    marker = tmp_path / "pwned"
    texts = []
    for p in PAYLOADS:
        payload = p.format(m=marker)
        texts += [payload, f"The answer is \\boxed{{{payload}}}", f"$\\boxed{{{payload}}}$"]
    for text in texts:
        boxed = extract_boxed(text)
        for gold in (text, "2", boxed or "x"):
            grade(text, gold)
            reference_grade(text, gold, "aime24")
            reference_grade(text, gold, "math500")
        answer_key(text)
        if boxed:
            answer_key(boxed)
    data = tmp_path / "d.jsonl"
    with data.open("w") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"question": text, "answer": text, "id": str(i)}) + "\n")
    load_file(data, id_field="id")
    config = tmp_path / "c.yaml"
    config.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError):
        load_config(config_file=config)
    # An override is parsed with yaml.safe_load; an unsafe tag is kept as plain text.
    raw = f"!!python/object/apply:os.system ['touch {marker}']"
    assert load_config(overrides=[f"name={raw}"]).name == raw
    assert not marker.exists()


# --------------------------------------------------------------------------- resource errors


def test_run_dir_under_a_file_is_one_line_error(tmp_path, capsys):
    blocker = _write(tmp_path / "file", "x")
    rc, err = cli(capsys, "rollout", blocker / "run")
    assert rc == 2
    assert "cannot write to run directory" in error_line(err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only directories")
def test_read_only_run_dir_is_one_line_error(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o500)
    try:
        rc, err = cli(capsys, "rollout", run)
    finally:
        run.chmod(0o700)
    assert rc == 2
    assert "cannot write to run directory" in error_line(err)


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    atomic_write_text(path, "old: 1\n")
    monkeypatch.setattr(rundir_mod.os, "fsync", _enospc)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(path, "new: 2\n" * 1000)
    monkeypatch.undo()
    assert path.read_text() == "old: 1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temp file left


class _HalfWriter:
    """A text file whose write() stores half of what it is given, then fails with ENOSPC."""

    def __init__(self, f):
        self.f = f

    def write(self, text):
        self.f.write(text[: len(text) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_full_disk_append_keeps_earlier_records(tmp_path, monkeypatch):
    path = tmp_path / "rollouts.jsonl"
    old = [{"id": f"a{i}", "x": "y" * 50} for i in range(3)]
    append_jsonl(path, old)
    real_open = Path.open

    def half_open(self, mode="r", *args, **kwargs):
        f = real_open(self, mode, *args, **kwargs)
        return _HalfWriter(f) if mode == "a" else f

    monkeypatch.setattr(Path, "open", half_open)
    new = [{"id": f"b{i}", "x": "z" * 50} for i in range(3)]
    with pytest.raises(OSError, match="No space left"):
        append_jsonl(path, new)
    monkeypatch.undo()
    # The earlier records are intact; what made it to disk of the failed append is complete
    # records only (a torn last line is ignored) -- never a corrupt or duplicated record.
    got = read_jsonl(path)
    assert got[:3] == old
    assert all(r in new for r in got[3:])
    # Once space is back, the next append cuts the torn tail and continues cleanly.
    done = {r["id"] for r in got}
    append_jsonl(path, [r for r in new if r["id"] not in done])
    assert read_jsonl(path) == old + new
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    assert [json.loads(line) for line in raw.splitlines()] == old + new


def test_full_disk_through_the_cli(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    data = _write(tmp_path / "d.jsonl", '{"question": "1+1?", "answer": "2"}\n')
    RunDir(run).init(load_config(overrides=[f"data.train={data}"]), "rollout")
    before = (run / "config.yaml").read_text()
    monkeypatch.setattr(rundir_mod.os, "fsync", _enospc)
    rc, err = cli(capsys, "rollout", run, f"data.train={data}", "seed=5")
    monkeypatch.undo()
    assert rc == 2
    assert "No space left on device" in error_line(err)
    assert (run / "config.yaml").read_text() == before
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_corrupt_manifest_and_jsonl_are_named(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.manifest_path.write_text("{not json")
    with pytest.raises(RunDirError, match="manifest.json"):
        run.read_manifest()
    run.rollouts_path.write_text('{"id": 1}\n{bad\n{"id": 2}\n')
    with pytest.raises(RunDirError, match=r"rollouts.jsonl line 2"):
        read_jsonl(run.rollouts_path)


def test_funnel_counts_a_pair_whose_decision_line_was_lost(tmp_path):
    """bootstrap appends pairs.jsonl first, then bootstrap.jsonl: a kill in between must not
    make the kept pair vanish from the funnel (or be redone)."""
    from ssb.funnel import funnel
    from ssb.rundir import RunDir, append_jsonl

    rd = RunDir(tmp_path)
    append_jsonl(rd.rollouts_path, [{"id": "a"}, {"id": "b"}, {"id": "c"}])
    append_jsonl(
        rd.bootstrap_log_path, [{"id": "a", "status": "all_wrong"}, {"id": "b", "status": "kept"}]
    )
    append_jsonl(rd.pairs_path, [{"id": "b"}, {"id": "c"}])  # c's "kept" line was never written
    out = funnel(rd)
    assert out["kept"] == 2 and out["decided"] == 3 and out["mixed"] == 2


def test_a_run_refuses_another_tokenizer_unless_forced(tmp_path):
    from ssb.bench.random_models import build_tokenizer, save_tiny_model
    from ssb.config import load_config
    from ssb.identity import model_identity
    from ssb.rundir import RunDir, RunDirError
    from ssb.stages.base import check_model_identity

    model_dir = save_tiny_model(tmp_path / "m", "qwen2", "chatml")
    cfg = load_config(overrides=[f"model.name={model_dir}"])
    rd = RunDir(tmp_path / "run")
    check_model_identity(rd, model_identity(cfg.model, build_tokenizer("chatml")))
    recorded = rd.read_manifest()["model_identity"]
    assert recorded["vocab_hash"] and recorded["source"] == "local"
    check_model_identity(rd, model_identity(cfg.model, build_tokenizer("chatml")))  # the same: fine
    with pytest.raises(RunDirError, match="vocab_hash"):
        check_model_identity(rd, model_identity(cfg.model, build_tokenizer("gemma")))
    RunDir(tmp_path / "run", force=True)  # --force proceeds and records the new identity
    forced = RunDir(tmp_path / "run", force=True)
    check_model_identity(forced, model_identity(cfg.model, build_tokenizer("gemma")))
    assert rd.read_manifest()["model_identity"] != recorded


def test_golds_math_verify_cannot_take_are_skipped_and_counted():
    from ssb.grading import gold_is_parseable
    from ssb.problems import Problem
    from ssb.stages.common import drop_unparseable_golds

    nested = "{" * 30 + "1" + "}" * 30  # refused by the grader's guards: could hang the parser
    assert gold_is_parseable("18") and gold_is_parseable("\\frac{1}{2}")
    assert not gold_is_parseable(nested) and not gold_is_parseable("  ")
    problems = [Problem("a", "q", "18", "t"), Problem("b", "q", nested, "t")]
    kept, skipped = drop_unparseable_golds(problems, "rollout")
    assert [p.id for p in kept] == ["a"] and skipped == ["b"]


def test_a_kept_pair_lost_to_a_torn_line_is_decided_again(tmp_path, model_dir, caplog):
    """pairs.jsonl's torn last line held a pair whose "kept" decision is in bootstrap.jsonl: the
    resumed bootstrap says so, naming the problem, and decides it again instead of losing it."""
    from ssb.funnel import funnel
    from ssb.stages.bootstrap import run_bootstrap

    sets = [f"model.name={model_dir}", "model.dtype=float32", "model.device=cpu",
            "generation.backend=hf", "generation.max_new_tokens=4", "prompt.num_fewshot=1"]  # fmt: skip
    cfg = load_config(overrides=sets)
    rd = RunDir(tmp_path / "run")
    rd.init(cfg, "bootstrap")
    samples = [
        {"text": "\\boxed{5}", "token_ids": [], "finish_reason": "stop", "answer": "5",
         "correct": True},
        {"text": "\\boxed{0}", "token_ids": [], "finish_reason": "stop", "answer": "0",
         "correct": False},
    ]  # fmt: skip
    append_jsonl(
        rd.rollouts_path,
        [{"id": f"p{i}", "question": "What is 2 + 3?", "gold": "5", "source": "test",
          "solution": None, "samples": samples, "num_correct": 1} for i in range(2)],
    )  # fmt: skip
    append_jsonl(rd.bootstrap_log_path, [{"id": "p0", "status": "kept"}])
    rd.pairs_path.write_text('{"id": "p0", "reply": "torn')  # the kill tore the pair's line
    with caplog.at_level("WARNING", logger="ssb"):
        run_bootstrap(cfg, rd, progress=False)
    assert "p0" in caplog.text and "deciding them again" in caplog.text
    latest = {d["id"]: d["status"] for d in read_jsonl(rd.bootstrap_log_path)}
    pairs = {p["id"] for p in read_jsonl(rd.pairs_path)}
    assert set(latest) == {"p0", "p1"}
    assert {i for i, s in latest.items() if s == "kept"} == pairs  # no kept problem without pair
    assert funnel(rd)["decided"] == 2


def test_error_wording_names_the_file_and_the_cause(tmp_path, capsys, monkeypatch):
    """A full disk names the file being written; a --run-dir that is a file says so; bootstrap
    after a rollout that found no problems says that, not "run `ssb rollout` first"."""
    path = tmp_path / "targets" / "shard-00000.safetensors"
    monkeypatch.setattr(rundir_mod.os, "fsync", _enospc)
    with pytest.raises(OSError) as exc:
        rundir_mod.atomic_write_bytes(path, b"x" * 100)
    assert exc.value.filename == str(path) and exc.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as exc:
        append_jsonl(tmp_path / "rollouts.jsonl", [{"id": 1}])
    assert exc.value.filename == str(tmp_path / "rollouts.jsonl")
    monkeypatch.undo()

    afile = _write(tmp_path / "run-file", "x")
    rc, err = cli(capsys, "rollout", afile)
    assert rc == 2 and "is a file, not a directory" in error_line(err)

    run = tmp_path / "run"
    rd = RunDir(run)
    rd.init(load_config(), "rollout")
    with rd.stage("rollout"):
        append_jsonl(rd.rollouts_path, [])  # data.max_problems=0: nothing rolled out
    rc, err = cli(capsys, "bootstrap", run)
    line = error_line(err)
    assert rc == 2 and "found no training problems" in line and "first" not in line


def test_cli_version_config_of_a_run_and_read_only_commands(tmp_path, capsys):
    """--version; `ssb config --run-dir` shows a run's resolved config; a command that only
    reads a run refuses a mistyped --run-dir instead of creating it and exiting 0."""
    import yaml

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("ssb ")
    run = tmp_path / "run"
    RunDir(run).init(load_config(preset="quickstart"), "rollout")
    assert main(["config", "--run-dir", str(run), "--set", "eval.max_problems=3"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["eval"]["max_problems"] == 3
    assert shown["prompt"]["num_fewshot"] == load_config(preset="quickstart").prompt.num_fewshot
    for argv in (["report"], ["export", "--out", str(tmp_path / "o")], ["harness-check"],
                 ["config"]):  # fmt: skip
        typo = tmp_path / "rnu"
        rc = main([argv[0], "--run-dir", str(typo), *argv[1:]])
        assert rc == 2 and "not a run directory" in error_line(capsys.readouterr().err)
        assert not typo.exists()


def test_stdout_carries_only_the_json_summary(tmp_path, capsys):
    """`ssb train` with progress on: Trainer's log dicts go to stderr, stdout parses as JSON."""
    from pairs_fixture import make_run

    cfg, rundir, _ = make_run(tmp_path, "chatml")
    rundir.init(cfg, "targets")
    assert main(["targets", "--run-dir", str(rundir.path), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["train", "--run-dir", str(rundir.path), "--set", "train.logging_steps=1"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["stage"] == "train"
    assert "'loss'" in err  # the Trainer's own log lines are still shown
