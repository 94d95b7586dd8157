"""A run directory is never damaged: nothing is written before a command is known to be able to
run, an existing run is refused unless --resume or --overwrite says what to do, an interrupted or
failed run says so in one line (and in its log). Each case: the message, the exit code and the
files of the existing run byte for byte."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

import train as train_entry
from test_end_to_end import REPO, TINY
from utils.errors import ConfigError, run_cli


def _args(toy_root: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--config_file", str(REPO / "configs/demo.yaml"), *TINY, "--root_dir", str(toy_root),
            "--output_dir", str(run_dir), "--loss_names", "sdm+id", *extra]


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(toy_root, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "done"
    train_entry.main(_args(toy_root, run, "--num_epoch", "1"))
    return run


def _refused(argv: list[str], capsys) -> str:
    assert run_cli(train_entry.main, argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: ")
    return err.strip().splitlines()[-1]  # earlier lines: progress bars of the epoch that ran


def test_an_existing_run_is_refused_without_resume_or_overwrite(finished_run, toy_root, capsys):
    before = _hashes(finished_run)
    line = _refused(_args(toy_root, finished_run, "--num_epoch", "1"), capsys)
    assert line == (f"error: {finished_run} already holds a run (configs.yaml, train_log.txt, last.pth, best.pth); "
                    "continue it with --resume, or start over with --overwrite")
    assert _hashes(finished_run) == before


def test_resuming_a_finished_run_changes_nothing(finished_run, toy_root, capsys):
    before = _hashes(finished_run)
    report = train_entry.main(_args(toy_root, finished_run, "--num_epoch", "1", "--resume"))
    assert report == json.loads((finished_run / "results.json").read_text())
    assert capsys.readouterr().out.strip() == (f"{finished_run} has trained all 1 epoch(s); results.json is "
                                               "unchanged (a larger --num_epoch trains on)")
    assert _hashes(finished_run) == before


def test_a_resumed_run_logs_the_settings_that_changed(toy_root, tmp_path):
    import yaml
    run = tmp_path / "longer"
    train_entry.main(_args(toy_root, run, "--num_epoch", "1"))
    train_entry.main(_args(toy_root, run, "--num_epoch", "2", "--lr", "2e-3", "--resume"))
    log = (run / "train_log.txt").read_text()
    assert ("resumed with settings that differ from the run's configs.yaml (which now records the new ones): "
            "lr: 0.001 -> 0.002, num_epoch: 1 -> 2\n") in log
    saved = yaml.safe_load((run / "configs.yaml").read_text())
    assert (saved["lr"], saved["num_epoch"]) == (2e-3, 2)
    assert json.loads((run / "results.json").read_text())["last"]["epoch"] == 2


def test_overwrite_starts_over_cleanly(finished_run, toy_root, tmp_path):
    run = tmp_path / "again"
    train_entry.main(_args(toy_root, run, "--num_epoch", "1"))
    old_events = sorted(p.name for p in run.glob("events.out.tfevents.*"))
    train_entry.main(_args(toy_root, run, "--num_epoch", "1", "--overwrite", "--seed", "2"))
    events = sorted(p.name for p in run.glob("events.out.tfevents.*"))
    assert len(events) == 1 and events != old_events
    assert "seed: 2" in (run / "configs.yaml").read_text()
    assert (run / "train_log.txt").read_text().count("training epochs 1..1") == 1


def test_a_failed_resume_changes_nothing(finished_run, toy_root, tmp_path, capsys):
    run = tmp_path / "copy"
    run.mkdir()
    for name in _hashes(finished_run):
        (run / name).write_bytes((finished_run / name).read_bytes())
    before = _hashes(run)
    line = _refused(_args(toy_root, run, "--num_epoch", "2", "--resume", "--vision_width", "128"), capsys)
    assert f"cannot resume from {run / 'last.pth'}: its model does not match this config: wrong shape [" in line
    assert "encoder.visual.class_embedding (64,) vs (128,)" in line
    assert _hashes(run) == before  # configs.yaml not rewritten with vision_width 128
    (run / "last.pth").write_bytes((run / "last.pth").read_bytes()[:1000])  # cut short
    before = _hashes(run)
    line = _refused(_args(toy_root, run, "--num_epoch", "2", "--resume"), capsys)
    assert line == (f"error: cannot resume from {run / 'last.pth'}: PytorchStreamReader failed reading zip archive: "
                    "failed finding central directory (a damaged or incomplete file?)")
    assert _hashes(run) == before


def test_bad_output_directories_are_named(toy_root, tmp_path, capsys, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    assert _refused(_args(toy_root, tmp_path / "a_file"), capsys) == \
        f"error: output_dir {tmp_path / 'a_file'} is a file, not a directory"
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    real_access = os.access
    # root ignores permission bits, so the folder is also reported read-only to the check itself
    monkeypatch.setattr(train_entry.os, "access",
                        lambda path, mode: False if Path(path) == locked else real_access(path, mode))
    try:
        assert _refused(_args(toy_root, locked / "run"), capsys) == \
            f"error: cannot write the run directory {locked / 'run'}: {locked} is not writable"
        assert list(locked.iterdir()) == []
    finally:
        os.chmod(locked, 0o700)


def test_unknown_and_abbreviated_flags_are_refused_with_a_suggestion(toy_root, tmp_path, capsys):
    assert _refused(_args(toy_root, tmp_path / "r", "--batch", "8"), capsys) == \
        "error: unknown flag --batch; did you mean --batch_size?"
    assert _refused(_args(toy_root, tmp_path / "r", "--learning_rate", "1e-3"), capsys).startswith(
        "error: unknown flag --learning_rate")
    assert _refused(_args(toy_root, tmp_path / "r", "--num_epoch", "x"), capsys) == \
        "error: argument --num_epoch: invalid int value: 'x'"
    assert not (tmp_path / "r").exists()


def test_nothing_is_written_when_the_checks_fail(toy_root, tmp_path, capsys):
    run = tmp_path / "new"
    _refused(_args(toy_root, run, "--select_metric", "t2i_rerank.R1"), capsys)  # no re-ranking head
    _refused(_args(toy_root, run, "--resume"), capsys)  # nothing to resume
    assert not run.exists()


def test_a_failed_run_writes_its_error_into_the_log(toy_root, tmp_path, monkeypatch, capsys):
    import model.heads.contrastive as contrastive
    monkeypatch.setattr(contrastive, "sdm_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    run = tmp_path / "diverged"
    line = _refused(_args(toy_root, run, "--num_epoch", "1", "--max_nonfinite_steps", "2"), capsys)
    assert line in (run / "train_log.txt").read_text()


def test_a_signal_during_a_checkpoint_write_waits_for_the_file(tmp_path):
    import signal

    from utils.errors import sigterm_as_interrupt
    from utils.iotools import save_checkpoint
    state = {"weights": torch.arange(1000.0)}

    def write_while_signalled(obj, f):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of the write
        real_save(obj, f)

    real_save = torch.save
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        torch.save = write_while_signalled
        try:
            save_checkpoint(state, tmp_path / "last.pth")
        finally:
            torch.save = real_save
    assert torch.equal(torch.load(tmp_path / "last.pth")["weights"], state["weights"])  # complete
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temporary file left


def test_an_interruption_says_how_to_continue(toy_root, tmp_path, monkeypatch, capsys):
    from conftest import train_until_killed_after_epoch_one
    run = tmp_path / "stopped"
    args = _args(toy_root, run, "--num_epoch", "2")
    train_until_killed_after_epoch_one(monkeypatch, args)
    log = (run / "train_log.txt").read_text()
    assert "interrupted: last.pth holds epoch 1; continue with: python train.py" in log
    train_entry.main([*args, "--resume"])
    assert "resumed from" in (run / "train_log.txt").read_text()


def test_an_interruption_before_the_first_save_says_how_to_start_again(toy_root, tmp_path, monkeypatch, capsys):
    import shlex
    import processor.processor as processor
    from utils.errors import Interrupted

    def interrupt(*_):
        raise KeyboardInterrupt
    run = tmp_path / "early"
    args = _args(toy_root, run, "--num_epoch", "2", "--eval_period", "2")  # epoch 1: no evaluation, no best.pth
    with monkeypatch.context() as patch:
        patch.setattr(processor, "save_training_state", interrupt)
        with pytest.raises(Interrupted) as info:
            train_entry.main(args)
    prefix = "interrupted in epoch 1: nothing was saved yet; start again with: "
    assert str(info.value).startswith(prefix)
    command = shlex.split(str(info.value)[len(prefix):])
    assert command[:2] == ["python", "train.py"] and command[-1] == "--overwrite"
    before = _hashes(run)
    assert _refused(args, capsys) == (f"error: {run} already holds a run without last.pth to resume (configs.yaml, "
                                      f"train_log.txt, {sorted(p.name for p in run.glob('events.*'))[0]}); start over "
                                      "with --overwrite, or choose another --output_dir")
    assert _hashes(run) == before
    train_entry.main(command[2:])  # the command it gave
    assert (run / "last.pth").is_file()


def test_a_full_disk_keeps_the_saved_epoch_and_says_how_to_continue(toy_root, tmp_path, monkeypatch, capsys):
    import errno
    import re
    import shlex
    run = tmp_path / "full"
    args = _args(toy_root, run, "--num_epoch", "2")
    real_fsync = os.fsync

    def disk_full_after_epoch_one(fd):
        if (run / "last.pth").exists():
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)
    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", disk_full_after_epoch_one)
        line = _refused(args, capsys)
    match = re.fullmatch(rf"error: cannot write {re.escape(str(run))}/(\w+\.\w+) \(No space left on device; \d+ MB free "
                         r"there\); the previous \1, if any, is unchanged; last.pth holds epoch 1; make room, then "
                         r"continue with: (.*)", line)
    assert match, line
    assert f"error: cannot write {run}" in (run / "train_log.txt").read_text()  # the log has it too
    assert torch.load(run / "last.pth", weights_only=False)["epoch"] == 1
    assert not list(run.glob(".*.tmp"))  # no partial file left
    command = shlex.split(match.group(2))
    train_entry.main(command[2:])  # the command it gave, once there is room
    assert json.loads((run / "results.json").read_text())["last"]["epoch"] == 2


def test_atomic_writes_name_a_failed_write_and_pass_on_other_errors(tmp_path):
    from utils.errors import WriteError
    from utils.iotools import _atomic_write
    (tmp_path / "f.pth").write_bytes(b"old")

    def zip_writer_failure(f):  # how torch.save reports a write that failed under its zip writer
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    with pytest.raises(WriteError, match=r"cannot write .*f\.pth \(\[enforce fail .*\d+ MB free there\); "
                                         r"the previous f\.pth, if any, is unchanged"):
        _atomic_write(tmp_path / "f.pth", zip_writer_failure)

    def bug(f):
        raise RuntimeError("a bug, not a write")
    with pytest.raises(RuntimeError, match="a bug"):
        _atomic_write(tmp_path / "f.pth", bug)
    assert [p.name for p in tmp_path.iterdir()] == ["f.pth"] and (tmp_path / "f.pth").read_bytes() == b"old"


CONFIG_CASES = {
    ("--lr", "-1"): "lr must be greater than 0, got -1.0",
    ("--lr", "0"): "lr must be greater than 0, got 0.0",
    ("--temperature", "0"): "temperature must be greater than 0, got 0.0",
    ("--log_period", "0"): "log_period must be at least 1, got 0",
    ("--eval_period", "0"): "eval_period must be at least 1, got 0",
    ("--num_epoch", "0"): "num_epoch must be at least 1, got 0",
    ("--batch_size", "0"): "batch_size must be at least 1, got 0",
    ("--num_workers", "-1"): "num_workers must be at least 0, got -1",
    ("--batch_size", "ten"): "argument --batch_size: invalid int value: 'ten'",
}


@pytest.mark.parametrize("flags", list(CONFIG_CASES))
def test_out_of_range_values_are_named_before_anything_runs(toy_root, tmp_path, capsys, flags):
    assert _refused(_args(toy_root, tmp_path / "run", *flags), capsys) == f"error: {CONFIG_CASES[flags]}"
    assert not (tmp_path / "run").exists()


def test_head_settings_are_range_checked_too(toy_root, tmp_path, capsys):
    assert _refused(_args(toy_root, tmp_path / "run", "--loss_names", "sdm+id", "--sdm_loss_weight", "-1"), capsys) \
        == "error: sdm_loss_weight must be at least 0.0, got -1.0"


def test_config_errors_are_config_errors():
    with pytest.raises(ConfigError, match="unknown flag --epochs; did you mean --num_epoch"):
        train_entry.main(["--epochs", "3"])


# ---------------------------------------------------------------- bad data, caught before any epoch
def _edit(entries: list, case: str):
    if case == "captions a string":
        entries[1]["captions"] = "a man in a red coat"
    elif case == "no captions":
        entries[1]["captions"] = []
    elif case == "null caption":
        entries[1]["captions"][0] = None
    elif case == "split spelled Train":
        entries[1]["split"] = "Train"
    elif case == "non-numeric id":
        entries[1]["id"] = "abc"
    elif case == "empty annotation":
        return []
    return entries


DATA_CASES = {
    "captions a string": "captions is a str, not a list of captions",
    "no captions": "no caption",
    "null caption": "caption 0 is None",
    "split spelled Train": "split 'Train' is not one of train, val, test",
    "non-numeric id": "id 'abc' is not an integer",
    "empty annotation": "holds no image records",
}


@pytest.fixture()
def broken_root(tmp_path) -> Path:
    from datasets.toy import generate_toy_dataset
    root = tmp_path / "data"
    generate_toy_dataset(root, num_train_ids=8, num_val_ids=2, num_test_ids=4, image_size=(48, 24))
    return root


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_malformed_annotations_are_named_before_training(broken_root, tmp_path, capsys, case):
    path = broken_root / "CUHK-PEDES" / "reid_raw.json"
    path.write_text(json.dumps(_edit(json.loads(path.read_text()), case)))
    line = _refused(_args(broken_root, tmp_path / "run"), capsys)
    assert line.startswith(f"error: {path}") and DATA_CASES[case] in line, line
    assert not (tmp_path / "run").exists()


def test_non_utf8_annotations_and_empty_or_unreadable_splits(broken_root, tmp_path, capsys):
    path = broken_root / "CUHK-PEDES" / "reid_raw.json"
    entries = json.loads(path.read_text())
    path.write_bytes(json.dumps(entries).encode("utf-8").replace(b"a ", "\u00e9 ".encode("latin-1"), 1))
    assert "is not UTF-8 text" in _refused(_args(broken_root, tmp_path / "run"), capsys)
    path.write_text(json.dumps([e for e in entries if e["split"] != "val"]))
    assert _refused(_args(broken_root, tmp_path / "run", "--val_dataset", "val"), capsys) == \
        "error: the val split of CUHK-PEDES is empty (0 images, 0 captions); carve one from training identities " \
        "with --val_ids_from_train N, or select on the test split with " \
        "--val_dataset test"
    path.write_text(json.dumps(entries))
    first_test = next(e for e in entries if e["split"] == "test")["file_path"]
    (broken_root / "CUHK-PEDES" / "imgs" / first_test).write_bytes(b"")
    line = _refused(_args(broken_root, tmp_path / "run"), capsys)
    assert line == (f"error: 1 unreadable test image(s), e.g. {broken_root / 'CUHK-PEDES' / 'imgs' / first_test} "
                    "(pass --skip_bad_images to leave them out of the evaluation)")
    assert not (tmp_path / "run").exists()
    train_entry.main(_args(broken_root, tmp_path / "run", "--num_epoch", "1", "--skip_bad_images"))
    assert (tmp_path / "run" / "best.pth").is_file()


def test_test_py_names_a_config_that_is_not_a_run(finished_run, tmp_path, capsys):
    import test as test_entry
    assert run_cli(test_entry.main, ["--config_file", str(REPO / "configs/demo.yaml")]) == 1
    assert capsys.readouterr().err.strip() == (f"error: {REPO / 'configs/demo.yaml'} is not the configs.yaml of a "
                                               "trained run (train.py writes num_classes and clip into it); give "
                                               "RUN_DIR/configs.yaml, or --zero_shot")
    copy = tmp_path / "no_best"
    copy.mkdir()
    (copy / "configs.yaml").write_bytes((finished_run / "configs.yaml").read_bytes())
    assert run_cli(test_entry.main, ["--config_file", str(copy / "configs.yaml")]) == 1
    assert "no best.pth beside" in capsys.readouterr().err


def test_test_py_takes_a_run_directory_and_checks_its_counts(finished_run, tmp_path, capsys):
    import test as test_entry
    out = [("--output_dir", str(tmp_path / name)) for name in ("by_file", "by_dir")]
    by_file = test_entry.main(["--config_file", str(finished_run / "configs.yaml"), *out[0]])
    by_dir = test_entry.main(["--config_file", str(finished_run), *out[1]])
    assert by_dir == by_file and by_dir["checkpoint"] == str(finished_run / "best.pth")
    before = _hashes(finished_run)
    for value, reason in (("0", "must be at least 1, got 0"), ("-2", "must be at least 1, got -2"),
                          ("x", "expects a whole number, got 'x'")):
        assert run_cli(test_entry.main, ["--config_file", str(finished_run), "--visualize", value]) == 1
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: argument --visualize: {reason}"
    assert _hashes(finished_run) == before


def test_unreadable_training_images_are_counted_before_training(broken_root, tmp_path, capsys):
    entries = json.loads((broken_root / "CUHK-PEDES" / "reid_raw.json").read_text())
    train = [broken_root / "CUHK-PEDES" / "imgs" / e["file_path"] for e in entries if e["split"] == "train"]
    train[0].write_bytes(b"")
    line = _refused(_args(broken_root, tmp_path / "run"), capsys)
    assert line == (f"error: 1 of {len(train)} training images ({1 / len(train):.1%}) cannot be read, e.g. {train[0]}; "
                    "at most max_unreadable_train 0.01 is tolerated")
    assert not (tmp_path / "run").exists()
    for path in train:
        path.write_bytes(b"not an image")
    assert _refused(_args(broken_root, tmp_path / "run", "--max_unreadable_train", "1"), capsys) == \
        f"error: none of the {len(train)} training images of CUHK-PEDES can be read, e.g. {train[0]}"
    assert not (tmp_path / "run").exists()


def test_a_tolerated_share_of_unreadable_training_images_trains(broken_root, tmp_path, caplog):
    entries = json.loads((broken_root / "CUHK-PEDES" / "reid_raw.json").read_text())
    first = next(e for e in entries if e["split"] == "train")["file_path"]
    (broken_root / "CUHK-PEDES" / "imgs" / first).write_bytes(b"")
    train_entry.main(_args(broken_root, tmp_path / "run", "--num_epoch", "1", "--max_unreadable_train", "0.5"))
    assert "1 unreadable training image(s)" in caplog.text
    assert (tmp_path / "run" / "best.pth").is_file()


def test_an_image_cache_that_cannot_be_written_is_named(toy_root, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    line = _refused(_args(toy_root, tmp_path / "run", "--image_cache", "--cache_dir", str(blocker / "cache")), capsys)
    assert line.startswith(f"error: cannot write the image cache {blocker / 'cache'}/") and \
        line.endswith("give --cache_dir a writable folder"), line
    assert not (tmp_path / "run").exists()


def test_long_captions_are_counted(toy_root, tmp_path, caplog):
    from datasets import build_dataset
    from datasets.checks import long_captions, report_long_captions
    from utils.simple_tokenizer import SimpleTokenizer
    tokenizer = SimpleTokenizer()
    captions = ["a man", "a man in a red coat with a black bag and blue jeans walking"]
    assert long_captions(captions, tokenizer, 77) == []
    assert long_captions(captions, tokenizer, 5) == [1]  # SOT a man EOT = 4 tokens
    assert long_captions(captions, tokenizer, 4) == [1]
    assert long_captions(captions, tokenizer, 3) == [0, 1]
    dataset = build_dataset("CUHK-PEDES", toy_root)
    counts = report_long_captions(dataset, ["train", "test"], tokenizer, 8)
    expected = sum(len(tokenizer.encode(c)) > 6 for *_, c in dataset.train)
    assert counts["train"] == expected > 0
    assert f"{expected} of {len(dataset.train)} train captions are longer than text_length 8" in caplog.text


def test_visualize_with_skipped_images_draws_the_ranked_gallery(finished_run, toy_root, tmp_path, monkeypatch):
    import shutil

    import test as test_entry
    from datasets import build_dataset
    root = tmp_path / "data"
    shutil.copytree(toy_root, root)
    test_split = build_dataset("CUHK-PEDES", root).test
    bad = test_split.img_paths[1]
    Path(bad).write_bytes(b"")
    drawn = []
    monkeypatch.setattr(test_entry, "retrieval_grid", lambda *a: drawn.append(a) or type("P", (), {"save": print})())
    results = test_entry.main(["--config_file", str(finished_run / "configs.yaml"), "--root_dir", str(root),
                               "--output_dir", str(tmp_path / "eval"), "--skip_bad_images", "--visualize", "4"])
    captions, query_pids, paths, pids, _ = drawn[0]
    pid_of = dict(zip(test_split.img_paths, test_split.image_pids))
    assert len(paths) == 4 and all(len(row) == 10 for row in paths)
    for row, row_pids in zip(paths, pids):
        assert bad not in row and [pid_of[p] for p in row] == row_pids  # thumbnail and its identity agree
    assert results["skipped_images"] == [bad] and results["gallery"]["t2i"] == len(test_split.img_paths) - 1
    assert json.loads((tmp_path / "eval" / "test_results.json").read_text()) == results
