"""The reproduction protocol: the epoch selected on held-out data (the dataset's val split, or
training identities carved into one), the test split evaluated only at the selected and the last
epoch, the published protocol labelled as such, several seeds summarised as mean +- std."""
from __future__ import annotations

import csv
import io
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import test as test_entry
import train as train_entry
from datasets import build_dataset
from datasets.toy import generate_toy_dataset
from processor.evaluation import Evaluator
from test_end_to_end import REPO, RUN_REPORT_KEYS, TINY
from tools.collect_results import main as collect_main


def _args(root: Path, run: Path, *extra: str) -> list[str]:
    return ["--config_file", str(REPO / "configs/demo.yaml"), *TINY, "--root_dir", str(root), "--output_dir", str(run),
            "--loss_names", "sdm+id", *extra]


@pytest.fixture()
def evaluated_splits(monkeypatch) -> list[str]:
    """The split of every evaluation run, in order."""
    splits = []
    original = Evaluator.eval

    def counting(self, model, device):
        splits.append(self.split)
        return original(self, model, device)
    monkeypatch.setattr(Evaluator, "eval", counting)
    return splits


def test_selection_on_val_reports_test_at_the_selected_and_the_last_epoch(toy_root, tmp_path, evaluated_splits):
    run = tmp_path / "run"
    report = train_entry.main(_args(toy_root, run, "--val_dataset", "val", "--num_epoch", "3", "--eval_period", "1",
                                    "--lr", "3e-3"))
    saved = json.loads((run / "results.json").read_text())
    assert saved == report and set(saved) == RUN_REPORT_KEYS
    events = EventAccumulator(str(run))
    events.Reload()
    val_r1 = {e.step: e.value for e in events.Scalars("val/t2i_R1")}
    selected = max(val_r1, key=lambda e: (val_r1[e], -e))  # the first epoch with the best value
    assert saved["selection"] == {"split": "val", "metric": "t2i.R1", "epoch": selected, "value": val_r1[selected],
                                  "protocol": saved["selection"]["protocol"]}
    assert saved["selection"]["protocol"].startswith("validation")
    assert saved["split"] == "test" and saved["epoch"] == selected and saved["last"]["epoch"] == 3
    assert saved["queries"] == {"t2i": 32, "i2t": 16}  # the test split (8 ids x 2 images x 2 captions)
    # the test split only after training: at the last epoch and, when another, at the selected one
    assert evaluated_splits == ["val"] * 3 + ["test"] * (1 if selected == 3 else 2)
    assert not any(tag.startswith("test/") for tag in events.Tags()["scalars"])
    again = test_entry.main(["--config_file", str(run / "configs.yaml"), "--output_dir", str(tmp_path / "eval")])
    assert again["t2i"] == pytest.approx(saved["t2i"]) and again["epoch"] == selected
    if selected != 3:
        assert saved["last"]["t2i"] != saved["t2i"]
    log = (run / "train_log.txt").read_text()
    assert "selection evaluation (val split) at epoch 1" in log and f"test at the selected epoch {selected}" in log


def test_the_published_protocol_is_labelled(toy_root, tmp_path, evaluated_splits):
    run = tmp_path / "run"
    report = train_entry.main(_args(toy_root, run, "--num_epoch", "2", "--eval_period", "1"))
    assert report["selection"]["split"] == "test" and report["selection"]["protocol"].startswith("published")
    assert evaluated_splits == ["test", "test"]  # every epoch on test, nothing more
    assert report["last"]["epoch"] == 2
    assert "selection evaluation (test split, published protocol)" in (run / "train_log.txt").read_text()


def test_icfg_selects_on_carved_training_identities(tmp_path, evaluated_splits):
    generate_toy_dataset(tmp_path / "data", num_train_ids=30, num_val_ids=0, num_test_ids=6, image_size=(48, 24),
                         dataset_name="ICFG-PEDES")
    run = tmp_path / "run"
    report = train_entry.main(_args(tmp_path / "data", run, "--dataset_name", "ICFG-PEDES",
                                    "--val_ids_from_train", "20", "--num_epoch", "1"))
    saved = yaml.safe_load((run / "configs.yaml").read_text())
    val_ids = saved["val_ids"]
    assert len(val_ids) == 20 and saved["val_dataset"] == "val" and saved["num_classes"] == 10
    dataset = build_dataset("ICFG-PEDES", tmp_path / "data")
    assert set(val_ids) <= set(dataset.train_ids())
    dataset.carve_val(val_ids)
    trained_paths = {path for _, _, path, _ in dataset.train}
    assert not trained_paths & set(dataset.val.img_paths)  # never a carved identity's image in training
    assert report["selection"]["split"] == "val" and evaluated_splits == ["val", "test"]
    # the same ids for another training seed; the run can be continued from its configs.yaml
    other = train_entry.main(_args(tmp_path / "data", tmp_path / "other", "--dataset_name", "ICFG-PEDES",
                                   "--val_ids_from_train", "20", "--num_epoch", "1", "--seed", "2"))
    assert yaml.safe_load((tmp_path / "other" / "configs.yaml").read_text())["val_ids"] == val_ids
    assert other["selection"]["split"] == "val"


def test_icfg_without_a_val_split_says_how_to_get_one(tmp_path, capsys):
    from utils.errors import run_cli
    generate_toy_dataset(tmp_path / "data", num_train_ids=6, num_val_ids=0, num_test_ids=3, image_size=(48, 24),
                         dataset_name="ICFG-PEDES")
    assert run_cli(train_entry.main, _args(tmp_path / "data", tmp_path / "run", "--dataset_name", "ICFG-PEDES",
                                           "--val_dataset", "val")) == 1
    assert "carve one from training identities with --val_ids_from_train N" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- several seeds
