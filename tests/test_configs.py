"""Config files and precedence: defaults < YAML (with _base_) < flags; typed, validated keys."""
from __future__ import annotations

from pathlib import Path

import pytest

from utils.errors import ConfigError
from utils.options import build_parser, defaults, load_yaml, resolve

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def _resolve(*argv: str):
    return resolve(build_parser("t").parse_args(list(argv)))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    assert set(load_yaml(path)) <= set(defaults())


@pytest.mark.parametrize("name, dataset", [("cuhk_pedes", "CUHK-PEDES"), ("icfg_pedes", "ICFG-PEDES"),
                                           ("rstpreid", "RSTPReid")])
def test_irra_configs_hold_the_released_recipe(name, dataset):
    cfg = _resolve("--config_file", str(REPO / f"configs/irra/{name}.yaml"))
    assert cfg.dataset_name == dataset
    assert (cfg.loss_names, cfg.batch_size, cfg.num_epoch, cfg.lr, cfg.optimizer_eps) == ("sdm+mlm+id", 64, 60, 1e-5, 1e-3)
    assert cfg.img_size == [384, 128] and cfg.stride_size == 16 and cfg.pretrain_choice == "ViT-B/16"
    assert cfg.img_aug and cfg.MLM and cfg.global_sees_masked_caption and cfg.erase_value == "clip_mean"
    assert (cfg.warmup_epochs, cfg.warmup_factor, cfg.lrscheduler, cfg.temperature) == (5, 0.1, "cosine", 0.02)


def test_precedence_defaults_yaml_flags(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("batch_size: 8\nlr: 0.5\nimg_aug: true\n")
    cfg = _resolve("--config_file", str(config), "--lr", "0.25", "--no-img_aug", "--img_size", "64", "32")
    assert cfg.batch_size == 8 and cfg.lr == 0.25 and cfg.img_aug is False
    assert cfg.img_size == [64, 32] and cfg.num_epoch == defaults()["num_epoch"]


def test_base_inheritance_is_relative_to_the_file(tmp_path):
    (tmp_path / "base.yaml").write_text("batch_size: 8\nlr: 0.5\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\nlr: 0.1\n")
    assert load_yaml(tmp_path / "child.yaml") == {"batch_size": 8, "lr": 0.1}


@pytest.mark.parametrize("text, message", [
    ("batchsize: 8\n", "did you mean 'batch_size'"),
    ("batch_size: eight\n", "'batch_size' expects int"),
    ("img_aug: 1\n", "'img_aug' expects bool"),
    ("sampler: idtentity\n", "valid: random, identity"),
    ("[1, 2]\n", "must hold a mapping"),
    ("a: [\n", "cannot parse"),
])
def test_bad_yaml_is_a_config_error(tmp_path, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_yaml(config)


def test_missing_config_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_yaml(tmp_path / "nope.yaml")


def test_img_size_needs_two_values():
    with pytest.raises(ConfigError, match="img_size needs two values"):
        _resolve("--img_size", "384")


@pytest.mark.parametrize("key", ["text_prune_prob", "corruption_key_prob", "mlm_prob", "tir_mask_ratio"])
def test_probabilities_must_lie_in_0_1(key):
    with pytest.raises(ConfigError, match=f"{key} is a probability"):
        _resolve(f"--{key}", "1.5")
    assert getattr(_resolve(f"--{key}", "0.5"), key) == 0.5
