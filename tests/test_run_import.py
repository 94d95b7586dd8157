"""tools/import_run.py: runs written by IRRA's, SEN's and RDE's code become runs of ours.

The IRRA run of ``tests/data/irra_run`` was written by IRRA's own code (see its README); imported
and evaluated by our ``test.py`` it gives IRRA's own test numbers and features. The key lists of
``tests/data/import_keys`` are those of runs written by IRRA (with MLM), SEN (with TIR) and RDE
(with TSE); every tensor of theirs must land in our model or be listed as left out."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

import test as test_entry
import train as train_entry
from conftest import openai_state_dict
from datasets.toy import generate_toy_dataset
from model.run_import import RunImportError, import_run
from tools.import_run import main as import_main
from utils.errors import UserError

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def irra_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("irra_data")
    generate_toy_dataset(root, num_train_ids=16, num_val_ids=2, num_test_ids=40, image_size=(64, 32))
    return root


def _irra_run(folder: Path, dtype: torch.dtype = torch.float32) -> Path:
    """IRRA's run directory, rebuilt from the fixture and checked tensor by tensor against IRRA's file."""
    saved = torch.load(DATA / "irra_run" / "irra_weights.pt", weights_only=True)
    token = openai_state_dict(vision_width=64, vision_layers=1, text_width=64, text_layers=1, embed_dim=64,
                              seed=0)["token_embedding.weight"].clone()
    token[saved["token_rows"]] = saved["token_values"]
    model = {**saved["tensors"], "base_model.token_embedding.weight": token}
    for key, value in model.items():
        assert hashlib.sha256(value.contiguous().numpy().tobytes()).hexdigest() == saved["sha256"][key], key
    folder.mkdir(parents=True)
    shutil.copy(DATA / "irra_run" / "configs.yaml", folder / "configs.yaml")
    model = {k: v.to(dtype) for k, v in model.items()}
    torch.save({"model": model, "optimizer": {"state": {}}, "scheduler": {"last_epoch": 1}, "num_epoch": 3,
                "iteration": 0, "epoch": 1}, folder / "best.pth")
    return folder


def test_an_irra_run_gives_irras_own_test_numbers(irra_data, tmp_path, capsys):
    source = _irra_run(tmp_path / "irra")
    run = import_main(["--from", "irra", str(source), "--output_dir", str(tmp_path / "ours")])
    assert "39 tensors, loss_names sdm+id" in capsys.readouterr().out
    results = test_entry.main(["--config_file", str(run / "configs.yaml"), "--root_dir", str(irra_data),
                               "--save_features"])
    expected = json.loads((DATA / "irra_run" / "irra_test_numbers.json").read_text())
    for task in ("t2i", "i2t"):
        assert results[task] == pytest.approx(expected[task], abs=0.05), task
    saved = torch.load(DATA / "irra_run" / "irra_weights.pt", weights_only=True)
    features = torch.load(run / "features.pt")
    torch.testing.assert_close(features["text_feats"], saved["query_features"], atol=1e-5, rtol=0)
    torch.testing.assert_close(features["image_feats"], saved["gallery_features"], atol=1e-5, rtol=0)
    report = json.loads((run / "import.json").read_text())
    assert (report["tensors"], report["left_out"], report["unused_options"]) == (39, {}, ["power"])


def test_fp16_checkpoints_and_fine_tuning_from_an_imported_run(irra_data, tmp_path):
    """IRRA's GPU runs store fp16 weights; they import as fp32 copies of those values, and training
    can start from the imported run."""
    source = _irra_run(tmp_path / "irra", torch.float16)
    run = import_main(["--from", "irra", str(source), "--output_dir", str(tmp_path / "ours")])
    ours = torch.load(run / "best.pth", weights_only=True)["model"]
    theirs = torch.load(source / "best.pth", weights_only=True)["model"]
    assert all(v.dtype == torch.float32 for v in ours.values())
    assert torch.equal(ours["encoder.visual.conv1.weight"], theirs["base_model.visual.conv1.weight"].float())
    assert torch.equal(ours["heads.id.classifier.weight"], theirs["classifier.weight"].float())
    best = train_entry.main(["--config_file", str(run / "configs.yaml"), "--init_from", str(run), "--root_dir",
                             str(irra_data), "--output_dir", str(tmp_path / "tuned"), "--num_epoch", "1",
                             "--num_workers", "0", "--lr", "1e-30"])
    assert "initialised 39 of 39 tensors" in (tmp_path / "tuned" / "train_log.txt").read_text()
    before = test_entry.main(["--config_file", str(run / "configs.yaml"), "--root_dir", str(irra_data)])
    assert best["t2i"] == pytest.approx(before["t2i"], abs=1e-6)  # lr 1e-30 (lr must be > 0): the imported weights


def _fake_run(folder: Path, name: str) -> Path:
    """A run directory of that code with random tensors of the recorded names and shapes."""
    shapes = json.loads((DATA / "import_keys" / name / "shapes.json").read_text())
    generator = torch.Generator().manual_seed(0)
    model = {k: torch.randint(0, 9, ()) if k.endswith("num_batches_tracked") else torch.randn(*s, generator=generator)
             for k, s in shapes.items()}
    folder.mkdir(parents=True)
    shutil.copy(DATA / "import_keys" / name / "configs.yaml", folder / "configs.yaml")
    torch.save({"model": model, "epoch": 1}, folder / "best.pth")
    return folder


def test_irra_with_mlm_maps_every_tensor(tmp_path):
    source = _fake_run(tmp_path / "src", "irra_mlm")
    cfg, state, report = import_run("irra", source, tmp_path / "out")
    theirs = torch.load(source / "best.pth", weights_only=True)["model"]
    assert (cfg.loss_names, cfg.MLM, cfg.cmt_depth, report.mapped, report.dropped) == ("sdm+mlm+id", True, 1, 67, {})
    for ours, key in (("heads.mlm.cross_attn.in_proj_weight", "cross_attn.in_proj_weight"),
                      ("heads.mlm.mlm_head.fc.weight", "mlm_head.fc.weight"),
                      ("heads.mlm.cross_modal_transformer.resblocks.0.mlp.c_fc.bias",
                       "cross_modal_transformer.resblocks.0.mlp.c_fc.bias")):
        assert torch.equal(state[ours], theirs[key])


def test_sen_maps_the_tir_decoder_and_lists_its_dead_modules(tmp_path):
    source = _fake_run(tmp_path / "src", "sen")
    cfg, state, report = import_run("sen", source, tmp_path / "out")
    theirs = torch.load(source / "best.pth", weights_only=True)["model"]
    assert cfg.loss_names == "sdm+tir+id+cmt"
    assert (cfg.tir_loss_weight, cfg.cmt_loss_weight, cfg.tir_mask_ratio, cfg.tir_depth) == (10.0, 10.0, 0.7, 1)
    assert {k.split(".")[0] for k in report.dropped} == {"decoder_pos_embed", "cross_attn_TextImage",
                                                         "cross_attn_Image", "norm_3", "norm_5"}
    assert torch.equal(state["heads.tir.cross_attn.in_proj_weight"], theirs["cross_attn_Text.in_proj_weight"])
    assert torch.equal(state["heads.tir.decoder.resblocks.0.attn.out_proj.weight"],
                       theirs["cross_modal_transformer_mae.resblocks.0.attn.out_proj.weight"])
    assert torch.equal(state["heads.tir.mask_token"], theirs["mask_token"])


def test_rde_maps_the_tse_layers(tmp_path):
    source = _fake_run(tmp_path / "src", "rde")
    cfg, state, report = import_run("rde", source, tmp_path / "out")
    theirs = torch.load(source / "best.pth", weights_only=True)["model"]
    assert (cfg.loss_names, cfg.tse_ratio, cfg.tal_tau, cfg.tal_margin, cfg.txt_aug_prob) == \
        ("tal+tse", 0.3, 0.015, 0.1, 0.2)
    assert set(report.dropped) == {f"{side}.mlp.bns.1.{p}" for side in ("visul_emb_layer", "texual_emb_layer")
                                   for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
                                   } | {"visul_emb_layer.linear.weight", "visul_emb_layer.linear.bias"}
    for ours, key in (("heads.tse.text.fc.weight", "texual_emb_layer.linear.weight"),
                      ("heads.tse.image.fc.weight", "visul_emb_layer.fc.weight"),
                      ("heads.tse.image.mlp.0.weight", "visul_emb_layer.mlp.layers.0.weight"),
                      ("heads.tse.text.mlp.1.running_var", "texual_emb_layer.mlp.bns.0.running_var"),
                      ("heads.tse.text.mlp.3.bias", "texual_emb_layer.mlp.layers.1.bias")):
        assert torch.equal(state[ours], theirs[key]), ours
    assert cfg.tse_bn_frozen == (int(theirs["visul_emb_layer.mlp.bns.0.num_batches_tracked"]) == 0)


def test_what_does_not_fit_is_named(tmp_path):
    source = _fake_run(tmp_path / "src", "sen")
    with pytest.raises(RunImportError, match=r"tensor mask_token \(1, 1, 64\) has no counterpart in our model"):
        import_run("irra", source, tmp_path / "out")  # SEN's run is not IRRA's
    state = torch.load(source / "best.pth", weights_only=True)
    state["model"]["decoder_embed.weight"] = torch.zeros(3, 3)
    torch.save(state, source / "best.pth")
    with pytest.raises(RunImportError, match=r"wrong shape \['heads.tir.decoder_embed.weight \(3, 3\) vs \(64, 64\)'\]"):
        import_run("sen", source, tmp_path / "out")
    with pytest.raises(UserError, match="no configs.yaml in"):
        import_run("irra", tmp_path, tmp_path / "out")
    (tmp_path / "configs.yaml").write_text("loss_names: sdm+id\n")
    (tmp_path / "best.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read .*best.pth"):
        import_run("irra", tmp_path, tmp_path / "out")
    other = _fake_run(tmp_path / "other", "irra_mlm")
    (other / "configs.yaml").write_text("loss_names: sdm+xyz\n")
    with pytest.raises(RunImportError, match="irra loss 'xyz' .* is unknown to the importer"):
        import_run("irra", other, tmp_path / "out")


def _tbps_checkpoint(path: Path, ssi: bool) -> dict[str, torch.Tensor]:
    """A checkpoint_best.pth in TBPS-CLIP's key names (model/tbps_model.py @ ba090bc): its towers keep
    OpenAI's names under ``visual.`` and ``encode_text.``, then ``logit_scale`` and the SimCLR MLP."""
    state = {}
    for key, value in openai_state_dict(embed_dim=32).items():
        state[key if key.startswith("visual.") or key == "logit_scale" else f"encode_text.{key}"] = value
    state["logit_scale"] = torch.tensor(4.3)
    if ssi:
        generator = torch.Generator().manual_seed(3)
        state.update({"simclr_mlp.0.weight": torch.randn(128, 32, generator=generator),
                      "simclr_mlp.0.bias": torch.randn(128, generator=generator),
                      "simclr_mlp.2.weight": torch.randn(32, 128, generator=generator),
                      "simclr_mlp.2.bias": torch.randn(32, generator=generator),
                      "classifier.weight": torch.randn(5, 32, generator=generator)})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, "optimizer": {}}, path)
    return state


