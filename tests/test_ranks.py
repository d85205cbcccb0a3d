"""Generation split over the processes of a launch (ssb.stages.ranks): rollout, bootstrap and
eval under `accelerate launch` with two CPU processes (gloo). Every problem lands in the merged
file exactly once, in problem order, with the records one process writes (batches of one
problem on both sides, one thread per process, so the arithmetic is the same); a launch killed
after one rank wrote part of its share resumes without losing or duplicating a record."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from limits import HANG_GUARD_S
from pairs_fixture import make_rollouts_mixed, tiny_config
from test_accelerate import two_process_launch

from ssb.bench.random_models import save_tiny_model
from ssb.rundir import RunDir, append_jsonl, read_jsonl

TESTS = Path(__file__).parent

# rollout.num_samples == generation.batch_size: every batch holds one problem's samples, in one
# process as in two; one thread each, so the two runs do the same float arithmetic.
OVERRIDES = [
    "model.threads=1",
    "data.max_problems=10",
    "rollout.num_samples=2",
    "generation.batch_size=2",
    "generation.max_new_tokens=5",
    "eval.max_problems=6",
]

SCRIPT = r"""
import json, logging, os, sys
logging.basicConfig(level=logging.INFO)
sys.path.insert(0, sys.argv[1])
from pairs_fixture import make_rollouts_mixed, tiny_config
from ssb.rundir import RunDir

stage, model_dir, run = sys.argv[2:5]
cfg = tiny_config(model_dir, *json.loads(sys.argv[5]))
rundir = RunDir(run)
if stage == "rollout":
    from ssb.stages.rollout import run_rollout

    def on_chunk(written, total):
        if os.environ.get("KILL_RANK1_AFTER_ONE_CHUNK") and os.environ["RANK"] == "1":
            os._exit(3)  # a rank dies with part of its share written

    run_rollout(cfg, rundir, progress=False, on_chunk=on_chunk)
elif stage == "bootstrap":
    from ssb.stages.bootstrap import run_bootstrap

    run_bootstrap(cfg, rundir, progress=False)
else:
    from ssb.stages.evaluate import run_eval

    run_eval(cfg, rundir, progress=False)
"""


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """Run a stage under `accelerate launch` with two CPU processes."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("the accelerate CLI is not installed")
    tmp = tmp_path_factory.mktemp("ranks")
    model_dir = save_tiny_model(tmp / "model", "qwen2", "chatml")
    script = tmp / "stage.py"
    script.write_text(SCRIPT)

    def run(stage: str, run_dir: Path, **env: str) -> subprocess.CompletedProcess:
        args = [str(script), str(TESTS), stage, str(model_dir), str(run_dir)]
        full_env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **env)
        return subprocess.run(
            two_process_launch(accelerate) + args + [json.dumps(OVERRIDES)],
            env=full_env,
            timeout=HANG_GUARD_S,
            capture_output=True,
            text=True,
        )

    run.model_dir = model_dir
    return run


def _one_process(model_dir: Path, run_dir: Path) -> tuple:
    from ssb.stages.evaluate import run_eval
    from ssb.stages.rollout import run_rollout

    cfg = tiny_config(model_dir, *OVERRIDES)
    rundir = RunDir(run_dir)
    rundir.path.mkdir(parents=True)
    run_rollout(cfg, rundir, progress=False)
    run_eval(cfg, rundir, progress=False)
    return cfg, rundir


