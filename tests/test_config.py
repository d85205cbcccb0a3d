import pytest
import yaml

from ssb.config import Config, ConfigError, config_from_dict, dump_yaml, load_config


def test_defaults_roundtrip_through_yaml():
    cfg = Config()
    again = config_from_dict(yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg


def test_paper_preset_matches_the_paper():
    cfg = load_config(preset="paper")
    assert cfg.model.name == "Qwen/Qwen2.5-3B-Instruct"
    assert cfg.data.train == "gsm8k" and cfg.data.max_problems is None
    assert cfg.bootstrap.target_pairs == 256
    assert (cfg.rollout.num_samples, cfg.rollout.temperature, cfg.rollout.top_k) == (4, 0.8, 50)
    assert cfg.bootstrap.temperature == 0.4
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
            "rollout.temperature=0.3",
            "bootstrap.target_pairs=null",
            "eval.benchmarks=gsm8k,math500",
        ],
    )
    assert cfg.rollout.num_samples == 8
    assert cfg.train.lora.r == 4
    assert cfg.train.lora.alpha == 32  # untouched sibling keeps the preset value
    assert cfg.rollout.temperature == 0.3
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
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=override)


def test_unknown_preset_and_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(preset="nope")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(config_file=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(config_file=bad)