@pytest.mark.parametrize("ssi", [True, False], ids=["full", "simplified"])
def test_tbps_clip_checkpoints_import_and_evaluate(toy_root, tmp_path, ssi):
    theirs = _tbps_checkpoint(tmp_path / "tbps" / "checkpoint_best.pth", ssi)
    run = import_main(["--from", "tbps", str(tmp_path / "tbps"), "--dataset_name", "CUHK-PEDES",
                       "--output_dir", str(tmp_path / "ours")])
    ours = torch.load(run / "best.pth", weights_only=True)["model"]
    assert torch.equal(ours["encoder.visual.conv1.weight"], theirs["visual.conv1.weight"])
    assert torch.equal(ours["encoder.transformer.resblocks.0.attn.in_proj_weight"],
                       theirs["encode_text.transformer.resblocks.0.attn.in_proj_weight"])
    assert ours["heads.logit_scale.theta"].item() == pytest.approx(4.3)
    report = json.loads((run / "import.json").read_text())
    if ssi:
        assert report["loss_names"] == "nitc+mvsi+ritc+citc+ssi"
        assert torch.equal(ours["heads.ssi.mlp.fc2.weight"], theirs["simclr_mlp.2.weight"])
        assert list(report["left_out"]) == ["classifier.weight"]
    else:
        assert report["loss_names"] == "nitc+ritc" and report["left_out"] == {}
    results = test_entry.main(["--config_file", str(run / "configs.yaml"), "--root_dir", str(toy_root),
                               "--num_workers", "0", "--annotation_format", "raw"])  # toy: the raw layout
    assert results["epoch"] == 0 and 0 <= results["t2i"]["R1"] <= 100  # evaluated at 224 x 224, ImageNet stats


def test_a_tbps_checkpoint_without_its_scale_is_refused(tmp_path):
    theirs = _tbps_checkpoint(tmp_path / "c.pth", ssi=False)
    del theirs["logit_scale"]
    torch.save({"model": theirs}, tmp_path / "c.pth")
    with pytest.raises(RunImportError, match="holds no logit_scale: not a TBPS-CLIP checkpoint"):
        import_run("tbps", tmp_path / "c.pth", tmp_path / "out")
