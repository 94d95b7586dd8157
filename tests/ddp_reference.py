"""The tiny model and fixed global batch shared by the DDP equality test and its torchrun worker."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from utils.options import defaults

LOSS_NAMES = "sdm+itc+cmpm+cmt+id+tir"
APTM_LOSS_NAMES = "aptm_itc+itm+aptm_mlm"


def tiny_config(loss_names: str = LOSS_NAMES) -> SimpleNamespace:
    return SimpleNamespace(**{**defaults(), "pretrain_choice": "none", "img_size": [32, 16],
                              "vision_patch_size": 8, "stride_size": 8, "vision_width": 64,
                              "vision_layers": 1, "text_width": 64, "text_layers": 1, "embed_dim": 32,
                              "text_length": 16, "loss_names": loss_names, "aptm_fusion_layers": 1,
                              "aptm_fusion_dropout": 0.0, "sew_len_low": 2.0, "sew_len_high": 10.0})


def fixed_batch(size: int = 8) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.zeros(size, 16, dtype=torch.long)
    ids[:, 0] = 49406
    ids[:, 1:9] = torch.randint(1, 49405, (size, 8), generator=gen)
    ids[:, 9] = 49407
    masked, labels = ids.clone(), torch.full_like(ids, -100)
    masked[:, [2, 5]], labels[:, [2, 5]] = 49405, ids[:, [2, 5]]  # the same number of MLM targets per sample
    return {"images": torch.randn(size, 3, 32, 16, generator=gen), "caption_ids": ids,
            "pids": torch.tensor([0, 1, 0, 2, 3, 1, 4, 5][:size]), "image_ids": torch.arange(size),
            "eda_caption_ids": ids.roll(1, dims=0), "aptm_mlm_ids": masked, "aptm_mlm_labels": labels,
            "index": torch.arange(size), "is_clean": torch.ones(size, dtype=torch.bool),
            "images_view2": torch.randn(size, 3, 32, 16, generator=gen),
            "images_ss": torch.randn(size, 2, 3, 32, 16, generator=gen)}


def fixed_patch_order(model) -> None:
    """Make the TIR head's random patch mask a function of each sample's image id, so that the
    two-process run and the one-process run mask the same patches."""
    if "tir" not in model.heads:
        return
    head = model.heads["tir"]

    def order(batch):
        ids_shuffle = torch.stack([torch.randperm(head.num_patches, generator=torch.Generator().manual_seed(int(i)))
                                   for i in batch["image_ids"]])
        return ids_shuffle, ids_shuffle.argsort(dim=1)

    head.patch_order = order
