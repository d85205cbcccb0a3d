"""The package's floors: every import in src/ssb (at module level, inside a function, or under
TYPE_CHECKING) goes from a higher floor to a lower one, so no part of the package needs one
that stands above it. A unit is a package folder (ssb/stages/) or a top-level module
(ssb/config.py); imports inside one unit are free. Two units on one floor do not import each
other. Floors, lowest first (docs/architecture.md draws them):

1. grading, hardware, presets, sharding, stats, target_modes, the package's __init__: leaves.
2. config: the typed configuration.
3. models, problems, rundir: what a config names (the model, the problems, the run directory).
4. funnel, generate, identity, prompts, records, trackers: built on those.
5. distill: losses, signals and the teacher-target store.
6. report: report.md, from a run's files.
7. stages: the pipeline's stages.
8. ablation, harness, share: features that run the stages.
9. bench: benchmarks and the GPU check, which measure the stages and the ablation's arms.
10. cli, then 11. __main__.

A function-level import whose comment says it dodges an import cycle ("X imports this
module") fails too: the cycle is the fault, the late import only hides it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

FLOORS: tuple[frozenset[str], ...] = tuple(
    frozenset(names.split())
    for names in (
        "grading hardware presets sharding stats target_modes __init__",
        "config",
        "models problems rundir",
        "funnel generate identity prompts records trackers",
        "distill",
        "report",
        "stages",
        "ablation harness share",
        "bench",
        "cli",
        "__main__",
    )
)

# A comment that says the import dodges a cycle: "import cycle", "circular", "X imports this
# module", or "X imports <the importing module's own name>".
_CYCLE_WORDS = re.compile(r"\bcycle\b|\bcircular\b|\bimports? this module\b")


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit_of(module: str) -> str:
    """ssb.stages.train -> stages; ssb.config -> config; ssb -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def floor_of(unit: str) -> int:
    for i, names in enumerate(FLOORS, start=1):
        if unit in names:
            return i
    raise AssertionError(f"{unit} stands on no floor: give it one in tests/test_layers.py")


def package_imports(src: Path) -> list[tuple[str, str, str, bool, str]]:
    """(importing module, imported ssb module, file:line, inside a function, the comment on the
    import's first line) for every import of the package under `src`."""
    out = []
    for path in sorted((src / "ssb").rglob("*.py")):
        text = path.read_text()
        lines = text.splitlines()
        module = module_name(path, src)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        tree = ast.parse(text)
        functions = [
            n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
        ]
        late = {id(n) for f in functions for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level:  # resolved against the package
                kept = package.split(".")[: len(package.split(".")) - node.level + 1]
                targets = [".".join([*kept, *filter(None, [node.module])])]
            elif isinstance(node, ast.ImportFrom):
                targets = [node.module or ""]
            else:
                continue
            for target in targets:
                if target == "ssb" or target.startswith("ssb."):
                    where = f"{path.relative_to(src)}:{node.lineno}"
                    comment = lines[node.lineno - 1].partition("#")[2]
                    out.append((module, target, where, id(node) in late, comment))
    return out


def violations(src: Path) -> tuple[list[str], list[str]]:
    """The imports that do not go down a floor, and the late imports that dodge a cycle."""
    back, dodges = [], []
    for importer, target, where, in_function, comment in package_imports(src):
        here, there = unit_of(importer), unit_of(target)
        names = "|".join(re.escape(n) for n in {importer.rpartition(".")[2], here})
        says_cycle = _CYCLE_WORDS.search(comment) or re.search(rf"\bimports? ({names})\b", comment)
        if here != there and floor_of(there) >= floor_of(here):
            back.append(
                f"{where}: {importer} (floor {floor_of(here)}) imports {target} "
                f"(floor {floor_of(there)})"
            )
        if in_function and says_cycle:
            dodges.append(f"{where}: {importer} imports {target} late:{comment}")
    return back, dodges


def test_every_import_goes_down_a_floor_and_none_dodges_a_cycle():
    back, dodges = violations(SRC)
    assert not back, "imports that do not go down a floor:\n" + "\n".join(back)
    assert not dodges, "late imports that hide an import cycle:\n" + "\n".join(dodges)


def test_the_check_reads_relative_late_and_commented_imports(tmp_path):
    losses = tmp_path / "ssb" / "distill" / "losses.py"
    losses.parent.mkdir(parents=True)
    losses.write_text(
        "from ..stages import base\n"
        "from ssb.grading import grade\n"
        "def f():\n"
        "    from ssb.hardware import pick_device  # noqa: PLC0415 -- hardware imports distill\n"
    )
    back, dodges = violations(tmp_path)
    assert back == [
        "ssb/distill/losses.py:1: ssb.distill.losses (floor 5) imports ssb.stages (floor 7)"
    ]
    assert [d.partition(" late")[0] for d in dodges] == [
        "ssb/distill/losses.py:4: ssb.distill.losses imports ssb.hardware"
    ]
