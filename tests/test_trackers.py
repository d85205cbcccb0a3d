"""Trackers (`train.report_to`): a real TensorBoard run receives the training metrics that
train_log.jsonl holds, with the same values at the same steps, and `ssb eval` adds every model x
benchmark accuracy and interval to the same TensorBoard directory; trackers that are named but not
installed are refused by training and skipped by evaluation."""

from __future__ import annotations

import json

import pytest
from pairs_fixture import make_run

from ssb.rundir import read_jsonl
from ssb.stages.pipeline import run_eval_stage
from ssb.stages.targets import run_targets
from ssb.stages.train import run_train
from ssb.trackers import (
    TRACKERS,
    TRACKERS_FILE,
    check_report_to,
    enabled_trackers,
    eval_metrics,
    is_installed,
    report_eval,
    tensorboard_dir,
)

# Keys of a training-step record that are metrics (step and epoch place them).
TRAIN_METRICS = ("loss", "kd", "ce", "grad_norm", "learning_rate", "reply_len")


def read_scalars(logdir) -> dict[str, dict[int, float]]:
    """tag -> {step: value} from every TensorBoard event file under `logdir` (the last value
    written at a step wins, as TensorBoard shows it)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, dict[int, float]] = {}
    files = sorted(logdir.rglob("events.out.tfevents.*"))
    assert files, f"no event files under {logdir}"
    for path in files:
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for event in acc.Scalars(tag):
                scalars.setdefault(tag, {})[event.step] = event.value
    return scalars


def test_tensorboard_gets_the_training_log_and_the_eval_accuracies(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (the dev extra has it)")
    bench = tmp_path / "mini.jsonl"
    rows = [("q1", "What is 2 + 3?", "5"), ("q2", "What is 7 - 4?", "3"), ("q3", "4 * 2?", "8")]
    bench.write_text(
        "".join(json.dumps({"id": i, "question": q, "answer": a}) + "\n" for i, q, a in rows)
    )
    cfg, rundir, _ = make_run(
        tmp_path,
        "chatml",
        "train.report_to=tensorboard",
        "train.logging_steps=2",  # 3 steps: one interval of two, then the last step alone
        "train.loss.ce_weight=0.5",
        "targets.mode=hidden",
        "data.id_field=id",
        f"eval.benchmarks={bench}",
        "eval.max_problems=null",
        "generation.backend=hf",
        "generation.max_new_tokens=4",
    )
    run_targets(cfg, rundir, progress=False)
    run_train(cfg, rundir, progress=False)
    logdir = tensorboard_dir(rundir.path)
    recorded = json.loads((rundir.path / TRACKERS_FILE).read_text())
    assert recorded == {"tensorboard": {"log_dir": str(logdir)}}

    records = read_jsonl(rundir.train_log_path)
    assert [r["step"] for r in records] == [2, 3]
    scalars = read_scalars(logdir)
    for key in TRAIN_METRICS:
        logged = scalars[f"train/{key}"]
        assert sorted(logged) == [2, 3], key
        for record in records:
            # TensorBoard stores float32.
            assert logged[record["step"]] == pytest.approx(record[key], rel=1e-6), key

    summary = run_eval_stage(cfg, rundir, progress=False)
    assert summary["trackers"] == ["tensorboard"]
    results = json.loads((rundir.eval_dir / "summary.json").read_text())["results"]
    assert set(results) == {"base", "student"}
    scalars = read_scalars(logdir)
    for model in ("base", "student"):
        result = results[model][str(bench)]
        expected = {
            "accuracy": result["accuracy"],
            "accuracy_low": result["interval"][0],
            "accuracy_high": result["interval"][1],
            "n": 3,
        }
        for name, value in expected.items():
            # At the last training step: the points sit at the end of the training curves.
            assert scalars[f"eval/mini/{model}/{name}"] == {3: pytest.approx(value, rel=1e-6)}
    assert scalars["train/loss"][3] == pytest.approx(records[-1]["loss"], rel=1e-6)


def test_eval_metrics_names_and_values():
    summary = {
        "benchmarks": {"/data/my set.jsonl": {"file_slug": "my_set"}, "math500": {}},
        "results": {
            "base": {
                "/data/my set.jsonl": {"accuracy": 0.25, "interval": [0.1, 0.5], "n": 8},
                "math500": {"accuracy": None, "interval": None, "n": 0},
            },
            "student": {"math500": {"accuracy": 0.5, "interval": [0.4, 0.6], "n": 500}},
        },
    }
    assert eval_metrics(summary) == {
        "eval/my_set/base/accuracy": 0.25,
        "eval/my_set/base/accuracy_low": 0.1,
        "eval/my_set/base/accuracy_high": 0.5,
        "eval/my_set/base/n": 8.0,
        "eval/math500/student/accuracy": 0.5,
        "eval/math500/student/accuracy_low": 0.4,
        "eval/math500/student/accuracy_high": 0.6,
        "eval/math500/student/n": 500.0,
    }


def test_enabled_trackers():
    assert enabled_trackers([]) == enabled_trackers("none") == enabled_trackers(None) == []
    assert enabled_trackers(["mlflow", "tensorboard", "comet_ml"]) == ["tensorboard", "mlflow"]
    assert enabled_trackers(["all"]) == [t for t in TRACKERS if is_installed(t)]


def test_a_tracker_not_installed_is_refused_by_training_and_skipped_by_eval(tmp_path):
    missing = next((t for t in ("wandb", "mlflow", "trackio") if not is_installed(t)), None)
    if missing is None:
        pytest.skip("wandb, mlflow and trackio are all installed: none to test the refusal with")
    with pytest.raises(ValueError, match=f"names {missing}, which is not installed"):
        check_report_to([missing])
    cfg, rundir, _ = make_run(tmp_path, "chatml", f"train.report_to={missing}", n=2)
    with pytest.raises(ValueError, match=f"pip install {missing}"):
        run_train(cfg, rundir, progress=False)
    summary = {
        "benchmarks": {"b": {}},
        "results": {"base": {"b": {"accuracy": 1.0, "interval": [0.5, 1.0], "n": 2}}},
    }
    rundir.eval_dir.mkdir(parents=True)
    (rundir.eval_dir / "summary.json").write_text(json.dumps(summary))
    assert report_eval(cfg, rundir.path) == []  # a no-op, not an error
    assert not (rundir.path / TRACKERS_FILE).exists()


def _read_mlflow(run: dict, tmp_path) -> set[str]:
    import mlflow

    return set(mlflow.get_run(run["run_id"]).data.metrics)


def _read_trackio(run: dict, tmp_path) -> set[str]:
    from trackio.sqlite_storage import SQLiteStorage

    return {key for entry in SQLiteStorage.get_logs(run["project"], run["name"]) for key in entry}


def _read_wandb(run: dict, tmp_path) -> set[str]:
    # Offline, each wandb.init writes a directory of its own; resuming by id gives a second one
    # with the same id (`wandb sync` merges them into one run on the server). wandb 0.31 has no
    # public reader for the offline files, so the keys are looked up as the bytes they are stored
    # as, in the files of the training run's id.
    files = sorted(tmp_path.glob(f"wandb/offline-run-*-{run['id']}/run-{run['id']}.wandb"))
    assert len(files) == 2  # training, then the evaluation resumed into the same id
    data = b"".join(f.read_bytes() for f in files)
    keys = ["eval/b/base/accuracy", "eval/b/base/accuracy_low", "eval/b/base/n", "train/kd"]
    return {key for key in keys if key.encode() in data}


@pytest.mark.parametrize(
    "tracker, read",
    [("mlflow", _read_mlflow), ("trackio", _read_trackio), ("wandb", _read_wandb)],
)
def test_other_trackers_get_eval_accuracies_in_the_training_run(
    tmp_path, monkeypatch, tracker, read
):
    """Local stores only (MLflow's file store, Trackio's SQLite, wandb offline): the accuracies
    join the run that training opened. Not in the dev extra, so CI skips these."""
    pytest.importorskip(tracker, reason=f"{tracker} is not installed (pip install {tracker})")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    cfg, rundir, _ = make_run(
        tmp_path, "chatml", f"train.report_to={tracker}", "targets.mode=online", n=2
    )
    run_train(cfg, rundir, progress=False)
    run = json.loads((rundir.path / TRACKERS_FILE).read_text())[tracker]
    summary = {
        "benchmarks": {"b": {"file_slug": "b"}},
        "results": {"base": {"b": {"accuracy": 0.5, "interval": [0.1, 0.9], "n": 2}}},
    }
    rundir.eval_dir.mkdir(parents=True)
    (rundir.eval_dir / "summary.json").write_text(json.dumps(summary))
    assert report_eval(cfg, rundir.path) == [tracker]
    keys = read(run, tmp_path)
    assert {"eval/b/base/accuracy", "eval/b/base/accuracy_low", "eval/b/base/n"} <= keys
    assert any(k.endswith("kd") for k in keys)  # the training metrics are in the same run
