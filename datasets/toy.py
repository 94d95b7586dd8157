"""Deterministic synthetic pedestrian dataset in the CUHK-PEDES on-disk format.

Each identity is a unique combination of clearly visible attributes (clothing
colours and shapes, hair, hat, bag). Images are blocky PIL drawings; captions
are template sentences naming every attribute of the identity.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "blue": (30, 60, 220),
    "green": (30, 170, 50),
    "yellow": (245, 220, 30),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
    "purple": (140, 40, 180),
    "orange": (250, 130, 20),
    "brown": (120, 70, 30),
}

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "gender": ("man", "woman"),
    "upper_color": ("red", "blue", "green", "yellow", "black", "white", "purple", "orange"),
    "upper_type": ("shirt", "jacket", "coat"),
    "lower_color": ("red", "blue", "green", "yellow", "black", "white", "purple", "orange"),
    "lower_type": ("trousers", "shorts", "skirt"),
    "hat": ("none", "red", "blue", "black", "white"),
    "bag": ("none", "backpack", "handbag"),
    "bag_color": ("black", "brown", "red", "blue"),
}
"""Attribute vocabulary; hats and bags name their colour, "none" means absent."""

SKIN_TONES = ((235, 195, 165), (205, 155, 115), (150, 100, 70))
HAIR_COLOR = (55, 35, 20)
SHOE_COLOR = (45, 40, 40)
BASE_W, BASE_H = 48, 96  # design canvas; drawings are scaled to image_size


@dataclass(frozen=True)
class Identity:
    """Visible attributes of one synthetic person."""

    gender: str
    upper_color: str
    upper_type: str
    lower_color: str
    lower_type: str
    hat: str  # "none" or a colour
    bag: str  # "none", "backpack" or "handbag"
    bag_color: str  # "none" when there is no bag


def _attribute_space() -> list[tuple[str, ...]]:
    """Option lists per slot; bag kind and colour form one slot so "no bag" is a single option."""
    a = ATTRIBUTES
    bags = ("none",) + tuple(f"{c} {k}" for k in a["bag"][1:] for c in a["bag_color"])
    return [a["gender"], a["upper_color"], a["upper_type"], a["lower_color"], a["lower_type"], a["hat"], bags]


def sample_identities(n: int, rng: np.random.Generator) -> list[Identity]:
    """Sample ``n`` attribute combinations without replacement."""
    space = _attribute_space()
    sizes = [len(s) for s in space]
    if n > int(np.prod(sizes)):
        raise ValueError(f"cannot sample {n} unique identities from {int(np.prod(sizes))}")
    flat = rng.choice(int(np.prod(sizes)), size=n, replace=False)
    people = []
    for combo in zip(*np.unravel_index(flat, sizes)):
        g, uc, ut, lc, lt, hat, bag = (space[i][int(j)] for i, j in enumerate(combo))
        bag_color, bag_kind = bag.split() if bag != "none" else ("none", "none")
        people.append(Identity(g, uc, ut, lc, lt, hat, bag_kind, bag_color))
    return people


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _a(phrase: str) -> str:
    """Prefix the right indefinite article."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _phrases(p: Identity, rng: np.random.Generator) -> dict[str, str]:
    """Noun phrases for each attribute; empty string when absent."""
    upper = {"shirt": "{} shirt", "jacket": "{} jacket", "coat": "long {} coat"}[p.upper_type]
    trousers = str(rng.choice(["trousers", "pants"]))
    low = f"{p.lower_color} {trousers if p.lower_type == 'trousers' else p.lower_type}"
    return {
        "subj": f"a {p.gender}",
        "pron": "he" if p.gender == "man" else "she",
        "up": _a(upper.format(p.upper_color)),
        "low": _a(low) if p.lower_type == "skirt" else low,
        "hat": "" if p.hat == "none" else _a(f"{p.hat} {rng.choice(['hat', 'cap'])}"),
        "bag": "" if p.bag == "none" else _a(f"{p.bag_color} {p.bag}"),
    }


def _t_wearing(f: dict[str, str]) -> str:
    s = f"{f['subj']} wearing {_join([x for x in (f['up'], f['low'], f['hat']) if x])}"
    return s + (f", carrying {f['bag']}." if f["bag"] else ".")


def _t_has(f: dict[str, str]) -> str:
    s = f"the {f['subj'][2:]} has {_join([x for x in (f['hat'], f['up'], f['low']) if x])}"
    return s + (f" and carries {f['bag']}." if f["bag"] else ".")


