import json

import pytest

from ssb.config import load_config
from ssb.rundir import RunDir, RunDirError, append_jsonl, atomic_write_text, read_jsonl


def test_jsonl_append_tolerates_and_repairs_a_torn_last_line(tmp_path):
    path = tmp_path / "r.jsonl"
    append_jsonl(path, [{"id": 1}, {"id": 2}])
    with path.open("a") as f:  # a writer killed mid-record
        f.write('{"id": 3, "te')
    assert [r["id"] for r in read_jsonl(path)] == [1, 2]
    append_jsonl(path, [{"id": 3}])
    assert [r["id"] for r in read_jsonl(path)] == [1, 2, 3]
    assert path.read_text().count("\n") == 3


def test_jsonl_bad_line_in_the_middle_names_file_and_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": 1}\nnot json\n{"id": 2}\n')
    with pytest.raises(RunDirError, match=r"r\.jsonl line 2"):
        read_jsonl(path)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "hello")
    atomic_write_text(tmp_path / "a.txt", "again")
    assert (tmp_path / "a.txt").read_text() == "again"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_init_writes_config_and_manifest_and_refuses_incompatible_config(tmp_path):
    rd = RunDir(tmp_path / "run")
    cfg = load_config(preset="quickstart")
    rd.init(cfg, "rollout")
    manifest = json.loads(rd.manifest_path.read_text())
    assert manifest["packages"]["torch"]
    assert manifest["config_hash"]
    with rd.stage("rollout") as summary:
        summary["problems"] = 3
    assert rd.is_complete("rollout")
    assert rd.stage_status("rollout")["problems"] == 3
    # Changing eval settings later is fine; changing the model under finished rollouts is not.
    rd.init(load_config(preset="quickstart", overrides=["eval.max_problems=5"]), "eval")
    other = load_config(preset="quickstart", overrides=["model.name=some/other-model"])
    with pytest.raises(RunDirError, match="model"):
        rd.init(other, "bootstrap")
    rd.init(other, "bootstrap", force=True)


def test_failed_stage_is_recorded(tmp_path):
    rd = RunDir(tmp_path)
    with pytest.raises(RuntimeError):
        with rd.stage("targets"):
            raise RuntimeError("boom")
    status = rd.stage_status("targets")
    assert status["status"] == "failed" and "boom" in status["error"]


def test_unwritable_run_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RunDirError, match="cannot write"):
        RunDir(blocker / "run").init(load_config(), "rollout")


