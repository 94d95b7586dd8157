"""IRRA's image transforms (torchvision, PIL input)."""
from __future__ import annotations

import torch
import torchvision.transforms as T
import torchvision.transforms.v2 as T2

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_transforms(img_size: tuple[int, int], is_train: bool, aug: bool = False,
                     erase_value: str = "zero") -> T.Compose:
    """Test: resize, tensor, normalise. Train adds a flip; with ``aug`` also pad 10 + random crop
    and RandomErasing after normalisation. IRRA fills erased boxes with the CLIP mean in the
    normalised space (``erase_value='clip_mean'``, a light grey); ``'zero'`` fills the mean colour."""
    size = tuple(img_size)
    normalize = T.Normalize(mean=CLIP_MEAN, std=CLIP_STD)
    if not is_train:
        return T.Compose([T.Resize(size), T.ToTensor(), normalize])
    if not aug:
        return T.Compose([T.Resize(size), T.RandomHorizontalFlip(0.5), T.ToTensor(), normalize])
    fill = CLIP_MEAN if erase_value == "clip_mean" else 0
    return T.Compose([
        T.Resize(size), T.RandomHorizontalFlip(0.5), T.Pad(10), T.RandomCrop(size),
        T.ToTensor(), normalize,
        T.RandomErasing(p=0.5, scale=(0.02, 0.4), ratio=(0.3, 3.3), value=fill),
    ])


def build_tensor_transforms(img_size: tuple[int, int], is_train: bool, aug: bool = False,
                            erase_value: str = "zero") -> T2.Compose:
    """The same pipelines for already resized uint8 [3, H, W] tensors (the decoded-image cache)."""
    normalize = [T2.ToDtype(torch.float32, scale=True), T2.Normalize(mean=CLIP_MEAN, std=CLIP_STD)]
    if not is_train:
        return T2.Compose(normalize)
    if not aug:
        return T2.Compose([T2.RandomHorizontalFlip(0.5), *normalize])
    fill = list(CLIP_MEAN) if erase_value == "clip_mean" else 0
    return T2.Compose([
        T2.RandomHorizontalFlip(0.5), T2.Pad(10), T2.RandomCrop(tuple(img_size)), *normalize,
        T2.RandomErasing(p=0.5, scale=(0.02, 0.4), ratio=(0.3, 3.3), value=fill),
    ])
