"""`ssb export`: a run's pairs as a parquet dataset and its adapter, each with a card, in a
folder and optionally on the Hugging Face Hub.

    <out>/dataset/   README.md, data/train-00000-of-00001.parquet, ssb_export.json
    <out>/model/     README.md + a copy of the run's adapter/ (PEFT's own README.md
                     excepted) whose adapter_config.json names the base's public identity

The run directory is only read. The folder is built next to `<out>` and moved into place, so a
killed export never leaves a half-written one; an earlier export in `<out>` is replaced, any
other non-empty `<out>` is refused.

`datasets` (several seconds: pyarrow, pandas) and `huggingface_hub` are imported inside the
functions that use them, so `ssb --help` and the other commands do not pay for them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import datasets
from huggingface_hub import HfApi, get_token

from ssb.config import to_dict
from ssb.identity import adapter_hash, write_adapter_config
from ssb.models import hub_reachable
from ssb.rundir import ADAPTER_CONFIG, RunDir, current_umask, has_adapter
from ssb.share import (
    DATASET_DIR,
    EXPORT_FORMAT,
    EXPORT_FORMAT_VERSION,
    EXPORT_META_NAME,
    MODEL_DIR,
    PAIR_FIELDS,
    PARQUET_NAME,
    ShareError,
    pair_features,
)
from ssb.share.cards import dataset_card, model_card
from ssb.share.facts import RunFacts, data_source, read_run_facts

log = logging.getLogger("ssb")


def dataset_repo_name(model_repo: str) -> str:
    """The dataset repo that goes with model repo REPO: REPO-pairs."""
    return f"{model_repo}-pairs"


def check_eval_matches_adapter(rundir: RunDir, summary: dict[str, Any]) -> None:
    """Refuse a card whose evaluation numbers belong to another adapter (trained again after
    `ssb eval`)."""

    evaluated = ((summary.get("models") or {}).get("student") or {}).get("adapter_hash")
    current = adapter_hash(rundir.adapter_dir)
    if evaluated and current and evaluated != current:
        raise ShareError(
            f"eval/summary.json evaluated adapter {evaluated}, but {rundir.adapter_dir} is now "
            f"{current} (trained again since): run `ssb eval --run-dir {rundir.path}` first"
        )


def export_run(
    rundir: RunDir | str | Path,
    out: str | Path,
    *,
    push_to_hub: str | None = None,
    dataset_repo: str | None = None,
    private: bool = False,
) -> dict[str, Any]:
    """Write `<out>/dataset` (and `<out>/model` when the run has an adapter); with
    `push_to_hub`, upload them to the model repo `push_to_hub` and the dataset repo
    `dataset_repo` (default `<push_to_hub>-pairs`). Returns a summary."""

    rundir = rundir if isinstance(rundir, RunDir) else RunDir(rundir)
    out = Path(out)
    token = ""
    if push_to_hub:
        dataset_repo = dataset_repo or dataset_repo_name(push_to_hub)
        token = hub_token()  # before any work: a missing token is found at once
    facts = read_run_facts(rundir)
    with_model = has_adapter(rundir.adapter_dir)
    if with_model:
        check_eval_matches_adapter(rundir, facts.summary)
    else:
        log.warning("export: %s has no adapter; exporting the pairs only", rundir.adapter_dir)
    _check_out(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0700 would keep the export from others
    try:
        write_dataset(facts, tmp / DATASET_DIR, dataset_repo)
        if with_model:
            write_model(facts, rundir.adapter_dir, tmp / MODEL_DIR, push_to_hub, dataset_repo)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary: dict[str, Any] = {
        "out": str(out),
        "pairs": len(facts.pairs),
        "dataset": str(out / DATASET_DIR),
        "model": str(out / MODEL_DIR) if with_model else None,
    }
    if push_to_hub:
        summary.update(
            upload(out, push_to_hub if with_model else None, dataset_repo, token, private)
        )
    return summary


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ShareError(f"--out {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not (out / DATASET_DIR / EXPORT_META_NAME).is_file():
        raise ShareError(f"--out {out} is not empty and holds no earlier ssb export; use another")
    out.parent.mkdir(parents=True, exist_ok=True)


def _replace_dir(new: Path, final: Path) -> None:
    old = final.parent / f".{final.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    new.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def export_meta(facts: RunFacts) -> dict[str, Any]:
    """ssb_export.json: what import-pairs needs to trust the stored token ids, and the origin a
    re-export's card names."""

    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_FORMAT_VERSION,
        "ssb_version": metadata.version("ssb"),
        "run_name": facts.name,
        "pairs": len(facts.pairs),
        "model": facts.base_model,
        "model_identity": facts.manifest.get("model_identity"),
        "prompt": to_dict(facts.cfg.prompt),
        "data": data_source(facts),
        "funnel": facts.funnel,
    }


