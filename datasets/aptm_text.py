"""APTM's caption augmentations (Yang et al., ACM MM 2023; code Shuyu-XJTU/APTM @ e507117): EDA
(Wei & Zou 2019, as APTM's dataset/eda.py applies it) backed by an offline synonym table, and the
span masking of APTM's MLM (its TextMaskingGenerator) on CLIP BPE tokens.

EDA here never downloads anything: APTM draws synonyms from NLTK WordNet, a separate download
that also turns "black" into "bleak" and "man" into "valet". The table below lists only
substitutes that keep every attribute (colour, gender, age group, garment type, sleeve or length,
carried-object type); basic colours, hat/cap, skirt/dress, bag, boots and hair have none.
"""
from __future__ import annotations

import random
import re

import torch

from utils.simple_tokenizer import SimpleTokenizer

# NLTK's English stop-word list as EDA uses it (plus the empty string): never replaced by SR.
STOP_WORDS = frozenset("""
i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her
hers herself it its itself they them their theirs themselves what which who whom this that these
those am is are was were be been being have has had having do does did doing a an the and but if or
because as until while of at by for with about against between into through during before after
above below to from up down in out on off over under again further then once here there when where
why how all any both each few more most other some such no nor not only own same so than too very s
t can will just don should now
""".split()) | {""}

_SYNONYMS: dict[str, tuple[str, ...]] = {
    # people
    "man": ("gentleman", "guy", "male"), "woman": ("lady", "female"), "men": ("gentlemen", "guys"),
    "women": ("ladies",), "boy": ("lad",), "girl": ("lass",), "lady": ("woman",), "guy": ("man",),
    "person": ("individual", "pedestrian"), "pedestrian": ("person", "walker"), "kid": ("child",),
    "child": ("kid",),
    # tops
    "shirt": ("top",), "top": ("shirt",), "tshirt": ("tee", "t shirt"), "tee": ("tshirt",),
    "sweater": ("jumper", "pullover"), "pullover": ("sweater",), "hoodie": ("hooded sweatshirt",),
    "jacket": ("coat",), "coat": ("jacket", "overcoat"),
    # bottoms
    "pants": ("trousers", "slacks"), "trousers": ("pants", "slacks"), "slacks": ("pants",),
    "jeans": ("denims", "denim pants"),
    # footwear
    "shoes": ("footwear",), "footwear": ("shoes",), "sneakers": ("trainers", "running shoes", "tennis shoes"),
    "trainers": ("sneakers",),
    # carried and worn items
    "backpack": ("knapsack", "rucksack"), "rucksack": ("backpack",), "handbag": ("purse",), "purse": ("handbag",),
    "glasses": ("spectacles", "eyeglasses"), "eyeglasses": ("glasses", "spectacles"), "sunglasses": ("shades",),
    "cellphone": ("phone",), "phone": ("cellphone", "mobile"), "bicycle": ("bike",), "bike": ("bicycle",),
    # clothing in general
    "outfit": ("clothing", "attire", "clothes"), "clothes": ("clothing", "garments", "attire"),
    "clothing": ("clothes", "garments", "attire"), "attire": ("clothing",),
    # verbs
    "wearing": ("dressed in", "sporting", "donning"), "wears": ("sports", "dons"),
    "carrying": ("holding", "toting"), "carries": ("holds", "totes"), "holding": ("carrying", "gripping"),
    "holds": ("carries",), "walking": ("strolling",), "walks": ("strolls",), "appears": ("seems",),
    "seems": ("appears",), "looks": ("appears", "seems"),
    # size, shape, age
    "long": ("lengthy",), "big": ("large",), "large": ("big",), "small": ("little",), "little": ("small",),
    "thin": ("slim", "slender"), "slim": ("thin", "slender"), "young": ("youthful",), "old": ("elderly", "aged"),
    "elderly": ("old", "aged"),
    # colour spelling only
    "gray": ("grey",), "grey": ("gray",), "colored": ("coloured",), "coloured": ("colored",), "tan": ("beige",),
    "beige": ("tan",), "purple": ("violet",), "violet": ("purple",), "dark": ("deep",), "light": ("pale",),
    # patterns
    "striped": ("stripy",), "plaid": ("checkered", "tartan"), "checkered": ("plaid", "checked"),
    "pattern": ("design", "print"), "design": ("pattern",), "logo": ("emblem",),
    # misc
    "also": ("too", "additionally"), "bald": ("hairless",),
}


def synonyms(word: str) -> tuple[str, ...]:
    """The table's synonyms of ``word``, looked up as written, then as a naive singular."""
    if word in STOP_WORDS:
        return ()
    return _SYNONYMS.get(word) or (_SYNONYMS.get(word[:-1], ()) if word.endswith("s") else ())


def clean(text: str) -> str:
    """EDA's cleaning: no apostrophes, hyphens/tabs/newlines to spaces, lower case, anything but
    a-z to a space, single spaces, no leading space."""
    text = text.replace("’", "").replace("'", "")
    text = re.sub(r"[-\t\n]", " ", text).lower()
    text = re.sub(r"[^a-z ]", " ", text)
    return re.sub(" +", " ", text).lstrip(" ")


def synonym_replacement(words: list[str], n: int, rng: random.Random) -> list[str]:
    """Up to ``n`` distinct non-stop words, in random order, each replaced everywhere by a random synonym."""
    candidates = sorted(set(w for w in words if w not in STOP_WORDS))
    rng.shuffle(candidates)
    replaced = 0
    for word in candidates:
        options = synonyms(word)
        if options:
            choice = rng.choice(options)
            words = [choice if w == word else w for w in words]
            replaced += 1
        if replaced >= n:
            break
    return " ".join(words).split(" ")


