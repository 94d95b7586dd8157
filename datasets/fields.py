"""Batch fields built on demand, through one registry.

Every training sample has ``pids``, ``image_ids``, ``images`` and ``caption_ids``. A head names the
extra keys it needs (``Head.batch_fields``); the training dataset runs exactly the builders that
provide them, in registration order. A builder declares its config keys next to its code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from utils.errors import ConfigError
from utils.settings import PROBABILITY, Setting, declare
from utils.simple_tokenizer import SimpleTokenizer, tokenize

from .aptm_text import eda, span_mask
from .captions import MaskingConfig, mask_tokens
from .transforms import simclr_transform


@dataclass
class SampleSource:
    """What a builder may read: the record, its decoded image (before any transform) and the
    training transform (for another augmented view)."""
    index: int            # position in the training records (one per caption)
    pid: int
    image_id: int
    caption: str          # the raw caption (before augmentation)
    image: Any            # PIL image, or a uint8 [3, H, W] tensor from the decoded-image cache
    transform: Callable[[Any], torch.Tensor]
    clean: bool = True    # False: the caption was moved here by noise injection (datasets/noise.py)


class FieldBuilder:
    """Adds its ``keys`` to a sample dict (``sample`` already holds the four standard keys)."""
    keys: ClassVar[tuple[str, ...]]
    settings: ClassVar[tuple[Setting, ...]] = ()

    @classmethod
    def from_config(cls, cfg, tokenizer: SimpleTokenizer) -> "FieldBuilder":
        return cls()

    def __call__(self, sample: dict[str, Any], source: SampleSource) -> None:
        raise NotImplementedError


FIELD_BUILDERS: dict[str, type[FieldBuilder]] = {}  # batch key -> the builder class that provides it


def register_field(cls: type[FieldBuilder]) -> type[FieldBuilder]:
    for key in cls.keys:
        if key in FIELD_BUILDERS:
            raise ConfigError(f"batch field '{key}' registered twice")
        FIELD_BUILDERS[key] = cls
    declare(f"batch field {'/'.join(cls.keys)}", cls.settings)
    return cls


def build_fields(keys: set[str], cfg, tokenizer: SimpleTokenizer) -> list[FieldBuilder]:
    """The builders providing ``keys``, in registration order (each once)."""
    unknown = sorted(keys - set(FIELD_BUILDERS))
    if unknown:
        raise ConfigError(f"no field builder provides the batch field(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(FIELD_BUILDERS))}")
    classes = dict.fromkeys(cls for key, cls in FIELD_BUILDERS.items() if key in keys)
    return [cls.from_config(cfg, tokenizer) for cls in classes]


@register_field
class MaskedCaption(FieldBuilder):
    """IRRA's masked caption for MLM: ``mlm_ids`` (a masked copy of ``caption_ids``) and
    ``mlm_labels`` (the original id at masked positions, 0 elsewhere). With
    ``global_sees_masked_caption`` (IRRA's aliasing, its issue #13) ``caption_ids`` becomes the
    masked caption too, so the global losses train on it as in IRRA's released numbers."""
    keys = ("mlm_ids", "mlm_labels")
    settings = (
        Setting("MLM", False, "build masked captions even if no head asks for them (IRRA's flag)"),
        Setting("mlm_prob", 0.15, "share of content tokens selected for MLM", **PROBABILITY),
        Setting("masked_token_rate", 0.8, "selected tokens replaced by <|mask|>", **PROBABILITY),
        Setting("masked_token_unchanged_rate", 0.1, "selected tokens left unchanged (the rest: a random id)",
                **PROBABILITY),
        Setting("global_sees_masked_caption", False, "IRRA's aliasing: every head sees the masked caption"),
    )

    def __init__(self, tokenizer: SimpleTokenizer, masking: MaskingConfig, aliasing: bool = False):
        self.tokenizer, self.masking, self.aliasing = tokenizer, masking, aliasing

    @classmethod
    def from_config(cls, cfg, tokenizer):
        return cls(tokenizer, MaskingConfig(cfg.mlm_prob, cfg.masked_token_rate, cfg.masked_token_unchanged_rate),
                   cfg.global_sees_masked_caption)

    def __call__(self, sample, source):
        masked, labels = mask_tokens(sample["caption_ids"], self.tokenizer, self.masking)
        sample.update(mlm_ids=masked, mlm_labels=labels)
        if self.aliasing:
            sample["caption_ids"] = masked


@register_field
class SampleIndex(FieldBuilder):
    """``index``: the sample's position in the training set, for per-sample state (e.g. weights)."""
    keys = ("index",)

    def __call__(self, sample, source):
        sample["index"] = source.index


@register_field
class IsClean(FieldBuilder):
    """``is_clean``: 1 if the sample kept its own caption, 0 if noise injection gave it another's
    (for diagnostics such as the precision of a clean/noisy division)."""
    keys = ("is_clean",)

    def __call__(self, sample, source):
        sample["is_clean"] = int(source.clean)


@register_field
class SecondView(FieldBuilder):
    """``images_view2``: a second, independently augmented view of the sample's image."""
    keys = ("images_view2",)

    def __call__(self, sample, source):
        sample["images_view2"] = source.transform(source.image)


@register_field
class SimCLRViews(FieldBuilder):
    """``images_ss``: two SimCLR views of the sample's original-resolution image, [2, 3, H, W]
    (TBPS-CLIP's SS-I views, ``datasets/transforms.simclr_transform``)."""
    keys = ("images_ss",)

    def __init__(self, transform):
        self.transform = transform

    @classmethod
    def from_config(cls, cfg, tokenizer):
        return cls(simclr_transform(cfg.img_size, cfg.normalization))

    def __call__(self, sample, source):
        if isinstance(source.image, torch.Tensor):
            raise ConfigError("images_ss needs the original images: turn image_cache off")
        sample["images_ss"] = torch.stack([self.transform(source.image), self.transform(source.image)])


@register_field
class EDACaption(FieldBuilder):
    """``eda_caption_ids``: the caption after one EDA operation (APTM's text branch; every caption,
    as APTM's eda_p 1), tokenised like ``caption_ids``. Synonyms come from the offline table of
    ``datasets/aptm_text.py`` (nothing is downloaded)."""
    keys = ("eda_caption_ids",)
    settings = (
        Setting("eda_alpha", 0.1, "EDA: share of the words replaced, inserted or swapped (APTM: 0.1)",
                **PROBABILITY),
        Setting("eda_p_delete", 0.1, "EDA: probability of deleting each word (APTM: 0.1)", **PROBABILITY),
    )

    def __init__(self, tokenizer: SimpleTokenizer, text_length: int, alpha: float = 0.1, p_delete: float = 0.1):
        self.tokenizer, self.text_length, self.alpha, self.p_delete = tokenizer, text_length, alpha, p_delete

    @classmethod
    def from_config(cls, cfg, tokenizer):
        return cls(tokenizer, cfg.text_length, cfg.eda_alpha, cfg.eda_p_delete)

    def __call__(self, sample, source):
        caption = eda(source.caption, self.alpha, self.p_delete)
        sample["eda_caption_ids"] = tokenize(caption, self.tokenizer, self.text_length)


@register_field
class SpanMaskedCaption(FieldBuilder):
    """APTM's MLM input: ``aptm_mlm_ids`` (whole-word spans of ``caption_ids`` masked, 80/10/10) and
    ``aptm_mlm_labels`` (the original id at masked positions, -100 elsewhere)."""
    keys = ("aptm_mlm_ids", "aptm_mlm_labels")
    settings = (
        Setting("aptm_mask_prob", 0.25, "APTM MLM: share of a caption's content tokens masked", **PROBABILITY),
        Setting("aptm_max_masks", 10, "APTM MLM: most masked tokens per caption", low=1),
        Setting("aptm_skipgram_prob", 0.2, "APTM MLM: probability that a masked span is 2..skipgram_size "
                "tokens long", **PROBABILITY),
        Setting("aptm_skipgram_size", 3, "APTM MLM: longest masked span", low=1),
    )

    def __init__(self, tokenizer: SimpleTokenizer, mask_prob: float = 0.25, max_masks: int = 10,
                 skipgram_prob: float = 0.2, skipgram_size: int = 3):
        self.tokenizer = tokenizer
        self.options = dict(mask_prob=mask_prob, max_masks=max_masks, skipgram_prob=skipgram_prob,
                            skipgram_size=skipgram_size)

    @classmethod
    def from_config(cls, cfg, tokenizer):
        return cls(tokenizer, cfg.aptm_mask_prob, cfg.aptm_max_masks, cfg.aptm_skipgram_prob, cfg.aptm_skipgram_size)

    def __call__(self, sample, source):
        masked, labels = span_mask(sample["caption_ids"], self.tokenizer, **self.options)
        sample.update(aptm_mlm_ids=masked, aptm_mlm_labels=labels)


@register_field
class MCMCaption(FieldBuilder):
    """SCMM-style MCM input (our reconstruction): ``mcm_ids``, a masked *copy* of ``caption_ids`` (which
    stays clean), and ``mcm_labels`` (original id where masked, 0 elsewhere), IRRA's 80/10/10 masking.
    When nothing is selected the first content token is masked, as IRRA; a caption without content
    tokens gets no label (IRRA would label its EOT)."""
    keys = ("mcm_ids", "mcm_labels")
    settings = (
        Setting("mcm_prob", 0.15, "share of content tokens selected for MCM", **PROBABILITY),
        Setting("mcm_mask_rate", 0.8, "selected tokens replaced by <|mask|>", **PROBABILITY),
        Setting("mcm_unchanged_rate", 0.1, "selected tokens left unchanged (the rest: a random id)", **PROBABILITY),
    )

    def __init__(self, tokenizer: SimpleTokenizer, masking: MaskingConfig):
        self.tokenizer, self.masking = tokenizer, masking

    @classmethod
    def from_config(cls, cfg, tokenizer):
        return cls(tokenizer, MaskingConfig(cfg.mcm_prob, cfg.mcm_mask_rate, cfg.mcm_unchanged_rate))

    def __call__(self, sample, source):
        ids = sample["caption_ids"]
        masked, labels = mask_tokens(ids, self.tokenizer, self.masking)
        if not 0 < int(ids[1]) < self.tokenizer.mask_id:  # the fallback hit EOT: no content token
            masked[1], labels[1] = ids[1], 0
        sample.update(mcm_ids=masked, mcm_labels=labels)
