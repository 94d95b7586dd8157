"""Caption cleaning and augmentations: IRRA's MLM masking, UIT's key-word pruning and corruption,
RDE's token augmentation, TBPS-CLIP's cleaning, back-translation and random deletion."""
from __future__ import annotations

import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from utils.settings import PROBABILITY, Setting, declare
from utils.simple_tokenizer import SimpleTokenizer, pad_ids, tokenize

from .text_prune import is_key_word, prune_caption

SETTINGS = (
    Setting("text_prune_prob", 0.0, "UIT: the training caption is pruned to its key words with this probability",
            **PROBABILITY),
    Setting("text_prune_mode", "pos_approx", "offline stand-in for SEN's POS filter, or attribute words only",
            choices=("pos_approx", "attribute_only")),
    Setting("text_mask_corruption", False, "UIT: SEN's in-place MLM corruption of the training caption"),
    Setting("corruption_key_prob", 0.3, "its selection rate for key-word (noun/adjective) pieces", **PROBABILITY),
    Setting("corruption_other_prob", 0.05, "... and for every other piece", **PROBABILITY),
    Setting("txt_aug_prob", 0.0, "RDE's txt_aug: each caption token is augmented with this probability "
            "(RDE: 0.2; 0 = off)", **PROBABILITY),
    Setting("txt_aug_mask", 0.6, "... of which this share becomes <|mask|>", **PROBABILITY),
    Setting("txt_aug_random", 0.2, "... this share a random token (the rest is deleted)", **PROBABILITY),
    Setting("caption_clean", "none", "tbps: TBPS-CLIP's pre_caption on training captions, back-translations and "
            "test queries (lower case, . ! \" ( ) * # : ; ~ removed, spaces collapsed)", choices=("none", "tbps")),
    Setting("caption_max_words", 77, "caption_clean keeps this many words (TBPS-CLIP: 77)", low=1),
    Setting("back_translation_prob", 0.0, "TBPS-CLIP: a training caption is replaced by its back-translation "
            "(annotation captions_bt) with this probability (0.1); one without keeps its caption", **PROBABILITY),
    Setting("random_deletion_prob", 0.0, "TBPS-CLIP (EDA): each word of a training caption is deleted with this "
            "probability (0.05); a one-word caption stays, an emptied one keeps a random word", **PROBABILITY),
)
declare("caption augmentation", SETTINGS)


logger = logging.getLogger(__name__)


def pre_caption(caption: str, max_words: int = 77) -> str:
    """TBPS-CLIP's caption cleaning (misc/caption_dataset.py): lower case, the characters
    . ! " ( ) * # : ; ~ become spaces, runs of whitespace one space, stripped, first ``max_words``."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    return " ".join(caption.split(" ")[:max_words])


def clean_dataset_captions(dataset, max_words: int = 77) -> None:
    """``pre_caption`` on a dataset's training captions, back-translations and evaluation captions;
    a caption it empties (only punctuation) keeps its original text, counted in the log."""
    kept = 0

    def clean(caption: str) -> str:
        nonlocal kept
        cleaned = pre_caption(caption, max_words)
        kept += not cleaned and bool(caption.strip())
        return cleaned or caption

    dataset.train = [(pid, image_id, path, clean(caption)) for pid, image_id, path, caption in dataset.train]
    dataset.back_translations = [pre_caption(bt, max_words) if bt.strip() else "" for bt in dataset.back_translations]
    for split in (dataset.val, dataset.test):
        split.captions = [clean(caption) for caption in split.captions]
    if kept:
        logger.warning("%d captions hold nothing but punctuation; they keep their text", kept)


def random_deletion(caption: str, prob: float, rng: random.Random | None = None) -> str:
    """EDA's random deletion as TBPS-CLIP uses it: each whitespace word kept when a uniform draw
    exceeds ``prob``; if none is kept, one random word. A one-word caption comes back unchanged
    (upstream returns it as a list, which its tokenizer then rejects)."""
    rng = rng or random
    words = caption.split()
    if len(words) <= 1:
        return caption
    kept = [word for word in words if rng.uniform(0, 1) > prob]
    return " ".join(kept) if kept else rng.choice(words)


@dataclass
class MaskingConfig:
    """IRRA's MLM masking: select content tokens with ``prob``; of those, ``mask_rate`` become
    <|mask|>, ``unchanged_rate`` stay, the rest become a random content id."""
    prob: float = 0.15
    mask_rate: float = 0.8
    unchanged_rate: float = 0.1


def mask_tokens(ids: torch.Tensor, tokenizer: SimpleTokenizer, cfg: MaskingConfig,
                rng: random.Random | None = None,
                select_probs: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked copy of ``ids`` and labels (original id at selected positions, 0 elsewhere).

    Eligible tokens are ids 1..mask_id-1 (no padding, <|mask|>, SOT or EOT), each selected with
    ``cfg.prob`` or, when given, its own ``select_probs[i]``. If nothing was selected, position 1
    is masked so every caption has a label (IRRA).
    """
    rng = rng or random
    masked = ids.clone()
    labels = torch.zeros_like(ids)
    for i, token in enumerate(ids.tolist()):
        prob = cfg.prob if select_probs is None else select_probs[i]
        if not 0 < token < tokenizer.mask_id or rng.random() >= prob:
            continue
        labels[i] = token
        draw = rng.random()
        if draw < cfg.mask_rate:
            masked[i] = tokenizer.mask_id
        elif draw < 1.0 - cfg.unchanged_rate:
            masked[i] = rng.randrange(1, tokenizer.mask_id)
    if not labels.any():
        labels[1] = ids[1]
        masked[1] = tokenizer.mask_id
    return masked, labels


