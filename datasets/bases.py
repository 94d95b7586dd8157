"""Annotation parsing shared by the benchmark datasets, and the dataset registry.

A dataset parses its JSON into one record format: ``train`` is a list of
``(pid, image_id, img_path, caption)`` tuples, one per caption, with 0-based contiguous pids;
``val``/``test`` are ``EvalSplit``s (images = gallery, captions = queries, raw pids);
``back_translations`` holds, per training record, the annotation's ``captions_bt`` entry for that
caption ('' where it has none). Two on-disk formats: ``raw`` (each benchmark's published file, a
``split`` per record) and ``tbps`` (TBPS-CLIP's ``train_reid.json`` + ``test_reid.json``).
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from prettytable import PrettyTable

from utils.errors import ConfigError, UserError

logger = logging.getLogger(__name__)

DATASETS: dict[str, type["BaseDataset"]] = {}


class DatasetError(UserError, ValueError):
    """Missing or malformed dataset files (a user mistake)."""


SPLITS = ("train", "val", "test")
FORMATS = ("raw", "tbps")
TBPS_FILES = {"train": "train_reid.json", "test": "test_reid.json"}  # TBPS-CLIP: the split is the file
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
        translations = entry.get("captions_bt", [])
        if not isinstance(translations, list) or not all(isinstance(t, str) for t in translations):
            problems.append(f"{where}: captions_bt is {translations!r}, not a list of strings")
    return problems


def register_dataset(cls):
    DATASETS[cls.name] = cls
    return cls


def build_dataset(name: str, root_dir: str | Path, annotation_format: str = "raw") -> "BaseDataset":
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset_name '{name}'; known: {', '.join(sorted(DATASETS))}")
    if annotation_format not in FORMATS:
        raise ConfigError(f"annotation_format '{annotation_format}'; valid: {', '.join(FORMATS)}")
    return DATASETS[name](root_dir, annotation_format)


@dataclass
class EvalSplit:
    image_pids: list[int] = field(default_factory=list)
    img_paths: list[str] = field(default_factory=list)
    caption_pids: list[int] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)


class BaseDataset:
    """``<root>/<folder>/<annotation file>`` plus images under ``<root>/<folder>/<image_folder>/``."""
    name: str
    folder: str
    annotation_files: tuple[str, ...]
    path_field: str = "file_path"
    image_folder: str = "imgs"
    one_based_train_ids: bool = False
    renumber_train_ids: bool = False  # training ids by first appearance (no contiguity assumed)
    published_counts: dict[str, tuple[int, int, int]] = {}  # split -> (ids, images, captions), the paper's

    def __init__(self, root_dir: str | Path, annotation_format: str = "raw", parse: bool = True):
        """``parse=False`` only locates the files (for ``tools/check_dataset.py``)."""
        self.dataset_dir = Path(root_dir) / self.folder
        self.img_dir = self.dataset_dir / self.image_folder
        self.annotation_format = annotation_format
        if annotation_format == "tbps":  # TBPS-CLIP's files: file_path everywhere, ids by first appearance
            self.path_field, self.renumber_train_ids = "file_path", True
        if parse:
            self._parse()

    def _parse(self) -> None:
        annotations = self.read_annotations()
        problems = annotation_problems(annotations, self.path_field)
        if problems:
            for problem in problems[:MAX_LISTED]:
                logger.error("%s: %s", self.annotation_file.name, problem)
            more = f" ({len(problems) - 1} more above)" if len(problems) > 1 else ""
            raise DatasetError(f"{self.annotation_file}: {len(problems)} malformed entr"
                               f"{'y' if len(problems) == 1 else 'ies'}; first: {problems[0]}{more}")
        by_split: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
        for entry in annotations:
            by_split[entry["split"]].append(entry)
        self._train_entries = by_split["train"]
        self.val_from_train: list[int] = []  # the training ids moved into val (carve_val)
        self.train = self._train_records(by_split["train"], renumber=self.renumber_train_ids)
        self.back_translations = self._back_translations(by_split["train"])
        self.val = self._eval_split(by_split["val"])
        self.test = self._eval_split(by_split["test"])
        self.num_classes = len({pid for pid, *_ in self.train})
        logger.info("%s statistics:\n%s", self.name, self.statistics_table())

    def read_annotations(self) -> list[dict]:
        """Every image record of the annotation file(s) as parsed JSON (a ``split`` per record; the
        ``tbps`` format's come from the file names). Unreadable files are a DatasetError; the records
        themselves are not checked here (``annotation_problems``)."""
        if not self.dataset_dir.is_dir():
            raise DatasetError(f"{self.name} not found: no folder {self.dataset_dir}")
        if self.annotation_format == "tbps":
            entries = []
            for split, name in TBPS_FILES.items():
                records = self._read_json(self.dataset_dir / name)
                entries += [{**r, "split": split} if isinstance(r, dict) else r for r in records]
            self.annotation_file = self.dataset_dir / TBPS_FILES["train"]
            return entries
        candidates = [self.dataset_dir / f for f in self.annotation_files]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise DatasetError(f"{self.name} annotation file not found: {' or '.join(map(str, candidates))}")
        self.annotation_file = path
        return self._read_json(path)

    @staticmethod
    def _read_json(path: Path) -> list:
        if not path.is_file():
            raise DatasetError(f"annotation file not found: {path}")
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
        return data

    def train_ids(self) -> list[int]:
        """The identities of the training split as the annotation writes them, sorted."""
        return sorted({int(e["id"]) for e in self._train_entries})

    def carve_val(self, ids: list[int]) -> None:
        """Move the training identities ``ids`` (annotation ids) into the val split, for datasets
        without one (ICFG-PEDES): their images and captions become the val gallery and queries, the
        remaining training ids are renumbered 0..n-1."""
        if self.val.img_paths:
            raise DatasetError(f"{self.name} has its own val split; val_ids_from_train is for datasets without one")
        chosen = set(ids)
        unknown = sorted(chosen - set(self.train_ids()))
        if unknown:
            raise DatasetError(f"val ids {unknown[:5]} are not training ids of {self.name}")
        keep = [e for e in self._train_entries if int(e["id"]) not in chosen]
        if not keep:
            raise DatasetError(f"carving {len(chosen)} val ids leaves no training identity in {self.name}")
        self.val = self._eval_split([e for e in self._train_entries if int(e["id"]) in chosen])
        self.train = self._train_records(keep, renumber=True)
        self.back_translations = self._back_translations(keep)
        self.num_classes = len({pid for pid, *_ in self.train})
        self.val_from_train = sorted(chosen)
        logger.info("%d training identities carved into val; statistics now:\n%s", len(chosen),
                    self.statistics_table())

    def train_image_paths(self) -> list[str]:
        """Training images in ``image_id`` order."""
        paths: dict[int, str] = {}
        for _, image_id, path, _ in self.train:
            paths.setdefault(image_id, path)
        return [paths[i] for i in range(len(paths))]

    def train_id_problem(self, ids: list[int]) -> str | None:
        """Why the annotation's training ids cannot be ID-loss classes as they are (None: they can):
        they must run from 0 (1 where the dataset numbers from 1) without gaps."""
        first = int(self.one_based_train_ids)
        unique = set(ids)
        present = sorted(unique)
        if present == list(range(first, first + len(present))):
            return None
        culprit = (f"id {present[0]} is below {first}" if present[0] < first else
                   f"id {next(i for i in range(first, first + len(present)) if i not in unique)} is absent")
        return (f"train ids must run from {first} without gaps (one ID-loss class each): {len(present)} distinct "
                f"ids from {present[0]} to {present[-1]}, {culprit}")

    def _train_records(self, entries: list[dict], renumber: bool = False) -> list[tuple[int, int, str, str]]:
        """One record per caption; pids are the annotation's (minus one where they start at 1), or
        with ``renumber`` 0, 1, ... in order of first appearance (TBPS-CLIP's rule)."""
        rank: dict[int, int] = {}
        for entry in entries:
            rank.setdefault(int(entry["id"]), len(rank))
        records = []
        for image_id, entry in enumerate(entries):
            pid = rank[int(entry["id"])] if renumber else int(entry["id"]) - int(self.one_based_train_ids)
            path = str(self.img_dir / entry[self.path_field])
            records.extend((pid, image_id, path, caption) for caption in entry["captions"])
        problem = None if renumber else self.train_id_problem([int(e["id"]) for e in entries])
        if problem:
            raise DatasetError(f"{self.name} {problem}")
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

    def _back_translations(self, entries: list[dict]) -> list[str]:
        """Per training record (caption), its ``captions_bt`` entry by position, '' where missing."""
        out, short = [], 0
        for entry in entries:
            translations = entry.get("captions_bt", [])
            short += bool(translations) and len(translations) != len(entry["captions"])
            out += [translations[i] if i < len(translations) else "" for i in range(len(entry["captions"]))]
        if short:
            logger.warning("%d training records of %s have a captions_bt list whose length differs from captions",
                           short, self.name)
        return out

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
    published_counts = {"train": (11003, 34054, 68126), "val": (1000, 3078, 6158), "test": (1000, 3074, 6156)}


@register_dataset
class ICFGPEDES(BaseDataset):
    name = folder = "ICFG-PEDES"
    annotation_files = ("ICFG-PEDES.json", "ICFG_PEDES.json")  # code vs README spelling
    published_counts = {"train": (3102, 34674, 34674), "val": (0, 0, 0), "test": (1000, 19848, 19848)}


@register_dataset
class RSTPReid(BaseDataset):
    name = folder = "RSTPReid"
    annotation_files = ("data_captions.json",)
    path_field = "img_path"
    published_counts = {"train": (3701, 18505, 37010), "val": (200, 1000, 2000), "test": (200, 1000, 2000)}


@register_dataset
class UFine6926(BaseDataset):
    """UFineBench (Zuo et al., CVPR 2024): records as CUHK-PEDES's (split, id, file_path, captions),
    paths such as ``images/1.jpg`` relative to the dataset folder; 6,926 ids, 26,206 images and
    52,412 captions in all (no per-split counts published)."""
    name = folder = "UFine6926"
    annotation_files = ("ufine6926.json", "UFine6926.json", "annotations.json")
    image_folder = ""
    renumber_train_ids = True


def choose_val_ids(dataset: BaseDataset, count: int, seed: int) -> list[int]:
    """``count`` training identities drawn with ``seed`` (independent of the training seed, so every
    seed of a multi-seed study selects on the same identities), sorted."""
    ids = dataset.train_ids()
    if count >= len(ids):
        raise DatasetError(f"val_ids_from_train {count} must be fewer than the {len(ids)} training ids of "
                           f"{dataset.name}")
    return sorted(random.Random(seed).sample(ids, count))
