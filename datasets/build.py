"""Torch datasets, samplers and loaders for training and evaluation."""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from utils.comm import barrier, get_rank
from utils.errors import ConfigError
from utils.simple_tokenizer import SimpleTokenizer, tokenize

from .bases import BaseDataset, DatasetError
from .cache import DecodedImageCache
from .captions import CaptionAugmentation
from .fields import FieldBuilder, SampleSource, build_fields
from .noise import inject_noise
from .sampler import RandomIdentitySampler, RandomIdNumSampler
from .transforms import transforms_from_config

ImageFile.LOAD_TRUNCATED_IMAGES = True
logger = logging.getLogger(__name__)


def read_image(path: str, warn: bool = True) -> Image.Image | None:
    """The image as RGB, or None (with a warning naming it, unless ``warn`` is off) if it cannot be read."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        if warn:
            logger.warning("cannot read image %s: %s", path, err)
        return None


class ImageTextDataset(Dataset):
    """Training samples, one per caption: pids, image_ids, images, caption_ids, plus the batch
    fields of ``fields`` (``datasets/fields.py``) and ``replaced`` (1 if the sample stands in for
    one whose image could not be read).

    ``augment`` (UIT's pruning / corruption) turns the caption into ``caption_ids``; field builders
    start from those. A sample whose image cannot be read is replaced by the next readable sample
    of the same identity (of any identity if none is readable), so that every process always loads
    full batches: under DDP an unequal batch would break the contrastive heads' all-gather.
    """

    def __init__(self, records, transform, tokenizer: SimpleTokenizer, text_length: int = 77,
                 fields: list[FieldBuilder] | None = None, cache: DecodedImageCache | None = None,
                 augment: CaptionAugmentation | None = None, is_clean: list[bool] | None = None,
                 translations: dict[str, str] | None = None):
        self.records = records
        self.is_clean = is_clean or [True] * len(records)
        self.cache = cache  # indexed by image_id; ``transform`` then takes uint8 tensors
        self.transform = transform
        self.tokenizer = tokenizer
        self.text_length = text_length
        self.fields = fields or []
        self.augment = augment or CaptionAugmentation()
        self.translations = translations or {}  # caption -> its back-translation (follows noise injection)
        self.by_pid: dict[int, list[int]] = defaultdict(list)
        for index, record in enumerate(records):
            self.by_pid[record[0]].append(index)
        self.unreadable: set[int] = set()  # image ids found unreadable (in this process)

    def __len__(self) -> int:
        return len(self.records)

    def _image(self, image_id: int, path: str):
        if image_id in self.unreadable:
            return None
        image = read_image(path) if self.cache is None else self.cache[image_id]
        if image is None:
            self.unreadable.add(image_id)
        return image

    def _stand_ins(self, index: int):
        """Candidates after ``index``: the same identity's samples in cyclic order, then all samples."""
        same = self.by_pid[self.records[index][0]]
        start = same.index(index)
        yield from same[start + 1:] + same[:start]
        yield from range(index + 1, len(self.records))
        yield from range(index)

    def __getitem__(self, index: int) -> dict:
        pid, image_id, img_path, caption = self.records[index]
        image = self._image(image_id, img_path)
        used = index
        if image is None:
            for used in self._stand_ins(index):
                image = self._image(self.records[used][1], self.records[used][2])
                if image is not None:
                    break
            else:
                raise DatasetError("no training image can be read")
            logger.warning("training sample %d (image %s) replaced by sample %d (identity %d -> %d)",
                           index, img_path, used, pid, self.records[used][0])
            pid, image_id, img_path, caption = self.records[used]
        ids = self.augment(caption, self.tokenizer, self.text_length, translation=self.translations.get(caption, ""))
        sample = {"pids": pid, "image_ids": image_id, "images": self.transform(image), "caption_ids": ids,
                  "replaced": int(used != index)}
        source = SampleSource(used, pid, image_id, caption, image, self.transform, self.is_clean[used])
        for build in self.fields:
            build(sample, source)
        return sample


class ImageDataset(Dataset):
    """Gallery images: (index, pid, image tensor or None if unreadable, path)."""

    def __init__(self, pids: list[int], paths: list[str], transform, cache: DecodedImageCache | None = None,
                 quiet: bool = False):
        self.pids, self.paths, self.transform, self.cache, self.quiet = pids, paths, transform, cache, quiet

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = read_image(self.paths[index], warn=not self.quiet) if self.cache is None else self.cache[index]
        return index, self.pids[index], None if image is None else self.transform(image), self.paths[index]


class TextDataset(Dataset):
    """Query captions: (index, pid, token ids)."""

    def __init__(self, pids: list[int], captions: list[str], tokenizer: SimpleTokenizer, text_length: int = 77):
        self.pids, self.captions = pids, captions
        self.tokenizer, self.text_length = tokenizer, text_length

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int):
        return index, self.pids[index], tokenize(self.captions[index], self.tokenizer, self.text_length)