def augment_tokens(ids: torch.Tensor, tokenizer: SimpleTokenizer, prob: float, mask_share: float = 0.6,
                   random_share: float = 0.2, rng: random.Random | None = None) -> torch.Tensor:
    """RDE's txt_aug (QinYang79/RDE @ b3fd396, datasets/bases.py txt_data_aug): each caption token
    (0 < id < <|mask|>) is, with probability ``prob``, replaced by <|mask|> (``mask_share``), by a
    random token 1..mask_id-1 (``random_share``) or deleted (the rest; later tokens move left and
    the tail is zero-filled). SOT, EOT and padding never change."""
    rng = rng or random
    out = []
    for token in ids.tolist():
        draw = rng.random() if 0 < token < tokenizer.mask_id else 1.0
        if draw >= prob:
            out.append(token)
        elif draw / prob < mask_share:  # one draw per token, rescaled, as RDE
            out.append(tokenizer.mask_id)
        elif draw / prob < mask_share + random_share:
            out.append(rng.randrange(1, tokenizer.mask_id))
    return torch.tensor(out + [0] * (len(ids) - len(out)), dtype=ids.dtype)


def encode_with_key_words(caption: str, tokenizer: SimpleTokenizer,
                          text_length: int) -> tuple[torch.Tensor, list[bool]]:
    """``tokenize(caption)`` and, for each of its positions, whether it is a BPE piece of a key
    word (a word the offline key-word filter keeps: SEN's noun/adjective pieces)."""
    words = tokenizer.encode_words(caption)
    ids = pad_ids([i for _, pieces in words for i in pieces], tokenizer, text_length)
    flags = [False]  # SOT
    for word, pieces in words:
        flags.extend([is_key_word(word)] * len(pieces))
    flags = flags[:text_length] + [False] * max(0, text_length - len(flags))
    return ids, flags


@dataclass
class CaptionAugmentation:
    """Turns a training caption into ``caption_ids``; the default is plain tokenisation.

    UIT's augmentations, in SEN's order: with ``prune_prob`` the caption is pruned to its key words
    before tokenisation; then, if ``corruption`` is set, its pieces are MLM-corrupted in place
    (key-word pieces selected with ``key_prob``, others ``other_prob``). RDE's token augmentation
    (``txt_aug_prob`` > 0) comes last. TBPS-CLIP's come first: with ``back_translation_prob`` the
    caption becomes its back-translation (when it has one), then ``random_deletion_prob`` deletes
    words. The result is the caption every head sees in that step."""
    prune_prob: float = 0.0
    prune_mode: str = "pos_approx"
    corruption: MaskingConfig | None = None
    key_prob: float = 0.3
    other_prob: float = 0.05
    txt_aug_prob: float = 0.0
    txt_aug_mask: float = 0.6
    txt_aug_random: float = 0.2
    back_translation_prob: float = 0.0
    random_deletion_prob: float = 0.0

    @classmethod
    def from_config(cls, cfg) -> "CaptionAugmentation":
        corruption = MaskingConfig(1.0, cfg.masked_token_rate, cfg.masked_token_unchanged_rate) \
            if cfg.text_mask_corruption else None
        return cls(cfg.text_prune_prob, cfg.text_prune_mode, corruption, cfg.corruption_key_prob,
                   cfg.corruption_other_prob, cfg.txt_aug_prob, cfg.txt_aug_mask, cfg.txt_aug_random,
                   cfg.back_translation_prob, cfg.random_deletion_prob)

    def text(self, caption: str, rng: random.Random | None = None, translation: str = "") -> str:
        """TBPS-CLIP's text augmentations: back-translation (when the caption has one; the draw is made
        either way, so the random stream does not depend on it), then random deletion."""
        rng = rng or random
        if self.back_translation_prob > 0 and rng.random() < self.back_translation_prob and translation.strip():
            caption = translation
        if self.random_deletion_prob > 0:
            caption = random_deletion(caption, self.random_deletion_prob, rng)
        return caption

    def __call__(self, caption: str, tokenizer: SimpleTokenizer, text_length: int,
                 rng: random.Random | None = None, translation: str = "") -> torch.Tensor:
        rng = rng or random
        caption = self.text(caption, rng, translation)
        if self.prune_prob > 0 and rng.random() < self.prune_prob:
            caption = prune_caption(caption, self.prune_mode)
        if self.corruption is None:
            ids = tokenize(caption, tokenizer, text_length)
        else:
            ids, key = encode_with_key_words(caption, tokenizer, text_length)
            probs = [self.key_prob if k else self.other_prob for k in key]
            ids = mask_tokens(ids, tokenizer, self.corruption, rng, probs)[0]
        if self.txt_aug_prob > 0:
            ids = augment_tokens(ids, tokenizer, self.txt_aug_prob, self.txt_aug_mask, self.txt_aug_random, rng)
        return ids