def write_dataset(facts: RunFacts, directory: Path, dataset_repo: str | None) -> None:

    directory.mkdir(parents=True)
    rows = [{f: pair[f] for f in PAIR_FIELDS} for pair in facts.pairs]
    dataset = datasets.Dataset.from_list(rows, features=pair_features())
    (directory / PARQUET_NAME).parent.mkdir(parents=True)
    bars_were_on = datasets.is_progress_bar_enabled()  # a bar for one small file is noise
    datasets.disable_progress_bars()
    try:
        dataset.to_parquet(str(directory / PARQUET_NAME))
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    # Plain writes: the whole folder is moved into place once complete.
    (directory / EXPORT_META_NAME).write_text(json.dumps(export_meta(facts), indent=2) + "\n")
    dataset_card(facts, dataset_repo).save(directory / "README.md")


def write_model(
    facts: RunFacts,
    adapter_dir: Path,
    directory: Path,
    model_repo: str | None,
    dataset_repo: str | None,
) -> None:
    # PEFT's save_pretrained writes a template README.md; the model card replaces it. Contents
    # only (copyfile): the run's files may be private to its owner, the export is for sharing.
    shutil.copytree(
        adapter_dir,
        directory,
        ignore=shutil.ignore_patterns("README.md"),
        copy_function=shutil.copyfile,
    )
    # The run's adapter names where this machine loaded the base from (for the embedded model,
    # the conversion cache under the user's home); a shared one names the base's public identity,
    # so PEFT (AutoPeftModelForCausalLM, vLLM) resolves it anywhere.
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    config.update(base_model_name_or_path=facts.base_model, revision=facts.base_revision)
    write_adapter_config(directory, config)
    rank = int(config.get("r", 0))
    model_card(facts, model_repo, dataset_repo, rank).save(directory / "README.md")


# --------------------------------------------------------------------------- the hub


def hub_token() -> str:
    """The Hugging Face token (HF_TOKEN or `hf auth login`), checked before any network call."""

    token = get_token()
    if not token:
        raise ShareError(
            "--push-to-hub needs a Hugging Face token with write access: set HF_TOKEN or run "
            "`hf auth login` (nothing was written or uploaded)"
        )
    return token


def upload(
    out: Path, model_repo: str | None, dataset_repo: str, token: str, private: bool
) -> dict[str, Any]:
    """Create the repos (if missing) and upload the exported folders."""

    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    kept = f"the export is in {out}; rerun with --push-to-hub to upload it"
    if not hub_reachable():
        raise ShareError(f"the Hugging Face Hub at {endpoint} is not reachable; {kept}")
    api = HfApi(endpoint=endpoint, token=token)
    targets = [(dataset_repo, "dataset", out / DATASET_DIR)]
    if model_repo:
        targets.append((model_repo, "model", out / MODEL_DIR))
    urls = {}
    for repo, kind, folder in targets:
        try:
            api.create_repo(repo, repo_type=kind, private=private, exist_ok=True)
            api.upload_folder(
                repo_id=repo,
                repo_type=kind,
                folder_path=folder,
                commit_message="Upload with ssb export",
            )
        except Exception as exc:  # noqa: BLE001 - network, auth, name: say which repo failed
            detail = " ".join(str(exc).split())[:300]
            raise ShareError(
                f"upload of the {kind} repo {repo!r} to {endpoint} failed "
                f"({type(exc).__name__}: {detail}); {kept}"
            ) from exc
        prefix = "datasets/" if kind == "dataset" else ""
        urls[f"{kind}_repo"] = f"{endpoint}/{prefix}{repo}"
    return urls
