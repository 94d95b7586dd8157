"""A picture of retrieval results: per query, its caption then the top gallery images, framed green
(true match) or red (wrong)."""
from __future__ import annotations

import textwrap

import torch
from PIL import Image, ImageDraw, ImageFont

CAPTION_WIDTH = 320
THUMB = (64, 128)  # width, height
FRAME = 4
PAD = 6
GREEN, RED = (40, 170, 60), (210, 40, 40)


def grid_size(num_queries: int, top: int = 10) -> tuple[int, int]:
    """(width, height) of the picture for ``num_queries`` rows of ``top`` images."""
    cell_w, cell_h = THUMB[0] + 2 * FRAME + PAD, THUMB[1] + 2 * FRAME + PAD
    return CAPTION_WIDTH + top * cell_w + PAD, num_queries * cell_h + PAD


def retrieval_grid(captions: list[str], query_pids: list[int], ranked_paths: list[list[str]],
                   ranked_pids: list[list[int]], top: int = 10) -> Image.Image:
    """One row per query: its caption, then its ranked gallery images (paths and pids, best first)."""
    width, height = grid_size(len(captions), top)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    cell_w, cell_h = THUMB[0] + 2 * FRAME + PAD, THUMB[1] + 2 * FRAME + PAD
    for row, caption in enumerate(captions):
        y = PAD + row * cell_h
        draw.multiline_text((PAD, y), "\n".join(textwrap.wrap(caption, 48)[:9]), fill="black", font=font)
        for col, (path, pid) in enumerate(zip(ranked_paths[row][:top], ranked_pids[row][:top])):
            x = CAPTION_WIDTH + col * cell_w
            colour = GREEN if pid == query_pids[row] else RED
            draw.rectangle((x, y, x + THUMB[0] + 2 * FRAME - 1, y + THUMB[1] + 2 * FRAME - 1), fill=colour)
            with Image.open(path) as image:
                canvas.paste(image.convert("RGB").resize(THUMB), (x + FRAME, y + FRAME))
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
