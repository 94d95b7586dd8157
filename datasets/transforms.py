"""Image transforms: IRRA's (torchvision, PIL input), TBPS-CLIP's augmentation pool and SimCLR views,
and the same pipelines for the decoded-image cache's uint8 tensors."""
from __future__ import annotations

import torch
import torchvision.transforms as T
import torchvision.transforms.v2 as T2
from PIL import ImageFilter

from utils.settings import Setting, declare

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATION = {"clip": (CLIP_MEAN, CLIP_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}
INTERPOLATION = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}

declare("image transforms", (
    Setting("normalization", "clip", "mean/std of every image pipeline, training and test (TBPS-CLIP: imagenet)",
            choices=tuple(NORMALIZATION)),
    Setting("img_aug_pool", 0, "training images: this many ops drawn (uniformly, with replacement, applied in "
            "the drawn order before normalisation) from TBPS-CLIP's pool of 6; 0: off (TBPS-CLIP: 2; replaces "
            "img_aug)", low=0),
    Setting("test_resize_interpolation", "bilinear", "the evaluation resize (TBPS-CLIP: bicubic)",
            choices=tuple(INTERPOLATION)),
))


class AugmentationPool:
    """TBPS-CLIP's main-view augmentation (misc/data.py): ``k`` of its six ops drawn uniformly with
    replacement (numpy's ``choice`` default), applied in the drawn order to a [0, 1] image tensor.
    Erasing and rotation fill with 0, so before normalisation their boxes and corners are black.
    Draws come from torch's RNG (seeded per data-loader worker), not numpy's global one."""

    def __init__(self, size: tuple[int, int], k: int = 2):
        self.k = k
        self.ops = [
            T.ColorJitter(0.1, 0.1, 0.1, 0),
            T.RandomRotation(15),
            T.RandomResizedCrop(tuple(size), scale=(0.9, 1.0), antialias=True),
            T.RandomGrayscale(),
            T.RandomHorizontalFlip(),
            T.RandomErasing(scale=(0.10, 0.20)),
        ]

    def draw(self) -> list[int]:
        return torch.randint(len(self.ops), (self.k,)).tolist()

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        for index in self.draw():
            image = self.ops[index](image)
        return image


class RandomGaussianBlur:
    """PIL Gaussian blur with a radius drawn uniformly from ``sigma`` (SimCLR's, as TBPS-CLIP's)."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, image):
        radius = float(torch.empty(()).uniform_(*self.sigma))
        return image.filter(ImageFilter.GaussianBlur(radius=radius))


def simclr_transform(img_size: tuple[int, int], normalization: str = "clip") -> T.Compose:
    """One SimCLR view of an original-resolution PIL image (TBPS-CLIP's SS-I views): random resized
    crop (scale 0.2-1), colour jitter (p 0.8), grayscale (p 0.2), blur (p 0.5), flip."""
    mean, std = NORMALIZATION[normalization]
    return T.Compose([
        T.RandomResizedCrop(tuple(img_size), scale=(0.2, 1.0), antialias=True),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([RandomGaussianBlur()], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToTensor(), T.Normalize(mean=mean, std=std),
    ])


def build_transforms(img_size: tuple[int, int], is_train: bool, aug: bool = False, erase_value: str = "zero",
                     normalization: str = "clip", pool: int = 0, test_interpolation: str = "bilinear") -> T.Compose:
    """Test: resize (``test_interpolation``), tensor, normalise. Train adds a flip; with ``aug`` also
    pad 10 + random crop and RandomErasing after normalisation. IRRA fills erased boxes with the CLIP
    mean in the normalised space (``erase_value='clip_mean'``, a light grey); ``'zero'`` fills the
    mean colour. ``pool`` > 0: TBPS-CLIP's pipeline instead (bilinear resize, ``AugmentationPool``)."""
    size = tuple(img_size)
    mean, std = NORMALIZATION[normalization]
    normalize = T.Normalize(mean=mean, std=std)
    if not is_train:
        return T.Compose([T.Resize(size, INTERPOLATION[test_interpolation], antialias=True), T.ToTensor(), normalize])
    if pool:
        return T.Compose([T.Resize(size), T.ToTensor(), AugmentationPool(size, pool), normalize])
    if not aug:
        return T.Compose([T.Resize(size), T.RandomHorizontalFlip(0.5), T.ToTensor(), normalize])
    fill = mean if erase_value == "clip_mean" else 0
    return T.Compose([
        T.Resize(size), T.RandomHorizontalFlip(0.5), T.Pad(10), T.RandomCrop(size),
        T.ToTensor(), normalize,
        T.RandomErasing(p=0.5, scale=(0.02, 0.4), ratio=(0.3, 3.3), value=fill),
    ])


def build_tensor_transforms(img_size: tuple[int, int], is_train: bool, aug: bool = False, erase_value: str = "zero",
                            normalization: str = "clip", pool: int = 0) -> T2.Compose:
    """The same pipelines for already resized uint8 [3, H, W] tensors (the decoded-image cache,
    resized bilinearly)."""
    mean, std = NORMALIZATION[normalization]
    to_float, normalize = T2.ToDtype(torch.float32, scale=True), T2.Normalize(mean=mean, std=std)
    if not is_train:
        return T2.Compose([to_float, normalize])
    if pool:
        return T2.Compose([to_float, AugmentationPool(img_size, pool), normalize])
    if not aug:
        return T2.Compose([T2.RandomHorizontalFlip(0.5), to_float, normalize])
    fill = list(mean) if erase_value == "clip_mean" else 0
    return T2.Compose([
        T2.RandomHorizontalFlip(0.5), T2.Pad(10), T2.RandomCrop(tuple(img_size)), to_float, normalize,
        T2.RandomErasing(p=0.5, scale=(0.02, 0.4), ratio=(0.3, 3.3), value=fill),
    ])


def transforms_from_config(cfg, is_train: bool, tensors: bool = False):
    """The pipeline a config asks for (``tensors``: for the decoded-image cache)."""
    if tensors:
        return build_tensor_transforms(cfg.img_size, is_train, cfg.img_aug, cfg.erase_value, cfg.normalization,
                                       cfg.img_aug_pool)
    return build_transforms(cfg.img_size, is_train, cfg.img_aug, cfg.erase_value, cfg.normalization, cfg.img_aug_pool,
                            cfg.test_resize_interpolation)
