import json

import pytest

from ssb.config import config_from_dict, dump_yaml
from ssb.report import funnel_counts, training_series, write_report
from ssb.rundir import RunDir, append_jsonl, atomic_write_json

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

STATUSES = (
    ["kept"] * 5
    + ["teacher_wrong"] * 2
    + ["teacher_truncated"]
    + ["all_correct"] * 7
    + ["all_wrong"] * 9
    + ["no_boxed_wrong"] * 3
)


def _summary():
    return {
        "settings": {
            "scoring": "math-verify",
            "greedy": True,
            "num_samples": 1,
            "temperature": 0.0,
            "top_p": 1.0,
            "max_new_tokens": 48,
            "metric": "pass@1",
        },
        "models": {
            "base": {"adapter": None, "adapter_hash": None},
            "student": {"adapter": "adapter", "adapter_hash": "0123456789abcdef"},
        },
        "benchmarks": {"synthetic": {"n_problems": 64, "file_slug": "synthetic"}},
        "results": {
            "base": {
                "synthetic": {
                    "n": 64,
                    "num_samples": 1,
                    "metric": "pass@1",
                    "scoring": "math-verify",
                    "accuracy": 0.203125,
                    "interval": [0.1231, 0.3161],
                    "interval_method": "wilson",
                    "accuracy_math_verify": 0.203125,
                    "interval_math_verify": [0.1231, 0.3161],
                    "accuracy_reference": 0.15625,
                    "interval_reference": [0.0871, 0.2641],
                    "truncation_rate": 0.046875,
                    "no_answer_rate": 0.1,
                    "mean_output_tokens": 21.53,
                    "file": "eval/base-synthetic.jsonl",
                }
            },
            "student": {
                "synthetic": {
                    "n": 64,
                    "num_samples": 1,
                    "metric": "pass@1",
                    "scoring": "math-verify",
                    "accuracy": 0.28125,
                    "interval": [0.1862, 0.4012],
                    "interval_method": "wilson",
                    "accuracy_math_verify": 0.28125,
                    "interval_math_verify": [0.1862, 0.4012],
                    "accuracy_reference": 0.25,
                    "interval_reference": [0.1605, 0.3671],
                    "truncation_rate": 0.015625,
                    "no_answer_rate": 0.05,
                    "mean_output_tokens": 18.27,
                    "file": "eval/student-synthetic.jsonl",
                }
            },
        },
        "comparisons": {
            "student": {
                "synthetic": {
                    "vs": "base",
                    "scoring": "math-verify",
                    "n": 64,
                    "wins": 9,
                    "losses": 4,
                    "ties": 51,
                    "mcnemar_p": 0.2668,
                    "test": "mcnemar_exact",
                    "diff": 0.078125,
                    "diff_interval": [-0.0156, 0.1719],
                    "math-verify": {},
                    "reference": {"diff": 0.09375},
                }
            }
        },
    }