def test_rollout_bootstrap_and_eval_split_over_two_processes(launch, tmp_path):
    cfg, one = _one_process(launch.model_dir, tmp_path / "one")
    two = RunDir(tmp_path / "two")
    two.path.mkdir()

    # A rank dies after writing part of its share; the launch fails.
    killed = launch("rollout", two.path, KILL_RANK1_AFTER_ONE_CHUNK="1")
    assert killed.returncode != 0
    assert len(read_jsonl(two.rank_part(two.rollouts_path, 1))) == 4  # one chunk of rank 1's 5
    # The next launch merges what the dead one left, then samples only the rest.
    proc = launch("rollout", two.path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "merged" in proc.stderr
    assert "to sample on rank 0/2" in proc.stderr and "to sample on rank 1/2" in proc.stderr
    assert "0 already done" not in proc.stderr
    assert not (two.path / "parts").exists() or not any((two.path / "parts").rglob("*.jsonl"))
    expected = read_jsonl(one.rollouts_path)
    got = read_jsonl(two.rollouts_path)
    assert [r["id"] for r in got] == [r["id"] for r in expected]  # each once, in problem order
    assert got == expected  # seeded per problem: the rank a problem lands on changes nothing

    proc = launch("eval", two.path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    from ssb.stages.eval_setup import records_path

    path = records_path(one, "base", "synthetic").relative_to(one.path)
    assert read_jsonl(two.path / path) == read_jsonl(one.path / path)
    assert (
        json.loads(two.eval_summary_path.read_text())["results"]
        == json.loads(one.eval_summary_path.read_text())["results"]
    )

    # Bootstrap: every mixed problem decided exactly once, as one process decides it.
    for rundir in (one, two):
        make_rollouts_mixed(rundir.rollouts_path)
    from ssb.stages.bootstrap import run_bootstrap

    run_bootstrap(cfg, one, progress=False)
    proc = launch("bootstrap", two.path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    decisions = read_jsonl(two.bootstrap_log_path)
    assert sorted(d["id"] for d in decisions) == sorted(r["id"] for r in expected)
    assert {d["id"]: d for d in decisions} == {
        d["id"]: d for d in read_jsonl(one.bootstrap_log_path)
    }
    assert read_jsonl(two.pairs_path) == read_jsonl(one.pairs_path)


def test_merge_parts_keeps_order_skips_held_records_and_honours_a_limit(tmp_path):
    from ssb.stages.ranks import merge_parts

    rundir = RunDir(tmp_path)
    final = rundir.pairs_path
    append_jsonl(final, [{"id": "b", "v": 0}])
    append_jsonl(rundir.rank_part(final, 1), [{"id": "d", "v": 1}, {"id": "b", "v": 9}])
    append_jsonl(rundir.rank_part(final, 0), [{"id": "e", "v": 2}, {"id": "a", "v": 3}])
    order = ["a", "b", "c", "d", "e"]
    assert merge_parts(rundir, final, order, limit=2) == 2
    # In problem order, whatever the file held before ("b" was merged by an earlier launch).
    assert read_jsonl(final) == [{"id": "a", "v": 3}, {"id": "b", "v": 0}, {"id": "d", "v": 1}]
    assert rundir.rank_parts(final) == []
    assert merge_parts(rundir, final, order) == 0  # nothing left: a repeat is harmless


def test_each_local_rank_gets_its_own_gpus_for_vllm(monkeypatch):
    """Under a launch each rank's vLLM engine must see only its own devices (vLLM's workers would
    all take the first ones). A real multi-GPU launch is checked by hand on a GPU node."""
    from ssb.stages.ranks import gpus_for_this_rank

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5")
    gpus_for_this_rank(2)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5")
    with pytest.raises(RuntimeError, match="local rank 3 needs 2 GPU"):
        gpus_for_this_rank(2)
    monkeypatch.setenv("WORLD_SIZE", "1")
    gpus_for_this_rank(8)  # no launch: untouched
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5"


def test_a_merge_after_a_killed_launch_keeps_problem_order(tmp_path):
    """Rank 1 wrote its first problems before the launch died, rank 0 nothing: the next launch
    merges rank 1's records first, then rank 0's earlier problems; the file must still read in
    problem order, as one process writes it (the race behind a flaky two-process test)."""
    from ssb.stages.ranks import merge_parts

    rundir = RunDir(tmp_path / "run")
    rundir.path.mkdir()
    final = rundir.rollouts_path
    order = [f"p{i}" for i in range(6)]

    def part(rank: int, ids: list[int]) -> None:
        append_jsonl(rundir.rank_part(final, rank), [{"id": f"p{i}", "rank": rank} for i in ids])

    part(1, [1, 3])
    assert merge_parts(rundir, final, order) == 2  # the leftovers of the killed launch
    assert [r["id"] for r in read_jsonl(final)] == ["p1", "p3"]
    part(0, [0, 2, 4])
    part(1, [5])
    assert merge_parts(rundir, final, order) == 4
    assert [r["id"] for r in read_jsonl(final)] == order
    assert not rundir.rank_parts(final)
    # The usual case appends: records after all held ones leave the file's bytes before them.
    before = final.read_bytes()
    part(0, [6])
    assert merge_parts(rundir, final, [*order, "p6"]) == 1
    assert final.read_bytes().startswith(before)
    # Repeating a merge adds nothing (a crash between appending and deleting the parts).
    part(0, [2])
    assert merge_parts(rundir, final, [*order, "p6"]) == 0
    assert [r["id"] for r in read_jsonl(final)] == [*order, "p6"]