def _t_in(f: dict[str, str]) -> str:
    s = f"{f['subj']} in {f['low']} and {f['up']}"
    extras = [x for x in (f["bag"], f["hat"]) if x]
    return s + (f" with {_join(extras)}." if extras else ".")


def _t_sentences(f: dict[str, str]) -> str:
    s = f"this {f['subj'][2:]} is dressed in {f['up']} and {f['low']}."
    if f["hat"]:
        s += f" {f['pron']} wears {f['hat']}."
    if f["bag"]:
        s += f" {f['pron']} is carrying {f['bag']}."
    return s


def _t_bag_first(f: dict[str, str]) -> str:
    lead = f"{f['subj']} with {f['bag']}" if f["bag"] else f"{f['subj']}"
    return f"{lead} is wearing {_join([x for x in (f['up'], f['low'], f['hat']) if x])}."


def _t_walking(f: dict[str, str]) -> str:
    s = f"{f['subj']} walking in {_join([x for x in (f['up'], f['low'], f['hat']) if x])}"
    return s + (f". {f['pron']} has {f['bag']}." if f["bag"] else ".")


TEMPLATES = (_t_wearing, _t_has, _t_in, _t_sentences, _t_bag_first, _t_walking)


def make_captions(p: Identity, n: int, rng: np.random.Generator) -> list[str]:
    """``n`` captions from distinct templates, each naming every attribute of ``p``."""
    order = rng.choice(len(TEMPLATES), size=n, replace=n > len(TEMPLATES))
    return [TEMPLATES[int(i)](_phrases(p, rng)) for i in order]


def tokenize(caption: str) -> list[str]:
    """Word tokens as in CUHK-PEDES ``processed_tokens``."""
    return re.findall(r"[a-z]+", caption.lower())


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int = 12) -> tuple[int, int, int]:
    r, g, b = (int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)
    return r, g, b