def random_insertion(words: list[str], n: int, rng: random.Random) -> list[str]:
    """``n`` times: the first synonym of a random word inserted at a random position before the last
    word. EDA draws words until one has synonyms and gives up at the tenth draw, even if that one has
    (so at most 9 draws are usable); the insertion is then skipped."""
    words = list(words)
    for _ in range(n):
        for draw in range(1, 11):
            options = synonyms(words[rng.randint(0, len(words) - 1)])
            if draw == 10:
                break
            if options:
                words.insert(rng.randint(0, len(words) - 1), options[0])
                break
    return words


def random_swap(words: list[str], n: int, rng: random.Random) -> list[str]:
    """``n`` swaps of two distinct random positions. The second position is redrawn while it equals the
    first; EDA gives up (no swap) at the fourth redraw, whatever it gives."""
    words = list(words)
    for _ in range(n):
        first = second = rng.randint(0, len(words) - 1)
        redraws = 0
        while second == first and redraws <= 3:
            second, redraws = rng.randint(0, len(words) - 1), redraws + 1
        if redraws <= 3:
            words[first], words[second] = words[second], words[first]
    return words


def random_deletion(words: list[str], p: float, rng: random.Random) -> list[str]:
    """Each word dropped with probability ``p``; one word stays if all were dropped."""
    if len(words) == 1:
        return list(words)
    kept = [w for w in words if rng.uniform(0, 1) > p]
    return kept or [words[rng.randint(0, len(words) - 1)]]


def eda(caption: str, alpha: float = 0.1, p_delete: float = 0.1, rng: random.Random | None = None) -> str:
    """One EDA operation, chosen uniformly among synonym replacement, random insertion, random swap
    and random deletion (APTM: num_aug 1, alpha_sr = alpha_ri = alpha_rs = 0.1, p_rd = 0.1), on the
    cleaned caption; ``n = max(1, int(alpha * words))``. The result holds only a-z and spaces."""
    rng = rng or random
    words = [w for w in clean(caption).split(" ") if w]
    if not words:
        return ""
    n = max(1, int(alpha * len(words)))
    operations = (lambda: synonym_replacement(words, n, rng), lambda: random_insertion(words, n, rng),
                  lambda: random_swap(words, n, rng), lambda: random_deletion(words, p_delete, rng))
    candidates = [clean(" ".join(operation())) for operation in operations]
    rng.shuffle(candidates)
    return candidates[0]


def ends_word(tokenizer: SimpleTokenizer, token: int) -> bool:
    """Whether a BPE token ends a word (CLIP marks word ends with ``</w>``)."""
    return tokenizer.decoder[token].endswith("</w>")


def whole_words(tokens: list[int], first: int, end: int, tokenizer: SimpleTokenizer) -> tuple[int, int]:
    """The span [first, end) of a caption widened to whole words: left while the token before it does
    not end a word (SOT excluded), right while its last token does not (APTM's mask_whole_word)."""
    eot = tokens.index(max(tokens))
    while first > 1 and not ends_word(tokenizer, tokens[first - 1]):
        first -= 1
    while end < eot and not ends_word(tokenizer, tokens[end - 1]):
        end += 1
    return first, end


def span_mask(ids: torch.Tensor, tokenizer: SimpleTokenizer, mask_prob: float = 0.25, max_masks: int = 10,
              skipgram_prob: float = 0.2, skipgram_size: int = 3, rng: random.Random | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """APTM's MLM masking on a CLIP caption (SOT ... EOT, padding 0): masked ids and labels
    (the original id at masked positions, -100 elsewhere).

    Candidates are the content tokens strictly between SOT and EOT (APTM also masks [SEP] and
    padding of its 56-token window; never done here). ``n = min(max_masks, max(1, round(mask_prob *
    content tokens)))``. Walking the candidates in random order, a span starts at each: with
    ``skipgram_prob`` of length 2..``skipgram_size``, else 1, widened to whole words; its positions are
    added until n are collected (a random n are kept if more). Each kept position becomes <|mask|>
    with probability 0.8, else with probability 0.5 a random content id (1..mask_id-1, never a
    special token), else stays.
    """
    rng = rng or random
    eot = int(ids.argmax())
    tokens = ids.tolist()
    candidates = list(range(1, eot))
    labels = torch.full_like(ids, -100)
    if not candidates:
        return ids.clone(), labels
    n_pred = min(max_masks, max(1, round(len(candidates) * mask_prob)))
    rng.shuffle(candidates)
    chosen: set[int] = set()
    for start in candidates:
        if len(chosen) >= n_pred:
            break
        if start in chosen:
            continue
        skipgram = skipgram_prob > 0 and skipgram_size >= 2 and rng.random() < skipgram_prob
        length = rng.randint(2, skipgram_size) if skipgram else 1
        first, end = whole_words(tokens, start, start + length, tokenizer)
        for position in range(first, end):
            if not 0 < position < eot:
                break
            chosen.add(position)
    positions = sorted(chosen)
    if len(positions) > n_pred:
        rng.shuffle(positions)
        positions = positions[:n_pred]
    masked = ids.clone()
    for position in positions:
        labels[position] = ids[position]
        if rng.random() < 0.8:
            masked[position] = tokenizer.mask_id
        elif rng.random() < 0.5:
            masked[position] = rng.randrange(1, tokenizer.mask_id)
    return masked, labels
