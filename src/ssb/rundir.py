"""The run directory: one folder per run, atomic writes, crash-tolerant jsonl, the manifest.

Layout (DESIGN section 4)::

    runs/<name>/config.yaml  manifest.json  rollouts.jsonl  pairs.jsonl  targets/  adapter/
                diagnostics/  eval/  report.md  plots/

Every write is either an atomic replace (temp file + fsync + rename) or a jsonl append that is
flushed and fsynced per batch; a reader tolerates a torn last line (the record in flight when a
process was killed) and the next append cuts it off, so a resumed stage never duplicates or loses
a finished record.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from ssb.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_hash,
    dump_yaml,
    flatten,
    lookup,
    to_dict,
)

TRACKED_PACKAGES = (
    "ssb",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "safetensors",
    "datasets",
    "math-verify",
    "gguf",
    "trl",
    "vllm",
)

log = logging.getLogger("ssb")


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def has_adapter(path: str | Path | None) -> bool:
    """True when `path` holds a saved PEFT adapter (config + weights)."""
    if path is None:
        return False
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and any(
        (path / f).is_file() for f in ADAPTER_WEIGHT_FILES
    )


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (incompatible config, unwritable, ...)."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) stopped the command: raised like Ctrl-C's KeyboardInterrupt, so
    every stage unwinds the same way, with the signal kept for the exit status (128 + signal)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_interrupted(signum: int, frame: Any = None) -> None:
    """A signal handler: SIGTERM stops a command as Ctrl-C does."""
    raise Interrupted(signum)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive inside the block take effect when it ends, so a record
    being appended is written whole. Python runs signal handlers in the main thread only, so
    only there is there anything to defer."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    previous = {s: h for s, h in previous.items() if h is not None}  # not set from Python
    for signum in previous:
        signal.signal(signum, lambda n, _frame: caught.append(n))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if caught:
            signal.raise_signal(caught[0])  # now handled as it would have been


def current_umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def honour_umask(directory: Path) -> None:
    """Give the files a library wrote into `directory` the mode a plain open() gives
    (safetensors writes its files 0600)."""
    mode = 0o666 & ~current_umask()
    for path in Path(directory).rglob("*"):
        if path.is_file():
            os.chmod(path, mode)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; the result gets the mode a plain open() would give it.
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:
            raise naming_file(exc, path) from exc
        raise
    _fsync_dir(path.parent)


def naming_file(exc: OSError, path: Path) -> OSError:
    """The same error with the file named: a failed write() or fsync() (a full disk) names none,
    and "No space left on device" alone does not say what was being written."""
    return type(exc)(exc.errno, exc.strerror or str(exc), str(path))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any, default: Callable[[Any], Any] | None = None) -> None:
    """`default` converts what JSON cannot hold, as in `json.dumps`."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, default=default)
    atomic_write_text(path, text + "\n")


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All complete records of a jsonl file. A torn last line (no trailing newline, or not valid
    JSON) is ignored: it is the record a killed process was writing. A bad line in the middle
    is an error naming the file and line."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with path.open("rb") as f:
        lines = f.read().split(b"\n")
    # split() leaves '' after a final newline; anything else in the last slot is a torn record.
    complete, tail = lines[:-1], lines[-1]
    for lineno, raw in enumerate(complete, start=1):
        if not raw.strip():
            continue
        try:
            records.append(json.loads(raw))
        except json.JSONDecodeError as exc:
            raise RunDirError(f"{path} line {lineno}: not valid JSON ({exc.msg})") from None
        except UnicodeDecodeError:
            raise RunDirError(f"{path} line {lineno}: not valid UTF-8") from None
    del tail
    return records


def _truncate_torn_tail(path: Path) -> None:
    """Cut a partial last line left by a killed writer, so the next append starts clean."""
    if not path.exists():
        return
    with path.open("rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1  # 0 when there is no complete line at all
        f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())