@pytest.fixture(scope="module")
def seed_runs(toy_root, tmp_path_factory) -> list[Path]:
    base = tmp_path_factory.mktemp("seeds")
    runs = []
    for seed in (1, 2, 3):
        runs.append(base / f"seed_{seed}")
        train_entry.main(_args(toy_root, runs[-1], "--num_epoch", "1", "--seed", str(seed), "--name", "demo_sdm"))
    runs.append(base / "other_lr")
    train_entry.main(_args(toy_root, runs[-1], "--num_epoch", "1", "--lr", "2e-3", "--name", "demo_sdm"))
    return runs


def test_collect_results_gives_mean_and_std_over_seeds(seed_runs, capsys):
    results = [json.loads((run / "results.json").read_text())["t2i"] for run in seed_runs]
    assert len({r["mAP"] for r in results[:3]}) == 3  # the seeds differ
    assert collect_main([str(p) for p in seed_runs]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| method | dataset | n | R1 | R5 | R10 | mAP | mINP |"
    cells = [c.strip() for c in lines[2].strip("| ").split(" | ")]
    for metric, cell in zip(("R1", "R5", "R10", "mAP", "mINP"), cells[3:]):
        values = [r[metric] for r in results[:3]]
        assert cell == f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}", metric
    # another lr: its own row; rows of one method are told apart by the config values that differ
    assert cells[:3] == ["demo_sdm (lr=0.001)", "CUHK-PEDES", "3"]
    assert lines[3].startswith(f"| demo_sdm (lr=0.002) | CUHK-PEDES | 1 | {results[3]['R1']:.2f} |")
    assert collect_main([str(p) for p in seed_runs[:3]] + ["--format", "csv", "--at", "last"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    last = [json.loads((run / "results.json").read_text())["last"]["t2i"]["mAP"] for run in seed_runs[:3]]
    assert len(rows) == 1 and rows[0]["n"] == "3" and rows[0]["seeds"] == "1 2 3"
    assert float(rows[0]["mAP_mean"]) == pytest.approx(statistics.mean(last), abs=1e-4)
    assert float(rows[0]["mAP_std"]) == pytest.approx(statistics.stdev(last), abs=1e-4)


def test_collect_results_searches_folders_and_skips_unfinished_runs(seed_runs, tmp_path, capsys):
    logs = tmp_path / "logs"
    for run in seed_runs[:3]:  # at two depths
        copy = logs / ("nested" if run.name == "seed_3" else "") / run.name
        copy.mkdir(parents=True)
        for name in ("configs.yaml", "results.json"):
            (copy / name).write_bytes((run / name).read_bytes())
    (logs / "crashed").mkdir()
    (logs / "crashed" / "configs.yaml").write_bytes((seed_runs[0] / "configs.yaml").read_bytes())
    assert collect_main([str(logs)]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[2].startswith("| demo_sdm | CUHK-PEDES | 3 |")
    assert captured.err == f"skipped {logs / 'crashed'}: no results.json (still training, interrupted or failed)\n"
    assert collect_main([str(logs / "crashed")]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == "error: no finished run (with results.json) among the arguments"
    assert collect_main([str(tmp_path / "absent")]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'absent'} is not a directory\n"


def test_seeds_script_runs_and_summarises(toy_root, tmp_path):
    env = {**os.environ, "PY": sys.executable, "OUT": str(tmp_path / "runs"), "GPUS": "0 1"}
    flags = [*TINY, "--root_dir", str(toy_root), "--loss_names", "sdm+id", "--num_epoch", "1", "--device", "cpu"]
    proc = subprocess.run(["bash", "run_scripts/seeds.sh", "configs/demo.yaml", "3", *flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seeds = [yaml.safe_load((tmp_path / "runs" / f"seed_{s}" / "configs.yaml").read_text())["seed"] for s in (1, 2, 3)]
    assert seeds == [1, 2, 3]
    tables = [line for line in proc.stdout.splitlines() if line.startswith("| demo | CUHK-PEDES | 3 |")]
    assert len(tables) == 2  # at the selected and at the last epoch


def test_seeds_script_names_a_failed_seed_and_summarises_the_others(toy_root, tmp_path):
    env = {**os.environ, "PY": sys.executable, "OUT": str(tmp_path / "runs"), "GPUS": "0 1"}
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "seed_2").write_text("")  # seed 2's output_dir is a file: that run fails
    flags = [*TINY, "--root_dir", str(toy_root), "--loss_names", "sdm+id", "--num_epoch", "1", "--device", "cpu"]
    proc = subprocess.run(["bash", "run_scripts/seeds.sh", "configs/demo.yaml", "3", *flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    err = proc.stderr.splitlines()
    assert f"seed 2 failed: error: output_dir {tmp_path / 'runs' / 'seed_2'} is a file, not a directory " \
           f"(log: {tmp_path / 'runs' / 'seed_2.out'})" in err
    assert err[-1] == "error: seed(s) 2 failed; the table above is over the others"
    assert len([line for line in proc.stdout.splitlines() if line.startswith("| demo | CUHK-PEDES | 2 |")]) == 2
    for bad, message in (("0", "error: N must be a whole number of seeds (1 or more), got '0'"),
                         ("three", "error: N must be a whole number of seeds (1 or more), got 'three'")):
        proc = subprocess.run(["bash", "run_scripts/seeds.sh", "configs/demo.yaml", bad], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60)
        assert (proc.returncode, proc.stderr.strip()) == (2, message)
