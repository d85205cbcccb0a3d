"""Section ``kd_memory``: one KD training step of the reference approach against ssb's (see
`ssb.bench.kd_step`) on a random-init Qwen2-architecture model with the real 151,936-token
vocabulary but 2 layers of hidden size 256, LoRA r=32 on all 7 projections, B=4, S=1024 and
2048, replies = second half.

Every variant runs in a fresh subprocess; peak RSS is the process's high-water mark (reset just
before the measured step) minus its RSS at that moment. A reference step whose estimated peak
does not fit in the memory available is not run; its peak is then extrapolated (linearly in S)
from a length that fitted, and the row says so. Runs that no longer fit in the time budget are
skipped and say so.
"""

from __future__ import annotations

from typing import Any

from ssb.bench.children import Budget, run_child
from ssb.bench.report import cpu_note, log, row

# A reference KD step is only run when its estimated peak fits in this fraction of the memory
# available (the machine is shared); otherwise the number is extrapolated and marked so.
MEMORY_HEADROOM = 0.8
# Bytes per (B * S * V) element of a reference step's peak RSS (dense float32 teacher, its
# softmax, bf16 logits and log-softmax, the masked copies and the kl_div terms): 21.2 measured at
# B=4, S=512, V=151,936 on CPU. Used only for the go / no-go check above, never reported.
REF_BYTES_PER_ELEMENT = 21.5


def mem_available_bytes() -> int | None:
    """The kernel's estimate of the memory available to a new process (None off Linux)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _ref_fits(batch: int, seq: int, vocab: int) -> tuple[bool, str]:
    """Whether a reference step of this size fits in memory now, and if not, why."""
    need = batch * seq * vocab * REF_BYTES_PER_ELEMENT
    avail = mem_available_bytes()
    if avail is None or need <= MEMORY_HEADROOM * avail:
        return True, ""
    return False, (
        f"estimated peak {need / 2**30:.1f} GiB exceeds {MEMORY_HEADROOM:.0%} of the "
        f"{avail / 2**30:.1f} GiB available on this shared machine"
    )


def section_kd_memory(
    sizes: dict[str, Any], progress: bool, budget: Budget
) -> tuple[dict[str, Any], list[dict]]:
    """Run both variants at each length (in child processes) and build the rows."""
    kd = sizes["kd"]
    batch = kd["batch"]
    data: dict[str, Any] = {
        "model": (
            f"random-init Qwen2 architecture: vocab {kd['vocab']:,} (tied), {kd['layers']} "
            f"layers, hidden {kd['hidden']}, intermediate {kd['intermediate']}, "
            f"{kd['heads']} heads / {kd['kv_heads']} KV heads, bf16, LoRA r={kd['lora_r']} "
            "on all 7 projections"
        ),
        "batch": batch,
        "reply": "second half of each sequence",
        "runs": {},
    }
    rows: list[dict] = []
    ref_measured: dict[int, dict[str, Any]] = {}  # seq -> reference result
    # variant -> (seq, seconds outside the measured steps, seconds per step) of its last run
    costs: dict[str, tuple[int, float, float]] = {}

    def run(variant: str, seq: int, repeats: int) -> dict[str, Any]:
        if budget.remaining() < 45:
            return {"skipped": "time budget used up"}
        if variant in costs:  # the step's time scales with B * S (the V-sized work dominates)
            last_seq, overhead, per_step = costs[variant]
            estimate = 1.2 * (overhead + repeats * per_step * seq / last_seq)
            if estimate > budget.remaining():
                return {
                    "skipped": f"time budget: ~{estimate:.0f} s needed, "
                    f"{max(0.0, budget.remaining()):.0f} s left"
                }
        log(progress, f"kd_memory: {variant}, B={batch} S={seq}")
        spec = {key: value for key, value in kd.items() if key != "seqs"}
        spec.update(seq=seq, variant=variant, repeats=repeats)
        result = run_child("kd_step", spec, budget.timeout())
        if "runs" in result:
            steps = sum(r["collate_s"] + r["step_s"] for r in result["runs"])
            per_step = steps / len(result["runs"])
            costs[variant] = (seq, result["child_wall_s"] - steps, per_step)
        return result

    plan = list(kd["seqs"])
    if not _ref_fits(batch, plan[0], kd["vocab"])[0]:
        # Not even the shortest length fits: add the longest one that does, so both variants are
        # still measured side by side and longer lengths can be scaled from it.
        smaller = plan[0] // 2
        while smaller >= 32 and not _ref_fits(batch, smaller, kd["vocab"])[0]:
            smaller //= 2
        if smaller >= 32:
            plan.insert(0, smaller)
            data["added_length"] = f"S={smaller}: the configured lengths do not fit in memory"
    for seq in plan:
        # Timed repeats only at the first length (where step times are compared); longer runs
        # are there for their memory.
        repeats = kd["repeats"] if seq == plan[0] else 1
        entry: dict[str, Any] = {}
        fits, why = _ref_fits(batch, seq, kd["vocab"])
        if fits:
            entry["reference"] = run("reference", seq, repeats)
            if "step_s" in entry["reference"]:
                ref_measured[seq] = entry["reference"]
        else:
            entry["reference"] = {"skipped": f"not run: {why}"}
            if ref_measured:
                base_seq = max(ref_measured)
                base = ref_measured[base_seq]["peak_rss_delta_mb"]
                entry["reference"]["extrapolated_peak_rss_delta_mb"] = base * seq / base_seq
                entry["reference"]["extrapolated_from_seq"] = base_seq
        entry["ours"] = run("ours", seq, repeats)
        data["runs"][str(seq)] = entry
        ref, ours = entry["reference"], entry["ours"]
        if "step_s" not in ours:
            continue
        where = f"B={batch} S={seq}"
        if "step_s" in ref:
            rows.append(
                row(
                    "kd_memory",
                    f"{where}: peak RSS delta, reference / ours",
                    ref["peak_rss_delta_mb"],
                    ours["peak_rss_delta_mb"],
                    "baseline/ours",
                    unit="MiB",
                    goal=(">=", 10.0),
                )
            )
            rows.append(
                row(
                    "kd_memory",
                    f"{where}: step time (forward + backward), reference / ours",
                    ref["step_s"],
                    ours["step_s"],
                    "baseline/ours",
                    unit="s",
                    goal=(">=", 1.0),
                    note=cpu_note(ref["step_cpu_s"], ours["step_cpu_s"]),
                )
            )
            rows.append(
                row(
                    "kd_memory",
                    f"{where}: collate + forward + backward, reference / ours",
                    ref["collate_s"] + ref["step_s"],
                    ours["collate_s"] + ours["step_s"],
                    "baseline/ours",
                    unit="s",
                )
            )
        elif "extrapolated_peak_rss_delta_mb" in ref:
            base_seq = ref["extrapolated_from_seq"]
            rows.append(
                row(
                    "kd_memory",
                    f"{where}: peak RSS delta, reference (EXTRAPOLATED linearly from S={base_seq}; "
                    "not run) / ours (measured)",
                    ref["extrapolated_peak_rss_delta_mb"],
                    ours["peak_rss_delta_mb"],
                    "baseline/ours",
                    unit="MiB",
                    goal=(">=", 10.0),
                    note=ref["skipped"],
                )
            )
    return data, rows
