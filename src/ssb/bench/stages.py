"""Section ``stages``: per-stage wall time and share of the total from a run directory's
manifest.json (``stage_times_from=``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ssb.bench.report import finite, row


def section_stages(run_dir: Path | None) -> tuple[dict[str, Any], list[dict]]:
    if run_dir is None:
        return {"skipped": "no run directory given (stage_times_from=None)"}, []
    manifest_path = Path(run_dir) / "manifest.json"
    if not manifest_path.exists():
        return {"skipped": f"{manifest_path} does not exist (run `make demo` first)"}, []
    manifest = json.loads(manifest_path.read_text())
    stages = {
        name: float(info["seconds"])
        for name, info in manifest.get("stages", {}).items()
        if isinstance(info, dict) and finite(info.get("seconds"))
    }
    total = sum(stages.values())
    data = {"run_dir": str(run_dir), "seconds": stages, "total_s": total}
    rows = [
        row("stages", f"stage '{name}': share of total wall time", total, secs, "share", unit="s")
        for name, secs in stages.items()
    ]
    return data, rows
