"""Command line: one command per stage, plus `run` for the whole pipeline.

    ssb <stage> --run-dir DIR [--preset NAME | --config FILE] [--set key=value ...]

Without --preset/--config, a run directory that already has a config.yaml is continued with that
config (plus any --set overrides); a new one starts from the defaults.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ssb.config import PRESETS, Config, ConfigError, dump_yaml, load_config
from ssb.rundir import RunDir, RunDirError

log = logging.getLogger("ssb")


def _stage_rollout(cfg: Config, rundir: RunDir, args: argparse.Namespace) -> dict[str, Any]:
    from ssb.stages.rollout import run_rollout

    return run_rollout(cfg, rundir, progress=not args.quiet)


def _stage_bootstrap(cfg: Config, rundir: RunDir, args: argparse.Namespace) -> dict[str, Any]:
    from ssb.stages.bootstrap import run_bootstrap

    return run_bootstrap(cfg, rundir, progress=not args.quiet)


def _stage_targets(cfg: Config, rundir: RunDir, args: argparse.Namespace) -> dict[str, Any]:
    from ssb.stages.targets import run_targets

    return run_targets(cfg, rundir, progress=not args.quiet)


def _stage_train(cfg: Config, rundir: RunDir, args: argparse.Namespace) -> dict[str, Any]:
    from ssb.stages.train import run_train

    return run_train(cfg, rundir, progress=not args.quiet)


def _stage_grpo(cfg: Config, rundir: RunDir, args: argparse.Namespace) -> dict[str, Any]:
    from ssb.stages.grpo import run_grpo

    return run_grpo(cfg, rundir, progress=not args.quiet)


def _stage_eval(cfg: Config, rundir: RunDir, args: argparse.Namespace) -> dict[str, Any]:
    from ssb.stages.evaluate import run_eval

    return run_eval(cfg, rundir, progress=not args.quiet)


def _stage_report(cfg: Config, rundir: RunDir, args: argparse.Namespace) -> dict[str, Any]:
    from ssb.report import write_report

    return {"report": str(write_report(rundir, cfg))}


STAGES: dict[str, tuple[str, Callable[..., dict[str, Any]]]] = {
    "rollout": ("sample K hint-free answers per training problem and grade them", _stage_rollout),
    "bootstrap": (
        "select mixed problems and generate the hinted teacher's robust solutions",
        _stage_bootstrap,
    ),
    "targets": ("score the replies with the frozen teacher and store its targets", _stage_targets),
    "train": ("train the hint-free LoRA student on the teacher targets", _stage_train),
    "grpo": (
        "train the GRPO baseline LoRA (TRL GRPOTrainer) on the same problems, prompts and "
        "LoRA budget",
        _stage_grpo,
    ),
    "eval": ("evaluate the base model and the student on benchmarks", _stage_eval),
    "report": ("write report.md and plots from the run's files", _stage_report),
}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, help="run directory (created if missing)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), help="start from a preset")
    src.add_argument("--config", help="YAML config file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key by dotted path, e.g. --set rollout.num_samples=8",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="use the run directory even if its earlier stages were made with another config",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssb",
        description="Semantic Soft Bootstrapping: distil a model's own hinted solutions into a "
        "hint-free LoRA student (arXiv 2512.05105).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, _) in STAGES.items():
        _add_common(sub.add_parser(name, help=help_text, description=help_text))
    _add_common(
        sub.add_parser(
            "run",
            help="the whole pipeline: rollout, bootstrap, targets, train, eval, report",
            description="Run every stage in order; finished work is skipped, so it also resumes.",
        )
    )
    bench = sub.add_parser(
        "bench",
        help="measured ratios: target storage, KD memory/time, generation and scoring throughput",
        description="Each row compares two variants measured side by side in this run.",
    )
    bench.add_argument("--out", default="bench", help="output directory (results.json/.md)")
    bench.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    bench.add_argument(
        "--sections",
        default=None,
        help="comma-separated subset of storage,kd_memory,generation,scoring,cpu,stages,gpu",
    )
    bench.add_argument(
        "--stage-times-from", default=None, help="a run directory whose stage times to report"
    )
    bench.add_argument("--quiet", action="store_true", help="no progress bars")
    show = sub.add_parser("config", help="print the resolved config as YAML")
    g = show.add_mutually_exclusive_group()
    g.add_argument("--preset", choices=sorted(PRESETS))
    g.add_argument("--config")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser


def resolve_config(args: argparse.Namespace) -> Config:
    run_dir = getattr(args, "run_dir", None)
    existing = Path(run_dir) / "config.yaml" if run_dir else None
    if args.preset is None and args.config is None and existing is not None and existing.exists():
        return load_config(config_file=existing, overrides=args.overrides)
    return load_config(preset=args.preset, config_file=args.config, overrides=args.overrides)


def setup_logging(quiet: bool = False) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("transformers", "accelerate", "datasets", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def run_stage(name: str, cfg: Config, rundir: RunDir, args: argparse.Namespace) -> dict[str, Any]:
    """Run one stage under the manifest's bookkeeping and log where its artifacts went."""
    _, fn = STAGES[name]
    start = time.time()
    with rundir.stage(name) as summary:
        summary.update(fn(cfg, rundir, args))
    log.info("%s done in %.1f s: %s", name, time.time() - start, json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "quiet", False))
    try:
        if args.command == "bench":
            from ssb.bench import run_bench

            run_bench(
                Path(args.out),
                quick=args.quick,
                sections=args.sections.split(",") if args.sections else None,
                progress=not args.quiet,
                stage_times_from=Path(args.stage_times_from) if args.stage_times_from else None,
            )
            sys.stdout.write((Path(args.out) / "results.md").read_text())
            return 0
        if args.command == "config":
            cfg = load_config(preset=args.preset, config_file=args.config, overrides=args.overrides)
            sys.stdout.write(dump_yaml(cfg))
            return 0
        cfg = resolve_config(args)
        rundir = RunDir(args.run_dir)
        rundir.init(cfg, args.command, force=args.force)
        from ssb.models import set_seed

        set_seed(cfg.seed)
        log.info("run directory: %s", rundir.path.resolve())
        if args.command == "run":
            from ssb.stages.pipeline import run_pipeline

            summary = run_pipeline(cfg, rundir, progress=not args.quiet)
            _print_artifacts(rundir)
        else:
            summary = run_stage(args.command, cfg, rundir, args)
        print(json.dumps({"stage": args.command, "run_dir": str(rundir.path), **summary}, indent=2))
        return 0
    except Exception as exc:
        # Errors a user can act on (bad config, data, model, run directory, target store, disk)
        # get one line; anything else is a bug and keeps its traceback (as does SSB_DEBUG=1).
        if not isinstance(exc, _user_errors()) or os.environ.get("SSB_DEBUG"):
            raise
        print(f"ssb: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _user_errors() -> tuple[type[BaseException], ...]:
    from ssb.distill.store import TargetStoreError
    from ssb.generate.base import GenerationAborted
    from ssb.hardware import DeviceError
    from ssb.models import ModelLoadError
    from ssb.problems import ProblemsError

    errors = (ConfigError, RunDirError, ProblemsError, TargetStoreError, ModelLoadError)
    errors = (*errors, DeviceError, GenerationAborted)
    return (*errors, ValueError, OSError)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        text = f"{exc.strerror}{where}"
    return text


def _print_artifacts(rundir: RunDir) -> None:
    names = [
        ("config", rundir.config_path),
        ("manifest", rundir.manifest_path),
        ("rollouts", rundir.rollouts_path),
        ("pairs", rundir.pairs_path),
        ("teacher targets", rundir.targets_dir),
        ("LoRA adapter", rundir.adapter_dir),
        ("training log", rundir.train_log_path),
        ("evaluation", rundir.eval_dir),
        ("plots", rundir.plots_dir),
        ("report", rundir.report_path),
    ]
    print("\nArtifacts:", file=sys.stderr)
    for label, path in names:
        if path.exists():
            print(f"  {label:16s} {path}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
