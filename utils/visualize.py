"""A picture of retrieval results: per query, its caption then the top gallery images, framed green
(true match) or red (wrong), or gray where identities are unknown (searching your own images)."""
from __future__ import annotations

import textwrap

import torch
from PIL import Image, ImageDraw, ImageFont

CAPTION_WIDTH = 320
THUMB = (64, 128)  # width, height
FRAME = 4
PAD = 6
GREEN, RED, GRAY = (40, 170, 60), (210, 40, 40), (150, 150, 150)
LABEL = 14  # height of the text line under a labelled thumbnail


def grid_size(num_queries: int, top: int = 10, labelled: bool = False) -> tuple[int, int]:
    """(width, height) of the picture for ``num_queries`` rows of ``top`` images."""
    cell_w, cell_h = _cell(labelled)
    return CAPTION_WIDTH + top * cell_w + PAD, num_queries * cell_h + PAD


def _cell(labelled: bool) -> tuple[int, int]:
    return THUMB[0] + 2 * FRAME + PAD, THUMB[1] + 2 * FRAME + PAD + (LABEL if labelled else 0)


def retrieval_grid(captions: list[str], query_pids: list[int] | None, ranked_paths: list[list[str]],
                   ranked_pids: list[list[int]] | None, top: int = 10,
                   labels: list[list[str]] | None = None) -> Image.Image:
    """One row per query: its caption, then its ranked gallery images (best first), framed green or
    red by whether their pid is the query's, or gray without pids; ``labels`` go under the images."""
    width, height = grid_size(len(captions), top, labels is not None)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    cell_w, cell_h = _cell(labels is not None)
    for row, caption in enumerate(captions):
        y = PAD + row * cell_h
        draw.multiline_text((PAD, y), "\n".join(textwrap.wrap(caption, 48)[:9]), fill="black", font=font)
        for col, path in enumerate(ranked_paths[row][:top]):
            x = CAPTION_WIDTH + col * cell_w
            colour = GRAY if ranked_pids is None else GREEN if ranked_pids[row][col] == query_pids[row] else RED
            draw.rectangle((x, y, x + THUMB[0] + 2 * FRAME - 1, y + THUMB[1] + 2 * FRAME - 1), fill=colour)
            with Image.open(path) as image:
                canvas.paste(image.convert("RGB").resize(THUMB), (x + FRAME, y + FRAME))
            if labels is not None:
                draw.text((x, y + THUMB[1] + 2 * FRAME + 2), labels[row][col], fill="black", font=font)
    return canvas


def restoration_size(num_rows: int, image_size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of the restoration picture: caption + three images per row."""
    height, width = image_size
    return CAPTION_WIDTH + 3 * (width + PAD) + PAD, num_rows * (height + PAD) + PAD


def restoration_grid(captions: list[str], originals: torch.Tensor, inputs: torch.Tensor,
                     restored: torch.Tensor) -> Image.Image:
    """One row per caption: the caption, the original image, what the restoring head saw (masked,
    grayscale) and its restoration. Images are [N, 3, H, W] in [0, 1]."""
    height, width = originals.shape[-2:]
    canvas = Image.new("RGB", restoration_size(len(captions), (height, width)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for row, caption in enumerate(captions):
        y = PAD + row * (height + PAD)
        draw.multiline_text((PAD, y), "\n".join(textwrap.wrap(caption, 48)[:9]), fill="black", font=font)
        for col, images in enumerate((originals, inputs, restored)):
            pixels = (images[row].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
            canvas.paste(Image.fromarray(pixels), (CAPTION_WIDTH + col * (width + PAD), y))
    return canvas
