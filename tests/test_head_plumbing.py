"""Heads own their settings, batch fields and per-epoch state: the config collects the settings, the
dataset builds exactly the fields asked for, a per-epoch pass sees every sample by index, and its
state survives an interrupted run."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import train as train_entry
from conftest import demo_config, train_until_killed_after_epoch_one
from datasets import build_dataset
from datasets.build import build_train_loader
from datasets.fields import FIELD_BUILDERS
from model.build import build_model
from model.heads import HEADS, Head, register_head, unregister_head
from processor.processor import TrainingSetPass
from test_end_to_end import REPO, TINY
from utils.errors import ConfigError
from utils.options import all_settings, build_parser, load_yaml, resolve
from utils.settings import Setting, declared
from utils.simple_tokenizer import SimpleTokenizer

FROZEN_RUN_CONFIG = Path(__file__).parent / "data" / "run_configs_23cb6f0.yaml"


# ---------------------------------------------------------------- settings
def test_every_head_declares_its_settings_next_to_its_code():
    owners = declared()
    for name, head in HEADS.items():
        assert owners[f"head {name}"] == head.settings
    assert {s.key for s in HEADS["tir"].settings} >= {"tir_mask_ratio", "tir_loss_weight", "tir_depth"}
    assert [s.key for s in HEADS["mlm"].settings] == ["mlm_loss_weight", "cmt_depth"]


def test_a_registered_head_brings_its_flags_and_help(capsys):
    class Planted(Head):
        name = "planted"
        settings = (Setting("planted_margin", 0.25, "margin of the planted head", low=0.0, high=0.9),)

    register_head(Planted)
    try:
        cfg = resolve(build_parser("t").parse_args(["--planted_margin", "0.5"]))
        assert cfg.planted_margin == 0.5 and all_settings()["planted_margin"].default == 0.25
        with pytest.raises(ConfigError, match=r"planted_margin must lie in \[0.0, 0.9\], got 2.0"):
            resolve(build_parser("t").parse_args(["--planted_margin", "2"]))
        with pytest.raises(SystemExit):
            build_parser("t").parse_args(["--help"])
        assert "margin of the planted head (default 0.25; range [0.0, 0.9])" in " ".join(capsys.readouterr().out.split())
    finally:
        unregister_head("planted")
    assert "planted_margin" not in all_settings()


def test_a_key_declared_twice_is_refused():
    class Clash(Head):
        name = "clash"
        settings = (Setting("sdm_loss_weight", 2.0, "taken"),)

    with pytest.raises(ConfigError, match="config key 'sdm_loss_weight' of head clash is already declared by head sdm"):
        register_head(Clash)
    assert "clash" not in HEADS


def test_the_cmt_naming_clash_is_explained_in_the_help(capsys):
    with pytest.raises(SystemExit):
        build_parser("t").parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--cmt_depth CMT_DEPTH blocks of the mlm head's cross-modal Transformer (IRRA's name; unrelated to the UIT cmt triplet head)" in text
    assert "--cmt_margin CMT_MARGIN margin of the cmt (UIT cross-modal triplet) head" in text


def test_a_run_config_written_before_the_heads_owned_their_settings_still_loads(toy_root, tmp_path):
    """configs.yaml as written by train.py at 23cb6f0 (every key then known, plus num_classes and clip)."""
    values = load_yaml(FROZEN_RUN_CONFIG)
    assert values["cmt_depth"] == 1 and values["num_classes"] == 16 and "clip" in values
    cfg = resolve(build_parser("t").parse_args(["--config_file", str(FROZEN_RUN_CONFIG)]))
    assert cfg.select_metric == "t2i.R1" and cfg.rerank_k == 128  # keys added since: defaults
    old_keys = set(yaml.safe_load(FROZEN_RUN_CONFIG.read_text()))
    assert old_keys - {"num_classes", "clip"} <= set(all_settings())


def test_readme_heads_table_is_generated_from_the_declarations():
    proc = subprocess.run([sys.executable, "tools/heads_table.py"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout.strip()
    assert table.count("\n") == len(HEADS) + 1  # header, rule, one row per head
    assert table in (REPO / "README.md").read_text()
    for name, head in HEADS.items():
        row = next(line for line in table.splitlines() if line.startswith(f"| `{name}` |"))
        assert all(f"`{s.key}`" in row for s in head.settings)


# ---------------------------------------------------------------- batch fields
def test_the_dataset_builds_exactly_the_fields_asked_for(toy_root):
    dataset = build_dataset("CUHK-PEDES", toy_root)
    cfg = demo_config(toy_root, "--batch_size", "8")
    loader = build_train_loader(cfg, dataset, SimpleTokenizer(), {"index", "images_view2"})
    batch = next(iter(loader))
    assert set(batch) == {"pids", "image_ids", "images", "caption_ids", "replaced", "index", "images_view2"}
    assert [dataset.train[i][0] for i in batch["index"].tolist()] == batch["pids"].tolist()
    assert [dataset.train[i][1] for i in batch["index"].tolist()] == batch["image_ids"].tolist()
    assert batch["images_view2"].shape == batch["images"].shape
    flipped = batch["images_view2"].flip(-1)
    # the second view is another random draw of the flip: each row equals the first view or its mirror
    assert all(torch.equal(a, b) or torch.equal(a, c) for a, b, c in zip(batch["images"], batch["images_view2"], flipped))


def test_a_field_nobody_builds_is_a_config_error_naming_the_head(toy_root):
    class NeedsDepth(Head):
        name = "needs_depth"
        batch_fields = ("depth_map",)

    register_head(NeedsDepth)
    try:
        with pytest.raises(ConfigError, match="head 'needs_depth' needs the batch field 'depth_map', which no field "
                                              "builder provides; known fields: "):
            demo_config(toy_root, "--loss_names", "sdm+needs_depth")
    finally:
        unregister_head("needs_depth")
    assert {"mlm_ids", "mlm_labels", "index", "images_view2"} <= set(FIELD_BUILDERS)


# ---------------------------------------------------------------- per-epoch hook
def test_the_per_sample_pass_sees_every_sample_by_index(toy_root):
    dataset = build_dataset("CUHK-PEDES", toy_root)
    cfg = demo_config(toy_root, "--batch_size", "8", "--sampler", "identity", "--num_instance", "2")
    torch.manual_seed(0)
    model = build_model(cfg, dataset.num_classes)
    loader = build_train_loader(cfg, dataset, SimpleTokenizer(), {"index"}, torch.Generator().manual_seed(0))
    context = TrainingSetPass(model, loader, torch.device("cpu"), epoch=1, amp_dtype=None)
    model.train()
    values = context.per_sample(lambda batch, out, encoder: {"pid": batch["pids"].float(),
                                                             "norm": out.text.global_feature.norm(dim=1)})
    assert model.training  # the pass restores the mode
    pids = torch.tensor([r[0] for r in dataset.train], dtype=torch.float)
    seen = ~values["pid"].isnan()
    assert seen.sum() > len(dataset.train) // 2 and torch.equal(values["pid"][seen], pids[seen])
    assert values["norm"][seen].gt(0).all() and values["norm"][~seen].isnan().all()


def test_per_epoch_state_is_resumed_exactly(toy_root, tmp_path, monkeypatch, custom):
    args = ["--config_file", str(REPO / "configs/demo.yaml"), *TINY, "--root_dir", str(toy_root),
            "--loss_names", "sdm+test_epoch", "--num_epoch", "3", "--eval_period", "1"]
    straight = tmp_path / "straight"
    train_entry.main([*args, "--output_dir", str(straight)])

    interrupted = tmp_path / "interrupted"
    train_until_killed_after_epoch_one(monkeypatch, [*args, "--output_dir", str(interrupted)])
    after_one = torch.load(interrupted / "last.pth", weights_only=False)["heads"]["test_epoch"]
    assert after_one["passes"] == 1
    train_entry.main([*args, "--output_dir", str(interrupted), "--resume"])

    a = torch.load(straight / "last.pth", weights_only=False)
    b = torch.load(interrupted / "last.pth", weights_only=False)
    assert a["heads"]["test_epoch"]["passes"] == b["heads"]["test_epoch"]["passes"] == 3
    assert torch.equal(a["heads"]["test_epoch"]["average"], b["heads"]["test_epoch"]["average"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert json.loads((straight / "results.json").read_text()) == json.loads((interrupted / "results.json").read_text())
    assert not re.search("nan", json.dumps(a["best"]))


# ---------------------------------------------------------------- shared modules and text fields
def test_a_required_head_is_built_once_shared_and_trained_through_its_user(toy_root, custom):
    cfg = demo_config(toy_root, "--loss_names", "sdm+test_user")
    model = build_model(cfg, 16)
    assert list(model.heads) == ["sdm", "test_shared", "test_user"]  # required before its user
    user, shared = model.heads["test_user"], model.heads["test_shared"]
    assert user.peers["shared"] is shared
    keys = list(model.state_dict())
    assert sum(k.startswith("heads.test_shared.proj.") for k in keys) == 2
    assert not any(k.startswith("heads.test_user.") for k in keys)  # the reference is not a second path
    loader = build_train_loader(cfg, build_dataset("CUHK-PEDES", toy_root), SimpleTokenizer(), model.required_fields())
    batch = next(iter(loader))
    batch.pop("replaced")
    calls = []
    model.encoder.transformer.register_forward_hook(lambda *args: calls.append(1))
    out = model(batch)
    assert len(calls) == 2  # the caption and the masked caption, each once
    out["test_user_loss"].backward()
    assert shared.proj.weight.grad is not None and shared.proj.weight.grad.abs().sum() > 0


def test_requirements_are_checked_at_config_time(toy_root):
    class Needy(Head):
        name = "needy"
        requires = ("missing_component",)

    class Unasked(Head):
        name = "unasked"
        text_fields = ("mlm_ids",)

    register_head(Needy)
    register_head(Unasked)
    try:
        with pytest.raises(ConfigError, match="head 'needy' requires the unknown head 'missing_component'"):
            demo_config(toy_root, "--loss_names", "sdm+needy")
        with pytest.raises(ConfigError, match="head 'unasked' encodes the text field 'mlm_ids' without asking"):
            demo_config(toy_root, "--loss_names", "sdm+unasked")
    finally:
        unregister_head("needy")
        unregister_head("unasked")