def draw_person(p: Identity, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """Render one jittered image of ``p``; ``size`` is (height, width)."""
    h, w = size
    s = rng.uniform(0.85, 0.98)
    dx, dy = rng.uniform(-3, 3), rng.uniform(-3, 3)
    flip = bool(rng.integers(2))  # bag on the left instead of the right

    def box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
        return [*pt(x0, y0), *pt(x1, y1)]

    def pt(x: float, y: float) -> tuple[float, float]:
        px = (BASE_W / 2 + (x - BASE_W / 2) * s + dx) * w / BASE_W
        py = (BASE_H / 2 + (y - BASE_H / 2) * s + dy) * h / BASE_H
        return px, py

    def side(x0: float, x1: float) -> tuple[float, float]:
        return (BASE_W - x1, BASE_W - x0) if flip else (x0, x1)

    base = np.array(_jitter((128, 128, 128), rng, 40), dtype=np.float32)
    bg = base + rng.normal(0, 8, size=(h, w, 3)) + np.linspace(-15, 15, h)[:, None, None]
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    skin = _jitter(SKIN_TONES[int(rng.integers(len(SKIN_TONES)))], rng, 6)
    up, low = _jitter(COLORS[p.upper_color], rng), _jitter(COLORS[p.lower_color], rng)
    bag = _jitter(COLORS[p.bag_color], rng) if p.bag != "none" else (0, 0, 0)

    if p.bag == "backpack":  # pack visible behind one shoulder
        bx0, bx1 = side(38, 46)
        d.rectangle(box(bx0, 23, bx1, 50), fill=bag)
    # legs and lower garment
    leg_top = {"trousers": 88, "shorts": 68, "skirt": 76}[p.lower_type]
    for x0 in (16, 25):
        d.rectangle(box(x0, 52, x0 + 7, 88), fill=skin)
        d.rectangle(box(x0, 52, x0 + 7, leg_top), fill=low)
        d.rectangle(box(x0 - 1, 88, x0 + 8, 92), fill=SHOE_COLOR)
    if p.lower_type == "shorts":
        d.rectangle(box(15, 50, 33, 68), fill=low)
    elif p.lower_type == "skirt":
        d.polygon([pt(15, 50), pt(33, 50), pt(38, 76), pt(10, 76)], fill=low)
    # torso and arms
    if p.upper_type == "coat":
        d.polygon([pt(15, 21), pt(33, 21), pt(36, 62), pt(12, 62)], fill=up)
    else:
        d.rectangle(box(15, 21, 33, 52), fill=up)
    sleeve_end = 32 if p.upper_type == "shirt" else 48
    for x0 in (9, 33):
        d.rectangle(box(x0, 22, x0 + 6, 52), fill=skin)
        d.rectangle(box(x0, 22, x0 + 6, sleeve_end), fill=up)
    if p.bag == "backpack":  # straps over the chest
        for x0 in (18, 28):
            d.rectangle(box(x0, 21, x0 + 2, 42), fill=bag)
    elif p.bag == "handbag":  # hanging from one hand by a strap
        bx0, bx1 = side(38, 47)
        strap_x = BASE_W - 37 if flip else 37
        d.line([pt(strap_x, 34), pt((bx0 + bx1) / 2, 46)], fill=bag, width=max(1, w // 32))
        d.rectangle(box(bx0, 46, bx1, 58), fill=bag)
    # head, hair, hat
    d.rectangle(box(22, 18, 26, 22), fill=skin)
    d.ellipse(box(18, 7, 30, 20), fill=skin)
    d.chord(box(18, 6, 30, 18), 180, 360, fill=HAIR_COLOR)
    if p.gender == "woman":
        d.rectangle(box(16, 10, 19, 30), fill=HAIR_COLOR)
        d.rectangle(box(29, 10, 32, 30), fill=HAIR_COLOR)
    if p.hat != "none":
        hat = _jitter(COLORS[p.hat], rng)
        d.rectangle(box(19, 1, 29, 8), fill=hat)
        d.rectangle(box(16, 6, 32, 9), fill=hat)

    arr = np.asarray(img, dtype=np.float32) * rng.uniform(0.85, 1.15) + rng.normal(0, 3, size=(h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def generate_toy_dataset(
    root: str | Path,
    num_train_ids: int = 1000,
    num_val_ids: int = 50,
    num_test_ids: int = 100,
    images_per_id: int = 2,
    captions_per_image: int = 2,
    image_size: tuple[int, int] = (96, 48),
    seed: int = 0,
    dataset_name: str = "CUHK-PEDES",
) -> Path:
    """Write the toy people in ``dataset_name``'s published layout and return the dataset folder:
    CUHK-PEDES ``reid_raw.json`` (1-based ids), ICFG-PEDES ``ICFG-PEDES.json`` (0-based ids, no val
    split: ``num_val_ids`` must be 0), RSTPReid ``data_captions.json`` (``img_path``), UFine6926
    ``ufine6926.json`` (images beside it, in ``images/``); images ``<image folder>/toy/*.jpg``.

    ``image_size`` is (height, width). Does nothing if ``toy_meta.json`` shows the same parameters.
    """
    from .bases import DATASETS
    layout = DATASETS[dataset_name]
    if num_val_ids and dataset_name == "ICFG-PEDES":
        raise ValueError("ICFG-PEDES has no val split: generate it with num_val_ids=0")
    out = Path(root) / layout.folder
    meta = {
        "dataset_name": dataset_name,
        "num_train_ids": num_train_ids,
        "num_val_ids": num_val_ids,
        "num_test_ids": num_test_ids,
        "images_per_id": images_per_id,
        "captions_per_image": captions_per_image,
        "image_size": list(image_size),
        "seed": seed,
    }
    meta_path, anno_path = out / "toy_meta.json", out / layout.annotation_files[0]
    if meta_path.is_file() and anno_path.is_file() and json.loads(meta_path.read_text()) == meta:
        return out

    rng = np.random.default_rng(seed)
    n_total = num_train_ids + num_val_ids + num_test_ids
    people = sample_identities(n_total, rng)
    splits = ["train"] * num_train_ids + ["val"] * num_val_ids + ["test"] * num_test_ids
    img_dir = out / layout.image_folder / "toy"
    if img_dir.exists():
        shutil.rmtree(img_dir)
    img_dir.mkdir(parents=True)
    meta_path.unlink(missing_ok=True)

    annos = []
    first_id = 1 if layout.one_based_train_ids or dataset_name == "UFine6926" else 0
    for pid, (person, split) in enumerate(zip(people, splits), start=first_id):
        for k in range(images_per_id):
            rel = f"toy/{pid:04d}_{k:02d}.jpg"
            draw_person(person, image_size, rng).save(img_dir.parent / rel, quality=90)
            captions = make_captions(person, captions_per_image, rng)
            record = {"split": split, "captions": captions, layout.path_field: rel, "id": pid}
            if dataset_name in ("CUHK-PEDES", "ICFG-PEDES"):
                record["processed_tokens"] = [tokenize(c) for c in captions]
            annos.append(record)
    anno_path.write_text(json.dumps(annos))
    meta_path.write_text(json.dumps(meta, indent=2))
    return out
