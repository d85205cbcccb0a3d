"""Command line: one command per stage, plus `run` for the whole pipeline.

    ssb <stage> --run-dir DIR [--preset NAME | --config FILE] [--set key=value ...]

Without --preset/--config, a run directory that already has a config.yaml is continued with that
config (plus any --set overrides); a new one starts from the defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Collection
from importlib import metadata
from pathlib import Path
from typing import Any

from ssb.config import (
    Config,
    ConfigError,
    documented_yaml,
    load_config,
    reference_markdown,
)
from ssb.presets import PRESETS
from ssb.problems.record import ProblemsError
from ssb.problems.sources import check_eval_source, check_train_source
from ssb.rundir import Interrupted, RunDir, RunDirError, raise_interrupted
from ssb.share import FORMATS, IMPORT_STAGE
from ssb.trackers import check_report_to

log = logging.getLogger("ssb")


def check_available(cfg: Config, stages: Collection[str]) -> None:
    """What `Config.validate` cannot tell from the values alone, checked before a command's first stage
    starts: the training problems and every benchmark the `stages` read can be found (without
    loading them), and every tracker training reports to is installed."""
    stages = set(stages)
    try:
        if stages & {"rollout", "grpo", "ablate"}:
            key = "data.train"
            check_train_source(cfg)
        if stages & {"eval", "ablate"}:
            for i, benchmark in enumerate(cfg.eval.benchmarks):
                key = f"eval.benchmarks[{i}]"
                check_eval_source(cfg, benchmark)
    except ProblemsError as exc:
        raise ConfigError(str(exc), key) from None
    if stages & {"train", "grpo", "ablate"}:
        try:
            check_report_to(cfg.train.report_to)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def _stage_rollout(cfg: Config, rundir: RunDir, args: argparse.Namespace) -> dict[str, Any]:
    from ssb.stages.rollout import run_rollout

    return run_rollout(cfg, rundir, progress=not args.quiet)


def _stage_bootstrap(cfg: Config, rundir: RunDir, args: argparse.Namespace) -> dict[str, Any]:
    from ssb.stages.bootstrap import run_bootstrap

    return run_bootstrap(cfg, rundir, progress=not args.quiet)


def _stage_targets(cfg: Config, rundir: RunDir, args: argparse.Namespace) -> dict[str, Any]:
    from ssb.stages.diagnose import run_targets_and_diagnose

    return run_targets_and_diagnose(cfg, rundir, progress=not args.quiet)


def _stage_diagnose(cfg: Config, rundir: RunDir, args: argparse.Namespace) -> dict[str, Any]:
    from ssb.stages.diagnose import run_diagnose

    return run_diagnose(cfg, rundir, progress=not args.quiet)


def _stage_train(cfg: Config, rundir: RunDir, args: argparse.Namespace) -> dict[str, Any]:
    from ssb.stages.train import run_train

    return run_train(cfg, rundir, progress=not args.quiet)


def _stage_grpo(cfg: Config, rundir: RunDir, args: argparse.Namespace) -> dict[str, Any]:
    from ssb.stages.grpo import run_grpo

    return run_grpo(cfg, rundir, progress=not args.quiet)


def _stage_eval(cfg: Config, rundir: RunDir, args: argparse.Namespace) -> dict[str, Any]:
    from ssb.stages.pipeline import run_eval_stage

    return run_eval_stage(cfg, rundir, progress=not args.quiet)


def _stage_ablate(cfg: Config, rundir: RunDir, args: argparse.Namespace) -> dict[str, Any]:
    from ssb.ablation.ablate import run_ablate

    return run_ablate(cfg, rundir, progress=not args.quiet)


def _stage_report(cfg: Config, rundir: RunDir, args: argparse.Namespace) -> dict[str, Any]:
    from ssb.ablation.report import write_run_report

    return {"report": str(write_run_report(rundir, cfg))}


STAGES: dict[str, tuple[str, Callable[..., dict[str, Any]]]] = {
    "rollout": ("sample K hint-free answers per training problem and grade them", _stage_rollout),
    "bootstrap": (
        "select mixed problems and generate the hinted teacher's robust solutions",
        _stage_bootstrap,
    ),
    "targets": ("score the replies with the frozen teacher and store its targets", _stage_targets),
    "diagnose": (
        "measure the hinted teacher's signal against the untrained student on the reply tokens "
        "(advantage, stop and wrong-answer mass, KD-vs-CE gradient cosine); writes "
        "diagnostics/teacher_signal.json",
        _stage_diagnose,
    ),
    "train": ("train the hint-free LoRA student on the teacher targets", _stage_train),
    "grpo": (
        "train the GRPO baseline LoRA (TRL GRPOTrainer) on the same problems, prompts and "
        "LoRA budget",
        _stage_grpo,
    ),
    "eval": ("evaluate the base model and the student on benchmarks", _stage_eval),
    "ablate": (
        "train the arms ssb, sft, rft, onpolicy and grpo on the same problems and LoRA budget "
        "with several seeds, evaluate them in one pass, and write ablate/summary.json",
        _stage_ablate,
    ),
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
    _add_quiet(p)


def _add_quiet(p: argparse.ArgumentParser) -> None:
    """One meaning on every command (setup_logging applies it)."""
    p.add_argument(
        "--quiet", action="store_true", help="warnings and errors only, and no progress bars"
    )


def _add_ablate_options(p: argparse.ArgumentParser) -> None:
    """`--arms` and `--seeds` are `--set ablate.arms=...` and `--set ablate.seeds=...`."""
    from ssb.config import ABLATION_ARMS

    p.add_argument(
        "--arms",
        default=None,
        metavar="ARM,...",
        help=f"comma-separated subset of {','.join(ABLATION_ARMS)} (default: ablate.arms)",
    )
    p.add_argument("--seeds", type=int, default=None, help="seeds per arm (ablate.seeds)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssb",
        description="Semantic Soft Bootstrapping: distil a model's own hinted solutions into a "
        "hint-free LoRA student (arXiv 2512.05105).",
    )
    parser.add_argument("--version", action="version", version=f"ssb {metadata.version('ssb')}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, _) in STAGES.items():
        stage_parser = sub.add_parser(name, help=help_text, description=help_text)
        _add_common(stage_parser)
        if name == "ablate":
            _add_ablate_options(stage_parser)
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
    _add_quiet(bench)
    imp = sub.add_parser(
        "import-pairs",
        help="start a run from published pairs (an `ssb export` or the reference's JSONL "
        "files): appends them to pairs.jsonl",
        description="Read pairs from an `ssb export` (folder or parquet) or from the reference "
        "implementation's teacher/student JSONL files, render their prompts and tokenise their "
        "replies with this run's model and prompt settings, and append the ones not yet in "
        "pairs.jsonl. Then run `ssb targets` and `ssb train`.",
    )
    _add_common(imp)
    imp.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="PATH",
        help="an `ssb export` folder, its dataset/ folder or a .parquet file; or the reference's "
        "folder (or teacher file) with *teacher*.jsonl and *student*.jsonl",
    )
    imp.add_argument("--format", choices=FORMATS, default="auto", help="default: from the files")
    imp.add_argument(
        "--student-file", default=None, help="reference format: the student JSONL file"
    )
    export = sub.add_parser(
        "export",
        help="the pairs as a parquet dataset and the adapter, each with a card; optionally "
        "pushed to the Hugging Face Hub",
        description="Write OUT/dataset (pairs.jsonl as parquet + dataset card) and OUT/model "
        "(the adapter + model card with the run's evaluation). Reads the run, never changes it.",
    )
    export.add_argument("--run-dir", required=True, help="the run to export")
    export.add_argument("--out", required=True, help="output folder (empty, or an earlier export)")
    export.add_argument(
        "--push-to-hub",
        metavar="REPO",
        default=None,
        help="also upload: the adapter to the model repo REPO, the pairs to the dataset repo "
        "REPO-pairs (needs a token: HF_TOKEN or `hf auth login`)",
    )
    export.add_argument(
        "--dataset-repo", default=None, help="the dataset repo's name (default: REPO-pairs)"
    )
    export.add_argument("--private", action="store_true", help="create the repos private")
    _add_quiet(export)
    check = sub.add_parser(
        "harness-check",
        help="score the run's eval outputs again with lm-evaluation-harness (the harness extra) "
        "and list where it and ssb's math-verify disagree",
        description="Rescores every current eval/<model>-<bench>.jsonl sample with the installed "
        "lm-eval's own scoring (GSM8K-style benchmarks: the gsm8k task's flexible-extract and "
        "exact_match; others: the aime24 task's last-\\boxed{} + hendrycks_math is_equiv) and "
        "writes eval/harness-lm-eval.json.",
    )
    check.add_argument("--run-dir", required=True, help="a run directory that `ssb eval` wrote to")
    check.add_argument("--harness", choices=["lm-eval"], default="lm-eval", help="the harness")
    _add_quiet(check)
    show = sub.add_parser(
        "config",
        help="print the resolved config as YAML (a preset's, a file's, or a run's with --run-dir), "
        "each key's documentation as a comment",
    )
    g = show.add_mutually_exclusive_group()
    g.add_argument("--preset", choices=sorted(PRESETS))
    g.add_argument("--config")
    show.add_argument(
        "--run-dir", default=None, help="an existing run: its config.yaml (with any --set)"
    )
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    show.add_argument(
        "--reference",
        action="store_true",
        help="print every key's default, presets and documentation as markdown (docs/config.md)",
    )
    return parser


def resolve_config(args: argparse.Namespace) -> Config:
    if getattr(args, "arms", None) is not None:
        args.overrides = [*args.overrides, f"ablate.arms=[{args.arms}]"]
    if getattr(args, "seeds", None) is not None:
        args.overrides = [*args.overrides, f"ablate.seeds={args.seeds}"]
    run_dir = getattr(args, "run_dir", None)
    existing = Path(run_dir) / "config.yaml" if run_dir else None
    if args.preset is None and args.config is None and existing is not None and existing.exists():
        return load_config(config_file=existing, overrides=args.overrides)
    if args.command == "config" and run_dir is not None:
        check_run_dir(run_dir)
    return load_config(preset=args.preset, config_file=args.config, overrides=args.overrides)


def setup_logging(quiet: bool = False) -> None:
    if quiet:
        # transformers' and the hub's bars (loading weights, downloads) read this when imported,
        # which in the CLI is after this point.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
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


# The stages each command runs, whose settings are checked before the first one starts.
_PIPELINE = ("rollout", "bootstrap", "targets", "train", "eval", "report")


def command_stages(command: str, cfg: Config) -> tuple[str, ...]:
    if command == "run":
        return (*_PIPELINE, "grpo") if cfg.grpo.enabled else _PIPELINE
    return (command,) if command in STAGES else ()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "quiet", False))
    # SIGTERM (a scheduler, `kill`) stops a command as Ctrl-C does: records in flight are
    # finished or dropped whole, the stage is marked interrupted, one line says how to resume.
    previous = None
    if threading.current_thread() is threading.main_thread():  # only there can it be set
        previous = signal.signal(signal.SIGTERM, raise_interrupted)
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
        if args.command in _READS_A_RUN:
            # A mistyped --run-dir must not become an empty run that "succeeds".
            check_run_dir(args.run_dir)
        if args.command == "export":
            from ssb.share.export import export_run

            with contextlib.redirect_stdout(sys.stderr):
                summary = export_run(
                    args.run_dir,
                    args.out,
                    push_to_hub=args.push_to_hub,
                    dataset_repo=args.dataset_repo,
                    private=args.private,
                )
            print(json.dumps({"command": "export", **summary}, indent=2))
            return 0
        if args.command == "harness-check":
            return _harness_check(args)
        if args.command == "config":
            shown = (
                reference_markdown() if args.reference else documented_yaml(resolve_config(args))
            )
            sys.stdout.write(shown)
            return 0
        cfg = resolve_config(args)
        check_available(cfg, command_stages(args.command, cfg))
        rundir = RunDir(args.run_dir)
        # stdout carries the JSON summary alone; what libraries print (Trainer's log dicts, a
        # progress bar's write()) goes to stderr with the logs.
        with contextlib.redirect_stdout(sys.stderr):
            rundir.init(cfg, args.command, force=args.force)
            from ssb.models import set_seed

            set_seed(cfg.seed)
            log.info("run directory: %s", rundir.path.resolve())
            if args.command == "run":
                from ssb.ablation.report import write_run_report
                from ssb.stages.pipeline import run_pipeline

                summary = run_pipeline(
                    cfg, rundir, progress=not args.quiet, report_writer=write_run_report
                )
                _print_artifacts(rundir)
            elif args.command == "import-pairs":
                summary = _import_pairs(cfg, rundir, args)
            else:
                summary = run_stage(args.command, cfg, rundir, args)
        print(json.dumps({"stage": args.command, "run_dir": str(rundir.path), **summary}, indent=2))
        return 0
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        print(f"ssb: {_interrupted_line(args, signal.Signals(signum).name)}", file=sys.stderr)
        return 128 + signum
    except Exception as exc:
        # Errors a user can act on (bad config, data, model, run directory, target store, disk)
        # get one line; anything else is a bug and keeps its traceback (as does SSB_DEBUG=1).
        if not isinstance(exc, _user_errors()) or os.environ.get("SSB_DEBUG"):
            raise
        print(f"ssb: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:  # main() called in-process (a notebook, a test) gives it back
            signal.signal(signal.SIGTERM, previous)


def _interrupted_line(args: argparse.Namespace, signame: str) -> str:
    """What an interrupted command kept and how to go on, in one line."""
    run_dir = getattr(args, "run_dir", None)
    if run_dir is None or args.command in ("export", "harness-check", "config"):
        return f"interrupted ({signame}); nothing was changed"
    return (
        f"interrupted ({signame}) during `ssb {args.command}`: every finished record is saved "
        f"in {run_dir} (training: its last checkpoint, every train.save_steps steps); rerun "
        f"`ssb {args.command} --run-dir {run_dir}` to resume where it stopped"
    )


def _import_pairs(cfg: Config, rundir: RunDir, args: argparse.Namespace) -> dict[str, Any]:
    """Not a pipeline stage, but recorded in the manifest like one (where the pairs came from)."""
    from ssb.share.import_pairs import run_import_pairs

    with rundir.stage(IMPORT_STAGE) as summary:
        summary.update(
            run_import_pairs(cfg, rundir, args.source, args.format, student_file=args.student_file)
        )
    return summary


# Commands that only read a run directory: it must exist.
_READS_A_RUN = ("report", "export", "harness-check")


def check_run_dir(run_dir: str) -> None:
    if not RunDir(run_dir).config_path.is_file():
        raise RunDirError(f"{run_dir} has no config.yaml: not a run directory (mistyped?)")


def _harness_check(args: argparse.Namespace) -> int:
    from ssb.harness import format_check, harness_check

    config_path = Path(args.run_dir) / "config.yaml"
    result = harness_check(load_config(config_file=config_path), Path(args.run_dir), args.harness)
    sys.stdout.write(format_check(result))
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    from ssb.distill.store import TargetStoreError
    from ssb.generate.base import GenerationAborted
    from ssb.hardware import DeviceError
    from ssb.harness import HarnessUnavailable
    from ssb.models import ModelLoadError
    from ssb.problems import ProblemsError

    errors = (ConfigError, RunDirError, ProblemsError, TargetStoreError, ModelLoadError)
    errors = (*errors, DeviceError, GenerationAborted, HarnessUnavailable)
    return (*errors, ValueError, OSError)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list):
        # copytree's error is a list of (source, destination, why) for every file that failed
        failures = exc.args[0]
        src, dst, why = failures[0]
        more = f" ({len(failures) - 1} more files failed)" if len(failures) > 1 else ""
        return f"copying {src} to {dst}: {why}{more}"
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