def append_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> int:
    """Append records (one JSON object per line) and fsync. Returns the number written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _truncate_torn_tail(path)
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
    if not lines:
        return 0
    try:
        with deferred_signals(), path.open("a", encoding="utf-8") as f:
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        if exc.filename is None:
            raise naming_file(exc, path) from exc
        raise
    return len(lines)


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# Config sections that, when changed, make earlier stages' files unusable for later ones.
# Changing e.g. eval settings between stages is fine; changing the model is not.
_STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "rollout": (
        "model",
        "data.train",
        "data.train_split",
        "data.synthetic",
        "data.shuffle",
        "prompt",
        "rollout",
        "generation.max_new_tokens",
        "seed",
    ),
    "bootstrap": ("bootstrap",),
    # Not the diagnostic's switches (targets.diagnose*): they change no stored target.
    "targets": ("targets.mode", "targets.topk", "targets.batch_size", "targets.shard_size"),
    "train": ("train",),
    "grpo": ("grpo", "train.lora"),
}

# Keys of a stage's inputs that change nothing in its files (a misspelt tracker fixed,
# checkpoints made more often): never a reason to refuse a run or to redo a stage.
_NO_EFFECT_ON_FILES = frozenset({"train.report_to", "train.save_steps", "grpo.save_steps"})
# Keys a killed training resumes under (its checkpoint fingerprint leaves them out): a longer
# training continues from the checkpoints; any other change starts it afresh.
RESUME_FREE_KEYS = _NO_EFFECT_ON_FILES | {"train.logging_steps", "train.epochs"}


def writes_bookkeeping() -> bool:
    """Under a multi-process launch (`accelerate launch`, torchrun) only rank 0 writes the run's
    config and manifest; the other ranks read them. Two processes read-modify-writing one
    manifest could each drop the other's update."""
    return os.environ.get("RANK", "0") == "0"


