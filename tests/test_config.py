from pathlib import Path

import pytest

from ray_dpo.config import Config, ConfigError, config_from_dict, flatten, load_config, save_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_defaults_and_overrides():
    cfg = load_config(
        None, ["train.lr=3e-4", "dpo.loss_type=ipo", "data.columns.prompt=question", "eval.enabled=false"]
    )
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)  # YAML 1.1 reads 3e-4 as a string
    assert cfg.dpo.loss_type == "ipo" and cfg.data.columns == {"prompt": "question"} and cfg.eval.enabled is False
    assert cfg.train.max_steps is None and cfg.model.dim == 256


def test_loss_type_is_a_name_or_a_list_and_describes_the_loss():
    cfg = load_config(None, ["dpo.loss_type=[sigmoid, bco_pair, sft]", "dpo.loss_weights=[0.8, 0.2, 1]"])
    assert cfg.dpo.loss_type == ["sigmoid", "bco_pair", "sft"] and cfg.dpo.loss_weights == [0.8, 0.2, 1.0]
    spec = cfg.dpo.loss_spec()
    assert spec.types == ("sigmoid", "bco_pair", "sft") and spec.weights == (0.8, 0.2, 1.0) and spec.needs_reference
    assert load_config(None, ["dpo.loss_type=simpo"]).dpo.uses_reference is False
    assert load_config(None, ["dpo.reference=none"]).dpo.loss_spec().reference_free


def test_yaml_file_then_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1.0e-3\n  batch_size: 4\nmodel:\n  dim: 64\n  heads: 2\n")
    cfg = load_config(path, ["train.batch_size=16"])
    assert (cfg.train.lr, cfg.train.batch_size, cfg.model.dim) == (1e-3, 16, 64)


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.lrr=1", "config: unknown key 'train.lrr'"),
        ("trian.lr=1", "config: unknown key 'trian'"),
        ("train.lr=abc", "config: train.lr must be float, got 'abc'"),
        ("train.epochs=1.5", "config: train.epochs must be int, got 1.5"),
        ("train.use_gpu=1", "config: train.use_gpu must be bool, got 1"),
        ("dpo.loss_type=kto", "config: dpo.loss_type must be one of"),
        ("model.heads=3", "config: model.dim=256 must split into 3 heads"),
        ("train=3", "config: train must be a mapping"),
        ("train.lr", "not of the form section.key=value"),
        (
            "dpo.reference_free=true",
            "config: dpo.reference_free was replaced by dpo.reference (live | precomputed | none)",
        ),
        ("dpo.reference=frozen", "config: dpo.reference must be one of ['live', 'precomputed', 'none']"),
        ("dpo.loss_type=[sigmoid, kto]", "config: dpo.loss_type must be one of"),
        ("dpo.loss_weights=[1, x]", "config: dpo.loss_weights[1] must be float, got 'x'"),
        ("dpo.f_divergence_type=kl", "config: dpo.f_divergence_type must be one of ['reverse_kl', 'forward_kl'"),
        (
            "dpo.rpo_alpha=0.5",
            "config: dpo.rpo_alpha was replaced by dpo.loss_type and dpo.loss_weights (as TRL 1.x): dpo.rpo_alpha=a "
            "is dpo.loss_type=[sigmoid, sft] dpo.loss_weights=[1, a]",
        ),
    ],
)
def test_bad_keys_and_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_save_load_round_trip_and_flatten(tmp_path):
    cfg = load_config(None, ["train.lr=2e-4", "tune.search_space={dpo.beta: {grid: [0.1, 0.3]}}"])
    assert load_config(save_config(cfg, tmp_path / "saved.yaml")) == cfg
    assert config_from_dict(cfg.to_dict()) == cfg
    flat = flatten(cfg.to_dict())
    assert flat["train.lr"] == 2e-4 and flat["tune.search_space.dpo.beta.grid"] == [0.1, 0.3]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_every_key_is_commented(path):
    assert isinstance(load_config(path), Config)
    previous = ""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not stripped.endswith(":"):
            commented = "#" in line or previous.startswith("#")  # inline, or a comment block just above
            assert commented, f"{path.name}:{number} has no comment: {line!r}"
        previous = stripped or previous
