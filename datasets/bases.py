"""Annotation parsing shared by the benchmark datasets, and the dataset registry.

A dataset parses its JSON into one record format: ``train`` is a list of
``(pid, image_id, img_path, caption)`` tuples, one per caption, with 0-based contiguous pids;
``val``/``test`` are ``EvalSplit``s (images = gallery, captions = queries, raw pids).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from prettytable import PrettyTable

from utils.errors import ConfigError, UserError

logger = logging.getLogger(__name__)

DATASETS: dict[str, type["BaseDataset"]] = {}


class DatasetError(UserError, ValueError):
    """Missing or malformed dataset files (a user mistake)."""


SPLITS = ("train", "val", "test")
MAX_LISTED = 20  # problems printed one per line before the summary


def annotation_problems(entries: list, path_field: str) -> list[str]:
    """One line per malformed image record: a non-mapping, a missing key, a split other than
    train/val/test, ``captions`` that is not a non-empty list of non-empty strings, an id that is
    not an integer, a path that is not a string."""
    problems = []
    for i, entry in enumerate(entries):
        where = f"entry {i}"
        if not isinstance(entry, dict):
            problems.append(f"{where} is a {type(entry).__name__}, not a record")
            continue
        missing = [k for k in ("split", "captions", path_field, "id") if k not in entry]
        if missing:
            problems.append(f"{where} lacks key(s) {', '.join(missing)}")
            continue
        if isinstance(entry[path_field], str):
            where += f" ({entry[path_field]})"
        else:
            problems.append(f"{where}: {path_field} is {entry[path_field]!r}, not a path")
        if entry["split"] not in SPLITS:
            problems.append(f"{where}: split {entry['split']!r} is not one of {', '.join(SPLITS)}")
        captions = entry["captions"]
        if not isinstance(captions, list):
            problems.append(f"{where}: captions is a {type(captions).__name__}, not a list of captions")
        elif not captions:
            problems.append(f"{where}: no caption")
        else:
            problems += [f"{where}: caption {j} is {c!r}" for j, c in enumerate(captions)
                         if not isinstance(c, str) or not c.strip()]
        pid = entry["id"]
        if isinstance(pid, bool) or not (isinstance(pid, int) or (isinstance(pid, str) and pid.strip().isdigit())):
            problems.append(f"{where}: id {pid!r} is not an integer")
    return problems


def register_dataset(cls):
    DATASETS[cls.name] = cls
    return cls


def build_dataset(name: str, root_dir: str | Path) -> "BaseDataset":
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset_name '{name}'; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](root_dir)


@dataclass
class EvalSplit:
    image_pids: list[int] = field(default_factory=list)
    img_paths: list[str] = field(default_factory=list)
    caption_pids: list[int] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)


class BaseDataset:
    """``<root>/<folder>/<annotation file>`` plus images under ``<root>/<folder>/imgs/``."""
    name: str
    folder: str
    annotation_files: tuple[str, ...]
    path_field: str = "file_path"
    one_based_train_ids: bool = False

    def __init__(self, root_dir: str | Path):
        self.dataset_dir = Path(root_dir) / self.folder
        self.img_dir = self.dataset_dir / "imgs"
        annotations = self._read_annotations()
        by_split: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
        for entry in annotations:
            by_split[entry["split"]].append(entry)
        self.train = self._train_records(by_split["train"])
        self.val = self._eval_split(by_split["val"])
        self.test = self._eval_split(by_split["test"])
        self.num_classes = len({pid for pid, *_ in self.train})
        logger.info("%s statistics:\n%s", self.name, self.statistics_table())

    def _read_annotations(self) -> list[dict]:
        if not self.dataset_dir.is_dir():
            raise DatasetError(f"{self.name} not found: no folder {self.dataset_dir}")
        candidates = [self.dataset_dir / f for f in self.annotation_files]
        path = next((p for p in candidates if p.is_file()), None)
        self.annotation_file = path
        if path is None:
            raise DatasetError(f"{self.name} annotation file not found: {' or '.join(map(str, candidates))}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise DatasetError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason})") from None
        except json.JSONDecodeError as err:
            raise DatasetError(f"malformed JSON in {path}: {err.msg} at line {err.lineno} column {err.colno}") from None
        if not isinstance(data, list):
            raise DatasetError(f"{path} must hold a list of image records")
        if not data:
            raise DatasetError(f"{path} holds no image records")
        problems = annotation_problems(data, self.path_field)
        if problems:
            for problem in problems[:MAX_LISTED]:
                logger.error("%s: %s", path.name, problem)
            more = f" ({len(problems) - 1} more above)" if len(problems) > 1 else ""
            raise DatasetError(f"{path}: {len(problems)} malformed entr{'y' if len(problems) == 1 else 'ies'}; "
                               f"first: {problems[0]}{more}")
        return data

    def train_image_paths(self) -> list[str]:
        """Training images in ``image_id`` order."""
        paths: dict[int, str] = {}
        for _, image_id, path, _ in self.train:
            paths.setdefault(image_id, path)
        return [paths[i] for i in range(len(paths))]

    def _train_records(self, entries: list[dict]) -> list[tuple[int, int, str, str]]:
        records = []
        for image_id, entry in enumerate(entries):
            pid = int(entry["id"]) - int(self.one_based_train_ids)
            path = str(self.img_dir / entry[self.path_field])
            records.extend((pid, image_id, path, caption) for caption in entry["captions"])
        pids = sorted({r[0] for r in records})
        if pids != list(range(len(pids))):
            raise DatasetError(f"{self.name} train ids are not contiguous from "
                               f"{int(self.one_based_train_ids)}")
        return records

    def _eval_split(self, entries: list[dict]) -> EvalSplit:
        split = EvalSplit()
        for entry in entries:
            pid = int(entry["id"])
            split.image_pids.append(pid)
            split.img_paths.append(str(self.img_dir / entry[self.path_field]))
            split.caption_pids.extend(pid for _ in entry["captions"])
            split.captions.extend(entry["captions"])
        return split

    def statistics_table(self) -> PrettyTable:
        table = PrettyTable(["subset", "ids", "images", "captions"])
        table.add_row(["train", self.num_classes, len({r[1] for r in self.train}), len(self.train)])
        for name, split in (("val", self.val), ("test", self.test)):
            table.add_row([name, len(set(split.image_pids)), len(split.img_paths), len(split.captions)])
        return table


@register_dataset
class CUHKPEDES(BaseDataset):
    name = folder = "CUHK-PEDES"
    annotation_files = ("reid_raw.json",)
    one_based_train_ids = True


@register_dataset
class ICFGPEDES(BaseDataset):
    name = folder = "ICFG-PEDES"
    annotation_files = ("ICFG-PEDES.json", "ICFG_PEDES.json")  # code vs README spelling


@register_dataset
class RSTPReid(BaseDataset):
    name = folder = "RSTPReid"
    annotation_files = ("data_captions.json",)
    path_field = "img_path"
