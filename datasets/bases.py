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
            split = entry["split"] if entry["split"] in ("train", "test") else "val"
            by_split[split].append(entry)
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
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise DatasetError(f"malformed JSON in {path}: {err.msg} at line {err.lineno} column {err.colno}") from None
        if not isinstance(data, list):
            raise DatasetError(f"{path} must hold a list of image records")
        required = ("split", "captions", self.path_field, "id")
        for i, entry in enumerate(data):
            missing = [k for k in required if not isinstance(entry, dict) or k not in entry]
            if missing:
                raise DatasetError(f"{path}: entry {i} lacks key(s) {', '.join(missing)}")
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