@pytest.fixture
def run(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.path.mkdir()
    cfg = config_from_dict({"name": "fake-run", "model": {"name": "tiny-model-dir"}})
    rd.config_path.write_text(dump_yaml(cfg))
    append_jsonl(rd.rollouts_path, [{"id": f"p{i}", "samples": []} for i in range(30)])
    append_jsonl(
        rd.bootstrap_log_path, [{"id": f"p{i}", "status": s} for i, s in enumerate(STATUSES)]
    )
    append_jsonl(rd.pairs_path, [{"id": f"p{i}", "reply": "x"} for i in range(5)])
    log = []
    for step in range(1, 21):
        log.append(
            {
                "step": step,
                "loss": 2.0 / step,
                "kd": 1.5 / step,
                "grad_norm": 0.5 + 0.01 * step,
                "learning_rate": 2e-4 * (1 - step / 20),
                "reply_len": 20.0 + step,
            }
        )
    log.append({"step": 20, "train_runtime": 12.5})  # a final record without a loss
    append_jsonl(rd.train_log_path, log)
    atomic_write_json(rd.eval_dir / "summary.json", _summary())
    atomic_write_json(
        rd.manifest_path,
        {
            "name": "fake-run",
            "config_hash": "abcdef0123456789",
            "model_identity": {
                "name": "embedded",
                "source": "embedded",
                "model_id": "google/gemma-3-270m",
                "revision": "1a2b3c",
                "vocab_size": 262145,
            },
            "hardware": {
                "device": "cpu",
                "dtype": "float32",
                "cpu": "AMD EPYC",
                "cpu_capability": "AVX2",
                "native_bf16": False,
                "torch_threads": 2,
            },
            "packages": {"python": "3.11.9", "torch": "2.13.0", "trl": None},
            "stages": {
                "rollout": {
                    "status": "complete",
                    "seconds": 61.5,
                    "tokens_per_second": 66.4,
                    "killed_attempts": 1,
                },
                "bootstrap": {"status": "complete", "seconds": 20.5, "kept": 5},
                "train": {"status": "complete", "seconds": 130.0},
                "eval": {"status": "complete", "seconds": 45.75},
            },
        },
    )
    return rd


def _is_png(path):
    data = path.read_bytes()
    return data.startswith(PNG_MAGIC) and b"IEND" in data[-16:]


def test_report_plots_and_numbers(run):
    path = write_report(run)
    assert path == run.report_path
    for name in ("training.png", "accuracy.png", "funnel.png"):
        assert _is_png(run.plots_dir / name), name
    text = path.read_text()
    assert "# ssb run report: fake-run" in text
    assert "`tiny-model-dir`" in text
    # Funnel: counted from the jsonl files.
    assert "| problems rolled out | 30 |" in text
    assert "| decided by bootstrap | 27 |" in text
    assert "| mixed (sent to the hinted teacher) | 8 |" in text  # 5 kept + 2 wrong + 1 truncated
    assert "| kept pairs | 5 |" in text
    assert "| - all rollouts correct (too easy) | 7 |" in text
    assert "| - all rollouts wrong (too hard) | 9 |" in text
    assert "| - wrong rollouts without a boxed answer | 3 |" in text
    assert "| - teacher's answer wrong | 2 |" in text
    assert "| - teacher hit the token limit | 1 |" in text
    assert "| not decided (pair target reached) | 3 |" in text
    # Accuracy table: every number from summary.json.
    # ... with the no-answer rate beside truncation.
    assert (
        "| base | synthetic | 64 | 20.3% [12.3, 31.6] | 20.3% | 15.6% | 4.7% | 10.0% | 21.5 |"
        in text
    )
    assert (
        "| student | synthetic | 64 | 28.1% [18.6, 40.1] | 28.1% | 25.0% | 1.6% | 5.0% | 18.3 |"
        in text
    )
    # Whether a difference is within noise, in words.
    assert (
        "| student vs base | synthetic | 64 | 9 | 4 | 51 | +7.8 pp [-1.6, +17.2] | 0.267 "
        "| within noise (interval includes 0) | +9.4 pp |" in text
    )
    # What "auto" resolved to: the model and the hardware, from the manifest.
    assert "Resolved model: `google/gemma-3-270m` (revision 1a2b3c" in text
    assert "Hardware: device cpu, dtype float32, CPU AMD EPYC (torch capability AVX2" in text
    assert "top-k" not in text  # hidden targets: no top-k in use
    # Training summary: first/last are means of the first/last tenth (2 of 20 records).
    assert "| loss | 20 | 20 | 1.5 | 0.1026 | 0.1 | 2 |" in text
    assert "| reply_length | 20 | 20 | 21.5 | 39.5 | 21 | 40 |" in text
    assert "mean of the first and last tenth of the logged records" in text
    # Stage times count every attempt; a killed one is counted and shown.
    assert "| rollout | complete | 61.5 | 1 | 66.4 |" in text
    assert "| total |  | 257.8 |  |  |" in text
    assert "| torch | 2.13.0 |" in text
    assert "| trl | not installed |" in text
    assert "| LoRA r | 16 |" in text
    assert "(plots/accuracy.png)" in text
    assert not list(run.path.rglob("*.tmp"))


def test_report_without_optional_files_and_from_manifest_funnel(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.path.mkdir()
    atomic_write_json(
        rd.manifest_path,
        {
            "name": "m",
            "stages": {
                "bootstrap": {
                    "status": "complete",
                    "seconds": 3.0,
                    "problems": 12,
                    "decided": 12,
                    "mixed": 4,
                    "kept": 3,
                    "rejected": {"all_correct": 2, "all_wrong": 6, "teacher_wrong": 1},
                }
            },
        },
    )
    (rd.plots_dir).mkdir()
    (rd.plots_dir / "training.png").write_bytes(b"old")  # stale plot from an earlier report
    text = write_report(rd).read_text()
    assert "Counted from `manifest.json`" in text
    assert "| kept pairs | 3 |" in text
    assert "| mixed (sent to the hinted teacher) | 4 |" in text
    assert "| - all rollouts wrong (too hard) | 6 |" in text
    assert _is_png(rd.plots_dir / "funnel.png")
    assert not (rd.plots_dir / "training.png").exists()
    assert not (rd.plots_dir / "accuracy.png").exists()
    assert "## Evaluation" not in text and "## Training" not in text


def test_funnel_counts_and_training_series(run):
    funnel = funnel_counts(run)
    assert funnel["problems"] == 30 and funnel["mixed"] == 8 and funnel["kept"] == 5
    series = training_series([json.loads(x) for x in run.train_log_path.read_text().splitlines()])
    assert series["loss"][0] == [float(s) for s in range(1, 21)]
    assert "ce" not in series
    assert series["reply_length"][1][-1] == 40.0


def test_training_series_falls_back_to_record_index():
    series = training_series([{"loss": 1.0, "mean_completion_length": 5}, {"loss": 0.5}])
    assert series["loss"] == ([1.0, 2.0], [1.0, 0.5])
    assert series["reply_length"] == ([1.0], [5.0])