def test_stage_seconds_add_up_over_attempts(tmp_path, monkeypatch):
    """A crashed attempt and its resumption both count; a rerun that finds everything done does
    not hide the time the work took (`last_seconds` is the latest attempt alone)."""
    import ssb.rundir as rundir_mod

    clock = iter([100.0, 130.0, 200.0, 210.0, 300.0, 300.5])
    monkeypatch.setattr(rundir_mod.time, "time", lambda: next(clock))
    rd = RunDir(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with rd.stage("rollout"):
            raise KeyboardInterrupt  # killed after 30 s
    assert rd.stage_status("rollout")["seconds"] == 30.0
    with rd.stage("rollout"):
        pass  # resumed: 10 s more
    assert rd.stage_status("rollout")["seconds"] == 40.0
    with rd.stage("rollout"):
        pass  # nothing left to do
    status = rd.stage_status("rollout")
    assert status["seconds"] == 40.5 and status["last_seconds"] == 0.5


def test_only_rank_zero_writes_the_bookkeeping(tmp_path, monkeypatch):
    """Under `accelerate launch` every rank runs the CLI; rank 1 must not rewrite the config or
    the manifest (a read-modify-write race with rank 0), but still reads them."""
    rd = RunDir(tmp_path)
    cfg = load_config(preset="quickstart")
    monkeypatch.setenv("RANK", "1")
    rd.init(cfg, "targets")
    with rd.stage("targets"):
        pass
    assert not rd.config_path.exists() and not rd.manifest_path.exists()
    monkeypatch.setenv("RANK", "0")
    rd.init(cfg, "targets")
    with rd.stage("targets"):
        pass
    monkeypatch.setenv("RANK", "1")
    assert rd.is_complete("targets") and rd.config_path.exists()
    before = rd.manifest_path.read_bytes()
    rd.update_manifest(extra=1)
    assert rd.manifest_path.read_bytes() == before


def test_a_run_made_before_a_config_key_existed_continues(tmp_path):
    """A run directory whose config.yaml predates a key (here model.threads) is not refused as
    "made with a different config": the missing key compares as its default."""
    import yaml

    rd = RunDir(tmp_path / "run")
    cfg = load_config(preset="quickstart")
    rd.init(cfg, "rollout")
    with rd.stage("rollout"):
        pass
    old = yaml.safe_load(rd.config_path.read_text())
    del old["model"]["threads"]
    rd.config_path.write_text(yaml.safe_dump(old))
    rd.init(cfg, "bootstrap")  # no error
    changed = load_config(preset="quickstart", overrides=["model.threads=1"])
    rd.config_path.write_text(yaml.safe_dump(old))
    with pytest.raises(RunDirError, match="model"):
        rd.init(changed, "bootstrap")


def test_a_failed_or_killed_stage_does_not_lock_its_settings(tmp_path):
    """Only a stage that completed locks its settings. A failed or interrupted one may be rerun
    with others; what it half-wrote is set aside (stale/) rather than mixed with the new
    setting, unless the change is one a resumed training may take (train.epochs)."""
    rd = RunDir(tmp_path / "run")
    rd.init(load_config(overrides=["train.learning_rate=0.5"]), "train")
    with pytest.raises(RuntimeError), rd.stage("train"):
        (rd.checkpoints_dir / "checkpoint-1").mkdir(parents=True)
        append_jsonl(rd.train_log_path, [{"step": 1, "loss": 9.0}])
        raise RuntimeError("diverged")
    assert rd.stage_status("train")["status"] == "failed"
    fixed = load_config(overrides=["train.learning_rate=0.0002"])
    rd.init(fixed, "train")  # not refused
    assert not rd.checkpoints_dir.exists() and not rd.train_log_path.exists()
    (stale,) = rd.stale_dir.iterdir()
    assert stale.name.startswith("train.")
    assert (stale / "checkpoints" / "checkpoint-1").is_dir()
    assert read_jsonl(stale / "train_log.jsonl") == [{"step": 1, "loss": 9.0}]

    # Killed (Ctrl-C): a longer training resumes from the checkpoints it left.
    with pytest.raises(KeyboardInterrupt), rd.stage("train"):
        (rd.checkpoints_dir / "checkpoint-2").mkdir(parents=True)
        raise KeyboardInterrupt
    assert rd.stage_status("train")["status"] == "interrupted"
    longer = load_config(overrides=["train.learning_rate=0.0002", "train.epochs=2"])
    rd.init(longer, "train")
    assert (rd.checkpoints_dir / "checkpoint-2").is_dir()

    # Completed: now its settings are locked, and the refusal names the key.
    with rd.stage("train"):
        pass
    with pytest.raises(RunDirError, match=r"train\.learning_rate \(used by finished stage"):
        rd.init(load_config(overrides=["train.learning_rate=0.001", "train.epochs=2"]), "eval")
    # A setting that changes none of its files is never refused.
    same = ["train.learning_rate=0.0002", "train.epochs=2"]
    rd.init(load_config(overrides=[*same, "train.save_steps=7"]), "eval")


def test_a_failed_train_rerun_with_a_fixed_setting_is_not_refused(tmp_path, capsys):
    """The issue's sequence through the CLI: `ssb train` fails with one setting (here: no pairs
    yet), and the rerun with a corrected setting is not refused as "a different config"."""
    from ssb.cli import main

    run = str(tmp_path / "run")
    assert main(["train", "--run-dir", run, "--quiet", "--set", "train.learning_rate=5"]) == 2
    assert RunDir(run).stage_status("train")["status"] == "failed"
    capsys.readouterr()
    assert main(["train", "--run-dir", run, "--quiet", "--set", "train.learning_rate=2e-4"]) == 2
    err = capsys.readouterr().err
    assert "different config" not in err and "no pairs" in err


def test_atomic_writes_honour_the_umask(tmp_path):
    """Atomically written files (config, manifest, report, targets, ...) get the mode a plain
    open() gives, like the jsonl files, not mkstemp's 0600."""
    import os
    import stat

    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        append_jsonl(tmp_path / "b.jsonl", [{"id": 1}])
        RunDir(tmp_path / "run").init(load_config(), "rollout")
    finally:
        os.umask(old)
    for path in [tmp_path / "a.txt", tmp_path / "b.jsonl", *(tmp_path / "run").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path


def test_a_killed_attempt_counts_in_the_stage_time(tmp_path, monkeypatch):
    """SIGKILL leaves the stage "running" with no time recorded; the next attempt adds the
    killed one's time up to the last file it wrote, and counts it."""
    import os

    import ssb.rundir as rundir_mod

    rd = RunDir(tmp_path)
    rd.record_stage("rollout", "running", started=900.0)  # then killed
    append_jsonl(rd.rollouts_path, [{"id": 1}])
    os.utime(rd.rollouts_path, (950.0, 950.0))  # its last record: 50 s in
    clock = iter([1000.0, 1005.0])
    monkeypatch.setattr(rundir_mod.time, "time", lambda: next(clock))
    with rd.stage("rollout"):
        pass  # resumed: 5 s
    status = rd.stage_status("rollout")
    assert status["seconds"] == 55.0 and status["last_seconds"] == 5.0
    assert status["killed_attempts"] == 1