class ShardedBatchSampler(Sampler[list[int]]):
    """The batches of one sequential pass over ``length`` items, batch b going to process
    b % world_size: each process encodes whole batches exactly as a single process would."""

    def __init__(self, length: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.length, self.batch_size, self.rank, self.world_size = length, batch_size, rank, world_size

    def __iter__(self):
        for start in range(self.rank * self.batch_size, self.length, self.world_size * self.batch_size):
            yield list(range(start, min(start + self.batch_size, self.length)))

    def __len__(self) -> int:
        return len(range(self.rank * self.batch_size, self.length, self.world_size * self.batch_size))


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """List of sample dicts -> dict of stacked tensors (ints become a LongTensor)."""
    out = {}
    for key in samples[0]:
        values = [sample[key] for sample in samples]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else torch.tensor(values)
    return out


def collate_images(samples: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """(indices, pids, images) of the readable gallery images and the paths of the unreadable ones."""
    good = [(index, pid, image) for index, pid, image, _ in samples if image is not None]
    bad = [path for _, _, image, path in samples if image is None]
    indices = torch.tensor([index for index, _, _ in good], dtype=torch.long)
    pids = torch.tensor([pid for _, pid, _ in good], dtype=torch.long)
    images = torch.stack([image for _, _, image in good]) if good else torch.empty(0)
    return indices, pids, images, bad


def open_cache(cfg, dataset: BaseDataset, split: str, paths: list[str]) -> DecodedImageCache | None:
    """The split's decoded-image cache when ``cfg.image_cache`` (rank 0 builds it, the others wait)."""
    if not cfg.image_cache:
        return None
    height, width = cfg.img_size
    folder = Path(cfg.cache_dir) if cfg.cache_dir else dataset.dataset_dir / ".cache"
    cache_file = folder / f"{split}_{height}x{width}.u8"
    if get_rank() != 0:
        barrier()
    cache = DecodedImageCache(paths, (height, width), cache_file, dataset.annotation_file)
    if get_rank() == 0:
        barrier()
    return cache


def build_eval_loaders(cfg, dataset: BaseDataset, tokenizer: SimpleTokenizer, split: str = "test",
                       rank: int = 0, world_size: int = 1) -> tuple[DataLoader, DataLoader]:
    """(image loader, text loader) over a split: gallery images and query captions. Batches of
    ``test_batch_size`` in order; under DDP each process loads every ``world_size``-th batch."""
    data = getattr(dataset, split)
    if not data.img_paths or not data.captions:
        hint = "; carve one from training identities with --val_ids_from_train N, or select on the test split " \
            "with --val_dataset test" if split == "val" else ""
        raise DatasetError(f"the {split} split of {dataset.name} is empty ({len(data.img_paths)} images, "
                           f"{len(data.captions)} captions){hint}")
    cache = open_cache(cfg, dataset, split, data.img_paths)
    transform = transforms_from_config(cfg, is_train=False, tensors=cache is not None)
    images = ImageDataset(data.image_pids, data.img_paths, transform, cache)
    texts = TextDataset(data.caption_pids, data.captions, tokenizer, cfg.text_length)
    return tuple(DataLoader(items, batch_sampler=ShardedBatchSampler(len(items), cfg.test_batch_size, rank, world_size),
                            num_workers=cfg.num_workers, **extra)
                 for items, extra in ((images, {"collate_fn": collate_images}), (texts, {})))


def back_translations(dataset: BaseDataset, prob: float) -> dict[str, str]:
    """Each training caption's back-translation (annotation ``captions_bt``), when ``prob`` > 0; logs
    the share that has one (the others keep their caption when drawn). None at all is an error:
    that would silently be another recipe."""
    if prob == 0:
        return {}
    found = {caption: bt for (*_, caption), bt in zip(dataset.train, dataset.back_translations) if bt.strip()}
    if not found:
        raise ConfigError(f"back_translation_prob {prob} but no training caption of {dataset.name} has a "
                          "back-translation (the annotation's captions_bt); set it to 0 or use annotations with one")
    with_bt = sum(bool(bt.strip()) for bt in dataset.back_translations)
    logger.info("%d of %d training captions (%.1f%%) have a back-translation", with_bt, len(dataset.train),
                100 * with_bt / len(dataset.train))
    return found


def build_train_loader(cfg, dataset: BaseDataset, tokenizer: SimpleTokenizer, batch_fields: set[str],
                       generator: torch.Generator | None = None, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Loader of training samples with the batch fields the heads need (``batch_fields``; masked
    captions also when ``cfg.MLM``).

    ``cfg.batch_size`` is the global batch; each of ``world_size`` processes loads its share. In one
    process, shuffling and worker seeds come from ``generator``; the identity and distributed
    samplers draw from ``seed + epoch`` (``set_epoch``). Workers are not persistent, so an epoch
    depends only on RNG states at its start (exact resume)."""
    if cfg.batch_size % world_size:
        raise ConfigError(f"batch_size {cfg.batch_size} must be a multiple of the {world_size} processes")
    if not dataset.train:
        raise DatasetError(f"the train split of {dataset.name} is empty")
    fields = build_fields(set(batch_fields) | ({"mlm_ids"} if cfg.MLM else set()), cfg, tokenizer)
    cache = open_cache(cfg, dataset, "train", dataset.train_image_paths())
    transform = transforms_from_config(cfg, is_train=True, tensors=cache is not None)
    records, is_clean = inject_noise(dataset.train, cfg.noisy_rate, cfg.noise_seed, cfg.noisy_file)
    train_set = ImageTextDataset(records, transform, tokenizer, cfg.text_length, fields, cache,
                                 CaptionAugmentation.from_config(cfg), is_clean,
                                 back_translations(dataset, cfg.back_translation_prob))
    kwargs = dict(batch_size=cfg.batch_size // world_size, num_workers=cfg.num_workers, collate_fn=collate,
                  generator=generator)
    if cfg.sampler in ("identity", "idrannum"):
        sampler_cls = RandomIdentitySampler if cfg.sampler == "identity" else RandomIdNumSampler
        sampler = sampler_cls([r[0] for r in dataset.train], cfg.batch_size, cfg.num_instance,
                              cfg.seed, rank, world_size)
        return DataLoader(train_set, sampler=sampler, **kwargs)
    if world_size > 1:
        sampler = DistributedSampler(train_set, world_size, rank, shuffle=True, seed=cfg.seed)
        return DataLoader(train_set, sampler=sampler, drop_last=cfg.drop_last, **kwargs)
    return DataLoader(train_set, shuffle=True, drop_last=cfg.drop_last, **kwargs)