class RunDir:
    """Paths and bookkeeping of one run directory."""

    def __init__(self, path: str | Path, force: bool = False):
        self.path = Path(path)
        # --force: proceed although earlier stages used another config, model or tokenizer.
        self.force = force

    # ---- paths
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def stale_dir(self) -> Path:
        """Where the files of a stage that did not complete go when it is rerun with other
        settings (`stale/<stage>.<time>/`): neither reused nor lost."""
        return self.path / "stale"

    def stage_outputs(self, stage: str) -> list[Path]:
        """The files a stage writes (that exist), including ranks' parts not yet merged."""
        own = {
            "rollout": [self.rollouts_path],
            "bootstrap": [self.pairs_path, self.bootstrap_log_path],
            "targets": [self.targets_dir],
            "train": [self.checkpoints_dir, self.train_log_path, self.adapter_dir],
            "grpo": [self.grpo_dir],
            "eval": [self.eval_dir],
        }.get(stage, [])
        parts = [p for f in own if f.suffix == ".jsonl" for p in self.rank_parts(f)]
        return [p for p in [*own, *parts] if p.exists()]

    def rank_part(self, final: Path, rank: int) -> Path:
        """Where rank `rank` of a multi-process launch appends the records meant for `final` (a
        file of this run) before rank 0 merges them (`ssb.stages.ranks`)."""
        return self.path / "parts" / f"rank{rank}" / Path(final).relative_to(self.path)

    def rank_parts(self, final: Path) -> list[Path]:
        """Every rank's part of `final` that exists, by rank."""
        relative = Path(final).relative_to(self.path)
        parts = (self.path / "parts").glob(f"rank*/{relative}")
        return sorted(parts, key=lambda p: int(p.relative_to(self.path).parts[1][4:]))

    @property
    def rollouts_path(self) -> Path:
        return self.path / "rollouts.jsonl"

    @property
    def pairs_path(self) -> Path:
        return self.path / "pairs.jsonl"

    @property
    def bootstrap_log_path(self) -> Path:
        """Every problem the bootstrap stage has decided on (kept or rejected, and why)."""
        return self.path / "bootstrap.jsonl"

    @property
    def targets_dir(self) -> Path:
        return self.path / "targets"

    @property
    def diagnostics_dir(self) -> Path:
        return self.path / "diagnostics"

    @property
    def teacher_signal_path(self) -> Path:
        """`ssb diagnose`'s teacher-signal diagnostic (ssb.stages.diagnose)."""
        return self.diagnostics_dir / "teacher_signal.json"

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def train_log_path(self) -> Path:
        return self.path / "train_log.jsonl"

    @property
    def eval_dir(self) -> Path:
        return self.path / "eval"

    @property
    def eval_summary_path(self) -> Path:
        return self.eval_dir / "summary.json"

    def eval_records_path(self, model: str, bench_slug: str) -> Path:
        """One model's records on one benchmark (`ssb.stages.eval_setup.bench_slug` names it)."""
        return self.eval_dir / f"{model}-{bench_slug}.jsonl"

    # The GRPO baseline keeps its own adapter, log and checkpoints under grpo/.
    @property
    def grpo_dir(self) -> Path:
        return self.path / "grpo"

    @property
    def grpo_adapter_dir(self) -> Path:
        return self.grpo_dir / "adapter"

    @property
    def grpo_log_path(self) -> Path:
        return self.grpo_dir / "train_log.jsonl"

    @property
    def grpo_checkpoints_dir(self) -> Path:
        return self.grpo_dir / "checkpoints"

    def round(self, index: int) -> RunDir:
        """Iterated SSB: round 1 is this run directory itself, round r >= 2 is `round<r>/`."""
        return self if index == 1 else RunDir(self.path / f"round{index}", force=self.force)

    @staticmethod
    def round_model_name(index: int) -> str:
        """The name evaluation gives round r's student ("student" for round 1, whose adapter is
        adapter/; "round<r>" for the others, whose adapter is round<r>/adapter/)."""
        return "student" if index == 1 else f"round{index}"

    def trained_adapters(self) -> dict[str, Path]:
        """name -> adapter directory of every model trained in this run: "student" (adapter/)
        and "<name>" for any direct sub-directory holding `<name>/adapter/` (grpo, round2, ...)."""
        found = {"student": self.adapter_dir} if has_adapter(self.adapter_dir) else {}
        if self.path.is_dir():
            for sub in sorted(self.path.iterdir()):
                if sub.is_dir() and sub.name not in found and has_adapter(sub / "adapter"):
                    found[sub.name] = sub / "adapter"
        return found

    # `ssb ablate` keeps everything under ablate/ (AblationDir).
    @property
    def ablate_dir(self) -> Path:
        return self.path / "ablate"

    def ablation(self) -> AblationDir:
        return AblationDir(self.ablate_dir, run=self)

    @property
    def plots_dir(self) -> Path:
        return self.path / "plots"

    @property
    def report_path(self) -> Path:
        return self.path / "report.md"

    # ---- manifest
    def read_pairs(self) -> list[dict[str, Any]]:
        """pairs.jsonl's records; an error saying what makes them when there are none."""
        pairs = read_jsonl(self.pairs_path)
        if not pairs:
            raise FileNotFoundError(f"no pairs in {self.pairs_path}: run `ssb bootstrap` first")
        return pairs

    def read_manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {}
        try:
            return json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise RunDirError(f"{self.manifest_path}: not valid JSON ({exc.msg})") from None

    def update_manifest(self, **updates: Any) -> dict[str, Any]:
        manifest = self.read_manifest()
        for key, value in updates.items():
            if isinstance(value, dict) and isinstance(manifest.get(key), dict):
                manifest[key] = {**manifest[key], **value}
            else:
                manifest[key] = value
        if writes_bookkeeping():
            atomic_write_json(self.manifest_path, manifest)
        return manifest

    def stage_status(self, stage: str) -> dict[str, Any]:
        return self.read_manifest().get("stages", {}).get(stage, {})

    def is_complete(self, stage: str) -> bool:
        return self.stage_status(stage).get("status") == "complete"

    def record_stage(self, stage: str, status: str, **info: Any) -> None:
        manifest = self.read_manifest()
        stages = manifest.setdefault("stages", {})
        entry = stages.get(stage, {})
        entry.update(info)
        entry["status"] = status
        entry["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        stages[stage] = entry
        if writes_bookkeeping():
            atomic_write_json(self.manifest_path, manifest)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        """Mark a stage running, time it, and mark it complete (or failed) at the end.

        The yielded dict collects the summary the stage wants recorded in the manifest.
        `seconds` is the stage's wall time summed over every attempt (a crashed attempt and its
        resumption, or a rerun that found everything done), so it stays the time the stage's
        work took; `last_seconds` is the latest attempt's."""
        summary: dict[str, Any] = {}
        start = time.time()
        status = self.stage_status(name)
        before = float(status.get("seconds") or 0.0)
        killed = {}
        if status.get("status") == "running" and status.get("started"):
            # The last attempt was killed (SIGKILL, power loss) and never recorded its time:
            # count it up to the last file it wrote.
            last_write = max((_newest_mtime(p) for p in self.stage_outputs(name)), default=0.0)
            before += max(0.0, last_write - float(status["started"]))
            killed = {"killed_attempts": int(status.get("killed_attempts") or 0) + 1}
        self.record_stage(name, "running", started=start, **killed)

        def timing() -> dict[str, float]:
            took = time.time() - start
            return {"seconds": round(before + took, 2), "last_seconds": round(took, 2)}

        try:
            yield summary
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM as Interrupted
            self.record_stage(name, "interrupted", error=f"{exc or 'SIGINT'}", **timing())
            raise
        except BaseException as exc:
            self.record_stage(name, "failed", error=f"{type(exc).__name__}: {exc}", **timing())
            raise
        self.record_stage(name, "complete", **{**summary, **timing()})

    # ---- set-up
    def init(self, cfg: Config, stage: str, force: bool = False) -> None:
        """Create the directory, check that `cfg` is compatible with what earlier stages used,
        and write the resolved config and package versions."""
        self.force = self.force or force
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"--run-dir {self.path} is a file, not a directory")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test-{os.getpid()}"  # one per process: ranks race
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise RunDirError(f"cannot write to run directory {self.path}: {exc}") from None
        if self.config_path.exists() and not force:
            self._check_compatible(cfg)
        if writes_bookkeeping():
            atomic_write_text(self.config_path, dump_yaml(cfg))
        self.update_manifest(
            name=cfg.name,
            config_hash=config_hash(cfg),
            packages=package_versions(),
            command=" ".join(sys.argv),
        )

    def _check_compatible(self, cfg: Config) -> None:

        try:
            old = yaml.safe_load(self.config_path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise RunDirError(f"{self.config_path}: invalid YAML ({exc})") from None
        try:
            # Keys added to the config since the run was made compare as their defaults.
            old = to_dict(config_from_dict(old))
        except (ConfigError, TypeError):
            pass  # an old key since removed: compare what the file holds
        new = to_dict(cfg)
        status = {s: v.get("status") for s, v in self.read_manifest().get("stages", {}).items()}
        diffs, redo = [], []
        for stage, keys in _STAGE_INPUTS.items():
            changed = [k for k in _changed_keys(old, new, keys) if k not in _NO_EFFECT_ON_FILES]
            if status.get(stage) == "complete":
                # Only a stage that completed locks its settings: later stages read its files.
                diffs += [f"{key} (used by finished stage '{stage}')" for key in changed]
            elif status.get(stage) and any(k not in RESUME_FREE_KEYS for k in changed):
                redo.append((stage, changed))  # failed or killed: its files are set aside
        if diffs:
            raise RunDirError(
                f"{self.path} was made with a different config: "
                + ", ".join(diffs)
                + ". Use a new --run-dir, or --force to proceed anyway."
            )
        for stage, changed in redo:
            self._set_aside(stage, changed)

    def _set_aside(self, stage: str, changed: list[str]) -> None:
        """A stage that failed or was killed is rerun with other settings: what it wrote is
        moved to stale/ so the rerun starts afresh instead of mixing the two settings."""
        outputs = self.stage_outputs(stage)
        if not outputs or not writes_bookkeeping():
            return
        dest = self.stale_dir / f"{stage}.{time.strftime('%Y%m%dT%H%M%S')}"
        for path in outputs:
            target = dest / path.relative_to(self.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            path.rename(target)
        log.warning(
            "%s did not complete and %s changed: its files were moved to %s; it starts afresh",
            stage,
            ", ".join(changed),
            dest,
        )


def _newest_mtime(path: Path) -> float:
    """The newest modification time of a file, or of anything under a directory."""
    if path.is_file():
        return path.stat().st_mtime
    return max((p.stat().st_mtime for p in path.rglob("*") if p.is_file()), default=0.0)


def _changed_keys(old: dict[str, Any], new: dict[str, Any], keys: Iterable[str]) -> list[str]:
    """The dotted keys under `keys` whose values differ (the key itself when a whole section is
    compared, e.g. "train.learning_rate" for "train")."""
    changed = []
    for key in keys:
        a, b = lookup(old, key), lookup(new, key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += [
                f"{key}.{k}"
                for k in sorted(flatten(a).keys() | flatten(b).keys())
                if lookup(a, k) != lookup(b, k)
            ]
        elif a != b:
            changed.append(key)
    return changed


# --------------------------------------------------------------------------- `ssb ablate`


class DataDir(RunDir):
    """A run directory of its own on the run's rollouts: an ablation arm's training data, e.g. a
    teacher context's bootstrap.jsonl, pairs.jsonl and targets/, or the rft arm's pairs.jsonl
    of correct rollouts. Its rollouts are `own_rollouts_path` once an arm has written the share
    of the run's it draws on there, else the run's (`run.rollouts_path`)."""

    def __init__(self, path: str | Path, run: RunDir):
        super().__init__(path, force=run.force)
        self.run = run

    @property
    def own_rollouts_path(self) -> Path:
        return self.path / "rollouts.jsonl"

    @property
    def rollouts_path(self) -> Path:
        own = self.own_rollouts_path
        return own if own.exists() else self.run.rollouts_path


class ArmDir(RunDir):
    """One arm and seed of `ssb ablate`: trains from the pairs, targets and rollouts of `source`
    (the run, or a DataDir) into its own adapter/, checkpoints/ and train_log.jsonl (GRPO's too:
    its grpo_* paths are these), and marks itself finished with done.json."""

    def __init__(self, path: str | Path, source: RunDir):
        super().__init__(path, force=source.force)
        self.source = source

    @property
    def rollouts_path(self) -> Path:
        return self.source.rollouts_path

    @property
    def pairs_path(self) -> Path:
        return self.source.pairs_path

    @property
    def bootstrap_log_path(self) -> Path:
        return self.source.bootstrap_log_path

    @property
    def targets_dir(self) -> Path:
        return self.source.targets_dir

    @property
    def grpo_dir(self) -> Path:
        return self.path

    @property
    def done_path(self) -> Path:
        """Written atomically once the adapter is saved: this arm and seed is never redone."""
        return self.path / "done.json"


class AblationDir(RunDir):
    """<run>/ablate/: one evaluation of every arm and seed (eval/, manifest.json, plots/,
    report.md) and summary.json; ablate/<arm>/ holds an arm's own data (a DataDir) and
    ablate/<arm>/seed<k>/ each of its trainings (an ArmDir)."""

    def __init__(self, path: str | Path, run: RunDir):
        super().__init__(path, force=run.force)
        self.run = run

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    def arm_data(self, arm: str) -> DataDir:
        return DataDir(self.path / arm, run=self.run)

    def selection(self) -> AblationDir:
        """ablate/select/: the hyperparameter search on the validation split, laid out like the
        ablation itself (<arm>/<grid point>/seed<k>/, one eval/ of every point), plus
        validation.jsonl (the split) and selection.json (every point's score, the choices)."""
        return AblationDir(self.path / "select", self.run)

    @property
    def validation_path(self) -> Path:
        return self.path / "validation.jsonl"

    @property
    def selection_path(self) -> Path:
        return self.path / "selection.json"

    def arm_dir(self, arm: str, seed: int, source: RunDir) -> ArmDir:
        return ArmDir(self.path / arm / f"seed{seed}", source)

    @staticmethod
    def model_name(arm: str, seed: int) -> str:
        """The name evaluation gives an arm's model of one seed."""
        return f"{arm}-seed{seed}"
