"""Checks of a dataset's files that run once, before any training: unreadable images (evaluation
gallery and training split), captions longer than the text encoder's context; and the full
report of ``tools/check_dataset.py`` (``inspect_dataset``), which runs every check without stopping
at the first problem. Each problem is one line naming the file."""
from __future__ import annotations

import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from utils.simple_tokenizer import SimpleTokenizer

from .bases import MAX_LISTED, SPLITS, BaseDataset, DatasetError, annotation_problems

logger = logging.getLogger(__name__)


def _unreadable(path: str) -> bool:
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return True
    return False


def unreadable_images(paths: list[str]) -> list[str]:
    """The paths PIL cannot open and verify (missing, empty, not an image, damaged header), in order.
    Threads overlap the file system's latency (a cold disk or a network mount)."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        flags = list(pool.map(_unreadable, paths, chunksize=256))
    return [path for path, bad in zip(paths, flags) if bad]


def check_gallery(dataset: BaseDataset, split: str, skip_bad_images: bool) -> list[str]:
    """Every image of the evaluation split can be read, or, with ``skip_bad_images``, the unreadable
    ones (returned) will be left out."""
    bad = unreadable_images(getattr(dataset, split).img_paths)
    if bad and not skip_bad_images:
        raise DatasetError(f"{len(bad)} unreadable {split} image(s), e.g. {bad[0]} (pass --skip_bad_images to "
                           "leave them out of the evaluation)")
    if bad:
        logger.warning("%d unreadable %s images will be left out of the evaluation: %s", len(bad), split,
                       ", ".join(bad[:MAX_LISTED]))
    return bad


def check_training_images(dataset: BaseDataset, max_share: float) -> list[str]:
    """The unreadable training images (their samples are replaced by readable ones of the same
    identity); more than ``max_share`` of the split, or all of it, is an error."""
    paths = dataset.train_image_paths()
    bad = unreadable_images(paths)
    if bad and len(bad) == len(paths):
        raise DatasetError(f"none of the {len(paths)} training images of {dataset.name} can be read, "
                           f"e.g. {bad[0]}")
    if len(bad) > max_share * len(paths):
        raise DatasetError(f"{len(bad)} of {len(paths)} training images ({len(bad) / len(paths):.1%}) cannot be "
                           f"read, e.g. {bad[0]}; at most max_unreadable_train {max_share:g} is tolerated")
    if bad:
        logger.warning("%d unreadable training image(s) (their samples will be replaced by others of the same "
                       "identity): %s", len(bad), ", ".join(bad[:MAX_LISTED]))
    return bad


def long_captions(captions: list[str], tokenizer: SimpleTokenizer, text_length: int) -> list[int]:
    """Positions of the captions whose tokens (SOT and EOT included) exceed ``text_length``: they
    are truncated (EOT kept last)."""
    return [i for i, caption in enumerate(captions) if len(tokenizer.encode(caption)) + 2 > text_length]


def report_long_captions(dataset: BaseDataset, splits: list[str], tokenizer: SimpleTokenizer,
                         text_length: int) -> dict[str, int]:
    """Log how many captions of each split will be truncated; returns the counts."""
    counts = {}
    for split in splits:
        captions = [r[3] for r in dataset.train] if split == "train" else getattr(dataset, split).captions
        counts[split] = len(long_captions(captions, tokenizer, text_length))
        if counts[split]:
            logger.warning("%d of %d %s captions are longer than text_length %d tokens and will be truncated",
                           counts[split], len(captions), split, text_length)
    return counts


@dataclass
class DatasetReport:
    """What ``inspect_dataset`` found: per-split counts, errors (the dataset cannot be used as it
    is) and warnings (it can, but something looks wrong)."""
    counts: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # split -> (ids, images, captions)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def inspect_dataset(name: str, root_dir: str, annotation_format: str = "raw", text_length: int = 77
                    ) -> DatasetReport:
    """Every check of a dataset's files, without stopping at the first problem: the annotation
    records, missing and unreadable images, empty and duplicate captions, identities shared between
    splits, captions longer than ``text_length`` tokens, and the split sizes against the published
    ones."""
    from .bases import DATASETS
    layout = DATASETS[name](root_dir, annotation_format, parse=False)
    report = DatasetReport()
    try:
        entries = layout.read_annotations()
    except DatasetError as err:
        report.errors.append(str(err))
        return report
    report.errors += annotation_problems(entries, layout.path_field)
    records = [e for e in entries if isinstance(e, dict) and e.get("split") in SPLITS]
    if not report.errors and not layout.renumber_train_ids:
        problem = layout.train_id_problem([int(e["id"]) for e in records if e["split"] == "train"])
        report.errors += [problem] if problem else []
    ids = {split: {str(e.get("id")) for e in records if e["split"] == split} for split in SPLITS}
    for split in SPLITS:
        chosen = [e for e in records if e["split"] == split]
        captions = sum(len(e["captions"]) for e in chosen if isinstance(e.get("captions"), list))
        report.counts[split] = (len(ids[split]), len(chosen), captions)
    _check_images(layout, records, report)
    _check_captions(records, report, text_length)
    for a, b in (("train", "test"), ("train", "val"), ("val", "test")):
        shared = sorted(ids[a] & ids[b])
        if shared:
            report.warnings.append(f"{len(shared)} identities are in both {a} and {b}, e.g. {shared[0]}")
    for split, published in layout.published_counts.items():
        if report.counts[split] != published:
            report.warnings.append(f"{split}: {report.counts[split]} (ids, images, captions) differ from the "
                                   f"published {published}")
    return report


def _check_images(layout, records: list[dict], report: DatasetReport) -> None:
    paths = [str(layout.img_dir / e[layout.path_field]) for e in records if isinstance(e.get(layout.path_field), str)]
    seen: set[str] = set()
    for path in paths:
        if path in seen:
            report.warnings.append(f"image {path} has more than one record")
        seen.add(path)
    present = []
    for path in sorted(seen):
        if Path(path).is_file():
            present.append(path)
        else:
            report.errors.append(f"{'image path is not a file:' if Path(path).exists() else 'missing image'} {path}")
    report.errors += [f"unreadable image {p}" for p in unreadable_images(present)]


def _check_captions(records: list[dict], report: DatasetReport, text_length: int) -> None:
    tokenizer = SimpleTokenizer()
    owners: dict[str, set[str]] = defaultdict(set)
    texts = []
    for entry in records:
        captions = entry.get("captions")
        if not isinstance(captions, list):
            continue
        strings = [c for c in captions if isinstance(c, str)]
        repeated = {c for c in strings if strings.count(c) > 1 and c.strip()}
        report.warnings += [f"{entry.get('split')} image {entry.get('file_path', entry.get('img_path'))}: caption "
                            f"{c[:60]!r} given twice" for c in sorted(repeated)]
        for caption in strings:
            owners[" ".join(caption.lower().split())].add(str(entry.get("id")))
        texts += [c for c in strings if c.strip()]
    shared = sum(len(ids) > 1 for text, ids in owners.items() if text)
    if shared:
        report.warnings.append(f"{shared} caption texts describe more than one identity")
    long = len(long_captions(texts, tokenizer, text_length))
    if long:
        report.warnings.append(f"{long} of {len(texts)} captions are longer than {text_length} tokens "
                               "(truncated in training and evaluation)")
