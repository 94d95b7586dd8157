"""Exact resume, crash safety, clear errors on bad input, the non-finite loss guard, determinism."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import test as test_entry
import train as train_entry
from conftest import train_until_killed_after_epoch_one
from datasets.toy import generate_toy_dataset
from test_end_to_end import REPO, RUN_REPORT_KEYS, TINY
from model.build import build_model
from utils.errors import run_cli
from utils.iotools import save_checkpoint, set_seed
from utils.options import build_parser, resolve

RECIPE = [*TINY, "--loss_names", "sdm+mlm+id", "--img_aug", "--eval_period", "1"]


def _args(toy_root: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--config_file", str(REPO / "configs/demo.yaml"), *RECIPE, "--root_dir", str(toy_root),
            "--output_dir", str(run_dir), *extra]


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


# UIT adds randomness in the sampler (idrannum), the captions (pruning, corruption) and the model (TIR masks).
UIT = ["--loss_names", "sdm+id+cmt+tir", "--sampler", "idrannum", "--num_instance", "2",
       "--text_prune_prob", "0.3", "--text_mask_corruption"]


@pytest.mark.parametrize("workers, method", [("0", []), ("2", []), ("2", UIT)], ids=["irra-0", "irra-2", "uit-2"])
def test_resume_continues_exactly(toy_root, tmp_path, monkeypatch, workers, method):
    straight = tmp_path / "straight"
    train_entry.main(_args(toy_root, straight, "--num_epoch", "3", "--num_workers", workers, *method))

    interrupted = tmp_path / "interrupted"
    train_until_killed_after_epoch_one(
        monkeypatch, _args(toy_root, interrupted, "--num_epoch", "3", "--num_workers", workers, *method))
    train_entry.main(_args(toy_root, interrupted, "--num_epoch", "3", "--num_workers", workers, *method, "--resume"))

    a, b = _results(straight), _results(interrupted)
    assert a["epoch"] == b["epoch"] and a["last"]["epoch"] == b["last"]["epoch"] == 3
    for task in ("t2i", "i2t"):
        for key, value in a[task].items():
            assert b[task][key] == pytest.approx(value, abs=1e-4)
    wa, wb = _weights(straight / "last.pth"), _weights(interrupted / "last.pth")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    assert "resumed from" in (interrupted / "train_log.txt").read_text()


def test_resume_from_an_explicit_file(toy_root, tmp_path):
    first = tmp_path / "first"
    train_entry.main(_args(toy_root, first, "--num_epoch", "1"))
    second = tmp_path / "second"
    best = train_entry.main(_args(toy_root, second, "--num_epoch", "2",
                                  "--resume_ckpt_file", str(first / "last.pth")))
    assert torch.load(second / "last.pth", weights_only=False)["epoch"] == 2
    assert best["epoch"] in (1, 2)


def test_resume_without_checkpoint_is_a_clear_error(toy_root, tmp_path, capsys):
    assert run_cli(train_entry.main, _args(toy_root, tmp_path / "empty", "--resume")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"error: cannot resume: no checkpoint at {tmp_path / 'empty' / 'last.pth'} " \
                  "(train without --resume, or pass --resume_ckpt_file PATH)"


def test_sigkill_then_resume(toy_root, tmp_path):
    """A run killed with SIGKILL at an arbitrary moment leaves a directory --resume continues from."""
    run_dir = tmp_path / "killed"
    args = [sys.executable, "train.py", *_args(toy_root, run_dir, "--num_epoch", "4")]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run_dir / "last.pth").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere in epoch 2, maybe in the middle of writing a checkpoint
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (run_dir / "last.pth").exists()
    resumed = subprocess.run(args + ["--resume"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert torch.load(run_dir / "last.pth", weights_only=False)["epoch"] == 4
    assert set(_results(run_dir)) == RUN_REPORT_KEYS


KILL_DURING_WRITE = """
import os, signal, sys, torch
import utils.iotools as io
class Dying:
    def __init__(self, f): self.f = f
    def write(self, data):
        self.f.write(data[: len(data) // 2]); self.f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
real = io._atomic_write
io._atomic_write = lambda path, write: real(path, lambda f: write(Dying(f)))
io.save_checkpoint({"epoch": 2, "weights": torch.ones(100000)}, sys.argv[1])
"""


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    path = tmp_path / "last.pth"
    save_checkpoint({"epoch": 1, "weights": torch.zeros(100000)}, path)
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_WRITE, str(path)], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -signal.SIGKILL
    assert list(tmp_path.glob(".last.pth.*.tmp"))  # the half-written temporary file
    state = torch.load(path, weights_only=False)
    assert state["epoch"] == 1 and torch.equal(state["weights"], torch.zeros(100000))


def test_same_seed_same_results(toy_root, tmp_path):
    runs = [tmp_path / "a", tmp_path / "b"]
    for run_dir in runs:
        train_entry.main(_args(toy_root, run_dir, "--num_epoch", "1", "--deterministic"))
    assert _results(runs[0]) == _results(runs[1])
    wa, wb = _weights(runs[0] / "best.pth"), _weights(runs[1] / "best.pth")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_non_finite_losses_are_skipped(toy_root, tmp_path, monkeypatch, caplog):
    import model.heads.contrastive as contrastive
    calls = {"n": 0}
    real = contrastive.sdm_loss

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] in (2, 3) else loss

    monkeypatch.setattr(contrastive, "sdm_loss", sometimes_nan)
    run_dir = tmp_path / "nan"
    train_entry.main(_args(toy_root, run_dir, "--num_epoch", "1"))
    warnings = [r.getMessage() for r in caplog.records if "non-finite loss" in r.getMessage()]
    assert len(warnings) == 2 and "step skipped; image ids [" in warnings[0]
    assert "'sdm_loss': nan" in warnings[0]


def test_skipped_step_does_not_update_the_weights(toy_root, tmp_path, monkeypatch):
    import model.heads.contrastive as contrastive
    monkeypatch.setattr(contrastive, "sdm_loss", lambda *a, **k: torch.tensor(float("inf"), requires_grad=True))
    run_dir = tmp_path / "inf"
    assert run_cli(train_entry.main, _args(toy_root, run_dir, "--num_epoch", "1", "--max_nonfinite_steps", "2")) == 1
    state = torch.load(run_dir / "last.pth", weights_only=False)
    assert state["epoch"] == 0  # no epoch completed; the weights are those before the bad steps
    set_seed(1)  # as train.py before it builds the model: same architecture, same initial weights
    cfg = resolve(build_parser("t").parse_args(_args(toy_root, run_dir)))
    reference = build_model(cfg, 16).state_dict()
    assert all(torch.equal(reference[k], state["model"][k]) for k in reference)
    assert not state["optimizer"]["state"]  # the optimizer never stepped


def test_consecutive_non_finite_losses_stop_the_run(toy_root, tmp_path, monkeypatch, capsys):
    import model.heads.contrastive as contrastive
    monkeypatch.setattr(contrastive, "sdm_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    run_dir = tmp_path / "diverged"
    assert run_cli(train_entry.main, _args(toy_root, run_dir, "--num_epoch", "2", "--max_nonfinite_steps", "3")) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == ("error: 3 consecutive non-finite losses at epoch 1 step 3; "
                                               "training stopped, state saved to last.pth")
    assert (run_dir / "last.pth").is_file()


def _corrupt(path: Path) -> None:
    path.write_bytes(b"this is not a jpeg")


def test_unreadable_training_image_is_replaced_by_its_identity_and_counted(toy_root, tmp_path, caplog):
    root = tmp_path / "data"
    generate_toy_dataset(root, num_train_ids=16, num_val_ids=2, num_test_ids=8, image_size=(48, 24))
    bad = root / "CUHK-PEDES/imgs/toy/0001_00.jpg"
    _corrupt(bad)
    train_entry.main(_args(root, tmp_path / "run", "--num_epoch", "1", "--max_unreadable_train", "0.05"))
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith(f"cannot read image {bad}") for m in messages) == 1  # read once per process
    replaced = [m for m in messages if f"(image {bad}) replaced by sample" in m]
    assert len(replaced) == 2  # its two captions, each by a sample of the same identity
    identities = [re.search(r"\(identity (\d+) -> (\d+)\)$", m).groups() for m in replaced]
    assert all(before == after for before, after in identities)
    assert "epoch 1: replaced 2 samples whose image could not be read" in messages


def test_unreadable_gallery_image_stops_evaluation_unless_skipped(tmp_path, capsys):
    root = tmp_path / "data"
    generate_toy_dataset(root, num_train_ids=16, num_val_ids=2, num_test_ids=8, image_size=(48, 24))
    run_dir = tmp_path / "run"
    train_entry.main(_args(root, run_dir, "--num_epoch", "1"))
    bad = root / "CUHK-PEDES/imgs/toy/0019_01.jpg"  # a test image
    _corrupt(bad)
    assert run_cli(test_entry.main, ["--config_file", str(run_dir / "configs.yaml")]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (f"error: cannot read gallery image {bad} "
                                               "(pass --skip_bad_images to leave it out)")
    results = test_entry.main(["--config_file", str(run_dir / "configs.yaml"), "--skip_bad_images"])
    assert {"t2i", "i2t"} <= set(results) and results["skipped_images"] == [str(bad)]
    assert results["gallery"]["t2i"] == 15 and results["excluded_queries"] == {"t2i": 0, "i2t": 0}


def _bad_inputs(root: Path) -> dict[str, tuple[list[str], str]]:
    """Each user mistake: (flags, the exact line the user sees)."""
    (root / "noanno/CUHK-PEDES").mkdir(parents=True)
    (root / "badjson/CUHK-PEDES").mkdir(parents=True)
    (root / "badjson/CUHK-PEDES/reid_raw.json").write_text('[{"split": "train", "id": 1,}]')
    (root / "nokey/CUHK-PEDES").mkdir(parents=True)
    (root / "nokey/CUHK-PEDES/reid_raw.json").write_text(json.dumps(
        [{"split": "train", "captions": ["a"], "file_path": "x.jpg", "id": 1},
         {"split": "test", "captions": ["b"], "id": 2}]))
    (root / "garbage.pt").write_text("garbage")
    (root / "bad.yaml").write_text("batchsize: 8\n")
    return {
        "missing dataset root": (["--root_dir", f"{root}/missing"],
                                 f"error: CUHK-PEDES not found: no folder {root}/missing/CUHK-PEDES"),
        "missing annotation file": (["--root_dir", f"{root}/noanno"],
                                    f"error: CUHK-PEDES annotation file not found: {root}/noanno/CUHK-PEDES/reid_raw.json"),
        "malformed JSON": (["--root_dir", f"{root}/badjson"],
                           f"error: malformed JSON in {root}/badjson/CUHK-PEDES/reid_raw.json: Expecting property "
                           "name enclosed in double quotes at line 1 column 29"),
        "entry missing a key": (["--root_dir", f"{root}/nokey"],
                                f"error: {root}/nokey/CUHK-PEDES/reid_raw.json: 1 malformed entry; first: entry 1 "
                                "lacks key(s) file_path"),
        "unknown loss name": (["--loss_names", "sdm+idd"],
                              "error: unknown loss name 'idd' in loss_names 'sdm+idd'; known: aptm_fusion, aptm_itc, aptm_mlm, "
                              "ccd, citc, cmpm, cmt, id, itc, itm, lgur, logit_scale, mcm, mlm, mvsi, nitc, ritc, sdm, sew, ssi, tal, "
                              "tir, trl, tse"),
        "unknown dataset": (["--dataset_name", "Market-1501"],
                            "error: unknown dataset_name 'Market-1501'; known: CUHK-PEDES, ICFG-PEDES, RSTPReid, UFine6926"),
        "unknown config key": (["--config_file", f"{root}/bad.yaml"],
                               f"error: unknown config key 'batchsize' in {root}/bad.yaml; did you mean 'batch_size'?"),
        "missing config file": (["--config_file", f"{root}/none.yaml"], f"error: config file not found: {root}/none.yaml"),
        "missing checkpoint": (["--pretrain_choice", f"{root}/nope.pt"], f"error: checkpoint not found: {root}/nope.pt"),
        "unloadable checkpoint": (["--pretrain_choice", f"{root}/garbage.pt"],
                                  f"error: cannot read checkpoint {root}/garbage.pt: not a TorchScript archive or a "
                                  "torch.save file of tensors (UnpicklingError)"),
        "identity batch": (["--sampler", "identity", "--batch_size", "6", "--num_instance", "4"],
                           "error: batch_size 6 must be a multiple of num_instance 4"),
    }


BAD_INPUT_CASES = ["missing dataset root", "missing annotation file", "malformed JSON", "entry missing a key",
                   "unknown loss name", "unknown dataset", "unknown config key", "missing config file",
                   "missing checkpoint", "unloadable checkpoint", "identity batch"]


@pytest.mark.parametrize("case", BAD_INPUT_CASES)
def test_bad_input_gives_one_clear_line(toy_root, tmp_path, capsys, case):
    flags, message = _bad_inputs(tmp_path)[case]
    base = _args(toy_root, tmp_path / "run", "--num_epoch", "1")
    if flags[0] == "--config_file":
        base = base[2:]  # the case's own config file replaces the demo one
    assert run_cli(train_entry.main, [*base, *flags]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == message
