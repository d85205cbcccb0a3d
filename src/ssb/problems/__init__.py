"""Problems: the record every stage passes around, loaders, and a synthetic arithmetic generator.

Sources (`load_problems(source, ...)`):

* a benchmark name from `BENCHMARKS`, read from `<data_dir>/<name>/<split>.jsonl` (the formats of
  the real copies in `shared/data`, see its README) or, with no local copy, from the Hugging Face
  hub for the few that have a canonical hub id;
* a `.jsonl` / `.csv` path with a field mapping;
* `hf:<dataset id>[:<config>]` with a split and a field mapping;
* `synthetic`: generated one- to three-step arithmetic word problems.

Gold answers are kept as strings in the form graders expect ("18", "025", "\\frac{1}{2}");
`ssb.grading` does all equivalence checking.
"""

from ssb.problems.record import Problem, ProblemsError, format_number
from ssb.problems.sources import (
    BENCHMARKS,
    DEFAULT_SPLITS,
    HUB_DATASETS,
    load_eval_problems,
    load_file,
    load_hf,
    load_problems,
    load_train_problems,
    resolve_data_dir,
)
from ssb.problems.synthetic import synthetic_problems, synthetic_split_of

__all__ = [
    "BENCHMARKS",
    "DEFAULT_SPLITS",
    "HUB_DATASETS",
    "Problem",
    "ProblemsError",
    "format_number",
    "load_eval_problems",
    "load_file",
    "load_hf",
    "load_problems",
    "load_train_problems",
    "resolve_data_dir",
    "synthetic_problems",
    "synthetic_split_of",
]
