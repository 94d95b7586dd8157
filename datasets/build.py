"""Torch datasets, samplers and loaders for training and evaluation."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from utils.comm import barrier, get_rank
from utils.errors import ConfigError
from utils.simple_tokenizer import SimpleTokenizer, tokenize

from .bases import BaseDataset
from .cache import DecodedImageCache
from .captions import CaptionAugmentation, MaskingConfig, mask_tokens
from .sampler import RandomIdentitySampler, RandomIdNumSampler
from .transforms import build_tensor_transforms, build_transforms

ImageFile.LOAD_TRUNCATED_IMAGES = True
logger = logging.getLogger(__name__)


def read_image(path: str) -> Image.Image | None:
    """The image as RGB, or None (with a warning naming it) if it cannot be read."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        logger.warning("cannot read image %s: %s", path, err)
        return None


class ImageTextDataset(Dataset):
    """Training samples, one per caption: pids, image_ids, images, caption_ids (+ mlm_ids, mlm_labels).

    ``augment`` (UIT's pruning / corruption) turns the caption into ``caption_ids``; MLM masking
    starts from those. With ``global_sees_masked_caption`` (IRRA's aliasing, spec 5.7)
    ``caption_ids`` is the masked caption too, so the global losses train on it as in the released
    IRRA numbers.
    """

    def __init__(self, records, transform, tokenizer: SimpleTokenizer, text_length: int = 77,
                 masking: MaskingConfig | None = None, global_sees_masked_caption: bool = False,
                 cache: DecodedImageCache | None = None, augment: CaptionAugmentation | None = None):
        self.records = records
        self.cache = cache  # indexed by image_id; ``transform`` then takes uint8 tensors
        self.transform = transform
        self.tokenizer = tokenizer
        self.text_length = text_length
        self.masking = masking
        self.aliasing = global_sees_masked_caption
        self.augment = augment or CaptionAugmentation()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict | None:
        """A sample, or None for an unreadable image (the collate skips and counts it)."""
        pid, image_id, img_path, caption = self.records[index]
        image = read_image(img_path) if self.cache is None else self.cache[image_id]
        if image is None:
            return None
        ids = self.augment(caption, self.tokenizer, self.text_length)
        sample = {"pids": pid, "image_ids": image_id, "images": self.transform(image), "caption_ids": ids}
        if self.masking is not None:
            masked, labels = mask_tokens(ids, self.tokenizer, self.masking)
            sample.update(mlm_ids=masked, mlm_labels=labels)
            if self.aliasing:
                sample["caption_ids"] = masked
        return sample


class ImageDataset(Dataset):
    """Gallery images: (pid, image tensor or None if unreadable, path)."""

    def __init__(self, pids: list[int], paths: list[str], transform, cache: DecodedImageCache | None = None):
        self.pids, self.paths, self.transform, self.cache = pids, paths, transform, cache

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = read_image(self.paths[index]) if self.cache is None else self.cache[index]
        return self.pids[index], None if image is None else self.transform(image), self.paths[index]


class TextDataset(Dataset):
    """Query captions: (pid, token ids)."""

    def __init__(self, pids: list[int], captions: list[str], tokenizer: SimpleTokenizer, text_length: int = 77):
        self.pids, self.captions = pids, captions
        self.tokenizer, self.text_length = tokenizer, text_length

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int):
        return self.pids[index], tokenize(self.captions[index], self.tokenizer, self.text_length)


def collate(samples: list[dict | None]) -> dict[str, torch.Tensor]:
    """List of sample dicts -> dict of stacked tensors (ints become a LongTensor); unreadable
    samples (None) are dropped and counted in ``skipped``."""
    batch = [sample for sample in samples if sample is not None]
    out = {"skipped": torch.tensor(len(samples) - len(batch))}
    if not batch:
        return {**out, "images": torch.empty(0)}
    for key in batch[0]:
        values = [sample[key] for sample in batch]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else torch.tensor(values)
    return out


def collate_images(samples: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(pids, images) of the readable gallery images and the paths of the unreadable ones."""
    good = [(pid, image) for pid, image, _ in samples if image is not None]
    bad = [path for _, image, path in samples if image is None]
    pids = torch.tensor([pid for pid, _ in good], dtype=torch.long)
    images = torch.stack([image for _, image in good]) if good else torch.empty(0)
    return pids, images, bad


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


def build_eval_loaders(cfg, dataset: BaseDataset, tokenizer: SimpleTokenizer, split: str = "test"):
    """(image loader, text loader) over a split: gallery images and query captions."""
    data = getattr(dataset, split)
    cache = open_cache(cfg, dataset, split, data.img_paths)
    transform = build_transforms(cfg.img_size, is_train=False) if cache is None else \
        build_tensor_transforms(cfg.img_size, is_train=False)
    kwargs = dict(batch_size=cfg.test_batch_size, shuffle=False, num_workers=cfg.num_workers)
    return (DataLoader(ImageDataset(data.image_pids, data.img_paths, transform, cache), collate_fn=collate_images,
                       **kwargs),
            DataLoader(TextDataset(data.caption_pids, data.captions, tokenizer, cfg.text_length), **kwargs))


def build_train_loader(cfg, dataset: BaseDataset, tokenizer: SimpleTokenizer, batch_keys: set[str],
                       generator: torch.Generator | None = None, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Loader of training samples; masked captions are built if a head needs them or ``cfg.MLM``.

    ``cfg.batch_size`` is the global batch; each of ``world_size`` processes loads its share. In one
    process, shuffling and worker seeds come from ``generator``; the identity and distributed
    samplers draw from ``seed + epoch`` (``set_epoch``). Workers are not persistent, so an epoch
    depends only on RNG states at its start (exact resume)."""
    if cfg.batch_size % world_size:
        raise ConfigError(f"batch_size {cfg.batch_size} must be a multiple of the {world_size} processes")
    masking = None
    if "mlm_ids" in batch_keys or cfg.MLM:
        masking = MaskingConfig(cfg.mlm_prob, cfg.masked_token_rate, cfg.masked_token_unchanged_rate)
    cache = open_cache(cfg, dataset, "train", dataset.train_image_paths())
    transform = build_transforms(cfg.img_size, True, cfg.img_aug, cfg.erase_value) if cache is None else \
        build_tensor_transforms(cfg.img_size, True, cfg.img_aug, cfg.erase_value)
    augment = CaptionAugmentation(
        cfg.text_prune_prob, cfg.text_prune_mode,
        MaskingConfig(1.0, cfg.masked_token_rate, cfg.masked_token_unchanged_rate) if cfg.text_mask_corruption
        else None, cfg.corruption_key_prob, cfg.corruption_other_prob)
    train_set = ImageTextDataset(dataset.train, transform, tokenizer, cfg.text_length, masking,
                                 cfg.global_sees_masked_caption, cache, augment)
    kwargs = dict(batch_size=cfg.batch_size // world_size, num_workers=cfg.num_workers, collate_fn=collate,
                  generator=generator)
    if cfg.sampler in ("identity", "idrannum"):
        sampler_cls = RandomIdentitySampler if cfg.sampler == "identity" else RandomIdNumSampler
        sampler = sampler_cls([r[0] for r in dataset.train], cfg.batch_size, cfg.num_instance,
                              cfg.seed, rank, world_size)
        return DataLoader(train_set, sampler=sampler, **kwargs)
    if world_size > 1:
        sampler = DistributedSampler(train_set, world_size, rank, shuffle=True, seed=cfg.seed)
        return DataLoader(train_set, sampler=sampler, **kwargs)
    return DataLoader(train_set, shuffle=True, drop_last=False, **kwargs)
