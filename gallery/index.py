"""A search index: the first-stage features of every image under a folder, made by one trained run.

The file (one ``torch.save``, written atomically) holds the folder, the run that made it (its
config, the SHA-256 of its ``best.pth`` and its retrieval definition), the indexed files with their
size and modification time, their features (the run's combined first-stage features: each
feature set L2-normalised and scaled by sqrt(weight), so a dot product is the evaluation's score),
the re-ranking head's gallery cache when the run re-ranks, and the files that could not be read.

``update_index`` is incremental and resumable: files whose path, size and mtime are unchanged keep
their row; new and changed files are embedded; rows of removed files are dropped; an interrupted
run leaves the rows embedded so far in the file (saved every ``save_every`` seconds), and the next
run continues from them.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets.build import ImageDataset, collate_images
from datasets.transforms import transforms_from_config
from model.retrieval import normalise
from model.run import TrainedRun
from utils.errors import UserError
from utils.iotools import read_torch_file, save_checkpoint

from .files import ImageFile, scan_images

logger = logging.getLogger(__name__)

FORMAT = "tbps-search-index/1"
AMP_DTYPES = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class SearchIndexError(UserError):
    """An index file that cannot be read, or that another run or folder made."""


@dataclass(frozen=True)
class RunIdentity:
    """What the features depend on: the weights and the retrieval definition."""
    checkpoint_sha256: str
    feature_weights: dict[str, float]
    reranker: str
    img_size: tuple[int, int]
    config_file: str = field(compare=False)
    name: str = field(compare=False)

    @classmethod
    def of(cls, run: TrainedRun) -> "RunIdentity":
        retrieval = run.model.retrieval
        reranker = retrieval.reranker.name if retrieval.reranker is not None else ""
        return cls(run.checkpoint_sha256, dict(retrieval.weights), reranker, tuple(run.cfg.img_size),
                   str(run.config_file), run.cfg.name)

    def describe(self) -> str:
        return f"run '{self.name}' ({self.config_file}, checkpoint sha256 {self.checkpoint_sha256[:12]})"


@dataclass
class SearchIndex:
    root: Path
    run: RunIdentity
    files: list[ImageFile]
    features: torch.Tensor                      # [N, D] fp32, row i = files[i]
    cache: dict[str, torch.Tensor]              # re-ranking gallery cache, [N, ...] per key ({} without)
    unreadable: list[ImageFile]

    def __len__(self) -> int:
        return len(self.files)

    def path(self, row: int) -> Path:
        return self.root / self.files[row].path

    def check_made_by(self, run: TrainedRun) -> None:
        """Refuse an index whose features another model (or retrieval definition) made."""
        mine = RunIdentity.of(run)
        if mine != self.run:
            raise SearchIndexError(f"this index was made by {self.run.describe()}, not by {mine.describe()}; "
                              "its features do not fit this model (use that run, or index into a new file)")

    def save(self, path: Path) -> None:
        save_checkpoint({"format": FORMAT, "root": str(self.root), "run": asdict(self.run),
                         "files": [f.signature for f in self.files], "features": self.features,
                         "cache": self.cache, "unreadable": [f.signature for f in self.unreadable]}, path)

    @classmethod
    def load(cls, path: Path) -> "SearchIndex":
        data = read_torch_file(path, "index", SearchIndexError)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise SearchIndexError(f"{path} is not a search index made by search.py index")
        run = data["run"]
        run = RunIdentity(**{**run, "img_size": tuple(run["img_size"])})
        return cls(Path(data["root"]), run, [ImageFile(*f) for f in data["files"]], data["features"],
                   data["cache"], [ImageFile(*f) for f in data["unreadable"]])


@dataclass
class IndexReport:
    files: int            # images in the folder now
    kept: int             # rows reused (unchanged files)
    embedded: int         # images encoded by this run
    removed: int          # rows dropped (files gone or changed)
    unreadable: list[str]
    seconds: float        # encoding time (reading + model)

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0


class _Rows:
    """Features and caches of embedded files, appended batch by batch."""

    def __init__(self):
        self.files: list[ImageFile] = []
        self.features: list[torch.Tensor] = []
        self.cache: dict[str, list[torch.Tensor]] = {}

    @classmethod
    def kept(cls, index: SearchIndex | None, keep: list[int]) -> "_Rows":
        """The rows ``keep`` of an existing index."""
        rows = cls()
        if index is not None and keep:
            which = torch.tensor(keep, dtype=torch.long)
            rows.append([index.files[i] for i in keep], index.features[which],
                        {k: v[which] for k, v in index.cache.items()})
        return rows

    def append(self, files: list[ImageFile], features: torch.Tensor, cache: dict[str, torch.Tensor]) -> None:
        self.files += files
        self.features.append(features)
        for key, value in cache.items():
            self.cache.setdefault(key, []).append(value)

    def build(self, root: Path, run: RunIdentity, unreadable: list[ImageFile]) -> SearchIndex:
        """The index, rows sorted by path (the same file whatever order the rows were embedded in)."""
        order = sorted(range(len(self.files)), key=lambda i: self.files[i].path)
        rows = torch.tensor(order, dtype=torch.long)
        features = torch.cat(self.features)[rows] if self.features else torch.zeros(0, 0)
        cache = {k: torch.cat(v)[rows] for k, v in self.cache.items()}
        return SearchIndex(root, run, [self.files[i] for i in order], features, cache,
                           sorted(unreadable, key=lambda f: f.path))


@torch.no_grad()
def update_index(run: TrainedRun, images: Path, index_path: Path, device: torch.device, batch_size: int = 64,
                 num_workers: int = 2, amp: str = "off", save_every: float = 60.0) -> IndexReport:
    """Embed the new and changed images under ``images`` into ``index_path`` (created if missing)."""
    root, identity = images.resolve(), RunIdentity.of(run)
    files = scan_images(root)
    old = SearchIndex.load(index_path) if index_path.exists() else None
    if old is not None:
        old.check_made_by(run)
        if old.root != root:
            raise SearchIndexError(f"index {index_path} covers the folder {old.root}, not {root}; "
                              "index this folder into a new file")
    current = {f.signature for f in files}
    keep = [i for i, f in enumerate(old.files) if f.signature in current] if old else []
    unreadable = [f for f in old.unreadable if f.signature in current] if old else []  # retried once changed
    done = {old.files[i].signature for i in keep} | {f.signature for f in unreadable}
    todo = [f for f in files if f.signature not in done]
    rows = _Rows.kept(old, keep)
    removed = len(old.files) - len(keep) if old else 0
    logger.info("%d images under %s: %d indexed already, %d to embed, %d rows removed", len(files), root, len(keep),
                len(todo), removed)

    model, retrieval = run.model.to(device).eval(), run.model.retrieval
    dataset = ImageDataset([0] * len(todo), [str(root / f.path) for f in todo],
                           transforms_from_config(run.cfg, is_train=False), quiet=True)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_images)
    dtype = AMP_DTYPES[amp]
    bad: list[str] = []
    start = last_save = time.perf_counter()
    for indices, _, batch, failed in tqdm(loader, desc="indexing", unit="batch", leave=False):
        bad += failed
        if len(indices):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                features, cache = retrieval.encode_gallery(model.encoder, batch.to(device))
            rows.append([todo[i] for i in indices.tolist()], retrieval.combine(normalise(features)).float().cpu(),
                        {k: v.cpu() for k, v in cache.items()})
        if time.perf_counter() - last_save > save_every:  # what is embedded survives an interruption
            rows.build(root, identity, unreadable + _files_of(bad, root, todo)).save(index_path)
            last_save = time.perf_counter()
    seconds = time.perf_counter() - start
    unreadable += _files_of(bad, root, todo)
    rows.build(root, identity, unreadable).save(index_path)
    if bad:
        logger.warning("%d unreadable images skipped: %s", len(bad), ", ".join(sorted(bad)))
    return IndexReport(len(files), len(keep), len(todo) - len(bad), removed, sorted(bad), seconds)


def _files_of(paths: list[str], root: Path, todo: list[ImageFile]) -> list[ImageFile]:
    by_path = {str(root / f.path): f for f in todo}
    return [by_path[p] for p in paths]
