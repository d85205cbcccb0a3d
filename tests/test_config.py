import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from ssb.config import (
    Config,
    ConfigError,
    LossConfig,
    SamplingConfig,
    config_from_dict,
    dump_yaml,
    load_config,
)


def test_defaults_roundtrip_through_yaml():
    cfg = Config()
    again = config_from_dict(yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg


def test_paper_preset_matches_the_paper():
    cfg = load_config(preset="paper")
    assert cfg.model.name == "Qwen/Qwen2.5-3B-Instruct"
    assert cfg.data.train == "gsm8k" and cfg.data.max_problems is None
    assert cfg.bootstrap.target_pairs == 256
    assert (cfg.rollout.num_samples, cfg.rollout.sampling.temperature) == (4, 0.8)
    assert cfg.rollout.sampling.top_k == 50
    assert cfg.bootstrap.sampling.temperature == 0.4
    lora = cfg.train.lora
    assert (lora.r, lora.alpha) == (32, 32)
    assert set(lora.target_modules) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert (cfg.train.learning_rate, cfg.train.batch_size, cfg.train.epochs) == (2e-4, 4, 3)
    loss = cfg.train.loss
    assert (loss.temperature, loss.tau_squared, loss.kd_weight, loss.ce_weight) == (
        2.0,
        True,
        1.0,
        0.0,
    )
    assert loss.divergence == "forward_kl"


def test_overrides_parse_types_and_nested_keys(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("rollout:\n  num_samples: 8\ntrain:\n  lora:\n    r: 4\n")
    cfg = load_config(
        preset="quickstart",
        config_file=f,
        overrides=[
            "rollout.sampling.temperature=0.3",
            "bootstrap.target_pairs=null",
            "eval.benchmarks=gsm8k,math500",
        ],
    )
    assert cfg.rollout.num_samples == 8
    assert cfg.train.lora.r == 4
    assert cfg.train.lora.alpha == 32  # untouched sibling keeps the preset value
    assert cfg.rollout.sampling.temperature == 0.3
    assert cfg.bootstrap.target_pairs is None
    assert cfg.eval.benchmarks == ["gsm8k", "math500"]


@pytest.mark.parametrize(
    "override, key",
    [
        (["rollout.nope=1"], "rollout.nope"),
        (["rollout.num_samples=x"], "rollout.num_samples"),
        (["rollout.num_samples=0"], "rollout.num_samples"),
        (["targets.mode=sparse"], "targets.mode"),
        (["train.loss.jsd_beta=2"], "train.loss.jsd_beta"),
        (["train.lora=3"], "train.lora"),
        (["model.trust_remote_code=maybe"], "model.trust_remote_code"),
        # Settings once checked only when their stage started, hours into a run (issue 23).
        (["eval.max_problems=-1"], "eval.max_problems"),
        (["train.learning_rate=-1"], "train.learning_rate"),
        (["train.learning_rate=0"], "train.learning_rate"),
        (["train.lora.alpha=0"], "train.lora.alpha"),
        (["train.epochs=nan"], "train.epochs"),
        (["train.loss.clip=inf"], "train.loss.clip"),
        (["train.report_to=[tensorbored]"], r"train.report_to[0]"),
        (["train.report_to=[tensorboard,wandbb]"], r"train.report_to[1]"),
        (["eval.benchmarks=[gsm8k,math5000]"], r"eval.benchmarks[1]"),
        (["eval.benchmarks=[]"], "eval.benchmarks"),
        (["data.train=gsmk8"], "data.train"),
        (["train.warmup_ratio=1"], "train.warmup_ratio"),
        (["train.loss.kd_weight=-1"], "train.loss.kd_weight"),
        (["grpo.weight_decay=-1"], "grpo.weight_decay"),
        (["data.synthetic.difficulty=4"], "data.synthetic.difficulty"),
        (["prompt.stop_strings=[a,'']"], "prompt.stop_strings"),
        (["ablate.lr_grid=[1e-4,1e-4]", "ablate.validation_problems=8"], "ablate.lr_grid"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(overrides=override)


def test_tracker_names_are_transformers_own():
    """Every integration transformers reports to is accepted by name, and only those."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    cfg = load_config(overrides=[f"train.report_to=[{','.join(INTEGRATION_TO_CALLBACK)}]"])
    assert cfg.train.report_to == list(INTEGRATION_TO_CALLBACK)
    assert load_config(overrides=["train.report_to=all"]).train.report_to == ["all"]


def test_what_a_command_reads_is_found_before_it_starts(tmp_path):
    """A benchmark or training file that cannot be found, or a local benchmark copy that is
    missing, is refused before the first stage, naming the key."""
    from ssb.cli import check_available

    data = tmp_path / "data"
    (data / "gsm8k").mkdir(parents=True)
    (data / "gsm8k" / "test.jsonl").write_text("")
    sets = [f"data.data_dir={data}", "data.train=gsm8k"]
    cfg = load_config(overrides=[*sets, f"eval.benchmarks=[gsm8k,{tmp_path / 'mine.jsonl'}]"])
    with pytest.raises(ConfigError, match=re.escape("eval.benchmarks[1]") + ".*mine.jsonl"):
        check_available(cfg, ["eval"])
    check_available(cfg, ["targets"])  # reads no benchmark
    with pytest.raises(ConfigError, match=r"data\.train: .*gsm8k/train\.jsonl does not exist"):
        check_available(cfg, ["rollout"])
    cfg = load_config(overrides=[*sets, "eval.benchmarks=[gsm8k,math500]"])
    with pytest.raises(ConfigError, match=re.escape("eval.benchmarks[1]") + ".*math500"):
        check_available(cfg, ["run", "eval"])
    (data / "gsm8k" / "train.jsonl").write_text("")
    check_available(load_config(overrides=[*sets, "eval.benchmarks=[gsm8k]"]), ["rollout", "eval"])


def test_ssb_run_refuses_a_missing_benchmark_before_writing_anything(tmp_path, capsys):
    from ssb.cli import main

    run = tmp_path / "run"
    missing = tmp_path / "typo.jsonl"
    sets = [f"eval.benchmarks=[synthetic,{missing}]", f"model.name={tmp_path / 'no-model'}"]
    rc = main(["run", "--run-dir", str(run), "--set", sets[0], "--set", sets[1]])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ssb: error: eval.benchmarks[1]:") and "typo.jsonl" in err
    assert not run.exists()  # no config.yaml persisted, no stage started


def test_unknown_preset_and_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(preset="nope")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(config_file=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(config_file=bad)


def test_every_sampling_section_has_one_sampling_type_with_its_own_defaults():
    from ssb.config import SAMPLING_SECTIONS, SamplingConfig

    cfg = Config()
    got = {s: getattr(cfg, s).sampling for s in SAMPLING_SECTIONS}
    assert all(isinstance(s, SamplingConfig) for s in got.values())
    assert got["rollout"] == SamplingConfig(temperature=0.8, top_p=1.0, top_k=50)
    assert got["bootstrap"] == SamplingConfig(temperature=0.4, top_p=1.0, top_k=50)
    assert got["grpo"] == SamplingConfig(temperature=1.0, top_p=1.0, top_k=0)
    assert got["eval"] == SamplingConfig(temperature=0.6, top_p=0.95, top_k=0)
    # A partial override keeps the section's other defaults, not the type's.
    cfg = load_config(overrides=["bootstrap.sampling.top_p=0.9"])
    assert cfg.bootstrap.sampling == SamplingConfig(temperature=0.4, top_p=0.9, top_k=50)


@pytest.mark.parametrize("section", ["rollout", "bootstrap", "grpo", "eval"])
@pytest.mark.parametrize(
    "key,value", [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1)]
)
def test_sampling_values_are_checked_in_every_section(section, key, value):
    with pytest.raises(ConfigError, match=rf"{section}\.sampling\.{key}"):
        load_config(overrides=[f"{section}.sampling.{key}={value}"])


def test_sampling_keys_of_older_configs_still_load(tmp_path, caplog):
    """Configs (and run directories) written when the trio sat directly in each section."""
    old = tmp_path / "old.yaml"
    old.write_text("rollout: {temperature: 0.3, top_k: 20}\neval: {top_p: 0.9}\n")
    with caplog.at_level("WARNING", logger="ssb"):
        cfg = load_config(config_file=old)
    assert (cfg.rollout.sampling.temperature, cfg.rollout.sampling.top_k) == (0.3, 20)
    assert cfg.eval.sampling.top_p == 0.9 and cfg.eval.sampling.temperature == 0.6
    assert "rollout.temperature is now rollout.sampling.temperature" in caplog.text
    # A later layer wins whichever spelling each uses.
    cfg = load_config(config_file=old, overrides=["rollout.sampling.temperature=0.7"])
    assert cfg.rollout.sampling.temperature == 0.7
    cfg = load_config(preset="quickstart", overrides=["rollout.temperature=0.2"])
    assert cfg.rollout.sampling.temperature == 0.2
    # Both spellings in one layer must agree.
    with pytest.raises(ConfigError, match="rollout.temperature and rollout.sampling.temperature"):
        config_from_dict({"rollout": {"temperature": 0.3, "sampling": {"temperature": 0.5}}})


def test_lm_head_lora_refused_by_the_config():
    """The loss computes logits through the plain lm_head weight (hidden targets are scored
    through it too), so LoRA on the output layer is refused before any stage starts."""
    for modules in ("q_proj,lm_head", "q_proj,gpt_neox.embed_out"):
        with pytest.raises(ConfigError, match=r"train\.lora\.target_modules: .*output layer"):
            load_config(overrides=[f"train.lora.target_modules={modules}"])


def test_a_section_checks_itself_and_the_error_names_the_dotted_key():
    """Built directly, a section names its own field; built from YAML or --set, the full path.
    A check over several fields of a section names the section."""
    with pytest.raises(ConfigError, match=r"^temperature: must be > 0, got 0"):
        LossConfig(temperature=0)
    with pytest.raises(ConfigError, match=r"^train\.loss\.temperature: must be > 0, got 0"):
        config_from_dict({"train": {"loss": {"temperature": 0}}})
    with pytest.raises(ConfigError, match=r"^eval\.sampling\.top_p: must be in \(0, 1\]"):
        load_config(overrides=["eval.sampling.top_p=2"])
    with pytest.raises(ConfigError, match=r"^train\.loss: kd_weight and ce_weight are both 0"):
        load_config(overrides=["train.loss.kd_weight=0"])
    with pytest.raises(ConfigError, match=r"^top_k: must be >= 0"):
        SamplingConfig(top_k=-1)
    variant = r"^ablate\.variants: 'x: train\.loss\.temperature=0': train\.loss\.temperature: "
    with pytest.raises(ConfigError, match=variant + "must be > 0"):
        load_config(overrides=['ablate.variants=["x: train.loss.temperature=0"]'])


def test_an_error_says_where_the_value_came_from(tmp_path):
    """The last layer that set the key: a --set, the config file's line, or the preset."""
    f = tmp_path / "c.yaml"
    f.write_text("rollout:\n  num_samples: 8\ntrain:\n  loss:\n    temperature: 0\n")
    with pytest.raises(ConfigError, match=re.escape(f"got 0.0 (from {f}, line 5)")):
        load_config(config_file=f)
    with pytest.raises(ConfigError, match=re.escape("(from --set train.loss.temperature=-1)")):
        load_config(config_file=f, overrides=["train.loss.temperature=-1"])
    with pytest.raises(ConfigError, match=re.escape("train.loss: kd_weight and ce_weight")):
        load_config(overrides=["train.loss.kd_weight=0"])  # a section's check: a key under it
    with pytest.raises(ConfigError, match=r"^ablate\.tau_grid: .*\(from preset ablation-cpu\)$"):
        load_config(preset="ablation-cpu", overrides=["targets.mode=topk"])
    with pytest.raises(ConfigError, match=r"^train\.loss\.temperature: must be > 0, got 0\.0$"):
        config_from_dict({"train": {"loss": {"temperature": 0}}})  # no layers: no source


def _sections(cls: type) -> list[type]:
    """`cls` and every section type under it."""
    found = [cls]
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            found += [t for t in _sections(type(default)) if t not in found]
    return found


def test_every_field_is_documented_where_it_is_declared():
    from ssb.generate.base import SamplingParams

    for cls in [*_sections(Config), SamplingParams]:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"


def test_docs_config_md_is_the_generated_reference():
    """docs/config.md comes from the config classes; regenerate it with
    `ssb config --reference > docs/config.md`."""
    from ssb.config import reference_markdown

    docs = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert docs.read_text() == reference_markdown(), "run: ssb config --reference > docs/config.md"


def test_ssb_config_prints_the_docs_as_comments_and_loads_back(capsys):
    from ssb.cli import main

    assert main(["config", "--preset", "paper", "--set", "train.loss.clip=5"]) == 0
    out = capsys.readouterr().out
    assert config_from_dict(yaml.safe_load(out)) == load_config(
        preset="paper", overrides=["train.loss.clip=5"]
    )
    assert "\n    # tau: teacher and student logits divided by it. Must be > 0.\n" in out


def test_hint_styles_and_teacher_contexts_are_the_templates_keys():
    from ssb.config import HINT_STYLES, TEACHER_CONTEXTS
    from ssb.prompts import CHAT_TEACHER_TEMPLATES, FEWSHOT_TEACHER_TEMPLATES

    for templates in (CHAT_TEACHER_TEMPLATES, FEWSHOT_TEACHER_TEMPLATES):
        assert tuple(templates) == HINT_STYLES
        assert all(tuple(by_context) == TEACHER_CONTEXTS for by_context in templates.values())
